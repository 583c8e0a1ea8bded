"""HardNeg: the engine that plugs into a training loop.

Training events it uses (one direction of data flow)::

    x, y, w = hn.mix(x, y)          # before forward: add ready hard negatives (never waits)
    logits = model(x)               # forward: a hook captures the embeddings
    hn.observe(labels=y, logits=logits, ids=idx)   # after forward: bank, confusion, curriculum

Every ``refresh_every`` observed steps (``"auto"``, the default: a quarter epoch, at most 50) the
engine re-mines confusion over the whole bank (on a background thread by default: the kNN pass
is O(bank) and must stay off the step), turns the top
pairs into generation requests (images per pair proportional to score, sources = the pair's
boundary samples, r from the curriculum) and hands them to the background worker. Finished
images land in the synthetic buffer the next ``mix`` draws from.

Label trust (optional, see :mod:`hardneg.labels`): with a teacher (``config.teacher``), every
result is scored when it ARRIVES, before it enters the buffer or is trained on: the teacher's
posterior of the target restricted to {source, target} and the classifier's own softmax
probability of the target are stored with each image (``buffer.provenance()``); the teacher
posterior may set the image's soft label (``label_mode="teacher"``), drop it
(``filter_min_target`` / ``filter_max_target``) and steer the ``"band"`` curriculum.

The engine is a thin orchestrator of parts, each in the file of its name: forward hooks
(:mod:`hardneg.capture`), input checks (:mod:`hardneg.validation`), dataset items
(:mod:`hardneg.items`), the embedding bank, the confusion graph, targeting (policies read a
:class:`~hardneg.targeting.PolicyContext`, never the engine) and boundary sources
(:mod:`hardneg.sources`), plan -> requests (:mod:`hardneg.requests`), the curriculum, the worker,
GeNIe-Ada's pick (:func:`hardneg.generators.ada.ada_pick`), the label functions and teacher, the
buffer and mixing, and the saved state (:mod:`hardneg.persistence`). It keeps the training
events (``mix``, ``observe``), the refresh thread, arrival handling and the stats.

Reproducibility: data order, model init, generation seeds and buffer sampling are seeded, but
*when* an asynchronous refresh or a generated image becomes available depends on timing. With
``deterministic=True`` refreshes run inline and generated images are handed over only at refresh
boundaries (waiting for outstanding requests there), so a seeded run repeats exactly at the
cost of those waits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from hardneg.bank import EmbeddingBank
from hardneg.buffer import SyntheticBuffer
from hardneg.capture import ForwardCapture, register_embedding_hook
from hardneg.checkpoint import CheckpointError, load_safe, save_atomic
from hardneg.config import AUTO_REFRESH_MAX, AUTO_REFRESHES_PER_EPOCH, HardNegConfig
from hardneg.confusion import ConfusionGraph, PairScore, pair_weights
from hardneg.curriculum import make_curriculum
from hardneg.device import resolve_device
from hardneg.generators.base import Generator
from hardneg.labels import (balanced_posterior, filter_by_posterior, restricted_posterior, target_probability,
                            target_weights)
from hardneg.items import item_image, item_label
from hardneg.mixing import MixedBatch, MixLayout, mix_batch
from hardneg.observer import Background, stage
from hardneg.persistence import STATE_FORMAT, check_state, result_from_state, result_state
from hardneg.prefetch import MixPrefetcher
from hardneg.requests import RequestBuilder
from hardneg.step import MixedStep
from hardneg.targeting import BankView, PlannedPair, PolicyContext, make_policy
from hardneg.teacher import Teacher, output_logits
from hardneg.threads import helper_thread_init, refresh_thread_init
from hardneg.validation import (HardNegError, check_mix_shape, check_observation, check_observation_values,
                                labels_as_ids, validate_mix_input, validate_synthetic_pairs)
from hardneg.value_space import ValueSpace
from hardneg.worker import GenerationResult, GenerationWorker, ObjectFactory
from hardneg.worker_protocol import WorkerArg

__all__ = ["GeneratorLike", "HardNeg", "HardNegError", "register_embedding_hook"]

logger = logging.getLogger(__name__)

GeneratorLike = Union[Generator, Callable[[], Generator], None]


@dataclass(slots=True)
class _MixRecord:
    """What the last ``mix`` did, so ``observe`` can tell real rows from synthetic ones."""

    n_in: int
    n_total: int
    n_real: int
    synthetic_pairs: list[tuple[int, int]] = field(default_factory=list)
    y: Optional[Tensor] = None  # the y the mix returned
    label_ids: Optional[Tensor] = None  # its class ids when the mix made soft targets from ids (else None)


class HardNeg:
    """Watches a classifier's embeddings, mines confused class pairs, feeds back GeNIe negatives.

    Args:
        config: every knob (:class:`HardNegConfig`).
        model: the classifier. When given, its embeddings are captured automatically by a forward
            hook: the input of a timm model's classifier (``forward_head(..., pre_logits=True)``),
            the output of the layer named by ``embedding_layer``, or the input of the last
            ``nn.Linear``. Captures happen in training mode only (plus :meth:`embed`).
        class_names: names of the classes (prompts, plots); default ``"0".."K-1"``.
        dataset: indexable training set whose item ``i`` starts with the image of sample id ``i``
            (``(image, label, ...)`` tuples or dicts with ``"image"``/``"pixel_values"``); the
            engine fetches GeNIe sources from it. Needed when generation is on.
        generator: a :class:`Generator` (used by the worker as is, not copied: the thread
            backend's worker owns it from then on, the process backend pickles it to the child;
            :class:`~hardneg.worker.ObjectFactory`), a zero-argument factory returning one (built
            on the worker; must be picklable for the process backend), or ``None`` to build
            ``config.generator`` from ``config.generator_path`` on the worker.
        embedding_layer: dotted name of the module whose output is the embedding.
        start_worker: start the generation worker now (tests and adapters may start it later).
        teacher_model: the classifier that scores arriving images when ``config.teacher`` is
            ``"model"`` (eval mode, no grad; its weights are never changed). ``config.teacher ==
            "ema"`` builds an EMA copy of ``model`` instead.
        device: this process's training device (adapters pass their rank's: ``accelerator.device``,
            ``pl_module.device``, ``args.device``); default the model's. A bare ``"cuda"`` (here or
            in ``config.worker_device``) is resolved now, on the calling thread, to
            ``cuda:{torch.cuda.current_device()}``: the engine's own threads, the worker and its
            child process would otherwise all land on GPU 0.
        worker: a generation worker to use instead of the one the engine builds (any object with
            :class:`~hardneg.worker_protocol.WorkerProtocol`'s methods), or a callable that receives
            the engine's own worker (None when this process does not generate) and returns the one
            to use (several processes: :meth:`hardneg.distributed.SharedWorker.wrapping`).
        communicator: the process group when one engine runs per rank
            (:class:`hardneg.distributed.Communicator`); ranks > 0 draw their own synthetic rows.
    """

    def __init__(
        self,
        config: HardNegConfig,
        model: Optional[nn.Module] = None,
        class_names: Optional[Sequence[str]] = None,
        dataset: Any = None,
        generator: GeneratorLike = None,
        embedding_layer: Optional[str] = None,
        start_worker: bool = True,
        teacher_model: Optional[nn.Module] = None,
        device: Union[str, torch.device, None] = None,
        worker: WorkerArg = None,
        communicator: Any = None,
    ) -> None:
        if not isinstance(config, HardNegConfig):
            raise HardNegError(f"config must be a HardNegConfig, got {type(config).__name__}")
        self.config = config
        self.device = resolve_device(device if device is not None else (
            _module_device(model) if model is not None else "cpu"))
        k = config.num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
        if len(self.class_names) != k:
            raise HardNegError(f"got {len(self.class_names)} class_names for num_classes={k}")
        self.model = model
        self.dataset = dataset
        self.bank: Optional[EmbeddingBank] = None
        if config.embedding_dim is not None:
            self.bank = self._make_bank(config.embedding_dim)
        self.confusion: ConfusionGraph = config.confusion_options.make_graph(k, seed=config.seed)
        self.curriculum = make_curriculum(config)
        self.targeting = make_policy(config)
        self.buffer = SyntheticBuffer(
            config.buffer_size, seed=config.seed, freshness_half_life=config.freshness_half_life,
            max_uses=config.max_uses, arrival_scores=config.teacher != "none",
        )
        # Sources leave the pipeline's space for the generator's; generated images come back into it.
        self.value_space: ValueSpace = config.value_space_options.make()
        # Built before the capture hooks exist (and stripped of any hardneg hooks the model already
        # carries), so the EMA copy's forwards never overwrite the training step's capture.
        self.teacher: Optional[Teacher] = self._make_teacher(model, teacher_model)
        self.step = 0
        self._pairs: list[PairScore] = []
        self._pair_weights: dict[tuple[int, int], float] = {}
        self._last_mix: Optional[_MixRecord] = None
        # plan -> requests: source cursor, request ids and seeds, GeNIe-Ada grids still out (requests.py)
        self.requests = RequestBuilder(dataset, self.value_space, config.seed, config.generation_batch,
                                       config.ada_grid)
        self._counters: dict[str, float] = {
            "observed": 0, "synthetic_used": 0, "synthetic_feedback": 0, "synthetic_correct": 0,
            "requests_made": 0, "images_requested": 0, "images_received": 0, "images_rejected": 0, "engine_seconds": 0.0,
            "refreshes": 0, "refreshes_skipped": 0, "zero_embeddings_skipped": 0,
            "images_scored": 0, "images_filtered_low": 0, "images_filtered_high": 0,
            "images_out_of_range": 0,
        }
        self._wall_start: Optional[float] = None
        self._refresh_every: Optional[int] = None  # resolved on the first observe ("auto" needs a batch size)
        self._warned_nothing_generated = False
        self._wall_offset = 0.0  # wall seconds of the run before a resume (stats' engine_fraction)
        # Finished results taken out of the worker by state_dict() (deterministic mode waits for them
        # there), accepted at the next hand-over exactly as if they had stayed in the worker.
        self._held: list[GenerationResult] = []
        # Results the helper thread took out of the worker while forward and backward ran (the
        # worker's IPC, request pumping and health check are off the step), accepted by the next mix.
        self._polled: list[GenerationResult] = []
        self._polled_lock = threading.Lock()
        self._poll_queued = False
        self._unsettled = 0  # requests submitted since the worker was last drained (deterministic mode)
        self._refresh_pool: Optional[ThreadPoolExecutor] = None
        self._refresh_future: Optional[Future] = None
        # upserts held back while a background refresh reads the bank (see _record_observation)
        self._deferred_upserts: list[tuple[Tensor, Tensor, Tensor, int]] = []
        self._refresh_step = 0  # the engine step the background refresh in flight started at
        # forward hooks keeping the last training-mode embedding and logits (capture.py)
        self.capture: Optional[ForwardCapture] = (
            ForwardCapture(model, embedding_layer, k) if model is not None else None)
        # observe's bookkeeping (bank upsert, logit stats, curriculum feedback) runs here, in call order
        self._background = Background("hardneg-observe", initializer=functools.partial(helper_thread_init, self.device))
        self._buffer_lock = threading.Lock()  # the prefetch thread draws while collect() may add
        # the next mix's draw runs on the same thread, which finds queued work without being woken
        self._prefetch = MixPrefetcher(self._buffer, self._buffer_lock, device=self.device, runner=self._background)
        self._mix_layout: Optional[MixLayout] = None  # the last mixed batch's layout: where the next rows go
        self.worker: Optional[GenerationWorker] = None
        factory = self._generator_factory(generator)
        if factory is not None:
            if dataset is None:
                raise HardNegError(
                    "generation is on but no dataset was given: pass dataset= (indexable, item i starts "
                    "with the image of sample id i) so the engine can fetch GeNIe source images"
                )
            self._check_value_space()
            self.worker = GenerationWorker(
                factory, backend=config.worker_backend, queue_size=config.queue_size,
                max_restarts=config.max_restarts, num_threads=config.worker_threads,
                device=resolve_device(config.worker_device, like=self.device),
                request_timeout=config.request_timeout, max_batch=config.worker_max_batch,
                memory_fraction=config.worker_memory_fraction, warmup=config.worker_warmup,
            )
            if start_worker:
                self._start_worker_checked()
        if worker is not None:
            self.worker = worker if hasattr(worker, "submit") else worker(self.worker)
        self.communicator = communicator
        # One process: the helper thread polls the worker and accepts what needs no model. Several:
        # every rank must take the shared results at the same step (same buffers, same batch shapes
        # for the collectives), so mix collects them on the training thread, in lockstep.
        self._poll_off_step = int(getattr(communicator, "world", 1)) <= 1
        self.rank = int(getattr(communicator, "rank", 0))
        self._reseed_for_rank()

    # ================================================================== public API
    def observe(
        self,
        embeddings: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        logits: Optional[Tensor] = None,
        ids: Optional[Union[Tensor, Sequence[int]]] = None,
        synthetic_pairs: Optional[Sequence[tuple[int, int]]] = None,
        mixed: Optional[MixedStep] = None,
    ) -> None:
        """Record one training step (call it after backward).

        On the calling thread: shape/dtype checks, one fused finite-and-in-range check read back
        once, a copy of the tensors (pinned host memory, non-blocking, from a GPU) and a hand-over;
        the bank upsert, logit statistics and curriculum feedback run on the engine's background
        thread (drained before a refresh, ``state_dict``, ``stats`` and ``close``). Bad input raises
        here, and nothing of a rejected batch is recorded.

        Args:
            embeddings: ``(N, D)`` embeddings of the batch returned by :meth:`mix` (or of the
                plain batch when ``mix`` is not used); ``None`` uses the forward-hook capture.
            labels: ``(N,)`` labels of that batch.
            logits: ``(N, K)`` classifier outputs; ``None`` uses the hook capture if any.
            ids: dataset sample ids of the *real* samples, i.e. of the batch passed into ``mix``.
                Synthetic rows are recognised from the last ``mix`` and feed the curriculum.
            synthetic_pairs: describe the batch explicitly instead (e.g. a batch gathered across
                processes): its last ``len(synthetic_pairs)`` rows are synthetic, of these pairs.
            mixed: the :class:`~hardneg.step.MixedStep` that :meth:`mix` returned for this batch
                (instead of relying on "the last mix").
        """
        # the engine's helper thread starts nothing while the training thread is in here, nor (in a loop
        # that mixes) until the next mix is done: see Background's gate
        self._background.hold()
        mixes = mixed is not None or self._last_mix is not None
        try:
            self._observe(embeddings, labels, logits, ids, synthetic_pairs, mixed)
        finally:
            if not mixes:
                self._background.release()

    def _observe(self, embeddings: Optional[Tensor], labels: Optional[Tensor], logits: Optional[Tensor],
                 ids: Any, synthetic_pairs: Optional[Sequence[tuple[int, int]]], mixed: Optional[MixedStep]) -> None:
        """The body of :meth:`observe` (which holds the helper thread's gate around it)."""
        t0 = time.perf_counter()
        if self._wall_start is None:
            self._wall_start = t0
        if labels is None:
            raise HardNegError("observe() needs labels")
        if ids is None:
            raise HardNegError("observe() needs ids: the dataset sample ids of the batch (stable across epochs)")
        emb = embeddings if embeddings is not None else self._captured_embeddings
        if emb is None:
            raise HardNegError(
                "no embeddings: pass embeddings=, or give HardNeg the model (with embedding_layer= if it is "
                "not a timm model) so a forward hook captures them"
            )
        if logits is None:
            logits = self._captured_logits
        from_step = _record_of(mixed) if mixed is not None and synthetic_pairs is None else None
        given_labels = labels
        labels = labels_as_ids(labels, emb, from_step if from_step is not None else self._last_mix, synthetic_pairs)
        labels_ours = labels is not given_labels  # ids the mix kept, or an argmax: made by the engine, for it alone
        emb, labels, logits, ids_t = check_observation(emb, labels, logits, ids, self.config.num_classes)
        # (embeddings the forward hook captured and the mix's class ids are the engine's alone: not
        # copied on a CPU)
        owned = ("emb",) * (embeddings is None) + ("labels",) * labels_ours
        staged = stage(emb=emb, labels=labels, logits=logits, ids=ids_t, owned=owned)
        # the values: read from the copies just made (in cache) on a CPU; on a GPU one flag read back
        check_observation_values(emb, labels, logits, ids_t, self.config.num_classes, arrays=staged.arrays)
        record = from_step
        if synthetic_pairs is not None:
            pairs = validate_synthetic_pairs(synthetic_pairs, emb.shape[0], self.config.num_classes)
            n_syn = len(pairs)
            record = _MixRecord(n_in=emb.shape[0] - n_syn, n_total=emb.shape[0], n_real=emb.shape[0] - n_syn,
                                synthetic_pairs=pairs)
        n_real, synth = self._split_real_synthetic(emb.shape[0], ids_t.shape[0], record)
        self._finish_background_refresh()
        if self._bank is None:
            self._bank = self._make_bank(emb.shape[1])
        elif emb.shape[1] != self._bank.dim:
            raise HardNegError(f"embeddings have dimension {emb.shape[1]}, the bank holds {self._bank.dim}-dimensional "
                               "ones: observe the same layer of the same model every step")
        m = record if record is not None else self._last_mix
        n_in = m.n_in if m is not None and emb.shape[0] == m.n_total else n_real
        # (submit re-raises a failed upsert of an earlier step first: then nothing of this one is queued)
        self._background.submit(self._record_observation, staged, n_real, synth, self.step)
        if self.teacher is not None and self.model is not None:
            self.teacher.update(self.model)
        if self.capture is not None:
            self.capture.embeddings = self.capture.logits = None
        self._last_mix = None
        self.step += 1
        if self._refresh_due(n_real):
            if self.config.async_refresh and not self.config.deterministic:
                self._start_background_refresh()
            else:
                self.refresh()
        if not self._prefetch.pending:  # none made by mix (observe without mix, or undone by a refresh)
            self._schedule_prefetch(n_in, self.step)
        self._counters["engine_seconds"] += time.perf_counter() - t0

    def _record_observation(self, staged: Any, n_real: int, synth: list[tuple[int, int]], step: int) -> None:
        """The background half of :meth:`observe`: bank upsert, logit statistics, curriculum feedback."""
        t = staged.ready()
        emb, labels, logits, ids_t = t["emb"], t["labels"], t["logits"], t["ids"]
        if emb.is_meta or labels.is_meta:
            return  # a shape-only dry run (meta tensors): there are no values to record
        labels = labels.cpu()
        real_ids, real_emb, real_labels = ids_t[:n_real].cpu(), emb[:n_real], labels[:n_real]
        if self.config.metric == "cosine":
            nonzero = real_emb.flatten(1).abs().sum(1) > 0
            if not bool(nonzero.all()):
                # A zero embedding (e.g. dead ReLUs) has no direction: keep it out of the bank.
                skipped = int((~nonzero).sum())
                if not self._counters["zero_embeddings_skipped"]:
                    logger.warning("hardneg: %d all-zero embedding(s) skipped (no cosine direction); counted in "
                                   "stats()['zero_embeddings_skipped']", skipped)
                self._counters["zero_embeddings_skipped"] += skipped
                real_ids, real_emb, real_labels = real_ids[nonzero], real_emb[nonzero], real_labels[nonzero]
        self._upsert(real_ids, real_emb, real_labels, step)
        if logits is not None:
            self._confusion.accumulate_logits(labels[:n_real], logits[:n_real])
            if synth:
                self._curriculum_feedback(logits[n_real:], labels[n_real:], synth, step)
        self._counters["observed"] += n_real

    def _upsert(self, ids: Tensor, emb: Tensor, labels: Tensor, step: int) -> None:
        """(background thread) Put one step's rows into the bank, or hold them back while a
        background refresh is searching it: an upsert would wait for the refresh's read lock (one
        search chunk of a thread at the lowest priority, which can take long on a busy machine), and
        the next step's prefetched draw queued behind it would stall ``mix``. Held-back rows are
        applied in order by the first upsert after the refresh (or by :meth:`_flush_upserts`), so
        the bank ends exactly as without holding back; the refresh mines the bank as it started."""
        fut = self._refresh_future
        if fut is not None and step >= self._refresh_step and not fut.done() \
                and len(self._deferred_upserts) < _MAX_DEFERRED_UPSERTS:  # (steps before it: the refresh waits for them)
            self._deferred_upserts.append((ids, emb, labels, step))
            return
        self._flush_upserts()
        self._bank.upsert(ids, emb, labels, step=step)

    def _flush_upserts(self) -> None:
        """(background thread) Apply the held-back upserts, oldest first."""
        held, self._deferred_upserts = self._deferred_upserts, []
        for ids, emb, labels, step in held:
            self._bank.upsert(ids, emb, labels, step=step)

    def _settle(self) -> None:
        """Let the background half of every observe finish and undo a prefetched draw, so what follows
        reads (or saves) exactly the state a synchronous engine would have."""
        self._wait_for_observer()
        self._prefetch.cancel()

    def _schedule_prefetch(self, n: int, step: int) -> None:
        """Draw the synthetic rows of a ``mix`` of ``n`` rows at ``step`` now, on the prefetch thread
        (see :mod:`hardneg.prefetch`)."""
        k = int(round(self.config.synthetic_fraction * n))
        if k <= 0 or len(self._buffer) == 0:
            self._prefetch.cancel()
            return
        layout = self._mix_layout
        if layout is None:
            self._prefetch.schedule(n, k, step, self._pair_weights)
            return
        self._prefetch.schedule(n, k, step, self._pair_weights, device=layout.device, dtype=layout.dtype,
                                layout=layout)

    def mix(self, x: Tensor, y: Tensor) -> MixedStep:
        """Add ready hard negatives to a batch; returns the :class:`~hardneg.step.MixedStep`, which
        unpacks as ``(x, y, per-sample loss weights)`` and offers ``.loss(per_sample_loss)``.

        Never waits for the generator: with an empty buffer it is the identity (weights of ones).
        The rows were drawn ahead of time on a background thread (:mod:`hardneg.prefetch`), so this
        is a concatenation; nothing here reads a device value back.
        """
        step = self.step
        mixed = self.mix_batch(x, y)
        m = self._last_mix
        return MixedStep(mixed, n_in=int(x.shape[0]), pairs=m.synthetic_pairs if m is not None else [],
                         separate=self.config.separate_synthetic_loss, step=step)

    def mix_batch(self, x: Tensor, y: Tensor) -> MixedBatch:
        """Like :meth:`mix` but returns the full :class:`MixedBatch` (with the synthetic mask)."""
        self._background.hold()  # see Background's gate
        try:
            return self._mix_batch(x, y)
        finally:
            self._background.release()  # the helper thread works while forward and backward run

    def _mix_batch(self, x: Tensor, y: Tensor) -> MixedBatch:
        """The body of :meth:`mix_batch` (which holds the helper thread's gate around it)."""
        t0 = time.perf_counter()
        if self._wall_start is None:
            self._wall_start = t0
        cfg = self.config
        layout = self._mix_layout
        # a batch laid out like the last one passes what validate_mix_input checks (the layout was made
        # from a checked batch): the check then reads metadata only once
        same_layout = (layout is not None and isinstance(x, Tensor) and isinstance(y, Tensor) and x.ndim > 0
                       and layout.fits(x, y) and x.shape[0] == y.shape[0] and layout.mode == cfg.mix_mode
                       and layout.synthetic_weight == cfg.synthetic_weight and layout.num_classes == cfg.num_classes)
        if not same_layout:
            validate_mix_input(x, y, cfg.num_classes)
        self._finish_background_refresh()
        if not cfg.deterministic:
            if self._poll_off_step:
                self._accept_polled()
            else:
                self.collect()
        n = x.shape[0]
        k = int(round(cfg.synthetic_fraction * n))
        sample = prepared = None
        if not same_layout:
            layout = self._mix_layout = MixLayout.of(x, y, cfg.mix_mode, cfg.synthetic_weight, cfg.num_classes)
        assert layout is not None
        if k > 0 and len(self._buffer) > 0:
            # before the draw: a rejected mix leaves use counts and the RNG alone
            image_shape = self._buffer.image_shape
            if image_shape != layout.sample_shape:  # (the layout's sample shape is the batch's)
                check_mix_shape(x, image_shape)
            hit, sample, prepared = self._prefetch.take(n, k, self.step, self._pair_weights, exact=cfg.deterministic)
            if not hit:
                with self._buffer_lock:
                    sample = self._buffer.sample(k, step=self.step, pair_weights=self._pair_weights or None)
        elif self._prefetch.pending:
            self._prefetch.cancel()
        if prepared is not None and not prepared.filled and prepared.n_in == n \
                and (prepared.layout is layout or prepared.layout == layout):
            mixed = prepared.fill_fitting(x, y)  # drawn and built ahead, for a batch of this layout: copy the real rows in
            pairs = prepared.pairs
        else:
            mixed = mix_batch(x, y, sample, mode=cfg.mix_mode, synthetic_weight=cfg.synthetic_weight,
                              num_classes=cfg.num_classes)
            n_syn = int(mixed.x.shape[0]) - mixed.n_real  # from shapes: no device read
            pairs = [(int(a), int(b)) for a, b in sample.pairs[:n_syn].tolist()] if sample is not None and n_syn else []
        n_syn = len(pairs)
        self._last_mix = _MixRecord(n_in=n, n_total=mixed.x.shape[0], n_real=mixed.n_real, synthetic_pairs=pairs,
                                    y=mixed.y, label_ids=mixed.label_ids)
        self._counters["synthetic_used"] += n_syn
        # the next mix's rows are drawn while this step's forward and backward run (its step count is
        # this one's + 1: the observe of this batch comes first); a refresh or a hand-over undoes it
        # (queued on the helper thread, which looks for work by itself: no wake-up on the step path)
        self._schedule_prefetch(n, self.step + 1)
        self._counters["engine_seconds"] += time.perf_counter() - t0
        return mixed

    # The parts observe's background thread writes: reading one from outside first lets that thread
    # finish what was queued (the engine's own step path uses the underscored names).
    @property
    def bank(self) -> Optional[EmbeddingBank]:
        """The embedding bank (None until the first observe without ``config.embedding_dim``)."""
        self._wait_for_observer()
        return self._bank

    @bank.setter
    def bank(self, value: Optional[EmbeddingBank]) -> None:
        self._wait_for_observer()
        self._bank = value

    @property
    def confusion(self) -> ConfusionGraph:
        """The confusion graph (its logit statistics are up to date with every observed step)."""
        self._wait_for_observer()
        return self._confusion

    @confusion.setter
    def confusion(self, value: ConfusionGraph) -> None:
        self._wait_for_observer()
        self._confusion = value

    @property
    def curriculum(self) -> Any:
        """The noise-ratio curriculum (its training feedback is up to date with every observed step)."""
        self._wait_for_observer()
        return self._curriculum

    @curriculum.setter
    def curriculum(self, value: Any) -> None:
        self._wait_for_observer()
        self._curriculum = value

    @property
    def buffer(self) -> SyntheticBuffer:
        """The synthetic buffer. Reading it from outside first undoes a prefetched draw (see
        :mod:`hardneg.prefetch`), so its use counts and RNG state are what a synchronous engine's are."""
        prefetch = self.__dict__.get("_prefetch")
        if prefetch is not None and prefetch.pending:
            prefetch.cancel()
        return self._buffer

    @buffer.setter
    def buffer(self, value: SyntheticBuffer) -> None:
        self._buffer = value

    def _reseed_for_rank(self) -> None:
        """Ranks > 0 draw their own synthetic rows (rank 0 draws as a single process would)."""
        if self.rank > 0:
            self.buffer.reseed(self.config.seed * 1_000_003 + 7919 * self.rank + self.step)

    def _wait_for_observer(self) -> None:
        background = self.__dict__.get("_background")
        if background is not None and not background.on_thread():
            if self.__dict__.get("_deferred_upserts"):  # (read without a lock: a stale read only costs a task)
                background.submit(self._flush_upserts)
            background.drain()

    @property
    def last_mix_pairs(self) -> list[tuple[int, int]]:
        """The (source class, target class) of each synthetic row the last ``mix`` added, in order."""
        return list(self._last_mix.synthetic_pairs) if self._last_mix is not None else []

    def refresh(self) -> list[PairScore]:
        """Re-mine confusion now (inline) and, with a generator, request negatives for the plan."""
        self._finish_background_refresh(wait=True)
        self._wait_for_observer()  # every observed step is in the bank
        if self.bank is None or len(self.bank) < 2:
            return []
        self.confusion.refresh(self.bank, step=self.step)
        return self._after_refresh()

    def _after_refresh(self) -> list[PairScore]:
        self._wait_for_observer()  # the plan reads the bank, the curriculum and the counters
        self._counters["refreshes"] += 1
        self._pairs = self.confusion.top_pairs(self.config.top_pairs, self.config.min_pair_score)
        self._pair_weights = pair_weights(self._pairs)
        if self.worker is not None and not self.worker.failed:
            if self.config.deterministic:
                self.wait_for_generation()
            self._request_generation(self.targeting.plan(self.policy_context(), self.config.images_per_refresh))
            if self.config.deterministic and self.config.refresh_at is not None:
                self.wait_for_generation()  # a fixed schedule has no next boundary soon: hand them over now
        return list(self._pairs)

    def _start_background_refresh(self) -> None:
        if self._bank is None:  # (not self.bank: that would wait for the observe thread; the size is checked there)
            return
        if self._bank.collective:  # a sharded bank: every rank refreshes together, at this step
            self.refresh()
            return
        if self._refresh_future is not None:  # the previous one is still running: skip, never queue up
            self._counters["refreshes_skipped"] += 1
            return
        if self._refresh_pool is None:
            self._refresh_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hardneg-refresh",
                                                    initializer=refresh_thread_init,
                                                    initargs=(self.config.refresh_threads, self.device))
        self._refresh_step = self.step
        self._refresh_future = self._refresh_pool.submit(_refresh_after, self._background.last, self._confusion,
                                                         self._bank, self.step)

    def _finish_background_refresh(self, wait: bool = False) -> None:
        """Act on a finished background refresh (plan + requests); errors surface here."""
        fut = self._refresh_future
        if fut is None or (not wait and not fut.done()):
            return
        self._refresh_future = None
        if fut.result() is not None:
            self._after_refresh()

    def wait_for_generation(self, timeout: float = 600.0) -> int:
        """Block until every submitted request has finished (or failed), collect it; returns images added."""
        if self.worker is None:
            return self.collect()
        added = self.collect()
        added += self._accept(self.worker.drain(timeout))
        self._unsettled = 0
        return added + self.collect()

    def wait_for_refresh(self, timeout: float = 600.0) -> bool:
        """Block until a background refresh in flight (if any) has finished and been acted on.

        Returns False if it is still running after ``timeout`` seconds (it is then left running).
        A test or a script that needs the mined pairs *now* waits here instead of counting steps.
        """
        fut = self._refresh_future
        if fut is not None:
            try:
                fut.exception(timeout=timeout)  # waits without raising the refresh's own error here
            except FutureTimeout:
                return False
            self._finish_background_refresh(wait=True)
        return True

    def wait_for_images(self, n: int = 1, timeout: float = 600.0) -> bool:
        """Block until the buffer holds at least ``n`` images (collecting finished work meanwhile).

        Returns False when ``timeout`` seconds passed first, or at once when the worker failed or
        there is none. A deadline, not a step count: how soon images arrive depends on the machine.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.collect()
            if len(self.buffer) >= n:
                return True
            if self.worker is None or self.worker.failed or time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def policy_context(self) -> PolicyContext:
        """What the targeting policy reads at a refresh: the mined pairs with scores, class counts, a
        read-only bank view and the pairs' boundary sources (no engine: :class:`PolicyContext`)."""
        bank, graph = self.bank, self.confusion
        return PolicyContext(
            num_classes=self.config.num_classes, pairs=tuple(self.confusions()),
            class_counts=bank.class_counts() if bank is not None else np.zeros(self.config.num_classes, np.int64),
            bank=BankView(bank) if bank is not None else None,
            sources=lambda pair, n=None: graph.sources_of(*pair)[:n], sources_per_pair=self.config.sources_per_pair,
        )

    def known_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, labels) of every sample in the bank, for targeting policies."""
        self._wait_for_observer()
        if self.bank is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return self.bank.ids_and_labels()

    def confusions(self, n: Optional[int] = None) -> list[PairScore]:
        """The currently most confused directed pairs (A pulled towards B) with source ids."""
        return self.confusion.top_pairs(n or self.config.top_pairs, self.config.min_pair_score)

    def collect(self) -> int:
        """Move finished work forward without blocking: act on a finished background refresh, move
        finished images from the worker into the buffer. Returns how many images were added."""
        self._finish_background_refresh()
        held = self._take_held()
        if self.worker is None:
            return self._accept(held)
        return self._accept(held + self.worker.poll())

    def _take_polled(self) -> list[GenerationResult]:
        """What the helper thread polled out of the worker so far (oldest first)."""
        with self._polled_lock:
            got, self._polled = self._polled, []
        return got

    def _take_held(self) -> list[GenerationResult]:
        """Every finished result taken out of the worker and not yet accepted: those a checkpoint
        held, then those the helper thread polled."""
        held, self._held = self._held + self._take_polled(), []
        return held

    def _poll_worker(self) -> None:
        """(helper thread) Take finished results out of the worker. Those that need no model (no
        teacher scores them, no GeNIe-Ada pick embeds them) go into the buffer here, while forward
        and backward run; the rest wait for the next mix, which accepts them on the training thread
        (a classifier must not run beside its own backward)."""
        self._poll_queued = False
        got = self.worker.poll() if self.worker is not None else []
        if not got:
            return
        here: list[GenerationResult] = []
        later: list[GenerationResult] = []
        for r in got:
            needs_model = self.teacher is not None or r.request_id in self.requests.ada_requests
            (later if needs_model else here).append(r)
        if later:
            with self._polled_lock:
                self._polled.extend(later)
        if here:
            self._accept(here)

    def _accept_polled(self) -> int:
        """(in mix, after its refresh check) Accept what the helper thread polled, and queue its next
        poll: the step path pays for the worker only when images arrive."""
        held = self._take_held() if self._held or self._polled else []  # (no lock to see that nothing came)
        added = self._accept(held) if held else 0
        if self.worker is not None and not self._poll_queued:
            self._poll_queued = True
            self._background.submit(self._poll_worker)
        return added

    def _accept(self, results: Iterable[GenerationResult]) -> int:
        """Put finished results into the buffer; returns images added.

        On arrival, in order: GeNIe-Ada picks its ratio; with a teacher, every image is scored
        (teacher posterior of the target within {source, target}, the classifier's probability of
        the target), the scores feed the curriculum (``"band"``), and the filter drops images on
        the wrong side of ``filter_min_target`` / ``filter_max_target``; the label mode sets each
        kept image's target weight.
        """
        cfg = self.config
        added = 0
        results = list(results)
        if results and cfg.deterministic:
            self._prefetch.cancel()  # the draw for the next mix must see these images, as it always did
        for result in results:
            self._counters["images_received"] += len(result.images)
            result = dataclasses.replace(result, images=self.value_space.from_pixels(result.images))
            grid = self.requests.pop_ada_grid(result.request_id)
            if grid is not None:
                result = self._select_ada(result, grid)
            result = self._drop_out_of_range(result)
            if result is None:  # every image of this result was out of range
                continue
            teacher_p = model_p = None
            if self.teacher is not None and len(result):
                teacher_p, model_p = self._score_arrivals(result)
                scored = torch.isfinite(teacher_p)
                self._counters["images_scored"] += int(scored.sum())
                self.curriculum.arrival_feedback(result.pair, teacher_p[scored].tolist(), self.step,
                                                 ratios=result.ratios.cpu()[scored].tolist())
                kept = filter_by_posterior(teacher_p, cfg.filter_min_target, cfg.filter_max_target)
                if kept.low or kept.high:
                    self._counters["images_filtered_low"] += kept.low
                    self._counters["images_filtered_high"] += kept.high
                    index = kept.keep.nonzero().flatten()
                    if index.numel() == 0:  # every image of this result was on the wrong side
                        continue
                    result, teacher_p, model_p = result.select(index), teacher_p[index], model_p[index]
            weights = None
            if cfg.label_mode != "hard":
                weights = target_weights(cfg.label_mode, result.ratios, cfg.label_gamma, teacher_p)
            with self._buffer_lock:
                n = self._buffer.add(result, step=self.step, target_weight=weights, teacher_p_target=teacher_p,
                                    model_p_target=model_p)
            added += n
            self._counters["images_rejected"] += len(result.images) - n
        return added

    def _drop_out_of_range(self, result: GenerationResult) -> Optional[GenerationResult]:
        """Drop generated rows far outside the value range of the sources (e.g. a generator that
        forgot to rescale its output): more than one data span below the smallest or above the
        largest source value. Counted in ``stats()["images_out_of_range"]``, warned about once.
        NaN/inf rows are left to the buffer, which rejects them. None when no row is left."""
        if self.requests.source_range is None or not len(result):
            return result
        lo, hi = self.requests.source_range
        span = max(hi - lo, abs(lo), abs(hi), 1.0)
        flat = torch.nan_to_num(result.images.detach().flatten(1).float(), nan=lo, posinf=hi, neginf=lo)
        ok = ((flat.amin(1) >= lo - span) & (flat.amax(1) <= hi + span)).cpu()
        n_bad = int((~ok).sum())
        if n_bad == 0:
            return result
        if not self._counters["images_out_of_range"]:
            logger.warning(
                "hardneg: dropped %d generated image(s) of pair %s with values in [%.3g, %.3g], far outside the "
                "sources' range [%.3g, %.3g]: the generator must return images in the training data's range "
                "(counted in stats()['images_out_of_range'])", n_bad, result.pair, float(flat.min()),
                float(flat.max()), lo, hi)
        self._counters["images_out_of_range"] += n_bad
        return result.select(ok.nonzero().flatten()) if n_bad < len(result) else None

    @torch.no_grad()
    def _score_arrivals(self, result: GenerationResult) -> tuple[Tensor, Tensor]:
        """Per fresh image: the teacher's ``P(target | {source, target})`` and the classifier's softmax
        probability of the target (NaN without a model), both float32 on the CPU."""
        assert self.teacher is not None
        images, src, tgt = result.images, result.source_labels.cpu(), result.target_labels.cpu()
        batch = self.config.score_batch
        teacher_logits = self.teacher.logits(images, batch)
        if self.config.teacher_prior_correction > 0 and self.bank is not None:
            # judge the image, not the class's frequency: a long-tailed teacher under-scores rare targets
            teacher_p = balanced_posterior(teacher_logits, src, tgt, torch.as_tensor(self.bank.class_counts()),
                                           self.config.teacher_prior_correction).float()
        else:
            teacher_p = restricted_posterior(teacher_logits, src, tgt).float()
        model_p = torch.full((len(result),), float("nan"))
        if self.model is not None:
            model_p = target_probability(self._model_logits(images, batch), tgt).float()
        return teacher_p, model_p

    @torch.no_grad()
    def _model_logits(self, images: Tensor, batch_size: int) -> Tensor:
        """The classifier's logits of ``images`` in eval mode, with the capture hooks silenced."""
        assert self.model is not None
        model = self.model
        was_training = model.training
        device = _module_device(model)
        model.eval()
        out = []
        try:
            with self.capture.silenced() if self.capture is not None else contextlib.nullcontext():
                for start in range(0, images.shape[0], batch_size):
                    out.append(output_logits(model(images[start : start + batch_size].to(device))).float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Embeddings of ``images`` from the model (eval mode, no grad), on the CPU."""
        if self.model is None:
            raise HardNegError("embed() needs the model: construct HardNeg(config, model=...)")
        was_training = self.model.training
        device = _module_device(self.model)
        dtype = _module_float_dtype(self.model)  # a bf16/fp16 model needs its inputs in its own dtype
        capture = self.capture
        assert capture is not None  # built with the model
        self.model.eval()
        out = []
        try:
            with capture.always():
                for start in range(0, images.shape[0], batch_size):
                    capture.embeddings = None
                    self.model(images[start : start + batch_size].to(device=device, dtype=dtype))
                    if capture.embeddings is None:
                        raise HardNegError("the model's forward did not reach the embedding hook")
                    out.append(capture.embeddings.float().cpu())
        finally:
            capture.clear()
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.bank.dim if self.bank else 0)

    def refresh_bank(self, dataset: Any = None, batch_size: int = 256, progress: bool = False) -> None:
        """Re-embed every sample of ``dataset`` (default: the engine's) with the current model.

        Embeddings in the bank age as the model trains; a whole-bank refresh (e.g. once per
        epoch) brings every sample to the current model at the cost of one inference pass.
        """
        data = dataset if dataset is not None else self.dataset
        if data is None:
            raise HardNegError("refresh_bank() needs a dataset")
        self._wait_for_observer()  # queued upserts first: the re-embedded vectors win
        n = len(data)
        iterator: Iterable[int] = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="refresh bank", unit="batch")
        for start in iterator:
            idx = list(range(start, min(start + batch_size, n)))
            images = torch.stack([item_image(data[i]) for i in idx])
            labels = torch.as_tensor([int(item_label(data[i])) for i in idx])
            emb = self.embed(images, batch_size=batch_size)
            if self.bank is None:
                self.bank = self._make_bank(emb.shape[1])
            self.bank.upsert(torch.as_tensor(idx), emb, labels, step=self.step)

    def stats(self) -> dict[str, Any]:
        """Counters for logs and plots: engine time share, synthetic use, worker and buffer state."""
        self._settle()
        c = dict(self._counters)
        wall = self._wall_offset + ((time.perf_counter() - self._wall_start) if self._wall_start else 0.0)
        c["wall_seconds"] = wall
        c["engine_fraction"] = c["engine_seconds"] / wall if wall > 0 else 0.0
        c["synthetic_accuracy"] = c["synthetic_correct"] / c["synthetic_feedback"] if c["synthetic_feedback"] else None
        c["step"] = self.step
        c["bank_size"] = len(self.bank) if self.bank is not None else 0
        c["bank_on_gpu"] = bool(self.bank is not None and self.bank.on_gpu)
        c["buffer"] = self.buffer.stats()
        c["worker"] = self.worker.stats() if self.worker is not None else None
        ratios = [self.curriculum.ratio(p.pair, self.step) for p in self._pairs]
        c["mean_r"] = float(np.mean(ratios)) if ratios else None
        c["pair_r"] = {f"{p.a}->{p.b}": r for p, r in zip(self._pairs, ratios)}
        return c

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything the loop needs to continue after a restart: plain tensors, numbers and strings
        (loads with ``torch.load(weights_only=True)``).

        Finished results not yet in the buffer are included (``held``). With ``deterministic=True``
        this first waits for every outstanding request, so a run resumed from this state receives
        exactly the images the uninterrupted run would have; otherwise requests still being generated
        are not saved (the resumed run requests anew at its next refresh).
        """
        self._settle()
        self._finish_background_refresh(wait=True)
        self._held.extend(self._take_polled())
        if self.worker is not None:
            if self.config.deterministic:
                self._held.extend(self.worker.drain())
                self._unsettled = 0
            else:
                self._held.extend(self.worker.poll())
        return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        """The engine's own state as :meth:`state_dict` returns it, without touching the worker."""
        wall = self._wall_offset + ((time.perf_counter() - self._wall_start) if self._wall_start else 0.0)
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "step": self.step,
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "confusion": self.confusion.state_dict(),
            "curriculum": self.curriculum.state_dict(),
            "buffer": self.buffer.state_dict(),
            "pairs": [[p.a, p.b, p.score, list(p.source_ids)] for p in self._pairs],
            "source_cursor": self.requests.cursor.state_dict(),
            "next_request_id": self.requests.next_request_id,
            "counters": dict(self._counters),
            "targeting": self.targeting.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "held": [result_state(r) for r in self._held],
            "ada_requests": {str(k): list(v) for k, v in self.requests.ada_requests.items()},
            "wall_seconds": wall,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output into this engine, all or nothing.

        The whole state is checked first (format, keys, class count, embedding dimension, buffer
        capacity, teacher kind) and a :class:`HardNegError` says what does not fit before anything
        changes; should applying it still fail, the engine is put back as it was, so a failed load
        never leaves a half-loaded engine.
        """
        self._check_state(state)
        self._settle()
        self._finish_background_refresh(wait=True)
        backup = self._snapshot()  # no worker drain: the backup is only for putting this engine back
        try:
            self._apply_state(state)
        except Exception as exc:
            self._apply_state(backup)
            if isinstance(exc, HardNegError):
                raise
            raise HardNegError(f"the state does not fit this engine ({type(exc).__name__}: {exc}); the engine is "
                               "unchanged") from exc

    def _check_state(self, state: Any) -> None:
        """Raise :class:`HardNegError` when ``state`` cannot be loaded into this engine (changes nothing)."""
        check_state(state, self.config, self.bank, self.teacher)

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        if state["bank"] is not None:
            self.bank = self._bank_from_state(state["bank"])
        else:
            self.bank = None
        self.confusion.load_state_dict(state["confusion"])
        self.curriculum.load_state_dict(state["curriculum"])
        self.buffer.load_state_dict(state["buffer"])
        self._pairs = [PairScore(int(a), int(b), float(s), list(src)) for a, b, s, src in state["pairs"]]
        self._pair_weights = pair_weights(self._pairs)
        self.requests.cursor.load_state_dict(state["source_cursor"])
        self.requests.next_request_id = int(state["next_request_id"])
        self._counters.update(state["counters"])
        self.targeting.load_state_dict(state.get("targeting", {}))
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(state["teacher"])
        self._held = [result_from_state(r) for r in state.get("held", [])]
        self._take_polled()  # (like the held results it replaces: the loaded state's are these)
        self.requests.ada_requests = {int(k): tuple(float(r) for r in v)
                                      for k, v in state.get("ada_requests", {}).items()}
        self._wall_offset = float(state.get("wall_seconds", 0.0))
        self._wall_start = None  # the clock restarts at the next step; time spent down is not counted
        self._last_mix = None
        if getattr(self, "rank", 0) > 0:
            self._reseed_for_rank()

    def save(self, path: str) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (a crash mid-write keeps the previous file)."""
        save_atomic(self.state_dict(), path)

    def load(self, path: str) -> None:
        """Read a file written by :meth:`save` into this engine.

        Loads with ``torch.load(weights_only=True)``: a file holding anything but plain tensors,
        numbers and strings is refused, never executed. Raises :class:`CheckpointError` naming the
        file when it is missing, empty, truncated, corrupt, unsafe or does not fit this engine.
        """
        state = load_safe(path, what="hardneg engine state (HardNeg.save)", keys=("format", "config"))
        try:
            self.load_state_dict(state)
        except HardNegError as exc:
            raise CheckpointError(path, f"does not fit this engine: {exc}") from None

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker and the refresh thread, remove the hooks. Safe to call twice."""
        self._prefetch.close()
        self._background.close()
        if self._refresh_pool is not None:
            self._refresh_pool.shutdown(wait=True)
            self._refresh_pool, self._refresh_future = None, None
        if self.worker is not None:
            self._warn_if_nothing_generated()
            self.worker.close(timeout=timeout)
        if self.capture is not None:
            self.capture.remove()

    def __enter__(self) -> "HardNeg":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def refresh_every(self) -> int:
        """Steps between refreshes: ``config.refresh_every``, or what ``"auto"`` resolved to (a quarter
        epoch, at most 50; 50 until the first observed batch or without a dataset length)."""
        every = self.config.refresh_every
        if isinstance(every, int):
            return every
        return self._refresh_every if self._refresh_every is not None else AUTO_REFRESH_MAX

    # ================================================================== internals
    def _refresh_due(self, batch_size: int) -> bool:
        """Whether the step just observed ends with a refresh: one of ``config.refresh_at``, else every
        ``refresh_every`` steps."""
        if self.config.refresh_at is not None:
            return self.step in self.config.refresh_at
        return self.step % self._refresh_cadence(batch_size) == 0

    def _refresh_cadence(self, batch_size: int) -> int:
        """``config.refresh_every``; ``"auto"`` is resolved once, from the first observed batch size."""
        if isinstance(self.config.refresh_every, int):
            return self.config.refresh_every
        if self._refresh_every is None:
            every = AUTO_REFRESH_MAX
            try:
                n = len(self.dataset) if self.dataset is not None else 0
            except TypeError:
                n = 0
            if n > 0 and batch_size > 0:
                steps_per_epoch = -(-n // batch_size)
                every = max(1, min(AUTO_REFRESH_MAX, steps_per_epoch // AUTO_REFRESHES_PER_EPOCH))
            self._refresh_every = every
        return self._refresh_every

    def _warn_if_nothing_generated(self) -> None:
        """Generation was configured but no image reached the buffer: say so instead of staying silent."""
        if self._warned_nothing_generated or self.step == 0 or self._counters["images_received"] > 0:
            return
        self._warned_nothing_generated = True
        c = self._counters
        if not c["requests_made"]:
            logger.warning(
                "hardneg: generation was configured but nothing was generated in %d training steps: no refresh "
                "made a request (refresh_every=%d, %d refreshes, %d skipped; a refresh needs >= 2 classes in the "
                "bank and a confused pair). Lower refresh_every or train longer.",
                self.step, self.refresh_every, c["refreshes"], c["refreshes_skipped"])
            return
        w = self.worker.stats() if self.worker is not None else {}
        logger.warning(
            "hardneg: generation was configured but no generated image reached training in %d steps (%d requests "
            "made; worker %s, %d image(s) produced%s): the generator is slower than training "
            "(wait_for_generation(), fewer images_per_refresh, a GPU worker_device) or failing (see the worker's "
            "log).", self.step, c["requests_made"], w.get("state", "?"), int(w.get("images_produced", 0) or 0),
            f", last error: {w['last_error']}" if w.get("last_error") else "")

    def _bank_from_state(self, state: dict[str, Any]) -> EmbeddingBank:
        if self.config.bank_sharding == "off" and self.config.bank_storage_path is None:
            return EmbeddingBank.from_state_dict(state, use_gpu=self.config.use_gpu_index)
        bank = self._make_bank(int(state["dim"]))  # sharded: keeps the vectors of its ids; or in its file
        bank.load_state_dict(state)
        return bank

    def _make_bank(self, dim: int) -> EmbeddingBank:
        c = self.config
        if c.embedding_dim is not None and dim != c.embedding_dim:
            raise HardNegError(f"embeddings have dimension {dim}, config.embedding_dim is {c.embedding_dim}")
        return c.bank_options.make_bank(dim, c.num_classes)

    def _generator_space(self, images: Tensor, ids: Sequence[int]) -> Tensor:
        """Dataset (pipeline-space) images -> the generator's pixels; a clear error when out of range."""
        return self.requests.generator_space(images, ids)

    def _check_value_space(self) -> None:
        """Fail at construction, not at the first refresh, when the first source is out of range."""
        try:
            image = item_image(self.dataset[0]) if len(self.dataset) > 0 else None
        except Exception:  # noqa: BLE001 - an item the engine cannot read fails where it is used, at a refresh
            return
        if image is not None and image.ndim == 3 and (image.is_floating_point() or image.dtype == torch.uint8):
            self._generator_space(image.float().cpu().unsqueeze(0), [0])

    def _generator_factory(self, generator: GeneratorLike) -> Optional[Callable[[], Generator]]:
        if generator is None:
            if self.config.generator is None:
                return None
            from hardneg.generators.from_config import factory_from_config, require_generator_extras

            require_generator_extras(self.config.generator)
            self._named_generator = True
            return factory_from_config(self.config, self.class_names)
        if hasattr(generator, "generate"):
            return ObjectFactory(generator)  # the worker uses it as is, no copy (see ObjectFactory)
        if callable(generator):
            return generator
        raise HardNegError(f"generator must be a Generator, a factory or None, got {type(generator).__name__}")

    def _start_worker_checked(self) -> None:
        """Start the worker and wait until its generator is built, then check it fits the data.

        A generator that cannot start (bad path, wrong arguments, missing weights) or does not fit
        (classes, channels, fitted image size, device) fails here with the reason, with the hooks
        removed and the worker closed, instead of failing in the background after the restarts.
        """
        from hardneg.generators.from_config import check_compatible

        try:
            self.worker.start()
            info = self.worker.wait_until_ready(self.config.worker_start_timeout)
            what = f"generator={self.config.generator!r}" if self.config.generator else "the generator"
            # a named generator must know exactly the config's classes (the shipped 10-class digits model
            # does not serve a 5-class config); a generator of the user's may know a superset of the ids
            check_compatible(info, self.config.num_classes, self._dataset_image_shape(),
                             device=self.config.worker_device, what=what,
                             exact_classes=getattr(self, "_named_generator", False))
        except ValueError as exc:
            self.close()
            raise HardNegError(str(exc)) from exc
        except BaseException:
            self.close()
            raise

    def _dataset_image_shape(self) -> Optional[tuple[int, ...]]:
        """``(C, H, W)`` of the dataset's first image, or None when it has no tensor image there."""
        try:
            image = item_image(self.dataset[0])
        except Exception:  # noqa: BLE001 - e.g. PIL images before a transform: nothing to check
            return None
        return tuple(int(v) for v in image.shape) if image.ndim == 3 else None

    def _make_teacher(self, model: Optional[nn.Module], teacher_model: Optional[nn.Module]) -> Optional[Teacher]:
        kind = self.config.teacher
        if teacher_model is not None and kind != "model":
            raise HardNegError(f"teacher_model was given but config.teacher is {kind!r}: set teacher='model' to "
                               "score arriving images with it")
        if kind == "none":
            return None
        if kind == "model" and not isinstance(teacher_model, nn.Module):
            raise HardNegError("config.teacher='model' needs the teacher: HardNeg(config, ..., teacher_model=m) "
                               "with an nn.Module classifier over the same classes")
        if kind == "ema" and model is None:
            raise HardNegError("config.teacher='ema' keeps an EMA copy of the classifier: pass HardNeg(config, "
                               "model=...), or use teacher='model' with teacher_model=")
        return Teacher(kind, model=model, teacher_model=teacher_model, decay=self.config.teacher_decay,
                       warmup=self.config.teacher_warmup)

    def _split_real_synthetic(self, n_rows: int, n_ids: int,
                              record: Optional[_MixRecord] = None) -> tuple[int, list[tuple[int, int]]]:
        """How many leading rows are real, and the pairs of the synthetic rows after them (from
        ``record`` when given, else from the last ``mix``)."""
        m = record if record is not None else self._last_mix
        if m is not None and n_rows == m.n_total:
            if n_ids not in (m.n_in, m.n_real, m.n_total):
                raise HardNegError(
                    f"got {n_ids} ids for a mixed batch of {m.n_total} rows ({m.n_real} real): pass the ids of "
                    "the batch you gave to mix()"
                )
            return m.n_real, m.synthetic_pairs
        if n_ids != n_rows:
            raise HardNegError(f"got {n_ids} ids for {n_rows} embeddings")
        return n_rows, []

    def _curriculum_feedback(self, logits: Tensor, targets: Tensor, pairs: list[tuple[int, int]],
                             step: Optional[int] = None) -> None:
        step = self.step if step is None else step
        correct = (logits.argmax(1).cpu() == targets.cpu()).tolist()
        per_pair: dict[tuple[int, int], list[int]] = {}
        for pair, ok in zip(pairs, correct):
            per_pair.setdefault(pair, []).append(int(ok))
        for pair, oks in per_pair.items():
            self._curriculum.feedback(pair, sum(oks), len(oks), step)
        self._counters["synthetic_feedback"] += len(correct)
        self._counters["synthetic_correct"] += sum(correct)

    def _request_generation(self, plan: list[PlannedPair]) -> None:
        """Turn a targeting plan into worker requests (requests.py) and submit them."""
        cfg = self.config
        for req in self.requests.build(plan, self.curriculum, self.step):
            self._counters["requests_made"] += 1
            self._counters["images_requested"] += len(req.ratios)
            if cfg.deterministic and self._unsettled >= cfg.queue_size:
                # a full queue drops its oldest request, and which one depends on timing: wait here
                # instead; the results are held for the next hand-over like all the others
                self._held.extend(self.worker.drain())
                self._unsettled = 0
            self._unsettled += 1
            self.worker.submit(req)

    def _select_ada(self, result: GenerationResult, grid: tuple[float, ...]) -> GenerationResult:
        """Keep, per source, the image at the r right after the largest semantic jump (GeNIe-Ada,
        :func:`hardneg.generators.ada.ada_pick`): results embedded by the classifier, the sources'
        embeddings and the target class mean from the bank (no re-encoding of the sources)."""
        from hardneg.generators.ada import ada_pick

        g = len(grid)
        a, b = result.pair
        emb = torch.nn.functional.normalize(self.embed(result.images), dim=1)
        target_mean = torch.as_tensor(self.bank.class_means()[b])
        src_emb = emb.new_tensor(self.bank.get(result.source_ids[::g])[0])
        index, chosen_r, _ = ada_pick(emb, src_emb, target_mean.unsqueeze(0), grid)
        for r in chosen_r.tolist():
            self.curriculum.record_choice((a, b), float(r), self.step)
        return result.select(index + torch.arange(len(index)) * g)

    @property
    def _captured_embeddings(self) -> Optional[Tensor]:
        """The last embedding the forward hook captured (:class:`~hardneg.capture.ForwardCapture`)."""
        return self.capture.embeddings if self.capture is not None else None

    @_captured_embeddings.setter
    def _captured_embeddings(self, value: Optional[Tensor]) -> None:
        if self.capture is not None:
            self.capture.embeddings = value

    @property
    def _captured_logits(self) -> Optional[Tensor]:
        """The last ``(N, K)`` logits the forward hook captured."""
        return self.capture.logits if self.capture is not None else None

    @_captured_logits.setter
    def _captured_logits(self, value: Optional[Tensor]) -> None:
        if self.capture is not None:
            self.capture.logits = value


# ---------------------------------------------------------------------- helpers
_MAX_DEFERRED_UPSERTS = 1024  # steps held back during one background refresh at most; then upserts wait for it


def _record_of(mixed: Any) -> Optional[_MixRecord]:
    """What ``observe`` needs from a :class:`~hardneg.step.MixedStep` (None for anything else)."""
    if not isinstance(mixed, MixedStep):
        return None
    return _MixRecord(n_in=mixed.n_in, n_total=mixed.n_total, n_real=mixed.n_real, synthetic_pairs=mixed.pairs,
                      y=mixed.y, label_ids=mixed.batch.label_ids)


def _refresh_after(before: Optional[Future], confusion: ConfusionGraph, bank: EmbeddingBank, step: int) -> Any:
    """The background refresh: first let the observe work queued before it land in the bank (its
    errors surface on the training thread), then mine."""
    if before is not None:
        before.exception()  # waits; never raises here
    if len(bank) < 2:
        return None  # nothing to mine yet: not a refresh
    return confusion.refresh(bank, step)


def _module_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _module_float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32
