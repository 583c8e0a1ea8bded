"""Value space: a normalising pipeline gets generated rows in its own space, not the generator's."""

import pytest
import torch
from torch import nn

from _fake_generators import PixelIdentityGenerator
from hardneg import HardNeg, HardNegConfig
from hardneg.config import ConfigError
from hardneg.data import from_tensors
from hardneg.plugin import HardNegError
from hardneg.value_space import ValueSpace, ValueSpaceError, normalization_from

K = 4
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, what timm and HF models use
COLOURS = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.8, 0.3], [0.2, 0.3, 0.9], [0.7, 0.7, 0.1]])


def _pixels(n_per_class=16, seed=0):
    """Plain [0, 1] images: each class a colour plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = COLOURS[y].view(-1, 3, 1, 1) + 0.05 * torch.randn(len(y), 3, 8, 8, generator=g)
    return x.clamp(0, 1), y


def _normalise(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU())
        self.head = nn.Linear(16, K)

    def forward(self, x):
        return self.head(self.body(x))


def _cfg(**kw):
    base = dict(num_classes=K, refresh_every=2, top_pairs=3, knn_k=4, sources_per_pair=6, images_per_refresh=12,
                generation_batch=6, buffer_size=64, synthetic_fraction=0.5, seed=0, label_mode="hard",
                async_refresh=False)
    base.update(kw)
    return HardNegConfig(**base)


def _run_until_mixed(engine, model, data, steps=8):
    """A few training steps, then one mixed batch (x, y) and the engine's pairs of its generated rows."""
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, (x, y, idx) in zip(range(steps), loader):
        x, y, w = engine.mix(x, y)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        engine.observe(labels=y, ids=idx)
    assert engine.wait_for_generation(timeout=60) > 0 or len(engine.buffer) > 0
    x, y, idx = next(iter(loader))
    mixed = engine.mix_batch(x, y)
    return mixed, engine.last_mix_pairs


def test_normalised_pipeline_gets_generated_rows_with_the_real_rows_statistics():
    torch.manual_seed(0)
    pixels, y = _pixels()
    data = from_tensors(_normalise(pixels), y)  # what the model trains on: normalised rows
    cfg = _cfg(**normalization_from({"mean": MEAN, "std": STD, "input_size": (3, 8, 8)}))  # a timm data config
    model = Net()
    with HardNeg(cfg, model=model, dataset=data, generator=PixelIdentityGenerator(K)) as engine:
        mixed, pairs = _run_until_mixed(engine, model, data)
        assert engine.stats()["worker"]["failures"] == 0  # the generator only ever saw [0, 1] pixels
    syn = mixed.x[mixed.n_real:]
    assert len(pairs) == syn.shape[0] > 0
    for a in sorted({a for a, _ in pairs}):
        rows = syn[torch.tensor([p[0] == a for p in pairs])]
        real = data.images[data.labels == a]
        # identity generator: a generated row is its source, so it has its class's per-channel statistics
        torch.testing.assert_close(rows.mean((0, 2, 3)), real.mean((0, 2, 3)), atol=0.15, rtol=0)
        torch.testing.assert_close(rows.std((0, 2, 3)), real.std((0, 2, 3)), atol=0.15, rtol=0)
    # and each generated row is exactly (up to float error) a normalised source image
    prov = engine.buffer.provenance()
    assert prov["source_ids"].numel() > 0
    torch.testing.assert_close(engine.buffer.snapshot().images, data.images[prov["source_ids"]], atol=1e-5,
                               rtol=0)


def test_plain_pixel_pipeline_is_unchanged():
    pixels, y = _pixels()
    data = from_tensors(pixels, y)
    model = Net()
    with HardNeg(_cfg(), model=model, dataset=data, generator=PixelIdentityGenerator(K)) as engine:
        _run_until_mixed(engine, model, data)
        prov = engine.buffer.provenance()
        images = engine.buffer.snapshot().images  # in provenance order
    torch.testing.assert_close(images, pixels[prov["source_ids"]], atol=1e-6, rtol=0)


def test_normalised_sources_without_the_normalisation_fail_at_construction_naming_the_fix():
    pixels, y = _pixels()
    data = from_tensors(_normalise(pixels), y)
    with pytest.raises(HardNegError, match=r"outside the generator's pixel range \[0, 1\].*normalization_from"):
        HardNeg(_cfg(), model=Net(), dataset=data, generator=PixelIdentityGenerator(K), start_worker=False)


def test_wrong_normalisation_fails_when_sources_are_fetched():
    pixels, y = _pixels()
    data = from_tensors(pixels * 255.0, y)  # 0..255 images declared as ImageNet-normalised
    with pytest.raises(HardNegError, match=r"after undoing the normalisation.*data_mean/data_std"):
        HardNeg(_cfg(data_mean=MEAN, data_std=STD), model=Net(), dataset=data,
                generator=PixelIdentityGenerator(K), start_worker=False)
    engine = HardNeg(_cfg(data_mean=MEAN, data_std=STD), model=Net(), dataset=from_tensors(_normalise(pixels), y),
                     generator=PixelIdentityGenerator(K), start_worker=False)
    engine.dataset = from_tensors(pixels * 255.0, y)  # e.g. an item whose transform changed later
    with pytest.raises(HardNegError, match=r"sample id\(s\) \[\d+"):
        engine._generator_space(engine.dataset.images[:3], [5, 6, 7])
    engine.close()


def test_value_space_round_trip_and_channel_check():
    vs = ValueSpace(MEAN, STD)
    pixels, _ = _pixels(2)
    torch.testing.assert_close(vs.to_pixels(vs.from_pixels(pixels)), pixels, atol=1e-6, rtol=0)
    torch.testing.assert_close(vs.from_pixels(pixels), _normalise(pixels))
    with pytest.raises(ValueSpaceError, match="3"):
        vs.to_pixels(torch.zeros(1, 1, 4, 4))
    # a little overshoot (interpolation) is clamped, not an error
    assert float(ValueSpace().to_pixels(torch.full((1, 1, 2, 2), 1.01)).max()) == 1.0


def test_normalization_from_reads_timm_hf_and_torchvision():
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", num_classes=K)
    data_config = timm.data.resolve_data_config({}, model=model)
    want = {"data_mean": tuple(data_config["mean"]), "data_std": tuple(data_config["std"])}
    assert normalization_from(data_config) == want
    transform = timm.data.create_transform(**data_config, is_training=True)  # a Compose holding Normalize
    got = normalization_from(transform)
    assert got["data_mean"] == pytest.approx(want["data_mean"]) and got["data_std"] == pytest.approx(want["data_std"])
    prefetch = timm.data.loader.PrefetchLoader([], mean=MEAN, std=STD, device=torch.device("cpu"))
    assert normalization_from(prefetch)["data_mean"] == pytest.approx(MEAN)  # stored in 0..255 units by timm
    transformers = pytest.importorskip("transformers")
    proc = transformers.ViTImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2])
    assert normalization_from(proc) == {"data_mean": (0.5, 0.4, 0.3), "data_std": (0.2, 0.2, 0.2)}
    tv = pytest.importorskip("torchvision.transforms")
    assert normalization_from(tv.Compose([tv.ToTensor(), tv.Normalize(MEAN, STD)]))["data_std"] == STD
    with pytest.raises(ValueSpaceError, match="found no mean/std"):
        normalization_from(tv.Compose([tv.ToTensor()]))


def test_config_validates_the_value_space():
    cfg = HardNegConfig(num_classes=K, data_mean=[0.5], data_std=[0.25])
    assert cfg.data_mean == (0.5,) and HardNegConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="go together"):
        HardNegConfig(num_classes=K, data_mean=MEAN)
    with pytest.raises(ConfigError, match="channel"):
        HardNegConfig(num_classes=K, data_mean=MEAN, data_std=(0.2,))
    with pytest.raises(ConfigError, match="positive"):
        HardNegConfig(num_classes=K, data_mean=(0.5,), data_std=(0.0,))
    with pytest.raises(ConfigError, match="pixel_range"):
        HardNegConfig(num_classes=K, pixel_range=(1.0, 0.0))


def test_transformers_callback_takes_the_value_space_from_the_trainers_image_processor():
    transformers = pytest.importorskip("transformers")
    from hardneg.integrations.transformers import _with_processor_normalization

    proc = transformers.ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    cfg = _with_processor_normalization(HardNegConfig(num_classes=K), proc)  # Trainer(processing_class=proc)
    assert cfg.data_mean == (0.5, 0.5, 0.5) and cfg.data_std == (0.25, 0.25, 0.25)
    explicit = HardNegConfig(num_classes=K, data_mean=(0.1,), data_std=(0.2,))
    assert _with_processor_normalization(explicit, proc) is explicit  # the user's own setting wins
    proc.do_normalize = False
    assert _with_processor_normalization(HardNegConfig(num_classes=K), proc).data_mean is None
    assert _with_processor_normalization(HardNegConfig(num_classes=K), None).data_mean is None
