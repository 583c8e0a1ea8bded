"""ConfusionGraph: finds the overlapping pair and its boundary samples."""

import math

import numpy as np
import torch

from hardneg.bank import EmbeddingBank
from hardneg.confusion import ConfusionGraph


def _overlapping_classes(seed=0, per_class=60, d=16):
    """10 well separated clusters, except 3 and 8 whose first 15 samples sit in the other's cluster region."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(d)[:10] * 6.0
    x, y = [], []
    for c in range(10):
        x.append(centres[c] + 0.5 * torch.randn(per_class, d, generator=g))
        y += [c] * per_class
    x = torch.cat(x)
    y = torch.tensor(y)
    i3 = (y == 3).nonzero().flatten()[:15]
    i8 = (y == 8).nonzero().flatten()[:15]
    mid = (centres[3] + centres[8]) / 2
    x[i3] = mid + 0.5 * torch.randn(15, d, generator=g) + 0.3 * (centres[8] - centres[3]) / 6
    x[i8] = mid + 0.5 * torch.randn(15, d, generator=g) - 0.3 * (centres[8] - centres[3]) / 6
    return x, y, set(i3.tolist()), set(i8.tolist())


def test_top_pair_is_3_8_and_sources_are_the_overlapping_samples():
    x, y, overlap3, overlap8 = _overlapping_classes()
    bank = EmbeddingBank(dim=x.shape[1], num_classes=10)
    bank.upsert(torch.arange(len(y)), x, y)
    graph = ConfusionGraph(10, knn_k=8, sources_per_pair=10)
    graph.refresh(bank, step=1)
    top = graph.top_pairs(2)
    assert {p.pair for p in top} == {(3, 8), (8, 3)}
    src = {p.pair: set(p.source_ids) for p in top}
    assert src[(3, 8)] <= overlap3
    assert src[(8, 3)] <= overlap8
    m = graph.matrix()
    assert m[3, 8] > 0.05 and np.delete(m[0], 0).max() < 0.02
    diff = graph.class_difficulty()
    assert diff[3].confusion > diff[0].confusion and diff[3].knn_accuracy < diff[0].knn_accuracy


def test_softmax_confusion_and_ema_blend():
    x, y, _, _ = _overlapping_classes()
    bank = EmbeddingBank(dim=x.shape[1], num_classes=10)
    bank.upsert(torch.arange(len(y)), x, y)
    graph = ConfusionGraph(10, knn_k=8, ema=0.5, logit_weight=1.0)
    logits = torch.full((len(y), 10), -10.0)
    logits[torch.arange(len(y)), y] = 0.0
    logits[y == 4, 9] = 0.0  # the classifier splits 4 evenly with 9
    graph.accumulate_logits(y, logits)
    first = graph.refresh(bank, step=1)
    assert graph.top_pairs(1)[0].pair == (4, 9)
    assert abs(first[4, 9] - 0.5) < 1e-3
    # no logits in the next window: kNN alone, blended half-half with the previous refresh
    second = graph.refresh(bank, step=2)
    assert abs(second[4, 9] - 0.25) < 0.01
    state = graph.state_dict()
    other = ConfusionGraph(10)
    other.load_state_dict(state)
    assert np.array_equal(other.matrix(), graph.matrix())
    assert [p.pair for p in other.top_pairs(3)] == [p.pair for p in graph.top_pairs(3)]


def test_sources_from_a_chunked_scan_equal_a_brute_force_ranking(monkeypatch):
    x, y, _, _ = _overlapping_classes(seed=3)
    for metric in ("cosine", "l2"):
        bank = EmbeddingBank(dim=x.shape[1], num_classes=10, metric=metric)
        bank.upsert(torch.arange(len(y)), x, y)
        scan = bank.scan
        monkeypatch.setattr(bank, "scan", lambda visit, chunk=65_536: scan(visit, chunk=37))  # many chunks
        graph = ConfusionGraph(10, knn_k=8, sources_per_pair=7)
        graph.refresh(bank, step=1)
        ids, vecs, labels, _ = bank.snapshot()
        means = bank.class_means()
        for p in graph.top_pairs(4):
            a, b = p.pair
            va = vecs[labels == a]
            close = va @ means[b] if metric == "cosine" else -((va - means[b]) ** 2).sum(1)
            expected = ids[labels == a][np.argsort(-close, kind="stable")[:7]]
            assert list(p.source_ids) == expected.tolist(), (metric, p.pair)


def test_sources_are_kept_for_the_reverse_of_every_candidate_pair():
    x, y, _, overlap8 = _overlapping_classes()
    bank = EmbeddingBank(dim=x.shape[1], num_classes=10)
    bank.upsert(torch.arange(len(y)), x, y)
    graph = ConfusionGraph(10, knn_k=8, sources_per_pair=10)
    graph.source_pair_limit = 1  # only the single top pair is a candidate
    graph.refresh(bank, step=1)
    (a, b), = [p.pair for p in graph.top_pairs(1)]
    assert {a, b} == {3, 8}
    reverse = graph.sources_of(b, a)
    assert len(reverse) == 10 and set(y[reverse].tolist()) == {b}
    assert graph.sources_of(0, 1) == []  # neither a candidate nor a reverse of one


# --------------------------------------------------------------------------- a hand-built bank
# Unit vectors in 2D at these angles (degrees), cosine metric, knn_k = 2. Class 0 has one sample
# (85 deg) deep inside class 1's region; class 1 does not reach back except for its edge sample.
# Neighbours, by hand (the query itself never counts):
#   0 deg (c0): 4 (c0), 85 (c0)              4 deg (c0): 0 (c0), 85 (c0)
#   85 deg (c0): 88 (c1, 3 away), 90 (c1)    -> class 0 leaks into class 1
#   88 deg (c1): 90 (c1, 2 away), 85 (c0, 3 away)
#   90, 92, 94 deg (c1): only class 1        180 deg (c2): 176 (c2), 94 (c1, 86 away)
#   176 deg (c2): 180 (c2), 94 (c1, 82 away)
_ANGLES = [(0, 0), (4, 0), (85, 0), (88, 1), (90, 1), (92, 1), (94, 1), (180, 2), (176, 2)]


def _hand_built_bank(angles=_ANGLES):
    rad = torch.tensor([math.radians(a) for a, _ in angles], dtype=torch.float64)
    x = torch.stack([torch.cos(rad), torch.sin(rad)], dim=1).float()
    y = torch.tensor([c for _, c in angles])
    bank = EmbeddingBank(dim=2, num_classes=3)
    bank.upsert(torch.arange(len(y)), x, y)
    return bank


def _cos(deg):
    return math.cos(math.radians(deg))


def test_knn_scores_on_a_hand_built_bank_are_exact():
    graph = ConfusionGraph(3, knn_k=2, logit_weight=0.0)
    m = graph.refresh(_hand_built_bank(), step=1)
    expected = np.zeros((3, 3))
    expected[0, 1] = (0 + 0 + 1) / 3  # only the 85 deg sample, whose 2 neighbours are both class 1
    expected[1, 0] = (_cos(3) / (_cos(2) + _cos(3)) + 0 + 0 + 0) / 4
    expected[2, 1] = (_cos(86) / (_cos(4) + _cos(86)) + _cos(82) / (_cos(4) + _cos(82))) / 2
    np.testing.assert_allclose(m, expected, rtol=1e-5, atol=1e-7)
    acc = [d.knn_accuracy for d in graph.class_difficulty()]
    np.testing.assert_allclose(acc, [2 / 3, 1 - expected[1, 0], 1 - expected[2, 1]], rtol=1e-5)


def test_confusion_direction_comes_from_knn_alone_on_an_asymmetric_bank():
    graph = ConfusionGraph(3, knn_k=2, logit_weight=0.0)
    m = graph.refresh(_hand_built_bank(), step=1)
    assert m[0, 1] > 2 * m[1, 0] > 0  # class 0 leaks into class 1 much more than back
    assert graph.top_pairs(1)[0].pair == (0, 1)
    assert graph.top_pairs(1)[0].source_ids[0] == 2  # the class-0 sample closest to class 1's centre


def test_confusion_ema_weights_the_newest_refresh_by_ema():
    """ema = 0.3 (not 0.5, where an inverted blend gives the same numbers): new = 0.7 old + 0.3 fresh."""
    moved = [(a if i != 2 else 2, c) for i, (a, c) in enumerate(_ANGLES)]  # the 85 deg sample goes home
    first = ConfusionGraph(3, knn_k=2, logit_weight=0.0).refresh(_hand_built_bank(), step=1)
    fresh = ConfusionGraph(3, knn_k=2, logit_weight=0.0).refresh(_hand_built_bank(moved), step=1)
    assert np.abs(first - fresh).max() > 0.2
    graph = ConfusionGraph(3, knn_k=2, ema=0.3, logit_weight=0.0)
    np.testing.assert_allclose(graph.refresh(_hand_built_bank(), step=1), first)  # the first refresh: no blend
    second = graph.refresh(_hand_built_bank(moved), step=2)
    np.testing.assert_allclose(second, 0.7 * first + 0.3 * fresh, rtol=1e-6, atol=1e-9)


def test_classes_without_logits_this_window_keep_their_knn_scores():
    """logit_weight 0.3 with logits for class 2 only: rows 0 and 1 are pure kNN, row 2 is 0.7 kNN + 0.3 softmax."""
    knn = ConfusionGraph(3, knn_k=2, logit_weight=0.0).refresh(_hand_built_bank(), step=1)
    graph = ConfusionGraph(3, knn_k=2, logit_weight=0.3)
    logits = torch.tensor([[0.0, math.log(3.0), math.log(6.0)]] * 2)  # class 2 puts 0.3 on class 1, 0.1 on class 0
    graph.accumulate_logits(torch.tensor([2, 2]), logits)
    m = graph.refresh(_hand_built_bank(), step=1)
    np.testing.assert_allclose(m[:2], knn[:2], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(m[2], [0.7 * knn[2, 0] + 0.3 * 0.1, 0.7 * knn[2, 1] + 0.3 * 0.3, 0.0], rtol=1e-6)
