"""GeNIe sources: which real samples a pair's images are generated from, and in which order.

Serves the refresh event on the targeting side: :func:`boundary_sources` finds, for each candidate
pair (a, b) the confusion graph mined (and its reverse, which a policy may generate instead), the
samples of a closest to b's centroid in the bank: the real images right at that boundary, the
ones GeNIe should push across it. :class:`hardneg.confusion.ConfusionGraph` calls it on its
refresh thread (injected as ``source_finder``), so the O(bank) pass stays off the training step.
:class:`SourceCursor` rotates through a pair's sources over successive refreshes
(:mod:`hardneg.requests` asks it which sources to send next).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from hardneg.bank import EmbeddingBank

__all__ = ["SourceCursor", "SourceFinder", "boundary_sources"]

Pair = tuple[int, int]
SourceFinder = Callable[["EmbeddingBank", Sequence[Pair], int], dict[Pair, list[int]]]


def boundary_sources(bank: "EmbeddingBank", candidates: Sequence[tuple[int, int]],
                     n_keep: int) -> dict[tuple[int, int], list[int]]:
    """For each candidate pair (a, b) and its reverse: the ``n_keep`` samples of a closest to b's mean.

    One chunked pass over the bank (:meth:`EmbeddingBank.scan`) keeps a running top-n per
    pair, so a refresh never copies the bank nor holds its lock for more than one chunk.
    """
    # The candidates are the pairs top_pairs() can return; their reverses are kept too, as a policy
    # may generate a pair the other way (ConfusionTargeting(direction="to-rarer")).
    counts = bank.class_counts()
    candidates = [(int(a), int(b)) for a, b in candidates]
    known = set(candidates)
    reverses = [(b, a) for a, b in candidates if (b, a) not in known]
    pairs = [(a, b) for a, b in candidates + reverses if counts[a] > 0 and counts[b] > 0]
    if not pairs:
        return {}
    means = bank.class_means()
    targets_of: dict[int, list[int]] = {}
    for a, b in pairs:
        targets_of.setdefault(a, []).append(b)
    best: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {
        p: (np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)) for p in pairs
    }

    def visit(ids: np.ndarray, vectors: np.ndarray, labels: np.ndarray) -> None:
        for a, bs in targets_of.items():
            rows = np.flatnonzero(labels == a)
            if len(rows) == 0:
                continue
            va = vectors[rows]
            m = means[bs]  # (len(bs), D)
            if bank.metric == "cosine":
                closeness = va @ m.T
            else:  # -||v - m||^2 = 2 v.m - |m|^2 - |v|^2
                closeness = 2.0 * (va @ m.T) - (m * m).sum(1)[None, :] - (va * va).sum(1)[:, None]
            chunk_ids = ids[rows]
            for col, b in enumerate(bs):
                old_c, old_i = best[(a, b)]
                c = np.concatenate([old_c, closeness[:, col].astype(np.float64)])
                i = np.concatenate([old_i, chunk_ids])
                if len(c) > n_keep:
                    keep = np.sort(np.argpartition(-c, n_keep - 1)[:n_keep])  # sorted: scan order on ties
                    c, i = c[keep], i[keep]
                best[(a, b)] = (c, i)  # concatenate made fresh arrays: no view of the bank survives

    bank.scan(visit)
    best = bank.merge_top_n(best, n_keep)  # a sharded bank scanned its shard: merge over ranks
    sources = {}
    for p, (c, i) in best.items():
        if len(i):
            sources[p] = i[np.argsort(-c, kind="stable")].tolist()
    return sources


class SourceCursor:
    """Per pair, where the next request starts in the pair's source list (wrapping around), so
    successive refreshes use the next sources instead of the same first ones."""

    def __init__(self) -> None:
        self._next: dict[Pair, int] = {}

    def take(self, pair: Pair, n_sources: int, count: int) -> list[int]:
        """Indices into a pair's ``n_sources`` sources for ``count`` images; advances the cursor."""
        start = self._next.get(pair, 0)
        order = [(start + i) % n_sources for i in range(count)]
        self._next[pair] = (start + count) % n_sources
        return order

    def state_dict(self) -> dict[str, int]:
        return {f"{a},{b}": v for (a, b), v in self._next.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._next = {tuple(int(v) for v in k.split(",")): int(v) for k, v in state.items()}  # type: ignore[misc]
