"""Conversions between the four prediction spaces of Gaussian diffusion models.

Every scheduler used here corrupts data as ``x_t = alpha_t * x0 + sigma_t * eps`` (eps ~ N(0, I)) at the
point where the network sees ``x_t`` (after ``scheduler.scale_model_input``):

- variance-preserving schedulers (DDPM, DDIM, PNDM, DPM-Solver, UniPC, Euler, Heun):
  ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` (Ho et al. 2020, eq. 4);
- rectified flow (``FlowMatchEulerDiscreteScheduler``): ``alpha_t = 1 - s``, ``sigma_t = s`` with ``s = t / T``.

A network predicts one of (names follow ``scheduler.config.prediction_type``):

- ``"epsilon"``: the noise ``eps``;
- ``"sample"``: the clean data ``x0``;
- ``"v_prediction"``: ``v = alpha_t * eps - sigma_t * x0`` (Salimans & Ho 2022, eq. in sec. 4);
- ``"flow"``: the rectified-flow velocity ``u = eps - x0`` (Liu et al. 2022; what SD3/FlowMatch models output).

Given ``x_t`` and one prediction, both ``x0`` and ``eps`` follow by solving the 2x2 linear system; the
formulas below hold for any ``(alpha_t, sigma_t)``, not only ``alpha^2 + sigma^2 = 1``.
"""

from __future__ import annotations

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")


def _check_type(name: str, arg: str) -> None:
    if name not in PREDICTION_TYPES:
        raise ValueError(f"{arg}={name!r} is not a prediction type; allowed: {', '.join(PREDICTION_TYPES)}")


def is_flow_scheduler(scheduler) -> bool:
    return not hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "config") and "shift" in scheduler.config


def prediction_type_of(scheduler) -> str:
    """The prediction space a scheduler expects from the network (``"flow"`` for rectified-flow schedulers)."""
    if is_flow_scheduler(scheduler):
        return "flow"
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    _check_type(kind, "scheduler.config.prediction_type")
    return kind


def alpha_sigma(scheduler, timesteps, ndim: int = 4, dtype=torch.float32, device=None):
    """``(alpha_t, sigma_t)`` of the network input ``x_t = alpha_t x0 + sigma_t eps`` at ``timesteps``.

    For variance-preserving schedulers the value at a fractional timestep (Euler/Heun use them) interpolates the
    Karras noise level ``s = sqrt((1 - abar) / abar)`` linearly in t, as those schedulers do, and returns
    ``alpha = 1 / sqrt(1 + s^2)``, ``sigma = s / sqrt(1 + s^2)``; at integer timesteps this is exactly
    ``sqrt(abar_t)``, ``sqrt(1 - abar_t)``.

    Args:
        scheduler: a Diffusers scheduler (VP with ``alphas_cumprod``, or ``FlowMatchEulerDiscreteScheduler``).
        timesteps: scalar or ``[B]`` tensor of scheduler timesteps.
        ndim: rank of the sample tensor; the result is shaped ``[B, 1, ..., 1]`` to broadcast against it.
    Returns:
        ``(alpha, sigma)``, each ``[B] + [1] * (ndim - 1)``.
    """
    t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
    if is_flow_scheduler(scheduler):
        s = t / float(scheduler.config.num_train_timesteps)
        if (s < 0).any() or (s > 1).any():
            raise ValueError(f"flow timesteps must lie in [0, num_train_timesteps]; got {t.tolist()}")
        alpha, sigma = 1.0 - s, s
    elif hasattr(scheduler, "alphas_cumprod"):
        abar = scheduler.alphas_cumprod.to(torch.float64).cpu()
        if (t < 0).any() or (t > len(abar) - 1).any():
            raise ValueError(f"timesteps must lie in [0, {len(abar) - 1}]; got {t.tolist()}")
        karras = ((1.0 - abar) / abar).sqrt()
        s = torch.from_numpy(np.interp(t.numpy(), np.arange(len(abar)), karras.numpy()))
        alpha, sigma = 1.0 / (1.0 + s**2).sqrt(), s / (1.0 + s**2).sqrt()
    else:
        raise ValueError(f"{type(scheduler).__name__} has neither alphas_cumprod nor a flow-matching config")
    shape = (-1,) + (1,) * (ndim - 1)
    return alpha.reshape(shape).to(device=device, dtype=dtype), sigma.reshape(shape).to(device=device, dtype=dtype)


def to_x0_eps(pred: torch.Tensor, pred_type: str, x_t: torch.Tensor, alpha, sigma):
    """Solve ``x_t = alpha x0 + sigma eps`` together with the prediction for ``(x0, eps)``.

    - epsilon: ``x0 = (x_t - sigma eps) / alpha``
    - sample: ``eps = (x_t - alpha x0) / sigma``
    - v_prediction: ``x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)``,
      ``eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)``
    - flow: ``x0 = (x_t - sigma u) / (alpha + sigma)``, ``eps = (x_t + alpha u) / (alpha + sigma)``
    """
    _check_type(pred_type, "pred_type")
    if pred.shape != x_t.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} does not match x_t shape {tuple(x_t.shape)}")
    if pred_type == "epsilon":
        return (x_t - sigma * pred) / alpha, pred
    if pred_type == "sample":
        return pred, (x_t - alpha * pred) / sigma
    if pred_type == "v_prediction":
        norm = alpha**2 + sigma**2
        return (alpha * x_t - sigma * pred) / norm, (sigma * x_t + alpha * pred) / norm
    denom = alpha + sigma
    return (x_t - sigma * pred) / denom, (x_t + alpha * pred) / denom


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, pred_type: str, alpha, sigma) -> torch.Tensor:
    """The prediction of type ``pred_type`` implied by ``(x0, eps)`` (inverse of :func:`to_x0_eps`)."""
    _check_type(pred_type, "pred_type")
    if pred_type == "epsilon":
        return eps
    if pred_type == "sample":
        return x0
    if pred_type == "v_prediction":
        return alpha * eps - sigma * x0
    return eps - x0


def convert_prediction(pred, src: str, dst: str, x_t, alpha, sigma) -> torch.Tensor:
    """Convert a network prediction from space ``src`` to space ``dst`` at the noisy point ``x_t``."""
    _check_type(src, "src")
    _check_type(dst, "dst")
    if src == dst:
        return pred
    x0, eps = to_x0_eps(pred, src, x_t, alpha, sigma)
    return from_x0_eps(x0, eps, dst, alpha, sigma)
