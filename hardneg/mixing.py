"""How synthetic hard negatives enter a training batch: :func:`mix_batch` and :func:`weighted_loss`.

Both are pure functions. ``mix_batch`` either appends the synthetic rows after the real ones
(the batch grows) or substitutes the *last* rows of the batch (the batch size stays fixed, which
keeps memory and BatchNorm statistics stable). It returns per-sample loss weights (1 for real
rows, ``synthetic_weight`` for synthetic ones) and a mask of the synthetic rows, so the loss can
down-weight them or keep them apart (:func:`weighted_loss` with ``separate=True``).

Labels: a synthetic row labelled with full weight on its target class gets that class id (or a
one-hot row when ``y`` is soft), exactly as a hard GeNIe label. When any synthetic row carries a
target weight w < 1 (:mod:`hardneg.labels`), ``y`` comes back as ``(N, K)`` float soft targets:
real rows one-hot (or their own soft rows), synthetic rows ``w * onehot(B) + (1 - w) * onehot(A)``.

Serves ``mix`` (:func:`mix_batch`, called by :meth:`hardneg.HardNeg.mix_batch`) and the loss of a
training step (:func:`weighted_loss`, used by the trainer adapters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Union, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg.buffer import SyntheticSample
from hardneg.labels import soft_targets

MixMode = Literal["append", "substitute"]


@dataclass(frozen=True)
class MixedBatch:
    """A batch after mixing: rows ``[:n_real]`` are real, ``synthetic_mask`` marks the others."""

    x: Tensor
    y: Tensor
    weights: Tensor
    synthetic_mask: Tensor
    n_real: int

    @property
    def n_synthetic(self) -> int:
        return int(self.x.shape[0]) - self.n_real

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, y, weights)``: what a training loop needs."""
        return self.x, self.y, self.weights


def _weight_dtype(x: Tensor) -> torch.dtype:
    # Loss weights are at least float32 even for half-precision inputs (0.3 is not a bf16 number).
    return torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32


def _synthetic_labels(labels: Tensor, y: Tensor) -> Tensor:
    """Synthetic class ids in the format of ``y``: ids ``(N,)`` or soft/one-hot targets ``(N, K)``."""
    labels = labels.to(y.device, non_blocking=True)
    if y.ndim == 1:
        return labels.to(y.dtype)
    if y.ndim == 2 and y.is_floating_point():
        return F.one_hot(labels.long(), num_classes=y.shape[1]).to(y.dtype)
    raise ValueError(
        f"y must be class ids (N,) or float targets (N, K), got shape {tuple(y.shape)} {y.dtype}"
    )


def mix_batch(
    x: Tensor,
    y: Tensor,
    synthetic: Optional[SyntheticSample],
    mode: MixMode = "append",
    synthetic_weight: float = 1.0,
    num_classes: Optional[int] = None,
) -> MixedBatch:
    """Put ``synthetic`` samples into the batch ``(x, y)``.

    Args:
        x: real inputs ``(N, C, H, W)`` (any device/dtype; synthetic rows are moved to match).
        y: class ids ``(N,)`` or soft targets ``(N, K)``; synthetic rows get their target class.
        synthetic: a :meth:`SyntheticBuffer.sample` draw; ``None`` or empty leaves the batch as is
            (the very same tensors) with weights of ones.
        mode: ``"append"`` (N + k rows) or ``"substitute"`` (the last k real rows are replaced;
            k is capped at N).
        synthetic_weight: per-sample loss weight of the synthetic rows.
        num_classes: K of the soft targets made when ``y`` is class ids and a synthetic row has a
            target weight below 1 (with soft ``y``, K is ``y.shape[1]``).

    Raises:
        ValueError: when the synthetic images do not match the batch's per-sample shape (e.g. a
            3-channel generator feeding a 1-channel classifier), ``x`` is not floating point (uint8
            images would turn the generated rows into zeros) or ``y`` does not match ``x``.
    """
    if mode not in ("append", "substitute"):
        raise ValueError(f"mode must be 'append' or 'substitute', got {mode!r}")
    if not synthetic_weight >= 0:
        raise ValueError(f"synthetic_weight must be >= 0, got {synthetic_weight!r}")
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of rows, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    n = int(x.shape[0])
    wdtype = _weight_dtype(x)
    k = 0 if synthetic is None else len(synthetic)
    if mode == "substitute":
        k = min(k, n)
    if k == 0:
        return MixedBatch(
            x, y, torch.ones(n, dtype=wdtype, device=x.device),
            torch.zeros(n, dtype=torch.bool, device=x.device), n,
        )
    assert synthetic is not None
    images = synthetic.images
    if tuple(images.shape[1:]) != tuple(x.shape[1:]):
        hint = ""
        if images.ndim == x.ndim == 4 and images.shape[1] != x.shape[1]:
            hint = f" (channels: generator {images.shape[1]}, batch {x.shape[1]})"
        raise ValueError(
            f"synthetic images have per-sample shape {tuple(images.shape[1:])} but the batch has "
            f"{tuple(x.shape[1:])}{hint}: the generator must produce images like the training data"
        )
    if not x.is_floating_point():  # casting [0, 1] floats to uint8 would turn every generated row into zeros
        raise ValueError(f"x must be floating point to take generated images, got {x.dtype}: convert the batch "
                         "first (e.g. x.float() / 255 for uint8 images) to the range the generator was trained on")
    syn_x = images[:k].to(device=x.device, dtype=x.dtype, non_blocking=True)
    n_real = n if mode == "append" else n - k
    x_out = _cat_rows(x[:n_real], syn_x)
    tw = synthetic.target_weights
    if tw is not None and bool((tw[:k] < 1).any()):
        y_out = _soft_batch_targets(y[:n_real], synthetic, k, num_classes)
    else:
        y_out = torch.cat([y[:n_real], _synthetic_labels(synthetic.labels[:k], y)])
    total = n_real + k
    weights = torch.ones(total, dtype=wdtype, device=x.device)
    weights[n_real:] = float(synthetic_weight)
    mask = torch.zeros(total, dtype=torch.bool, device=x.device)
    mask[n_real:] = True
    return MixedBatch(x_out, y_out, weights, mask, n_real)


def _cat_rows(a: Tensor, b: Tensor) -> Tensor:
    """``torch.cat([a, b])``; two CPU float32 image blocks are joined by numpy on the calling thread
    (one memcpy each, no OpenMP team waiting for cores the training step or the worker holds)."""
    if (a.device.type == b.device.type == "cpu" and a.dtype == b.dtype == torch.float32
            and not (a.requires_grad or b.requires_grad)):
        import numpy as np

        return torch.from_numpy(np.concatenate([a.numpy(), b.numpy()]))
    return torch.cat([a, b])


def _soft_batch_targets(y_real: Tensor, synthetic: SyntheticSample, k: int, num_classes: Optional[int]) -> Tensor:
    """``(n_real + k, K)`` targets: real rows one-hot (or as given if soft), synthetic rows soft."""
    if y_real.ndim == 2 and y_real.is_floating_point():
        kk, dtype = int(y_real.shape[1]), y_real.dtype
        real = y_real
    elif y_real.ndim == 1:
        if num_classes is None:
            raise ValueError("synthetic rows carry soft labels but y holds class ids: pass num_classes= so "
                             "mix_batch can build (N, K) soft targets")
        kk, dtype = int(num_classes), torch.float32
        real = F.one_hot(y_real.long(), kk).to(dtype)
    else:
        raise ValueError(f"y must be class ids (N,) or float targets (N, K), got shape {tuple(y_real.shape)} "
                         f"{y_real.dtype}")
    device = y_real.device
    syn = soft_targets(synthetic.labels[:k].to(device), synthetic.source_labels[:k].to(device),
                       synthetic.target_weights[:k].to(device), kk, dtype)
    return torch.cat([real, syn])


class SeparateLoss(NamedTuple):
    """``loss = real + mean synthetic weight * synthetic``, with both parts for logging."""

    loss: Tensor
    real: Tensor
    synthetic: Tensor


@overload
def weighted_loss(
    per_sample_loss: Tensor, weights: Tensor, synthetic_mask: Tensor, separate: Literal[False] = ...
) -> Tensor: ...
@overload
def weighted_loss(
    per_sample_loss: Tensor, weights: Tensor, synthetic_mask: Tensor, separate: Literal[True]
) -> SeparateLoss: ...


def weighted_loss(
    per_sample_loss: Tensor, weights: Tensor, synthetic_mask: Tensor, separate: bool = False
) -> Union[Tensor, SeparateLoss]:
    """Reduce a per-sample loss (e.g. ``cross_entropy(..., reduction="none")``) with mixing weights.

    ``separate=False``: the weighted mean ``sum(w * l) / sum(w)``, so a synthetic weight of 0
    gives exactly the real loss and real rows keep their usual scale.
    ``separate=True``: the real mean and the synthetic mean computed apart (each group gets its
    own average, whatever its size) and combined as ``real + w_syn * synthetic`` where ``w_syn``
    is the mean weight of the synthetic rows; a group without rows contributes 0.
    """
    shapes_ok = per_sample_loss.shape == weights.shape == synthetic_mask.shape
    if per_sample_loss.ndim != 1 or not shapes_ok:
        raise ValueError(
            "per_sample_loss, weights and synthetic_mask must all be (N,), got "
            f"{tuple(per_sample_loss.shape)}, {tuple(weights.shape)}, {tuple(synthetic_mask.shape)}"
        )
    w = weights.to(per_sample_loss.dtype)
    if not separate:
        # clamp: all-zero weights give 0 (not NaN) without a device sync
        return (per_sample_loss * w).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)
    mask = synthetic_mask.to(torch.bool)
    zero = per_sample_loss.sum() * 0.0
    real_rows, syn_rows = per_sample_loss[~mask], per_sample_loss[mask]
    real = real_rows.mean() if real_rows.numel() else zero
    if syn_rows.numel():
        synthetic = syn_rows.mean()
        loss = real + w[mask].mean() * synthetic
    else:
        synthetic = zero
        loss = real
    return SeparateLoss(loss, real, synthetic)
