"""A plain reference training loop with the two hardneg lines in it.

The demo, the benchmarks and the examples share it so that every comparison trains the same
way. It is also the shortest answer to "where do the calls go?"::

    x, y, w = engine.mix(x, y)                      # before forward
    logits = model(x)
    loss = (w * cross_entropy(logits, y, reduction="none")).mean()
    ...
    engine.observe(labels=y, logits=logits, ids=idx)  # after forward (hook captured embeddings)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from hardneg.data import ImageDataset

BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class EpochMetrics:
    """What one epoch of :func:`train` measured."""

    epoch: int
    loss: float
    test_accuracy: float
    pair_accuracy: Optional[float]  # test accuracy on the classes of the top confused pairs
    tail_accuracy: Optional[float]  # test accuracy on the rarest half of the training classes
    top_pairs: list[list[Any]] = field(default_factory=list)  # [a, b, score]
    synthetic_used: int = 0
    mean_r: Optional[float] = None
    worker_images_per_s: Optional[float] = None
    engine_fraction: Optional[float] = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_seed(seed: int) -> torch.Generator:
    """Seed python-level RNGs used here and return a torch Generator for the data order."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    return torch.Generator().manual_seed(seed)


def make_classifier(name: str = "resnet18", num_classes: int = 10, in_chans: int = 1, **kwargs: Any) -> nn.Module:
    """A timm model built from its config (never downloads weights)."""
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


@torch.no_grad()
def predict(model: nn.Module, data: ImageDataset, batch_size: int = 256, device: str = "cpu",
            num_classes: Optional[int] = None) -> Tensor:
    """Predicted classes for every sample of ``data`` (eval mode).

    Only the first ``num_classes`` logits are read (default: ``data.num_classes``), so a model
    trained with extra outputs (AugGen's mixed classes, :func:`hardneg.methods.auggen.auggen_expand`)
    is scored on the real classes only.
    """
    k = data.num_classes if num_classes is None else int(num_classes)
    was_training = model.training
    model.eval()
    preds = []
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].to(device)
        out = model(x)
        logits = getattr(out, "logits", out)
        if logits.shape[1] < k:
            raise ValueError(f"the model has {logits.shape[1]} outputs but the data has {k} classes; build the "
                             f"classifier with num_classes >= {k}")
        preds.append(logits[:, :k].argmax(1).cpu())
    model.train(was_training)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def class_accuracy(preds: Tensor, labels: Tensor, classes: Sequence[int]) -> Optional[float]:
    """Accuracy over the samples whose true label is in ``classes`` (None if there are none)."""
    mask = torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype))
    if not mask.any():
        return None
    return float((preds[mask] == labels[mask]).float().mean())


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross entropy for hard (N,) or soft (N, K) targets."""
    if target.ndim == 1:
        return F.cross_entropy(logits, target, reduction="none")
    return -(target * F.log_softmax(logits, dim=1)).sum(1)


def train(
    model: nn.Module,
    train_data: ImageDataset,
    test_data: ImageDataset,
    engine: Any = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    batch_transform: Optional[BatchTransform] = None,
    max_steps: Optional[int] = None,
    progress: bool = True,
    on_epoch: Optional[Callable[[EpochMetrics], None]] = None,
    extra_data: Optional[ImageDataset] = None,
    extra_targets: Optional[Tensor] = None,
    evaluate_every_epoch: bool = True,
    on_checkpoint: Optional[Callable[[dict[str, Any]], None]] = None,
    resume_state: Optional[dict[str, Any]] = None,
    stop_after_epoch: Optional[int] = None,
) -> list[EpochMetrics]:
    """Train ``model`` with AdamW + one-cycle decay, optionally with a :class:`hardneg.HardNeg` engine.

    Args:
        engine: a HardNeg engine (``mix`` before, ``observe`` after each forward) or None.
        batch_transform: a batch augmentation ``(x, y) -> (x, y or soft y)``: the base
            augmentation every practitioner already has (crop + flip, shifts), or mixup/cutmix.
            With an engine it is applied to the **real rows only**, before ``mix`` adds the
            generated ones: generated images already vary, and a label-mixing transform (mixup)
            would blur their carefully chosen labels. The engine observes the real rows with
            their original class ids.
        max_steps: stop after this many optimiser steps (equal-step comparisons).
        extra_data: a fixed synthetic set mixed into the training set (offline baselines); its
            samples get ids after the real ones and are not observed by an engine.
        extra_targets: ``(len(extra_data), K)`` soft targets of ``extra_data`` (e.g. Diff-Mix's
            ``s^gamma`` target / ``1 - s^gamma`` source labels); real rows then train on one-hot
            targets. Default: ``extra_data``'s hard labels.
        on_epoch: called with each epoch's metrics (the demo prints them).
        evaluate_every_epoch: score ``test_data`` after every epoch (the metrics' accuracies);
            ``False`` only after the last one, which keeps a many-epoch run on a small training set
            from spending most of its time on test passes (its earlier epochs report NaN).
        on_checkpoint: called after each epoch (after ``on_epoch``) with the loop's state
            (:func:`training_state`: model, optimiser, LR schedule, epoch, step, data-order and torch
            RNG states, metrics so far); plain tensors and numbers, so it saves and loads with
            ``weights_only=True``. Save the engine's state next to it.
        resume_state: such a state: the loop continues after its epoch with the same schedule, data
            order and RNG, so (with a deterministic engine) it ends exactly where the uninterrupted
            run does. The other arguments must be those of the interrupted run.
        stop_after_epoch: return after this epoch as if interrupted (the run's schedule is still
            the one for ``epochs``); resume it with ``resume_state``.
    """
    from tqdm.auto import tqdm

    generator = set_seed(seed)
    model.to(device).train()
    dataset: Any = train_data
    soft_targets = None
    if extra_targets is not None:
        if extra_data is None:
            raise ValueError("extra_targets needs extra_data (the images they label)")
        k = train_data.num_classes
        extra_targets = torch.as_tensor(extra_targets, dtype=torch.float32)
        if extra_targets.shape != (len(extra_data), k):
            raise ValueError(f"extra_targets must be ({len(extra_data)}, {k}), got {tuple(extra_targets.shape)}")
        if not torch.isfinite(extra_targets).all() or bool((extra_targets < 0).any()):
            raise ValueError("extra_targets must be finite and non-negative")
        if not torch.allclose(extra_targets.sum(1), torch.ones(len(extra_data)), atol=1e-4):
            raise ValueError("every row of extra_targets must sum to 1 (a label distribution)")
        soft_targets = torch.cat([F.one_hot(train_data.labels, k).float(), extra_targets])
    if extra_data is not None:
        dataset = torch.utils.data.ConcatDataset([train_data, _offset_ids(extra_data, len(train_data))])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False)
    total = epochs * len(loader) if max_steps is None else min(max_steps, epochs * len(loader))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.15)
    counts = torch.bincount(train_data.labels, minlength=train_data.num_classes)
    tail = torch.argsort(counts)[: max(1, train_data.num_classes // 2)].tolist()
    balanced = bool(counts.max() <= 1.5 * counts.clamp(min=1).min())
    history: list[EpochMetrics] = []
    step = 0
    first_epoch = 1
    if resume_state is not None:
        first_epoch, step = _restore_training(resume_state, model, opt, sched, generator, history, total)
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for epoch in range(first_epoch, epochs + 1):
            if step >= total:
                break
            t0 = time.perf_counter()
            losses = []
            for x, y, idx in loader:
                if step >= total:
                    break
                if soft_targets is not None:
                    y = soft_targets[idx]
                x, y = x.to(device), y.to(device)
                real_labels = y if y.ndim == 1 else y.argmax(1)
                if batch_transform is not None:
                    x, y = batch_transform(x, y)
                    if x.shape[0] != real_labels.shape[0]:  # mixup drops the odd last sample
                        real_labels, idx = real_labels[: x.shape[0]], idx[: x.shape[0]]
                w = torch.ones(x.shape[0], device=device)
                if engine is not None:
                    x, y, w = engine.mix(x, y)
                out = model(x)
                logits = getattr(out, "logits", out)
                loss = (w * soft_cross_entropy(logits, y)).sum() / w.sum().clamp(min=1e-8)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step}; stopping before it spreads")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if engine is not None:
                    real = idx < len(train_data)
                    if not bool(real.all()):
                        raise ValueError("extra_data batches cannot be observed by an engine")
                    engine.observe(labels=_observed_labels(engine, real_labels, y), logits=logits.detach(), ids=idx)
                losses.append(loss.item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch)
            last = step >= total or epoch == epochs
            metrics = _epoch_metrics(model, test_data, engine, epoch, losses, tail if not balanced else None, device,
                                     evaluate=evaluate_every_epoch or last)
            metrics.seconds = time.perf_counter() - t0
            history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics)
            if on_checkpoint is not None:
                on_checkpoint(training_state(model, opt, sched, generator, epoch, step, history))
            if step >= total or (stop_after_epoch is not None and epoch >= stop_after_epoch):
                break
    finally:
        bar.close()
    return history


TRAINING_STATE_FORMAT = 1


def training_state(model: nn.Module, optimizer: Any, scheduler: Any, data_generator: torch.Generator, epoch: int,
                   step: int, history: Sequence[EpochMetrics]) -> dict[str, Any]:
    """The state of :func:`train` after ``epoch`` (what ``resume_state`` takes); plain tensors and numbers."""
    return {
        "format": TRAINING_STATE_FORMAT, "epoch": int(epoch), "step": int(step),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "data_rng": data_generator.get_state(), "torch_rng": torch.get_rng_state(),
        "history": [m.to_dict() for m in history],
    }


def _restore_training(state: dict[str, Any], model: nn.Module, optimizer: Any, scheduler: Any,
                      data_generator: torch.Generator, history: list[EpochMetrics], total: int) -> tuple[int, int]:
    """Load a :func:`training_state` into the loop's objects; returns (first epoch to run, step)."""
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise ValueError(f"resume_state is not a training state of format {TRAINING_STATE_FORMAT} (got "
                         f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}); "
                         "it comes from train(on_checkpoint=...)")
    if scheduler.state_dict().get("total_steps") != state["scheduler"].get("total_steps"):
        raise ValueError(f"resume_state was saved by a run of {state['scheduler'].get('total_steps')} steps, this "
                         f"run has {total}: resume with the interrupted run's epochs, batch size and max_steps")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    data_generator.set_state(state["data_rng"])
    torch.set_rng_state(state["torch_rng"])
    history.extend(EpochMetrics(**m) for m in state["history"])
    return int(state["epoch"]) + 1, int(state["step"])


def _epoch_metrics(
    model: nn.Module, test_data: ImageDataset, engine: Any, epoch: int, losses: list[float],
    tail: Optional[list[int]], device: str, evaluate: bool = True,
) -> EpochMetrics:
    m = EpochMetrics(epoch=epoch, loss=float(np.mean(losses)) if losses else float("nan"),
                     test_accuracy=float("nan"), pair_accuracy=None, tail_accuracy=None)
    preds = None
    if evaluate:
        preds = predict(model, test_data, device=device)
        m.test_accuracy = float((preds == test_data.labels).float().mean())
        m.tail_accuracy = class_accuracy(preds, test_data.labels, tail) if tail else None
    if engine is not None:
        pairs = engine.confusions()
        m.top_pairs = [[p.a, p.b, round(p.score, 4)] for p in pairs]
        if pairs and preds is not None:
            m.pair_accuracy = class_accuracy(preds, test_data.labels, sorted({c for p in pairs for c in p.pair}))
        s = engine.stats()
        m.synthetic_used = int(s["synthetic_used"])
        m.mean_r = s["mean_r"]
        m.engine_fraction = s["engine_fraction"]
        if s.get("worker"):
            m.worker_images_per_s = s["worker"].get("images_per_s")
    return m


def _observed_labels(engine: Any, real_labels: Tensor, y: Tensor) -> Tensor:
    """Class ids of a mixed batch for ``observe``: real rows' own labels, synthetic rows' targets.

    ``mix`` appends synthetic rows or substitutes the last rows; either way they are the last
    ``len(engine.last_mix_pairs)`` rows. An engine without that record gets ``argmax`` labels.
    """
    pairs = getattr(engine, "last_mix_pairs", None)
    if pairs is None:
        return y if y.ndim == 1 else y.argmax(1)
    n_real = y.shape[0] - len(pairs)
    synthetic = torch.tensor([int(b) for _, b in pairs], dtype=torch.long, device=y.device)
    return torch.cat([real_labels[:n_real].long(), synthetic])


def _offset_ids(data: ImageDataset, offset: int) -> torch.utils.data.Dataset:
    class _Offset(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
            x, y, _ = data[i]
            return x, y, i + offset

    return _Offset()
