"""True resume: an interrupted and resumed run ends exactly where the uninterrupted run ends."""

import json
import os

import pytest
import torch

from _toy_data import striped_data
from _state_compare import state_differences
from hardneg.cli import main


@pytest.fixture(scope="module")
def tiny_generator_dir(tmp_path_factory):
    """A real (untrained, small) class-conditional diffusion model saved like fit-generator does."""
    pytest.importorskip("diffusers")
    from hardneg.generators.class_conditional import ClassConditionalConfig, ClassConditionalGenerator

    cfg = ClassConditionalConfig(num_classes=10, image_size=8, block_out_channels=(16, 16), norm_num_groups=8,
                                 attention_head_dim=8, num_inference_steps=4, mid_attention=False)
    out = tmp_path_factory.mktemp("gen")
    ClassConditionalGenerator(cfg).save(str(out))
    return str(out)


def _demo_args(out, generator_dir):
    return ["demo", "--out", out, "--epochs", "4", "--batch-size", "512", "--image-size", "16",
            "--generator-dir", generator_dir, "--no-progress", "--refresh-every", "2", "--images-per-refresh", "8",
            "--seed", "1", "--deterministic", "--worker", "thread"]


def _checkpoint(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=True)


@pytest.mark.slow  # three demo runs (about 12 training steps each); the fast loop-level twin is below
def test_demo_two_epochs_plus_resume_equals_four_epochs(tmp_path, tiny_generator_dir, capsys):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    assert main(_demo_args(whole, tiny_generator_dir)) == 0
    assert main(_demo_args(split, tiny_generator_dir) + ["--stop-after-epochs", "2"]) == 0
    half = _checkpoint(split)
    assert half["training"]["epoch"] == 2
    capsys.readouterr()
    assert main(_demo_args(split, tiny_generator_dir) + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "epoch  3 |" in printed and "epoch  1 |" not in printed

    a, b = _checkpoint(whole), _checkpoint(split)
    assert a["training"]["epoch"] == b["training"]["epoch"] == 4
    steps = a["training"]["step"]
    assert b["training"]["step"] == b["engine"]["step"] == steps == 2 * half["training"]["step"]
    # model weights, optimiser (Adam moments, step), LR schedule, data-order RNG, metrics of every epoch
    assert state_differences(a["training"], b["training"]) == []
    # engine: bank, confusion EMA and history, curriculum, buffer images + provenance + RNG, counters
    assert len(b["engine"]["buffer"]["slots"]) > 0 and b["engine"]["counters"]["synthetic_used"] > 0
    assert state_differences(a["engine"], b["engine"]) == []
    sa, sb = (json.load(open(os.path.join(d, "summary.json"))) for d in (whole, split))
    assert len(sb["epochs"]) == 4 and sb["stats"]["step"] == sa["stats"]["step"] == steps
    assert [e["test_accuracy"] for e in sa["epochs"]] == [e["test_accuracy"] for e in sb["epochs"]]
    # the engine's share of step time counts the resumed run's wall clock too (it was inflated before)
    assert sb["stats"]["wall_seconds"] >= sb["stats"]["engine_seconds"]


def test_demo_resume_refuses_other_arguments_and_finished_runs_stay_finished(tmp_path, tiny_generator_dir, capsys):
    out = str(tmp_path / "run")
    args = _demo_args(out, tiny_generator_dir) + ["--no-generation", "--max-steps", "2"]
    assert main(args) == 0
    step = _checkpoint(out)["training"]["step"]
    assert step == 2
    capsys.readouterr()
    assert main([a if a != "512" else "256" for a in args] + ["--resume"]) == 2  # a user error: one line
    err = capsys.readouterr().err
    assert "error: cannot resume" in err and "--batch-size 512 (now 256)" in err
    assert main(args + ["--resume"]) == 0  # nothing left to train: the finished run is not run again
    assert _checkpoint(out)["training"]["step"] == step
    assert json.load(open(os.path.join(out, "summary.json")))["stats"]["step"] == step


# ------------------------------------------------------------------ the reference loop + engine (fast)
from torch import nn  # noqa: E402

from _engine_generators import BlendGenerator  # noqa: E402
from hardneg import HardNeg, HardNegConfig  # noqa: E402
from hardneg.training import train  # noqa: E402


def _toy_data(n_per_class=24, k=4, seed=0):
    return striped_data(n_per_class, k, seed, alike=True)


class TinyNet(nn.Module):
    def __init__(self, k=4):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(16, k)

    def forward(self, x):
        return self.head(self.body(x))


def _engine(model, data, **kw):
    base = dict(num_classes=4, refresh_every=2, top_pairs=3, knn_k=4, sources_per_pair=6, images_per_refresh=12,
                generation_batch=4, buffer_size=64, synthetic_fraction=0.25, curriculum="adaptive",
                adaptive_min_samples=2, total_steps=24, seed=0, deterministic=True, worker_backend="thread")
    cfg = HardNegConfig(**{**base, **kw})
    return HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator(delay=0.01))


def _loop(tmp_path, name, resume_from=None, stop_after=None, **engine_kw):
    """One (part of a) run of 4 epochs x 6 steps in fresh objects, as a new process would build them."""
    data = _toy_data()
    torch.manual_seed(0)
    model = TinyNet()
    engine = _engine(model, data, **engine_kw)
    saved = {}

    def on_checkpoint(training):
        state = {"training": training, "engine": engine.state_dict()}
        torch.save(state, tmp_path / f"{name}.pt")
        saved[training["epoch"]] = state

    resume = None
    if resume_from is not None:
        state = torch.load(tmp_path / f"{resume_from}.pt", weights_only=True)
        engine.load_state_dict(state["engine"])
        resume = state["training"]
    with engine:
        train(model, data, data, engine=engine, epochs=4, batch_size=16, lr=3e-3, seed=0, progress=False,
              on_checkpoint=on_checkpoint, resume_state=resume, stop_after_epoch=stop_after)
    return saved


@pytest.mark.parametrize("engine_kw", [{}, {"teacher": "ema", "label_mode": "soft-r"}, {"curriculum": "ada"}],
                         ids=["adaptive", "ema-teacher", "ada"])
def test_train_two_epochs_plus_resume_equals_four_epochs(tmp_path, engine_kw, one_thread):
    whole = _loop(tmp_path, "whole", **engine_kw)[4]
    part = _loop(tmp_path, "part", stop_after=2, **engine_kw)
    assert sorted(part) == [1, 2]
    # the interruption fell between a refresh's requests and their hand-over: they travel in the state
    assert part[2]["engine"]["held"], "expected outstanding results in the epoch-2 state"
    resumed = _loop(tmp_path, "resumed", resume_from="part", **engine_kw)
    assert sorted(resumed) == [3, 4]
    end = resumed[4]
    assert end["training"]["step"] == whole["training"]["step"] == 24 == end["engine"]["step"]
    assert state_differences(whole["training"], end["training"]) == []  # model, optimiser, schedule, RNG, metrics
    assert state_differences(whole["engine"], end["engine"]) == []  # bank, confusion, curriculum, buffer, counters
    assert whole["engine"]["counters"]["synthetic_used"] > 0 and len(whole["engine"]["buffer"]["slots"]) > 0


def test_resume_state_from_another_schedule_is_refused(tmp_path, one_thread):
    _loop(tmp_path, "part", stop_after=1)
    state = torch.load(tmp_path / "part.pt", weights_only=True)
    data = _toy_data()
    with pytest.raises(ValueError, match="run of 24 steps, this run has 12"):
        train(TinyNet(), data, data, epochs=2, batch_size=16, progress=False, resume_state=state["training"])


def test_resumed_engine_keeps_counting_wall_time_for_engine_fraction():
    """engine_fraction = engine time / wall time: both clocks continue after a resume (the wall one did not)."""
    engine = HardNeg(HardNegConfig(num_classes=4, refresh_every=100))
    emb = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    for start in range(0, 32, 8):
        engine.observe(emb[start:start + 8], torch.arange(8) % 4, ids=torch.arange(start, start + 8))
    state = engine.state_dict()
    assert state["wall_seconds"] > 0 and state["counters"]["engine_seconds"] > 0
    resumed = HardNeg(HardNegConfig(num_classes=4, refresh_every=100))
    resumed.load_state_dict(state)
    s = resumed.stats()
    assert s["wall_seconds"] >= state["wall_seconds"]  # the clock picks up where it stopped
    assert s["engine_fraction"] <= state["counters"]["engine_seconds"] / state["wall_seconds"] + 1e-9
