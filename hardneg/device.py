"""Which GPU: :func:`resolve_device` and :func:`use_device`.

A bare ``"cuda"`` means "the current device" and that is per thread: a new thread (the engine's
observe, prefetch and refresh threads, the worker thread) or a spawned child starts on GPU 0,
whatever rank it serves. The engine therefore resolves ``"cuda"`` once, on the thread that builds
it (the rank's own, after ``torch.cuda.set_device``), and every thread it starts makes that device
current first (:func:`use_device` as the thread initializer).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["resolve_device", "use_device"]

DeviceLike = Union[str, torch.device]


def resolve_device(device: DeviceLike, like: Optional[torch.device] = None) -> torch.device:
    """``device`` with an index: a bare ``"cuda"`` becomes ``like`` when that is a CUDA device with
    an index, else ``cuda:{torch.cuda.current_device()}`` of the calling thread. Other devices are
    returned as they are (``"cpu"``, ``"cuda:1"``, ``"mps"``, ``"meta"``)."""
    d = torch.device(device)
    if d.type != "cuda" or d.index is not None:
        return d
    if like is not None and like.type == "cuda" and like.index is not None:
        return like
    return torch.device("cuda", torch.cuda.current_device())


def use_device(device: Optional[torch.device]) -> None:
    """Make ``device`` the calling thread's current CUDA device (no-op for anything else)."""
    if device is not None and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
