"""GeNIe hard negatives with a pretrained latent text-to-image diffusion model (diffusers).

Works with any diffusers checkpoint that has a VAE, a ``UNet2DConditionModel`` and a pipeline
``encode_prompt`` method: Stable Diffusion 1.x / 2.x (epsilon or v-prediction), SDXL (two text
encoders and "text_time" added conditioning) and their turbo variants.

The GeNIe edit for one source of class A, target class B and noise ratio r:

1. encode the source with the VAE (``latent * scaling_factor``, the posterior mode);
2. set the scheduler's timesteps for ``num_inference_steps`` and keep only those with
   ``t <= T * r`` (``T = num_train_timesteps``) — not img2img's ``strength`` rounding;
3. noise the latent to the first kept timestep with ``scheduler.add_noise``
   (r = 1 instead starts from pure noise, i.e. plain text-to-image over all steps);
4. run the UNet over the kept timesteps only, with classifier-free guidance on the prompt of
   B versus the empty prompt, and decode.

Cost is proportional to the number of kept timesteps, see :meth:`timesteps_for_ratio`. Per-sample
ratios in one call are grouped: samples whose r keep the same timesteps share one batched pass.

Thread safety: schedulers are stateful (step index, multistep history), so the pipeline's
scheduler is only used as a template and every ``generate`` call builds a fresh scheduler
instance per group of samples; one generator may be shared by several threads. The safety
checker of SD 1.x checkpoints is not loaded: the images are classifier training data and the
pipeline's ``__call__`` (the only place it runs) is never used.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg._optional import require
from hardneg.generators.compiled import CompiledDenoiser, CompileSpec, compile_backend
from hardneg.generators.base import (
    GeneratorError,
    Ratios,
    as_ratio_tensor,
    check_generate_inputs,
    check_output,
)

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import DiffusionPipeline

__all__ = ["StableDiffusionGenerator", "SCHEDULERS"]

# name -> (diffusers scheduler class, config overrides applied on top of the checkpoint's config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}

_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}

DType = Union[str, torch.dtype, None]
# Model resolution: one int (square) or (height, width).
Resolution = Union[int, tuple[int, int], None]
# Per-class prompt overrides: a full list (one prompt per class) or {class index or name: prompt}.
Prompts = Union[Sequence[str], Mapping[Union[int, str], str], None]

# Tolerance for T * r landing a hair below an integer (e.g. 1000 * 0.29 = 289.99999999999994).
_EPS = 1e-6
# Samples per UNet call and per VAE slice when max_batch_size is None: bounds the worker's memory
# whatever the request size (activations grow with the batch, the VAE decoder's most at 512 px).
DEFAULT_MAX_BATCH = 8
# ITU-R BT.601 luma weights, used to turn generated RGB into 1-channel images.
_LUMA = (0.299, 0.587, 0.114)


def _resolve_dtype(dtype: DType, device: Union[str, torch.device]) -> torch.dtype:
    if dtype is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch dtype, got {dtype!r}")
    return _DTYPES[key]


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` where diffusers has it, else ``torch_dtype``."""
    try:
        utils = importlib.import_module("diffusers.utils.deprecation_utils")
    except ImportError:  # pragma: no cover - older diffusers
        return "torch_dtype"
    return "dtype" if hasattr(utils, "_resolve_dtype") else "torch_dtype"


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class StableDiffusionGenerator:
    """GeNIe generator backed by a diffusers latent text-to-image pipeline.

    Args:
        pipeline: a loaded diffusers pipeline with ``vae``, ``unet``, ``scheduler`` and
            ``encode_prompt`` (e.g. ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``).
        class_names: one name per class index; prompts are built from them.
        prompt_template: ``str.format`` template with a ``{class_name}`` field.
        prompts: per-class overrides, a list with one prompt per class or a mapping from class
            index or class name to prompt; classes not in the mapping use the template.
        guidance_scale: classifier-free guidance weight; <= 1 disables CFG (turbo models: 0).
        num_inference_steps: length of the full schedule; r keeps the part with t <= T * r.
        scheduler: one of :data:`SCHEDULERS` (built from the checkpoint's scheduler config) or
            None to keep the pipeline's own scheduler type.
        device, dtype: where / in which precision to run; None keeps the pipeline's.
        compile: ``torch.compile`` the UNet (True: inductor; or a backend name / callable). It is
            compiled lazily where it first runs (the worker; :meth:`warmup` at worker start) and
            always fed ``max_batch_size`` samples per call (a short group is padded), so changing
            batches never recompile (:mod:`hardneg.generators.compiled`); a copy or pickle of the
            generator keeps the setting and compiles again where it runs.
        resolution: model input size (int or (h, w)); default ``unet.sample_size * vae scale``.
        value_range: (low, high) of the training data's pixel values; sources are mapped from
            it and results back to it.
        max_batch_size: at most this many samples per UNet batch (before CFG doubling) and per
            VAE encode / decode slice; None: :data:`DEFAULT_MAX_BATCH`. Bounds the worker's memory
            whatever the request size (a 64-image request at 512 px decoded at once would need
            several GB).
    """

    def __init__(
        self,
        pipeline: "DiffusionPipeline",
        class_names: Sequence[str],
        prompt_template: str = "a photo of a {class_name}.",
        prompts: Prompts = None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        scheduler: Optional[str] = None,
        device: Union[str, torch.device, None] = None,
        dtype: DType = None,
        compile: CompileSpec = False,
        resolution: Resolution = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        max_batch_size: Optional[int] = None,
    ) -> None:
        diffusers = require("diffusers", "diffusers")
        for part in ("vae", "unet", "scheduler"):
            if getattr(pipeline, part, None) is None:
                raise ValueError(f"the pipeline has no {part!r}: a latent text-to-image pipeline is needed")
        if not callable(getattr(pipeline, "encode_prompt", None)):
            raise ValueError(
                f"{type(pipeline).__name__} has no encode_prompt(): a text-to-image pipeline is needed"
            )
        if getattr(pipeline.unet.config, "time_cond_proj_dim", None) is not None:
            raise ValueError(
                "UNets with a guidance embedding (LCM-distilled, time_cond_proj_dim) are not supported"
            )

        self.class_names: list[str] = self._check_class_names(class_names)
        self.num_classes: int = len(self.class_names)
        self.prompts: list[str] = self._build_prompts(prompt_template, prompts)

        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not (
            guidance_scale >= 0 and math.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        steps = num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
            raise ValueError(f"max_batch_size must be None or an integer >= 1, got {max_batch_size!r}")
        lo, hi = (float(v) for v in value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
        self.guidance_scale = float(guidance_scale)
        self.num_inference_steps = num_inference_steps
        self.max_batch_size = DEFAULT_MAX_BATCH if max_batch_size is None else max_batch_size
        self.value_range = (lo, hi)
        backend = compile_backend(compile)

        if device is not None:
            pipeline.to(torch.device(device))
        if dtype is not None:
            pipeline.to(_resolve_dtype(dtype, pipeline.device))
        vae = pipeline.vae
        if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            vae.to(torch.float32)  # fp16 VAEs that overflow (SDXL) are run in fp32, as diffusers does
        self.pipeline = pipeline
        self.device = pipeline.unet.device

        if scheduler is None:
            self._scheduler_template = pipeline.scheduler
        else:
            if scheduler not in SCHEDULERS:
                raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)} or None, got {scheduler!r}")
            cls_name, overrides = SCHEDULERS[scheduler]
            scheduler_cls = getattr(diffusers, cls_name)
            self._scheduler_template = scheduler_cls.from_config(pipeline.scheduler.config, **overrides)
        if getattr(self._scheduler_template, "order", 1) != 1:
            name = type(self._scheduler_template).__name__
            raise ValueError(
                f"{name} is a second-order scheduler (its timesteps repeat, so r cannot cut them); "
                f"use one of {sorted(SCHEDULERS)}"
            )
        self.num_train_timesteps = int(self._scheduler_template.config.num_train_timesteps)

        self.vae_scale_factor = int(
            getattr(pipeline, "vae_scale_factor", 0) or 2 ** (len(vae.config.block_out_channels) - 1)
        )
        self.resolution = self._check_resolution(resolution)
        unet_params = inspect.signature(pipeline.unet.forward).parameters
        self._sdxl = getattr(pipeline.unet.config, "addition_embed_type", None) == "text_time"
        if self._sdxl and "added_cond_kwargs" not in unet_params:  # pragma: no cover - defensive
            raise ValueError("the UNet expects added conditioning but takes no added_cond_kwargs")
        self._denoiser: Optional[CompiledDenoiser] = None
        if backend is not None:  # rows per UNet call: the batch, doubled by classifier-free guidance
            rows = self.max_batch_size * (2 if self.guidance_scale > 1.0 else 1)
            self._denoiser = CompiledDenoiser(pipeline.unet, backend, rows)

    # ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        class_names: Sequence[str],
        prompt_template: str = "a photo of a {class_name}.",
        prompts: Prompts = None,
        guidance_scale: float = 7.5,
        num_inference_steps: int = 50,
        scheduler: Optional[str] = "dpm++",
        dtype: DType = None,
        device: Union[str, torch.device, None] = None,
        compile: CompileSpec = False,
        resolution: Resolution = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        max_batch_size: Optional[int] = None,
        **load_kwargs: Any,
    ) -> "StableDiffusionGenerator":
        """Load a checkpoint (hub id or local folder) and wrap it; defaults follow the GeNIe paper.

        ``dtype`` defaults to float16 on CUDA and float32 elsewhere, ``device`` to CUDA when
        available. ``load_kwargs`` go to ``DiffusionPipeline.from_pretrained`` (``variant``,
        ``revision``, ``cache_dir``, ``local_files_only``, ``token``, ...).
        """
        diffusers = require("diffusers", "diffusers")
        require("transformers", "diffusers")
        class_names = cls._check_class_names(class_names)  # fail before loading gigabytes
        device = device if device is not None else _default_device()
        torch_dtype = _resolve_dtype(dtype, device)
        path_or_id = str(path_or_id)

        hub_keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "proxies")
        try:
            index = diffusers.DiffusionPipeline.load_config(
                path_or_id, **{k: v for k, v in load_kwargs.items() if k in hub_keys}
            )
        except Exception as exc:
            raise OSError(
                f"could not read the pipeline index (model_index.json) of {path_or_id!r}: pass a diffusers "
                f"checkpoint folder or hub id ({exc})"
            ) from exc
        pipeline_cls = getattr(diffusers, str(index.get("_class_name", "")), None)
        init_params = inspect.signature(pipeline_cls.__init__).parameters if pipeline_cls is not None else {}
        kwargs: dict[str, Any] = {_dtype_kwarg(): torch_dtype}
        if "safety_checker" in init_params:
            kwargs["safety_checker"] = None  # never run: hardneg does not call the pipeline
            if "requires_safety_checker" in init_params:
                kwargs["requires_safety_checker"] = False
        kwargs.update(load_kwargs)
        pipe = diffusers.DiffusionPipeline.from_pretrained(path_or_id, **kwargs)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        pipe.to(torch.device(device))
        return cls(
            pipe,
            class_names,
            prompt_template=prompt_template,
            prompts=prompts,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            scheduler=scheduler,
            compile=compile,
            resolution=resolution,
            value_range=value_range,
            max_batch_size=max_batch_size,
        )

    # ------------------------------------------------------------------------------------
    def to(self, device: Union[str, torch.device, None] = None, dtype: DType = None) -> "StableDiffusionGenerator":
        """Move the pipeline to ``device`` and / or cast it to ``dtype``; returns ``self``.

        An fp16 VAE that overflows (``force_upcast``, SDXL) stays in float32, as at construction.
        """
        if device is not None:
            self.pipeline.to(torch.device(device))
        if dtype is not None:
            self.pipeline.to(_resolve_dtype(dtype, self.pipeline.device))
            vae = self.pipeline.vae
            if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
                vae.to(torch.float32)
        self.device = self.pipeline.unet.device
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's precision."""
        return self.pipeline.unet.dtype

    @property
    def compiles(self) -> Optional[int]:
        """Graphs compiled for the UNet in this process (None when not compiled); see ``compile``."""
        return None if self._denoiser is None else self._denoiser.compiles

    def warmup(self) -> None:
        """One sample through one denoising step: loads kernels and, with ``compile``, compiles the UNet.

        The worker calls it once when it starts, so the first request does not pay for it.
        """
        scheduler = self._new_scheduler()
        r = max(1, int(scheduler.timesteps.min())) / self.num_train_timesteps  # keeps exactly one step
        h, w = self.resolution
        x = torch.full((1, 3, h, w), 0.5 * (self.value_range[0] + self.value_range[1]), device=self.device)
        label = torch.zeros(1, dtype=torch.long)
        self.generate(x, label, label, min(1.0, r), seed=0)

    def timesteps_for_ratio(self, r: float) -> list[int]:
        """The denoising timesteps a noise ratio ``r`` runs: the schedule's t with ``t <= T * r``.

        ``len(...)`` is the number of UNet calls per sample (one batched call covers CFG).
        """
        ratio = float(as_ratio_tensor(r, 1)[0])
        scheduler = self._new_scheduler()
        return [int(t) for t in scheduler.timesteps[self._kept_mask(scheduler, ratio)]]

    def generate(
        self,
        sources: Tensor,
        source_labels: Tensor,
        target_labels: Tensor,
        ratios: Ratios,
        seed: Optional[int] = None,
    ) -> Tensor:
        """GeNIe-edit each source towards its target class; see the module docstring.

        Returns images shaped like ``sources`` (1 or 3 channels, any size) in ``value_range``,
        on the sources' device and dtype. Samples are grouped by the timesteps their r keeps
        (one batched UNet pass per group); a given seed reproduces the output. Raises
        :class:`GeneratorError` on bad input or non-finite output.
        """
        check_generate_inputs(sources, source_labels, target_labels, self.num_classes)
        n, channels, height, width = sources.shape
        r = as_ratio_tensor(ratios, n)
        if channels not in (1, 3):
            raise GeneratorError(f"sources must have 1 or 3 channels, got {channels}")
        if n == 0:
            return sources.clone()
        targets = torch.as_tensor(target_labels).long().cpu()
        # Validate every ratio before any model runs. Samples whose r keep the same timesteps run
        # as one batch: key = (index of the first kept timestep, starts from pure noise).
        starts = {float(v): self._plan(float(v)) for v in torch.unique(r)}
        keys = [(starts[float(v)], bool(v >= 1.0)) for v in r]

        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator("cpu").manual_seed(int(seed))
        unet, vae = self.pipeline.unet, self.pipeline.vae
        with torch.no_grad():
            pixels = self._to_model_space(sources)
            latents0 = self._chunked(self._encode, pixels).to(unet.dtype)
            # Drawn once for the whole batch in input order (CPU generator: same on any device).
            noise = torch.randn(latents0.shape, generator=gen, dtype=torch.float32)
            noise = noise.to(self.device, unet.dtype)
            cond = self._encode_prompts(targets)
            out = torch.empty_like(latents0)
            for key in sorted(set(keys), reverse=True):  # cheapest group first
                idx = torch.tensor([i for i, k in enumerate(keys) if k == key])
                for chunk in idx.split(self.max_batch_size):
                    sel = chunk.to(self.device)
                    part = {k: v[sel] for k, v in cond.items()}
                    out[sel] = self._denoise(latents0[sel], noise[sel], part, key[0], key[1], gen)
            decoded = self._chunked(self._decode, out.to(vae.dtype)).float()
            check_output(decoded)
            images = self._to_data_space(decoded, channels, height, width)
        return images.to(device=sources.device, dtype=sources.dtype)

    __call__ = generate

    def _chunked(self, fn: Any, x: Tensor) -> Tensor:
        """Apply ``fn`` (VAE encode / decode) in slices of at most ``max_batch_size``."""
        if len(x) <= self.max_batch_size:
            return fn(x)
        return torch.cat([fn(part) for part in x.split(self.max_batch_size)])  # VAE slicing

    # --- the GeNIe edit -------------------------------------------------------------------
    def _new_scheduler(self) -> Any:
        """A fresh scheduler instance (schedulers are stateful) with the timesteps set."""
        template = self._scheduler_template
        scheduler = type(template).from_config(template.config)
        scheduler.set_timesteps(self.num_inference_steps, device=self.device)
        return scheduler

    def _kept_mask(self, scheduler: Any, r: float) -> Tensor:
        threshold = math.floor(self.num_train_timesteps * r + _EPS)
        return scheduler.timesteps.cpu() <= threshold

    def _plan(self, r: float) -> int:
        """Index of the first kept timestep for ratio r; error when r keeps none."""
        scheduler = self._new_scheduler()
        kept = self._kept_mask(scheduler, r)
        if not kept.any():
            smallest = int(scheduler.timesteps.min())
            raise GeneratorError(
                f"noise ratio r={r} keeps no denoising step: with {self.num_inference_steps} steps the "
                f"smallest timestep is {smallest} > T*r = {self.num_train_timesteps * r:g}; "
                f"use r >= {smallest / self.num_train_timesteps:g}"
            )
        return int(kept.nonzero()[0])

    def _denoise(
        self,
        latents0: Tensor,
        noise: Tensor,
        cond: dict[str, Tensor],
        start: int,
        pure_noise: bool,
        gen: torch.Generator,
    ) -> Tensor:
        """Noise ``latents0`` to timestep ``start`` of a fresh schedule and denoise from there."""
        unet = self.pipeline.unet
        scheduler = self._new_scheduler()
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        timesteps = scheduler.timesteps[start:]
        if pure_noise:  # r = 1, text-to-image: pure noise at the start of the full schedule
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(latents0, noise, timesteps[:1].repeat(latents0.shape[0]))

        do_cfg = self.guidance_scale > 1.0
        text = torch.cat([cond["uncond"], cond["text"]]) if do_cfg else cond["text"]
        added: Optional[dict[str, Tensor]] = None
        if self._sdxl:
            pooled = torch.cat([cond["uncond_pooled"], cond["pooled"]]) if do_cfg else cond["pooled"]
            added = {"text_embeds": pooled, "time_ids": self._time_ids(pooled)}
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": gen} if takes_generator else {}

        for t in timesteps:
            model_in = torch.cat([latents, latents]) if do_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            kwargs: dict[str, Any] = {"encoder_hidden_states": text, "return_dict": False}
            if added is not None:
                kwargs["added_cond_kwargs"] = added
            pred = (self._denoiser or unet)(model_in, t, **kwargs)[0]
            if do_cfg:
                uncond_pred, cond_pred = pred.chunk(2)
                pred = uncond_pred + self.guidance_scale * (cond_pred - uncond_pred)
            latents = scheduler.step(pred, t, latents, return_dict=False, **step_kwargs)[0]
        return latents

    def _time_ids(self, pooled: Tensor) -> Tensor:
        """SDXL micro-conditioning: original size, crop (0, 0) and target size = the model size."""
        h, w = self.resolution
        ids = [h, w, 0, 0, h, w]
        unet = self.pipeline.unet
        expected = unet.add_embedding.linear_1.in_features
        got = unet.config.addition_time_embed_dim * len(ids) + pooled.shape[-1]
        if expected != got:
            raise GeneratorError(
                f"the UNet expects {expected} added-conditioning features but size/crop conditioning "
                f"gives {got} "
                "(refiner checkpoints with aesthetic-score conditioning are not supported)"
            )
        return torch.tensor([ids], dtype=pooled.dtype, device=pooled.device).repeat(pooled.shape[0], 1)

    # --- text -----------------------------------------------------------------------------
    def _encode_prompts(self, targets: Tensor) -> dict[str, Tensor]:
        """Prompt embeddings per sample (each distinct target class encoded once)."""
        classes, inverse = torch.unique(targets, return_inverse=True)
        prompts = [self.prompts[int(c)] for c in classes]
        do_cfg = self.guidance_scale > 1.0
        out = self.pipeline.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=None,  # the empty prompt (SDXL: zeros when force_zeros_for_empty_prompt)
        )
        dtype = self.pipeline.unet.dtype
        names = ("text", "uncond") if len(out) == 2 else ("text", "uncond", "pooled", "uncond_pooled")
        if self._sdxl and len(out) != 4:
            raise GeneratorError("the UNet needs pooled text embeddings but encode_prompt returned none")
        cond: dict[str, Tensor] = {}
        inv = inverse.to(self.device)
        for name, emb in zip(names, out):
            if emb is not None:
                cond[name] = emb.to(dtype)[inv]
        return cond

    # --- pixels <-> latents ---------------------------------------------------------------
    def _to_model_space(self, sources: Tensor) -> Tensor:
        lo, hi = self.value_range
        x = ((sources.to(self.device, torch.float32) - lo) / (hi - lo)).clamp(0.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.resolution:
            x = F.interpolate(x, size=self.resolution, mode="bilinear", align_corners=False, antialias=True)
        return x * 2.0 - 1.0

    def _to_data_space(self, decoded: Tensor, channels: int, height: int, width: int) -> Tensor:
        x = (decoded / 2.0 + 0.5).clamp(0.0, 1.0)
        if (height, width) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)
        if channels == 1:
            luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x * luma).sum(1, keepdim=True)
        lo, hi = self.value_range
        return x * (hi - lo) + lo

    def _latent_stats(self, like: Tensor) -> Optional[tuple[Tensor, Tensor]]:
        cfg = self.pipeline.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None
        shape = (1, len(mean), 1, 1)
        return (
            torch.tensor(mean, device=like.device, dtype=like.dtype).view(shape),
            torch.tensor(std, device=like.device, dtype=like.dtype).view(shape),
        )

    def _encode(self, pixels: Tensor) -> Tensor:
        vae = self.pipeline.vae
        enc = vae.encode(pixels.to(vae.dtype))
        if hasattr(enc, "latent_dist"):
            latents = enc.latent_dist.mode()
        elif hasattr(enc, "latents"):
            latents = enc.latents
        else:  # pragma: no cover - tuple outputs
            latents = enc[0].mode() if hasattr(enc[0], "mode") else enc[0]
        scale = float(vae.config.scaling_factor)
        stats = self._latent_stats(latents)
        if stats is not None:
            return (latents - stats[0]) * scale / stats[1]
        return latents * scale

    def _decode(self, latents: Tensor) -> Tensor:
        vae = self.pipeline.vae
        scale = float(vae.config.scaling_factor)
        stats = self._latent_stats(latents)
        latents = latents * stats[1] / scale + stats[0] if stats is not None else latents / scale
        return vae.decode(latents, return_dict=False)[0]

    # --- validation -----------------------------------------------------------------------
    @staticmethod
    def _check_class_names(class_names: Optional[Sequence[str]]) -> list[str]:
        if class_names is None or isinstance(class_names, (str, bytes)) or len(class_names) == 0:
            raise ValueError(
                "class_names must be a non-empty list with one name per class index (the text prompts "
                f"are built from them), got {class_names!r}"
            )
        names = list(class_names)
        bad = [n for n in names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"every class name must be a non-empty string, got {bad!r}")
        return names

    def _build_prompts(self, template: str, prompts: Prompts) -> list[str]:
        if "{class_name}" not in template:
            raise ValueError(f"prompt_template must contain '{{class_name}}', got {template!r}")
        try:
            out = [template.format(class_name=name) for name in self.class_names]
        except (KeyError, IndexError) as exc:
            raise ValueError(
                f"prompt_template may only use the {{class_name}} field, got {template!r}"
            ) from exc
        if prompts is None:
            return out
        if isinstance(prompts, Mapping):
            for key, prompt in prompts.items():
                if isinstance(key, str):
                    if key not in self.class_names:
                        raise ValueError(
                            f"prompts has an entry for unknown class {key!r}; "
                            f"known classes: {self.class_names}"
                        )
                    index = self.class_names.index(key)
                elif isinstance(key, int) and not isinstance(key, bool) and 0 <= key < self.num_classes:
                    index = key
                else:
                    raise ValueError(
                        f"prompts keys must be class names or indices in [0, {self.num_classes}), got {key!r}"
                    )
                if not isinstance(prompt, str):
                    raise ValueError(f"prompt for class {key!r} must be a string, got {prompt!r}")
                out[index] = prompt
            return out
        if isinstance(prompts, str) or len(prompts) != self.num_classes:
            raise ValueError(
                f"prompts must be a mapping or a list with one prompt per class ({self.num_classes}), "
                f"got {prompts!r}"
            )
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("every prompt must be a string")
        return list(prompts)

    def _check_resolution(self, resolution: Resolution) -> tuple[int, int]:
        if resolution is None:
            size = self.pipeline.unet.config.sample_size
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            return int(h) * self.vae_scale_factor, int(w) * self.vae_scale_factor
        h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        for v in (h, w):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % self.vae_scale_factor:
                raise ValueError(
                    f"resolution must be positive multiples of the VAE factor {self.vae_scale_factor}, "
                    f"got {resolution!r}"
                )
        return h, w
