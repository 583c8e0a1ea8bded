"""EmbeddingBank: stable ids, exact kNN, IVF switch-over, concurrency, bad input."""

import threading

import numpy as np
import pytest
import torch

from _toy_data import clustered_modes
from hardneg.bank import LIST_HEADROOM, BankError, EmbeddingBank


def _random(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def test_reobserving_an_id_replaces_its_vector_instead_of_duplicating():
    bank = EmbeddingBank(dim=8, num_classes=3)
    bank.upsert([10, 11, 12], _random(3, 8), [0, 1, 2], step=1)
    new = _random(1, 8, seed=5)
    bank.upsert([11], new, [2], step=7)
    assert len(bank) == 3
    vec, lab = bank.get([11])
    np.testing.assert_allclose(vec[0], (new / new.norm()).numpy()[0], rtol=1e-5)
    assert lab.tolist() == [2]
    ids, _, _, steps = bank.snapshot()
    assert sorted(ids.tolist()) == [10, 11, 12]
    assert steps[ids.tolist().index(11)] == 7
    # the same id twice within one batch: the last occurrence wins
    bank.upsert([12, 12], _random(2, 8, seed=9), [0, 1])
    assert len(bank) == 3 and bank.get([12])[1].tolist() == [1]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_matches_brute_force_torch(metric):
    x = _random(500, 16)
    bank = EmbeddingBank(dim=16, num_classes=2, metric=metric)
    bank.upsert(torch.arange(1000, 1500), x, torch.zeros(500, dtype=torch.long))
    q = _random(20, 16, seed=3)
    scores, ids = bank.search(q, k=5)
    if metric == "cosine":
        xn, qn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(q, dim=1)
        ref_scores, ref = (qn @ xn.T).topk(5, dim=1)
    else:
        d = torch.cdist(q, x) ** 2
        ref_scores, ref = (-d).topk(5, dim=1)
        ref_scores = -ref_scores
    assert (ids == (ref + 1000).numpy()).all()
    np.testing.assert_allclose(scores, ref_scores.numpy(), rtol=1e-4, atol=1e-4)


def _clustered(n, d, clusters=40, seed=0):
    """Random class-like clusters: what a classifier's embedding bank looks like."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g) * 3
    assign = torch.randint(0, clusters, (n,), generator=g)
    return centres[assign] + torch.randn(n, d, generator=g)


def test_auto_switches_to_ivf_and_keeps_recall():
    d, n = 32, 6000
    x = _clustered(n, d)
    exact = EmbeddingBank(dim=d, num_classes=2, index="flat")
    auto = EmbeddingBank(dim=d, num_classes=2, index="auto", ivf_threshold=4000, nprobe=16)
    labels = torch.zeros(n, dtype=torch.long)
    for start in range(0, n, 1000):  # crosses the threshold part-way through
        sl = slice(start, start + 1000)
        exact.upsert(torch.arange(n)[sl], x[sl], labels[sl])
        auto.upsert(torch.arange(n)[sl], x[sl], labels[sl])
    assert auto.active_index == "ivf" and exact.active_index == "flat"
    # replacing vectors after the switch goes through update_vectors, not a rebuild
    repl = _clustered(100, d, seed=7)
    exact.upsert(torch.arange(100), repl, labels[:100])
    auto.upsert(torch.arange(100), repl, labels[:100])
    q = _clustered(200, d, seed=0)
    _, ref = exact.search(q, 10)
    _, got = auto.search(q, 10)
    recall = np.mean([len(set(r) & set(g)) / 10 for r, g in zip(ref, got)])
    assert recall >= 0.95, recall
    auto.nprobe = 1
    _, worse = auto.search(q, 10)
    assert np.mean([len(set(r) & set(g)) / 10 for r, g in zip(ref, worse)]) < recall


def test_concurrent_reader_never_sees_a_torn_batch():
    """A writer replaces all vectors with a constant batch; readers must see one batch or the other."""
    d, n = 8, 256
    bank = EmbeddingBank(dim=d, num_classes=2, metric="l2")
    ids = torch.arange(n)
    bank.upsert(ids, torch.zeros(n, d), torch.zeros(n, dtype=torch.long))
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                _, vecs, labels, steps = bank.snapshot()
                if len(set(steps.tolist())) != 1 or len(set(vecs[:, 0].tolist())) != 1:
                    errors.append("torn snapshot")
                bank.search(torch.zeros(4, d), 3)
            except Exception as exc:  # pragma: no cover - a failure path
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for step in range(1, 200):
        bank.upsert(ids, torch.full((n, d), float(step)), torch.zeros(n, dtype=torch.long), step=step)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize(
    "ids, emb, labels, match",
    [
        ([0, 1], torch.zeros(2, 5), [0, 1], "shape"),
        ([0, 1], torch.tensor([[1.0, float("nan"), 0, 0], [1, 0, 0, 0]]), [0, 1], "NaN"),
        ([0, 1], torch.ones(2, 4), [0, 3], "labels must lie"),
        ([0, 1], torch.ones(2, 4), [0, -1], "labels must lie"),
        ([0, 1, 2], torch.ones(2, 4), [0, 1], "same length"),
        ([0, 1], torch.ones(2, 4, dtype=torch.int64), [0, 1], "float"),
        ([0, 1], torch.ones(2, 4), [0.0, 1.0], "integers"),
        ([0, 1], torch.zeros(2, 4), [0, 1], "zero norm"),
    ],
)
def test_bad_input_raises_a_clear_error(ids, emb, labels, match):
    bank = EmbeddingBank(dim=4, num_classes=3)
    with pytest.raises(BankError, match=match):
        bank.upsert(ids, emb, labels)


def test_state_dict_round_trip_and_hnsw_fallback():
    x = _random(300, 8)
    bank = EmbeddingBank(dim=8, num_classes=3, index="hnsw")
    bank.upsert(torch.arange(300), x, torch.arange(300) % 3, step=4)
    q = _random(5, 8, seed=2)
    s1, i1 = bank.search(q, 4)
    clone = EmbeddingBank.from_state_dict(bank.state_dict())
    s2, i2 = clone.search(q, 4)
    assert (i1 == i2).all() and clone.active_index == "hnsw"
    # replacing a vector makes the graph stale: searches stay exact until rebuild()
    bank.upsert([0], -x[:1], [0])
    _, ids = bank.search(-x[:1], 1)
    assert ids[0, 0] == 0
    bank.rebuild()
    assert bank.search(-x[:1], 1)[1][0, 0] == 0


def test_ivf_updates_are_queued_off_the_step_and_applied_before_a_search():
    d, n = 16, 3000
    x = _clustered(n, d)
    bank = EmbeddingBank(dim=d, num_classes=2, index="ivf", ivf_threshold=2000, nprobe=64)
    bank.upsert(torch.arange(n), x, torch.zeros(n, dtype=torch.long))
    assert bank.active_index == "ivf" and bank.pending_updates == 0
    moved = -x[:5] * 3  # far from where the index last saw them
    bank.upsert(torch.arange(5), moved, torch.ones(5, dtype=torch.long))
    bank.upsert(torch.arange(n, n + 3), x[5:8], torch.zeros(3, dtype=torch.long))  # new ids
    assert bank.pending_updates == 8  # upsert only queued the IVF work
    _, ids = bank.search(moved, 1)
    assert bank.pending_updates == 0
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    _, new_ids = bank.search(x[5:8], 2)
    assert all(n + i in row for i, row in enumerate(new_ids.tolist()))


def test_running_class_means_follow_replacements_relabels_and_removals():
    bank = EmbeddingBank(dim=6, num_classes=4, metric="l2")
    x = _random(40, 6)
    y = torch.arange(40) % 3  # class 3 stays empty
    bank.upsert(torch.arange(40), x, y)
    bank.upsert([0, 1, 2, 0], _random(4, 6, seed=3), [2, 2, 0, 1])  # replaced vectors, changed labels
    bank.remove([5, 6, 99])

    def fresh():
        ids, vecs, labels, _ = bank.snapshot()
        means = np.zeros((4, 6), dtype=np.float64)
        for c in range(4):
            if (labels == c).any():
                means[c] = vecs[labels == c].mean(0)
        return means, np.bincount(labels, minlength=4)

    means, counts = fresh()
    np.testing.assert_allclose(bank.class_means(), means, atol=1e-5)
    assert bank.class_counts().tolist() == counts.tolist() and counts[3] == 0
    restored = EmbeddingBank.from_state_dict(bank.state_dict(), use_gpu=False)
    np.testing.assert_allclose(restored.class_means(), means, atol=1e-5)
    bank.clear()
    assert bank.class_counts().sum() == 0 and not bank.class_means().any()


def test_lookup_skips_unknown_ids_and_scan_visits_every_sample_once_in_chunks():
    bank = EmbeddingBank(dim=4, num_classes=2)
    bank.upsert(torch.arange(100, 110), _random(10, 4), torch.arange(10) % 2)
    ids, vecs, labels = bank.lookup([103, 555, 101])
    assert ids.tolist() == [103, 101] and labels.tolist() == [1, 1] and vecs.shape == (2, 4)
    np.testing.assert_allclose(vecs, bank.get([103, 101])[0])
    seen, sizes = [], []
    bank.scan(lambda i, v, lab: (seen.extend(i.tolist()), sizes.append(len(i))), chunk=4)
    assert sorted(seen) == list(range(100, 110)) and sizes == [4, 4, 2]
    with pytest.raises(BankError, match="chunk"):
        bank.scan(lambda *a: None, chunk=0)


def test_engine_mixed_steps_store_only_the_real_rows():
    """Generated rows appended by mix never enter the bank nor overwrite a real sample's vector or label."""
    from _bank_checks import assert_bank_holds_only_real_rows, record_head_inputs
    from _engine_generators import make_result
    from hardneg import HardNeg
    from test_plugin import TinyNet, _cfg, _toy_data

    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    engine = HardNeg(_cfg(refresh_every=1000), model=model)
    engine._accept([make_result(1 - data.images[:4], (0, 1), 0.5)])  # unlike any real image; source ids 0-3
    seen, handle = record_head_inputs(model.head)
    all_ids, real_rows = [], []
    for ids in (torch.arange(0, 96, 6), torch.arange(1, 96, 6)):  # id 0 among the real rows
        x, y, w = engine.mix(data.images[ids], data.labels[ids])
        assert x.shape[0] == 20 and engine.last_mix_pairs == [(0, 1)] * 4
        engine.observe(labels=y, logits=model(x), ids=ids)
        all_ids.append(ids)
        real_rows.append(seen[-1][:16])
    handle.remove()
    ids = torch.cat(all_ids)
    assert_bank_holds_only_real_rows(engine.bank, ids, torch.cat(real_rows), data.labels[ids])


def test_engine_substitute_mode_stores_only_the_rows_that_stayed_real():
    """mix_mode="substitute" replaces the last rows: their ids (and the generated rows) stay out of the bank."""
    from _bank_checks import assert_bank_holds_only_real_rows, record_head_inputs
    from _engine_generators import make_result
    from hardneg import HardNeg
    from test_plugin import TinyNet, _cfg, _toy_data

    torch.manual_seed(0)
    data = _toy_data()
    model = TinyNet()
    engine = HardNeg(_cfg(refresh_every=1000, mix_mode="substitute"), model=model)
    engine._accept([make_result(1 - data.images[:4], (0, 1), 0.5)])
    seen, handle = record_head_inputs(model.head)
    ids = torch.arange(0, 96, 6)
    x, y, w = engine.mix(data.images[ids], data.labels[ids])
    assert x.shape[0] == 16 and engine.last_mix_pairs == [(0, 1)] * 4
    engine.observe(labels=y, logits=model(x), ids=ids)
    handle.remove()
    assert_bank_holds_only_real_rows(engine.bank, ids[:12], seen[-1][:12], data.labels[ids[:12]])


# ---------------------------------------------------------------------- compressed storage
def test_float16_storage_halves_memory_and_searches_like_float32():
    x, y = clustered_modes(3000)
    full = EmbeddingBank(32, 5, index="flat", use_gpu=False)
    half = EmbeddingBank(32, 5, index="flat", use_gpu=False, storage="float16")
    for bank in (full, half):
        bank.upsert(torch.arange(3000), x, y)
        bank.upsert(torch.arange(100), x[100:200], y[100:200])  # replacements keep the class sums exact
    assert half._vectors.dtype == np.float16
    assert half.memory_bytes()["vectors"] * 2 == full.memory_bytes()["vectors"]
    _, want = full.search(x[:50], 10)
    scores, got = half.search(x[:50], 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) > 0.97
    vec, _ = half.get([5, 7])
    assert vec.dtype == np.float32
    means = half.class_means()
    half.rebuild()
    np.testing.assert_allclose(means, half.class_means(), atol=1e-6)
    restored = EmbeddingBank.from_state_dict(half.state_dict(), use_gpu=False)
    assert restored.storage == "float16"
    np.testing.assert_array_equal(restored.search(x[:5], 3)[1], half.search(x[:5], 3)[1])


def test_ivfpq_with_rerank_reaches_recall_and_updates_in_place():
    n = 8_000
    x, y = clustered_modes(n)
    exact = EmbeddingBank(32, 5, index="flat", use_gpu=False)
    pq = EmbeddingBank(32, 5, index="ivfpq", ivf_threshold=n, nprobe=16, use_gpu=False, storage="float16",
                       pq_bytes=8, rerank=16)
    for bank in (exact, pq):
        bank.upsert(torch.arange(n), x, y)
    assert pq.active_index == "ivfpq"
    mem = pq.memory_bytes()
    assert pq.nlist == pq._ann.nlist and pq._ann.code_size == pq.pq_bytes  # the public view (bank_bench)
    # codes + id in the lists (with their reserved headroom) + direct map
    assert (mem["index"] - 4 * 32 * pq.nlist - 8 * 256 * 4 * 4) / n <= (8 + 8) * (1 + LIST_HEADROOM) + 8 + 1
    q = x[:200] + 0.05
    _, want = exact.search(q, 10)
    recall = lambda got: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])  # noqa: E731
    assert recall(pq.search(q, 10)[1]) >= 0.9
    pq.rerank = 0
    plain = recall(pq.search(q, 10)[1])
    pq.rerank = 16
    assert recall(pq.search(q, 10)[1]) > plain + 0.3  # re-ranking is what pays here
    pq.upsert([3], x[[7000]], y[[7000]])  # a replaced vector is found at its new place
    assert pq.search(x[[7000]], 2)[1][0].tolist() in ([7000, 3], [3, 7000])


def test_engine_builds_the_compressed_bank_from_the_config():
    from hardneg import HardNeg, HardNegConfig
    from hardneg.config import ConfigError

    cfg = HardNegConfig(num_classes=5, embedding_dim=32, index="ivfpq", bank_storage="float16", bank_pq_bytes=8,
                        bank_rerank=16, ivf_threshold=2_000, async_refresh=False, refresh_every=1000)
    engine = HardNeg(cfg)
    x, y = clustered_modes(2_000)
    engine.observe(embeddings=x, labels=y, ids=torch.arange(2_000))
    bank = engine.bank
    assert (bank.storage, bank.pq_bytes, bank.rerank, bank.active_index) == ("float16", 8, 16, "ivfpq")
    restored = HardNeg(cfg)
    restored.load_state_dict(engine.state_dict())
    assert restored.bank.storage == "float16" and restored.bank.active_index == "ivfpq"
    engine.close()
    restored.close()
    with pytest.raises(ConfigError, match="bank_pq_bytes"):
        HardNegConfig(num_classes=5, embedding_dim=30, index="ivfpq", bank_pq_bytes=8)


def test_vectors_in_a_memory_mapped_file(tmp_path):
    x, y = clustered_modes(3000)
    path = tmp_path / "bank.f16"
    ram = EmbeddingBank(32, 5, index="flat", use_gpu=False, storage="float16")
    disk = EmbeddingBank(32, 5, index="flat", use_gpu=False, storage="float16", storage_path=str(path))
    for bank in (ram, disk):
        for start in range(0, 3000, 700):  # the file grows with the bank
            bank.upsert(torch.arange(start, min(3000, start + 700)), x[start : start + 700], y[start : start + 700])
        bank.remove([5, 17, 2999])
        bank.upsert([6], x[[100]], y[[100]])
    assert isinstance(disk._vectors, np.memmap) and path.stat().st_size >= 2997 * 32 * 2
    mem = disk.memory_bytes()
    assert mem["vectors"] == 0 and mem["vectors_on_disk"] >= 2997 * 32 * 2
    np.testing.assert_array_equal(disk.search(x[:20], 5)[1], ram.search(x[:20], 5)[1])
    np.testing.assert_array_equal(disk.get([6, 7])[0], ram.get([6, 7])[0])
    np.testing.assert_allclose(disk.class_means(), ram.class_means())
    other = EmbeddingBank(32, 5, index="flat", use_gpu=False, storage="float16", storage_path=str(tmp_path / "b2"))
    other.load_state_dict(disk.state_dict())
    assert isinstance(other._vectors, np.memmap)
    np.testing.assert_array_equal(other.search(x[:20], 5)[1], ram.search(x[:20], 5)[1])


def test_reserve_allocates_slots_once_and_nlist_says_whether_an_ivf_answers():
    bank = EmbeddingBank(8, 3, index="flat", use_gpu=False)
    assert bank.nlist is None and bank.capacity == 0
    bank.reserve(5000)
    assert bank.capacity == 5000 and len(bank) == 0
    x, y = clustered_modes(3000, 8, k=3)
    bank.upsert(torch.arange(3000), x, y)
    assert bank.capacity == 5000 and len(bank) == 3000  # no reallocation below the reserve
    assert bank.get([5])[1].tolist() == [int(y[5])]
    ivf = EmbeddingBank(8, 3, index="ivf", ivf_threshold=1000, use_gpu=False)
    ivf.upsert(torch.arange(3000), x, y)
    assert ivf.active_index == "ivf" and ivf.nlist is not None and ivf.nlist >= 1


# ---------------------------------------------------------------- exact search through BLAS at any query count
# FAISS (1.15: n_queries * d >= 128,000) computes a kNN with BLAS only for enough queries; fewer run
# a sequential loop 8-17x slower, which made a 50k refresh in 64-query chunks take 29 s instead of 2.4.


def _spy_faiss_knn(monkeypatch):
    import faiss

    import hardneg.bank as bank_mod

    calls = []
    real = faiss.knn

    def spy(q, xb, k, metric=faiss.METRIC_L2, **kw):
        calls.append((len(q), len(xb), q.shape[1]))
        return real(q, xb, k, metric=metric, **kw)

    monkeypatch.setattr(bank_mod.faiss, "knn", spy)
    return calls


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_a_search_of_few_queries_finds_exact_neighbours_without_faiss_sequential_loop(monkeypatch, metric, storage):
    from hardneg.bank import _SEQUENTIAL_WORK, blas_query_chunk

    d, n = 128, 80_000  # 16 queries x 80k x 128 = 164M multiply-adds: past the few-ms sequential budget
    x = _random(n, d, seed=1)
    bank = EmbeddingBank(dim=d, num_classes=2, metric=metric, index="flat", storage=storage)
    bank.upsert(torch.arange(n), x, torch.zeros(n, dtype=torch.long))
    q = _random(16, d, seed=4)
    assert 16 < blas_query_chunk(d) and 16 * n * d > _SEQUENTIAL_WORK
    calls = _spy_faiss_knn(monkeypatch)
    scores, ids = bank.search(q, 5)
    # the neighbours are the brute-force ones, scores included
    xs = torch.from_numpy(bank.get(np.arange(n))[0]).float()
    qs = torch.nn.functional.normalize(q, dim=1) if metric == "cosine" else q
    full = qs @ xs.T if metric == "cosine" else torch.cdist(qs, xs) ** 2
    ref_s, ref_i = torch.topk(full, 5, dim=1, largest=metric == "cosine")
    np.testing.assert_array_equal(ids, ref_i.numpy())
    np.testing.assert_allclose(scores, ref_s.numpy(), rtol=1e-4, atol=1e-3)
    # and FAISS never ran its sequential loop over the bank for them
    assert not [c for c in calls if c[0] * c[2] < blas_query_chunk(1) and c[0] * c[1] * c[2] > _SEQUENTIAL_WORK]


def test_a_refresh_searches_an_exact_bank_in_chunks_faiss_computes_by_blas(monkeypatch):
    from hardneg.bank import blas_query_chunk

    d, n = 64, 3_000
    bank = EmbeddingBank(dim=d, num_classes=3, index="flat")
    bank.upsert(torch.arange(n), _random(n, d, seed=2), torch.arange(n) % 3)
    q = _random(5_000, d, seed=6).numpy()
    whole = bank.search_with_labels(q, 11)
    sizes = []
    real = bank._search_labelled
    monkeypatch.setattr(bank, "_search_labelled", lambda qq, k, refresh=False: sizes.append(len(qq)) or real(qq, k, refresh))
    chunked = bank.search_many(q, 11, chunk=64)  # the refresh's default chunk
    assert min(sizes[:-1]) >= blas_query_chunk(d) and sum(sizes) == len(q)
    (ws, wi, wl), (cs, ci, cl) = whole, chunked
    np.testing.assert_array_equal(wi, ci)  # the same neighbours and labels
    np.testing.assert_array_equal(wl, cl)
    # scores to float32 rounding: a BLAS product's summation order depends on the matrix's shape
    # and on the CPU's kernels (bit-equal on an Intel VM, 2.4e-7 apart on an AMD one)
    np.testing.assert_allclose(ws, cs, rtol=0, atol=1e-6)
