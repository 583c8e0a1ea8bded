"""Tiny random Stable Diffusion pipelines built offline from configs: the one builder of the tests and benchmarks.

Everything is constructed from configs with seeded random weights; the CLIP tokenizer is built
from a small ``vocab.json`` + ``merges.txt`` written into a caller-provided folder. Nothing is
downloaded. Sizes are chosen so that a UNet call costs about a millisecond on a CPU. The
pipelines produce noise, not pictures: they exercise the
:class:`~hardneg.generators.stable_diffusion.StableDiffusionGenerator` code path (VAE encode,
prompt encoding, the kept timesteps, decode), so their timings say how cost scales with r (and
how a dtype or ``torch.compile`` changes it), not how fast real SD is.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

# Model resolution of the tiny pipelines: latent 8x8, VAE downsampling factor 2 -> 16x16 pixels.
LATENT_SIZE = 8
VAE_SCALE = 2
RESOLUTION = LATENT_SIZE * VAE_SCALE
MAX_TOKENS = 32

_MERGES = [("p", "h"), ("o", "t"), ("ph", "ot")]


def write_clip_vocab(folder: Path) -> Path:
    """Write a minimal CLIP BPE vocabulary (lower-case ASCII, digits, a little punctuation)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + string.digits + ".,!'-_":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for left, right in _MERGES:
        vocab.setdefault(left + right, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (folder / "merges.txt").write_text(merges)
    return folder


def make_tokenizer(folder: Path) -> Any:
    """A ``CLIPTokenizer`` loaded from the vocab files written by :func:`write_clip_vocab`."""
    from transformers import CLIPTokenizer

    folder = write_clip_vocab(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)


def _text_config(**overrides: Any) -> Any:
    from transformers import CLIPTextConfig

    kw: dict[str, Any] = dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-5,
        max_position_embeddings=MAX_TOKENS,
        vocab_size=128,
        hidden_act="gelu",
        projection_dim=32,
    )
    kw.update(overrides)
    return CLIPTextConfig(**kw)


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )


def _sd_scheduler() -> Any:
    from diffusers import DDIMScheduler

    # The scheduler settings Stable Diffusion v1.5 ships with.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def make_tiny_sd_pipeline(tmp_dir: Path, seed: int = 0) -> Any:
    """A random ``StableDiffusionPipeline`` (SD 1.x layout, DDIM scheduler, no safety checker)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        tokenizer=make_tokenizer(Path(tmp_dir) / "tokenizer_files"),
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def make_tiny_sdxl_pipeline(tmp_dir: Path, seed: int = 0) -> Any:
    """A random ``StableDiffusionXLPipeline``: two text encoders and "text_time" added conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    time_dim, pooled_dim = 8, 32
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=time_dim * 6 + pooled_dim,
        cross_attention_dim=64,  # the two encoders' hidden states (32 + 32) concatenated
    )
    folder = Path(tmp_dir) / "tokenizer_files"
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=pooled_dim)),
        tokenizer=make_tokenizer(folder),
        tokenizer_2=make_tokenizer(folder),
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")
