"""RED-Diff: variational inverse-problem solving with a diffusion prior (Mardani, Song, Kautz, Vahdat,
"A Variational Perspective on Solving Inverse Problems with Diffusion Models", ICLR 2024, arXiv 2305.04391).

Algorithm 1 of the paper: the posterior is approximated by ``q(x0 | y) = N(mu, sigma^2 I)`` with ``sigma -> 0``
and ``mu`` is fitted by Adam. Starting from ``mu = H^+(y)``, for each ``t`` of a descending time grid:

    eps ~ N(0, I)
    x_t = alpha_t mu + sigma_t eps                                   (VP forward process at mu)
    eps_hat = eps_theta(x_t, t)                                      (no gradient through the network)
    loss(mu) = w_obs ||y - H(mu)||^2 / 2 + lambda_t <sg(eps_hat - eps), mu>      (paper eq. 9 / Alg. 1)
    mu <- Adam step on loss

with ``w_obs = 1 / sigma_y^2`` (the paper's ``1 / (2 sigma_v^2)`` on ``||.||^2``) when ``sigma_y > 0`` and a given
weight (default 1, as the reference code's ``obs_weight``) when ``sigma_y = 0``; and the SNR weighting
``lambda_t = lambda * g(sigma_t / alpha_t)`` (``sigma_t / alpha_t = 1 / sqrt(SNR_t)``) with ``g`` one of
``linear`` (the paper's default), ``sqrt``, ``square``, ``log`` (``log(1 + r)``), ``clip_linear`` (``min(r, 1)``),
``const``, or a callable ``g(alpha, sigma)``. The gradient of the regulariser is ``lambda_t (eps_hat - eps)``,
the RED/score-matching term, so a step costs one network forward and no backward through the network.

Sums are over the pixels of each image (the reference code takes means: the same up to a rescaling of lambda).
Images in a batch are independent (Adam acts per coordinate).

Gaussian check (``tests/test_reddiff.py``): for a prior ``N(m, s^2 I)`` the exact noise predictor is
``eps*(x_t) = sigma_t (x_t - alpha_t m) / (alpha_t^2 s^2 + sigma_t^2)``, so
``E_eps[eps*(alpha mu + sigma eps) - eps] = alpha sigma (mu - m) / (alpha^2 s^2 + sigma^2)``: the regulariser acts
as a Gaussian prior of precision ``p_t = lambda_t alpha_t sigma_t / (alpha_t^2 s^2 + sigma_t^2)`` around ``m``, and
the stationary point of the expected loss is ``(w H^T H + p_t I)^-1 (w H^T y + p_t m)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gen.diffusion import alpha_sigma, to_x0_eps

from .operators import Operator

__all__ = ["OPTIMIZERS", "WEIGHTINGS", "snr_weight", "reddiff_timesteps", "red_diff", "eps_predictor"]

WEIGHTINGS = ("linear", "sqrt", "square", "log", "clip_linear", "const")
OPTIMIZERS = ("adam", "sgd")


def snr_weight(weighting: str | Callable, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``g(r)`` at ``r = sigma / alpha`` for a named weighting, or ``weighting(alpha, sigma)`` for a callable."""
    if callable(weighting):
        return torch.as_tensor(weighting(alpha, sigma), dtype=alpha.dtype)
    r = sigma / alpha
    if weighting == "linear":
        return r
    if weighting == "sqrt":
        return r.sqrt()
    if weighting == "square":
        return r**2
    if weighting == "log":
        return torch.log1p(r)
    if weighting == "clip_linear":
        return r.clamp(max=1.0)
    if weighting == "const":
        return torch.ones_like(r)
    raise ValueError(f"weighting={weighting!r}; allowed: {', '.join(WEIGHTINGS)} or a callable g(alpha, sigma)")


def reddiff_timesteps(num_steps: int, num_train_timesteps: int = 1000, t_max: int | None = None,
                      t_min: int = 0) -> torch.Tensor:
    """The descending grid of the reference code: ``t_min + k (t_max + 1 - t_min) / num_steps`` for
    ``k = num_steps - 1, ..., 0`` (floored to integers), ``t_max = num_train_timesteps - 1`` by default."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    t_max = num_train_timesteps - 1 if t_max is None else int(t_max)
    if not 0 <= t_min <= t_max < num_train_timesteps:
        raise ValueError(f"need 0 <= t_min <= t_max < {num_train_timesteps}; got t_min={t_min}, t_max={t_max}")
    grid = t_min + torch.arange(num_steps, dtype=torch.float64) * (t_max + 1 - t_min) / num_steps
    return grid.floor().long().flip(0)


def eps_predictor(model_fn: Callable, prediction_type: str, scheduler) -> Callable:
    """Wrap a network ``model_fn(x_t, t) -> prediction`` of type ``prediction_type`` (epsilon, sample,
    v_prediction, flow) into ``eps_fn(x_t, t) -> eps_hat`` with the scheduler's ``(alpha_t, sigma_t)``."""

    def eps_fn(x_t, t):
        a, s = alpha_sigma(scheduler, t, ndim=x_t.ndim, dtype=x_t.dtype, device=x_t.device)
        pred = model_fn(x_t, t)
        return to_x0_eps(pred, prediction_type, x_t, a, s)[1]

    return eps_fn


def red_diff(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    operator: Operator,
    y: torch.Tensor,
    x_init: torch.Tensor,
    schedule: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    timesteps: torch.Tensor,
    lr: float = 0.25,
    lam: float = 0.25,
    weighting: str | Callable = "linear",
    obs_weight: float | None = None,
    adam_betas: tuple[float, float] = (0.9, 0.99),
    generator: torch.Generator | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: Callable | None = None,
    optimizer: str = "adam",
) -> torch.Tensor:
    """RED-Diff (Algorithm 1 of Mardani et al. 2024), batched.

    Args:
        eps_fn: ``eps_fn(x_t, t) -> eps_hat`` with ``t`` a ``[B]`` long tensor; called under ``torch.no_grad``.
        operator: the measurement operator (``operator.forward`` is differentiated by autograd).
        y: measurement ``[B, ...]`` (``operator.measurement_shape`` of the decoded image shape).
        x_init: initial mean ``mu`` ``[B, C, H, W]`` (``H^+(y)``, or its latent encoding).
        schedule: ``t -> (alpha_t, sigma_t)`` broadcastable against ``mu``.
        timesteps: 1-D descending grid (see :func:`reddiff_timesteps`); one network call each.
        lr: Adam learning rate on ``mu``.
        lam: ``lambda`` of ``lambda_t = lambda * g(sigma_t / alpha_t)``.
        weighting: ``g``, one of :data:`WEIGHTINGS` or a callable ``g(alpha, sigma)``.
        obs_weight: ``w_obs`` of the data term; None: ``1 / sigma_y^2`` when ``operator.sigma_y > 0`` else 1.
        generator: torch generator for the noises ``eps`` (drawn on the CPU).
        decode: optional map ``mu -> image`` before ``H`` (latent RED-Diff: the VAE decoder; differentiated).
        callback: ``callback(i, t, mu)`` after each step.
        progress: optional wrapper of the step iterator (e.g. a pipeline's ``progress_bar``).
        optimizer: ``"adam"`` (Algorithm 1 and the reference code; ``adam_betas``) or ``"sgd"`` (plain gradient
            steps ``mu <- mu - lr grad`` on the same loss). Adam normalises each coordinate, so on pixels the data
            term does not see (inpainting holes) ``lam`` drops out and every step moves them by about ``lr``. With
            SGD the regulariser step is ``lr lambda_t (eps_hat - eps)``, and since ``eps_hat - eps ~ (alpha_t /
            sigma_t) (mu - x0_hat(x_t))``, ``weighting="linear"`` with ``lr * lam = 1`` moves unseen pixels to the
            denoiser's estimate ``x0_hat`` at every step (an annealed denoising of ``mu``).
    Returns:
        the final ``mu`` (detached), same shape as ``x_init``.
    """
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
    if not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0; got {lam!r}")
    if not callable(weighting) and weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; allowed: {', '.join(WEIGHTINGS)} or a callable g(alpha, sigma)")
    if obs_weight is None:
        obs_weight = 1.0 / operator.sigma_y**2 if operator.sigma_y > 0 else 1.0
    if not math.isfinite(obs_weight) or obs_weight < 0:
        raise ValueError(f"obs_weight must be a finite number >= 0; got {obs_weight!r}")
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D tensor; got shape {tuple(timesteps.shape)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")

    mu = x_init.detach().clone().requires_grad_(True)
    if optimizer == "adam":
        opt = torch.optim.Adam([mu], lr=lr, betas=adam_betas, weight_decay=0.0)
    else:
        opt = torch.optim.SGD([mu], lr=lr)
    batch = mu.shape[0]
    steps = progress(timesteps) if progress is not None else timesteps
    for i, t in enumerate(steps):
        t_b = t.reshape(1).expand(batch).to(mu.device)
        alpha, sigma = schedule(t_b)
        # 1. x_t = alpha_t mu + sigma_t eps and the network's noise estimate, without gradient
        eps = torch.randn(mu.shape, generator=generator, dtype=torch.float32).to(mu.device, mu.dtype)
        with torch.no_grad():
            x_t = alpha * mu + sigma * eps
            eps_hat = eps_fn(x_t, t_b)
            lam_t = lam * snr_weight(weighting, alpha, sigma)
            reg_grad = lam_t * (eps_hat - eps)
        # 2. loss = w ||y - H(mu)||^2 / 2 + lambda_t <sg(eps_hat - eps), mu>; one Adam step on mu
        with torch.enable_grad():
            image = decode(mu) if decode is not None else mu
            residual = y - operator.forward(image)
            loss = 0.5 * obs_weight * residual.pow(2).sum() + (reg_grad * mu).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if callback is not None:
            callback(i, t, mu.detach())
    return mu.detach()
