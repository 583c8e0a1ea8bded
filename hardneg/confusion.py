"""ConfusionGraph: which class pairs the model confuses right now, and the best GeNIe sources.

Score of a directed pair A -> B ("A is pulled towards B"), recomputed every refresh:

* **kNN disagreement** over the whole bank: for each A sample, the similarity-weighted share of
  its k nearest neighbours labelled B; averaged over A's samples.
* **softmax confusion** from the classifier's own logits observed since the last refresh: the
  mean probability mass an A sample puts on B.

The two are blended (``logit_weight``) and smoothed with an exponential moving average over
refreshes. The graph scores; which samples a pair is generated from is targeting's concern
(:func:`hardneg.sources.boundary_sources`, injected as ``source_finder`` and run on the refresh
thread right after the scores, so ``top_pairs`` hands out each pair with its boundary sources).

Serves the refresh event (``refresh``, on the engine's background thread) and ``observe``
(``accumulate_logits``); read by targeting policies through :class:`hardneg.targeting.PolicyContext`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

from hardneg.bank import EmbeddingBank
from hardneg.sources import SourceFinder, boundary_sources


@dataclass
class PairScore:
    """A directed confused pair with its EMA score and its best GeNIe source sample ids."""

    a: int
    b: int
    score: float
    source_ids: list[int] = field(default_factory=list)

    @property
    def pair(self) -> tuple[int, int]:
        return (self.a, self.b)


@dataclass
class ClassDifficulty:
    """Per-class summary: how much it leaks to other classes and how clean its neighbourhood is."""

    cls: int
    confusion: float  # sum over B of score(cls -> B)
    knn_accuracy: float  # share of neighbour weight with the same label (last refresh)
    count: int  # samples of this class in the bank


class ConfusionGraph:
    """Directed class-confusion scores mined from an :class:`EmbeddingBank` and observed logits.

    Args:
        num_classes: number of classes K.
        knn_k: neighbours per sample for the disagreement score.
        ema: weight of the newest refresh in the moving average (1 = no smoothing).
        logit_weight: share of softmax confusion in the blend (0 = kNN only).
        sources_per_pair: source ids returned per pair.
        max_queries: cap on the bank samples used as kNN queries per refresh (stratified by class),
            so refresh cost stays bounded on very large banks.
        seed: seeds the query subsample.
        source_finder: ``(bank, candidate pairs, n) -> {pair: source ids}``, run after each refresh
            on the same (background) thread; default :func:`hardneg.sources.boundary_sources`.
    """

    def __init__(
        self,
        num_classes: int,
        knn_k: int = 10,
        ema: float = 0.5,
        logit_weight: float = 0.5,
        sources_per_pair: int = 16,
        max_queries: int = 20_000,
        seed: int = 0,
        source_finder: Optional[SourceFinder] = None,
    ) -> None:
        self.num_classes = int(num_classes)
        self.knn_k = int(knn_k)
        self.ema = float(ema)
        self.logit_weight = float(logit_weight)
        self.sources_per_pair = int(sources_per_pair)
        self.max_queries = int(max_queries)
        self.source_finder: SourceFinder = source_finder if source_finder is not None else boundary_sources
        self.source_pair_limit = 32  # candidate pairs that get source ids each refresh
        # kNN queries per bank search: the bank's read lock is held for one search, so this bounds
        # how long a training-step upsert can wait (~0.1 s at 1M vectors on 2 CPU cores with IVF).
        self.search_chunk = 64
        self._rng = np.random.default_rng(seed)
        k = self.num_classes
        self._scores = np.zeros((k, k), dtype=np.float64)
        self._knn_accuracy = np.ones(k, dtype=np.float64)
        self._counts = np.zeros(k, dtype=np.int64)
        self._prob_sum = np.zeros((k, k), dtype=np.float64)
        self._prob_count = np.zeros(k, dtype=np.int64)
        self._sources: dict[tuple[int, int], list[int]] = {}
        self.refreshes = 0
        self.last_step = -1
        self.history: list[dict[str, Any]] = []  # one entry per refresh: step, top pairs, mean confusion
        # Guards the state above: refresh() may run on a background thread while the training
        # thread accumulates logits or reads the top pairs.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ inputs
    def accumulate_logits(self, labels: Tensor, logits: Tensor) -> None:
        """Add the softmax mass each sample puts on the other classes (used at the next refresh)."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (N, {self.num_classes}), got {tuple(logits.shape)}")
        if logits.shape[0] != labels.shape[0]:
            raise ValueError(f"logits ({logits.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        if not torch.isfinite(logits).all():
            raise ValueError("logits contain NaN or infinite values; the model has diverged")
        probs = torch.softmax(logits.detach().float(), dim=1).cpu().numpy().astype(np.float64)
        lab = labels.detach().cpu().numpy().astype(np.int64)
        with self._lock:
            np.add.at(self._prob_sum, lab, probs)
            self._prob_count += np.bincount(lab, minlength=self.num_classes)

    # ------------------------------------------------------------------ refresh
    def refresh(self, bank: EmbeddingBank, step: int = 0) -> np.ndarray:
        """Recompute pair scores from the bank (and logits seen since the last refresh).

        Thread-safe: the heavy part (kNN over the bank) runs without holding the lock, so it can
        run on a background thread while training goes on. Returns the new EMA matrix (K, K).
        """
        k = self.num_classes
        with self._lock:  # take this window's logits; new ones go to the next refresh
            prob_sum, prob_count = self._prob_sum, self._prob_count
            self._prob_sum = np.zeros((k, k), dtype=np.float64)
            self._prob_count = np.zeros(k, dtype=np.int64)
            previous, first = self._scores, self.refreshes == 0
        # No copy of the whole bank: ids and labels (cheap), then only the query vectors.
        ids, labels = bank.ids_and_labels()
        knn = np.zeros((k, k), dtype=np.float64)
        knn_acc = np.ones(k, dtype=np.float64)
        counts = np.bincount(labels, minlength=k)
        if len(ids) > 1:
            q_ids, q_vec, q_lab = bank.query_share(ids[self._query_subset(labels)])  # a sharded bank: this rank's
            knn, knn_acc = self._knn_disagreement(bank, q_ids, q_vec, q_lab)
        have = prob_count > 0
        combined = knn
        if have.any():
            soft = np.zeros((k, k), dtype=np.float64)
            soft[have] = prob_sum[have] / prob_count[have, None]
            np.fill_diagonal(soft, 0.0)
            # Classes without logits this window fall back to kNN alone.
            w = np.where(have[:, None], self.logit_weight, 0.0)
            combined = (1 - w) * knn + w * soft
        np.fill_diagonal(combined, 0.0)
        scores = combined if first else (1 - self.ema) * previous + self.ema * combined
        # sources: targeting's concern (hardneg.sources), run here on the refresh thread
        sources = self.source_finder(bank, self._candidate_pairs(scores, limit=self.source_pair_limit),
                                     self.sources_per_pair)
        with self._lock:
            self._scores = scores
            self._knn_accuracy = knn_acc
            self._counts = counts
            self._sources = sources
            self.refreshes += 1
            self.last_step = int(step)
            top = self.top_pairs(5)
            self.history.append(
                {
                    "step": int(step),
                    "mean_confusion": float(scores.sum() / max(k * (k - 1), 1)),
                    "top_pairs": [[p.a, p.b, p.score] for p in top],
                }
            )
        return scores.copy()

    def _query_subset(self, labels: np.ndarray) -> np.ndarray:
        n = len(labels)
        if n <= self.max_queries:
            return np.arange(n)
        per_class = max(1, self.max_queries // self.num_classes)
        picks = []
        for c in range(self.num_classes):
            idx = np.flatnonzero(labels == c)
            if len(idx) > per_class:
                idx = self._rng.choice(idx, size=per_class, replace=False)
            picks.append(idx)
        return np.sort(np.concatenate(picks))

    def _knn_disagreement(
        self, bank: EmbeddingBank, q_ids: np.ndarray, q_vec: np.ndarray, q_lab: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        k = self.num_classes
        # Chunked: each search holds the bank's read lock only briefly, so training-step upserts
        # (writers) slip in between chunks instead of waiting for the whole refresh.
        scores, nn_ids, nn_lab = bank.search_many(q_vec, self.knn_k + 1, self.search_chunk)
        not_self = (nn_ids != q_ids[:, None]) & (nn_ids >= 0)
        # Keep the first knn_k neighbours that are not the query itself.
        order = np.cumsum(not_self, axis=1)
        use = not_self & (order <= self.knn_k)
        if bank.metric == "cosine":
            weights = np.clip(scores, 0.0, None)
        else:
            weights = 1.0 / (1.0 + np.nan_to_num(scores, nan=np.inf))
        weights = np.where(use, np.nan_to_num(weights), 0.0)
        per_sample = np.zeros((len(q_ids), k), dtype=np.float64)
        rows = np.repeat(np.arange(len(q_ids)), nn_lab.shape[1])
        lab_flat = np.where(use, nn_lab, 0).ravel()
        np.add.at(per_sample, (rows, lab_flat), weights.ravel())
        totals = per_sample.sum(1, keepdims=True)
        per_sample = np.divide(per_sample, totals, out=np.zeros_like(per_sample), where=totals > 0)
        sums = np.zeros((k, k), dtype=np.float64)
        np.add.at(sums, q_lab, per_sample)
        n_per_class = np.bincount(q_lab, minlength=k)
        sums, n_per_class = bank.reduce_sum(sums, n_per_class)  # a sharded bank: over every rank's queries
        mean = sums / np.maximum(n_per_class, 1)[:, None]
        knn_acc = np.where(n_per_class > 0, np.diag(mean), 1.0)
        np.fill_diagonal(mean, 0.0)
        return mean, knn_acc

    def _candidate_pairs(self, s: np.ndarray, limit: int = 64) -> list[tuple[int, int]]:
        flat = np.argsort(-s, axis=None, kind="stable")[: min(limit, s.size)]
        return [(int(i // self.num_classes), int(i % self.num_classes)) for i in flat if s.flat[i] > 0]

    # ------------------------------------------------------------------ outputs
    def top_pairs(self, n: int = 5, min_score: float = 0.0) -> list[PairScore]:
        """The ``n`` highest-scoring directed pairs (score > ``min_score``) with their sources."""
        out = []
        with self._lock:
            for a, b in self._candidate_pairs(self._scores, limit=max(n, 1) * 4):
                score = float(self._scores[a, b])
                if score <= min_score:
                    continue
                out.append(PairScore(a, b, score, list(self._sources.get((a, b), []))))
                if len(out) == n:
                    break
        return out

    def sources_of(self, a: int, b: int) -> list[int]:
        """Source ids of the directed pair (a, b) from the last refresh: kept for the candidate pairs
        and their reverses (empty for any other pair)."""
        with self._lock:
            return list(self._sources.get((int(a), int(b)), []))

    def matrix(self) -> np.ndarray:
        """The EMA score matrix (K, K): row A, column B = how much A is pulled towards B."""
        with self._lock:
            return self._scores.copy()

    def class_difficulty(self) -> list[ClassDifficulty]:
        """Per-class confusion mass, kNN accuracy and bank count (for long-tail targeting)."""
        with self._lock:
            return [
                ClassDifficulty(c, float(self._scores[c].sum()), float(self._knn_accuracy[c]), int(self._counts[c]))
                for c in range(self.num_classes)
            ]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return self._state_dict_locked()

    def _state_dict_locked(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "scores": torch.from_numpy(self._scores.copy()),
            "knn_accuracy": torch.from_numpy(self._knn_accuracy.copy()),
            "counts": torch.from_numpy(self._counts.copy()),
            "prob_sum": torch.from_numpy(self._prob_sum.copy()),
            "prob_count": torch.from_numpy(self._prob_count.copy()),
            "sources": {f"{a},{b}": list(v) for (a, b), v in self._sources.items()},
            "refreshes": self.refreshes,
            "last_step": self.last_step,
            "history": [dict(h) for h in self.history],
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError(f"state has {state['num_classes']} classes, this graph has {self.num_classes}")
        with self._lock:
            self._load_state_dict_locked(state)

    def _load_state_dict_locked(self, state: dict[str, Any]) -> None:
        self._scores = np.asarray(state["scores"], dtype=np.float64).copy()
        self._knn_accuracy = np.asarray(state["knn_accuracy"], dtype=np.float64).copy()
        self._counts = np.asarray(state["counts"], dtype=np.int64).copy()
        self._prob_sum = np.asarray(state["prob_sum"], dtype=np.float64).copy()
        self._prob_count = np.asarray(state["prob_count"], dtype=np.int64).copy()
        self._sources = {tuple(int(x) for x in key.split(",")): list(v) for key, v in state["sources"].items()}
        self.refreshes = int(state["refreshes"])
        self.last_step = int(state["last_step"])
        self.history = [dict(h) for h in state["history"]]
        self._rng.bit_generator.state = state["rng"]


def pair_weights(pairs: list[PairScore]) -> dict[tuple[int, int], float]:
    """{(a, b): score} for buffer sampling that favours the currently confused pairs."""
    return {p.pair: p.score for p in pairs}


def describe_pairs(pairs: list[PairScore], class_names: Optional[list[str]] = None) -> str:
    """One line like ``3->8 0.214, 9->4 0.120`` for logs and the demo's epoch print."""
    name = (lambda c: class_names[c]) if class_names else str
    return ", ".join(f"{name(p.a)}->{name(p.b)} {p.score:.3f}" for p in pairs) or "(none yet)"


# ---------------------------------------------------------------------- options
@dataclass(frozen=True)
class ConfusionOptions:
    """Confusion mining's settings (``HardNegConfig`` fields of the same names; ``confusion_options``)."""

    knn_k: int = 10
    # steps between confusion refreshes (and generation requests); "auto": a quarter epoch, at most 50
    refresh_every: Union[int, Literal["auto"]] = "auto"
    # refresh after exactly these observed steps instead of every refresh_every (a fixed schedule)
    refresh_at: Optional[tuple[int, ...]] = None
    confusion_ema: float = 0.5  # weight of the newest refresh in the exponential moving average
    logit_weight: float = 0.5  # share of softmax confusion vs kNN disagreement in the score
    top_pairs: int = 5
    sources_per_pair: int = 16
    min_pair_score: float = 0.0  # pairs scoring at or below this are never targeted
    refresh_queries: int = 4096  # cap on bank samples used as kNN queries per refresh (stratified)
    async_refresh: bool = True  # mine confusion on a background thread, off the training step
    refresh_threads: int = 1  # FAISS (OpenMP) threads of the background refresh; 0 = FAISS's default (all cores)

    def __post_init__(self) -> None:
        from hardneg._checks import ConfigError, in_range, int_at_least, set_field

        int_at_least(self, "knn_k", 1)
        if self.refresh_every != "auto":
            if isinstance(self.refresh_every, str):
                raise ConfigError(f"refresh_every must be 'auto' or an integer >= 1, got {self.refresh_every!r}")
            int_at_least(self, "refresh_every", 1)
        if self.refresh_at is not None:
            steps = self.refresh_at
            if (not isinstance(steps, (list, tuple, set, frozenset)) or not steps
                    or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in steps)):
                raise ConfigError(f"refresh_at must be None or a non-empty sequence of step numbers >= 1, got "
                                  f"{steps!r}")
            set_field(self, "refresh_at", tuple(sorted(set(steps))))
        in_range(self, "confusion_ema", 0.0, 1.0, low_open=True)
        in_range(self, "logit_weight", 0.0, 1.0)
        int_at_least(self, "top_pairs", 1)
        int_at_least(self, "sources_per_pair", 1)
        in_range(self, "min_pair_score", 0.0, 1.0)
        int_at_least(self, "refresh_queries", 1)
        int_at_least(self, "refresh_threads", 0)

    def make_graph(self, num_classes: int, seed: int = 0) -> ConfusionGraph:
        """An empty :class:`ConfusionGraph` with these settings."""
        return ConfusionGraph(num_classes, self.knn_k, self.confusion_ema, self.logit_weight, self.sources_per_pair,
                              max_queries=self.refresh_queries, seed=seed)
