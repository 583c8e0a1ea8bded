"""Label distributions of generated images and the arrival filter, as small pure functions.

A GeNIe image starts from a real image of source class A, is noised to ratio r and denoised towards
target class B. How much of it is B is uncertain, so each image carries a *target weight* w and
its label is ``w * onehot(B) + (1 - w) * onehot(A)``:

* ``"hard"``: w = 1 (GeNIe as published: labelled B);
* ``"soft-r"``: w = r ** gamma (Diff-Mix style: the more noise, the more it is B);
* ``"teacher"``: w = the teacher's posterior of B restricted to {A, B}, ``p_B / (p_A + p_B)``.

The same restricted posterior decides the arrival filter: below ``min_target`` the image does not
look like its label (wrong label), above ``max_target`` it is too easy to teach anything.
The engine (:mod:`hardneg.plugin`) computes the scores and calls these; nothing here holds state.

Serves arrival (the engine's ``_accept``); options: :class:`LabelOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

LABEL_MODES = ("hard", "soft-r", "teacher")


def restricted_posterior(logits: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """``p_target / (p_source + p_target)`` from each row's softmax over ``logits`` ``(N, K)``.

    Computed as ``sigmoid(logit_target - logit_source)`` (the softmax normaliser cancels), which
    is exact and never divides by an underflowed probability. A row whose source is its target
    (same-class augmentation) scores 1: the set {source, target} has one element. A class id
    outside the logits' width scores NaN.
    """
    logits = logits.detach().float()
    n, k = logits.shape
    source = torch.as_tensor(source, device=logits.device).long().reshape(-1)
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    if source.shape[0] != n or target.shape[0] != n:
        raise ValueError(f"need one source and one target per row of {n} logits, got {source.shape[0]} and "
                         f"{target.shape[0]}")
    inside = (source >= 0) & (source < k) & (target >= 0) & (target < k)
    rows = torch.arange(n, device=logits.device)
    lt = logits[rows, target.clamp(0, k - 1)]
    ls = logits[rows, source.clamp(0, k - 1)]
    p = torch.sigmoid(lt - ls)
    p = torch.where(source == target, torch.ones_like(p), p)
    return torch.where(inside, p, torch.full_like(p, float("nan")))


def balanced_posterior(logits: Tensor, source: Tensor, target: Tensor, class_counts: Tensor,
                       strength: float = 1.0) -> Tensor:
    """:func:`restricted_posterior` after logit adjustment by the class prior (Menon et al., ICLR 2021).

    A teacher trained on imbalanced data scores a rare class low because it is rare, not because
    the image does not show it: ``sigmoid((l_t - l_s) - strength * log(n_t / n_s))`` is the
    posterior a balanced training set would have given. Rows whose source or target class has no
    samples yet are left uncorrected (there is no prior to remove); balanced counts or
    ``strength=0`` change nothing.
    """
    p = restricted_posterior(logits, source, target)
    counts = torch.as_tensor(class_counts, dtype=torch.float64, device=p.device).reshape(-1)
    k = logits.shape[1]
    if counts.shape[0] != k:
        raise ValueError(f"class_counts must have one entry per class ({k}), got {counts.shape[0]}")
    source = torch.as_tensor(source, device=p.device).long().reshape(-1).clamp(0, k - 1)
    target = torch.as_tensor(target, device=p.device).long().reshape(-1).clamp(0, k - 1)
    ns, nt = counts[source], counts[target]
    known = (ns > 0) & (nt > 0) & torch.isfinite(p) & (source != target)
    shift = float(strength) * torch.log(nt.clamp_min(1.0) / ns.clamp_min(1.0))
    logit = torch.logit(p.double().clamp(1e-12, 1 - 1e-12)) - shift
    return torch.where(known, torch.sigmoid(logit).to(p.dtype), p)


def target_probability(logits: Tensor, target: Tensor) -> Tensor:
    """The softmax probability of each row's ``target`` class (NaN outside the logits' width)."""
    logits = logits.detach().float()
    n, k = logits.shape
    target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
    p = F.softmax(logits, dim=1)[torch.arange(n, device=logits.device), target.clamp(0, k - 1)]
    inside = (target >= 0) & (target < k)
    return torch.where(inside, p, torch.full_like(p, float("nan")))


def target_weights(mode: str, ratios: Tensor, gamma: float = 0.5,
                   teacher_p_target: Optional[Tensor] = None) -> Tensor:
    """Per image target weight w in [0, 1] (float32) under label ``mode`` (see the module docstring).

    ``"soft-r"`` raises r to ``gamma`` in float64 before rounding to float32, so w is r ** gamma
    to float32 precision; ``"teacher"`` needs ``teacher_p_target``.
    """
    ratios = torch.as_tensor(ratios).reshape(-1)
    if mode == "hard":
        return torch.ones(ratios.shape[0], dtype=torch.float32)
    if mode == "soft-r":
        return (ratios.detach().cpu().double().clamp(0.0, 1.0) ** float(gamma)).float()
    if mode == "teacher":
        if teacher_p_target is None:
            raise ValueError("label_mode 'teacher' needs the teacher's posterior of every image")
        p = torch.as_tensor(teacher_p_target).detach().cpu().float().reshape(-1)
        if p.shape[0] != ratios.shape[0]:
            raise ValueError(f"got {p.shape[0]} teacher scores for {ratios.shape[0]} images")
        return p.clamp(0.0, 1.0)  # NaN stays NaN: the buffer rejects such rows
    raise ValueError(f"label mode must be one of {LABEL_MODES}, got {mode!r}")


class FilterResult(NamedTuple):
    """Which arriving images to keep, and how many were dropped on each side."""

    keep: Tensor  # (N,) bool
    low: int  # dropped: teacher posterior below min_target (label looks wrong)
    high: int  # dropped: above max_target (too easy)


def filter_by_posterior(p_target: Tensor, min_target: Optional[float] = None,
                        max_target: Optional[float] = None) -> FilterResult:
    """Keep images whose teacher posterior lies in ``[min_target, max_target]`` (open sides: None).

    An image without a score (NaN, e.g. a non-finite image the buffer will reject anyway) is kept
    here and counted on neither side.
    """
    p = torch.as_tensor(p_target).detach().cpu().float().reshape(-1)
    scored = torch.isfinite(p)
    low = scored & (p < min_target) if min_target is not None else torch.zeros_like(scored)
    high = scored & (p > max_target) if max_target is not None else torch.zeros_like(scored)
    return FilterResult(~(low | high), int(low.sum()), int(high.sum()))


def soft_targets(target: Tensor, source: Tensor, weights: Tensor, num_classes: int,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """``(N, K)`` rows ``w * onehot(target) + (1 - w) * onehot(source)`` (one-hot when source == target)."""
    target = torch.as_tensor(target).long().reshape(-1)
    source = torch.as_tensor(source, device=target.device).long().reshape(-1)
    w = torch.as_tensor(weights, device=target.device).to(dtype).reshape(-1, 1)
    out = F.one_hot(target, num_classes).to(dtype) * w
    return out + F.one_hot(source, num_classes).to(dtype) * (1 - w)


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class LabelOptions:
    """Label trust and arrival scoring (``HardNegConfig`` fields of the same names; ``label_options``).

    Whether a setting needs a teacher (``label_mode="teacher"``, the filters, ``curriculum="band"``)
    is checked by ``HardNegConfig``, which sees the curriculum too.
    """

    label_mode: str = "soft-r"  # target weight: "hard" 1 | "soft-r" r ** label_gamma (default) | "teacher"
    label_gamma: float = 0.5  # exponent of r in the "soft-r" target weight (Diff-Mix style)
    teacher: str = "none"  # who scores arriving images: "none" | "ema" (of the classifier) | "model" (given)
    teacher_decay: float = 0.99  # EMA decay of teacher="ema" (per observed step)
    teacher_warmup: bool = True  # EMA decay ramps up from 0 over the first steps (timm ModelEmaV3 warmup)
    teacher_prior_correction: float = 1.0  # logit-adjust the teacher posterior by the bank's class prior (0 = off)
    filter_min_target: Optional[float] = None  # drop arriving images whose teacher posterior is below this
    filter_max_target: Optional[float] = None  # ... or above this (too easy)
    score_batch: int = 256  # images per forward when scoring arrivals

    def __post_init__(self) -> None:
        from hardneg._checks import ConfigError, choice, in_range, int_at_least

        choice(self, "label_mode", ("hard", "soft-r", "teacher"))
        in_range(self, "label_gamma", 0.0, float("inf"), low_open=True, high_open=True)
        choice(self, "teacher", ("none", "ema", "model"))
        in_range(self, "teacher_decay", 0.0, 1.0, high_open=True)
        in_range(self, "teacher_prior_correction", 0.0, 10.0)
        if not isinstance(self.teacher_warmup, bool):
            raise ConfigError(f"teacher_warmup must be True or False, got {self.teacher_warmup!r}")
        for name in ("filter_min_target", "filter_max_target"):
            if getattr(self, name) is not None:
                in_range(self, name, 0.0, 1.0)
        lo, hi = self.filter_min_target, self.filter_max_target
        if lo is not None and hi is not None and lo >= hi:
            raise ConfigError(f"filter_min_target ({lo}) must be below filter_max_target ({hi}): every image "
                              "would be dropped")
        int_at_least(self, "score_batch", 1)
