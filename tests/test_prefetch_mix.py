"""The step path's cheap parts: a mixed batch prepared on the helper thread (mix only copies the real
rows in), the helper thread's gate (it starts nothing while the training thread is in the engine),
and upserts held back while a background refresh reads the bank."""

import threading
import time

import pytest
import torch

from _engine_generators import make_result
from hardneg import HardNeg, HardNegConfig
from hardneg.buffer import SyntheticBuffer
from hardneg.mixing import MixLayout, mix_batch, prepare_mix
from hardneg.observer import Background


def _sample(k=3, soft=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    buf = SyntheticBuffer(16, seed=seed)
    weights = torch.full((6,), 0.7) if soft else None
    buf.add(make_result(torch.rand(6, 1, 4, 4, generator=g), (2, 1), 0.5), step=0, target_weight=weights)
    return buf.sample(k, step=0)


@pytest.mark.parametrize("mode", ["append", "substitute"])
@pytest.mark.parametrize("labels", ["ids", "soft-y", "soft-weights"])
def test_a_prepared_mix_is_the_real_rows_then_the_drawn_ones(mode, labels):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 4, 4, generator=g)
    y = torch.randint(0, 4, (5,), generator=g)
    if labels == "soft-y":
        y = torch.nn.functional.one_hot(y, 4).float()
    s = _sample(3, soft=labels == "soft-weights")
    layout = MixLayout.of(x, y, mode, 0.5, num_classes=4)
    prepared = prepare_mix(s, 5, layout)
    assert prepared.fits(x, y)
    out = prepared.fill(x, y)
    n_real = 5 if mode == "append" else 2
    assert out.n_real == n_real and out.x.shape[0] == n_real + 3
    assert torch.equal(out.x, torch.cat([x[:n_real], s.images]))
    if labels == "ids":
        assert torch.equal(out.y, torch.cat([y[:n_real], s.labels]))
    elif labels == "soft-y":
        assert torch.equal(out.y, torch.cat([y[:n_real], torch.nn.functional.one_hot(s.labels, 4).float()]))
    else:  # soft targets: real rows one-hot, generated rows 0.7 on the target (1), 0.3 on the source (2)
        assert torch.equal(out.y[:n_real], torch.nn.functional.one_hot(y[:n_real], 4).float())
        assert torch.allclose(out.y[n_real:], torch.tensor([[0.0, 0.7, 0.3, 0.0]] * 3))
    assert out.weights.tolist() == [1.0] * n_real + [0.5] * 3
    assert out.synthetic_mask.tolist() == [False] * n_real + [True] * 3
    assert prepared.pairs == [(2, 1)] * 3
    for a, b in zip(out.as_tuple(), mix_batch(x, y, s, mode=mode, synthetic_weight=0.5, num_classes=4).as_tuple()):
        assert torch.equal(a, b)  # mix_batch is a prepare and a fill
    with pytest.raises(ValueError, match="filled already"):
        prepared.fill(x, y)  # its tensors are the batch handed out: never refilled


def test_a_prepared_mix_does_not_fit_another_batch():
    x, y = torch.rand(5, 1, 4, 4), torch.randint(0, 4, (5,))
    prepared = prepare_mix(_sample(), 5, MixLayout.of(x, y))
    assert not prepared.fits(x[:4], y[:4])  # another batch size
    assert not prepared.fits(x.double(), y)  # another dtype
    assert not prepared.fits(x, y.int())  # another label dtype
    assert not prepared.fits(torch.rand(5, 1, 8, 8), y)  # another image size
    assert prepared.fits(x, y)


def test_mix_fills_the_batch_prepared_on_the_helper_thread(monkeypatch):
    import hardneg.plugin

    mixed_on_the_step = []
    real_mix_batch = hardneg.plugin.mix_batch
    monkeypatch.setattr(hardneg.plugin, "mix_batch", lambda *a, **k: mixed_on_the_step.append(1) or real_mix_batch(*a, **k))
    cfg = HardNegConfig(num_classes=4, refresh_every=10**6, buffer_size=64, synthetic_fraction=0.25, seed=0,
                        label_mode="hard", embedding_dim=8)
    engine = HardNeg(cfg)
    engine._accept([make_result(torch.rand(8, 1, 8, 8), (0, 1), 0.5)])
    for step in range(4):
        x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,))
        xm, ym, w = engine.mix(x, y)
        assert torch.equal(xm[:8], x) and xm.shape[0] == 10  # append (the default): the 8 real rows + 2
        engine.observe(embeddings=torch.randn(xm.shape[0], 8), labels=ym, ids=torch.arange(8))
    assert engine._prefetch.hits == 3 and engine._prefetch.prepared_taken == 3  # every step after the first
    assert len(mixed_on_the_step) == 1  # only the first mix built its batch on the training thread
    engine.close()


def test_the_gate_holds_queued_work_until_released_or_woken():
    bg = Background("hardneg-test-gate")
    bg.max_hold = 600.0
    bg.submit(lambda: None)
    bg.drain()  # the thread is running
    ran = threading.Event()
    bg.hold()
    bg.submit(ran.set)
    assert not ran.wait(0.5)  # shut: nothing starts (it would within a poll interval otherwise)
    bg.release()
    assert ran.wait(60)  # open: found at the next look, without a wake-up
    woken = threading.Event()
    bg.hold()
    bg.submit(woken.set)
    bg.wake()  # a reader waiting for queued work opens it until the queue is empty
    assert woken.wait(60)
    late = threading.Event()
    bg.max_hold = 0.1  # a loop that stopped calling: the gate opens by itself
    bg.hold()
    bg.submit(late.set)
    assert late.wait(60)
    bg.close()


def test_upserts_wait_out_a_background_refresh_and_land_in_order():
    cfg = HardNegConfig(num_classes=4, refresh_every=10**6, buffer_size=64, seed=0, embedding_dim=8,
                        metric="l2")
    engine = HardNeg(cfg)
    g = torch.Generator().manual_seed(0)
    first = torch.randn(8, 8, generator=g)
    engine.observe(embeddings=first, labels=torch.arange(8) % 4, ids=torch.arange(8))
    assert len(engine.bank) == 8
    started, release = threading.Event(), threading.Event()
    real_refresh = engine._confusion.refresh

    def slow_refresh(bank, step):
        started.set()
        assert release.wait(60)
        return real_refresh(bank, step)

    engine._confusion.refresh = slow_refresh
    engine._start_background_refresh()
    assert started.wait(60)
    later = [torch.randn(8, 8, generator=g) for _ in range(3)]
    for step, emb in enumerate(later):  # ids 4..11: half re-observed, half new, three times over
        engine.observe(embeddings=emb, labels=torch.arange(8) % 4, ids=torch.arange(4, 12))
    engine._background.wake()
    done = engine._background.submit(lambda: None)
    done.result(timeout=60)  # the three records ran without waiting for the refresh ...
    assert len(engine._deferred_upserts) == 3 and len(engine._bank) == 8  # ... and held their rows back
    release.set()
    assert engine.wait_for_refresh(60)
    ids, vectors, _ = engine.bank.lookup(torch.arange(12))  # reading the bank applies them, oldest first
    assert len(engine.bank) == 12 and not engine._deferred_upserts
    assert torch.allclose(torch.as_tensor(vectors[:4]), first[:4])
    assert torch.allclose(torch.as_tensor(vectors[4:]), later[-1])  # the last observation of each id wins
    engine.close()


# ---------------------------------------------------------------------- the worker is polled off the step
class _PollSpy:
    """A worker holding finished results: records which thread polls it, hands out one result per
    poll once ``ready`` is set."""

    failed = False

    def __init__(self, results):
        self.results = list(results)
        self.threads = []
        self.ready = threading.Event()

    def submit(self, request):
        return True

    def poll(self, max_items=None):
        self.threads.append(threading.get_ident())
        if not self.ready.is_set() or not self.results:
            return []
        return [self.results.pop(0)]

    def drain(self, timeout=600.0):
        out, self.results = self.results, []
        return out

    def stats(self):
        return {"images_produced": 0}

    def close(self, timeout=10.0):
        pass


def test_mix_takes_images_the_helper_thread_polled_and_never_polls_the_worker_itself():
    results = [make_result(torch.full((4, 1, 8, 8), float(i) / 4), (0, 1), 0.5, request_id=i) for i in range(3)]
    spy = _PollSpy(results)
    cfg = HardNegConfig(num_classes=3, embedding_dim=8, refresh_every=10**9, use_gpu_index=False, seed=0)
    engine = HardNeg(cfg, worker=spy, start_worker=False)
    g = torch.Generator().manual_seed(0)
    x, y, ids = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g), torch.arange(8)

    def step():
        xm, ym, _ = engine.mix(x, y)
        engine.observe(embeddings=torch.randn(xm.shape[0], 8, generator=g), labels=ym, ids=ids)

    try:
        for _ in range(3):
            step()
        assert len(engine.buffer) == 0  # nothing finished yet
        spy.ready.set()
        deadline = time.monotonic() + 60
        while len(engine._buffer) < 12 and time.monotonic() < deadline:  # all three results accepted
            step()
            engine._background.drain()  # (what forward and backward would give the helper: time)
        assert len(engine._buffer) == 12
        assert threading.get_ident() not in spy.threads and spy.threads  # polled, and only by the helper
        # without a teacher the helper puts polled images into the buffer itself, no mix needed;
        # a GeNIe-Ada result (its pick embeds the images with the classifier) waits for the next
        # mix, and a checkpoint taken before it holds the result: nothing polled is lost
        spy.results = [make_result(torch.zeros(2, 1, 8, 8), (1, 2), 0.5, request_id=8),
                       make_result(torch.zeros(2, 1, 8, 8), (1, 2), 0.5, request_id=9)]
        engine.requests.ada_requests[9] = (0.3, 0.5)
        for _ in range(2):
            engine._background.submit(engine._poll_worker)
            engine._background.drain()
        assert len(engine._buffer) == 14
        assert [r["request_id"] for r in engine.state_dict()["held"]] == [9]
    finally:
        engine.close()


def test_soft_targets_made_from_class_ids_keep_those_ids_for_observe():
    # a soft-labelled draw into a batch of class ids: y comes back (N, K); the mix keeps the rows'
    # ids (real rows theirs, generated rows their target), so observe and MixedStep.labels need no argmax
    from hardneg.validation import labels_as_ids

    cfg = HardNegConfig(num_classes=4, refresh_every=10**6, buffer_size=64, synthetic_fraction=0.25, seed=0,
                        embedding_dim=8, metric="l2")  # label_mode: soft-r (the default)
    engine = HardNeg(cfg)
    engine._accept([make_result(torch.rand(8, 1, 8, 8), (0, 1), 0.5)])
    g = torch.Generator().manual_seed(2)
    for _ in range(3):  # the first mix builds its batch on the step, the next ones take a prepared one
        x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        step = engine.mix(x, y)
        ym = step.y
        assert ym.ndim == 2 and step.n_synthetic == 2
        want = torch.cat([y, torch.tensor([1, 1])])  # real rows their id, generated rows the target (1)
        assert torch.equal(ym[:8], torch.nn.functional.one_hot(y, 4).float())
        assert torch.equal(step.labels, want) and step.labels is step.batch.label_ids
        assert labels_as_ids(ym, torch.zeros(10, 8), engine._last_mix, None) is step.batch.label_ids
        assert torch.equal(labels_as_ids(ym.clone(), torch.zeros(10, 8), engine._last_mix, None), want)  # argmax
        emb = torch.randn(10, 8, generator=g)
        engine.observe(embeddings=emb, labels=ym, ids=torch.arange(8))
        assert engine.bank.lookup(torch.arange(8))[2].tolist() == y.tolist()  # the real rows' labels in the bank
    engine.close()


def test_a_prepared_fill_rejects_class_ids_outside_the_soft_targets():
    s = _sample(3, soft=True)
    x = torch.rand(5, 1, 4, 4)
    for bad in (torch.tensor([0, 1, 4, 2, 3]), torch.tensor([0, -1, 2, 2, 3])):
        prepared = prepare_mix(s, 5, MixLayout.of(x, bad, "append", 0.5, num_classes=4))
        with pytest.raises(RuntimeError, match="Class values"):
            prepared.fill(x, bad)  # (F.one_hot's own error, as before the fill set the ones itself)
