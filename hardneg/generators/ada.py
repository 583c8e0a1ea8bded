"""GeNIe-Ada: choose the noise ratio r per source where its semantics flip to the target class.

For each source (class A) and target class B, generate at every r of a grid, embed the results with
the classifier's encoder (L2-normalised), and project each embedding on
``v = mean(real B embeddings) - source embedding``. The projection rises as the image moves from A
to B; the r just after its largest jump (``grid[argmax(diff) + 1]``) is the hardest negative that
already reads as B. The chosen image is one of those already generated: no extra generation.

One implementation, two callers: :func:`ada_pick` is the selection (projections, then the r after
the largest jump). :func:`genie_ada` (offline: generate, encode sources and results, pick) and the
engine on arrival of a GeNIe-Ada request (:class:`hardneg.HardNeg`: results embedded by the
classifier, sources and the target mean taken from the embedding bank) both call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg.generators.base import Generator, GeneratorError

DEFAULT_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)
Encoder = Callable[[Tensor], Tensor]


@dataclass
class AdaResult:
    """GeNIe-Ada output: per source the chosen r, the image generated at it, and all projections.

    ``ratios`` (N,) float, ``images`` (N, C, H, W) like the sources, ``projections`` (N, G) with
    one column per grid ratio, ``grid`` the ratios the columns stand for.
    """

    ratios: Tensor
    images: Tensor
    projections: Tensor
    grid: tuple[float, ...] = DEFAULT_GRID


def _check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    g = tuple(float(r) for r in grid)
    if len(g) < 2:
        raise GeneratorError(f"GeNIe-Ada needs a grid of at least 2 ratios, got {g}")
    if any(not 0.0 < r <= 1.0 for r in g):
        raise GeneratorError(f"every grid ratio must lie in (0, 1], got {g}")
    if any(b <= a for a, b in zip(g, g[1:])):
        raise GeneratorError(f"the grid must be strictly increasing, got {g}")
    return g


def choose_index(projections: Tensor) -> Tensor:
    """Per row, the grid index just after the largest consecutive jump of ``projections`` (N, G)."""
    p = torch.as_tensor(projections)
    if p.ndim != 2 or p.shape[1] < 2:
        raise GeneratorError(f"projections must be (N, G) with G >= 2, got shape {tuple(p.shape)}")
    return torch.diff(p.double(), dim=1).argmax(dim=1) + 1


def choose_ratio(projections: Tensor, grid: Sequence[float] = DEFAULT_GRID) -> Tensor:
    """Per row of ``projections`` (N, G): ``r = grid[argmax(diff(row)) + 1]`` (float64, (N,)).

    Pure function. Ties go to the earliest jump (the lower, harder r).
    """
    g = _check_grid(grid)
    p = torch.as_tensor(projections)
    if p.ndim != 2 or p.shape[1] != len(g):
        raise GeneratorError(
            f"projections must be (N, {len(g)}) for a grid of {len(g)} ratios, got {tuple(p.shape)}")
    return torch.tensor(g, dtype=torch.float64)[choose_index(p).cpu()]


def ada_pick(image_embeddings: Tensor, source_embeddings: Tensor, target_means: Tensor,
             grid: Sequence[float] = DEFAULT_GRID) -> tuple[Tensor, Tensor, Tensor]:
    """GeNIe-Ada's choice per source: ``(index (N,), ratios (N,) float64, projections (N, G))``.

    ``image_embeddings`` (N * G, D), L2-normalised, row ``i * G + j`` is source i at ``grid[j]``;
    ``source_embeddings`` (N, D); ``target_means`` (N, D) or (1, D): mean embedding of the target
    class. Each result is projected on ``v = target mean - source embedding``; the index is the grid
    point just after the largest jump (:func:`choose_index`).
    """
    g = _check_grid(grid)
    n = source_embeddings.shape[0]
    v = target_means - source_embeddings  # (N, D): from the source towards the target class
    projections = (image_embeddings.view(n, len(g), -1) * v.unsqueeze(1)).sum(-1)
    index = choose_index(projections)
    return index, torch.tensor(g, dtype=torch.float64)[index.cpu()], projections


def _target_means(target_mean_embeddings: Union[Tensor, Mapping[int, Tensor]], target_labels: Tensor,
                  n: int) -> Tensor:
    """(N, D) target-mean embeddings from a (D,) vector, an (N, D) matrix or a {class: (D,)} mapping."""
    if isinstance(target_mean_embeddings, Mapping):
        missing = sorted({int(b) for b in target_labels.tolist()} - {int(k) for k in target_mean_embeddings})
        if missing:
            raise GeneratorError(f"target_mean_embeddings has no mean for target class(es) {missing}")
        return torch.stack([torch.as_tensor(target_mean_embeddings[int(b)]).float().flatten()
                            for b in target_labels.tolist()])
    m = torch.as_tensor(target_mean_embeddings).float()
    if m.ndim == 1:
        return m.unsqueeze(0).expand(n, -1)
    if m.ndim == 2 and m.shape[0] == n:
        return m
    raise GeneratorError(
        f"target_mean_embeddings must be (D,), ({n}, D) or a {{class: (D,)}} mapping, "
        f"got shape {tuple(m.shape)}")


@torch.no_grad()
def genie_ada(
    generator: Generator,
    encoder: Encoder,
    sources: Tensor,
    source_labels: Tensor,
    target_labels: Tensor,
    target_mean_embeddings: Union[Tensor, Mapping[int, Tensor]],
    grid: Sequence[float] = DEFAULT_GRID,
    seed: Optional[int] = None,
) -> AdaResult:
    """GeNIe-Ada: generate every source at every grid r in one call, pick r per source, return its image.

    ``encoder`` maps images (N, C, H, W) to embeddings (N, D) (e.g. the classifier without its
    head). ``target_mean_embeddings`` is the mean of the L2-normalised embeddings of real images of
    the target class: one (D,) vector for all sources, (N, D) one per source, or a mapping
    ``{class: (D,)}`` looked up by target label.
    """
    g = _check_grid(grid)
    n = sources.shape[0]
    k = len(g)
    source_labels = torch.as_tensor(source_labels).long()
    target_labels = torch.as_tensor(target_labels).long()
    if source_labels.shape != (n,) or target_labels.shape != (n,):
        raise GeneratorError(
            f"source_labels and target_labels must be shaped ({n},), got {tuple(source_labels.shape)} "
            f"and {tuple(target_labels.shape)}")
    # row i * k + j is source i at grid ratio j: one generate call for everything
    reps = sources.repeat_interleave(k, dim=0)
    ratios = torch.tensor(g, dtype=torch.float64).repeat(n)
    images = generator.generate(reps, source_labels.repeat_interleave(k), target_labels.repeat_interleave(k),
                                ratios, seed=seed)
    if n == 0:
        return AdaResult(torch.zeros(0, dtype=torch.float64), sources.clone(), torch.zeros(0, k), g)
    gen_emb = F.normalize(torch.as_tensor(encoder(images)).float().flatten(1), dim=1)
    src_emb = F.normalize(torch.as_tensor(encoder(sources)).float().flatten(1), dim=1)
    if gen_emb.shape[0] != n * k or src_emb.shape[0] != n:
        raise GeneratorError("the encoder must return one embedding per image")
    means = _target_means(target_mean_embeddings, target_labels, n).to(src_emb.device)
    if means.shape[1] != src_emb.shape[1]:
        raise GeneratorError(
            f"target_mean_embeddings have dimension {means.shape[1]} but the encoder gives "
            f"{src_emb.shape[1]}")
    idx, chosen_r, projections = ada_pick(gen_emb, src_emb, means, g)
    idx = idx.to(images.device)
    chosen = images.view(n, k, *images.shape[1:])[torch.arange(n, device=images.device), idx]
    return AdaResult(ratios=chosen_r, images=chosen, projections=projections.cpu(), grid=g)
