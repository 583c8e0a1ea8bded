"""The striped toy images most engine and adapter tests train on (one shared builder)."""

import torch

from hardneg.data import from_tensors


def striped_data(n_per_class: int = 24, k: int = 4, seed: int = 0, alike: bool = False):
    """``k`` classes of 1x8x8 images in [0, 1], class c brighter on rows c and c+1.

    ``alike``: class 1 is blended halfway towards class 0, so the model confuses that pair (a
    pair for the engine to mine).
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per_class)
    x = torch.rand(len(y), 1, 8, 8, generator=g) * 0.3
    for c in range(k):
        x[y == c, :, c : c + 2, :] += 0.7
    if alike:
        x[y == 1] = 0.5 * x[y == 1] + 0.5 * x[y == 0]
    return from_tensors(x.clamp(0, 1), y)


def clustered_modes(n, d=32, k=5, seed=0):
    """``n`` embeddings of ``k`` classes, each class 4 Gaussian modes in ``d`` dimensions (what the bank
    tests search): ``(x (n, d) float32, y (n,) int64)``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k * 4, d, generator=g)
    y = torch.arange(n) % k
    mode = y * 4 + torch.randint(0, 4, (n,), generator=g)
    return centres[mode] + 0.35 * torch.randn(n, d, generator=g), y
