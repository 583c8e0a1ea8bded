"""DA-Fusion as a configuration of the engine: same-class pairs, labels kept, ~p of a batch substituted."""

import pytest
import torch
from torch import nn

from hardneg import HardNeg
from hardneg.config import ConfigError
from hardneg.methods import da_fusion_config

from _engine_generators import BlendGenerator
from test_plugin import _toy_data
from test_targeting import _collect_all


pytestmark = pytest.mark.usefixtures("one_thread")


class SmoothNet(nn.Module):
    """Like test_plugin.TinyNet but with a tanh embedding: never exactly zero (the bank rejects zero norms)."""

    def __init__(self, k=4):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
        self.head = nn.Linear(16, k)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("strength", [0.5, None])
def test_da_fusion_keeps_labels_and_substitutes_p_of_each_batch(strength):
    cfg = da_fusion_config(4, p=0.5, strength=strength, refresh_every=2, images_per_refresh=16,
                           generation_batch=8, buffer_size=64, seed=0)
    assert (cfg.targeting, cfg.mix_mode, cfg.synthetic_fraction, cfg.curriculum) == ("same-class", "substitute", 0.5, "constant")
    data = _toy_data()
    model = SmoothNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    shares = []
    with HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator()) as engine:
        for step, (x, y, idx) in enumerate(loader):
            if step == 2:
                _collect_all(engine)  # the first refresh's images are in: every later batch is mixed
            mixed = engine.mix_batch(x, y)
            assert mixed.x.shape[0] == x.shape[0]  # substitute: the batch size never changes
            assert torch.equal(mixed.y[: mixed.n_real], y[: mixed.n_real])  # real rows untouched
            if step >= 2:
                shares.append(mixed.n_synthetic / x.shape[0])
            logits = model(mixed.x)
            loss = (mixed.weights * nn.functional.cross_entropy(logits, mixed.y, reduction="none")).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            engine.observe(labels=mixed.y, logits=logits, ids=idx)
        prov = engine.buffer.provenance()
    assert shares and all(s == 0.5 for s in shares)
    assert prov["slots"].numel() > 0
    assert torch.equal(prov["source_labels"], prov["target_labels"])  # same-class: the label is kept
    assert torch.equal(data.labels[prov["source_ids"]], prov["source_labels"])
    allowed = {0.5} if strength == 0.5 else {0.25, 0.5, 0.75, 1.0}
    assert set(prov["ratios"].tolist()) <= allowed


def test_da_fusion_config_rejects_what_it_sets_and_bad_values():
    with pytest.raises(ValueError, match="mix_mode"):
        da_fusion_config(3, mix_mode="append")
    with pytest.raises(ValueError, match="strength"):
        da_fusion_config(3, strength=0.0)
    with pytest.raises(ConfigError, match="synthetic_fraction"):
        da_fusion_config(3, p=1.0)
    cfg = da_fusion_config(3, p=0.25, strength=None)
    assert cfg.same_class_strength is None and cfg.policy_options.strength is None
    with pytest.raises(ConfigError, match="extra"):  # the old escape hatch is gone: a typed option per setting
        da_fusion_config(3, extra={"note": 1})
