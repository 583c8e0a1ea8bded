"""A small class-conditional diffusion model trained on the user's own data, used for GeNIe.

:class:`ClassConditionalGenerator` wraps a diffusers ``UNet2DModel`` with one class embedding per
class plus a *null* class (``num_class_embeds = num_classes + 1``) for classifier-free guidance.
It is trained with DDPM noise prediction (labels dropped to the null class ~10% of the time) and
sampled with DDIM. Needing no outside weights or data (the AugGen recipe), it works offline.

GeNIe (``generate``): each source image is noised to the largest DDIM timestep at or below
``int(T * r)`` (``T = num_train_timesteps``), then only the DDIM steps from there down are run,
conditioned on the *target* class, so the cost of a sample is proportional to its r. ``r = 1``
starts from pure noise: plain class-conditional sampling. Many r share one denoising loop: a
sample joins the batch at its own first timestep.

It works in pixel space at a small ``image_size`` (inputs of another size are resized to it and
outputs back), or in the latent space of a user-supplied diffusers ``AutoencoderKL``. diffusers
is imported only when a generator is built (``pip install 'hardneg[diffusers]'``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from hardneg._optional import require
from hardneg.checkpoint import fsync_dir
from hardneg.generators.compiled import CompiledDenoiser, CompileSpec, compile_backend
from hardneg.generators.base import (
    GeneratorError,
    Ratios,
    as_ratio_tensor,
    check_generate_inputs,
    check_output,
)

logger = logging.getLogger(__name__)

FORMAT = "hardneg.class_conditional"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "unet.safetensors"
VAE_DIR = "vae"


def default_digits_generator_path() -> str:
    """The folder of the generator trained on the built-in digits that ships with hardneg."""
    return str(Path(__file__).resolve().parent.parent / "assets" / "digits-generator")


@dataclass
class ClassConditionalConfig:
    """Architecture, noise schedule, sampling and data settings of a :class:`ClassConditionalGenerator`.

    ``image_size``/``in_channels`` describe the images the model sees (pixel space: the UNet input;
    latent space: the VAE input). ``data_range`` is the value range of the user's training data;
    images are mapped from it to ``[-1, 1]`` for the model and back.
    """

    num_classes: int
    image_size: int = 16
    in_channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    mid_attention: bool = True  # self-attention in the UNet's lowest-resolution block
    norm_num_groups: int = 16
    attention_head_dim: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    num_inference_steps: int = 25
    guidance_scale: float = 2.0
    label_dropout: float = 0.1
    data_range: tuple[float, float] = (0.0, 1.0)
    latent: bool = False  # True when the UNet works in the latent space of a VAE
    latent_scale: Optional[float] = None  # latents are multiplied by this (estimated by fit)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.data_range = (float(self.data_range[0]), float(self.data_range[1]))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`GeneratorError` naming the first field outside its allowed range."""
        for name, low in (("num_classes", 2), ("image_size", 4), ("layers_per_block", 1),
                          ("norm_num_groups", 1), ("attention_head_dim", 1),
                          ("num_train_timesteps", 2), ("num_inference_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise GeneratorError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.in_channels not in (1, 3):
            raise GeneratorError(f"in_channels must be 1 or 3, got {self.in_channels!r}")
        if not self.block_out_channels:
            raise GeneratorError("block_out_channels needs at least one entry")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise GeneratorError(
                    f"every block_out_channels entry must be divisible by norm_num_groups "
                    f"({self.norm_num_groups}), got {self.block_out_channels}")
        head = min(self.attention_head_dim, self.block_out_channels[-1])
        if self.mid_attention and self.block_out_channels[-1] % head:
            raise GeneratorError(
                f"the last block_out_channels entry ({self.block_out_channels[-1]}) must be divisible by "
                f"attention_head_dim ({self.attention_head_dim})")
        if self.num_inference_steps > self.num_train_timesteps:
            raise GeneratorError(
                f"num_inference_steps ({self.num_inference_steps}) must not exceed "
                f"num_train_timesteps ({self.num_train_timesteps})")
        if not self.guidance_scale >= 0.0:
            raise GeneratorError(f"guidance_scale must be >= 0, got {self.guidance_scale!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise GeneratorError(f"label_dropout must lie in [0, 1), got {self.label_dropout!r}")
        lo, hi = self.data_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise GeneratorError(f"data_range must be (low, high) with low < high, got {self.data_range}")
        if self.latent_scale is not None and not (self.latent_scale > 0 and math.isfinite(self.latent_scale)):
            raise GeneratorError(f"latent_scale must be a positive number, got {self.latent_scale!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict that :meth:`from_dict` turns back into this config."""
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        d["data_range"] = list(self.data_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassConditionalConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise GeneratorError(f"unknown ClassConditionalConfig field(s) {unknown}; known: {sorted(names)}")
        d = dict(d)
        for key in ("block_out_channels", "data_range"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass
class FitResult:
    """What :meth:`ClassConditionalGenerator.fit` did: per-step training losses and wall time."""

    losses: list[float]
    seconds: float
    steps: int
    batch_size: int
    extra: dict[str, Any] = field(default_factory=dict)


DatasetLike = Any  # an ImageDataset, or a (images, labels) pair of tensors


class ClassConditionalGenerator:
    """GeNIe generator: a class-conditional UNet2DModel trained on the user's data.

    Build with a :class:`ClassConditionalConfig` (or :meth:`for_dataset`), train with :meth:`fit`,
    persist with :meth:`save` / :meth:`load`, then ``generate(sources, source_labels,
    target_labels, ratios, seed)`` for hard negatives or :meth:`sample` for plain class samples.
    Pass ``vae`` (a diffusers ``AutoencoderKL``) to work in its latent space; ``seed`` fixes the
    UNet's initial weights.
    """

    def __init__(self, config: ClassConditionalConfig, vae: Any = None, seed: int = 0) -> None:
        diffusers = require("diffusers", "diffusers")
        if config.latent and vae is None:
            raise GeneratorError("config.latent is True but no vae (diffusers AutoencoderKL) was given")
        self.config = dataclasses.replace(config, latent=vae is not None)
        self.vae = None
        if vae is not None:
            vae_cfg = vae.config
            if int(vae_cfg.in_channels) != self.config.in_channels:
                raise GeneratorError(
                    f"the VAE takes {vae_cfg.in_channels}-channel images but in_channels is "
                    f"{self.config.in_channels}")
            factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
            if self.config.image_size % factor:
                raise GeneratorError(
                    f"image_size ({self.config.image_size}) must be divisible by the VAE's downsampling "
                    f"factor {factor}")
            self.vae = vae.eval().requires_grad_(False)
            self._model_channels = int(vae_cfg.latent_channels)
            self._model_size = self.config.image_size // factor
        else:
            self._model_channels = self.config.in_channels
            self._model_size = self.config.image_size
        levels = len(self.config.block_out_channels)
        if self._model_size % (2 ** (levels - 1)):
            raise GeneratorError(
                f"the UNet input ({self._model_size} px) must be divisible by 2^{levels - 1} "
                f"for {levels} block_out_channels levels")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.unet = _build_unet(diffusers, self.config, self._model_channels, self._model_size)
        self.unet.eval()
        self.max_batch = 256  # samples per UNet call; bounds memory of large generate calls
        self.training_info: dict[str, Any] = {}
        self._denoiser: Optional[CompiledDenoiser] = None  # set by compile()

    # ---------------------------------------------------------------- construction helpers
    @classmethod
    def for_dataset(cls, dataset: DatasetLike, vae: Any = None, seed: int = 0,
                    **config_fields: Any) -> "ClassConditionalGenerator":
        """A fresh generator whose ``num_classes`` and ``in_channels`` match ``dataset``."""
        images, labels, num_classes = _unpack_dataset(dataset)
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if labels.numel() else 0
        fields_ = {"num_classes": num_classes, "in_channels": int(images.shape[1]), **config_fields}
        return cls(ClassConditionalConfig(**fields_), vae=vae, seed=seed)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def compile(self, backend: CompileSpec = True, batch: int = 32) -> "ClassConditionalGenerator":
        """``torch.compile`` the UNet for sampling, fed ``batch`` rows per call; returns ``self``.

        Compiled lazily where it first runs (the worker; :meth:`warmup` at its start); calls are
        split / padded to ``batch`` rows (conditional and null rows of guidance counted), so the
        changing number of active samples never recompiles (:mod:`hardneg.generators.compiled`).
        Training (:meth:`fit`) keeps the plain module. ``backend=False`` undoes it.
        """
        spec = compile_backend(backend)
        self._denoiser = None if spec is None else CompiledDenoiser(self.unet, spec, batch)
        return self

    @property
    def compiles(self) -> Optional[int]:
        """Graphs compiled for the UNet in this process (None when not compiled)."""
        return None if self._denoiser is None else self._denoiser.compiles

    def warmup(self) -> None:
        """One sample through one denoising step (the worker calls it at start; compiles when compiled)."""
        r = max(1, int(self.inference_timesteps().min())) / self.config.num_train_timesteps
        s = self.config.image_size
        lo, hi = self.config.data_range
        x = torch.full((1, self.config.in_channels, s, s), 0.5 * (lo + hi), device=self.device)
        label = torch.zeros(1, dtype=torch.long)
        self.generate(x, label, label, min(1.0, r), seed=0)

    def num_parameters(self) -> int:
        """Trainable parameters of the UNet (the VAE, if any, is frozen and not counted)."""
        return sum(p.numel() for p in self.unet.parameters())

    def to(self, device: Union[str, torch.device]) -> "ClassConditionalGenerator":
        """Move the UNet (and VAE) to ``device``; returns ``self``."""
        self.unet.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    def check_compatible(self, images: Tensor, num_classes: Optional[int] = None) -> None:
        """Raise :class:`GeneratorError` when ``images`` (N, C, H, W) or the class count misfit the model."""
        if images.ndim != 4:
            raise GeneratorError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != self.config.in_channels:
            raise GeneratorError(
                f"this generator was built for {self.config.in_channels}-channel images but the data has "
                f"{images.shape[1]} channels; train a generator on this data (hardneg fit-generator)")
        if num_classes is not None and num_classes != self.config.num_classes:
            raise GeneratorError(
                f"this generator knows {self.config.num_classes} classes but the data has {num_classes}; "
                f"train a generator on this data (hardneg fit-generator)")

    # ---------------------------------------------------------------- scheduler helpers
    def _ddpm(self) -> Any:
        diffusers = require("diffusers", "diffusers")
        return diffusers.DDPMScheduler(num_train_timesteps=self.config.num_train_timesteps,
                                       beta_schedule=self.config.beta_schedule)

    def _ddim(self) -> Any:
        """A fresh DDIM scheduler (schedulers are stateful: one per call keeps threads apart)."""
        diffusers = require("diffusers", "diffusers")
        sched = diffusers.DDIMScheduler(
            num_train_timesteps=self.config.num_train_timesteps,
            beta_schedule=self.config.beta_schedule,
            timestep_spacing="trailing",  # the first step is T-1, so r = 1 starts from pure noise
            clip_sample=not self.config.latent,
            set_alpha_to_one=True,
        )
        sched.set_timesteps(self.config.num_inference_steps)
        return sched

    def inference_timesteps(self) -> Tensor:
        """The DDIM timesteps a full (r = 1) sampling run visits, in descending order."""
        return self._ddim().timesteps.clone()

    def start_timestep_limit(self, r: float) -> int:
        """``int(T * r)``: GeNIe runs only the DDIM timesteps at or below this (tolerant of float error)."""
        return int(math.floor(self.config.num_train_timesteps * float(r) + 1e-6))

    def steps_for_ratio(self, r: float) -> int:
        """How many denoising steps (UNet calls) one sample with noise ratio ``r`` costs."""
        limit = self.start_timestep_limit(r)
        return int((self.inference_timesteps() <= limit).sum())

    # ---------------------------------------------------------------- space conversions
    def _to_model_space(self, images: Tensor) -> Tensor:
        """Data-range images of any size -> model inputs (resized, in [-1, 1], encoded if latent)."""
        x = images.to(self.device, torch.float32)
        s = self.config.image_size
        if tuple(x.shape[-2:]) != (s, s):
            down = x.shape[-1] > s or x.shape[-2] > s
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=down)
        lo, hi = self.config.data_range
        x = ((x - lo) / (hi - lo)) * 2.0 - 1.0
        if self.vae is not None:
            x = self._encode(x)
        return x

    def _from_model_space(self, z: Tensor, size: Optional[tuple[int, int]]) -> Tensor:
        """Model outputs -> data-range images at ``size`` (or ``image_size`` when None)."""
        x = self._decode(z) if self.vae is not None else z
        x = x.clamp(-1.0, 1.0) if torch.isfinite(x).all() else x
        lo, hi = self.config.data_range
        x = (x + 1.0) / 2.0 * (hi - lo) + lo
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            down = x.shape[-1] > size[1] or x.shape[-2] > size[0]
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=down)
            x = x.clamp(lo, hi) if torch.isfinite(x).all() else x
        return x

    def _latent_scale(self) -> float:
        if self.config.latent_scale is not None:
            return float(self.config.latent_scale)
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    @torch.no_grad()
    def _encode(self, x: Tensor) -> Tensor:
        out = [self.vae.encode(chunk).latent_dist.mode() for chunk in x.split(self.max_batch)]
        return torch.cat(out) * self._latent_scale()

    @torch.no_grad()
    def _decode(self, z: Tensor) -> Tensor:
        z = z / self._latent_scale()
        return torch.cat([self.vae.decode(chunk).sample for chunk in z.split(self.max_batch)])

    # ---------------------------------------------------------------- sampling
    def _noise(self, n: int, seed: Optional[int]) -> Tensor:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        shape = (n, self._model_channels, self._model_size, self._model_size)
        return torch.randn(shape, generator=g, dtype=torch.float32).to(self.device)

    @torch.no_grad()
    def _guided_eps(self, z: Tensor, t: int, labels: Tensor) -> Tensor:
        """Classifier-free guided noise prediction; one UNet call (conditional and null batched)."""
        scale = self.config.guidance_scale
        tt = torch.full((z.shape[0],), int(t), device=z.device, dtype=torch.long)
        unet = self._denoiser or self.unet
        if scale == 1.0:
            return unet(z, tt, class_labels=labels).sample
        null = torch.full_like(labels, self.config.num_classes)
        eps = unet(torch.cat([z, z]), torch.cat([tt, tt]), class_labels=torch.cat([labels, null])).sample
        eps_cond, eps_null = eps.chunk(2)
        return eps_null + scale * (eps_cond - eps_null)

    @torch.no_grad()
    def _denoise(self, x0: Optional[Tensor], noise: Tensor, start_index: Tensor, pure: Tensor,
                 labels: Tensor) -> Tensor:
        """One DDIM loop for samples that start at different timesteps (index into the schedule).

        Sample i joins at ``timesteps[start_index[i]]``: noised from ``x0[i]`` (or pure noise when
        ``pure[i]``) and from then on denoised with the others, so the loop costs as many UNet
        calls as the longest sample needs, and each sample costs its own number of steps.
        """
        sched = self._ddim()
        timesteps = sched.timesteps
        z = torch.zeros_like(noise)
        active = torch.zeros(noise.shape[0], dtype=torch.bool, device=noise.device)
        start_index = start_index.to(noise.device)
        pure = pure.to(noise.device)
        first = int(start_index.min())
        for i in range(first, len(timesteps)):
            t = int(timesteps[i])
            joining = start_index == i
            if joining.any():
                fresh = noise[joining]
                if x0 is not None:
                    tt = torch.full((int(joining.sum()),), t, dtype=torch.long)
                    noised = sched.add_noise(x0[joining], fresh, tt.to(x0.device))
                    fresh = torch.where(pure[joining].view(-1, 1, 1, 1), fresh, noised)
                z[joining] = fresh
                active |= joining
            idx = active.nonzero().flatten()
            eps = self._guided_eps(z[idx], t, labels[idx])
            z[idx] = sched.step(eps, t, z[idx], eta=0.0).prev_sample
        return z

    @torch.no_grad()
    def generate(
        self,
        sources: Tensor,
        source_labels: Tensor,
        target_labels: Tensor,
        ratios: Ratios,
        seed: Optional[int] = None,
    ) -> Tensor:
        """GeNIe: turn each source towards its target class with its own noise ratio r in (0, 1].

        Returns images shaped like ``sources``, in the data range, on the sources' device; they
        should be labelled with ``target_labels``. Deterministic for a given ``seed``. A source
        whose r is below the smallest scheduled timestep needs zero steps and comes back unchanged.
        """
        check_generate_inputs(sources, source_labels, target_labels, self.num_classes)
        self.check_compatible(sources)
        n = sources.shape[0]
        r = as_ratio_tensor(ratios, n)
        if n == 0:
            return sources.clone()
        targets = torch.as_tensor(target_labels).long().to(self.device)
        timesteps = self.inference_timesteps()
        limits = torch.tensor([self.start_timestep_limit(v) for v in r.tolist()])
        # index of the first (largest) scheduled timestep at or below int(T * r); len = no step
        start_index = (timesteps.view(1, -1) > limits.view(-1, 1)).sum(1)
        pure = r >= 1.0
        noise = self._noise(n, seed)
        runnable = (start_index < len(timesteps)).nonzero().flatten()
        out = sources.detach().clone()
        size = tuple(sources.shape[-2:])
        for chunk in runnable.split(self.max_batch) if runnable.numel() else ():
            x0 = self._to_model_space(sources[chunk])
            z = self._denoise(x0, noise[chunk.to(noise.device)], start_index[chunk], pure[chunk],
                              targets[chunk.to(targets.device)])
            imgs = check_output(self._from_model_space(z, size))
            out[chunk.to(out.device)] = imgs.to(out.device, out.dtype)
        return check_output(out)

    @torch.no_grad()
    def sample(self, labels: Union[Sequence[int], Tensor], seed: Optional[int] = None,
               size: Optional[Union[int, tuple[int, int]]] = None) -> Tensor:
        """Plain class-conditional samples (r = 1) of ``labels``, in the data range.

        Images are ``image_size`` px unless ``size`` asks for another size; they stay on the
        generator's device.
        """
        labels_t = torch.as_tensor(labels, dtype=torch.long).flatten()
        if labels_t.numel() and (labels_t.min() < 0 or labels_t.max() >= self.num_classes):
            raise GeneratorError(f"labels must lie in [0, {self.num_classes}), got {labels_t.tolist()}")
        n = labels_t.numel()
        if isinstance(size, int):
            size = (size, size)
        out_size = size or (self.config.image_size, self.config.image_size)
        if n == 0:
            return torch.zeros((0, self.config.in_channels, *out_size), device=self.device)
        noise = self._noise(n, seed)
        labels_t = labels_t.to(self.device)
        outs = []
        for chunk in torch.arange(n).split(self.max_batch):
            c = chunk.to(self.device)
            z = self._denoise(None, noise[c], torch.zeros(len(chunk), dtype=torch.long),
                              torch.ones(len(chunk), dtype=torch.bool), labels_t[c])
            outs.append(check_output(self._from_model_space(z, out_size)))
        return torch.cat(outs)

    # ---------------------------------------------------------------- training
    def _prepare_training_data(self, dataset: DatasetLike) -> tuple[Tensor, Tensor]:
        images, labels, num_classes = _unpack_dataset(dataset)
        self.check_compatible(images, num_classes)
        if labels.numel() == 0:
            raise GeneratorError("cannot fit on an empty dataset")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise GeneratorError(
                f"labels must lie in [0, {self.num_classes}), got min {labels.min()} max {labels.max()}")
        lo, hi = self.config.data_range
        tol = 1e-3 * (hi - lo)
        if images.min() < lo - tol or images.max() > hi + tol:
            raise GeneratorError(
                f"training images span [{float(images.min()):.3g}, {float(images.max()):.3g}] but "
                f"data_range is {self.config.data_range}; set ClassConditionalConfig.data_range to your "
                f"data's value range")
        self._fit_data_size = [int(v) for v in images.shape[-2:]]  # recorded: the size this model serves
        x = torch.cat([self._to_model_space(chunk) for chunk in images.split(self.max_batch)])
        if self.vae is not None and self.config.latent_scale is None:
            # scale latents to unit variance, as latent diffusion does (x was encoded with scale 1)
            std = float(x.float().std())
            self.config.latent_scale = float(self._latent_scale() / max(std, 1e-6))
            x = x / max(std, 1e-6)
        return x, labels.to(self.device)

    def fit(self, dataset: DatasetLike, steps: int = 500, batch_size: int = 128, lr: float = 2e-3,
            seed: int = 0, progress: bool = True, ema_decay: float = 0.995,
            warmup_steps: Optional[int] = None) -> FitResult:
        """Train the UNet with DDPM noise prediction on ``dataset`` (an ImageDataset or (images, labels)).

        AdamW with linear warm-up and cosine decay; labels are dropped to the null class with
        probability ``label_dropout`` so classifier-free guidance works; an exponential moving
        average (``ema_decay``, 0 disables it) of the weights becomes the final model. Deterministic
        for a given ``seed`` on a given device. Shows a tqdm bar unless ``progress=False``.
        """
        from tqdm.auto import tqdm

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise GeneratorError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise GeneratorError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not lr > 0:
            raise GeneratorError(f"lr must be > 0, got {lr!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise GeneratorError(f"ema_decay must lie in [0, 1), got {ema_decay!r}")
        start = time.perf_counter()
        x, y = self._prepare_training_data(dataset)
        n = x.shape[0]
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        ddpm = self._ddpm()
        unet = self.unet
        unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
        warm = max(1, min(steps // 10, 100)) if warmup_steps is None else max(1, int(warmup_steps))

        def lr_factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress_ = (step - warm) / max(1, steps - warm)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress_))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        ema = [p.detach().clone() for p in unet.parameters()] if ema_decay > 0 else None
        losses: list[float] = []
        perm = torch.randperm(n, generator=g)
        pos = 0
        bar = tqdm(range(steps), desc="fit generator", disable=not progress, dynamic_ncols=True)
        for step in bar:
            if pos + batch_size > n:
                perm, pos = torch.randperm(n, generator=g), 0
            if batch_size <= n:
                idx = perm[pos:pos + batch_size]
            else:  # fewer images than a batch: draw with replacement
                idx = torch.randint(0, n, (batch_size,), generator=g)
            pos += batch_size
            x0 = x[idx.to(x.device)]
            labels = y[idx.to(y.device)].clone()
            drop = torch.rand(labels.shape[0], generator=g) < self.config.label_dropout
            labels[drop.to(labels.device)] = self.config.num_classes
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            t = torch.randint(0, self.config.num_train_timesteps, (x0.shape[0],), generator=g).to(x0.device)
            noisy = ddpm.add_noise(x0, noise, t)
            pred = unet(noisy, t, class_labels=labels).sample
            loss = F.mse_loss(pred, noise)
            if not torch.isfinite(loss):
                unet.eval()
                raise GeneratorError(f"training diverged at step {step} (loss {loss.item()}); lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            if ema is not None:
                decay = min(ema_decay, (1.0 + step) / (10.0 + step))
                with torch.no_grad():
                    for e, p in zip(ema, unet.parameters()):
                        e.lerp_(p.detach(), 1.0 - decay)
            losses.append(float(loss.item()))
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        bar.close()
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, unet.parameters()):
                    p.copy_(e)
        unet.eval()
        seconds = time.perf_counter() - start
        previous = int(self.training_info.get("steps", 0))
        self.training_info = {
            "steps": previous + steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "ema_decay": ema_decay,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": round(seconds, 1),
            "num_train_images": n, "data_size": self._fit_data_size,
        }
        return FitResult(losses=losses, seconds=seconds, steps=steps, batch_size=batch_size)

    @torch.no_grad()
    def denoising_loss(self, dataset: DatasetLike, num_timesteps: int = 10, seed: int = 0,
                       max_images: int = 512) -> float:
        """Noise-prediction MSE with fixed noise at ``num_timesteps`` evenly spaced t.

        Unlike the training loss it does not jump with the random timesteps of a batch, so two
        models (or one before and after training) compare fairly.
        """
        images, labels, num_classes = _unpack_dataset(dataset)
        self.check_compatible(images, num_classes)
        images, labels = images[:max_images], labels[:max_images]
        x0 = self._to_model_space(images)
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        ddpm = self._ddpm()
        y = labels.to(self.device)
        total = 0.0
        ts = torch.linspace(0, self.config.num_train_timesteps - 1, num_timesteps).long()
        for t in ts.tolist():
            noise = torch.randn(x0.shape, generator=g).to(x0.device)
            tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=x0.device)
            pred = self.unet(ddpm.add_noise(x0, noise, tt), tt, class_labels=y).sample
            total += float(F.mse_loss(pred, noise))
        return total / num_timesteps

    # ---------------------------------------------------------------- persistence
    def save(self, directory: Union[str, os.PathLike]) -> str:
        """Write ``config.json`` and ``unet.safetensors`` (plus ``vae/`` in latent mode) to ``directory``.

        Crash-safe: every file is first written (and ``fsync``-ed) under a temporary name beside
        its target, so a failure while writing leaves a generator already in ``directory`` as it
        was; then they are renamed into place with ``config.json`` last (the old one removed
        first). A folder holding ``config.json`` therefore always holds the weights written with
        it; a crash during the renames leaves no ``config.json`` (``load`` says so, the demo fits
        again), never a half-written generator that loads.
        """
        from safetensors.torch import save_file

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.unet.state_dict().items()}
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "config": self.config.to_dict(),
                "training": self.training_info}
        tag = f"{os.getpid()}.{os.urandom(4).hex()}.tmp"
        staged = {name: path / f".{name}.{tag}" for name in (WEIGHTS_FILE, CONFIG_FILE, VAE_DIR)}
        try:
            save_file(state, str(staged[WEIGHTS_FILE]), metadata={"format": FORMAT})
            _fsync_file(staged[WEIGHTS_FILE])
            if self.vae is not None:
                self.vae.save_pretrained(str(staged[VAE_DIR]), safe_serialization=True)
                for file in staged[VAE_DIR].rglob("*"):
                    if file.is_file():
                        _fsync_file(file)
            staged[CONFIG_FILE].write_text(json.dumps(meta, indent=2) + "\n")
            _fsync_file(staged[CONFIG_FILE])
            # commit: the folder is no generator until config.json, written last, names the new weights
            (path / CONFIG_FILE).unlink(missing_ok=True)
            os.replace(staged[WEIGHTS_FILE], path / WEIGHTS_FILE)
            if self.vae is not None:
                old_vae = path / f".{VAE_DIR}.old.{tag}"
                if (path / VAE_DIR).exists():
                    os.replace(path / VAE_DIR, old_vae)
                os.replace(staged[VAE_DIR], path / VAE_DIR)
                shutil.rmtree(old_vae, ignore_errors=True)
            os.replace(staged[CONFIG_FILE], path / CONFIG_FILE)
            fsync_dir(path)
        finally:
            for tmp in staged.values():  # what a failure left staged
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                elif tmp.exists():
                    tmp.unlink()
        return str(path)

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
             **overrides: Any) -> "ClassConditionalGenerator":
        """Load a generator saved by :meth:`save`.

        ``overrides`` replace sampling settings such as ``guidance_scale`` or
        ``num_inference_steps`` (architecture fields cannot change: the weights fix them).
        """
        from safetensors.torch import load_file

        path = Path(directory)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise GeneratorError(f"{str(path)!r} holds no {CONFIG_FILE}; is it a folder written by save()?")
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != FORMAT:
            raise GeneratorError(
                f"{cfg_file} is not a hardneg class-conditional generator (format {meta.get('format')!r})")
        cfg = dict(meta["config"])
        allowed = {"guidance_scale", "num_inference_steps", "data_range"}
        bad = sorted(set(overrides) - allowed)
        if bad:
            raise GeneratorError(f"cannot override {bad} when loading; allowed: {sorted(allowed)}")
        cfg.update(overrides)
        config = ClassConditionalConfig.from_dict(cfg)
        vae = None
        if config.latent:
            diffusers = require("diffusers", "diffusers")
            vae = diffusers.AutoencoderKL.from_pretrained(str(path / VAE_DIR))
        gen = cls(config, vae=vae)
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise GeneratorError(f"{str(path)!r} holds no {WEIGHTS_FILE}")
        state = load_file(str(weights))
        try:
            gen.unet.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise GeneratorError(
                f"the weights in {weights} do not match the architecture in {cfg_file}: {exc}") from exc
        gen.training_info = dict(meta.get("training") or {})
        return gen.to(device)

    def __repr__(self) -> str:
        c = self.config
        space = "latent" if c.latent else "pixel"
        return (f"ClassConditionalGenerator(num_classes={c.num_classes}, image_size={c.image_size}, "
                f"in_channels={c.in_channels}, {space} space, params={self.num_parameters():,})")


def _fsync_file(file: Path) -> None:
    """Flush a written file to disk (before it is renamed into place)."""
    with open(file, "rb+") as f:
        os.fsync(f.fileno())


def _build_unet(diffusers: Any, config: ClassConditionalConfig, channels: int, size: int) -> Any:
    levels = len(config.block_out_channels)
    return diffusers.UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=config.block_out_channels,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        layers_per_block=config.layers_per_block,
        add_attention=config.mid_attention,
        attention_head_dim=min(config.attention_head_dim, config.block_out_channels[-1]),
        norm_num_groups=config.norm_num_groups,
        num_class_embeds=config.num_classes + 1,  # the last one is the null class for CFG
    )


def _unpack_dataset(dataset: DatasetLike) -> tuple[Tensor, Tensor, Optional[int]]:
    """(images, labels, num_classes) from an ImageDataset or an (images, labels) pair (num_classes None)."""
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        images, labels = dataset.images, dataset.labels
        num_classes = getattr(dataset, "num_classes", None)
    elif isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        images, labels = dataset
        num_classes = None
    else:
        raise GeneratorError("dataset must be an ImageDataset or an (images, labels) pair of tensors")
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels)
    if images.ndim != 4 or not images.is_floating_point():
        raise GeneratorError(
            f"images must be a float (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise GeneratorError(
            f"labels must be integers shaped ({images.shape[0]},), got {tuple(labels.shape)}")
    if not torch.isfinite(images).all():
        raise GeneratorError("training images contain NaN or infinite values")
    return images.float(), labels.long(), (int(num_classes) if num_classes is not None else None)
