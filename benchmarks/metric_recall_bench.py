"""Does GCA-HNG-style embedding-space hard-negative synthesis help a metric-learning model?

Question: with the same number of steps, does a small embedding network trained with a triplet
loss retrieve better (Recall@1) when its negatives come from the whole dataset (hardneg's FAISS
bank) and are sharpened by channel-wise interpolation towards the anchor?

Protocol (the usual deep-metric-learning split): the built-in digits at 16 px; train on classes
0-5 (train split), report Recall@1 on the *unseen* classes 6-9 (both splits, 714 images) and on
the seen classes' test split. Batches hold 6 images of each of the 6 training classes. Variants,
all with the same miner (each (anchor, positive) pair with its 8 nearest negatives) and the same
triplet loss (margin 0.2):

* ``batch``        negatives from the mini-batch only (the baseline)
* ``global``       + the 8 nearest negatives of each anchor from the bank of all training samples
* ``gca-fixed``    global + synthetic negatives, lambda = 0.5
* ``gca-learned``  global + synthetic negatives, lambda from the negatives-only graph network

Run: ``hardneg bench metric-recall`` or ``python -m benchmarks metric-recall`` (about a minute per
seed on 2 busy CPU cores); ``--quick`` for a smoke run. Prints a table of mean +- std over seeds and
the ratio to ``batch``; writes ``results.json`` and a bar plot to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import _common as C
from hardneg.bank import EmbeddingBank
from hardneg.data import ImageDataset, load_digits
from hardneg.methods.embedding_negatives import GCAHardNegatives, GlobalNegatives, mine_triplets, triplet_loss

TRAIN_CLASSES = list(range(6))
VARIANTS = ("batch", "global", "gca-fixed", "gca-learned")
NAME = "metric-recall"
HELP = "metric learning with bank and GCA-style synthetic negatives: Recall@1 on unseen classes vs batch negatives"


class EmbeddingNet(nn.Module):
    """Two conv blocks and a two-layer head to a ``dim``-d L2-normalised embedding."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)


def split(seed: int) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(train on classes 0-5, seen-class test split, unseen classes 6-9 from both splits)."""
    train, test = load_digits(size=16, seed=seed)
    seen = torch.isin(train.labels, torch.tensor(TRAIN_CLASSES))
    train_seen = train.subset(seen.nonzero().flatten())
    test_seen = test.subset(torch.isin(test.labels, torch.tensor(TRAIN_CLASSES)).nonzero().flatten())
    unseen_x = torch.cat([train.images[~seen], test.images[~torch.isin(test.labels, torch.tensor(TRAIN_CLASSES))]])
    unseen_y = torch.cat([train.labels[~seen], test.labels[~torch.isin(test.labels, torch.tensor(TRAIN_CLASSES))]])
    return train_seen, test_seen, ImageDataset(unseen_x, unseen_y, train.class_names)


@torch.no_grad()
def recall_at_1(net: nn.Module, data: ImageDataset) -> float:
    """Share of samples whose nearest other sample (cosine) has the same label."""
    net.eval()
    e = torch.cat([net(data.images[i:i + 512]) for i in range(0, len(data), 512)])
    net.train()
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return float((data.labels[sim.argmax(1)] == data.labels).float().mean())


def balanced_batches(labels: Tensor, per_class: int, g: torch.Generator):
    """Endless batches of ``per_class`` random samples of every class."""
    pools = [(labels == c).nonzero().flatten() for c in labels.unique().tolist()]
    while True:
        yield torch.cat([p[torch.randperm(len(p), generator=g)[:per_class]] for p in pools])


def run_variant(variant: str, seed: int, steps: int, per_class: int = 6, dim: int = 32, lr: float = 1e-3,
        alpha: float = 0.05, k: int = 8) -> dict[str, float]:
    """Train one variant for ``steps`` steps; return its Recall@1 on unseen and seen classes and its time."""
    train, test_seen, unseen = split(seed)
    torch.manual_seed(seed)
    net = EmbeddingNet(dim)
    gca: Optional[GCAHardNegatives] = None
    if variant.startswith("gca"):
        lam = 0.5 if variant == "gca-fixed" else None
        gca = GCAHardNegatives(dim, num_classes=len(TRAIN_CLASSES), lam=lam, alpha=alpha, negatives_per_anchor=k)
    glob = GlobalNegatives(EmbeddingBank(dim, len(TRAIN_CLASSES), use_gpu=False), k=k) if variant != "batch" else None
    params = list(net.parameters()) + (list(gca.parameters()) if gca is not None else [])
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    batches = balanced_batches(train.labels, per_class, g)
    t0 = time.perf_counter()
    for step in range(steps):
        idx = next(batches)
        x, y = train.images[idx], train.labels[idx]
        emb = net(x)
        ref, ref_y = (emb, y) if glob is None else glob.references(emb, y, idx)
        if gca is not None:
            loss = gca.loss(emb, y, ref, ref_y).total
        else:
            t = mine_triplets(emb, y, ref, ref_y, negatives_per_anchor=k, batch_in_ref=True)
            loss = triplet_loss(emb[t.anchor_idx], ref[t.pos_idx], ref[t.neg_idx], margin=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if glob is not None:
            glob.update(idx, emb, y, step)
    return {"recall_unseen": recall_at_1(net, unseen), "recall_seen": recall_at_1(net, test_seen),
            "seconds": time.perf_counter() - t0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    C.add_common_arguments(p, NAME, seed=False)
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, one run per variant each")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="variants to run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this small net)")


def run(args: argparse.Namespace) -> dict:
    """Every variant for every seed; a table of mean +- std, ``results.json`` and a plot under ``--out``."""
    if args.quick:
        args.steps, args.seeds = 30, [0]
    torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for v in args.variants:
            r = run_variant(v, seed, args.steps)
            results[v].append(r)
            print(f"seed {seed} {v:12s} R@1 unseen {r['recall_unseen']:.4f} seen {r['recall_seen']:.4f} "
                  f"({r['seconds']:.1f} s)", flush=True)
    base = np.mean([r["recall_unseen"] for r in results.get("batch", [])]) if "batch" in results else None
    print(f"\nRecall@1, {args.steps} steps, seeds {args.seeds} (mean +- std)")
    print(f"{'variant':12s} {'unseen 6-9':>16s} {'seen 0-5':>16s} {'vs batch':>9s} {'s/run':>6s}")
    summary: dict[str, dict[str, float]] = {}
    for v, rs in results.items():
        u = np.array([r["recall_unseen"] for r in rs])
        s = np.array([r["recall_seen"] for r in rs])
        ratio = f"{u.mean() / base:.3f}" if base else "-"
        summary[v] = {"recall_unseen": float(u.mean()), "recall_unseen_std": float(u.std()),
                      "recall_seen": float(s.mean()), "recall_seen_std": float(s.std()),
                      "unseen_vs_batch": float(u.mean() / base) if base else None}
        print(f"{v:12s} {u.mean():.4f} +- {u.std():.4f} {s.mean():.4f} +- {s.std():.4f} {ratio:>9s} "
              f"{np.mean([r['seconds'] for r in rs]):6.1f}")
    out = {"benchmark": NAME, "quick": bool(args.quick), "machine": C.machine_info(), "command": C.command_line(NAME),
           "steps": args.steps, "seeds": args.seeds, "results": results, "summary": summary}
    plot = C.bar_plot({v: e["recall_unseen"] for v, e in summary.items()}, "Recall@1 (unseen classes 6-9)",
                      f"metric learning, {args.steps} steps", os.path.join(args.out, "metric_recall.png"))
    return C.finish(args.out, out, plot)


main = C.build_main(__name__)
