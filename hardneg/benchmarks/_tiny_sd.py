"""A tiny, randomly initialised Stable Diffusion pipeline built offline, for timing the SD backend.

Its UNet, VAE and CLIP text encoder follow the SD 1.x layout at toy sizes (latent 8x8, images
16x16); the tokenizer is a character-level CLIP BPE vocabulary written to a folder. It produces
noise, not pictures: it only exercises the :class:`~hardneg.generators.stable_diffusion.
StableDiffusionGenerator` code path (VAE encode, prompt encoding, the kept timesteps, decode), so
its timings say how cost scales with r, not how fast real SD is.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

LATENT = 8
IMAGE = 16
TOKENS = 48


def _write_vocab(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    symbols = string.ascii_lowercase + string.digits + " .,'-"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in symbols:
        for tok in (ch, ch + "</w>"):
            vocab.setdefault(tok, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def tiny_sd_pipeline(folder: str | Path, seed: int = 0) -> Any:
    """A random ``StableDiffusionPipeline`` on the CPU; tokenizer files go to ``folder``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = _write_vocab(Path(folder) / "clip-vocab")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=TOKENS)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(json.loads((tok_dir / "vocab.json").read_text())), hidden_size=32, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=TOKENS, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=IMAGE,
    )
    scheduler = DDIMScheduler(  # Stable Diffusion v1.5's noise schedule
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")
