"""``hardneg fit-generator`` end to end with tiny settings, plus the judge's boundary-band logic."""

from __future__ import annotations

import json

import pytest
import torch

from hardneg.cli import build_parser, main
from hardneg.judge import BoundaryCurve

pytest.importorskip("diffusers")

TINY = ["--steps", "3", "--batch-size", "16", "--image-size", "8", "--block-channels", "8,16",
        "--inference-steps", "4", "--judge-epochs", "1", "--fidelity-per-class", "2",
        "--boundary-sources", "2", "--no-progress", "--threads", "1"]


def test_fit_generator_is_registered():
    help_text = build_parser().format_help()
    assert "fit-generator" in help_text


def test_fit_generator_on_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "gen"
    rc = main(["fit-generator", "--data", "digits", "--out", str(out), "--pair", "3,8", "--data-size", "16",
               *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "class fidelity:" in printed and "boundary band" in printed
    assert (out / "unet.safetensors").is_file() and (out / "config.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["class_fidelity"] <= 1.0
    assert len(report["class_fidelity_per_class"]) == 10
    assert report["pair"] == [3, 8]
    assert [row["r"] for row in report["boundary"]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
    for row in report["boundary"]:
        assert 0.0 <= row["p_target"] <= 1.0 and 0.0 <= row["p_source"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["image_size"] == 8 and config["config"]["block_out_channels"] == [8, 16]
    assert config["training"]["steps"] == 3
    assert config["training"]["command"].startswith("hardneg fit-generator")

    from hardneg.generators import load_generator

    gen = load_generator("class-conditional", str(out))
    x = torch.rand(2, 1, 32, 32)  # any size: resized to the generator's 8 px and back
    assert gen.generate(x, torch.tensor([3, 3]), torch.tensor([8, 8]), 0.5, seed=0).shape == x.shape


def test_fit_generator_on_an_rgb_image_folder(tmp_path):
    from hardneg.data import save_image_folder

    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 12, 12, generator=g)
    save_image_folder(images, [0, 0, 0, 0, 1, 1, 1, 1], ["cat", "dog"], str(tmp_path / "data"))
    out = tmp_path / "gen"
    rc = main(["fit-generator", "--data", str(tmp_path / "data"), "--out", str(out), "--channels", "3",
               "--data-size", "12", *TINY, "--block-channels", "12,24"])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["in_channels"] == 3 and config["num_classes"] == 2
    assert config["block_out_channels"] == [12, 24] and config["norm_num_groups"] == 12
    assert json.loads((out / "report.json").read_text())["pair"] == [0, 1]


@pytest.mark.parametrize("extra,message", [
    (["--pair", "3,3"], "--pair"),
    (["--pair", "3"], "--pair"),
    (["--channels", "3"], "1 channel"),
    (["--block-channels", "8,x"], "--block-channels"),
    (["--image-size", "9"], "divisible"),
])
def test_fit_generator_bad_options_fail_with_a_message(tmp_path, capsys, extra, message):
    rc = main(["fit-generator", "--data", "digits", "--out", str(tmp_path / "g"), *TINY, *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_fit_generator_missing_folder_fails_cleanly(tmp_path, capsys):
    rc = main(["fit-generator", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "g"), *TINY])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


def test_flip_band_brackets_where_the_target_takes_over():
    curve = BoundaryCurve(3, 8, [0.1, 0.2, 0.3, 0.5], p_target=[0.05, 0.3, 0.7, 0.95],
                          p_source=[0.9, 0.6, 0.2, 0.02])
    assert curve.flip_band() == (0.2, 0.3)
    assert curve.flip_band(threshold=0.9) == (0.3, 0.5)
    assert BoundaryCurve(3, 8, [0.1, 0.2], [0.6, 0.9], [0.3, 0.1]).flip_band() == (0.0, 0.1)
    assert BoundaryCurve(3, 8, [0.1, 0.2], [0.1, 0.2], [0.8, 0.7]).flip_band() is None
    assert "P(target)" in curve.format()
