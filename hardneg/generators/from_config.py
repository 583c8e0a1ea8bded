"""The generator a :class:`~hardneg.config.HardNegConfig` names: its factory and its fit to the data.

:func:`factory_from_config` turns ``config.generator`` / ``config.generator_path`` plus what the
engine knows (class names, ``worker_device``, dtype, steps, prompts, scheduler, resolution,
compile, max batch) into a picklable zero-argument factory, so the thread and the process worker
build the same generator. :func:`generator_info` describes a built generator in a small picklable
dict (the worker sends it back once the generator is loaded) and :func:`check_compatible` compares
that description with the data and the config, so a generator that cannot serve this data fails
``HardNeg(...)`` with how to get a matching one instead of producing wrong images in the background.
:class:`GenerationOptions` are generation's typed settings (generator and worker), validated when
a :class:`~hardneg.config.HardNegConfig` is built. Serves engine construction (the worker's factory
and the fit check) and ``HardNegConfig`` validation.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from hardneg._optional import MissingExtraError

__all__ = ["GenerationOptions", "check_compatible", "factory_from_config", "generator_info",
           "require_generator_extras"]

FIT_HINT = ("fit one on your data: hardneg fit-generator --data PATH --out FOLDER (add --channels / "
            "--data-size to match your images) and use FOLDER as the generator path")

# extras each backend needs, as (module, pip extra)
_EXTRAS = {"class-conditional": (("diffusers", "diffusers"),),
           "stable-diffusion": (("diffusers", "diffusers"), ("transformers", "diffusers"))}


def require_generator_extras(name: str) -> None:
    """Raise :class:`MissingExtraError` with the install command when backend ``name`` lacks a package.

    Checked without importing the package (the worker imports it), so building an engine in the
    training process stays cheap.
    """
    for module, extra in _EXTRAS.get(name, ()):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(
                f"generator={name!r} needs {module!r}, which is not installed. Install it with: "
                f"pip install 'hardneg[{extra}]'")


def factory_from_config(config: Any, class_names: Sequence[str]) -> Callable[[], Any]:
    """A picklable factory building ``config.generator`` with every setting the config holds.

    ``config.generator_options`` are passed last, so they can override or add loader arguments
    (e.g. ``{"variant": "fp16", "local_files_only": True}`` for Stable Diffusion).
    """
    from hardneg.generators import load_generator

    name = config.generator
    kwargs: dict[str, Any] = {"device": str(config.worker_device)}
    if config.generator_steps is not None:
        kwargs["num_inference_steps"] = int(config.generator_steps)
    if config.guidance_scale is not None:
        kwargs["guidance_scale"] = float(config.guidance_scale)
    if config.generator_compile:
        kwargs["compile"] = True
    if config.generator_max_batch is not None:
        kwargs["max_batch_size"] = int(config.generator_max_batch)
    if config.generator_dtype is not None:
        kwargs["dtype"] = config.generator_dtype
    if name == "stable-diffusion":
        kwargs["class_names"] = list(class_names)
        for field, key in (("prompt_template", "prompt_template"), ("prompts", "prompts"),
                           ("generator_scheduler", "scheduler"), ("generator_resolution", "resolution")):
            value = getattr(config, field)
            if value is not None:
                kwargs[key] = value
    kwargs.update(config.generator_options)
    return functools.partial(load_generator, name, config.generator_path, **kwargs)


def generator_info(gen: Any) -> dict[str, Any]:
    """What the engine checks about a built generator: classes, channels, fitted size, device.

    Keys are present only when the generator tells: ``num_classes``; ``channels`` (the image
    channels it was built for; absent for backends that take 1 or 3); ``data_size`` ((H, W) of the
    images it was fitted on); ``device`` (str); ``kind`` (the class name) and ``path``.
    """
    info: dict[str, Any] = {"kind": type(gen).__name__}
    k = getattr(gen, "num_classes", None)
    if isinstance(k, int):
        info["num_classes"] = int(k)
    cfg = getattr(gen, "config", None)
    channels = getattr(cfg, "in_channels", None) if cfg is not None else None
    if isinstance(channels, int):
        info["channels"] = channels
    training = getattr(gen, "training_info", None)
    if isinstance(training, dict) and training.get("data_size") is not None:
        info["data_size"] = tuple(int(v) for v in training["data_size"])
    device = getattr(gen, "device", None)
    if isinstance(device, (str, torch.device)):
        info["device"] = str(device)
    path = getattr(gen, "source_path", None)
    if path is not None:
        info["path"] = str(path)
    return info


def same_device(a: Any, b: Any) -> bool:
    """Whether two devices are the same; a device without an index matches any index of its type."""
    da, db = torch.device(a), torch.device(b)
    if da.type != db.type:
        return False
    return da.index is None or db.index is None or da.index == db.index


def check_compatible(info: dict[str, Any], num_classes: int, image_shape: Optional[Sequence[int]] = None,
                     device: Any = None, what: str = "the generator", exact_classes: bool = True) -> None:
    """Raise ``ValueError`` (with how to fix it) when ``info`` does not fit the data or the device.

    Checked: the class count, the channels of a generator built for fixed channels, images larger
    than those it was fitted on, and the device. ``image_shape`` is one training image's ``(C, H, W)`` (skipped when None); ``device`` the
    worker's device (skipped when None). ``exact_classes=False`` (a generator object or factory of
    the user's) accepts a generator knowing more classes than the config (ids 0..K-1 are a subset).
    """
    name = what + (f" ({info['path']})" if "path" in info else "")
    k = info.get("num_classes")
    if k is not None and (k < num_classes or (exact_classes and k != num_classes)):
        raise ValueError(f"{name} knows {k} classes but the config has num_classes={num_classes}; {FIT_HINT}")
    if image_shape is not None and len(image_shape) == 3:
        c, h, w = (int(v) for v in image_shape)
        if info.get("channels") is not None and info["channels"] != c:
            raise ValueError(f"{name} was built for {info['channels']}-channel images but the training data has "
                             f"{c} channel(s); {FIT_HINT}")
        if info.get("data_size") is not None:
            fh, fw = info["data_size"]
            if h > fh or w > fw:  # smaller data is fine (downsampled); larger would get upsampled blurs
                raise ValueError(f"{name} was fitted on {fh}x{fw} images but the training images are {h}x{w}: "
                                 f"its images would be upsampled, without the detail of your data; {FIT_HINT}")
    if device is not None and info.get("device") is not None and not same_device(info["device"], device):
        raise ValueError(f"{name} is on {info['device']} but worker_device is {device}: set "
                         f"HardNegConfig(worker_device={info['device']!r}) or move the generator "
                         f"(generator.to({str(device)!r}))")


# ---------------------------------------------------------------------- options
_SD_ONLY = ("prompt_template", "prompts", "generator_scheduler", "generator_resolution")
_DTYPES = ("fp16", "float16", "bf16", "bfloat16", "fp32", "float32")


@dataclass(frozen=True)
class GenerationOptions:
    """Generation's settings: the generator the engine builds and its worker (``HardNegConfig``
    fields of the same names; ``generation_options``)."""

    generator: Optional[str] = None  # a name of hardneg.generators.GENERATORS or None (mining only)
    generator_path: Optional[str] = None  # weights folder / hub id for the generator
    worker_backend: str = "thread"  # "thread" | "process"
    worker_threads: int = 1  # torch threads the worker may use (keeps a CPU box responsive)
    worker_device: str = "cpu"
    queue_size: int = 8  # pending generation requests; oldest dropped when full
    images_per_refresh: int = 32  # generated images requested per refresh, split over pairs
    generation_batch: int = 16  # images per generation request
    max_restarts: int = 3
    # settings handed to the generator the engine builds from ``generator`` (None: the backend's default)
    generator_steps: Optional[int] = None  # denoising steps of a full (r = 1) schedule
    guidance_scale: Optional[float] = None  # classifier-free guidance weight (SDXL-turbo: 0)
    generator_dtype: Optional[str] = None  # "fp16" | "bf16" | "fp32"; stable-diffusion default: fp16 on CUDA
    generator_compile: bool = False  # torch.compile the UNet in the worker
    generator_max_batch: Optional[int] = None  # samples per UNet call (bounds the worker's memory)
    prompt_template: Optional[str] = None  # stable-diffusion: e.g. "a photo of a {class_name}."
    prompts: Optional[Any] = None  # stable-diffusion: one prompt per class (list) or {class name: prompt}
    generator_scheduler: Optional[str] = None  # stable-diffusion: "dpm++" (default), "ddim", "euler", ...
    generator_resolution: Optional[Any] = None  # stable-diffusion model input size: int or (height, width)
    generator_options: dict[str, Any] = field(default_factory=dict)  # more keyword arguments for the loader
    worker_start_timeout: float = 600.0  # seconds HardNeg(...) waits for the generator to load
    # the worker's memory share: at most this many samples per generate call (a request is split;
    # any generator, both backends), and the share of the GPU the process backend's child may
    # allocate (torch.cuda.set_per_process_memory_fraction; the thread backend shares the
    # training process's allocator, so there only worker_max_batch bounds it). None: no bound.
    worker_max_batch: Optional[int] = None
    worker_memory_fraction: Optional[float] = None
    worker_warmup: bool = True  # one tiny generation at worker start (loads kernels, compiles)
    # seconds one generation request may run; a request past it fails (reason in worker stats) and the
    # worker is replaced within max_restarts. None: no deadline. Generous: a cold CPU diffusion call is slow.
    request_timeout: Optional[float] = 600.0

    def __post_init__(self) -> None:
        from hardneg._checks import ConfigError, choice, in_range, int_at_least, set_field
        from hardneg.generators import GENERATORS

        if self.generator is not None and self.generator not in GENERATORS:
            raise ConfigError(f"generator must be one of {list(GENERATORS)} or None (mining only), got "
                              f"{self.generator!r}; a generator of your own goes to HardNeg(..., "
                              "generator=obj_or_factory)")
        if self.generator_path is not None and not isinstance(self.generator_path, str):
            set_field(self, "generator_path", str(self.generator_path))  # a pathlib.Path is fine
        if self.generator_steps is not None:
            int_at_least(self, "generator_steps", 1)
        if self.guidance_scale is not None:
            in_range(self, "guidance_scale", 0.0, float("inf"), high_open=True)
        if self.generator_max_batch is not None:
            int_at_least(self, "generator_max_batch", 1)
        if not isinstance(self.generator_compile, bool):
            raise ConfigError(f"generator_compile must be True or False, got {self.generator_compile!r}")
        if self.generator_dtype is not None and self.generator_dtype not in _DTYPES:
            raise ConfigError(f"generator_dtype must be one of {_DTYPES} or None, got {self.generator_dtype!r}")
        if self.generator == "class-conditional" and self.generator_dtype not in (None, "fp32", "float32"):
            raise ConfigError(f"generator_dtype={self.generator_dtype!r}: the class-conditional generator runs in "
                              "float32 (leave generator_dtype None)")
        if self.generator == "class-conditional":
            used = [name for name in _SD_ONLY if getattr(self, name) is not None]
            if used:
                raise ConfigError(f"{', '.join(used)} only apply to generator='stable-diffusion' (the "
                                  "class-conditional generator is conditioned on class ids, not text)")
        if self.prompt_template is not None and (not isinstance(self.prompt_template, str)
                                                 or "{class_name}" not in self.prompt_template):
            raise ConfigError(f"prompt_template must be a string with a {{class_name}} field, got "
                              f"{self.prompt_template!r}")
        if isinstance(self.prompts, dict):
            set_field(self, "prompts", dict(self.prompts))
        if self.generator_scheduler is not None:
            from hardneg.generators.stable_diffusion import SCHEDULERS

            if self.generator_scheduler not in SCHEDULERS:
                raise ConfigError(f"generator_scheduler must be one of {sorted(SCHEDULERS)} or None, got "
                                  f"{self.generator_scheduler!r}")
        res = self.generator_resolution
        if res is not None:
            pair = (res, res) if isinstance(res, int) else tuple(res) if isinstance(res, (list, tuple)) else ()
            if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 8 for v in pair):
                raise ConfigError(f"generator_resolution must be an int or (height, width) of ints >= 8, got {res!r}")
            set_field(self, "generator_resolution", res if isinstance(res, int) else (int(pair[0]), int(pair[1])))
        if not isinstance(self.generator_options, dict):
            raise ConfigError(f"generator_options must be a dict of keyword arguments, got {self.generator_options!r}")
        in_range(self, "worker_start_timeout", 0.0, float("inf"), low_open=True, high_open=True)
        choice(self, "worker_backend", ("thread", "process"))
        int_at_least(self, "worker_threads", 1)
        int_at_least(self, "queue_size", 1)
        int_at_least(self, "images_per_refresh", 1)
        int_at_least(self, "generation_batch", 1)
        int_at_least(self, "max_restarts", 0)
        if self.worker_max_batch is not None:
            int_at_least(self, "worker_max_batch", 1)
        if self.worker_memory_fraction is not None:
            in_range(self, "worker_memory_fraction", 0.0, 1.0, low_open=True)
            if self.worker_backend != "process":
                raise ConfigError(
                    "worker_memory_fraction needs worker_backend='process' (a child process gets its own share "
                    "of the GPU); the thread backend shares the training process's memory: bound it with "
                    "worker_max_batch (samples per generate call) or generator_max_batch instead")
        if not isinstance(self.worker_warmup, bool):
            raise ConfigError(f"worker_warmup must be True or False, got {self.worker_warmup!r}")
        if self.request_timeout is not None:
            in_range(self, "request_timeout", 0.0, float("inf"), low_open=True, high_open=True)

    def check_prompts(self, num_classes: int) -> None:
        """``prompts`` as a list holds one prompt per class (normalised to strings)."""
        from hardneg._checks import ConfigError, set_field

        if self.prompts is None or isinstance(self.prompts, dict):
            return
        if isinstance(self.prompts, (list, tuple)) and len(self.prompts) == num_classes:
            set_field(self, "prompts", [str(p) for p in self.prompts])
            return
        raise ConfigError(f"prompts must be a list with one prompt per class ({num_classes}) or a "
                          f"{{class name: prompt}} dict, got {self.prompts!r}")
