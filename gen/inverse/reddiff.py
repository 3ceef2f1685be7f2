"""RED-Diff: variational inverse-problem solving with a diffusion prior (Mardani, Song, Kautz, Vahdat,
"A Variational Perspective on Solving Inverse Problems with Diffusion Models", ICLR 2024, arXiv 2305.04391).

Algorithm 1 of the paper: the posterior is approximated by ``q(x0 | y) = N(mu, sigma^2 I)`` with ``sigma -> 0``
and ``mu`` is fitted by Adam. Starting from ``mu = H^+(y)``, for each ``t`` of a descending time grid:

    eps ~ N(0, I)
    x_t = alpha_t mu + sigma_t eps                                   (the prior's forward process at mu)
    eps_hat = E[eps | x_t] from the network at (x_t, t)               (no gradient through the network)
    loss(mu) = w_obs ||y - H(mu)||^2 / 2 + lambda_t <sg(eps_hat - eps), mu>      (paper eq. 9 / Alg. 1)
    mu <- Adam step on loss

with ``w_obs = 1 / sigma_y^2`` (the paper's ``1 / (2 sigma_v^2)`` on ``||.||^2``) when ``sigma_y > 0`` and a given
weight (default 1, as the reference code's ``obs_weight``) when ``sigma_y = 0``; and the SNR weighting
``lambda_t = lambda * g(sigma_t / alpha_t)`` (``sigma_t / alpha_t = 1 / sqrt(SNR_t)``) with ``g`` one of
``linear`` (the paper's default), ``sqrt``, ``square``, ``log`` (``log(1 + r)``), ``clip_linear`` (``min(r, 1)``),
``const``, or a callable ``g(alpha, sigma)``. The gradient of the regulariser is ``lambda_t (eps_hat - eps)``,
the RED/score-matching term, so a step costs one network forward and no backward through the network.

The paper writes the VP process; nothing in the derivation needs more than a Gaussian forward process
``x_t = alpha_t x0 + sigma_t eps`` and the prior's ``eps_hat = E[eps | x_t]`` (``-sigma_t`` times the score of the
noised prior), so any prior of the sampling core with such a pair runs: :func:`prior_space` takes ``(alpha_t,
sigma_t)`` and ``eps_hat`` from the prior scheduler's prediction space (VP; rectified flow ``alpha = 1 - s``,
``sigma = s``; a one-sided interpolant ``x = alpha(t) z + beta(t) x1`` read as ``alpha_t = beta(t)``, ``sigma_t =
alpha(t)``), and :func:`reddiff_grid` places the descending grid from high to low noise in the prior's own
timesteps (a noise fraction mapped by the space: VP training steps, the flow scheduler's shift, the interpolant's
reversed time).

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

from gen.diffusion import alpha_sigma, from_x0_eps, to_x0_eps
from gen.diffusion.conversions import PREDICTION_TYPES
from gen.diffusion.space import Frame, PredictionSpace, prediction_space

from .operators import Operator

__all__ = ["OPTIMIZERS", "SUPPORTED_PRIORS", "WEIGHTINGS", "RedDiffSolver", "eps_predictor", "prior_space", "red_diff",
           "reddiff_grid", "reddiff_timesteps", "run_red_diff", "snr_weight"]

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


def check_reddiff_settings(lr, lam, weighting) -> None:
    """``ValueError`` naming a bad RED-Diff setting."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0; got {lam!r}")
    if not callable(weighting) and weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; allowed: {', '.join(WEIGHTINGS)} or a callable g(alpha, sigma)")


SUPPORTED_PRIORS = ("variance-preserving noise schedulers (alphas_cumprod: DDPM, DDIM, Euler, ...)",
                    "rectified flow (FlowMatchEulerDiscreteScheduler, with its static shift or dynamic mu)",
                    "one-sided stochastic interpolants (gen.interpolants.InterpolantScheduler)")


def prior_space(prior, what: str = "RED-Diff") -> PredictionSpace:
    """The prediction space of a RED-Diff prior: ``prior`` is the prior's scheduler or a :class:`PredictionSpace`
    (``what`` names the method or pipeline in the error).

    Raises:
        ValueError: the family has no noise-fraction map and ``(x0, eps)`` conversions (GBM, two-sided or mirror
            interpolants, a scheduler without a noise schedule), naming it and listing :data:`SUPPORTED_PRIORS`.
    """
    name = type(prior).__name__
    try:
        space = prior if isinstance(prior, PredictionSpace) else prediction_space(prior)
        space.timestep_at(torch.tensor([0.5]), mu=0.0)  # the families that place a noise grid
    except (ValueError, NotImplementedError, AttributeError) as err:
        raise ValueError(f"{what} does not support the prior scheduler {name} ({err}); supported: "
                         f"{'; '.join(SUPPORTED_PRIORS)}") from None
    return space


def reddiff_grid(prior, num_steps: int, noise_max: float = 1.0, noise_min: float = 0.0,
                 mu: float | None = None) -> torch.Tensor:
    """RED-Diff's descending time grid for any supported prior, in the prior's own timestep units.

    The reference grid in noise fractions (1 = noise end, 0 = data end): ``u_k = noise_min + k (noise_max -
    noise_min) / num_steps`` for ``k = num_steps - 1, ..., 0`` (``noise_max`` itself is not visited), mapped by the
    prior's space (:meth:`gen.diffusion.space.PredictionSpace.timestep_at`): VP floors ``u T`` to training timesteps
    (``noise_max = (t_max + 1) / T``, ``noise_min = t_min / T`` gives :func:`reddiff_timesteps` exactly), rectified flow
    applies the scheduler's shift, an interpolant runs its time the other way (``t = 1 - u``).

    Args:
        prior: the prior's scheduler (or its prediction space).
        num_steps: grid size (one network evaluation each).
        noise_max, noise_min: ``0 <= noise_min < noise_max <= 1``.
        mu: dynamic shift of a flow scheduler with ``use_dynamic_shifting``.
    Returns:
        ``[num_steps]`` timesteps, from high noise to low noise.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    for name, v in (("noise_max", noise_max), ("noise_min", noise_min)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a number in [0, 1]; got {v!r}")
    if not 0 <= noise_min < noise_max <= 1:
        raise ValueError(f"need 0 <= noise_min < noise_max <= 1; got noise_min={noise_min}, noise_max={noise_max}")
    space = prior_space(prior)
    u = noise_min + torch.arange(num_steps, dtype=torch.float64) * (noise_max - noise_min) / num_steps
    return space.timestep_at(u.flip(0), mu=mu)


class _ScheduleFrame(Frame):
    """A frame of the legacy spelling: ``(alpha_t, sigma_t) = schedule(t [B])`` and conversions of one prediction
    type at the network input ``x_in``."""

    def __init__(self, space: _ScheduleSpace, x_in, timestep):
        self.space, self.x, self.x_in, self.timestep = space, x_in, x_in, timestep
        self._as = None

    def alpha_sigma(self):
        if self._as is None:
            t_b = torch.as_tensor(self.timestep).reshape(1).expand(self.x_in.shape[0]).to(self.x_in.device)
            self._as = self.space.schedule(t_b)
        return self._as

    def to_x0_eps(self, lin):
        alpha, sigma = self.alpha_sigma()
        return to_x0_eps(lin, self.space.prediction_type, self.x_in, alpha.to(lin.dtype), sigma.to(lin.dtype))

    def from_x0_eps(self, x0, eps):
        alpha, sigma = self.alpha_sigma()
        return from_x0_eps(x0, eps, self.space.prediction_type, alpha.to(x0.dtype), sigma.to(x0.dtype))


class _ScheduleSpace(PredictionSpace):
    """``schedule(t) -> (alpha_t, sigma_t)`` and a prediction type (:func:`red_diff`'s arguments) as a space."""

    def __init__(self, schedule: Callable, prediction_type: str):
        self.schedule, self.prediction_type = schedule, prediction_type

    def frame(self, x, timestep):
        return _ScheduleFrame(self, x, timestep)


class _RedDiffFrame(Frame):
    """``x = mu``; the network sees ``x_t = alpha_t mu + sigma_t eps`` with fresh ``eps``, ``(alpha_t, sigma_t)`` and
    every conversion are those of the prior's frame at ``x_t`` (:meth:`PredictionSpace.input_frame`)."""

    def __init__(self, solver: RedDiffSolver, mu, timestep):
        self.solver, self.x, self.timestep = solver, mu, timestep
        space = solver.space
        self._alpha, self._sigma = space.input_frame(mu, timestep).alpha_sigma()
        g = solver.generator
        self.eps = torch.randn(mu.shape, generator=g, dtype=torch.float32,
                               device=getattr(g, "device", "cpu")).to(mu.device, mu.dtype)
        self.x_in = self._alpha * mu + self._sigma * self.eps
        self.prior = space.input_frame(self.x_in, timestep)

    def alpha_sigma(self):
        return self._alpha, self._sigma

    def linear(self, raw):
        return self.prior.linear(raw)

    def to_scheduler(self, lin):
        return self.prior.to_scheduler(lin)

    def to_x0_eps(self, lin):
        return self.prior.to_x0_eps(lin)

    def from_x0_eps(self, x0, eps):
        return self.prior.from_x0_eps(x0, eps)


class _RedDiffSpace(PredictionSpace):
    def __init__(self, solver: RedDiffSolver):
        self.solver = solver

    def prepare(self, timesteps, like):
        self.solver.space.prepare(timesteps, like)

    def frame(self, x, timestep):
        self.solver.last_frame = _RedDiffFrame(self.solver, x, timestep)
        return self.solver.last_frame


class RedDiffSolver:
    """RED-Diff (Algorithm 1 of Mardani et al. 2024) as a "scheduler" of the sampling core (``denoise``).

    The core's state is the variational mean ``mu``; at each ``t`` of the descending grid it evaluates the prior at
    ``x_t = alpha_t mu + sigma_t eps`` (this solver's prediction space draws ``eps``), guides if asked, and calls
    :meth:`step`, which takes one Adam step on

        loss(mu) = w_obs ||y - H(D(mu))||^2 / 2 + lambda_t <sg(eps_hat - eps), mu>

    (``D`` the optional decoder of latent RED-Diff). The network is never differentiated.

    The prior is given either as its scheduler (``prior=``: VP, rectified flow or a one-sided interpolant; the
    noising ``(alpha_t, sigma_t)`` and ``eps_hat`` come from its prediction space, :func:`prior_space`) or, the
    legacy spelling, as ``schedule`` and ``prediction_type``.

    Args:
        operator, y: the measurement operator and measurement ``[B, ...]``.
        x_init: the initial mean ``mu`` (``H^+ y``, or its latent encoding).
        schedule: ``t [B] -> (alpha_t, sigma_t)``, broadcastable against ``mu`` (legacy; None with ``prior``).
        timesteps: 1-D descending grid in the prior's timesteps (:func:`reddiff_grid`, :func:`reddiff_timesteps`).
        prediction_type: the network's prediction space with ``schedule`` (converted to ``eps_hat`` at ``x_t``).
        lr, lam, weighting, obs_weight, adam_betas, generator, decode, optimizer: see :func:`red_diff`.
        prior: the prior's scheduler or prediction space (instead of ``schedule``/``prediction_type``).
    """

    order = 1

    def __init__(self, operator: Operator, y: torch.Tensor, x_init: torch.Tensor, schedule: Callable | None = None,
                 timesteps=None, prediction_type: str = "epsilon", lr: float = 0.25, lam: float = 0.25,
                 weighting: str | Callable = "linear", obs_weight: float | None = None,
                 adam_betas: tuple[float, float] = (0.9, 0.99), generator: torch.Generator | None = None,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None, prior=None,
                 optimizer: str = "adam"):
        check_reddiff_settings(lr, lam, weighting)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if (schedule is None) == (prior is None):
            raise ValueError("give the prior as prior= (its scheduler) or as schedule= with prediction_type=, "
                             "exactly one of them")
        if prior is None:
            if not callable(schedule):
                raise ValueError(f"schedule must be a callable t -> (alpha_t, sigma_t); got {type(schedule).__name__}")
            if prediction_type not in PREDICTION_TYPES:
                raise ValueError(f"prediction_type={prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}")
            self.space: PredictionSpace = _ScheduleSpace(schedule, prediction_type)
        else:
            self.space = prior_space(prior)
        if obs_weight is None:
            obs_weight = 1.0 / operator.sigma_y**2 if operator.sigma_y > 0 else 1.0
        if not math.isfinite(obs_weight) or obs_weight < 0:
            raise ValueError(f"obs_weight must be a finite number >= 0; got {obs_weight!r}")
        if timesteps is None:
            raise ValueError("timesteps must be given (reddiff_grid(prior, num_steps) makes the reference grid)")
        timesteps = torch.as_tensor(timesteps)
        if timesteps.ndim != 1 or timesteps.numel() == 0:
            raise ValueError(f"timesteps must be a non-empty 1-D tensor; got shape {tuple(timesteps.shape)}")
        self.operator, self.y, self.schedule, self.decode = operator, y, schedule, decode
        self.prediction_type, self.lam, self.weighting, self.obs_weight = prediction_type, lam, weighting, obs_weight
        self.generator = generator
        self.timesteps = timesteps
        self.mu = x_init.detach().clone().requires_grad_(True)
        if optimizer == "adam":
            self.optimizer = torch.optim.Adam([self.mu], lr=lr, betas=adam_betas, weight_decay=0.0)
        else:
            self.optimizer = torch.optim.SGD([self.mu], lr=lr)
        self.last_frame: _RedDiffFrame | None = None

    @property
    def initial_state(self) -> torch.Tensor:
        return self.mu.detach()

    def prediction_space(self) -> PredictionSpace:
        return _RedDiffSpace(self)

    def step(self, model_output, timestep, sample, return_dict: bool = False):
        """One Adam (or SGD) step on ``mu`` from the (guided) network output at this frame; returns ``(mu,)``."""
        frame = self.last_frame
        if frame is None:
            raise ValueError("RedDiffSolver.step needs the frame of this step (run it through gen.sampling.denoise)")
        with torch.no_grad():
            eps_hat = frame.to_x0_eps(model_output.to(frame.x_in.dtype))[1]
            alpha, sigma = frame.alpha_sigma()
            lam_t = self.lam * snr_weight(self.weighting, alpha, sigma)
            reg_grad = lam_t * (eps_hat - frame.eps)
        # loss = w ||y - H(mu)||^2 / 2 + lambda_t <sg(eps_hat - eps), mu>; one Adam step on mu
        with torch.enable_grad():
            image = self.decode(self.mu) if self.decode is not None else self.mu
            residual = self.y - self.operator.forward(image)
            loss = 0.5 * self.obs_weight * residual.pow(2).sum() + (reg_grad * self.mu).sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        out = self.mu.detach()
        return (out,) if not return_dict else {"prev_sample": out}


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
    """RED-Diff (Algorithm 1 of Mardani et al. 2024), batched, through the sampling core (:class:`RedDiffSolver`).

    Args:
        eps_fn: ``eps_fn(x_t, t) -> eps_hat``; called under ``torch.no_grad``.
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
    from gen.sampling import CallableAdapter

    solver = RedDiffSolver(operator, y, x_init, schedule, timesteps, "epsilon", lr=lr, lam=lam, weighting=weighting,
                           obs_weight=obs_weight, adam_betas=adam_betas, generator=generator, decode=decode,
                           optimizer=optimizer)
    return run_red_diff(CallableAdapter(eps_fn), solver, callback=callback, progress=progress)


def run_red_diff(model, solver: RedDiffSolver, conditioning=None, guider=None, callback=None, progress=None,
                 return_result: bool = False):
    """Run ``solver`` with the sampling core on ``model`` (an adapter or network) and return the final ``mu`` (or,
    with ``return_result``, the core's :class:`gen.sampling.SampleResult`: ``sample`` and ``nfe`` per image, 2 per
    step when guidance runs both branches)."""
    from gen.sampling import denoise

    n = len(solver.timesteps)

    def on_step_end(k, t, x):
        if callback is not None:
            callback(k, t, x)

    result = denoise(model, solver, solver.initial_state, n, conditioning, guider, keep_grad=[False] * n,
                     progress=progress, on_step_end=on_step_end)
    return result if return_result else result.sample
