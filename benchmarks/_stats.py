"""Paired statistics of the benchmarks: t-intervals of per-seed differences (accuracy) and of
per-repeat ratios (step times).

Every method of a comparison is run with the same seeds (same initial weights, data order and
split), so the right question is "how much does method X change seed i's result", not "do the
two clouds of results overlap". :func:`paired_difference` answers it with a Student-t
confidence interval over seeds; a difference counts as a gain or a loss only when its interval
excludes 0 (:func:`verdict`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences ``x_i - base_i`` with its two-sided t-interval."""

    mean: Optional[float]
    low: Optional[float]
    high: Optional[float]
    n: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (scipy)."""
    from scipy import stats

    if dof < 1:
        raise ValueError(f"a t-interval needs >= 1 degree of freedom, got {dof}")
    return float(stats.t.ppf(p, dof))


def paired_difference(values: Sequence[Optional[float]], base: Sequence[Optional[float]],
                      confidence: float = 0.95) -> PairedDifference:
    """Mean paired difference ``values - base`` over seeds where both exist, with its t-interval.

    With one pair the interval is undefined (``low``/``high`` None); with none, everything is.
    """
    if len(values) != len(base):
        raise ValueError(f"paired values need the same seeds: got {len(values)} and {len(base)}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    diffs = [float(v) - float(b) for v, b in zip(values, base) if v is not None and b is not None]
    n = len(diffs)
    if n == 0:
        return PairedDifference(None, None, None, 0, confidence)
    mean = statistics.fmean(diffs)
    if n == 1:
        return PairedDifference(mean, None, None, 1, confidence)
    half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n, confidence)


def verdict(diff: PairedDifference) -> str:
    """``"gain"`` / ``"loss"`` when the interval excludes 0, else ``"n.s."`` (or ``"-"`` without one)."""
    if diff.low is None or diff.high is None:
        return "-"
    if diff.low > 0:
        return "gain"
    if diff.high < 0:
        return "loss"
    return "n.s."


def format_difference(diff: PairedDifference, scale: float = 100.0) -> str:
    """``+1.2 [+0.3, +2.1] gain`` in points (``scale`` 100 turns fractions into percentage points)."""
    if diff.mean is None:
        return "-"
    if diff.low is None:
        return f"{scale * diff.mean:+.1f}"
    return f"{scale * diff.mean:+.1f} [{scale * diff.low:+.1f}, {scale * diff.high:+.1f}] {verdict(diff)}"


@dataclass(frozen=True)
class PairedRatio:
    """Geometric mean of paired ratios ``x_i / base_i`` with its two-sided t-interval (of the log ratios)."""

    ratio: Optional[float]
    low: Optional[float]
    high: Optional[float]
    n: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_ratio(values: Sequence[Optional[float]], base: Sequence[Optional[float]],
                 confidence: float = 0.95) -> PairedRatio:
    """How many times ``base`` the ``values`` are, pair by pair (e.g. the mean engine step of one
    repeat over the mean plain step of the same repeat, blocks run next to each other): the
    t-interval of the mean log ratio, exponentiated. Pairs with a missing or non-positive value
    are left out; with one pair the interval is undefined (``low``/``high`` None)."""
    if len(values) != len(base):
        raise ValueError(f"paired values need the same repeats: got {len(values)} and {len(base)}")
    pairs = [(float(v), float(b)) for v, b in zip(values, base)
             if v is not None and b is not None and v > 0 and b > 0]
    diff = paired_difference([math.log(v) for v, _ in pairs], [math.log(b) for _, b in pairs], confidence)
    if diff.mean is None:
        return PairedRatio(None, None, None, 0, confidence)
    low = math.exp(diff.low) if diff.low is not None else None
    high = math.exp(diff.high) if diff.high is not None else None
    return PairedRatio(math.exp(diff.mean), low, high, diff.n, confidence)


def against_limit(ratio: "PairedRatio | PairedDifference", limit: float) -> str:
    """``"met"`` when the whole interval lies at or below ``limit``, ``"not met"`` when it lies above
    it, ``"undecided"`` when it straddles it (the run is too noisy to tell), ``"-"`` without one."""
    if ratio.low is None or ratio.high is None:
        return "-"
    if ratio.high <= limit:
        return "met"
    if ratio.low > limit:
        return "not met"
    return "undecided"


def format_ratio(ratio: PairedRatio) -> str:
    """``1.032x [0.981, 1.086]`` (or the ratio alone without an interval)."""
    if ratio.ratio is None:
        return "-"
    if ratio.low is None or ratio.high is None:
        return f"{ratio.ratio:.3f}x"
    return f"{ratio.ratio:.3f}x [{ratio.low:.3f}, {ratio.high:.3f}]"
