"""Generator backends behind one protocol, and :func:`load_generator`, the by-name factory.

``load_generator(name, path, **kwargs)`` is a module-level function so
``functools.partial(load_generator, "class-conditional", path)`` pickles: the generation worker
process builds its generator from such a factory. Backends are imported on first use, so
importing this package does not import diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import torch

from hardneg.generators.base import Generator, GeneratorError
from hardneg.registry import Registry

__all__ = [
    "AdaResult",
    "ada_pick",
    "ClassConditionalConfig",
    "ClassConditionalGenerator",
    "Generator",
    "GeneratorError",
    "GENERATORS",
    "choose_ratio",
    "default_digits_generator_path",
    "genie_ada",
    "load_generator",
]

_LAZY = {
    "ClassConditionalGenerator": "hardneg.generators.class_conditional",
    "ClassConditionalConfig": "hardneg.generators.class_conditional",
    "default_digits_generator_path": "hardneg.generators.class_conditional",
    "AdaResult": "hardneg.generators.ada",
    "ada_pick": "hardneg.generators.ada",
    "choose_ratio": "hardneg.generators.ada",
    "genie_ada": "hardneg.generators.ada",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hardneg.generators' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def load_generator(name: str, path: Optional[str] = None, **kwargs: Any) -> Generator:
    """Build the generator backend ``name`` (a name of :data:`GENERATORS`) from ``path``.

    ``"class-conditional"``: :meth:`ClassConditionalGenerator.load(path, **kwargs)
    <hardneg.generators.class_conditional.ClassConditionalGenerator.load>`; ``path=None`` loads the
    digits generator shipped with hardneg; it also takes ``compile`` (``torch.compile`` the UNet:
    True or a backend; :meth:`~hardneg.generators.class_conditional.ClassConditionalGenerator.compile`),
    ``max_batch_size`` (samples per UNet call) and ``dtype`` (float32 only). ``"stable-diffusion"``:
    ``StableDiffusionGenerator.from_pretrained(path, **kwargs)`` (a local folder or hub id).
    The returned generator's ``source_path`` is the folder or id it came from.
    """
    if name not in GENERATORS:
        raise GeneratorError(f"unknown generator {name!r}; choose one of {list(GENERATORS)}")
    return GENERATORS.build(name, path, **kwargs)


def _load_class_conditional(path: Optional[str] = None, **kwargs: Any) -> Generator:
    from hardneg.generators.class_conditional import ClassConditionalGenerator, default_digits_generator_path

    folder = path if path is not None else default_digits_generator_path()
    compile_ = kwargs.pop("compile", False)
    max_batch = kwargs.pop("max_batch_size", None)
    dtype = kwargs.pop("dtype", None)
    if dtype not in (None, "fp32", "float32", "float") and dtype is not torch.float32:
        raise GeneratorError(f"the class-conditional generator runs in float32, got dtype={dtype!r}")
    gen = ClassConditionalGenerator.load(folder, **kwargs)
    if max_batch is not None:
        gen.max_batch = int(max_batch)
    if compile_:
        gen.compile(compile_)  # lazily, where it runs: the worker (warmup at its start)
    gen.source_path = str(folder)
    return gen


def _load_stable_diffusion(path: Optional[str] = None, **kwargs: Any) -> Generator:
    if path is None:
        raise GeneratorError(
            "the stable-diffusion generator needs a path: a local model folder or hub id")
    from hardneg.generators.stable_diffusion import StableDiffusionGenerator

    sd = StableDiffusionGenerator.from_pretrained(path, **kwargs)
    sd.source_path = str(path)
    return sd


# The generators HardNegConfig(generator=name) can build, by name: a loader ``(path, **kwargs) ->
# Generator`` each (module-level, so functools.partial(load_generator, name, ...) pickles). A new
# backend is one module plus one GENERATORS.register(name, loader) line.
GENERATORS: Registry[Generator] = Registry("generator")
GENERATORS.register("class-conditional", _load_class_conditional)
GENERATORS.register("stable-diffusion", _load_stable_diffusion)
