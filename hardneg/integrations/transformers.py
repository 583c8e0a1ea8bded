"""transformers adapter: :class:`HardNegTrainer` (a ``Trainer`` with the engine in ``compute_loss``).

Adoption (image classification, dataset items are dicts with ``pixel_values``, ``labels`` and a
sample-id column)::

    trainer = HardNegTrainer(model=model, args=args, train_dataset=train_set,
                             hardneg=HardNegTrainerCallback(cfg))   # or hardneg=cfg
    trainer.train()                                # or train(resume_from_checkpoint=True)

A ``TrainerCallback`` never sees a batch, so the work is split:

- :class:`HardNegTrainerMixin` (mixed into ``transformers.Trainer`` as :class:`HardNegTrainer`, or
  into your own subclass) overrides ``compute_loss``: it takes the sample ids out of the inputs,
  mixes ready hard negatives into ``pixel_values``/``labels``, runs the model, returns the weighted
  cross-entropy and observes the embeddings (forward hook on the classifier's input), labels,
  logits and ids. Evaluation batches only lose their id column. It also keeps the id column from
  being dropped by ``remove_unused_columns`` and reports its loss as a per-batch mean (so the
  Trainer scales it for gradient accumulation).
- :class:`HardNegTrainerCallback` owns the engine's lifetime: it builds it in ``on_train_begin`` on
  the Trainer's model, writes the engine state to ``<checkpoint-N>/hardneg_state.pt`` in
  ``on_save`` (next to the Trainer's own files) and reloads it when training resumes from that
  checkpoint (``train(resume_from_checkpoint=...)``); ``on_train_end`` stops the worker.

Soft labels (``config.label_mode`` other than ``"hard"``): the mixed labels are ``(N, K)`` soft
targets and the mixin's loss is the soft cross entropy (label smoothing still applied); the engine
observes class ids (generated rows: their target class).

Not used by the mixin's training loss: ``compute_loss_func`` (label smoothing via
``args.label_smoothing_factor`` is honoured). Under multi-process training every rank runs its own
engine on its shard; the main process saves its state and every rank reloads it on resume.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence, Union

from torch import Tensor
from torch.utils.data import Dataset

from hardneg._optional import require
from hardneg.config import HardNegConfig
from hardneg.integrations._common import IMAGE_KEYS, LABEL_KEYS, StepAdapter, flat_stats, require_ids
from hardneg.plugin import GeneratorLike, HardNeg, HardNegError
from hardneg.step import MixedStep
from hardneg.value_space import normalization_from

T = require("transformers", "transformers")

logger = logging.getLogger(__name__)

STATE_FILE = "hardneg_state.pt"

__all__ = ["HardNegTrainer", "HardNegTrainerCallback", "HardNegTrainerMixin", "STATE_FILE", "WithSampleIds"]


class HardNegTrainerCallback(StepAdapter, T.TrainerCallback):
    """Builds, checkpoints, restores and stops the :class:`hardneg.HardNeg` engine of a Trainer run.

    Args:
        config: the engine's settings.
        class_names: class names; default the model's ``config.id2label`` when it has one.
        dataset: where GeNIe sources come from (item ``i`` holds the image of sample id ``i``, e.g.
            a dict with ``pixel_values``); default the Trainer's ``train_dataset``.
        generator: a generator or a zero-argument factory; ``None`` builds ``config.generator``.
        embedding_layer: dotted module name whose output is the embedding; default the input of
            the model's last ``nn.Linear`` (the classifier of ``*ForImageClassification``).
        id_column: the inputs key holding dataset sample ids.
        state_file: file name of the engine state inside each checkpoint folder.
        teacher_model: the classifier that scores arriving images when ``config.teacher="model"``.
    """

    def __init__(
        self,
        config: HardNegConfig,
        class_names: Optional[Sequence[str]] = None,
        dataset: Any = None,
        generator: GeneratorLike = None,
        embedding_layer: Optional[str] = None,
        id_column: str = "sample_id",
        state_file: str = STATE_FILE,
        teacher_model: Any = None,
    ) -> None:
        if not isinstance(config, HardNegConfig):
            raise HardNegError(f"config must be a HardNegConfig, got {type(config).__name__}")
        self.config = config
        self.class_names = list(class_names) if class_names is not None else None
        self.dataset = dataset
        self.generator = generator
        self.embedding_layer = embedding_layer
        self.id_column = id_column
        self.state_file = state_file
        self.teacher_model = teacher_model
        self.engine: Optional[HardNeg] = None
        self.resume_from_checkpoint: Optional[str] = None  # set by HardNegTrainerMixin.train
        self.restored_from: Optional[str] = None
        self._closed = False
        self._pending: Optional[tuple[Any, Any, Any]] = None  # (logits, ids, step) awaiting backward

    @property
    def active(self) -> bool:
        """Whether an engine is built and running (between train begin and train end)."""
        return self.engine is not None and not self._closed

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise HardNegError("HardNegTrainerCallback needs the Trainer's model (on_train_begin got none)")
        names = self.class_names or _model_class_names(model, self.config.num_classes)
        self.config = _with_processor_normalization(self.config, kwargs.get("processing_class"))
        self.engine = HardNeg(self.config, model=model, class_names=names, dataset=self.dataset,
                              generator=self.generator, embedding_layer=self.embedding_layer,
                              teacher_model=self.teacher_model, device=getattr(args, "device", None))
        self._closed = False
        self.restored_from = None
        folder = self._resume_folder(args, state)
        if folder is not None:
            path = os.path.join(folder, self.state_file)
            if os.path.isfile(path):
                self.engine.load(path)
                self.restored_from = path
                logger.info("hardneg: engine state restored from %s (step %d)", path, self.engine.step)
            else:
                logger.warning("hardneg: resuming from %s but it holds no %s; the engine starts fresh",
                               folder, self.state_file)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.active or not getattr(args, "should_save", True):
            return
        folder = _checkpoint_folder(args, state)
        if not os.path.isdir(folder):
            logger.warning("hardneg: checkpoint folder %s not found; engine state not saved", folder)
            return
        path = os.path.join(folder, self.state_file)
        self.engine.save(path)  # type: ignore[union-attr]

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker and remove the hooks; the engine stays readable (confusions, stats)."""
        if self.engine is not None and not self._closed:
            self.flush()
            self.engine.close()
        self._closed = True

    def mix(self, x: Tensor, y: Tensor) -> MixedStep:
        """Mix ready hard negatives into a training batch (before the forward); returns the
        :class:`~hardneg.step.MixedStep`, kept as this step's (what :meth:`loss` reduces with)."""
        return self._mix(x, y)

    def defer_observe(self, logits: Tensor, ids: Any, step: MixedStep) -> None:
        """Hold a computed step (its ``logits``, sample ``ids`` and :class:`~hardneg.step.MixedStep`)
        for :meth:`flush` to observe once its backward has run."""
        self._pending = (logits.detach(), ids, step)

    def flush(self) -> None:
        """Observe the step whose loss :class:`HardNegTrainerMixin` computed (after its backward)."""
        pending, self._pending = self._pending, None
        if pending is not None and self.active:
            logits, ids, step = pending
            self._observe(logits, ids, step=step)

    def _resume_folder(self, args: Any, state: Any) -> Optional[str]:
        folder = self.resume_from_checkpoint
        if folder is None and isinstance(getattr(args, "resume_from_checkpoint", None), str):
            folder = args.resume_from_checkpoint
        if folder is None and state.global_step > 0:  # resumed without telling us where from
            guess = _checkpoint_folder(args, state)
            folder = guess if os.path.isdir(guess) else None
        return folder


class HardNegTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass: ``class MyTrainer(HardNegTrainerMixin, Trainer)``.

    Takes one extra keyword, ``hardneg``: a :class:`HardNegTrainerCallback` or a bare
    :class:`HardNegConfig` (a callback with defaults is built from it).
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(self, *args: Any, hardneg: Union[HardNegConfig, HardNegTrainerCallback],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        cb = hardneg if isinstance(hardneg, HardNegTrainerCallback) else HardNegTrainerCallback(hardneg)
        self.hardneg_callback = cb
        self.add_callback(cb)  # type: ignore[attr-defined]
        self.model_accepts_loss_kwargs = False  # our loss is a per-batch mean (older Trainers read this)

    @property
    def hardneg(self) -> Optional[HardNeg]:
        """The running engine (None before ``train()``)."""
        return self.hardneg_callback.engine

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any) -> Any:
        cb = self.hardneg_callback
        if resume_from_checkpoint is True:
            resume_from_checkpoint = T.trainer_utils.get_last_checkpoint(self.args.output_dir)  # type: ignore
        cb.resume_from_checkpoint = resume_from_checkpoint or None
        if cb.dataset is None:
            cb.dataset = getattr(self, "train_dataset", None)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add every engine counter (``hardneg/...``, :func:`~hardneg.integrations._common.flat_stats`)
        to the Trainer's training logs, so ``state.log_history`` and every ``report_to`` logger
        (TensorBoard, CSV/JSON, W&B ...) get them on the Trainer's ``logging_steps``. (A callback's
        ``on_log`` comes too late: the Trainer has stored the entry and run the reporting callbacks,
        which are registered before user callbacks, by then.)"""
        engine = self.hardneg_callback.engine
        if engine is not None and not any(str(k).startswith(("eval_", "test_")) for k in logs):
            logs = {**logs, **flat_stats(engine.stats())}
        return super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the id column through remove_unused_columns: compute_loss takes it out again.
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        cols = getattr(self, "_signature_columns", None)
        if cols is not None and self.hardneg_callback.id_column not in cols:
            cols.append(self.hardneg_callback.id_column)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        cb = self.hardneg_callback
        inputs = dict(inputs)
        ids = inputs.pop(cb.id_column, None)
        if not (cb.active and model.training):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                        num_items_in_batch=num_items_in_batch)
        engine = cb.engine
        assert engine is not None
        ids = require_ids(ids, f"HardNegTrainer (id_column={cb.id_column!r})")
        xk = next((k for k in IMAGE_KEYS if k in inputs), None)
        yk = next((k for k in LABEL_KEYS if k in inputs), None)
        if xk is None or yk is None:
            raise HardNegError(f"HardNegTrainer needs images ({IMAGE_KEYS}) and labels ({LABEL_KEYS}) in the "
                               f"inputs, got keys {list(inputs)}")
        cb.flush()  # a step computed outside training_step (no backward seen) is observed now
        mixed = cb.mix(inputs[xk], inputs.pop(yk))
        inputs[xk] = mixed.x
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        smoothing = float(getattr(self.args, "label_smoothing_factor", 0.0) or 0.0)  # type: ignore
        loss = mixed.cross_entropy(logits, label_smoothing=smoothing)
        cb.defer_observe(logits, ids, mixed)  # observed in training_step, after backward
        return (loss, outputs) if return_outputs else loss

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's step (forward, loss, backward); then the engine observes it: after backward."""
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        self.hardneg_callback.flush()
        return loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: Optional[list[str]] = None) -> Any:
        inputs = {k: v for k, v in inputs.items() if k != self.hardneg_callback.id_column}
        return super().prediction_step(  # type: ignore[misc]
            model, inputs, prediction_loss_only, ignore_keys=ignore_keys)


class HardNegTrainer(HardNegTrainerMixin, T.Trainer):
    """``transformers.Trainer`` with online GeNIe hard negatives (see :class:`HardNegTrainerMixin`)."""


class WithSampleIds(Dataset):
    """Wraps a dataset of dict items and adds the item's index under ``id_column``.

    For a 🤗 ``datasets.Dataset`` the same is ``ds.add_column("sample_id", range(len(ds)))``.
    """

    def __init__(self, dataset: Any, id_column: str = "sample_id") -> None:
        self.dataset = dataset
        self.id_column = id_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, dict):
            raise HardNegError(f"WithSampleIds wraps datasets of dict items; item {index} is a "
                               f"{type(item).__name__}")
        return {**item, self.id_column: int(index)}


def _with_processor_normalization(config: HardNegConfig, processor: Any) -> HardNegConfig:
    """``config`` with the image processor's ``image_mean``/``image_std`` (the pipeline's value space)
    when it normalises and the config names no normalisation of its own."""
    if config.data_mean is not None or processor is None:
        return config
    processor = getattr(processor, "image_processor", processor)  # a multimodal processor wraps one
    if not getattr(processor, "do_normalize", False):
        return config
    try:
        found = normalization_from(processor)
    except ValueError:
        return config
    logger.info("hardneg: value space from the image processor: mean %s, std %s", found["data_mean"],
                found["data_std"])
    return config.replace(**found)


def _checkpoint_folder(args: Any, state: Any) -> str:
    """The folder the Trainer writes the checkpoint of ``state.global_step`` to."""
    return os.path.join(args.output_dir, f"{T.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _model_class_names(model: Any, k: int) -> Optional[list[str]]:
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if isinstance(id2label, dict) and len(id2label) == k:
        try:
            return [str(id2label[i]) for i in range(k)]
        except KeyError:
            return None
    return None
