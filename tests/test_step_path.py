"""The training step's side of the engine: observe hands its work to a background thread, mix takes
rows drawn ahead of time, nothing reads a device value back, and deterministic draws stay exact."""

import threading

import pytest
import torch

from _engine_generators import make_result
from _toy_data import striped_data
from hardneg import HardNeg, HardNegConfig
from hardneg.plugin import HardNegError
from hardneg.step import MixedStep


def _cfg(**kw):
    base = dict(num_classes=4, refresh_every=10**6, buffer_size=64, synthetic_fraction=0.25, seed=0,
                label_mode="hard", embedding_dim=8)
    base.update(kw)
    return HardNegConfig(**base)


def _filled(engine, n=12, seed=0):
    """Put ``n`` generated 1x8x8 images of two pairs straight into the engine's buffer."""
    g = torch.Generator().manual_seed(seed)
    engine._accept([make_result(torch.rand(n // 2, 1, 8, 8, generator=g), (0, 1), 0.5, 0),
                    make_result(torch.rand(n - n // 2, 1, 8, 8, generator=g), (2, 3), 0.5, 1)])
    return engine


def _batch(step, n=8):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g),
            torch.randn(n, 8, generator=g), torch.arange(step * n, step * n + n) % 40)


def _hold(engine):
    """Block the engine's background (observe) thread until the returned event is set."""
    release, started = threading.Event(), threading.Event()

    def wait():
        started.set()
        assert release.wait(60)

    engine._background.submit(wait)
    engine._background.wake()  # submitted work waits for the next wake-up (the end of a mix)
    assert started.wait(60)
    return release


def test_observe_returns_before_the_bank_is_written_and_readers_wait_for_it():
    engine = HardNeg(_cfg())
    release = _hold(engine)
    _, y, emb, ids = _batch(0)
    engine.observe(embeddings=emb, labels=y, ids=ids)  # returns although the background thread is blocked
    assert len(engine._bank) == 0
    assert engine.step == 1
    threading.Timer(0.2, release.set).start()
    assert len(engine.bank) == 8  # reading the bank waits for the queued upsert
    assert engine.stats()["observed"] == 8
    engine.close()


def test_state_dict_and_close_lose_no_observation():
    engine = HardNeg(_cfg())
    for step in range(5):
        _, y, emb, ids = _batch(step)
        engine.observe(embeddings=emb, labels=y, ids=ids)
    state = engine.state_dict()
    assert sorted(state["bank"]["ids"].tolist()) == sorted(set(range(40)))
    assert state["counters"]["observed"] == 40
    engine.close()


@pytest.mark.parametrize("bad", ["nan", "label", "id"])
def test_bad_input_raises_at_the_call_and_records_nothing(bad):
    engine = HardNeg(_cfg())
    _, y, emb, ids = _batch(0)
    engine.observe(embeddings=emb, labels=y, ids=ids)
    _, y, emb, ids = _batch(1)
    if bad == "nan":
        emb[3, 2] = float("nan")
    elif bad == "label":
        y[0] = 4
    else:
        ids = ids.clone()
        ids[1] = -1
    with pytest.raises(HardNegError):
        engine.observe(embeddings=emb, labels=y, ids=ids)
    assert len(engine.bank) == 8 and engine.step == 1
    engine.close()


def test_a_failed_background_upsert_fails_the_next_call():
    engine = HardNeg(_cfg())
    _, y, emb, ids = _batch(0)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    engine._bank.upsert = broken
    engine.observe(embeddings=emb, labels=y, ids=ids)
    with pytest.raises(RuntimeError, match="disk full"):
        engine.state_dict()
    engine.close()


def test_mix_takes_the_prefetched_draw_and_draws_exactly_what_a_synchronous_mix_would():
    """Two engines in the same state: one takes each step's draw from the prefetch thread, the other
    has every prefetched draw undone and draws in mix (the synchronous path). Same rows, same order,
    same use counts and RNG state afterwards, including a step whose batch size changes."""
    runs = []
    for prefetch in (True, False):
        engine = _filled(HardNeg(_cfg(deterministic=True)))
        rows = []
        for step in range(6):
            n = 6 if step == 4 else 8  # a short batch: the draw made for 8 rows is undone
            x, y, emb, ids = _batch(step, n)
            if not prefetch:
                engine._prefetch.cancel()
            x2, y2, w = engine.mix(x, y)
            rows.append((x2.clone(), y2.clone()))
            engine.observe(embeddings=emb, labels=y, ids=ids)
        runs.append((rows, engine._prefetch.hits, engine.state_dict()["buffer"]))
        engine.close()
    (rows_a, hits_a, buf_a), (rows_b, hits_b, buf_b) = runs
    assert hits_a == 3 and hits_b == 0  # steps 1-3 (not the first, the short one, nor the one after it)
    for (xa, ya), (xb, yb) in zip(rows_a, rows_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(buf_a["meta"]["uses"], buf_b["meta"]["uses"])
    assert torch.equal(buf_a["rng_state"], buf_b["rng_state"])
    assert buf_a["counts"] == buf_b["counts"]


def test_an_image_hand_over_undoes_the_prefetched_draw_in_deterministic_mode():
    engine = _filled(HardNeg(_cfg(deterministic=True)))
    ref = _filled(HardNeg(_cfg(deterministic=True)))
    for e in (engine, ref):
        x, y, emb, ids = _batch(0)
        e.mix(x, y)
        e.observe(embeddings=emb, labels=y, ids=ids)
    assert engine._prefetch.pending
    ref._prefetch.cancel()
    more = make_result(torch.full((4, 1, 8, 8), 0.5), (1, 0), 0.5, 7)
    engine._accept([more])
    ref._accept([make_result(torch.full((4, 1, 8, 8), 0.5), (1, 0), 0.5, 7)])
    x, y, _, _ = _batch(1)
    a, b = engine.mix(x, y), ref.mix(x, y)
    assert torch.equal(a.x, b.x) and a.pairs == b.pairs
    engine.close()
    ref.close()


def test_mix_returns_a_step_that_unpacks_and_reduces_the_loss():
    engine = _filled(HardNeg(_cfg(synthetic_weight=0.5)))
    x, y, emb, ids = _batch(0)
    step = engine.mix(x, y)
    assert isinstance(step, MixedStep) and isinstance(step, tuple)
    x2, y2, w = step
    assert x2.shape[0] == 10 and step.n_real == 8 and step.n_synthetic == 2 and len(step.pairs) == 2
    per_sample = torch.arange(10, dtype=torch.float32)
    assert torch.allclose(step.loss(per_sample), (w * per_sample).sum() / w.sum())
    logits = torch.randn(10, 4)
    expected = (w * torch.nn.functional.cross_entropy(logits, y2, reduction="none")).sum() / w.sum()
    assert torch.allclose(step.cross_entropy(logits), expected)
    assert torch.equal(step.labels, y2)
    engine.observe(embeddings=torch.randn(10, 8), labels=y2, ids=ids, mixed=step)
    assert len(engine.bank) == 8  # generated rows never enter the bank
    engine.close()


def test_mix_and_observe_run_on_meta_tensors():
    """Meta tensors have shapes but no values: any host read on the step path raises on them."""
    engine = _filled(HardNeg(_cfg()))
    x = torch.empty(8, 1, 8, 8, device="meta")
    y = torch.empty(8, dtype=torch.long, device="meta")
    x2, y2, w = step = engine.mix(x, y)
    assert x2.is_meta and x2.shape[0] == 10 and step.n_synthetic == 2
    engine.observe(embeddings=torch.empty(10, 8, device="meta"), labels=y2,
                   logits=torch.empty(10, 4, device="meta"), ids=torch.arange(8), mixed=step)
    empty = HardNeg(_cfg())
    x3, _, w3 = empty.mix(x, y)
    assert x3 is x and w3.is_meta
    empty.observe(embeddings=torch.empty(8, 8, device="meta"), labels=y, ids=torch.arange(8))
    assert engine.step == 1 and empty.step == 1
    engine.close()
    empty.close()


def test_bare_cuda_resolves_to_the_current_device_on_the_constructing_thread(monkeypatch):
    from hardneg.threads import refresh_thread_init
    from hardneg.device import resolve_device
    from _engine_generators import BlendGenerator

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    made = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made.append(torch.device(d)))
    assert resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0") and resolve_device("cpu") == torch.device("cpu")
    data = striped_data(6, 4)
    engine = HardNeg(_cfg(worker_device="cuda"), dataset=data, generator=BlendGenerator(), start_worker=False,
                     device="cuda")
    assert engine.device == torch.device("cuda:1")
    assert engine.worker.device == torch.device("cuda:1")  # the worker thread / child sets it, not GPU 0
    refresh_thread_init(1, engine.device)  # what the refresh thread runs first
    assert made == [torch.device("cuda:1")]
    engine.close()


def test_reading_the_buffer_undoes_a_prefetched_draw():
    """The draw for the next mix starts at the end of this one; whoever reads engine.buffer sees the
    use counts of the draws made so far, however far the prefetch thread got."""
    engine = _filled(HardNeg(_cfg(deterministic=True)))
    x, y, _, _ = _batch(0)
    engine.mix(x, y)
    engine._prefetch._draw.future.result()  # the next draw has been made (and counted) on its thread
    assert int(engine.buffer.provenance()["uses"].sum()) == 2  # only the mixed rows: round(0.25 * 8)
    engine.close()


def test_background_finds_submitted_work_without_being_woken():
    """The training thread only appends: no notify while work keeps coming (the thread polls), and a
    thread that went to sleep after a quiet spell is woken by the next submission."""
    from hardneg.observer import Background

    bg = Background("hardneg-test-bg")
    first, second, third = threading.Event(), threading.Event(), threading.Event()
    bg.submit(first.set)
    assert first.wait(60)
    notified = []
    real_notify = bg._cond.notify
    bg._cond.notify = lambda n=1: (notified.append(n), real_notify(n))
    bg.submit(second.set)  # the thread polls: it finds this without a wake-up
    assert second.wait(60)
    assert notified == []
    bg.idle_after = 0.0  # from now on it sleeps (no timeout) as soon as it runs out of work
    bg.submit(lambda: None)
    bg.drain()
    bg.submit(third.set)  # found by a thread still finishing its loop, or woken from its sleep
    assert third.wait(60)
    failed = bg.submit(lambda: 1 / 0)
    failed.exception(timeout=60)
    with pytest.raises(ZeroDivisionError):
        bg.check()
    bg.close()


def test_a_background_task_gives_its_result_its_error_and_times_out():
    from concurrent.futures import TimeoutError as FutureTimeout

    from hardneg.observer import Background

    bg = Background("hardneg-test-task")
    gate = threading.Event()
    slow = bg.submit(lambda: gate.wait(60) and 7)
    bg.wake()
    with pytest.raises(FutureTimeout):
        slow.result(timeout=0.05)  # (it waits for the gate, which nothing has set)
    assert not slow.done()
    gate.set()
    assert slow.result(timeout=60) == 7 and slow.done() and slow.exception() is None
    failed = bg.run_later(lambda: [][1])
    bg.wake()
    assert isinstance(failed.exception(timeout=60), IndexError)
    with pytest.raises(IndexError):
        failed.result()
    bg.check()  # an untracked task's error stays with its reader
    bg.close()


def test_observe_records_the_values_passed_even_when_the_loop_reuses_its_tensors():
    engine = HardNeg(_cfg(metric="l2"))
    release = _hold(engine)  # the upsert runs after the loop has overwritten its tensors
    _, y, emb, ids = _batch(0)
    logits = torch.randn(8, 4)
    want_emb, want_y, want_ids = emb.clone(), y.clone(), ids.clone()
    engine.observe(embeddings=emb, labels=y, logits=logits, ids=ids)
    emb.fill_(float("nan"))
    y.fill_(0)
    ids.fill_(0)
    logits.fill_(float("nan"))
    release.set()
    got_ids, got_emb, got_y = engine.bank.lookup(want_ids)
    assert got_ids.tolist() == want_ids.tolist()
    assert torch.equal(torch.from_numpy(got_emb), want_emb) and got_y.tolist() == want_y.tolist()
    engine.close()


def test_a_mix_checks_a_batch_that_no_longer_looks_like_the_last_one():
    engine = _filled(HardNeg(_cfg()))
    for step in range(2):  # the second mix takes a prepared batch (the layout of the first)
        x, y, _, _ = _batch(step)
        engine.mix(x, y)
    x, y, _, _ = _batch(2)
    with pytest.raises(HardNegError, match="floating-point"):
        engine.mix((x * 255).to(torch.uint8), y)
    with pytest.raises(HardNegError, match="x \\(N, ...\\) and y \\(N,\\)"):
        engine.mix(x, y[:5])
    with pytest.raises(HardNegError, match="per-sample shape"):
        engine.mix(torch.rand(8, 1, 4, 4), y)
    xm, ym, _ = engine.mix(x, y)  # and a good batch still mixes
    assert xm.shape == (10, 1, 8, 8) and torch.equal(xm[:8], x)  # (append: two generated rows after the real ones)
    engine.close()


def test_labels_outside_the_classes_are_found_by_one_unsigned_maximum():
    import numpy as np

    from hardneg.observer import labels_outside

    assert not labels_outside(np.array([0, 3, 2], dtype=np.int64), 4)
    assert labels_outside(np.array([0, 4], dtype=np.int64), 4)
    assert labels_outside(np.array([1, -1], dtype=np.int64), 4)  # huge as unsigned
    assert labels_outside(np.array([1, -1], dtype=np.int32), 4) and not labels_outside(np.array([3], np.int32), 4)
    assert not labels_outside(np.array([], dtype=np.int64), 4)
