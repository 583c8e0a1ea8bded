"""Thin wrapper: `python benchmarks/bank.py [--quick] [--out DIR] ...` == `hardneg bench bank ...`.

The benchmark lives in :mod:`hardneg.benchmarks.bank` so the installed console script finds it.
"""

import sys

from hardneg.benchmarks.bank import main

if __name__ == "__main__":
    sys.exit(main())
