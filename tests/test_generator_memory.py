"""Generator memory, copies and compile (issue 18 items 6 and 7), all on the CPU.

* memory: the SD path caps samples per UNet call and per VAE slice by default; the worker splits
  requests at ``worker_max_batch`` and gives the process backend's child its GPU share
  (``worker_memory_fraction``) before the generator loads;
* copies: a generator object passed in is used by the worker as is (no deep copy);
* compile: the denoiser compiles where it runs, once, and a changing batch (r grouping, short last
  chunks, the active rows of the class-conditional loop) never recompiles; the worker warms the
  generator up before it reports ready.
"""

from __future__ import annotations

import copy
import pathlib
import pickle
import queue
import sys
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _fake_generators as fakes  # noqa: E402

from hardneg import HardNeg, HardNegConfig  # noqa: E402
from hardneg import worker as worker_mod  # noqa: E402
from hardneg.config import ConfigError  # noqa: E402
from hardneg.generators.compiled import CompiledDenoiser  # noqa: E402
from hardneg.worker import GenerationRequest, GenerationWorker, ObjectFactory  # noqa: E402


class RecordingGenerator(fakes.FakeGenerator):
    """Records the batch size and seed of every generate call and whether warmup() ran."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[int, Any]] = []
        self.warmed = 0

    def warmup(self) -> None:
        assert not self.batches, "warm-up must come before any request"
        self.warmed += 1

    def generate(self, sources, source_labels, target_labels, ratios, seed=None):  # type: ignore[override]
        self.batches.append((len(sources), seed))
        return super().generate(sources, source_labels, target_labels, ratios, seed)


def _request(n: int, seed: int = 5) -> GenerationRequest:
    g = torch.Generator().manual_seed(n)
    return GenerationRequest(request_id=n, pair=(3, 8), source_ids=torch.arange(n), sources=torch.rand(n, 1, 8, 8, generator=g),
                             source_labels=3, target_labels=8, ratios=torch.linspace(0.3, 1.0, n), step=1, seed=seed)


def _run(worker: GenerationWorker, req: GenerationRequest) -> Any:
    with worker:
        worker.wait_until_ready(60)
        assert worker.submit(req)
        (result,) = worker.drain(60)
    return result


# ----------------------------------------------------------------------------- worker memory
def test_worker_max_batch_splits_a_request_and_keeps_its_order():
    gen = RecordingGenerator()
    req = _request(7)
    result = _run(GenerationWorker(ObjectFactory(gen), max_batch=3), req)
    assert [b for b, _ in gen.batches] == [3, 3, 1]
    seeds = [s for _, s in gen.batches]
    assert seeds[0] == 5 and len(set(seeds)) == 3  # the first chunk keeps the request's seed, the rest differ
    expected = fakes.expected_images(req.sources, req.target_labels, req.ratios)
    torch.testing.assert_close(result.images, expected)  # every sample with its own r, in order


def test_worker_warms_the_generator_up_before_it_is_ready():
    gen = RecordingGenerator()
    _run(GenerationWorker(ObjectFactory(gen)), _request(2))
    assert gen.warmed == 1 and len(gen.batches) == 1
    cold = RecordingGenerator()
    _run(GenerationWorker(ObjectFactory(cold), warmup=False), _request(2))
    assert cold.warmed == 0


def test_process_child_takes_its_gpu_share_before_the_generator_loads(monkeypatch):
    """The child sets torch.cuda.set_per_process_memory_fraction first (mocked CUDA, run in this process)."""
    events: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("device", str(d))))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, d=None: events.append(("fraction", f, str(d))))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: None)
    monkeypatch.setattr(worker_mod.signal, "signal", lambda *a: None)  # leave pytest's SIGINT handler alone

    class Q(queue.Queue):
        def cancel_join_thread(self) -> None:
            pass

    def factory() -> Any:
        events.append(("build",))
        return fakes.FakeGenerator()

    in_q, out_q = Q(), Q()
    in_q.put(None)  # serve nothing: stop right after reporting ready
    worker_mod._child_main(factory, in_q, out_q, stop=type("E", (), {"is_set": lambda self: False})(),
                           num_threads=1, device_str="cuda:1",
                           memory={"max_batch": None, "memory_fraction": 0.4, "warmup": True})
    assert events == [("device", "cuda:1"), ("fraction", 0.4, "cuda:1"), ("build",)]
    assert out_q.get_nowait()[0] == "ready"


def test_memory_settings_are_validated_and_reach_the_worker():
    with pytest.raises(ConfigError, match="worker_backend='process'"):
        HardNegConfig(num_classes=10, worker_memory_fraction=0.5)  # thread backend: no separate share
    with pytest.raises(ConfigError, match="worker_memory_fraction"):
        HardNegConfig(num_classes=10, worker_backend="process", worker_memory_fraction=1.5)
    with pytest.raises(ConfigError, match="worker_max_batch"):
        HardNegConfig(num_classes=10, worker_max_batch=0)
    with pytest.raises(ValueError, match="backend='process'"):
        GenerationWorker(fakes.FakeGenerator, memory_fraction=0.5)
    cfg = HardNegConfig(num_classes=10, worker_backend="process", worker_memory_fraction=0.3, worker_max_batch=4,
                        worker_warmup=False)
    assert HardNegConfig.from_dict(cfg.to_dict()) == cfg
    data = [(torch.rand(1, 8, 8), i % 10) for i in range(20)]
    engine = HardNeg(cfg.replace(worker_backend="thread", worker_memory_fraction=None), dataset=data,
                     generator=fakes.FakeGenerator(), start_worker=False)
    try:
        assert engine.worker.memory == {"max_batch": 4, "memory_fraction": None, "warmup": False}
    finally:
        engine.close()


# ----------------------------------------------------------------------------- no copies
def test_a_generator_object_is_used_as_is_and_a_restart_gets_a_copy():
    gen = RecordingGenerator()
    factory = ObjectFactory(gen)
    assert factory() is gen  # first build: the object itself (one copy on the device, compile kept)
    again = factory()
    assert again is not gen and isinstance(again, RecordingGenerator)  # a restart: a deep copy
    child = pickle.loads(pickle.dumps(ObjectFactory(gen)))  # what the process backend's child receives
    assert child() is not gen and isinstance(child.generator, RecordingGenerator)


# ----------------------------------------------------------------------------- compile
class _Denoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.emb = nn.Embedding(4, 2)

    def forward(self, x, t, class_labels=None, extra=None):
        out = self.conv(x) + t.float().view(-1, 1, 1, 1) / 100 + self.emb(class_labels).view(-1, 2, 1, 1)
        return (out + extra["bias"].view(-1, 1, 1, 1),)


def test_compiled_denoiser_compiles_once_for_any_batch_and_matches_the_module():
    torch.manual_seed(0)
    module = _Denoiser().eval()
    den = CompiledDenoiser(module, "eager", batch=4)
    with torch.no_grad():
        for n in (1, 4, 3, 9, 2):
            x, t, y = torch.randn(n, 2, 5, 5), torch.randint(0, 100, (n,)), torch.randint(0, 4, (n,))
            extra = {"bias": torch.randn(n)}
            (got,) = den(x, t, class_labels=y, extra=extra)
            (want,) = module(x, t, class_labels=y, extra=extra)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)
            if n == 1:
                first = den.compiles
    assert first >= 1 and den.compiles == first  # batches 1..9 all ran the one compiled shape
    clone = copy.deepcopy(den)  # the compiled code does not travel: compiled again where it runs
    assert clone._compiled is None and clone.compiles == 0
    assert pickle.loads(pickle.dumps(den))._compiled is None


def test_stable_diffusion_compiles_at_warmup_and_never_again(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from benchmarks._tiny_sd import make_tiny_sd_pipeline
    from hardneg.generators.stable_diffusion import StableDiffusionGenerator

    torch.set_num_threads(1)
    pipe = make_tiny_sd_pipeline(tmp_path)
    plain = StableDiffusionGenerator(pipe, ["a", "b", "c"], num_inference_steps=4, max_batch_size=4)
    gen = StableDiffusionGenerator(pipe, ["a", "b", "c"], num_inference_steps=4, max_batch_size=4, compile="eager")
    assert gen.compiles == 0  # lazily: nothing compiled where it was built
    gen.warmup()
    compiled = gen.compiles
    assert compiled >= 1
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 6):  # r groups of 1-2 samples, a 6-sample group split 4 + 2
        x = torch.rand(n, 3, 16, 16, generator=g)
        src, tgt = torch.zeros(n, dtype=torch.long), torch.arange(n) % 3
        r = torch.tensor([0.3, 0.6, 1.0, 0.6, 0.3, 0.9][:n])
        torch.testing.assert_close(gen.generate(x, src, tgt, r, seed=1), plain.generate(x, src, tgt, r, seed=1),
                                   atol=1e-4, rtol=0)
    assert gen.compiles == compiled, "a batch change recompiled the UNet"
    assert copy.deepcopy(gen).compiles == 0  # a copy compiles again where it runs


def test_class_conditional_compile_survives_changing_active_rows():
    pytest.importorskip("diffusers")
    from hardneg.generators.class_conditional import ClassConditionalConfig, ClassConditionalGenerator

    torch.set_num_threads(1)
    cfg = ClassConditionalConfig(num_classes=3, in_channels=1, image_size=8, block_out_channels=(8, 16),
                                 norm_num_groups=4, attention_head_dim=4, num_inference_steps=5)
    plain = ClassConditionalGenerator(cfg, None, seed=0)
    gen = ClassConditionalGenerator(cfg, None, seed=0).compile("eager", batch=8)
    gen.warmup()
    compiled = gen.compiles
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels, targets = torch.zeros(5, dtype=torch.long), torch.tensor([1, 2, 1, 2, 1])
    r = torch.tensor([0.2, 0.5, 0.5, 0.9, 1.0])  # samples join the loop at different steps
    torch.testing.assert_close(gen.generate(x, labels, targets, r, seed=3), plain.generate(x, labels, targets, r, seed=3),
                               atol=1e-5, rtol=0)
    assert compiled >= 1 and gen.compiles == compiled


def test_stable_diffusion_caps_unet_and_vae_batches_by_default(tmp_path, monkeypatch):
    """No whole-request encode/decode: 10 samples run in slices of DEFAULT_MAX_BATCH."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from benchmarks._tiny_sd import make_tiny_sd_pipeline
    from hardneg.generators.stable_diffusion import DEFAULT_MAX_BATCH, StableDiffusionGenerator

    torch.set_num_threads(1)
    pipe = make_tiny_sd_pipeline(tmp_path)
    gen = StableDiffusionGenerator(pipe, ["a", "b", "c"], num_inference_steps=2)
    assert gen.max_batch_size == DEFAULT_MAX_BATCH == 8
    seen: dict[str, list[int]] = {"encode": [], "decode": [], "unet": []}
    for part in ("encode", "decode"):
        real = getattr(pipe.vae, part)
        monkeypatch.setattr(pipe.vae, part, lambda x, *a, _r=real, _p=part, **k: seen[_p].append(len(x)) or _r(x, *a, **k))
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen["unet"].append(args[0].shape[0]))
    try:
        n = 10
        gen.generate(torch.rand(n, 3, 16, 16), torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long), 1.0,
                     seed=0)
    finally:
        handle.remove()
    assert seen["encode"] == [8, 2] and seen["decode"] == [8, 2]
    assert max(seen["unet"]) == 2 * 8  # 8 samples, doubled by classifier-free guidance


def test_a_compiled_denoiser_still_pickles_after_lightning_is_imported():
    """Lightning records torch.compile's arguments on the module: the backend must pickle (process worker)."""
    pytest.importorskip("lightning")
    import lightning  # noqa: F401  (its import patches torch.compile)

    module = nn.Conv2d(2, 2, 3)
    den = CompiledDenoiser(module, "eager", batch=4)
    den(torch.randn(3, 2, 5, 5))
    assert den.compiles >= 1
    back = pickle.loads(pickle.dumps(den))
    assert back.compiles == 0 and back(torch.randn(2, 2, 5, 5)).shape == (2, 2, 3, 3)
