"""Accelerate adapter: 2 CPU processes (gloo) find the same confused pairs as 1, and share generation."""

import os
import socket
import time

import pytest
import torch
from torch import nn

pytest.importorskip("accelerate")

from _toy_data import striped_data  # noqa: E402
from _fake_generators import FakeGenerator  # noqa: E402
from hardneg import HardNegConfig  # noqa: E402

K = 4
GLOBAL_BATCH = 16


def _toy_data(n_per_class=24, seed=0):
    return striped_data(n_per_class, K, seed, alike=True)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, K)

    def forward(self, x):
        return self.head(self.body(x))


def _cfg(**kw):
    base = dict(num_classes=K, refresh_every=3, top_pairs=3, knn_k=4, sources_per_pair=4,
                images_per_refresh=8,
                generation_batch=2, buffer_size=64, synthetic_fraction=0.25, seed=0)
    base.update(kw)
    return HardNegConfig(**base)


def _mine(accelerator, steps=12):
    """Observe a fixed model on fixed global batches; return what the engine concluded."""
    from hardneg.integrations.accelerate import HardNegAccelerate

    data = _toy_data()
    model = TinyNet()
    loader = torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False)
    loader = accelerator.prepare(loader)  # the model stays unwrapped: no training here, and DDP costs ~10 s
    hn = HardNegAccelerate(accelerator, _cfg(), model=model)
    done = 0
    while done < steps:
        for x, y, idx in loader:
            x, y, w = hn.mix(x, y)
            logits = model(x)
            hn.observe(labels=y, logits=logits, ids=idx)
            done += 1
            if done == steps:
                break
    bank = hn.engine.bank.state_dict()
    order = torch.argsort(bank["ids"])
    out = {
        "pairs": [(p.a, p.b, p.score, sorted(p.source_ids)) for p in hn.confusions()],
        "step": hn.engine.step,
        "bank_ids": bank["ids"][order],
        "bank_vectors": bank["vectors"][order],
        "matrix": hn.engine.confusion.matrix(),
        "calls": dict(hn.communicator.calls),
    }
    hn.close()
    return out


def _generate(accelerator, mode, max_steps=5000):
    """Run with a generator until every rank's buffer holds images; report who generated what."""
    from hardneg.integrations.accelerate import HardNegAccelerate

    data = _toy_data()
    model = TinyNet()
    loader = torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False)
    loader = accelerator.prepare(loader)  # the model stays unwrapped: no training here, and DDP costs ~10 s
    hn = HardNegAccelerate(accelerator, _cfg(), model=model, dataset=data, generator=FakeGenerator(),
                           generate_on=mode)
    step, mixed_rows = 0, 0
    while step < max_steps and mixed_rows == 0:
        for x, y, idx in loader:
            xm, ym, w = hn.mix(x, y)
            mixed_rows = int(xm.shape[0] - x.shape[0])
            hn.observe(labels=ym, logits=model(xm), ids=idx)
            step += 1
            time.sleep(0.01)  # let the worker thread run; the step cap is only a safety net (~a minute)
            if mixed_rows or step >= max_steps:
                break
    # mixed_rows can differ between ranks only if their buffers differ; every rank breaks on the same step
    s = hn.stats()
    out = {"buffer": len(hn.engine.buffer), "mixed_rows": mixed_rows, "step": step,
           "produced": (s["worker"] or {}).get("images_produced", 0),
           "shared_in": s["worker"]["images_shared_in"],
           "pairs": [(p.a, p.b) for p in hn.confusions()],
           "provenance": {k: v.clone() for k, v in hn.engine.buffer.provenance().items()},
           "calls": dict(hn.communicator.calls), "exchanges": s["worker"]["exchanges"]}
    hn.close()
    return out


def _deterministic_run(accelerator, steps=12):
    """A deterministic run with a generator on every rank: images arrive only at refreshes."""
    from hardneg.integrations.accelerate import HardNegAccelerate

    data = _toy_data()
    model = TinyNet()
    loader = torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False)
    loader = accelerator.prepare(loader)
    hn = HardNegAccelerate(accelerator, _cfg(deterministic=True), model=model, dataset=data,
                           generator=FakeGenerator(delay=0.02 * (1 + accelerator.process_index)), generate_on="all")
    rows, done = [], 0
    while done < steps:
        for x, y, idx in loader:
            xm, ym, w = hn.mix(x, y)
            rows.append(int(xm.shape[0] - x.shape[0]))
            hn.observe(labels=ym, logits=model(xm), ids=idx)
            done += 1
            if done == steps:
                break
    out = {"rows": rows, "provenance": {k: v.clone() for k, v in hn.engine.buffer.provenance().items()}}
    hn.close()
    return out


def _generated(accelerator, mode, steps=12):
    """deterministic=True with a step-only curriculum; the buffer's images and provenance after ``steps``.

    ``curriculum="linear"``: r follows the step alone. A feedback curriculum ("adaptive") moves r by
    how the model does on the synthetic rows drawn, and those draws differ between a 2-process run
    (2 rows per rank from 8-row local batches, rank-seeded) and a 1-process run (4 rows of 16), so
    its later ratios, hence images, would too.
    """
    from hardneg.integrations.accelerate import HardNegAccelerate

    data = _toy_data()
    model = TinyNet()
    loader = accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False))
    cfg = _cfg(deterministic=True, curriculum="linear", total_steps=steps)
    hn = HardNegAccelerate(accelerator, cfg, model=model, dataset=data, generator=FakeGenerator(), generate_on=mode)
    done = 0
    while done < steps:
        for x, y, idx in loader:
            xm, ym, w = hn.mix(x, y)
            hn.observe(labels=ym, logits=model(xm), ids=idx)
            done += 1
            if done == steps:
                break
    state = hn.engine.buffer.state_dict()
    out = {"provenance": {k: v.clone() for k, v in hn.engine.buffer.provenance().items()},
           "images": state["images"], "stored": len(hn.engine.buffer)}
    hn.close()
    return out


def _as_set(gen):
    """The generated images with their provenance as a set of rows, whatever their buffer order."""
    prov = gen["provenance"]
    keys = [k for k in sorted(prov) if k not in ("slots", "uses", "seq")]  # seq: arrival order
    rows = []
    for i in range(len(prov["slots"])):
        rows.append((tuple(round(float(prov[k][i]), 6) for k in keys), tuple(gen["images"][i].flatten().tolist())))
    return sorted(rows)


def _same_provenance(a, b):
    """Same stored images and provenance; use counts may differ (each rank draws with its own seed)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "uses")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
    result = {"world": acc.num_processes, "mine": _mine(acc), "main": _generate(acc, "main"),
              "all": _generate(acc, "all"), "det": [_deterministic_run(acc), _deterministic_run(acc)],
              "gen": {mode: _generated(acc, mode) for mode in ("main", "all")}}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.fixture()
def single_process_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)


def test_two_processes_find_the_pairs_one_process_finds_and_share_generation(tmp_path,
                                                                              single_process_accelerator):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    single = _mine(single_process_accelerator)

    for r in ranks:  # one bank on every rank, equal to the single-process bank
        m = r["mine"]
        assert m["step"] == single["step"] == 12
        assert torch.equal(m["bank_ids"], single["bank_ids"])
        assert len(m["bank_ids"]) == len(_toy_data())
        assert torch.allclose(m["bank_vectors"], single["bank_vectors"], atol=1e-5)
        assert torch.allclose(torch.as_tensor(m["matrix"]), torch.as_tensor(single["matrix"]), atol=1e-5)
        assert [p[:2] for p in m["pairs"]] == [p[:2] for p in single["pairs"]]
        assert [p[3] for p in m["pairs"]] == [p[3] for p in single["pairs"]]
        for got, want in zip(m["pairs"], single["pairs"]):
            assert got[2] == pytest.approx(want[2], abs=1e-5)
    assert {(0, 1), (1, 0)} & {p[:2] for p in single["pairs"]}
    for r in ranks:  # traffic: one all_gather per observe (two on the first step, to agree on a row count)
        assert r["mine"]["calls"]["all_gather"] == 12 + 1
        assert r["mine"]["calls"]["all_reduce"] == 0  # no generator: mix talks to nobody
        for mode in ("main", "all"):
            g = r[mode]
            assert g["calls"]["all_reduce"] == g["step"]  # one integer per mix: "anything ready?"
            objects = g["calls"]["broadcast_objects"] + g["calls"]["gather_objects"]
            assert objects == g["exchanges"] < g["step"]  # results pickled only when some rank had any

    main = [r["main"] for r in ranks]
    assert main[0]["produced"] > 0 and main[1]["produced"] == 0  # only the main process generates...
    assert main[1]["buffer"] == main[0]["buffer"] > 0  # ...and rank 1 receives the same images
    assert main[0]["shared_in"] == main[1]["shared_in"] > 0
    assert main[0]["step"] == main[1]["step"] and main[0]["mixed_rows"] == main[1]["mixed_rows"] == 2
    assert main[0]["pairs"] == main[1]["pairs"]
    assert _same_provenance(main[0]["provenance"], main[1]["provenance"])

    every = [r["all"] for r in ranks]
    assert every[0]["produced"] > 0 and every[1]["produced"] > 0  # requests are split between the ranks
    assert every[0]["buffer"] == every[1]["buffer"] > 0
    assert every[0]["shared_in"] == every[1]["shared_in"] > 0
    assert _same_provenance(every[0]["provenance"], every[1]["provenance"])  # identical buffers

    # deterministic=True: the generators run at different speeds, yet two runs repeat exactly and
    # every rank holds the same images, handed over at the refreshes (steps 3, 6, 9, 12)
    for r in ranks:
        first, second = r["det"]
        assert first["rows"] == second["rows"] and any(first["rows"])
        assert first["rows"][:4] == [0, 0, 0, 0]  # nothing before the second refresh hands over
        assert _same_provenance(first["provenance"], second["provenance"])
        assert torch.equal(first["provenance"]["uses"], second["provenance"]["uses"])
    assert _same_provenance(ranks[0]["det"][0]["provenance"], ranks[1]["det"][0]["provenance"])

    # Generation, 2 processes vs 1 over the same global batches (deterministic, step-only curriculum):
    # the same requests (ids, sources, r, seeds) are made on every rank, so the same images come back.
    # "main": rank 0 generates them all in request order and broadcasts them, so buffers match the
    # single process slot for slot. "all": each rank generates its share and the results are gathered
    # rank by rank, so the buffer ORDER differs from a single process (same set). Draws never match:
    # each rank draws round(0.25 * 8) rows per step with its own seed, a single process 4 of 16.
    for mode in ("main", "all"):
        one = _generated(single_process_accelerator, mode)
        assert one["stored"] > 0
        for r in ranks:
            got = r["gen"][mode]
            assert got["stored"] == one["stored"]
            assert _as_set(got) == _as_set(one), mode
        assert _same_provenance(ranks[0]["gen"][mode]["provenance"], ranks[1]["gen"][mode]["provenance"])
        assert torch.equal(ranks[0]["gen"][mode]["images"], ranks[1]["gen"][mode]["images"])
    main_2, main_1 = ranks[0]["gen"]["main"], _generated(single_process_accelerator, "main")
    assert _same_provenance(main_2["provenance"], main_1["provenance"])  # slot for slot
    assert torch.equal(main_2["images"], main_1["images"])


def test_checkpointing_round_trips_through_accelerator_state(tmp_path, single_process_accelerator):
    from hardneg.integrations.accelerate import HardNegAccelerate

    acc = single_process_accelerator
    data = _toy_data()
    model = TinyNet()
    hn = HardNegAccelerate(acc, _cfg(), model=model)
    acc.register_for_checkpointing(hn)
    for start in range(0, 64, 16):
        idx = torch.arange(start, start + 16)
        x, y, w = hn.mix(data.images[idx], data.labels[idx])
        hn.observe(labels=y, logits=model(x), ids=idx)
    acc.save_state(str(tmp_path / "state"))
    pairs = [(p.a, p.b) for p in hn.confusions()]
    hn.close()

    restored = HardNegAccelerate(acc, _cfg(), model=TinyNet())
    acc._custom_objects.clear()
    acc.register_for_checkpointing(restored)
    acc.load_state(str(tmp_path / "state"))
    assert restored.engine.step == 4
    assert len(restored.engine.bank) == 64
    assert [(p.a, p.b) for p in restored.confusions()] == pairs
    restored.close()


def test_soft_synthetic_labels_reach_the_loss_and_observe_gets_class_ids(single_process_accelerator):
    import torch.nn.functional as F

    from _engine_generators import make_result, spy_observe
    from hardneg.integrations.accelerate import HardNegAccelerate

    data = _toy_data()
    model = TinyNet()
    hn = HardNegAccelerate(single_process_accelerator, _cfg(label_mode="soft-r", label_gamma=2.0), model=model)
    hn.engine._accept([make_result(data.images[:4], (0, 1), 0.5)])
    seen = spy_observe(hn.engine)
    idx = torch.arange(16, 32)
    x, y, w = hn.mix(data.images[idx], data.labels[idx])
    assert y.shape == (20, K)
    torch.testing.assert_close(y[16:], torch.tensor([[0.75, 0.25, 0.0, 0.0]] * 4))
    logits = model(x)
    loss = (w * F.cross_entropy(logits, y, reduction="none")).sum() / w.sum()  # the documented loop's loss
    torch.testing.assert_close(loss, -(y * F.log_softmax(logits, dim=1)).sum(1).mean())
    hn.observe(labels=y, logits=logits, ids=idx)
    assert seen[0].dtype == torch.int64 and seen[0][16:].tolist() == [1] * 4
    assert hn.stats()["synthetic_feedback"] == 4 and len(hn.engine.bank) == 16
    hn.close()


def test_generated_rows_never_enter_or_overwrite_the_bank(single_process_accelerator):
    from _bank_checks import assert_bank_holds_only_real_rows, record_head_inputs
    from _engine_generators import make_result
    from hardneg.integrations.accelerate import HardNegAccelerate

    data = _toy_data()
    model = TinyNet()
    hn = HardNegAccelerate(single_process_accelerator, _cfg(refresh_every=1000, label_mode="hard"), model=model)
    hn.engine._accept([make_result(1 - data.images[:4], (0, 1), 0.5)])  # unlike any real image; source ids 0-3
    seen, handle = record_head_inputs(model.head)
    all_ids, real_rows = [], []
    for ids in (torch.arange(0, 96, 6), torch.arange(1, 96, 6)):  # id 0 among the real rows
        x, y, w = hn.mix(data.images[ids], data.labels[ids])
        assert x.shape[0] == 20
        hn.observe(labels=y, logits=model(x), ids=ids)
        all_ids.append(ids)
        real_rows.append(seen[-1][:16])
    handle.remove()
    ids = torch.cat(all_ids)
    assert_bank_holds_only_real_rows(hn.engine.bank, ids, torch.cat(real_rows), data.labels[ids])
    assert hn.stats()["synthetic_feedback"] == 8  # the generated rows were observed as such
    hn.close()


def test_load_state_resumes_a_run_exactly(tmp_path, single_process_accelerator):
    """deterministic=True: 12 steps equal 6 steps + ``save_state`` / ``load_state`` into new objects + 6."""
    import torch.nn.functional as F

    from _state_compare import state_differences
    from hardneg.integrations.accelerate import HardNegAccelerate

    acc = single_process_accelerator

    def run(save_at=None, load_from=None, steps=12):
        for registry in (acc._models, acc._optimizers, acc._dataloaders, acc._schedulers, acc._custom_objects):
            registry.clear()  # a fresh script: only this run's objects are registered
        data = _toy_data()
        model = TinyNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader = torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH, shuffle=False)  # 6 batches an epoch
        model, opt, loader = acc.prepare(model, opt, loader)
        hn = HardNegAccelerate(acc, _cfg(deterministic=True), model=model, dataset=data, generator=FakeGenerator())
        acc.register_for_checkpointing(hn)
        done = 0
        if load_from is not None:
            acc.load_state(load_from)
            done = hn.engine.step
        while done < steps:
            for x, y, idx in loader:
                x, y, w = hn.mix(x, y)
                logits = model(x)
                loss = (w * F.cross_entropy(logits, y, reduction="none")).sum() / w.sum()
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
                hn.observe(labels=y, logits=logits, ids=idx)
                done += 1
                if done == save_at:
                    acc.save_state(str(tmp_path / "state"))
                if done == steps:
                    break
        out = {"model": model.state_dict(), "optimizer": opt.state_dict(), "engine": hn.state_dict()}
        hn.close()
        return out

    whole = run(save_at=6)
    resumed = run(load_from=str(tmp_path / "state"))
    assert resumed["engine"]["step"] == 12 and whole["engine"]["counters"]["synthetic_used"] > 0
    assert state_differences(whole["model"], resumed["model"]) == []
    assert state_differences(whole["optimizer"], resumed["optimizer"]) == []
    assert state_differences(whole["engine"], resumed["engine"]) == []


def test_the_adapter_hooks_the_model_only_through_the_engine_capture(single_process_accelerator):
    """One capture code path (capture.py): the adapter adds no hook of its own, reads the embedding
    the engine's capture kept, and close() leaves the model without hardneg hooks."""
    from hardneg import HardNeg
    from hardneg.integrations.accelerate import HardNegAccelerate

    def hooks(m):
        return sum(len(sub._forward_hooks) + len(sub._forward_pre_hooks) for sub in m.modules())

    data = _toy_data()
    model = TinyNet()
    hn = HardNegAccelerate(single_process_accelerator, _cfg(refresh_every=1000), model=model)
    engine_only = TinyNet()
    plain = HardNeg(_cfg(refresh_every=1000), model=engine_only, start_worker=False)
    assert hooks(model) == hooks(engine_only) == 2  # embedding (head input) and logits
    plain.close()
    x, y = data.images[:16], data.labels[:16]
    model(x)
    kept = hn.engine.capture.embeddings
    assert kept is not None and kept.shape == (16, 16)
    hn.observe(labels=y, ids=torch.arange(16))  # embeddings from the engine's capture
    assert hn.engine.capture.embeddings is None
    assert len(hn.engine.bank) == 16
    torch.testing.assert_close(torch.as_tensor(hn.engine.bank.get(torch.arange(16))[0]),
                               torch.nn.functional.normalize(kept, dim=1))
    hn.close()
    assert hooks(model) == 0


class _MirrorCommunicator:
    """Two ranks that observed the same rows: all_gather returns two copies."""

    world, rank, device = 2, 0, torch.device("cpu")

    def all_gather(self, tensor):
        return torch.cat([tensor, tensor])


def test_observe_without_logits_gathers_the_captured_logits(single_process_accelerator):
    """With logits=None the captured (local) logits travel with the gathered rows, so a batch gathered
    from several ranks is observed with logits of its own row count (not this rank's local ones)."""
    from hardneg.distributed import RowGather
    from hardneg.integrations.accelerate import HardNegAccelerate

    data = _toy_data()
    model = TinyNet()
    hn = HardNegAccelerate(single_process_accelerator, _cfg(refresh_every=1000), model=model)
    hn._rows = RowGather(_MirrorCommunicator())  # stand-in for a second rank
    x, y = data.images[:8], data.labels[:8]
    model(x)
    hn.observe(labels=y, ids=torch.arange(8))  # neither embeddings nor logits: both from the capture
    assert hn.engine.step == 1 and len(hn.engine.bank) == 8
    hn.close()
