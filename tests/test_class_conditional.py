"""ClassConditionalGenerator: GeNIe semantics, determinism, shapes, errors, persistence, training."""

from __future__ import annotations

import functools
import json
import math
import pickle
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from hardneg.generators import GeneratorError, load_generator  # noqa: E402
from hardneg.generators.class_conditional import (  # noqa: E402
    ClassConditionalConfig,
    ClassConditionalGenerator,
    default_digits_generator_path,
)

# 10 DDIM steps, "trailing" spacing over T = 1000: timesteps 999, 899, ..., 99
TIMESTEPS = [999 - 100 * i for i in range(10)]


def tiny_config(**kw) -> ClassConditionalConfig:
    base = dict(num_classes=3, image_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                attention_head_dim=8, num_inference_steps=10, guidance_scale=2.0)
    base.update(kw)
    return ClassConditionalConfig(**base)


@pytest.fixture(scope="module")
def gen() -> ClassConditionalGenerator:
    return ClassConditionalGenerator(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def gen3() -> ClassConditionalGenerator:
    return ClassConditionalGenerator(tiny_config(in_channels=3), seed=1)


def toy_data(n_per_class: int = 24, size: int = 8, channels: int = 1, seed: int = 0):
    """Three easily told apart classes: bright left half, bright right half, bright top half."""
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for c in range(3):
        x = torch.rand(n_per_class, channels, size, size, generator=g) * 0.2
        if c == 0:
            x[..., :, : size // 2] += 0.8
        elif c == 1:
            x[..., :, size // 2:] += 0.8
        else:
            x[..., : size // 2, :] += 0.8
        imgs.append(x.clamp(0, 1))
        labels.append(torch.full((n_per_class,), c))
    return torch.cat(imgs), torch.cat(labels)


class CallCounter:
    """Forward hook on the UNet recording the timestep and batch size of every call."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.timesteps: list[int] = []
        self.batch: list[int] = []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        sample, t = args[0], args[1]
        self.timesteps.append(int(t.flatten()[0]))
        self.batch.append(int(sample.shape[0]))

    def __enter__(self) -> "CallCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def sources(n: int = 3, channels: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- GeNIe semantics
def test_schedule_is_trailing_ddim(gen):
    assert gen.inference_timesteps().tolist() == TIMESTEPS


@pytest.mark.parametrize("r", [0.15, 0.3, 0.55, 0.999, 1.0])
def test_unet_calls_equal_ddim_timesteps_at_or_below_T_r(gen, r):
    expected = [t for t in TIMESTEPS if t <= int(1000 * r)]
    with CallCounter(gen.unet) as calls:
        out = gen.generate(sources(2), torch.tensor([0, 0]), torch.tensor([1, 1]), r, seed=0)
    assert calls.timesteps == expected  # exactly those timesteps, largest first, each once
    assert gen.steps_for_ratio(r) == len(expected)
    assert out.shape == (2, 1, 8, 8)


def test_cost_grows_with_r(gen):
    counts = []
    for r in (0.1, 0.25, 0.5, 0.75, 1.0):
        with CallCounter(gen.unet) as calls:
            gen.generate(sources(1), torch.tensor([0]), torch.tensor([2]), r, seed=0)
        counts.append(len(calls.timesteps))
    assert counts == [1, 2, 5, 7, 10]


def test_per_sample_ratios_in_one_call(gen):
    x = sources(3)
    src, tgt = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    with CallCounter(gen.unet) as calls:
        mixed = gen.generate(x, src, tgt, [0.3, 1.0, 0.55], seed=7)
    assert len(calls.timesteps) == 10  # one loop, as long as the largest r needs
    # each sample costs its own steps: conditional rows summed over calls (CFG doubles the batch)
    assert sum(b // 2 for b in calls.batch) == 3 + 10 + 5
    for i, r in enumerate([0.3, 1.0, 0.55]):
        alone = gen.generate(x, src, tgt, r, seed=7)
        torch.testing.assert_close(mixed[i], alone[i], atol=2e-4, rtol=0)  # batch-size float noise only


def test_ratio_one_is_plain_sampling_from_pure_noise(gen):
    labels = torch.tensor([0, 2])
    a = gen.generate(sources(2, seed=1), labels, labels, 1.0, seed=3)
    b = gen.generate(sources(2, seed=2), labels, labels, 1.0, seed=3)
    torch.testing.assert_close(a, b)  # the source plays no part at r = 1
    torch.testing.assert_close(a, gen.sample(labels, seed=3))


def test_low_ratio_stays_close_to_source_high_ratio_does_not(gen):
    x = sources(4, seed=5)
    lab = torch.zeros(4, dtype=torch.long)
    low = gen.generate(x, lab, lab + 1, 0.15, seed=0)
    high = gen.generate(x, lab, lab + 1, 1.0, seed=0)
    assert (low - x).abs().mean() < (high - x).abs().mean()


def test_ratio_below_first_timestep_returns_source_unchanged(gen):
    x = sources(2)
    with CallCounter(gen.unet) as calls:
        out = gen.generate(x, torch.tensor([0, 1]), torch.tensor([1, 0]), 0.05, seed=0)
    assert calls.timesteps == []
    torch.testing.assert_close(out, x)


def test_conditioned_on_target_with_null_class_for_guidance(gen):
    seen = []
    handle = gen.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["class_labels"].tolist()), with_kwargs=True)
    try:
        gen.generate(sources(2), torch.tensor([0, 0]), torch.tensor([2, 1]), 0.2, seed=0)
    finally:
        handle.remove()
    assert seen and all(labels == [2, 1, 3, 3] for labels in seen)  # targets, then the null class


# r on both sides of every scheduled timestep t (T = 1000): r = t / T runs t, r = (t - 0.5) / T does
# not; 1 - 0.201 etc. are the float-error cases (T * r = 798.9999999999999 must still run 799).
RATIO_GRID = [t / 1000 for t in TIMESTEPS] + [(t - 0.5) / 1000 for t in TIMESTEPS] + [(t + 0.5) / 1000 for t in TIMESTEPS]
FLOAT_ERROR_RATIOS = [1 - 0.201, 1 - 0.801, 1 - 0.901]  # 0.799, 0.199, 0.099 from below


def _expected_steps(r: float) -> int:
    """Scheduled timesteps are 99, 199, ..., 999: those at or below T * r, counted by hand."""
    limit = round(1000 * r, 6)  # 798.9999999999999 is 799
    return sum(1 for i in range(10) if 100 * i + 99 <= limit)


class _StubUNet(torch.nn.Module):
    """eps = 0.1 z + (label + 1) * pattern: the conditional and null (label K) predictions differ."""

    def __init__(self, guided_scale=None, num_classes=3):
        super().__init__()
        self.pattern = torch.nn.Parameter(torch.linspace(-1, 1, 64).view(1, 1, 8, 8), requires_grad=False)
        self.guided_scale, self.num_classes = guided_scale, num_classes

    def forward(self, z, t, class_labels):
        c = class_labels.float().view(-1, 1, 1, 1) + 1
        if self.guided_scale is not None:  # what a correctly guided conditional prediction is
            null = float(self.num_classes + 1)
            c = null + self.guided_scale * (c - null)
        return type("Out", (), {"sample": 0.1 * z + c * self.pattern})()


def test_unet_calls_on_a_grid_of_r_around_every_timestep():
    assert _expected_steps(0.999) == 10 and _expected_steps(0.9985) == 9 and _expected_steps(0.0985) == 0
    g = ClassConditionalGenerator(tiny_config(), seed=0)
    g.unet = _StubUNet()  # the schedule is the generator's; a stub keeps ~180 UNet calls instant
    for r in RATIO_GRID + FLOAT_ERROR_RATIOS:
        with CallCounter(g.unet) as calls:
            g.generate(sources(1), torch.tensor([0]), torch.tensor([1]), r, seed=0)
        n = _expected_steps(r)
        assert calls.timesteps == TIMESTEPS[10 - n:], r  # the n smallest timesteps, largest first
        assert g.steps_for_ratio(r) == n, r


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_classifier_free_guidance_pushes_towards_the_target_class(scale):
    g = ClassConditionalGenerator(tiny_config(guidance_scale=scale), seed=0)
    g.unet = _StubUNet()
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2])
    eps_cond = 0.1 * z + (labels.float().view(-1, 1, 1, 1) + 1) * g.unet.pattern
    eps_null = 0.1 * z + 4.0 * g.unet.pattern  # the null class is K = 3
    torch.testing.assert_close(g._guided_eps(z, 500, labels), eps_null + scale * (eps_cond - eps_null))
    # through a whole GeNIe run: the same images as an unguided UNet that predicts the guided eps
    ref = ClassConditionalGenerator(tiny_config(guidance_scale=1.0), seed=0)
    ref.unet = _StubUNet(guided_scale=scale)
    x, src, tgt = sources(2), torch.tensor([1, 1]), labels
    torch.testing.assert_close(g.generate(x, src, tgt, 0.7, seed=4), ref.generate(x, src, tgt, 0.7, seed=4))


# --------------------------------------------------------------------------- determinism, shapes
def test_same_seed_reproduces_different_seed_differs(gen):
    x, s, t = sources(3), torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    a = gen.generate(x, s, t, 0.6, seed=11)
    b = gen.generate(x, s, t, 0.6, seed=11)
    c = gen.generate(x, s, t, 0.6, seed=12)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert torch.equal(gen.sample([0, 1], seed=4), gen.sample([0, 1], seed=4))


@pytest.mark.parametrize("channels,size", [(1, (24, 24)), (3, (12, 20)), (3, (5, 5))])
def test_output_shape_and_range_follow_the_sources(gen, gen3, channels, size):
    g = gen if channels == 1 else gen3
    x = torch.rand(4, channels, *size, generator=torch.Generator().manual_seed(0)).double()
    out = g.generate(x, torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2]), [0.4, 0.7, 1.0, 0.25], seed=0)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.isfinite(out).all()


def test_data_range_is_respected():
    g = ClassConditionalGenerator(tiny_config(data_range=(-2.0, 3.0)))
    x = torch.rand(3, 1, 8, 8) * 5 - 2
    out = g.generate(x, torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]), 1.0, seed=0)
    assert out.min() >= -2.0 and out.max() <= 3.0
    assert out.min() < 0.0  # really mapped back to the data range, not left in [0, 1]
    low = g.generate(x, torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]), 0.15, seed=0)
    assert (low - x).abs().mean() < 1.0  # a barely noised source comes back in its own range


def test_sample_shape_and_labels_checked(gen):
    assert gen.sample([0, 1, 2], seed=0).shape == (3, 1, 8, 8)
    assert gen.sample([0, 1], seed=0, size=16).shape == (2, 1, 16, 16)
    with pytest.raises(GeneratorError, match="labels must lie"):
        gen.sample([0, 3], seed=0)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("ratios,match", [
    (0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), (-0.2, r"\(0, 1\]"), (float("nan"), r"\(0, 1\]"),
    ([0.5, 0.5], "2 ratios for 3 sources"),
])
def test_bad_ratios_raise(gen, ratios, match):
    with pytest.raises(GeneratorError, match=match):
        gen.generate(sources(3), torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]), ratios)


def test_bad_labels_and_sources_raise(gen):
    x = sources(2)
    with pytest.raises(GeneratorError, match="target_labels must lie in"):
        gen.generate(x, torch.tensor([0, 1]), torch.tensor([1, 3]), 0.5)
    with pytest.raises(GeneratorError, match="source_labels must lie in"):
        gen.generate(x, torch.tensor([-1, 1]), torch.tensor([1, 2]), 0.5)
    with pytest.raises(GeneratorError, match="shape"):
        gen.generate(x, torch.tensor([0]), torch.tensor([1, 2]), 0.5)
    with pytest.raises(GeneratorError, match=r"\(N, C, H, W\)"):
        gen.generate(x[0], torch.tensor([0]), torch.tensor([1]), 0.5)
    with pytest.raises(GeneratorError, match="float"):
        gen.generate((x * 255).to(torch.uint8), torch.tensor([0, 1]), torch.tensor([1, 2]), 0.5)
    with pytest.raises(GeneratorError, match="NaN"):
        gen.generate(torch.full_like(x, float("nan")), torch.tensor([0, 1]), torch.tensor([1, 2]), 0.5)


def test_channel_mismatch_raises(gen):
    with pytest.raises(GeneratorError, match="1-channel images but the data has 3 channels"):
        gen.generate(sources(2, channels=3), torch.tensor([0, 1]), torch.tensor([1, 2]), 0.5)


def test_nan_output_raises_instead_of_returning_a_blank_image(gen):
    def poison(module, args, output):
        output.sample = torch.full_like(output.sample, float("nan"))
        return output

    handle = gen.unet.register_forward_hook(poison)
    try:
        with pytest.raises(GeneratorError, match="NaN"):
            gen.generate(sources(2), torch.tensor([0, 1]), torch.tensor([1, 2]), 0.5, seed=0)
        with pytest.raises(GeneratorError, match="NaN"):
            gen.sample([0, 1], seed=0)
    finally:
        handle.remove()


@pytest.mark.parametrize("field,value", [
    ("num_classes", 1), ("in_channels", 2), ("image_size", 2), ("num_inference_steps", 0),
    ("label_dropout", 1.0), ("data_range", (1.0, 0.0)), ("block_out_channels", (8, 12)),
])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(GeneratorError, match=field):
        tiny_config(**{field: value})


# --------------------------------------------------------------------------- persistence
def test_save_load_round_trip_gives_identical_outputs(gen, tmp_path):
    path = gen.save(tmp_path / "g")
    assert (tmp_path / "g" / "unet.safetensors").is_file()
    meta = json.loads((tmp_path / "g" / "config.json").read_text())
    assert meta["config"]["data_range"] == [0.0, 1.0] and meta["config"]["in_channels"] == 1
    loaded = ClassConditionalGenerator.load(path, device="cpu")
    x, s, t = sources(3), torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    r = [0.3, 0.6, 1.0]
    assert torch.equal(gen.generate(x, s, t, r, seed=5), loaded.generate(x, s, t, r, seed=5))
    # sampling settings can be overridden at load time, architecture cannot
    fast = ClassConditionalGenerator.load(path, num_inference_steps=5, guidance_scale=1.0)
    assert len(fast.inference_timesteps()) == 5
    with pytest.raises(GeneratorError, match="cannot override"):
        ClassConditionalGenerator.load(path, block_out_channels=(16, 16))


def test_checkpoint_data_mismatch_raises(gen, tmp_path):
    loaded = ClassConditionalGenerator.load(gen.save(tmp_path / "g"))
    rgb, labels = toy_data(4, channels=3)
    with pytest.raises(GeneratorError, match="1-channel"):
        loaded.generate(rgb[:2], labels[:2], labels[:2], 0.5)
    with pytest.raises(GeneratorError, match="channels"):
        loaded.fit((rgb, labels), steps=1, progress=False)
    from hardneg.data import from_tensors

    gray, labels = toy_data(4)
    five = from_tensors(gray, labels, class_names=list("abcde"))
    with pytest.raises(GeneratorError, match="3 classes but the data has 5"):
        loaded.fit(five, steps=1, progress=False)


def test_weights_that_do_not_match_the_config_raise(gen, tmp_path):
    path = tmp_path / "g"
    gen.save(path)
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["block_out_channels"] = [16, 16]
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(GeneratorError, match="do not match the architecture"):
        ClassConditionalGenerator.load(path)
    with pytest.raises(GeneratorError, match="config.json"):
        ClassConditionalGenerator.load(tmp_path / "missing")


def _same_outputs(a, b) -> bool:
    x, s, t = sources(3), torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    return torch.equal(a.generate(x, s, t, 0.6, seed=5), b.generate(x, s, t, 0.6, seed=5))


def _crash_while_writing_weights(state, path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"half a safetensors file")
    raise OSError("disk full (simulated crash mid-save)")


def test_a_save_that_fails_midway_leaves_the_saved_generator_intact(gen, tmp_path, monkeypatch):
    path = tmp_path / "g"
    gen.save(path)
    before = sorted(p.name for p in path.iterdir())
    other = ClassConditionalGenerator(tiny_config(), seed=7)
    assert not _same_outputs(gen, other)
    monkeypatch.setattr("safetensors.torch.save_file", _crash_while_writing_weights)
    with pytest.raises(OSError, match="simulated"):
        other.save(path)
    with pytest.raises(OSError, match="simulated"):
        other.save(tmp_path / "fresh")
    monkeypatch.undo()
    assert sorted(p.name for p in path.iterdir()) == before  # no partial or temporary file left
    assert _same_outputs(gen, ClassConditionalGenerator.load(path))  # the old generator, whole
    assert list((tmp_path / "fresh").iterdir()) == []  # a first save that failed: no generator at all


def test_a_crash_while_renaming_into_place_never_leaves_a_mixed_generator(gen, tmp_path, monkeypatch):
    import os

    path = tmp_path / "g"
    gen.save(path)
    other = ClassConditionalGenerator(tiny_config(), seed=7)
    real_replace = os.replace

    def crash_at_config(src, dst):
        if os.path.basename(dst) == "config.json":
            raise OSError("killed (simulated) between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_at_config)
    with pytest.raises(OSError, match="simulated"):
        other.save(path)
    monkeypatch.undo()
    assert not (path / "config.json").exists()  # new weights in place, so the old config is gone
    with pytest.raises(GeneratorError, match="config.json"):
        ClassConditionalGenerator.load(path)  # says so instead of loading new weights as the old generator
    other.save(path)  # the next save completes it
    assert _same_outputs(other, ClassConditionalGenerator.load(path))
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "unet.safetensors"]


# --------------------------------------------------------------------------- training
def test_tiny_fit_lowers_the_loss():
    images, labels = toy_data()
    g = ClassConditionalGenerator(tiny_config(), seed=0)
    before = g.denoising_loss((images, labels), seed=0)
    result = g.fit((images, labels), steps=60, batch_size=24, lr=3e-3, seed=0, progress=False)
    after = g.denoising_loss((images, labels), seed=0)
    assert len(result.losses) == 60 and all(math.isfinite(v) for v in result.losses)
    assert after < 0.7 * before
    assert g.training_info["steps"] == 60


def test_fit_is_deterministic_and_rejects_data_outside_the_range():
    images, labels = toy_data(8)
    a = ClassConditionalGenerator(tiny_config(), seed=0)
    b = ClassConditionalGenerator(tiny_config(), seed=0)
    la = a.fit((images, labels), steps=3, batch_size=8, seed=1, progress=False).losses
    lb = b.fit((images, labels), steps=3, batch_size=8, seed=1, progress=False).losses
    assert la == lb
    with pytest.raises(GeneratorError, match="data_range"):
        a.fit((images * 255, labels), steps=1, progress=False)
    with pytest.raises(GeneratorError, match="steps"):
        a.fit((images, labels), steps=0, progress=False)


# --------------------------------------------------------------------------- latent space
def tiny_vae(channels: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=2,
                         block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                         sample_size=16)


def test_latent_space_generator_fit_generate_save_load(tmp_path):
    images, labels = toy_data(8, size=16)
    g = ClassConditionalGenerator(tiny_config(image_size=16, block_out_channels=(8, 8)), vae=tiny_vae())
    assert g.config.latent
    shapes = []
    handle = g.unet.register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape[1:])))
    g.fit((images, labels), steps=3, batch_size=8, progress=False)
    out = g.generate(images[:2], labels[:2], torch.tensor([2, 0]), [0.5, 1.0], seed=0)
    handle.remove()
    assert set(shapes) == {(2, 8, 8)}  # the UNet works on 2-channel 8x8 latents of 16 px images
    assert g.config.latent_scale is not None and g.config.latent_scale > 0
    assert out.shape == (2, 1, 16, 16) and out.min() >= 0 and out.max() <= 1
    loaded = ClassConditionalGenerator.load(g.save(tmp_path / "latent"))
    assert loaded.config.latent and (tmp_path / "latent" / "vae").is_dir()
    assert torch.equal(out, loaded.generate(images[:2], labels[:2], torch.tensor([2, 0]), [0.5, 1.0], seed=0))


def test_latent_config_without_vae_raises():
    with pytest.raises(GeneratorError, match="vae"):
        ClassConditionalGenerator(tiny_config(latent=True))


# --------------------------------------------------------------------------- registry, shipped model
def test_importing_generators_does_not_import_diffusers():
    code = ("import sys, hardneg.generators as g; assert 'diffusers' not in sys.modules; "
            "assert g.Generator and g.GeneratorError; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_load_generator_is_a_picklable_factory(gen, tmp_path):
    path = gen.save(tmp_path / "g")
    factory = pickle.loads(pickle.dumps(functools.partial(load_generator, "class-conditional", path)))
    loaded = factory()
    x, s, t = sources(2), torch.tensor([0, 1]), torch.tensor([1, 2])
    assert torch.equal(loaded.generate(x, s, t, 0.5, seed=0), gen.generate(x, s, t, 0.5, seed=0))
    with pytest.raises(GeneratorError, match="unknown generator"):
        load_generator("gan")


def test_shipped_digits_generator_loads_and_generates():
    from hardneg.data import load_digits

    g = load_generator("class-conditional")  # no path: the shipped digits generator
    assert isinstance(g, ClassConditionalGenerator)
    assert g.num_classes == 10 and g.config.in_channels == 1
    assert default_digits_generator_path().endswith("digits-generator")
    _, test = load_digits(size=32)
    x = test.images[test.labels == 3][:2]
    out = g.generate(x, torch.tensor([3, 3]), torch.tensor([8, 8]), 0.3, seed=0)
    assert out.shape == (2, 1, 32, 32) and out.min() >= 0 and out.max() <= 1


@pytest.mark.slow
def test_shipped_digits_generator_reaches_class_fidelity():
    from hardneg.data import load_digits
    from hardneg.judge import class_fidelity, judge_accuracy, train_judge

    torch.manual_seed(0)
    train, test = load_digits(size=32)
    judge = train_judge(train, seed=0)
    assert judge_accuracy(judge, test) > 0.97
    g = load_generator("class-conditional")
    assert class_fidelity(g, judge, num_per_class=30, seed=0) >= 0.9
