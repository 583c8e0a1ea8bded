"""``hardneg bench <name>``: the benchmarks of :mod:`hardneg.benchmarks`, one sub-command each.

Each prints its figures as ratios against a baseline measured in the same run (medians of
repeated, interleaved measurements), and writes ``results.json`` and a plot to ``--out``
(default ``hardneg-out/bench/<name>``); ``--quick`` runs a small version in seconds. The latest
full figures, with the machine and the exact command, are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    from hardneg.benchmarks import BENCHMARKS, get
    from hardneg.commands._args import HelpFormatter, plain

    p = subparsers.add_parser(
        "bench", help="run a benchmark: " + ", ".join(BENCHMARKS), description=plain(__doc__),
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name in BENCHMARKS:
        module = get(name)
        bp = sub.add_parser(name, help=module.HELP.replace("%", "%%"),  # argparse %-formats help texts
                            description=plain(module.__doc__), formatter_class=HelpFormatter)
        module.add_arguments(bp)
        bp.set_defaults(func=run)
    p.set_defaults(func=run, _bench_parser=p)


def run(args: argparse.Namespace) -> int:
    from hardneg.benchmarks import get

    name = getattr(args, "bench", None)
    if not name:
        args._bench_parser.print_help()
        return 2
    get(name).run(args)
    return 0
