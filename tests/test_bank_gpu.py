"""The bank's FAISS GPU path, exercised on the CPU by standing in for the GPU build's functions.

What this does NOT exercise (needs a FAISS GPU build and a GPU): that ``faiss.knn_gpu`` itself
returns the same neighbours as ``faiss.knn`` and that the scratch-memory cap is honoured on the
device. It does check that the path is chosen when a GPU build sees a GPU, not otherwise, and that
it is called with the bank's GPU-resident vectors (a torch tensor written by upsert, never
re-uploaded per search), k and metric, serialised across threads; that a refresh searches all its
queries in one call; that "auto" stays exact on a GPU; and that k > 2048 falls back to the CPU.
The resident copy lives on the CPU here (no CUDA): the bank asks ``_current_cuda_device``.
"""

import sys
import threading

import faiss
import numpy as np
import pytest
import torch

from hardneg import HardNeg, HardNegConfig
from hardneg.bank import GPU_TEMP_MEMORY, EmbeddingBank


class FakeGpuResources:
    created = 0

    def __init__(self):
        FakeGpuResources.created += 1
        self.temp_memory = None

    def setTempMemory(self, size):
        self.temp_memory = size


@pytest.fixture
def fake_gpu(monkeypatch):
    """A FAISS 'GPU build' with one GPU whose knn_gpu records its calls and answers with faiss.knn."""
    calls = []
    active = []

    def knn_gpu(res, xq, xb, k, D=None, I=None, metric=faiss.METRIC_L2, device=-1, **kw):
        active.append(1)
        assert len(active) == 1, "two threads used one StandardGpuResources at once"
        try:
            assert isinstance(xq, torch.Tensor) and isinstance(xb, torch.Tensor), "device tensors, not numpy"
            assert k <= 2048, "GPU FAISS refuses k > 2048"
            calls.append({"res": res, "xq": xq.numpy().copy(), "xb_rows": xb.shape[0], "k": k, "metric": metric,
                          "contiguous": xq.is_contiguous() and xb.is_contiguous(),
                          "dtype": (xq.dtype, xb.dtype), "xb_ptr": xb.data_ptr(), "xb": xb.clone()})
            d, i = faiss.knn(xq.float().numpy(), xb.float().numpy(), k, metric=metric)
            return torch.from_numpy(d), torch.from_numpy(i)
        finally:
            active.pop()

    FakeGpuResources.created = 0
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", FakeGpuResources, raising=False)
    monkeypatch.setattr(faiss, "knn_gpu", knn_gpu, raising=False)
    return calls


def _vectors(n=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.arange(n) % 5


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_gpu_build_with_a_gpu_searches_with_knn_gpu(fake_gpu, metric):
    x, y = _vectors()
    bank = EmbeddingBank(16, 5, metric=metric, index="flat", use_gpu=True)
    assert bank.on_gpu and FakeGpuResources.created == 1
    assert bank._gpu_res.temp_memory == GPU_TEMP_MEMORY  # scratch memory capped
    bank.upsert(torch.arange(200), x, y)
    scores, ids = bank.search(x[:7], k=5)
    assert len(fake_gpu) == 1
    call = fake_gpu[0]
    assert call["res"] is bank._gpu_res and call["k"] == 5 and call["xb_rows"] == 200
    want_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    assert call["metric"] == want_metric and call["contiguous"] and call["dtype"] == (torch.float32, torch.float32)
    cpu = EmbeddingBank(16, 5, metric=metric, index="flat", use_gpu=False)
    cpu.upsert(torch.arange(200), x, y)
    cpu_scores, cpu_ids = cpu.search(x[:7], k=5)
    np.testing.assert_array_equal(ids, cpu_ids)
    np.testing.assert_allclose(scores, cpu_scores, rtol=1e-5, atol=1e-5)
    assert len(fake_gpu) == 1  # the use_gpu=False bank never touched the GPU path


def test_no_gpu_or_use_gpu_off_stays_on_the_cpu(fake_gpu, monkeypatch):
    x, y = _vectors()
    off = EmbeddingBank(16, 5, index="flat", use_gpu=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    no_gpu = EmbeddingBank(16, 5, index="flat", use_gpu=True)
    for bank in (off, no_gpu):
        bank.upsert(torch.arange(200), x, y)
        bank.search(x[:3], k=4)
        assert not bank.on_gpu
    assert fake_gpu == [] and FakeGpuResources.created == 0


def test_cpu_only_build_has_no_gpu_path(monkeypatch):
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    bank = EmbeddingBank(4, 2, use_gpu=True)
    assert not bank.on_gpu


def test_engine_bank_follows_use_gpu_index(fake_gpu):
    emb, y = _vectors(n=16, d=8)
    for flag in (True, False):
        engine = HardNeg(HardNegConfig(num_classes=5, use_gpu_index=flag, refresh_every=1, async_refresh=False,
                                       knn_k=3))
        engine.observe(embeddings=emb, labels=y, ids=torch.arange(16))  # refreshes: a kNN pass over the bank
        assert engine.bank.on_gpu is flag and engine.stats()["bank_on_gpu"] is flag
        restored = HardNeg(HardNegConfig(num_classes=5, use_gpu_index=flag))
        restored.load_state_dict(engine.state_dict())
        assert restored.bank.on_gpu is flag
        engine.close()
        restored.close()
    assert fake_gpu and all(c["k"] >= 3 for c in fake_gpu)


def test_gpu_searches_from_two_threads_are_serialised(fake_gpu):
    x, y = _vectors()
    bank = EmbeddingBank(16, 5, index="flat", use_gpu=True)
    bank.upsert(torch.arange(200), x, y)
    errors = []

    def search():
        try:
            for _ in range(20):
                bank.search(x[:50], k=5)
        except AssertionError as exc:  # raised by the fake when two calls overlap
            errors.append(exc)

    threads = [threading.Thread(target=search) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(fake_gpu) == 80


def test_gpu_extra_installs_a_faiss_gpu_build():
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    gpu = meta["project"]["optional-dependencies"]["gpu"]
    assert any(dep.startswith("faiss-gpu") for dep in gpu)
    assert "gpu" not in " ".join(meta["project"]["optional-dependencies"]["all"])  # CPU boxes keep faiss-cpu


def test_resident_copy_is_written_by_upsert_not_reuploaded_per_search(fake_gpu):
    x, y = _vectors(n=300)
    bank = EmbeddingBank(16, 5, index="flat", use_gpu=True)
    bank.upsert(torch.arange(200), x[:200], y[:200])
    bank.search(x[:3], k=4)
    bank.search(x[3:6], k=4)
    assert fake_gpu[0]["xb_ptr"] == fake_gpu[1]["xb_ptr"] == bank._gpu_vectors.data_ptr()  # no upload per call
    assert bank._gpu_vectors.data_ptr() != bank._vectors.ctypes.data  # its own (device) buffer
    bank.upsert(torch.tensor([7, 250]), x[[250, 7]], y[[250, 7]])  # a replaced row and a new one
    _, ids = bank.search(x[[250, 7]], k=1)
    assert ids[:, 0].tolist() == [7, 250]
    resident = fake_gpu[-1]["xb"]
    np.testing.assert_array_equal(resident.numpy(), bank._vectors[: len(bank)])  # the copy follows every upsert
    bank.remove([3, 4])
    bank.search(x[:2], k=2)
    np.testing.assert_array_equal(fake_gpu[-1]["xb"].numpy(), bank._vectors[: len(bank)])


def test_refresh_searches_all_queries_in_one_gpu_call(fake_gpu):
    from hardneg.confusion import ConfusionGraph

    x, y = _vectors(n=400)
    bank = EmbeddingBank(16, 5, index="flat", use_gpu=True)
    bank.upsert(torch.arange(400), x, y)
    graph = ConfusionGraph(5, knn_k=4, max_queries=300)
    assert graph.search_chunk < 300
    graph.refresh(bank)
    assert len(fake_gpu) == 1 and fake_gpu[0]["xq"].shape[0] == 300


def test_auto_index_stays_exact_on_the_gpu_past_the_ivf_threshold(fake_gpu):
    x, y = _vectors(n=300)
    gpu = EmbeddingBank(16, 5, index="auto", ivf_threshold=100, use_gpu=True)
    cpu = EmbeddingBank(16, 5, index="auto", ivf_threshold=100, use_gpu=False)
    for bank in (gpu, cpu):
        bank.upsert(torch.arange(300), x, y)
    assert gpu.active_index == "flat" and cpu.active_index == "ivf"
    gpu.search(x[:2], k=3)
    assert len(fake_gpu) == 1


def test_k_above_the_gpu_limit_searches_on_the_cpu(fake_gpu):
    n = 2100
    x, y = _vectors(n=n)
    bank = EmbeddingBank(16, 5, index="flat", use_gpu=True)
    bank.upsert(torch.arange(n), x, y)
    _, ids = bank.search(x[:2], k=2049)  # the fake raises for k > 2048, as GPU FAISS does
    cpu = EmbeddingBank(16, 5, index="flat", use_gpu=False)
    cpu.upsert(torch.arange(n), x, y)
    np.testing.assert_array_equal(ids[:, :50], cpu.search(x[:2], k=2049)[1][:, :50])
    assert fake_gpu == []
    bank.search(x[:2], k=2048)
    assert len(fake_gpu) == 1


def test_resident_copy_goes_to_the_current_device_not_cuda_0(monkeypatch):
    from hardneg import bank as bank_module

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert bank_module._current_cuda_device() == torch.device("cuda", 1)  # read on the constructing thread


def test_float16_storage_keeps_a_float16_resident_copy(fake_gpu):
    x, y = _vectors(n=300)
    bank = EmbeddingBank(16, 5, index="flat", use_gpu=True, storage="float16")
    bank.upsert(torch.arange(300), x, y)
    _, ids = bank.search(x[:4], k=1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3]
    assert bank._gpu_vectors.dtype == torch.float16 and fake_gpu[-1]["dtype"][1] == torch.float16
    np.testing.assert_array_equal(bank._gpu_vectors[:300].numpy(), bank._vectors[:300])
