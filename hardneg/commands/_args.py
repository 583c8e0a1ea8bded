"""Argument types shared by the subcommands: checked when the command line is parsed.

A value that cannot work (``--batch-size 0``, ``--ada-grid 0.5,abc``, ``--device cuda`` on a
machine without CUDA) is rejected by argparse before any data is read or any model trained, with
``error: argument --batch-size: ...`` and exit code 2. :class:`UsageError` is what a subcommand
raises for a user mistake found later (an unknown class name, a missing path): the CLI prints it
as one ``error: ...`` line, exit code 2 (the traceback only with ``hardneg --debug``).
"""

from __future__ import annotations

import argparse
from typing import Callable


class UsageError(ValueError):
    """A mistake in how the command was called; printed as one ``error:`` line (exit code 2)."""


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def ratio_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated noise ratios in (0, 1], increasing, at least two."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = tuple(float(t) for t in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in (0, 1] like 0.5,0.7,0.9, got "
                                         f"{text!r}") from None
    if len(values) < 2 or any(not 0.0 < v <= 1.0 for v in values) or list(values) != sorted(values):
        raise argparse.ArgumentTypeError(f"must be at least two increasing ratios in (0, 1], got {text!r}")
    return values


def device(text: str) -> str:
    """An argparse type: a torch device that exists here (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    name = str(text).strip()
    if name == "cpu":
        return name  # no torch import for the default: --help stays fast
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{name!r} was asked for but CUDA is not available here (no GPU, "
                                             "or a CPU-only torch build); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise argparse.ArgumentTypeError(f"{name!r} was asked for but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {name!r}; use cpu, cuda[:N] or mps")
    return name
