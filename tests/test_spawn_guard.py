"""A process worker started from unguarded module-level code of a script fails with an error that
names the fix, instead of the child dying with multiprocessing's bootstrapping RuntimeError."""

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from _fake_generators import FakeGenerator
from hardneg._spawn import SpawnGuardError, _inside_main_guard
from hardneg.worker import GenerationWorker

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import torch
from hardneg import HardNeg, HardNegConfig
from hardneg.data import from_tensors


def blend_factory():
    from hardneg.generators.base import as_ratio_tensor

    class Blend:
        num_classes = 2

        def generate(self, sources, source_labels, target_labels, ratios, seed=None):
            as_ratio_tensor(ratios, sources.shape[0])
            return sources

    return Blend()


data = from_tensors(torch.rand(8, 1, 4, 4), torch.arange(8) % 2)
cfg = HardNegConfig(num_classes=2, worker_backend="process")
{body}
"""

UNGUARDED = "engine = HardNeg(cfg, dataset=data, generator=blend_factory)\nengine.close()\nprint('done')"
GUARDED = ("if __name__ == '__main__':\n"
           "    engine = HardNeg(cfg, dataset=data, generator=blend_factory)\n"
           "    print('alive', engine.worker.alive)\n"
           "    engine.close()\n"
           "    print('done')")


def _run(tmp_path, body):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(body=body))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_unguarded_module_level_process_worker_fails_naming_the_fix(tmp_path):
    out = _run(tmp_path, UNGUARDED)
    assert out.returncode != 0 and "done" not in out.stdout
    assert "SpawnGuardError" in out.stderr
    assert 'if __name__ == "__main__":' in out.stderr and "train.py:" in out.stderr
    assert "bootstrapping phase" not in out.stderr  # no child was spawned to die


def test_guarded_script_starts_its_process_worker(tmp_path):
    out = _run(tmp_path, GUARDED)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "alive True" in out.stdout and "done" in out.stdout


def test_a_child_importing_the_script_gets_the_same_advice(monkeypatch):
    """In the spawned child (bootstrapping: ``_inheriting``), a second start names the fix too."""
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    worker = GenerationWorker(FakeGenerator, backend="process")
    with pytest.raises(SpawnGuardError, match="__name__"):
        worker.start()
    worker.close()


def test_guard_detection_reads_the_script_source():
    import ast

    src = textwrap.dedent("""
        x = 1
        if __name__ == "__main__":
            y = 2
            z = 3
        if "__main__" == __name__ and True:
            w = 4
        if __name__ != "__main__":
            v = 5
    """)
    tree = ast.parse(src)
    lines = {i + 1: text.strip() for i, text in enumerate(src.splitlines())}
    inside = {lines[n] for n in lines if lines[n] and _inside_main_guard(tree, n)}
    assert inside == {"y = 2", "z = 3", "w = 4"}


def test_a_package_main_run_with_dash_m_is_not_flagged(tmp_path, monkeypatch):
    """``python -m package`` runs ``package/__main__.py``, which spawn never re-runs in the child
    (multiprocessing skips ``*.__main__`` modules): no error there, while the same unguarded code
    as a plain script is refused."""
    import importlib.machinery
    import sys
    import types

    from hardneg._spawn import SpawnGuardError, check_spawn_safe

    script = tmp_path / "__main__.py"
    script.write_text("check_spawn_safe()\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    main.check_spawn_safe = check_spawn_safe
    monkeypatch.setitem(sys.modules, "__main__", main)
    code = compile(script.read_text(), str(script), "exec")
    main.__spec__ = importlib.machinery.ModuleSpec("pkg.__main__", None)
    exec(code, main.__dict__)  # run as `python -m pkg`: allowed
    main.__spec__ = None
    with pytest.raises(SpawnGuardError, match="module level"):
        exec(code, main.__dict__)  # run as `python pkg/__main__.py`: refused
