"""Tiny, randomly initialised Stable-Diffusion components built offline, for tests of text-to-image code.

Everything is built from configs (no hub download): a CLIP BPE tokenizer over a 60-token vocabulary, a
2-layer CLIP text encoder of width 32, a 2-stage VAE (downsampling factor 2, 4 latent channels), a 2-stage
cross-attention UNet and an SD-style DDIM scheduler. ``StableDiffusionPipeline(**build_tiny_sd(),
safety_checker=None, feature_extractor=None, requires_safety_checker=False)`` runs on the CPU in well under a
second at 32x32.
"""

from __future__ import annotations

import string
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_SD_MAX_LENGTH = 16
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# A handful of merges so that common prompt words become one or two tokens.
_MERGES = (
    ("p", "h"),
    ("ph", "o"),
    ("t", "o</w>"),
    ("pho", "to</w>"),
    ("o", "f</w>"),
    ("c", "a"),
    ("ca", "t</w>"),
    ("d", "o"),
    ("do", "g</w>"),
    ("t", "h"),
    ("th", "e</w>"),
)


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a tiny vocabulary, built without any file or download.

    Vocabulary (ids in order): ``<|startoftext|>`` (0, BOS), ``<|endoftext|>`` (1, EOS, PAD and UNK), the
    letters ``a``..``z``, the word-final letters ``a</w>``..``z</w>``, then one token per merge. Built with
    ``CLIPTokenizer(vocab=dict, merges=pairs)``: in transformers 5, ``vocab_file=``/``merges_file=`` silently
    give a 2-token vocabulary. ``model_max_length`` is 16.
    """
    vocab: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
    for letter in string.ascii_lowercase:
        vocab[letter + "</w>"] = len(vocab)
    for left, right in _MERGES:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(_MERGES),
        model_max_length=TINY_SD_MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
    )
    # Guard against the silent fallback to a 2-token vocabulary seen with other constructors.
    distinct = set(tokenizer("a photo of a cat").input_ids)
    if len(tokenizer) != len(vocab) or len(distinct) <= 2:
        raise RuntimeError(
            f"tiny CLIP tokenizer is broken: {len(tokenizer)} tokens (expected {len(vocab)}), "
            f"{len(distinct)} distinct ids for 'a photo of a cat'"
        )
    return tokenizer


def build_tiny_sd(seed: int = 0) -> dict[str, Any]:
    """Builds the components of a tiny Stable Diffusion pipeline with seeded random weights.

    Args:
        seed: Seed for the weight initialisation (each model is built after ``torch.manual_seed(seed)``);
            the global torch RNG state is restored afterwards.

    Returns:
        ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler"}``: ``UNet2DConditionModel`` (4 latent
        channels, blocks (32, 64), cross-attention width 32), ``AutoencoderKL`` (blocks (16, 32), factor 2),
        ``CLIPTextModel`` (width 32, 2 layers, 4 heads, 16 positions), :func:`tiny_clip_tokenizer` and an
        SD-style ``DDIMScheduler`` (scaled_linear betas 0.00085..0.012, ``steps_offset=1``).
    """
    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=8,
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
        )
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=TINY_SD_MAX_LENGTH,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }
