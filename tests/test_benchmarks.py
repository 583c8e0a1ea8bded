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
    from benchmarks import BENCHMARKS

    parser = build_parser()
    for name in BENCHMARKS:
        args = parser.parse_args(["bench", name, "--quick", "--out", "x"])
        assert args.bench == name and args.quick and args.out == "x"
    assert set(BENCHMARKS) == {"overhead", "bank", "generator", "accuracy", "metric-recall", "fake-to-real", "gpu"}


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
    # the IVF refresh's list scan timed against FAISS's own IVF search of the same lists: the same pairs
    ivf_rows = [r for r in data["sizes"] if "refresh_ivf_lists_s" in r]
    assert ivf_rows and all(_positive(r["refresh_ivf_lists_speedup"]) and r["refresh_ivf_lists_pairs_equal"]
                            for r in ivf_rows)
    assert isinstance(data["target"]["met"], bool)
    assert "| N | index |" in data["table_markdown"]


def test_bank_exact_section_times_the_refresh_both_ways_and_they_agree(tmp_path):
    data = _run_cli(["bench", "bank", "--quick", "--out", str(tmp_path), "--sections", "exact",
                     "--exact-sizes", "3k", "--refresh-queries", "300"])
    (row,) = data["exact"]["sizes"]
    assert row["n"] == 3000
    for key in ("refresh_s", "search16_s"):
        assert set(row[key]) == {"before", "hardneg"} and all(_positive(v["median"]) for v in row[key].values())
    assert _positive(row["refresh_speedup"]) and _positive(row["search16_speedup"])
    # the two ways compute the same neighbours: the same top pairs, the same search results
    assert row["pairs_agree"] and row["search_ids_agree"] == 1.0
    assert row["blas_query_chunk"] >= 1 and "| N | refresh s, before |" in data["exact"]["table_markdown"]


@pytest.mark.slow
def test_bank_sharded_and_compressed_sections_quick(tmp_path):
    data = _run_cli(["bench", "bank", "--quick", "--out", str(tmp_path), "--sections", "sharded,compressed",
                     "--shard-worlds", "1,2", "--shard-size", "2k", "--refresh-queries", "200",
                     "--compressed-sizes", "12k"])
    runs = data["sharded"]["runs"]
    assert [r["world"] for r in runs] == [1, 2]
    assert all(r["pairs_equal_w1"] and r["same_on_every_rank"] for r in runs)  # sharding changes nothing found
    assert runs[1]["vector_memory_vs_w1"] < 0.75  # each of 2 ranks stores about half the vectors
    assert all(_positive(r["refresh_wall_s"]) and _positive(r["refresh_cpu_s_per_rank"]) for r in runs)
    (c,) = data["compressed"]
    assert c["bytes_per_vector"]["ivfpq_index_per_vector"] <= 64
    assert 0.0 <= c["recall"]["rerank0"] <= c["recall"][f"rerank{c['rerank']}"] <= 1.0
    assert all(_positive(v) for v in c["refresh_s"].values()) and all(_positive(v) for v in c["update_ms"].values())
    assert c["bytes_per_vector"]["ivfpq_file"]["vectors"] == 0 and c["bytes_per_vector"]["ivfpq_file"]["total"] < 200
    assert set(c["pairs_vs_exact"]) >= {"ivfpq_file", "ivfpq_ram", "exact_float16", "ivfpq_file_cold",
                                        "ivfpq_file_refresh_rerank128", "ivfpq_file_rerank32"}
    assert c["refresh_search"] == "lists" and "file_refresh_rerank128 (refresh only)" in data["compressed_table_markdown"]
    assert "| N | bank |" in data["compressed_table_markdown"]
    # what the build really holds (Linux): at least a float16 vector a sample in RAM, none when file-backed
    resident = c.get("resident_bytes_per_vector")
    if resident is not None:
        assert resident["ram"] > 512 * 2 * 0.9 and resident["file"] < resident["ram"] - 512 * 2 * 0.8


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
    # 4 plain steps (plain + plain+worker): the fixed call and the floor after alternate ones
    assert run["sync_warm_s"]["n"] == 10 and run["control_call_after_step_s"]["n"] == 2
    assert run["floor_after_step_s"]["n"] == 2 and run["floor_warm_s"]["n"] == 10 and _positive(run["sync_vs_floor"])
    for key in ("plain_worker_running_vs_plain", "end_to_end_vs_plain_worker_running"):
        assert _positive(run[key]), key
    assert isinstance(data["targets"]["sync_warm_ms_met"], bool)
    assert run["worker"]["failures"] == 0
    assert run["profile_mix_observe"] and run["profile_refresh"]
    assert data["targets"]["sync_fraction_at"] == 2000
    # per-repeat ratios with intervals: two repeats, each kind's blocks next to each other
    paired = run["paired"]
    for key in ("end_to_end", "end_to_end_during_refresh", "engine_vs_plain_worker_running", "sync_vs_floor"):
        iv = paired[key]
        assert iv["n"] == 2 and iv["low"] <= iv["ratio"] <= iv["high"], key
    assert len(paired["sync_ms_per_repeat"]) == 2 and len(paired["floor_ms_per_repeat"]) == 2
    assert data["targets"]["sync_ms_verdict"]["2k"] in ("met", "not met", "undecided")


@pytest.mark.slow
def test_overhead_quick_with_own_core_placement(tmp_path):
    data = _run_cli(["bench", "overhead", "--quick", "--out", str(tmp_path)])
    assert [r["placement"] for r in data["runs"]] == ["shared", "own-core"]
    own = data["runs"][1]
    assert own["train_threads"] == 1 and _positive(own["end_to_end_ratio"])
    assert isinstance(data["targets"]["end_to_end_own_core_met"], bool)
    verdicts = ("met", "not met", "undecided")
    assert data["targets"]["end_to_end_own_core_verdict_1.01"] in verdicts
    assert data["targets"]["end_to_end_own_core_during_refresh_verdict_1.10"] in verdicts
    assert data["targets"]["engine_own_core_vs_plain_worker_verdict_1.01"] in verdicts


def _check_accuracy(data: dict, regimes: list[str], methods: list[str]) -> None:
    assert list(data["regimes"]) == regimes
    for regime, reg in data["regimes"].items():
        assert list(reg["summary"]) == methods
        assert len(reg["confused_pairs"]) == 3
        # the confused pairs come from base runs with their own seeds, not from the compared runs
        assert reg["pair_seeds"] == data["settings"]["pair_seeds"]
        assert not set(reg["pair_seeds"]) & set(data["settings"]["seeds"])
        for m, e in reg["summary"].items():
            assert 0.0 <= e["accuracy"]["mean"] <= 1.0 and e["accuracy"]["std"] >= 0.0
            assert 0.0 <= e["pair_accuracy"]["mean"] <= 1.0
            diff = e["accuracy"]["vs_base"]
            assert diff["n"] == len(data["settings"]["seeds"])
            assert diff["mean"] == pytest.approx(e["accuracy"]["mean"] - reg["summary"]["base"]["accuracy"]["mean"])
            if regime == "long-tail":
                assert 0.0 <= e["tail_accuracy"]["mean"] <= 1.0
            assert len(e["per_class"]) == 10
        for r in reg["runs"]:
            if r["method"] in ("offline-genie", "diff-mix"):  # generated up front: exactly the budget
                assert r["images_requested"] == r["generated_images"] == reg["images"]
            elif "images_budget" in r:  # engine methods: plans ask for at most the budget, all of it arrives
                assert r["images_budget"] == reg["images"]
                assert 0 < r["images_kept"] <= r["images_received"] <= r["images_requested"] <= r["images_budget"]
            if "images_requested" in r:
                q = r["label_quality"]
                assert q["n"] == r["images_kept"]
                assert q["as_given"] + q["as_source"] + q["other"] == pytest.approx(1.0)
    assert "overall %" in data["table_markdown"] and "Label quality" in data["table_markdown"]


def test_accuracy_quick_base_plus_x(tmp_path):
    methods = ["none", "base", "mixup", "da-fusion", "offline-genie", "diff-mix", "hardneg"]
    data = _run_cli(["bench", "accuracy", "--quick", "--out", str(tmp_path), "--methods", ",".join(methods),
                     "--seeds", "0,1", "--steps", "3", "--curve-steps", "2,3"])
    _check_accuracy(data, ["long-tail", "few-shot"], methods)
    lt = data["regimes"]["long-tail"]
    assert lt["class_counts"][0] / lt["class_counts"][-1] >= 20  # imbalance ratio of the long-tail regime
    assert lt["groups"]["few_accuracy"] == [c for c, n in enumerate(lt["class_counts"]) if n < 20]
    assert list(lt["convergence"]) == ["2", "3"]
    assert max(data["regimes"]["few-shot"]["class_counts"]) <= 10
    diffmix = next(r for r in lt["runs"] if r["method"] == "diff-mix")
    assert 0.5 < diffmix["label_quality"]["mean_target_weight"] < 1.0  # soft labels s^0.5 for s in {.3,...,.9}
    assert os.path.isfile(tmp_path / "per_class.png") and os.path.isfile(tmp_path / "convergence.png")


def test_accuracy_deterministic_runs_repeat_and_receive_every_requested_image(tmp_path):
    methods = ["da-fusion", "hardneg"]
    args = ["bench", "accuracy", "--quick", "--regimes", "few-shot", "--methods", ",".join(methods),
            "--steps", "6", "--deterministic"]
    first = _run_cli(args + ["--out", str(tmp_path / "a")])
    second = _run_cli(args + ["--out", str(tmp_path / "b")])
    runs = [d["regimes"]["few-shot"]["runs"] for d in (first, second)]
    for a, b in zip(*runs):
        assert a["method"] == b["method"] and a["preds"] == b["preds"]
        assert a["images_received"] == b["images_received"] == a["images_requested"]
        assert a["synthetic_used"] == b["synthetic_used"] > 0


@pytest.mark.slow
def test_accuracy_quick_legacy_methods(tmp_path):
    methods = ["base", "long-tail", "long-tail-fusion", "auggen", "hardneg-as-mined", "hardneg-ada"]
    data = _run_cli(["bench", "accuracy", "--quick", "--out", str(tmp_path), "--regimes", "long-tail",
                     "--methods", ",".join(methods)])
    lt = data["regimes"]["long-tail"]
    fusion_run = next(r for r in lt["runs"] if r["method"] == "long-tail-fusion")
    assert fusion_run["images_kept"] > 0 and fusion_run["buffer_mean_r"] == pytest.approx(0.3)
    auggen_run = next(r for r in lt["runs"] if r["method"] == "auggen")
    assert len(auggen_run["mixed_pairs"]) == data["settings"]["auggen_pairs"]
    assert all(0 <= p < 10 for p in auggen_run["preds"])  # scored on the 10 real logits only
    ada = next(r for r in lt["runs"] if r["method"] == "hardneg-ada")
    assert ada["images_requested"] == 5 * ada["images_kept"]  # one kept of five r per source


def test_accuracy_runs_resume_from_their_cache(tmp_path, monkeypatch):
    """A second invocation reuses finished runs (same settings) and reruns when a setting changes."""
    from benchmarks import accuracy_bench as A

    calls = []
    real = A._one_run
    monkeypatch.setattr(A, "_one_run", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    base = ["bench", "accuracy", "--quick", "--regimes", "few-shot", "--methods", "base,none", "--out", str(tmp_path),
            "--images", "4"]
    parser = build_parser()
    args = parser.parse_args(base)
    args.quick = False  # the cache is written outside --quick only; keep the quick sizes by hand
    for name, value in (("steps", 2), ("seeds", "0"), ("pair_seeds", "100"), ("generator_fit_steps", "0"),
                        ("judge_epochs", 1), ("worker", "thread"), ("generator_steps", 2)):
        setattr(args, name, value)
    A.run(args)
    assert sorted(calls) == ["base", "base", "none"]  # pair-selection base, base, none
    calls.clear()
    A.run(args)
    assert calls == []
    args.deterministic = True  # base and none do not read it: still cached
    A.run(args)
    assert calls == []
    args.steps = 3
    A.run(args)
    assert sorted(calls) == ["base", "base", "none"]


def test_paired_difference_is_a_t_interval_over_seeds():
    from benchmarks._stats import format_difference, paired_difference, verdict

    d = paired_difference([2, 4, 6, 8, 10], [1, 2, 3, 4, 5])  # differences 1..5: mean 3, sd 1.5811
    assert d.n == 5 and d.mean == pytest.approx(3.0)
    assert d.low == pytest.approx(3 - 2.776445 * 1.581139 / math.sqrt(5), abs=1e-5)  # t(0.975, 4) = 2.776445
    assert d.high == pytest.approx(4.963243, abs=1e-5)
    assert verdict(d) == "gain"
    assert verdict(paired_difference([0.1, 0.3], [0.2, 0.2])) == "n.s."
    assert verdict(paired_difference([0.1, 0.2, 0.15], [0.3, 0.35, 0.32])) == "loss"
    one = paired_difference([0.5], [0.4])
    assert one.low is None and verdict(one) == "-" and format_difference(one) == "+10.0"
    assert paired_difference([None, 0.5, 0.7], [0.4, None, 0.6]).n == 1  # only seeds with both results count
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_paired_ratio_is_a_t_interval_of_log_ratios_and_judges_a_limit_only_when_clear():
    from benchmarks._stats import against_limit, format_ratio, paired_ratio

    r = paired_ratio([2.0, 4.0, 8.0], [1.0, 2.0, 4.0])  # every repeat exactly 2x: no spread
    assert r.n == 3 and r.ratio == pytest.approx(2.0) and r.low == pytest.approx(2.0) and r.high == pytest.approx(2.0)
    # log ratios 0, log 1.1, log 1.21: geometric mean 1.1, interval exp(mean +- t(0.975, 2) * sd / sqrt 3)
    r = paired_ratio([100.0, 110.0, 121.0], [100.0, 100.0, 100.0])
    half = 4.302653 * math.log(1.1) / math.sqrt(3)
    assert r.ratio == pytest.approx(1.1) and r.low == pytest.approx(1.1 * math.exp(-half), rel=1e-5)
    assert r.high == pytest.approx(1.1 * math.exp(half), rel=1e-5)
    assert against_limit(r, 1.01) == "undecided"  # the interval straddles the limit: this run cannot tell
    assert against_limit(paired_ratio([1.0, 1.002, 0.999], [1.0, 1.0, 1.0]), 1.01) == "met"
    assert against_limit(paired_ratio([1.3, 1.31, 1.29], [1.0, 1.0, 1.0]), 1.10) == "not met"
    one = paired_ratio([1.5], [1.0])
    assert one.low is None and against_limit(one, 2.0) == "-" and format_ratio(one) == "1.500x"
    assert paired_ratio([None, 0.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]).n == 2  # missing and non-positive left out
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_base_augmentations_keep_shape_range_and_labels():
    import torch

    from benchmarks.accuracy_bench import crop_flip, mixup_cutmix, standard_augment

    rgb = torch.rand(6, 3, 32, 32)
    xc, yc = crop_flip(torch.Generator().manual_seed(0), pad=4)(rgb, torch.arange(6))
    assert xc.shape == rgb.shape and torch.equal(yc, torch.arange(6)) and not torch.equal(xc, rgb)
    assert float(xc.min()) >= 0.0 and float(xc.max()) <= 1.0
    flat = torch.arange(32.0).repeat(1, 3, 32, 1) / 32  # a horizontal ramp: a flip reverses it
    xf, _ = crop_flip(torch.Generator().manual_seed(1), pad=0)(flat.repeat(64, 1, 1, 1), torch.zeros(64))
    flipped = (xf[:, 0, 0, 0] > xf[:, 0, 0, -1]).float().mean()
    assert 0.25 < float(flipped) < 0.75  # about half the batch is flipped

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

    from benchmarks._common import clustered_embeddings

    x, y = clustered_embeddings(3000, dim=64, seed=1)
    assert x.shape == (3000, 64) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert set(np.unique(y).tolist()) == set(range(10))
    x2, y2 = clustered_embeddings(3000, dim=64, seed=1)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)


def test_python_m_benchmarks_runs_from_the_repository_root(tmp_path):
    """``python -m benchmarks <name>`` from the repository root reaches the same code as ``hardneg bench <name>``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the checkout itself, nothing else
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "bank", "--quick", "--sizes", "1k", "--nprobes", "1,4", "--hnsw-max", "0",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["sizes"][0]["n"] == 1000


def test_bench_outside_a_checkout_says_so_in_one_error_line(monkeypatch, capsys):
    """An installed hardneg has no benchmarks: `hardneg bench` names the fix instead of a traceback."""
    from hardneg import cli
    from hardneg.commands import bench

    monkeypatch.setattr(bench, "checkout_root", lambda: None)
    assert cli.main(["bench", "bank", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "source checkout" in err[0]
    assert "python -m benchmarks" in err[0]


def test_benchmarks_are_not_installed_with_the_package(tmp_path):
    """pyproject's package list holds hardneg and its subpackages only, never the research benchmarks."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert "hardneg" in packages and "hardneg.generators" in packages
    assert not [p for p in packages if p != "hardneg" and not p.startswith("hardneg.")], packages
    for name in ("hardneg/sub", "hardneg_tools", "benchmarks"):  # a look-alike name is not matched either
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "hardneg" / "__init__.py").write_text("")
    assert sorted(find_packages(where=str(tmp_path), include=find["include"])) == ["hardneg", "hardneg.sub"]


def test_accuracy_on_an_image_folder_with_stable_diffusion_weights(tmp_path):
    """The benchmark on a user's RGB folder with their own (here: tiny, random) SD weights by path."""
    import torch

    from benchmarks._tiny_sd import make_tiny_sd_pipeline
    from hardneg.data import save_image_folder

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("test", 3)):
        images = torch.rand(3 * n, 3, 16, 16, generator=g)
        save_image_folder(images, torch.arange(3).repeat_interleave(n).tolist(), ["cat", "dog", "fox"],
                          str(tmp_path / "data" / split))
    make_tiny_sd_pipeline(tmp_path / "sd").save_pretrained(str(tmp_path / "sd"))
    methods = ["base", "diff-mix", "hardneg"]
    data = _run_cli(["bench", "accuracy", "--quick", "--data", str(tmp_path / "data"), "--image-size", "16",
                     "--regimes", "balanced", "--methods", ",".join(methods), "--steps", "3", "--model", "test_resnet",
                     "--generator-backend", "stable-diffusion", "--generator", str(tmp_path / "sd"),
                     "--generator-steps", "2", "--images", "4", "--deterministic", "--out", str(tmp_path / "out")])
    reg = data["regimes"]["balanced"]
    assert reg["class_counts"] == [8, 8, 8] and reg["test_size"] == 9
    assert "Stable Diffusion" in reg["generator"]["what"]
    runs = {r["method"]: r for r in reg["runs"]}
    assert runs["diff-mix"]["images_kept"] == 4 and runs["hardneg"]["images_kept"] > 0
    assert len(runs["base"]["per_class"]) == 3


def test_metric_recall_and_fake_to_real_follow_the_convention(tmp_path):
    """The two method benchmarks run through `hardneg bench` and write results.json and a plot like the others."""
    data = _run_cli(["bench", "metric-recall", "--quick", "--variants", "batch", "global", "--steps", "2",
                     "--out", str(tmp_path / "mr")])
    assert set(data["summary"]) == {"batch", "global"}
    assert all(0.0 <= e["recall_unseen"] <= 1.0 for e in data["summary"].values())
    assert data["summary"]["batch"]["unseen_vs_batch"] == pytest.approx(1.0)
    data = _run_cli(["bench", "fake-to-real", "--quick", "--generator", "pca", "--variants", "erm", "two-stage",
                     "--out", str(tmp_path / "f2r")])
    assert set(data["summary"]) == {"erm", "two-stage"}
    assert data["summary"]["erm"]["worst_group_minus_erm"] == 0.0
    assert all(0.0 <= e["worst_group"] <= e["accuracy"] + 1e-9 <= 1.0 + 1e-9 for e in data["summary"].values())


def test_gpu_check_runs_on_the_cpu_and_passes_what_it_can(tmp_path):
    """`hardneg bench gpu --device cpu --quick`: every section runs tiny and passes; CUDA-only ones say why not."""
    data = _run_cli(["bench", "gpu", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    from benchmarks.gpu_bench import SECTIONS

    assert list(data["sections"]) == [s.name for s in SECTIONS]
    for name, rec in data["sections"].items():
        assert rec["status"] in ("PASS", "SLOW", "SKIP"), (name, rec.get("error"), rec.get("traceback"))
        if rec["status"] == "SKIP":
            assert "CUDA" in rec["reason"], (name, rec["reason"])  # only what needs a GPU is skipped
        else:
            assert all(rec["checks"].values()) and rec["seconds"] >= 0
    assert data["sections"]["faiss_1m"]["status"] == "SKIP"
    assert data["sections"]["sd_tiny"]["metrics"]["compile"]["recompiles"] == 0
    assert data["exit_code"] == 0 and data["counts"]["FAIL"] == 0 and data["device"] == "cpu"


def test_gpu_check_records_a_failing_section_and_goes_on(tmp_path, monkeypatch):
    """One section raising (or failing a check) is a FAIL with its error; the others still run; exit code 1."""
    from benchmarks import gpu_bench as G

    def broken(ctx):
        raise RuntimeError("deliberate")

    sections = tuple(G.Section(s.name, broken if s.name == "bank" else s.fn, s.budget_s, s.quick_budget_s)
                     for s in G.SECTIONS)
    sections += (G.Section("wrong", lambda ctx: {"checks": {"a check": False}}, 1, 1),)

    def peek(ctx):  # results.json on disk already holds every section that ran before this one
        on_disk = json.loads((tmp_path / "results.json").read_text())["sections"]
        return {"checks": {"written after each section": {"environment", "bank", "wrong"} <= set(on_disk)}}

    sections += (G.Section("peek", peek, 5, 5),)
    monkeypatch.setattr(G, "SECTIONS", sections)
    parser = build_parser()
    args = parser.parse_args(["bench", "gpu", "--device", "cpu", "--quick", "--sections", "environment,bank,engine_sync,wrong,peek",
                              "--out", str(tmp_path)])
    assert args.func(args) == 1
    data = json.loads((tmp_path / "results.json").read_text())
    secs = data["sections"]
    assert secs["bank"]["status"] == "FAIL" and "deliberate" in secs["bank"]["error"]
    assert secs["environment"]["status"] == "PASS" and secs["engine_sync"]["status"] in ("PASS", "SLOW")
    assert secs["engine_loop"]["status"] == "SKIP" and "not selected" in secs["engine_loop"]["reason"]
    assert secs["wrong"]["status"] == "FAIL" and "a check" in secs["wrong"]["error"]
    assert secs["peek"]["status"] == "PASS"
    assert data["counts"]["FAIL"] == 2 and data["exit_code"] == 1


def test_gpu_check_counts_only_this_threads_synchronising_calls(monkeypatch):
    """The sync counter of the engine section: sync warnings of this thread, none of the worker thread's."""
    import threading
    import warnings

    import torch

    from benchmarks import gpu_bench as G

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.append(mode))
    counts: dict = {}
    with G._count_syncs(counts, "mix", enabled=True):
        warnings.warn("called a synchronizing CUDA operation")
        worker = threading.Thread(target=lambda: warnings.warn("called a synchronizing CUDA operation"))
        worker.start()
        worker.join()
        warnings.warn("called a synchronizing CUDA operation")
    assert counts == {"mix": 2} and modes == ["warn", 0]
    with G._count_syncs(counts, "mix", enabled=False):
        warnings.warn("called a synchronizing CUDA operation")
    assert counts == {"mix": 2}


def test_bank_pairs_seeds_compares_the_compressed_refresh_with_exact_per_query_draw(tmp_path):
    from benchmarks import bank_pairs_seeds

    out = tmp_path / "seeds.json"
    rows = bank_pairs_seeds.main(["20k", str(out), "2", "200"])
    assert [r["seed"] for r in rows] == [0, 1] and json.loads(out.read_text()) == rows
    for r in rows:
        assert len(r["exact"]) == len(r["ivfpq"]) == 5 and r["exact_s"] > 0 and r["ivfpq_s"] > 0
        # at 20k the refresh's deep re-rank finds exact's neighbours: the same pairs, in order
        assert r["same_set"] and r["same_order"] and r["same_top3_set"]
    assert rows[0]["exact"] != rows[1]["exact"]  # another query draw, other scores
    # the code size and re-rank depths are the bench's to set (the <= 64 B setting: 16-byte codes, x256)
    small = bank_pairs_seeds.main(["20k", str(tmp_path / "pq16.json"), "1", "200", "--pq-bytes", "16",
                                   "--rerank", "256", "--refresh-rerank", "256"])
    assert small[0]["pq_bytes"] == 16 and small[0]["refresh_rerank"] == 256 and small[0]["same_top3_set"]
    # the refresh's search and its probed lists: several nprobes refresh the same bank, each judged
    probes = bank_pairs_seeds.main(["20k", str(tmp_path / "np.json"), "1", "200", "--refresh-search", "lists",
                                    "--refresh-nprobe", "4,64"])
    assert probes[0]["refresh_search"] == "lists" and probes[0]["refresh_nprobe"] == 4
    assert probes[0]["ivfpq_nprobe64_verdict"]["same_order"] and probes[0]["ivfpq_nprobe64"] == probes[0]["exact"]
