"""Compare two saved states (nested dicts / lists of tensors, arrays and numbers) for exact equality."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Wall-clock measurements: they differ between any two runs, resumed or not.
TIMING_KEYS = frozenset({"seconds", "queue_wait", "engine_seconds", "wall_seconds", "engine_fraction",
                         "worker_images_per_s"})


def state_differences(a: Any, b: Any, ignore: frozenset = TIMING_KEYS, path: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` differ (keys named in ``ignore`` are skipped at any depth)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        keys = (set(a) | set(b)) - ignore
        for k in sorted(keys, key=str):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'first' if k in a else 'second'}")
            else:
                out.extend(state_differences(a[k], b[k], ignore, f"{path}/{k}"))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in state_differences(x, y, ignore, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape \
                or a.dtype != b.dtype:
            return [f"{path}: tensors differ in type or shape"]
        same = torch.equal(a, b) or (a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all()))
        return [] if same else [f"{path}: tensors differ"]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True) else [f"{path}: arrays differ"]
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]
