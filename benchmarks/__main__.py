"""``python -m benchmarks <name> [options]`` from the repository root: the same as ``hardneg bench <name>``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from benchmarks import BENCHMARKS, get


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``<name> [options]`` and run that benchmark; exit code 2 on unknown names."""
    from hardneg.commands._args import HelpFormatter, plain

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=plain(__doc__),
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name in BENCHMARKS:
        module = get(name)
        bp = sub.add_parser(name, help=module.HELP.replace("%", "%%"), description=plain(module.__doc__),
                            formatter_class=HelpFormatter)
        module.add_arguments(bp)
    args = parser.parse_args(argv)
    return exit_code(get(args.bench).run(args))


def exit_code(results: object) -> int:
    """0, or the ``exit_code`` a benchmark put in its results (the GPU check: 1 when a section failed)."""
    return int(results.get("exit_code", 0)) if isinstance(results, dict) else 0


if __name__ == "__main__":
    sys.exit(main())
