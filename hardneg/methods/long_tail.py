"""Long-tail targeting: generate for the rarest classes, from the head samples nearest to them.

Two parts, usable together or apart:

* :class:`LongTailTargeting`, registered as ``HardNegConfig(targeting="long-tail")``: every
  refresh it counts the classes in the embedding bank, splits them into *head* (the most frequent
  ``head_fraction`` of the classes) and *tail* (the rest, below the largest class), and gives each
  tail class a share of the refresh's images proportional to its deficit ``max_count - count``
  (so the class distribution moves towards balance). The sources of a tail class t are the head
  samples nearest to t's centroid in the bank (FAISS kNN): GeNIe turns them into t, keeping the
  head image's context. Results are labelled t. Settings: :class:`LongTailOptions` (flat
  ``HardNegConfig`` fields ``long_tail_head_fraction`` (0.5), ``long_tail_ratio`` (None: the
  curriculum's r; a number fixes r, e.g. a small r for fusion refinement) and
  ``long_tail_search_k`` (64, first kNN width)).
* The long-tail feature-space augmentation of Elberg et al. (2024): :func:`class_activation_maps`
  (CAMs of a timm CNN), :func:`saliency_fusion` (tail where the tail CAM is high, head where the
  head CAM is low, random elsewhere) and :class:`SaliencyFusionGenerator`, a generator wrapper
  that fuses each head source with a CAM-matched tail image and refines the splice with a few
  denoising steps of a base generator at a small r, labelled as the tail class.

Training events used: none of its own; the engine calls ``plan`` at each refresh with a
:class:`hardneg.targeting.PolicyContext` (its read-only bank view is all this policy reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg._checks import ConfigError
from hardneg.targeting import PlannedPair, PolicyContext, PolicyOptions, TargetingPolicy, allocate, register_policy

if TYPE_CHECKING:  # pragma: no cover
    from hardneg.bank import EmbeddingBank
    from hardneg.generators.base import Generator, Ratios

__all__ = [
    "FusionResult",
    "LongTailOptions",
    "LongTailTargeting",
    "SaliencyFusionGenerator",
    "class_activation_maps",
    "head_tail_split",
    "long_tail_plan",
    "saliency_fusion",
]


# =========================================================================== targeting
def head_tail_split(counts: Sequence[int], head_fraction: float = 0.5) -> tuple[list[int], list[int]]:
    """(head classes, tail classes) from per-class sample counts.

    Heads are the ``ceil(head_fraction * K')`` most frequent of the K' classes present (ties: lower
    class id first); tails are the other present classes that have fewer samples than the largest
    class. Classes with no sample have no centroid to target and are left out of both.
    """
    if not 0.0 < head_fraction < 1.0:
        raise ValueError(f"head_fraction must lie in (0, 1), got {head_fraction!r}")
    c = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(c > 0)
    if len(present) < 2:
        return present.tolist(), []
    order = present[np.argsort(-c[present], kind="stable")]
    n_head = min(len(order) - 1, max(1, math.ceil(head_fraction * len(order))))
    heads = order[:n_head].tolist()
    tails = [int(t) for t in order[n_head:] if c[t] < c.max()]
    return [int(h) for h in heads], tails


def _nearest_of_classes(bank: "EmbeddingBank", query: np.ndarray, classes: set[int], n: int,
                        search_k: int) -> list[int]:
    """The ``n`` bank samples of ``classes`` nearest to ``query`` (kNN, widened until enough are found)."""
    total = len(bank)
    k = min(total, max(search_k, 4 * n))
    while True:
        _, ids, labels = bank.search_with_labels(query[None, :], k)
        keep = [int(i) for i, lab in zip(ids[0], labels[0]) if i >= 0 and int(lab) in classes]
        if len(keep) >= n or k >= total:
            return keep[:n]
        k = min(total, 4 * k)


def long_tail_plan(
    bank: "EmbeddingBank",
    budget: int,
    sources_per_target: int = 16,
    head_fraction: float = 0.5,
    ratio: Optional[float] = None,
    search_k: int = 64,
) -> list[PlannedPair]:
    """The long-tail plan for a bank: images per tail class proportional to its deficit.

    Each tail class t gets ``n_t`` images (``allocate(budget, deficits)``), sourced from the
    ``sources_per_target`` head samples nearest to t's centroid, as one :class:`PlannedPair` per
    tail class (keyed by its most common head class) whose ``source_labels`` give each source's own
    head class; ``label`` is t.
    """
    if bank is None or len(bank) < 2 or budget <= 0:
        return []
    counts = bank.class_counts()
    heads, tails = head_tail_split(counts.tolist(), head_fraction)
    if not tails:
        return []
    deficits = [int(counts.max() - counts[t]) for t in tails]
    means = bank.class_means()
    plan: list[PlannedPair] = []
    head_set = set(heads)
    for t, deficit, n_t in zip(tails, deficits, allocate(budget, deficits)):
        if n_t <= 0:
            continue
        sources = _nearest_of_classes(bank, means[t], head_set, sources_per_target, search_k)
        if not sources:
            continue
        _, src_labels = bank.get(sources)
        heads_of = [int(h) for h in src_labels.tolist()]
        dominant = max(set(heads_of), key=heads_of.count)
        ratios = [float(ratio)] * n_t if ratio is not None else None
        # One entry (one request stream) per tail class; each source keeps its own head label.
        plan.append(PlannedPair((dominant, t), n_t, list(sources), ratios=ratios, label=t,
                                source_labels=heads_of, meta={"policy": "long-tail", "deficit": deficit}))
    return plan


@dataclass(frozen=True)
class LongTailOptions(PolicyOptions):
    """Options of the ``"long-tail"`` policy (flat ``HardNegConfig`` fields ``long_tail_*``)."""

    FLAT: ClassVar[dict[str, str]] = {"head_fraction": "long_tail_head_fraction", "ratio": "long_tail_ratio",
                                      "search_k": "long_tail_search_k"}
    head_fraction: float = 0.5
    ratio: Optional[float] = None
    search_k: int = 64

    def __post_init__(self) -> None:
        hf, r, k = self.head_fraction, self.ratio, self.search_k
        if isinstance(hf, bool) or not isinstance(hf, (int, float)) or not 0.0 < hf < 1.0:
            raise ConfigError(f"long_tail_head_fraction must lie in (0, 1), got {hf!r}")
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0):
            raise ConfigError(f"long_tail_ratio must lie in (0, 1] or be None (the curriculum's r), got {r!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"long_tail_search_k must be an integer >= 1, got {k!r}")


class LongTailTargeting(TargetingPolicy):
    """Targets the tail classes (deficit-proportional counts) from the head samples nearest to them."""

    name = "long-tail"
    options = LongTailOptions

    def __init__(self, head_fraction: float = 0.5, ratio: Optional[float] = None, search_k: int = 64) -> None:
        if not 0.0 < head_fraction < 1.0:
            raise ValueError(f"head_fraction must lie in (0, 1), got {head_fraction!r}")
        if ratio is not None and not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1] or be None (curriculum), got {ratio!r}")
        self.head_fraction = float(head_fraction)
        self.ratio = None if ratio is None else float(ratio)
        self.search_k = int(search_k)

    def choose(self, context: PolicyContext, budget: int) -> list[PlannedPair]:
        return long_tail_plan(context.bank, budget, context.sources_per_pair, self.head_fraction,
                              self.ratio, self.search_k)


register_policy("long-tail", lambda cfg: LongTailTargeting(**cfg.options_of(LongTailOptions).kwargs()),
                LongTailOptions)


# =========================================================================== fusion
@torch.no_grad()
def class_activation_maps(model: nn.Module, images: Tensor, classes: Union[Tensor, Sequence[int]],
                          size: Optional[tuple[int, int]] = None, batch_size: int = 256) -> Tensor:
    """Class activation maps (Zhou et al. 2016) of a timm CNN, normalised to ``[0, 1]`` per image.

    ``CAM_k = relu(sum_c w_kc * F_c)`` with ``F = model.forward_features(images)`` (N, C, h, w) and
    ``w`` the weight of ``model.get_classifier()`` (a linear head after global pooling), upsampled
    bilinearly to ``size`` (default: the images' size). Returns ``(N, H, W)``; the model's
    train/eval mode is restored.
    """
    if not hasattr(model, "forward_features") or not hasattr(model, "get_classifier"):
        raise TypeError("class_activation_maps needs a timm model (forward_features + get_classifier)")
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the classifier must be an nn.Linear after global pooling, got {type(head).__name__}")
    classes_t = torch.as_tensor(classes, dtype=torch.long).flatten()
    if images.ndim != 4 or classes_t.shape != (images.shape[0],):
        raise ValueError(f"need images (N, C, H, W) and classes (N,), got {tuple(images.shape)} and {tuple(classes_t.shape)}")
    out_size = tuple(size) if size is not None else tuple(images.shape[-2:])
    was_training = model.training
    model.eval()
    device = head.weight.device
    maps = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            feats = model.forward_features(x)
            if feats.ndim != 4:
                raise TypeError(f"forward_features must return a (N, C, h, w) map for CAMs, got {tuple(feats.shape)}")
            if feats.shape[1] != head.in_features and feats.shape[-1] == head.in_features:
                feats = feats.permute(0, 3, 1, 2)  # channels-last feature maps
            w = head.weight[classes_t[start:start + batch_size].to(device)]  # (n, C)
            cam = torch.einsum("nchw,nc->nhw", feats.float(), w.float()).relu()
            cam = F.interpolate(cam.unsqueeze(1), size=out_size, mode="bilinear", align_corners=False).squeeze(1)
            lo = cam.flatten(1).min(1).values.view(-1, 1, 1)
            hi = cam.flatten(1).max(1).values.view(-1, 1, 1)
            maps.append(((cam - lo) / (hi - lo).clamp_min(1e-8)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(maps) if maps else torch.zeros(0, *out_size)


@dataclass(frozen=True)
class FusionResult:
    """Fused images and where they came from: ``from_tail`` (N, 1, H, W) is True at tail pixels."""

    images: Tensor
    from_tail: Tensor


def _as_map(cam: Tensor, size: tuple[int, int]) -> Tensor:
    cam = cam.float()
    if cam.ndim == 3:
        cam = cam.unsqueeze(1)
    if cam.ndim != 4 or cam.shape[1] != 1:
        raise ValueError(f"a CAM must be (N, H, W) or (N, 1, H, W), got {tuple(cam.shape)}")
    if tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam


def saliency_fusion(
    head: Tensor,
    tail: Tensor,
    head_cam: Tensor,
    tail_cam: Tensor,
    high: float = 0.5,
    low: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> FusionResult:
    """Splice head and tail images (or latents) location by location, guided by saliency.

    At each location: the tail value where ``tail_cam >= high`` (the tail object), else the head
    value where ``head_cam < low`` (head background: context without the head object), else a fair
    coin (``generator`` makes it reproducible). ``head``/``tail`` are ``(N, C, H, W)``; CAMs are
    ``(N, H, W)`` or ``(N, 1, H, W)`` in ``[0, 1]`` at any resolution (resized to ``H x W``, so image
    CAMs can guide latent fusion). Label the result as the tail class.
    """
    if head.shape != tail.shape or head.ndim != 4:
        raise ValueError(f"head and tail must both be (N, C, H, W) of one shape, got {tuple(head.shape)}, {tuple(tail.shape)}")
    size = tuple(head.shape[-2:])
    h_cam = _as_map(head_cam, size).to(head.device)
    t_cam = _as_map(tail_cam, size).to(head.device)
    if h_cam.shape[0] != head.shape[0] or t_cam.shape[0] != head.shape[0]:
        raise ValueError("need one head CAM and one tail CAM per image")
    tail_region = t_cam >= high
    head_region = (~tail_region) & (h_cam < low)
    coin = torch.rand(t_cam.shape, generator=generator).to(head.device) < 0.5
    from_tail = tail_region | ((~tail_region) & (~head_region) & coin)
    return FusionResult(torch.where(from_tail, tail, head), from_tail)


class SaliencyFusionGenerator:
    """Generator protocol wrapper: CAM-guided head/tail fusion, refined by a base generator at small r.

    For each source (a head image of class ``source_labels[i]``), a tail image of
    ``target_labels[i]`` is picked from ``tail_pool`` among the ``k`` whose CAMs are nearest to the
    source's CAM (Elberg et al. pair samples by saliency, k = 3), the two are fused with
    :func:`saliency_fusion`, and ``base.generate(fused, target, target, ratios)`` runs only the few
    denoising steps of the (small) ``ratios`` conditioned on the tail class, smoothing the seams.
    With ``base=None`` the fused images are returned as they are.

    ``model`` (a timm CNN) is copied on construction: the CAMs come from that snapshot (the engine's
    worker gets its own deep copy of the generator, so it never touches the model being trained).
    Use it with ``HardNegConfig(targeting="long-tail", long_tail_ratio=0.3)``.
    """

    def __init__(self, model: nn.Module, tail_pool: Any, base: Optional["Generator"] = None, k: int = 3,
                 high: float = 0.5, low: float = 0.5, num_classes: Optional[int] = None) -> None:
        import copy

        images = getattr(tail_pool, "images", None)
        labels = getattr(tail_pool, "labels", None)
        if images is None and isinstance(tail_pool, (tuple, list)) and len(tail_pool) == 2:
            images, labels = tail_pool
        if images is None or labels is None:
            raise TypeError("tail_pool must be an ImageDataset or an (images, labels) pair")
        self.pool_images = torch.as_tensor(images).float()
        self.pool_labels = torch.as_tensor(labels).long()
        self.model = copy.deepcopy(model).eval()
        self.base = base
        self.k, self.high, self.low = int(k), float(high), float(low)
        if num_classes is None:
            num_classes = base.num_classes if base is not None else self.model.get_classifier().out_features
        self.num_classes = int(num_classes)
        self._pool_cams: dict[int, Tensor] = {}

    def _cams_of_class(self, c: int) -> tuple[Tensor, Tensor]:
        idx = (self.pool_labels == c).nonzero().flatten()
        if c not in self._pool_cams:
            imgs = self.pool_images[idx]
            self._pool_cams[c] = class_activation_maps(self.model, imgs, torch.full((len(idx),), c)) if len(idx) \
                else torch.zeros(0, *self.pool_images.shape[-2:])
        return idx, self._pool_cams[c]

    def generate(self, sources: Tensor, source_labels: Tensor, target_labels: Tensor, ratios: "Ratios",
                 seed: Optional[int] = None) -> Tensor:
        """Fuse every source with a CAM-matched tail image of its target class, then refine."""
        from hardneg.generators.base import GeneratorError, check_generate_inputs, check_output

        check_generate_inputs(sources, source_labels, target_labels, self.num_classes)
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        src_l = torch.as_tensor(source_labels).long().cpu()
        tgt_l = torch.as_tensor(target_labels).long().cpu()
        head = sources.detach().float().cpu()
        head_cam = class_activation_maps(self.model, head, src_l)
        tail = torch.empty_like(head)
        tail_cam = torch.empty_like(head_cam)
        for c in tgt_l.unique().tolist():
            rows = (tgt_l == c).nonzero().flatten()
            idx, cams = self._cams_of_class(int(c))
            if len(idx) == 0:
                raise GeneratorError(f"tail_pool has no image of class {c}")
            d = torch.cdist(head_cam[rows].flatten(1), cams.flatten(1))  # (rows, pool)
            near = d.topk(min(self.k, len(idx)), dim=1, largest=False).indices
            pick = near[torch.arange(len(rows)), torch.randint(near.shape[1], (len(rows),), generator=g)]
            tail[rows] = self.pool_images[idx[pick]].to(tail.dtype)
            tail_cam[rows] = cams[pick]
        fused = saliency_fusion(head, tail, head_cam, tail_cam, self.high, self.low, generator=g).images
        fused = fused.to(sources.device, sources.dtype)
        if self.base is None:
            return check_output(fused)
        return self.base.generate(fused, target_labels, target_labels, ratios, seed=seed)
