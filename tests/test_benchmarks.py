"""The benchmarks run end to end in --quick mode and write sane JSON and a plot.

Nothing here asserts a timing (the machines are shared and noisy): only that the figures exist,
have the right shape and lie in their possible ranges (ratios positive, recall in [0, 1], ...).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hardneg.cli import build_parser

REPO = Path(__file__).resolve().parent.parent


def _run_cli(argv: list[str]) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = Path(args.out)
    data = json.loads((out / "results.json").read_text())
    for f in data["files"]:
        assert os.path.isfile(f) and os.path.getsize(f) > 0, f
    assert data["quick"] is True
    assert data["machine"]["cpu_count"] >= 1
    return data


def _positive(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def test_bench_command_lists_every_benchmark():
    from hardneg.benchmarks import BENCHMARKS

    parser = build_parser()
    for name in BENCHMARKS:
        args = parser.parse_args(["bench", name, "--quick", "--out", "x"])
        assert args.bench == name and args.quick and args.out == "x"
    assert set(BENCHMARKS) == {"overhead", "bank", "generator", "accuracy"}


def test_bank_quick(tmp_path):
    data = _run_cli(["bench", "bank", "--quick", "--out", str(tmp_path), "--sizes", "1k,3k", "--nprobes", "1,4,16"])
    assert [r["n"] for r in data["sizes"]] == [1000, 3000]
    for r in data["sizes"]:
        assert {"flat", "ivf", "hnsw", "torch"} <= set(r["qps"])
        assert all(_positive(v) for v in r["qps"].values())
        assert all(0.0 <= v <= 1.0 for v in r["recall"].values())
        assert r["recall"]["flat"] == 1.0 and r["recall"]["torch"] == pytest.approx(1.0, abs=0.02)
        assert r["ivf_curve"] and all(0.0 <= c["recall"] <= 1.0 and _positive(c["speedup_vs_exact"])
                                      for c in r["ivf_curve"])
        recalls = [c["recall"] for c in r["ivf_curve"]]
        assert recalls[-1] >= recalls[0]  # more lists probed never finds fewer true neighbours
        assert all(_positive(v) for v in r["refresh_s"].values())
        assert all(_positive(v["median"]) for v in r["update_s"].values())
        # the synthetic data has confusable pairs and the refresh finds them
        assert {tuple(sorted(p[:2])) for p in r["refresh_top_pairs"]["flat"]} & {(3, 8), (4, 9), (1, 7)}
    assert isinstance(data["target"]["met"], bool)
    assert "| N | index |" in data["table_markdown"]


def test_generator_quick(tmp_path):
    data = _run_cli(["bench", "generator", "--quick", "--out", str(tmp_path), "--ratios", "0.3,0.8"])
    assert set(data["generators"]) == {"class-conditional", "sd-tiny"}
    for res in data["generators"].values():
        rows = {row["r"]: row for row in res["per_r"]}
        assert set(rows) == {0.3, 0.8, 1.0}  # r = 1 (the baseline) is always measured
        assert rows[1.0]["cost_vs_r1"] == pytest.approx(1.0)
        assert rows[1.0]["step_fraction"] == 1.0
        assert rows[0.3]["steps"] < rows[0.8]["steps"] < rows[1.0]["steps"]
        assert all(_positive(row["images_per_s"]) and _positive(row["cost_vs_r1"]) for row in res["per_r"])
    assert "TINY" in data["generators"]["sd-tiny"]["model"]


def test_overhead_quick(tmp_path):
    data = _run_cli(["bench", "overhead", "--quick", "--out", str(tmp_path), "--own-core-size", "0",
                     "--steps", "1", "--repeats", "2", "--train-threads", "1"])
    (run,) = data["runs"]
    assert run["placement"] == "shared" and run["n"] == 2000 and run["bank_index"] == "flat"
    for key in ("sync_fraction", "refresh_inline_amortised_fraction", "end_to_end_ratio",
                "end_to_end_during_refresh_ratio", "end_to_end_async_default_ratio", "end_to_end_inline_refresh_ratio"):
        assert _positive(run[key]), key
    assert run["end_to_end_inline_refresh_ratio"] >= run["end_to_end_ratio"]
    assert 0.0 <= run["background_refresh_duty"] <= 1.0
    assert run["plain_step_s"]["n"] == 2 and run["sync_s"]["n"] == 2 and run["sync_during_refresh_s"]["n"] == 2
    assert run["worker"]["failures"] == 0
    assert run["profile_mix_observe"] and run["profile_refresh"]
    assert data["targets"]["sync_fraction_at"] == 2000


@pytest.mark.slow
def test_overhead_quick_with_own_core_placement(tmp_path):
    data = _run_cli(["bench", "overhead", "--quick", "--out", str(tmp_path)])
    assert [r["placement"] for r in data["runs"]] == ["shared", "own-core"]
    own = data["runs"][1]
    assert own["train_threads"] == 1 and _positive(own["end_to_end_ratio"])
    assert isinstance(data["targets"]["end_to_end_own_core_met"], bool)


def _check_accuracy(data: dict, regimes: list[str], methods: list[str]) -> None:
    assert list(data["regimes"]) == regimes
    for regime, reg in data["regimes"].items():
        only_long_tail = ("long-tail", "hardneg-to-rarer", "long-tail-fusion", "hardneg-as-mined")  # no tail if balanced
        expected = [m for m in methods if m not in only_long_tail or regime == "long-tail"]
        assert list(reg["summary"]) == expected
        assert len(reg["confused_pairs"]) == 3
        for m, e in reg["summary"].items():
            assert 0.0 <= e["accuracy"]["mean"] <= 1.0 and e["accuracy"]["std"] >= 0.0
            assert 0.0 <= e["pair_accuracy"]["mean"] <= 1.0
            if regime == "long-tail":
                assert 0.0 <= e["tail_accuracy"]["mean"] <= 1.0
        for r in reg["runs"]:
            if r["method"] in ("offline-genie", "auggen"):  # generated up front: exactly the budget
                assert r["images_requested"] == r["generated_images"] == data["settings"]["images"]
            elif "generated_images" in r:  # engine methods: plans ask for at most the budget
                assert r["images_budget"] == data["settings"]["images"]
                assert 0 <= r["generated_images"] <= r["images_requested"] <= r["images_budget"]
    assert "accuracy %" in data["table_markdown"]


def test_accuracy_smoke(tmp_path):
    methods = ["none", "offline-genie", "hardneg"]
    data = _run_cli(["bench", "accuracy", "--quick", "--out", str(tmp_path), "--regimes", "few-shot",
                     "--methods", ",".join(methods), "--steps", "3"])
    _check_accuracy(data, ["few-shot"], methods)


def test_accuracy_deterministic_runs_repeat_and_receive_every_requested_image(tmp_path):
    methods = ["same-class", "hardneg"]
    args = ["bench", "accuracy", "--quick", "--regimes", "few-shot", "--methods", ",".join(methods),
            "--steps", "6", "--deterministic"]
    first = _run_cli(args + ["--out", str(tmp_path / "a")])
    second = _run_cli(args + ["--out", str(tmp_path / "b")])
    runs = [d["regimes"]["few-shot"]["runs"] for d in (first, second)]
    for a, b in zip(*runs):
        assert a["method"] == b["method"] and a["preds"] == b["preds"]
        assert a["generated_images"] == b["generated_images"] == a["images_requested"]
        assert a["synthetic_used"] == b["synthetic_used"] > 0


def test_accuracy_quick_all_methods_both_regimes(tmp_path):
    data = _run_cli(["bench", "accuracy", "--quick", "--out", str(tmp_path)])
    _check_accuracy(data, ["long-tail", "few-shot"],
                    ["none", "standard", "mixup-cutmix", "same-class", "offline-genie", "hardneg", "long-tail",
                     "auggen", "hardneg-to-rarer", "long-tail-fusion", "hardneg-as-mined"])
    lt = data["regimes"]["long-tail"]
    long_tail_run = next(r for r in lt["runs"] if r["method"] == "long-tail")
    assert long_tail_run["generated_images"] > 0  # the policy found tail classes and head sources
    fusion_run = next(r for r in lt["runs"] if r["method"] == "long-tail-fusion")
    assert fusion_run["generated_images"] > 0 and fusion_run["buffer_mean_r"] == pytest.approx(0.3)
    auggen_run = next(r for r in lt["runs"] if r["method"] == "auggen")
    assert len(auggen_run["mixed_pairs"]) == data["settings"]["auggen_pairs"]
    assert all(0 <= p < 10 for p in auggen_run["preds"])  # scored on the 10 real logits only
    assert lt["class_counts"][0] / lt["class_counts"][-1] >= 20  # imbalance ratio of the long-tail regime
    assert max(data["regimes"]["few-shot"]["class_counts"]) <= 10


def test_standard_augment_keeps_shape_and_range():
    import torch

    from hardneg.benchmarks.accuracy import mixup_cutmix, standard_augment

    x = torch.rand(7, 1, 16, 16)
    y = torch.arange(7) % 10
    xa, ya = standard_augment(torch.Generator().manual_seed(0))(x, y)
    assert xa.shape == x.shape and torch.equal(ya, y) and not torch.equal(xa, x)
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0 + 1e-6
    xm, ym = mixup_cutmix(10)(x, y)  # odd batch: the last sample is dropped
    assert xm.shape == (6, 1, 16, 16) and ym.shape == (6, 10)
    assert torch.allclose(ym.sum(1), torch.ones(6))


def test_clustered_embeddings_are_unit_vectors_with_all_classes():
    import numpy as np

    from hardneg.benchmarks._common import clustered_embeddings

    x, y = clustered_embeddings(3000, dim=64, seed=1)
    assert x.shape == (3000, 64) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert set(np.unique(y).tolist()) == set(range(10))
    x2, y2 = clustered_embeddings(3000, dim=64, seed=1)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_script_wrapper_runs(tmp_path):
    """``python benchmarks/<name>.py`` reaches the same code as ``hardneg bench <name>``."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bank.py"), "--quick", "--sizes", "1k", "--nprobes", "1,4", "--hnsw-max", "0",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["sizes"][0]["n"] == 1000
