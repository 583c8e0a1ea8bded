"""Sharded bank (bank_sharding="id-mod"): 2 and 4 gloo processes on the CPU find what one process
with an exact bank finds: the same kNN answers, confused pairs, sources, plans and curriculum, on
every rank, while each rank stores only the vectors of its share of the ids."""

import os
import socket
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hardneg import HardNeg, HardNegConfig
from hardneg.bank import EmbeddingBank
from hardneg.confusion import ConfusionGraph

K, D, N = 5, 16, 300
STEPS, BATCH = 12, 25


def _data(seed=0):
    """Clustered embeddings with two confusable pairs, and per-step logits."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, D, generator=g)
    centres[3] = centres[1] + 0.3 * torch.randn(D, generator=g)  # 1 and 3 overlap
    centres[4] = centres[2] + 0.5 * torch.randn(D, generator=g)
    y = torch.arange(N) % K
    x = centres[y] + 0.6 * torch.randn(N, D, generator=g)
    logits = torch.randn(N, K, generator=g)
    perm = torch.randperm(N, generator=g)  # ids arrive out of order, some twice
    return x, y, logits, perm


def _cfg(**kw):
    base = dict(num_classes=K, index="flat", refresh_every=3, knn_k=4, top_pairs=4, sources_per_pair=5,
                refresh_queries=120, seed=0, curriculum="linear", generator=None)
    base.update(kw)
    return HardNegConfig(**base)


def _engine_run(sharding):
    """Observe the same global batches; what the engine concluded (pairs, sources, plan, curriculum)."""
    x, y, logits, perm = _data()
    # the reference refreshes inline; the sharded engine keeps the default async_refresh=True, which a
    # sharded bank turns into inline refreshes (every rank at the same step)
    engine = HardNeg(_cfg(bank_sharding=sharding, async_refresh=sharding != "off"))
    for step in range(STEPS):
        idx = perm[(step * BATCH) % N : (step * BATCH) % N + BATCH]
        engine.observe(embeddings=x[idx], labels=y[idx], logits=logits[idx], ids=idx)
    plan = engine.targeting.plan(engine, 20)
    out = {
        "pairs": [(p.a, p.b, p.score, p.source_ids) for p in engine.confusions()],
        "matrix": engine.confusion.matrix(),
        "history": engine.confusion.history,
        "plan": [(p.pair, p.count, list(p.source_ids)) for p in plan],
        "ratios": [engine.curriculum.ratio(p.pair, engine.step) for p in plan],
        "known": [a.tolist() for a in engine.known_samples()],
        "bank_state": engine.state_dict()["bank"],
        "memory": engine.bank.memory_bytes(),
        "refreshes": engine.stats()["refreshes"],
    }
    engine.close()
    return out


def _bank_run(bank):
    """Fill a bank, refresh a graph on it, search with rank-specific queries."""
    x, y, logits, perm = _data()
    for step in range(STEPS):
        idx = perm[(step * BATCH) % N : (step * BATCH) % N + BATCH]
        bank.upsert(idx, x[idx] + 0.01 * step, y[idx], step=step)
    graph = ConfusionGraph(K, knn_k=4, sources_per_pair=5, max_queries=50, seed=0)
    graph.refresh(bank)
    graph.refresh(bank)  # a second refresh: the query subsample's RNG moves on identically
    rank = getattr(bank, "rank", 0)
    world = getattr(bank, "world", 1)
    queries = torch.randn(7 + rank, D, generator=torch.Generator().manual_seed(100))  # different counts
    wanted = np.array([5, 17, 42, 1, 299])
    # an exact refresh searches in rounds FAISS computes by BLAS (hardneg.bank.blas_query_chunk): 64
    # queries a rank per round would run FAISS's sequential loop; these 600 fit in one round
    shard = getattr(bank, "shard", bank)
    rounds, search_labelled = [], shard._search_labelled
    shard._search_labelled = lambda q, k, refresh=False: rounds.append(len(q)) or search_labelled(q, k, refresh)
    bank.search_many(torch.randn(600 // world, D, generator=torch.Generator().manual_seed(7 + rank)), 5, chunk=64)
    del shard._search_labelled
    return {
        "search_many_rounds": rounds,
        "matrix": graph.matrix(),
        "pairs": [(p.a, p.b, p.score, p.source_ids) for p in graph.top_pairs(4)],
        "search": bank.search_with_labels(queries, 6),
        "big_k": bank.search(queries[:2], N + 3),  # k past the bank size: -1 / NaN padded like one bank
        "get": bank.get(wanted),
        "means": bank.class_means(),
        "counts": bank.class_counts(),
        "ids_labels": bank.ids_and_labels(),
        "len": len(bank),
        "shard_rows": len(bank.shard) if world > 1 else len(bank),
        "world": world,
    }


def _list_scan_refresh(bank):
    """The confusion refresh on IVF-PQ shards whose refresh scans every list exactly."""
    x, y = torch.cat([_data(s)[0] for s in range(4)]), torch.cat([_data(s)[1] for s in range(4)])
    bank.upsert(torch.arange(len(x)), x, y)  # 1200: each of 4 shards holds the 256 vectors PQ trains on
    shard = getattr(bank, "shard", bank)
    graph = ConfusionGraph(K, knn_k=4, sources_per_pair=5, max_queries=50, seed=0)
    graph.refresh(bank)
    return {"scans_lists": shard.refresh_scans_lists, "matrix": graph.matrix(),
            "pairs": [(p.a, p.b, p.score, p.source_ids) for p in graph.top_pairs(4)]}


def _rank_main(rank, world, port, out_dir):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        import faiss

        faiss.omp_set_num_threads(1)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        from hardneg.sharded_bank import ShardedEmbeddingBank

        sharded = ShardedEmbeddingBank(D, K, index="flat", use_gpu=False)
        sharded.reserve(N)  # allocated up front (bank_reserve): the same results as a bank grown by doubling
        # 4-byte codes scored as they are (rerank 0) would rank neighbours badly: the list scan of
        # every list (refresh_nprobe past nlist) makes each shard's refresh an exact one
        pq = ShardedEmbeddingBank(D, K, index="ivfpq", ivf_threshold=40, use_gpu=False, pq_bytes=4, rerank=0,
                                  refresh_rerank=0, refresh_nprobe=1_000)
        result = {"bank": _bank_run(sharded),
                  "engine": _engine_run("id-mod"),
                  "list_scan": _list_scan_refresh(pq)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single():
    return {"bank": _bank_run(EmbeddingBank(D, K, index="flat", use_gpu=False)), "engine": _engine_run("off"),
            "list_scan": _list_scan_refresh(EmbeddingBank(D, K, index="flat", use_gpu=False))}


def _same(a, b, exact_scores=False):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key], exact_scores)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v, exact_scores)
    elif isinstance(a, float) or (isinstance(a, (np.ndarray, torch.Tensor)) and np.asarray(a).dtype.kind == "f"):
        if exact_scores:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_processes_find_what_one_exact_process_finds(tmp_path, single, world):
    ctx = mp.start_processes(_rank_main, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    try:
        while not ctx.join(timeout=120):
            pass
    except Exception:
        errs = [p.read_text() for p in tmp_path.glob("rank*.err")]
        raise AssertionError("a rank failed:\n" + "\n".join(errs)) from None
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    one_bank, one_engine = single["bank"], single["engine"]
    assert one_engine["pairs"] and one_engine["plan"] and one_engine["refreshes"] >= 3
    for r, res in enumerate(ranks):
        bank, engine = res["bank"], res["engine"]
        # the bank: every sample known on every rank, each rank storing about 1/W of the vectors
        assert bank["len"] == one_bank["len"] == N and bank["world"] == world
        assert abs(bank["shard_rows"] - N / world) <= 1
        _same(bank["ids_labels"], one_bank["ids_labels"])
        _same(bank["counts"], one_bank["counts"])
        _same(bank["get"], one_bank["get"], exact_scores=True)  # vectors stored bit for bit
        _same(bank["means"], one_bank["means"])
        # kNN merged over shards: this rank's queries (their count differs per rank) answered as by one bank
        queries_here = torch.randn(7 + r, D, generator=torch.Generator().manual_seed(100))
        np.testing.assert_array_equal(bank["search"][1][: 7], one_bank["search"][1][: 7])
        np.testing.assert_array_equal(bank["search"][2][: 7], one_bank["search"][2][: 7])
        np.testing.assert_allclose(bank["search"][0][: 7], one_bank["search"][0][: 7], rtol=1e-5)
        assert bank["search"][1].shape == (len(queries_here), 6)
        _same(bank["big_k"][1], one_bank["big_k"][1])
        assert np.isnan(bank["big_k"][0][:, N:]).all()
        assert bank["search_many_rounds"] == one_bank["search_many_rounds"] == [600]
        # the refresh: same pairs, sources and matrix as one exact process
        _same(bank["pairs"], one_bank["pairs"])
        _same(bank["matrix"], one_bank["matrix"])
        # IVF-PQ shards, the refresh scanning their lists: one exact process's pairs, sources and matrix
        assert res["list_scan"]["scans_lists"]
        _same(res["list_scan"]["pairs"], single["list_scan"]["pairs"])
        _same(res["list_scan"]["matrix"], single["list_scan"]["matrix"])
        # through the engine: pairs, sources, plan (requests), curriculum, history, checkpointed bank
        for key in ("pairs", "matrix", "history", "plan", "ratios", "known", "bank_state", "refreshes"):
            _same(engine[key], one_engine[key])
        # identical on every rank, bit for bit
        _same(engine["pairs"], ranks[0]["engine"]["pairs"], exact_scores=True)
        _same(engine["matrix"], ranks[0]["engine"]["matrix"], exact_scores=True)
        _same(engine["plan"], ranks[0]["engine"]["plan"], exact_scores=True)


def test_sharding_without_a_process_group_says_how_to_fix():
    from hardneg.sharded_bank import ShardingError

    engine = HardNeg(_cfg(bank_sharding="id-mod"))
    with pytest.raises(ShardingError, match="init_process_group"):
        engine.observe(embeddings=torch.randn(4, D), labels=torch.arange(4), ids=torch.arange(4))
    engine.close()


def test_bank_sharding_is_validated():
    from hardneg.config import ConfigError

    with pytest.raises(ConfigError, match="bank_sharding"):
        HardNegConfig(num_classes=3, bank_sharding="rows")


# ---------------------------------------------------------------------- through HardNegAccelerate
def _accelerate_mine(accelerator, sharding, steps=12):
    """HardNegAccelerate on fixed global batches with a fixed model and deterministic generation."""
    from _fake_generators import FakeGenerator
    from _toy_data import striped_data
    from torch import nn

    from hardneg.integrations.accelerate import HardNegAccelerate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    data = striped_data(24, 4, 0, alike=True)
    loader = accelerator.prepare(torch.utils.data.DataLoader(data, batch_size=16, shuffle=False))
    cfg = HardNegConfig(num_classes=4, refresh_every=3, top_pairs=3, knn_k=4, sources_per_pair=4,
                        images_per_refresh=8, generation_batch=2, buffer_size=64, synthetic_fraction=0.25,
                        seed=0, index="flat", deterministic=True, curriculum="ada", bank_sharding=sharding)
    hn = HardNegAccelerate(accelerator, cfg, model=model, dataset=data, generator=FakeGenerator())
    done = 0
    while done < steps:
        for x, y, idx in loader:
            hn.observe(labels=y, logits=model(x), ids=idx)
            done += 1
            if done == steps:
                break
    hn.engine.wait_for_generation()  # collective with deterministic=True; GeNIe-Ada reads the bank (get)
    out = {"pairs": [(p.a, p.b, p.score, p.source_ids) for p in hn.confusions()],
           "matrix": hn.engine.confusion.matrix(), "bank": hn.state_dict()["bank"],
           "buffer": {k: v.clone() for k, v in hn.engine.buffer.provenance().items()},
           "shard": type(hn.engine.bank).__name__}
    hn.close()
    return out


def _accelerate_rank(rank, world, port, out_dir):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                          WORLD_SIZE=str(world))
        torch.set_num_threads(1)
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(split_batches=True))
        torch.save(_accelerate_mine(acc, "id-mod"), os.path.join(out_dir, f"rank{rank}.pt"))
        acc.wait_for_everyone()
        torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_accelerate_with_bank_sharding_mines_and_generates_as_one_process(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    ctx = mp.start_processes(_accelerate_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    try:
        while not ctx.join(timeout=120):
            pass
    except Exception:
        errs = [p.read_text() for p in tmp_path.glob("rank*.err")]
        raise AssertionError("a rank failed:\n" + "\n".join(errs)) from None
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    try:
        one = _accelerate_mine(Accelerator(cpu=True), "off")
    finally:
        AcceleratorState._reset_state(True)
    assert one["pairs"] and len(one["buffer"]["slots"]) > 0
    for res in ranks:
        assert res["shard"] == "ShardedEmbeddingBank"
        assert [p[:2] for p in res["pairs"]] == [p[:2] for p in one["pairs"]]
        assert [p[3] for p in res["pairs"]] == [p[3] for p in one["pairs"]]  # the same sources
        np.testing.assert_allclose(res["matrix"], one["matrix"], atol=1e-6)
        _same(res["bank"], one["bank"])  # the checkpoint holds the whole bank, as one process's
        _same(res["buffer"], one["buffer"])  # the same images requested, GeNIe-Ada picks included
    _same(ranks[0]["buffer"], ranks[1]["buffer"], exact_scores=True)


def _divergent_rank(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from hardneg.sharded_bank import ShardedEmbeddingBank, ShardingError

    bank = ShardedEmbeddingBank(D, K, index="flat", use_gpu=False)
    x, y, _, _ = _data()
    ids = torch.arange(rank * 100, rank * 100 + 100)  # each rank upserts only its own batch: a mistake
    bank.upsert(ids, x[ids], y[ids])
    try:
        ConfusionGraph(K, knn_k=4).refresh(bank)
        outcome = "refreshed"
    except ShardingError as exc:
        outcome = str(exc)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)
    torch.distributed.destroy_process_group()


def test_ranks_that_upserted_different_rows_get_an_error_not_a_hang(tmp_path):
    mp.start_processes(_divergent_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for r in range(2):
        text = (tmp_path / f"rank{r}.txt").read_text()
        assert "ranks hold different samples" in text and "HardNegAccelerate" in text
