"""GCA-HNG-style embedding-space hard negatives: the formula, the graph network, mining and training."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hardneg.bank import EmbeddingBank
from hardneg.methods.embedding_negatives import (
    GCAHardNegatives, GlobalNegatives, NegativeGraphNet, interpolate_negatives, mine_triplets,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_interpolated_distance_matches_the_formula_and_easy_negatives_are_kept():
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(64, 8, generator=g) for _ in range(3))
    lam, alpha, j = 0.3, 0.5, 0.8
    out = interpolate_negatives(a, p, n, lam, alpha, j)
    d_pos, d_neg = (a - p).norm(dim=1), (a - n).norm(dim=1)
    hard = d_neg > d_pos
    assert 0 < hard.sum() < 64  # both cases occur
    expected = d_pos + (d_neg - d_pos) * lam * math.exp(-alpha / j)
    assert torch.allclose((a - out).norm(dim=1)[hard], expected[hard], atol=1e-5)
    assert torch.equal(out[~hard], n[~hard])  # d- <= d+: the negative is already hard, kept as is
    cos = F.cosine_similarity(out[hard] - a[hard], n[hard] - a[hard], dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)  # moved along the anchor -> negative line
    # lambda = 1 with a huge J: no extra hardness; a tiny J: down to the positive's distance
    assert torch.allclose(interpolate_negatives(a, p, n, 1.0, alpha, 1e9)[hard], n[hard], atol=1e-4)
    assert torch.allclose((a - interpolate_negatives(a, p, n, 1.0, alpha, 1e-6)).norm(dim=1)[hard], d_pos[hard], atol=1e-5)


def test_channel_wise_lambda_scales_each_channel():
    a = torch.zeros(1, 3)
    p = torch.tensor([[0.5, 0.0, 0.0]])
    n = torch.tensor([[0.0, 2.0, 2.0]])
    lam = torch.tensor([[0.0, 0.0, 1.0]])
    out = interpolate_negatives(a, p, n, lam, alpha=0.0, mean_loss=1.0)  # factor exp(0) = 1
    d_pos, d_neg = 0.5, math.sqrt(8)
    assert torch.allclose(out, torch.tensor([[0.0, 2.0 * d_pos / d_neg, 2.0]]))


def test_mined_triplets_have_valid_roles():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(12, 4, generator=g), dim=1)
    y = torch.arange(4).repeat(3)
    t = mine_triplets(emb, y, negatives_per_anchor=2)
    assert len(t) == 12 * 2 * 2  # 2 positives per anchor, 2 negatives each
    assert bool((t.anchor_idx != t.pos_idx).all())
    assert torch.equal(y[t.anchor_idx], y[t.pos_idx]) and bool((y[t.anchor_idx] != y[t.neg_idx]).all())
    d = torch.cdist(emb, emb)
    for a, n in zip(t.anchor_idx.tolist(), t.neg_idx.tolist()):  # the nearest negatives were taken
        others = d[a][y != y[a]]
        assert d[a, n] <= others.sort().values[1] + 1e-6


def test_graph_net_lambda_in_unit_interval_and_messages_only_from_negatives():
    torch.manual_seed(0)
    net = NegativeGraphNet(dim=6, hidden=8)
    x = torch.randn(8, 6)
    y = torch.arange(4).repeat(2)
    neg = y.view(-1, 1) != y.view(1, -1)
    t = mine_triplets(x, y, negatives_per_anchor=3)
    lam = net(x, x, neg, t)
    assert lam.shape == (len(t), 6)
    assert bool(((lam > 0) & (lam < 1)).all())
    msg, attn = net.messages(x, x, neg)
    assert bool((attn[~neg] == 0).all())
    assert torch.allclose(attn.sum(1), torch.ones(8))
    # perturb anchor 0's positive (row 4, same class) and another same-class-as-0 row only: message 0 unchanged
    x2 = x.clone()
    x2[4] += torch.randn(6)
    msg2, _ = net.messages(x2, x2, neg)
    assert torch.allclose(msg2[0], msg[0], atol=1e-6)
    x3 = x.clone()
    x3[1] += torch.randn(6)  # a negative of anchor 0
    msg3, _ = net.messages(x3, x3, neg)
    assert not torch.allclose(msg3[0], msg[0], atol=1e-4)


def test_global_negatives_come_from_the_whole_bank():
    g = torch.Generator().manual_seed(0)
    k = 3
    vecs = F.normalize(torch.randn(60, 5, generator=g), dim=1)
    labels = torch.arange(60) % k
    bank = EmbeddingBank(5, k, use_gpu=False)
    glob = GlobalNegatives(bank, k=4)
    batch_ids = torch.tensor([0, 1, 2, 3])
    emb, y = vecs[batch_ids], labels[batch_ids]
    ref, ref_y = glob.references(emb, y, batch_ids)
    assert ref is emb  # empty bank: the batch alone
    glob.update(torch.arange(60), vecs, labels)
    ref, ref_y = glob.references(emb, y, batch_ids)
    assert torch.equal(ref[:4], emb) and torch.equal(ref_y[:4], y)  # the batch first
    extra = ref[4:]
    assert 4 <= len(extra) <= 16
    ids = [int(np.argmin(((vecs - r) ** 2).sum(1).numpy())) for r in extra]
    assert not set(ids) & set(batch_ids.tolist())
    for i in range(4):  # each anchor's nearest bank negative is among the references
        cand = [j for j in range(60) if labels[j] != y[i] and j not in batch_ids.tolist()]
        best = max(cand, key=lambda j: float(vecs[j] @ emb[i]))
        assert best in ids


def test_pml_style_reference_tuple():
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(8, 4, generator=g), dim=1)
    y = torch.arange(4).repeat(2)
    gca = GCAHardNegatives(4, lam=0.5, negatives_per_anchor=2)
    syn = gca(emb, y)
    ref, ref_y, (a, p, n) = syn.as_reference(emb, y)
    assert ref.shape == (8 + len(syn.triplets), 4)
    assert torch.equal(ref[n], syn.negatives) and torch.equal(ref_y[n], y[syn.triplets.neg_idx])
    assert torch.equal(ref_y[p], y[a])


@pytest.mark.parametrize("lam", [0.5, None])
def test_training_with_synthetic_negatives_lowers_the_loss(lam):
    torch.manual_seed(0)
    k, d_in, d = 4, 16, 8
    centres = torch.randn(k, d_in) * 1.5
    labels_all = torch.arange(k).repeat_interleave(40)
    x_all = centres[labels_all] + torch.randn(len(labels_all), d_in)
    net = nn.Sequential(nn.Linear(d_in, 32), nn.ReLU(), nn.Linear(32, d))
    gca = GCAHardNegatives(d, num_classes=k, lam=lam, alpha=0.05, negatives_per_anchor=4)
    glob = GlobalNegatives(EmbeddingBank(d, k, use_gpu=False), k=4)
    opt = torch.optim.Adam(list(net.parameters()) + list(gca.parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def metric_on_all():
        with torch.no_grad():
            e = F.normalize(net(x_all), dim=1)
            t = mine_triplets(e, labels_all, negatives_per_anchor=4)
            return float(F.relu((e[t.anchor_idx] - e[t.pos_idx]).norm(dim=1)
                                - (e[t.anchor_idx] - e[t.neg_idx]).norm(dim=1) + 0.2).mean())

    before = metric_on_all()
    for step in range(40):
        idx = torch.cat([torch.randperm(40, generator=g)[:4] + 40 * c for c in range(k)])
        emb = F.normalize(net(x_all[idx]), dim=1)
        ref, ref_y = glob.references(emb, labels_all[idx], idx)
        out = gca.loss(emb, labels_all[idx], ref, ref_y)
        assert torch.isfinite(out.total)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        glob.update(idx, emb, labels_all[idx], step)
    assert metric_on_all() < 0.5 * before
    assert not math.isnan(float(gca.mean_loss))
    lam_used = out.synthetic_negatives.lam
    assert bool(((lam_used > 0) & (lam_used < 1)).all()) if lam is None else bool((lam_used == lam).all())
    if lam is None:
        assert out.generator.item() != 0 and out.proxy.item() > 0
