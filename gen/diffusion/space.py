"""Prediction spaces: how a network's output at one evaluation point relates to the clean sample and the noise.

The sampling core (:mod:`gen.sampling`) asks the scheduler's space for a :class:`Frame` at every evaluation:

    frame = prediction_space(scheduler).frame(x, t)      # x: the sampler's state, t: the scheduler timestep
    raw = net(frame.x_in, t, ...)                         # the network sees frame.x_in
    lin = frame.linear(raw)                               # the space where branches combine affinely (CFG)
    x0, eps = frame.to_x0_eps(lin)                        # what guiders see: x_in = alpha x0 + sigma eps
    scheduler.step(frame.to_scheduler(lin), t, x)

``linear``/``to_scheduler`` are the identity for Gaussian diffusion, flow matching and interpolants (every
conversion there is affine in the prediction at a fixed point, so an affine combination of two branches, as in
classifier-free guidance, is the same in every space); the multiplicative (GBM) family maps its output to the
log-space noise ``z`` first. A family plugs in by giving its scheduler a ``prediction_space()`` method that returns
a :class:`PredictionSpace`; Diffusers' variance-preserving and rectified-flow schedulers get
:class:`DiffusionSpace` from :func:`prediction_space`.

Methods that noise a point themselves (RED-Diff: ``x_t = alpha_t mu + sigma_t eps``) use two more maps of a space:
:meth:`PredictionSpace.input_frame` (the frame whose network input is a given ``x_t``) and
:meth:`PredictionSpace.timestep_at` (the family's timestep at a *noise fraction* ``u`` in [0, 1]: 1 is the noise end
of the training time, 0 the data end, and a uniform grid in ``u`` is spaced as the family's own sampler spaces its
steps: uniform training timesteps for VP, the scheduler's ``shift`` (or dynamic ``mu``) for rectified flow, uniform
``t`` for an interpolant, whose time runs the other way).
"""

from __future__ import annotations

import torch

from .conversions import from_x0_eps, is_flow_scheduler, prediction_type_of, to_x0_eps


def _rows(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (ndim - 1))


class Frame:
    """One evaluation point of a sampler: the network input and the maps between the network's output and
    ``(x0, eps)`` with ``x_in = alpha x0 + sigma eps``.

    Subclasses set ``x``, ``x_in``, ``timestep`` and implement :meth:`to_x0_eps`, :meth:`from_x0_eps` and
    :meth:`sigma_ratio`; :meth:`linear` / :meth:`to_scheduler` default to the identity.
    """

    x: torch.Tensor
    x_in: torch.Tensor
    timestep: torch.Tensor

    @property
    def point(self) -> torch.Tensor:
        """Where ``point = alpha x0 + sigma eps`` holds (the network input, unless a family says otherwise)."""
        return self.x_in

    def linear(self, raw: torch.Tensor) -> torch.Tensor:
        """The network output in the space where two branches may be mixed affinely (CFG)."""
        return raw

    def to_scheduler(self, lin: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`linear`: what ``scheduler.step`` takes."""
        return lin

    def to_x0_eps(self, lin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_sigma(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` of ``x_in = alpha x0 + sigma eps``, each ``[B, 1, ..., 1]``."""
        raise NotImplementedError

    def sigma_ratio(self) -> torch.Tensor:
        """``[B]`` Karras/EDM noise level ``sigma / alpha`` (inf where alpha = 0)."""
        alpha, sigma = self.alpha_sigma()
        b = self.x.shape[0]
        return (sigma / alpha).reshape(-1).expand(b).float()

    def from_guided_x0(self, x0_hat: torch.Tensor, cond_x0: torch.Tensor, cond_eps: torch.Tensor) -> torch.Tensor:
        """The output in :meth:`linear` space for a guided ``x0_hat`` (a guider that is not affine, e.g. APG).

        ``eps_hat = (x_in - alpha x0_hat) / sigma``; where ``sigma = 0`` (the data end of an interpolant) x0 is
        fixed by ``x_in`` alone, guidance on x0 is void there, and the conditional eps is kept.
        """
        alpha, sigma = self.alpha_sigma()
        alpha, sigma = alpha.to(x0_hat.dtype), sigma.to(x0_hat.dtype)
        zero = sigma == 0
        if not bool(zero.any()):   # the usual case: no masking needed (same values, two full-size ops fewer)
            return self.from_x0_eps(x0_hat, (self.point - alpha * x0_hat) / sigma)
        safe = torch.where(zero, torch.ones_like(sigma), sigma)
        eps_hat = torch.where(zero, cond_eps, (self.point - alpha * x0_hat) / safe)
        return self.from_x0_eps(x0_hat, eps_hat)


class PredictionSpace:
    """Makes the :class:`Frame` of each evaluation; one per scheduler (family)."""

    def frame(self, x: torch.Tensor, timestep) -> Frame:
        raise NotImplementedError

    def prepare(self, timesteps, like: torch.Tensor) -> None:
        """Optional: precompute what the frames of a run at ``timesteps`` need (the core calls it once per run,
        before the loop). Must not change any value a frame gives; the default does nothing."""

    def input_frame(self, x_in: torch.Tensor, timestep) -> Frame:
        """The frame whose network input is ``x_in`` itself, ``x_in = alpha x0 + sigma eps`` (no scheduler input
        scaling): for methods that build the noisy point themselves. The default is :meth:`frame`, right for spaces
        whose network input is the sampler state."""
        return self.frame(x_in, timestep)

    def timestep_at(self, noise, mu: float | None = None) -> torch.Tensor:
        """The scheduler timesteps at noise fractions ``noise`` (``[N]`` in [0, 1]; 1 = the noise end of the training
        time, 0 = the data end). ``mu``: a flow scheduler's dynamic shift (ignored elsewhere).

        Raises:
            ValueError: the family has no such map (the default).
        """
        raise ValueError(f"{type(self).__name__} has no map from a noise fraction to a timestep")


class DiffusionFrame(Frame):
    """A frame of a Diffusers scheduler: ``x_in = scheduler.scale_model_input(x, t)``, conversions with
    ``gen.diffusion.to_x0_eps`` in the scheduler's prediction type."""

    def __init__(self, space: DiffusionSpace, x, timestep, x_in):
        self.space, self.x, self.timestep, self.x_in = space, x, timestep, x_in
        self._as = None
        self._level = False   # (sigma / alpha as [1] float32, sigma == 0) from the space's run table; None if absent

    def alpha_sigma(self):
        if self._as is None:
            self._as = self.space.alpha_sigma(self.timestep, self.x_in)
        return self._as

    def _levels(self):
        if self._level is False:
            self._level = self.space.levels(self.timestep, self.x_in)
        return self._level

    def sigma_ratio(self):
        level = self._levels()
        return super().sigma_ratio() if level is None else level[0].expand(self.x.shape[0])

    def from_guided_x0(self, x0_hat, cond_x0, cond_eps):
        level = self._levels()
        if level is None or level[1]:   # unknown, or sigma = 0: the general rule
            return super().from_guided_x0(x0_hat, cond_x0, cond_eps)
        alpha, sigma = self.alpha_sigma()
        alpha, sigma = alpha.to(x0_hat.dtype), sigma.to(x0_hat.dtype)
        return self.from_x0_eps(x0_hat, (self.point - alpha * x0_hat) / sigma)

    def to_x0_eps(self, lin):
        alpha, sigma = self.alpha_sigma()
        return to_x0_eps(lin, self.space.prediction_type, self.x_in, alpha.to(lin.dtype), sigma.to(lin.dtype))

    def from_x0_eps(self, x0, eps):
        alpha, sigma = self.alpha_sigma()
        return from_x0_eps(x0, eps, self.space.prediction_type, alpha.to(x0.dtype), sigma.to(x0.dtype))


class DiffusionSpace(PredictionSpace):
    """Variance-preserving (``alphas_cumprod``) and rectified-flow (``FlowMatchEulerDiscreteScheduler``) schedulers.

    ``alpha_t, sigma_t`` are those of :func:`gen.diffusion.alpha_sigma` (Karras levels interpolated linearly in t at
    fractional timesteps; ``1 - s, s`` with ``s = t / T`` for flow matching), computed from a table built once.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.prediction_type = prediction_type_of(scheduler)
        self.flow = is_flow_scheduler(scheduler)
        if not self.flow:
            if not hasattr(scheduler, "alphas_cumprod"):
                raise ValueError(f"{type(scheduler).__name__} has neither alphas_cumprod nor a flow-matching config")
            abar = scheduler.alphas_cumprod.to(torch.float64).cpu()
            self._karras = ((1.0 - abar) / abar).sqrt()
        self._scale = getattr(scheduler, "scale_model_input", None)
        self._cache: dict = {}   # (t, ndim, dtype, device) -> (alpha, sigma), filled by prepare()
        self._levels: dict = {}  # same keys -> (sigma / alpha [1] float32, sigma == 0)

    def prepare(self, timesteps, like: torch.Tensor) -> None:
        """``(alpha_t, sigma_t)`` of every timestep of a run in one vectorised computation (elementwise the same
        float64 operations, then the same cast, as :meth:`alpha_sigma` does per timestep), so that each step of the
        loop only looks them up."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1).cpu()
        alpha, sigma = self._alpha_sigma64(t)
        alpha = alpha.to(device=like.device, dtype=like.dtype)
        sigma = sigma.to(device=like.device, dtype=like.dtype)
        shape = (1,) * like.ndim
        zero = (sigma == 0).tolist()
        for i, value in enumerate(t.tolist()):
            key = (value, like.ndim, like.dtype, like.device)
            a, s = alpha[i].reshape(shape), sigma[i].reshape(shape)
            self._cache[key] = (a, s)
            self._levels[key] = ((s / a).reshape(-1).float(), zero[i])   # as Frame.sigma_ratio computes it

    def levels(self, timestep, like: torch.Tensor):
        """``(sigma / alpha`` as a ``[1]`` float32 tensor, ``sigma == 0)`` at ``timestep`` from :meth:`prepare`'s
        table, or None when it has no entry."""
        if torch.is_tensor(timestep) and timestep.numel() != 1:
            return None
        return self._levels.get((float(timestep), like.ndim, like.dtype, like.device))

    def alpha_sigma(self, timestep, like: torch.Tensor):
        if not torch.is_tensor(timestep) or timestep.numel() == 1:
            hit = self._cache.get((float(timestep), like.ndim, like.dtype, like.device))
            if hit is not None:
                return hit
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu()
        alpha, sigma = self._alpha_sigma64(t)
        return (_rows(alpha, like.ndim).to(device=like.device, dtype=like.dtype),
                _rows(sigma, like.ndim).to(device=like.device, dtype=like.dtype))

    def _alpha_sigma64(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N]`` float64 timesteps on the CPU -> ``(alpha, sigma)``, each ``[N]`` float64."""
        if self.flow:
            s = t / float(self.scheduler.config.num_train_timesteps)
            if (s < 0).any() or (s > 1).any():
                raise ValueError(f"flow timesteps must lie in [0, num_train_timesteps]; got {t.tolist()}")
            alpha, sigma = 1.0 - s, s
        else:
            k = self._karras
            if (t < 0).any() or (t > len(k) - 1).any():
                raise ValueError(f"timesteps must lie in [0, {len(k) - 1}]; got {t.tolist()}")
            lo = t.floor().long().clamp(max=len(k) - 1)
            hi = (lo + 1).clamp(max=len(k) - 1)
            s = k[lo] + (t - lo) * (k[hi] - k[lo])
            norm = (1.0 + s**2).sqrt()
            alpha, sigma = 1.0 / norm, s / norm
        return alpha, sigma

    def frame(self, x, timestep):
        x_in = self._scale(x, timestep) if self._scale is not None else x
        return DiffusionFrame(self, x, timestep, x_in)

    def input_frame(self, x_in, timestep):
        """The frame at the network input ``x_in`` (``scale_model_input`` is not applied: ``x_in`` is already
        ``alpha_t x0 + sigma_t eps``)."""
        return DiffusionFrame(self, x_in, timestep, x_in)

    def timestep_at(self, noise, mu: float | None = None) -> torch.Tensor:
        """Timesteps at noise fractions ``u`` (see :meth:`PredictionSpace.timestep_at`).

        - VP: the training timestep ``floor(u T)`` (``T = num_train_timesteps``; 1e-6 absorbs round-off), at most
          ``T - 1``, as a long tensor; a uniform grid in ``u`` is then the reference RED-Diff grid.
        - rectified flow: ``T sigma(u)`` (float32) with the scheduler's shift, ``sigma = s u / (1 + (s - 1) u)``
          (SD3: s = 3), or with ``use_dynamic_shifting`` its ``time_shift(mu, 1, u)`` (``mu`` required), as
          ``FlowMatchEulerDiscreteScheduler.set_timesteps`` spaces its sigmas; ``alpha = 1 - sigma``.
        """
        u = torch.as_tensor(noise, dtype=torch.float64).reshape(-1).cpu()
        if (u < 0).any() or (u > 1).any() or not torch.isfinite(u).all():
            raise ValueError(f"noise fractions must lie in [0, 1]; got {u.tolist()}")
        if not self.flow:
            n = len(self._karras)
            return (u * n + 1e-6).floor().clamp(0, n - 1).long()
        cfg = self.scheduler.config
        if cfg.get("use_dynamic_shifting", False):
            if mu is None:
                raise ValueError(f"{type(self.scheduler).__name__} has use_dynamic_shifting: pass mu (the resolution-"
                                 "dependent shift, e.g. diffusers' calculate_shift of the image sequence length)")
            sigma = self.scheduler.time_shift(float(mu), 1.0, u)
        else:
            shift = float(getattr(self.scheduler, "shift", cfg.get("shift", 1.0)))
            sigma = shift * u / (1.0 + (shift - 1.0) * u)
        return (sigma * float(cfg.num_train_timesteps)).float()


def prediction_space(scheduler) -> PredictionSpace:
    """The :class:`PredictionSpace` of ``scheduler``: its own ``prediction_space()`` when it has one (GBM,
    interpolants, RED-Diff), else :class:`DiffusionSpace` (Diffusers' VP and flow-matching schedulers)."""
    own = getattr(scheduler, "prediction_space", None)
    if callable(own):
        return own()
    return DiffusionSpace(scheduler)
