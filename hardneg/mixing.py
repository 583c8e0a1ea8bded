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

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg.buffer import SyntheticSample
from hardneg.labels import soft_targets
from hardneg.observer import labels_outside, numpy_ok

MixMode = Literal["append", "substitute"]


@dataclass(frozen=True)
class MixedBatch:
    """A batch after mixing: rows ``[:n_real]`` are real, ``synthetic_mask`` marks the others."""

    x: Tensor
    y: Tensor
    weights: Tensor
    synthetic_mask: Tensor
    n_real: int
    # class ids of the rows when y is soft targets the mix made from class ids (real rows: their
    # id, generated rows: their target class), known without reading y; None otherwise
    label_ids: Optional[Tensor] = None

    @property
    def n_synthetic(self) -> int:
        return int(self.x.shape[0]) - self.n_real

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, y, weights)``: what a training loop needs."""
        return self.x, self.y, self.weights


def _weight_dtype(x: Tensor) -> torch.dtype:
    return _weight_dtype_of(x.dtype)


def _weight_dtype_of(dtype: torch.dtype) -> torch.dtype:
    # Loss weights are at least float32 even for half-precision inputs (0.3 is not a bf16 number).
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


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
    if not (y.ndim == 1 or (y.ndim == 2 and y.is_floating_point())):
        raise ValueError(f"y must be class ids (N,) or float targets (N, K), got shape {tuple(y.shape)} {y.dtype}")
    layout = MixLayout.of(x, y, mode, synthetic_weight, num_classes)
    return prepare_mix(synthetic, n, layout).fill(x, y)


@dataclass(frozen=True)
class MixLayout:
    """What a mixed batch looks like apart from its real rows' values: the batch's device, dtype,
    per-sample shape and label format, the mixing mode and the synthetic rows' weight. Known one
    step ahead (the last batch's), so :func:`prepare_mix` can build the batch before it exists."""

    device: torch.device
    dtype: torch.dtype
    sample_shape: tuple[int, ...]
    y_ndim: int
    y_dtype: torch.dtype
    y_classes: int  # K of (N, K) soft targets; 0 for class ids
    mode: MixMode = "append"
    synthetic_weight: float = 1.0
    num_classes: Optional[int] = None

    @classmethod
    def of(cls, x: Tensor, y: Tensor, mode: MixMode = "append", synthetic_weight: float = 1.0,
           num_classes: Optional[int] = None) -> "MixLayout":
        return cls(x.device, x.dtype, tuple(x.shape[1:]), int(y.ndim), y.dtype,
                   int(y.shape[1]) if y.ndim == 2 else 0, mode, float(synthetic_weight), num_classes)

    def fits(self, x: Tensor, y: Tensor) -> bool:
        """Whether a batch ``(x, y)`` has this layout (metadata only: no values read)."""
        return (x.device == self.device and x.dtype == self.dtype and x.shape[1:] == self.sample_shape
                and y.ndim == self.y_ndim and y.dtype == self.y_dtype
                and (y.ndim == 1 or int(y.shape[1]) == self.y_classes))


class HostViews(NamedTuple):
    """numpy views of a CPU :class:`PreparedMix`, made with it on the helper thread, so the fill on
    the training thread is one ``np.copyto`` (and, for soft targets made from class ids, one indexed
    store) without converting a tensor first."""

    x: np.ndarray
    label_ids: Optional[np.ndarray] = None  # with soft_from_ids
    y_flat: Optional[np.ndarray] = None  # with soft_from_ids: y as one flat (N * K,) array
    row_starts: Optional[np.ndarray] = None  # with soft_from_ids: i * K, the flat index of row i's class 0


@dataclass
class PreparedMix:
    """A mixed batch built before its real rows are known: synthetic rows, labels, weights and mask
    in place, the real rows' slots still to fill. :meth:`fill` copies one batch's real rows in (a
    copy into memory already allocated, nothing else), which is what ``mix`` does on the training
    thread when the engine drew and prepared the rows ahead of time (:mod:`hardneg.prefetch`).

    The tensors become the returned batch: a prepared mix is filled once.
    """

    x: Tensor
    y: Tensor
    weights: Tensor
    synthetic_mask: Tensor
    n_in: int
    n_real: int
    layout: MixLayout
    soft_from_ids: bool  # y comes out as (N, K) soft targets while the batch's y are class ids
    pairs: list[tuple[int, int]]
    label_ids: Optional[Tensor] = None  # with soft_from_ids: the rows' class ids, generated rows' in place
    filled: bool = False
    views: Optional[HostViews] = None  # on a CPU: numpy views of the tensors the fill writes

    def fits(self, x: Tensor, y: Tensor) -> bool:
        """Whether this can become the mixed batch of ``(x, y)`` (same rows, layout; not filled yet)."""
        return not self.filled and int(x.shape[0]) == self.n_in == int(y.shape[0]) and self.layout.fits(x, y)

    def fill(self, x: Tensor, y: Tensor) -> MixedBatch:
        """The mixed batch of ``(x, y)``: its first ``n_real`` rows copied in front of the prepared ones."""
        if not self.fits(x, y):
            raise ValueError("this prepared mix does not fit the batch (rows, device, dtype, shape or label "
                             "format changed, or it was filled already): call mix_batch instead")
        return self.fill_fitting(x, y)

    def fill_fitting(self, x: Tensor, y: Tensor) -> MixedBatch:
        """:meth:`fill` for a batch the caller has already found to fit (the engine's ``mix``, which
        checked the batch against this layout and the row count itself): the copies only."""
        self.filled = True
        n = self.n_real
        views = self.views
        if views is not None and not x.requires_grad:
            np.copyto(views.x[:n], x.numpy()[:n])  # (the layout fits: a CPU tensor of this dtype)
        else:
            _copy_rows(self.x, x, n)
        if self.soft_from_ids:
            ids = self.label_ids
            assert ids is not None
            k = int(self.y.shape[1])
            if views is not None and y.dtype == torch.int64 and y.device.type == "cpu":
                lab = views.label_ids[:n]
                np.copyto(lab, y.numpy()[:n])
                ones_set = not labels_outside(lab, k)
                if ones_set:
                    views.y_flat[views.row_starts[:n] + lab] = 1  # (rows zeroed by prepare_mix)
            else:
                _copy_rows(ids, y, n)
                ones_set = _one_hot_rows(self.y, ids, n)
            if not ones_set:
                self.y[:n] = F.one_hot(ids[:n], k).to(self.y.dtype)  # (raises on a bad id)
            return MixedBatch(self.x, self.y, self.weights, self.synthetic_mask, n, ids)
        _copy_rows(self.y, y, n)
        return MixedBatch(self.x, self.y, self.weights, self.synthetic_mask, n)


def prepare_mix(synthetic: SyntheticSample, n: int, layout: MixLayout) -> PreparedMix:
    """The mixed batch of ``n`` real rows of ``layout`` and the draw ``synthetic``, real rows left to
    :meth:`PreparedMix.fill`. Same values as :func:`mix_batch` (which is this and a fill)."""
    k = len(synthetic) if layout.mode == "append" else min(len(synthetic), n)
    n_real = n if layout.mode == "append" else n - k
    total, device = n_real + k, layout.device
    x = torch.empty((total, *layout.sample_shape), dtype=layout.dtype, device=device)
    x[n_real:] = synthetic.images[:k].to(device=device, dtype=layout.dtype, non_blocking=True)
    if device.type == "cpu":
        x[:n_real].zero_()  # touch the pages now: the fill on the training thread then only copies
    tw = synthetic.target_weights
    soft = tw is not None and bool((tw[:k] < 1).any())
    soft_from_ids = False
    label_ids = None
    if soft:
        if layout.y_ndim == 2:
            kk, ydtype = layout.y_classes, layout.y_dtype
        else:
            if layout.num_classes is None:
                raise ValueError("synthetic rows carry soft labels but y holds class ids: pass num_classes= so "
                                 "mix_batch can build (N, K) soft targets")
            kk, ydtype, soft_from_ids = int(layout.num_classes), torch.float32, True
            label_ids = torch.empty(total, dtype=torch.long, device=device)
            label_ids[n_real:] = synthetic.pairs[:k, 1].to(device)
        y = torch.empty((total, kk), dtype=ydtype, device=device)
        if soft_from_ids and device.type == "cpu":
            y[:n_real].zero_()  # the fill only sets the real rows' ones (_one_hot_rows)
        y[n_real:] = soft_targets(synthetic.labels[:k].to(device), synthetic.source_labels[:k].to(device),
                                  tw[:k].to(device), kk, ydtype)
    elif layout.y_ndim == 1:
        y = torch.empty(total, dtype=layout.y_dtype, device=device)
        y[n_real:] = synthetic.labels[:k].to(device, non_blocking=True).to(layout.y_dtype)
    else:
        y = torch.empty((total, layout.y_classes), dtype=layout.y_dtype, device=device)
        y[n_real:] = F.one_hot(synthetic.labels[:k].to(device).long(), layout.y_classes).to(layout.y_dtype)
    wdtype = _weight_dtype_of(layout.dtype)
    weights = torch.ones(total, dtype=wdtype, device=device)
    weights[n_real:] = float(layout.synthetic_weight)
    mask = torch.zeros(total, dtype=torch.bool, device=device)
    mask[n_real:] = True
    pairs = [(int(a), int(b)) for a, b in synthetic.pairs[:k].tolist()]
    views = None
    if numpy_ok(x):
        if not soft_from_ids:
            views = HostViews(x.numpy())
        elif numpy_ok(y):
            assert label_ids is not None
            views = HostViews(x.numpy(), label_ids.numpy(), y.numpy().reshape(-1), np.arange(n_real) * int(y.shape[1]))
    return PreparedMix(x, y, weights, mask, int(n), n_real, layout, soft_from_ids, pairs, label_ids, views=views)


def _one_hot_rows(y: Tensor, ids: Tensor, n: int) -> bool:
    """Set ``y[i, ids[i]] = 1`` for the first ``n`` rows of ``y``, zeroed before (CPU, by numpy: a few
    microseconds against ``F.one_hot``'s tens); False when it cannot (another device or dtype, or an
    id outside the classes, which ``F.one_hot`` then reports)."""
    if n <= 0:
        return True
    if not (numpy_ok(y) and numpy_ok(ids)):
        return False
    lab = ids[:n].numpy()
    if labels_outside(lab, int(y.shape[1])):
        return False
    y.numpy()[np.arange(n), lab] = 1
    return True


def _copy_rows(dst: Tensor, src: Tensor, n: int) -> None:
    """``dst[:n] = src[:n]``; CPU tensors numpy knows are copied by numpy on the calling thread (one
    memcpy, no OpenMP team waiting for cores the training step or the worker holds)."""
    if n <= 0:
        return
    if dst.dtype == src.dtype and numpy_ok(src) and numpy_ok(dst):
        np.copyto(dst[:n].numpy(), src[:n].numpy())
        return
    dst[:n].copy_(src[:n], non_blocking=True)


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
