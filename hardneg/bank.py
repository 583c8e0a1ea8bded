"""EmbeddingBank: one embedding per training sample, keyed by the dataset's sample id.

Why it is built this way:

* **O(batch) upserts.** Vectors live in a dense slot array owned by the bank; a sample id maps to
  a slot, and re-observing a sample overwrites its slot in place. FAISS's ``remove_ids`` compacts
  storage (O(N) per call), which would put O(bank) work on every training step.
* **Exact search by default** with FAISS's brute-force kernel (``faiss.knn``) over that slot
  array, or ``faiss.knn_gpu`` when a FAISS GPU build (``pip install 'hardneg[gpu]'``) sees a GPU
  and ``use_gpu`` is on: one ``StandardGpuResources`` per bank, its scratch memory capped at
  :data:`GPU_TEMP_MEMORY` so the bank leaves the training job's GPU memory alone, and GPU searches
  serialised (a ``StandardGpuResources`` must not be used from two threads at once). The GPU
  searches a GPU-resident copy of the slot array (on the constructing thread's CUDA device) that
  ``upsert`` writes row by row, so no search re-uploads the bank, and a refresh sends all its
  queries in one call. On a GPU ``index="auto"`` stays exact at every size; explicit IVF and HNSW
  indexes stay on the CPU (IVF's in-place ``update_vectors`` is CPU-only); a search with
  ``k >`` :data:`GPU_MAX_K` (GPU FAISS's limit) runs on the CPU.
* **Compressed storage** for 10M+ samples: ``storage="float16"`` halves the slot array;
  ``index="ivfpq"`` searches an ``IndexIVFPQ`` (``pq_bytes`` a vector + 16 bytes of id and direct
  map) and re-scores ``rerank * k`` candidates exactly against the stored vectors (the refresh's
  few queries score every vector of the lists they probe exactly, ``refresh_search="lists"``: their
  neighbours are then an IVF-flat search's, which PQ's coarse codes cannot change); ``storage_path`` keeps
  those in a memory-mapped file, so RAM holds the index and the metadata.
* **Compact metadata**: the id -> slot map is a numpy table indexed by id (sample ids are dataset
  indices; a dict only for sparse, hash-like ids), ids and steps int32 and labels int16 while they
  fit: 14 bytes a sample (a Python dict alone took ~100).
* **Sharding** over processes: :mod:`hardneg.sharded_bank` (the same interface; the refresh talks
  to a bank through ``query_share``, ``search_many``, ``reduce_sum`` and ``merge_top_n``).
* **IVF past a size threshold** (``index="auto"``): an ``IndexIVFFlat`` with ~4*sqrt(N) lists,
  trained once when the bank first crosses ``ivf_threshold``; FAISS ids are the slots and an
  array direct map lets ``update_vectors`` replace vectors. Those updates (a coarse assignment
  per vector, ~5 ms per 128 at 100k) are queued by ``upsert`` and applied in chunks before the
  next search, so they run on the (background) refresh rather than inside the training step.
* **HNSW** for comparison only: it cannot replace vectors, so a replaced vector marks the graph
  stale and searches fall back to exact until :meth:`EmbeddingBank.rebuild`.
* **Concurrent reads, one writer**: a readers-writer lock; a search never sees half an upsert.

Serves ``observe`` (``upsert``, O(batch)) and the refresh (kNN search and source scans on the
refresh thread); read by policies through :class:`hardneg.targeting.BankView`; options: :class:`BankOptions`.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional

import faiss
import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Metric = Literal["cosine", "l2"]
DEFAULT_IVF_THRESHOLD = 50_000  # "auto" switches from exact flat search to IVF past this many vectors
GPU_TEMP_MEMORY = 256 * 1024 * 1024  # bytes of FAISS GPU scratch memory (FAISS's default is up to 1.5 GiB)
DEFAULT_REFRESH_RERANK = 128  # an IVF-PQ refresh re-ranks 128 x k candidates (its neighbours: exact's)
_OPQ_MAX_TRAIN = 16_384  # vectors an OPQ rotation is trained on
_OPQ_ITERATIONS = 10
# lists an IVF-PQ refresh's list scan probes when refresh_nprobe is None (at least nprobe): on the bench's
# 1M clustered embeddings 64 gave exact's top-5 pairs, scores included, in 5 of 5 query draws (16: 3 of 5)
LIST_SCAN_NPROBE = 64
_PQ_MIN_TRAIN = 256  # vectors an IVF-PQ index needs before it is trained (FAISS: one per PQ centroid)
RERANK_EXTRA_MAX = 2048  # re-ranked candidates past k, per query (a long-tail search asks for a large k)
GPU_MAX_K = 2048  # GPU FAISS's largest k (and nprobe); a larger k searches on the CPU
IndexKind = Literal["auto", "flat", "ivf", "ivfpq", "hnsw"]
Storage = Literal["float32", "float16"]
RefreshSearch = Literal["rerank", "lists"]
_EXACT_BLOCK = 65_536  # rows of a float16 slot array widened to float32 per exact-search block
# IVF-PQ inverted lists are std::vectors that grow by doubling: after a flush the bank copies them
# into lists sized to what they hold plus this headroom (benchmarks/README.md, compressed storage),
# and again whenever entries past the headroom exceed this share of all entries
LIST_HEADROOM = 0.10
_LIST_OVERFLOW_MAX = 0.10
_LIST_COMPACT_MIN = 4096  # entries below which the slack is not worth a copy


class BankError(ValueError):
    """Bad input to the embedding bank (shape, dtype, non-finite values, labels, lengths)."""


class ReadWriteLock:
    """Many concurrent readers or one writer; writers are not starved by a stream of readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


_DICT_BYTES_PER_ITEM = 100  # rough CPython cost of one int -> int entry of a dict (the sparse-id fallback)
_DENSE_SLACK = 16  # a dense id -> slot table may have this many entries per id stored, or up to _DENSE_MIN
_DENSE_MIN = 1 << 27  # 128M entries (512 MB of int32): any dataset index of a 100M-sample set


def _widen(arr: np.ndarray, value: int) -> np.ndarray:
    """``arr`` as int64 when ``value`` does not fit its (int16 / int32) dtype, else ``arr`` itself."""
    if arr.dtype != np.int64 and not np.iinfo(arr.dtype).min <= value <= np.iinfo(arr.dtype).max:
        return arr.astype(np.int64)
    return arr


class SlotMap:
    """Sample id -> slot map held in numpy, not a Python dict (~100 B an entry in CPython).

    Sample ids are dataset indices in practice (dense, ``0 .. N-1``), so the map is a dense table
    indexed by id (``int32`` slots while they fit, 4 B an id; ``-1`` = absent) that grows by
    doubling. Ids too sparse for a table (the largest id past both ``16 x count`` and 128M, e.g. hashes)
    switch it, once, to a dict: correct at any id, at the dict's cost.
    """

    def __init__(self, dense_min: int = _DENSE_MIN) -> None:
        self.dense_min = int(dense_min)
        self._table: Optional[np.ndarray] = np.zeros(0, dtype=np.int32)
        self._dict: Optional[dict[int, int]] = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, sample_id: int) -> bool:
        return bool(self.get(np.asarray([int(sample_id)], dtype=np.int64))[0] >= 0)

    @property
    def dense(self) -> bool:
        """Whether the map is the numpy table (False: the dict fallback for sparse ids)."""
        return self._dict is None

    @property
    def nbytes(self) -> int:
        """Bytes held (the dict fallback: an estimate)."""
        if self._dict is not None:
            return _DICT_BYTES_PER_ITEM * len(self._dict)
        return int(self._table.nbytes)

    def get(self, ids: np.ndarray) -> np.ndarray:
        """int64 slots of ``ids`` (``-1`` for unknown ids)."""
        if self._dict is not None:
            get = self._dict.get
            return np.fromiter((get(i, -1) for i in ids.tolist()), dtype=np.int64, count=len(ids))
        table = self._table
        inside = (ids >= 0) & (ids < len(table))  # a negative id is unknown, not table[-1]
        out = np.full(len(ids), -1, dtype=np.int64)
        out[inside] = table[ids[inside]]
        return out

    def add(self, ids: np.ndarray, slots: np.ndarray, capacity: int = 0) -> None:
        """Map new (absent, unique) ``ids`` to ``slots``; ``capacity``: the bank's slot count (a
        table sized to it avoids regrowing while dense ids fill the bank)."""
        if len(ids) == 0:
            return
        self._count += len(ids)
        top = int(ids.max())
        if self._dict is None and top >= len(self._table):
            if top + 1 > max(_DENSE_SLACK * self._count, self.dense_min):  # sparse ids: fall back to a dict
                self._dict = {int(i): int(s) for i, s in enumerate(self._table.tolist()) if s >= 0}
                self._table = None
            else:
                self.reserve(max(top + 1, 2 * len(self._table), capacity))
        if self._dict is not None:
            self._dict.update(zip(ids.tolist(), slots.tolist()))
            return
        self._table = _widen(self._table, int(slots.max()))
        self._table[ids] = slots

    def assign(self, ids: np.ndarray, size: int, grow: Callable[[int], int]) -> tuple[np.ndarray, np.ndarray]:
        """Slots for the (unique) ``ids`` of an upsert into a store of ``size`` slots in use: known
        ids keep theirs, new ones take ``size, size + 1, ...``. ``grow(size + new)`` makes the store
        that long first and returns its capacity. Returns ``(slots, new mask)``."""
        slots = self.get(ids)
        new = slots < 0
        n_new = int(new.sum())
        slots[new] = size + np.arange(n_new)
        capacity = grow(size + n_new)
        self.add(ids[new], slots[new], capacity=capacity)
        return slots, new

    def reserve(self, n: int) -> None:
        """Make a dense table ``n`` entries long now (ids ``0 .. n-1``: no regrowth while they arrive)."""
        if self._dict is None and n > len(self._table):
            grown = np.full(int(n), -1, dtype=self._table.dtype)
            grown[: len(self._table)] = self._table
            self._table = grown

    def reset(self, ids: np.ndarray) -> None:
        """Map ``ids[s] -> s`` for every slot ``s`` (after a compaction or a load), nothing else."""
        self._table, self._dict, self._count = np.zeros(0, dtype=np.int32), None, 0
        self.add(np.asarray(ids, dtype=np.int64), np.arange(len(ids), dtype=np.int64))

    def clear(self) -> None:
        self.reset(np.zeros(0, dtype=np.int64))


def _copy_blocks(dst: np.ndarray, src: np.ndarray, n: int) -> None:
    """``dst[:n] = src[:n]`` in blocks of ``_EXACT_BLOCK`` rows (into or out of a memory-mapped file:
    no temporary of the whole array, e.g. a float32 -> float16 cast)."""
    for start in range(0, n, _EXACT_BLOCK):
        end = min(n, start + _EXACT_BLOCK)
        dst[start:end] = src[start:end]


def _last_occurrence(ids: np.ndarray, vec: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last occurrence of a repeated id within one batch wins."""
    if len(np.unique(ids)) != len(ids):
        _, last = np.unique(ids[::-1], return_index=True)
        keep = np.sort(len(ids) - 1 - last)
        ids, vec, lab = ids[keep], vec[keep], lab[keep]
    return ids, vec, lab


def _index_bytes(index: Any) -> int:
    """Bytes of a FAISS index's own storage (IVF: codes + ids of every list; else serialised size)."""
    try:
        ivf = faiss.extract_index_ivf(index)
        invlists = ivf.invlists
        n = sum(invlists.list_size(i) for i in range(invlists.nlist))
        quantizer = ivf.nlist * ivf.d * 4
        direct_map = 8 * n if ivf.direct_map.type != faiss.DirectMap.NoMap else 0  # slot -> list entry
        return int(n * (invlists.code_size + 8) + direct_map + quantizer + _pq_table_bytes(ivf))
    except (RuntimeError, AttributeError, TypeError):
        return int(faiss.serialize_index(index).nbytes)


def _pq_table_bytes(ivf: Any) -> int:
    pq = getattr(faiss.downcast_index(ivf), "pq", None)
    return int(pq.M * pq.ksub * pq.dsub * 4) if pq is not None else 0


def _list_sizes(invlists: Any) -> np.ndarray:
    return np.fromiter((invlists.list_size(i) for i in range(invlists.nlist)), dtype=np.int64,
                       count=invlists.nlist)


def compact_inverted_lists(ivf: Any, headroom: float = LIST_HEADROOM) -> np.ndarray:
    """Copy an IVF index's inverted lists into new ones, each allocated once for what it holds plus
    ``headroom`` (``ceil(size * (1 + headroom))`` entries), then hand the old ones' memory back to
    the OS (glibc ``malloc_trim``, where there is one). Search results are unchanged. Returns the
    entries each new list can take before it grows again.

    Why: FAISS's ``ArrayInvertedLists`` are ``std::vector``s that double when an add overflows
    them, so a bank filled in chunks holds up to twice its codes and ids. Peak memory during the
    copy is the old lists plus the new ones."""
    old = ivf.invlists
    nlist, code_size = old.nlist, old.code_size
    new = faiss.ArrayInvertedLists(nlist, code_size)
    capacity = np.zeros(nlist, dtype=np.int64)
    for lst in range(nlist):
        m = old.list_size(lst)
        cap = int(math.ceil(m * (1.0 + headroom)))
        capacity[lst] = cap
        if m == 0:
            continue
        if cap > m:  # one allocation of cap entries: a vector grown from empty in one step is exact
            new.resize(lst, cap)
            new.resize(lst, 0)  # (shrinking keeps the allocation)
        ids = faiss.rev_swig_ptr(old.get_ids(lst), m).copy()
        codes = faiss.rev_swig_ptr(old.get_codes(lst), m * code_size).copy()
        new.add_entries(lst, m, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    ivf.replace_invlists(new, True)  # frees the old lists (the index owned them)
    new.this.disown()  # the index owns the new ones now
    _trim_malloc()
    return capacity


def _trim_malloc() -> None:
    """Return freed heap pages to the OS (glibc); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _current_cuda_device() -> torch.device:
    """``cuda:{current_device()}`` read on the constructing (main) thread: a bare ``"cuda"`` means
    device 0 on other threads (the refresh thread), the wrong GPU on ranks > 0."""
    try:
        return torch.device("cuda", torch.cuda.current_device())
    except (RuntimeError, AssertionError, AttributeError):  # no CUDA torch (tests stand in for the GPU)
        return torch.device("cpu")


def _enable_torch_knn_gpu() -> None:
    """Let ``faiss.knn_gpu`` take device tensors (``faiss.contrib.torch_utils``) on a real GPU build."""
    fn = getattr(faiss, "knn_gpu", None)
    if fn is not None and str(getattr(fn, "__module__", "")).startswith("faiss"):
        importlib.import_module("faiss.contrib.torch_utils")


@contextmanager
def _null_context() -> Iterator[None]:
    yield


_SEQUENTIAL_WORK = 1 << 25  # multiply-adds below which FAISS's sequential kNN loop is as quick (a few ms)


def _blas_threshold() -> int:
    return int(getattr(getattr(faiss, "cvar", None), "distance_compute_blas_threshold", 0) or 0)


def blas_query_chunk(dim: int) -> int:
    """The fewest queries one exact CPU search (``faiss.knn``, ``IndexFlat``) must hold for FAISS
    to compute it with BLAS at dimension ``dim``.

    FAISS takes BLAS only when ``n_queries * dim >= distance_compute_blas_threshold`` (128,000 in
    faiss-cpu 1.15, so 250 queries at d = 512); below it a sequential loop runs 8-17x slower on
    this machine's CPUs (benchmarks/README.md, "The refresh's exact search"). Read at call time:
    FAISS versions whose threshold counts queries (20 in older releases) give a chunk of 1."""
    return max(1, math.ceil(_blas_threshold() / max(1, int(dim))))


def exact_knn(q: np.ndarray, xb: np.ndarray, k: int, metric: int) -> tuple[np.ndarray, np.ndarray]:
    """``faiss.knn(q, xb, k, metric)`` (inner product or squared L2) computed by a matrix product at
    any number of queries; ``xb`` float32 or float16, ``k <= len(xb)``.

    Enough queries for FAISS's BLAS path (:func:`blas_query_chunk`) go to ``faiss.knn`` as they
    are; fewer (a training-time search, the few queries of one inverted list) are scored a block
    of ``xb`` at a time by torch's matrix product (its OpenMP team: the calling thread's, which
    the engine's threads bound) and the ``k`` best kept, instead of FAISS's sequential loop; a
    search of a few milliseconds' work stays with FAISS.
    """
    q = _f32(q)
    blas = len(q) * q.shape[1] >= _blas_threshold()
    if xb.dtype == np.float32 and (blas or len(q) * xb.size <= _SEQUENTIAL_WORK):
        return faiss.knn(q, xb, k, metric=metric)
    inner = metric == faiss.METRIC_INNER_PRODUCT
    q_norms = None if inner else np.einsum("qd,qd->q", q, q)[:, None]
    cand_s, cand_i = [], []  # each block's k best (unordered), then one sort over them all
    for start in range(0, len(xb), _EXACT_BLOCK):
        block = _f32(xb[start : start + _EXACT_BLOCK])
        kb = min(k, len(block))
        if blas:
            s, i = faiss.knn(q, block, kb, metric=metric)
        else:
            s = torch.mm(torch.from_numpy(q), torch.from_numpy(block).T).numpy()  # torch's BLAS: the caller's OpenMP cap
            if not inner:  # squared L2 by the expansion, clipped at 0 (as FAISS's BLAS path computes it)
                s = np.maximum(q_norms - 2.0 * s + np.einsum("nd,nd->n", block, block)[None, :], 0.0)
            i = np.argpartition(-s if inner else s, kb - 1, axis=1)[:, :kb] if kb < len(block) else \
                np.broadcast_to(np.arange(len(block)), s.shape)
            s = np.take_along_axis(s, i, 1).astype(np.float32, copy=False)
        cand_s.append(s)
        cand_i.append(i.astype(np.int64, copy=False) + start)
    s, i = np.concatenate(cand_s, 1), np.concatenate(cand_i, 1)
    order = np.argsort(-s if inner else s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _f32(a: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view or copy (what FAISS takes) of a float32 / float16 array."""
    return np.ascontiguousarray(a, dtype=np.float32)


def _to_numpy_f32(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        if not x.is_floating_point():
            raise BankError(f"{name} must be a float tensor, got dtype {x.dtype}")
        return x.detach().to("cpu", torch.float32).contiguous().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise BankError(f"{name} must be floating point, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _to_numpy_i64(x: Tensor | np.ndarray | list, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise BankError(f"{name} must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr.reshape(-1), dtype=np.int64)


class EmbeddingBank:
    """FAISS-backed store of one embedding, label and step per sample id.

    Args:
        dim: embedding dimension.
        num_classes: labels must lie in ``[0, num_classes)``.
        metric: ``"cosine"`` (L2-normalised inner product) or ``"l2"``.
        index: ``"flat"`` (exact), ``"ivf"``, ``"hnsw"`` or ``"auto"`` (flat, then IVF past
            ``ivf_threshold`` vectors).
        ivf_threshold: bank size at which ``"auto"`` switches to IVF (and the minimum number of
            vectors an ``"ivf"`` bank needs before its index is trained; below it search is exact).
        nprobe: IVF lists visited per query (recall vs speed).
        use_gpu: search on the GPU when a FAISS GPU build and a GPU are present.
        storage: dtype of the stored vectors: ``"float32"``, or ``"float16"`` (half the memory;
            reads return float32; class sums are of the stored values, so they never drift).
        pq_bytes: bytes per vector of an ``"ivfpq"`` index (``IndexIVFPQ``, 8-bit codes; must
            divide ``dim``); its lists also hold an 8-byte id per vector, the direct map another 8.
        rerank: an ``"ivfpq"`` search fetches ``rerank * k`` candidates and re-scores them exactly
            against the stored vectors (0: PQ scores as they are).
        storage_path: keep the stored vectors in this file, memory-mapped, instead of in RAM (the
            file is created or overwritten; with ``"ivfpq"`` RAM then holds the index and the
            metadata; re-ranking and the refresh's source scan read the file).
        refresh_rerank: ``rerank`` of the confusion refresh's searches (:meth:`search_many`) only:
            a refresh asks few queries (e.g. 500), so it can afford a deeper re-rank than the
            training-time searches; 128 makes the refresh's neighbours those of an exact search
            (recall@11 0.996 at 1M; benchmarks/README.md). None: ``rerank``. Used by
            ``refresh_search="rerank"`` only.
        refresh_nprobe: ``nprobe`` of the refresh's searches only (None: ``nprobe``; an IVF-PQ
            list scan probes at least :data:`LIST_SCAN_NPROBE`: see :attr:`refresh_probes`).
        refresh_search: how an IVF bank answers the refresh's searches: ``"lists"`` scores every
            vector of the ``refresh_nprobe`` lists each query probes exactly against the stored
            vectors, one list at a time with all the queries that probe it (one matrix product a
            list, under the read lock; each probed list is read once per refresh). On an IVF-flat
            bank these are FAISS's IVF search's neighbours, 3.5x faster at 1M (FAISS scans each
            query's lists one vector at a time); on an ``"ivfpq"`` bank, an IVF-flat search's
            neighbours: a neighbour the PQ codes rank past any re-rank depth is still found.
            ``"rerank"``: FAISS's IVF search, on IVF-PQ with ``refresh_rerank * k`` PQ candidates
            re-scored. Training-time searches always search as FAISS does (``rerank``).
        opq: an ``"ivfpq"`` index first rotates the vectors by a trained OPQ matrix (FAISS
            ``OPQMatrix``: one ``dim x dim`` float32 matrix), which balances the PQ sub-vectors and
            lowers the codes' error when the embeddings' variance is concentrated in a few
            directions; distances are unchanged (the rotation is orthogonal). Off by default: on
            the benchmark's clustered embeddings it left recall unchanged (0.995 vs 0.996 at 1M)
            and held ~30 MB more resident memory (benchmarks/README.md).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        metric: Metric = "cosine",
        index: IndexKind = "auto",
        ivf_threshold: int = DEFAULT_IVF_THRESHOLD,
        nprobe: int = 16,
        use_gpu: bool = True,
        storage: Storage = "float32",
        pq_bytes: int = 32,
        rerank: int = 32,
        storage_path: Optional[str] = None,
        refresh_rerank: Optional[int] = DEFAULT_REFRESH_RERANK,
        refresh_nprobe: Optional[int] = None,
        opq: bool = False,
        refresh_search: RefreshSearch = "lists",
    ) -> None:
        if dim < 1 or num_classes < 1:
            raise BankError(f"dim and num_classes must be >= 1, got {dim}, {num_classes}")
        if metric not in ("cosine", "l2"):
            raise BankError(f"metric must be 'cosine' or 'l2', got {metric!r}")
        if index not in ("auto", "flat", "ivf", "ivfpq", "hnsw"):
            raise BankError(f"index must be 'auto', 'flat', 'ivf', 'ivfpq' or 'hnsw', got {index!r}")
        if storage not in ("float32", "float16"):
            raise BankError(f"storage must be 'float32' or 'float16', got {storage!r}")
        if index == "ivfpq" and (pq_bytes < 1 or dim % pq_bytes):
            raise BankError(f"pq_bytes must divide dim={dim} (a PQ sub-vector per byte), got {pq_bytes}; "
                            f"e.g. {max(b for b in range(1, min(dim, 64) + 1) if dim % b == 0)}")
        if rerank < 0 or (refresh_rerank is not None and refresh_rerank < 0):
            raise BankError(f"rerank and refresh_rerank must be >= 0, got {rerank}, {refresh_rerank}")
        if refresh_nprobe is not None and refresh_nprobe < 1:
            raise BankError(f"refresh_nprobe must be >= 1 (or None: nprobe), got {refresh_nprobe}")
        if refresh_search not in ("rerank", "lists"):
            raise BankError(f"refresh_search must be 'rerank' or 'lists', got {refresh_search!r}")
        self.refresh_search: RefreshSearch = refresh_search
        self.refresh_rerank = None if refresh_rerank is None else int(refresh_rerank)
        self.refresh_nprobe = None if refresh_nprobe is None else int(refresh_nprobe)
        self.storage: Storage = storage
        self._dtype = np.float16 if storage == "float16" else np.float32
        self.pq_bytes = int(pq_bytes)
        self.rerank = int(rerank)
        self.storage_path = None if storage_path is None else str(storage_path)
        self._ivf_pq = False
        self.opq = bool(opq)
        self._opq_matrix: Any = None  # the trained rotation of an "ivfpq" index built with opq
        self.dim = int(dim)
        self.num_classes = int(num_classes)
        self.metric: Metric = metric
        self.index_kind: IndexKind = index
        self.ivf_threshold = int(ivf_threshold)
        self._nprobe = int(nprobe)
        self._faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
        self._lock = ReadWriteLock()
        self._size = 0
        self._vectors = np.zeros((0, self.dim), dtype=self._dtype)
        if self.storage_path is not None:
            with open(self.storage_path, "wb"):
                pass  # created or emptied: this bank's file from now on
            self._resize_slots(1)
        # Per-slot metadata in the narrowest dtypes that hold it (int16 labels below 32768 classes,
        # int32 ids and steps, widened to int64 by the first value past int32): 10 B a slot, and the
        # id -> slot table 4 B an id; reads return int64.
        self._labels = np.zeros(0, dtype=np.int16 if self.num_classes <= np.iinfo(np.int16).max else np.int32)
        self._steps = np.zeros(0, dtype=np.int32)
        self._ids = np.zeros(0, dtype=np.int32)
        self._slot_of = SlotMap()
        # Running per-class sums (float64) and counts, kept by upsert/remove: class_means() is O(K*D).
        self._class_sums = np.zeros((self.num_classes, self.dim), dtype=np.float64)
        self._class_counts = np.zeros(self.num_classes, dtype=np.int64)
        self._ann: Optional[faiss.Index] = None  # IVF or HNSW index over slots, when in use
        self._ann_kind: Optional[str] = None
        self._hnsw_stale = False
        self._ivf_pending: set[int] = set()  # slots whose new vectors the IVF index has not seen yet
        self._ivf_count = 0  # slots [0, _ivf_count) have been added to the IVF index
        self._list_capacity: Optional[np.ndarray] = None  # IVF-PQ: entries each list holds before it regrows
        self._gpu_res = self._make_gpu_resources() if use_gpu else None
        self._gpu_lock = threading.Lock()  # one StandardGpuResources must never serve two threads at once
        # The GPU-resident copy of the slot array (a torch tensor on the main thread's CUDA device),
        # written row by row by upsert: searches never re-upload the bank.
        self._gpu_device: Optional[torch.device] = _current_cuda_device() if self._gpu_res is not None else None
        self._gpu_vectors: Optional[Tensor] = None
        if self._gpu_res is not None:
            self._gpu_vectors = torch.zeros((0, self.dim), dtype=self._torch_dtype, device=self._gpu_device)
        self._warned_large_k = False

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self._size

    @property
    def nprobe(self) -> int:
        """IVF lists searched per query; higher is slower and closer to exact."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if value < 1:
            raise BankError(f"nprobe must be >= 1, got {value}")
        self._nprobe = int(value)
        if self._ann_kind == "ivf":
            self._ann.nprobe = self._nprobe

    @property
    def active_index(self) -> str:
        """Which search structure answers queries now: ``"flat"``, ``"ivf"``, ``"ivfpq"`` or ``"hnsw"``."""
        if self._ann_kind == "ivf" and self._ivf_pq:
            return "ivfpq"
        return self._ann_kind or "flat"

    @property
    def refresh_scans_lists(self) -> bool:
        """Whether the refresh's searches score the probed IVF lists by matrix products
        (``refresh_search="lists"`` and an IVF or IVF-PQ index built; :meth:`_scan_probed_lists`)."""
        return self.refresh_search == "lists" and self._ann_kind == "ivf"

    @property
    def refresh_probes(self) -> int:
        """Lists each refresh query probes: ``refresh_nprobe``, or ``nprobe`` (a list scan: at least
        :data:`LIST_SCAN_NPROBE`), at most the index's lists."""
        probes = self.refresh_nprobe
        if probes is None:
            probes = max(self._nprobe, LIST_SCAN_NPROBE) if self.refresh_search == "lists" and self.index_kind == "ivfpq" else self._nprobe
        return min(probes, self.nlist) if self.nlist is not None else probes

    @property
    def nlist(self) -> Optional[int]:
        """Inverted lists of the IVF / IVF-PQ index; None while no IVF index answers queries."""
        return int(self._ann.nlist) if self._ann_kind == "ivf" else None

    @property
    def capacity(self) -> int:
        """Slots allocated (``len(bank)`` of them used); grows by doubling, or at once by :meth:`reserve`."""
        return len(self._vectors)

    def reserve(self, n: int) -> None:
        """Allocate slots for ``n`` samples now (a bank about to receive ``n`` rows: one allocation,
        no doubling copies of a large slot array, and no slack of one: the metadata and the id -> slot
        table are sized to ``n`` too)."""
        with self._lock.write():
            self._ensure_capacity(int(n))
            self._slot_of.reserve(int(n))

    @property
    def _torch_dtype(self) -> torch.dtype:
        return torch.float16 if self.storage == "float16" else torch.float32

    @property
    def on_gpu(self) -> bool:
        """Whether exact searches run on the GPU (``faiss.knn_gpu`` over the GPU-resident copy).

        With a GPU, ``index="auto"`` stays exact at every size (one brute-force GPU search beats a
        CPU IVF); an explicit ``"ivf"``/``"hnsw"`` index searches on the CPU, the GPU then serves
        only the exact searches (before the index is built, a stale HNSW graph). A search with
        ``k >`` :data:`GPU_MAX_K` runs on the CPU.
        """
        return self._gpu_res is not None

    @property
    def collective(self) -> bool:
        """Whether searches and lookups are collective calls across processes (a sharded bank)."""
        return False

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this process holds for the bank: ``vectors`` (the slot array, the GPU copy not
        counted; 0 when they live in ``storage_path``, then given as ``vectors_on_disk``), ``index``
        (an ANN index's own storage; IVF-PQ lists with their reserved headroom, a list that outgrew it
        at its size), ``metadata`` (ids, labels, steps, the
        id -> slot map, class sums) and ``total`` (RAM: ``vectors_on_disk`` is not in it)."""
        with self._lock.read():
            on_disk = isinstance(self._vectors, np.memmap)
            vectors = 0 if on_disk else int(self._vectors.nbytes)
            meta = int(self._labels.nbytes + self._steps.nbytes + self._ids.nbytes + self._class_sums.nbytes
                       + self._class_counts.nbytes + self._slot_of.nbytes)
            index = _index_bytes(self._ann) if self._ann is not None else 0
            if self._ann_kind == "ivf" and self._list_capacity is not None:  # the lists' reserved headroom
                spare = np.clip(self._list_capacity - _list_sizes(self._ann.invlists), 0, None)
                index += int(spare.sum()) * (self._ann.invlists.code_size + 8)
            if self._ann_kind == "ivf" and self._opq_matrix is not None:
                index += self.dim * self.dim * 4  # the OPQ rotation
        out = {"vectors": vectors, "index": index, "metadata": meta, "total": vectors + index + meta}
        if on_disk:
            out["vectors_on_disk"] = int(self._vectors.nbytes)
        return out

    # ------------------------------------------------------------------ writing
    def upsert(
        self,
        ids: Tensor | np.ndarray | list,
        embeddings: Tensor | np.ndarray,
        labels: Tensor | np.ndarray | list,
        step: int = 0,
    ) -> None:
        """Insert or replace the vectors of ``ids`` (O(batch)); a re-observed id keeps one slot."""
        ids_np, vec, lab = _last_occurrence(*self._validate(ids, embeddings, labels))
        self._upsert_valid(ids_np, vec, lab, step)

    def _upsert_valid(self, ids_np: np.ndarray, vec: np.ndarray, lab: np.ndarray, step: int) -> None:
        """:meth:`upsert` of validated, normalised rows with unique ids (a sharded bank's owned rows)."""
        with self._lock.write():
            slots, new_mask = self._slot_of.assign(ids_np, self._size, self._ensure_capacity)
            n_new = int(new_mask.sum())
            if len(ids_np):
                self._ids = _widen(self._ids, int(ids_np.max()))
            self._steps = _widen(self._steps, int(step))
            old = slots[~new_mask]  # replaced samples leave their old class sums first
            np.subtract.at(self._class_sums, self._labels[old], self._vectors[old].astype(np.float64))
            np.subtract.at(self._class_counts, self._labels[old], 1)
            vec = vec.astype(self._dtype, copy=False)  # the sums are of the stored values (float16: rounded)
            np.add.at(self._class_sums, lab, vec.astype(np.float64))
            np.add.at(self._class_counts, lab, 1)
            self._vectors[slots] = vec
            if self._gpu_vectors is not None:
                self._gpu_write(slots, vec)
            self._labels[slots] = lab
            self._steps[slots] = int(step)
            self._ids[slots] = ids_np
            old_size = self._size
            self._size += n_new
            self._update_ann(slots[~new_mask], vec[~new_mask], old_size, n_new)

    def remove(self, ids: Tensor | np.ndarray | list) -> int:
        """Forget samples (O(N): compacts storage and rebuilds any ANN index). Returns how many."""
        ids_np = _to_numpy_i64(ids, "ids")
        with self._lock.write():
            drop = np.unique(self._slot_of.get(ids_np))
            drop = drop[drop >= 0]
            if not len(drop):
                return 0
            mask = np.ones(self._size, dtype=bool)
            mask[drop] = False
            keep = np.flatnonzero(mask)
            if self.storage_path is None:
                self._vectors = self._vectors[keep].copy()
            else:  # compact the file in place, a chunk at a time (destination rows never pass the sources)
                for a in range(0, len(keep), _EXACT_BLOCK):
                    rows = keep[a : a + _EXACT_BLOCK]
                    self._vectors[a : a + len(rows)] = self._vectors[rows]
            self._labels = self._labels[keep].copy()
            self._steps = self._steps[keep].copy()
            self._ids = self._ids[keep].copy()
            self._size = len(keep)
            self._slot_of.reset(self._ids[: self._size])
            self._recount_classes()
            self._gpu_upload_all()
            self._ann, self._ann_kind = None, None
            self._maybe_build_ann()
            return len(drop)

    def rebuild(self) -> None:
        """Re-train and re-fill the ANN index from the current vectors (e.g. after drift)."""
        with self._lock.write():
            self._recount_classes()  # also clears any float drift of the running class sums
            self._ann, self._ann_kind = None, None
            self._maybe_build_ann(force=self.index_kind in ("ivf", "hnsw"))

    def clear(self) -> None:
        """Drop every vector."""
        with self._lock.write():
            self._size = 0
            self._slot_of.clear()
            self._recount_classes()
            self._ann, self._ann_kind = None, None

    def flush(self, chunk: int = 2048) -> None:
        """Apply queued vector replacements and additions to the IVF index, ``chunk`` at a time.

        The write lock is released between chunks, so training-step upserts never wait for more
        than one chunk. Searches call this first; it is a no-op for flat banks.
        """
        worked = False
        while self._ann_kind == "ivf" and (self._ivf_pending or self._ivf_count < self._size):
            with self._lock.write():
                if self._ann_kind != "ivf":
                    return
                worked = True
                if self._ivf_pending:
                    take = sorted(self._ivf_pending)[:chunk]
                    self._ivf_pending.difference_update(take)
                    slots = np.asarray(take, dtype=np.int64)
                    self._ann.update_vectors(slots, self._ann_space(self._vectors[slots]))
                elif self._ivf_count < self._size:
                    end = min(self._size, self._ivf_count + chunk)
                    self._ann.add(self._ann_space(self._vectors[self._ivf_count : end]))
                    self._ivf_count = end
        if worked:
            with self._lock.write():
                self._compact_lists_if_slack()

    def _compact_lists_if_slack(self, force: bool = False) -> None:
        """(write lock held) IVF-PQ: re-allocate the inverted lists once the entries past their
        reserved size exceed ``_LIST_OVERFLOW_MAX`` of all (every such list has doubled); see
        :func:`compact_inverted_lists`."""
        if self._ann_kind != "ivf" or not self._ivf_pq:
            return
        sizes = _list_sizes(self._ann.invlists)
        total = int(sizes.sum())
        if total < _LIST_COMPACT_MIN and not force:
            return
        cap = self._list_capacity
        over = total if cap is None else int(sizes[sizes > cap].sum())
        if force or over > _LIST_OVERFLOW_MAX * total:
            self._list_capacity = compact_inverted_lists(self._ann)

    @property
    def pending_updates(self) -> int:
        """Vectors stored but not yet applied to the IVF index (0 for flat banks)."""
        if self._ann_kind != "ivf":
            return 0
        return len(self._ivf_pending) + (self._size - self._ivf_count)

    # ------------------------------------------------------------------ reading
    def search(self, queries: Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest stored samples of each query.

        Returns ``(scores, ids)``, both ``(Q, k)``: scores are cosine similarities (cosine) or
        squared L2 distances (l2); ids are sample ids, ``-1`` where fewer than ``k`` exist.
        """
        q = self._validate_queries(queries)
        self.flush()
        with self._lock.read():
            scores, slots = self._search_slots(q, k)
            ids = np.where(slots >= 0, self._ids[np.clip(slots, 0, None)], -1).astype(np.int64)
        return scores, ids

    def search_with_labels(
        self, queries: Tensor | np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`search`, also returning the neighbours' labels (``-1`` for missing)."""
        return self._search_labelled(self._validate_queries(queries), k)

    def _search_labelled(self, q: np.ndarray, k: int, refresh: bool = False
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search_with_labels` of validated, normalised queries (``refresh``: with the
        refresh-only ``refresh_rerank`` / ``refresh_nprobe`` / ``refresh_search``)."""
        self.flush()
        if refresh and self.refresh_scans_lists and k >= 1:
            scanned = self._scan_probed_lists(q, k)
            if scanned is not None:
                return scanned
        with self._lock.read():
            scores, slots = self._search_slots(q, k, refresh)
            valid = slots >= 0
            safe = np.clip(slots, 0, None)
            ids = np.where(valid, self._ids[safe], -1).astype(np.int64)
            labels = np.where(valid, self._labels[safe], -1).astype(np.int64)
        return scores, ids, labels

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Copies of (ids, vectors, labels, steps) taken under the read lock.

        A file-backed bank's vectors are copied into an unlinked file beside ``storage_path``
        and returned memory-mapped: a checkpoint of a 10M-vector bank goes through the page
        cache, not RAM, and the file's space is freed with the array."""
        with self._lock.read():
            n = self._size
            return (self._ids[:n].astype(np.int64), self._copy_vectors(n), self._labels[:n].astype(np.int64),
                    self._steps[:n].astype(np.int64))

    def _copy_vectors(self, n: int) -> np.ndarray:
        """(read lock held) The first ``n`` stored vectors, copied: into RAM, or for a file-backed
        bank into an unlinked temporary file beside its own, a block at a time."""
        if self.storage_path is None or n == 0:
            return self._vectors[:n].copy()
        fd, path = tempfile.mkstemp(prefix=os.path.basename(self.storage_path) + ".snapshot-",
                                    dir=os.path.dirname(os.path.abspath(self.storage_path)))
        try:
            os.close(fd)
            out = np.memmap(path, dtype=self._dtype, mode="w+", shape=(n, self.dim))
        finally:
            os.unlink(path)  # the mapping keeps the data; nothing is left on disk once it is dropped
        _copy_blocks(out, self._vectors, n)
        return out

    def ids_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the stored sample ids and their labels (no vectors: cheap)."""
        with self._lock.read():
            n = self._size
            return self._ids[:n].astype(np.int64), self._labels[:n].astype(np.int64)

    def lookup(self, ids: Tensor | np.ndarray | list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, vectors, labels)`` copies of those of ``ids`` still stored (unknown ids skipped).

        The tolerant form of :meth:`get` for readers that picked ids earlier (a background
        refresh): a sample removed meanwhile is left out instead of raising.
        """
        ids_np = _to_numpy_i64(ids, "ids")
        with self._lock.read():
            slots = self._slot_of.get(ids_np)
            keep = slots >= 0
            slots = slots[keep]
            return ids_np[keep], self._vectors[slots].astype(np.float32), self._labels[slots].astype(np.int64)

    # ------------------------------------------------------------------ refresh hooks
    # The confusion refresh talks to the bank through these, so that a sharded bank
    # (hardneg.sharded_bank) can split the work across processes; here they are the plain forms.
    def query_share(self, ids: Tensor | np.ndarray | list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, vectors, labels)`` of the refresh queries ``ids`` this process answers: all of
        them here (:meth:`lookup`); a sharded bank's rank answers those it stores."""
        return self.lookup(ids)

    def search_many(self, queries: Tensor | np.ndarray, k: int, chunk: int = 64
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`search_with_labels` of many queries, ``chunk`` per search so an upsert waits for
        one chunk at most; on the GPU all queries go in one call (one short GPU search). An exact
        CPU search takes at least :func:`blas_query_chunk` queries a chunk (fewer run FAISS's slow
        sequential loop). The refresh's search: an IVF / IVF-PQ index answers with
        ``refresh_nprobe`` / ``refresh_rerank``."""
        q = self._validate_queries(queries)
        if self.on_gpu and self._ann is None and k <= GPU_MAX_K:
            chunk = max(1, len(q))
        if len(q) == 0:
            return (np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.int64))
        if self.refresh_scans_lists:  # one scan of the probed lists for all queries, locked a list at a time
            chunk = max(1, len(q))
        elif self._ann is None:  # exact on the CPU: chunks large enough for FAISS's BLAS path
            chunk = max(chunk, blas_query_chunk(self.dim))
        parts = [self._search_labelled(q[i : i + chunk], k, refresh=True) for i in range(0, len(q), chunk)]
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]

    def reduce_sum(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Sum per-process partial results over processes (identity for a one-process bank)."""
        return arrays

    def merge_top_n(self, best: dict[Any, tuple[np.ndarray, np.ndarray]], n: int
                    ) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
        """Merge per-process ``{key: (scores, ids)}`` top-``n`` lists (identity for a one-process bank)."""
        return best

    def scan(self, visit: Callable[[np.ndarray, np.ndarray, np.ndarray], None], chunk: int = 65_536) -> None:
        """Call ``visit(ids, vectors, labels)`` on consecutive chunks of the stored samples.

        Each chunk is visited under the read lock (the arrays are views, valid only during the
        call), and the lock is released between chunks, so a full pass over a large bank never
        blocks a training-step upsert for longer than one chunk and never copies the whole bank.
        Samples upserted during a scan may or may not be visited.
        """
        if chunk < 1:
            raise BankError(f"chunk must be >= 1, got {chunk}")
        start = 0
        while True:
            with self._lock.read():
                end = min(self._size, start + chunk)
                if start >= end:
                    return
                visit(self._ids[start:end].astype(np.int64), self._vectors[start:end],
                      self._labels[start:end].astype(np.int64))
            start = end

    def get(self, ids: Tensor | np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, labels) of known ids; unknown ids raise :class:`KeyError`."""
        ids_np = _to_numpy_i64(ids, "ids")
        with self._lock.read():
            slots = self._slot_of.get(ids_np)
            if (slots < 0).any():
                raise KeyError(f"sample ids not in the bank: {ids_np[slots < 0][:10].tolist()}")
            return self._vectors[slots].astype(np.float32), self._labels[slots].astype(np.int64)

    def __contains__(self, sample_id: int) -> bool:
        return int(sample_id) in self._slot_of

    def class_means(self) -> np.ndarray:
        """(num_classes, dim) float32 mean stored vector per class (zeros for an empty class); O(K*D)."""
        with self._lock.read():
            return (self._class_sums / np.maximum(self._class_counts, 1)[:, None]).astype(np.float32)

    def class_counts(self) -> np.ndarray:
        """(num_classes,) number of stored samples per class."""
        with self._lock.read():
            return self._class_counts.copy()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the bank exactly (the ANN index is rebuilt on load)."""
        ids, vecs, labels, steps = self.snapshot()
        return {
            "dim": self.dim,
            "num_classes": self.num_classes,
            "metric": self.metric,
            "index": self.index_kind,
            "ivf_threshold": self.ivf_threshold,
            "nprobe": self._nprobe,
            "storage": self.storage,
            "pq_bytes": self.pq_bytes,
            "rerank": self.rerank,
            "refresh_rerank": self.refresh_rerank,
            "refresh_nprobe": self.refresh_nprobe,
            "refresh_search": self.refresh_search,
            "opq": self.opq,
            "ids": torch.from_numpy(ids),
            "vectors": torch.from_numpy(vecs),
            "labels": torch.from_numpy(labels),
            "steps": torch.from_numpy(steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this bank's contents with ``state`` (from :meth:`state_dict`)."""
        if int(state["dim"]) != self.dim or int(state["num_classes"]) != self.num_classes:
            raise BankError(
                f"bank state has dim={state['dim']}, num_classes={state['num_classes']}; "
                f"this bank has dim={self.dim}, num_classes={self.num_classes}"
            )
        self.metric = state["metric"]
        self._faiss_metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        self.index_kind = state["index"]
        self.ivf_threshold = int(state["ivf_threshold"])
        self._nprobe = int(state["nprobe"])
        self.opq = bool(state.get("opq", self.opq))
        ids = np.asarray(state["ids"], dtype=np.int64)
        with self._lock.write():
            n = len(ids)
            vectors = np.asarray(state["vectors"])  # (a view: a checkpoint loaded memory-mapped stays on disk)
            if self.storage_path is None:
                self._vectors = np.ascontiguousarray(vectors.astype(self._dtype))
            else:  # into the bank's file a block at a time: no whole copy in RAM
                self._resize_slots(max(n, 1))
                _copy_blocks(self._vectors, vectors, n)
            steps = np.asarray(state["steps"], dtype=np.int64)
            self._labels = np.asarray(state["labels"]).astype(self._labels.dtype)
            self._steps = steps.astype(_widen(np.zeros(0, np.int32), int(np.abs(steps).max()) if n else 0).dtype)
            self._ids = ids.astype(_widen(np.zeros(0, np.int32), int(ids.max()) if n else 0).dtype)
            self._size = n
            self._slot_of.reset(ids)
            self._recount_classes()
            self._gpu_upload_all()
            self._ann, self._ann_kind = None, None
            self._maybe_build_ann()

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], use_gpu: bool = True) -> "EmbeddingBank":
        bank = cls(int(state["dim"]), int(state["num_classes"]), state["metric"], state["index"],
                   int(state["ivf_threshold"]), int(state["nprobe"]), use_gpu=use_gpu,
                   storage=state.get("storage", "float32"), pq_bytes=int(state.get("pq_bytes", 32)),
                   rerank=int(state.get("rerank", 32)),
                   refresh_rerank=state.get("refresh_rerank", DEFAULT_REFRESH_RERANK),
                   refresh_nprobe=state.get("refresh_nprobe"), opq=bool(state.get("opq", False)),
                   refresh_search=state.get("refresh_search", "lists"))
        bank.load_state_dict(state)
        return bank

    # ------------------------------------------------------------------ internals
    def _validate(self, ids: Any, embeddings: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        vec = _to_numpy_f32(embeddings, "embeddings")
        if vec.ndim != 2 or vec.shape[1] != self.dim:
            raise BankError(f"embeddings must have shape (N, {self.dim}), got {tuple(vec.shape)}")
        ids_np = _to_numpy_i64(ids, "ids")
        lab = _to_numpy_i64(labels, "labels")
        if not (len(ids_np) == len(lab) == len(vec)):
            raise BankError(
                f"ids, embeddings and labels must have the same length, got {len(ids_np)}, {len(vec)}, {len(lab)}"
            )
        if not np.isfinite(vec).all():
            bad = np.flatnonzero(~np.isfinite(vec).all(1))
            raise BankError(f"embeddings contain NaN/inf for sample ids {ids_np[bad][:10].tolist()}")
        if len(lab) and (lab.min() < 0 or lab.max() >= self.num_classes):
            raise BankError(f"labels must lie in [0, {self.num_classes}), got min {lab.min()} max {lab.max()}")
        if len(ids_np) and ids_np.min() < 0:
            raise BankError("sample ids must be >= 0")
        return ids_np, self._normalise(vec), lab

    def _validate_queries(self, queries: Any) -> np.ndarray:
        q = _to_numpy_f32(queries, "queries")
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise BankError(f"queries must have shape (Q, {self.dim}), got {tuple(q.shape)}")
        if not np.isfinite(q).all():
            raise BankError("queries contain NaN or infinite values")
        return self._normalise(q)

    def _normalise(self, vec: np.ndarray) -> np.ndarray:
        if self.metric != "cosine":
            return vec
        norms = np.linalg.norm(vec, axis=1, keepdims=True)
        if (norms == 0).any():
            raise BankError("an embedding has zero norm; cosine similarity is undefined for it")
        return vec / norms

    def _recount_classes(self) -> None:
        """Recompute the running class sums and counts from the stored vectors (caller holds the write lock)."""
        n = self._size
        sums = torch.zeros(self.num_classes, self.dim, dtype=torch.float64)
        for start in range(0, n, 65_536):  # chunked: no float64 copy of a whole large bank
            end = min(n, start + 65_536)
            sums.index_add_(0, torch.from_numpy(self._labels[start:end].astype(np.int64)),
                            torch.from_numpy(self._vectors[start:end]).double())
        self._class_sums = sums.numpy()
        self._class_counts = np.bincount(self._labels[:n], minlength=self.num_classes).astype(np.int64)

    def _ensure_capacity(self, n: int) -> int:
        """Make the slot array and metadata hold at least ``n`` rows (doubling); returns the slot count."""
        cap = len(self._vectors)
        if n > cap:
            cap = max(n, 2 * cap, 1024)
            self._resize_slots(cap)
        if len(self._ids) < cap:  # the metadata as long as the slot array (a file may be longer already)
            for name in ("_labels", "_steps", "_ids"):
                old = getattr(self, name)
                arr = np.zeros(cap, dtype=old.dtype)
                arr[: self._size] = old[: self._size]
                setattr(self, name, arr)
        return len(self._vectors)

    def _resize_slots(self, rows: int) -> None:
        """Make the slot array ``rows`` long, keeping what its first rows hold (in RAM: a copy; in a
        file: the file is extended, or cut, and mapped again)."""
        if self.storage_path is None:
            vectors = np.zeros((rows, self.dim), dtype=self._dtype)
            keep = min(rows, len(self._vectors))
            vectors[:keep] = self._vectors[:keep]
            self._vectors = vectors
            return
        if isinstance(self._vectors, np.memmap):
            self._vectors.flush()
        self._vectors = np.zeros((0, self.dim), dtype=self._dtype)  # drop the old mapping first
        with open(self.storage_path, "r+b") as f:
            f.truncate(rows * self.dim * np.dtype(self._dtype).itemsize)
        self._vectors = np.memmap(self.storage_path, dtype=self._dtype, mode="r+", shape=(rows, self.dim))

    def _update_ann(self, changed_slots: np.ndarray, changed_vec: np.ndarray, old_size: int, n_new: int) -> None:
        if self._ann is None:
            self._maybe_build_ann()
            return
        if self._ann_kind == "ivf":  # deferred to flush(): O(batch) bookkeeping only
            self._ivf_pending.update(int(v) for v in changed_slots.tolist() if v < self._ivf_count)
        else:  # hnsw: append new vectors; replaced ones make the graph stale
            if n_new:
                self._ann.add(_f32(self._vectors[old_size : old_size + n_new]))
            if len(changed_slots):
                self._hnsw_stale = True

    def _maybe_build_ann(self, force: bool = False) -> None:
        n = self._size
        want = self.index_kind
        if want == "auto":  # on a GPU exact search stays fastest: "auto" never leaves it
            want = "ivf" if n >= self.ivf_threshold and self._gpu_res is None else "flat"
        if want == "flat" or n == 0:
            return
        # (an 8-bit PQ trains 256 centroids a sub-quantizer: with fewer vectors the bank stays exact)
        if want in ("ivf", "ivfpq") and (n >= self.ivf_threshold or force) and n >= (_PQ_MIN_TRAIN if want == "ivfpq" else 2):
            self._build_ivf()
        elif want == "hnsw":
            self._build_hnsw()

    def _build_ivf(self) -> None:
        n = self._size
        pq = self.index_kind == "ivfpq"
        # IVF-PQ: sqrt(N) lists, fewer and longer than IVF-flat's 4*sqrt(N): scanning a list of PQ
        # codes is cheap, while every add and update pays a coarse assignment against every list.
        lists = math.sqrt(n) if pq else 4 * math.sqrt(n)
        nlist = int(max(1, min(lists, n // 39 if n >= 39 else 1)))
        quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "cosine" else faiss.IndexFlatL2(self.dim)
        if pq:  # 8-bit codes of pq_bytes sub-vectors, on the residual to the list centroid
            ivf = faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.pq_bytes, 8, self._faiss_metric)
        else:
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, self._faiss_metric)
        train = self._vectors[:n]
        max_train = max(64 * nlist, 64 * 256) if pq else 64 * nlist  # PQ: 256 centroids per sub-quantizer
        if n > max_train:
            pick = np.random.default_rng(0).choice(n, size=max_train, replace=False)
            train = train[np.sort(pick)]
        train = _f32(train)
        self._opq_matrix = self._train_opq(train) if pq and self.opq else None
        ivf.train(self._ann_space(train))
        ivf.make_direct_map(True)
        for start in range(0, n, _EXACT_BLOCK):
            ivf.add(self._ann_space(self._vectors[start : min(n, start + _EXACT_BLOCK)]))
        self._ivf_count, self._ivf_pending = n, set()
        ivf.nprobe = self._nprobe
        self._ann, self._ann_kind = ivf, "ivf"
        self._ivf_quantizer = quantizer  # keep alive alongside the index
        self._ivf_pq = pq
        self._list_capacity = None
        self._compact_lists_if_slack()
        logger.info("embedding bank switched to IVF: %d vectors, %d lists, nprobe %d", n, nlist, self._nprobe)

    def _train_opq(self, train: np.ndarray) -> Any:
        """An OPQ rotation for ``pq_bytes`` sub-vectors, trained on at most ``_OPQ_MAX_TRAIN`` of
        the IVF training vectors (10 iterations: most of its gain at a fifth of FAISS's default cost)."""
        if len(train) > _OPQ_MAX_TRAIN:
            train = train[np.sort(np.random.default_rng(1).choice(len(train), _OPQ_MAX_TRAIN, replace=False))]
        opq = faiss.OPQMatrix(self.dim, self.pq_bytes)
        opq.niter = _OPQ_ITERATIONS
        opq.train(np.ascontiguousarray(train))
        return opq

    def _ann_space(self, x: np.ndarray) -> np.ndarray:
        """Vectors as the IVF index holds them: float32, rotated by the OPQ matrix if there is one."""
        x = _f32(x)
        return self._opq_matrix.apply(x) if self._opq_matrix is not None else x

    def _build_hnsw(self) -> None:
        self._opq_matrix = None
        h = faiss.IndexHNSWFlat(self.dim, 32, self._faiss_metric)
        h.hnsw.efSearch = max(64, self._nprobe * 4)
        h.add(_f32(self._vectors[: self._size]))
        self._ann, self._ann_kind, self._hnsw_stale = h, "hnsw", False

    def _search_slots(self, q: np.ndarray, k: int, refresh: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise BankError(f"k must be >= 1, got {k}")
        n = self._size
        if n == 0 or len(q) == 0:
            return np.full((len(q), k), np.nan, np.float32), np.full((len(q), k), -1, np.int64)
        if self._ann_kind == "hnsw" and self._hnsw_stale:
            # Readers may not write; stale graphs answer exactly until the next rebuild().
            return self._exact(q, k)
        if self._ann is not None:
            params = None
            if self._ann_kind == "ivf" and refresh and self.refresh_nprobe not in (None, self._nprobe):
                params = faiss.SearchParametersIVF(nprobe=self.refresh_nprobe)  # per call: thread-safe
            if self._ann_kind == "ivf" and self._ivf_pq:
                rerank = self.refresh_rerank if refresh and self.refresh_rerank is not None else self.rerank
                if rerank > 0:
                    return self._reranked(q, k, rerank, params)
            scores, slots = self._ann.search(self._ann_space(q), k, params=params)
            return scores, slots
        return self._exact(q, k)

    def _reranked(self, q: np.ndarray, k: int, rerank: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ candidates (``rerank * k``, at most ``k + RERANK_EXTRA_MAX``) re-scored exactly
        against the stored vectors."""
        kk = min(self._size, rerank * k, k + RERANK_EXTRA_MAX)
        _, cand = self._ann.search(self._ann_space(q), kk, params=params)
        valid = cand >= 0
        vec = self._vectors[np.clip(cand, 0, None)].astype(np.float32)  # (Q, kk, D)
        exact = np.einsum("qd,qkd->qk", q, vec)
        if self.metric == "cosine":
            key = np.where(valid, -exact, np.inf)
        else:
            exact = (q * q).sum(1)[:, None] - 2 * exact + (vec * vec).sum(2)
            key = np.where(valid, exact, np.inf)
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        slots = np.take_along_axis(np.where(valid, cand, -1), order, 1)
        scores = np.where(slots >= 0, np.take_along_axis(exact, order, 1), np.nan).astype(np.float32)
        if slots.shape[1] < k:
            pad = k - slots.shape[1]
            scores = np.concatenate([scores, np.full((len(q), pad), np.nan, np.float32)], 1)
            slots = np.concatenate([slots, np.full((len(q), pad), -1, np.int64)], 1)
        return scores, slots

    def _scan_probed_lists(self, q: np.ndarray, k: int, retries: int = 2
                           ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The refresh's search on an IVF or IVF-PQ bank (``refresh_search="lists"``): every vector of
        the ``refresh_nprobe`` lists each query probes, scored exactly against the stored vectors.

        Its neighbours are an IVF-flat search's (on IVF-PQ: a neighbour the PQ codes rank too low for
        any re-rank depth is still found). Lists are visited one at a time, each under the read lock
        with all the queries that probe it (an upsert waits for one list at most), so a refresh reads
        each probed list's vectors once, in one matrix product (:func:`exact_knn`) instead of FAISS's
        per-query scan. Returns ``(scores, ids, labels)``, or None when the bank has no IVF index
        (the caller searches as usual). A rebuild during the scan (``remove``,
        ``rebuild``, ``clear``) restarts it, at most ``retries`` times, then falls back to None.
        """
        with self._lock.read():
            ann = self._ann
            if self._ann_kind != "ivf" or self._size == 0:
                return None
            nprobe = self.refresh_probes
            _, probes = ann.quantizer.search(self._ann_space(q), nprobe)
        n_q, worst = len(q), (-np.inf if self.metric == "cosine" else np.inf)
        scores = np.full((n_q, nprobe, k), worst, np.float32)
        ids = np.full((n_q, nprobe, k), -1, np.int64)
        labels = np.full((n_q, nprobe, k), -1, np.int64)
        flat = probes.ravel()
        order = np.argsort(flat, kind="stable")
        lists, starts = np.unique(flat[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        for lst, a, b in zip(lists.tolist(), starts.tolist(), ends.tolist()):
            if lst < 0:
                continue
            rows = order[a:b]
            qi, pos = rows // nprobe, rows % nprobe
            with self._lock.read():
                if self._ann is not ann:  # rebuilt under us: its lists and slots are new
                    return self._scan_probed_lists(q, k, retries - 1) if retries > 0 else None
                inv = ann.invlists
                m = int(inv.list_size(lst))
                if m == 0:
                    continue
                ptr = inv.get_ids(lst)
                slots = np.sort(faiss.rev_swig_ptr(ptr, m))
                inv.release_ids(lst, ptr)
                s, j = exact_knn(q[qi], self._vectors[slots], min(k, m), self._faiss_metric)
                hit = slots[j]
                scores[qi, pos, : s.shape[1]] = s
                ids[qi, pos, : s.shape[1]] = self._ids[hit]
                labels[qi, pos, : s.shape[1]] = self._labels[hit]
        scores, ids, labels = (a.reshape(n_q, nprobe * k) for a in (scores, ids, labels))
        key = np.where(ids >= 0, -scores if self.metric == "cosine" else scores, np.inf)
        top = np.argsort(key, axis=1, kind="stable")[:, :k]
        ids, labels = np.take_along_axis(ids, top, 1), np.take_along_axis(labels, top, 1)
        scores = np.where(ids >= 0, np.take_along_axis(scores, top, 1), np.nan).astype(np.float32)
        return scores, ids, labels

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = self._size
        kk = min(k, n)
        xb = self._vectors[:n]
        if self._gpu_res is not None and kk <= GPU_MAX_K:
            scores, slots = self._knn_gpu(q, kk)
        else:
            if self._gpu_res is not None and not self._warned_large_k:
                self._warned_large_k = True
                logger.info("hardneg: a bank search with k=%d > %d (GPU FAISS's limit) runs on the CPU", kk, GPU_MAX_K)
            scores, slots = self._knn_cpu(q, xb, kk)
        if kk < k:
            pad = k - kk
            scores = np.concatenate([scores, np.full((len(q), pad), np.nan, np.float32)], 1)
            slots = np.concatenate([slots, np.full((len(q), pad), -1, np.int64)], 1)
        return scores, slots

    def _knn_cpu(self, q: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`exact_knn` over the stored vectors (float16 ones widened a block at a time)."""
        return exact_knn(q, xb, k, self._faiss_metric)

    def _knn_gpu(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One ``faiss.knn_gpu`` call over the GPU-resident copy (caller holds the read lock)."""
        with self._gpu_lock:
            xq = torch.from_numpy(q).to(self._gpu_device)
            scores, slots = faiss.knn_gpu(self._gpu_res, xq, self._gpu_vectors[: self._size], k,
                                          metric=self._faiss_metric)
            return (scores.cpu().numpy().astype(np.float32, copy=False),
                    slots.cpu().numpy().astype(np.int64, copy=False))

    def _gpu_write(self, slots: np.ndarray, vec: np.ndarray) -> None:
        """Write rows into the GPU-resident copy, growing it with the slot array (write lock held).

        On CUDA the copy runs on the device's default stream, the stream FAISS searches on
        (``faiss.contrib.torch_utils`` uses the caller's current stream; the refresh thread's is the
        default), so a search queued after this upsert never reads a half-written row.
        """
        with self._gpu_lock:
            cap = len(self._vectors)
            dev = self._gpu_device
            stream = torch.cuda.stream(torch.cuda.default_stream(dev)) if dev.type == "cuda" else _null_context()
            with stream:
                if self._gpu_vectors.shape[0] != cap:
                    grown = torch.zeros((cap, self.dim), dtype=self._torch_dtype, device=dev)
                    n_old = min(self._gpu_vectors.shape[0], cap)
                    grown[:n_old] = self._gpu_vectors[:n_old]
                    self._gpu_vectors = grown
                if len(slots):
                    self._gpu_vectors.index_copy_(0, torch.from_numpy(slots).to(dev),
                                                  torch.from_numpy(vec).to(dev, self._torch_dtype))

    def _gpu_upload_all(self) -> None:
        """Replace the GPU-resident copy with the whole slot array (after remove / load; O(N))."""
        if self._gpu_vectors is None:
            return
        with self._gpu_lock:
            self._gpu_vectors = torch.from_numpy(np.ascontiguousarray(self._vectors)).to(self._gpu_device).clone()

    @staticmethod
    def _make_gpu_resources() -> Any:
        try:
            if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                res = faiss.StandardGpuResources()
                res.setTempMemory(GPU_TEMP_MEMORY)
                _enable_torch_knn_gpu()
                logger.info("hardneg: exact bank search runs on the GPU (FAISS GPU build, %d GPU(s))",
                            faiss.get_num_gpus())
                return res
        except Exception as exc:  # GPU builds only (tests mock it)
            logger.warning("FAISS GPU resources unavailable (%s); searching on the CPU", exc)
        return None


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class BankOptions:
    """The embedding bank's settings (``HardNegConfig`` fields of the same names; ``bank_options``)."""

    embedding_dim: Optional[int] = None  # inferred from the first observed batch when None
    metric: Metric = "cosine"
    index: IndexKind = "auto"
    ivf_threshold: int = DEFAULT_IVF_THRESHOLD  # "auto" switches from exact flat to IVF past this many vectors
    nprobe: int = 16
    use_gpu_index: bool = True  # only used when a FAISS GPU build and a GPU are present
    # "id-mod": in a torch.distributed run each rank stores the vectors of ids with id % world == rank
    # and refreshes collectively (hardneg.sharded_bank); every rank must observe the same gathered
    # batch, as HardNegAccelerate does. "off": every rank holds the whole bank.
    bank_sharding: Literal["off", "id-mod"] = "off"
    # Compressed storage for 10M+ samples: "float16" stores the vectors in half precision;
    # index="ivfpq" searches an IndexIVFPQ of bank_pq_bytes bytes a vector (must divide the
    # dimension), re-scoring bank_rerank * k candidates exactly (0: PQ scores as they are).
    bank_storage: Literal["float32", "float16"] = "float32"
    bank_pq_bytes: int = 32
    bank_rerank: int = 32
    bank_storage_path: Optional[str] = None  # keep the vectors in this file (memory-mapped), not in RAM
    # The confusion refresh's searches only (few queries: a deeper search is cheap there; training-time
    # searches keep bank_rerank / nprobe): 128 x k re-ranked (bank_refresh_search="rerank") makes an
    # IVF-PQ refresh's neighbours nearly an exact search's (benchmarks/README.md). None: bank_rerank /
    # nprobe (a list scan: at least 64 lists, EmbeddingBank.refresh_probes).
    bank_refresh_rerank: Optional[int] = DEFAULT_REFRESH_RERANK
    bank_refresh_nprobe: Optional[int] = None
    # The refresh's IVF search: "lists" scores every vector of the probed lists by one matrix
    # product a list (IVF: FAISS's neighbours, 3.5x faster at 1M; IVF-PQ: an IVF-flat search's
    # neighbours, which PQ codes cannot push past any re-rank depth); "rerank": FAISS's IVF search,
    # on IVF-PQ bank_refresh_rerank x k PQ candidates re-scored (reads less of the vectors' file
    # once N is past ~10M: benchmarks/README.md, seventh and eighth pass).
    bank_refresh_search: RefreshSearch = "lists"
    bank_opq: bool = False  # index="ivfpq": rotate the vectors by a trained OPQ matrix before PQ (see EmbeddingBank)
    # Slots allocated when the bank is made (e.g. the dataset's length): a bank grown by doubling
    # may hold up to 2x the slots, metadata and id -> slot table it needs; None: grow as samples come.
    bank_reserve: Optional[int] = None

    def __post_init__(self) -> None:
        from hardneg._checks import ConfigError, choice, int_at_least

        if self.embedding_dim is not None:
            int_at_least(self, "embedding_dim", 1)
        choice(self, "metric", ("cosine", "l2"))
        choice(self, "index", ("auto", "flat", "ivf", "ivfpq", "hnsw"))
        int_at_least(self, "ivf_threshold", 1)
        int_at_least(self, "nprobe", 1)
        choice(self, "bank_sharding", ("off", "id-mod"))
        choice(self, "bank_storage", ("float32", "float16"))
        choice(self, "bank_refresh_search", ("rerank", "lists"))
        int_at_least(self, "bank_pq_bytes", 1)
        int_at_least(self, "bank_rerank", 0)
        if self.bank_refresh_rerank is not None:
            int_at_least(self, "bank_refresh_rerank", 0)
        if self.bank_refresh_nprobe is not None:
            int_at_least(self, "bank_refresh_nprobe", 1)
        if self.bank_reserve is not None:
            int_at_least(self, "bank_reserve", 0)
        if self.index == "ivfpq" and self.embedding_dim is not None and self.embedding_dim % self.bank_pq_bytes:
            raise ConfigError(f"bank_pq_bytes={self.bank_pq_bytes} must divide embedding_dim={self.embedding_dim} "
                              "(one PQ sub-vector per byte)")

    def make_bank(self, dim: int, num_classes: int) -> "EmbeddingBank":
        """An empty bank of ``dim``-dimensional embeddings with these settings (sharded over the ranks
        of a torch.distributed run when ``bank_sharding`` is on)."""
        storage = {"storage": self.bank_storage, "pq_bytes": self.bank_pq_bytes, "rerank": self.bank_rerank,
                   "storage_path": self.bank_storage_path, "refresh_rerank": self.bank_refresh_rerank,
                   "refresh_nprobe": self.bank_refresh_nprobe, "opq": self.bank_opq,
                   "refresh_search": self.bank_refresh_search}
        if self.bank_sharding != "off":
            from hardneg.sharded_bank import ShardedEmbeddingBank

            bank: Any = ShardedEmbeddingBank(dim, num_classes, self.metric, self.index, self.ivf_threshold,
                                             self.nprobe, self.use_gpu_index, **storage)
        else:
            bank = EmbeddingBank(dim, num_classes, self.metric, self.index, self.ivf_threshold, self.nprobe,
                                 self.use_gpu_index, **storage)
        if self.bank_reserve:
            bank.reserve(self.bank_reserve)
        return bank
