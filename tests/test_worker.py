"""GenerationWorker: results, never blocking, drop-oldest, failure isolation, restarts, shutdown.

Thread-backend tests are fast; each process-backend test spawns children (a fresh interpreter
importing torch, ~2-3 s each), so the process tests bundle several checks per child.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time
from typing import Callable

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _fake_generators as fakes  # noqa: E402  (importable by name: the spawn child unpickles it)

from hardneg import worker as worker_mod  # noqa: E402
from hardneg.worker import GenerationRequest, GenerationResult, GenerationWorker  # noqa: E402


def make_request(i: int, n: int = 2, pair: tuple[int, int] = (3, 8), r: float = 0.5) -> GenerationRequest:
    g = torch.Generator().manual_seed(i)
    return GenerationRequest(
        request_id=i, pair=pair, source_ids=torch.arange(n) + 100 * i,
        sources=torch.rand(n, 1, 8, 8, generator=g), source_labels=pair[0], target_labels=pair[1],
        ratios=r, step=10 * i, seed=i,
    )


def wait_until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``cond``; the timeout only keeps a broken worker from hanging the suite."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the safety timeout")
        time.sleep(0.01)


def collect(worker: GenerationWorker, settled: int, timeout: float = 60.0) -> list[GenerationResult]:
    """Poll until ``settled`` requests are done with (result, failure, drop); returns the results."""
    out: list[GenerationResult] = []

    def done() -> bool:
        out.extend(worker.poll())
        st = worker.stats()
        finished = st["requests_completed"] + st["failures"] + st["requests_dropped"] + st["requests_lost"]
        return finished >= settled and st["results_ready"] == 0

    wait_until(done, timeout)
    return out


def worker_threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix) and t.is_alive()]


def worker_children(prefix: str) -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith(prefix)]


def check_result(res: GenerationResult) -> None:
    req = make_request(res.request_id)
    assert res.request.sources is None  # provenance only, no source images carried around
    assert res.pair == (3, 8) and res.step == req.step and res.seed == req.seed
    assert torch.equal(res.source_ids, req.source_ids)
    assert res.target_labels.tolist() == [8, 8] and res.source_labels.tolist() == [3, 3]
    assert res.images.device.type == "cpu" and res.images.dtype == torch.float32
    expected = fakes.expected_images(req.sources, req.target_labels, req.ratios)
    torch.testing.assert_close(res.images, expected)
    assert res.seconds >= 0 and res.queue_wait >= 0


# ============================================================================ thread backend
def test_thread_worker_returns_results_with_provenance() -> None:
    with GenerationWorker(fakes.FakeGenerator, name="hn-t-basic") as w:
        assert w.alive
        for i in range(3):
            assert w.submit(make_request(i))
        results = collect(w, 3)
        assert sorted(r.request_id for r in results) == [0, 1, 2]
        for res in results:
            check_result(res)
        st = w.stats()
        assert st["requests_submitted"] == 3 and st["requests_completed"] == 3
        assert st["images_produced"] == 6 and st["failures"] == 0 and st["requests_dropped"] == 0
        assert st["state"] == "running" and st["images_per_s"] > 0
        # max_items hands results out in order, the rest stay for the next poll
        for i in range(3, 6):
            w.submit(make_request(i))
        wait_until(lambda: w.stats()["results_ready"] == 3)
        first = w.poll(max_items=1)
        rest = w.poll()
        assert [r.request_id for r in first + rest] == [3, 4, 5]


def test_submit_and_poll_never_wait_for_a_slow_generator() -> None:
    """Events, not clocks: every submit and poll returns while the generator cannot finish at all."""
    steps, n = 30, 4
    received = 0
    gate, started = threading.Event(), threading.Event()
    blocked = functools.partial(fakes.GatedGenerator, gate, started)  # finishes only once the gate opens
    with GenerationWorker(blocked, queue_size=4, name="hn-t-slow") as w:
        done = 0
        for step in range(steps):
            assert w.submit(make_request(step, n=n))
            received += sum(len(r) for r in w.poll())
            done += 1
        st = w.stats()
        gate.set()
    assert done == steps
    # Had submit or poll waited for generation, no step would have finished with the gate shut.
    assert st["images_produced"] == 0 and received == 0
    assert st["requests_dropped"] > 0 and st["requests_queued"] <= 4
    # every request is accounted for
    assert st["requests_submitted"] == (
        st["requests_completed"] + st["failures"] + st["requests_dropped"] + st["requests_queued"]
        + st["requests_in_flight"] + st["requests_lost"]
    )


def test_full_queue_drops_the_oldest_pending_request() -> None:
    gate, started = threading.Event(), threading.Event()
    factory = functools.partial(fakes.GatedGenerator, gate, started)
    with GenerationWorker(factory, queue_size=3, name="hn-t-drop") as w:
        w.submit(make_request(0))
        assert started.wait(30)  # the worker is busy with request 0
        for i in range(1, 6):
            assert w.submit(make_request(i))  # 1 and 2 are pushed out by 4 and 5
        st = w.stats()
        assert st["requests_dropped"] == 2 and st["requests_queued"] == 3 and st["requests_in_flight"] == 1
        gate.set()
        results = collect(w, 4)
    assert [r.request_id for r in results] == [0, 3, 4, 5]


def test_raising_generator_is_isolated_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hardneg.worker")
    factory = functools.partial(fakes.FakeGenerator, fail_every=3)
    with GenerationWorker(factory, queue_size=16, name="hn-t-raise") as w:
        for i in range(9):
            w.submit(make_request(i))
        results = collect(w, 9)
        st = w.stats()
        assert w.alive
    assert sorted(r.request_id for r in results) == [0, 1, 3, 4, 6, 7]
    assert st["failures"] == 3 and st["crashes"] == 0 and st["restarts"] == 0
    assert "fake generator failure" in st["last_error"]
    logged = " ".join(rec.getMessage() for rec in caplog.records)
    for rid in (2, 5, 8):
        assert f"request {rid} failed" in logged
    assert "pair (3, 8)" in logged


@pytest.mark.parametrize(
    "factory, error",
    [
        (functools.partial(fakes.FakeGenerator, nan_every=2), "NaN"),
        (fakes.WrongShapeGenerator, "shape"),
    ],
)
def test_unusable_output_never_comes_out_of_poll(factory: Callable, error: str) -> None:
    with GenerationWorker(factory, name="hn-t-nan") as w:
        for i in range(6):
            w.submit(make_request(i))
        results = collect(w, 6)
        st = w.stats()
    for res in results:
        assert torch.isfinite(res.images).all() and res.images.shape == (2, 1, 8, 8)
    expected_ok = 3 if error == "NaN" else 0
    assert len(results) == expected_ok and st["failures"] == 6 - expected_ok
    assert error in st["last_error"]


def test_dead_thread_is_restarted_then_reported_failed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="hardneg.worker")
    dies = functools.partial(fakes.FakeGenerator, die_on_call=1)
    w = GenerationWorker(dies, max_restarts=2, name="hn-t-die")
    try:
        for i in range(3):  # one death at a time: restart 1 of 2, restart 2 of 2, then it gives up
            assert not w.failed and w.submit(make_request(i))  # every new thread dies on its first request
            wait_until(lambda: (w.poll(), w.stats()["crashes"] > i)[1])
            assert (w.stats()["restarts"], w.failed) == (min(i + 1, 2), i == 2), w.stats()
        st = w.stats()
        assert st["crashes"] == 3 and st["restarts"] == 2
        assert st["state"] == "failed" and not st["alive"] and not w.alive
        assert "SystemExit" in st["last_error"]
        assert w.poll() == [] and w.submit(make_request(99)) is False
        assert any("gave up" in rec.getMessage() for rec in caplog.records)
    finally:
        w.close()
    assert worker_threads("hn-t-die") == []


def test_factory_that_cannot_build_fails_after_restarts() -> None:
    with GenerationWorker(fakes.failing_factory, max_restarts=1, name="hn-t-fact") as w:
        wait_until(lambda: (w.poll(), w.stats()["crashes"] >= 2)[1])  # not w.failed: a broken counter never fails
        st = w.stats()
    assert st["crashes"] == 2 and st["restarts"] == 1 and st["state"] == "failed"
    assert "FileNotFoundError" in st["last_error"]


def test_close_leaves_no_thread_even_after_keyboard_interrupt() -> None:
    with pytest.raises(KeyboardInterrupt):
        with GenerationWorker(functools.partial(fakes.FakeGenerator, delay=0.2), name="hn-t-ki") as w:
            for i in range(5):
                w.submit(make_request(i))
            wait_until(lambda: w.stats()["requests_in_flight"] == 1)
            raise KeyboardInterrupt
    assert worker_threads("hn-t-ki") == []
    assert w.stats()["state"] == "closed" and not w.alive
    w.close()  # twice is fine
    assert w.submit(make_request(9)) is False and w.poll() == []
    GenerationWorker(fakes.FakeGenerator).close()  # never started: nothing to do


def test_exit_safety_net_closes_forgotten_workers() -> None:
    w = GenerationWorker(fakes.FakeGenerator, name="hn-t-atexit").start()
    assert worker_threads("hn-t-atexit")
    worker_mod._close_all_workers()  # what atexit runs
    assert worker_threads("hn-t-atexit") == [] and w.stats()["state"] == "closed"


def test_requests_are_validated() -> None:
    with pytest.raises(ValueError, match="source images"):
        GenerationRequest(0, (1, 2), torch.arange(3), torch.rand(2, 1, 4, 4), 1, 2, 0.5)
    with pytest.raises(ValueError, match="ratio"):
        GenerationRequest(0, (1, 2), torch.arange(2), torch.rand(2, 1, 4, 4), 1, 2, 1.5)
    with pytest.raises(ValueError, match="target_labels"):
        GenerationRequest(0, (1, 2), torch.arange(2), torch.rand(2, 1, 4, 4), 1, [2, 2, 2], 0.5)
    w = GenerationWorker(fakes.FakeGenerator)
    with pytest.raises(ValueError, match="source images"):
        w.submit(make_request(0).without_sources())
    with pytest.raises(ValueError):
        GenerationWorker(fakes.FakeGenerator, backend="fork")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GenerationWorker(fakes.FakeGenerator, queue_size=0)


def test_result_select_keeps_rows_and_provenance_together() -> None:
    req = make_request(1, n=4)
    res = GenerationResult(req.without_sources(), torch.arange(4.0).view(4, 1, 1, 1))
    sub = res.select([3, 1])
    assert sub.images.flatten().tolist() == [3.0, 1.0]
    assert sub.source_ids.tolist() == [req.source_ids[3].item(), req.source_ids[1].item()]
    assert len(sub) == 2 and sub.request_id == 1 and sub.pair == (3, 8)


# ============================================================================ process backend
def test_process_backend_needs_a_picklable_factory() -> None:
    w = GenerationWorker(lambda: fakes.FakeGenerator(), backend="process")
    with pytest.raises(TypeError, match="picklable"):
        w.start()
    w.close()


def test_process_worker_results_failures_and_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    """One child: correct results, raise/NaN isolation, then an interrupted close, no orphans."""
    caplog.set_level(logging.WARNING, logger="hardneg.worker")
    factory = functools.partial(fakes.FakeGenerator, fail_every=3, nan_every=5)
    # calls 3 and 6 raise, call 5 returns NaN: requests 2, 4 and 5 fail
    with pytest.raises(KeyboardInterrupt):
        with GenerationWorker(factory, backend="process", queue_size=16, name="hn-p-main") as w:
            for i in range(8):
                assert w.submit(make_request(i))
            assert len(worker_children("hn-p-main")) == 1
            # the receiver thread reads results off the pipe by itself: poll() only pops them
            wait_until(lambda: any(m[0] == "ok" for m in list(w._inbox)), timeout=120)
            results = collect(w, 8, timeout=120)
            assert sorted(r.request_id for r in results) == [0, 1, 3, 6, 7]
            for res in results:
                check_result(res)
            st = w.stats()
            assert st["failures"] == 3 and st["crashes"] == 0 and st["alive"]
            assert st["images_produced"] == 10
            logged = " ".join(rec.getMessage() for rec in caplog.records)
            assert "request 2 failed" in logged and "request 5 failed" in logged and "NaN" in logged
            # interrupt the loop while the child is busy: close() must still stop it
            w_slow_reqs = [make_request(i) for i in range(8, 12)]
            for req in w_slow_reqs:
                w.submit(req)
            raise KeyboardInterrupt
    assert worker_children("hn-p-main") == []
    assert worker_threads("hn-p-main") == []
    assert w.stats()["state"] == "closed"
    w.close()


def test_process_that_dies_is_restarted_then_reported_failed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="hardneg.worker")
    factory = functools.partial(fakes.FakeGenerator, exit_on_call=1)  # os._exit in the child
    w = GenerationWorker(factory, backend="process", max_restarts=1, name="hn-p-exit")
    try:
        for i in range(2):  # one death at a time: restart 1 of 1, then it gives up
            assert not w.failed and w.submit(make_request(i))
            wait_until(lambda: (w.poll(), w.stats()["crashes"] > i)[1], timeout=120)
            assert (w.stats()["restarts"], w.failed) == (1, i == 1), w.stats()
        st = w.stats()
        assert st["crashes"] == 2 and st["restarts"] == 1 and st["failed"] and not st["alive"]
        assert "exit" in st["last_error"] and "3" in st["last_error"]
        assert st["requests_lost"] >= 2
        assert w.poll() == [] and w.submit(make_request(0)) is False
        assert worker_children("hn-p-exit") == []  # dead children were reaped
        assert sum("restart 1 of 1" in r.getMessage() for r in caplog.records) == 1
    finally:
        w.close()
    assert worker_children("hn-p-exit") == []


def test_process_factory_failure_is_reported() -> None:
    with GenerationWorker(fakes.failing_factory, backend="process", max_restarts=0, name="hn-p-fact") as w:
        wait_until(lambda: (w.poll(), w.failed)[1], timeout=120)
        st = w.stats()
    assert st["crashes"] == 1 and "FileNotFoundError" in st["last_error"]
    assert worker_children("hn-p-fact") == []


@pytest.mark.slow
def test_interpreter_exit_without_close_leaves_no_orphan(tmp_path: pathlib.Path) -> None:
    """A script that forgets close(): it must still exit promptly and take its child with it."""
    script = tmp_path / "forgets_close.py"
    script.write_text(textwrap.dedent(f"""
        import functools, sys, time
        sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parent)!r})
        import torch
        import _fake_generators as fakes
        from hardneg.worker import GenerationRequest, GenerationWorker

        if __name__ == "__main__":
            w = GenerationWorker(functools.partial(fakes.FakeGenerator, delay=0.5), backend="process")
            w.submit(GenerationRequest(0, (3, 8), torch.arange(2), torch.rand(2, 1, 8, 8), 3, 8, 0.5))
            while w.stats()["requests_in_flight"] == 0 or not w.alive:
                time.sleep(0.05)
            print(w._proc.pid, flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    wait_until(lambda: _pid_gone(pid), timeout=60)


# ============================================================================ hung generators, orphans
def _pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for a reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def test_hung_thread_generator_fails_its_request_and_is_replaced() -> None:
    release = threading.Event()
    w = GenerationWorker(lambda: fakes.HangingGenerator(release), backend="thread", max_restarts=1,
                         request_timeout=0.5, name="hn-t-hang")
    try:
        w.start()
        w.submit(make_request(0))
        wait_until(lambda: w.stats()["timeouts"] == 1)
        st = w.stats()
        assert st["failures"] == 1 and st["restarts"] == 1 and st["alive"] and not st["failed"]
        assert "request 0 exceeded the 0.5 s request_timeout" in st["last_error"]
        assert "abandoned" in st["last_error"] and st["abandoned_threads"] == 1
        w.submit(make_request(1))  # the replacement hangs too: the budget runs out, generation is off
        wait_until(lambda: w.stats()["failed"])
        st = w.stats()
        assert st["timeouts"] == 2 and st["restarts"] == 1 and st["failures"] == 2
        assert w.submit(make_request(2)) is False
    finally:
        t0 = time.monotonic()
        w.close(timeout=60)
        closed_in = time.monotonic() - t0
        release.set()  # let the abandoned threads end (they discard their result and exit)
    assert closed_in < 30, "close() must not wait on a hung thread"
    wait_until(lambda: worker_threads("hn-t-hang") == [])


def test_close_does_not_wait_past_a_running_requests_deadline() -> None:
    release = threading.Event()
    w = GenerationWorker(lambda: fakes.HangingGenerator(release), backend="thread", request_timeout=1.0,
                         name="hn-t-close")
    try:
        w.submit(make_request(0))
        wait_until(lambda: w.stats()["running_for_s"] is not None)
        t0 = time.monotonic()
        w.close(timeout=60)  # the request is hung: close() gives up at its deadline, not after 60 s
        assert time.monotonic() - t0 < 30
        assert w.stats()["state"] == "closed"
    finally:
        release.set()
    wait_until(lambda: worker_threads("hn-t-close") == [])


def test_hung_process_generator_is_killed_and_restarted_within_the_budget() -> None:
    w = GenerationWorker(fakes.hanging_factory, backend="process", max_restarts=1, request_timeout=1.0,
                         name="hn-p-hang")
    try:
        w.start()
        w.submit(make_request(0))
        wait_until(lambda: w.stats()["running_for_s"] is not None, timeout=120)
        first = w._proc.pid
        wait_until(lambda: w.stats()["timeouts"] == 1, timeout=120)
        wait_until(lambda: _pid_gone(first))  # the hung child was killed
        st = w.stats()
        assert st["failures"] == 1 and st["restarts"] == 1 and not st["failed"]
        assert "request 0 exceeded" in st["last_error"] and "killed" in st["last_error"]
        w.submit(make_request(1))
        wait_until(lambda: w.stats()["failed"], timeout=120)
        assert w.stats()["timeouts"] == 2 and w.stats()["restarts"] == 1
    finally:
        w.close(timeout=10)
    assert worker_children("hn-p-hang") == []


def test_child_exits_when_the_training_process_is_killed_mid_request(tmp_path: pathlib.Path) -> None:
    """SIGKILL the parent while its child hangs inside generate(): the child must not live on."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parent)!r})
        import torch
        import _fake_generators as fakes
        from hardneg.worker import GenerationRequest, GenerationWorker

        if __name__ == "__main__":
            w = GenerationWorker(fakes.hanging_factory, backend="process", request_timeout=None)
            w.submit(GenerationRequest(0, (3, 8), torch.arange(2), torch.rand(2, 1, 8, 8), 3, 8, 0.5))
            while w.stats()["running_for_s"] is None:  # the child has started the (endless) request
                time.sleep(0.05)
            print(w._proc.pid, flush=True)
            time.sleep(3600)
    """))
    import signal

    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()  # blocks until the child is busy (or the script died)
        assert line.strip().isdigit(), f"parent script failed (exit {parent.poll()})"
        child = int(line)
        assert not _pid_gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=60)
        wait_until(lambda: _pid_gone(child), timeout=60)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "10", True])
def test_request_timeout_is_validated(bad) -> None:
    from hardneg.config import ConfigError, HardNegConfig

    with pytest.raises(ConfigError, match="request_timeout"):
        HardNegConfig(num_classes=4, request_timeout=bad)
    with pytest.raises(ValueError, match="request_timeout"):
        GenerationWorker(fakes.FakeGenerator, request_timeout=bad)
    assert HardNegConfig(num_classes=4, request_timeout=None).request_timeout is None


def test_engine_worker_gets_the_configured_deadline() -> None:
    from hardneg import HardNeg, HardNegConfig

    engine = HardNeg(HardNegConfig(num_classes=4, request_timeout=12.5), dataset=[(torch.zeros(1, 8, 8), 0)],
                     generator=fakes.FakeGenerator(), start_worker=False)
    try:
        assert engine.worker.request_timeout == 12.5
    finally:
        engine.close()
