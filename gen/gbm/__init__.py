"""Multiplicative diffusion ("Dale meets Langevin", Shetty et al. 2025): geometric Brownian motion noising,
multiplicative denoising score matching, Dale-Langevin (DLS), unified multiplicative (UMS) and deterministic
log-space samplers, and a positivity transform for image data."""

from .losses import LOSS_WEIGHTINGS, mdsm_loss
from .scheduler import (
    GBM_PREDICTION_TYPES,
    GBM_SAMPLERS,
    GBM_SCHEDULES,
    GBMScheduler,
    GBMSchedulerOutput,
    fit_log_stats,
    lognormal_exact_prediction,
)
from .transforms import PositivityTransform

__all__ = [
    "GBMScheduler",
    "GBMSchedulerOutput",
    "GBM_PREDICTION_TYPES",
    "GBM_SAMPLERS",
    "GBM_SCHEDULES",
    "LOSS_WEIGHTINGS",
    "PositivityTransform",
    "fit_log_stats",
    "lognormal_exact_prediction",
    "mdsm_loss",
]
