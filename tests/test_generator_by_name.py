"""The generator the config names: built with the config's settings, checked at HardNeg(...) time.

End to end as a user with local weights takes it: a tiny Stable Diffusion pipeline written with
``save_pretrained`` to a folder, loaded by name through ``HardNegConfig(generator="stable-diffusion",
generator_path=FOLDER)``, images arriving in the buffer in the data's shape and value range.
"""

from __future__ import annotations

import functools
import importlib.util
import pickle
import time

import pytest
import torch

from hardneg import HardNeg, HardNegConfig
from hardneg._optional import MissingExtraError
from hardneg.config import ConfigError
from hardneg.data import from_tensors, load_digits
from hardneg.generators.from_config import factory_from_config
from hardneg.plugin import HardNegError
from hardneg.worker import WorkerStartError

from _engine_generators import BlendGenerator, OnDeviceGenerator

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from benchmarks._tiny_sd import make_tiny_sd_pipeline  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny random SD 1.x pipeline saved the way real weights sit on disk."""
    tmp = tmp_path_factory.mktemp("tiny_sd")
    make_tiny_sd_pipeline(tmp).save_pretrained(tmp / "ckpt")
    return str(tmp / "ckpt")


@pytest.fixture(scope="module")
def digits():
    """1-channel 32 px digits (a subset keeps the bank small)."""
    train, _ = load_digits(size=32, seed=0)
    return train.subset(range(300))


@pytest.fixture(scope="module")
def rgb():
    """3-channel 24 px data with class structure: class c brightens colour channel c % 3 and rows 4c..4c+4."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(40)
    x = torch.rand(len(y), 3, 24, 24, generator=g) * 0.4
    for c in range(4):
        x[y == c, c % 3, 4 * c : 4 * c + 4, :] += 0.6
    return from_tensors(x.clamp(0, 1), y, ["red square", "green square", "blue square", "red bar"])


def _sd_config(folder, num_classes, backend, **kw):
    base = dict(num_classes=num_classes, generator="stable-diffusion", generator_path=folder, worker_backend=backend,
                generator_steps=STEPS, images_per_refresh=4, generation_batch=4, top_pairs=1, knn_k=5,
                refresh_every=10**6, label_mode="hard", seed=0)
    base.update(kw)
    return HardNegConfig(**base)


def _observe_all(engine, data, dim=16):
    """Record every sample once with fixed random-projection embeddings (class structure from the pixels)."""
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(data.images[0].numel(), dim, generator=g)
    for s in range(0, len(data), 50):
        idx = torch.arange(s, min(s + 50, len(data)))
        engine.observe(embeddings=data.images[idx].flatten(1) @ proj, labels=data.labels[idx], ids=idx)


def _generate_through_engine(cfg, data):
    with HardNeg(cfg, class_names=data.class_names, dataset=data) as engine:
        _observe_all(engine, data)
        assert engine.refresh(), "no confused pair to generate for"
        added = engine.wait_for_generation(timeout=300)
        stats = engine.stats()["worker"]
        images = engine.buffer.state_dict()["images"]
    return added, stats, images


def _check_images(added, stats, images, data):
    assert stats["failures"] == 0 and stats["restarts"] == 0, stats
    assert added == 4 and images is not None
    assert tuple(images.shape) == (4, *data.image_shape)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


# --- stable diffusion by name, end to end ----------------------------------------------------
@pytest.mark.parametrize("data_name", ["digits", "rgb"])
def test_stable_diffusion_by_name_fills_the_buffer_thread_backend(sd_folder, data_name, request):
    data = request.getfixturevalue(data_name)
    cfg = _sd_config(sd_folder, data.num_classes, "thread")
    _check_images(*_generate_through_engine(cfg, data), data)


@pytest.mark.slow  # a spawned child imports torch, diffusers and transformers: ~1 min on a busy CPU
@pytest.mark.parametrize("data_name", ["digits", "rgb"])
def test_stable_diffusion_by_name_fills_the_buffer_process_backend(sd_folder, data_name, request):
    data = request.getfixturevalue(data_name)
    cfg = _sd_config(sd_folder, data.num_classes, "process")
    _check_images(*_generate_through_engine(cfg, data), data)


def test_the_by_name_factory_pickles_and_carries_the_config_settings(sd_folder, rgb):
    """What the process worker receives: a picklable factory holding class names and every setting."""
    cfg = _sd_config(sd_folder, 4, "process", generator_steps=3, guidance_scale=1.5, generator_max_batch=2,
                     prompt_template="a drawing of a {class_name}", prompts={"red bar": "a red bar"},
                     generator_scheduler="ddim", generator_resolution=32, generator_dtype="fp32")
    factory = pickle.loads(pickle.dumps(factory_from_config(cfg, rgb.class_names)))
    assert isinstance(factory, functools.partial)
    gen = factory()
    assert gen.class_names == rgb.class_names
    assert gen.prompts == ["a drawing of a red square", "a drawing of a green square", "a drawing of a blue square",
                           "a red bar"]
    assert gen.num_inference_steps == 3 and gen.guidance_scale == 1.5 and gen.max_batch_size == 2
    assert type(gen._scheduler_template).__name__ == "DDIMScheduler"
    assert gen.resolution == (32, 32)
    assert gen.device == torch.device("cpu") and gen.dtype == torch.float32


def test_class_conditional_factory_carries_steps_batch_and_device(tmp_path):
    from hardneg.generators.class_conditional import ClassConditionalConfig, ClassConditionalGenerator

    folder = str(tmp_path / "cc")
    ClassConditionalGenerator(ClassConditionalConfig(num_classes=4, image_size=8, block_out_channels=(16, 16),
                                                     norm_num_groups=8, mid_attention=False)).save(folder)
    cfg = HardNegConfig(num_classes=4, generator="class-conditional", generator_path=folder, generator_steps=5,
                        guidance_scale=3.0, generator_max_batch=7)
    gen = pickle.loads(pickle.dumps(factory_from_config(cfg, ["a", "b", "c", "d"])))()
    assert gen.config.num_inference_steps == 5 and gen.config.guidance_scale == 3.0 and gen.max_batch == 7
    assert gen.device == torch.device("cpu")


def test_stable_diffusion_generator_moves_and_casts_with_to(sd_folder):
    from hardneg.generators.stable_diffusion import StableDiffusionGenerator

    gen = StableDiffusionGenerator.from_pretrained(sd_folder, ["a", "b"], num_inference_steps=STEPS, device="cpu",
                                                   dtype="fp32")
    assert gen.to(dtype="bf16") is gen
    assert gen.dtype == torch.bfloat16 and gen.pipeline.vae.dtype == torch.bfloat16
    gen.to("cpu", "fp32")
    assert gen.dtype == torch.float32 and gen.device == torch.device("cpu")
    x = torch.rand(2, 1, 16, 16)
    out = gen.generate(x, torch.tensor([0, 1]), torch.tensor([1, 0]), 0.6, seed=0)
    assert out.shape == x.shape and torch.isfinite(out).all()


# --- a generator that cannot start fails HardNeg(...) -----------------------------------------
def _timed_construction(cfg, data):
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        HardNeg(cfg, class_names=data.class_names, dataset=data)
    return info.value, time.monotonic() - t0


@pytest.mark.parametrize("backend", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_a_bad_stable_diffusion_path_fails_construction_with_the_reason(tmp_path, digits, backend):
    cfg = _sd_config(str(tmp_path / "no-such-model"), 10, backend, max_restarts=3)
    err, _ = _timed_construction(cfg, digits)
    assert isinstance(err, WorkerStartError)
    assert "model_index.json" in str(err) and "no-such-model" in str(err)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_the_worker_reports_a_failed_first_build_without_restarting(backend):
    import _fake_generators as fakes
    from hardneg.worker import GenerationWorker

    worker = GenerationWorker(fakes.failing_factory, backend=backend, max_restarts=3)
    with pytest.raises(WorkerStartError, match="generator factory failed"):
        worker.wait_until_ready(timeout=120)
    stats = worker.stats()
    assert stats["restarts"] == 0 and stats["state"] == "closed"


def test_the_worker_reports_what_it_built():
    from hardneg.worker import GenerationWorker

    with GenerationWorker(functools.partial(BlendGenerator, num_classes=6)) as worker:
        assert worker.wait_until_ready(timeout=60) == {"kind": "BlendGenerator", "num_classes": 6}
        assert worker.generator_info["num_classes"] == 6


def test_wrong_loader_arguments_and_missing_weights_fail_construction(tmp_path, digits):
    from hardneg.generators.class_conditional import ClassConditionalConfig, ClassConditionalGenerator

    folder = tmp_path / "cc"
    ClassConditionalGenerator(ClassConditionalConfig(num_classes=10, image_size=8, block_out_channels=(16, 16),
                                                     norm_num_groups=8, mid_attention=False)).save(str(folder))
    cfg = HardNegConfig(num_classes=10, generator="class-conditional", generator_path=str(folder),
                        generator_options={"strength": 0.5})
    err, _ = _timed_construction(cfg, digits)
    assert isinstance(err, WorkerStartError) and "cannot override ['strength']" in str(err)
    (folder / "unet.safetensors").unlink()
    err, _ = _timed_construction(cfg.replace(generator_options={}), digits)
    assert isinstance(err, WorkerStartError) and "holds no unet.safetensors" in str(err)


def test_a_factory_that_raises_fails_construction_and_leaves_no_hooks(digits):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))

    def broken():
        raise OSError("weights file is truncated")

    with pytest.raises(WorkerStartError, match="weights file is truncated"):
        HardNeg(HardNegConfig(num_classes=10), model=model, dataset=digits, generator=broken)
    assert not model._forward_hooks and not model[1]._forward_pre_hooks


def test_a_missing_diffusers_extra_stops_construction_with_the_install_command(monkeypatch, digits):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    cfg = HardNegConfig(num_classes=10, generator="class-conditional")
    with pytest.raises(MissingExtraError, match=r"pip install 'hardneg\[diffusers\]'"):
        HardNeg(cfg, dataset=digits)


def test_a_failure_after_a_good_start_is_still_isolated(digits):
    """A generator that starts fine and fails on a request is counted, not raised (as before)."""
    gen = BlendGenerator(num_classes=10, shape=(1, 32, 32), fail_every=1)
    with HardNeg(HardNegConfig(num_classes=10, images_per_refresh=4, generation_batch=4, top_pairs=1, knn_k=5,
                               refresh_every=10**6), dataset=digits, generator=gen) as engine:
        _observe_all(engine, digits)
        engine.refresh()
        engine.wait_for_generation(timeout=60)
        stats = engine.stats()["worker"]
    assert stats["failures"] >= 1 and stats["state"] == "running"


# --- compatibility with the data, the config and the device -----------------------------------
def test_the_shipped_digits_generator_does_not_serve_a_five_class_config(digits):
    five = digits.subset((digits.labels < 5).nonzero().flatten())
    five.class_names = five.class_names[:5]
    cfg = HardNegConfig(num_classes=5, generator="class-conditional")  # no path: the shipped 10-class model
    with pytest.raises(HardNegError, match=r"knows 10 classes.*num_classes=5.*hardneg fit-generator"):
        HardNeg(cfg, dataset=five)


def test_channel_and_image_size_mismatches_are_refused(rgb):
    digits_like = from_tensors(torch.rand(20, 3, 32, 32), torch.arange(10).repeat(2))
    with pytest.raises(HardNegError, match=r"1-channel images.*3 channel.*hardneg fit-generator"):
        HardNeg(HardNegConfig(num_classes=10, generator="class-conditional"), dataset=digits_like)
    large = from_tensors(torch.rand(20, 1, 64, 64), torch.arange(10).repeat(2))
    with pytest.raises(HardNegError, match=r"fitted on 32x32 images but the training images are 64x64"):
        HardNeg(HardNegConfig(num_classes=10, generator="class-conditional"), dataset=large)
    small = from_tensors(torch.rand(20, 1, 16, 16), torch.arange(10).repeat(2))  # downsampled: fine
    HardNeg(HardNegConfig(num_classes=10, generator="class-conditional"), dataset=small).close()


def test_a_generator_on_another_device_than_the_worker_is_refused(digits):
    gen = OnDeviceGenerator(num_classes=10, shape=(1, 32, 32))
    with pytest.raises(HardNegError, match=r"cuda:1 but worker_device is cpu"):
        HardNeg(HardNegConfig(num_classes=10), dataset=digits, generator=gen)


def test_a_generator_object_with_the_wrong_class_count_is_refused(digits):
    with pytest.raises(HardNegError, match="knows 4 classes"):
        HardNeg(HardNegConfig(num_classes=10), dataset=digits, generator=BlendGenerator(num_classes=4))


# --- names checked when the config is made ---------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"generator": "stable-difusion"}, "generator must be one of"),
    ({"targeting": "confusoin"}, "unknown targeting policy 'confusoin'"),
    ({"curriculum": "adaptiv"}, "curriculum must be one of"),
    ({"generator": "class-conditional", "prompt_template": "a {class_name}"}, "only apply to generator='stable"),
    ({"generator": "class-conditional", "generator_dtype": "fp16"}, "runs in float32"),
    ({"generator": "stable-diffusion", "generator_scheduler": "heun"}, "generator_scheduler must be one of"),
    ({"generator": "stable-diffusion", "prompt_template": "a photo"}, r"\{class_name\} field"),
    ({"generator_steps": 0}, "generator_steps must be an integer >= 1"),
    ({"prompts": ["one prompt"]}, "one prompt per class"),
])
def test_unknown_names_and_misplaced_generator_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HardNegConfig(num_classes=3, **kwargs)


def test_a_targeting_policy_of_a_method_module_is_known_at_config_time():
    assert HardNegConfig(num_classes=3, targeting="long-tail").targeting == "long-tail"
