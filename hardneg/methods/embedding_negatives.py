"""Embedding-space hard negatives for deep metric learning, in the style of GCA-HNG
(Peng et al., "Globally Correlation-Aware Hard Negative Generation", IJCV 2025).

For users who train an *embedding* with a metric loss (triplet, ...) rather than a classifier.
Two ideas, usable apart:

* **Global negatives** (:class:`GlobalNegatives`): the negatives of each anchor come from the
  whole dataset, i.e. hardneg's FAISS :class:`~hardneg.bank.EmbeddingBank` of every sample's last
  embedding, not only from the mini-batch. They are returned as extra *reference* rows (no
  gradient: they are stored vectors) after the batch's own rows, the ``ref_emb`` convention of
  pytorch-metric-learning.
* **Synthetic hard negatives** (:class:`GCAHardNegatives`): for a triplet (a, p, n) with
  ``d+ = |a - p|`` and ``d- = |a - n|``, a harder negative is interpolated towards the anchor,
  channel by channel::

      n' = a + ((d+ + (d- - d+) * lambda * exp(-alpha / J)) / d-) * (n - a)   if d- > d+, else n' = n

  ``J`` is the running mean of the real metric loss (hard negatives come when the model has
  learnt enough for them: a large loss keeps ``exp(-alpha / J)`` near 1, a small one drives
  ``n'`` down to the positive's distance), and ``lambda in (0, 1)^D`` is either fixed or
  predicted per triplet and channel by a small graph network (:class:`NegativeGraphNet`) whose
  edges are channel-wise correlations of centred embeddings and whose nodes aggregate messages
  **only from their negatives**.

The learned lambda is trained (on detached embeddings) to make negatives as hard as possible while
keeping them recognisable as their own class: a linear proxy classifier fitted on real embeddings
must still assign ``n'`` to n's class, and ``n'`` must stay close in direction to n. The embedding
network sees ``metric(real) + synthetic_weight * metric(a, p, n')`` with lambda detached. One
``loss.total.backward()`` trains all three parts with a single optimiser over the model's and this
module's parameters (every part's gradient reaches only its own parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hardneg.bank import EmbeddingBank

__all__ = [
    "GCAHardNegatives",
    "GCALoss",
    "GlobalNegatives",
    "NegativeGraphNet",
    "SyntheticNegatives",
    "Triplets",
    "channel_correlation",
    "interpolate_negatives",
    "mine_triplets",
    "triplet_loss",
]


# =========================================================================== the formula
def interpolate_negatives(anchor: Tensor, positive: Tensor, negative: Tensor, lam: Union[Tensor, float],
                          alpha: float, mean_loss: float) -> Tensor:
    """Move each negative towards its anchor, channel-wise (the GCA-HNG / HDML interpolation).

    ``anchor``, ``positive``, ``negative`` are ``(T, D)``; ``lam`` is a number, ``(D,)`` or
    ``(T, D)`` in ``[0, 1]``. Returns ``(T, D)``: ``a + ((d+ + (d- - d+) * lam * exp(-alpha / J)) / d-)
    * (n - a)`` where ``d- > d+``, the unchanged negative elsewhere. With a channel-constant lam the
    new anchor distance is exactly ``d+ + (d- - d+) * lam * exp(-alpha / J)``.
    """
    d_pos = (anchor - positive).norm(dim=1, keepdim=True)
    d_neg = (anchor - negative).norm(dim=1, keepdim=True)
    factor = math.exp(-alpha / mean_loss) if mean_loss > 0 else 0.0
    lam_t = torch.as_tensor(lam, dtype=anchor.dtype, device=anchor.device)
    harder = d_neg > d_pos
    coef = (d_pos + (d_neg - d_pos) * lam_t * factor) / torch.where(harder, d_neg, torch.ones_like(d_neg))
    moved = anchor + coef * (negative - anchor)
    return torch.where(harder, moved, negative)


def channel_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Channel-wise correlation of centred embeddings: ``(x~ * y~) / (|x~| |y~|)``, summing to Pearson's r.

    Each embedding is centred over its own channels, so the edge between two samples depends on
    those two samples only. ``x``, ``y`` broadcast to ``(..., D)``.
    """
    return _centred_unit(x) * _centred_unit(y)


def _centred_unit(x: Tensor) -> Tensor:
    xc = x - x.mean(-1, keepdim=True)
    return xc / xc.norm(dim=-1, keepdim=True).clamp_min(1e-8)


# =========================================================================== mining
@dataclass(frozen=True)
class Triplets:
    """Indices ``(anchor_idx, pos_idx, neg_idx)``: anchors index the batch, the others the references."""

    anchor_idx: Tensor
    pos_idx: Tensor
    neg_idx: Tensor

    def __len__(self) -> int:
        return int(self.anchor_idx.numel())

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        """The pytorch-metric-learning ``indices_tuple`` (with ``ref_emb``: p and n index the references)."""
        return self.anchor_idx, self.pos_idx, self.neg_idx


def _masks(labels: Tensor, ref_labels: Tensor, batch_in_ref: bool) -> tuple[Tensor, Tensor]:
    same = labels.view(-1, 1) == ref_labels.view(1, -1)
    pos = same.clone()
    if batch_in_ref:
        n = labels.shape[0]
        pos[torch.arange(n), torch.arange(n)] = False
    return pos, ~same


def mine_triplets(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                  ref_labels: Optional[Tensor] = None, negatives_per_anchor: int = 8,
                  batch_in_ref: Optional[bool] = None) -> Triplets:
    """Every (anchor, positive) pair with each of the anchor's ``negatives_per_anchor`` nearest negatives.

    ``ref_emb``/``ref_labels`` default to the batch. ``batch_in_ref`` (default: True when the
    references are the batch) says that reference row i is batch row i, so an anchor is never its
    own positive; :meth:`GlobalNegatives.references` returns references laid out that way.
    """
    ref = embeddings if ref_emb is None else ref_emb
    ref_y = labels if ref_labels is None else ref_labels
    if batch_in_ref is None:
        batch_in_ref = ref_emb is None
    with torch.no_grad():
        pos, neg = _masks(labels, ref_y, batch_in_ref)
        dist = torch.cdist(embeddings.detach().float(), ref.detach().float())
        k = max(0, min(int(negatives_per_anchor), ref.shape[0]))
        near = dist.masked_fill(~neg, float("inf")).topk(k, dim=1, largest=False)
        a, p = pos.nonzero(as_tuple=True)
        n = near.indices[a]  # (pairs, k)
        ok = torch.isfinite(near.values[a])
        a = a.view(-1, 1).expand_as(n)[ok]
        p = p.view(-1, 1).expand_as(n)[ok]
        return Triplets(a, p, n[ok])


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 0.2) -> Tensor:
    """Triplet margin loss averaged over the triplets that violate the margin (0 if none do).

    The average over non-zero terms (pytorch-metric-learning's default reducer) keeps the loss
    from fading as most triplets become easy.
    """
    if anchor.shape[0] == 0:
        return anchor.sum() * 0.0
    losses = F.relu((anchor - positive).norm(dim=1) - (anchor - negative).norm(dim=1) + margin)
    active = (losses > 0).sum()
    return losses.sum() / active.clamp_min(1)


# =========================================================================== global negatives
class GlobalNegatives:
    """The nearest negatives of each anchor over the whole dataset, from an :class:`EmbeddingBank`.

    ``references(embeddings, labels, ids)`` returns ``(ref_emb, ref_labels)``: the batch's own rows
    first (with gradient), then, for every anchor, its ``k`` nearest stored samples of another
    class (stored vectors, no gradient; batch samples themselves excluded). ``update`` stores the
    batch's embeddings after the step. With an empty bank the references are just the batch.
    """

    def __init__(self, bank: EmbeddingBank, k: int = 8) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.bank = bank
        self.k = int(k)

    def references(self, embeddings: Tensor, labels: Tensor, ids: Union[Tensor, np.ndarray, list]) -> tuple[Tensor, Tensor]:
        """``(ref_emb, ref_labels)`` = the batch, then its anchors' nearest negatives from the bank."""
        if len(self.bank) == 0:
            return embeddings, labels
        ids_np = np.asarray(torch.as_tensor(ids).cpu().numpy(), dtype=np.int64)
        want = self.k + len(ids_np)  # room for batch members and same-class neighbours we drop
        _, nbr, nbr_labels = self.bank.search_with_labels(embeddings.detach(), min(len(self.bank), 4 * want))
        own = labels.detach().cpu().numpy()[:, None]
        valid = (nbr >= 0) & (nbr_labels != own) & ~np.isin(nbr, ids_np)
        chosen: list[int] = []
        seen: set[int] = set()
        for row, ok in zip(nbr, valid):
            for i in row[ok][: self.k].tolist():
                if i not in seen:
                    seen.add(i)
                    chosen.append(i)
        if not chosen:
            return embeddings, labels
        vecs, ref_labels = self.bank.get(chosen)
        ref = torch.as_tensor(vecs, dtype=embeddings.dtype, device=embeddings.device)
        ref_y = torch.as_tensor(ref_labels, dtype=labels.dtype, device=labels.device)
        return torch.cat([embeddings, ref]), torch.cat([labels, ref_y])

    def update(self, ids: Union[Tensor, np.ndarray, list], embeddings: Tensor, labels: Tensor, step: int = 0) -> None:
        """Store the batch's (detached) embeddings under their dataset ids."""
        self.bank.upsert(ids, embeddings.detach(), labels.detach(), step=step)


# =========================================================================== the graph network
class NegativeGraphNet(nn.Module):
    """Predicts per-channel interpolation coefficients ``lambda in (0, 1)^D`` for each triplet.

    Nodes are the anchors and the references; the edge between anchor a and reference r carries
    their channel-wise correlation (:func:`channel_correlation`). One round of attention message
    passing in which anchor a receives messages **only from its negatives** (attention is masked to
    references of another class), then ``lambda = sigmoid(MLP([h_a, x_n, e_an]))`` per triplet.
    """

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.dim, self.hidden = int(dim), int(hidden)
        self.query = nn.Linear(dim, hidden)
        self.key = nn.Linear(dim, hidden)
        self.value = nn.Linear(dim, dim)
        self.edge = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(3 * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.constant_(self.head[-1].bias, 1.0)  # start near lambda ~ 0.7: mild interpolation

    def messages(self, x: Tensor, ref: Tensor, neg_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(messages (N, D), attention (N, R))``; attention is zero wherever ``neg_mask`` is False."""
        scores = self.query(x) @ self.key(ref).T / math.sqrt(self.hidden)
        scores = scores.masked_fill(~neg_mask, float("-inf"))
        has_neg = neg_mask.any(1, keepdim=True)
        attn = torch.where(has_neg, scores, torch.zeros_like(scores)).softmax(1) * neg_mask
        # sum_r attn_ar * edge(corr(x_a, ref_r)) without the (N, R, D) tensor: the edge map is affine
        # and corr(x_a, ref_r) = x^_a * r^_r with x^ the centred, normalised embeddings.
        xh, rh = _centred_unit(x), _centred_unit(ref)
        edge_sum = F.linear(xh * (attn @ rh), self.edge.weight) + attn.sum(1, keepdim=True) * self.edge.bias
        return attn @ self.value(ref) + edge_sum, attn

    def forward(self, x: Tensor, ref: Tensor, neg_mask: Tensor, triplets: Triplets) -> Tensor:
        """``lambda`` ``(T, D)`` in (0, 1) for each triplet's (anchor, negative)."""
        msg, _ = self.messages(x, ref, neg_mask)
        h = self.norm(x + msg)
        a, n = triplets.anchor_idx, triplets.neg_idx
        e = channel_correlation(x[a], ref[n])
        return torch.sigmoid(self.head(torch.cat([h[a], ref[n], e], dim=1)))


# =========================================================================== the module
@dataclass
class SyntheticNegatives:
    """Synthetic negatives ``(T, D)`` for ``triplets``, the lambda used, and the factor ``exp(-alpha/J)``."""

    triplets: Triplets
    negatives: Tensor
    lam: Tensor
    factor: float

    def as_reference(self, ref_emb: Tensor, ref_labels: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
        """References extended by the synthetic negatives and the ``indices_tuple`` that uses them.

        For any pytorch-metric-learning tuple loss:
        ``ref, ref_y, idx = syn.as_reference(ref, ref_y); loss_fn(emb, y, idx, ref, ref_y)``.
        """
        t = self.triplets
        r = ref_emb.shape[0]
        ref = torch.cat([ref_emb, self.negatives.to(ref_emb.dtype)])
        ref_y = torch.cat([ref_labels, ref_labels[t.neg_idx]])
        return ref, ref_y, (t.anchor_idx, t.pos_idx, r + torch.arange(len(t), device=ref_emb.device))


@dataclass
class GCALoss:
    """``total`` to backpropagate, and its parts (detached floats are in ``parts()``)."""

    total: Tensor
    metric: Tensor
    synthetic: Tensor
    generator: Tensor
    proxy: Tensor
    synthetic_negatives: SyntheticNegatives

    def parts(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "metric", "synthetic", "generator", "proxy")}


class GCAHardNegatives(nn.Module):
    """GCA-HNG-style synthetic negatives in embedding space, plus the losses that use them.

    Args:
        dim: embedding dimension D.
        num_classes: training classes, for the label-preserving proxy classifier of the learned
            lambda (``None``: only the direction term keeps labels).
        alpha: hardness schedule; ``exp(-alpha / J)`` with J the running mean metric loss. Scale it
            to your loss: for a triplet loss with margin 0.2 (J ~ 0.05-0.2), alpha ~ 0.05.
        lam: a fixed lambda in [0, 1] (no graph network), or ``None`` to learn it.
        margin: triplet margin. synthetic_weight: weight of the synthetic-negative metric loss.
        negatives_per_anchor: negatives mined per (anchor, positive) pair.
        loss_momentum: EMA momentum of J. hidden: graph network width.
        hardness_weight, direction_weight: the learned lambda's objective, ``CE(proxy(n'), y_n)
            + direction_weight * (1 - cos(n', n)) + hardness_weight * mean(lambda)``.
    """

    def __init__(self, dim: int, num_classes: Optional[int] = None, alpha: float = 0.05,
                 lam: Optional[float] = None, margin: float = 0.2, synthetic_weight: float = 1.0,
                 negatives_per_anchor: int = 8, loss_momentum: float = 0.9, hidden: int = 64,
                 hardness_weight: float = 1.0, direction_weight: float = 1.0) -> None:
        super().__init__()
        if lam is not None and not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1] or be None (learned), got {lam!r}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        self.dim = int(dim)
        self.alpha, self.margin = float(alpha), float(margin)
        self.fixed_lam = lam
        self.synthetic_weight = float(synthetic_weight)
        self.negatives_per_anchor = int(negatives_per_anchor)
        self.loss_momentum = float(loss_momentum)
        self.hardness_weight, self.direction_weight = float(hardness_weight), float(direction_weight)
        self.graph = NegativeGraphNet(dim, hidden) if lam is None else None
        self.proxy = nn.Linear(dim, num_classes) if (lam is None and num_classes) else None
        self.register_buffer("mean_loss", torch.tensor(float("nan")))

    @property
    def factor(self) -> float:
        """``exp(-alpha / J)`` now (1 before the first loss is recorded: no extra hardness yet)."""
        j = float(self.mean_loss)
        if math.isnan(j):
            return 1.0
        return math.exp(-self.alpha / j) if j > 0 else 0.0

    def record_loss(self, value: float) -> None:
        """Update the running mean metric loss J."""
        j = float(self.mean_loss)
        self.mean_loss.fill_(value if math.isnan(j) else self.loss_momentum * j + (1 - self.loss_momentum) * value)

    def _lam(self, embeddings: Tensor, ref: Tensor, labels: Tensor, ref_labels: Tensor, triplets: Triplets) -> Tensor:
        """Per-triplet lambda: the fixed value, or the graph network's on detached embeddings."""
        if self.graph is None:
            return torch.full((len(triplets), self.dim), float(self.fixed_lam), dtype=embeddings.dtype,
                              device=embeddings.device)
        neg_mask = labels.view(-1, 1) != ref_labels.view(1, -1)
        return self.graph(embeddings.detach(), ref.detach(), neg_mask, triplets)

    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, triplets: Optional[Triplets] = None,
                batch_in_ref: Optional[bool] = None) -> SyntheticNegatives:
        """Mine triplets (unless given) and synthesise one hard negative per triplet.

        ``embeddings (N, D)``, ``labels (N,)``; references and ``batch_in_ref`` as in
        :func:`mine_triplets` (default: detected, True when ``ref_emb[:N]`` is the batch itself). The
        negatives carry gradient to the embeddings; lambda does not.
        """
        ref, ref_y, t = self._prepare(embeddings, labels, ref_emb, ref_labels, triplets, batch_in_ref)
        lam = self._lam(embeddings, ref, labels, ref_y, t).detach()
        neg = interpolate_negatives(embeddings[t.anchor_idx], ref[t.pos_idx], ref[t.neg_idx], lam, self.alpha, self._j())
        return SyntheticNegatives(t, neg, lam, self.factor)

    def loss(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor] = None,
             ref_labels: Optional[Tensor] = None, batch_in_ref: Optional[bool] = None) -> GCALoss:
        """``metric(real) + synthetic_weight * metric(synthetic)`` (+ the learned lambda's own losses).

        Records the real metric loss into J. References as in :meth:`forward` (e.g. from
        :meth:`GlobalNegatives.references`).
        """
        ref, ref_y, t = self._prepare(embeddings, labels, ref_emb, ref_labels, None, batch_in_ref)
        a, p, n = embeddings[t.anchor_idx], ref[t.pos_idx], ref[t.neg_idx]
        metric = triplet_loss(a, p, n, self.margin)
        lam = self._lam(embeddings, ref, labels, ref_y, t)  # from detached inputs: trains the graph only
        j = self._j()
        n_syn = interpolate_negatives(a, p, n, lam.detach(), self.alpha, j)
        synthetic = triplet_loss(a, p, n_syn, self.margin)
        generator = proxy = metric * 0.0
        if self.graph is not None and len(t):
            n_hat = interpolate_negatives(a.detach(), p.detach(), n.detach(), lam, self.alpha, j)
            generator = self.hardness_weight * lam.mean()
            generator = generator + self.direction_weight * (1 - F.cosine_similarity(n_hat, n.detach(), dim=1)).mean()
            if self.proxy is not None:  # frozen proxy weights: the generator must fool nothing, only keep labels
                logits = F.linear(n_hat, self.proxy.weight.detach(), self.proxy.bias.detach())
                generator = generator + F.cross_entropy(logits, ref_y[t.neg_idx])
        if self.proxy is not None:
            proxy = F.cross_entropy(self.proxy(embeddings.detach()), labels)
        total = metric + self.synthetic_weight * synthetic + generator + proxy
        self.record_loss(float(metric.detach()))
        return GCALoss(total, metric, synthetic, generator, proxy, SyntheticNegatives(t, n_syn, lam.detach(), self.factor))

    def _j(self) -> float:
        j = float(self.mean_loss)
        return float("inf") if math.isnan(j) else j

    def _prepare(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor], ref_labels: Optional[Tensor],
                 triplets: Optional[Triplets], batch_in_ref: Optional[bool]) -> tuple[Tensor, Tensor, Triplets]:
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("pass both ref_emb and ref_labels, or neither")
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim or labels.shape != (embeddings.shape[0],):
            raise ValueError(f"need embeddings (N, {self.dim}) and labels (N,), got {tuple(embeddings.shape)}, "
                             f"{tuple(labels.shape)}")
        ref, ref_y = (embeddings, labels) if ref_emb is None else (ref_emb, ref_labels)
        if batch_in_ref is None:
            n = embeddings.shape[0]
            batch_in_ref = ref_emb is None or (ref.shape[0] >= n and torch.equal(ref[:n].detach(), embeddings.detach()))
        if triplets is None:
            triplets = mine_triplets(embeddings, labels, ref, ref_y, self.negatives_per_anchor, batch_in_ref)
        return ref, ref_y, triplets
