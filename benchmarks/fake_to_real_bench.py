"""Does the From-Fake-to-Real two-stage regime beat ERM and synthetic mixing on worst-group accuracy?

Question: when a spurious attribute is tied to the label in training but not at test time, which
use of balanced synthetic data helps the worst (class, attribute) group most: none (ERM on real),
mixing it into the real data, or pretraining on it alone and fine-tuning on real only?

Data (biased coloured digits): the built-in digits at 16 px, drawn in red (attribute 0) or green
(attribute 1). In training, digits 0-4 are red and 5-9 green with probability ``--bias`` (0.95),
so colour predicts "low vs high digit"; in the test split the colour is a fair coin. Groups are
the 20 (digit, colour) cells; the figure is the test accuracy of the worst group.

Synthetic data: ``--per-cell`` images of every (digit, colour) cell, balanced. The generator
knows only digit shapes (it is fitted on the grey training digits, colour removed) and the colour
is rendered onto its samples, the counterpart of naming the group in a text prompt. Generators:

* ``pca`` (default when no diffusion model is given): a per-class Gaussian over the top-24
  principal components of the training digits. Cheap, blurry, unmistakably synthetic.
* ``diffusion``: a :class:`~hardneg.generators.class_conditional.ClassConditionalGenerator`
  trained on grey digits, loaded from ``--generator-path`` (default: the one that ships with
  hardneg, when present).

Variants, each with the same number of optimiser steps (``--steps``) and the same small CNN:
``erm`` (real only), ``group-dro`` (real only, GroupDRO), ``mix`` (real + synthetic, ERM),
``two-stage`` (synthetic only for half the steps, then real only, ERM) and ``two-stage-dro``
(the same with GroupDRO in stage 2).

Run: ``hardneg bench fake-to-real`` or ``python -m benchmarks fake-to-real`` (a few minutes on 2
CPU cores); ``--quick`` for a smoke run. Prints mean +- std over seeds of worst-group and average
accuracy; writes ``results.json`` and a bar plot to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import _common as C
from hardneg.data import ImageDataset, load_digits
from hardneg.methods.fake_to_real import (
    balanced_synthetic_set, evaluate_groups, fake_to_real, group_ids, train_classifier,
)

VARIANTS = ("erm", "group-dro", "mix", "two-stage", "two-stage-dro")
NAME = "fake-to-real"
HELP = "From Fake to Real on biased coloured digits: worst-group accuracy of ERM, GroupDRO, mixing, two-stage"
SIZE = 16


def colourise(images: Tensor, attrs: Tensor) -> Tensor:
    """Grey digits ``(N, 1, H, W)`` -> RGB with the strokes in red (attribute 0) or green (attribute 1)."""
    out = torch.zeros(images.shape[0], 3, *images.shape[-2:], dtype=images.dtype)
    out[torch.arange(len(attrs)), attrs.long()] = images[:, 0]
    return out


def biased_digits(seed: int, bias: float) -> dict[str, Any]:
    """Train/test splits with the colour tied to ``label >= 5`` in training (w.p. ``bias``), random in test."""
    train, test = load_digits(size=SIZE, seed=seed)
    g = torch.Generator().manual_seed(seed)
    spurious = (train.labels >= 5).long()
    flip = torch.rand(len(train), generator=g) >= bias
    train_attr = torch.where(flip, 1 - spurious, spurious)
    test_attr = torch.randint(0, 2, (len(test),), generator=g)
    return {
        "grey_train": train,
        "train": ImageDataset(colourise(train.images, train_attr), train.labels, train.class_names),
        "train_groups": group_ids(train.labels, train_attr, 2),
        "test": ImageDataset(colourise(test.images, test_attr), test.labels, test.class_names),
        "test_groups": group_ids(test.labels, test_attr, 2),
    }


class PCAGaussianGenerator:
    """A per-class Gaussian over the top principal components of the training images (a cheap generator)."""

    def __init__(self, data: ImageDataset, components: int = 24, shrink: float = 1e-3) -> None:
        x = data.images.flatten(1).double()
        self.shape = tuple(data.images.shape[1:])
        self.num_classes = data.num_classes
        self.mean = x.mean(0)
        _, _, v = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.basis = v[:components].T  # (P, k)
        z = (x - self.mean) @ self.basis
        self.mu, self.chol = [], []
        for c in range(self.num_classes):
            zc = z[data.labels == c]
            cov = torch.cov(zc.T) + shrink * torch.eye(components, dtype=torch.float64)
            self.mu.append(zc.mean(0))
            self.chol.append(torch.linalg.cholesky(cov))

    def sample(self, labels: Tensor, seed: Optional[int] = None, size: Optional[tuple[int, int]] = None) -> Tensor:
        g = torch.Generator().manual_seed(0 if seed is None else int(seed))
        labels = torch.as_tensor(labels).long()
        eps = torch.randn(len(labels), self.basis.shape[1], generator=g, dtype=torch.float64)
        z = torch.stack([self.mu[c] + self.chol[c] @ e for c, e in zip(labels.tolist(), eps)])
        x = (self.mean + z @ self.basis.T).float().clamp(0, 1).view(len(labels), *self.shape)
        if size is not None and tuple(size) != tuple(self.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


def make_generator(kind: str, path: Optional[str], grey_train: ImageDataset) -> tuple[Any, str]:
    """The generator to use and a description of it."""
    if kind == "auto":
        if path is None:
            from hardneg.generators.class_conditional import default_digits_generator_path

            candidate = default_digits_generator_path()
            path = candidate if os.path.isfile(os.path.join(candidate, "config.json")) else None
        kind = "diffusion" if path else "pca"
    if kind == "diffusion":
        from hardneg.generators.class_conditional import ClassConditionalGenerator, default_digits_generator_path

        path = path or default_digits_generator_path()
        gen = ClassConditionalGenerator.load(path)
        return gen, f"diffusion ({path})"
    return PCAGaussianGenerator(grey_train), "pca (per-class Gaussian, 24 components)"


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * (SIZE // 4) ** 2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def run_variant(variant: str, data: dict[str, Any], synthetic: ImageDataset, steps: int, seed: int,
        batch_size: int = 64, lr: float = 3e-3, stage2_lr: Optional[float] = None) -> dict[str, float]:
    """Train one variant; return worst-group and average test accuracy."""
    torch.manual_seed(seed)
    model = SmallCNN()
    real, groups = data["train"], data["train_groups"]
    t0 = time.perf_counter()
    if variant in ("erm", "group-dro"):
        train_classifier(model, real, steps, batch_size, lr, seed, groups=groups,
                         mode="group-dro" if variant == "group-dro" else "erm")
    elif variant == "mix":
        both = ImageDataset(torch.cat([real.images, synthetic.images]), torch.cat([real.labels, synthetic.labels]),
                            real.class_names)
        train_classifier(model, both, steps, batch_size, lr, seed)
    else:
        fake_to_real(model, synthetic, real, steps // 2, steps - steps // 2,
                     stage2="group-dro" if variant == "two-stage-dro" else "erm", real_groups=groups,
                     batch_size=batch_size, lr=lr, stage2_lr=stage2_lr, seed=seed)
    ev = evaluate_groups(model, data["test"], data["test_groups"])
    return {"worst_group": ev.worst_group_accuracy, "accuracy": ev.accuracy, "seconds": time.perf_counter() - t0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_common_arguments(p, NAME, seed=False)
    p.add_argument("--steps", type=int, default=600, help="optimiser steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, one run per variant each")
    p.add_argument("--bias", type=float, default=0.95, help="P(colour follows the label) in training")
    p.add_argument("--per-cell", type=int, default=40, help="synthetic images per (digit, colour) cell")
    p.add_argument("--generator", choices=("auto", "pca", "diffusion"), default="auto",
                   help="synthetic data source (auto: the shipped diffusion model when present, else pca)")
    p.add_argument("--generator-path", default=None, help="folder of a class-conditional generator (diffusion)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="variants to run")
    p.add_argument("--stage2-lr", type=float, default=None, help="fine-tuning lr of the two-stage variants "
                   "(default: the same 3e-3 as stage 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")


def run(args: argparse.Namespace) -> dict:
    """Every variant for every seed; a table of mean +- std, ``results.json`` and a plot under ``--out``."""
    if args.quick:
        args.steps, args.seeds, args.per_cell = 60, [0], 4
    torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    description = ""
    for seed in args.seeds:
        data = biased_digits(seed, args.bias)
        gen, description = make_generator(args.generator, args.generator_path, data["grey_train"])
        syn = balanced_synthetic_set(gen, 10, args.per_cell, num_attributes=2, group_transform=colourise,
                                     seed=seed, size=(SIZE, SIZE), class_names=data["train"].class_names)
        minority = int((torch.bincount(data["train_groups"], minlength=20) < 20).sum())
        print(f"seed {seed}: {len(data['train'])} real ({minority} groups under 20 samples), "
              f"{len(syn.data)} synthetic from {description}", flush=True)
        for v in args.variants:
            r = run_variant(v, data, syn.data, args.steps, seed, stage2_lr=args.stage2_lr)
            results[v].append(r)
            print(f"  {v:14s} worst-group {r['worst_group']:.4f} average {r['accuracy']:.4f} ({r['seconds']:.1f} s)",
                  flush=True)
    base = np.mean([r["worst_group"] for r in results["erm"]]) if "erm" in results else None
    print(f"\nbias {args.bias}, {args.steps} steps, {args.per_cell} synthetic per cell, generator {description}, "
          f"stage-2 lr {args.stage2_lr or 'as stage 1'}, seeds {args.seeds}")
    print(f"{'variant':14s} {'worst-group acc':>17s} {'average acc':>17s} {'wg - erm':>9s}")
    summary: dict[str, dict[str, Any]] = {}
    for v, rs in results.items():
        w = np.array([r["worst_group"] for r in rs])
        a = np.array([r["accuracy"] for r in rs])
        delta = f"{w.mean() - base:+.4f}" if base is not None else "-"
        summary[v] = {"worst_group": float(w.mean()), "worst_group_std": float(w.std()), "accuracy": float(a.mean()),
                      "accuracy_std": float(a.std()),
                      "worst_group_minus_erm": float(w.mean() - base) if base is not None else None}
        print(f"{v:14s} {w.mean():.4f} +- {w.std():.4f} {a.mean():.4f} +- {a.std():.4f} {delta:>9s}")
    settings = {k: v for k, v in vars(args).items() if k in ("steps", "seeds", "bias", "per_cell", "generator",
                                                             "generator_path", "variants", "stage2_lr", "threads")}
    out = {"benchmark": NAME, "quick": bool(args.quick), "machine": C.machine_info(), "command": C.command_line(NAME),
           "settings": settings, "generator": description, "results": results, "summary": summary}
    plot = C.bar_plot({v: e["worst_group"] for v, e in summary.items()}, "worst-group accuracy",
                      f"fake to real, bias {args.bias}", os.path.join(args.out, "fake_to_real.png"))
    return C.finish(args.out, out, plot)


main = C.build_main(__name__)
