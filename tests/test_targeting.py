"""Targeting policies decide which pairs get generated; the engine follows the plan."""

import pytest
import torch

from hardneg import HardNeg, HardNegConfig
from hardneg.targeting import allocate, make_policy

from _engine_generators import BlendGenerator
from test_plugin import TinyNet, _cfg, _run_loop, _toy_data


def test_allocate_is_proportional_and_exact():
    assert allocate(10, [3, 1, 1]) == [6, 2, 2]
    assert sum(allocate(7, [0.5, 0.25, 0.25])) == 7
    assert allocate(4, [0, 0]) == [2, 2]


def test_allocate_gives_leftover_images_to_the_largest_remainders():
    """Unequal remainders: not the largest scores, not the smallest remainders, not the first pairs."""
    assert allocate(3, [0.45, 0.35, 0.2]) == [1, 1, 1]  # raw 1.35, 1.05, 0.6: the 0.6 gets the leftover
    assert allocate(4, [0.3, 0.5, 0.2]) == [1, 2, 1]  # raw 1.2, 2.0, 0.8
    assert allocate(7, [0.15, 0.6, 0.25]) == [1, 4, 2]  # raw 1.05, 4.2, 1.75
    assert allocate(5, [3, 2, 2, 1]) == [2, 1, 1, 1]  # raw 1.875, 1.25, 1.25, 0.625: two leftovers


def _collect_all(engine, timeout=120):
    """Wait (generous deadline) for the background refresh, then for every request it made."""
    assert engine.wait_for_refresh(timeout), "the background refresh did not finish"
    engine.wait_for_generation(timeout)


@pytest.mark.parametrize("targeting", ["same-class", "random-pairs", "confusion"])
def test_policy_shapes_the_generated_pairs(targeting):
    data = _toy_data()
    model = TinyNet()
    cfg = _cfg(targeting=targeting, refresh_every=3, same_class_strength=None)
    with HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator()) as engine:
        _run_loop(engine, model, data, steps=3)
        _collect_all(engine)
        prov = engine.buffer.provenance()
    assert prov["slots"].numel() > 0
    src, tgt = prov["source_labels"], prov["target_labels"]
    assert torch.equal(data.labels[prov["source_ids"]], src)  # sources really are of the source class
    if targeting == "same-class":
        assert torch.equal(src, tgt)  # DA-Fusion keeps the label
        assert set(prov["ratios"].tolist()) <= {0.25, 0.5, 0.75, 1.0}
    else:
        assert bool((src != tgt).all())
    if targeting == "confusion":
        mined = {p.pair for p in engine.confusions()}
        assert {(int(a), int(b)) for a, b in zip(src, tgt)} <= mined | {p for p in mined}


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown targeting policy 'nope'"):
        make_policy(HardNegConfig(num_classes=3, targeting="nope"))


def test_to_rarer_direction_turns_pairs_towards_the_rarer_class():
    from types import SimpleNamespace

    from hardneg.bank import EmbeddingBank
    from hardneg.confusion import ConfusionGraph
    from hardneg.targeting import ConfusionTargeting
    from test_confusion import _overlapping_classes

    x, y, _, _ = _overlapping_classes()
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[(y == 3).nonzero().flatten()[30:]] = False  # class 3: 30 samples (its 15 overlapping ones kept), 8: 60
    ids = torch.arange(len(y))[keep]
    bank = EmbeddingBank(dim=x.shape[1], num_classes=10)
    bank.upsert(ids, x[keep], y[keep])
    graph = ConfusionGraph(10, knn_k=8, sources_per_pair=10)
    graph.refresh(bank, step=1)
    engine = SimpleNamespace(bank=bank, confusion=graph, confusions=lambda: graph.top_pairs(2))
    assert {p.pair for p in engine.confusions()} == {(3, 8), (8, 3)}

    as_mined = ConfusionTargeting(direction="as-mined").plan(engine, 20)
    assert {p.pair for p in as_mined} == {(3, 8), (8, 3)}
    auto = ConfusionTargeting().plan(engine, 20)  # 60 vs 30 samples: 2x, so "auto" turns 3 -> 8 too
    assert [p.pair for p in auto] == [(8, 3)]
    turned = ConfusionTargeting(direction="to-rarer").plan(engine, 20)
    assert [p.pair for p in turned] == [(8, 3)] and turned[0].count == 20  # all 20 images labelled 3
    assert turned[0].source_ids == graph.sources_of(8, 3) and set(y[turned[0].source_ids].tolist()) == {8}
    with pytest.raises(ValueError, match="direction"):
        ConfusionTargeting(direction="sideways")

    # a mild imbalance (45 vs 60 samples): "auto" keeps the pairs as mined, "to-rarer" still turns
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[(y == 3).nonzero().flatten()[45:]] = False
    bank = EmbeddingBank(dim=x.shape[1], num_classes=10)
    bank.upsert(torch.arange(len(y))[keep], x[keep], y[keep])
    graph = ConfusionGraph(10, knn_k=8, sources_per_pair=10)
    graph.refresh(bank, step=1)
    engine = SimpleNamespace(bank=bank, confusion=graph, confusions=lambda: graph.top_pairs(2))
    assert {p.pair for p in ConfusionTargeting().plan(engine, 20)} == {(3, 8), (8, 3)}
    assert [p.pair for p in ConfusionTargeting(direction="to-rarer").plan(engine, 20)] == [(8, 3)]


def test_min_pair_share_gives_low_scoring_pairs_nothing():
    from types import SimpleNamespace

    from hardneg.confusion import PairScore
    from hardneg.targeting import ConfusionTargeting

    pairs = [PairScore(0, 1, 0.6, [1, 2]), PairScore(2, 3, 0.3, [3, 4]), PairScore(4, 5, 0.05, [5, 6])]
    engine = SimpleNamespace(bank=None, confusion=None, confusions=lambda: pairs)
    every = ConfusionTargeting(direction="as-mined").plan(engine, 19)
    assert [(p.pair, p.count) for p in every] == [((0, 1), 12), ((2, 3), 6), ((4, 5), 1)]  # proportional to score
    share = ConfusionTargeting(direction="as-mined", min_pair_share=0.25).plan(engine, 19)
    assert [(p.pair, p.count) for p in share] == [((0, 1), 13), ((2, 3), 6)]  # 0.05 < 0.25 * 0.6: dropped
    assert [p.pair for p in ConfusionTargeting(direction="as-mined", min_pair_share=0.6).plan(engine, 19)] == [(0, 1)]
    policy = make_policy(HardNegConfig(num_classes=6, min_pair_share=0.25))
    assert policy.min_pair_share == 0.25 and make_policy(HardNegConfig(num_classes=6)).min_pair_share == 0.0
    with pytest.raises(ValueError, match="min_pair_share"):
        ConfusionTargeting(min_pair_share=2.0)


class SeedNoiseGenerator:
    """Output = half the source + half noise drawn from ``seed``: the images depend on the seed
    (``seed=None`` draws fresh noise, so an unseeded request never repeats)."""

    def generate(self, sources, source_labels, target_labels, ratios, seed=None):
        g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        return 0.5 * sources + 0.5 * torch.rand(sources.shape, generator=g)


def _generated_images(seed):
    """Two requests (ids 0 and 1) of the same two sources; the images in arrival order."""
    from hardneg.targeting import PlannedPair

    data = _toy_data()
    i = int((data.labels == 0).nonzero()[0])
    with HardNeg(_cfg(seed=seed, generation_batch=2), dataset=data, generator=SeedNoiseGenerator()) as engine:
        engine._request_generation([PlannedPair((0, 3), 4, [i, i])])
        engine.wait_for_generation()
        state = engine.buffer.state_dict()
    assert state["meta"]["source_ids"][state["slots"]].tolist() == [i] * 4
    return state["images"]


def test_generation_seeds_come_from_the_config_seed_and_the_request_id():
    a, again, other = _generated_images(0), _generated_images(0), _generated_images(1)
    assert a.shape[0] == 4
    assert torch.equal(a, again)  # a seeded run repeats its images
    assert not torch.equal(a, other)  # another config seed gives other images
    assert not torch.equal(a[:2], a[2:])  # two requests of the same sources differ (their ids differ)


def test_successive_refreshes_rotate_through_each_pairs_sources():
    """Each refresh takes the next ``count`` sources of a pair, wrapping around, not the same first ones."""
    data = _toy_data()
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6)[[0, 0, 1, 2]] * 3.0  # 0 and 1 overlap: the mined pairs
    emb = centres[data.labels] + torch.randn(len(data), 6, generator=g)
    cfg = _cfg(refresh_every=1000, top_pairs=2, sources_per_pair=5, images_per_refresh=6, generation_batch=16,
               async_refresh=False, confusion_direction="as-mined")
    with HardNeg(cfg, dataset=data, generator=BlendGenerator(), start_worker=False) as engine:
        requests = []
        engine.worker.submit = lambda req: requests.append(req) or True  # record, generate nothing
        engine.observe(embeddings=emb, labels=data.labels, ids=torch.arange(len(data)))
        used = []  # per refresh: {pair: source ids requested}
        for _ in range(3):
            requests.clear()
            engine.refresh()
            used.append({r.pair: r.source_ids.tolist() for r in requests})
            plan = {p.pair: (p.count, p.source_ids) for p in engine.targeting.plan(engine, cfg.images_per_refresh)}
    assert set(plan) == {(0, 1), (1, 0)} and all(c == 3 for c, _ in plan.values())
    for pair, (count, sources) in plan.items():
        assert len(sources) == 5
        for j in range(3):  # sources 0-2, then 3, 4, 0, then 1-3
            assert used[j][pair] == [sources[(j * count + i) % 5] for i in range(count)], (pair, j)
