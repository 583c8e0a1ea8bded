"""Cheap generators for engine tests; module-level so the process (spawn) backend can import them."""

import time

import torch


class BlendGenerator:
    """Cheap stand-in diffusion: moves a source towards a per-class template by r (deterministic)."""

    def __init__(self, num_classes=4, shape=(1, 8, 8), delay=0.0, fail_every=0, nan=False):
        self.num_classes = num_classes
        g = torch.Generator().manual_seed(0)
        self.templates = torch.rand(num_classes, *shape, generator=g)
        self.delay, self.fail_every, self.nan = delay, fail_every, nan
        self.calls = 0

    def generate(self, sources, source_labels, target_labels, ratios, seed=None):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError(f"deliberate failure on call {self.calls}")
        r = torch.as_tensor(ratios, dtype=torch.float32).view(-1, 1, 1, 1)
        out = (1 - r) * sources + r * self.templates[target_labels]
        if self.nan:
            out[0] = float("nan")
        return out


def make_slow_blend_generator() -> BlendGenerator:
    """A picklable factory: a blend generator that takes 0.3 s per call."""
    return BlendGenerator(delay=0.3)
