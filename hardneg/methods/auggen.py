"""AugGen (Rahimi et al. 2025): new classes from mixed conditions of a class-conditional generator.

A class-conditional diffusion model trained only on the target data (hardneg's
:class:`~hardneg.generators.class_conditional.ClassConditionalGenerator`) is sampled with a
*mixed* condition ``c* = alpha * e_i + beta * e_j``, where ``e_k`` is the UNet's class embedding
of class k (the embedding of the one-hot ``alpha * onehot(i) + beta * onehot(j)``). Each mixed
condition becomes a **new label** (training-set expansion: K real classes plus one per mix; at
test time only the first K logits are read) or, optionally, a **soft label**
``(alpha / (alpha + beta), beta / (alpha + beta))`` over (i, j). ``(alpha, beta)`` is chosen by a
small grid search scoring each candidate's generated set in the classifier's embedding space:
*distinct* (its centroid far from every real class centroid) and *self-consistent* (low spread).
The paper finds alpha = beta ~ 0.7-0.8 and warns that FID-like generator metrics do not predict
downstream gains: judge the result by the classifier's accuracy.

How the mixing is done: the generator's UNet (a diffusers ``UNet2DModel`` with
``num_class_embeds = K + 1``, the last row the null class for classifier-free guidance) adds
``class_embedding(class_labels)`` to its time embedding. :func:`mixed_condition_embeddings`
temporarily swaps that ``nn.Embedding`` for a table of mixed vectors (label m -> the m-th mixed
condition, the null label -> the original null row), so the generator's own ``sample`` /
``generate`` run unchanged, guidance included. The swap mutates the generator for the duration of
the ``with`` block: do not use the same generator object from another thread meanwhile (the
engine's worker holds its own copy).
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg.data import ImageDataset

__all__ = [
    "CandidateScore",
    "GridSearchResult",
    "MixedCondition",
    "SoftLabelSet",
    "auggen_expand",
    "auggen_grid_search",
    "auggen_soft_labels",
    "mixed_condition_embeddings",
    "mixed_embeddings",
    "sample_mixed",
    "score_generated_set",
]

EmbedFn = Callable[[Tensor], Tensor]
_SWAP_LOCK = threading.RLock()  # re-entrant: a swap on one generator may nest in a swap on another


@dataclass(frozen=True)
class MixedCondition:
    """``c* = alpha * e_i + beta * e_j`` on the generator's class embeddings."""

    i: int
    j: int
    alpha: float
    beta: float

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta <= 0:
            raise ValueError(f"alpha and beta must be >= 0 and not both 0, got {self.alpha}, {self.beta}")

    @property
    def soft_weights(self) -> tuple[float, float]:
        """``(alpha / (alpha + beta), beta / (alpha + beta))``: the soft label over (i, j)."""
        s = self.alpha + self.beta
        return self.alpha / s, self.beta / s

    def name(self, class_names: Optional[Sequence[str]] = None) -> str:
        """A readable class name for the new label, e.g. ``"3*0.7+8*0.7"``."""
        a = class_names[self.i] if class_names is not None else str(self.i)
        b = class_names[self.j] if class_names is not None else str(self.j)
        return f"{a}*{self.alpha:g}+{b}*{self.beta:g}"


def _unet_embedding(generator: Any) -> nn.Embedding:
    unet = getattr(generator, "unet", None)
    emb = getattr(unet, "class_embedding", None)
    if not isinstance(emb, nn.Embedding):
        raise TypeError(
            "AugGen needs a class-conditional generator whose UNet has an nn.Embedding class_embedding "
            f"(hardneg's ClassConditionalGenerator), got {type(generator).__name__} with {type(emb).__name__}")
    return emb


def _check_conditions(generator: Any, conditions: Sequence[MixedCondition]) -> None:
    k = int(generator.num_classes)
    for c in conditions:
        if not (0 <= c.i < k and 0 <= c.j < k):
            raise ValueError(f"condition {c} names a class outside [0, {k})")


@torch.no_grad()
def mixed_embeddings(generator: Any, conditions: Sequence[MixedCondition]) -> Tensor:
    """``(M, E)`` mixed class-embedding vectors ``alpha * e_i + beta * e_j``, one per condition."""
    _check_conditions(generator, conditions)
    table = _unet_embedding(generator).weight.detach()
    i = torch.tensor([c.i for c in conditions], dtype=torch.long, device=table.device)
    j = torch.tensor([c.j for c in conditions], dtype=torch.long, device=table.device)
    a = torch.tensor([c.alpha for c in conditions], dtype=table.dtype, device=table.device).view(-1, 1)
    b = torch.tensor([c.beta for c in conditions], dtype=table.dtype, device=table.device).view(-1, 1)
    return a * table[i] + b * table[j]


class _ConditionTable(nn.Module):
    """Stand-in class embedding: label m -> ``table[m]``, the null label -> the original null row."""

    def __init__(self, table: Tensor, null_row: Tensor, null_label: int) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.register_buffer("null_row", null_row)
        self.null_label = int(null_label)

    def forward(self, labels: Tensor) -> Tensor:
        is_null = (labels == self.null_label).unsqueeze(-1)
        rows = self.table[labels.clamp(0, self.table.shape[0] - 1)]
        return torch.where(is_null, self.null_row.expand_as(rows), rows)


@contextmanager
def mixed_condition_embeddings(generator: Any, conditions: Sequence[MixedCondition]) -> Iterator[None]:
    """Within the block, the generator's class label m means ``conditions[m]`` (m < K).

    The null class keeps its embedding, so classifier-free guidance pushes towards the mixed
    condition. The original embedding module is restored on exit, also after an error.
    """
    k = int(generator.num_classes)
    if not 0 < len(conditions) <= k:
        raise ValueError(f"between 1 and num_classes ({k}) conditions fit in one swap, got {len(conditions)}")
    original = _unet_embedding(generator)
    table = mixed_embeddings(generator, conditions)
    swap = _ConditionTable(table, original.weight.detach()[k].clone(), k)
    with _SWAP_LOCK:
        generator.unet.class_embedding = swap
        try:
            yield
        finally:
            generator.unet.class_embedding = original


@torch.no_grad()
def sample_mixed(generator: Any, conditions: Sequence[MixedCondition], n_per_condition: int,
                 seed: int = 0, size: Optional[tuple[int, int]] = None) -> Tensor:
    """``n_per_condition`` samples of each mixed condition, condition-major: ``(M * n, C, H, W)`` on the CPU.

    Deterministic for a given ``seed``: conditions are sampled in groups of at most K (one swap
    each), group g with seed ``seed + g``; a single condition with ``alpha = 1, beta = 0`` gives
    exactly ``generator.sample([i] * n, seed)``.
    """
    if n_per_condition < 1:
        raise ValueError(f"n_per_condition must be >= 1, got {n_per_condition}")
    conditions = list(conditions)
    _check_conditions(generator, conditions)
    k = int(generator.num_classes)
    out = []
    for g, start in enumerate(range(0, len(conditions), k)):
        group = conditions[start:start + k]
        labels = torch.arange(len(group)).repeat_interleave(n_per_condition)
        with mixed_condition_embeddings(generator, group):
            out.append(generator.sample(labels, seed=int(seed) + g, size=size).cpu())
    return torch.cat(out)


# =========================================================================== scoring
@dataclass(frozen=True)
class CandidateScore:
    """One grid point: distinctness and spread of its generated sets (means over pairs) and the score."""

    alpha: float
    beta: float
    distinctness: float
    spread: float
    score: float


@dataclass
class GridSearchResult:
    """Every candidate's score and the best ``(alpha, beta)`` (first in grid order on ties)."""

    best: CandidateScore
    candidates: list[CandidateScore] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        return self.best.alpha

    @property
    def beta(self) -> float:
        return self.best.beta


def score_generated_set(embeddings: Tensor, class_centroids: Tensor, spread_weight: float = 1.0
                        ) -> tuple[float, float, float]:
    """``(distinctness, spread, score)`` of one generated set in the classifier's embedding space.

    Embeddings and centroids are L2-normalised. *Distinctness*: distance from the set's centroid to
    the nearest real class centroid (a new class should not sit on an old one). *Spread*: mean
    distance of the set's members to their centroid (a class should be self-consistent).
    ``score = distinctness - spread_weight * spread``: higher is better.
    """
    e = F.normalize(embeddings.float(), dim=1)
    c = F.normalize(class_centroids.float(), dim=1)
    mu = e.mean(0)
    distinct = float((c - mu).norm(dim=1).min())
    spread = float((e - mu).norm(dim=1).mean())
    return distinct, spread, distinct - spread_weight * spread


def _images_labels(real: Any) -> tuple[Tensor, Tensor]:
    if hasattr(real, "images") and hasattr(real, "labels"):
        return real.images, real.labels
    images, labels = real
    return torch.as_tensor(images), torch.as_tensor(labels)


@torch.no_grad()
def _class_centroids(embed: EmbedFn, images: Tensor, labels: Tensor, num_classes: int, batch: int = 256) -> Tensor:
    emb = torch.cat([F.normalize(embed(images[s:s + batch]).float().cpu(), dim=1) for s in range(0, len(images), batch)])
    sums = torch.zeros(num_classes, emb.shape[1]).index_add_(0, labels.long().cpu(), emb)
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).clamp(min=1).unsqueeze(1)
    return sums / counts


@torch.no_grad()
def auggen_grid_search(
    generator: Any,
    embed: EmbedFn,
    real: Any,
    pairs: Sequence[tuple[int, int]],
    alphas: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    betas: Optional[Sequence[float]] = None,
    n_per_condition: int = 16,
    seed: int = 0,
    spread_weight: float = 1.0,
) -> GridSearchResult:
    """Pick ``(alpha, beta)`` by how distinct and self-consistent the mixed classes come out.

    Args:
        generator: a :class:`ClassConditionalGenerator` (trained on ``real``'s classes).
        embed: images -> ``(N, D)`` embeddings of the current classifier (e.g. ``HardNeg.embed`` or
            ``lambda x: model.forward_head(model.forward_features(x), pre_logits=True)``).
        real: the real training set (ImageDataset or (images, labels)): class centroids, image size.
        pairs: the class pairs (i, j) to mix, e.g. the engine's most confused pairs.
        alphas, betas: the grid (betas default to alphas).
        n_per_condition: generated images per pair and candidate.
        seed: every candidate uses the same noise (common random numbers), so the comparison
            sees the conditions, not the noise; the search is deterministic for a seed.

    Each candidate's score is the mean of :func:`score_generated_set` over ``pairs``.
    """
    if not pairs:
        raise ValueError("auggen_grid_search needs at least one class pair to mix")
    images, labels = _images_labels(real)
    centroids = _class_centroids(embed, images, labels, int(generator.num_classes))
    size = tuple(images.shape[-2:])
    candidates: list[CandidateScore] = []
    for a, b in itertools.product(alphas, betas if betas is not None else alphas):
        conds = [MixedCondition(int(i), int(j), float(a), float(b)) for i, j in pairs]
        gen = sample_mixed(generator, conds, n_per_condition, seed=seed, size=size)
        scores = [score_generated_set(embed(chunk).cpu(), centroids, spread_weight)
                  for chunk in gen.split(n_per_condition)]
        d, s, total = (sum(v) / len(scores) for v in zip(*scores))
        candidates.append(CandidateScore(float(a), float(b), d, s, total))
    best = max(candidates, key=lambda c: c.score)  # max keeps the first of equal scores
    return GridSearchResult(best=best, candidates=candidates)


# =========================================================================== datasets
def _conditions(pairs: Sequence[tuple[int, int]], alpha: float, beta: float) -> list[MixedCondition]:
    if not pairs:
        raise ValueError("need at least one class pair (i, j) to mix")
    return [MixedCondition(int(i), int(j), float(alpha), float(beta)) for i, j in pairs]


def auggen_expand(generator: Any, real: ImageDataset, pairs: Sequence[tuple[int, int]], alpha: float = 0.75,
                  beta: float = 0.75, n_per_mix: int = 64, seed: int = 0) -> ImageDataset:
    """The real set plus ``n_per_mix`` images of each mixed condition, each mix a **new class**.

    Returns an :class:`ImageDataset` with ``K + len(pairs)`` classes: the real samples keep their
    labels and ids (first), mix m gets label ``K + m`` and a name like ``"3*0.75+8*0.75"``. Train a
    classifier with ``K + len(pairs)`` outputs on it and read only the first K logits at test time.
    """
    conds = _conditions(pairs, alpha, beta)
    k = real.num_classes
    images = sample_mixed(generator, conds, n_per_mix, seed=seed, size=tuple(real.images.shape[-2:]))
    labels = k + torch.arange(len(conds)).repeat_interleave(n_per_mix)
    names = list(real.class_names) + [c.name(real.class_names) for c in conds]
    return ImageDataset(torch.cat([real.images, images.to(real.images.dtype)]), torch.cat([real.labels, labels]), names)


@dataclass
class SoftLabelSet(torch.utils.data.Dataset):
    """Generated images with soft targets ``(N, K)``; items are ``(image, target, index)``."""

    images: Tensor
    targets: Tensor
    conditions: list[MixedCondition]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.images[index], self.targets[index], int(index)


def auggen_soft_labels(generator: Any, pairs: Sequence[tuple[int, int]], alpha: float = 0.75, beta: float = 0.75,
                       n_per_mix: int = 64, seed: int = 0, size: Optional[tuple[int, int]] = None) -> SoftLabelSet:
    """Images of each mixed condition with the soft label ``alpha/(alpha+beta)`` on i, ``beta/(alpha+beta)`` on j.

    The alternative to new classes: train with a soft-target loss
    (:func:`hardneg.training.soft_cross_entropy`) over the K real classes.
    """
    conds = _conditions(pairs, alpha, beta)
    k = int(generator.num_classes)
    images = sample_mixed(generator, conds, n_per_mix, seed=seed, size=size)
    targets = torch.zeros(len(conds) * n_per_mix, k)
    for m, c in enumerate(conds):
        wi, wj = c.soft_weights
        rows = slice(m * n_per_mix, (m + 1) * n_per_mix)
        targets[rows, c.i] += wi
        targets[rows, c.j] += wj
    return SoftLabelSet(images, targets, conds)
