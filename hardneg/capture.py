"""Forward-hook capture of a classifier's embeddings and logits.

Serves the *forward* event of a training step: :class:`ForwardCapture` keeps the last
training-mode embedding (and, when asked, the ``(N, K)`` logits) of a model, so ``observe`` can be
called with labels and ids only. Callers: :class:`hardneg.HardNeg` (its capture, its
:meth:`~hardneg.HardNeg.embed`, silenced while the engine scores arrivals), and adapters that
need the local embedding before the engine sees it (``integrations/accelerate.py`` pops
``engine.capture`` to gather it across processes; it installs no hook of its own). Hook
functions are defined in this ``hardneg`` module, so :func:`hardneg.teacher.strip_hardneg_hooks`
recognises them on an EMA copy.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from torch import Tensor, nn

__all__ = ["CaptureError", "ForwardCapture", "register_embedding_hook"]


class CaptureError(ValueError):
    """The model has no layer the embedding can be captured from (name it with ``embedding_layer``)."""


def register_embedding_hook(model: nn.Module, embedding_layer: Optional[str], callback: Callable[[Tensor], None]) -> Any:
    """Call ``callback(embedding)`` on every forward of ``model``; returns the hook handle.

    The embedding is the output of ``embedding_layer`` when named; else the input of a timm
    model's classifier (``forward_head(x, pre_logits=True)``); else the input of the last
    ``nn.Linear``.
    """
    from hardneg.validation import HardNegError

    if embedding_layer is not None:
        try:
            layer = model.get_submodule(embedding_layer)
        except AttributeError as exc:
            raise HardNegError(f"model has no submodule {embedding_layer!r}") from exc
        return layer.register_forward_hook(lambda m, i, o: callback(o))
    head = None
    if hasattr(model, "get_classifier") and hasattr(model, "forward_head"):
        head = model.get_classifier()  # timm: its input is forward_head(pre_logits=True)
    if not isinstance(head, nn.Module):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    if head is None:
        raise HardNegError("cannot find the embedding: pass embedding_layer='name.of.layer'")
    return head.register_forward_pre_hook(lambda m, inputs: callback(inputs[0]))


class ForwardCapture:
    """Keeps the last embedding (and ``(N, num_classes)`` logits) a model computed in training mode.

    Args:
        model: the classifier to hook.
        embedding_layer: dotted name of the module whose output is the embedding (see
            :func:`register_embedding_hook` for the default).
        num_classes: capture the model's output as logits when it is ``(N, num_classes)``; ``None``
            captures embeddings only.

    ``embeddings`` / ``logits`` hold the last capture (``None`` after :meth:`clear`); eval-mode
    forwards are ignored unless inside :meth:`always` (the engine's ``embed``), and every forward
    is ignored inside :meth:`silenced` (the engine running the model to score arrivals).
    """

    def __init__(self, model: nn.Module, embedding_layer: Optional[str] = None,
                 num_classes: Optional[int] = None) -> None:
        self.model = model
        self.num_classes = num_classes
        self.embeddings: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None
        self.capture_always = False
        self.suppressed = False
        self._handles: list[Any] = [register_embedding_hook(model, embedding_layer, self._keep_embedding)]
        if num_classes is not None:
            self._handles.append(model.register_forward_hook(self._keep_logits))

    def _active(self) -> bool:
        return not self.suppressed and (self.model.training or self.capture_always)

    def _keep_embedding(self, tensor: Tensor) -> None:
        if self._active():
            self.embeddings = tensor.detach().flatten(1)

    def _keep_logits(self, module: nn.Module, inputs: Any, out: Any) -> None:
        logits = getattr(out, "logits", out)
        if self._active() and isinstance(logits, Tensor) and logits.ndim == 2 \
                and logits.shape[1] == self.num_classes:
            self.logits = logits.detach()

    def clear(self) -> None:
        """Forget the last capture."""
        self.embeddings = self.logits = None

    def pop(self) -> Optional[Tensor]:
        """The last embedding, forgotten here (an adapter taking it once per step)."""
        value, self.embeddings = self.embeddings, None
        return value

    @contextmanager
    def always(self) -> Iterator["ForwardCapture"]:
        """Capture eval-mode forwards too (the engine's ``embed``)."""
        self.capture_always = True
        try:
            yield self
        finally:
            self.capture_always = False

    @contextmanager
    def silenced(self) -> Iterator["ForwardCapture"]:
        """Capture nothing (the engine runs the model itself, e.g. to score arriving images)."""
        self.suppressed = True
        try:
            yield self
        finally:
            self.suppressed = False

    def remove(self) -> None:
        """Remove the hooks from the model (safe to call twice)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
