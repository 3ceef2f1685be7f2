"""Geometric Brownian motion (GBM) noising and the Dale-Langevin samplers, as a Diffusers scheduler.

Shetty, Prasath & Seelamantula, "Dale meets Langevin: a multiplicative denoising diffusion model"
(arXiv 2510.02730). Forward process on positive data, elementwise::

    dX = mu(t) X dt + sigma(t) X dW                                    (GBM)
    Y = log X:   dY = (mu - sigma^2 / 2) dt + sigma dW                  (Lamperti / Ito)
    log X_t | x_0 ~ N(log x_0 + m(t), v(t)),   m(t) = int_0^t (mu - sigma^2/2) ds,   v(t) = int_0^t sigma^2 ds

so ``x_t = x_0 * exp(m(t) + sqrt(v(t)) z)`` with ``z ~ N(0, I)``: closed-form noising in log space.

Symbols -> names here: h = x * grad_x log p_t (the Hyvarinen score, ``"hyvarinen"``); z (the log-space noise,
``"log_eps"``); x0 (``"x0"``, the *geometric* posterior mean ``exp(E[log x_0 | x_t])``, so that every conversion
is exact); ``s_Y = grad_y log p_Y = h + 1``; ``h = -1 - E[z | x_t] / sqrt(v)``.

Reverse-time updates from level t to t' < t, with ``dm = m(t) - m(t')``, ``dv = v(t) - v(t')`` (paper's
``delta * sigma^2`` for constant sigma) and fresh noise ``z``:

    DLS, sign-preserving ("dls"):   x' = x * exp( dv * h - dm + dv + sqrt(dv) z )
                                    (constant coefficients: exp(d sigma^2 h - d (mu - 3/2 sigma^2) + sqrt(d) sigma z))
    UMS, unified multiplicative ("ums"):
                                    x' = x * (1 - dm + 3/2 dv + dv * h + sqrt(dv) z)
                                    (constant coefficients: 1 + 2 d sigma^2 - d mu + d sigma^2 h + sqrt(d) sigma z)
    deterministic ("ddim", ours):   log x' = log x0_hat + m(t') + sqrt(v(t')) z_hat

DLS is Euler-Maruyama of the reverse SDE in log space (it never changes sign); UMS is Euler-Maruyama of the
ambient reverse SDE ``dX = X (mu - 2 sigma^2 - sigma^2 h) dt + sigma X dW_bar`` and is only sign-safe for small
``dv``; the deterministic step is the exact solution of the probability-flow ODE in ``y - m(t)`` with ``z_hat``
held fixed over the step (DDIM / first-order exponential integrator in log space).

The network sees ``scale_model_input(x, t) = (log x - m(t) - prior mean) / sqrt(prior var + v(t))``: unit-variance
log-space input whatever the noise level (EDM-style ``c_in``). The log-normal prior of the last level is fitted to
the data per channel (:func:`fit_log_stats`) and stored in the config (``data_log_mean``, ``data_log_std``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from gen.diffusion.space import Frame, PredictionSpace

GBM_PREDICTION_TYPES = ("hyvarinen", "log_eps", "x0")
GBM_SCHEDULES = ("constant", "geometric")
GBM_SAMPLERS = ("dls", "ums", "ddim")


@dataclass
class GBMSchedulerOutput(BaseOutput):
    """Args:
    prev_sample: ``[B, C, H, W]`` positive sample at the next (less noisy) level.
    pred_original_sample: ``[B, C, H, W]`` the geometric x0 estimate ``exp(E[log x_0 | x_t])``.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def fit_log_stats(data: torch.Tensor, channel_dim: int = 1) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``log data`` (the log-normal fit of the data).

    Args:
        data: positive tensor, e.g. ``[N, C, H, W]`` images after the positivity transform.
    Returns:
        ``(log_mean, log_std)``: two lists of length C.
    """
    data = torch.as_tensor(data, dtype=torch.float64)
    if not torch.isfinite(data).all() or (data <= 0).any():
        raise ValueError("fit_log_stats needs finite, strictly positive data; apply a PositivityTransform first")
    y = data.log().movedim(channel_dim, 0).reshape(data.shape[channel_dim], -1)
    return y.mean(1).tolist(), y.std(1).clamp_min(1e-6).tolist()


class GBMScheduler(SchedulerMixin, ConfigMixin):
    """Forward geometric Brownian motion with closed-form log-space noising; DLS, UMS and deterministic samplers.

    Args:
        num_train_timesteps: N discrete levels; timestep index k in [0, N) is the time ``t = (k + 1) / N``
            (the same t for noising and for the loss; the reference code uses k/N for one and (k+1)/N for the other).
        sigma_schedule: ``"constant"`` (the paper: sigma(t) = ``sigma_max``, v(t) = sigma^2 t) or ``"geometric"``
            (sqrt(v(t)) grows geometrically: v(t) = sigma_min^2 ((sigma_max/sigma_min)^(2t) - 1); ours, it spreads
            the levels evenly in log-noise like VE/EDM schedules).
        sigma_min, sigma_max: log-space noise scales (> 0; sigma_min < sigma_max for ``geometric``).
        mu: constant GBM drift; ``None`` sets mu(t) = sigma(t)^2 / 2 (zero log-space drift, the paper's recipe
            mu = sigma^2/2 = 0.32 for sigma = 0.8).
        prediction_type: what the network outputs: ``"hyvarinen"`` (h), ``"log_eps"`` (z) or ``"x0"``.
        data_log_mean, data_log_std: per-channel log-normal fit of the (positive) training data; the prior at
            t = 1 is ``N(data_log_mean + m(1), data_log_std^2 + v(1))`` in log space.
        data_offset: the positivity offset used on the training data (``x_pos = x + offset``), kept so a pipeline
            can undo it.
        sampler: default update for :meth:`step` (``"dls"``, ``"ums"`` or ``"ddim"``).
        noise_anneal: the paper's noise annealing; the noise of the i-th step is scaled by ``noise_anneal**i``
            (1.0 = the exact reverse SDE; the reference sampler uses 0.995).
        final_noiseless: make the last step return the x0 estimate without noise (the paper's optional final
            "Tweedie" step).
        positivity_floor: UMS can leave the positive orthant for large steps; values below this floor are
            clamped to it (and counted in ``self.nonpositive_count``) so the log stays defined.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        sigma_schedule: str = "geometric",
        sigma_min: float = 0.005,
        sigma_max: float = 2.0,
        mu: float | None = None,
        prediction_type: str = "log_eps",
        data_log_mean: list[float] | float = 0.0,
        data_log_std: list[float] | float = 1.0,
        data_offset: float = 0.0,
        sampler: str = "dls",
        noise_anneal: float = 1.0,
        final_noiseless: bool = True,
        positivity_floor: float = 1e-30,
    ):
        if int(num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2; got {num_train_timesteps}")
        if sigma_schedule not in GBM_SCHEDULES:
            raise ValueError(f"sigma_schedule must be one of {GBM_SCHEDULES}; got {sigma_schedule!r}")
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 (GBM needs sigma > 0); got {value!r}")
        if sigma_schedule == "geometric" and not sigma_min < sigma_max:
            raise ValueError(f"geometric schedule needs sigma_min < sigma_max; got {sigma_min} >= {sigma_max}")
        if mu is not None and not math.isfinite(mu):
            raise ValueError(f"mu must be finite or None; got {mu!r}")
        if prediction_type not in GBM_PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {GBM_PREDICTION_TYPES}; got {prediction_type!r}")
        if sampler not in GBM_SAMPLERS:
            raise ValueError(f"sampler must be one of {GBM_SAMPLERS}; got {sampler!r}")
        if not 0 < noise_anneal <= 1:
            raise ValueError(f"noise_anneal must be in (0, 1]; got {noise_anneal}")
        std = np.atleast_1d(np.asarray(data_log_std, dtype=np.float64))
        mean = np.atleast_1d(np.asarray(data_log_mean, dtype=np.float64))
        if (std <= 0).any() or not np.isfinite(std).all() or not np.isfinite(mean).all():
            raise ValueError(f"data_log_std must be > 0 and both stats finite; got mean {mean}, std {std}")
        if mean.shape != std.shape:
            raise ValueError(f"data_log_mean and data_log_std need the same length; got {mean.shape} vs {std.shape}")
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self.num_inference_steps = None
        self.init_noise_sigma = 1.0
        self._step_index = None
        self.nonpositive_count = 0

    # ------------------------------------------------------------------------------------------------- schedule
    def time(self, timesteps) -> torch.Tensor:
        """Continuous time t = (k + 1) / N in (0, 1] of timestep indices k (float64)."""
        k = torch.as_tensor(timesteps, dtype=torch.float64)
        return (k + 1) / self.config.num_train_timesteps

    def log_var(self, t) -> torch.Tensor:
        """v(t) = int_0^t sigma(s)^2 ds, float64; v(0) = 0."""
        t = torch.as_tensor(t, dtype=torch.float64)
        c = self.config
        if c.sigma_schedule == "constant":
            return c.sigma_max**2 * t
        ratio = c.sigma_max / c.sigma_min
        return c.sigma_min**2 * (ratio ** (2 * t) - 1)

    def sigma(self, t) -> torch.Tensor:
        """Instantaneous GBM volatility sigma(t) (so that dv/dt = sigma^2)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        c = self.config
        if c.sigma_schedule == "constant":
            return torch.full_like(t, c.sigma_max)
        ratio = c.sigma_max / c.sigma_min
        return (2 * math.log(ratio) * c.sigma_min**2 * ratio ** (2 * t)).sqrt()

    def log_drift(self, t) -> torch.Tensor:
        """m(t) = int_0^t (mu - sigma^2 / 2) ds (zero when ``mu`` is None)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.config.mu is None:
            return torch.zeros_like(t)
        return self.config.mu * t - self.log_var(t) / 2

    def levels(self, timesteps, like: torch.Tensor):
        """(m, sqrt v) at integer timesteps, shaped to broadcast against ``like`` ([B, ...])."""
        t = self.time(timesteps).reshape(-1)
        shape = (-1,) + (1,) * (like.ndim - 1)
        m = self.log_drift(t).to(like.device, like.dtype).reshape(shape)
        s = self.log_var(t).sqrt().to(like.device, like.dtype).reshape(shape)
        return m, s

    def _channel_stats(self, like: torch.Tensor):
        shape = (1, -1) + (1,) * (like.ndim - 2)
        mean = torch.as_tensor(self.config.data_log_mean, dtype=like.dtype, device=like.device).reshape(shape)
        std = torch.as_tensor(self.config.data_log_std, dtype=like.dtype, device=like.device).reshape(shape)
        if mean.shape[1] not in (1, like.shape[1]):
            raise ValueError(f"scheduler has log stats for {mean.shape[1]} channels; sample has {like.shape[1]}")
        return mean, std

    # ------------------------------------------------------------------------------------------- forward process
    @staticmethod
    def check_positive(name: str, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        if (x <= 0).any():
            raise ValueError(
                f"{name} has non-positive values (min {x.min().item():.4g}); GBM acts on positive data: apply "
                "gen.gbm.PositivityTransform(offset=...) to images in [-1, 1] first"
            )

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = x_0 * exp(m(t) + sqrt(v(t)) z), in closed form. Args: x_0 [B, ...] > 0, noise z [B, ...],
        timesteps [B] integer indices in [0, N)."""
        self.check_positive("original_samples", original_samples)
        self._check_timesteps(timesteps)
        m, s = self.levels(timesteps, original_samples)
        return original_samples * torch.exp(m + s * noise)

    def _check_timesteps(self, timesteps) -> None:
        k = torch.as_tensor(timesteps)
        n = self.config.num_train_timesteps
        if k.numel() and (k.min() < 0 or k.max() >= n):
            raise ValueError(f"timesteps must be integer indices in [0, {n}); got range [{k.min()}, {k.max()}]")

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Network input: ``(log x - m(t) - data log mean) / sqrt(data log var + v(t))`` (unit variance)."""
        mean, std = self._channel_stats(sample)
        m, s = self.levels(timestep, sample)
        y = torch.log(sample.clamp_min(self.config.positivity_floor))
        return (y - m - mean) / (std**2 + s**2).sqrt()

    # ------------------------------------------------------------------------------------------------ conversions
    def convert(self, pred: torch.Tensor, src: str, dst: str, sample: torch.Tensor, timesteps) -> torch.Tensor:
        """Exact conversion between ``"hyvarinen"`` (h), ``"log_eps"`` (z) and ``"x0"`` (geometric mean x0).

        h = -1 - z / sqrt(v);   log x0 = log x_t - m(t) - sqrt(v) z.
        """
        for name, arg in (("src", src), ("dst", dst)):
            if arg not in GBM_PREDICTION_TYPES:
                raise ValueError(f"{name} must be one of {GBM_PREDICTION_TYPES}; got {arg!r}")
        if src == dst:
            return pred
        m, s = self.levels(timesteps, sample)
        y = torch.log(sample.clamp_min(self.config.positivity_floor))
        if src == "hyvarinen":
            z = -(pred + 1) * s
        elif src == "log_eps":
            z = pred
        else:
            z = (y - m - torch.log(pred.clamp_min(self.config.positivity_floor))) / s
        if dst == "log_eps":
            return z
        if dst == "hyvarinen":
            return -1 - z / s
        return torch.exp(y - m - s * z)

    def target(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps,
               prediction_type: str | None = None) -> torch.Tensor:
        """The regression target of the denoising loss for x_t = add_noise(x0, noise, t), in ``prediction_type``
        (default: the config's): z, h* = -1 - z / sqrt(v), or x0."""
        pt = prediction_type or self.config.prediction_type
        if pt == "log_eps":
            return noise
        if pt == "x0":
            return original_samples
        if pt == "hyvarinen":
            _, s = self.levels(timesteps, noise)
            return -1 - noise / s
        raise ValueError(f"prediction_type must be one of {GBM_PREDICTION_TYPES}; got {pt!r}")

    # -------------------------------------------------------------------------------------------------- sampling
    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Evenly sub-sample the N training levels: ``num_inference_steps`` levels from k = N-1 (t = 1) down.

        The last update goes from the smallest kept level to t = 0 (clean data)."""
        n = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise ValueError(f"num_inference_steps must be an int; got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= n:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is outside the training grid: it must be in [1, {n}] "
                f"(num_train_timesteps={n})"
            )
        ks = np.round(np.linspace(n, 0, num_inference_steps + 1)[:-1]).astype(np.int64) - 1
        self.timesteps = torch.from_numpy(ks).to(device)
        self.num_inference_steps = num_inference_steps
        self._step_index = None
        self.nonpositive_count = 0

    def sample_prior(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """x_1 ~ the fitted log-normal prior ``exp(N(data_log_mean + m(1), data_log_std^2 + v(1)))``."""
        z = torch.randn(shape, generator=generator, dtype=torch.float64).to(device)
        mean, std = self._channel_stats(z)
        t1 = torch.tensor(1.0, dtype=torch.float64)
        y = mean + self.log_drift(t1).item() + (std**2 + self.log_var(t1).item()).sqrt() * z
        return y.exp().to(dtype)

    def _prev_timestep(self, timestep: int) -> int:
        """The next (less noisy) level after ``timestep`` on the current grid; -1 means t = 0."""
        ts = self.timesteps.tolist()
        i = ts.index(int(timestep)) if int(timestep) in ts else None
        if i is None:
            raise ValueError(f"timestep {int(timestep)} is not on the grid set by set_timesteps")
        self._step_index = i
        return ts[i + 1] if i + 1 < len(ts) else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        return_dict: bool = True,
    ) -> GBMSchedulerOutput | tuple:
        """One reverse step from ``timestep`` to the next level of the grid.

        Args:
            model_output: ``[B, ...]`` network output in ``config.prediction_type`` space.
            timestep: current integer level k (an element of ``self.timesteps``).
            sample: ``[B, ...]`` positive x_t.
            sampler: ``"dls"``, ``"ums"`` or ``"ddim"`` (default ``config.sampler``).
        """
        mode = sampler or self.config.sampler
        if mode not in GBM_SAMPLERS:
            raise ValueError(f"sampler must be one of {GBM_SAMPLERS}; got {mode!r}")
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if not torch.isfinite(model_output).all():
            raise ValueError("model_output contains NaN or inf")
        k = int(timestep)
        k_prev = self._prev_timestep(k)
        t = self.time(torch.tensor([k])).to(sample.device)
        t_prev = (
            self.time(torch.tensor([k_prev])) if k_prev >= 0 else torch.zeros(1, dtype=torch.float64)
        ).to(sample.device)
        # 1. levels: m, v at t and t' (float64 scalars)
        m, v = self.log_drift(t).item(), self.log_var(t).item()
        m_p, v_p = self.log_drift(t_prev).item(), self.log_var(t_prev).item()
        dm, dv = m - m_p, v - v_p
        # 2. prediction -> z_hat (log-space noise), h, and log x0_hat; float32 at least
        work = sample.dtype if sample.dtype == torch.float64 else torch.float32
        x = sample.to(work).clamp_min(self.config.positivity_floor)
        y = torch.log(x)
        kk = torch.full((x.shape[0],), k, dtype=torch.long)
        z_hat = self.convert(model_output.to(work), self.config.prediction_type, "log_eps", x, kk)
        h = -1 - z_hat / math.sqrt(v)
        log_x0 = y - m - math.sqrt(v) * z_hat
        x0 = torch.exp(log_x0)
        last = k_prev < 0
        # 3. update
        if last and self.config.final_noiseless:
            prev = x0
        elif mode == "ddim":
            prev = torch.exp(log_x0 + m_p + math.sqrt(v_p) * z_hat)
        else:
            noise = torch.randn(x.shape, generator=generator, dtype=work).to(x.device)
            scale = self.config.noise_anneal ** (self._step_index or 0)
            if mode == "dls":
                prev = x * torch.exp(dv * h - dm + dv + scale * math.sqrt(dv) * noise)
            else:
                factor = 1 - dm + 1.5 * dv + dv * h + scale * math.sqrt(dv) * noise
                prev = x * factor
                bad = prev <= self.config.positivity_floor
                if bad.any():
                    self.nonpositive_count += int(bad.sum())
                    prev = prev.clamp_min(self.config.positivity_floor)
        prev = prev.to(sample.dtype)
        x0 = x0.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return GBMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def prediction_space(self) -> GBMSpace:
        """The log-space view the sampling core and guiders use (see :class:`GBMSpace`)."""
        return GBMSpace(self)


class GBMFrame(Frame):
    """One GBM evaluation: ``x`` positive, ``x_in = scale_model_input(x, k)``; in log space
    ``y - m(t) = log x0 + sqrt(v(t)) z`` is a variance-exploding diffusion (alpha = 1, sigma = sqrt(v)) with
    clean sample ``log x0`` and noise ``z``. Branches mix (CFG) in ``z``, which is affine in log x0; the network's
    own output (h, z or x0) is converted to ``z`` first and back for the scheduler."""

    def __init__(self, scheduler: GBMScheduler, x, timestep):
        self.scheduler, self.x, self.timestep = scheduler, x, timestep
        self.k = torch.full((x.shape[0],), int(timestep), dtype=torch.long)
        self.x_in = scheduler.scale_model_input(x, self.k)
        m, sd = scheduler.levels(self.k[:1], x)
        self._m, self._sd = m.float(), sd.float()
        self._y = torch.log(x.float().clamp_min(scheduler.config.positivity_floor)) - self._m

    @property
    def point(self):
        return self._y

    def linear(self, raw):
        return self.scheduler.convert(raw.float(), self.scheduler.config.prediction_type, "log_eps", self.x.float(),
                                      self.k)

    def to_scheduler(self, lin):
        return self.scheduler.convert(lin, "log_eps", self.scheduler.config.prediction_type, self.x, self.k)

    def alpha_sigma(self):
        return torch.ones_like(self._sd), self._sd

    def to_x0_eps(self, lin):
        return self._y - self._sd * lin, lin

    def from_x0_eps(self, x0, eps):
        return eps


class GBMSpace(PredictionSpace):
    def __init__(self, scheduler: GBMScheduler):
        self.scheduler = scheduler

    def frame(self, x, timestep):
        return GBMFrame(self.scheduler, x, timestep)


def lognormal_exact_prediction(
    scheduler: GBMScheduler, sample: torch.Tensor, timesteps, log_mean, log_std, prediction_type: str = "log_eps"
) -> torch.Tensor:
    """The exact network output for data with ``log x_0 ~ N(log_mean, log_std^2)`` (elementwise), for tests and
    demos: y_t ~ N(log_mean + m(t), log_std^2 + v(t)), so ``E[z | x_t] = sqrt(v) (y - log_mean - m) / (log_std^2 + v)``.
    """
    m, s = scheduler.levels(timesteps, sample)
    y = torch.log(sample)
    z = s * (y - log_mean - m) / (log_std**2 + s**2)
    return scheduler.convert(z, "log_eps", prediction_type, sample, timesteps)
