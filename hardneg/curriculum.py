"""Curricula over the GeNIe noise ratio r: which r to generate with, per class pair and step.

r is the difficulty knob of a GeNIe hard negative: high r (towards 1) is nearly a plain
text-to-image sample of the target class (easy), low r keeps most of the source image (hard; too
low and the label is wrong). A curriculum starts easy and moves towards hard:

* time schedules (``constant``, ``linear``, ``cosine``, ``step``) go from ``r_start`` to ``r_end``
  over ``total_steps``, the same for every pair;
* ``adaptive`` moves each pair's r from the model's accuracy on that pair's fresh negatives:
  easy for the model (accuracy above ``adaptive_high``) -> lower r, too hard (below
  ``adaptive_low``) -> higher r, clamped to ``[r_min, r_max]``;
* ``ada`` (GeNIe-Ada) lets the engine pick r per source from a grid of generations and records
  the choices here (:meth:`AdaCurriculum.record_choice`);
* ``band`` moves each pair's r from the measured difficulty of its *fresh* images: the teacher's
  posterior of the target (restricted to {source, target}) on images as they arrive, before
  anyone trains on them. Mean below ``difficulty_band[0]`` (the images do not look like their
  label) -> higher r; above ``difficulty_band[1]`` (too easy) -> lower r.

Every curriculum keeps a ``history`` of the r it handed out per pair (:meth:`Curriculum.record`)
for plots (:func:`hardneg.report.plot_ratio_over_time`) and a ``state_dict`` so a resumed run continues exactly.

Serves the refresh (``ratio``/``record``, called by :mod:`hardneg.requests`), ``observe``
(``feedback``) and arrival (``arrival_feedback``, ``record_choice``). Names: :data:`CURRICULA`, the one
list (a new curriculum is one class plus one registration); options: :class:`CurriculumOptions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Sequence

from hardneg.registry import Registry

if TYPE_CHECKING:
    from hardneg.config import HardNegConfig

Pair = tuple[int, int]
History = dict[Pair, list[tuple[int, float]]]


def _pair(pair: Sequence[int]) -> Pair:
    if len(pair) != 2:
        raise ValueError(f"a pair is (source class, target class), got {pair!r}")
    return int(pair[0]), int(pair[1])


class Curriculum:
    """Base class: ``ratio(pair, step)`` plus history, feedback and persistence.

    Subclasses implement :meth:`_ratio` (and, when they learn, :meth:`feedback` and the
    ``_extra_state`` pair). ``uses_ada`` tells the engine to generate a grid of r per source and
    report its GeNIe-Ada choice back.
    """

    kind: ClassVar[str] = "base"
    uses_ada: ClassVar[bool] = False

    def __init__(self, r_start: float = 0.8, r_end: float = 0.5, total_steps: int = 1000) -> None:
        for name, r in (("r_start", r_start), ("r_end", r_end)):
            if not 0.0 < float(r) <= 1.0:
                raise ValueError(f"{name} must lie in (0, 1], got {r!r}")
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
        self.r_start = float(r_start)
        self.r_end = float(r_end)
        self.total_steps = int(total_steps)
        self._history: History = {}

    # ------------------------------------------------------------------ public API
    def ratio(self, pair: Sequence[int], step: int) -> float:
        """The noise ratio r to generate with for ``pair`` at training ``step`` (no side effects)."""
        return float(self._ratio(_pair(pair), int(step)))

    def feedback(self, pair: Sequence[int], correct: int, total: int, step: int) -> None:
        """The model classified ``correct`` of ``total`` fresh negatives of ``pair`` right.

        Time schedules ignore it; :class:`AdaptiveCurriculum` moves r with it.
        """
        _check_counts(correct, total)

    def arrival_feedback(self, pair: Sequence[int], p_target: Sequence[float], step: int,
                         ratios: Optional[Sequence[float]] = None) -> None:
        """The teacher scored fresh images of ``pair`` at arrival (``p_target`` per image, generated
        at ``ratios``). Only :class:`BandCurriculum` uses it.
        """
        return None

    def record(self, pair: Sequence[int], step: int, r: float) -> None:
        """Log that r was used for ``pair`` at ``step`` (one entry per step: a repeat replaces it)."""
        entries = self._history.setdefault(_pair(pair), [])
        entry = (int(step), float(r))
        if entries and entries[-1][0] == entry[0]:
            entries[-1] = entry
        else:
            entries.append(entry)

    @property
    def history(self) -> History:
        """Per pair, the ``(step, r)`` entries logged so far (a copy)."""
        return {pair: list(entries) for pair, entries in self._history.items()}

    def state_dict(self) -> dict[str, Any]:
        """Settings, history and learnt per-pair state as plain Python values."""
        return {
            "kind": self.kind,
            "history": [[a, b, [[s, r] for s, r in entries]] for (a, b), entries in self._history.items()],
            **self._extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output of the same kind of curriculum."""
        if state.get("kind") != self.kind:
            raise ValueError(
                f"curriculum state is for {state.get('kind')!r}, this curriculum is {self.kind!r}"
            )
        self._history = {
            (int(a), int(b)): [(int(s), float(r)) for s, r in entries] for a, b, entries in state["history"]
        }
        self._load_extra_state(state)

    # ------------------------------------------------------------------ for subclasses
    def _ratio(self, pair: Pair, step: int) -> float:
        raise NotImplementedError

    def _progress(self, step: int) -> float:
        """Fraction of ``total_steps`` done, clamped to [0, 1]."""
        return min(max(step / self.total_steps, 0.0), 1.0)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(r_start={self.r_start}, r_end={self.r_end}, "
            f"total_steps={self.total_steps})"
        )


def _check_counts(correct: int, total: int) -> None:
    if int(total) < 0 or not 0 <= int(correct) <= int(total):
        raise ValueError(f"feedback needs 0 <= correct <= total, got correct={correct}, total={total}")


# ============================================================================ time schedules
class ConstantCurriculum(Curriculum):
    """r = ``r_start`` always (the paper's fixed setting is 0.8)."""

    kind = "constant"

    def _ratio(self, pair: Pair, step: int) -> float:
        return self.r_start


class LinearCurriculum(Curriculum):
    """r moves linearly from ``r_start`` at step 0 to ``r_end`` at ``total_steps``, then stays."""

    kind = "linear"

    def _ratio(self, pair: Pair, step: int) -> float:
        return self.r_start + (self.r_end - self.r_start) * self._progress(step)


class CosineCurriculum(Curriculum):
    """r follows half a cosine from ``r_start`` to ``r_end``: slow at both ends."""

    kind = "cosine"

    def _ratio(self, pair: Pair, step: int) -> float:
        f = self._progress(step)
        return self.r_end + (self.r_start - self.r_end) * 0.5 * (1.0 + math.cos(math.pi * f))


class StepCurriculum(Curriculum):
    """r jumps at ``milestones`` (fractions of ``total_steps``) in equal steps from r_start to r_end."""

    kind = "step"

    def __init__(
        self,
        r_start: float = 0.8,
        r_end: float = 0.5,
        total_steps: int = 1000,
        milestones: Sequence[float] = (0.5,),
    ) -> None:
        super().__init__(r_start, r_end, total_steps)
        self.milestones = tuple(sorted(float(m) for m in milestones))
        if not self.milestones or any(not 0.0 < m < 1.0 for m in self.milestones):
            raise ValueError(f"milestones must be fractions in (0, 1), got {milestones!r}")

    def _ratio(self, pair: Pair, step: int) -> float:
        f = self._progress(step)
        passed = sum(1 for m in self.milestones if f >= m)
        return self.r_start + (self.r_end - self.r_start) * passed / len(self.milestones)


# ============================================================================ feedback-driven
class _SteppedCurriculum(Curriculum):
    """Shared by the feedback curricula: a per-pair r in ``[r_min, r_max]`` moved by ``step_size``."""

    def __init__(self, r_start: float, r_min: float, r_max: float, step_size: float, min_samples: int,
                 total_steps: int) -> None:
        super().__init__(r_start, r_start, total_steps)
        if not 0.0 < r_min <= r_max <= 1.0:
            raise ValueError(f"need 0 < r_min <= r_max <= 1, got r_min={r_min}, r_max={r_max}")
        if not step_size > 0 or int(min_samples) < 1:
            raise ValueError(f"need step_size > 0 and min_samples >= 1, got {step_size}, {min_samples}")
        self.r_min, self.r_max = float(r_min), float(r_max)
        self.step_size = float(step_size)
        self.min_samples = int(min_samples)
        self._r: dict[Pair, float] = {}

    def _clamp(self, r: float) -> float:
        return min(max(r, self.r_min), self.r_max)

    def _ratio(self, pair: Pair, step: int) -> float:
        return self._r.get(pair, self._clamp(self.r_start))

    def _move(self, pair: Pair, step: int, direction: int) -> float:
        """Step the pair's r by ``direction`` (-1 harder, +1 easier, 0 stay); logs a move; returns the new r."""
        r = self._ratio(pair, step)
        new = round(self._clamp(r + direction * self.step_size), 10)  # no float drift after many small steps
        if new != r:
            self._r[pair] = new
            self.record(pair, step, new)
        return new


class AdaptiveCurriculum(_SteppedCurriculum):
    """Per pair r driven by the model's accuracy on that pair's synthetic negatives.

    Feedback is accumulated per pair; once ``min_samples`` have been seen the accuracy decides:
    above ``high`` the negatives are too easy and r drops by ``step_size`` (closer to the source,
    harder), below ``low`` they are too hard and r rises; then the window starts afresh. r stays
    in ``[r_min, r_max]`` and starts at ``r_start`` (clamped).
    """

    kind = "adaptive"

    def __init__(
        self,
        r_start: float = 0.8,
        r_min: float = 0.3,
        r_max: float = 0.95,
        high: float = 0.8,
        low: float = 0.4,
        step_size: float = 0.05,
        min_samples: int = 8,
        total_steps: int = 1000,
    ) -> None:
        super().__init__(r_start, r_min, r_max, step_size, min_samples, total_steps)
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
        self.high, self.low = float(high), float(low)
        self._counts: dict[Pair, list[int]] = {}  # pair -> [correct, total] in the current window

    def feedback(self, pair: Sequence[int], correct: int, total: int, step: int) -> None:
        """Add a window of feedback for ``pair``; may move its r (and logs the move in history)."""
        _check_counts(correct, total)
        p = _pair(pair)
        counts = self._counts.setdefault(p, [0, 0])
        counts[0] += int(correct)
        counts[1] += int(total)
        if counts[1] < self.min_samples:
            return
        accuracy = counts[0] / counts[1]
        self._counts[p] = [0, 0]
        self._move(p, step, -1 if accuracy > self.high else (1 if accuracy < self.low else 0))

    def window(self, pair: Sequence[int]) -> tuple[int, int]:
        """``(correct, total)`` feedback collected for ``pair`` since its last decision."""
        c = self._counts.get(_pair(pair), [0, 0])
        return c[0], c[1]

    def _extra_state(self) -> dict[str, Any]:
        return {
            "r": [[a, b, r] for (a, b), r in self._r.items()],
            "counts": [[a, b, c, t] for (a, b), (c, t) in self._counts.items()],
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._r = {(int(a), int(b)): float(r) for a, b, r in state["r"]}
        self._counts = {(int(a), int(b)): [int(c), int(t)] for a, b, c, t in state["counts"]}


class BandCurriculum(_SteppedCurriculum):
    """Per pair r that keeps the teacher's view of fresh images inside a difficulty band.

    The engine reports the teacher posterior ``p_target = P(target | {source, target})`` of every
    image of a pair when it arrives (:meth:`arrival_feedback`). Once ``min_samples`` scores are in,
    their mean decides: below ``low`` the images do not look like their target (wrong label or
    too hard) and r rises by ``step_size``; above ``high`` they are too easy and r drops; inside
    the band r stays. Then the window starts afresh. Only images generated at the pair's current
    r count (with ``ratios``): images requested before a move say nothing about the new r. r
    starts at ``r_start`` and stays in ``[r_min, r_max]``. Training-time feedback (:meth:`feedback`) is ignored: reused samples say
    how the model learnt them, not how hard they were when made.
    """

    kind = "band"

    def __init__(
        self,
        r_start: float = 0.8,
        r_min: float = 0.3,
        r_max: float = 0.95,
        band: Sequence[float] = (0.6, 0.9),
        step_size: float = 0.05,
        min_samples: int = 8,
        total_steps: int = 1000,
    ) -> None:
        super().__init__(r_start, r_min, r_max, step_size, min_samples, total_steps)
        low, high = (float(v) for v in band)
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"band must satisfy 0 <= low < high <= 1, got {tuple(band)}")
        self.low, self.high = low, high
        self._window: dict[Pair, list[float]] = {}  # pair -> [sum of p_target, count] since the last decision
        self._decisions: list[tuple[int, int, int, float, float]] = []  # (a, b, step, mean p, new r)

    def arrival_feedback(self, pair: Sequence[int], p_target: Sequence[float], step: int,
                         ratios: Optional[Sequence[float]] = None) -> None:
        """Add fresh scores for ``pair`` (non-finite ones, and with ``ratios`` those generated at
        another r than the pair's current one, are skipped); may move its r."""
        p = _pair(pair)
        current = self._ratio(p, step)
        scores = [float(v) for v in p_target]
        if ratios is not None:
            if len(ratios) != len(scores):
                raise ValueError(f"got {len(ratios)} ratios for {len(scores)} scores")
            scores = [v for v, r in zip(scores, ratios) if abs(float(r) - current) < 1e-6]
        values = [v for v in scores if math.isfinite(v)]
        if not values:
            return
        window = self._window.setdefault(p, [0.0, 0.0])
        window[0] += sum(values)
        window[1] += len(values)
        if window[1] < self.min_samples:
            return
        mean = window[0] / window[1]
        self._window[p] = [0.0, 0.0]
        new = self._move(p, step, 1 if mean < self.low else (-1 if mean > self.high else 0))
        self._decisions.append((p[0], p[1], int(step), mean, new))

    def window(self, pair: Sequence[int]) -> tuple[float, int]:
        """``(mean p_target, count)`` of the scores collected for ``pair`` since its last decision."""
        total, count = self._window.get(_pair(pair), [0.0, 0.0])
        return (total / count if count else float("nan")), int(count)

    @property
    def decisions(self) -> list[tuple[int, int, int, float, float]]:
        """Every decision so far: ``(a, b, step, mean p_target of the window, r after it)``."""
        return list(self._decisions)

    def _extra_state(self) -> dict[str, Any]:
        return {
            "r": [[a, b, r] for (a, b), r in self._r.items()],
            "window": [[a, b, t, c] for (a, b), (t, c) in self._window.items()],
            "decisions": [list(d) for d in self._decisions],
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._r = {(int(a), int(b)): float(r) for a, b, r in state["r"]}
        self._window = {(int(a), int(b)): [float(t), float(c)] for a, b, t, c in state["window"]}
        self._decisions = [(int(a), int(b), int(s), float(m), float(r)) for a, b, s, m, r in state["decisions"]]


class AdaCurriculum(Curriculum):
    """GeNIe-Ada: r is chosen per source by the engine from generations over ``grid``.

    :meth:`ratio` returns the pair's latest choice (``r_start`` before any); the engine reports
    each choice with :meth:`record_choice`.
    """

    kind = "ada"
    uses_ada = True

    def __init__(
        self, grid: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9), r_start: float = 0.8, total_steps: int = 1000
    ) -> None:
        super().__init__(r_start, r_start, total_steps)
        self.grid = tuple(float(r) for r in grid)
        if len(self.grid) < 2 or any(not 0.0 < r <= 1.0 for r in self.grid):
            raise ValueError(f"grid needs >= 2 ratios in (0, 1], got {grid!r}")
        self._last: dict[Pair, float] = {}

    def _ratio(self, pair: Pair, step: int) -> float:
        return self._last.get(pair, self.r_start)

    def record_choice(self, pair: Sequence[int], r: float, step: int) -> None:
        """The r GeNIe-Ada picked for one source of ``pair`` at ``step``."""
        p = _pair(pair)
        self._last[p] = float(r)
        self.record(p, step, float(r))

    def _extra_state(self) -> dict[str, Any]:
        return {"last": [[a, b, r] for (a, b), r in self._last.items()]}

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._last = {(int(a), int(b)): float(r) for a, b, r in state["last"]}


# ============================================================================ factory and plot
def make_curriculum(config: Any) -> Curriculum:
    """The curriculum ``config.curriculum`` names (a :class:`HardNegConfig` or a :class:`CurriculumOptions`),
    built by its :data:`CURRICULA` factory from the r settings."""
    options = config.curriculum_options if hasattr(config, "curriculum_options") else config
    return CURRICULA.build(options.curriculum, options)


# The one list of curriculum names: HardNegConfig(curriculum=...) is checked against it. A new
# curriculum is one class plus one CURRICULA.register(name, factory(options) -> Curriculum) line.
CURRICULA: Registry[Curriculum] = Registry("curriculum")
CURRICULA.register("constant", lambda o: ConstantCurriculum(o.r_start, o.r_start, o.total_steps))
CURRICULA.register("linear", lambda o: LinearCurriculum(o.r_start, o.r_end, o.total_steps))
CURRICULA.register("cosine", lambda o: CosineCurriculum(o.r_start, o.r_end, o.total_steps))
CURRICULA.register("step", lambda o: StepCurriculum(o.r_start, o.r_end, o.total_steps, o.step_milestones))
CURRICULA.register("adaptive", lambda o: AdaptiveCurriculum(
    o.r_start, o.r_min, o.r_max, o.adaptive_high, o.adaptive_low, o.adaptive_step, o.adaptive_min_samples,
    o.total_steps))
CURRICULA.register("ada", lambda o: AdaCurriculum(o.ada_grid, o.r_start, o.total_steps))
CURRICULA.register("band", lambda o: BandCurriculum(
    o.r_start, o.r_min, o.r_max, o.difficulty_band, o.adaptive_step, o.adaptive_min_samples, o.total_steps))


@dataclass(frozen=True)
class CurriculumOptions:
    """The noise-ratio curriculum's settings (``HardNegConfig`` fields of the same names;
    ``curriculum_options``)."""

    curriculum: str = "adaptive"  # a name of CURRICULA
    r_start: float = 0.8
    r_end: float = 0.5
    r_min: float = 0.3
    r_max: float = 0.95
    total_steps: int = 1000  # horizon of the time-based schedules
    step_milestones: tuple[float, ...] = (0.5,)  # fractions of total_steps for the "step" schedule
    adaptive_high: float = 0.8  # pair accuracy on fresh negatives above this: lower r (harder)
    adaptive_low: float = 0.4  # below this: raise r (easier)
    adaptive_step: float = 0.05
    adaptive_min_samples: int = 8  # feedback samples needed before a pair's r moves
    ada_grid: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    # "band": per pair, the mean teacher posterior of fresh images below the band -> raise r, above -> lower r
    difficulty_band: tuple[float, float] = (0.6, 0.9)

    def __post_init__(self) -> None:
        from hardneg._checks import ConfigError, choice, in_range, int_at_least, set_field

        choice(self, "curriculum", tuple(CURRICULA))
        for name in ("r_start", "r_end", "r_min", "r_max"):
            in_range(self, name, 0.0, 1.0, low_open=True)
        if self.r_min > self.r_max:
            raise ConfigError(f"r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        int_at_least(self, "total_steps", 1)
        set_field(self, "step_milestones", tuple(float(m) for m in self.step_milestones))
        for m in self.step_milestones:
            if not 0.0 < m < 1.0:
                raise ConfigError(f"step_milestones entries must lie in (0, 1), got {m}")
        in_range(self, "adaptive_high", 0.0, 1.0)
        in_range(self, "adaptive_low", 0.0, 1.0)
        if self.adaptive_low >= self.adaptive_high:
            raise ConfigError(
                f"adaptive_low ({self.adaptive_low}) must be below adaptive_high ({self.adaptive_high})"
            )
        in_range(self, "adaptive_step", 0.0, 1.0, low_open=True)
        int_at_least(self, "adaptive_min_samples", 1)
        set_field(self, "ada_grid", tuple(float(r) for r in self.ada_grid))
        if len(self.ada_grid) < 2 or any(not 0.0 < r <= 1.0 for r in self.ada_grid):
            raise ConfigError(f"ada_grid needs >= 2 ratios in (0, 1], got {self.ada_grid}")
        if list(self.ada_grid) != sorted(self.ada_grid):
            raise ConfigError(f"ada_grid must be increasing, got {self.ada_grid}")
        band = tuple(self.difficulty_band) if isinstance(self.difficulty_band, (tuple, list)) else None
        if band is None or len(band) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                 for v in band):
            raise ConfigError(f"difficulty_band must be a (low, high) pair of numbers, got {self.difficulty_band!r}")
        set_field(self, "difficulty_band", (float(band[0]), float(band[1])))
        low, high = self.difficulty_band
        if not 0.0 <= low < high <= 1.0:
            raise ConfigError(f"difficulty_band must satisfy 0 <= low < high <= 1, got {self.difficulty_band}")
