"""From Fake to Real (Qraitem et al.): pretrain on balanced synthetic data only, then fine-tune on real.

Mixing synthetic images into real ones creates a new shortcut (real vs synthetic look) that a
model can exploit instead of the class. The two-stage regime avoids it: **stage 1** trains only on
a synthetic set that is balanced over classes, or over (class, group) cells when a spurious
attribute defines groups (so no group is rare); **stage 2** fine-tunes on real data only, with
plain ERM, group-balanced resampling (:class:`GroupBalancedSampler`) or GroupDRO
(:class:`GroupDRO`). With groups the figure that matters is the worst-group accuracy.

Pieces: :func:`group_ids`, :func:`balanced_synthetic_set` (from any generator with
``sample(labels, seed=..., size=...)``, e.g. :class:`~hardneg.generators.class_conditional.ClassConditionalGenerator`),
:func:`train_classifier` (one stage), :func:`evaluate_groups` and :func:`fake_to_real` (both
stages, evaluated). Uses no engine events: it is a training regime around any classifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg.data import ImageDataset

__all__ = [
    "FakeToRealResult",
    "GroupBalancedSampler",
    "GroupDRO",
    "GroupEval",
    "SyntheticSet",
    "balanced_synthetic_set",
    "evaluate_groups",
    "fake_to_real",
    "group_ids",
    "train_classifier",
]

Stage2 = Literal["erm", "group-balanced", "group-dro"]
GroupTransform = Callable[[Tensor, Tensor], Tensor]


def group_ids(labels: Tensor, attributes: Tensor, num_attributes: int) -> Tensor:
    """Group of each sample: ``label * num_attributes + attribute`` (groups = (class, attribute) cells)."""
    labels, attributes = torch.as_tensor(labels).long(), torch.as_tensor(attributes).long()
    if labels.shape != attributes.shape:
        raise ValueError(f"labels and attributes must have one shape, got {tuple(labels.shape)}, {tuple(attributes.shape)}")
    if attributes.numel() and (attributes.min() < 0 or attributes.max() >= num_attributes):
        raise ValueError(f"attributes must lie in [0, {num_attributes})")
    return labels * num_attributes + attributes


class GroupBalancedSampler(torch.utils.data.Sampler[int]):
    """Draws indices with replacement so that every group present is equally likely.

    Sample i has weight ``1 / count(group_i)``: in expectation each group fills ``1 / G`` of an
    epoch however rare it is in the data. ``num_samples`` defaults to the dataset size.
    """

    def __init__(self, groups: Tensor, num_samples: Optional[int] = None, seed: int = 0) -> None:
        self.groups = torch.as_tensor(groups).long().flatten()
        if self.groups.numel() == 0:
            raise ValueError("GroupBalancedSampler needs at least one sample")
        counts = torch.bincount(self.groups)
        self.weights = 1.0 / counts[self.groups].double()
        self.num_samples = int(num_samples) if num_samples is not None else int(self.groups.numel())
        self._g = torch.Generator().manual_seed(int(seed))

    def __iter__(self) -> Iterator[int]:
        yield from torch.multinomial(self.weights, self.num_samples, replacement=True, generator=self._g).tolist()

    def __len__(self) -> int:
        return self.num_samples


class GroupDRO:
    """Online GroupDRO (Sagawa et al. 2020): minimise the worst group's loss, softly.

    Keeps a distribution ``q`` over groups; each call raises the weight of every group in the batch
    in proportion to ``exp(step_size * its mean loss)`` and returns ``sum_g q_g * loss_g`` over the
    groups present, so the groups that are learnt worst get the most gradient.
    """

    def __init__(self, num_groups: int, step_size: float = 0.01) -> None:
        if num_groups < 1 or step_size < 0:
            raise ValueError(f"need num_groups >= 1 and step_size >= 0, got {num_groups}, {step_size}")
        self.num_groups = int(num_groups)
        self.step_size = float(step_size)
        self.q = torch.full((self.num_groups,), 1.0 / self.num_groups, dtype=torch.float64)

    def __call__(self, per_sample_loss: Tensor, groups: Tensor) -> Tensor:
        """The GroupDRO objective for one batch (per-sample losses ``(N,)``, their groups ``(N,)``)."""
        groups = torch.as_tensor(groups, device=per_sample_loss.device).long()
        if per_sample_loss.shape != groups.shape:
            raise ValueError("per_sample_loss and groups must both be (N,)")
        sums = torch.zeros(self.num_groups, dtype=per_sample_loss.dtype, device=per_sample_loss.device)
        sums = sums.index_add(0, groups, per_sample_loss)
        counts = torch.bincount(groups, minlength=self.num_groups).to(per_sample_loss.dtype)
        present = counts > 0
        group_loss = sums / counts.clamp_min(1)
        with torch.no_grad():
            step = torch.where(present.cpu(), self.step_size * group_loss.detach().double().cpu(), torch.zeros(1, dtype=torch.float64))
            self.q = self.q * torch.exp(step)
            self.q = self.q / self.q.sum()
        q = self.q.to(per_sample_loss.device, per_sample_loss.dtype) * present
        return (q * group_loss).sum() / q.sum().clamp_min(1e-12)

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.clone(), "step_size": self.step_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.q = torch.as_tensor(state["q"], dtype=torch.float64).clone()
        self.step_size = float(state["step_size"])


# =========================================================================== synthetic data
@dataclass
class SyntheticSet:
    """A balanced synthetic training set; ``groups`` is set when it was balanced over (class, attribute)."""

    data: ImageDataset
    groups: Optional[Tensor] = None


@torch.no_grad()
def balanced_synthetic_set(
    generator: Any,
    num_classes: int,
    per_cell: int,
    num_attributes: Optional[int] = None,
    group_transform: Optional[GroupTransform] = None,
    seed: int = 0,
    size: Optional[tuple[int, int]] = None,
    class_names: Optional[Sequence[str]] = None,
    batch_size: int = 256,
) -> SyntheticSet:
    """``per_cell`` generated images of every class, or of every (class, attribute) cell.

    ``generator.sample(labels, seed=..., size=...)`` produces images of the given classes. With
    ``num_attributes`` the set is balanced over groups: either ``group_transform(images,
    attributes)`` renders the attribute onto class samples (the counterpart of describing the
    group in a text prompt), or, without it, the generator is taken to be conditioned on the group
    itself (its class ``label * num_attributes + attribute``, see :func:`group_ids`).
    """
    if per_cell < 1:
        raise ValueError(f"per_cell must be >= 1, got {per_cell}")
    a = int(num_attributes or 1)
    labels = torch.arange(num_classes).repeat_interleave(a * per_cell)
    attrs = torch.arange(a).repeat_interleave(per_cell).repeat(num_classes)
    cells = group_ids(labels, attrs, a)
    conditioned_on_groups = num_attributes is not None and group_transform is None
    if conditioned_on_groups and int(getattr(generator, "num_classes", -1)) != num_classes * a:
        raise ValueError(
            f"without group_transform the generator must be conditioned on the {num_classes * a} (class, attribute) "
            f"groups, but it has {getattr(generator, 'num_classes', '?')} classes")
    cond = cells if conditioned_on_groups else labels
    chunks = []
    for i, start in enumerate(range(0, len(cond), batch_size)):
        kw = {"size": size} if size is not None else {}
        chunks.append(torch.as_tensor(generator.sample(cond[start:start + batch_size], seed=seed + i, **kw)).float().cpu())
    images = torch.cat(chunks)
    if num_attributes is not None and group_transform is not None:
        images = group_transform(images, attrs)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    return SyntheticSet(ImageDataset(images, labels, names), cells if num_attributes is not None else None)


# =========================================================================== training and evaluation
def _loader(n: int, batch_size: int, steps: int, g: torch.Generator, groups: Optional[Tensor],
            balanced: bool) -> Iterator[Tensor]:
    """``steps`` index batches: shuffled epochs, or group-balanced draws."""
    if balanced:
        if groups is None:
            raise ValueError("group-balanced resampling needs groups")
        sampler = GroupBalancedSampler(groups, num_samples=steps * batch_size, seed=int(torch.randint(2**31, (1,), generator=g)))
        idx = torch.tensor(list(sampler))
        yield from idx.split(batch_size)
        return
    done = 0
    while done < steps:
        for b in torch.randperm(n, generator=g).split(batch_size):
            if done >= steps:
                return
            yield b
            done += 1


def train_classifier(model: nn.Module, data: ImageDataset, steps: int, batch_size: int = 64, lr: float = 2e-3,
                     seed: int = 0, groups: Optional[Tensor] = None, mode: Stage2 = "erm",
                     dro_step_size: float = 0.01, device: str = "cpu",
                     weight_decay: float = 0.05) -> list[float]:
    """One training stage: ``steps`` AdamW steps (cosine decay) of ``mode`` on ``data``; returns the losses.

    ``mode``: ``"erm"`` (shuffled epochs, mean cross entropy), ``"group-balanced"`` (batches drawn by
    :class:`GroupBalancedSampler`) or ``"group-dro"`` (:class:`GroupDRO` objective). The last two
    need ``groups`` ``(N,)``.
    """
    if mode not in ("erm", "group-balanced", "group-dro"):
        raise ValueError(f"mode must be 'erm', 'group-balanced' or 'group-dro', got {mode!r}")
    if mode != "erm" and groups is None:
        raise ValueError(f"mode {mode!r} needs groups")
    g = torch.Generator().manual_seed(int(seed))
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    dro = GroupDRO(int(groups.max()) + 1, dro_step_size) if mode == "group-dro" else None
    losses = []
    for idx in _loader(len(data), batch_size, steps, g, groups, balanced=mode == "group-balanced"):
        x, y = data.images[idx].to(device), data.labels[idx].to(device)
        out = model(x)
        per = F.cross_entropy(getattr(out, "logits", out), y, reduction="none")
        loss = dro(per, groups[idx]) if dro is not None else per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


@dataclass
class GroupEval:
    """Accuracy overall, per group and of the worst group (``None`` without groups)."""

    accuracy: float
    worst_group_accuracy: Optional[float] = None
    group_accuracy: dict[int, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate_groups(model: nn.Module, data: ImageDataset, groups: Optional[Tensor] = None,
                    batch_size: int = 512, device: str = "cpu") -> GroupEval:
    """Accuracy of ``model`` on ``data``; with ``groups``, per group and the worst group's too."""
    was = model.training
    model.eval()
    preds = []
    for s in range(0, len(data), batch_size):
        out = model(data.images[s:s + batch_size].to(device))
        preds.append(getattr(out, "logits", out).argmax(1).cpu())
    model.train(was)
    correct = (torch.cat(preds) == data.labels).float() if preds else torch.zeros(0)
    result = GroupEval(float(correct.mean()) if len(correct) else float("nan"))
    if groups is not None:
        for grp in torch.as_tensor(groups).unique().tolist():
            m = torch.as_tensor(groups) == grp
            result.group_accuracy[int(grp)] = float(correct[m].mean())
        result.worst_group_accuracy = min(result.group_accuracy.values())
    return result


@dataclass
class FakeToRealResult:
    """Both stages' losses and the final evaluation (when a test set was given)."""

    stage1_losses: list[float]
    stage2_losses: list[float]
    test: Optional[GroupEval] = None


def fake_to_real(model: nn.Module, synthetic: ImageDataset, real: ImageDataset, stage1_steps: int,
                 stage2_steps: int, stage2: Stage2 = "erm", real_groups: Optional[Tensor] = None,
                 test: Optional[ImageDataset] = None, test_groups: Optional[Tensor] = None,
                 batch_size: int = 64, lr: float = 2e-3, stage2_lr: Optional[float] = None, seed: int = 0,
                 device: str = "cpu") -> FakeToRealResult:
    """Stage 1: train on the (balanced) synthetic set only; stage 2: fine-tune on real data only.

    ``stage2`` picks the fine-tuning objective (``"erm"``, ``"group-balanced"``, ``"group-dro"``; the
    last two need ``real_groups``). Each stage has its own optimiser and cosine schedule; stage 2
    uses ``stage2_lr`` (default ``lr``). With ``test`` the model is evaluated at the end (worst-group
    accuracy when ``test_groups`` are given).
    """
    s1 = train_classifier(model, synthetic, stage1_steps, batch_size, lr, seed, device=device)
    s2 = train_classifier(model, real, stage2_steps, batch_size, stage2_lr if stage2_lr is not None else lr,
                          seed + 1, groups=real_groups, mode=stage2, device=device)
    ev = evaluate_groups(model, test, test_groups, device=device) if test is not None else None
    return FakeToRealResult(s1, s2, ev)
