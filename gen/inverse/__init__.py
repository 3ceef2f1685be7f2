"""Inverse problems with diffusion priors: measurement operators, RED-Diff (Mardani et al. 2024), DPS (Chung et al.
2023) and the pseudo-inverse baseline. Pipelines: ``pipelines.RedDiffPipeline``, ``pipelines.LatentRedDiffPipeline``;
benchmark: ``eval/inverse.py``."""

from .dps import dps
from .operators import (
    HDR,
    Colorization,
    Compose,
    Denoising,
    GaussianBlur,
    Inpainting,
    MotionBlur,
    Operator,
    PhaseRetrieval,
    SeparableLinear,
    SuperResolution,
    motion_blur_kernel,
)
from .reddiff import WEIGHTINGS, eps_predictor, red_diff, reddiff_timesteps, snr_weight

__all__ = [
    "HDR",
    "WEIGHTINGS",
    "Colorization",
    "Compose",
    "Denoising",
    "GaussianBlur",
    "Inpainting",
    "MotionBlur",
    "Operator",
    "PhaseRetrieval",
    "SeparableLinear",
    "SuperResolution",
    "dps",
    "eps_predictor",
    "motion_blur_kernel",
    "red_diff",
    "reddiff_timesteps",
    "snr_weight",
]
