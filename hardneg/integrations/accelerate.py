"""Accelerate adapter: :class:`HardNegAccelerate`, one shared embedding bank on every rank.

Adoption in a plain Accelerate loop::

    hn = HardNegAccelerate(accelerator, cfg, model=model, dataset=train_set)
    accelerator.register_for_checkpointing(hn)          # save_state/load_state carry the engine
    for x, y, idx in loader:                            # idx: dataset sample ids
        x, y, w = hn.mix(x, y)                          # before forward
        logits = model(x)
        loss = (w * F.cross_entropy(logits, y, reduction="none")).sum() / w.sum()
        accelerator.backward(loss); opt.step(); opt.zero_grad()
        hn.observe(labels=y, logits=logits, ids=idx)    # after forward

The rule: every rank holds a full engine and every rank observes the *same* gathered batch.
``observe`` gathers the embeddings, labels, logits and ids of all processes
(``accelerator.gather``; real rows of rank 0, 1, ... first, then their synthetic rows) and feeds
that one batch to each rank's engine, so banks, confusion graphs and curricula stay identical and
the confused pairs equal those a single process finds on the same global batches. Sample ids must
be global dataset ids (they are when the dataset returns its own index).

Generation (``generate_on``): ``"main"`` runs the generator on the main process only and shares
its finished images with ``broadcast_object_list``; ``"all"`` runs a generator on every process,
each serving its share of the requests (request id modulo world size), and shares results with
``gather_object``. Either way every rank's buffer receives the same images in the same step. Each
rank draws its synthetic rows with its own seed, so the global batch holds different negatives.
The engine is given the process group (:class:`hardneg.distributed.AccelerateCommunicator`) and a
worker that shares results (:class:`hardneg.distributed.SharedWorker`); nothing of it is patched.

Collectives: ``mix`` (when generating) and ``observe`` are collective calls; call them on every
process each step, and pass ``logits`` on all ranks or on none. Per step: ``observe`` packs its
rows on the device and does one ``all_gather`` (:class:`hardneg.distributed.RowGather`; two on
the first step and when the batch grows); ``mix`` does one one-integer ``all_reduce``, and shares
generated results (pickled) only when some rank has any. Refreshes run inline (never on a
background thread) so that every rank re-mines at the same step. With ``deterministic=True``
generated images are handed over only at refreshes: every rank waits there for its generator to
finish what was requested, then the results are shared, so a seeded multi-process run repeats
exactly (``engine.wait_for_generation()`` is then collective too). ``register_for_checkpointing``
saves the main process's state; every rank loads it on ``load_state``.

Against a single process over the same global batches (``deterministic=True``): every rank makes
the same requests (ids, sources, r, seeds), so the same images with the same provenance are
generated. With ``generate_on="main"`` they enter every buffer in the single process's order;
with ``"all"`` in rank-gathered order (the same set). The *draws* differ by design (each rank draws
``synthetic_fraction`` of its local batch with a rank seed), so a curriculum fed by the drawn rows
(``"adaptive"``) may move r differently; a step-only one (``"linear"``...) keeps the images equal.

Label trust: with a teacher (``config.teacher``) every rank scores the shared results itself; an
EMA teacher follows the unwrapped model, identical on every rank, so the ranks agree on scores,
filtered images and the ``"band"`` curriculum. Soft labels from ``mix`` are ``(N, K)`` targets;
``observe`` takes them (generated rows are observed as their target class).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from hardneg._optional import require
from hardneg.config import HardNegConfig
from hardneg.confusion import PairScore
from hardneg.distributed import AccelerateCommunicator, GenerateOn, RowGather, SharedWorker
from hardneg.integrations._common import StepAdapter, flat_stats, generation_on, hard_labels
from hardneg.mixing import MixedBatch
from hardneg.plugin import GeneratorLike, HardNeg, HardNegError
from hardneg.step import MixedStep

A = require("accelerate", "accelerate")
_ops = require("accelerate.utils", "accelerate")

__all__ = ["GenerateOn", "HardNegAccelerate"]


class HardNegAccelerate(StepAdapter):
    """A :class:`hardneg.HardNeg` engine per process, fed the batch gathered from all processes.

    Args:
        accelerator: the loop's ``accelerate.Accelerator``.
        config: the engine's settings (the same on every rank).
        model: the classifier (prepared or not); a forward hook captures its embeddings (input
            of the last ``nn.Linear``, a timm model's pre-logits, or ``embedding_layer``'s output).
        class_names: class names.
        dataset: the training set, indexable by global sample id (GeNIe sources); needed on every
            rank when generating.
        generator: a generator or a zero-argument factory; ``None`` builds ``config.generator``.
        embedding_layer: dotted module name whose output is the embedding.
        generate_on: ``"main"`` (one generator, results broadcast; other ranks may pass
            ``generator=None`` and skip loading it) or ``"all"`` (one per process, requests split
            between them, results gathered).
        teacher_model: the classifier that scores arriving images when ``config.teacher="model"``
            (on every rank: each rank scores the shared results itself, identically).
        log_every_n_steps: every this many engine steps, when the accelerator has trackers
            (``accelerator.init_trackers``), send every counter of :meth:`stats` (``hardneg/...``)
            through ``accelerator.log(..., step=engine step)``; 0 turns it off.

    Construction is collective (the ranks agree on whether generation is on).
    """

    def __init__(
        self,
        accelerator: Any,
        config: HardNegConfig,
        model: Optional[nn.Module] = None,
        class_names: Optional[Sequence[str]] = None,
        dataset: Any = None,
        generator: GeneratorLike = None,
        embedding_layer: Optional[str] = None,
        generate_on: GenerateOn = "main",
        teacher_model: Optional[nn.Module] = None,
        log_every_n_steps: int = 50,
    ) -> None:
        if generate_on not in ("main", "all"):
            raise HardNegError(f"generate_on must be 'main' or 'all', got {generate_on!r}")
        self.accelerator = accelerator
        self.generate_on = generate_on
        self.rank = int(accelerator.process_index)
        self.world = int(accelerator.num_processes)
        has_generator = generation_on(config, generator)
        generating = has_generator
        if self.world > 1:  # collective: generation is on when any rank brought a generator
            generating = any(bool(v) for v in _ops.gather_object([has_generator]))
        here = generating and (generate_on == "all" or bool(accelerator.is_main_process))
        if here and not has_generator:
            raise HardNegError(f"generate_on={generate_on!r}: process {self.rank} needs the generator too")
        if generating and dataset is None:
            raise HardNegError("generation is on: pass dataset= (on every rank) to fetch sources by id")
        if getattr(config, "async_refresh", False):
            # Ranks must refresh at the same steps to stay identical; a background refresh finishes
            # whenever its thread does, so refreshes run inline here.
            config = config.replace(async_refresh=False)
        inner = accelerator.unwrap_model(model) if model is not None else None
        self.communicator = AccelerateCommunicator(accelerator)
        self.engine = HardNeg(
            config if here else config.replace(generator=None), model=inner, class_names=class_names,
            dataset=dataset, generator=generator if here else None, embedding_layer=embedding_layer,
            teacher_model=teacher_model, device=accelerator.device, communicator=self.communicator,
            worker=SharedWorker.wrapping(self.communicator, generate_on) if generating else None,
        )
        self.engine.dataset = dataset  # sources are fetched on every rank, also where nothing generates
        self._shared: Optional[SharedWorker] = self.engine.worker if generating else None  # type: ignore[assignment]
        # The engine's own forward capture (capture.py) of the unwrapped model: one hook, one code path.
        self._capture = self.engine.capture
        self._rows = RowGather(self.communicator)
        self._step = None
        self.log_every_n_steps = int(log_every_n_steps)

    # ------------------------------------------------------------------ training events
    def mix(self, x: Tensor, y: Tensor) -> MixedStep:
        """Add ready hard negatives to this rank's batch; returns the :class:`~hardneg.step.MixedStep`
        (unpacks as ``(x, y, weights)``; ``.loss(per_sample_loss)``). Collective."""
        if self._shared is not None and not self.engine.config.deterministic:
            self._shared.sync()  # deterministic: images arrive only at refreshes (a collective drain)
        return self._mix(x, y)

    def mix_batch(self, x: Tensor, y: Tensor) -> MixedBatch:
        """Like :meth:`mix` but returns the :class:`~hardneg.mixing.MixedBatch`. Collective."""
        return self.mix(x, y).batch

    def observe(
        self,
        labels: Tensor,
        logits: Optional[Tensor] = None,
        ids: Union[Tensor, Sequence[int], None] = None,
        embeddings: Optional[Tensor] = None,
    ) -> None:
        """Gather this step's rows from every process and record them in every rank's engine. Collective.

        Args:
            labels: ``(N,)`` labels (or ``(N, K)`` soft targets) of the batch returned by :meth:`mix`.
            logits: ``(N, K)`` model outputs (all ranks pass them, or none does); default the
                forward-hook capture of the last training forward.
            ids: global dataset ids of the batch passed to :meth:`mix`.
            embeddings: ``(N, D)``; default the forward-hook capture of the last training forward.
        """
        if ids is None:
            raise HardNegError("observe() needs ids: the global dataset sample ids of the batch")
        emb = embeddings if embeddings is not None else (self._capture.pop() if self._capture else None)
        if emb is None:
            raise HardNegError("no embeddings: pass embeddings=, or give HardNegAccelerate the model")
        ids_t = torch.as_tensor(ids).reshape(-1)
        n = int(emb.shape[0])
        captured = self._capture.logits if self._capture is not None else None
        if logits is None and captured is not None and int(captured.shape[0]) == n:
            # the engine's capture kept this rank's logits: gather them with the rows (the engine would
            # otherwise fall back to these local rows for the gathered batch, a row-count mismatch)
            logits = captured
        local, self._step = self._step, None
        mixed_here = local is not None and n == local.n_total
        labels = hard_labels(torch.as_tensor(labels), local.pairs if mixed_here else None).reshape(-1)
        if mixed_here:
            n_real, pairs = local.n_real, local.pairs
            if ids_t.numel() not in (local.n_in, local.n_real, local.n_total):
                raise HardNegError(f"got {ids_t.numel()} ids for a mixed batch of {n} rows ({n_real} real)")
        else:
            n_real, pairs = n, []
            if ids_t.numel() != n:
                raise HardNegError(f"got {ids_t.numel()} ids for {n} embeddings")
        if labels.shape[0] != n or (logits is not None and logits.shape[0] != n):
            raise HardNegError(f"labels/logits must have {n} rows like the embeddings")
        emb_all, labels_all, logits_all, ids_all, all_pairs = self._rows.gather(
            emb, labels, logits, ids_t, n_real, pairs)
        # The gathered batch is one mixed batch: its synthetic rows (at the end) are of these pairs.
        self.engine.observe(embeddings=emb_all, labels=labels_all, logits=logits_all, ids=ids_all,
                            synthetic_pairs=all_pairs)
        n_log = self.log_every_n_steps
        if n_log > 0 and self.engine.step % n_log == 0 and getattr(self.accelerator, "trackers", None):
            self.accelerator.log(flat_stats(self.stats()), step=self.engine.step)  # main process only

    # ------------------------------------------------------------------ engine passthrough
    def confusions(self, n: Optional[int] = None) -> list[PairScore]:
        """The most confused directed pairs (identical on every rank)."""
        return self.engine.confusions(n)

    def stats(self) -> dict[str, Any]:
        """The engine's counters plus this rank's index and the world size."""
        return {**self.engine.stats(), "rank": self.rank, "world_size": self.world}

    def state_dict(self) -> dict[str, Any]:
        """The engine state (``accelerator.save_state`` writes the main process's)."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore an engine state on this rank (its buffer draws keep a per-rank seed)."""
        self.engine.load_state_dict(state)

    def close(self) -> None:
        """Stop the generator and remove the hooks (the engine's capture). Safe to call twice."""
        self.engine.close()

