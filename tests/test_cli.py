"""The command line end to end: demo (full online loop) and generate (offline ImageFolder)."""

import csv
import json
import os
import re

import pytest

from hardneg.cli import main


@pytest.fixture(scope="module")
def tiny_generator_dir(tmp_path_factory):
    """A real (untrained, small) class-conditional diffusion model saved like fit-generator does."""
    pytest.importorskip("diffusers")
    from hardneg.generators.class_conditional import ClassConditionalConfig, ClassConditionalGenerator

    cfg = ClassConditionalConfig(num_classes=10, image_size=8, block_out_channels=(16, 16), norm_num_groups=8,
                                 attention_head_dim=8, num_inference_steps=10, mid_attention=False)
    out = tmp_path_factory.mktemp("gen")
    ClassConditionalGenerator(cfg).save(str(out))
    return str(out)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in ("demo", "fit-generator", "generate", "bench"):
        assert cmd in text


def test_demo_runs_the_whole_loop_and_resumes(tmp_path, tiny_generator_dir, capsys):
    out = str(tmp_path / "demo")
    args = ["demo", "--out", out, "--epochs", "1", "--max-steps", "10", "--image-size", "16", "--generator-dir",
            tiny_generator_dir, "--no-progress", "--refresh-every", "3", "--images-per-refresh", "16", "--seed", "3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "epoch  1 | loss" in printed and "confused:" in printed and "engine" in printed
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["epochs"][0]["test_accuracy"] >= 0.0
    assert summary["stats"]["requests_made"] > 0
    assert summary["stats"]["worker"]["failures"] == 0
    for name in ("confusion_over_time.png", "confusion_matrix.png", "training_curves.png", "ratio_over_time.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000
    step = summary["stats"]["step"]
    # --resume continues the run up to --epochs; this one had finished, so it trains no further
    assert main(args + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "summary.json")))["stats"]["step"] == step


def test_generate_explicit_pairs_writes_imagefolder_csv_and_grid(tmp_path, tiny_generator_dir):
    out = str(tmp_path / "gen")
    assert main(["generate", "--generator-path", tiny_generator_dir, "--pairs", "3:8,4:9", "--ratio", "0.5",
                 "--per-pair", "3", "--out", out, "--no-progress"]) == 0
    assert sorted(os.listdir(os.path.join(out, "images"))) == ["8", "9"]  # labelled by the target
    rows = list(csv.DictReader(open(os.path.join(out, "provenance.csv"))))
    assert len(rows) == 6
    assert {(r["source_class"], r["target_class"]) for r in rows} == {("3", "8"), ("4", "9")}
    assert all(float(r["r"]) == 0.5 for r in rows)
    assert all(os.path.exists(os.path.join(out, r["file"])) for r in rows)
    assert os.path.getsize(os.path.join(out, "grid.png")) > 1000


def test_generate_auto_pairs_with_genie_ada(tmp_path, tiny_generator_dir, capsys):
    """--pairs auto mines pairs with a quick classifier; --ratio ada picks r per source from the grid."""
    out = str(tmp_path / "auto")
    assert main(["generate", "--generator-path", tiny_generator_dir, "--pairs", "auto", "--top-pairs", "2",
                 "--ratio", "ada", "--ada-grid", "0.3,0.6,0.9",
                 "--classifier-epochs", "1", "--image-size", "16", "--per-pair", "2", "--out", out,
                 "--no-progress"]) == 0
    assert "confused pairs:" in capsys.readouterr().out
    rows = list(csv.DictReader(open(os.path.join(out, "provenance.csv"))))
    assert len(rows) == 4 and all(r["source_class"] != r["target_class"] for r in rows)
    assert {float(r["r"]) for r in rows} <= {0.6, 0.9}  # Ada picks the r after a jump: never the first


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--pairs", "3:eleven"], "unknown class 'eleven'"),
        (["--pairs", "3:3"], "same source and target"),
        (["--ratio", "1.5"], r"\(0, 1\]"),
        (["--ratio", "zero"], "number in"),
    ],
)
def test_generate_rejects_bad_arguments(tmp_path, tiny_generator_dir, argv, match, capsys):
    base = ["generate", "--generator-path", tiny_generator_dir, "--out", str(tmp_path), "--pairs", "3:8"]
    assert main(base + argv) == 2  # a user error: one line, exit code 2, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(match, err[0])
    with pytest.raises(ValueError, match=match):  # --debug: the exception itself
        main(["--debug"] + base + argv)
