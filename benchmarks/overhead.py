"""Thin wrapper: `python benchmarks/overhead.py [--quick] [--out DIR] ...` == `hardneg bench overhead ...`.

The benchmark lives in :mod:`hardneg.benchmarks.overhead` so the installed console script finds it.
"""

import sys

from hardneg.benchmarks.overhead import main

if __name__ == "__main__":
    sys.exit(main())
