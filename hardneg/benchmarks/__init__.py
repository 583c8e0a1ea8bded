"""Benchmarks: one module per question, each reporting ratios against a baseline measured in the same run.

Every module exposes ``NAME``, ``HELP``, ``add_arguments(parser)``, ``run(args) -> dict`` (prints
a table, writes ``results.json`` and a plot under ``--out``) and ``main(argv)``. They are reached
as ``hardneg bench <name>`` (:mod:`hardneg.commands.bench`) and as ``python benchmarks/<name>.py``
from a checkout. ``--quick`` runs a small version in seconds (used by the tests); timings are
never asserted, only recorded in ``benchmarks/README.md``.

* ``overhead``: the engine's synchronous time per training step (observe + mix, and the amortised
  confusion refresh) against the plain step, for bank sizes 10k / 100k / 1M, and the end-to-end
  ratio with a generator worker running in another process.
* ``bank``: exact flat vs IVF vs HNSW vs brute-force torch for the embedding bank: build, update,
  query throughput, confusion refresh time, IVF recall and its nprobe trade-off.
* ``generator``: images/s of each generator at r in {0.3, 0.5, 0.8, 1.0}; cost relative to r = 1.
* ``accuracy``: no augmentation, standard augmentation, mixup/cutmix, same-class diffusion
  augmentation, offline GeNIe and hardneg online on the digits in the long-tail and few-shot regimes.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BENCHMARKS = ("overhead", "bank", "generator", "accuracy")


def get(name: str) -> ModuleType:
    """The module of benchmark ``name`` (imported on demand: each pulls in heavy libraries)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"hardneg.benchmarks.{name}")
