"""Long-tail targeting (deficit-proportional, head sources nearest the tail) and CAM-guided fusion."""

import numpy as np
import pytest
import torch
from torch import nn

from hardneg import HardNeg, HardNegConfig
from hardneg.bank import EmbeddingBank
from hardneg.methods.long_tail import (
    LongTailTargeting, SaliencyFusionGenerator, class_activation_maps, head_tail_split, saliency_fusion,
)
from hardneg.targeting import make_policy

from _engine_generators import BlendGenerator
from test_plugin import _run_loop, _toy_data
from test_targeting import _collect_all

COUNTS = [40, 30, 10, 5]


pytestmark = pytest.mark.usefixtures("one_thread")


class SmoothNet(nn.Module):
    """Like test_plugin.TinyNet but with a tanh embedding: never exactly zero (the bank rejects zero norms)."""

    def __init__(self, k=4):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh())
        self.head = nn.Linear(16, k)

    def forward(self, x):
        return self.head(self.body(x))


def _imbalanced_bank(dim=8, seed=0):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(len(COUNTS), dim))
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(COUNTS)])
    vecs = centres[labels] + 0.8 * g.normal(size=(len(labels), dim))
    bank = EmbeddingBank(dim, len(COUNTS), use_gpu=False)
    bank.upsert(np.arange(len(labels)) * 3 + 7, vecs.astype(np.float32), labels)  # ids are not row numbers
    return bank


def test_head_tail_split_orders_by_count():
    assert head_tail_split([40, 30, 10, 5]) == ([0, 1], [2, 3])
    assert head_tail_split([5, 40, 0, 10], head_fraction=0.3) == ([1], [3, 0])  # absent class 2 is skipped
    assert head_tail_split([7, 7, 7]) == ([0, 1], [])  # balanced: nothing to do


def test_plan_targets_tail_classes_in_proportion_to_deficit_from_nearest_head_samples():
    cfg = HardNegConfig(num_classes=4, targeting="long-tail", sources_per_pair=6)
    policy = make_policy(cfg)
    assert isinstance(policy, LongTailTargeting)
    engine = HardNeg(cfg)
    engine.bank = _imbalanced_bank()
    plan = policy.plan(engine, 13)
    per_target = {}
    for p in plan:
        per_target[p.label] = per_target.get(p.label, 0) + p.count
        assert p.pair[1] == p.label and p.pair[0] in (0, 1)
        assert p.ratios is None  # the curriculum sets r unless long_tail_ratio fixes it
        _, labels = engine.bank.get(p.source_ids)
        assert labels.tolist() == p.source_labels  # each source carries its own head class
        assert set(p.source_labels) <= {0, 1}
    assert len(plan) == 2  # one request stream per tail class
    # deficits: class 2 -> 40 - 10 = 30, class 3 -> 40 - 5 = 35; 13 images split 6 : 7
    assert per_target == {2: 6, 3: 7}
    ids, vecs, labels, _ = engine.bank.snapshot()
    means = engine.bank.class_means()
    head = np.isin(labels, [0, 1])
    for t in (2, 3):
        sims = vecs[head] @ (means[t] / np.linalg.norm(means[t]))
        expected = set(ids[head][np.argsort(-sims)[:6]].tolist())
        got = {i for p in plan if p.label == t for i in p.source_ids}
        assert got == expected


def test_fixed_ratio_from_config_extra():
    cfg = HardNegConfig(num_classes=4, targeting="long-tail", sources_per_pair=4,
                        long_tail_ratio=0.3, long_tail_head_fraction=0.25)
    engine = HardNeg(cfg)
    engine.bank = _imbalanced_bank()
    plan = engine.targeting.plan(engine, 9)
    assert {p.pair[0] for p in plan} == {0}  # only the largest class is a head now
    assert {p.label for p in plan} == {1, 2, 3}
    assert all(p.ratios == [0.3] * p.count for p in plan)


def test_engine_generates_only_tail_labels_from_head_sources():
    full = _toy_data()
    keep = torch.cat([(full.labels == c).nonzero().flatten()[:n] for c, n in enumerate([24, 24, 6, 3])])
    data = full.subset(keep.sort().values)
    model = SmoothNet()
    cfg = HardNegConfig(num_classes=4, targeting="long-tail", refresh_every=3, knn_k=4, sources_per_pair=6,
                        images_per_refresh=12, generation_batch=6, buffer_size=64, seed=0)
    with HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator()) as engine:
        _run_loop(engine, model, data, steps=6)
        _collect_all(engine)
        prov = engine.buffer.provenance()
    assert prov["slots"].numel() > 0
    assert set(prov["target_labels"].tolist()) <= {2, 3}
    assert set(prov["source_labels"].tolist()) <= {0, 1}
    assert torch.equal(data.labels[prov["source_ids"]], prov["source_labels"])


def test_saliency_fusion_keeps_tail_where_tail_cam_is_high_and_head_background():
    g = torch.Generator().manual_seed(0)
    head = torch.zeros(2, 3, 8, 8)
    tail = torch.ones(2, 3, 8, 8)
    tail_cam = torch.zeros(2, 8, 8)
    tail_cam[:, 2:5, 2:5] = 0.9  # the tail object
    head_cam = torch.ones(2, 8, 8)
    head_cam[:, :, :4] = 0.1  # head background on the left half
    out = saliency_fusion(head, tail, head_cam, tail_cam, high=0.5, low=0.5, generator=g)
    img, from_tail = out.images, out.from_tail
    assert img.shape == head.shape and from_tail.shape == (2, 1, 8, 8)
    assert bool((img[:, :, 2:5, 2:5] == 1).all())  # tail kept where its CAM is high (even on head background)
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    left[2:5, 2:5] = False
    assert bool((img[:, :, left] == 0).all())  # head kept where head CAM is low and tail CAM is not high
    rest = torch.ones(8, 8, dtype=torch.bool)
    rest[:, :4] = False
    rest[2:5, 2:5] = False
    coin = from_tail[:, 0][:, rest]
    assert 0 < coin.float().mean() < 1  # elsewhere: random, from both
    again = saliency_fusion(head, tail, head_cam, tail_cam, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.images, img)  # reproducible with a seeded generator
    low_res = saliency_fusion(head, tail, head_cam[:, ::2, ::2], tail_cam[:, ::2, ::2], generator=g)
    assert low_res.images.shape == head.shape  # CAMs at another resolution are resized


def test_class_activation_maps_of_a_timm_cnn():
    from hardneg.training import make_classifier

    torch.manual_seed(0)
    model = make_classifier("resnet10t", num_classes=4, in_chans=1).train()
    x = torch.rand(3, 1, 32, 32)
    classes = torch.tensor([0, 2, 3])
    cams = class_activation_maps(model, x, classes)
    assert cams.shape == (3, 32, 32)
    assert float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        feats = model.forward_features(x)
        raw = torch.einsum("nchw,nc->nhw", feats, model.get_classifier().weight[classes]).relu()
    # the CAM's argmax location (at feature resolution) is where class evidence is strongest
    small = class_activation_maps(model, x, classes, size=tuple(raw.shape[-2:]))
    assert torch.equal(small.flatten(1).argmax(1), raw.flatten(1).argmax(1))


def test_fusion_generator_labels_as_tail_and_refines_with_base():
    from hardneg.training import make_classifier

    torch.manual_seed(0)
    model = make_classifier("resnet10t", num_classes=4, in_chans=1)
    data = _toy_data()
    gen = SaliencyFusionGenerator(model, data, base=BlendGenerator(), k=3)
    heads = data.images[:4]
    out = gen.generate(heads, torch.zeros(4, dtype=torch.long), torch.tensor([3, 3, 2, 2]), 0.3, seed=1)
    assert out.shape == heads.shape and torch.isfinite(out).all()
    again = gen.generate(heads, torch.zeros(4, dtype=torch.long), torch.tensor([3, 3, 2, 2]), 0.3, seed=1)
    assert torch.equal(out, again)
    plain = SaliencyFusionGenerator(model, data, base=None)
    fused = plain.generate(heads, torch.zeros(4, dtype=torch.long), torch.tensor([3, 3, 2, 2]), 0.3, seed=1)
    # every fused pixel comes from the head source or from a tail-class image of the pool
    pool3 = data.images[data.labels == 3]
    assert any(bool(((fused[0] == heads[0]) | (fused[0] == p)).all()) for p in pool3)
