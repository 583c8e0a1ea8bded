"""The reliability table of docs/reliability.md, walked case by case.

Every row of the table (``| `case-id` | input or fault | what you get |``) has a case here with the
same id. A case does what the row says, checks what the user gets (the error type and that the
engine, buffer or file is left as promised) and returns the message or outcome the user sees; the
row must quote that fragment (``says``). So the table cannot drift: a row without a case, a case
without a row, or a message that changed fails here.
"""

import contextlib
import io
import logging
import re
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import test_checkpoint
from _engine_generators import BlendGenerator, make_result
from hardneg import HardNeg, HardNegConfig
from hardneg.checkpoint import CheckpointError, save_atomic
from hardneg.cli import main as cli_main
from hardneg.commands._args import UsageError
from hardneg.config import ConfigError
from hardneg.data import from_tensors
from hardneg.mixing import mix_batch
from hardneg.plugin import HardNegError

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
CASES: dict[str, tuple[Callable[[Path], str], str]] = {}


def case(case_id: str, says: str):
    """Register ``fn(tmp_path) -> what the user got`` under ``case_id``; ``says`` must be in it."""

    def register(fn):
        assert case_id not in CASES, case_id
        CASES[case_id] = (fn, says)
        return fn

    return register


def raised(kind, fn, *args, **kwargs) -> str:
    with pytest.raises(kind) as info:
        fn(*args, **kwargs)
    assert type(info.value) is kind, f"expected {kind.__name__}, got {type(info.value).__name__}: {info.value}"
    return str(info.value)


def _cfg(**kw):
    base = dict(num_classes=4, refresh_every=100, seed=0, label_mode="hard")
    base.update(kw)
    return HardNegConfig(**base)


def _engine(steps=2, dim=5, **kw):
    engine = HardNeg(_cfg(**kw))
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        engine.observe(torch.randn(8, dim, generator=g), torch.arange(8) % 4, ids=torch.arange(8) + 8 * step)
    return engine


def _fingerprint(engine):
    """What a rejected call must not change: step, bank, buffer slots / use counts / RNG, counters."""
    buf = engine.buffer.state_dict()
    bank = engine.bank.snapshot() if engine.bank is not None else None
    return (engine.step, None if bank is None else [torch.as_tensor(a).clone() for a in bank],
            buf["valid"].clone(), buf["meta"]["uses"].clone(), buf["rng_state"].clone(), dict(engine._counters))


def _same(a, b):
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y

    return eq(a, b)


def _with_buffer(n=6, shape=(1, 8, 8)):
    engine = _engine()
    engine.buffer.add(make_result(torch.rand(n, *shape), (0, 1), 0.5), step=0)
    return engine


# ------------------------------------------------------------------------------ checkpoints
class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@case("ckpt-malicious", says="refused to load")
def _(tmp):
    marker, path = tmp / "PWNED", tmp / "checkpoint.pt"
    state = _engine().state_dict()
    state["counters"]["observed"] = _Evil(marker)
    torch.save(state, path)
    msg = raised(CheckpointError, _engine(steps=0).load, str(path))
    assert not marker.exists() and str(path) in msg
    return msg


def _load_bad(tmp, make):
    path = tmp / "checkpoint.pt"
    make(path)
    engine = _engine()
    before = _fingerprint(engine)
    msg = raised(CheckpointError, engine.load, str(path))
    assert msg.startswith(str(path)) and _same(before, _fingerprint(engine))
    return msg


def _half(path):
    save_atomic(_engine().state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])


case("ckpt-empty", says="is empty (0 bytes)")(lambda tmp: _load_bad(tmp, lambda p: p.write_bytes(b"")))
case("ckpt-truncated", says="truncated, corrupt or not a torch file")(lambda tmp: _load_bad(tmp, _half))
case("ckpt-random", says="truncated, corrupt or not a torch file")(
    lambda tmp: _load_bad(tmp, lambda p: p.write_bytes(bytes(range(256)) * 16)))
case("ckpt-missing-keys", says="lacks ['format', 'config']")(
    lambda tmp: _load_bad(tmp, lambda p: torch.save({"model": torch.zeros(2)}, p)))
case("ckpt-missing-file", says="no such file")(lambda tmp: _load_bad(tmp, lambda p: None))


@case("ckpt-sigkill-mid-write", says="the previous checkpoint loads")
def _(tmp):
    test_checkpoint.test_sigkill_mid_write_keeps_the_previous_checkpoint_and_resume_works(tmp)
    return "the previous checkpoint loads"


@case("bench-cache-corrupt", says="rebuilding it")
def _(tmp):
    from benchmarks.accuracy_bench import _read_cache

    path = tmp / "judge.pt"
    path.write_bytes(b"\x80\x02garbage")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _read_cache(str(path), "judge weights cache") is None
    return out.getvalue()


# ------------------------------------------------------------------------------ load_state_dict
def _load_state_rejected(target, state):
    before = _fingerprint(target)
    msg = raised(HardNegError, target.load_state_dict, state)
    assert _same(before, _fingerprint(target)), "a rejected load changed the engine"
    return msg


case("state-other-embedding-dim", says="5-dimensional embeddings, this engine's are 8-dimensional")(
    lambda tmp: _load_state_rejected(_engine(dim=8), _engine(dim=5).state_dict()))
case("state-other-buffer-size", says="buffer_size=2048, this engine has 32")(
    lambda tmp: _load_state_rejected(_engine(buffer_size=32), _engine().state_dict()))
case("state-other-num-classes", says="num_classes=4, this engine has 5")(
    lambda tmp: _load_state_rejected(HardNeg(_cfg(num_classes=5)), _engine().state_dict()))


@case("state-fails-while-applied", says="the engine is unchanged")
def _(tmp):
    state = _with_buffer().state_dict()
    state["buffer"]["valid"] = torch.ones_like(state["buffer"]["valid"])  # fails after step and bank are set
    target = _engine(steps=1)
    return _load_state_rejected(target, state)


# ------------------------------------------------------------------------------ observe
def _observe_rejected(**kw):
    engine = _engine()
    before = _fingerprint(engine)
    args = dict(embeddings=torch.randn(4, 5), labels=torch.tensor([0, 1, 2, 3]), ids=torch.arange(4) + 100)
    args.update(kw)
    msg = raised(HardNegError, engine.observe, **args)
    assert _same(before, _fingerprint(engine))
    return msg


case("observe-bool-labels", says="labels are bool")(
    lambda tmp: _observe_rejected(labels=torch.tensor([True, False, True, False])))
case("observe-string-labels", says="labels must be integer class ids")(
    lambda tmp: _observe_rejected(labels=["cat", "dog", "cat", "dog"]))
case("observe-string-ids", says="ids must be integer dataset indices")(
    lambda tmp: _observe_rejected(ids=["a", "b", "c", "d"]))
case("observe-negative-ids", says="ids must be dataset indices >= 0")(
    lambda tmp: _observe_rejected(ids=torch.tensor([0, 1, -1, 3])))
case("observe-synthetic-pairs-too-long", says="synthetic_pairs has 5 pairs but the batch has only 4 rows")(
    lambda tmp: _observe_rejected(synthetic_pairs=[(0, 1)] * 5))
case("observe-nan-embeddings", says="embeddings contain NaN/inf")(
    lambda tmp: _observe_rejected(embeddings=torch.full((4, 5), float("nan"))))
case("observe-label-out-of-range", says="labels must lie in [0, 4)")(
    lambda tmp: _observe_rejected(labels=torch.tensor([0, 1, 2, 4])))


# ------------------------------------------------------------------------------ mix
def _mix_rejected(x, y=None):
    engine = _with_buffer()
    before = _fingerprint(engine)
    y = torch.arange(x.shape[0]) % 4 if y is None else y
    msg = raised(HardNegError, engine.mix, x, y)
    assert _same(before, _fingerprint(engine)), "a rejected mix moved use counts or the RNG"
    return msg


case("mix-uint8-images", says="mix() needs floating-point images")(
    lambda tmp: _mix_rejected(torch.randint(0, 255, (8, 1, 8, 8), dtype=torch.uint8)))
case("mix-wrong-channels", says="(channels: generator 1, batch 3)")(lambda tmp: _mix_rejected(torch.rand(8, 3, 8, 8)))
case("mix-wrong-size", says="per-sample shape (1, 16, 16) but the generated images are (1, 8, 8)")(
    lambda tmp: _mix_rejected(torch.rand(8, 1, 16, 16)))
case("mix-bool-targets", says="mix() needs y as integer class ids")(
    lambda tmp: _mix_rejected(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.bool)))


@case("mix-batch-uint8", says="x must be floating point")
def _(tmp):
    engine = _with_buffer()
    sample = engine.buffer.sample(2, step=0)
    return raised(ValueError, mix_batch, torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4), sample)


# ------------------------------------------------------------------------------ generator output
class _Huge(BlendGenerator):
    """Forgot to rescale: values a million times the data range (every row, or the first of each call)."""

    def __init__(self, first_only=False):
        super().__init__()
        self.first_only = first_only

    def generate(self, *args, **kwargs):
        out = super().generate(*args, **kwargs)
        if self.first_only:
            out[0] *= 1e6
            return out
        return out * 1e6


def _generate_with(generator):
    data = from_tensors(torch.rand(32, 1, 8, 8), torch.arange(32) % 4)
    cfg = _cfg(refresh_every=2, deterministic=True, knn_k=4, top_pairs=2, sources_per_pair=4,
               images_per_refresh=8, generation_batch=4)
    with HardNeg(cfg, dataset=data, generator=generator) as engine:
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            engine.observe(torch.randn(32, 5, generator=g), data.labels, ids=torch.arange(32))
        engine.wait_for_generation(timeout=60)
        return engine.stats(), len(engine.buffer)


@case("generator-out-of-range", says="images_out_of_range")
def _(tmp):
    stats, stored = _generate_with(BlendGenerator())
    assert stored > 0 and stats["images_out_of_range"] == 0  # in-range images are kept
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("hardneg.plugin").addHandler(handler)
    try:
        stats, stored = _generate_with(_Huge())
    finally:
        logging.getLogger("hardneg.plugin").removeHandler(handler)
    assert stored == 0 and stats["images_out_of_range"] == stats["images_received"] > 0
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # warned once, counted always
    stats, stored = _generate_with(_Huge(first_only=True))  # only the bad rows go
    requests = stats["worker"]["requests_completed"]
    assert requests > 0 and stats["images_out_of_range"] == requests
    assert stored == stats["images_received"] - requests
    return warnings[0]


@case("generator-nan-output", says="generator produced NaN/inf values")
def _(tmp):
    stats, stored = _generate_with(BlendGenerator(nan=True))
    worker = stats["worker"]
    assert stored == 0 and worker["failures"] > 0 and stats["images_received"] == 0
    return worker["last_error"]


# ------------------------------------------------------------------------------ config
@case("config-changed-after-construction", says="read-only after construction")
def _(tmp):
    cfg = _cfg()

    def assign():
        cfg.refresh_every = 0

    msg = raised(ConfigError, assign)
    assert cfg.refresh_every == 100 and cfg.replace(refresh_every=7).refresh_every == 7
    return msg


case("config-invalid-value", says="refresh_every must be an integer >= 1")(
    lambda tmp: raised(ConfigError, _cfg, refresh_every=0))


# ------------------------------------------------------------------------------ CLI
def _cli(argv):
    """(exit code, stderr) of ``hardneg argv`` run in this process."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli_main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, err.getvalue()


def _cli_error(argv):
    rc, err = _cli(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "error:" in lines[0], (rc, err)
    return lines[0]


def _cli_case(case_id, says, argv):
    case(case_id, says)(lambda tmp: _cli_error([a.replace("{tmp}", str(tmp)) for a in argv]))


_cli_case("cli-per-pair-0", "argument --per-pair: must be an integer >= 1, got 0",
          ["generate", "--out", "{tmp}/o", "--per-pair", "0"])
_cli_case("cli-batch-size-0", "argument --batch-size: must be an integer >= 1, got 0",
          ["generate", "--out", "{tmp}/o", "--batch-size", "0"])
_cli_case("cli-image-size-0", "argument --image-size: must be an integer >= 1, got 0",
          ["generate", "--out", "{tmp}/o", "--image-size", "0"])
_cli_case("cli-demo-batch-size-0", "argument --batch-size: must be an integer >= 1, got 0",
          ["demo", "--out", "{tmp}/o", "--batch-size", "0"])
_cli_case("cli-ada-grid-not-numbers", "argument --ada-grid: must be comma-separated numbers",
          ["generate", "--out", "{tmp}/o", "--ada-grid", "0.5,abc"])
_cli_case("cli-device-missing", "argument --device: 'cuda:99'",
          ["generate", "--out", "{tmp}/o", "--device", "cuda:99"])
_cli_case("cli-user-error", "error: --ratio must lie in (0, 1], got 2.0",
          ["generate", "--out", "{tmp}/o", "--ratio", "2"])


@case("cli-debug", says="--ratio must lie in (0, 1]")
def _(tmp):
    return raised(UsageError, cli_main, ["--debug", "generate", "--out", str(tmp / "o"), "--ratio", "2"])


@case("cli-resume-bad-checkpoint", says="checkpoint.pt: is empty (0 bytes)")
def _(tmp):
    (tmp / "checkpoint.pt").write_bytes(b"")
    return _cli_error(["demo", "--out", str(tmp), "--resume", "--no-generation", "--epochs", "1", "--max-steps", "1",
                       "--image-size", "8", "--no-progress"])


# ------------------------------------------------------------------------------ hung generators, resume
@case("worker-hung-generator", says="request 0 exceeded the 0.5 s request_timeout")
def _(tmp):
    import threading

    import _fake_generators as fakes
    from hardneg.worker import GenerationRequest, GenerationWorker

    release = threading.Event()
    w = GenerationWorker(lambda: fakes.HangingGenerator(release), request_timeout=0.5, max_restarts=1)
    try:
        w.submit(GenerationRequest(0, (3, 8), torch.arange(2), torch.rand(2, 1, 8, 8), 3, 8, 0.5))
        deadline = time.monotonic() + 60
        while w.stats()["timeouts"] == 0:
            assert time.monotonic() < deadline, "the deadline was never enforced"
            time.sleep(0.01)
        st = w.stats()
        assert st["failures"] == 1 and st["restarts"] == 1 and st["alive"]
        return st["last_error"]
    finally:
        w.close()
        release.set()


@case("cli-resume-old-checkpoint", says="was written by an older hardneg demo")
def _(tmp):
    save_atomic({"engine": {}, "model": {}, "epoch": 1}, tmp / "checkpoint.pt")  # engine-only, no optimiser
    return _cli_error(["demo", "--out", str(tmp), "--resume", "--no-generation", "--epochs", "1", "--max-steps", "1",
                       "--image-size", "8", "--no-progress"])


# ------------------------------------------------------------------------------ the walk
@pytest.mark.parametrize("case_id", list(CASES))
def test_reliability_case(case_id, tmp_path):
    fn, says = CASES[case_id]
    got = fn(tmp_path)
    assert says in got, f"{case_id}: expected {says!r} in {got!r}"


def _doc_rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\|\s*`([a-z0-9-]+)`\s*\|", line)
        if m:
            assert m.group(1) not in rows, f"row {m.group(1)} twice in {DOC.name}"
            rows[m.group(1)] = line
    return rows


def test_the_doc_table_and_these_cases_match():
    rows = _doc_rows()
    assert sorted(rows) == sorted(CASES), (
        f"rows without a case: {sorted(set(rows) - set(CASES))}; cases without a row: {sorted(set(CASES) - set(rows))}")
    for case_id, (_, says) in CASES.items():
        assert says in rows[case_id], f"docs/reliability.md row {case_id} must quote {says!r}"
