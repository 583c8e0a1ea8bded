"""timm adapter: :class:`HardNegTimm`, shaped like timm's ``mixup_fn`` plus an observe hook.

In timm's ``train.py`` (v1.0.23+, where ``train_one_epoch``'s ``_forward()`` computes the loss with
``result = task(input, target)``), docs/integrations.md lists the exact edits; in short::

    dataset_train = IndexedDataset(dataset_train)                     # after create_dataset(...)
    engine = HardNeg(HardNegConfig(num_classes=..., **normalization_from(data_config)),
                     model=model, dataset=dataset_train)              # after create_loader(...)
    mixup_fn = HardNegTimm(engine, mixup_fn)       # never None, so train_one_epoch always calls it

and in ``train_one_epoch``: ``for batch_idx, (input, target, ids) in enumerate(loader):`` and,
inside ``_forward()`` right after ``result = task(input, target)``::

    mixup_fn.after_forward(result['output'], target, ids)

Sample ids: timm's loaders yield ``(input, target)`` only; :class:`IndexedDataset` makes items
``(input, target, index)`` (``transform`` still reaches the wrapped dataset). Run ``train.py``
with ``--no-prefetcher``: the prefetcher's ``fast_collate`` keeps two fields (the ids are lost),
it normalises on the device and ``mixup_fn`` is never called with it; :class:`IndexedDataset`
recognises its uint8 images and raises :class:`HardNegError` saying so.

Order inside ``__call__``: timm's mixup/cutmix first (on the real batch, whose size stays even),
then the ready hard negatives are appended with one-hot targets, so generated images are never
blended and their logits give clean curriculum feedback. The embedding is captured by the
engine's hook on the classifier input (``forward_head(pre_logits=True)``).

Soft labels (``config.label_mode`` other than ``"hard"``): a generated row's target is
``w * onehot(target) + (1 - w) * onehot(source)``, so whenever the batch holds one with w < 1 the
targets are ``(N, K)`` even without mixup. timm's ``SoftTargetCrossEntropy`` (train.py's loss with
mixup) and ``nn.CrossEntropyLoss`` take them; ``LabelSmoothingCrossEntropy`` (``--smoothing``
without mixup) does not: use :meth:`HardNegTimm.soft_loss` there. timm's losses average
over the batch: per-sample weights (``config.synthetic_weight`` != 1) need :meth:`HardNegTimm.loss`
with a per-sample loss. Under distributed training each rank runs its own engine on its shard.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from hardneg.integrations._common import StepAdapter, hard_labels
from hardneg.plugin import HardNeg, HardNegError

__all__ = ["HardNegTimm", "IndexedDataset"]

MixupFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class HardNegTimm(StepAdapter):
    """``mixup_fn``-compatible callable that adds hard negatives, plus :meth:`after_forward`.

    :meth:`after_forward` is called inside train.py's forward, before backward: it keeps the step's
    logits and ids, and the engine observes them at the next call (after that backward and the
    optimizer step), at :meth:`flush` or at :meth:`close`.

    Args:
        engine: the :class:`hardneg.HardNeg` engine (built with ``model=`` so its hook captures
            the embeddings).
        mixup_fn: timm's ``Mixup`` (or any ``(x, y) -> (x, y)``) applied to the real batch first.
    """

    def __init__(self, engine: HardNeg, mixup_fn: Optional[MixupFn] = None) -> None:
        if not isinstance(engine, HardNeg):
            raise HardNegError(f"HardNegTimm needs a HardNeg engine, got {type(engine).__name__}")
        self.engine = engine
        self.mixup_fn = mixup_fn
        self._step = None
        self._labels: Optional[Tensor] = None
        self._pending: Optional[tuple[Any, ...]] = None  # (logits, labels, ids, step) awaiting backward

    @property
    def mixup_enabled(self) -> bool:
        """timm's ``train.py`` switches mixup off at ``--mixup-off-epoch`` through this flag."""
        return bool(getattr(self.mixup_fn, "mixup_enabled", False))

    @mixup_enabled.setter
    def mixup_enabled(self, value: bool) -> None:
        if self.mixup_fn is not None and hasattr(self.mixup_fn, "mixup_enabled"):
            self.mixup_fn.mixup_enabled = value  # type: ignore[attr-defined]

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Apply ``mixup_fn`` (if any) to the real batch, then append ready hard negatives."""
        self.flush()  # the previous step's observe: its backward has run by now
        hard = hard_labels(y)
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        # The engine mixes class ids; soft targets (mixup) keep their real rows, synthetic rows get
        # their label distribution (one-hot for hard labels).
        mixed = self._mix(x, hard if y.ndim == 2 else y)
        n = mixed.n_real
        labels = mixed.labels
        y_out = mixed.y
        if y.ndim == 2:
            syn = mixed.y[n:] if mixed.y.ndim == 2 else F.one_hot(labels[n:].to(y.device), y.shape[1])
            y_out = torch.cat([y[:n], syn.to(y.device, y.dtype)])
        self._labels = labels
        return mixed.x, y_out

    def after_forward(self, output: Any, target: Tensor, ids: Union[Tensor, Sequence[int]]) -> None:
        """Record one step for observing: ``output`` are the logits of the batch :meth:`__call__`
        returned, ``ids`` the dataset ids of the batch that went in. The engine observes it once
        backward has run (next call, :meth:`flush` or :meth:`close`)."""
        self.flush()
        logits = output[0] if isinstance(output, (tuple, list)) else output
        labels = self._labels
        if labels is None or labels.shape[0] != logits.shape[0]:
            labels = hard_labels(target)
        self._labels = None
        self._pending = (logits.detach(), labels, ids, self._step)

    def flush(self) -> None:
        """Observe the step recorded by :meth:`after_forward`, if any (call after backward)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            logits, labels, ids, step = pending
            self._observe(logits, ids, labels=labels, step=step)

    # loss(per_sample_loss) and soft_loss(output, target): the current step's reduction (StepAdapter);
    # soft_loss is a drop-in ``loss_fn(output, target)`` for train.py when its loss cannot take soft targets

    def close(self) -> None:
        """Observe what is left and stop the engine's worker (end of training)."""
        try:
            self.flush()
        finally:
            self.engine.close()


PREFETCHER_ERROR = (
    "IndexedDataset got a uint8 image: that is what timm's transforms produce for the prefetcher "
    "(train.py without --no-prefetcher, or create_loader(use_prefetcher=True)). The prefetcher's "
    "fast_collate drops the sample ids hardneg needs, normalises on the device out of hardneg's sight, "
    "and train.py then never calls mixup_fn. Run train.py with --no-prefetcher "
    "(create_loader(..., use_prefetcher=False)).")


class IndexedDataset(Dataset):
    """``(input, target)`` items become ``(input, target, index)``: the sample ids hardneg needs.

    Attribute writes such as timm's ``dataset.transform = ...`` go to the wrapped dataset. An item
    whose image is uint8 (timm's prefetcher transforms) raises :class:`HardNegError` saying to turn
    the prefetcher off: with it on, the ids never reach the loop (``fast_collate`` keeps two fields).
    """

    def __init__(self, dataset: Any) -> None:
        object.__setattr__(self, "dataset", dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        item = self.dataset[index]
        image = item[0]
        if getattr(image, "dtype", None) in (torch.uint8, np.uint8):
            raise HardNegError(PREFETCHER_ERROR)
        return image, item[1], int(index)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "dataset":
            object.__setattr__(self, name, value)
        else:
            setattr(self.dataset, name, value)
