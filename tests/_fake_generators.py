"""Deterministic stand-in generators for the worker tests.

They live in an importable module (not in a test file) because the process backend starts its
child with ``spawn`` and pickles the factory by reference: the child must be able to import it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Optional

import torch
from torch import Tensor

from hardneg.generators.base import as_ratio_tensor


def expected_images(sources: Tensor, target_labels: Tensor, ratios: Tensor, num_classes: int = 10) -> Tensor:
    """What :class:`FakeGenerator` returns: each source blended towards a per-class grey level."""
    r = torch.as_tensor(ratios, dtype=sources.dtype).view(-1, 1, 1, 1)
    level = (target_labels.to(sources.dtype) / num_classes).view(-1, 1, 1, 1)
    return sources * (1 - r) + level * r


class FakeGenerator:
    """A cheap generator with switchable misbehaviour.

    Args:
        delay: seconds slept per ``generate`` call (a slow diffusion model).
        fail_every: raise ``RuntimeError`` on every k-th call (k, 2k, ...).
        nan_every: return NaN images on every k-th call, without checking them itself.
        exit_on_call: ``os._exit(3)`` on that call: kills the whole process (process backend only!).
        die_on_call: raise ``SystemExit`` on that call: ends a worker thread.
    """

    num_classes = 10

    def __init__(
        self,
        delay: float = 0.0,
        fail_every: int = 0,
        nan_every: int = 0,
        exit_on_call: int = 0,
        die_on_call: int = 0,
    ) -> None:
        self.delay = delay
        self.fail_every = fail_every
        self.nan_every = nan_every
        self.exit_on_call = exit_on_call
        self.die_on_call = die_on_call
        self.calls = 0

    def generate(
        self,
        sources: Tensor,
        source_labels: Tensor,
        target_labels: Tensor,
        ratios: object,
        seed: Optional[int] = None,
    ) -> Tensor:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.exit_on_call and self.calls == self.exit_on_call:
            os._exit(3)
        if self.die_on_call and self.calls == self.die_on_call:
            raise SystemExit("fake generator ends its thread")
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError(f"fake generator failure on call {self.calls}")
        r = as_ratio_tensor(ratios, sources.shape[0])
        out = expected_images(sources, target_labels, r, self.num_classes)
        if self.nan_every and self.calls % self.nan_every == 0:
            out[0, 0, 0, 0] = float("nan")
        return out


def failing_factory() -> FakeGenerator:
    """A factory that cannot build its generator (e.g. missing weights)."""
    raise FileNotFoundError("no generator weights here")


class GatedGenerator(FakeGenerator):
    """Blocks in ``generate`` until ``gate`` is set (thread backend only: events are not picklable).

    ``started`` is set as soon as a call begins, so a test knows the worker has taken a request.
    """

    def __init__(self, gate: threading.Event, started: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.started = started

    def generate(self, sources, source_labels, target_labels, ratios, seed=None):  # type: ignore[override]
        self.started.set()
        if not self.gate.wait(timeout=30.0):
            raise TimeoutError("test gate never opened")
        return super().generate(sources, source_labels, target_labels, ratios, seed)


class WrongShapeGenerator(FakeGenerator):
    """Returns half-resolution images: a broken backend the worker must reject."""

    def generate(self, sources, source_labels, target_labels, ratios, seed=None):  # type: ignore[override]
        return super().generate(sources, source_labels, target_labels, ratios, seed)[:, :, ::2, ::2]


class PixelIdentityGenerator:
    """Returns its sources as they are, clamped to ``[0, 1]`` like a real generator's pixel space.

    A source outside ``[0, 1]`` raises (a real generator would silently produce wrong images),
    so a test sees whether the engine handed it plain pixels.
    """

    def __init__(self, num_classes: int = 4) -> None:
        self.num_classes = num_classes

    def generate(self, sources: Tensor, source_labels: Tensor, target_labels: Tensor, ratios: object,
                 seed: Optional[int] = None) -> Tensor:
        as_ratio_tensor(ratios, sources.shape[0])
        if sources.min() < -1e-4 or sources.max() > 1 + 1e-4:
            raise ValueError(f"sources outside [0, 1]: [{float(sources.min())}, {float(sources.max())}]")
        return sources.clamp(0.0, 1.0)


class HangingGenerator(FakeGenerator):
    """A generator whose ``generate`` never returns (a hung backend): it sleeps forever.

    ``release`` (thread backend only) lets a test end the call at teardown; it then raises.
    """

    def __init__(self, release: Optional[threading.Event] = None) -> None:
        super().__init__()
        self.release = release

    def generate(self, sources, source_labels, target_labels, ratios, seed=None):  # type: ignore[override]
        while self.release is None or not self.release.is_set():
            time.sleep(0.05)
        raise RuntimeError("hanging generator released")


def hanging_factory() -> HangingGenerator:
    """A picklable factory (process backend): a generator that sleeps forever on every call."""
    return HangingGenerator()
