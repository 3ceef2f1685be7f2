"""Diffusion Posterior Sampling (Chung, Kim, Mccann, Klasky, Ye, "Diffusion Posterior Sampling for General Noisy
Inverse Problems", ICLR 2023, Algorithm 1 for Gaussian measurement noise), on any Diffusers scheduler.

Each step of the unconditional sampler is followed by a gradient step on the data fit of the denoiser's estimate:

    x0_hat = E[x0 | x_i]   from the network prediction (Tweedie; gen.diffusion.to_x0_eps)
    x'_{i-1} = scheduler.step(prediction, t_i, x_i)                     (the paper uses DDPM ancestral steps)
    x_{i-1} = x'_{i-1} - zeta * grad_{x_i} ||y - H(x0_hat(x_i))||

i.e. the paper's step ``zeta_i grad ||y - H(x0_hat)||^2`` with ``zeta_i = zeta / (2 ||y - H(x0_hat)||)`` (the
normalisation of the official code, per image here). The gradient runs back through the network: a step costs
one forward and one backward pass.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch

from gen.diffusion import alpha_sigma, to_x0_eps

from .operators import Operator

__all__ = ["dps"]


def dps(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prediction_type: str,
    scheduler,
    operator: Operator,
    y: torch.Tensor,
    latents: torch.Tensor,
    num_inference_steps: int,
    zeta: float = 1.0,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: Callable | None = None,
) -> torch.Tensor:
    """DPS sampling.

    Args:
        model_fn: ``model_fn(x_in, t) -> prediction`` of type ``prediction_type`` (differentiable).
        scheduler: a Diffusers scheduler; ``set_timesteps(num_inference_steps)`` is called here.
        operator: measurement operator; ``y`` its measurement ``[B, ...]``.
        latents: initial noise ``[B, C, H, W]`` (scaled here by ``scheduler.init_noise_sigma``).
        zeta: step size of the measurement gradient (>= 0; 0 gives the unconditional sampler).
        eta: DDIM stochasticity (1 = DDPM-like ancestral steps, as in the paper); ignored by other schedulers.
        decode: optional latent -> image map applied to ``x0_hat`` before ``H`` (latent DPS).
    Returns:
        the final sample ``[B, C, H, W]`` (detached).
    """
    if not isinstance(zeta, (int, float)) or not math.isfinite(zeta) or zeta < 0:
        raise ValueError(f"zeta must be a finite number >= 0; got {zeta!r}")
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)
    params = inspect.signature(scheduler.step).parameters
    step_kwargs = {}
    if "eta" in params:
        step_kwargs["eta"] = eta
    if "generator" in params:
        step_kwargs["generator"] = generator
    steps = progress(scheduler.timesteps) if progress is not None else scheduler.timesteps
    for i, t in enumerate(steps):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            x_in = scale_input(x, t)
            pred = model_fn(x_in, t)
            a, s = alpha_sigma(scheduler, t, ndim=x.ndim, dtype=x.dtype, device=x.device)
            x0_hat = to_x0_eps(pred, prediction_type, x_in, a, s)[0]
            image = decode(x0_hat) if decode is not None else x0_hat
            residual = (y - operator.forward(image)).flatten(1)
            norm = residual.pow(2).sum(dim=1).clamp_min(1e-20).sqrt()  # finite gradient at 0
            (grad,) = torch.autograd.grad(norm.sum(), x)
        with torch.no_grad():
            x_prev = scheduler.step(pred.detach(), t, x.detach(), **step_kwargs).prev_sample
            x = x_prev - zeta * grad
        if callback is not None:
            callback(i, t, x)
    return x.detach()
