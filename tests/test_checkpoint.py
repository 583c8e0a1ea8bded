"""Checkpoint files: atomic writes survive SIGKILL, loads never run code, bad files give one error."""

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hardneg import HardNeg, HardNegConfig
from hardneg.checkpoint import CheckpointError, load_safe, save_atomic

WRITER = Path(__file__).with_name("_checkpoint_writer.py")
DEADLINE = 60.0


class _Evil:
    """Unpickling this would create the marker file (what an attacker's checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _engine(steps=3, seed=0):
    engine = HardNeg(HardNegConfig(num_classes=4, refresh_every=100, seed=0))
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        engine.observe(torch.randn(8, 5, generator=g), torch.arange(8) % 4, ids=torch.arange(8) + 8 * step)
    return engine


def test_save_atomic_round_trips_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic({"x": torch.arange(5), "name": "a", "n": 3, "nested": [{"r": 0.5}]}, path)
    save_atomic({"x": torch.arange(6), "name": "b", "n": 4, "nested": []}, path)  # replaces
    got = load_safe(path, keys=("x", "name"))
    assert got["name"] == "b" and torch.equal(got["x"], torch.arange(6))
    assert os.listdir(tmp_path) == ["ck.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # what torch.save would give, not private 0o600


def test_failed_save_keeps_the_previous_file_and_no_temp_file(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic({"v": 1}, path)
    with pytest.raises(Exception):
        save_atomic({"v": lambda: 2}, path)  # a lambda cannot be pickled: the write fails part-way
    assert load_safe(path)["v"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_malicious_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "checkpoint.pt"
    state = _engine().state_dict()
    state["counters"]["observed"] = _Evil(marker)  # a real engine state with one poisoned value
    torch.save(state, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to load.*arbitrary code") as info:
        _engine(steps=0).load(str(path))
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="refused"):
        load_safe(path)
    assert not marker.exists()
    # the same object does run under the unsafe load the engine used before: the test can see an attack
    torch.load(path, weights_only=False)
    assert marker.exists()


def _truncated(path):
    save_atomic(_engine().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b""), "is empty"),
    (_truncated, "truncated, corrupt or not a torch file"),
    (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "truncated, corrupt or not a torch file"),
    (lambda p: p.write_bytes(pickle.dumps({"config": {}})), "truncated, corrupt or not a torch file"),
    (lambda p: torch.save({"weights": torch.zeros(2)}, p), r"lacks \['format', 'config'\]"),
    (lambda p: torch.save([1, 2], p), "holds a list"),
    (lambda p: p.mkdir(), "is a folder"),
], ids=["missing", "empty", "truncated", "random", "plain-pickle", "missing-keys", "not-a-dict", "folder"])
def test_unusable_checkpoint_gives_one_error_naming_the_file(tmp_path, make, match):
    path = tmp_path / "checkpoint.pt"
    make(path)
    engine = _engine(steps=2)
    before = engine.state_dict()
    with pytest.raises(CheckpointError, match=match) as info:
        engine.load(str(path))
    assert info.value.path == str(path) and str(info.value).startswith(str(path))
    assert engine.step == before["step"] == 2  # nothing was applied


def test_state_that_does_not_fit_the_engine_names_the_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _engine().save(str(path))
    other = HardNeg(HardNegConfig(num_classes=5, refresh_every=100))
    with pytest.raises(CheckpointError, match="does not fit this engine.*num_classes=4"):
        other.load(str(path))


def _kill_once_writing(proc, started):
    """SIGKILL ``proc`` as soon as ``started()`` says its write is under way (generous deadline)."""
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if started():
            proc.send_signal(signal.SIGKILL)
            proc.wait(DEADLINE)
            return
        if proc.poll() is not None:
            pytest.fail(f"writer exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"no temporary checkpoint file appeared within {DEADLINE} s")


def _start_writer(path, mode):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, str(WRITER), str(path), mode], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkill_mid_write_keeps_the_previous_checkpoint_and_resume_works(tmp_path):
    path = tmp_path / "checkpoint.pt"
    good = _engine(steps=3)
    good.save(str(path))
    proc = _start_writer(path, "engine")  # observes 6 steps, then writes half the file and hangs
    _kill_once_writing(proc, lambda: Path(f"{path}.started").exists())
    assert proc.returncode == -signal.SIGKILL
    resumed = _engine(steps=0)
    resumed.load(str(path))  # the last good checkpoint, whole
    assert resumed.step == 3
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
               for a, b in zip(resumed.bank.snapshot(), good.bank.snapshot()))


def test_sigkill_during_repeated_writes_always_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"generation": 0, "payload": torch.zeros(4)}, path)
    proc = _start_writer(path, "loop")  # rewrites a 16 MB checkpoint as fast as it can

    def temp_file_written():
        return any(f.exists() and f.stat().st_size > 0 for f in tmp_path.glob(f".{path.name}.*.tmp"))

    _kill_once_writing(proc, temp_file_written)
    got = load_safe(path, keys=("generation", "payload"))
    assert bool((got["payload"] == got["generation"]).all())  # old or new, never a mix or a stub
