"""Samplers and likelihoods for a network trained on a stochastic interpolant (SiT's ``Sampler`` in one object).

    sampler = InterpolantSampler(interpolant, model_fn, prediction="velocity")
    x1 = sampler.sample_ode(torch.randn(n, 2), num_steps=50, method="heun")
    x1 = sampler.sample_sde(torch.randn(n, 2), num_steps=100, eps="sigma", generator=g)
    logp = sampler.log_likelihood(x1, num_steps=100)

``model_fn(x [B, ...], t [B] in [0, 1]) -> prediction [B, ...]``. Fixed-step sampling drives
:class:`InterpolantScheduler` (one implementation of the stage logic for pipelines and scripts); the adaptive ODE
uses torchdiffeq when it is installed.

Likelihood (paper sec. 2.5 / FFJORD): along the probability-flow ODE ``d/dt log rho_t(X_t) = -div b(t, X_t)``, so

    log rho_1(x1) = log rho_0(X_0) - int_0^1 div b(t, X_t) dt,     X solved backward from X_1 = x1.

The divergence is exact (one backward pass per dimension) for low dimension and Hutchinson's estimate
``E_v[v^T (db/dx) v]`` with Rademacher ``v`` (fixed along the trajectory) otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .interpolant import Interpolant, canonical_prediction
from .scheduler import InterpolantScheduler

EXACT_DIVERGENCE_MAX_DIM = 16


def standard_normal_log_prob(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I) per sample, [B]."""
    flat = x.reshape(x.shape[0], -1).double()
    return -0.5 * (flat**2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


class InterpolantSampler:
    """ODE / SDE sampling and ODE likelihood for ``model_fn``.

    Args:
        interpolant: the :class:`Interpolant` the model was trained on.
        model_fn: ``(x, t) -> prediction`` with ``t`` [B] in [0, 1].
        prediction: the model's prediction type (velocity, drift, score, noise, x1 or b, v, s, eta).
        x0: [B, ...] the known base point of a conditional two-sided bridge (passed to every conversion).
    """

    def __init__(self, interpolant: Interpolant, model_fn: Callable, prediction: str = "velocity",
                 x0: torch.Tensor | None = None):
        self.interpolant = interpolant
        self.model_fn = model_fn
        self.prediction = canonical_prediction(prediction)
        self.x0 = x0
        self.nfe = 0

    def scheduler(self, sampler: str = "ode", solver: str = "heun", **kwargs) -> InterpolantScheduler:
        """An :class:`InterpolantScheduler` for this interpolant with model time = t (``num_train_timesteps=1``)."""
        return InterpolantScheduler(**self.interpolant.config, prediction_type=self.prediction, sampler=sampler,
                                    solver=solver, num_train_timesteps=1.0, **kwargs)

    def _call(self, x, t: float):
        self.nfe += 1
        return self.model_fn(x, torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device))

    def _run(self, sched: InterpolantScheduler, x, num_steps: int, generator=None, eps=None,
             return_trajectory: bool = False):
        """The scheduler's plan on the sampling core (:func:`gen.sampling.denoise`), ``model_fn`` as the network."""
        from gen.sampling import CallableAdapter, denoise

        sched.set_timesteps(num_steps)
        if eps is not None:
            sched.set_eps(eps)
        traj = [x]

        def record(k, t, x):
            if return_trajectory:
                traj.append(x)

        out = denoise(CallableAdapter(lambda xx, t: self._call(xx, float(t))), sched, x, num_steps,
                      step_kwargs={"generator": generator, "x0": self.x0}, on_step_end=record).sample
        return (out, traj) if return_trajectory else out

    @torch.no_grad()
    def sample_ode(self, x: torch.Tensor, num_steps: int = 50, method: str = "heun", t_start: float | None = None,
                   t_end: float | None = None, last_step: str | None = None, return_trajectory: bool = False):
        """Integrate dX = b(t, X) dt from ``t_start`` to 1 (fixed-step Euler / Heun / RK4). ``x``: [B, ...] at
        t_start. NFE = order * num_steps (+1 with a last step)."""
        if method in ("dopri5", "adaptive") or method.startswith("adaptive"):
            return self.sample_ode_adaptive(x, t_start=t_start, t_end=t_end)
        sched = self.scheduler("ode", method, t_start=t_start, t_end=t_end, last_step=last_step)
        return self._run(sched, x, num_steps, return_trajectory=return_trajectory)

    @torch.no_grad()
    def sample_sde(self, x: torch.Tensor, num_steps: int = 100, method: str = "euler_maruyama", eps="sigma",
                   diffusion_norm: float = 1.0, generator: torch.Generator | None = None,
                   t_start: float | None = None, t_end: float | None = None, last_step: str | None = None,
                   last_step_size: float = 0.04, return_trajectory: bool = False):
        """Integrate dX = [b + eps(t) s] dt + sqrt(2 eps(t)) dW (Euler-Maruyama or stochastic Heun).

        ``eps``: a form name (:data:`gen.interpolants.DIFFUSION_FORMS`), a float or a callable ``eps(t)``.
        Ends at ``1 - last_step_size`` (where the one-sided score -x0/alpha is finite) and takes ``last_step``
        (default "mean": one noise-free step to t = 1).
        """
        named = isinstance(eps, str)
        sched = self.scheduler("sde", method, diffusion=eps if named else "sigma", diffusion_norm=diffusion_norm,
                               t_start=t_start, t_end=t_end, last_step=last_step, last_step_size=last_step_size)
        return self._run(sched, x, num_steps, generator, None if named else eps, return_trajectory)

    @torch.no_grad()
    def sample_ode_adaptive(self, x: torch.Tensor, method: str = "dopri5", atol: float = 1e-5, rtol: float = 1e-5,
                            t_start: float | None = None, t_end: float | None = None):
        """Adaptive ODE integration with ``torchdiffeq.odeint`` (``pip install torchdiffeq``)."""
        try:
            from torchdiffeq import odeint
        except ImportError as err:
            raise ImportError("adaptive ODE sampling needs torchdiffeq (pip install torchdiffeq); fixed-step "
                              "methods euler / heun / rk4 need nothing extra") from err
        sched = self.scheduler("ode", "euler", t_start=t_start, t_end=t_end)
        lo, hi = sched.default_interval()
        t0 = lo if t_start is None else t_start
        t1 = hi if t_end is None else t_end

        def f(t, y):  # dopri5 may probe just past t1 (FSAL / interpolation): clamp into [t0, t1]
            return self.drift(min(max(float(t), t0), t1), y)

        ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        return odeint(f, x, ts, method=method, atol=atol, rtol=rtol)[-1]

    def drift(self, t: float, x: torch.Tensor) -> torch.Tensor:
        """b(t, x) from the model (one evaluation)."""
        pred = self._call(x, t)
        if self.interpolant.kind == "two_sided" and self.x0 is None:
            if self.prediction != "drift":
                raise ValueError("a two-sided model without x0 gives a drift only if it predicts the drift")
            return pred
        return self.interpolant.convert(pred, self.prediction, "drift", x, t, x0=self.x0)

    # ------------------------------------------------------------------------------------------------------------
    def _divergence(self, t: float, x: torch.Tensor, probes: torch.Tensor | None):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            b = self.drift(t, x)
            if probes is None:
                flat_b = b.reshape(b.shape[0], -1)
                div = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
                for i in range(flat_b.shape[1]):
                    g = torch.autograd.grad(flat_b[:, i].sum(), x, retain_graph=i + 1 < flat_b.shape[1])[0]
                    div = div + g.reshape(g.shape[0], -1)[:, i].double()
            else:
                g = torch.autograd.grad((b * probes).sum(), x)[0]
                div = (g * probes).reshape(x.shape[0], -1).sum(1).double()
        return b.detach(), div

    def log_likelihood(self, x1: torch.Tensor, num_steps: int = 100, method: str = "rk4", exact: bool | None = None,
                       generator: torch.Generator | None = None,
                       base_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       t_start: float | None = None, t_end: float | None = None) -> torch.Tensor:
        """log rho_1(x1) in nats per sample, [B] float64, through the probability-flow ODE (module docstring).

        Args:
            x1: [B, ...] data points.
            num_steps: fixed steps of ``method`` (``euler``, ``heun`` or ``rk4``) from t_end back to t_start.
            exact: exact divergence (default: data dimension <= 16) or Hutchinson (one Rademacher probe).
            base_log_prob: log rho_0; default N(0, I) (one-sided, or two-sided with a Gaussian base).

        Raises:
            ValueError: a mirror interpolant (its base is the data: no tractable rho_0) without ``base_log_prob``.
        """
        if self.interpolant.kind == "mirror" and base_log_prob is None:
            raise ValueError("a mirror interpolant's base is the data itself; pass base_log_prob")
        if method not in ("euler", "heun", "rk4"):
            raise ValueError(f"unknown likelihood method {method!r}; allowed: euler, heun, rk4")
        base_log_prob = base_log_prob or standard_normal_log_prob
        dim = x1[0].numel()
        exact = dim <= EXACT_DIVERGENCE_MAX_DIM if exact is None else exact
        probes = None
        if not exact:
            probes = (torch.randint(0, 2, x1.shape, generator=generator) * 2 - 1).to(x1.dtype).to(x1.device)
        lo, hi = self.scheduler("ode", "euler").default_interval()
        t0 = lo if t_start is None else t_start
        t1 = hi if t_end is None else t_end
        c, a, w = {"euler": ((0.0,), ((),), (1.0,)), "heun": ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
                   "rk4": ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                           (1 / 6, 1 / 3, 1 / 3, 1 / 6))}[method]
        ts = torch.linspace(t1, t0, num_steps + 1, dtype=torch.float64)
        x = x1
        integral = torch.zeros(x1.shape[0], dtype=torch.float64, device=x1.device)  # int_{t0}^{t1} div b dt
        for i in range(num_steps):
            h = float(ts[i + 1] - ts[i])  # negative
            ks, ds = [], []
            for j, cj in enumerate(c):
                xj = x + h * sum(aw * k for aw, k in zip(a[j], ks)) if j else x
                bj, dj = self._divergence(float(ts[i]) + cj * h, xj, probes)
                ks.append(bj)
                ds.append(dj)
            x = x + h * sum(wj * k for wj, k in zip(w, ks))
            integral = integral - h * sum(wj * d for wj, d in zip(w, ds))
        return base_log_prob(x) - integral
