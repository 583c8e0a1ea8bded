"""Teacher: the classifier that judges fresh generated images before anyone trains on them.

Two kinds (``HardNegConfig.teacher``):

* ``"ema"``: an exponential moving average of the classifier being trained (timm's
  ``ModelEmaV3``), updated by the engine at every observed training step. It lags the model, so
  it is steadier than the model itself and is never pulled by the very images it judges. The copy
  has ``requires_grad=False``, is not a submodule of the user's model (no optimizer sees it) and
  carries none of hardneg's forward hooks (a deep copy would otherwise copy the engine's
  embedding/logit capture with it and overwrite the training step's capture).
* ``"model"``: a classifier the user passes (``HardNeg(..., teacher_model=m)``), e.g. a
  pretrained one; the engine never changes its weights.

:meth:`Teacher.logits` runs it in eval mode without gradients, batched.

Serves ``observe`` (``update``: one EMA step) and arrival (``logits``: scoring fresh images).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def strip_hardneg_hooks(module: nn.Module) -> int:
    """Remove from ``module`` (and its submodules) every forward hook hardneg registered; returns how many.

    A hook is hardneg's when its function was defined in a ``hardneg`` module (the engine's capture
    hooks, the Accelerate adapter's capture); the user's own hooks (e.g. weight norm) stay.
    """
    removed = 0
    for m in module.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks"):
            hooks = getattr(m, name, None) or {}
            for hid in [h for h, fn in hooks.items() if _is_hardneg(fn)]:
                del hooks[hid]
                for flags in _HOOK_FLAGS:  # per-hook flags keyed by the same (globally unique) id
                    getattr(m, flags, {}).pop(hid, None)
                removed += 1
    return removed


def _is_hardneg(fn: Any) -> bool:
    mod = getattr(fn, "__module__", None) or getattr(getattr(fn, "func", None), "__module__", None) or ""
    return mod == "hardneg" or mod.startswith("hardneg.")


class Teacher:
    """Scores images for the engine; holds an EMA copy of the classifier or a user's model.

    Args:
        kind: ``"ema"`` or ``"model"``.
        model: the classifier being trained (``"ema"`` copies it).
        teacher_model: the user's teacher (``"model"``).
        decay: EMA decay per update (``"ema"``).
        warmup: ramp the decay up from 0 over the first updates (timm's ``use_warmup``), so an
            early teacher follows the model instead of its random initialisation.
    """

    def __init__(self, kind: str, model: Optional[nn.Module] = None, teacher_model: Optional[nn.Module] = None,
                 decay: float = 0.99, warmup: bool = True) -> None:
        if kind not in ("ema", "model"):
            raise ValueError(f"teacher kind must be 'ema' or 'model', got {kind!r}")
        self.kind = kind
        self.updates = 0
        self._ema: Any = None
        if kind == "ema":
            if model is None:
                raise ValueError("teacher='ema' copies the classifier: construct HardNeg(config, model=...)")
            from timm.utils import ModelEmaV3

            self._ema = ModelEmaV3(model, decay=float(decay), use_warmup=bool(warmup))
            strip_hardneg_hooks(self._ema.module)
            self._ema.requires_grad_(False)
            self.module: nn.Module = self._ema.module
        else:
            if not isinstance(teacher_model, nn.Module):
                raise ValueError("teacher='model' needs HardNeg(..., teacher_model=m) with an nn.Module")
            self.module = teacher_model

    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights (a no-op for a user's teacher)."""
        if self._ema is None:
            return
        device = _module_device(model)
        if _module_device(self.module) != device:  # the model moved (e.g. .to("cuda") after HardNeg(...))
            self.module.to(device)
            if hasattr(self._ema, "_sr_generator"):  # timm's bf16 rounding RNG lives on the EMA's device
                self._ema._sr_generator = torch.Generator(device=device).manual_seed(
                    int(getattr(self._ema, "stochastic_rounding_seed", 0)))
        self.updates += 1
        self._ema.update(model, step=self.updates)

    @torch.no_grad()
    def logits(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """The teacher's logits of ``images`` (eval mode, no grad), float32 on the CPU."""
        m = self.module
        was_training = m.training
        device = _module_device(m)
        m.eval()
        out = []
        try:
            for start in range(0, images.shape[0], batch_size):
                out.append(output_logits(m(images[start : start + batch_size].to(device))).float().cpu())
        finally:
            m.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, 0)

    def state_dict(self) -> dict[str, Any]:
        """EMA weights and update count (``"model"``: nothing; the user owns that model)."""
        state: dict[str, Any] = {"kind": self.kind, "updates": self.updates}
        if self._ema is not None:
            state["ema"] = {k: v.detach().cpu().clone() for k, v in self._ema.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output of the same kind of teacher."""
        if state.get("kind") != self.kind:
            raise ValueError(f"teacher state is for {state.get('kind')!r}, this teacher is {self.kind!r}")
        self.updates = int(state["updates"])
        if self._ema is not None:
            self._ema.load_state_dict(state["ema"])


def output_logits(out: Any) -> Tensor:
    """The logits of a model output: a tensor, an object/dict with ``logits``, or a tuple's first item."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _module_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
