"""Noise-ratio curricula: schedule end points, adaptive moves, GeNIe-Ada choices, persistence."""

from __future__ import annotations

import math

import pytest

from hardneg.config import HardNegConfig
from hardneg.report import plot_ratio_over_time
from hardneg.curriculum import (
    AdaCurriculum,
    AdaptiveCurriculum,
    ConstantCurriculum,
    CosineCurriculum,
    Curriculum,
    LinearCurriculum,
    StepCurriculum,
    make_curriculum,
)


def cfg(**kw) -> HardNegConfig:
    return HardNegConfig(num_classes=10, **kw)


@pytest.mark.parametrize(
    "kind, cls",
    [
        ("constant", ConstantCurriculum),
        ("linear", LinearCurriculum),
        ("cosine", CosineCurriculum),
        ("step", StepCurriculum),
        ("adaptive", AdaptiveCurriculum),
        ("ada", AdaCurriculum),
    ],
)
def test_make_curriculum_builds_the_configured_kind(kind: str, cls: type) -> None:
    c = make_curriculum(cfg(curriculum=kind))
    assert type(c) is cls
    assert c.uses_ada == (kind == "ada")


@pytest.mark.parametrize("kind", ["linear", "cosine", "step"])
def test_time_schedules_go_from_r_start_to_r_end(kind: str) -> None:
    c = make_curriculum(cfg(curriculum=kind, r_start=0.9, r_end=0.4, total_steps=200))
    assert c.ratio((3, 8), 0) == pytest.approx(0.9)
    assert c.ratio((3, 8), 200) == pytest.approx(0.4)
    assert c.ratio((3, 8), 10_000) == pytest.approx(0.4)  # stays at the end after the horizon
    rs = [c.ratio((1, 2), s) for s in range(0, 201, 10)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rs, rs[1:]))  # easy -> hard
    assert c.ratio((3, 8), 77) == c.ratio((5, 6), 77)  # same for every pair


def test_schedule_shapes_in_the_middle() -> None:
    lin = LinearCurriculum(0.8, 0.4, total_steps=100)
    cos = CosineCurriculum(0.8, 0.4, total_steps=100)
    assert lin.ratio((0, 1), 25) == pytest.approx(0.7)
    assert cos.ratio((0, 1), 50) == pytest.approx(0.6)
    assert cos.ratio((0, 1), 25) == pytest.approx(0.4 + 0.4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert cos.ratio((0, 1), 25) > lin.ratio((0, 1), 25)  # cosine is slow at the start


def test_step_schedule_jumps_at_milestones() -> None:
    c = StepCurriculum(0.8, 0.5, total_steps=100, milestones=(0.25, 0.75))
    assert c.ratio((0, 1), 24) == pytest.approx(0.8)
    assert c.ratio((0, 1), 25) == pytest.approx(0.65)
    assert c.ratio((0, 1), 74) == pytest.approx(0.65)
    assert c.ratio((0, 1), 75) == pytest.approx(0.5)


def test_constant_ignores_feedback_and_time() -> None:
    c = make_curriculum(cfg(curriculum="constant", r_start=0.8))
    for step in range(0, 2000, 100):
        c.feedback((3, 8), 10, 10, step)
        assert c.ratio((3, 8), step) == pytest.approx(0.8)


def test_adaptive_moves_easy_pairs_down_and_hard_pairs_up_within_bounds() -> None:
    config = cfg(curriculum="adaptive", r_start=0.7, r_min=0.3, r_max=0.95, adaptive_step=0.05,
                 adaptive_min_samples=8, adaptive_high=0.8, adaptive_low=0.4)
    c = make_curriculum(config)
    easy, hard = (3, 8), (4, 9)

    def fake_model_correct(pair: tuple[int, int], n: int) -> int:
        return n if pair == easy else 0  # always right on (3, 8), always wrong on (4, 9)

    seen = {easy: [], hard: []}
    for step in range(60):
        for pair in (easy, hard):
            c.feedback(pair, fake_model_correct(pair, 4), 4, step)
            r = c.ratio(pair, step)
            assert config.r_min <= r <= config.r_max
            seen[pair].append(r)
    assert seen[easy][0] == pytest.approx(0.7) and seen[hard][0] == pytest.approx(0.7)
    assert all(b <= a for a, b in zip(seen[easy], seen[easy][1:]))
    assert all(b >= a for a, b in zip(seen[hard], seen[hard][1:]))
    assert c.ratio(easy, 60) == pytest.approx(0.3)  # reached the bound and stayed there
    assert c.ratio(hard, 60) == pytest.approx(0.95)
    # the moves were logged: history goes down for the easy pair, up for the hard one
    assert [r for _, r in c.history[easy]][:3] == pytest.approx([0.65, 0.6, 0.55])
    assert [r for _, r in c.history[hard]][:2] == pytest.approx([0.75, 0.8])


def test_adaptive_waits_for_min_samples_and_keeps_middle_accuracy() -> None:
    c = AdaptiveCurriculum(r_start=0.8, min_samples=10, step_size=0.1, high=0.8, low=0.4)
    c.feedback((1, 2), 9, 9, step=1)  # 9 < 10 samples: no decision yet
    assert c.ratio((1, 2), 1) == pytest.approx(0.8)
    assert c.window((1, 2)) == (9, 9)
    c.feedback((1, 2), 1, 1, step=2)  # 10/10 correct: harder
    assert c.ratio((1, 2), 2) == pytest.approx(0.7)
    assert c.window((1, 2)) == (0, 0)  # counters reset after the decision
    c.feedback((1, 2), 6, 10, step=3)  # 60%: inside [low, high], r stays
    assert c.ratio((1, 2), 3) == pytest.approx(0.7)
    assert c.ratio((5, 6), 3) == pytest.approx(0.8)  # other pairs untouched


def test_adaptive_start_is_clamped_into_bounds() -> None:
    c = AdaptiveCurriculum(r_start=0.99, r_min=0.3, r_max=0.9)
    assert c.ratio((0, 1), 0) == pytest.approx(0.9)


def test_feedback_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        make_curriculum(cfg(curriculum="adaptive")).feedback((0, 1), 5, 3, 0)
    with pytest.raises(ValueError):
        make_curriculum(cfg(curriculum="linear")).feedback((0, 1), -1, 3, 0)


def test_ada_returns_last_choice_or_r_start() -> None:
    c = make_curriculum(cfg(curriculum="ada", r_start=0.8, ada_grid=(0.5, 0.6, 0.7, 0.8, 0.9)))
    assert isinstance(c, AdaCurriculum) and c.uses_ada
    assert c.grid == (0.5, 0.6, 0.7, 0.8, 0.9)
    assert c.ratio((3, 8), 0) == pytest.approx(0.8)
    c.record_choice((3, 8), 0.6, step=10)
    c.record_choice((3, 8), 0.7, step=20)
    assert c.ratio((3, 8), 25) == pytest.approx(0.7)
    assert c.ratio((4, 9), 25) == pytest.approx(0.8)
    assert c.history[(3, 8)] == [(10, 0.6), (20, 0.7)]


def test_record_keeps_one_entry_per_step_and_history_is_a_copy() -> None:
    c = LinearCurriculum(0.8, 0.5, 100)
    c.record((1, 2), 5, 0.8)
    c.record((1, 2), 5, 0.75)  # same step again: replaced, not duplicated
    c.record((1, 2), 9, 0.7)
    assert c.history == {(1, 2): [(5, 0.75), (9, 0.7)]}
    c.history[(1, 2)].append((99, 0.1))
    assert len(c.history[(1, 2)]) == 2


@pytest.mark.parametrize("kind", ["linear", "adaptive", "ada"])
def test_state_dict_round_trip_continues_identically(kind: str) -> None:
    config = cfg(curriculum=kind, adaptive_min_samples=4)
    a = make_curriculum(config)
    for step in range(12):
        a.feedback((3, 8), 4, 4, step)
        a.feedback((4, 9), 1, 4, step)
        a.record((3, 8), step, a.ratio((3, 8), step))
    if isinstance(a, AdaCurriculum):
        a.record_choice((4, 9), 0.9, 11)
    a.feedback((3, 8), 2, 2, 12)  # half a window pending at save time
    b = make_curriculum(config)
    b.load_state_dict(a.state_dict())
    assert b.history == a.history
    for step in range(12, 30):
        for cur in (a, b):
            cur.feedback((3, 8), 2, 2, step)
        assert b.ratio((3, 8), step) == a.ratio((3, 8), step)
        assert b.ratio((4, 9), step) == a.ratio((4, 9), step)


def test_load_state_of_another_kind_is_an_error() -> None:
    state = make_curriculum(cfg(curriculum="linear")).state_dict()
    with pytest.raises(ValueError, match="linear"):
        make_curriculum(cfg(curriculum="adaptive")).load_state_dict(state)


def test_base_class_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        Curriculum().ratio((0, 1), 0)


def test_ratio_history_plot_writes_a_png(tmp_path) -> None:
    c = make_curriculum(cfg(curriculum="adaptive", adaptive_min_samples=2))
    for step in range(20):
        c.feedback((3, 8), 2, 2, step)
        c.feedback((4, 9), 0, 2, step)
    out = plot_ratio_over_time(c.history, tmp_path / "plots" / "r.png", class_names=[str(i) for i in range(10)])
    data = (tmp_path / "plots" / "r.png").read_bytes()
    assert out.endswith("r.png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    empty = plot_ratio_over_time({}, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG" and empty.endswith("empty.png")


# ---------------------------------------------------------------------- band (measured difficulty)
def _band(**kw):
    from hardneg.curriculum import BandCurriculum

    base = dict(r_start=0.8, r_min=0.6, r_max=0.9, band=(0.6, 0.9), step_size=0.05, min_samples=4)
    base.update(kw)
    return BandCurriculum(**base)


def test_make_curriculum_builds_band_from_the_config() -> None:
    from hardneg.curriculum import BandCurriculum

    c = make_curriculum(cfg(curriculum="band", teacher="ema", difficulty_band=(0.5, 0.7), adaptive_min_samples=3))
    assert type(c) is BandCurriculum and (c.low, c.high, c.min_samples) == (0.5, 0.7, 3)


def test_make_curriculum_passes_every_knob_to_its_field() -> None:
    """Distinct values for every r setting, so two swapped arguments cannot cancel out."""
    from hardneg.curriculum import BandCurriculum

    knobs = dict(r_start=0.7, r_end=0.45, r_min=0.2, r_max=0.9, adaptive_high=0.85, adaptive_low=0.35,
                 adaptive_step=0.07, adaptive_min_samples=5, total_steps=321, step_milestones=(0.3, 0.6),
                 ada_grid=(0.4, 0.55, 0.95), difficulty_band=(0.55, 0.75))
    a = make_curriculum(cfg(curriculum="adaptive", **knobs))
    assert (a.r_start, a.r_min, a.r_max, a.high, a.low, a.step_size, a.min_samples, a.total_steps) == (
        0.7, 0.2, 0.9, 0.85, 0.35, 0.07, 5, 321)
    b = make_curriculum(cfg(curriculum="band", teacher="ema", **knobs))
    assert isinstance(b, BandCurriculum)
    assert (b.r_start, b.r_min, b.r_max, b.low, b.high, b.step_size, b.min_samples, b.total_steps) == (
        0.7, 0.2, 0.9, 0.55, 0.75, 0.07, 5, 321)
    for kind in ("linear", "cosine", "step"):
        t = make_curriculum(cfg(curriculum=kind, **knobs))
        assert (t.r_start, t.r_end, t.total_steps) == (0.7, 0.45, 321), kind
    assert make_curriculum(cfg(curriculum="step", **knobs)).milestones == (0.3, 0.6)
    ada = make_curriculum(cfg(curriculum="ada", **knobs))
    assert (ada.grid, ada.r_start, ada.total_steps) == ((0.4, 0.55, 0.95), 0.7, 321)
    assert make_curriculum(cfg(curriculum="constant", **knobs)).ratio((0, 1), 300) == 0.7


def test_band_raises_r_below_the_band_lowers_it_above_and_keeps_it_inside() -> None:
    c = _band()
    low, high, inside = (0, 1), (2, 3), (4, 5)
    for step in range(6):
        c.arrival_feedback(low, [0.3] * 4, step, ratios=[c.ratio(low, step)] * 4)
        c.arrival_feedback(high, [0.95] * 4, step, ratios=[c.ratio(high, step)] * 4)
        c.arrival_feedback(inside, [0.7, 0.8, 0.65, 0.85], step)
    assert c.ratio(low, 6) == 0.9  # up by 0.05 per decision, clamped at r_max
    assert c.ratio(high, 6) == 0.6  # down to r_min
    assert c.ratio(inside, 6) == 0.8
    assert [r for _, r in c.history[low]] == [0.85, 0.9]
    assert len(c.decisions) == 18 and c.decisions[0][:3] == (0, 1, 0) and c.decisions[0][3] == pytest.approx(0.3)


def test_band_waits_for_min_samples_and_skips_stale_and_unscored_images() -> None:
    c = _band()
    c.arrival_feedback((0, 1), [0.1, 0.1, float("nan")], 0)
    assert c.ratio((0, 1), 0) == 0.8 and c.window((0, 1))[1] == 2
    c.arrival_feedback((0, 1), [0.1, 0.1, 0.1], 1, ratios=[0.7, 0.7, 0.8])  # two made at an older r
    assert c.window((0, 1)) == (pytest.approx(0.1), 3)
    c.arrival_feedback((0, 1), [0.1], 2)
    assert c.ratio((0, 1), 2) == 0.85
    c.feedback((0, 1), 0, 100, 3)  # training-time accuracy: ignored by this curriculum
    c.feedback((0, 1), 100, 100, 4)
    assert c.ratio((0, 1), 5) == 0.85 and c.window((0, 1))[1] == 0


def test_band_state_round_trip_continues_identically() -> None:
    a = _band()
    for step in range(5):
        a.arrival_feedback((3, 8), [0.2, 0.3], step)
    a.arrival_feedback((4, 9), [0.99], 5)  # half a window pending
    b = _band()
    b.load_state_dict(a.state_dict())
    assert b.history == a.history and b.decisions == a.decisions and b.window((4, 9)) == a.window((4, 9))
    for step in range(6, 20):
        for cur in (a, b):
            cur.arrival_feedback((4, 9), [0.95, 0.97], step)
            cur.arrival_feedback((3, 8), [0.1, 0.2], step)
        assert b.ratio((4, 9), step) == a.ratio((4, 9), step) and b.ratio((3, 8), step) == a.ratio((3, 8), step)
    assert a.ratio((4, 9), 20) == 0.6


def test_band_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="band"):
        _band(band=(0.9, 0.5))
    with pytest.raises(ValueError, match="r_min"):
        _band(r_min=0.95)


# ---------------------------------------------------------------------------- through the engine
@pytest.mark.parametrize("classified_as, r_after", [("target", 0.65), ("source", 0.75), ("other", 0.75)])
def test_engine_moves_adaptive_r_by_how_the_model_classifies_fresh_negatives(classified_as, r_after) -> None:
    """Fresh negatives of (0, 3) classified as their label 3: too easy, r drops; as anything else, r rises."""
    import torch

    from _engine_generators import make_result
    from hardneg import HardNeg

    pair = (0, 3)
    cfg = HardNegConfig(num_classes=4, curriculum="adaptive", r_start=0.7, r_min=0.3, r_max=0.95, adaptive_step=0.05,
                        adaptive_high=0.8, adaptive_low=0.4, adaptive_min_samples=4, synthetic_fraction=0.5,
                        label_mode="hard", refresh_every=1000, seed=0)
    engine = HardNeg(cfg)
    engine.buffer.add(make_result(torch.rand(4, 1, 4, 4), pair, 0.7), step=0)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    xm, ym, w = engine.mix(torch.rand(8, 1, 4, 4), y)
    assert engine.last_mix_pairs == [pair] * 4 and ym[8:].tolist() == [3] * 4
    predicted = {"target": 3, "source": 0, "other": 1}[classified_as]
    logits = torch.full((12, 4), -5.0)
    logits[torch.arange(8), y] = 5.0  # the real rows are right either way
    logits[8:, predicted] = 5.0
    engine.observe(embeddings=torch.randn(12, 6, generator=torch.Generator().manual_seed(0)), labels=ym,
                   logits=logits, ids=torch.arange(8))
    assert engine.curriculum.ratio(pair, engine.step) == pytest.approx(r_after)
    s = engine.stats()
    assert s["synthetic_feedback"] == 4 and s["synthetic_correct"] == (4 if classified_as == "target" else 0)
    assert len(engine.bank) == 8  # the 4 generated rows fed the curriculum, not the bank
