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

from hardneg.integrations._common import hard_labels
from hardneg.mixing import weighted_loss
from hardneg.plugin import HardNeg, HardNegError

__all__ = ["HardNegTimm", "IndexedDataset"]

MixupFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class HardNegTimm:
    """``mixup_fn``-compatible callable that adds hard negatives, plus :meth:`after_forward`.

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
        self.weights: Optional[Tensor] = None
        self.synthetic_mask: Optional[Tensor] = None
        self._labels: Optional[Tensor] = None

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
        hard = hard_labels(y)
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        # The engine mixes class ids; soft targets (mixup) keep their real rows, synthetic rows get
        # their label distribution (one-hot for hard labels).
        mixed = self.engine.mix_batch(x, hard if y.ndim == 2 else y)
        n = mixed.n_real
        labels = hard_labels(mixed.y, self.engine.last_mix_pairs)
        y_out = mixed.y
        if y.ndim == 2:
            syn = mixed.y[n:] if mixed.y.ndim == 2 else F.one_hot(labels[n:].to(y.device), y.shape[1])
            y_out = torch.cat([y[:n], syn.to(y.device, y.dtype)])
        self.weights, self.synthetic_mask = mixed.weights, mixed.synthetic_mask
        self._labels = labels
        return mixed.x, y_out

    def after_forward(self, output: Any, target: Tensor, ids: Union[Tensor, Sequence[int]]) -> None:
        """Observe one step: ``output`` are the logits of the batch :meth:`__call__` returned,
        ``ids`` the dataset ids of the batch that went in."""
        logits = output[0] if isinstance(output, (tuple, list)) else output
        labels = self._labels
        if labels is None or labels.shape[0] != logits.shape[0]:
            labels = hard_labels(target)
        self._labels = None
        self.engine.observe(labels=labels, logits=logits.detach(), ids=ids)

    def soft_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Cross entropy for class-id or ``(N, K)`` soft targets, reduced with the last batch's weights.

        A drop-in ``loss_fn(output, target)`` for train.py when its own loss cannot take soft targets.
        """
        if target.ndim == 1:
            per_sample = F.cross_entropy(output, target, reduction="none")
        else:
            per_sample = -(target * F.log_softmax(output, dim=1)).sum(1)
        return self.loss(per_sample)

    def loss(self, per_sample_loss: Tensor) -> Tensor:
        """Reduce a per-sample loss with the weights of the last batch (their mean when unset)."""
        if self.weights is None or self.weights.shape != per_sample_loss.shape:
            return per_sample_loss.mean()
        separate = self.engine.config.separate_synthetic_loss
        mask = self.synthetic_mask
        assert mask is not None
        out = weighted_loss(per_sample_loss, self.weights, mask, separate)
        return out.loss if separate else out  # type: ignore[union-attr]

    def close(self) -> None:
        """Stop the engine's worker (end of training)."""
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
