"""Asynchronous GeNIe generation next to a training loop: :class:`GenerationWorker`.

The training thread hands :class:`GenerationRequest` objects to :meth:`GenerationWorker.submit`
and collects :class:`GenerationResult` objects with :meth:`GenerationWorker.poll`; neither call
ever waits for the generator. The worker owns its own generator (built by a factory inside the
worker) and runs it in

* a **thread** (``backend="thread"``): cheap to start, shares the process (and, on a GPU, runs on
  its own CUDA stream so it overlaps the training step), or
* a **child process** (``backend="process"``, ``spawn`` start method): isolates crashes and leaks
  and gets its own ``torch.set_num_threads`` budget so a CPU box keeps training responsive. The
  factory must be picklable (a module-level function, class or ``functools.partial`` of one) and
  the training script needs the usual ``if __name__ == "__main__":`` guard (starting it from
  unguarded module-level code raises :class:`hardneg._spawn.SpawnGuardError` naming the fix).

The pending queue is bounded: when it is full the *oldest* pending request is dropped, because the
newest request reflects the model's current confusions. A request that raises or returns
non-finite images is logged and counted and the worker goes on; a worker that dies (dead thread,
dead child) is restarted up to ``max_restarts`` times and then reports itself failed, after which
``poll`` returns nothing and the training loop goes on with what it already has.

Hung generators (``request_timeout``): a request still running after its deadline is booked as a
failure (``stats()["timeouts"]``, ``last_error`` says which request and why) and the worker is
replaced within the same ``max_restarts`` budget. A child process is killed. A thread cannot be
killed in Python: the stuck thread is *abandoned* (a daemon; its result, if it ever returns, is
discarded and it then exits; it keeps its generator's memory until then, and dies with the
interpreter) and a new thread with a fresh generator takes over; ``stats()["abandoned_threads"]``
counts them and :meth:`GenerationWorker.close` never waits on them, nor past a running request's
deadline.

Orphans: a child process exits as soon as the training process dies, even in the middle of a
request: a watchdog thread in the child waits on the parent's sentinel, and on Linux the child also
asks the kernel for ``SIGKILL`` on parent death (``PR_SET_PDEATHSIG``, when started from the main
thread: the kernel ties it to the launching thread).

Serves the refresh (``submit``, from :class:`hardneg.HardNeg`, never blocking) and ``mix``/``collect``
(``poll``); generation itself runs here, off the training step.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
import torch.multiprocessing as torch_mp
from torch import Tensor

from hardneg._spawn import check_spawn_safe
from hardneg.generators.base import Generator, GeneratorError, check_output
from hardneg.generators.from_config import generator_info

logger = logging.getLogger(__name__)

Backend = Literal["thread", "process"]
GeneratorFactory = Callable[[], Generator]
_ERROR_CHARS = 2000  # error text sent back from a child is cut to keep each pipe message atomic


class ObjectFactory:
    """The worker's factory for a generator *object* the user passed in (instead of a factory).

    Not a deep copy any more: a copy doubled the generator's GPU memory on the same device and
    silently dropped a ``torch.compile``. What is done instead:

    * thread backend: the worker's first build returns the object itself, so the worker thread
      owns it from then on (it is moved to the worker's device and warmed up; do not call it from
      another thread while the engine runs; pass a factory to keep yours apart). A rebuild after a restart returns a deep copy, because the
      old thread may still hold the object (a hung, abandoned thread).
    * process backend: the factory is pickled to the child (``spawn``), which builds from its
      unpickled copy; the object in the training process is never run by the worker.
    """

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self._given = False
        self._lock = threading.Lock()

    def __call__(self) -> Generator:
        with self._lock:
            if not self._given:
                self._given = True
                return self.generator
        import copy

        logger.warning("hardneg worker restarted: building a deep copy of the generator object (the old one may "
                       "still be in use); pass a factory to build fresh generators instead")
        return copy.deepcopy(self.generator)

    def __getstate__(self) -> dict[str, Any]:
        return {"generator": self.generator}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["generator"])  # type: ignore[misc]


class WorkerStartError(RuntimeError):
    """The generator could not be built in the worker (bad path, wrong arguments, missing weights)."""


# ============================================================================ data
def _vector(value: Any, n: int, dtype: torch.dtype, name: str) -> Tensor:
    """``value`` as a CPU ``(n,)`` tensor of ``dtype``; a scalar is broadcast to all n samples."""
    t = torch.as_tensor(value).detach().to("cpu")
    if t.ndim == 0:
        t = t.expand(n)
    t = t.reshape(-1).to(dtype)
    if t.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries (one per source), got {t.shape[0]}")
    return t


@dataclass
class GenerationRequest:
    """One batch of GeNIe work: turn ``sources`` (class ``pair[0]``) into images of ``pair[1]``.

    ``source_ids`` are the dataset ids of the sources (provenance), ``ratios`` the per-sample noise
    ratio r, ``step`` the training step that asked for it and ``seed`` makes generation repeatable.
    Scalars are accepted for ``source_labels``, ``target_labels`` and ``ratios`` and broadcast.
    ``sources`` is ``None`` in the copy a :class:`GenerationResult` carries.
    """

    request_id: int
    pair: tuple[int, int]
    source_ids: Tensor
    sources: Optional[Tensor]
    source_labels: Tensor
    target_labels: Tensor
    ratios: Tensor
    step: int = 0
    seed: Optional[int] = None
    submitted_at: float = field(default=0.0, compare=False, repr=False)  # time.monotonic() at submit

    def __post_init__(self) -> None:
        self.request_id = int(self.request_id)
        if len(self.pair) != 2:
            raise ValueError(f"pair must be (source class, target class), got {self.pair!r}")
        self.pair = (int(self.pair[0]), int(self.pair[1]))
        self.source_ids = torch.as_tensor(self.source_ids).detach().to("cpu", torch.int64).reshape(-1)
        n = int(self.source_ids.shape[0])
        if n == 0:
            raise ValueError("a GenerationRequest needs at least one source")
        if self.sources is not None:
            s = self.sources
            if not isinstance(s, Tensor) or s.ndim != 4 or not s.is_floating_point():
                raise ValueError(
                    f"sources must be a float (N, C, H, W) tensor, got {getattr(s, 'dtype', type(s))} "
                    f"of shape {tuple(getattr(s, 'shape', ()))}"
                )
            if s.shape[0] != n:
                raise ValueError(f"got {s.shape[0]} source images for {n} source_ids")
        self.source_labels = _vector(self.source_labels, n, torch.int64, "source_labels")
        self.target_labels = _vector(self.target_labels, n, torch.int64, "target_labels")
        self.ratios = _vector(self.ratios, n, torch.float32, "ratios")
        if not torch.isfinite(self.ratios).all() or (self.ratios <= 0).any() or (self.ratios > 1).any():
            raise ValueError(f"every ratio must lie in (0, 1], got {self.ratios.tolist()}")
        self.step = int(self.step)
        self.seed = None if self.seed is None else int(self.seed)

    def __len__(self) -> int:
        return int(self.source_ids.shape[0])

    def without_sources(self) -> "GenerationRequest":
        """A copy that drops the source images (what results carry as provenance)."""
        return dataclasses.replace(self, sources=None)


@dataclass
class GenerationResult:
    """Generated images for one request plus the request's provenance.

    ``images`` is a CPU float ``(n, C, H, W)`` tensor owned by the caller (already copied out of
    the worker); ``seconds`` is the generation time and ``queue_wait`` the time the request spent
    waiting in the queue before generation started.
    """

    request: GenerationRequest
    images: Tensor
    seconds: float = 0.0
    queue_wait: float = 0.0

    # Shortcuts to the request's provenance.
    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def pair(self) -> tuple[int, int]:
        return self.request.pair

    @property
    def source_ids(self) -> Tensor:
        return self.request.source_ids

    @property
    def source_labels(self) -> Tensor:
        return self.request.source_labels

    @property
    def target_labels(self) -> Tensor:
        return self.request.target_labels

    @property
    def ratios(self) -> Tensor:
        return self.request.ratios

    @property
    def step(self) -> int:
        return self.request.step

    @property
    def seed(self) -> Optional[int]:
        return self.request.seed

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, index: Union[Tensor, Sequence[int]]) -> "GenerationResult":
        """The result restricted to rows ``index`` (e.g. the r GeNIe-Ada kept per source)."""
        idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        req = self.request
        sub = GenerationRequest(
            request_id=req.request_id, pair=req.pair, source_ids=req.source_ids[idx], sources=None,
            source_labels=req.source_labels[idx], target_labels=req.target_labels[idx],
            ratios=req.ratios[idx], step=req.step, seed=req.seed, submitted_at=req.submitted_at,
        )
        return GenerationResult(sub, self.images[idx], self.seconds, self.queue_wait)


# ============================================================================ generation
@dataclass
class _Outcome:
    ok: bool
    images: Optional[Tensor]
    error: str
    seconds: float
    queue_wait: float


def _build_generator(factory: GeneratorFactory, device: torch.device, warmup: bool = False) -> Generator:
    """Call the factory, move the generator to ``device`` when it supports ``.to``, then warm it up.

    ``warmup``: call the generator's ``warmup()`` when it has one (one tiny generation: kernels
    load and a compiled denoiser compiles here, at worker start, not in the first request).
    """
    gen = factory()
    if not callable(getattr(gen, "generate", None)):
        raise TypeError(f"generator_factory returned {type(gen).__name__}, which has no generate() method")
    if device.type != "cpu" and callable(getattr(gen, "to", None)):
        moved = gen.to(device)
        gen = moved if moved is not None else gen
    if warmup and callable(getattr(gen, "warmup", None)):
        with torch.no_grad():
            gen.warmup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # weights are ready before the side stream uses them
    return gen


def _chunk_seed(seed: Optional[int], k: int) -> Optional[int]:
    """Seed of chunk ``k`` of a split request: the request's own for the first, distinct for the rest."""
    if seed is None or k == 0:
        return seed
    return (int(seed) * 1_000_003 + k) % 2**62


def _generate_once(gen: Generator, req: GenerationRequest, device: torch.device,
                   max_batch: Optional[int] = None) -> Tensor:
    """Run one request on ``device``; returns private CPU images or raises on unusable output.

    ``max_batch``: at most that many samples per ``generate`` call (the request is split, chunk k
    seeded by :func:`_chunk_seed`), bounding the generator's memory whatever the request size.
    """
    assert req.sources is not None
    src = req.sources.to(device, non_blocking=True)
    sl, tl = req.source_labels.to(device), req.target_labels.to(device)
    n = len(src)
    if not max_batch or n <= max_batch:
        out = gen.generate(src, sl, tl, req.ratios, seed=req.seed)
    else:
        parts = []
        for k, a in enumerate(range(0, n, max_batch)):
            b = a + max_batch
            part = gen.generate(src[a:b], sl[a:b], tl[a:b], req.ratios[a:b], seed=_chunk_seed(req.seed, k))
            if not isinstance(part, Tensor):
                raise GeneratorError(f"generator returned {type(part).__name__}, expected a Tensor")
            parts.append(part)
        out = torch.cat(parts)
    if not isinstance(out, Tensor):
        raise GeneratorError(f"generator returned {type(out).__name__}, expected a Tensor")
    if tuple(out.shape) != tuple(src.shape):
        raise GeneratorError(
            f"generator returned shape {tuple(out.shape)} for sources of shape {tuple(src.shape)}"
        )
    if not out.is_floating_point():
        raise GeneratorError(f"generator returned dtype {out.dtype}, expected a float tensor")
    out = check_output(out.detach())  # raises GeneratorError on NaN/inf
    # copy=True: the caller owns the result even if the generator reuses an output buffer.
    return out.to("cpu", dtype=req.sources.dtype, copy=True)


def _execute(gen: Generator, req: GenerationRequest, device: torch.device, stream: Any,
             max_batch: Optional[int] = None) -> _Outcome:
    """Generate for ``req`` (``max_batch`` samples per call at most); any ``Exception`` becomes a failed outcome."""
    wait = max(0.0, time.monotonic() - req.submitted_at) if req.submitted_at else 0.0
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            if stream is not None:
                with torch.cuda.stream(stream):
                    images = _generate_once(gen, req, device, max_batch)
                stream.synchronize()  # nothing of this request is still in flight on the GPU
            else:
                images = _generate_once(gen, req, device, max_batch)
        if not torch.isfinite(images).all():  # e.g. overflow in the dtype conversion
            raise GeneratorError("generated images contain NaN/inf after conversion to the source dtype")
    except Exception as exc:  # noqa: BLE001 - isolating generator failures is the point
        return _Outcome(False, None, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0, wait)
    return _Outcome(True, images, "", time.perf_counter() - t0, wait)


# ============================================================================ child process
def _to_wire(ticket: int, req: GenerationRequest) -> dict[str, Any]:
    """Request as a pipe message: metadata by value, the source images as a shared-memory tensor."""
    return {
        "ticket": ticket, "request_id": req.request_id, "pair": req.pair, "step": req.step, "seed": req.seed,
        "submitted_at": req.submitted_at, "source_ids": req.source_ids.numpy(),
        "source_labels": req.source_labels.numpy(), "target_labels": req.target_labels.numpy(),
        "ratios": req.ratios.numpy(), "sources": req.sources,
    }


def _from_wire(msg: dict[str, Any]) -> tuple[int, GenerationRequest]:
    req = GenerationRequest(
        request_id=msg["request_id"], pair=msg["pair"], source_ids=torch.from_numpy(msg["source_ids"]),
        sources=msg["sources"], source_labels=torch.from_numpy(msg["source_labels"]),
        target_labels=torch.from_numpy(msg["target_labels"]), ratios=torch.from_numpy(msg["ratios"]),
        step=msg["step"], seed=msg["seed"], submitted_at=msg["submitted_at"],
    )
    return int(msg["ticket"]), req


def _exit_with_parent(use_pdeathsig: bool) -> None:
    """Make this child process exit when its parent dies, even while a request is running.

    A daemon thread waits on the parent's sentinel (portable) and ends the process with
    ``os._exit``; on Linux, ``PR_SET_PDEATHSIG`` also has the kernel send ``SIGKILL`` (only asked for
    when ``use_pdeathsig``: it fires when the *thread* that started us exits, so only the main thread's
    children may use it).
    """
    parent = torch_mp.parent_process()
    if use_pdeathsig and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except Exception:  # noqa: BLE001 - the watchdog below still covers it
            pass
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent process is gone (its sentinel closes)
        os._exit(0)

    threading.Thread(target=watch, name="hardneg-parent-watchdog", daemon=True).start()


def _child_main(
    factory: GeneratorFactory, in_q: Any, out_q: Any, stop: Any, num_threads: int, device_str: str,
    use_pdeathsig: bool = False, memory: Optional[dict[str, Any]] = None,
) -> None:
    """Entry point of the worker process: build the generator, then serve requests until stopped.

    Every message it sends is small (results travel as shared-memory tensors), so a write to the
    pipe is atomic and a child that dies mid-way never leaves half a message behind. Before each
    request it sends ``("start", ticket)`` so the parent can time the request against its deadline.
    ``memory``: the worker's ``max_batch``, ``memory_fraction`` (its share of the GPU, set before
    the generator loads) and ``warmup``.
    """
    memory = memory or {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    _exit_with_parent(use_pdeathsig)
    torch.set_num_threads(max(1, int(num_threads)))
    device = torch.device(device_str)
    try:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        if device.type == "cuda" and memory.get("memory_fraction") is not None:
            torch.cuda.set_per_process_memory_fraction(float(memory["memory_fraction"]), device)
        gen = _build_generator(factory, device, bool(memory.get("warmup")))
        info = generator_info(gen)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then this child exits
        out_q.put(("fatal", -1, f"generator factory failed: {type(exc).__name__}: {exc}"[:_ERROR_CHARS]))
        raise SystemExit(1)
    out_q.put(("ready", -1, info))  # the parent checks the generator fits the data (wait_until_ready)
    out_q.cancel_join_thread()  # exiting must never wait on a parent that stopped reading
    parent = torch_mp.parent_process()
    while not stop.is_set():
        try:
            msg = in_q.get(timeout=0.25)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                break  # orphaned: the training process is gone
            continue
        if msg is None:
            break
        ticket, req = _from_wire(msg)
        out_q.put(("start", ticket))
        outcome = _execute(gen, req, device, None, memory.get("max_batch"))
        if outcome.ok:
            out_q.put(("ok", ticket, outcome.images, outcome.seconds, outcome.queue_wait))
        else:
            out_q.put(("error", ticket, outcome.error[:_ERROR_CHARS], outcome.seconds, outcome.queue_wait))
        del msg, req, outcome


def _received(msg: Any) -> tuple:
    """A message of the child as the parent books it: a result's images copied out of shared memory
    into memory the caller owns, a ``start`` stamped with the time it was read."""
    if msg[0] == "ok":
        return ("ok", msg[1], msg[2].clone(), msg[3], msg[4])
    if msg[0] == "start":
        return ("start", msg[1], time.monotonic())
    return tuple(msg)


def _receive(out_q: Any, inbox: "collections.deque[tuple]", stop: threading.Event, name: str) -> None:
    """Body of the process backend's receiver thread: read the child's messages as they come
    (unpickling a result fetches its shared-memory handles from the child, which can take
    milliseconds) and append them to ``inbox``, so the training thread's ``poll`` only pops."""
    while not stop.is_set():
        try:
            msg = out_q.get(timeout=0.1)
        except queue.Empty:
            continue
        except (EOFError, ValueError):  # the queue was closed under us: nothing more will come
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a result whose sender died before we read it
            if stop.is_set():
                return
            logger.warning("hardneg worker %s: could not read a result from the child: %r", name, exc)
            continue
        inbox.append(_received(msg))


# ============================================================================ the worker
_LIVE_WORKERS: "weakref.WeakSet[GenerationWorker]" = weakref.WeakSet()


def _close_all_workers() -> None:
    """atexit safety net: stop every worker the program forgot to close (no orphans, no hang)."""
    for worker in list(_LIVE_WORKERS):
        try:
            worker.close(timeout=2.0)
        except BaseException:  # noqa: BLE001 - best effort at interpreter exit
            logger.exception("hardneg: closing a generation worker at exit failed")


# Registered after torch.multiprocessing was imported, so it runs *before* multiprocessing's own
# exit handler (atexit is last-in first-out) and children get a graceful stop first.
atexit.register(_close_all_workers)


class GenerationWorker:
    """Runs a generator in the background behind a bounded, drop-oldest request queue.

    Args:
        generator_factory: zero-argument callable returning a :class:`Generator`; called inside
            the worker (and again after a restart) so the worker owns its copy.
        backend: ``"thread"`` or ``"process"`` (``spawn``; the factory must be picklable).
        queue_size: pending requests kept; a submit beyond that drops the oldest pending one.
        max_restarts: restarts after the worker died before it reports itself failed.
        num_threads: ``torch.set_num_threads`` in the child process. The thread backend shares
            the training process's thread pool and leaves it alone.
        device: where generation runs (``"cpu"``, ``"cuda:0"``...). Results always come back on
            the CPU.
        max_in_flight: process backend only: requests handed to the child ahead of time (one
            running, the rest waiting in the child's pipe) so it never idles between polls.
        request_timeout: seconds a request may run before it is failed and the worker replaced
            (process: killed; thread: abandoned, see the module docs); ``None``: no deadline.
        max_batch: at most this many samples per ``generate`` call (a request is split); bounds
            the generator's memory on either backend. ``None``: whole requests.
        memory_fraction: process backend on CUDA: the share of the GPU's memory the child may
            allocate (``torch.cuda.set_per_process_memory_fraction``), so generation cannot take
            what training needs. The thread backend shares the training process's allocator:
            use ``max_batch`` there (a ``ValueError`` says so).
        warmup: call the generator's ``warmup()`` once it is built (kernels load, a compiled
            denoiser compiles) before the worker reports ready.
    """

    def __init__(
        self,
        generator_factory: GeneratorFactory,
        backend: Backend = "thread",
        queue_size: int = 8,
        max_restarts: int = 3,
        num_threads: int = 1,
        device: Union[str, torch.device] = "cpu",
        name: str = "hardneg-worker",
        max_in_flight: int = 2,
        request_timeout: Optional[float] = None,
        max_batch: Optional[int] = None,
        memory_fraction: Optional[float] = None,
        warmup: bool = True,
    ) -> None:
        if not callable(generator_factory):
            raise TypeError(f"generator_factory must be a zero-argument callable, got {generator_factory!r}")
        if backend not in ("thread", "process"):
            raise ValueError(f"backend must be 'thread' or 'process', got {backend!r}")
        for label, value, low in (
            ("queue_size", queue_size, 1), ("max_restarts", max_restarts, 0),
            ("num_threads", num_threads, 1), ("max_in_flight", max_in_flight, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label} must be an integer >= {low}, got {value!r}")
        if request_timeout is not None and (isinstance(request_timeout, bool) or not isinstance(
                request_timeout, (int, float)) or not request_timeout > 0):
            raise ValueError(f"request_timeout must be a number of seconds > 0 or None, got {request_timeout!r}")
        self.request_timeout = None if request_timeout is None else float(request_timeout)
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be an integer >= 1 or None, got {max_batch!r}")
        if memory_fraction is not None:
            if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float)) or not (
                    0.0 < memory_fraction <= 1.0):
                raise ValueError(f"memory_fraction must be a number in (0, 1] or None, got {memory_fraction!r}")
            if backend != "process":
                raise ValueError("memory_fraction needs backend='process' (the thread backend shares the training "
                                 "process's GPU memory: bound it with max_batch)")
        self.memory = {"max_batch": max_batch, "memory_fraction": memory_fraction, "warmup": bool(warmup)}
        self._factory = generator_factory
        self.backend: Backend = backend
        self.queue_size = queue_size
        self.max_restarts = max_restarts
        self.num_threads = num_threads
        self.device = torch.device(device)
        self.name = name
        self._max_in_flight = max_in_flight

        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._pending: collections.deque[tuple[int, GenerationRequest]] = collections.deque()
        self._in_flight: dict[int, GenerationRequest] = {}  # ticket -> request (process: sources dropped)
        self._running: dict[int, float] = {}  # ticket -> time.monotonic() its generation started
        self._abandoned: list[threading.Thread] = []  # hung threads left behind (see module docs)
        self._ready: collections.deque[GenerationResult] = collections.deque()
        self._state = "new"  # new -> running -> (failed) -> closed
        self._next_ticket = 0
        self._launches = 0
        # thread backend
        self._thread: Optional[threading.Thread] = None
        self._thread_stop: Optional[threading.Event] = None
        self._thread_error = ""
        # process backend
        self._proc: Any = None
        self._in_q: Any = None
        self._out_q: Any = None
        # the child's messages, read (unpickled, images copied out of shared memory) by a receiver
        # thread, so poll() on the training thread only pops what is ready (see _receive)
        self._inbox: collections.deque[tuple] = collections.deque()
        self._receiver: Optional[threading.Thread] = None
        self._receiver_stop: Optional[threading.Event] = None
        self._proc_stop: Any = None
        # counters
        self._started_at: Optional[float] = None
        self._submitted = self._dropped = self._completed = self._images = 0
        self._failures = self._crashes = self._restarts = self._lost = self._timeouts = 0
        self._wait_total = self._busy_total = 0.0
        self._last_error: Optional[str] = None
        self._generator_info: Optional[dict[str, Any]] = None  # set once a generator was built

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "GenerationWorker":
        """Start the thread / child process (idempotent while running)."""
        with self._lock:
            if self._state == "running":
                return self
            if self._state != "new":
                raise RuntimeError(f"cannot start a GenerationWorker that is {self._state}")
            self._launch()
            self._state = "running"
            self._started_at = time.monotonic()
            _LIVE_WORKERS.add(self)
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop and join the worker; a child still alive after ``timeout`` s is terminated, then killed.

        Safe to call twice, before :meth:`start`, and from ``KeyboardInterrupt`` handling: an
        interrupt while waiting still terminates the child before it propagates.
        """
        with self._lock:
            if self._state != "closed":
                self._lost += len(self._pending)
                self._pending.clear()
                self._state = "closed"
            thread, proc = self._thread, self._proc
            if self._thread_stop is not None:
                self._thread_stop.set()
            self._wakeup.notify_all()
            if self._proc_stop is not None:
                self._proc_stop.set()
        try:
            if thread is not None:
                wait = timeout
                with self._lock:
                    if self.request_timeout is not None and self._running:
                        # a request past its deadline is hung: do not wait on it longer than that
                        started = min(self._running.values())
                        wait = min(timeout, max(0.0, started + self.request_timeout - time.monotonic()))
                thread.join(wait)
                if thread.is_alive():  # a generate() call that does not return; the thread is a daemon
                    logger.warning(
                        "hardneg worker %s: thread still busy %.1fs after close(); left behind as a daemon "
                        "(its result will be discarded)", self.name, wait
                    )
                else:
                    self._thread = None
            if proc is not None:
                self._stop_process(proc, timeout)
        finally:
            _LIVE_WORKERS.discard(self)

    def wait_until_ready(self, timeout: float = 600.0) -> dict[str, Any]:
        """Block until the worker has built its generator; return :attr:`generator_info`.

        Raises :class:`WorkerStartError` with the factory's error when the first build fails (a
        bad path or missing weights do not heal, so no restart is tried), when the worker dies
        before it is ready, or after ``timeout`` seconds; the worker is closed first. Failures
        after a successful start stay isolated and counted as before.
        """
        deadline = time.monotonic() + timeout
        reason: Optional[str] = None
        while reason is None:
            with self._lock:
                if self._state == "new":
                    self.start()
                if self.backend == "process" and self._state == "running":
                    self._drain()
                if self._generator_info is not None:
                    return dict(self._generator_info)
                if self._state != "running":
                    reason = f"the worker is {self._state}"
                elif self.backend == "thread":
                    if self._thread is None or not self._thread.is_alive():
                        reason = self._thread_error or "the worker thread exited"
                elif self._last_error and self._last_error.startswith("generator factory failed"):
                    reason = self._last_error
                elif self._proc is None or not self._proc.is_alive():
                    self._stop_receiver()  # then read the rest of the pipe here: the child's last word
                    self._drain()
                    if self._generator_info is not None:
                        return dict(self._generator_info)
                    reason = self._last_error or (
                        f"the worker process exited with code {getattr(self._proc, 'exitcode', None)}")
            if reason is None and time.monotonic() > deadline:
                reason = (f"the generator was not ready after {timeout:g} s (raise "
                          "HardNegConfig.worker_start_timeout for a large model on a slow disk)")
            if reason is None:
                time.sleep(0.02)
        self.close(timeout=5.0)
        raise WorkerStartError(f"the generation worker could not start: {reason}")

    @property
    def generator_info(self) -> Optional[dict[str, Any]]:
        """What the built generator reported (classes, channels, fitted size, device); None before."""
        return None if self._generator_info is None else dict(self._generator_info)

    def __enter__(self) -> "GenerationWorker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ training-side API
    @property
    def alive(self) -> bool:
        """True while started, not failed or closed, and the thread / child process runs."""
        with self._lock:
            if self._state != "running":
                return False
            if self.backend == "thread":
                return self._thread is not None and self._thread.is_alive()
            return self._proc is not None and self._proc.is_alive()

    @property
    def failed(self) -> bool:
        """True once the worker died more than ``max_restarts`` times."""
        return self._state == "failed"

    def submit(self, request: GenerationRequest) -> bool:
        """Queue ``request`` without waiting; starts the worker on first use.

        When ``queue_size`` requests are already pending the oldest pending one is dropped (and
        counted). Returns False when the request was not accepted: the worker failed or is closed.
        """
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"submit() takes a GenerationRequest, got {type(request).__name__}")
        if request.sources is None:
            raise ValueError("a submitted GenerationRequest needs its source images")
        if self._state == "new":
            self.start()
        # A private, compact CPU copy: the caller may reuse its tensors, and sharing a view with
        # the child would ship the whole underlying storage.
        req = dataclasses.replace(
            request, sources=request.sources.detach().to("cpu", copy=True).contiguous(),
            submitted_at=time.monotonic(),
        )
        with self._lock:
            self._service()
            if self._state != "running":
                return False
            if len(self._pending) >= self.queue_size:
                _, old = self._pending.popleft()
                self._dropped += 1
                logger.debug("hardneg worker %s: queue full, dropped request %d", self.name, old.request_id)
            self._pending.append((self._next_ticket, req))
            self._next_ticket += 1
            self._submitted += 1
            self._wakeup.notify()
            if self.backend == "process":
                self._pump()
            return True

    def poll(self, max_items: Optional[int] = None) -> list[GenerationResult]:
        """Finished results, oldest first, without waiting (at most ``max_items``).

        Also notices a dead worker and restarts it. After the worker failed, results that were
        already finished are still handed out, then ``[]``.
        """
        with self._lock:
            if self._state == "new":
                return []
            self._service()
            out: list[GenerationResult] = []
            while self._ready and (max_items is None or len(out) < max_items):
                out.append(self._ready.popleft())
            return out

    def drain(self, timeout: float = 600.0) -> list[GenerationResult]:
        """Block until every submitted request has settled (finished, failed, dropped or lost), or
        the worker failed, or ``timeout`` seconds passed; return every finished result, oldest first."""
        deadline = time.monotonic() + timeout
        out = self.poll()
        while time.monotonic() < deadline and self._state == "running":  # closed or failed: nothing to wait for
            s = self.stats()
            settled = s["requests_completed"] + s["failures"] + s["requests_dropped"] + s["requests_lost"]
            if settled >= s["requests_submitted"] and s["results_ready"] == 0:
                break
            time.sleep(0.01)
            out.extend(self.poll())
        return out + self.poll()

    def stats(self) -> dict[str, Any]:
        """Counters for logs: requests, drops, images, throughput, waits, failures, restarts, state."""
        with self._lock:
            if self._state == "running":
                self._service()
            elapsed = time.monotonic() - self._started_at if self._started_at is not None else 0.0
            done = self._completed
            return {
                "backend": self.backend,
                "state": self._state,
                "alive": self.alive,
                "failed": self._state == "failed",
                "requests_submitted": self._submitted,
                "requests_queued": len(self._pending),
                "requests_in_flight": len(self._in_flight),
                "requests_dropped": self._dropped,
                "requests_completed": done,
                "requests_lost": self._lost,
                "results_ready": len(self._ready),
                "images_produced": self._images,
                "images_per_s": self._images / elapsed if elapsed > 0 else 0.0,
                "generation_images_per_s": self._images / self._busy_total if self._busy_total > 0 else 0.0,
                "mean_queue_wait_s": self._wait_total / done if done else 0.0,
                "mean_generation_s": self._busy_total / done if done else 0.0,
                "failures": self._failures,
                "timeouts": self._timeouts,
                "running_for_s": (time.monotonic() - min(self._running.values())) if self._running else None,
                "abandoned_threads": sum(t.is_alive() for t in self._abandoned),
                "crashes": self._crashes,
                "restarts": self._restarts,
                "last_error": self._last_error,
            }

    # ------------------------------------------------------------------ internals (hold the lock)
    def _launch(self) -> None:
        self._launches += 1
        if self.backend == "thread":
            stop = threading.Event()
            self._thread_error = ""
            self._thread_stop = stop
            self._thread = threading.Thread(
                target=self._thread_main, args=(stop,), name=f"{self.name}-{self._launches}", daemon=True
            )
            self._thread.start()
            return
        check_spawn_safe()  # a module-level start in an unguarded script would kill the child at birth
        ctx = torch_mp.get_context("spawn")
        self._in_q, self._out_q, self._proc_stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        proc = ctx.Process(
            target=_child_main,
            args=(
                self._factory, self._in_q, self._out_q, self._proc_stop, self.num_threads, str(self.device),
                threading.current_thread() is threading.main_thread(), self.memory,
            ),
            name=f"{self.name}-{self._launches}",
            daemon=True,
        )
        try:
            # spawn pickles the factory here (tensors inside it travel as shared memory, no copy)
            proc.start()
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            for q in (self._in_q, self._out_q):
                q.close()
            self._in_q = self._out_q = self._proc_stop = None
            raise TypeError(
                "backend='process' needs a picklable generator_factory (a module-level function, class "
                f"or functools.partial of one; no lambdas or closures): {exc}"
            ) from exc
        self._proc = proc
        stop = threading.Event()
        self._receiver_stop = stop
        self._receiver = threading.Thread(target=_receive, args=(self._out_q, self._inbox, stop, self.name),
                                          name=f"{self.name}-receiver-{self._launches}", daemon=True)
        self._receiver.start()
        self._pump()

    def _service(self) -> None:
        """Collect what the child sent, notice a dead worker, feed the child."""
        if self._state != "running":
            return
        if self.backend == "process":
            self._drain()
        self._check_deadline()
        self._check_health()
        if self.backend == "process" and self._state == "running":
            self._pump()

    def _pump(self) -> None:
        """Hand pending requests to the child, keeping at most ``max_in_flight`` outstanding."""
        while self._pending and len(self._in_flight) < self._max_in_flight:
            ticket, req = self._pending.popleft()
            self._in_q.put(_to_wire(ticket, req))  # never blocks: a feeder thread writes the pipe
            self._in_flight[ticket] = req.without_sources()

    def _drain(self) -> None:
        """Move every message the child sent into results / counters (non-blocking): what the
        receiver thread has read, then (once it is stopped) whatever is still in the pipe."""
        inbox = self._inbox
        while inbox:
            self._handle(inbox.popleft())
        q = self._out_q
        while q is not None and self._receiver is None:
            try:
                msg = q.get_nowait()
            except queue.Empty:
                return
            except Exception as exc:  # noqa: BLE001 - e.g. a result whose sender died before we read it
                logger.warning(
                    "hardneg worker %s: could not read a result from the child: %r", self.name, exc
                )
                return
            self._handle(_received(msg))

    def _stop_receiver(self) -> None:
        """Stop and join the receiver thread (it never takes the lock), so :meth:`_drain` reads the
        rest of the pipe itself."""
        thread, stop = self._receiver, self._receiver_stop
        self._receiver = self._receiver_stop = None
        if thread is not None and stop is not None:
            stop.set()
            thread.join(5.0)

    def _handle(self, msg: tuple) -> None:
        """Book one message of the child (as :func:`_received` left it)."""
        kind, ticket = msg[0], msg[1]
        if kind == "fatal":
            self._last_error = msg[2]
            return
        if kind == "ready":
            self._generator_info = dict(msg[2])
            return
        if kind == "start":  # timed when it was read: a late read only makes the deadline later
            if ticket in self._in_flight:
                self._running[ticket] = msg[2]
            return
        self._running.pop(ticket, None)
        req = self._in_flight.pop(ticket, None)
        if req is None:
            return
        # The child serves requests in order: older tickets still outstanding will never come
        # back (their message could not be read), so they stop occupying in-flight slots.
        for old in [t for t in self._in_flight if t < ticket]:
            lost = self._in_flight.pop(old)
            self._lost += 1
            logger.warning("hardneg worker %s: request %d was lost", self.name, lost.request_id)
        if kind == "ok":
            self._record(req, _Outcome(True, msg[2], "", msg[3], msg[4]))
        else:
            self._record(req, _Outcome(False, None, msg[2], msg[3], msg[4]))

    def _record(self, req: GenerationRequest, outcome: _Outcome) -> None:
        """Book one finished request: a result for :meth:`poll`, or a logged failure."""
        if outcome.ok:
            assert outcome.images is not None
            result = GenerationResult(
                req.without_sources(), outcome.images, outcome.seconds, outcome.queue_wait
            )
            self._ready.append(result)
            self._completed += 1
            self._images += len(result)
            self._wait_total += outcome.queue_wait
            self._busy_total += outcome.seconds
        else:
            self._failures += 1
            self._last_error = outcome.error
            logger.warning(
                "hardneg worker %s: request %d failed (pair %s, step %d, %d images, r=%s, seed %s): %s",
                self.name, req.request_id, req.pair, req.step, len(req),
                [round(float(r), 3) for r in req.ratios.unique()], req.seed, outcome.error,
            )

    def _check_health(self) -> None:
        """Detect a dead thread / child; restart it or give up after ``max_restarts``."""
        if self._state != "running":
            return
        if self.backend == "thread":
            if self._thread is None or self._thread.is_alive():
                return
            reason = self._thread_error or "worker thread exited"
        else:
            if self._proc is None or self._proc.is_alive():
                return
            self._stop_receiver()
            self._drain()  # results the child finished before it died
            reason = f"worker process exited with code {self._proc.exitcode}"
            if self._last_error and self._last_error.startswith("generator factory failed"):
                reason += f" ({self._last_error})"
            self._stop_process(self._proc, 0.0)
        self._crashes += 1
        self._replace(reason)

    def _check_deadline(self) -> None:
        """Fail a request running past ``request_timeout`` and replace the hung thread / child."""
        if self._state != "running" or self.request_timeout is None or not self._running:
            return
        now = time.monotonic()
        ticket, started = min(self._running.items(), key=lambda kv: kv[1])
        if now - started <= self.request_timeout:
            return
        self._running.pop(ticket)
        req = self._in_flight.pop(ticket, None)
        reason = (f"request {req.request_id if req is not None else '?'} exceeded the {self.request_timeout:g} s "
                  "request_timeout (generator hung?)")
        self._timeouts += 1
        if req is not None:
            self._record(req, _Outcome(False, None, f"RequestTimeout: {reason}", now - started, 0.0))
        if self.backend == "thread":
            if self._thread is not None:
                if self._thread_stop is not None:
                    self._thread_stop.set()  # if generate() ever returns, the thread discards it and exits
                self._abandoned.append(self._thread)
                self._thread = None
            reason += "; its thread was abandoned"
        elif self._proc is not None:
            self._stop_receiver()
            self._drain()  # results the child finished before the one that hung
            self._stop_process(self._proc, 0.0)  # terminate, then kill
            reason += "; its process was killed"
        self._replace(reason)

    def _replace(self, reason: str) -> None:
        """The thread / child is gone (dead, killed or abandoned): restart it or give up."""
        lost = sorted(req.request_id for req in self._in_flight.values())
        self._lost += len(lost)
        self._in_flight.clear()
        self._running.clear()
        self._last_error = reason
        if self._restarts < self.max_restarts:
            self._restarts += 1
            logger.error(
                "hardneg worker %s: %s; lost request(s) %s; restart %d of %d",
                self.name, reason, lost, self._restarts, self.max_restarts,
            )
            try:
                self._launch()
                return
            except Exception as exc:  # noqa: BLE001 - e.g. the OS refuses a new process
                self._last_error = reason = f"{reason}; restart failed: {type(exc).__name__}: {exc}"
        if self._state == "running":
            self._state = "failed"
            self._lost += len(self._pending)
            self._pending.clear()
            logger.error(
                "hardneg worker %s: %s; lost request(s) %s; gave up after %d restart(s), generation is off",
                self.name, reason, lost, self._restarts,
            )

    def _stop_process(self, proc: Any, timeout: float) -> None:
        """Join the child, escalating to terminate and kill; then release its queues."""
        self._stop_receiver()
        try:
            if self._in_q is not None and proc.is_alive():
                try:
                    self._in_q.put(None)  # wakes a child blocked on get()
                except Exception:  # noqa: BLE001 - queue already closed
                    pass
            proc.join(timeout)
        finally:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
            for q in (self._in_q, self._out_q):
                if q is not None:
                    # At most max_in_flight + 1 small messages were ever written to this queue, so
                    # the feeder thread never waits on a full pipe and joining it is immediate.
                    q.close()
                    q.join_thread()
            self._in_q = self._out_q = self._proc_stop = None
            try:
                proc.close()
            except ValueError:
                pass
            if self._proc is proc:
                self._proc = None

    # ------------------------------------------------------------------ thread backend
    def _thread_main(self, stop: threading.Event) -> None:
        """Body of the worker thread: build the generator, then serve requests until stopped."""
        current: Optional[GenerationRequest] = None
        built = False
        try:
            cuda = self.device.type == "cuda"
            with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
                gen = _build_generator(self._factory, self.device, self.memory["warmup"])
                built = True
                self._generator_info = generator_info(gen)
                stream = torch.cuda.Stream(device=self.device) if cuda else None
                while True:
                    with self._lock:
                        while not self._pending and not stop.is_set():
                            self._wakeup.wait(0.5)
                        if stop.is_set():
                            return
                        ticket, current = self._pending.popleft()
                        self._in_flight[ticket] = current
                        self._running[ticket] = time.monotonic()
                    outcome = _execute(gen, current, self.device, stream, self.memory["max_batch"])
                    with self._lock:
                        if self._in_flight.pop(ticket, None) is not None and not stop.is_set():
                            self._running.pop(ticket, None)
                            self._record(current, outcome)
                    current = None
        except BaseException as exc:  # noqa: BLE001 - the thread ends; poll() restarts or fails it
            if not built:
                what = "generator factory failed"
            elif current is not None:
                what = f"worker thread died on request {current.request_id}"
            else:
                what = "worker thread died"
            self._thread_error = f"{what}: {type(exc).__name__}: {exc}"
            logger.error("hardneg worker %s: %s", self.name, self._thread_error)

