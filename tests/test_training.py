"""The reference training loop: what the benchmarks and the demo rely on."""

from __future__ import annotations

import math

import torch

from hardneg.data import from_tensors
from hardneg.training import make_classifier, predict, train


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n // 3)
    x = torch.rand(n, 1, 16, 16, generator=g) * 0.3
    for c in range(3):
        x[y == c, :, 4 * c : 4 * c + 4, :] += 0.7
    return from_tensors(x.clamp(0, 1), y)


def _model():
    torch.manual_seed(0)
    return make_classifier("test_resnet", num_classes=3, in_chans=1)


def test_evaluating_only_after_the_last_epoch_trains_the_same_model():
    tr, te = _data(), _data(seed=1)
    a, b = _model(), _model()
    every = train(a, tr, te, epochs=3, batch_size=16, seed=0, progress=False)
    last = train(b, tr, te, epochs=3, batch_size=16, seed=0, progress=False, evaluate_every_epoch=False)
    assert all(math.isfinite(m.test_accuracy) for m in every)
    assert [math.isnan(m.test_accuracy) for m in last] == [True, True, False]
    assert last[-1].test_accuracy == every[-1].test_accuracy
    assert torch.equal(predict(a, te), predict(b, te))


def test_soft_extra_targets_reach_the_loss():
    """Soft-labelled extra data (Diff-Mix): the real rows train on one-hot targets, the extra rows on theirs."""
    tr, te = _data(), _data(seed=1)
    extra = _data(n=6, seed=2)
    soft = torch.tensor([[0.7, 0.3, 0.0]] * 6)
    a, b = _model(), _model()
    hard = train(a, tr, te, epochs=1, batch_size=54, seed=0, progress=False, extra_data=extra)
    softened = train(b, tr, te, epochs=1, batch_size=54, seed=0, progress=False, extra_data=extra, extra_targets=soft)
    assert hard[0].loss != softened[0].loss  # one batch of all 54 rows: only the extra rows' targets differ
    bad = torch.tensor([[0.7, 0.7, 0.0]] * 6)
    try:
        train(_model(), tr, te, epochs=1, progress=False, extra_data=extra, extra_targets=bad)
    except ValueError as e:
        assert "sum to 1" in str(e)
    else:  # pragma: no cover
        raise AssertionError("rows that do not sum to 1 must be refused")
