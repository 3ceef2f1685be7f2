"""Inverse problems with diffusion and flow priors: measurement operators, RED-Diff (Mardani et al. 2024), DPS (Chung
et al. 2023) and the pseudo-inverse baseline. RED-Diff runs on any prior whose scheduler's prediction space places a
noise grid (VP, rectified flow, one-sided interpolants: ``reddiff_grid``, ``RedDiffSolver(prior=...)``); DPS is a
per-step hook of the sampling core. Pipelines: ``pipelines.RedDiffPipeline`` (pixel UNets, incl. the digits
interpolant), ``pipelines.LatentRedDiffPipeline`` (SD 1.x/2.x), ``RedDiffSD3Pipeline``, ``RedDiffDiTPipeline``,
``RedDiffSDXLPipeline``; benchmarks: ``eval/inverse.py``, ``eval/inverse_priors.py``."""

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
from .reddiff import (
    SUPPORTED_PRIORS,
    WEIGHTINGS,
    RedDiffSolver,
    eps_predictor,
    prior_space,
    red_diff,
    reddiff_grid,
    reddiff_timesteps,
    run_red_diff,
    snr_weight,
)

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
    "RedDiffSolver",
    "SUPPORTED_PRIORS",
    "SeparableLinear",
    "SuperResolution",
    "dps",
    "eps_predictor",
    "motion_blur_kernel",
    "prior_space",
    "red_diff",
    "reddiff_grid",
    "reddiff_timesteps",
    "run_red_diff",
    "snr_weight",
]
