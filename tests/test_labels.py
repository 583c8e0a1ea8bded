"""Label trust: target weights (hard / soft-r / teacher), the arrival filter, soft labels through mix
and the loss, the band curriculum through the engine, persistence and determinism with it all on."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hardneg import HardNeg
from hardneg.buffer import SyntheticSample
from hardneg.labels import (
    filter_by_posterior, restricted_posterior, soft_targets, target_probability, target_weights,
)
from hardneg.mixing import mix_batch, weighted_loss
from hardneg.worker import GenerationRequest, GenerationResult

from _engine_generators import BlendGenerator, MarkerGenerator, MarkerTeacher
from test_plugin import TinyNet, _cfg, _run_loop, _toy_data


def _result(codes, pair=(0, 1), ratio=0.8, request_id=0, source_ids=None):
    """A finished result whose images carry marker codes (MarkerTeacher reads them as posteriors)."""
    n = len(codes)
    data = _toy_data()
    ids = torch.arange(n) if source_ids is None else torch.as_tensor(source_ids)
    src = data.images[ids]
    gen = MarkerGenerator(codes)
    req = GenerationRequest(request_id=request_id, pair=pair, source_ids=ids, sources=src,
                            source_labels=torch.full((n,), pair[0]), target_labels=torch.full((n,), pair[1]),
                            ratios=torch.full((n,), ratio), step=0)
    images = gen.generate(src, req.source_labels, req.target_labels, req.ratios)
    return GenerationResult(req.without_sources(), images)


def _same(a, b):
    """Recursive equality of nested states; tensors must match exactly (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                  and torch.equal(a.nan_to_num(), b.nan_to_num())))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


# ---------------------------------------------------------------------- pure functions
def test_restricted_posterior_is_the_softmax_ratio_of_target_and_source():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 3
    src = torch.tensor([0, 1, 2, 3, 4, 2])
    tgt = torch.tensor([1, 2, 3, 4, 0, 2])
    p = F.softmax(logits.double(), 1)
    want = p[torch.arange(6), tgt] / (p[torch.arange(6), src] + p[torch.arange(6), tgt])
    got = restricted_posterior(logits, src, tgt)
    torch.testing.assert_close(got[:5].double(), want[:5], rtol=0, atol=1e-6)
    assert got[5] == 1.0  # source == target: a one-class set
    assert torch.isnan(restricted_posterior(logits[:1], torch.tensor([0]), torch.tensor([7])))[0]
    torch.testing.assert_close(target_probability(logits, tgt).double(), p[torch.arange(6), tgt], rtol=0,
                               atol=1e-6)


def test_soft_r_weight_is_r_to_the_gamma_exactly():
    ratios = torch.tensor([0.64, 0.81, 0.5, 1.0])
    w = target_weights("soft-r", ratios, gamma=0.5)
    assert w.dtype == torch.float32
    assert torch.equal(w, (ratios.double() ** 0.5).float())
    assert w.tolist() == pytest.approx([0.8, 0.9, math.sqrt(0.5), 1.0], abs=1e-7)
    assert torch.equal(target_weights("soft-r", ratios, gamma=1.0), ratios)
    assert torch.equal(target_weights("hard", ratios), torch.ones(4))
    p = torch.tensor([0.3, 0.7, 0.5, 0.9])
    assert torch.equal(target_weights("teacher", ratios, teacher_p_target=p), p)
    with pytest.raises(ValueError, match="teacher"):
        target_weights("teacher", ratios)


def test_filter_keeps_the_band_and_counts_both_sides():
    p = torch.tensor([0.1, 0.5, 0.49, 0.95, 0.9, float("nan")])
    f = filter_by_posterior(p, 0.5, 0.9)
    assert f.keep.tolist() == [False, True, False, False, True, True]  # NaN: unscored, kept
    assert (f.low, f.high) == (2, 1)
    assert filter_by_posterior(p).keep.all() and filter_by_posterior(p, None, 0.9).low == 0


def test_soft_targets_split_the_mass_between_target_and_source():
    y = soft_targets(torch.tensor([1, 2]), torch.tensor([0, 2]), torch.tensor([0.8, 0.3]), 4)
    torch.testing.assert_close(y, torch.tensor([[0.2, 0.8, 0, 0], [0, 0, 1.0, 0]]))


# ---------------------------------------------------------------------- mix_batch
def _sample(weights, labels=(1, 2), sources=(0, 3)):
    k = len(labels)
    return SyntheticSample(
        images=torch.full((k, 1, 8, 8), 0.5), labels=torch.tensor(labels), source_labels=torch.tensor(sources),
        ratios=torch.full((k,), 0.7), pairs=torch.stack([torch.tensor(sources), torch.tensor(labels)], 1),
        slots=torch.arange(k), source_ids=torch.arange(k), steps=torch.zeros(k, dtype=torch.int64),
        target_weights=None if weights is None else torch.tensor(weights),
    )


def test_mix_gives_soft_targets_when_a_synthetic_weight_is_below_one():
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 3])
    m = mix_batch(x, y, _sample([0.8, 1.0]), num_classes=4)
    assert m.y.shape == (5, 4) and m.y.dtype == torch.float32
    torch.testing.assert_close(m.y[:3], F.one_hot(y, 4).float())
    torch.testing.assert_close(m.y[3:], torch.tensor([[0.2, 0.8, 0, 0], [0, 0, 1.0, 0]]))
    with pytest.raises(ValueError, match="num_classes"):
        mix_batch(x, y, _sample([0.8, 1.0]))
    soft = F.one_hot(y, 4).double() * 0.9 + 0.025  # e.g. label smoothing: kept as given
    ms = mix_batch(x, soft, _sample([0.5, 0.5]))
    assert ms.y.dtype == torch.float64 and torch.equal(ms.y[:3], soft)
    torch.testing.assert_close(ms.y[3], torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("weights", [None, [1.0, 1.0]])
def test_mix_with_full_weights_keeps_class_ids_exactly(weights):
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 3])
    m = mix_batch(x, y, _sample(weights), num_classes=4)
    assert m.y.dtype == torch.int64 and m.y.tolist() == [0, 1, 3, 1, 2]


# ---------------------------------------------------------------------- engine: weights and soft labels
def test_engine_stores_soft_r_weights_and_the_plain_loop_trains_on_them():
    from hardneg.training import soft_cross_entropy

    data = _toy_data()
    model = TinyNet()
    cfg = _cfg(label_mode="soft-r", label_gamma=3.0, synthetic_fraction=0.25)
    with HardNeg(cfg, model=model, dataset=data, generator=None) as engine:
        assert engine._accept([_result([0.5] * 4, pair=(0, 1), ratio=0.5)]) == 4
        w = engine.buffer.provenance()["target_weight"]
        assert torch.equal(w, torch.full((4,), 0.5).double().pow(3.0).float())  # 0.125 < 0.5: argmax = source
        x, y, ids = data.images[:16], data.labels[:16], torch.arange(16)
        xm, ym, wm = engine.mix(x, y)
        assert ym.shape == (20, 4)
        torch.testing.assert_close(ym[16:], torch.tensor([[0.875, 0.125, 0, 0]] * 4))
        logits = model(xm)
        per_sample = soft_cross_entropy(logits, ym)
        want = -(ym * F.log_softmax(logits, 1)).sum(1)
        torch.testing.assert_close(per_sample, want)
        assert want[16:].tolist() == pytest.approx(
            (-(0.875 * F.log_softmax(logits[16:], 1)[:, 0] + 0.125 * F.log_softmax(logits[16:], 1)[:, 1])).tolist(),
            abs=1e-6)
        fixed = torch.full((20, 4), -5.0)
        fixed[torch.arange(20), torch.cat([y, torch.ones(4, dtype=torch.long)])] = 5.0  # synthetic: predict target
        engine.observe(labels=ym, logits=fixed, ids=ids)  # soft labels are accepted...
        s = engine.stats()
    assert s["synthetic_feedback"] == 4 and s["synthetic_correct"] == 4  # ...and synthetic rows count as target 1
    assert len(engine.bank) == 16


def test_filter_drops_exactly_the_images_on_the_wrong_side():
    data = _toy_data()
    model = TinyNet()
    teacher = MarkerTeacher()
    cfg = _cfg(teacher="model", label_mode="teacher", filter_min_target=0.5, filter_max_target=0.9)
    codes = [0.2, 0.4, 0.6, 0.8, 0.95, 0.5, 0.45, 0.91]
    with HardNeg(cfg, model=model, dataset=data, teacher_model=teacher) as engine:
        model.train()
        added = engine._accept([_result(codes, pair=(0, 1)), _result([0.7, 0.1], pair=(2, 3), request_id=1)])
        prov, s = engine.buffer.provenance(), engine.stats()
    kept = [c for c in codes + [0.7, 0.1] if 0.5 <= c <= 0.9]
    assert added == len(kept) == 4
    assert (s["images_filtered_low"], s["images_filtered_high"]) == (4, 2)  # 0.2 0.4 0.45 0.1 | 0.95 0.91
    assert s["images_scored"] == s["images_received"] == 10
    torch.testing.assert_close(prov["teacher_p_target"], torch.tensor(kept), rtol=0, atol=1e-6)
    assert torch.equal(prov["target_weight"], prov["teacher_p_target"])  # label_mode="teacher"
    assert bool(((prov["model_p_target"] >= 0) & (prov["model_p_target"] <= 1)).all())
    assert model.training  # scoring switched it to eval and back


def test_filter_that_drops_a_whole_result_keeps_the_others():
    data = _toy_data()
    cfg = _cfg(teacher="model", filter_min_target=0.5)
    with HardNeg(cfg, model=TinyNet(), dataset=data, teacher_model=MarkerTeacher()) as engine:
        added = engine._accept([_result([0.1, 0.2], pair=(0, 1)), _result([0.7], pair=(2, 3), request_id=1)])
        s = engine.stats()
    assert added == 1 and s["images_filtered_low"] == 2 and s["buffer"]["added"] == 1


def test_filter_in_a_deterministic_loop_stores_only_plausible_images():
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    cfg = _cfg(deterministic=True, teacher="model", filter_min_target=0.5)
    with HardNeg(cfg, model=model, dataset=data, generator=MarkerGenerator(), teacher_model=MarkerTeacher()) as e:
        _run_loop(e, model, data, steps=8)
        prov, s = e.buffer.provenance(), e.stats()
    assert s["images_filtered_low"] > 0 and s["images_filtered_high"] == 0
    assert bool((prov["teacher_p_target"] >= 0.5).all()) and prov["slots"].numel() > 0
    assert s["images_received"] == s["buffer"]["added"] + s["images_rejected"] + s["images_filtered_low"]
    assert torch.equal(prov["target_weight"], torch.ones(prov["slots"].numel()))  # label_mode stays "hard"


# ---------------------------------------------------------------------- band curriculum through the engine
def _band_run(p, steps=24, **kw):
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    cfg = _cfg(deterministic=True, teacher="model", curriculum="band", difficulty_band=(0.6, 0.9), r_start=0.8,
               r_min=0.6, r_max=0.95, adaptive_step=0.05, adaptive_min_samples=4, **kw)
    with HardNeg(cfg, model=model, dataset=data, generator=MarkerGenerator(),
                 teacher_model=MarkerTeacher(fixed_p=p)) as e:
        _run_loop(e, model, data, steps=steps)
        return e.curriculum, e.buffer.provenance(), e.stats()


@pytest.mark.parametrize("p, direction", [(0.2, +1), (0.97, -1), (0.75, 0)])
def test_band_curriculum_moves_r_from_arrival_scores(p, direction):
    cur, prov, s = _band_run(p)
    assert s["images_scored"] > 0 and cur.decisions
    rs = [r for _, _, _, _, r in cur.decisions]
    assert all(0.6 - 1e-9 <= r <= 0.95 + 1e-9 for r in rs)
    requested = prov["ratios"]
    if direction > 0:  # images do not look like the target: easier (higher r), up to r_max
        assert max(rs) == pytest.approx(0.95) and all(m[3] < 0.6 for m in cur.decisions)
        assert float(requested.max()) == pytest.approx(0.95, abs=1e-6)
    elif direction < 0:  # too easy: lower r, down to r_min
        assert min(rs) == pytest.approx(0.6) and float(requested.min()) == pytest.approx(0.6, abs=1e-6)
    else:  # inside the band: r stays at r_start
        assert set(rs) == {0.8} and torch.allclose(requested, torch.tensor(0.8))
    assert s["synthetic_feedback"] > 0  # training-time forwards of reused samples happened, and were ignored:
    if direction == 0:
        assert {r for entries in cur.history.values() for _, r in entries} == {0.8}


# ---------------------------------------------------------------------- persistence and determinism
def _trust_cfg(**kw):
    return _cfg(deterministic=True, teacher="ema", teacher_decay=0.9, label_mode="teacher", curriculum="band",
                filter_min_target=0.1, adaptive_min_samples=4, **kw)


def test_state_round_trip_with_teacher_band_curriculum_and_soft_buffer():
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    with HardNeg(_trust_cfg(), model=model, dataset=data, generator=BlendGenerator()) as engine:
        _run_loop(engine, model, data, steps=10)
        state = engine.state_dict()
        assert state["teacher"]["updates"] == 10 and state["curriculum"]["kind"] == "band"
        assert bool((engine.buffer.provenance()["target_weight"] < 1).any())
        other = TinyNet()  # a different model: the teacher's EMA weights must come from the state
        with HardNeg(_trust_cfg(), model=other, dataset=data, generator=BlendGenerator()) as resumed:
            resumed.load_state_dict(copy.deepcopy(state))
            assert _same(resumed.state_dict(), state)
            for a, b in zip(resumed.teacher.module.parameters(), engine.teacher.module.parameters()):
                assert torch.equal(a, b)
            x, y = data.images[:16], data.labels[:16]
            ma, mb = engine.mix_batch(x, y), resumed.mix_batch(x, y)
    assert ma.y.ndim == 2 and ma.n_synthetic > 0
    assert torch.equal(ma.x, mb.x) and torch.equal(ma.y, mb.y) and torch.equal(ma.weights, mb.weights)


def _trust_run(seed):
    torch.manual_seed(seed)
    data = _toy_data()
    model = TinyNet()
    with HardNeg(_trust_cfg(seed=seed, min_pair_share=0.3), model=model, dataset=data,
                 generator=BlendGenerator(delay=0.01)) as engine:
        _run_loop(engine, model, data, steps=10, seed=seed)
        return (engine.buffer.provenance(), engine.curriculum.state_dict(), engine.teacher.state_dict(),
                [p.detach().clone() for p in model.parameters()], engine.stats()["images_scored"])


def test_deterministic_runs_repeat_exactly_with_label_trust_on():
    a, b = _trust_run(3), _trust_run(3)
    assert a[4] == b[4] > 0
    assert _same(a[0], b[0]) and _same(a[1], b[1]) and _same(a[2], b[2])
    assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


def test_hard_labels_score_nothing_and_keep_class_ids():
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    with HardNeg(_cfg(deterministic=True), model=model, dataset=data, generator=BlendGenerator()) as engine:
        _run_loop(engine, model, data, steps=6)
        assert engine.teacher is None
        prov, s = engine.buffer.provenance(), engine.stats()
        x, y, w = engine.mix(data.images[:16], data.labels[:16])
    assert prov["slots"].numel() > 0 and "teacher_p_target" not in prov and "model_p_target" not in prov
    assert torch.equal(prov["target_weight"], torch.ones(prov["slots"].numel()))
    assert s["images_scored"] == s["images_filtered_low"] == s["images_filtered_high"] == 0
    assert y.dtype == torch.int64 and y.ndim == 1 and x.shape[0] == 20


def test_the_default_labels_softly_by_r_without_a_teacher():
    """The measured best (benchmarks/README.md, accuracy): soft labels r^0.5, no teacher needed."""
    from hardneg.config import HardNegConfig

    assert HardNegConfig(num_classes=4).label_mode == "soft-r" and HardNegConfig(num_classes=4).teacher == "none"
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    cfg = _cfg(deterministic=True, label_mode=HardNegConfig(num_classes=4).label_mode)
    with HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator()) as engine:
        _run_loop(engine, model, data, steps=6)
        prov = engine.buffer.provenance()
        x, y, w = engine.mix(data.images[:16], data.labels[:16])
    torch.testing.assert_close(prov["target_weight"], prov["ratios"].double().pow(0.5).float())
    assert y.shape == (20, 4) and torch.allclose(y.sum(1), torch.ones(20))


def test_genie_ada_still_picks_one_image_per_source_and_is_scored_after_the_pick():
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    cfg = _cfg(deterministic=True, curriculum="ada", ada_grid=(0.3, 0.6, 0.9), teacher="ema", label_mode="soft-r")
    with HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator()) as engine:
        _run_loop(engine, model, data, steps=6)
        prov, s = engine.buffer.provenance(), engine.stats()
    assert prov["slots"].numel() > 0
    assert s["images_received"] == 3 * s["images_scored"]  # scored once per source, after GeNIe-Ada's choice
    assert {round(r, 4) for r in prov["ratios"].tolist()} <= {0.3, 0.6, 0.9}
    assert torch.equal(prov["target_weight"], (prov["ratios"].double() ** 0.5).float())
    assert bool(torch.isfinite(prov["teacher_p_target"]).all())


def test_balanced_posterior_removes_the_class_prior():
    from hardneg.labels import balanced_posterior

    logits = torch.zeros(3, 3)  # the teacher cannot tell the classes apart
    src, tgt = torch.tensor([0, 1, 0]), torch.tensor([1, 0, 2])
    p = balanced_posterior(logits, src, tgt, torch.tensor([90, 10, 0]))
    # a tie between 90 and 10 samples favours the rare one; class 2 has no samples: left as it was
    torch.testing.assert_close(p, torch.tensor([0.9, 0.1, 0.5]))
    torch.testing.assert_close(balanced_posterior(logits, src, tgt, torch.tensor([5, 5, 5])), torch.full((3,), 0.5))
    torch.testing.assert_close(balanced_posterior(logits, src, tgt, torch.tensor([90, 10, 0]), strength=0.0),
                               torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="class_counts"):
        balanced_posterior(logits, src, tgt, torch.tensor([1, 2]))


def test_balanced_posterior_at_half_strength_with_a_teacher_that_has_an_opinion():
    """strength 0.5 (0 and 1 are where strength**2 or an on/off switch also pass) and logits that are not a tie."""
    from hardneg.labels import balanced_posterior

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    src, tgt = torch.tensor([0, 0]), torch.tensor([1, 1])
    p = balanced_posterior(logits, src, tgt, torch.tensor([90, 10, 5]), strength=0.5)
    # sigmoid((l_t - l_s) - 0.5 * log(10 / 90)) = sigmoid(l_t - l_s + log 3)
    expected = torch.sigmoid(torch.tensor([-2.0, 1.0]) + math.log(3.0))
    torch.testing.assert_close(p, expected)


@pytest.mark.parametrize("correction, expected", [(1.0, 60 / (60 + 12)), (0.0, 0.5)])
def test_teacher_posterior_is_corrected_by_the_banks_class_prior(correction, expected):
    """On long-tailed data the teacher's view of a rare target is not lowered by the target's rarity."""
    labels = torch.tensor([0] * 60 + [1] * 12 + [2] * 12 + [3] * 12)
    cfg = _cfg(teacher="model", label_mode="teacher", teacher_prior_correction=correction)
    with HardNeg(cfg, model=TinyNet(), dataset=_toy_data(), teacher_model=MarkerTeacher(fixed_p=0.5)) as engine:
        engine.observe(embeddings=torch.randn(len(labels), 8), labels=labels, ids=torch.arange(len(labels)))
        assert engine.bank.class_counts()[:2].tolist() == [60, 12]
        engine._accept([_result([0.5] * 4, pair=(0, 1))])  # source class 0 (frequent) -> target 1 (rare)
        prov = engine.buffer.provenance()
    # a teacher torn 50/50 between a class of 60 and one of 12 samples: balanced, it favours the rare one
    torch.testing.assert_close(prov["teacher_p_target"], torch.full((4,), float(expected)), rtol=0, atol=1e-5)
    torch.testing.assert_close(prov["target_weight"], prov["teacher_p_target"])
