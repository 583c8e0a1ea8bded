"""``hardneg bench <name>``: the benchmarks of a source checkout, one sub-command each.

Each prints its figures as ratios against a baseline measured in the same run (medians of
repeated, interleaved measurements), and writes ``results.json`` and a plot to ``--out``
(default ``hardneg-out/bench/<name>``); ``--quick`` runs a small version in seconds. The latest
full figures, with the machine and the exact command, are in ``benchmarks/README.md``.

The benchmarks are research code and are not installed with hardneg: they live in the repository's
top-level ``benchmarks/`` package. This command finds it next to the ``hardneg`` package of an
editable install (``pip install -e .`` in a clone); elsewhere it says so in one error line.
``python -m benchmarks <name>`` from the repository root runs the same code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

NOT_A_CHECKOUT = ("the benchmarks are not installed with hardneg: run `hardneg bench` from a source checkout "
                  "(git clone the repository, `pip install -e .` in it) or `python -m benchmarks <name>` "
                  "from the repository root")


def checkout_root() -> Optional[Path]:
    """The source checkout holding this ``hardneg`` package and a ``benchmarks/`` package, or None."""
    root = Path(__file__).resolve().parent.parent.parent
    ok = (root / "pyproject.toml").is_file() and (root / "benchmarks" / "__init__.py").is_file()
    return root if ok else None  # (site-packages has no pyproject.toml: an installed hardneg is no checkout)


def benchmarks_package() -> Optional[ModuleType]:
    """The checkout's ``benchmarks`` package (imported from the checkout root), or None outside a checkout."""
    root = checkout_root()
    if root is None:
        return None
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent.parent == root:
        return loaded
    if loaded is not None:  # another package of that name shadows the checkout's: do not mix them
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks")


def add_parser(subparsers: Any) -> None:
    from hardneg.commands._args import HelpFormatter, plain

    package = benchmarks_package()
    names = package.BENCHMARKS if package is not None else ()
    p = subparsers.add_parser(
        "bench", help="run a benchmark (source checkout only): " + (", ".join(names) or "none found"),
        description=plain(__doc__), formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="bench", metavar="BENCHMARK") if package is not None else None
    for name in names:
        module = package.get(name)
        bp = sub.add_parser(name, help=module.HELP.replace("%", "%%"),  # argparse %-formats help texts
                            description=plain(module.__doc__), formatter_class=HelpFormatter)
        module.add_arguments(bp)
        bp.set_defaults(func=run)
    if package is None:  # take any arguments: run() then says why no benchmark can run
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run, _bench_parser=p)


def run(args: argparse.Namespace) -> int:
    from hardneg.commands._args import UsageError

    package = benchmarks_package()
    if package is None:
        raise UsageError(NOT_A_CHECKOUT)
    name = getattr(args, "bench", None)
    if not name:
        args._bench_parser.print_help()
        return 2
    results = package.get(name).run(args)
    return int(results.get("exit_code", 0)) if isinstance(results, dict) else 0
