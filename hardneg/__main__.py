"""``python -m hardneg``: the same command line as the ``hardneg`` script."""

import sys

from hardneg.cli import main

if __name__ == "__main__":
    sys.exit(main())
