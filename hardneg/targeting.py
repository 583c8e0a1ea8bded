"""Targeting policies: which (source class -> target class) pairs get generated, from which sources.

A policy turns the engine's current knowledge (confusion, bank, class counts) into a plan:
a list of :class:`PlannedPair` (pair, how many images, candidate source ids, optional fixed r).
The engine turns the plan into worker requests with r from the curriculum. Policies:

* ``"confusion"`` (default, hardneg's method): the top confused pairs, images in proportion to
  their scores (a pair scoring below ``min_pair_share`` times the top pair's score gets none: it
  is no longer confused enough to pay for images), sources = the A samples closest to B. A pair whose target B is much more frequent
  than its source A is generated the other way (B -> A, labelled A), so on a long-tailed set the
  rare class gains images instead of lending its few samples to a head class
  (``extra={"confusion_direction": ...}``: ``"auto"``, the default, turns a pair when B has at least
  twice A's samples; ``"to-rarer"`` whenever B has more; ``"as-mined"`` never).
* ``"same-class"`` (DA-Fusion baseline): target = source class, label kept, strength r either
  fixed or sampled from {0.25, 0.5, 0.75, 1.0}; classes visited round-robin.
* ``"random-pairs"`` (offline GeNIe as published): uniformly random pairs A != B and random
  sources, at the curriculum's r.
* ``"long-tail"`` is registered by :mod:`hardneg.methods.long_tail` when present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from hardneg.plugin import HardNeg

DA_FUSION_STRENGTHS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class PlannedPair:
    """Generate ``count`` images for ``pair`` from ``source_ids``; ``ratios`` overrides the curriculum."""

    pair: tuple[int, int]
    count: int
    source_ids: list[int]
    ratios: Optional[list[float]] = None
    label: Optional[int] = None  # label of the result; default the target class
    source_labels: Optional[list[int]] = None  # per source id; default pair[0] for all
    meta: dict[str, Any] = field(default_factory=dict)


class TargetingPolicy:
    """Base: ``plan(engine, budget) -> list[PlannedPair]``; stateless unless it says otherwise."""

    name = "base"

    def plan(self, engine: "HardNeg", budget: int) -> list[PlannedPair]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def allocate(total: int, scores: Sequence[float]) -> list[int]:
    """Split ``total`` into integer counts proportional to ``scores`` (largest remainder)."""
    s = np.asarray(scores, dtype=np.float64).clip(min=0)
    if len(s) == 0:
        return []
    if s.sum() <= 0:
        s = np.ones_like(s)
    raw = total * s / s.sum()
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


CONFUSION_DIRECTIONS = ("auto", "as-mined", "to-rarer")
AUTO_TURN_RATIO = 2.0  # "auto" turns A -> B around when B has at least this many times A's samples


class ConfusionTargeting(TargetingPolicy):
    """The currently most confused pairs, weighted by score, from their boundary sources.

    Args:
        direction: ``"as-mined"`` generates each confused pair A -> B as found (labelled B);
            ``"to-rarer"`` turns a pair around (B -> A, labelled A, from B's samples closest to A)
            when B has more samples in the bank than A; ``"auto"`` (default) turns it only when B
            has at least ``AUTO_TURN_RATIO`` (2) times A's samples, so balanced data is generated
            as mined. A pair whose reverse has no sources is generated as mined.
        min_pair_share: a pair whose score is below this share of the top pair's score gets no
            images; the budget goes to the others, still in proportion to score (0: every listed
            pair gets its share).

    Why turn pairs: on a long-tailed set the mined pairs are mostly tail -> head (the few tail
    samples sit among head samples). Generated as mined they relabel tail-like images as head
    classes, and the classifier's head bias makes the adaptive curriculum read them as easy and
    lower r further (measured on the long-tailed digits: benchmarks/README.md, accuracy).
    """

    name = "confusion"

    def __init__(self, direction: str = "auto", min_pair_share: float = 0.0) -> None:
        if direction not in CONFUSION_DIRECTIONS:
            raise ValueError(f"direction must be one of {CONFUSION_DIRECTIONS}, got {direction!r}")
        if not 0.0 <= float(min_pair_share) <= 1.0:
            raise ValueError(f"min_pair_share must lie in [0, 1], got {min_pair_share!r}")
        self.direction = direction
        self.min_pair_share = float(min_pair_share)

    def _turns(self, counts: Any, a: int, b: int) -> bool:
        if self.direction == "to-rarer":
            return bool(counts[b] > counts[a])
        return bool(counts[b] >= AUTO_TURN_RATIO * max(int(counts[a]), 1))

    def plan(self, engine: "HardNeg", budget: int) -> list[PlannedPair]:
        pairs = engine.confusions()
        if self.min_pair_share > 0 and pairs:
            floor = self.min_pair_share * max(p.score for p in pairs)
            pairs = [p for p in pairs if p.score >= floor]
        planned: dict[tuple[int, int], PlannedPair] = {}
        turning = self.direction != "as-mined" and engine.bank is not None
        class_counts = engine.bank.class_counts() if turning else None
        for p, n in zip(pairs, allocate(budget, [p.score for p in pairs])):
            pair, sources = p.pair, list(p.source_ids)
            if class_counts is not None and self._turns(class_counts, p.a, p.b):
                reverse = engine.confusion.sources_of(p.b, p.a)
                if reverse:
                    pair, sources = (p.b, p.a), reverse
            if not n or not sources:
                continue
            if pair in planned:  # both directions of one pair mined: one request stream
                planned[pair].count += n
            else:
                planned[pair] = PlannedPair(pair, n, sources, meta={"mined_as": list(p.pair)})
        return list(planned.values())


class _RandomSourcesMixin:
    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    def _sources(self, engine: "HardNeg", cls: int, n: int) -> list[int]:
        ids, labels = engine.known_samples()
        pool = ids[labels == cls]
        if len(pool) == 0:
            return []
        return self._rng.choice(pool, size=min(n, len(pool)), replace=False).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            self._rng.bit_generator.state = state["rng"]


class SameClassTargeting(_RandomSourcesMixin, TargetingPolicy):
    """DA-Fusion-style same-class augmentation: pair (c, c), label kept, strength t0."""

    name = "same-class"

    def __init__(self, strength: Optional[float] = 0.5, seed: int = 0, classes_per_plan: int = 4) -> None:
        super().__init__(seed)
        self.strength = strength  # None: sample from DA_FUSION_STRENGTHS per image
        self.classes_per_plan = classes_per_plan
        self._next_class = 0

    def plan(self, engine: "HardNeg", budget: int) -> list[PlannedPair]:
        k = engine.config.num_classes
        classes = [(self._next_class + i) % k for i in range(min(self.classes_per_plan, k))]
        self._next_class = (self._next_class + len(classes)) % k
        out = []
        for c, n in zip(classes, allocate(budget, [1.0] * len(classes))):
            src = self._sources(engine, c, n)
            if not n or not src:
                continue
            if self.strength is None:
                ratios = self._rng.choice(DA_FUSION_STRENGTHS, size=n).tolist()
            else:
                ratios = [float(self.strength)] * n
            out.append(PlannedPair((c, c), n, src, ratios=ratios))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "next_class": self._next_class}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._next_class = int(state.get("next_class", 0))


class RandomPairsTargeting(_RandomSourcesMixin, TargetingPolicy):
    """Published (offline) GeNIe: uniformly random pairs A != B, random sources of A."""

    name = "random-pairs"

    def __init__(self, seed: int = 0, pairs_per_plan: int = 4) -> None:
        super().__init__(seed)
        self.pairs_per_plan = pairs_per_plan

    def plan(self, engine: "HardNeg", budget: int) -> list[PlannedPair]:
        k = engine.config.num_classes
        out = []
        for n in allocate(budget, [1.0] * self.pairs_per_plan):
            a = int(self._rng.integers(k))
            b = int((a + 1 + self._rng.integers(k - 1)) % k)
            src = self._sources(engine, a, n)
            if n and src:
                out.append(PlannedPair((a, b), n, src))
        return out


POLICIES: dict[str, Callable[..., TargetingPolicy]] = {
    "confusion": lambda cfg: ConfusionTargeting(direction=cfg.extra.get("confusion_direction", "auto"),
                                                min_pair_share=getattr(cfg, "min_pair_share", 0.0)),
    "same-class": lambda cfg: SameClassTargeting(
        strength=cfg.extra.get("same_class_strength", 0.5), seed=cfg.seed),
    "random-pairs": lambda cfg: RandomPairsTargeting(seed=cfg.seed),
}


def register_policy(name: str, factory: Callable[..., TargetingPolicy]) -> None:
    """Make ``HardNegConfig(targeting=name)`` build ``factory(config)``."""
    POLICIES[name] = factory


def make_policy(config: Any) -> TargetingPolicy:
    """The policy named by ``config.targeting``."""
    name = config.targeting
    if name not in POLICIES:
        try:  # policies that live in optional method modules register themselves on import
            import hardneg.methods  # noqa: F401
        except ImportError:
            pass
    if name not in POLICIES:
        raise ValueError(f"unknown targeting policy {name!r}; known: {sorted(POLICIES)}")
    return POLICIES[name](config)
