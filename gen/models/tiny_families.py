"""Tiny, randomly initialised SDXL, SD3 and DiT components built offline from configs, for tests and benchmarks.

Nothing is downloaded: tokenizers are :func:`gen.models.tiny_sd.tiny_clip_tokenizer` (60-token CLIP BPE, 16
positions), text encoders are ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` from ``CLIPTextConfig``, and the
denoisers and VAEs come from Diffusers configs. Each builder returns the keyword arguments of the matching
Diffusers pipeline (``StableDiffusionXLPipeline(**build_tiny_sdxl())`` etc.), so the same components can feed ours
and Diffusers' side by side. ``width`` scales the denoiser (the benchmarks use wider ones so that a network call
costs a few milliseconds); the defaults run a 4-step sample in well under a second on one CPU core.

Every network is put in ``eval()`` mode: DiT's label embedding drops labels at random in training mode.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tiny_sd import TINY_SD_MAX_LENGTH, tiny_clip_tokenizer

# SDXL's added conditioning: 6 micro-conditioning numbers (original size, crop corner, target size), each embedded
# with `addition_time_embed_dim` sinusoids, concatenated with the pooled text embedding of the second encoder.
TIME_IDS = 6


def _clip_config(tokenizer, hidden: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_SD_MAX_LENGTH,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(latent_channels: int = 4, seed: int = 0, **config: Any) -> AutoencoderKL:
    """A 2-stage ``AutoencoderKL`` (blocks (16, 32), downsampling factor 2) with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=16,
            **config,
        ).eval()


def build_tiny_sdxl(seed: int = 0, width: int = 32, sample_size: int = 8) -> dict[str, Any]:
    """Components of a tiny SDXL pipeline.

    Two text encoders as in SDXL: ``CLIPTextModel`` (hidden 32) and ``CLIPTextModelWithProjection`` (hidden 32,
    projection 32, its pooled ``text_embeds`` feed the UNet's ``text_embeds``); their penultimate hidden states are
    concatenated (cross-attention width 64). The UNet has ``addition_embed_type="text_time"`` with
    ``addition_time_embed_dim=8``, so ``projection_class_embeddings_input_dim = 6 * 8 + 32``.

    Args:
        seed: weight seed (the global RNG state is restored afterwards).
        width: UNet channels of the first stage (the second has twice as many).
        sample_size: latent side; images are ``2 * sample_size`` pixels (VAE factor 2).
    Returns:
        ``{"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}``; the scheduler
        is SDXL's ``EulerDiscreteScheduler`` (scaled_linear 0.00085..0.012, leading spacing, ``steps_offset=1``).
    """
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    time_dim, proj = 8, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(width, 2 * width),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=TIME_IDS * time_dim + proj,
            norm_num_groups=8,
        ).eval()
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(_clip_config(tokenizer, 32, proj)).eval()
        torch.manual_seed(seed + 2)
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, 32, proj)).eval()
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": tiny_vae(seed=seed),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def build_tiny_sd3(seed: int = 0, width: int = 32, sample_size: int = 8, num_layers: int = 2,
                   shift: float = 3.0, use_dynamic_shifting: bool = False) -> dict[str, Any]:
    """Components of a tiny SD3 pipeline without T5 (``text_encoder_3=None``: Diffusers then feeds zeros).

    Two ``CLIPTextModelWithProjection`` (hidden 32, projection 32); their penultimate hidden states are concatenated
    (64) and padded to ``joint_attention_dim=64``, their pooled projections concatenated into
    ``pooled_projection_dim=64``. The MMDiT has patch size 2, ``num_layers`` joint blocks and ``width`` channels
    (``width / 8`` heads of 8). The VAE has 4 latent channels, ``scaling_factor=1.5`` and ``shift_factor=0.1``.

    Args:
        seed: weight seed (the global RNG state is restored afterwards).
        width: transformer width (a multiple of 8).
        sample_size: latent side (even); images are ``2 * sample_size`` pixels.
        num_layers: joint transformer blocks.
        shift, use_dynamic_shifting: ``FlowMatchEulerDiscreteScheduler`` settings (SD3 medium: shift 3, static).
    Returns:
        ``{"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
        "tokenizer_3", "scheduler"}`` (``text_encoder_3`` and ``tokenizer_3`` are None).
    """
    if width % 8:
        raise ValueError(f"width must be a multiple of 8 (heads of 8 channels); got {width}")
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=4,
            num_layers=num_layers,
            attention_head_dim=8,
            num_attention_heads=width // 8,
            joint_attention_dim=64,
            caption_projection_dim=width,
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=max(16, sample_size),
        ).eval()
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, 32, 32)).eval()
        torch.manual_seed(seed + 2)
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, 32, 32)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift,
                                                use_dynamic_shifting=use_dynamic_shifting)
    return {
        "transformer": transformer,
        "vae": tiny_vae(seed=seed, scaling_factor=1.5, shift_factor=0.1),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": None,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "tokenizer_3": None,
        "scheduler": scheduler,
    }


def build_tiny_dit(seed: int = 0, width: int = 32, sample_size: int = 8, num_layers: int = 2,
                   num_classes: int = 1000, learned_sigma: bool = True) -> dict[str, Any]:
    """Components of a tiny class-conditional DiT pipeline (Peebles & Xie 2023).

    ``DiTTransformer2DModel`` with patch size 2, ``num_layers`` blocks of ``width`` channels (``width / 8`` heads),
    ``num_embeds_ada_norm=num_classes`` (its label table has one more row, the null class ``num_classes``; Diffusers'
    ``DiTPipeline`` hard-codes 1000) and, with ``learned_sigma``, ``out_channels = 2 x 4`` (noise + variance, as
    DiT-XL/2). The scheduler is DiT's ``DDIMScheduler`` (linear betas 0.0001..0.02).

    Returns:
        ``{"transformer", "vae", "scheduler"}``.
    """
    if width % 8:
        raise ValueError(f"width must be a multiple of 8 (heads of 8 channels); got {width}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(
            num_attention_heads=width // 8,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8 if learned_sigma else 4,
            num_layers=num_layers,
            sample_size=sample_size,
            patch_size=2,
            num_embeds_ada_norm=num_classes,
            norm_num_groups=8,
        ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False)
    return {"transformer": transformer, "vae": tiny_vae(seed=seed), "scheduler": scheduler}
