"""Diffusion Posterior Sampling (Chung, Kim, Mccann, Klasky, Ye, "Diffusion Posterior Sampling for General Noisy
Inverse Problems", ICLR 2023, Algorithm 1 for Gaussian measurement noise), on any Diffusers scheduler.

Each step of the unconditional sampler is followed by a gradient step on the data fit of the denoiser's estimate:

    x0_hat = E[x0 | x_i]   from the network prediction (Tweedie; gen.diffusion.to_x0_eps)
    x'_{i-1} = scheduler.step(prediction, t_i, x_i)                     (the paper uses DDPM ancestral steps)
    x_{i-1} = x'_{i-1} - zeta * grad_{x_i} ||y - H(x0_hat(x_i))||

i.e. the paper's step ``zeta_i grad ||y - H(x0_hat)||^2`` with ``zeta_i = zeta / (2 ||y - H(x0_hat)||)`` (the
normalisation of the official code, per image here). The gradient runs back through the network: a step costs
one forward and one backward pass. DPS is a per-step hook of the sampling core (:class:`DPSHook`), so it runs with
every scheduler, guider and model family the core supports.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gen.sampling import CallableAdapter, StepHook, StepState, denoise, scheduler_step_kwargs

from .operators import Operator

__all__ = ["DPSHook", "dps"]


class DPSHook(StepHook):
    """The DPS measurement step after each scheduler step:
    ``x_{i-1} = x'_{i-1} - zeta * grad_{x_i} ||y - H(D(x0_hat(x_i)))||`` (per image).

    Args:
        operator, y: measurement operator and measurement ``[B, ...]``.
        zeta: step size (>= 0; 0 gives the plain sampler).
        decode: optional latent -> image map applied to ``x0_hat`` before ``H`` (latent DPS).
    """

    needs_grad = True

    def __init__(self, operator: Operator, y: torch.Tensor, zeta: float = 1.0,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if isinstance(zeta, bool) or not isinstance(zeta, (int, float)) or not math.isfinite(zeta) or zeta < 0:
            raise ValueError(f"zeta must be a finite number >= 0; got {zeta!r}")
        self.operator, self.y, self.zeta, self.decode = operator, y, float(zeta), decode

    def __call__(self, state: StepState) -> torch.Tensor:
        image = self.decode(state.x0) if self.decode is not None else state.x0
        residual = (self.y - self.operator.forward(image)).flatten(1)
        norm = residual.pow(2).sum(dim=1).clamp_min(1e-20).sqrt()  # finite gradient at 0
        (grad,) = torch.autograd.grad(norm.sum(), state.x)
        return state.prev_sample - self.zeta * grad


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
    """DPS sampling with a plain callable network.

    Args:
        model_fn: ``model_fn(x_in, t) -> prediction`` of type ``prediction_type`` (differentiable).
        prediction_type: must be the scheduler's (``gen.diffusion.prediction_type_of``).
        scheduler: a Diffusers scheduler; ``set_timesteps(num_inference_steps)`` is called here.
        operator: measurement operator; ``y`` its measurement ``[B, ...]``.
        latents: initial noise ``[B, C, H, W]`` (scaled here by ``scheduler.init_noise_sigma``).
        zeta: step size of the measurement gradient (>= 0; 0 gives the unconditional sampler).
        eta: DDIM stochasticity (1 = DDPM-like ancestral steps, as in the paper); ignored by other schedulers.
        decode: optional latent -> image map applied to ``x0_hat`` before ``H`` (latent DPS).
    Returns:
        the final sample ``[B, C, H, W]`` (detached).
    """
    from gen.diffusion import prediction_type_of

    if prediction_type != prediction_type_of(scheduler):
        raise ValueError(f"prediction_type={prediction_type!r} but the scheduler expects "
                         f"{prediction_type_of(scheduler)!r}")
    hook = DPSHook(operator, y, zeta, decode)
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    params = scheduler_step_kwargs(scheduler, eta, generator)

    def on_step_end(k, t, x):
        if callback is not None:
            callback(k, t, x)

    return denoise(CallableAdapter(model_fn), scheduler, x, num_inference_steps, hook=hook, step_kwargs=params,
                   progress=progress, on_step_end=on_step_end).sample.detach()
