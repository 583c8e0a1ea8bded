"""Lightning adapter: :class:`HardNegCallback` (+ :class:`HardNegLightningMixin` for tuple batches).

Adoption::

    trainer = L.Trainer(callbacks=[HardNegCallback(cfg, dataset=train_set)])

Training events used, one engine (:class:`hardneg.HardNeg`) behind them:

- ``setup("fit")`` (or ``on_train_start`` when the dataset comes from the train dataloader):
  build the engine on the LightningModule; forward hooks capture the embeddings (the input of the
  module's last ``nn.Linear``, or the output of ``embedding_layer``) and logits (the module's
  ``forward`` output) while it trains.
- ``on_train_batch_start``: mix ready hard negatives into the batch *in place*. A callback cannot
  return a new batch, so this works for lists (what the default collate makes of
  ``(image, label, index)`` items) and dicts. For tuples or custom batches, add
  :class:`HardNegLightningMixin` to the LightningModule: it mixes in ``on_after_batch_transfer``
  and returns the new batch. Validation/test batches are never touched.
- ``on_train_batch_end``: observe the captured embeddings, the labels of the mixed batch, the
  logits (``training_step`` may return ``{"loss": ..., "logits": ...}``; else the hook's) and the
  batch's sample ids.
- ``state_dict``/``load_state_dict``: the whole engine state (bank, confusion, curriculum,
  buffer) rides in Lightning checkpoints; ``trainer.fit(ckpt_path=...)`` continues from it.
- ``on_fit_end``/``on_exception``/``teardown``: stop the generation worker.

Soft labels: with ``config.label_mode`` other than ``"hard"`` the mixed batch's labels are
``(N, K)`` float targets (generated rows ``w * target + (1 - w) * source``), so ``training_step``
needs a loss that takes them: ``F.cross_entropy(logits, y)`` does (probability targets). The
engine still observes class ids (generated rows: their target class).

Per-sample loss weights (synthetic rows weigh ``config.synthetic_weight``) are
``callback.weights`` / ``self.hardneg_weights`` in a module with the mixin; ``self.hardneg_loss``
reduces a per-sample loss with them. With the default ``synthetic_weight=1.0`` the plain mean
loss is already right. One engine per process: under DDP every rank mines its own shard (use the
Accelerate helper for one shared bank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from torch import Tensor, nn

from hardneg._optional import require
from hardneg.config import HardNegConfig
from hardneg.integrations._common import BatchLayout, StepAdapter, flat_stats, generation_on, require_ids
from hardneg.plugin import GeneratorLike, HardNeg, HardNegError

L = require("lightning.pytorch", "lightning")

logger = logging.getLogger(__name__)

__all__ = ["HardNegCallback", "HardNegLightningMixin"]


@dataclass
class _BatchRecord:
    """What the current training batch needs at observe time."""

    batch: Any
    ids: Tensor
    from_mixin: bool


class HardNegCallback(StepAdapter, L.Callback):
    """Runs a :class:`hardneg.HardNeg` engine inside ``lightning.Trainer.fit``.

    Args:
        config: the engine's settings.
        class_names: class names (prompts, plots).
        dataset: the training set (item ``i`` starts with the image of sample id ``i``), where
            GeNIe sources come from. Default: the train dataloader's dataset.
        generator: a generator or a zero-argument factory; ``None`` builds ``config.generator``.
        embedding_layer: dotted name (relative to the LightningModule) of the module whose
            output is the embedding; default the input of the last ``nn.Linear``.
        batch_keys: ``(images, labels, ids)`` keys of a dict batch when they are not the usual names.
        log_every_n_steps: log every counter of ``engine.stats()`` (``hardneg/...``, see
            :func:`hardneg.integrations._common.flat_stats`) this often; ``None`` (default): on the
            Trainer's own ``log_every_n_steps``; 0 turns logging off.
        teacher_model: the classifier that scores arriving images when ``config.teacher="model"``.
    """

    def __init__(
        self,
        config: HardNegConfig,
        class_names: Optional[Sequence[str]] = None,
        dataset: Any = None,
        generator: GeneratorLike = None,
        embedding_layer: Optional[str] = None,
        batch_keys: Optional[Sequence[str]] = None,
        log_every_n_steps: Optional[int] = None,
        teacher_model: Optional[nn.Module] = None,
    ) -> None:
        if not isinstance(config, HardNegConfig):
            raise HardNegError(f"config must be a HardNegConfig, got {type(config).__name__}")
        self.config = config
        self.class_names = list(class_names) if class_names is not None else None
        self.dataset = dataset
        self.generator = generator
        self.embedding_layer = embedding_layer
        self.batch_keys = tuple(batch_keys) if batch_keys is not None else None
        self.log_every_n_steps = int(log_every_n_steps) if log_every_n_steps is not None else None
        self.teacher_model = teacher_model
        self.engine: Optional[HardNeg] = None
        self._closed = False
        self._pending_state: Optional[dict[str, Any]] = None
        self._layout: Optional[BatchLayout] = None
        self._record: Optional[_BatchRecord] = None

    # ------------------------------------------------------------------ public helpers
    # weights, synthetic_mask, loss(per_sample_loss): the current batch's MixedStep (StepAdapter)

    def mix_into(self, batch: Any, in_place: bool = False, from_mixin: bool = False) -> Any:
        """Mix ready hard negatives into a training ``batch``; returns the batch to train on.

        ``in_place=True`` edits a list/dict batch (the callback's way); otherwise a new batch of
        the same type is returned (the mixin's way). Called once per training batch.
        """
        engine = self._require_engine()
        if self._layout is None:
            self._layout = BatchLayout.infer(batch, self.batch_keys)
        x, y, ids = self._layout.split(batch)
        ids = require_ids(ids, "HardNegCallback")
        if in_place and not self._layout.mutable(batch):
            if engine.worker is not None:
                raise HardNegError(
                    f"HardNegCallback cannot put hard negatives into a {type(batch).__name__} batch (a "
                    "callback can only edit lists and dicts in place): add HardNegLightningMixin to your "
                    "LightningModule (class Model(HardNegLightningMixin, L.LightningModule)) or collate "
                    "batches into a list/dict"
                )
            # mining only: no worker, so an empty buffer and mix is the identity; observe the batch as it is
            self._mix(x, y)
            self._record = _BatchRecord(batch, ids, from_mixin)
            return batch
        mixed = self._mix(x, y)
        if mixed.n_synthetic or mixed.n_real != x.shape[0]:
            batch = self._layout.write(batch, mixed.x, mixed.y, in_place=in_place)
        self._record = _BatchRecord(batch, ids, from_mixin)
        return batch

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.dataset is not None or not generation_on(self.config, self.generator):
            self._build(pl_module, self.dataset)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.engine is None or self._closed:
            self._build(pl_module, self.dataset if self.dataset is not None else _train_dataset(trainer))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        rec = self._record
        if rec is not None and rec.from_mixin and rec.batch is batch:
            return  # the mixin already mixed this batch in on_after_batch_transfer
        self.mix_into(batch, in_place=True)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rec, self._record = self._record, None
        if rec is None or self.engine is None:
            return
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        self._observe(logits, rec.ids)  # after backward and the optimizer step
        self._step = None  # weights / synthetic_mask are None outside a training step
        if self._should_log(trainer):
            self._log(pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.close()

    def close(self) -> None:
        """Stop the worker and remove the hooks; the engine stays readable (confusions, stats)."""
        if self.engine is not None and not self._closed:
            self.engine.close()
        self._closed = True
        self._record = None
        self._step = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self.engine is not None:
            return {"engine": self.engine.state_dict()}
        return {"engine": self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("engine")
        if state is None:
            return
        if self.engine is not None and not self._closed:
            self.engine.load_state_dict(state)
        else:
            self._pending_state = state  # applied when the engine is built

    # ------------------------------------------------------------------ internals
    def _build(self, pl_module: nn.Module, dataset: Any) -> None:
        if self.engine is not None and not self._closed:
            return
        previous = self.engine.state_dict() if self.engine is not None else None
        self.engine = HardNeg(self.config, model=pl_module, class_names=self.class_names, dataset=dataset,
                              generator=self.generator, embedding_layer=self.embedding_layer,
                              teacher_model=self.teacher_model, device=getattr(pl_module, "device", None))
        self._closed = False
        state = self._pending_state if self._pending_state is not None else previous
        if state is not None:
            self.engine.load_state_dict(state)
        self._pending_state = None

    def _require_engine(self) -> HardNeg:
        if self.engine is None or self._closed:
            raise HardNegError("HardNegCallback has no running engine: it is built when trainer.fit() starts")
        return self.engine

    def _should_log(self, trainer: Any) -> bool:
        """Explicit ``log_every_n_steps``: every n engine steps; default: on the steps the Trainer
        writes its logs (``Trainer(log_every_n_steps=...)``), where values logged on other steps
        would be dropped."""
        n = self.log_every_n_steps
        if n is not None:
            return n > 0 and self.engine is not None and self.engine.step % n == 0
        connector = getattr(trainer, "_logger_connector", None)
        will_write = getattr(connector, "should_update_logs", None)
        if isinstance(will_write, bool):
            return will_write
        every = getattr(trainer, "log_every_n_steps", 50) or 0
        return every > 0 and self.engine is not None and self.engine.step % every == 0

    def _log(self, pl_module: Any) -> None:
        s = self.engine.stats() if self.engine is not None else {}
        values = flat_stats(s)
        try:
            pl_module.log_dict(values, on_step=True, on_epoch=False)
        except Exception as exc:  # logging must never break training (e.g. no logger attached)
            logger.debug("hardneg: could not log stats: %s", exc)


class HardNegLightningMixin:
    """Add to a LightningModule (``class Net(HardNegLightningMixin, L.LightningModule)``).

    Mixes hard negatives into *any* training batch (tuples, namedtuples, dicts) in
    ``on_after_batch_transfer`` and gives ``training_step`` the per-sample weights::

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            logits = self(x)
            return {"loss": self.hardneg_loss(F.cross_entropy(logits, y, reduction="none")), "logits": logits}
    """

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        cb = self.hardneg_callback
        if cb is not None and cb.engine is not None and self._hardneg_trainer().training:
            batch = cb.mix_into(batch, in_place=False, from_mixin=True)
        return batch

    @property
    def hardneg_callback(self) -> Optional[HardNegCallback]:
        """The trainer's :class:`HardNegCallback` (None when there is no trainer or no callback)."""
        trainer = self._hardneg_trainer()
        if trainer is None:
            return None
        return next((c for c in trainer.callbacks if isinstance(c, HardNegCallback)), None)

    def _hardneg_trainer(self) -> Any:
        try:
            return self.trainer  # type: ignore[attr-defined]
        except RuntimeError:  # LightningModule.trainer raises when no Trainer is attached
            return None

    @property
    def hardneg_weights(self) -> Optional[Tensor]:
        """Per-sample loss weights of the current training batch (None when not mixing)."""
        cb = self.hardneg_callback
        return cb.weights if cb is not None else None

    def hardneg_loss(self, per_sample_loss: Tensor) -> Tensor:
        """Weighted mean of a per-sample loss (the plain mean outside hardneg training batches)."""
        cb = self.hardneg_callback
        return cb.loss(per_sample_loss) if cb is not None else per_sample_loss.mean()


def _train_dataset(trainer: Any) -> Any:
    """The dataset behind the train dataloader (first one when there are several), or None."""
    loader = getattr(trainer, "train_dataloader", None)
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return getattr(loader, "dataset", None)
