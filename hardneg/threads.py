"""How the engine's own threads start: bounded OpenMP teams, low priority, the engine's GPU.

The training step owns the cores. The engine's helper threads (observe, prefetch) do small torch
work, so each runs OpenMP regions on one thread (:func:`helper_thread_init`); the background
refresh (FAISS kNN over the whole bank, O(bank)) runs ``refresh_threads`` OpenMP threads at the
lowest scheduling priority (:func:`refresh_thread_init`), so on a busy machine it takes the cycles
training leaves idle instead of stretching every training step. OpenMP's thread count is a
per-thread setting, so none of this changes the training thread's own.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

import torch

from hardneg.device import use_device

__all__ = ["HELPER_NICE", "REFRESH_NICE", "helper_thread_init", "limit_omp_threads", "lower_priority", "refresh_thread_init"]


REFRESH_NICE = 19  # niceness added to the background refresh thread (Linux: per thread): training wins every core
HELPER_NICE = 10  # the observe / prefetch threads: ~10% of a contended core, enough to finish within a step


def refresh_thread_init(threads: int, device: Optional[torch.device] = None) -> None:
    """Set up the background refresh thread so it yields the cores to the training step: bound its
    FAISS and torch OpenMP teams to ``threads`` (0: leave them), lower its scheduling priority, and
    make the engine's GPU current (FAISS ``knn_gpu`` and torch use the current device)."""
    if threads > 0:
        limit_omp_threads(threads)  # FAISS's OpenMP runtime (and its BLAS's) included
    lower_priority()
    use_device(device)


def lower_priority(by: int = REFRESH_NICE) -> None:
    """Raise the calling thread's nice value by ``by`` (Linux: per thread; threads it starts inherit
    it). A woken helper then never preempts the training thread, and takes a core only when training
    leaves it idle. A no-op where not supported or not permitted."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
        except OSError:
            pass


def helper_thread_init(device: Optional[torch.device] = None) -> None:
    """The observe and prefetch threads: their torch work is small, so one OpenMP thread each (a team
    of all cores would fight the training step's own), at low priority (waking one must not preempt
    the training thread: the engine waits for their results only where it needs them), on the
    engine's GPU."""
    limit_omp_threads(1)
    lower_priority(HELPER_NICE)
    use_device(device)


def limit_omp_threads(threads: int) -> None:
    """Cap the OpenMP team size of parallel regions the calling thread starts, in every OpenMP
    runtime loaded (torch's bundled libgomp and FAISS's): the ICV is per thread, so the training
    thread keeps its own. BLAS pools are process-wide and are left alone."""
    from threadpoolctl import ThreadpoolController  # a dependency of scikit-learn

    torch.get_num_threads()  # torch sets this thread's OpenMP ICV lazily on first use: let it, then cap
    ThreadpoolController().select(user_api="openmp").limit(limits=int(threads))
