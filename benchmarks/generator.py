"""Thin wrapper: `python benchmarks/generator.py [--quick] [--out DIR] ...` == `hardneg bench generator ...`.

The benchmark lives in :mod:`hardneg.benchmarks.generator` so the installed console script finds it.
"""

import sys

from hardneg.benchmarks.generator import main

if __name__ == "__main__":
    sys.exit(main())
