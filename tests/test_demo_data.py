"""``hardneg demo --data PATH`` on a user's image folder, and ``generate``'s generator/data check."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hardneg.cli import main
from hardneg.data import save_image_folder

pytest.importorskip("diffusers")

PLOTS = ("confusion_over_time.png", "confusion_matrix.png", "training_curves.png", "ratio_over_time.png")


def _write_folder(root, classes, per_class, channels, size=16, seed=0):
    """A tiny image folder with class structure: class c brightens rows 3c..3c+3."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(classes)).repeat_interleave(per_class)
    x = torch.rand(len(y), channels, size, size, generator=g) * 0.4
    for c in range(len(classes)):
        x[y == c, :, 3 * c : 3 * c + 3, :] += 0.6
    save_image_folder(x.clamp(0, 1), y.tolist(), classes, str(root))
    return str(root)


def _demo_args(out, data, *extra):
    return ["demo", "--data", data, "--out", out, "--epochs", "3", "--max-steps", "6", "--batch-size", "8",
            "--image-size", "16", "--model", "resnet10t", "--worker", "thread", "--refresh-every", "2",
            "--images-per-refresh", "4", "--deterministic", "--no-progress", "--seed", "0", *extra]


def test_demo_on_an_image_folder_fits_a_generator_and_runs_the_loop(tmp_path, capsys, monkeypatch):
    import hardneg.commands.fit_generator as fit_generator

    monkeypatch.setattr(fit_generator, "LOW_FIDELITY", 1.01)  # any fidelity counts as low: the warning must show
    data = _write_folder(tmp_path / "shapes", ["bar", "ring", "spot"], per_class=6, channels=1)
    out = str(tmp_path / "demo")
    assert main(_demo_args(out, data, "--fit-steps", "3", "--generator-steps", "4",
                           "--fidelity-per-class", "2")) == 0
    captured = capsys.readouterr()
    assert "3 classes (1, 16, 16)" in captured.out  # grayscale PNGs detected as 1 channel; 20% held out
    assert "fitting one on" in captured.out and "class fidelity" in captured.out
    assert "warning: class fidelity" in captured.err and "--fit-steps" in captured.err
    assert "epoch  1 | loss" in captured.out
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["generator"]["folder"] == os.path.join(out, "generator")
    assert 0.0 <= summary["generator"]["class_fidelity"] <= 1.0 and summary["generator"]["low"]
    assert summary["stats"]["requests_made"] > 0 and summary["stats"]["worker"]["failures"] == 0
    assert summary["stats"]["worker"]["images_produced"] > 0
    for name in PLOTS:
        assert os.path.getsize(os.path.join(out, name)) > 1000
    assert os.path.exists(os.path.join(out, "generator", "config.json"))


def test_demo_on_an_image_folder_with_stable_diffusion_weights(tmp_path, capsys):
    pytest.importorskip("transformers")
    from benchmarks._tiny_sd import make_tiny_sd_pipeline

    make_tiny_sd_pipeline(tmp_path).save_pretrained(tmp_path / "sd")
    root = tmp_path / "pets"
    _write_folder(root / "train", ["cat", "dog"], per_class=6, channels=3)
    _write_folder(root / "test", ["cat", "dog"], per_class=2, channels=3, seed=1)
    out = str(tmp_path / "demo")
    assert main(_demo_args(out, str(root), "--generator", "stable-diffusion", "--generator-path",
                           str(tmp_path / "sd"), "--generator-steps", "4")) == 0
    printed = capsys.readouterr().out
    assert "12 train / 4 test, 2 classes (3, 16, 16)" in printed and "Stable Diffusion from" in printed
    summary = json.load(open(os.path.join(out, "summary.json")))
    worker = summary["stats"]["worker"]
    assert worker["failures"] == 0 and worker["restarts"] == 0 and worker["images_produced"] > 0
    for name in PLOTS:
        assert os.path.getsize(os.path.join(out, name)) > 1000


def test_demo_with_a_generator_of_other_classes_fails_with_one_error_line(tmp_path, capsys):
    data = _write_folder(tmp_path / "two", ["a", "b"], per_class=4, channels=1, size=32)
    from hardneg.generators.class_conditional import default_digits_generator_path

    code = main(_demo_args(str(tmp_path / "demo"), data, "--image-size", "32", "--generator-path",
                           default_digits_generator_path()))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("error:") == 1 and "knows 10 classes" in err and "hardneg fit-generator" in err


def test_generate_refuses_a_generator_that_does_not_fit_the_data(tmp_path, capsys):
    """A 2-class folder with the shipped 10-class digits generator: one error line, exit code 2."""
    data = _write_folder(tmp_path / "two", ["a", "b"], per_class=4, channels=1, size=32)
    code = main(["generate", "--data", data, "--channels", "1", "--pairs", "a:b", "--out", str(tmp_path / "gen"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("error:")
    assert "knows 10 classes" in err and "hardneg fit-generator" in err
    assert not os.path.exists(os.path.join(tmp_path, "gen", "images"))
