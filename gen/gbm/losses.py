"""Multiplicative denoising score matching (M-DSM), Shetty et al. 2025 ("Dale meets Langevin"), section 3.

For x_t = x_0 exp(m(t) + sqrt(v(t)) z) the paper's residual is

    sigma^2 t * h_theta(x_t, t) + log(x_t / x_0) - (mu - 3/2 sigma^2) t          (constant mu, sigma)
    = v(t) * (h_theta - h*),     h* = -1 - z / sqrt(v(t))                          (any schedule)

so M-DSM is a v(t)^2-weighted regression of h onto h* (``weighting="mdsm"``). Written in the network's own
prediction space the same minimiser is reached with unit weights (``weighting="simple"``: DDPM's simple loss on z
for ``prediction_type="log_eps"``), which is what we train with; both are exposed.
"""

from __future__ import annotations

import torch

from .scheduler import GBMScheduler

LOSS_WEIGHTINGS = ("simple", "mdsm")


def mdsm_loss(
    scheduler: GBMScheduler,
    model_output: torch.Tensor,
    original_samples: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    weighting: str = "simple",
    reduction: str = "mean",
) -> torch.Tensor:
    """Multiplicative denoising score matching loss.

    Args:
        model_output: ``[B, ...]`` network output (``scheduler.config.prediction_type``) at x_t.
        original_samples: ``[B, ...]`` positive x_0; noise: the z that made x_t; timesteps: ``[B]`` indices.
        weighting: ``"simple"`` (mean squared error in the prediction space) or ``"mdsm"`` (the paper's residual
            ``|v (h_theta - h*)|^2``, computed exactly whatever the prediction type).
        reduction: ``"mean"`` (scalar) or ``"none"`` (per sample ``[B]``).
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}; got {weighting!r}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    if model_output.shape != original_samples.shape or noise.shape != original_samples.shape:
        raise ValueError(
            f"model_output {tuple(model_output.shape)}, original_samples {tuple(original_samples.shape)} and noise "
            f"{tuple(noise.shape)} must have the same shape"
        )
    pt = scheduler.config.prediction_type
    work = torch.promote_types(model_output.dtype, torch.float32)  # float32 at least (ratio maths)
    pred, x0, z = model_output.to(work), original_samples.to(work), noise.to(work)
    if weighting == "simple":
        diff = pred - scheduler.target(x0, z, timesteps).to(work)
    else:
        x_t = scheduler.add_noise(x0, z, timesteps)
        h = scheduler.convert(pred, pt, "hyvarinen", x_t, timesteps)
        m, s = scheduler.levels(timesteps, h)
        # the paper's residual: v h_theta + log(x_t / x_0) - m(t) + v  (= v (h_theta - h*))
        diff = s**2 * h + torch.log(x_t / x0) - m + s**2
    per = diff.pow(2).flatten(1).mean(1)
    return per.mean() if reduction == "mean" else per
