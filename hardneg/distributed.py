"""Several processes, one shared engine state: :class:`Communicator`, :class:`SharedWorker`, :class:`RowGather`.

The engine itself knows nothing of processes. An adapter that runs one engine per rank (the
Accelerate one) passes in

- a :class:`Communicator` (``HardNeg(..., communicator=...)``): the rank and world size, and the
  few collectives the adapter needs. The engine uses the rank only to give every rank's buffer its
  own draws (rank 0 draws as a single process would);
- a worker (``HardNeg(..., worker=SharedWorker.wrapping(comm, mode))``): the engine builds its
  own generation worker where this rank generates and hands it to the wrapper, which shares the
  finished results so every rank's buffer receives the same images in the same step.

Per step the traffic is small and fixed: :class:`RowGather` packs the observed rows on the device
(float32 values, int64 labels/ids/pairs bit-cast into float32 columns, so they travel exactly),
pads them to a row count every rank knows, and needs one ``all_gather``; :class:`SharedWorker`
exchanges results only when a one-integer ``all_reduce`` says some rank has something to share.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor

from hardneg.worker import GenerationRequest, GenerationResult

__all__ = ["AccelerateCommunicator", "Communicator", "GenerateOn", "LocalCommunicator", "RowGather", "SharedWorker"]

GenerateOn = Literal["main", "all"]


@runtime_checkable
class Communicator(Protocol):
    """What the engine and its shared worker need from a process group."""

    rank: int
    world: int
    device: torch.device

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (same shape everywhere), concatenated along dim 0 in rank order."""

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over ranks."""

    def broadcast_objects(self, objects: list[Any], src: int = 0) -> list[Any]:
        """``objects`` of rank ``src`` on every rank (pickled)."""

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (pickled)."""


class LocalCommunicator:
    """One process: every collective is the identity."""

    rank = 0
    world = 1

    def __init__(self, device: Any = "cpu") -> None:
        self.device = torch.device(device)
        self.calls: dict[str, int] = {}

    def all_gather(self, tensor: Tensor) -> Tensor:
        return tensor

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def broadcast_objects(self, objects: list[Any], src: int = 0) -> list[Any]:
        return objects

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]


class AccelerateCommunicator:
    """:class:`Communicator` over an ``accelerate.Accelerator``'s process group (counts its calls in
    :attr:`calls`, so tests and benchmarks can check the traffic per step)."""

    def __init__(self, accelerator: Any) -> None:
        from hardneg._optional import require

        self._ops = require("accelerate.utils", "accelerate")
        self.accelerator = accelerator
        self.rank = int(accelerator.process_index)
        self.world = int(accelerator.num_processes)
        self.device = torch.device(accelerator.device)
        self.calls: dict[str, int] = {"all_gather": 0, "all_reduce": 0, "broadcast_objects": 0, "gather_objects": 0}

    def all_gather(self, tensor: Tensor) -> Tensor:
        self.calls["all_gather"] += 1
        if self.world == 1:
            return tensor
        return self._ops.gather(tensor.to(self.device))

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        self.calls["all_reduce"] += 1
        if self.world == 1:
            return tensor
        return self._ops.reduce(tensor.to(self.device), reduction="sum")

    def broadcast_objects(self, objects: list[Any], src: int = 0) -> list[Any]:
        self.calls["broadcast_objects"] += 1
        if self.world == 1:
            return objects
        return self._ops.broadcast_object_list(objects, from_process=src)

    def gather_objects(self, obj: Any) -> list[Any]:
        self.calls["gather_objects"] += 1
        if self.world == 1:
            return [obj]
        return self._ops.gather_object([obj])


# ---------------------------------------------------------------------- one all_gather per step
_META = 5  # int64 columns: label, id, pair a, pair b, kind (0 padding, 1 real, 2 generated)


class RowGather:
    """Concatenate every rank's observed rows with one ``all_gather`` per step.

    A row is ``[embedding | logits | meta]``: float32 values, then the five int64 meta values bit-cast
    to ten float32 columns (a gather copies bytes, so the ids come back exact). Every rank pads to
    :attr:`capacity` rows; row 0 is a header holding the rank's row count and width. When a rank
    needs more rows than the capacity, every rank sees it in the headers and the step repeats the
    gather once with the larger capacity (the first step, and a batch-size change, cost two).
    """

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm
        self.capacity = 0

    def gather(self, emb: Tensor, labels: Tensor, logits: Optional[Tensor], real_ids: Tensor, n_real: int,
               pairs: list[tuple[int, int]]) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, list[tuple[int, int]]]:
        """``(embeddings, labels, logits, real ids, synthetic pairs)`` of the whole step: real rows of
        rank 0, 1, ... first, then their generated rows (on the communicator's device)."""
        device = self.comm.device
        n = int(emb.shape[0])
        meta = torch.zeros(n, _META, dtype=torch.int64, device=device)
        meta[:, 0] = labels.to(device, torch.int64, non_blocking=True)
        meta[:n_real, 1] = real_ids[:n_real].to(device, torch.int64, non_blocking=True)
        meta[:n_real, 4] = 1
        if pairs:
            meta[n_real:, 2:4] = torch.tensor(pairs, dtype=torch.int64).to(device, non_blocking=True)
        meta[n_real:, 4] = 2
        parts = [emb.detach().to(device, torch.float32)]
        if logits is not None:
            parts.append(logits.detach().to(device, torch.float32))
        parts.append(meta.view(torch.float32))  # bit-cast: (n, 10) float32 words
        rows = torch.cat(parts, dim=1)
        width = int(rows.shape[1])
        while True:
            cap = max(self.capacity, 0)
            packed = torch.zeros(cap + 1, width, dtype=torch.float32, device=device)
            header = torch.tensor([n, width], dtype=torch.int64)
            packed[0, :4] = header.view(torch.float32).to(device)
            if cap >= n:
                packed[1 : n + 1] = rows
            gathered = self.comm.all_gather(packed).cpu().view(self.comm.world, cap + 1, width)
            heads = _as_int64(gathered[:, 0, :4])  # (world, 2): rows, width
            widths = set(heads[:, 1].tolist())
            if len(widths) != 1:
                from hardneg.plugin import HardNegError

                raise HardNegError(f"ranks observed rows of different widths {heads[:, 1].tolist()}: pass logits on "
                                   "all ranks or on none, and use the same model on every rank")
            need = int(heads[:, 0].max())
            if need <= cap:
                break
            self.capacity = need  # every rank computes the same: gather again with room for everyone
        counts = heads[:, 0].tolist()
        every = torch.cat([gathered[r, 1 : 1 + c] for r, c in enumerate(counts)])
        d = int(emb.shape[1])
        k = int(logits.shape[1]) if logits is not None else 0
        meta_all = _as_int64(every[:, d + k :])
        syn = meta_all[:, 4] == 2
        order = torch.cat([(~syn).nonzero().flatten(), syn.nonzero().flatten()])
        every, meta_all = every[order], meta_all[order]
        n_real_all = int((~syn).sum())
        all_pairs = [(int(a), int(b)) for a, b in meta_all[n_real_all:, 2:4].tolist()]
        return (every[:, :d], meta_all[:, 0], every[:, d : d + k] if k else None, meta_all[:n_real_all, 1],
                all_pairs)


def _as_int64(words: Tensor) -> Tensor:
    """``(n, 2m)`` float32 words back to the ``(n, m)`` int64 values they hold (bit-cast)."""
    n = int(words.shape[0])
    if n == 0:
        return torch.zeros(0, int(words.shape[1]) // 2, dtype=torch.int64)
    return words.contiguous().reshape(-1).view(torch.int64).reshape(n, -1)


# ---------------------------------------------------------------------- shared generation
class SharedWorker:
    """Takes the engine's worker slot so every rank's engine receives the same generated results.

    ``real`` is this rank's own :class:`~hardneg.worker.GenerationWorker` (None on ranks that do not
    generate). ``generate_on="main"``: rank 0 serves every request; ``"all"``: request ``i`` is
    served by rank ``i % world``. :meth:`sync` (collective, once per step before ``mix``) shares
    what the local generators finished: one integer ``all_reduce`` first, and the results (pickled)
    only when some rank has any.
    """

    def __init__(self, comm: Communicator, real: Any, mode: GenerateOn = "main") -> None:
        if mode not in ("main", "all"):
            raise ValueError(f"generate_on must be 'main' or 'all', got {mode!r}")
        self.comm = comm
        self.real = real
        self.mode = mode
        self._inbox: list[GenerationResult] = []
        self._failed = False
        self._local: list[GenerationResult] = []
        self._sent_failed = False  # the failure state this rank last shared
        self.received = 0
        self.exchanges = 0

    @classmethod
    def wrapping(cls, comm: Communicator, mode: GenerateOn = "main") -> Any:
        """A ``HardNeg(worker=...)`` factory: called with the worker the engine built (or None)."""
        return lambda real: cls(comm, real, mode)

    # ------------------------------------------------------------------ the worker protocol
    def start(self) -> "SharedWorker":
        if self.real is not None and not getattr(self.real, "alive", False):
            self.real.start()
        return self

    def _serves(self, request: GenerationRequest) -> bool:
        if self.mode == "main":
            return self.comm.rank == 0
        return request.request_id % self.comm.world == self.comm.rank

    def submit(self, request: GenerationRequest) -> bool:
        if self.real is not None and self._serves(request):
            return self.real.submit(request)
        return True  # another rank generates it

    @property
    def failed(self) -> bool:
        """Whether generation has given up (main mode: the main's worker; all mode: every rank's)."""
        return self._failed

    @property
    def alive(self) -> bool:
        return self.real.alive if self.real is not None else not self._failed

    def sync(self) -> None:
        """Collective: share what the local generators finished, if any rank has something."""
        if self.real is not None:
            self._local.extend(self.real.poll())
        failed = bool(self.real.failed) if self.real is not None else False
        news = len(self._local) + int(failed != self._sent_failed)
        if self.comm.world > 1:
            news = int(self.comm.all_reduce_sum(torch.tensor([news], dtype=torch.int64)).item())
        if news:
            local, self._local = self._local, []
            self._exchange(local, failed)

    def drain(self, timeout: float = 600.0) -> list[GenerationResult]:
        """Collective: every rank waits for its own generator to settle, then all results are shared.

        The deterministic hand-over: called at the same step on every rank (an inline refresh), so
        every rank's buffer receives the same images at the same step whatever the generators' speed.
        """
        local, self._local = self._local, []
        if self.real is not None:
            local += self.real.drain(timeout)
        self._exchange(local, bool(self.real.failed) if self.real is not None else False)
        return self.poll()

    def _exchange(self, local: list[GenerationResult], failed: bool) -> None:
        self.exchanges += 1
        self._sent_failed = failed
        if self.comm.world == 1:
            shared = local
        elif self.mode == "main":
            box: list[Any] = [(local, failed) if self.comm.rank == 0 else None]
            shared, failed = self.comm.broadcast_objects(box, src=0)[0]
        else:
            parts = self.comm.gather_objects((local, failed))
            shared = [r for results, _ in parts for r in results]
            failed = all(f for _, f in parts)
        self._failed = failed
        self.received += sum(len(r) for r in shared)
        self._inbox.extend(shared)

    def poll(self, max_items: Optional[int] = None) -> list[GenerationResult]:
        n = len(self._inbox) if max_items is None else min(max_items, len(self._inbox))
        out, self._inbox = self._inbox[:n], self._inbox[n:]
        return out

    def stats(self) -> dict[str, Any]:
        base = self.real.stats() if self.real is not None else {"backend": "shared", "alive": False,
                                                                 "images_per_s": 0.0}
        return {**base, "generate_on": self.mode, "images_shared_in": self.received, "exchanges": self.exchanges}

    def close(self, timeout: float = 10.0) -> None:
        if self.real is not None:
            self.real.close(timeout=timeout)
