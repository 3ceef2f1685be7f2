"""Adapter between this package's time convention and Diffusers' flow matching.

Here (paper, SiT): ``t = 0`` noise, ``t = 1`` data; the linear one-sided interpolant is
``x_t = (1 - t) noise + t data`` and the velocity is ``v = dx/dt = data - noise``.

Diffusers (``FlowMatchEulerDiscreteScheduler``, SD3): ``sigma = 1`` noise, ``sigma = 0`` data;
``x_sigma = (1 - sigma) data + sigma noise``, ``timestep = sigma * num_train_timesteps`` and the network outputs
``u = dx/dsigma = noise - data`` (``prediction_type "flow"`` in :mod:`gen.diffusion`).

So ``sigma = 1 - t`` and ``u = -v``: a model trained here with the linear one-sided velocity objective runs in a
Diffusers flow-matching pipeline through :func:`flow_model_from_velocity_model`, and a Diffusers flow model runs
here through :func:`velocity_model_from_flow_model`.
"""

from __future__ import annotations

import torch


def sigma_from_t(t):
    """Diffusers' flow-matching sigma (1 = noise) of interpolant time ``t`` (0 = noise)."""
    return 1.0 - t


def t_from_sigma(sigma):
    """Interpolant time ``t`` of a Diffusers flow-matching ``sigma``."""
    return 1.0 - sigma


def flow_from_velocity(v: torch.Tensor) -> torch.Tensor:
    """Diffusers' flow output ``u = noise - data`` from the interpolant velocity ``v = data - noise``."""
    return -v


def velocity_from_flow(u: torch.Tensor) -> torch.Tensor:
    """The interpolant velocity ``v`` from a Diffusers flow output ``u``."""
    return -u


def flow_model_from_velocity_model(model_fn, num_train_timesteps: float = 1000.0):
    """Wrap ``model_fn(x, t in [0, 1]) -> v`` as ``net(x, timestep in [0, T]) -> u`` for Diffusers' flow
    schedulers (``timestep = sigma * T``)."""

    def net(x, timestep):
        sigma = torch.as_tensor(timestep, dtype=x.dtype, device=x.device) / num_train_timesteps
        return flow_from_velocity(model_fn(x, t_from_sigma(sigma).expand(x.shape[0])))

    return net


def velocity_model_from_flow_model(net, num_train_timesteps: float = 1000.0):
    """Wrap a Diffusers flow network ``net(x, timestep) -> u`` as ``model_fn(x, t) -> v`` for this package."""

    def model_fn(x, t):
        return velocity_from_flow(net(x, sigma_from_t(t) * num_train_timesteps))

    return model_fn
