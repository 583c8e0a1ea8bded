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


def test_demo_grid_shows_the_stored_negatives_of_each_row_when_the_buffer_has_free_slots():
    """The grid reads the buffer's stored samples, not slot numbers: with free slots between stored
    ones every image in a row is a stored image of that row's pair."""
    from types import SimpleNamespace

    import torch

    from hardneg.buffer import SyntheticBuffer
    from hardneg.commands.demo import _negatives_grid
    from hardneg.worker import GenerationRequest, GenerationResult

    full = SyntheticBuffer(16)
    for n, pair, first in ((6, (1, 2), 0), (5, (3, 4), 100)):
        ids = torch.arange(first, first + n)
        req = GenerationRequest(request_id=first, pair=pair, source_ids=ids, sources=None, source_labels=pair[0],
                                target_labels=pair[1], ratios=0.5, step=0)
        full.add(GenerationResult(req, ids.float().view(-1, 1, 1, 1).expand(n, 1, 4, 4).clone()), step=0)
    state = full.state_dict()  # restored with slots 0, 2, 4 free
    keep = [i for i, s in enumerate(state["slots"].tolist()) if s not in (0, 2, 4)]
    state["valid"][[0, 2, 4]] = False
    state["slots"], state["images"] = state["slots"][keep], state["images"][keep]
    buf = SyntheticBuffer(16)
    buf.load_state_dict(state)
    rows, labels = _negatives_grid(SimpleNamespace(buffer=buf, class_names=[str(c) for c in range(5)]))
    assert labels[0].startswith("3→4") and labels[1].startswith("1→2")  # most stocked pair first
    stored = [{100, 101, 102, 103, 104}, {1, 3, 5}]  # each image is filled with its source id
    for row, ids in zip(rows, stored):
        assert len(row) == len(ids)
        assert {int(img.flatten()[0]) for img in row} <= ids
        assert all(torch.all(img == img.flatten()[0]) for img in row)
