"""A small, fast CNN "judge" trained on real data, used to score a generator.

Generator quality metrics such as FID say little about downstream value (AugGen); what matters
here is whether a sample carries its class. :func:`class_fidelity` asks the judge whether plain
class-conditional samples look like the class they were asked for, and :func:`genie_boundary`
measures, per noise ratio r, how often GeNIe outputs for a pair (A -> B) read as the target B or
still as the source A: the band of r where the label flips is where hard negatives live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class JudgeNet(nn.Module):
    """Three conv blocks, 4x4 average pooling and a linear head; inputs of another size are resized."""

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 32, width: int = 32) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_channels, width), nn.MaxPool2d(2),
            block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # keep a coarse layout: a 6 is not a rotated 9
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(2 * width * 16, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the judge was trained on {self.in_channels}-channel images, got {x.shape[1]}")
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            down = x.shape[-1] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=down)
        return self.head(self.features(x))


def train_judge(dataset: Any, epochs: int = 15, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                width: int = 32, device: str = "cpu") -> JudgeNet:
    """Train a :class:`JudgeNet` on ``dataset`` (ImageDataset or (images, labels)); returned in eval mode.

    Light augmentation (random 1-2 px shifts) keeps it from keying on exact pixel positions, so it
    judges generated images by shape, not by how closely they copy a training image.
    """
    images, labels, num_classes = _unpack(dataset)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = JudgeNet(num_classes, images.shape[1], images.shape[-1], width).to(device)
    finally:
        torch.random.set_rng_state(torch_state)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = images.shape[0]
    steps = epochs * max(1, (n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    pad = max(1, images.shape[-1] // 16)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for idx in perm.split(batch_size):
            x = random_shift(images[idx], pad, g)
            loss = F.cross_entropy(model(x.to(device)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def random_shift(x: Tensor, pad: int, generator: torch.Generator, mode: str = "replicate") -> Tensor:
    """Shift each image by its own random offset in [-pad, pad] px (edges ``mode``-padded: a random crop)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (oy[:, None] + torch.arange(h)[None])[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w)[None])[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


@torch.no_grad()
def judge_probs(judge: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Softmax class probabilities of ``judge`` for ``images`` (N, C, H, W), on the CPU."""
    judge.eval()
    device = next(judge.parameters()).device
    out = [F.softmax(judge(chunk.to(device, torch.float32)), dim=1).cpu()
           for chunk in images.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0, getattr(judge, "num_classes", 0))


@torch.no_grad()
def judge_accuracy(judge: nn.Module, dataset: Any) -> float:
    """Accuracy of ``judge`` on real data (check the judge itself before trusting its scores)."""
    images, labels, _ = _unpack(dataset)
    return float((judge_probs(judge, images).argmax(1) == labels).float().mean())


def class_fidelity(generator: Any, judge: nn.Module, num_per_class: int = 50, seed: int = 0,
                   per_class: bool = False) -> Any:
    """Fraction of plain class-conditional samples that ``judge`` labels as the class asked for.

    ``generator`` needs ``sample(labels, seed)`` and ``num_classes``. With ``per_class=True``
    returns ``(overall, [fraction per class])``.
    """
    if num_per_class < 1:
        raise ValueError(f"num_per_class must be >= 1, got {num_per_class}")
    k = int(generator.num_classes)
    labels = torch.arange(k).repeat_interleave(num_per_class)
    images = generator.sample(labels, seed=seed)
    correct = (judge_probs(judge, images).argmax(1) == labels).float()
    overall = float(correct.mean())
    if per_class:
        return overall, correct.view(k, num_per_class).mean(1).tolist()
    return overall


@dataclass
class BoundaryCurve:
    """Per noise ratio r: the judge's mean P(target) and P(source) over GeNIe outputs of one pair."""

    source_label: int
    target_label: int
    ratios: list[float]
    p_target: list[float]
    p_source: list[float]

    def flip_band(self, threshold: float = 0.5) -> Optional[tuple[float, float]]:
        """``(r_low, r_high)``: the last r whose mean P(target) is below ``threshold``, and the next r.

        The label flips from source to target inside this band; ``None`` when P(target) never
        crosses the threshold on the measured grid (``r_low`` is 0 when even the smallest r
        reaches it).
        """
        order = sorted(range(len(self.ratios)), key=lambda i: self.ratios[i])
        prev = 0.0
        for i in order:
            if self.p_target[i] >= threshold:
                return (prev, self.ratios[i])
            prev = self.ratios[i]
        return None

    def rows(self) -> list[dict[str, float]]:
        return [{"r": r, "p_target": pt, "p_source": ps}
                for r, pt, ps in zip(self.ratios, self.p_target, self.p_source)]

    def format(self) -> str:
        """A small table, one line per r, for printing."""
        lines = [f"GeNIe {self.source_label} -> {self.target_label}", "     r  P(target)  P(source)"]
        for r, pt, ps in zip(self.ratios, self.p_target, self.p_source):
            lines.append(f"  {r:4.2f}  {pt:9.3f}  {ps:9.3f}")
        return "\n".join(lines)


def genie_boundary(generator: Any, judge: nn.Module, sources: Tensor, source_label: int, target_label: int,
                   ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0),
                   seed: int = 0) -> BoundaryCurve:
    """Run GeNIe from ``sources`` (all of class ``source_label``) to ``target_label`` at every r.

    All ratios go through one ``generate`` call (sources repeated per r); returns the judge's mean
    P(target) and P(source) per r, whose :meth:`BoundaryCurve.flip_band` is the r band where the
    label flips.
    """
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ValueError("ratios must not be empty")
    n = sources.shape[0]
    if n == 0:
        raise ValueError("sources must not be empty")
    g = len(ratios)
    reps = sources.repeat(g, 1, 1, 1)  # row j*n + i: source i at ratio j
    r = torch.tensor(ratios, dtype=torch.float64).repeat_interleave(n)
    src = torch.full((n * g,), int(source_label), dtype=torch.long)
    tgt = torch.full((n * g,), int(target_label), dtype=torch.long)
    images = generator.generate(reps, src, tgt, r, seed=seed)
    probs = judge_probs(judge, images).view(g, n, -1)
    p_target = probs[:, :, int(target_label)].mean(1).tolist()
    p_source = probs[:, :, int(source_label)].mean(1).tolist()
    return BoundaryCurve(int(source_label), int(target_label), ratios, p_target, p_source)


def _unpack(dataset: Any) -> tuple[Tensor, Tensor, int]:
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        images, labels = dataset.images, dataset.labels
        k = getattr(dataset, "num_classes", None)
    else:
        images, labels = dataset
        k = None
    images = torch.as_tensor(images).float()
    labels = torch.as_tensor(labels).long()
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ValueError("cannot train a judge on an empty dataset")
    return images, labels, int(k if k is not None else int(labels.max()) + 1)
