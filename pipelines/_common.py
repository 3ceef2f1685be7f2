"""Pieces every sampling pipeline shares: argument checks and the conversion of [0, 1] images to the output type."""

from __future__ import annotations

import math

import numpy as np
import torch

OUTPUT_TYPES = ("pil", "np", "pt")


def check_sampling_args(num_inference_steps, guidance_scale, output_type, generator=None, batch=None, guider=None):
    """ValueError naming the first bad argument of a sampling call (steps, guidance scale or guider, output type,
    a generator list that does not match the batch)."""
    if guider is not None:
        from gen.guidance import Guider

        if not isinstance(guider, Guider):
            raise ValueError(f"guider must be a gen.guidance.Guider; got {type(guider).__name__}")
        if guidance_scale != 1.0:
            raise ValueError("give guidance_scale or guider, not both (the guider carries its own scale)")
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0; got {guidance_scale!r}")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
    if batch is not None and isinstance(generator, list) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}; give one, or one per image")


def initial_noise(unet, batch: int, latents, generator, device, dtype) -> torch.Tensor:
    """The starting noise ``[batch, C, H, W]`` of a pipeline on ``unet``: drawn with ``generator``, or the given
    ``latents`` after a shape check (``ValueError`` naming both shapes)."""
    from diffusers.utils.torch_utils import randn_tensor

    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
    shape = (batch, cfg.in_channels, *size)
    if latents is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents shape {tuple(latents.shape)} != expected {shape}")
    return latents.to(device=device, dtype=dtype)


def images_to_output(pipe, images: torch.Tensor, output_type: str):
    """``[N, C, H, W]`` images in [0, 1] -> torch (``"pt"``), numpy ``[N, H, W, C]`` (``"np"``) or PIL list."""
    if output_type == "pt":
        return images.cpu().float()
    out = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(out) if output_type == "pil" else out


def nfe_value(nfe: float) -> int | float:
    """Network evaluations per image: an int when whole, else rounded to 4 decimals (AG makes it fractional)."""
    return int(nfe) if float(nfe).is_integer() else round(nfe, 4)
