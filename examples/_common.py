"""Shared pieces of the examples: flags, digits data, a small CNN, the generator choice, a summary.

Not part of the hardneg API: each example script imports this file from its own folder.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Optional

import torch
from torch import Tensor, nn

from hardneg import HardNegConfig
from hardneg.data import ImageDataset, load_digits
from hardneg.training import predict


def parser(description: str, max_steps: int = 150) -> argparse.ArgumentParser:
    """The flags every example takes."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max-steps", type=int, default=max_steps, help="optimiser steps to train for")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--refresh-every", type=int, default=10, help="steps between confusion refreshes")
    p.add_argument("--synthetic-fraction", type=float, default=0.25)
    p.add_argument("--generator", choices=["class-conditional", "none"], default="class-conditional",
                   help="class-conditional: GeNIe with the digits diffusion model (loaded from "
                        "--generator-dir or the one shipped with hardneg, else trained for --fit-steps); "
                        "none: mine confusion only")
    p.add_argument("--generator-dir", default=None)
    p.add_argument("--generator-steps", type=int, default=None,
                   help="DDIM steps of the class-conditional generator (default: its config's)")
    p.add_argument("--deterministic", action="store_true",
                   help="repeatable run: refresh inline and hand generated images over at refresh boundaries")
    p.add_argument("--fit-steps", type=int, default=400,
                   help="generator training steps when it must be trained")
    p.add_argument("--out", default="hardneg-out/examples", help="checkpoints and generator cache")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    return p


def digits(args: argparse.Namespace) -> tuple[ImageDataset, ImageDataset]:
    """The built-in scikit-learn digits (train, test); items are (image, label, index)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return load_digits(size=args.image_size, seed=args.seed)


class SmallCNN(nn.Module):
    """A small CNN for 1-channel digits; the input of ``head`` (64-d) is the embedding hardneg watches."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def config(args: argparse.Namespace, num_classes: int, generator: Any) -> HardNegConfig:
    """Engine settings sized for a short CPU run."""
    return HardNegConfig(
        num_classes=num_classes, refresh_every=args.refresh_every, top_pairs=4, knn_k=10,
        sources_per_pair=16, images_per_refresh=32, generation_batch=16,
        synthetic_fraction=args.synthetic_fraction, buffer_size=512, curriculum="adaptive", r_start=0.7,
        r_end=0.4, adaptive_min_samples=16, total_steps=max(args.max_steps, 1),
        freshness_half_life=max(args.max_steps // 2, 10), worker_backend="thread", seed=args.seed,
        deterministic=getattr(args, "deterministic", False),
    )


def generator(args: argparse.Namespace, data: ImageDataset) -> Any:
    """The generator the flags ask for (None for ``--generator none``)."""
    choice = args.generator
    if choice == "none":
        return None
    folder = _generator_folder(args)
    have_weights = os.path.exists(os.path.join(folder, "config.json"))
    from hardneg.generators.class_conditional import ClassConditionalGenerator

    if have_weights:
        print(f"generator: loading {folder}", flush=True)
        kwargs = {"num_inference_steps": args.generator_steps} if args.generator_steps else {}
        return ClassConditionalGenerator.load(folder, **kwargs)
    print(f"generator: training a class-conditional diffusion model for {args.fit_steps} steps", flush=True)
    gen = ClassConditionalGenerator.for_dataset(data, seed=args.seed)
    gen.fit(data, steps=args.fit_steps, seed=args.seed, progress=False)
    gen.save(folder)
    return gen


def _generator_folder(args: argparse.Namespace) -> str:
    if args.generator_dir:
        return args.generator_dir
    from hardneg.generators.class_conditional import default_digits_generator_path

    shipped = default_digits_generator_path()
    if os.path.exists(os.path.join(shipped, "config.json")):
        return shipped
    return os.path.join(args.out, f"digits-generator-{args.image_size}px")


def summary(name: str, engine: Any, model: nn.Module, test: ImageDataset, started: float,
            **extra: Any) -> dict:
    """Print and return what the run did: steps, accuracy, confused pairs, synthetic use."""
    stats = engine.stats()
    acc = float((predict(model, test) == test.labels).float().mean())
    pairs = [(p.a, p.b, round(p.score, 4)) for p in engine.confusions()]
    out = {"example": name, "steps": stats["step"], "test_accuracy": acc, "top_pairs": pairs,
           "synthetic_used": int(stats["synthetic_used"]), "buffer_size": stats["buffer"]["size"],
           "bank_size": stats["bank_size"], "mean_r": stats["mean_r"],
           "seconds": time.perf_counter() - started, **extra}
    print(f"[{name}] {out['steps']} steps in {out['seconds']:.0f} s | test accuracy {acc:.3f} | "
          f"synthetic used {out['synthetic_used']} | buffer {out['buffer_size']} | "
          f"confused pairs (a->b, score): {pairs}", flush=True)
    return out
