"""What the engine needs from a generation worker: :class:`WorkerProtocol`.

:class:`hardneg.worker.GenerationWorker` is the implementation the engine builds itself. An adapter
may pass another one in (``HardNeg(..., worker=...)``): an object with these methods, or a callable
that receives the worker the engine built (None where this process does not generate) and returns
the one to use, e.g. :meth:`hardneg.distributed.SharedWorker.wrapping` for several processes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

from hardneg.worker import GenerationRequest, GenerationResult

__all__ = ["WorkerArg", "WorkerProtocol"]


@runtime_checkable
class WorkerProtocol(Protocol):
    """Submit requests without blocking, collect finished results, report, stop."""

    @property
    def failed(self) -> bool:
        """True once the worker has given up (restart budget spent)."""

    def submit(self, request: GenerationRequest) -> bool:
        """Queue ``request``; never blocks."""

    def poll(self, max_items: Optional[int] = None) -> list[GenerationResult]:
        """Finished results, without blocking."""

    def drain(self, timeout: float = 600.0) -> list[GenerationResult]:
        """Wait for everything submitted, return the results."""

    def stats(self) -> dict[str, Any]:
        """Counters for ``HardNeg.stats()["worker"]``."""

    def close(self, timeout: float = 10.0) -> None:
        """Stop; safe to call twice."""


WorkerArg = Union[WorkerProtocol, Callable[[Any], WorkerProtocol], None]
