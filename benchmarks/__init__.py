"""Benchmarks: one module per question, each reporting ratios against a baseline measured in the same run.

Research code, not part of the installed ``hardneg`` package: it lives in the repository's
top-level ``benchmarks/`` folder and runs from a source checkout, as ``python -m benchmarks <name>``
from the repository root or as ``hardneg bench <name>`` with an editable install
(:mod:`hardneg.commands.bench` finds this package next to the ``hardneg`` one).

One convention for all: benchmark ``<name>`` is the module ``benchmarks/<name with _>_bench.py``
exposing ``NAME``, ``HELP``, ``add_arguments(parser)`` (``--out``, ``--quick``, ``--seed`` from
:func:`benchmarks._common.add_common_arguments` plus its own), ``run(args) -> dict`` (prints a
table, writes ``results.json`` and a plot under ``--out``) and ``main(argv)``. ``--quick`` runs a
small version in seconds (used by the tests); timings are never asserted, only recorded in
``benchmarks/README.md``.

* ``overhead``: the engine's synchronous time per training step (observe + mix, and the amortised
  confusion refresh) against the plain step, for bank sizes 10k / 100k / 1M, and the end-to-end
  ratio with a generator worker running in another process.
* ``bank``: exact flat vs IVF vs HNSW vs brute-force torch for the embedding bank: build, update,
  query throughput, confusion refresh time, IVF recall and its nprobe trade-off.
* ``generator``: images/s of each generator at r in {0.3, 0.5, 0.8, 1.0}; cost relative to r = 1.
* ``accuracy``: no augmentation, standard augmentation, mixup/cutmix, same-class diffusion
  augmentation, offline GeNIe and hardneg online on the digits in the long-tail and few-shot regimes.
* ``metric-recall``: GCA-HNG-style embedding-space hard negatives for a metric-learning model.
* ``fake-to-real``: the From-Fake-to-Real two-stage regime on biased coloured digits.
* ``gpu``: the prepared GPU check (correctness first, then GPU vs baseline timings), PASS / FAIL /
  SLOW / SKIP per section.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BENCHMARKS = ("overhead", "bank", "generator", "accuracy", "metric-recall", "fake-to-real", "gpu")


def module_name(name: str) -> str:
    """``"metric-recall"`` -> ``"benchmarks.metric_recall_bench"``."""
    return f"{__name__}.{name.replace('-', '_')}_bench"


def get(name: str) -> ModuleType:
    """The module of benchmark ``name`` (imported on demand: each pulls in heavy libraries)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return importlib.import_module(module_name(name))
