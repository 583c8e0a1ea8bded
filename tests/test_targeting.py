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


def _collect_all(engine, timeout=120):
    """Wait (generous deadline) for the background refresh, then for every request it made."""
    assert engine.wait_for_refresh(timeout), "the background refresh did not finish"
    engine.wait_for_generation(timeout)


@pytest.mark.parametrize("targeting", ["same-class", "random-pairs", "confusion"])
def test_policy_shapes_the_generated_pairs(targeting):
    data = _toy_data()
    model = TinyNet()
    cfg = _cfg(targeting=targeting, refresh_every=3, extra={"same_class_strength": None})
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
