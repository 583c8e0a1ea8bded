"""HardNeg engine: observation, capture hooks, the online loop wiring, failures, state, shutdown."""

import multiprocessing
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from _toy_data import striped_data
from hardneg import HardNeg, HardNegConfig
from hardneg.config import ConfigError
from hardneg.plugin import HardNegError

from _engine_generators import BlendGenerator, make_slow_blend_generator


def _toy_data(n_per_class=24, k=4, seed=0):
    return striped_data(n_per_class, k, seed)


class TinyNet(nn.Module):
    def __init__(self, k=4):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, k)

    def forward(self, x):
        return self.head(self.body(x))


def _cfg(**kw):
    base = dict(num_classes=4, refresh_every=2, top_pairs=3, knn_k=4, sources_per_pair=6, images_per_refresh=12,
                generation_batch=6, buffer_size=64, synthetic_fraction=0.25, curriculum="adaptive",
                adaptive_min_samples=2, total_steps=50, seed=0, label_mode="hard")  # hard: these tests check ids
    base.update(kw)
    return HardNegConfig(**base)


def _run_loop(engine, model, data, steps, batch_size=16, seed=0, check_batch=None):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=g)
    done = 0
    while done < steps:
        for x, y, idx in loader:
            x, y, w = engine.mix(x, y)
            if check_batch:
                check_batch(x, y, w)
            logits = model(x)
            loss = (w * nn.functional.cross_entropy(logits, y, reduction="none")).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            engine.observe(labels=y, logits=logits, ids=idx)
            done += 1
            if done >= steps:
                break
    return done


def test_state_dict_round_trips_exactly():
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    engine = HardNeg(_cfg(), model=model)
    _run_loop(engine, model, data, steps=7)
    state = engine.state_dict()
    other = HardNeg(_cfg())
    other.load_state_dict(state)
    assert other.step == engine.step == 7
    assert np.array_equal(other.confusion.matrix(), engine.confusion.matrix())
    a, b = engine.bank.snapshot(), other.bank.snapshot()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [p.pair for p in other.confusions()] == [p.pair for p in engine.confusions()]
    again = other.state_dict()
    assert again["step"] == state["step"] and torch.equal(again["bank"]["vectors"], state["bank"]["vectors"])


def test_timm_capture_equals_forward_head_pre_logits():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", num_classes=4, in_chans=1, pretrained=False)
    engine = HardNeg(_cfg(), model=model)
    x = torch.rand(6, 1, 32, 32)
    model.train()
    logits = model(x)
    captured = engine._captured_embeddings
    model.eval()
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
    assert captured.shape == (6, model.num_features)
    model.train()
    engine.observe(labels=torch.tensor([0, 1, 2, 3, 0, 1]), logits=logits, ids=torch.arange(6))
    assert len(engine.bank) == 6 and engine.bank.dim == model.num_features
    torch.testing.assert_close(engine.embed(x), ref, rtol=1e-4, atol=1e-4)


def test_named_layer_capture_and_eval_forward_is_ignored():
    model = TinyNet()
    engine = HardNeg(_cfg(), model=model, embedding_layer="body")
    model.eval()
    model(torch.rand(3, 1, 8, 8))
    assert engine._captured_embeddings is None  # eval passes (validation) never pollute the bank
    model.train()
    model(torch.rand(3, 1, 8, 8))
    assert engine._captured_embeddings.shape == (3, 16)
    with pytest.raises(HardNegError, match="no submodule"):
        HardNeg(_cfg(), model=model, embedding_layer="nope")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embeddings=torch.tensor([[float("nan"), 1.0]] * 2), labels=torch.tensor([0, 1]), ids=[0, 1]), "NaN"),
        (dict(embeddings=torch.ones(2, 2), labels=torch.tensor([0, 4]), ids=[0, 1]), "labels must lie"),
        (dict(embeddings=torch.ones(2, 2), labels=torch.tensor([0, 1])), "ids"),
        (dict(embeddings=torch.ones(2, 2), labels=torch.tensor([0, 1]), ids=[0, 1, 2]), "ids"),
        (dict(embeddings=torch.ones(2, 2, dtype=torch.long), labels=torch.tensor([0, 1]), ids=[0, 1]), "floating"),
        (dict(embeddings=torch.ones(2, 2), labels=torch.tensor([0, 1]), logits=torch.ones(2, 3), ids=[0, 1]), "logits"),
    ],
)
def test_bad_observations_raise_and_record_nothing(kwargs, match):
    engine = HardNeg(_cfg())
    engine.observe(torch.ones(2, 2), torch.tensor([2, 3]), ids=[10, 11])
    with pytest.raises(HardNegError, match=match):
        engine.observe(**kwargs)
    assert engine.step == 1 and len(engine.bank) == 2


def test_mix_is_identity_without_generated_samples():
    engine = HardNeg(_cfg())
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,))
    x2, y2, w = engine.mix(x, y)
    assert x2 is x and y2 is y and torch.equal(w, torch.ones(8))


def test_generation_requires_a_dataset():
    with pytest.raises(HardNegError, match="dataset"):
        HardNeg(_cfg(), generator=BlendGenerator())


def _wait_for_buffer(engine, n=1, timeout=120.0):
    """Images arrive when the refresh thread and the worker get to them: wait, with a generous deadline."""
    engine.wait_for_refresh(timeout)
    return engine.wait_for_images(n, timeout)


def _wait_for_pairs(engine, timeout=120.0):
    """The background refresh finishes when it finishes: wait on its result, with a generous deadline."""
    assert engine.wait_for_refresh(timeout), "the background refresh did not finish"
    return engine.confusions()


def test_online_loop_feeds_targeted_negatives_into_batches():
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    gen = BlendGenerator()
    seen = []

    def check(x, y, w):
        seen.append((x.shape[0], torch.isfinite(x).all().item()))

    with HardNeg(_cfg(), model=model, dataset=data, generator=gen) as engine:
        _run_loop(engine, model, data, steps=4)
        pairs = _wait_for_pairs(engine)
        assert pairs, "no confused pairs after refreshes"
        assert _wait_for_buffer(engine)
        _run_loop(engine, model, data, steps=6, check_batch=check)
        s = engine.stats()
    assert gen.calls > 0, "the worker uses the generator object it was given, not a deep copy (issue 18.7)"
    assert s["synthetic_used"] > 0 and s["requests_made"] > 0
    assert any(n > 16 for n, _ in seen) and all(ok for _, ok in seen)  # appended synthetic rows
    assert s["synthetic_feedback"] > 0  # synthetic rows were recognised in observe
    stored_pairs = set(engine.buffer.stats()["pairs"])
    mined = {f"{p.a}->{p.b}" for p in pairs} | {(p.a, p.b) for p in pairs} | {str((p.a, p.b)) for p in pairs}
    assert stored_pairs & mined, (stored_pairs, mined)
    assert len(engine.bank) == len(data)  # synthetic rows never enter the bank


class _GatedBlend(BlendGenerator):
    """A generator that cannot finish until the test opens ``gate`` (a generator slower than any step)."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def generate(self, *args, **kwargs):
        if not self.gate.wait(timeout=120):
            raise TimeoutError("test gate never opened")
        return super().generate(*args, **kwargs)


def test_slow_generator_never_blocks_the_step():
    """Events, not clocks: every step finishes while the generator cannot produce anything at all."""
    data = _toy_data()
    model = TinyNet()
    gate = threading.Event()
    with HardNeg(_cfg(refresh_every=1), model=model, dataset=data, generator=lambda: _GatedBlend(gate)) as engine:
        try:
            steps = _run_loop(engine, model, data, steps=10)
            assert engine.wait_for_refresh(120)
            steps += _run_loop(engine, model, data, steps=10)  # requests are pending: the steps still run
            s = engine.stats()
        finally:
            gate.set()
        assert engine.wait_for_images(1, 120)  # and once the generator can finish, its images arrive
    assert steps == 20 and s["requests_made"] > 0
    assert s["worker"]["images_produced"] == 0 and s["synthetic_used"] == 0


@pytest.mark.parametrize("gen", [BlendGenerator(fail_every=3), BlendGenerator(nan=True)], ids=["raises", "nan"])
def test_failing_generators_are_isolated(gen):
    data = _toy_data()
    model = TinyNet()
    batches = []
    cfg = _cfg(refresh_every=1, max_restarts=2)
    with HardNeg(cfg, model=model, dataset=data, generator=gen) as engine:
        _run_loop(engine, model, data, steps=12, check_batch=lambda x, y, w: batches.append(x))
        deadline = time.monotonic() + 120  # background refreshes skip while one runs: train until the
        while engine.stats()["requests_made"] < 6 and time.monotonic() < deadline:  # generator was called enough
            assert engine.wait_for_refresh(120)
            _run_loop(engine, model, data, steps=2, check_batch=lambda x, y, w: batches.append(x))
        assert engine.wait_for_refresh(120)
        engine.wait_for_generation(120)  # every request made so far has succeeded or failed
        _run_loop(engine, model, data, steps=4, check_batch=lambda x, y, w: batches.append(x))
        s = engine.stats()
    assert s["worker"]["failures"] >= 1
    assert all(torch.isfinite(x).all() for x in batches)
    stored = engine.buffer.state_dict()["images"]
    assert stored is None or bool(torch.isfinite(stored).all())


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_close_leaves_no_worker_thread_or_child_process(backend):
    data = _toy_data()
    before = set(threading.enumerate())
    engine = HardNeg(_cfg(worker_backend=backend), dataset=data, generator=make_slow_blend_generator)
    engine.observe(torch.rand(4, 3), torch.tensor([0, 1, 2, 3]), ids=[0, 1, 2, 3])
    engine.observe(torch.rand(4, 3), torch.tensor([0, 1, 2, 3]), ids=[4, 5, 6, 7])
    engine.close(timeout=10)
    engine.close()  # twice is fine
    assert multiprocessing.active_children() == []
    # multiprocessing's resource_sharer ("_serve") is a process-global fd server, not ours

    def leftover():
        return [t for t in threading.enumerate() if t not in before and t.is_alive() and "_serve" not in t.name]

    deadline = time.monotonic() + 60  # a joined thread may take a moment to leave threading.enumerate()
    while leftover() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert leftover() == []


def test_resumed_run_continues_where_it_stopped(tmp_path):
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    with HardNeg(_cfg(), model=model, dataset=data, generator=BlendGenerator()) as engine:
        _run_loop(engine, model, data, steps=4)
        assert _wait_for_buffer(engine, n=4)
        _run_loop(engine, model, data, steps=4)
        engine.save(str(tmp_path / "engine.pt"))
        state = engine.state_dict()
    with HardNeg(_cfg(), model=model, dataset=data, generator=BlendGenerator()) as resumed:
        resumed.load(str(tmp_path / "engine.pt"))
        assert resumed.step == 8 and len(resumed.buffer) == len(engine.buffer)
        saved = torch.load(str(tmp_path / "engine.pt"), weights_only=False)["curriculum"]
        assert saved["r"] or saved["counts"]  # the adaptive curriculum had learnt something to restore
        assert resumed.curriculum.state_dict() == saved  # all of it came back, not just the history
        x, y, w = resumed.mix(torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,)))
        assert x.shape[0] == 20  # the buffer came back: synthetic rows available at once
        _run_loop(resumed, model, data, steps=2)
        assert resumed.step == 10


def test_ada_curriculum_keeps_one_image_per_source_at_a_grid_ratio():
    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    cfg = _cfg(curriculum="ada", ada_grid=(0.3, 0.6, 0.9), generation_batch=6)
    with HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator()) as engine:
        _run_loop(engine, model, data, steps=2)
        assert _wait_for_buffer(engine, n=2)
        prov = engine.buffer.provenance()
        s = engine.stats()
    # each request carried every source at all 3 ratios; one image per source survives
    assert s["images_received"] == 3 * prov["slots"].numel() + s["images_rejected"]
    assert s["images_requested"] >= s["images_received"] and s["images_requested"] % 3 == 0  # 3 ratios per source
    assert {round(r, 4) for r in prov["ratios"].tolist()} <= {0.6, 0.9}
    assert any(len(v) for v in engine.curriculum.history.values())


def test_background_refresh_matches_inline_refresh():
    torch.manual_seed(0)
    data = _toy_data()
    emb = torch.randn(len(data), 6)
    emb[data.labels == 1] += 3.0  # one separable class; the rest overlap
    results = []
    for async_refresh in (True, False):
        engine = HardNeg(_cfg(refresh_every=4, async_refresh=async_refresh))
        for start in range(0, len(data), 24):
            sl = slice(start, start + 24)
            engine.observe(emb[sl], data.labels[sl], ids=torch.arange(len(data))[sl])
        engine.collect()
        engine.state_dict()  # waits for an in-flight background refresh
        results.append((engine.confusion.matrix(), [p.pair for p in engine.confusions()], engine.stats()))
        engine.close()
    (m_async, p_async, s_async), (m_sync, p_sync, _) = results
    np.testing.assert_allclose(m_async, m_sync)
    assert p_async == p_sync
    assert s_async["refreshes"] == 1


def test_background_refresh_searches_with_its_own_thread_cap():
    import faiss

    data = _toy_data()
    emb = torch.randn(len(data), 6, generator=torch.Generator().manual_seed(0))
    before = faiss.omp_get_max_threads()
    engine = HardNeg(_cfg(refresh_every=2, refresh_threads=1))
    try:
        for start in range(0, 48, 24):
            engine.observe(emb[start:start + 24], data.labels[start:start + 24], ids=torch.arange(start, start + 24))
        engine.state_dict()  # waits for the background refresh
        assert engine.stats()["refreshes"] == 1
        # the refresh thread's FAISS calls use 1 OpenMP thread; the training thread keeps its own setting
        assert engine._refresh_pool.submit(faiss.omp_get_max_threads).result() == 1
        assert faiss.omp_get_max_threads() == before
    finally:
        engine.close()
    with pytest.raises(ConfigError, match="refresh_threads"):
        _cfg(refresh_threads=-1)


def _deterministic_run(seed):
    torch.manual_seed(seed)
    data = _toy_data()
    model = TinyNet()
    cfg = _cfg(deterministic=True, seed=seed)
    with HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator(delay=0.01)) as engine:
        _run_loop(engine, model, data, steps=9, seed=seed)
        prov = engine.buffer.provenance()
        return prov, engine.confusion.matrix(), engine.stats()["synthetic_used"], [p.detach().clone() for p in model.parameters()]


def test_deterministic_mode_repeats_a_seeded_run_exactly():
    a, b = _deterministic_run(5), _deterministic_run(5)
    assert a[2] == b[2] and a[2] > 0
    for key in ("source_ids", "target_labels", "ratios"):
        assert torch.equal(a[0][key], b[0][key])
    np.testing.assert_array_equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


def test_all_zero_embeddings_are_skipped_and_counted():
    engine = HardNeg(_cfg())
    emb = torch.ones(4, 3)
    emb[1] = 0.0
    engine.observe(emb, torch.tensor([0, 1, 2, 3]), ids=[0, 1, 2, 3])
    assert len(engine.bank) == 3 and 1 not in engine.bank
    assert engine.stats()["zero_embeddings_skipped"] == 1


def test_planned_source_labels_reach_the_generator():
    from hardneg.targeting import PlannedPair

    data = _toy_data()
    with HardNeg(_cfg(), dataset=data, generator=BlendGenerator()) as engine:
        ids = [int((data.labels == c).nonzero()[0]) for c in (0, 1)]
        engine._request_generation([PlannedPair((0, 3), 2, ids, source_labels=[0, 1])])
        engine.wait_for_generation()
        prov = engine.buffer.provenance()
    assert sorted(prov["source_labels"].tolist()) == [0, 1]
    assert prov["target_labels"].tolist() == [3, 3]
