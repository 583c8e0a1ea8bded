"""Targeting policies: which (source class -> target class) pairs get generated, from which sources.

Serves the refresh event. A policy receives a small read-only :class:`PolicyContext` (the mined
pairs with their scores, class counts, a read-only view of the bank, ``sources(pair, n)``: the
boundary sources of a pair, :mod:`hardneg.sources`) and a budget of images, and returns a plan: a
list of :class:`PlannedPair` (pair, how many images, candidate source ids, optional fixed r),
like pytorch-metric-learning's ``BaseMiner``: the public :meth:`TargetingPolicy.plan` checks its
input and delegates to the policy's one method, :meth:`TargetingPolicy.choose`. No policy sees
the engine. :mod:`hardneg.requests` turns the plan into worker requests with r from the
curriculum. Policies, each with its typed options (``HardNegConfig`` flat fields in brackets):

* ``"confusion"`` (default, hardneg's method): the top confused pairs, images in proportion to
  their scores (a pair scoring below ``min_pair_share`` times the top pair's score gets none: it
  is no longer confused enough to pay for images), sources = the A samples closest to B. A pair whose target B is much more frequent
  than its source A is generated the other way (B -> A, labelled A), so on a long-tailed set the
  rare class gains images instead of lending its few samples to a head class
  (:class:`ConfusionPolicyOptions`: ``direction`` [``confusion_direction``]: ``"auto"``, the
  default, turns a pair when B has at least twice A's samples; ``"to-rarer"`` whenever B has more;
  ``"as-mined"`` never; ``min_pair_share`` [``min_pair_share``]).
* ``"same-class"`` (DA-Fusion baseline): target = source class, label kept, strength r either
  fixed or sampled from {0.25, 0.5, 0.75, 1.0} (:class:`SameClassOptions`: ``strength``
  [``same_class_strength``]); classes visited round-robin.
* ``"random-pairs"`` (offline GeNIe as published): uniformly random pairs A != B and random
  sources, at the curriculum's r.
* ``"long-tail"`` is registered by :mod:`hardneg.methods.long_tail` (``LongTailOptions``).

A new policy is one file plus one :func:`register_policy` call (its options dataclass names the
flat ``HardNegConfig`` field of each option in ``FLAT``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Sequence

import numpy as np

from hardneg._checks import ConfigError
from hardneg.confusion import PairScore
from hardneg.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from hardneg.bank import EmbeddingBank

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


class BankView:
    """A read-only view of the embedding bank for policies: searches, lookups, counts, means."""

    def __init__(self, bank: "EmbeddingBank") -> None:
        self._bank = bank

    def __len__(self) -> int:
        return len(self._bank)

    @property
    def dim(self) -> int:
        return self._bank.dim

    @property
    def metric(self) -> str:
        return self._bank.metric

    @property
    def num_classes(self) -> int:
        return self._bank.num_classes

    def class_counts(self) -> np.ndarray:
        return self._bank.class_counts()

    def class_means(self) -> np.ndarray:
        return self._bank.class_means()

    def ids_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        return self._bank.ids_and_labels()

    def get(self, ids: Any) -> Any:
        return self._bank.get(ids)

    def lookup(self, ids: Any) -> Any:
        return self._bank.lookup(ids)

    def search(self, queries: Any, k: int) -> Any:
        return self._bank.search(queries, k)

    def search_with_labels(self, queries: Any, k: int) -> Any:
        return self._bank.search_with_labels(queries, k)


def _no_sources(pair: tuple[int, int], n: Optional[int] = None) -> list[int]:
    return []


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may read at a refresh (built by the engine; nothing in it changes the engine).

    Attributes:
        num_classes: K.
        pairs: the top confused directed pairs with their scores and boundary sources (score order).
        class_counts: samples per class in the bank, int64 ``(K,)`` (zeros without a bank).
        bank: a read-only :class:`BankView`, or None before the first observed batch.
        sources: ``sources(pair, n=None)``: up to ``n`` boundary source ids of a directed pair, the
            samples of its source class closest to its target class (kept at each refresh for the
            candidate pairs and their reverses; empty for any other pair).
        sources_per_pair: how many sources a pair gets (``HardNegConfig.sources_per_pair``).
    """

    num_classes: int
    pairs: tuple[PairScore, ...] = ()
    class_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    bank: Optional[BankView] = None
    sources: Callable[..., list[int]] = _no_sources
    sources_per_pair: int = 16

    def known_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, labels) of every sample in the bank."""
        if self.bank is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return self.bank.ids_and_labels()

    @classmethod
    def of(cls, source: Any) -> "PolicyContext":
        """``source`` as a context: a context as is; an object with ``policy_context()`` (the engine)
        its context; else an object with ``confusions()``, ``bank`` and ``confusion`` (a graph with
        ``sources_of``), the shape policies used to read, so existing callers keep working."""
        if isinstance(source, PolicyContext):
            return source
        if hasattr(source, "policy_context"):
            return source.policy_context()
        bank = getattr(source, "bank", None)
        graph = getattr(source, "confusion", None)
        config = getattr(source, "config", None)
        k = getattr(config, "num_classes", None) or getattr(bank, "num_classes", None) or getattr(
            graph, "num_classes", 0)
        sources: Callable[..., list[int]] = _no_sources
        if graph is not None:
            sources = lambda pair, n=None: graph.sources_of(*pair)[:n]  # noqa: E731
        return cls(num_classes=int(k), pairs=tuple(source.confusions()),
                   class_counts=bank.class_counts() if bank is not None else np.zeros(int(k), dtype=np.int64),
                   bank=BankView(bank) if bank is not None else None, sources=sources,
                   sources_per_pair=int(getattr(config, "sources_per_pair", 16)))


class TargetingPolicy:
    """Base: ``plan(context, budget) -> list[PlannedPair]``; stateless unless it says otherwise.

    Subclasses implement :meth:`choose`; ``options`` names their typed options dataclass (if any).
    """

    name = "base"
    options: ClassVar[Optional[type]] = None

    def plan(self, context: Any, budget: int) -> list[PlannedPair]:
        """The plan for ``budget`` images from ``context`` (a :class:`PolicyContext`; see
        :meth:`PolicyContext.of` for what else is accepted)."""
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0:
            raise ValueError(f"budget must be an integer >= 0 (images to plan), got {budget!r}")
        return self.choose(PolicyContext.of(context), int(budget))

    def choose(self, context: PolicyContext, budget: int) -> list[PlannedPair]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class PolicyOptions:
    """Base of a policy's typed options: ``FLAT`` maps each option to its flat ``HardNegConfig`` field."""

    FLAT: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_config(cls, config: Any) -> Any:
        """These options from the flat fields of ``config``."""
        return cls(**{name: getattr(config, flat) for name, flat in cls.FLAT.items()})  # type: ignore[call-arg]

    def kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


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


@dataclass(frozen=True)
class ConfusionPolicyOptions(PolicyOptions):
    """Options of the ``"confusion"`` policy (:class:`ConfusionTargeting`)."""

    FLAT: ClassVar[dict[str, str]] = {"direction": "confusion_direction", "min_pair_share": "min_pair_share"}
    direction: str = "auto"
    min_pair_share: float = 0.0

    def __post_init__(self) -> None:
        if self.direction not in CONFUSION_DIRECTIONS:
            raise ConfigError(f"confusion_direction must be one of {CONFUSION_DIRECTIONS}, got {self.direction!r}")
        v = self.min_pair_share
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ConfigError(f"min_pair_share must lie in [0.0, 1.0], got {v!r}")


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
    options = ConfusionPolicyOptions

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

    def choose(self, context: PolicyContext, budget: int) -> list[PlannedPair]:
        pairs = list(context.pairs)
        if self.min_pair_share > 0 and pairs:
            floor = self.min_pair_share * max(p.score for p in pairs)
            pairs = [p for p in pairs if p.score >= floor]
        planned: dict[tuple[int, int], PlannedPair] = {}
        turning = self.direction != "as-mined" and context.bank is not None
        class_counts = context.class_counts if turning else None
        for p, n in zip(pairs, allocate(budget, [p.score for p in pairs])):
            pair, sources = p.pair, list(p.source_ids)
            if class_counts is not None and self._turns(class_counts, p.a, p.b):
                reverse = context.sources((p.b, p.a))
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

    def _sources(self, context: PolicyContext, cls: int, n: int) -> list[int]:
        ids, labels = context.known_samples()
        pool = ids[labels == cls]
        if len(pool) == 0:
            return []
        return self._rng.choice(pool, size=min(n, len(pool)), replace=False).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            self._rng.bit_generator.state = state["rng"]


@dataclass(frozen=True)
class SameClassOptions(PolicyOptions):
    """Options of the ``"same-class"`` policy (:class:`SameClassTargeting`): the fixed strength r of
    every image, or None to draw it per image from ``DA_FUSION_STRENGTHS``."""

    FLAT: ClassVar[dict[str, str]] = {"strength": "same_class_strength"}
    strength: Optional[float] = 0.5

    def __post_init__(self) -> None:
        v = self.strength
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v <= 1.0):
            raise ConfigError(f"same_class_strength must lie in (0, 1] or be None (drawn per image from "
                              f"{DA_FUSION_STRENGTHS}), got {v!r}")


class SameClassTargeting(_RandomSourcesMixin, TargetingPolicy):
    """DA-Fusion-style same-class augmentation: pair (c, c), label kept, strength t0."""

    name = "same-class"
    options = SameClassOptions

    def __init__(self, strength: Optional[float] = 0.5, seed: int = 0, classes_per_plan: int = 4) -> None:
        super().__init__(seed)
        self.strength = strength  # None: sample from DA_FUSION_STRENGTHS per image
        self.classes_per_plan = classes_per_plan
        self._next_class = 0

    def choose(self, context: PolicyContext, budget: int) -> list[PlannedPair]:
        k = context.num_classes
        classes = [(self._next_class + i) % k for i in range(min(self.classes_per_plan, k))]
        self._next_class = (self._next_class + len(classes)) % k
        out = []
        for c, n in zip(classes, allocate(budget, [1.0] * len(classes))):
            src = self._sources(context, c, n)
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

    def choose(self, context: PolicyContext, budget: int) -> list[PlannedPair]:
        k = context.num_classes
        out = []
        for n in allocate(budget, [1.0] * self.pairs_per_plan):
            a = int(self._rng.integers(k))
            b = int((a + 1 + self._rng.integers(k - 1)) % k)
            src = self._sources(context, a, n)
            if n and src:
                out.append(PlannedPair((a, b), n, src))
        return out


def _load_method_policies() -> None:
    try:  # the policies of hardneg.methods register themselves on import
        import hardneg.methods  # noqa: F401
    except ImportError:  # pragma: no cover - an optional dependency of a method module
        pass


# Policies by name: factory(config) -> TargetingPolicy, with the policy's options dataclass.
POLICIES: Registry[TargetingPolicy] = Registry("targeting policy", autoload=_load_method_policies)


def register_policy(name: str, factory: Callable[..., TargetingPolicy], options: Optional[type] = None) -> None:
    """Make ``HardNegConfig(targeting=name)`` build ``factory(config)``.

    ``options``: the policy's typed options (a frozen dataclass subclassing :class:`PolicyOptions`
    whose ``FLAT`` names the ``HardNegConfig`` field of each option); ``HardNegConfig`` validates
    them when it is built (``config.policy_options`` is the chosen policy's).
    """
    POLICIES.register(name, factory, options)


register_policy("confusion", lambda cfg: ConfusionTargeting(**cfg.options_of(ConfusionPolicyOptions).kwargs()),
                ConfusionPolicyOptions)
register_policy("same-class", lambda cfg: SameClassTargeting(
    strength=cfg.options_of(SameClassOptions).strength, seed=cfg.seed), SameClassOptions)
register_policy("random-pairs", lambda cfg: RandomPairsTargeting(seed=cfg.seed))


def make_policy(config: Any) -> TargetingPolicy:
    """The policy named by ``config.targeting``."""
    return POLICIES.build(config.targeting, config)
