"""StableDiffusionGenerator on tiny random SD / SDXL pipelines built offline (CPU, seeded)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from benchmarks._tiny_sd import RESOLUTION, make_tiny_sd_pipeline, make_tiny_sdxl_pipeline  # noqa: E402

import hardneg._optional as optional  # noqa: E402
from hardneg.generators.base import Generator, GeneratorError  # noqa: E402
from hardneg.generators.stable_diffusion import StableDiffusionGenerator  # noqa: E402

CLASSES = ["cat", "dog", "bird"]
STEPS = 10
T = 1000


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny convs gain nothing from 2 threads; on a busy 2-core box they lose ~3x to contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))


def make(pipe: Any, **kw: Any) -> StableDiffusionGenerator:
    kw.setdefault("num_inference_steps", STEPS)
    return StableDiffusionGenerator(pipe, CLASSES, **kw)


class UNetSpy:
    """Forward pre-hook recording each UNet call's batch size, timestep and conditioning."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.calls.append(
            {
                "batch": args[0].shape[0],
                "t": int(args[1]),
                "text": kwargs["encoder_hidden_states"].detach().clone(),
                "added": kwargs.get("added_cond_kwargs"),
            }
        )

    def __enter__(self) -> "UNetSpy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def expected_timesteps(scheduler_cls: Any, config: Any, r: float) -> list[int]:
    """Independent reference: the schedule's timesteps at or below T * r."""
    s = scheduler_cls.from_config(config)
    s.set_timesteps(STEPS)
    return [int(t) for t in s.timesteps if int(t) <= T * r + 1e-9]


def inputs(n: int, channels: int = 3, size: tuple[int, int] = (20, 24), seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, *size, generator=g)
    src = torch.arange(n) % len(CLASSES)
    return x, src, (src + 1) % len(CLASSES)


# --- the edit itself ----------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_edit_keeps_shape_and_range_and_resizes_to_model(pipe: Any, channels: int, monkeypatch: Any) -> None:
    gen = make(pipe)
    assert isinstance(gen, Generator) and gen.num_classes == 3
    assert gen.resolution == (RESOLUTION, RESOLUTION)
    seen: list[tuple] = []
    real_encode = pipe.vae.encode

    def spy_encode(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(tuple(x.shape))
        return real_encode(x, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "encode", spy_encode)
    x, src, tgt = inputs(2, channels, size=(20, 24))
    out = gen.generate(x, src, tgt, 0.6, seed=0)
    assert seen == [(2, 3, RESOLUTION, RESOLUTION)]  # resized to the model, grey -> RGB
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 1e-3  # not a blank image
    assert (out - x).abs().mean() > 1e-3  # the edit changed the images


def test_value_range_is_respected(pipe: Any) -> None:
    gen = make(pipe, value_range=(-1.0, 1.0))
    x, src, tgt = inputs(2)
    out = gen.generate(x * 2 - 1, src, tgt, 0.6, seed=0)
    assert out.min() >= -1.0 and out.max() <= 1.0
    ref = make(pipe).generate(x, src, tgt, 0.6, seed=0)
    torch.testing.assert_close(out, ref * 2 - 1, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_unet_calls_are_the_timesteps_at_or_below_T_r(pipe: Any, scheduler: str) -> None:
    import diffusers

    cls = {"ddim": diffusers.DDIMScheduler, "dpm++": diffusers.DPMSolverMultistepScheduler}[scheduler]
    gen = make(pipe, scheduler=scheduler)
    x, src, tgt = inputs(2)
    ratios = [0.3, 0.501, 0.55, 0.71, 0.9, 1.0]
    counts, strength_differs = [], False
    for r in ratios:
        expected = expected_timesteps(cls, pipe.scheduler.config, r)
        with UNetSpy(pipe.unet) as spy:
            gen.generate(x, src, tgt, r, seed=0)
        assert [c["t"] for c in spy.calls] == expected, r
        assert all(c["batch"] == 2 * len(x) for c in spy.calls)  # one batched call per step (CFG)
        assert gen.timesteps_for_ratio(r) == expected
        counts.append(len(spy.calls))
        strength_differs |= len(expected) != min(int(STEPS * r), STEPS)  # img2img's rounding
    assert strength_differs  # the r values above include ones where img2img would run another count
    assert counts == sorted(counts) and counts[0] < counts[-1] == STEPS  # cost grows with r; r=1 runs all


def test_ratio_one_is_text_to_image_from_pure_noise(pipe: Any) -> None:
    gen = make(pipe)
    x, _, _ = inputs(2)
    same_target = torch.tensor([1, 1])
    # Same seed, same targets: sources (x0, x1) vs. (x0, x0) must give the same images at r = 1.
    x_same = x[:1].expand(2, -1, -1, -1).contiguous()
    a = gen.generate(x, torch.tensor([0, 2]), same_target, 1.0, seed=3)
    b = gen.generate(x_same, torch.tensor([0, 0]), same_target, 1.0, seed=3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # r = 1 ignores the source
    c = gen.generate(x, torch.tensor([0, 2]), same_target, 0.6, seed=3)
    d = gen.generate(x_same, torch.tensor([0, 0]), same_target, 0.6, seed=3)
    assert (c[1] - d[1]).abs().max() > 1e-3  # r < 1 keeps something of the source


def test_per_sample_ratios_are_grouped_and_routed(pipe: Any) -> None:
    gen = make(pipe, scheduler="ddim")
    x, src, tgt = inputs(4)
    ratios = [0.3, 0.9, 0.3, 0.9]
    with UNetSpy(pipe.unet) as spy:
        mixed = gen.generate(x, src, tgt, ratios, seed=5)
    n_low, n_high = len(gen.timesteps_for_ratio(0.3)), len(gen.timesteps_for_ratio(0.9))
    assert len(spy.calls) == n_low + n_high  # one pass per distinct r, not per sample
    assert [c["batch"] for c in spy.calls] == [4] * (n_low + n_high)  # 2 samples x CFG
    low = gen.generate(x, src, tgt, 0.3, seed=5)
    high = gen.generate(x, src, tgt, 0.9, seed=5)
    torch.testing.assert_close(mixed[[0, 2]], low[[0, 2]], atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[[1, 3]], high[[1, 3]], atol=1e-4, rtol=0)
    assert (low[0] - high[0]).abs().max() > 1e-3  # so the routing check above means something


def test_ratios_keeping_the_same_timesteps_share_one_pass(pipe: Any) -> None:
    gen = make(pipe, scheduler="ddim")
    assert gen.timesteps_for_ratio(0.55) == gen.timesteps_for_ratio(0.58)  # both stop above 601
    x, src, tgt = inputs(2)
    with UNetSpy(pipe.unet) as spy:
        gen.generate(x, src, tgt, [0.55, 0.58], seed=0)
    assert [c["batch"] for c in spy.calls] == [4] * len(gen.timesteps_for_ratio(0.55))
    with UNetSpy(pipe.unet) as spy:
        gen.generate(x, src, tgt, [0.999, 1.0], seed=0)  # same timesteps, but r = 1 starts from noise
    assert len(spy.calls) == 2 * STEPS


def test_max_batch_size_splits_without_changing_results(pipe: Any) -> None:
    x, src, tgt = inputs(3)
    whole = make(pipe).generate(x, src, tgt, 0.5, seed=1)
    gen = make(pipe, max_batch_size=2)
    with UNetSpy(pipe.unet) as spy:
        split = gen.generate(x, src, tgt, 0.5, seed=1)
    steps = len(gen.timesteps_for_ratio(0.5))
    assert sorted({c["batch"] for c in spy.calls}) == [2, 4] and len(spy.calls) == 2 * steps
    torch.testing.assert_close(split, whole, atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_seed_reproduces_and_different_seeds_differ(pipe: Any, scheduler: str) -> None:
    gen = make(pipe, scheduler=scheduler)  # euler_a draws fresh noise every step
    x, src, tgt = inputs(2)
    a = gen.generate(x, src, tgt, 0.7, seed=11)
    b = gen.generate(x, src, tgt, 0.7, seed=11)
    c = gen.generate(x, src, tgt, 0.7, seed=12)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_concurrent_calls_do_not_share_scheduler_state(pipe: Any) -> None:
    gen = make(pipe, scheduler="dpm++")  # multistep: keeps a history of model outputs
    x, src, tgt = inputs(2)
    ref = {r: gen.generate(x, src, tgt, r, seed=2) for r in (0.4, 0.8)}
    results: dict[float, torch.Tensor] = {}

    def work(r: float) -> None:
        results[r] = gen.generate(x, src, tgt, r, seed=2)

    threads = [threading.Thread(target=work, args=(r,)) for r in (0.4, 0.8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in (0.4, 0.8):
        torch.testing.assert_close(results[r], ref[r], atol=1e-5, rtol=0)


# --- prompts ------------------------------------------------------------------------------
def test_target_prompts_condition_each_sample(pipe: Any, monkeypatch: Any) -> None:
    gen = make(pipe, prompts={"dog": "a drawing of a dog", 2: "a bird in the sky"})
    assert gen.prompts == ["a photo of a cat.", "a drawing of a dog", "a bird in the sky"]
    seen: list[list[str]] = []
    real = pipe.encode_prompt

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(list(kwargs["prompt"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", spy)
    x, _, _ = inputs(3)
    targets = torch.tensor([1, 0, 1])
    with UNetSpy(pipe.unet) as spy_unet:
        gen.generate(x, torch.tensor([0, 2, 2]), targets, 0.5, seed=0)
    assert seen == [["a photo of a cat.", "a drawing of a dog"]]  # each target class encoded once

    monkeypatch.setattr(pipe, "encode_prompt", real)
    with torch.no_grad():
        cond, uncond = real(["a drawing of a dog", "a photo of a cat."], "cpu", 1, True)
    text = spy_unet.calls[0]["text"]  # [uncond x3, cond x3]
    torch.testing.assert_close(text[3:], cond[[0, 1, 0]])
    torch.testing.assert_close(text[:3], uncond[[0, 0, 0]])  # CFG against the empty prompt


def test_prompt_validation(pipe: Any) -> None:
    gen = make(pipe, prompt_template="{class_name}, photo", prompts=["x", "y", "z"])
    assert gen.prompts == ["x", "y", "z"]
    assert make(pipe, prompt_template="{class_name}, photo").prompts[0] == "cat, photo"
    with pytest.raises(ValueError, match="unknown class 'horse'"):
        make(pipe, prompts={"horse": "a horse"})
    with pytest.raises(ValueError, match="class names or indices"):
        make(pipe, prompts={3: "out of range"})
    with pytest.raises(ValueError, match="one prompt per class"):
        make(pipe, prompts=["only one"])
    with pytest.raises(ValueError, match="class_name"):
        make(pipe, prompt_template="a photo")
    with pytest.raises(ValueError, match="class_names"):
        StableDiffusionGenerator(pipe, [])
    with pytest.raises(ValueError, match="class_names"):
        StableDiffusionGenerator(pipe, None)  # type: ignore[arg-type]


# --- errors -------------------------------------------------------------------------------
def test_bad_inputs_raise_generator_error(pipe: Any) -> None:
    gen = make(pipe)
    x, src, tgt = inputs(2)
    with pytest.raises(GeneratorError, match="target_labels must lie in"):
        gen.generate(x, src, torch.tensor([0, 3]), 0.5)
    for bad in (0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(GeneratorError, match=r"\(0, 1\]"):
            gen.generate(x, src, tgt, bad)
    with pytest.raises(GeneratorError, match=r"\(0, 1\]"):
        gen.generate(x, src, tgt, [0.5, 1.01])
    with pytest.raises(GeneratorError, match="keeps no denoising step"):
        gen.generate(x, src, tgt, 0.0005)  # below the smallest timestep of the schedule
    with pytest.raises(GeneratorError, match="1 or 3 channels"):
        gen.generate(torch.rand(2, 2, 16, 16), src, tgt, 0.5)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        make(pipe, scheduler="heun")
    import diffusers

    heun = diffusers.HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="second-order"):
        make(type(pipe)(**{**pipe.components, "scheduler": heun}))  # the pipeline's own, kept


def test_nan_from_the_unet_raises(pipe: Any, monkeypatch: Any) -> None:
    gen = make(pipe)

    def nan_unet(sample: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        return (torch.full_like(sample, float("nan")),)

    monkeypatch.setattr(pipe.unet, "forward", nan_unet)
    x, src, tgt = inputs(2)
    with pytest.raises(GeneratorError, match="NaN"):
        gen.generate(x, src, tgt, 0.5, seed=0)


def test_missing_diffusers_names_the_extra(pipe: Any, monkeypatch: Any) -> None:
    real = optional.importlib.import_module

    def fake(name: str, *a: Any) -> Any:
        if name == "diffusers":
            raise ImportError("No module named 'diffusers'")
        return real(name, *a)

    monkeypatch.setattr(optional.importlib, "import_module", fake)
    with pytest.raises(optional.MissingExtraError, match=r"pip install 'hardneg\[diffusers\]'"):
        StableDiffusionGenerator.from_pretrained("some/model", CLASSES)


def test_importing_the_module_does_not_import_diffusers() -> None:
    import subprocess
    import sys

    code = "import sys, hardneg.generators.stable_diffusion; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- loading and SDXL ---------------------------------------------------------------------
def test_from_pretrained_local_folder(pipe: Any, tmp_path: Any) -> None:
    import diffusers

    pipe.save_pretrained(tmp_path / "ckpt")
    loaded = StableDiffusionGenerator.from_pretrained(
        tmp_path / "ckpt", CLASSES, num_inference_steps=STEPS, device="cpu", dtype="fp32"
    )
    assert isinstance(loaded.pipeline, diffusers.StableDiffusionPipeline)
    assert loaded.pipeline.unet is not pipe.unet
    assert isinstance(loaded._scheduler_template, diffusers.DPMSolverMultistepScheduler)  # paper default
    x, src, tgt = inputs(2)
    ref = make(pipe, scheduler="dpm++").generate(x, src, tgt, 0.6, seed=4)
    torch.testing.assert_close(loaded.generate(x, src, tgt, 0.6, seed=4), ref, atol=1e-5, rtol=0)


def test_sdxl_pipeline_uses_pooled_text_and_time_ids(tmp_path: Any) -> None:
    xl = make_tiny_sdxl_pipeline(tmp_path)
    gen = StableDiffusionGenerator(xl, CLASSES, num_inference_steps=STEPS, scheduler="euler")
    x, src, tgt = inputs(2, channels=1)
    with UNetSpy(xl.unet) as spy:
        out = gen.generate(x, src, tgt, 0.6, seed=0)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert len(spy.calls) == len(gen.timesteps_for_ratio(0.6)) > 0
    added = spy.calls[0]["added"]
    assert added["text_embeds"].shape == (4, 32)  # CFG: 2 x 2 pooled embeddings
    expected_ids = torch.tensor([RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION], dtype=torch.float32)
    assert torch.equal(added["time_ids"], expected_ids.repeat(4, 1))
    assert spy.calls[0]["text"].shape[-1] == 64  # both encoders' hidden states
