"""Plots and JSON a person looks at after a run: confusion over time, r over time, image grids.

matplotlib runs with the Agg backend (no screen needed); every function writes one file and
returns its path.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
from torch import Tensor


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _ensure_dir(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def save_figure(fig: Any, path: str, dpi: int = 120) -> str:
    """Lay out, write ``fig`` to ``path`` (creating its folder) and close it; returns ``path``."""
    fig.tight_layout()
    _ensure_dir(path)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return os.fspath(path)


def plot_confusion_over_time(
    history: Sequence[dict[str, Any]], path: str, class_names: Optional[Sequence[str]] = None, max_pairs: int = 8
) -> str:
    """Line plot of each frequently-top pair's score per refresh (from ``ConfusionGraph.history``)."""
    plt = pyplot()
    name = (lambda c: class_names[c]) if class_names else str
    series: dict[tuple[int, int], dict[int, float]] = {}
    for h in history:
        for a, b, score in h["top_pairs"]:
            series.setdefault((int(a), int(b)), {})[int(h["step"])] = float(score)
    ranked = sorted(series, key=lambda p: -max(series[p].values()))[:max_pairs]
    fig, ax = plt.subplots(figsize=(7, 4))
    for pair in ranked:
        steps = sorted(series[pair])
        ax.plot(steps, [series[pair][s] for s in steps], marker="o", ms=3, label=f"{name(pair[0])}→{name(pair[1])}")
    if history:
        ax.plot([h["step"] for h in history], [h["mean_confusion"] for h in history], "k--", lw=1, label="mean pair")
    ax.set_xlabel("training step")
    ax.set_ylabel("confusion score (EMA)")
    ax.set_title("Most confused class pairs over training")
    if ranked:
        ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)


def plot_ratio_over_time(
    history: dict[Any, Sequence[tuple[int, float]]], path: str, class_names: Optional[Sequence[str]] = None,
    max_pairs: int = 8,
) -> str:
    """Noise ratio r per pair over training steps (from ``Curriculum.history``)."""
    plt = pyplot()
    name = (lambda c: class_names[c]) if class_names else str
    fig, ax = plt.subplots(figsize=(7, 4))
    items = sorted(history.items(), key=lambda kv: -len(kv[1]))[:max_pairs]
    for pair, points in items:
        if not points:
            continue
        a, b = pair if isinstance(pair, tuple) else tuple(int(v) for v in str(pair).replace("->", ",").split(","))
        steps, rs = zip(*points)
        ax.step(steps, rs, where="post", marker="o", ms=3, label=f"{name(a)}→{name(b)}")
    ax.set_xlabel("training step")
    ax.set_ylabel("noise ratio r (higher = easier)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Curriculum: r per confused pair")
    if items:
        ax.legend(fontsize=8, ncol=2)
    return save_figure(fig, path)


def plot_confusion_matrix(matrix: np.ndarray, path: str, class_names: Optional[Sequence[str]] = None) -> str:
    """Heat map of the directed confusion scores (row A pulled towards column B)."""
    plt = pyplot()
    k = matrix.shape[0]
    names = list(class_names) if class_names else [str(i) for i in range(k)]
    fig, ax = plt.subplots(figsize=(0.45 * k + 2, 0.45 * k + 1.5))
    im = ax.imshow(matrix, cmap="magma")
    ax.set_xticks(range(k), names, rotation=90 if k > 12 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("pulled towards (B)")
    ax.set_ylabel("class (A)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def plot_image_grid(
    rows: Sequence[Sequence[Optional[Tensor]]], path: str, row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None, title: Optional[str] = None,
) -> str:
    """A grid of images (each ``(C, H, W)`` in [0, 1]; None leaves a cell blank)."""
    plt = pyplot()
    nr = max(len(rows), 1)
    nc = max((len(r) for r in rows), default=1)
    fig, axes = plt.subplots(nr, nc, figsize=(1.3 * nc + 1, 1.3 * nr + 0.6), squeeze=False)
    for i in range(nr):
        for j in range(nc):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            img = rows[i][j] if i < len(rows) and j < len(rows[i]) else None
            if img is not None:
                arr = img.detach().float().clamp(0, 1).cpu().numpy()
                if arr.shape[0] == 1:
                    ax.imshow(arr[0], cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(arr.transpose(1, 2, 0))
            else:
                ax.axis("off")
            if i == 0 and col_labels and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
            if j == 0 and row_labels and i < len(row_labels):
                ax.set_ylabel(row_labels[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=110)


def plot_training_curves(epochs: Sequence[dict[str, Any]], path: str) -> str:
    """Test accuracy (overall and on confused pairs) and loss per epoch."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    e = [m["epoch"] for m in epochs]
    ax.plot(e, [m["test_accuracy"] for m in epochs], marker="o", label="test accuracy")
    pa = [m.get("pair_accuracy") for m in epochs]
    if any(v is not None for v in pa):
        ax.plot(e, [v if v is not None else math.nan for v in pa], marker="s", label="accuracy on confused pairs")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax2 = ax.twinx()
    ax2.plot(e, [m["loss"] for m in epochs], "k--", lw=1, label="train loss")
    ax2.set_ylabel("loss")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def write_json(data: Any, path: str) -> str:
    """Write ``data`` as indented JSON (tuples become lists, numpy/tensors become numbers)."""
    _ensure_dir(path)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
    return path


def _json_default(o: Any) -> Any:
    """numpy scalars/arrays and tensors to numbers/lists, sets and tuples to lists, else str."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
