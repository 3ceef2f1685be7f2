"""A Diffusers scheduler that integrates the probability-flow ODE or an SDE of a stochastic interpolant.

Time runs forward from ``t_start`` (near 0, the base/noise) to ``t_end`` (near 1, the data), the paper's and SiT's
convention. ``scheduler.timesteps`` holds what the network is called with, ``t * num_train_timesteps`` (1000 by
default, like Diffusers schedulers); ``scheduler.sigmas``-style quantities are not used.

Each step of an explicit Runge-Kutta method needs ``order`` network evaluations; like Diffusers'
``HeunDiscreteScheduler`` the scheduler lists one timestep per evaluation and keeps the stage state itself, so a
pipeline just loops ``for t in scheduler.timesteps: out = scheduler.step(net(x, t), t, x).prev_sample``.

Map from names to the paper's symbols: ``b`` drift (PF-ODE velocity), ``s`` score, ``eps`` the SDE diffusion
coefficient eps(t) (eq. 2.33), ``h`` the step in t, ``k_j`` the stage slopes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from gen.diffusion.space import Frame, PredictionSpace

from .diffusion_coefficients import DIFFUSION_FORMS, diffusion_coefficient
from .interpolant import Interpolant, canonical_prediction

SAMPLERS = ("ode", "sde")
ODE_SOLVERS = ("euler", "midpoint", "heun", "rk4")
SDE_SOLVERS = ("euler_maruyama", "heun")
LAST_STEPS = ("none", "euler", "mean", "tweedie")
# Butcher tableaux (c, a, b) of the explicit methods
TABLEAUX = {
    "euler": ((0.0,), ((),), (1.0,)),
    "euler_maruyama": ((0.0,), ((),), (1.0,)),
    "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    "midpoint": ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}


@dataclass
class InterpolantSchedulerOutput(BaseOutput):
    """``prev_sample``: the input of the next network evaluation (or the final sample after the last one);
    ``pred_original_sample``: E[x1 | x_t], the data prediction at this evaluation (None where it is undefined,
    e.g. a two-sided drift model)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class InterpolantScheduler(SchedulerMixin, ConfigMixin):
    """ODE / SDE sampler of a stochastic interpolant as a Diffusers scheduler.

    Args:
        path, gamma, kind, gamma_a, vp_beta_min, vp_beta_max: the :class:`Interpolant`.
        prediction_type: what the network outputs: ``velocity``, ``drift``, ``score``, ``noise`` or ``x1``.
        sampler: ``"ode"`` (probability flow, dX = b dt) or ``"sde"`` (dX = (b + eps s) dt + sqrt(2 eps) dW).
        solver: ODE ``euler | midpoint | heun | rk4``; SDE ``euler_maruyama | heun`` (stochastic Heun: the same Brownian
            increment in predictor and corrector, exact order 1 for this additive noise).
        diffusion: eps(t) form (:data:`DIFFUSION_FORMS`); ``diffusion_norm`` its scale.
        t_start, t_end: integration interval; None picks the endpoint-safe default: the largest interval inside
            [0, 1] where the needed conversions are finite, and for the SDE ``t_end = 1 - last_step_size``.
        last_step: after ``t_end``, one more evaluation jumps to t = 1: ``"euler"`` (x + (1 - t_end) b),
            ``"mean"`` (x + (1 - t_end)(b + eps s), no noise), ``"tweedie"`` (E[x1 | x]) or ``"none"``.
            None: "mean" for the SDE when t_end < 1, "euler" for the ODE when t_end < 1, else "none".
        last_step_size: 1 - t_end for the SDE default (SiT: 0.04).
        num_train_timesteps: the time scale of the network input (``timestep = t * num_train_timesteps``).
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(
        self,
        path: str = "linear",
        gamma: str = "zero",
        kind: str = "one_sided",
        gamma_a: float = 1.0,
        vp_beta_min: float = 0.1,
        vp_beta_max: float = 20.0,
        prediction_type: str = "velocity",
        sampler: str = "ode",
        solver: str = "heun",
        diffusion: str = "sigma",
        diffusion_norm: float = 1.0,
        t_start: float | None = None,
        t_end: float | None = None,
        last_step: str | None = None,
        last_step_size: float = 0.04,
        num_train_timesteps: float = 1000.0,
    ):
        self.interpolant = Interpolant(path, gamma, kind, gamma_a, vp_beta_min, vp_beta_max)
        self.prediction = canonical_prediction(prediction_type)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
        allowed = ODE_SOLVERS if sampler == "ode" else SDE_SOLVERS
        if solver not in allowed:
            raise ValueError(f"solver={solver!r} is not a {sampler} solver; allowed: {', '.join(allowed)}")
        if diffusion not in DIFFUSION_FORMS:
            raise ValueError(f"unknown diffusion form {diffusion!r}; allowed: {', '.join(DIFFUSION_FORMS)}")
        if last_step is not None and last_step not in LAST_STEPS:
            raise ValueError(f"unknown last_step {last_step!r}; allowed: {', '.join(LAST_STEPS)} or None")
        if not 0 < last_step_size < 1:
            raise ValueError(f"last_step_size must be in (0, 1); got {last_step_size}")
        if not num_train_timesteps > 0:
            raise ValueError(f"num_train_timesteps must be > 0; got {num_train_timesteps}")
        for name, v in (("t_start", t_start), ("t_end", t_end)):
            if v is not None and not 0 <= v <= 1:
                raise ValueError(f"{name} must lie in [0, 1] (0 = noise, 1 = data); got {v}")
        self._eps_fn = diffusion_coefficient(diffusion, self.interpolant, diffusion_norm)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.empty(0)
        self._plan: list[tuple[int, int, float]] = []

    # ------------------------------------------------------------------------------------------------------------
    @property
    def tableau(self):
        return TABLEAUX[self.config.solver]

    @property
    def stages(self) -> int:
        return len(self.tableau[0])

    def set_eps(self, eps) -> None:
        """Use ``eps`` (a float, a form name or a callable ``eps(t) -> float >= 0``) as the SDE diffusion."""
        self._eps_fn = diffusion_coefficient(eps, self.interpolant, self.config.diffusion_norm)

    def _needs(self) -> tuple[str, ...]:
        return ("drift",) if self.config.sampler == "ode" else ("drift", "score")

    def _finite_at(self, t: float) -> bool:
        """Whether the conversions the sampler needs are finite at ``t`` (probe with x = 0, prediction = 1).

        Two-sided models are probed as conditional bridges (x0 known); without x0 they run the ODE of a drift
        prediction only, which needs no conversion.
        """
        x = torch.zeros(1, 1, dtype=torch.float64)
        p = torch.ones(1, 1, dtype=torch.float64)
        x0 = x if self.interpolant.kind == "two_sided" else None
        try:
            for dst in self._needs():
                out = self.interpolant.convert(p, self.prediction, dst, x, t, x0=x0)
                if not torch.isfinite(out).all():
                    return False
            c = self.interpolant.coefficients(torch.tensor([t]))
            return all(torch.isfinite(v).all() for v in (c.alpha_dot, c.beta_dot, c.gamma_gamma_dot))
        except ValueError:
            return False

    def default_interval(self) -> tuple[float, float]:
        """Endpoint-safe ``(t_start, t_end)`` (see the class docstring)."""
        lo = 0.0 if self._finite_at(0.0) else 1e-3
        if self.config.sampler == "sde":
            hi = 1.0 - self.config.last_step_size
        else:
            hi = 1.0 if self._finite_at(1.0) else 1.0 - 1e-3
        return lo, hi

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Uniform grid of ``num_inference_steps`` steps on [t_start, t_end] (plus the last step, if any).

        ``self.timesteps`` has one entry per network evaluation: ``order * num_inference_steps`` (+1).
        """
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int; got {num_inference_steps!r}")
        lo, hi = self.default_interval()
        t0 = lo if self.config.t_start is None else float(self.config.t_start)
        t1 = hi if self.config.t_end is None else float(self.config.t_end)
        if not t0 < t1:
            raise ValueError(f"need t_start < t_end; got {t0}, {t1}")
        for t in (t0, t1):
            if not self._finite_at(t):
                raise ValueError(f"the {self.config.sampler} sampler of a {self.prediction} model is not finite at "
                                 f"t={t} for {self.interpolant!r}; move t_start/t_end inside (0, 1)")
        last = self.config.last_step
        if last is None:
            last = "none" if t1 >= 1.0 else ("mean" if self.config.sampler == "sde" else "euler")
        if last != "none" and t1 >= 1.0:
            raise ValueError(f"last_step={last!r} needs t_end < 1; got t_end={t1}")
        if last == "tweedie" and self.interpolant.kind == "two_sided":
            raise ValueError("last_step='tweedie' needs E[x1|x], which a two-sided model without x0 does not give")
        self.last_step_kind = last
        self.num_inference_steps = num_inference_steps
        self.t_grid = torch.linspace(t0, t1, num_inference_steps + 1, dtype=torch.float64)
        c = self.tableau[0]
        plan = []
        for i in range(num_inference_steps):
            h = float(self.t_grid[i + 1] - self.t_grid[i])
            for j, cj in enumerate(c):
                plan.append((i, j, min(float(self.t_grid[i]) + cj * h, t1)))
        if last != "none":
            plan.append((num_inference_steps, -1, t1))
        self._plan = plan
        times = torch.tensor([p[2] for p in plan], dtype=torch.float64)
        self.timesteps = (times * self.config.num_train_timesteps).to(device=device, dtype=torch.float32)
        self.t_values = times
        self._index = 0
        self._x_i = None
        self._k: list[torch.Tensor] = []
        self._noise = None

    @property
    def nfe(self) -> int:
        """Network evaluations of one sampling run (before guidance doubling)."""
        return len(self._plan)

    # ------------------------------------------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def fields(self, model_output, t: float, sample, x0=None):
        """``(f, b, s)``: the integrated drift (b, or b + eps s for the SDE), the PF drift and the score."""
        b = self.interpolant.convert(model_output, self.prediction, "drift", sample, t, x0=x0) \
            if not (self.interpolant.kind == "two_sided" and x0 is None) else \
            self._two_sided_drift(model_output, sample, t)
        if self.config.sampler == "ode":
            return b, b, None
        s = self.interpolant.convert(model_output, self.prediction, "score", sample, t, x0=x0)
        return b + self._eps_fn(t) * s, b, s

    def _two_sided_drift(self, model_output, sample, t):
        if self.prediction == "drift":
            return model_output
        raise ValueError(f"a two-sided model predicting {self.prediction!r} gives no drift without x0; "
                         "train prediction='drift' (or pass x0 for a conditional bridge)")

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True, x0: torch.Tensor | None = None):
        """Advance one network evaluation.

        Args:
            model_output: [B, ...] the network's prediction (``prediction_type``) at ``(sample, timestep)``.
            timestep: the entry of ``self.timesteps`` being evaluated (checked against the plan).
            sample: [B, ...] the point the network was evaluated at.
            generator: for the SDE's Brownian increments.
            x0: [B, ...] the known base point of a conditional two-sided bridge (enables every conversion).

        Returns:
            :class:`InterpolantSchedulerOutput` (or a tuple).
        """
        if not self._plan:
            raise ValueError("call set_timesteps before step")
        if self._index >= len(self._plan):
            raise ValueError(f"step called {self._index + 1} times for {len(self._plan)} planned evaluations")
        i, j, t = self._plan[self._index]
        expected = float(self.timesteps[self._index])
        if abs(float(torch.as_tensor(timestep).reshape(-1)[0]) - expected) > 1e-3 * self.config.num_train_timesteps:
            raise ValueError(f"timestep {float(torch.as_tensor(timestep).reshape(-1)[0])} does not match the planned "
                             f"{expected} (evaluation {self._index})")
        self._index += 1
        # 1. convert the prediction into the integrated drift (and the data prediction for the output)
        f, b, s = self.fields(model_output, t, sample, x0)
        x1_hat = None
        if not (self.interpolant.kind == "two_sided" and x0 is None) and self.interpolant.kind != "mirror":
            try:
                x1_hat = self.interpolant.convert(model_output, self.prediction, "x1", sample, t, x0=x0)
            except ValueError:
                x1_hat = None
        # 2. the last step jumps from t_end to 1
        if j < 0:
            dt = 1.0 - t
            if self.last_step_kind == "tweedie":
                if x1_hat is None:
                    raise ValueError("last_step='tweedie' needs E[x1|x], undefined for this model at t_end")
                out = x1_hat
            elif self.last_step_kind == "euler":
                out = sample + dt * b
            else:
                out = sample + dt * f
            return InterpolantSchedulerOutput(out, x1_hat) if return_dict else (out, x1_hat)
        # 3. Runge-Kutta stages
        c, a, wts = self.tableau
        h = float(self.t_grid[i + 1] - self.t_grid[i])
        if j == 0:
            self._x_i, self._k = sample, []
            if self.config.sampler == "sde":
                sd = (2.0 * self._eps_fn(float(self.t_grid[i])) * h) ** 0.5
                self._noise = sd * torch.randn(sample.shape, generator=generator, dtype=sample.dtype,
                                               device=getattr(generator, "device", sample.device)).to(sample.device)
        self._k.append(f)
        noise = self._noise if self.config.sampler == "sde" else 0.0
        if j + 1 < len(c):
            nxt = self._x_i + h * sum(aw * k for aw, k in zip(a[j + 1], self._k) if aw != 0)
            if self.config.sampler == "sde":
                nxt = nxt + noise  # stochastic Heun predictor: the Euler-Maruyama point
            out = nxt
        else:
            out = self._x_i + h * sum(w * k for w, k in zip(wts, self._k)) + noise
            self._k = []
        return InterpolantSchedulerOutput(out, x1_hat) if return_dict else (out, x1_hat)

    # ------------------------------------------------------------------------------------------------------------
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward process at network times ``timesteps``: one-sided ``alpha(t) noise + beta(t) x1``; mirror
        ``x1 + gamma(t) noise``. (Two-sided needs x0: use ``self.interpolant.sample_xt``.)"""
        if self.interpolant.kind == "two_sided":
            raise ValueError("add_noise needs x0 for a two-sided interpolant; use scheduler.interpolant.sample_xt")
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu() / self.config.num_train_timesteps
        if t.numel() == 1:
            t = t.expand(original_samples.shape[0])
        if self.interpolant.kind == "one_sided":
            return self.interpolant.sample_xt(t, original_samples, x0=noise)[0]
        return self.interpolant.sample_xt(t, original_samples, z=noise)[0]

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)

    def prediction_space(self) -> InterpolantSpace:
        """The diffusion view of a one-sided interpolant that guiders use (see :class:`InterpolantSpace`)."""
        return InterpolantSpace(self)


class InterpolantFrame(Frame):
    """One evaluation of an interpolant sampler at time ``t = timestep / num_train_timesteps``.

    For a one-sided interpolant ``x = alpha(t) z + beta(t) x1`` is a diffusion with clean sample ``x1`` and noise
    ``z``: in diffusion naming ``alpha_d = beta(t)``, ``sigma_d = alpha(t)``, and the guiders' ``(x0, eps)`` are
    ``(E[x1|x], E[z|x])`` from :meth:`Interpolant.means`. Every prediction type is affine in these two at a fixed
    ``(x, t)`` (:meth:`Interpolant.from_means`), so no division by a vanishing coefficient is needed at either end.
    Two-sided and mirror interpolants have no such pair without the bridge's x0: guiders that convert are refused.
    """

    def __init__(self, scheduler: InterpolantScheduler, x, timestep):
        self.scheduler, self.x, self.x_in, self.timestep = scheduler, x, x, timestep
        self.t = float(torch.as_tensor(timestep).reshape(-1)[0]) / scheduler.config.num_train_timesteps
        self._c = None

    @property
    def coefficients(self):
        if self._c is None:
            self._c = self.scheduler.interpolant.coefficients(torch.tensor(min(max(self.t, 0.0), 1.0)))
        return self._c

    def _one_sided(self):
        interp = self.scheduler.interpolant
        if interp.kind != "one_sided":
            raise ValueError(f"guiders need a one-sided (noise -> data) interpolant; this one is {interp.kind!r}")
        return interp

    def alpha_sigma(self):
        c = self.coefficients
        shape = (1,) + (1,) * (self.x.ndim - 1)
        return (c.beta.reshape(shape).to(self.x.device, self.x.dtype),
                c.alpha.reshape(shape).to(self.x.device, self.x.dtype))

    def to_x0_eps(self, lin):
        m0, m1, _ = self._one_sided().means(lin, self.scheduler.prediction, self.x, self.coefficients, None)
        return m1.to(lin.dtype), m0.to(lin.dtype)

    def from_x0_eps(self, x0, eps):
        interp = self._one_sided()
        out = interp.from_means(eps.double(), x0.double(), torch.zeros_like(x0, dtype=torch.float64),
                                self.scheduler.prediction, self.coefficients, self.x.double())
        return out.to(x0.dtype)


class InterpolantSpace(PredictionSpace):
    def __init__(self, scheduler: InterpolantScheduler):
        self.scheduler = scheduler

    def frame(self, x, timestep):
        return InterpolantFrame(self.scheduler, x, timestep)

    def timestep_at(self, noise, mu: float | None = None) -> torch.Tensor:
        """Network timesteps at noise fractions ``u`` (1 = noise, 0 = data): interpolant time runs from the noise
        (t = 0) to the data (t = 1), so ``t = 1 - u`` and the timestep is ``t * num_train_timesteps`` (float32).
        An end where the prediction does not determine ``(E[x1|x], E[z|x])`` (x1 prediction at t = 1, noise or score
        prediction at t = 0) is moved 1e-3 inside, as the sampler's default interval does. One-sided interpolants
        only (``x = alpha(t) z + beta(t) x1``: diffusion ``alpha_d = beta``, ``sigma_d = alpha``)."""
        kind = self.scheduler.interpolant.kind
        if kind != "one_sided":
            raise ValueError(f"a noise fraction maps to a time of a one-sided (noise -> data) interpolant; this one "
                             f"is {kind!r}")
        u = torch.as_tensor(noise, dtype=torch.float64).reshape(-1).cpu()
        if (u < 0).any() or (u > 1).any() or not torch.isfinite(u).all():
            raise ValueError(f"noise fractions must lie in [0, 1]; got {u.tolist()}")
        lo, hi = (0.0 if self._means_finite(0.0) else 1e-3), (1.0 if self._means_finite(1.0) else 1.0 - 1e-3)
        return ((1.0 - u).clamp(lo, hi) * float(self.scheduler.config.num_train_timesteps)).float()

    def _means_finite(self, t: float) -> bool:
        """Whether ``(E[x1|x], E[z|x])`` follow from the prediction at ``t`` (probe with x = 0, prediction = 1)."""
        interp = self.scheduler.interpolant
        x = torch.zeros(1, 1, dtype=torch.float64)
        try:
            m0, m1, _ = interp.means(torch.ones_like(x), self.scheduler.prediction, x,
                                     interp.coefficients(torch.tensor([t])), None)
        except ValueError:
            return False
        return bool(torch.isfinite(m0).all() and torch.isfinite(m1).all())
