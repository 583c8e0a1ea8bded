"""Off-the-step bookkeeping of ``HardNeg.observe``: :class:`Background`, :func:`stage` and :func:`any_bad`.

``observe`` does on the training thread only what must fail at the call that passed bad input:
shape and dtype checks (metadata), one fused "anything non-finite or out of range?" flag per
device read back once (:func:`any_bad`), and a copy of the step's tensors (:func:`stage`: a pinned
host buffer filled by a non-blocking copy when they live on a GPU). The rest (bank upsert,
running logit statistics, curriculum feedback) runs on :class:`Background`'s single thread, in
call order. The engine drains it (:meth:`Background.drain`) before anything reads what it writes:
a refresh, ``state_dict``, ``stats``, ``close``; so nothing is lost and a deterministic run does
the same work in the same order as a synchronous one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["Background", "Staged", "Task", "any_bad", "finite_array", "finite_sum", "labels_outside", "numpy_ok",
           "stage"]

logger = logging.getLogger(__name__)

# dtypes numpy handles natively: CPU work on them goes through numpy, single-threaded, instead of an
# OpenMP team that would wait on cores the training step (or the generation worker) is using
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool)


_TRUE, _FALSE = torch.tensor(True), torch.tensor(False)  # read-only flags of CPU checks


def numpy_ok(t: Tensor) -> bool:
    """Whether numpy can read ``t`` as it is (a CPU tensor of a numpy dtype, not part of a graph)."""
    return t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and not t.requires_grad


def finite_array(a: np.ndarray) -> bool:
    """True when the array ``a`` may be all finite: its sum of squares (one BLAS dot, ~5 us for a
    128 x 512 batch; a float32 sum for other dtypes) is finite. NaN and inf always make it not
    finite; an overflow of finite values (|x| > ~1e19 in float32) does too, and then the caller's
    exact check finds nothing wrong."""
    flat = a.reshape(-1)
    if flat.dtype in (np.float32, np.float64):
        return bool(np.isfinite(np.dot(flat, flat)))
    return bool(np.isfinite(np.sum(flat, dtype=np.float32)))


def finite_sum(t: Tensor) -> Tensor:
    """A boolean scalar on ``t``'s device: True when the float32 sum of ``t`` is not finite (so
    some element may not be; an overflowing sum of finite values also sets it, and the caller then
    checks exactly). One pass, no mask; CPU tensors are checked by numpy on the calling thread
    (:func:`finite_array`)."""
    if numpy_ok(t):
        return _FALSE if finite_array(t.numpy()) else _TRUE  # no tensor built
    return ~torch.isfinite(t.sum(dtype=torch.float32))


class Staged:
    """Tensors copied off the step; :meth:`ready` waits for a non-blocking device copy to land.

    ``arrays`` holds numpy views of the CPU ones (the private copies, or the owned tensors), by
    name: what the value checks read, without a second ``.numpy()`` per tensor.
    """

    def __init__(self, tensors: dict[str, Optional[Tensor]], event: Any = None,
                 arrays: Optional[dict[str, np.ndarray]] = None) -> None:
        self.tensors = tensors
        self.arrays = arrays if arrays is not None else {}
        self._event = event

    def ready(self) -> dict[str, Optional[Tensor]]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self.tensors


def stage(owned: tuple[str, ...] = (), **tensors: Optional[Tensor]) -> Staged:
    """Private copies of ``tensors`` the training loop may overwrite or free after the call.

    CUDA tensors go to pinned host memory by a non-blocking copy (PyTorch's caching host allocator
    reuses the block only once the copy is done) and one event marks the copies; CPU tensors are
    cloned, except those named in ``owned`` (already the engine's alone, e.g. what its forward hook
    captured: no loop holds them, and the next forward allocates new ones); meta tensors
    (shape-only dry runs) are kept as they are: they hold no values.
    """
    out: dict[str, Optional[Tensor]] = {}
    arrays: dict[str, np.ndarray] = {}
    event = None
    for name, t in tensors.items():
        if t is None:
            out[name] = None
            continue
        t = t.detach()
        kind = t.device.type
        if kind == "cpu":
            if t.dtype in _NUMPY_DTYPES:  # (detached: numpy can read it)
                a = t.numpy()
                if name not in owned:
                    a = a.copy()  # one memcpy on this thread
                    t = torch.from_numpy(a)
                arrays[name] = a
            elif name not in owned:
                t = t.clone()
            out[name] = t
        elif kind == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
            out[name] = host
            if event is None:
                event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(t.device))  # the last record covers every copy before it
        elif kind == "meta":
            out[name] = t
        else:
            out[name] = t.clone()
    return Staged(out, event, arrays)


def labels_outside(a: np.ndarray, k: int) -> bool:
    """Whether any of the integer class ids ``a`` lies outside ``[0, k)``: for int64 one pass (as
    unsigned, a negative id is huge), else a min and a max."""
    if a.size == 0:
        return False
    if a.dtype == np.int64:
        return bool(a.view(np.uint64).max() >= k)
    return bool(a.min() < 0 or a.max() >= k)


def any_bad(flags: list[Tensor]) -> bool:
    """Whether any of the boolean scalars ``flags`` is set, reading each device back once.

    Flags of one device are fused into a single reduction; CPU flags cost no device sync; meta
    flags (no values) count as not set.
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for f in flags:
        by_device.setdefault(f.device, []).append(f.reshape(()))
    for device, fs in by_device.items():
        if device.type == "meta":
            continue
        if bool(torch.stack(fs).any()):  # the one host read per device
            return True
    return False


class Task:
    """The outcome of one call queued on a :class:`Background`: what a reader of a
    ``concurrent.futures.Future`` uses (:meth:`done`, :meth:`result`, :meth:`exception`), at the cost
    of one small object. A ``Future`` builds a condition variable of its own, and the training thread
    queues two or three tasks a step; readers of a task wait on its Background's one condition instead."""

    __slots__ = ("_finished", "_state", "_value")

    def __init__(self, finished: threading.Condition) -> None:
        self._finished = finished
        self._state = 0  # 0: queued or running, 1: returned, 2: raised
        self._value: Any = None

    def done(self) -> bool:
        return self._state != 0

    def _wait(self, timeout: Optional[float]) -> None:
        if self._state:
            return
        with self._finished:
            if not self._finished.wait_for(self.done, timeout):
                raise FutureTimeout()

    def result(self, timeout: Optional[float] = None) -> Any:
        """What the call returned (waits for it; re-raises what it raised)."""
        self._wait(timeout)
        if self._state == 2:
            raise self._value
        return self._value

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """What the call raised, or None (waits for it)."""
        self._wait(timeout)
        return self._value if self._state == 2 else None

    def _run(self, fn: Callable[..., Any], args: tuple) -> None:
        """(background thread) Call ``fn(*args)``, keep its outcome and wake this task's readers."""
        try:
            self._value, self._state = fn(*args), 1
        except BaseException as exc:  # noqa: BLE001 - handed to the task's reader
            self._value, self._state = exc, 2
        with self._finished:
            self._finished.notify_all()


class Background:
    """One daemon thread running submitted work in submission order; errors surface on the caller.

    A failure of one task is re-raised by the next :meth:`check` or :meth:`drain` (then cleared), so
    a bank that cannot take an upsert fails the next training event rather than passing silently.

    Submitted work is only appended to a list (:meth:`submit`, :meth:`run_later`): waking a
    sleeping thread costs the caller from a fraction of a millisecond to several on a loaded
    machine (the woken thread preempts it or takes the GIL), which is the whole budget of a step.
    While work keeps coming the thread looks for it by itself, every quarter of the interval
    between submissions (1 ms to 50 ms), so the training thread never wakes it; after a second
    without work it sleeps until the next submission wakes it. Anything that waits for queued work
    (:meth:`drain`, :attr:`last`, :meth:`wake_for`, a full queue) wakes it first (:meth:`wake`).

    **The gate** (:meth:`hold` / :meth:`release`): while the training thread is inside the engine
    (``mix``, ``observe``, and from an ``observe`` to the next ``mix`` in a loop that mixes), the
    thread starts nothing new. Its work is Python under the GIL; started then, it would hold the
    GIL the training thread needs for its next call (up to the interpreter's 5 ms switch interval
    each time), which is most of what the step path used to cost. Released, the thread runs while
    forward and backward run (which spend their time in torch kernels, without the GIL). A wait
    for queued work (:meth:`wake`) opens the gate until the queue is empty, and the gate never
    stays shut longer than ``max_hold`` seconds.
    """

    def __init__(self, name: str = "hardneg-observe", initializer: Optional[Callable[[], None]] = None) -> None:
        self._name = name
        self._initializer = initializer
        self._thread: Optional[threading.Thread] = None
        self._pending: deque[Task] = deque()  # tracked tasks, oldest first (they finish in this order)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._finished = threading.Condition()  # notified each time a task finishes (its readers wait on it)
        self._thread_id: Optional[int] = None
        self._queued: list[tuple[Task, Callable[..., Any], tuple]] = []  # not yet taken by the thread
        self._asleep = True  # the thread waits without a timeout: the next submission must wake it
        self._closing = False
        self._last_submit = 0.0
        self.interval = 0.05  # running estimate of the seconds between submissions (the thread's poll)
        self.max_pending = 8  # backpressure: a caller far ahead of the thread waits for the oldest task
        self.idle_after = 1.0  # seconds without work after which the thread stops looking by itself
        self.max_hold = 1.0  # seconds after which a held gate opens by itself (a loop that stopped calling)
        self._held_since: Optional[float] = None  # monotonic time the gate was shut; None: open
        self._forced = False  # a reader waits for queued work: run it whatever the gate says

    def _main(self) -> None:
        """The thread: take what was queued, run it; look again after a poll interval, or sleep."""
        self._thread_id = threading.get_ident()
        if self._initializer is not None:
            try:
                self._initializer()
            except Exception as exc:  # noqa: BLE001 - priority and thread caps are best effort
                logger.warning("hardneg: setting up the %s thread failed: %r", self._name, exc)
        last_work = time.monotonic()
        while True:
            with self._cond:
                while not self._closing and (not self._queued or self._gate_shut()):
                    idle = not self._queued and time.monotonic() - last_work > self.idle_after
                    self._asleep = idle
                    self._cond.wait(None if idle else min(0.05, max(0.001, self.interval / 4)))
                    self._asleep = False
                if not self._queued:
                    return  # closing, nothing left
                batch, self._queued = self._queued, []
            for task, fn, args in batch:
                task._run(fn, args)
            last_work = time.monotonic()
            with self._lock:
                if not self._queued:
                    self._forced = False

    def _gate_shut(self) -> bool:
        """(lock held) Whether queued work waits for the training thread to leave the engine."""
        since = self._held_since
        if since is None or self._forced:
            return False
        if time.monotonic() - since > self.max_hold:
            self._held_since = None
            return False
        return True

    def hold(self) -> None:
        """Shut the gate: start no queued work until :meth:`release` (the training thread enters the
        engine). No lock: one store, read by the thread at its next look."""
        if self._held_since is None:
            self._held_since = time.monotonic()

    def release(self) -> None:
        """Open the gate (the training thread leaves for forward and backward): the thread takes what
        was queued at its next look, without being woken."""
        self._held_since = None

    def on_thread(self) -> bool:
        """Whether the caller is this background thread (which must never wait for itself)."""
        return self._thread_id is not None and threading.get_ident() == self._thread_id

    def submit(self, fn: Callable[..., Any], *args: Any) -> Task:
        """Queue ``fn(*args)`` after everything queued before it; returns its :class:`Task`. Its failure
        surfaces at the next :meth:`check` or :meth:`drain`. Runs after the next :meth:`wake`."""
        self.check()
        fut = self._queue(fn, args)
        with self._lock:
            self._pending.append(fut)
            oldest = self._pending[0] if len(self._pending) > self.max_pending else None
        if oldest is not None:
            self.wake()
            oldest.exception()  # waits; its error surfaces at the next check()
        return fut

    def run_later(self, fn: Callable[..., Any], *args: Any) -> Task:
        """Queue ``fn(*args)`` like :meth:`submit`, but untracked: its error stays in the returned
        task (for its own reader), :meth:`check` and :meth:`drain` ignore it. The reader calls
        :meth:`wake` before waiting on it."""
        return self._queue(fn, args)

    def _queue(self, fn: Callable[..., Any], args: tuple) -> Task:
        fut = Task(self._finished)
        now = time.perf_counter()
        with self._lock:
            self._queued.append((fut, fn, args))
            if self._last_submit:
                self.interval += 0.2 * (min(1.0, now - self._last_submit) - self.interval)
            self._last_submit = now
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            elif self._asleep:  # idle for a while: nothing will look unless woken
                self._cond.notify()
        return fut

    def wake(self) -> None:
        """Have the thread take everything queued so far now (a reader is about to wait for it),
        whatever the gate says."""
        with self._lock:
            if self._queued:
                self._forced = True
                self._cond.notify()

    def wake_for(self, fut: Task) -> None:
        """Wake the thread only when ``fut`` is still queued here (a reader about to wait on it; one
        handed over already needs no wake-up, and the work queued after it keeps waiting)."""
        with self._lock:
            queued = any(f is fut for f, _, _ in self._queued)
        if queued:
            self.wake()

    @property
    def last(self) -> Optional[Task]:
        """The most recently queued task still tracked (what a later reader has to wait for; handed
        to the thread now, so waiting for it ends)."""
        self.wake()
        with self._lock:
            return self._pending[-1] if self._pending else None

    @property
    def idle(self) -> bool:
        with self._lock:
            return all(f.done() for f in self._pending)

    def check(self) -> None:
        """Forget finished tasks; re-raise the first failure among them."""
        pending = self._pending
        if not pending or not pending[0].done():  # (tasks finish oldest first)
            return
        with self._lock:
            done = []
            while pending and pending[0].done():
                done.append(pending.popleft())
        for f in done:
            exc = f.exception()
            if exc is not None:
                raise exc

    def drain(self) -> None:
        """Wait for everything queued so far; re-raise the first failure."""
        if self.on_thread():
            return
        self.wake()
        with self._lock:
            pending, self._pending = self._pending, deque()
        error: Optional[BaseException] = None
        for f in pending:
            exc = f.exception()  # waits
            if exc is not None and error is None:
                error = exc
        if error is not None:
            raise error

    def close(self) -> None:
        """Finish queued work and stop the thread (errors of that work are dropped: shutting down)."""
        try:
            self.drain()
        except Exception:  # noqa: BLE001 - close must not fail because the last upsert did
            pass
        with self._cond:
            self._closing = True  # the thread runs what is still queued (run_later's too), then exits
            self._cond.notify()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

