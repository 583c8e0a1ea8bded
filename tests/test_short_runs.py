"""Short runs: the default cadence generates within the first epoch, and a run that generated
nothing says so when the engine closes."""

import logging

import torch
from torch import nn

from _toy_data import striped_data
from _engine_generators import BlendGenerator
from hardneg import HardNeg, HardNegConfig

K = 4


def _data(n_per_class=24, seed=0):
    return striped_data(n_per_class, K, seed)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, K))


def _one_epoch(engine, model, data, batch_size=16):
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y, idx in loader:
        x, y, w = engine.mix(x, y)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        engine.observe(labels=y, ids=idx)
    return len(loader)


def test_default_cadence_requests_generation_within_the_first_epoch_of_a_small_dataset():
    data = _data()  # 96 samples, 6 steps per epoch at batch 16: the old fixed 50 never refreshed
    model = _model()
    cfg = HardNegConfig(num_classes=K, images_per_refresh=8, generation_batch=4, async_refresh=False, seed=0)
    assert cfg.refresh_every == "auto"
    with HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator(num_classes=K)) as engine:
        steps = _one_epoch(engine, model, data)
        assert steps == 6 and engine.refresh_every == 1  # a quarter epoch, at least 1
        assert engine.stats()["requests_made"] > 0
        assert engine.wait_for_generation(timeout=60) > 0


def test_auto_cadence_is_capped_and_an_explicit_one_is_kept():
    data = _data(n_per_class=1000)  # 4000 samples / 16 = 250 steps per epoch -> a quarter is 62 -> cap 50
    engine = HardNeg(HardNegConfig(num_classes=K), model=_model(), dataset=data)
    engine.observe(embeddings=torch.randn(16, 8), labels=torch.arange(16) % K, ids=torch.arange(16))
    assert engine.refresh_every == 50
    engine.close()
    engine = HardNeg(HardNegConfig(num_classes=K, refresh_every=7), model=_model(), dataset=_data())
    engine.observe(embeddings=torch.randn(16, 8), labels=torch.arange(16) % K, ids=torch.arange(16))
    assert engine.refresh_every == 7
    engine.close()


def test_close_warns_when_generation_was_configured_but_nothing_was_generated(caplog):
    data = _data()
    model = _model()
    cfg = HardNegConfig(num_classes=K, refresh_every=1000, seed=0)  # never refreshes in a short run
    engine = HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator(num_classes=K))
    _one_epoch(engine, model, data)
    with caplog.at_level(logging.WARNING, logger="hardneg.plugin"):
        engine.close()
        engine.close()  # said once
    warnings = [r for r in caplog.records if "nothing was generated" in r.getMessage()]
    assert len(warnings) == 1
    assert "6 training steps" in warnings[0].getMessage() and "refresh_every=1000" in warnings[0].getMessage()


def test_close_is_quiet_when_images_arrived_or_generation_is_off(caplog):
    data = _data()
    model = _model()
    cfg = HardNegConfig(num_classes=K, refresh_every=2, images_per_refresh=8, async_refresh=False, seed=0)
    engine = HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator(num_classes=K))
    _one_epoch(engine, model, data)
    assert engine.wait_for_generation(timeout=60) > 0
    off = HardNeg(HardNegConfig(num_classes=K), model=_model(), dataset=data)
    _one_epoch(off, off.model, data)
    with caplog.at_level(logging.WARNING, logger="hardneg.plugin"):
        engine.close()
        off.close()
    assert not [r for r in caplog.records if "generat" in r.getMessage()]


def test_close_warns_when_requests_were_made_but_no_image_arrived(caplog):
    data = _data()
    model = _model()
    cfg = HardNegConfig(num_classes=K, refresh_every=2, images_per_refresh=8, async_refresh=False, seed=0)
    failing = BlendGenerator(num_classes=K, fail_every=1)  # every request raises in the worker
    engine = HardNeg(cfg, model=model, dataset=data, generator=failing)
    _one_epoch(engine, model, data)
    assert engine.wait_for_generation(timeout=60) == 0 and engine.stats()["requests_made"] > 0
    with caplog.at_level(logging.WARNING, logger="hardneg.plugin"):
        engine.close()
    msg = [r.getMessage() for r in caplog.records if "reached training" in r.getMessage()]
    assert len(msg) == 1 and "0 image(s) produced" in msg[0] and "deliberate failure" in msg[0]
