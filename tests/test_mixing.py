"""mix_batch / weighted_loss: append, substitute, identity, weights, device/dtype, mismatches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hardneg.buffer import SyntheticSample
from hardneg.mixing import MixedBatch, mix_batch, weighted_loss


def synthetic(k: int, shape=(1, 8, 8), label: int = 8, source: int = 3, fill: float = 0.5) -> SyntheticSample:
    return SyntheticSample(
        images=torch.full((k, *shape), fill),
        labels=torch.full((k,), label, dtype=torch.int64),
        source_labels=torch.full((k,), source, dtype=torch.int64),
        ratios=torch.full((k,), 0.7),
        pairs=torch.tensor([[source, label]] * k, dtype=torch.int64).reshape(k, 2),
        slots=torch.arange(k),
        source_ids=torch.arange(k),
        steps=torch.zeros(k, dtype=torch.int64),
    )


def batch(n: int = 6, shape=(1, 8, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, *shape), generator=g).to(dtype), torch.arange(n, dtype=torch.int64) % 3


def test_append_puts_synthetic_rows_after_the_real_ones() -> None:
    x, y = batch(6)
    m = mix_batch(x, y, synthetic(2), mode="append", synthetic_weight=0.5)
    assert isinstance(m, MixedBatch)
    assert m.x.shape == (8, 1, 8, 8) and m.y.shape == (8,)
    assert torch.equal(m.x[:6], x) and torch.equal(m.y[:6], y)
    assert torch.all(m.x[6:] == 0.5) and m.y[6:].tolist() == [8, 8]
    assert m.weights.tolist() == [1.0] * 6 + [0.5, 0.5]
    assert m.synthetic_mask.tolist() == [False] * 6 + [True, True]
    assert m.n_real == 6 and m.n_synthetic == 2
    xs, ys, ws = m.as_tuple()
    assert xs is m.x and ys is m.y and ws is m.weights


def test_substitute_replaces_the_last_rows_and_leaves_the_input_alone() -> None:
    x, y = batch(6)
    x_before, y_before = x.clone(), y.clone()
    m = mix_batch(x, y, synthetic(2), mode="substitute", synthetic_weight=2.0)
    assert m.x.shape == x.shape and m.n_real == 4
    assert torch.equal(m.x[:4], x[:4]) and torch.all(m.x[4:] == 0.5)
    assert m.y.tolist() == y[:4].tolist() + [8, 8]
    assert m.weights.tolist() == [1.0] * 4 + [2.0, 2.0]
    assert m.synthetic_mask.tolist() == [False] * 4 + [True, True]
    assert torch.equal(x, x_before) and torch.equal(y, y_before)  # pure: inputs untouched


def test_substitute_caps_at_the_batch_size() -> None:
    x, y = batch(3)
    m = mix_batch(x, y, synthetic(5), mode="substitute")
    assert m.x.shape[0] == 3 and m.n_real == 0 and bool(m.synthetic_mask.all())


@pytest.mark.parametrize("syn", [None, "empty"])
def test_no_synthetic_is_the_identity(syn) -> None:
    x, y = batch(5)
    s = synthetic(0) if syn == "empty" else None
    for mode in ("append", "substitute"):
        m = mix_batch(x, y, s, mode=mode, synthetic_weight=0.3)
        assert m.x is x and m.y is y
        assert m.weights.tolist() == [1.0] * 5 and not bool(m.synthetic_mask.any()) and m.n_real == 5


def test_synthetic_rows_follow_the_batch_dtype_and_device() -> None:
    x, y = batch(4, dtype=torch.float64)
    m = mix_batch(x, y, synthetic(2), mode="append")
    assert m.x.dtype == torch.float64 and m.weights.dtype == torch.float64
    xh, yh = batch(4, dtype=torch.bfloat16)
    mh = mix_batch(xh, yh, synthetic(2))
    assert mh.x.dtype == torch.bfloat16 and mh.weights.dtype == torch.float32  # weights keep precision
    # the meta device stands in for an accelerator: everything must land on x's device
    xm = torch.empty(4, 1, 8, 8, device="meta")
    ym = torch.zeros(4, dtype=torch.int64, device="meta")
    mm = mix_batch(xm, ym, synthetic(3), mode="append", synthetic_weight=0.5)
    for t in (mm.x, mm.y, mm.weights, mm.synthetic_mask):
        assert t.device.type == "meta"
    assert mm.x.shape == (7, 1, 8, 8)


def test_soft_targets_get_one_hot_synthetic_labels() -> None:
    x, _ = batch(4)
    y = torch.full((4, 10), 0.1)
    m = mix_batch(x, y, synthetic(2, label=7), mode="append")
    assert m.y.shape == (6, 10)
    assert m.y[4:].argmax(1).tolist() == [7, 7] and m.y[4:].sum(1).tolist() == [1.0, 1.0]


def test_shape_and_channel_mismatches_are_clear_errors() -> None:
    x, y = batch(4, shape=(1, 8, 8))
    with pytest.raises(ValueError, match="channels: generator 3, batch 1"):
        mix_batch(x, y, synthetic(2, shape=(3, 8, 8)))
    with pytest.raises(ValueError, match="per-sample shape"):
        mix_batch(x, y, synthetic(2, shape=(1, 16, 16)))
    with pytest.raises(ValueError, match="same number of rows"):
        mix_batch(x, y[:3], synthetic(2))
    with pytest.raises(ValueError, match="mode"):
        mix_batch(x, y, synthetic(2), mode="prepend")  # type: ignore[arg-type]


def test_weighted_loss_is_a_weighted_mean() -> None:
    loss = torch.tensor([1.0, 2.0, 3.0, 10.0], requires_grad=True)
    mask = torch.tensor([False, False, False, True])
    w_zero = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert weighted_loss(loss, w_zero, mask).item() == pytest.approx(2.0)  # synthetic ignored
    w_half = torch.tensor([1.0, 1.0, 1.0, 0.5])
    assert weighted_loss(loss, w_half, mask).item() == pytest.approx((6.0 + 5.0) / 3.5)
    all_zero = weighted_loss(loss, torch.zeros(4), mask)
    assert all_zero.item() == 0.0
    all_zero.backward()  # still differentiable, no NaN
    assert torch.isfinite(loss.grad).all()


def test_weighted_loss_separate_keeps_real_and_synthetic_apart() -> None:
    loss = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0], requires_grad=True)
    mask = torch.tensor([False, False, True, True, True])
    weights = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.5])
    total, real, syn = weighted_loss(loss, weights, mask, separate=True)
    assert real.item() == pytest.approx(2.0) and syn.item() == pytest.approx(20.0)
    assert total.item() == pytest.approx(2.0 + 0.5 * 20.0)
    total.backward()
    assert loss.grad.tolist() == pytest.approx([0.5, 0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3])
    only_real = weighted_loss(loss.detach(), torch.ones(5), torch.zeros(5, dtype=torch.bool), separate=True)
    assert only_real.synthetic.item() == 0.0 and only_real.loss.item() == pytest.approx(only_real.real.item())


def test_end_to_end_with_cross_entropy() -> None:
    x, y = batch(6)
    m = mix_batch(x, y, synthetic(2), mode="append", synthetic_weight=0.0)
    logits = torch.randn(m.x.shape[0], 10, requires_grad=True)
    per = F.cross_entropy(logits, m.y, reduction="none")
    real_only = F.cross_entropy(logits[:6], y)
    assert weighted_loss(per, m.weights, m.synthetic_mask).item() == pytest.approx(real_only.item(), rel=1e-6)
    with pytest.raises(ValueError):
        weighted_loss(per, m.weights[:-1], m.synthetic_mask)


# --------------------------------------------------------------------------- through the engine
def test_engine_mix_favours_the_currently_confused_pairs() -> None:
    """Equal numbers of stored images of a mined pair (0, 1) and an unmined one (2, 3): mix draws
    mostly the mined pair (the engine passes its pair scores into the buffer draw)."""
    from _engine_generators import make_result
    from hardneg import HardNeg, HardNegConfig

    cfg = HardNegConfig(num_classes=4, top_pairs=2, knn_k=4, refresh_every=1000, synthetic_fraction=0.5,
                        label_mode="hard", async_refresh=False, seed=0)
    engine = HardNeg(cfg)
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6)[[0, 0, 1, 2]] * 5.0  # classes 0 and 1 share a cluster; 2 and 3 are apart
    y = torch.arange(4).repeat_interleave(10)
    engine.observe(embeddings=centres[y] + torch.randn(40, 6, generator=g), labels=y, ids=torch.arange(40))
    pairs = {p.pair for p in engine.refresh()}
    assert pairs == {(0, 1), (1, 0)}
    engine.buffer.add(make_result(torch.rand(10, 1, 4, 4, generator=g), (2, 3), 0.7), step=0)
    engine.buffer.add(make_result(torch.rand(10, 1, 4, 4, generator=g), (0, 1), 0.7), step=0)
    drawn = []
    for _ in range(3):
        engine.mix(torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))
        drawn += engine.last_mix_pairs
    assert len(drawn) == 12
    assert drawn.count((0, 1)) >= 10, drawn  # a plain uniform draw gives about 6
