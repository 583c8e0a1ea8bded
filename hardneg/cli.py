"""The ``hardneg`` command line: ``demo | fit-generator | generate | bench``.

Each subcommand lives in its own module under :mod:`hardneg.commands` exposing
``add_parser(subparsers)`` (which sets ``func=run``) and ``run(args) -> int``; heavy imports
happen inside ``run`` so ``hardneg --help`` stays fast.

Errors: arguments are checked when parsed (argparse, exit code 2). A user error found later
(:class:`~hardneg.commands._args.UsageError`, an invalid config, a bad checkpoint or data folder,
a generator that does not fit) prints one ``error: ...`` line and exits with code 2; ``--debug``
shows its traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import NoReturn, Optional, Sequence

COMMAND_MODULES = ("demo", "fit_generator", "generate", "bench")


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (the usage is one ``--help`` away), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hardneg",
        description="Online GeNIe hard negatives for the class pairs your classifier confuses.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of user errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"hardneg.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hardneg.commands.{name}":
                continue  # subcommand not shipped in this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU-feature probe
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug or not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


# (module, class) of the errors that mean "the input was wrong", not "hardneg has a bug". Looked up
# in sys.modules: an error can only be of a class whose module was imported, and --help stays fast.
USER_ERRORS = (
    ("hardneg.commands._args", "UsageError"),
    ("hardneg.config", "ConfigError"),
    ("hardneg.plugin", "HardNegError"),
    ("hardneg.checkpoint", "CheckpointError"),
    ("hardneg.data", "DataError"),
    ("hardneg.generators.base", "GeneratorError"),
)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports a mistake in the input (printed as one line) rather than a bug."""
    for module_name, class_name in USER_ERRORS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
