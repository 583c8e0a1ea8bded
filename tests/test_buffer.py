"""SyntheticBuffer: provenance, rejection, eviction, favouring, freshness, determinism, resume."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch

from hardneg.buffer import SyntheticBuffer
from hardneg.worker import GenerationRequest, GenerationResult


def result(n: int = 4, pair=(3, 8), step: int = 0, r: float = 0.7, first_id: int = 0, fill=None,
           shape=(1, 4, 4)) -> GenerationResult:
    ids = torch.arange(first_id, first_id + n)
    req = GenerationRequest(request_id=step, pair=pair, source_ids=ids, sources=None, source_labels=pair[0],
                            target_labels=pair[1], ratios=r, step=step)
    if fill is None:  # each image is filled with its own source id, so provenance can be checked
        images = ids.float().view(-1, 1, 1, 1).expand(n, *shape).clone()
    else:
        images = torch.full((n, *shape), fill)
    return GenerationResult(req, images)


def test_add_stores_images_with_provenance() -> None:
    buf = SyntheticBuffer(10)
    assert len(buf) == 0 and buf.sample(4, step=0) is None
    assert buf.add(result(3, pair=(3, 8), step=5, r=0.6, first_id=100), step=7) == 3
    assert len(buf) == 3 and buf.image_shape == (1, 4, 4)
    s = buf.sample(3, step=7)
    assert s is not None and len(s) == 3
    order = torch.argsort(s.source_ids)
    assert s.source_ids[order].tolist() == [100, 101, 102]
    assert s.labels.tolist() == [8, 8, 8] and s.source_labels.tolist() == [3, 3, 3]
    assert s.pairs.tolist() == [[3, 8]] * 3
    assert s.ratios.tolist() == pytest.approx([0.6] * 3)
    assert s.steps.tolist() == [7, 7, 7]
    for img, sid in zip(s.images, s.source_ids):  # each image travels with its own provenance
        assert torch.all(img == float(sid))
    prov = buf.provenance()
    assert prov["step_requested"].tolist() == [5, 5, 5] and prov["uses"].tolist() == [1, 1, 1]
    st = buf.stats()
    assert st["size"] == 3 and st["pairs"] == {"3->8": 3} and st["mean_r"] == pytest.approx(0.6)
    assert st["mean_uses"] == pytest.approx(1.0)


def test_non_finite_rows_are_rejected() -> None:
    buf = SyntheticBuffer(10)
    res = result(4)
    res.images[1, 0, 0, 0] = float("nan")
    res.images[3, 0, 2, 1] = float("inf")
    assert buf.add(res, step=0) == 2
    assert len(buf) == 2 and buf.stats()["rejected"] == 2
    s = buf.sample(10, step=0)
    assert sorted(s.source_ids.tolist()) == [0, 2] and torch.isfinite(s.images).all()
    assert buf.add(result(2, fill=float("nan")), step=1) == 0


def test_shape_mismatch_is_an_error() -> None:
    buf = SyntheticBuffer(10)
    buf.add(result(2, shape=(1, 4, 4)), step=0)
    with pytest.raises(ValueError, match="must match the training data"):
        buf.add(result(2, shape=(3, 4, 4)), step=1)


def test_eviction_drops_the_oldest_first() -> None:
    buf = SyntheticBuffer(4)
    buf.add(result(2, first_id=0), step=0)
    buf.add(result(2, first_id=10), step=1)
    buf.add(result(2, first_id=20), step=2)  # full: ids 0, 1 go
    assert len(buf) == 4 and buf.stats()["evicted"] == 2
    assert sorted(buf.provenance()["source_ids"].tolist()) == [10, 11, 20, 21]


def test_eviction_drops_exhausted_samples_before_old_ones() -> None:
    buf = SyntheticBuffer(4, max_uses=2)
    buf.add(result(2, pair=(1, 2), first_id=0), step=0)  # oldest, never used
    buf.add(result(2, pair=(3, 8), first_id=10), step=1)
    for _ in range(2):  # use only the (3, 8) samples until they are exhausted
        buf.sample(2, step=1, pair_weights={(3, 8): 1.0}, unlisted_weight=0.0)
    uses = dict(zip(buf.provenance()["source_ids"].tolist(), buf.provenance()["uses"].tolist()))
    assert uses == {0: 0, 1: 0, 10: 2, 11: 2}
    buf.add(result(2, pair=(5, 6), first_id=20), step=2)
    assert sorted(buf.provenance()["source_ids"].tolist()) == [0, 1, 20, 21]


def test_pair_weights_favour_the_listed_pairs() -> None:
    buf = SyntheticBuffer(200, seed=1)
    buf.add(result(50, pair=(3, 8)), step=0)
    buf.add(result(50, pair=(4, 9), first_id=50), step=0)
    counts: Counter = Counter()
    for _ in range(20):
        s = buf.sample(5, step=0, pair_weights={(3, 8): 1.0})
        counts.update(tuple(p) for p in s.pairs.tolist())
    assert counts[(3, 8)] >= 0.8 * sum(counts.values())
    # without weights both pairs are drawn
    counts = Counter(tuple(p) for p in buf.sample(40, step=0).pairs.tolist())
    assert counts[(3, 8)] > 5 and counts[(4, 9)] > 5


def test_unlisted_pairs_are_still_drawn_when_the_favoured_run_out() -> None:
    buf = SyntheticBuffer(20)
    buf.add(result(2, pair=(3, 8)), step=0)
    buf.add(result(6, pair=(4, 9), first_id=10), step=0)
    s = buf.sample(5, step=0, pair_weights={(3, 8): 1.0})
    assert len(s) == 5 and Counter(tuple(p) for p in s.pairs.tolist())[(3, 8)] == 2


def test_fresh_samples_are_favoured() -> None:
    buf = SyntheticBuffer(100, seed=0, freshness_half_life=50)
    buf.add(result(40, first_id=0), step=0)  # 10 half-lives old at step 500
    buf.add(result(40, first_id=1000), step=500)
    ids = buf.sample(20, step=500).source_ids
    assert int((ids >= 1000).sum()) >= 18
    w = buf.sampling_weights(step=500)
    assert w[w > 0].max() / w[w > 0].min() == pytest.approx(2.0 ** 10, rel=1e-6)


def test_exhausted_samples_come_last_and_uses_are_counted() -> None:
    buf = SyntheticBuffer(10, max_uses=1)
    buf.add(result(4), step=0)
    first = buf.sample(2, step=0)
    second = buf.sample(2, step=0)
    assert set(first.slots.tolist()).isdisjoint(second.slots.tolist())  # unused ones preferred
    third = buf.sample(3, step=0)  # all exhausted now: still served
    assert len(third) == 3
    assert buf.stats()["drawn"] == 7 and buf.provenance()["uses"].sum().item() == 7


def test_sampling_is_deterministic_with_the_seed() -> None:
    def run(seed: int) -> list[list[int]]:
        buf = SyntheticBuffer(64, seed=seed)
        buf.add(result(30, pair=(3, 8)), step=0)
        buf.add(result(30, pair=(4, 9), first_id=30), step=10)
        weights = {(4, 9): 2.0, (3, 8): 1.0}
        return [buf.sample(8, step=20, pair_weights=weights).slots.tolist() for _ in range(5)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_state_dict_round_trip_resumes_identically() -> None:
    a = SyntheticBuffer(16, seed=5, freshness_half_life=10, max_uses=3)
    a.add(result(10, pair=(3, 8), r=0.6), step=0)
    a.add(result(10, pair=(4, 9), r=0.8, first_id=10), step=5)  # evicts 4
    a.sample(6, step=6)
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = SyntheticBuffer(16, seed=123)  # a different seed: the saved RNG state must win
    b.load_state_dict(torch.load(blob, weights_only=True))
    assert len(b) == len(a) and b.stats() == a.stats()
    for step in (7, 8, 9):
        sa, sb = a.sample(5, step=step), b.sample(5, step=step)
        assert torch.equal(sa.slots, sb.slots) and torch.equal(sa.images, sb.images)
        assert torch.equal(sa.labels, sb.labels)
    a.add(result(3, first_id=99), step=10)
    b.add(result(3, first_id=99), step=10)
    assert torch.equal(a.provenance()["slots"], b.provenance()["slots"])
    with pytest.raises(ValueError, match="capacity"):
        SyntheticBuffer(8).load_state_dict(a.state_dict())


def test_state_dict_holds_only_stored_images_and_empty_buffers_round_trip() -> None:
    buf = SyntheticBuffer(1000)
    buf.add(result(3), step=0)
    assert buf.state_dict()["images"].shape == (3, 1, 4, 4)  # checkpoint size follows the content
    empty = SyntheticBuffer(1000, seed=2)
    restored = SyntheticBuffer(1000)
    restored.load_state_dict(empty.state_dict())
    assert len(restored) == 0 and restored.sample(4, step=0) is None
    restored.add(result(2), step=1)
    assert len(restored) == 2


def test_oversized_result_keeps_capacity() -> None:
    buf = SyntheticBuffer(3)
    assert buf.add(result(5), step=0) == 3
    assert len(buf) == 3


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        SyntheticBuffer(0)
    with pytest.raises(ValueError):
        SyntheticBuffer(4, max_uses=0)
    with pytest.raises(ValueError):
        SyntheticBuffer(4, freshness_half_life=0)


def test_pair_weights_are_relative_scores_of_directed_pairs() -> None:
    """Two listed pairs at 0.6 and 0.3 (not one at 1.0, where any favouring looks right), and the
    reverse (8, 3) of a listed pair counts as unlisted: the draw weights are 1, 0.5 and 0.05."""
    buf = SyntheticBuffer(20, seed=0)
    buf.add(result(2, pair=(3, 8)), step=0)
    buf.add(result(2, pair=(4, 9), first_id=10), step=0)
    buf.add(result(2, pair=(8, 3), first_id=20), step=0)
    w = buf.sampling_weights(step=0, pair_weights={(3, 8): 0.6, (4, 9): 0.3})
    slots = buf.provenance()["slots"]
    by_source = dict(zip(buf.provenance()["source_ids"].tolist(), w[slots].tolist()))
    assert by_source == pytest.approx({0: 1.0, 1: 1.0, 10: 0.5, 11: 0.5, 20: 0.05, 21: 0.05})


def with_gaps(buf: SyntheticBuffer, drop: list[int]) -> SyntheticBuffer:
    """A buffer restored from ``buf``'s state with the samples in slots ``drop`` gone (free slots
    between stored ones, as a checkpoint may hold)."""
    state = buf.state_dict()
    keep = [i for i, s in enumerate(state["slots"].tolist()) if s not in drop]
    state["valid"][drop] = False
    state["slots"], state["images"] = state["slots"][keep], state["images"][keep]
    out = SyntheticBuffer(buf.capacity)
    out.load_state_dict(state)
    return out


def test_snapshot_lists_the_stored_samples_and_changes_nothing() -> None:
    full = SyntheticBuffer(12, seed=3)
    full.add(result(6, pair=(3, 8), r=0.6, first_id=100), step=0)
    full.add(result(6, pair=(4, 9), r=0.8, first_id=200), step=2)
    buf = with_gaps(full, drop=[1, 4, 7])  # stored: slots 0, 2, 3, 5, 6, 8-11
    assert SyntheticBuffer(4).snapshot() is None
    before = buf.state_dict()
    snap = buf.snapshot()
    assert snap is not None and len(snap) == len(buf) == 9
    prov = buf.provenance()
    assert snap.slots.tolist() == prov["slots"].tolist() == [0, 2, 3, 5, 6, 8, 9, 10, 11]
    assert snap.source_ids.tolist() == [100, 102, 103, 105, 200, 202, 203, 204, 205]
    for img, sid in zip(snap.images, snap.source_ids):  # row i is the i-th stored sample, image and all
        assert torch.all(img == float(sid))
    assert snap.pairs.tolist() == [[3, 8]] * 4 + [[4, 9]] * 5
    assert snap.ratios.tolist() == pytest.approx([0.6] * 4 + [0.8] * 5)
    assert snap.target_weights is not None and snap.target_weights.tolist() == [1.0] * 9
    snap.images.zero_()  # a copy: the buffer's images stay
    after = buf.state_dict()
    assert torch.equal(after["images"], before["images"])
    assert torch.equal(after["meta"]["uses"], before["meta"]["uses"])  # no use counted
    assert torch.equal(after["rng_state"], before["rng_state"])  # the next draw is unchanged


def test_an_undone_draw_leaves_the_buffer_as_if_it_never_happened() -> None:
    a, b = SyntheticBuffer(16, seed=4, max_uses=2), SyntheticBuffer(16, seed=4, max_uses=2)
    for buf in (a, b):
        buf.add(result(10, pair=(3, 8)), step=0)
    version, state = a.version, a.rng_state()
    drawn = a.sample(6, step=1)
    assert drawn is not None and a.version == version  # drawing changes no version
    a.undo_draw(drawn, state)
    assert a.stats() == b.stats() and torch.equal(a.provenance()["uses"], b.provenance()["uses"])
    for step in (1, 2, 3):  # the same draws as a buffer that never drew
        sa, sb = a.sample(5, step=step), b.sample(5, step=step)
        assert torch.equal(sa.slots, sb.slots)
    a.add(result(2, first_id=50), step=4)
    assert a.version != version
    restored = SyntheticBuffer(16)
    restored.load_state_dict(a.state_dict())
    assert restored.version[0] == a.version[0] and restored.version != a.version  # a replaced state
