"""Targeting policies decide which pairs get generated; the engine follows the plan."""

import time

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


def _collect_all(engine, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        engine.collect()
        s = engine.worker.stats()
        if s["images_produced"] and s["requests_queued"] == 0 and s["requests_in_flight"] == 0:
            engine.collect()
            return
        time.sleep(0.05)


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
