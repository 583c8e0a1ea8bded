"""ShardedEmbeddingBank: the embedding bank split over the processes of a torch.distributed run.

Why it is built this way:

* **Vectors sharded by id, metadata replicated.** Rank ``r`` of ``W`` stores the vectors of the
  sample ids with ``id % W == r`` (in an :class:`~hardneg.bank.EmbeddingBank` of its own, with
  any index kind), so per-rank vector memory falls as 1/W. Every rank upserts the *same* global
  rows (what :class:`~hardneg.integrations.accelerate.HardNegAccelerate` does: its ``observe``
  gathers the batch of every process), keeps the vectors it owns and records every row's id,
  label and step (16-24 bytes a sample against ``4 * dim`` for a vector). Upserts therefore need
  no collective, and the sample order, class counts and the query subsample of a refresh are
  those of a one-process bank fed the same rows.
* **kNN as FAISS ``IndexShards``.** A search is collective: the ranks all_gather their queries,
  each searches every query against its shard, the per-shard top-k ``(score, id, label)`` are
  all_gathered and merged, and each rank keeps the answers to its own queries. A confusion
  refresh splits its queries by owner (a rank queries with the vectors it stores), sums its
  per-class neighbour counts with all_reduce, and merges the per-shard source candidates, so
  pairs, sources and curricula are identical on every rank and equal to a one-process exact run.
* **Its own gloo group.** The collectives run on CPU tensors in a process group created for the
  bank, never on the training's (NCCL) group.

Collective calls (call them on every rank, in the same order, with the same ids where ids are
given): ``search``, ``search_with_labels``, ``search_many``, ``get``, ``lookup``, ``class_means``,
``reduce_sum``, ``merge_top_n``, ``snapshot`` and ``state_dict``. The engine refreshes inline
with a sharded bank (every rank at the same step). Everything else is local.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from hardneg.bank import (
    BankError,
    EmbeddingBank,
    IndexKind,
    Metric,
    SlotMap,
    blas_query_chunk,
    _last_occurrence,
    _to_numpy_i64,
    _widen,
)

__all__ = ["ShardedEmbeddingBank", "ShardingError"]

_STATE_CHUNK = 65_536  # rows per all_reduce when a state_dict assembles the vectors


class ShardingError(BankError):
    """The sharded bank cannot work here (no process group, ranks disagree about their samples)."""


def _dist() -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ShardingError(
            "bank_sharding needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) (or build the engine inside an Accelerate / "
            "Lightning / torchrun process) before the bank is made, or set bank_sharding='off'")
    return dist


class ShardedEmbeddingBank:
    """An embedding bank whose vectors are split over the ranks (``id % world_size``).

    Args: those of :class:`~hardneg.bank.EmbeddingBank` (they configure each rank's shard), and
        ``group``: the process group of the bank's collectives (default: a new gloo group over
        every rank; building it is itself collective).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        metric: Metric = "cosine",
        index: IndexKind = "auto",
        ivf_threshold: int = 200_000,
        nprobe: int = 16,
        use_gpu: bool = True,
        group: Any = None,
        **bank_options: Any,
    ) -> None:
        dist = _dist()
        self._group = group if group is not None else dist.new_group(backend="gloo")
        self.world = int(dist.get_world_size(self._group))
        self.rank = int(dist.get_rank(self._group))
        if bank_options.get("storage_path"):  # one file per rank
            bank_options = {**bank_options, "storage_path": f"{bank_options['storage_path']}.rank{self.rank}"}
        self.shard = EmbeddingBank(dim, num_classes, metric, index, ivf_threshold, nprobe, use_gpu, **bank_options)
        self._bank_options = dict(bank_options)
        self.dim, self.num_classes, self.metric = self.shard.dim, self.shard.num_classes, self.shard.metric
        self._meta_lock = threading.Lock()
        self._size = 0
        # every rank's samples, in the compact dtypes of the shard's own metadata (reads give int64)
        self._ids = np.zeros(0, dtype=np.int32)
        self._labels = np.zeros(0, dtype=self.shard._labels.dtype)
        self._steps = np.zeros(0, dtype=np.int32)
        self._slot_of = SlotMap()
        self._counts = np.zeros(self.num_classes, dtype=np.int64)

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self._size

    def __contains__(self, sample_id: int) -> bool:
        return int(sample_id) in self._slot_of

    @property
    def collective(self) -> bool:
        """True: searches, lookups and refreshes are collective calls across the ranks."""
        return True

    @property
    def index_kind(self) -> IndexKind:
        return self.shard.index_kind

    @property
    def ivf_threshold(self) -> int:
        return self.shard.ivf_threshold

    @property
    def nprobe(self) -> int:
        return self.shard.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.shard.nprobe = value

    @property
    def active_index(self) -> str:
        return self.shard.active_index

    @property
    def on_gpu(self) -> bool:
        return self.shard.on_gpu

    @property
    def pending_updates(self) -> int:
        return self.shard.pending_updates

    def owns(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the ids whose vectors this rank stores."""
        return (np.asarray(ids, dtype=np.int64) % self.world) == self.rank

    def memory_bytes(self) -> dict[str, int]:
        """This rank's bytes: its shard's vectors and index, and the replicated metadata."""
        shard = self.shard.memory_bytes()
        with self._meta_lock:
            meta = int(self._ids.nbytes + self._labels.nbytes + self._steps.nbytes + self._counts.nbytes
                       + self._slot_of.nbytes)
        meta += shard["metadata"]
        out = {"vectors": shard["vectors"], "index": shard["index"], "metadata": meta,
               "total": shard["vectors"] + shard["index"] + meta}
        if "vectors_on_disk" in shard:  # this rank's file (storage_path.rank<r>)
            out["vectors_on_disk"] = shard["vectors_on_disk"]
        return out

    # ------------------------------------------------------------------ writing (local)
    def upsert(self, ids: Tensor | np.ndarray | list, embeddings: Tensor | np.ndarray,
               labels: Tensor | np.ndarray | list, step: int = 0) -> None:
        """Record the (global) rows on this rank; store the vectors of the ids it owns. Not collective:
        every rank must upsert the same rows (the gathered batch)."""
        ids_np, vec, lab = _last_occurrence(*self.shard._validate(ids, embeddings, labels))
        with self._meta_lock:
            slots, new = self._slot_of.assign(ids_np, self._size, self._grow)
            n_new = int(new.sum())
            if len(ids_np):
                self._ids = _widen(self._ids, int(ids_np.max()))
            self._steps = _widen(self._steps, int(step))
            np.subtract.at(self._counts, self._labels[slots[~new]], 1)
            np.add.at(self._counts, lab, 1)
            self._ids[slots], self._labels[slots], self._steps[slots] = ids_np, lab, int(step)
            self._size += n_new
        mine = self.owns(ids_np)
        self.shard._upsert_valid(ids_np[mine], vec[mine], lab[mine], step)

    def remove(self, ids: Tensor | np.ndarray | list) -> int:
        """Forget samples on this rank (O(N)); every rank removes the same ids. Returns how many."""
        ids_np = _to_numpy_i64(ids, "ids")
        with self._meta_lock:
            drop = np.unique(self._slot_of.get(ids_np))
            drop = drop[drop >= 0]
            if len(drop):
                keep = np.setdiff1d(np.arange(self._size), drop)
                self._ids, self._labels, self._steps = (a[keep].copy() for a in (self._ids, self._labels, self._steps))
                self._size = len(keep)
                self._slot_of.reset(self._ids)
                self._counts = np.bincount(self._labels, minlength=self.num_classes).astype(np.int64)
        self.shard.remove(ids_np[self.owns(ids_np)])
        return len(drop)

    def reserve(self, n: int) -> None:
        """Allocate for ``n`` samples now: the replicated metadata for all, the shard for its ~n / W."""
        with self._meta_lock:
            self._grow(int(n))
            self._slot_of.reserve(int(n))
        self.shard.reserve(-(-int(n) // self.world))

    def rebuild(self) -> None:
        self.shard.rebuild()

    def clear(self) -> None:
        with self._meta_lock:
            self._size = 0
            self._slot_of.clear()
            self._counts[:] = 0
        self.shard.clear()

    def flush(self, chunk: int = 2048) -> None:
        self.shard.flush(chunk)

    # ------------------------------------------------------------------ reading (local)
    def ids_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Every rank's samples (ids, labels) in one-process bank order; not collective."""
        with self._meta_lock:
            return self._ids[: self._size].astype(np.int64), self._labels[: self._size].astype(np.int64)

    def class_counts(self) -> np.ndarray:
        with self._meta_lock:
            return self._counts.copy()

    def scan(self, visit: Callable[[np.ndarray, np.ndarray, np.ndarray], None], chunk: int = 65_536) -> None:
        """:meth:`EmbeddingBank.scan` of this rank's shard only (merge results with :meth:`merge_top_n`)."""
        self.shard.scan(visit, chunk)

    def query_share(self, ids: Tensor | np.ndarray | list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The refresh queries among ``ids`` that this rank answers: those whose vectors it stores."""
        ids_np = _to_numpy_i64(ids, "ids")
        return self.shard.lookup(ids_np[self.owns(ids_np)])

    # ------------------------------------------------------------------ collectives
    def search(self, queries: Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Collective :meth:`EmbeddingBank.search` over every shard (each rank its own queries)."""
        scores, ids, _ = self.search_with_labels(queries, k)
        return scores, ids

    def search_with_labels(self, queries: Tensor | np.ndarray, k: int
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Collective :meth:`EmbeddingBank.search_with_labels` over every shard."""
        if k < 1:
            raise BankError(f"k must be >= 1, got {k}")
        return self._search(self.shard._validate_queries(queries), k)

    def search_many(self, queries: Tensor | np.ndarray, k: int, chunk: int = 64
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Collective search of many queries, ``chunk`` per rank per round (as many rounds on every
        rank; exact shards: enough that a round's gathered queries take FAISS's BLAS path, see
        :func:`hardneg.bank.blas_query_chunk`). First checks that every rank holds the same samples."""
        self._check_same_samples()
        q = self.shard._validate_queries(queries)
        if self.shard.on_gpu and self.shard._ann is None:
            chunk = max(1, len(q))
        if self.shard.refresh_scans_lists:
            chunk = max(1, len(q))  # each shard scans its probed lists once for all queries
        elif self.shard._ann is None:  # exact: every round's gathered queries enough for FAISS's BLAS path
            chunk = max(chunk, math.ceil(blas_query_chunk(self.dim) / self.world))
        rounds = int(self._all_reduce(torch.tensor([math.ceil(len(q) / chunk)], dtype=torch.int64), "max")[0])
        parts = [self._search(q[r * chunk : (r + 1) * chunk], k, refresh=True) for r in range(rounds)]
        if not parts:
            return (np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.int64))
        return tuple(np.concatenate([p[j] for p in parts]) for j in range(3))  # type: ignore[return-value]

    def reduce_sum(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Sum each array over the ranks (all_reduce); dtypes and shapes kept."""
        out = []
        for a in arrays:
            t = torch.from_numpy(np.ascontiguousarray(a)).clone()
            out.append(self._all_reduce(t, "sum").numpy().astype(a.dtype, copy=False))
        return tuple(out)

    def merge_top_n(self, best: dict[Any, tuple[np.ndarray, np.ndarray]], n: int
                    ) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
        """Merge every rank's ``{key: (scores, ids)}`` into the ``n`` highest scores per key."""
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, best, group=self._group)
        merged: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
        for key in best:
            c = np.concatenate([p[key][0] for p in parts])
            i = np.concatenate([p[key][1] for p in parts])
            if len(c) > n:
                keep = np.sort(np.argpartition(-c, n - 1)[:n])
                c, i = c[keep], i[keep]
            merged[key] = (c, i)
        return merged

    def get(self, ids: Tensor | np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
        """Collective (vectors, labels) of known ids from their owners; unknown ids raise KeyError."""
        ids_np = _to_numpy_i64(ids, "ids")
        missing = ids_np[self._slot_of.get(ids_np) < 0]
        if len(missing):
            raise KeyError(f"sample ids not in the bank: {missing[:10].tolist()}")
        return self._fetch(ids_np)

    def lookup(self, ids: Tensor | np.ndarray | list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Collective :meth:`EmbeddingBank.lookup`: the known ids' (ids, vectors, labels)."""
        ids_np = _to_numpy_i64(ids, "ids")
        ids_np = ids_np[self._slot_of.get(ids_np) >= 0]
        vectors, labels = self._fetch(ids_np)
        return ids_np, vectors, labels

    def class_means(self) -> np.ndarray:
        """Collective (num_classes, dim) float32 mean vector per class: the shards' sums, all_reduced."""
        with self.shard._lock.read():
            sums = torch.from_numpy(self.shard._class_sums.copy())
        sums = self._all_reduce(sums, "sum").numpy()
        return (sums / np.maximum(self.class_counts(), 1)[:, None]).astype(np.float32)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Collective: (ids, vectors, labels, steps) of the whole bank on every rank (one-process order)."""
        with self._meta_lock:
            n = self._size
            ids, labels, steps = (a[:n].astype(np.int64) for a in (self._ids, self._labels, self._steps))
        vectors = np.zeros((n, self.dim), dtype=self.shard._dtype)
        for start in range(0, max(n, 1), _STATE_CHUNK):
            end = min(n, start + _STATE_CHUNK)
            vectors[start:end] = self._fetch(ids[start:end], check=False)[0]
        return ids, vectors, labels, steps

    def state_dict(self) -> dict[str, Any]:
        """Collective: the whole bank's state, equal to a one-process bank's (it loads there and on any W)."""
        ids, vecs, labels, steps = self.snapshot()
        s = self.shard
        return {"dim": self.dim, "num_classes": self.num_classes, "metric": s.metric, "index": s.index_kind,
                "ivf_threshold": s.ivf_threshold, "nprobe": s.nprobe, "storage": s.storage, "pq_bytes": s.pq_bytes,
                "rerank": s.rerank, "refresh_rerank": s.refresh_rerank, "refresh_nprobe": s.refresh_nprobe,
                "refresh_search": s.refresh_search, "opq": s.opq, "ids": torch.from_numpy(ids),
                "vectors": torch.from_numpy(vecs), "labels": torch.from_numpy(labels), "steps": torch.from_numpy(steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a (whole-bank) state: record every sample, store the vectors this rank owns. Local."""
        ids = np.asarray(state["ids"], dtype=np.int64)
        labels = np.asarray(state["labels"], dtype=np.int64)
        mine = self.owns(ids)
        self.shard.load_state_dict({**state, "ids": torch.from_numpy(ids[mine]),
                                    "vectors": torch.as_tensor(state["vectors"])[torch.from_numpy(mine)],
                                    "labels": torch.from_numpy(labels[mine]),
                                    "steps": torch.as_tensor(state["steps"])[torch.from_numpy(mine)]})
        self.metric = self.shard.metric
        with self._meta_lock:
            steps = np.asarray(state["steps"], dtype=np.int64)
            self._ids = ids.astype(_widen(np.zeros(0, np.int32), int(ids.max()) if len(ids) else 0).dtype)
            self._labels = labels.astype(self._labels.dtype)
            self._steps = steps.astype(_widen(np.zeros(0, np.int32), int(np.abs(steps).max()) if len(ids) else 0).dtype)
            self._size = len(ids)
            self._slot_of.reset(ids)
            self._counts = np.bincount(labels, minlength=self.num_classes).astype(np.int64)

    # ------------------------------------------------------------------ internals
    def _grow(self, n: int) -> int:
        """Make the replicated metadata hold at least ``n`` rows (doubling); returns its length."""
        cap = len(self._ids)
        if n <= cap:
            return cap
        new_cap = max(n, 2 * cap, 1024)
        for name in ("_ids", "_labels", "_steps"):
            arr = np.zeros(new_cap, dtype=getattr(self, name).dtype)
            arr[: self._size] = getattr(self, name)[: self._size]
            setattr(self, name, arr)
        return new_cap

    def _all_reduce(self, t: Tensor, op: str) -> Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self._group)
        return t

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self._group)
        return out

    def _check_same_samples(self) -> None:
        """Raise on every rank when the ranks recorded different samples (they upserted different rows)."""
        with self._meta_lock:
            n = self._size
            mix = int((self._ids[:n].astype(np.int64) * 1_000_003 + self._labels[:n]).sum() % (2**61 - 1)) if n else 0
        got = self._all_gather(torch.tensor([n, mix], dtype=torch.int64))
        if any(not torch.equal(g, got[0]) for g in got):
            raise ShardingError(
                f"ranks hold different samples (size, checksum per rank: {[g.tolist() for g in got]}): a sharded "
                "bank needs every rank to upsert the same global rows, e.g. through HardNegAccelerate, whose "
                "observe() gathers the batch of every process")

    def _fetch(self, ids_np: np.ndarray, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of known ``ids_np`` from their owners (a zero-filled all_reduce: exact), labels local."""
        if check:
            got = self._all_gather(torch.tensor([len(ids_np), int(ids_np.sum()) if len(ids_np) else 0]))
            if any(not torch.equal(g, got[0]) for g in got):
                raise ShardingError(f"ranks asked the sharded bank for different ids ({[g.tolist() for g in got]}): "
                                    "get()/lookup() are collective, call them with the same ids on every rank")
        vectors = torch.zeros((len(ids_np), self.dim), dtype=torch.float32)
        mine = self.owns(ids_np)
        if mine.any():
            _, vecs, _ = self.shard.lookup(ids_np[mine])
            vectors[torch.from_numpy(mine)] = torch.from_numpy(vecs)
        vectors = self._all_reduce(vectors, "sum") if len(ids_np) else vectors
        with self._meta_lock:
            labels = self._labels[self._slot_of.get(ids_np)] if len(ids_np) else np.zeros(0, np.int64)
        return vectors.numpy(), np.asarray(labels, dtype=np.int64)

    def _search(self, q: np.ndarray, k: int, refresh: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One collective search round: gather queries, search the shard, gather and merge top-k
        (``refresh``: the shard's refresh-only search settings, as in ``EmbeddingBank.search_many``)."""
        counts = [int(c[0]) for c in self._all_gather(torch.tensor([len(q)], dtype=torch.int64))]
        top = max(counts)
        if top == 0:
            return (np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.int64))
        padded = torch.zeros((top, self.dim), dtype=torch.float32)
        padded[: len(q)] = torch.from_numpy(q)
        every = torch.cat([g[:c] for g, c in zip(self._all_gather(padded), counts)]).numpy()
        scores, ids, labels = self.shard._search_labelled(every, k, refresh)
        scores_all = torch.stack(self._all_gather(torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))))
        meta_all = torch.stack(self._all_gather(torch.from_numpy(np.stack([ids, labels]).astype(np.int64))))
        start = sum(counts[: self.rank])
        rows = slice(start, start + counts[self.rank])
        # (q, W*k): each of this rank's queries, the shards' answers side by side in rank order
        s = scores_all[:, rows].permute(1, 0, 2).reshape(counts[self.rank], self.world * k).numpy()
        i = meta_all[:, 0, rows].permute(1, 0, 2).reshape(counts[self.rank], self.world * k).numpy()
        lab = meta_all[:, 1, rows].permute(1, 0, 2).reshape(counts[self.rank], self.world * k).numpy()
        key = -s.astype(np.float64) if self.metric == "cosine" else s.astype(np.float64)
        key = np.where(i >= 0, np.nan_to_num(key, nan=np.inf), np.inf)
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
        s, i, lab = take(s), take(i), take(lab)
        return np.where(i >= 0, s, np.nan).astype(np.float32), i, np.where(i >= 0, lab, -1)
