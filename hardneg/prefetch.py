"""The next step's synthetic rows, drawn ahead of time: :class:`MixPrefetcher`.

``HardNeg.observe`` ends by scheduling the draw the next ``mix`` would make (same row count, same
step, same pair weights) on a background thread: ``SyntheticBuffer.sample`` and the stacking of
the drawn images, then (on a GPU) the copy to the training device on a side stream. ``mix`` takes
the ready draw when it still fits (same batch size, step and pair weights) and only concatenates.

Deterministic mode stays exact: a draw is made with exactly the arguments the synchronous one
would use, and nothing else touches the buffer between the draw and the ``mix`` that takes it.
When something would (an image hand-over, a state save or load, a changed batch size), the
prefetched draw is undone first (:meth:`MixPrefetcher.cancel`: the sampling RNG state and the use
counts go back to what they were), and ``mix`` draws synchronously as it always did.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from hardneg.buffer import SyntheticBuffer, SyntheticSample
from hardneg.mixing import MixLayout, PreparedMix, prepare_mix
from hardneg.threads import helper_thread_init

__all__ = ["MixPrefetcher"]


@dataclass(slots=True)
class _Draw:
    n: int
    k: int
    step: int
    pair_weights: Any  # the very mapping object the draw used (compared by identity)
    device: Optional[torch.device]
    dtype: Optional[torch.dtype]
    layout: Optional[MixLayout] = None  # the batch the rows go into, when known: the mix is prepared too
    future: Any = None  # a Future of the prefetch pool, or a Task of the runner
    sample: Optional[SyntheticSample] = None
    prepared: Optional[PreparedMix] = None
    rng_state: Optional[Tensor] = None
    version: Optional[tuple[int, int]] = None
    event: Any = None


class MixPrefetcher:
    """Draws ``buffer.sample(k, step, pair_weights)`` on its own thread, one draw ahead.

    Args:
        buffer: the engine's synthetic buffer.
        lock: held around every buffer access (the engine holds it around ``buffer.add``).
        device: the engine's device, made current on the prefetch thread (its side stream lives there).
        runner: a :class:`~hardneg.observer.Background` to draw on instead of an own thread (the
            engine's observe thread: one thread, woken once per step by ``mix``); draws are queued
            on it and run at its next ``wake``.
    """

    def __init__(self, buffer: SyntheticBuffer, lock: threading.Lock, device: Optional[torch.device] = None,
                 runner: Any = None) -> None:
        self.buffer = buffer
        self.lock = lock
        self.device = device
        self.runner = runner
        self._pool: Optional[ThreadPoolExecutor] = None
        self._draw: Optional[_Draw] = None
        self._stream: Any = None
        self.hits = 0
        self.misses = 0
        self.prepared_taken = 0  # hits that came with the mixed batch built around them

    # ------------------------------------------------------------------ schedule / take / cancel
    def schedule(self, n: int, k: int, step: int, pair_weights: Optional[Mapping[Any, float]],
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 layout: Optional[MixLayout] = None) -> None:
        """Start drawing ``k`` rows for the next batch of ``n`` rows at ``step`` (a previous draw
        still outstanding is cancelled first); with the batch's ``layout`` the mixed batch is
        prepared too (:func:`hardneg.mixing.prepare_mix`), so ``mix`` only copies the real rows in."""
        self.cancel()
        if k <= 0:
            return
        draw = _Draw(n, k, step, pair_weights, device, dtype, layout)
        if self.runner is not None:
            draw.future = self.runner.run_later(self._run, draw)
            self._draw = draw
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hardneg-prefetch",
                                            initializer=helper_thread_init, initargs=(self.device,))
        draw.future = self._pool.submit(self._run, draw)
        self._draw = draw

    def take(self, n: int, k: int, step: int, pair_weights: Any,
             exact: bool) -> tuple[bool, Optional[SyntheticSample], Optional[PreparedMix]]:
        """``(True, sample, prepared)`` when the prefetched draw fits this ``mix`` (``prepared``: the
        mixed batch built around it, or None); ``(False, None, None)`` otherwise (the draw is then
        undone when it can be: always when ``exact``, i.e. deterministic mode).

        With ``exact`` the buffer must be unchanged since the draw; without it a draw made before
        images arrived is still good to train on (it is one step old).
        """
        draw = self._draw
        if draw is None:
            return False, None, None
        fits = draw.n == n and draw.k == k and draw.step == step and draw.pair_weights is pair_weights
        if not fits:
            self.misses += 1
            self.cancel()
            return False, None, None
        assert draw.future is not None
        self._wake(draw)
        draw.future.result()  # re-raises a failed draw here; usually long finished
        changed = draw.version != self.buffer.version
        if changed and (exact or draw.sample is None):  # (an empty draw from before images arrived: draw anew)
            self.misses += 1
            self.cancel()
            return False, None, None
        self._draw = None
        self.hits += 1
        self.prepared_taken += draw.prepared is not None
        if draw.event is not None:  # the side-stream copy must land before the step reads the rows
            torch.cuda.current_stream(draw.device).wait_event(draw.event)
            stream = torch.cuda.current_stream(draw.device)
            for t in (draw.sample.images, draw.sample.labels, draw.sample.source_labels):
                t.record_stream(stream)
            if draw.prepared is not None:
                for t in (draw.prepared.x, draw.prepared.y, draw.prepared.weights, draw.prepared.synthetic_mask):
                    t.record_stream(stream)
        return True, draw.sample, draw.prepared

    def cancel(self) -> None:
        """Undo the outstanding draw (wait for it; restore the RNG and use counts when the buffer has
        not changed since, else just drop it)."""
        draw, self._draw = self._draw, None
        if draw is None or draw.future is None:
            return
        self._wake(draw)
        try:
            draw.future.result()
        except Exception:  # noqa: BLE001 - a failed draw changed nothing worth undoing
            return
        if draw.sample is None:
            return
        with self.lock:
            if draw.version == self.buffer.version:
                self.buffer.undo_draw(draw.sample, draw.rng_state)

    def _wake(self, draw: _Draw) -> None:
        """Make sure the runner will run ``draw`` (queued there until its next wake-up)."""
        if self.runner is not None and draw.future is not None and not draw.future.done() \
                and not self.runner.on_thread():
            self.runner.wake_for(draw.future)

    @property
    def pending(self) -> bool:
        return self._draw is not None

    def close(self) -> None:
        self.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ------------------------------------------------------------------ the background side
    def _run(self, draw: _Draw) -> None:
        with self.lock:
            buf = self.buffer
            draw.rng_state = buf.rng_state()
            sample = buf.sample(draw.k, step=draw.step, pair_weights=draw.pair_weights or None)
            draw.version = buf.version
        if sample is None:
            draw.sample = None
            return
        if draw.device is not None and draw.device.type == "cuda":
            sample = self._to_device(sample, draw)
        else:
            if draw.dtype is not None and sample.images.dtype != draw.dtype and draw.device is not None \
                    and draw.device.type == "cpu":
                sample = dataclasses.replace(sample, images=sample.images.to(draw.dtype))
            draw.prepared = self._prepare(sample, draw)
        draw.sample = sample

    @staticmethod
    def _prepare(sample: SyntheticSample, draw: _Draw) -> Optional[PreparedMix]:
        """The mixed batch around the draw, when the batch's layout is known and the draw fits it
        (else ``mix`` mixes the sample itself, as it would without a prefetch)."""
        layout = draw.layout
        if layout is None or tuple(sample.images.shape[1:]) != layout.sample_shape:
            return None
        return prepare_mix(sample, draw.n, layout)

    def _to_device(self, sample: SyntheticSample, draw: _Draw) -> SyntheticSample:
        """Copy the rows the step reads to the training device on a side stream (pinned, non-blocking)."""
        device = draw.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(self._stream):
            images = sample.images.pin_memory().to(device, draw.dtype or sample.images.dtype, non_blocking=True)
            labels = sample.labels.pin_memory().to(device, non_blocking=True)
            source = sample.source_labels.pin_memory().to(device, non_blocking=True)
            tw = sample.target_weights.pin_memory() if sample.target_weights is not None else None
            sample = dataclasses.replace(sample, images=images, labels=labels, source_labels=source,
                                         target_weights=tw)
            draw.prepared = self._prepare(sample, draw)  # built on the side stream too
            event = torch.cuda.Event()
            event.record(self._stream)
        draw.event = event
        return sample
