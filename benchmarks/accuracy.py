"""Thin wrapper: `python benchmarks/accuracy.py [--quick] [--out DIR] ...` == `hardneg bench accuracy ...`.

The benchmark lives in :mod:`hardneg.benchmarks.accuracy` so the installed console script finds it.
"""

import sys

from hardneg.benchmarks.accuracy import main

if __name__ == "__main__":
    sys.exit(main())
