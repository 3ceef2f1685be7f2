"""One guided denoising step, shared by every pipeline: network passes -> paper space -> guider -> model space.

The pipeline gives the raw network, the noisy input and the conditional/unconditional inputs; this function
1. asks the guider which samples need an unconditional pass (AG and guidance intervals skip it),
2. evaluates the network on all samples with the condition and on those rows without it,
3. converts both predictions to x0 and eps with ``gen.diffusion`` (the guider sees the space its paper uses),
4. lets the guider combine them into a guided x0,
5. converts that back to the network's own prediction space for the scheduler.
"""

from __future__ import annotations

import torch

from gen.diffusion import alpha_sigma, from_x0_eps, prediction_type_of, to_x0_eps

from .base import Prediction, StepInfo


def guided_prediction(
    net,
    x_in,
    t,
    cond_kwargs: dict,
    uncond_kwargs: dict,
    guider,
    step_index: int,
    num_inference_steps: int,
    alpha,
    sigma,
    pred_type: str,
):
    """Guided network prediction for one step.

    Args:
        net: callable ``net(x, t, **kwargs) -> Tensor`` (the raw prediction, in ``pred_type`` space).
        x_in: ``[B, ...]`` network input (after ``scheduler.scale_model_input``).
        cond_kwargs / uncond_kwargs: batched network inputs with and without the condition (rows align with x_in).
        guider: a ``gen.guidance.Guider`` on which ``begin`` was called for this run.
        alpha, sigma: ``x_in = alpha x0 + sigma eps`` (from ``gen.diffusion.alpha_sigma``), broadcastable to x_in.
        pred_type: the network's prediction space (``gen.diffusion.PREDICTION_TYPES``).
    Returns:
        ``(prediction in pred_type space, network evaluations per sample as a float)``.
    """
    b = x_in.shape[0]
    alpha = torch.as_tensor(alpha, dtype=x_in.dtype, device=x_in.device)
    sigma = torch.as_tensor(sigma, dtype=x_in.dtype, device=x_in.device)
    edm_sigma = (
        (sigma / alpha).reshape(-1).expand(b) if (sigma / alpha).numel() in (1, b) else (sigma / alpha)
    )
    info = StepInfo(
        step_index=step_index,
        num_inference_steps=num_inference_steps,
        timestep=torch.as_tensor(t),
        sigma=edm_sigma.reshape(b),
    )
    mask = guider.uncond_mask(info).to(device=x_in.device, dtype=torch.bool)
    n_u = int(mask.sum())
    # one network call on [all rows with the condition; the masked rows without it]
    if n_u:
        kwargs = {}
        for k, v in cond_kwargs.items():
            u = uncond_kwargs[k]
            kwargs[k] = (
                torch.cat([v, u[mask] if u.shape[:1] == mask.shape else u]) if torch.is_tensor(v) else v
            )
        raw = net(torch.cat([x_in, x_in[mask]]), t, **kwargs)
        cond_raw, raw_u = raw[:b], raw[b:]
    else:
        cond_raw = net(x_in, t, **cond_kwargs)
    x0_c, eps_c = to_x0_eps(cond_raw, pred_type, x_in, alpha, sigma)
    cond = Prediction(x0=x0_c, eps=eps_c)
    uncond = None
    if n_u:
        a_m = alpha[mask] if alpha.ndim and alpha.shape[0] == b else alpha
        s_m = sigma[mask] if sigma.ndim and sigma.shape[0] == b else sigma
        x0_u_rows, eps_u_rows = to_x0_eps(raw_u, pred_type, x_in[mask], a_m, s_m)
        x0_u, eps_u = x0_c.clone(), eps_c.clone()
        x0_u[mask], eps_u[mask] = x0_u_rows, eps_u_rows
        uncond = Prediction(x0=x0_u, eps=eps_u)
    x0_hat = guider(cond, uncond, info)
    eps_hat = (x_in - alpha * x0_hat) / sigma
    return from_x0_eps(x0_hat, eps_hat, pred_type, alpha, sigma), 1.0 + mask.float().mean().item()


def scheduler_guided_prediction(net, scheduler, loop_index: int, t, x_in, cond_kwargs: dict, uncond_kwargs: dict,
                                guider, num_inference_steps: int):
    """:func:`guided_prediction` for the ``loop_index``-th entry of ``scheduler.timesteps``.

    Reads ``(alpha, sigma)`` and the prediction type from the scheduler, and maps the loop index onto the step
    index ``0..num_inference_steps-1`` the guider counts in (second-order schedulers visit 2N-1 timesteps).
    """
    alpha, sigma = alpha_sigma(scheduler, t, ndim=x_in.ndim, dtype=x_in.dtype, device=x_in.device)
    step_index = loop_index * num_inference_steps // len(scheduler.timesteps)
    return guided_prediction(net, x_in, t, cond_kwargs, uncond_kwargs, guider, step_index, num_inference_steps,
                             alpha, sigma, prediction_type_of(scheduler))
