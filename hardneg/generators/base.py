"""The one protocol every generator backend implements, plus shared input checks.

``generate(sources, source_labels, target_labels, ratios, seed=None) -> images`` with the GeNIe
semantics: each source image (class A) is noised to timestep ``int(T * r)`` of its own ratio r,
only the reverse steps at or below that timestep are run, conditioned on the *target* class B
with classifier-free guidance; the returned image is labelled B by the caller.
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor

Ratios = Union[float, Sequence[float], Tensor]


class GeneratorError(RuntimeError):
    """A generator got bad input or produced unusable output (e.g. non-finite values)."""


@runtime_checkable
class Generator(Protocol):
    """What the engine, the worker and the CLI need from a generator backend."""

    num_classes: int

    def generate(
        self,
        sources: Tensor,
        source_labels: Tensor,
        target_labels: Tensor,
        ratios: Ratios,
        seed: Optional[int] = None,
    ) -> Tensor:
        """Return images shaped like ``sources`` and in the training data's value range."""
        ...


def as_ratio_tensor(ratios: Ratios, n: int) -> Tensor:
    """Broadcast ``ratios`` to a float64 CPU tensor of length ``n``; every r must lie in (0, 1]."""
    r = torch.as_tensor(ratios, dtype=torch.float64).flatten().cpu()
    if r.numel() == 1:
        r = r.expand(n).clone()
    if r.numel() != n:
        raise GeneratorError(f"got {r.numel()} ratios for {n} sources; pass one per source or one for all")
    if not torch.isfinite(r).all() or (r <= 0).any() or (r > 1).any():
        raise GeneratorError(f"every noise ratio r must lie in (0, 1], got {r.tolist()}")
    return r


def check_generate_inputs(
    sources: Tensor, source_labels: Tensor, target_labels: Tensor, num_classes: int
) -> None:
    """Validate shapes, dtypes, finiteness and label ranges of a ``generate`` call."""
    if not isinstance(sources, Tensor) or sources.ndim != 4:
        raise GeneratorError(f"sources must be a (N, C, H, W) tensor, got {getattr(sources, 'shape', type(sources))}")
    if not sources.is_floating_point():
        raise GeneratorError(f"sources must be a float tensor, got dtype {sources.dtype}")
    if not torch.isfinite(sources).all():
        raise GeneratorError("sources contain NaN or infinite values")
    n = sources.shape[0]
    for name, labels in (("source_labels", source_labels), ("target_labels", target_labels)):
        labels = torch.as_tensor(labels)
        if labels.shape != (n,):
            raise GeneratorError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise GeneratorError(f"{name} must lie in [0, {num_classes}), got {labels.tolist()}")


def check_output(images: Tensor) -> Tensor:
    """Raise :class:`GeneratorError` when a generator produced non-finite values."""
    if not torch.isfinite(images).all():
        bad = (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten().tolist()
        raise GeneratorError(f"generator produced NaN/inf values for sample(s) {bad}")
    return images
