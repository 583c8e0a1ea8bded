"""``torch.compile`` of a generator's denoiser, built where it runs and fed one fixed batch size.

Two things go wrong when a generator simply calls ``unet.compile()`` at construction:

* the compiled code does not travel: a deep copy or a pickle to the worker process silently keeps
  the plain module (or fails to pickle), so the worker runs uncompiled;
* static shapes recompile every time the UNet batch changes, and it changes all the time: GeNIe
  groups samples by their noise ratio r, and a request's last chunk is short.

:class:`CompiledDenoiser` fixes both. It holds only the module and the compile settings (it pickles
and deep-copies as the plain module, and compiles lazily on first use, i.e. inside the worker), and
:meth:`CompiledDenoiser.__call__` runs the module on batches of exactly ``batch`` rows: a call
with more rows is split, a short one padded with copies of its last row (the padded outputs are
dropped; denoisers treat rows independently). So one shape is ever compiled, and the generator's
``warmup()`` at worker start pays for that compile before the first request. Dynamic shapes
(``dynamic=True``) were the alternative; on the diffusers UNet they still specialise some batch
sizes (a guard ``2 <= batch <= 15`` was seen), so the fixed batch is the predictable choice.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["CompileSpec", "CompiledDenoiser", "compile_backend"]

CompileSpec = Union[bool, str, Callable[..., Any], None]


def compile_backend(spec: CompileSpec) -> Optional[Union[str, Callable[..., Any]]]:
    """``True`` -> ``"inductor"``; a backend name or callable as is; ``False``/``None`` -> None (no compile)."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return "inductor"
    if isinstance(spec, str) or callable(spec):
        return spec
    raise ValueError(f"compile must be True/False, a torch.compile backend name or a backend callable, got {spec!r}")


class CompiledDenoiser:
    """Call ``module`` through ``torch.compile(backend=backend, dynamic=False)`` on batches of ``batch`` rows.

    Every tensor argument (also inside dicts, e.g. SDXL's ``added_cond_kwargs``) whose first
    dimension equals the first argument's row count is split and padded alongside it; others (a
    0-d timestep, a shared embedding) are passed as they are. Outputs (a tensor, a tuple of tensors
    or a diffusers output with ``.sample``) are concatenated back and cut to the real rows.
    ``compiles`` counts the graphs handed to the backend in this process (one per graph piece on
    the first call; a later increase is a recompile).
    """

    def __init__(self, module: nn.Module, backend: Union[str, Callable[..., Any]], batch: int) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"the compiled batch must be an integer >= 1, got {batch!r}")
        self.module = module
        self.backend = backend
        self.batch = batch
        self._counter: Optional[_CountingBackend] = None
        self._compiled: Optional[Callable[..., Any]] = None

    @property
    def compiles(self) -> int:
        return 0 if self._counter is None else self._counter.calls

    def __getstate__(self) -> dict[str, Any]:  # pickles / deep-copies without the compiled code
        state = dict(self.__dict__)
        state["_compiled"] = state["_counter"] = None
        return state

    def _fn(self) -> Callable[..., Any]:
        if self._compiled is None:
            self._counter = _CountingBackend(self.backend)
            self._compiled = torch.compile(self.module, backend=self._counter, dynamic=False)
        return self._compiled

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        n = int(x.shape[0])
        fn = self._fn()
        outs = []
        for start in range(0, n, self.batch):
            stop = min(n, start + self.batch)
            cut = (lambda v: _rows(v, n, start, stop, self.batch))
            outs.append(fn(cut(x), *[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()}))
        return _merge(outs, n)


class _CountingBackend:
    """A ``torch.compile`` backend counting the graphs it compiles, then handing them to ``backend``.

    A module-level class, not a closure: some libraries (Lightning) record the compile arguments
    on the module, which must still pickle (the process worker sends the generator to its child).
    """

    def __init__(self, backend: Union[str, Callable[..., Any]]) -> None:
        self.backend = backend
        self.calls = 0

    def __call__(self, gm: Any, example_inputs: Any, **kw: Any) -> Any:
        self.calls += 1
        real = self.backend
        if isinstance(real, str):
            from torch._dynamo import lookup_backend

            real = lookup_backend(real)
        return real(gm, example_inputs, **kw)

    def __getstate__(self) -> dict[str, Any]:
        return {"backend": self.backend, "calls": 0}


def _rows(value: Any, n: int, start: int, stop: int, batch: int) -> Any:
    """``value[start:stop]`` padded to ``batch`` rows when it is a per-row tensor of ``n`` rows."""
    if isinstance(value, dict):
        return {k: _rows(v, n, start, stop, batch) for k, v in value.items()}
    if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == n:
        part = value[start:stop]
        short = batch - part.shape[0]
        if short > 0:
            part = torch.cat([part, part[-1:].expand(short, *part.shape[1:])])
        return part
    return value


def _merge(outs: list[Any], n: int) -> Any:
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.cat(outs)[:n]
    if isinstance(first, (tuple, list)):
        return type(first)(_merge([o[i] for o in outs], n) for i in range(len(first)))
    if hasattr(first, "sample"):  # diffusers BaseOutput (UNet2DOutput, UNet2DConditionOutput)
        return type(first)(sample=_merge([o.sample for o in outs], n))
    raise TypeError(f"cannot merge denoiser outputs of type {type(first).__name__}")
