"""The step contract between the engine and a training loop: :class:`MixedStep`.

``HardNeg.mix(x, y)`` returns a :class:`MixedStep`. It unpacks like the ``(x, y, weights)`` tuple
loops have always used (``x, y, w = hn.mix(x, y)``), and it carries what the rest of the step
needs, so no adapter re-implements it:

- :meth:`MixedStep.loss` reduces a per-sample loss with the mixing weights (the one place the
  weighted / separate reduction is chosen from ``config.separate_synthetic_loss``);
- :meth:`MixedStep.cross_entropy` is that reduction over cross entropy for class-id or ``(N, K)``
  soft targets (label smoothing optional);
- :attr:`MixedStep.labels` are the class ids ``observe`` takes (generated rows: their target class),
  and ``hn.observe(..., mixed=step)`` tells real rows from generated ones from the step itself
  instead of from "the last mix".
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg.mixing import MixedBatch, weighted_loss

__all__ = ["MixedStep", "per_sample_cross_entropy"]


def per_sample_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """``(N,)`` cross entropy (float32) for class ids ``(N,)`` or soft targets ``(N, K)``."""
    logits = logits.float()
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    if label_smoothing:
        return F.cross_entropy(logits, targets.float(), reduction="none", label_smoothing=label_smoothing)
    return -(targets.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(1)


class MixedStep(tuple):
    """One training step after :meth:`hardneg.HardNeg.mix`: ``(x, y, weights)`` plus what ``observe``
    and the loss need.

    Attributes:
        batch: the :class:`~hardneg.mixing.MixedBatch` (``x``, ``y``, ``weights``, ``synthetic_mask``,
            ``n_real``).
        n_in: rows of the batch that went into ``mix``.
        pairs: ``(source class, target class)`` of each generated row, in row order (after the real rows).
        separate: whether :meth:`loss` keeps real and generated rows apart
            (``config.separate_synthetic_loss``).
    """

    batch: MixedBatch
    n_in: int
    pairs: list[tuple[int, int]]
    separate: bool
    engine_step: int

    def __new__(cls, batch: MixedBatch, n_in: int, pairs: list[tuple[int, int]], separate: bool = False,
                step: int = 0) -> "MixedStep":
        obj = super().__new__(cls, (batch.x, batch.y, batch.weights))
        obj.batch = batch
        obj.n_in = int(n_in)
        obj.pairs = list(pairs)
        obj.separate = bool(separate)
        obj.engine_step = int(step)  # the engine's step count when mixed; observing this batch advances it
        return obj

    def __reduce__(self):  # type: ignore[override]  # pickles as the plain (x, y, w) tuple
        return (tuple, (tuple(self),))

    @property
    def x(self) -> Tensor:
        return self[0]

    @property
    def y(self) -> Tensor:
        return self[1]

    @property
    def weights(self) -> Tensor:
        return self[2]

    @property
    def synthetic_mask(self) -> Tensor:
        return self.batch.synthetic_mask

    @property
    def n_real(self) -> int:
        return self.batch.n_real

    @property
    def n_total(self) -> int:
        return int(self[0].shape[0])

    @property
    def n_synthetic(self) -> int:
        return self.n_total - self.n_real

    @property
    def labels(self) -> Tensor:
        """Class ids ``(N,)`` of the mixed batch, on ``y``'s device: real rows their id (argmax of a
        soft row), generated rows their target class (what the curriculum's feedback asks about)."""
        y = self[1]
        if not (y.ndim == 2 and y.is_floating_point()):
            return y
        if self.batch.label_ids is not None and y is self.batch.y:
            return self.batch.label_ids  # kept by the mix: no argmax
        ids = y.detach().argmax(1)
        if self.n_synthetic:
            targets = torch.tensor([b for _, b in self.pairs], dtype=ids.dtype)
            ids = torch.cat([ids[: self.n_real], targets.to(ids.device, non_blocking=True)])
        return ids

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return self[0], self[1], self[2]

    # ------------------------------------------------------------------ the loss, written once
    def loss(self, per_sample_loss: Tensor, separate: Optional[bool] = None) -> Tensor:
        """Reduce a per-sample loss (``reduction="none"``) with this step's weights: the weighted mean
        ``sum(w * l) / sum(w)``, or with ``separate`` (default ``config.separate_synthetic_loss``) the
        real mean plus the generated rows' mean weight times their mean. A loss of another length
        (e.g. computed on a different batch) falls back to its plain mean."""
        if per_sample_loss.ndim != 1 or per_sample_loss.shape[0] != self.n_total:
            return per_sample_loss.mean()
        sep = self.separate if separate is None else bool(separate)
        out = weighted_loss(per_sample_loss, self[2], self.synthetic_mask, sep)
        return out.loss if sep else out  # type: ignore[union-attr]

    def cross_entropy(self, logits: Tensor, targets: Optional[Tensor] = None, label_smoothing: float = 0.0) -> Tensor:
        """Weighted cross entropy of ``logits`` against this step's ``y`` (or ``targets``)."""
        y = self[1] if targets is None else targets
        return self.loss(per_sample_cross_entropy(logits, y, label_smoothing))
