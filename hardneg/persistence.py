"""The engine's saved state: its format, the check before a load, finished results as plain tensors.

Serves :meth:`hardneg.HardNeg.state_dict` / :meth:`~hardneg.HardNeg.load_state_dict` (and ``save`` /
``load``, through :mod:`hardneg.checkpoint`): :func:`check_state` says what does not fit before
anything changes, :func:`result_state` / :func:`result_from_state` carry finished generation
results not yet in the buffer (``held``) in a state that loads with ``weights_only=True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from hardneg.config import HardNegConfig
from hardneg.validation import HardNegError
from hardneg.worker import GenerationRequest, GenerationResult

if TYPE_CHECKING:  # pragma: no cover
    from hardneg.bank import EmbeddingBank
    from hardneg.teacher import Teacher

__all__ = ["STATE_FORMAT", "STATE_KEYS", "check_state", "result_from_state", "result_state"]

STATE_FORMAT = 1
STATE_KEYS = ("format", "config", "class_names", "step", "bank", "confusion", "curriculum", "buffer", "pairs",
              "source_cursor", "next_request_id", "counters")


def check_state(state: Any, config: HardNegConfig, bank: Optional[EmbeddingBank], teacher: Optional[Teacher]) -> None:
    """Raise :class:`HardNegError` when ``state`` cannot be loaded into an engine of ``config`` holding
    ``bank`` and ``teacher`` (checks everything, changes nothing)."""
    if not isinstance(state, dict):
        raise HardNegError(f"a HardNeg state is a dict (from state_dict()), got {type(state).__name__}")
    if state.get("format") != STATE_FORMAT:
        raise HardNegError(f"unknown HardNeg state format {state.get('format')!r} (expected {STATE_FORMAT})")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise HardNegError(f"the state lacks {missing}: not written by HardNeg.state_dict()")
    try:
        saved = HardNegConfig.from_dict(state["config"])
    except (ValueError, TypeError) as exc:
        raise HardNegError(f"the state's config is invalid: {exc}") from None
    if saved.num_classes != config.num_classes:
        raise HardNegError(
            f"state was saved with num_classes={saved.num_classes}, this engine has {config.num_classes}"
        )
    saved_bank = state["bank"]
    if saved_bank is not None:
        dim = int(saved_bank["dim"])
        want = config.embedding_dim if config.embedding_dim is not None else (
            bank.dim if bank is not None and len(bank) else None)
        if want is not None and dim != want:
            raise HardNegError(f"state holds {dim}-dimensional embeddings, this engine's are {want}-dimensional "
                               "(config.embedding_dim or its bank): was it saved with another model?")
        vectors = saved_bank["vectors"]
        if tuple(vectors.shape[1:]) != (dim,) or len(saved_bank["ids"]) != vectors.shape[0]:
            raise HardNegError(f"the state's bank is inconsistent: dim {dim}, vectors {tuple(vectors.shape)}, "
                               f"{len(saved_bank['ids'])} ids")
    capacity = int(state["buffer"]["capacity"])
    if capacity != config.buffer_size:
        raise HardNegError(f"state was saved with buffer_size={capacity}, this engine has "
                           f"{config.buffer_size}: build it with config.replace(buffer_size={capacity})")
    saved_teacher = state.get("teacher")
    if teacher is not None and saved_teacher is not None and saved_teacher.get("kind") != teacher.kind:
        raise HardNegError(f"state holds a {saved_teacher.get('kind')!r} teacher, this engine's is {teacher.kind!r}")


def result_state(result: GenerationResult) -> dict[str, Any]:
    """A finished result as plain tensors and numbers (part of :meth:`hardneg.HardNeg.state_dict`)."""
    r = result.request
    return {"request_id": r.request_id, "pair": list(r.pair), "source_ids": r.source_ids.clone(),
            "source_labels": r.source_labels.clone(), "target_labels": r.target_labels.clone(),
            "ratios": r.ratios.clone(), "step": r.step, "seed": r.seed, "images": result.images.clone(),
            "seconds": float(result.seconds), "queue_wait": float(result.queue_wait)}


def result_from_state(state: dict[str, Any]) -> GenerationResult:
    """The :class:`~hardneg.worker.GenerationResult` :func:`result_state` wrote (on the CPU)."""
    req = GenerationRequest(
        request_id=state["request_id"], pair=tuple(state["pair"]), source_ids=state["source_ids"], sources=None,
        source_labels=state["source_labels"], target_labels=state["target_labels"], ratios=state["ratios"],
        step=state["step"], seed=state["seed"],
    )
    return GenerationResult(req, state["images"].to("cpu"), float(state["seconds"]), float(state["queue_wait"]))
