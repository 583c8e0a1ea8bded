"""Argument types shared by the subcommands: checked when the command line is parsed.

A value that cannot work (``--batch-size 0``, ``--ada-grid 0.5,abc``, ``--device cuda`` on a
machine without CUDA) is rejected by argparse before any data is read or any model trained, with
``error: argument --batch-size: ...`` and exit code 2. :class:`UsageError` is what a subcommand
raises for a user mistake found later (an unknown class name, a missing path): the CLI prints it
as one ``error: ...`` line, exit code 2 (the traceback only with ``hardneg --debug``).
"""

from __future__ import annotations

import argparse
import re
import textwrap
from typing import Callable, Optional, Sequence


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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of every subcommand: the description's paragraphs as written, and each option's
    default shown once as ``(default: X)``. An option whose default is None (it depends on the data
    or the generator) or a flag says in its help text what happens when it is not given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def plain(doc: Optional[str], width: int = 88) -> str:
    """A module docstring as a plain ``--help`` description: Sphinx roles, double backticks and
    ``**bold**`` removed (``:class:`~a.B``` -> ``B``), each paragraph and ``*`` item re-filled to ``width``."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), doc or "")
    text = textwrap.dedent(text.replace("``", "").replace("**", "")).strip()
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        items = [" ".join(item.split()) for item in re.split(r"\n(?=\s*[*-] )", para)]
        paragraphs.append("\n".join(textwrap.fill(item, width, break_on_hyphens=False,
                                                   subsequent_indent="  " if item[:2] in ("* ", "- ") else "")
                                     for item in items))
    return "\n\n".join(paragraphs)


def class_index(token: str, class_names: Sequence[str]) -> int:
    """A class given by name or by index (a name wins: a folder's classes may be named ``"0"``, ``"1"``)."""
    token = token.strip()
    if token in class_names:
        return list(class_names).index(token)
    if token.isdigit() and int(token) < len(class_names):
        return int(token)
    raise UsageError(f"unknown class {token!r}; known classes: {list(class_names)} (or their indices 0.."
                     f"{len(class_names) - 1})")


def parse_pair(text: str, class_names: Sequence[str], option: str = "--pair") -> tuple[int, int]:
    """``"3,8"``, ``"cat,dog"`` or ``"cat:dog"`` -> (source, target) class indices, two different classes."""
    sep = ":" if ":" in text else ","
    parts = str(text).split(sep)
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise UsageError(f"{option} must be two classes SOURCE,TARGET (names or indices, e.g. 3,8), got {text!r}")
    a, b = (class_index(p, class_names) for p in parts)
    if a == b:
        raise UsageError(f"{option} {text!r} has the same source and target; GeNIe needs two classes")
    return a, b


def parse_pairs(spec: str, class_names: Sequence[str], option: str = "--pairs") -> list[tuple[int, int]]:
    """``"3:8,cat:dog"`` -> [(3, 8), ...]: comma-separated SOURCE:TARGET pairs, names or indices."""
    pairs = []
    for item in [s.strip() for s in str(spec).split(",") if s.strip()]:
        if item.count(":") != 1:
            raise UsageError(f"pair {item!r} of {option} must look like SOURCE:TARGET (e.g. 3:8)")
        pairs.append(parse_pair(item, class_names, option="pair"))
    if not pairs:
        raise UsageError(f"{option} is empty")
    return pairs
