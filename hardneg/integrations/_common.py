"""What the trainer adapters share: :class:`StepAdapter` (the step contract) and finding images,
labels and sample ids in a batch.

Every adapter drives the engine the same way (:class:`StepAdapter`): ``mix`` before the forward
returns a :class:`~hardneg.step.MixedStep`, the loss is that step's weighted reduction, and
``observe`` runs after backward with the step passed in, so no adapter re-implements the reduction
or the real/generated split.

Trainers hand batches around in three shapes: a sequence ``(x, y, ids, ...)`` (what the default
collate makes of ``(image, label, index)`` items, e.g. :class:`hardneg.data.ImageDataset`), a dict
(``{"pixel_values", "labels", "sample_id"}``, the transformers convention) or something custom.
:class:`BatchLayout` says where the three parts live so an adapter can read them and write the
mixed images and labels back, in place when the batch is mutable.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from hardneg.plugin import HardNeg, HardNegError
from hardneg.step import MixedStep, per_sample_cross_entropy

IMAGE_KEYS = ("pixel_values", "image", "images", "x", "input", "inputs")
LABEL_KEYS = ("labels", "label", "y", "target", "targets")
ID_KEYS = ("sample_id", "sample_ids", "id", "ids", "idx", "index", "indices")

Key = Union[int, str]


@dataclass(frozen=True)
class BatchLayout:
    """Positions (sequence batch) or keys (dict batch) of the images, labels and sample ids."""

    x: Key
    y: Key
    ids: Optional[Key]

    @classmethod
    def infer(cls, batch: Any, keys: Optional[Sequence[str]] = None) -> "BatchLayout":
        """Find the parts: ``keys=(x, y, ids)`` names dict keys explicitly; else the usual names.

        A sequence batch is ``(x, y)`` or ``(x, y, ids, ...)``; a dict batch uses the first key
        found of :data:`IMAGE_KEYS`, :data:`LABEL_KEYS` and :data:`ID_KEYS`.
        """
        if isinstance(batch, Mapping):
            if keys is not None:
                kx, ky, kid = keys
                missing = [k for k in (kx, ky) if k not in batch]
                if missing:
                    raise HardNegError(f"batch dict has no key(s) {missing}; its keys are {list(batch)}")
                return cls(kx, ky, kid if kid in batch else None)
            kx = next((k for k in IMAGE_KEYS if k in batch), None)
            ky = next((k for k in LABEL_KEYS if k in batch), None)
            if kx is None or ky is None:
                raise HardNegError(
                    f"cannot find images/labels in a batch with keys {list(batch)}: use one of "
                    f"{IMAGE_KEYS} and one of {LABEL_KEYS}, or pass "
                    "batch_keys=(images_key, labels_key, ids_key)"
                )
            return cls(kx, ky, next((k for k in ID_KEYS if k in batch), None))
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
            return cls(0, 1, 2 if len(batch) >= 3 else None)
        raise HardNegError(
            f"unsupported batch of type {type(batch).__name__}: hardneg reads (x, y, ids, ...) sequences "
            "or dicts"
        )

    def split(self, batch: Any) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(images, labels, ids or None)`` of ``batch``."""
        ids = batch[self.ids] if self.ids is not None else None
        return batch[self.x], batch[self.y], (torch.as_tensor(ids) if ids is not None else None)

    def mutable(self, batch: Any) -> bool:
        """Whether :meth:`write` can edit ``batch`` in place (lists and dicts; not tuples)."""
        return isinstance(batch, (MutableSequence, MutableMapping))

    def write(self, batch: Any, x: Tensor, y: Tensor, in_place: bool) -> Any:
        """Put ``x`` and ``y`` into ``batch`` (in place, or into a shallow copy); ids stay as they are."""
        if in_place:
            if not self.mutable(batch):
                raise HardNegError(f"a {type(batch).__name__} batch cannot be edited in place")
            batch[self.x] = x
            batch[self.y] = y
            return batch
        if isinstance(batch, Mapping):
            out = copy.copy(batch) if isinstance(batch, MutableMapping) else dict(batch)
            out[self.x] = x
            out[self.y] = y
            return out
        items = list(batch)
        items[self.x] = x  # type: ignore[index]
        items[self.y] = y  # type: ignore[index]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        return type(batch)(items) if isinstance(batch, (tuple, list)) else items


def hard_labels(y: Tensor, synthetic_pairs: Optional[Sequence[tuple[int, int]]] = None) -> Tensor:
    """Class ids ``(N,)`` of class ids or of soft / one-hot targets ``(N, K)`` (argmax).

    ``synthetic_pairs`` (``engine.last_mix_pairs``): the last ``len(synthetic_pairs)`` rows are
    generated and get their target class, whatever their soft label's argmax (a generated image
    labelled 0.4 target / 0.6 source is still a negative *for* the target: that is what the
    curriculum's feedback asks about).
    """
    y = torch.as_tensor(y)
    if y.ndim == 2 and y.is_floating_point():
        ids = y.argmax(1)
        if synthetic_pairs:
            n_syn = len(synthetic_pairs)
            if n_syn > ids.shape[0]:
                raise HardNegError(f"{n_syn} synthetic pairs for a batch of {ids.shape[0]} rows")
            ids = ids.clone()
            ids[ids.shape[0] - n_syn :] = torch.tensor([int(b) for _, b in synthetic_pairs], dtype=ids.dtype,
                                                       device=ids.device)
        return ids
    return y


def require_ids(ids: Optional[Tensor], where: str) -> Tensor:
    """``ids`` or a :class:`HardNegError` that says how to get sample ids into the batch."""
    if ids is None:
        raise HardNegError(
            f"{where}: the batch carries no sample ids. hardneg keys its embedding bank by dataset sample "
            "id: return (image, label, index) items (hardneg.data datasets do) or dicts with one of "
            f"{ID_KEYS}"
        )
    return ids


def generation_on(config: Any, generator: Any) -> bool:
    """Whether an engine built from ``config``/``generator`` will run a generation worker."""
    return generator is not None or getattr(config, "generator", None) is not None


def flat_stats(stats: Mapping[str, Any], prefix: str = "hardneg/") -> dict[str, float]:
    """Every numeric counter of ``engine.stats()`` as one flat ``{prefix + name: float}`` dict, for
    trainer loggers (TensorBoard, CSV, W&B ...): nested dicts become ``buffer/size``,
    ``worker/images_produced``...; booleans become 0/1. Left out: ``None`` (not measured yet),
    strings (``worker/state``, ``last_error``) and the per-pair maps (``pair_r``,
    ``buffer/pairs``), whose keys change from refresh to refresh."""
    out: dict[str, float] = {}
    for key, value in stats.items():
        if key in ("pair_r", "pairs"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_stats(value, prefix=f"{name}/"))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)) and value == value:
            out[name] = float(value)
    return out


class StepAdapter:
    """The one step contract every adapter follows, over ``self.engine`` (a :class:`HardNeg`).

    ``_mix(x, y)`` (before the forward) keeps the returned :class:`~hardneg.step.MixedStep`;
    :meth:`loss` / :meth:`soft_loss` reduce with its weights; ``_observe(...)`` (after backward)
    hands the step back to the engine (the step stays readable until the next ``_mix``).
    """

    engine: Optional[HardNeg]
    _step: Optional[MixedStep] = None

    @property
    def step_record(self) -> Optional[MixedStep]:
        """The current training step's :class:`~hardneg.step.MixedStep` (None outside a step)."""
        return self._step

    @property
    def weights(self) -> Optional[Tensor]:
        """Per-sample loss weights of the current training batch (None outside a training step)."""
        return self._step.weights if self._step is not None else None

    @property
    def synthetic_mask(self) -> Optional[Tensor]:
        """Which rows of the current training batch are generated (None outside a training step)."""
        return self._step.synthetic_mask if self._step is not None else None

    def loss(self, per_sample_loss: Tensor) -> Tensor:
        """Reduce a per-sample loss (``reduction="none"``) with the current batch's weights (the plain
        mean outside a training step or for a loss of another length)."""
        if self._step is None:
            return per_sample_loss.mean()
        return self._step.loss(per_sample_loss)

    def soft_loss(self, output: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Cross entropy for class-id or ``(N, K)`` soft targets, reduced like :meth:`loss`."""
        return self.loss(per_sample_cross_entropy(output, target, label_smoothing))

    def _mix(self, x: Tensor, y: Tensor) -> MixedStep:
        assert self.engine is not None
        self._step = self.engine.mix(x, y)
        return self._step

    def _observe(self, logits: Optional[Tensor], ids: Any, labels: Optional[Tensor] = None,
                 step: Optional[MixedStep] = None) -> None:
        """Observe the step (after backward): labels default to the step's class ids."""
        assert self.engine is not None
        step = step if step is not None else self._step
        if labels is None:
            if step is None:
                raise HardNegError("observe needs labels when no mixed step is current")
            labels = step.labels
        if step is not None and int(labels.shape[0]) != step.n_total:
            step = None  # a batch other than the mixed one (e.g. mixup dropped a row): observe it as given
        self.engine.observe(labels=labels, logits=None if logits is None else logits.detach(), ids=ids,
                            mixed=step)
