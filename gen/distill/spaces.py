"""Where f-distill noises samples, for every teacher family, through the family's own prediction space.

One scale of *noise timesteps* ``n`` serves every family: ``0`` is the data end, ``T = num_train_timesteps`` the
noise end (``t_min``, ``t_max`` and ``generator_timestep`` of the config are on it). The network sees the family's
own timestep:

======================  ==========================================  =========================================
teacher scheduler        network timestep at noise timestep ``n``     ``x_t = alpha x0 + sigma eps``
======================  ==========================================  =========================================
VP (DDPM, DDIM, Euler)   ``n`` (an integer index, ``n <= T - 1``)     ``alpha^2 = abar_n``, ``sigma^2 = 1 - abar_n``
rectified flow (SD3)     ``T s(n / T)``                               ``alpha = 1 - s``, ``sigma = s``
one-sided interpolant    ``T (1 - s(n / T))`` (time runs to the data)  ``alpha = beta(t)``, ``sigma = alpha(t)``
======================  ==========================================  =========================================

``s(u) = k u / (1 + (k - 1) u)`` is the timestep shift (Esser et al. 2024, sec. 5.3.2: SD3 trains and samples with
k = 3); it applies to the training noise levels of flow teachers (rectified flow and interpolants), never to the
generator's input timestep. Training draws ``n`` uniformly: integers in ``[t_min, t_max]`` for VP teachers (as
DMD2 / FastGen), reals for flow teachers.

Conversions between a network output and ``(x0, eps)`` are those of the scheduler's prediction space
(:func:`gen.diffusion.space.prediction_space`), at per-sample timesteps: Diffusers' VP and flow spaces take them as
they are; the interpolant's frame is evaluated at a batch of times here (:class:`_InterpolantBatchFrame`).
"""

from __future__ import annotations

import torch

from gen.diffusion import to_x0_eps
from gen.diffusion.space import DiffusionFrame, DiffusionSpace, Frame, prediction_space

KINDS = ("vp", "flow", "interpolant")


def scheduler_kind(scheduler) -> str:
    """``"interpolant"`` (an ``InterpolantScheduler``), ``"flow"`` (rectified flow, e.g. SD3's
    ``FlowMatchEulerDiscreteScheduler``) or ``"vp"`` (``alphas_cumprod``).

    Raises:
        ValueError: any other scheduler, or a two-sided / mirror interpolant (no noise end to distil from).
    """
    from gen.interpolants.scheduler import InterpolantScheduler

    if isinstance(scheduler, InterpolantScheduler):
        if scheduler.interpolant.kind != "one_sided":
            raise ValueError(f"f-distill needs a one-sided (noise -> data) interpolant teacher; this one is "
                             f"{scheduler.interpolant.kind!r}")
        return "interpolant"
    space = prediction_space(scheduler)
    if not isinstance(space, DiffusionSpace):
        raise ValueError(f"f-distill cannot noise samples for a {type(scheduler).__name__} teacher; supported: VP "
                         "schedulers (alphas_cumprod), rectified flow (FlowMatchEulerDiscreteScheduler), one-sided "
                         "InterpolantScheduler")
    return "flow" if space.flow else "vp"


class _InterpolantBatchFrame(Frame):
    """The interpolant scheduler's frame (:class:`gen.interpolants.scheduler.InterpolantFrame`) at a batch of times:
    ``x = alpha(t) z + beta(t) x1`` is a diffusion with ``x0 = x1`` (data), ``eps = z``, ``alpha_d = beta(t)``,
    ``sigma_d = alpha(t)``; every prediction type maps affinely to ``(E[x1|x], E[z|x])``
    (:meth:`Interpolant.means` / :meth:`Interpolant.from_means`, float64)."""

    def __init__(self, scheduler, x, timestep):
        self.scheduler, self.x, self.x_in, self.timestep = scheduler, x, x, timestep
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).cpu() / scheduler.config.num_train_timesteps
        self.coefficients = scheduler.interpolant.coefficients(t.clamp(0.0, 1.0).expand(x.shape[0]))

    def alpha_sigma(self):
        c, shape = self.coefficients, (-1,) + (1,) * (self.x.ndim - 1)
        return (c.beta.reshape(shape).to(self.x.device, self.x.dtype),
                c.alpha.reshape(shape).to(self.x.device, self.x.dtype))

    def to_x0_eps(self, lin):
        interp = self.scheduler.interpolant
        m0, m1, _ = interp.means(lin, self.scheduler.prediction, self.x, self.coefficients, None)
        return m1.to(lin.dtype), m0.to(lin.dtype)

    def from_x0_eps(self, x0, eps):
        interp = self.scheduler.interpolant
        out = interp.from_means(eps.double(), x0.double(), torch.zeros_like(x0, dtype=torch.float64),
                                self.scheduler.prediction, self.coefficients, self.x.double())
        return out.to(x0.dtype)


def training_frame(scheduler, x_t: torch.Tensor, timestep: torch.Tensor, space=None) -> Frame:
    """The prediction-space frame whose network input is ``x_t`` itself at per-sample network ``timestep`` [B]."""
    space = space if space is not None else prediction_space(scheduler)
    if isinstance(space, DiffusionSpace):
        return DiffusionFrame(space, x_t, timestep, x_t)
    return _InterpolantBatchFrame(scheduler, x_t, timestep)


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift ``s(u) = k u / (1 + (k - 1) u)`` (identity for k = 1)."""
    return u if shift == 1.0 else shift * u / (1.0 + (shift - 1.0) * u)


def network_timestep(kind: str, num_train_timesteps: float, n: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """The family's network timestep at noise timesteps ``n`` (see the module table)."""
    if kind == "vp":
        return n
    u = shifted(n.double() / num_train_timesteps, shift)
    t = u if kind == "flow" else 1.0 - u
    return (t * num_train_timesteps).float()


def num_train_timesteps(scheduler) -> float:
    return float(scheduler.config.num_train_timesteps)


class NoiseLevels:
    """The training noise levels of a teacher and the maps from them to its network and prediction space.

    Args:
        scheduler: the teacher's scheduler.
        t_min, t_max: range of training noise timesteps (``0 <= t_min < t_max``; at most ``T - 1`` for VP, ``T``
            for flow teachers).
        shift: timestep shift of the training levels of a flow teacher; None: the scheduler's own ``shift`` for
            rectified flow (SD3-medium: 3), 1 for interpolants.

    Raises:
        ValueError: a shift with a VP (non-flow) teacher; a range outside the scheduler's; a rectified-flow
            scheduler with ``use_dynamic_shifting`` and no explicit shift.
    """

    def __init__(self, scheduler, t_min: float, t_max: float, shift: float | None = None):
        self.scheduler = scheduler
        self.kind = scheduler_kind(scheduler)
        self.space = prediction_space(scheduler)
        self.T = num_train_timesteps(scheduler)
        if shift is not None and self.kind == "vp":
            raise ValueError(f"timestep_shift={shift} needs a flow-matching teacher (rectified flow or an "
                             f"interpolant); the teacher's {type(scheduler).__name__} is a variance-preserving "
                             "diffusion scheduler")
        if shift is None and self.kind == "flow":
            if scheduler.config.get("use_dynamic_shifting", False):
                raise ValueError(f"the teacher's {type(scheduler).__name__} uses a resolution-dependent (dynamic) "
                                 "shift: set timestep_shift explicitly")
            shift = float(scheduler.config.get("shift", 1.0))
        self.shift = 1.0 if shift is None else float(shift)
        if not self.shift > 0:
            raise ValueError(f"timestep_shift must be > 0; got {self.shift}")
        self.t_min, self.t_max = t_min, t_max
        self.check("t_max", t_max)
        if not 0 <= t_min < t_max:
            raise ValueError(f"need 0 <= t_min < t_max; got {t_min}, {t_max}")

    @property
    def max_timestep(self) -> float:
        """The noise end: ``T - 1`` for VP teachers (the last index), ``T`` for flow teachers."""
        return self.T - 1 if self.kind == "vp" else self.T

    def check(self, name: str, value) -> None:
        if not 0 <= value <= self.max_timestep:
            raise ValueError(f"{name}={value} must lie in [0, {self.max_timestep:g}] for the teacher's "
                             f"{type(self.scheduler).__name__} (noise timesteps: 0 = data, "
                             f"{self.max_timestep:g} = noise)")

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` noise timesteps: uniform integers in ``[t_min, t_max]`` (VP) or uniform reals (flow)."""
        if self.kind == "vp":
            return torch.randint(int(self.t_min), int(self.t_max) + 1, (n,), generator=generator)
        return self.t_min + (self.t_max - self.t_min) * torch.rand(n, generator=generator, dtype=torch.float64)

    def timestep(self, n: torch.Tensor, shift: bool = True) -> torch.Tensor:
        """The network timesteps at noise timesteps ``n`` (shifted training levels unless ``shift=False``)."""
        return network_timestep(self.kind, self.T, n, self.shift if shift else 1.0)

    def frame(self, x_t: torch.Tensor, n: torch.Tensor, shift: bool = True) -> Frame:
        return training_frame(self.scheduler, x_t, self.timestep(n, shift).to(x_t.device), self.space)


def one_step_generate(net, scheduler, z: torch.Tensor, timestep, cond: dict | None = None,
                      prediction_type: str | None = None) -> torch.Tensor:
    """``G(z) = x0``: the network evaluated once on pure noise ``z`` at the generator's noise ``timestep`` (the
    noise-timestep scale of :class:`NoiseLevels`), its output read out as x0 through the family's conversion.

    Args:
        net: the generator (the teacher's architecture; any wrapper) or a plain ``f(x, t) -> prediction``.
        scheduler: the teacher's scheduler (its prediction space gives ``alpha, sigma`` and the conversion).
        z: [B, ...] standard normal noise, taken as the network input ``x_t`` at ``timestep``.
        timestep: the generator's noise timestep (VP: 950 of 1000 for the digits teacher; flow: ``T``, pure noise).
        cond: conditioning keyword arguments of the family's adapter (see :func:`gen.distill.call_net`).
        prediction_type: None: the teacher's own prediction space; ``"sample"``: the output is x0;
            ``epsilon`` / ``v_prediction`` / ``flow``: the Gaussian conversion at the frame's ``alpha, sigma``.
    """
    from .fdistill import call_net

    kind = scheduler_kind(scheduler)
    n = torch.full((z.shape[0],), float(timestep), dtype=torch.float64)
    t = network_timestep(kind, num_train_timesteps(scheduler), n.long() if kind == "vp" else n).to(z.device)
    pred = call_net(net, z, t, cond)
    if prediction_type == "sample":
        return pred
    frame = training_frame(scheduler, z, t)
    if prediction_type is None or prediction_type == "scheduler":
        return frame.to_x0_eps(pred)[0]
    alpha, sigma = frame.alpha_sigma()
    return to_x0_eps(pred, prediction_type, z, alpha.to(pred.dtype), sigma.to(pred.dtype))[0]
