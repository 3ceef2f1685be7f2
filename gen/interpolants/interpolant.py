"""Stochastic interpolants (Albergo, Boffi & Vanden-Eijnden, arXiv 2303.08797): coefficients and conversions.

Time convention (the paper's and SiT's): ``t = 0`` is the base (Gaussian noise for a one-sided interpolant,
the source image for a bridge), ``t = 1`` is the data. This is the **opposite** of Diffusers' flow matching,
where ``sigma = 1`` is noise; see :mod:`gen.interpolants.convention` for the adapter.

    x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z,        z ~ N(0, I) independent of (x0, x1)    (paper eq. 2.1)

with ``alpha(0) = beta(1) = 1``, ``alpha(1) = beta(0) = 0`` and ``gamma(0) = gamma(1) = 0``. Three kinds:

- ``"two_sided"``: x0 ~ rho0 (any base, e.g. a degraded image paired with x1), x1 ~ rho1, gamma > 0 inside (0, 1).
- ``"one_sided"``: x0 ~ N(0, I) is the noise, ``gamma = 0``: ``x_t = alpha(t) x0 + beta(t) x1`` (paper sec. 3.3;
  SiT's ``x_t = alpha_t x + sigma_t eps`` with SiT alpha = our beta, SiT sigma = our alpha).
- ``"mirror"``: ``x_t = x1 + gamma(t) z`` (data to itself, paper sec. 3.4); alpha = 0, beta = 1.

Fields (expectations conditional on ``x_t = x``; ``n`` is the Gaussian variable, x0 for one-sided, z otherwise,
and ``sigma_n`` its coefficient, alpha or gamma):

    v(t, x)   = E[alpha' x0 + beta' x1 | x]                       velocity ("v", "velocity")
    b(t, x)   = v + gamma' E[z | x] = v - gamma gamma' s          drift of the probability-flow ODE ("b", "drift")
    eta(t, x) = E[n | x]                                          denoiser ("eta", "noise"); the paper's eta_z
    s(t, x)   = grad log rho_t(x) = -eta / sigma_n                score ("s", "score")
    x1(t, x)  = E[x1 | x]                                         data prediction ("x1")

Sign note: the reference code (malbergo/stochastic-interpolants) trains ``eta = -E[z|x]`` and sets ``s = eta/gamma``;
here eta is ``+E[z|x]`` as in the paper's text, so ``s = -eta/gamma``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PATHS = ("linear", "trig", "gvp", "vp", "encdec")
GAMMAS = ("brownian", "scaled_brownian", "bsquared", "sinesquared", "zero")
KINDS = ("two_sided", "one_sided", "mirror")
PREDICTIONS = ("velocity", "drift", "score", "noise", "x1")
_ALIASES = {"v": "velocity", "b": "drift", "s": "score", "eta": "noise", "eta_z": "noise", "x1": "x1",
            "sample": "x1", "epsilon": "noise"}


def canonical_prediction(name: str) -> str:
    """Map ``b``/``v``/``s``/``eta``/``x1`` (and long names) to one of :data:`PREDICTIONS`."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {name!r}; allowed: {', '.join(PREDICTIONS)} "
                         f"(aliases {', '.join(sorted(_ALIASES))})")
    return key


@dataclass
class Coefficients:
    """alpha, beta, gamma and their time derivatives at some times (float64 tensors of one shape)."""

    alpha: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor
    alpha_dot: torch.Tensor
    beta_dot: torch.Tensor
    gamma_dot: torch.Tensor
    gamma_gamma_dot: torch.Tensor  # gamma * gamma', finite where gamma' is not (brownian at 0 and 1)


def _gamma(name: str, t: torch.Tensor, a: float):
    """gamma(t), gamma'(t), gamma(t) gamma'(t) for the named family (float64)."""
    if name == "zero":
        z = torch.zeros_like(t)
        return z, z, z
    if name in ("brownian", "scaled_brownian"):
        scale = 1.0 if name == "brownian" else a
        g = torch.sqrt(scale * t * (1 - t))
        gg = 0.5 * scale * (1 - 2 * t)
        with torch.no_grad():
            gd = torch.where(g > 0, gg / torch.where(g > 0, g, torch.ones_like(g)),
                             torch.sign(1 - 2 * t) * math.inf)
        return g, gd, gg
    if name == "bsquared":
        g = a * t * (1 - t)
        gd = a * (1 - 2 * t)
        return g, gd, g * gd
    if name == "sinesquared":
        g = a * torch.sin(math.pi * t) ** 2
        gd = a * math.pi * torch.sin(2 * math.pi * t)
        return g, gd, g * gd
    raise ValueError(f"unknown gamma {name!r}; allowed: {', '.join(GAMMAS)}")


class Interpolant:
    """``x_t = alpha(t) x0 + beta(t) x1 + gamma(t) z`` with closed-form derivatives and exact field conversions.

    Args:
        path: ``"linear"`` (alpha = 1-t, beta = t), ``"trig"`` (alpha = sqrt(1-gamma^2) cos(pi t/2),
            beta = sqrt(1-gamma^2) sin(pi t/2), paper eq. 4.4), ``"gvp"`` (cos/sin, SiT's GVP),
            ``"vp"`` (SiT's VP: beta = exp(-(1-t)^2 (B1-B0)/4 - (1-t) B0/2), alpha = sqrt(1-beta^2); beta(0) is
            about 0.0066, not 0, as in SiT) or ``"encdec"`` (alpha = cos^2(pi t) on t <= 1/2, beta = cos^2(pi t)
            on t > 1/2; two-sided only, needs gamma(1/2) > 0). Ignored for ``kind="mirror"``.
        gamma: ``"brownian"`` sqrt(t(1-t)), ``"scaled_brownian"`` sqrt(a t(1-t)), ``"bsquared"`` a t(1-t),
            ``"sinesquared"`` a sin^2(pi t) or ``"zero"``. (The reference code's a-brownian reads an undefined
            ``a``; here ``a`` is the argument ``gamma_a``.)
        kind: ``"two_sided"``, ``"one_sided"`` or ``"mirror"`` (see the module docstring).
        gamma_a: the scale ``a`` of scaled_brownian, bsquared and sinesquared; > 0.
        vp_beta_min, vp_beta_max: B0, B1 of the VP path (SiT: 0.1, 20).

    Raises:
        ValueError: unknown names; a one-sided interpolant with gamma != zero; a two-sided or mirror one whose
            gamma vanishes where it must not (mirror with gamma=zero; encdec with gamma(1/2) = 0); trig with
            gamma >= 1 somewhere.
    """

    def __init__(self, path: str | None = "linear", gamma: str = "zero", kind: str = "one_sided",
                 gamma_a: float = 1.0, vp_beta_min: float = 0.1, vp_beta_max: float = 20.0):
        if kind not in KINDS:
            raise ValueError(f"unknown interpolant kind {kind!r}; allowed: {', '.join(KINDS)}")
        if gamma not in GAMMAS:
            raise ValueError(f"unknown gamma {gamma!r}; allowed: {', '.join(GAMMAS)}")
        path = "linear" if path is None else path
        if path not in PATHS:
            raise ValueError(f"unknown interpolant path {path!r}; allowed: {', '.join(PATHS)}")
        if not gamma_a > 0:
            raise ValueError(f"gamma_a must be > 0; got {gamma_a}")
        if kind == "one_sided" and gamma != "zero":
            raise ValueError(f"a one-sided interpolant has gamma='zero' (x0 is the Gaussian); got gamma={gamma!r}. "
                             "Use kind='two_sided' for a Gaussian base plus a latent gamma(t) z")
        if kind == "mirror" and gamma == "zero":
            raise ValueError("gamma='zero' vanishes everywhere, so a mirror interpolant x_t = x1 would not move; "
                             f"choose one of {', '.join(g for g in GAMMAS if g != 'zero')}")
        if kind != "two_sided" and path == "encdec":
            raise ValueError("path='encdec' has alpha(1/2) = beta(1/2) = 0 and needs kind='two_sided' with gamma > 0")
        if path == "encdec" and gamma == "zero":
            raise ValueError("path='encdec' with gamma='zero' collapses x_t to 0 at t=1/2; choose a gamma that is "
                             "positive at 1/2 (e.g. 'sinesquared')")
        if path == "vp" and kind != "one_sided":
            raise ValueError("path='vp' is SiT's one-sided VP path; use kind='one_sided'")
        if path == "trig" and gamma != "zero":
            g = _gamma(gamma, torch.tensor([0.5], dtype=torch.float64), gamma_a)[0]
            if float(g.max()) >= 1:
                raise ValueError(f"path='trig' needs gamma < 1; gamma={gamma!r} with gamma_a={gamma_a} reaches "
                                 f"{float(g.max()):.3f}")
        self.path, self.gamma_name, self.kind = path, gamma, kind
        self.gamma_a, self.vp_beta_min, self.vp_beta_max = float(gamma_a), float(vp_beta_min), float(vp_beta_max)

    # ---------------------------------------------------------------------------------------------- config
    @property
    def config(self) -> dict:
        return {"path": self.path, "gamma": self.gamma_name, "kind": self.kind, "gamma_a": self.gamma_a,
                "vp_beta_min": self.vp_beta_min, "vp_beta_max": self.vp_beta_max}

    def __repr__(self) -> str:
        return f"Interpolant({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"

    @property
    def noise_name(self) -> str:
        """Which variable the denoiser eta estimates: ``"x0"`` (one-sided) or ``"z"``."""
        return "x0" if self.kind == "one_sided" else "z"

    # ---------------------------------------------------------------------------------------------- times
    @staticmethod
    def check_t(t) -> torch.Tensor:
        """``t`` as a float64 tensor, or ``ValueError`` if any value is outside [0, 1] or not finite."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
            bad = t[~(torch.isfinite(t) & (t >= 0) & (t <= 1))]
            raise ValueError("interpolant time t must lie in [0, 1] (0 = base/noise, 1 = data); "
                             f"got {bad.tolist()[:4]}")
        return t

    def coefficients(self, t, check: bool = True) -> Coefficients:
        """alpha, beta, gamma and derivatives at ``t`` (any shape, values in [0, 1]); float64.

        ``check=False`` skips the range check, for times the caller drew inside [0, 1] itself (training hot path).
        """
        t = self.check_t(t).cpu() if check else t
        g, gd, ggd = _gamma(self.gamma_name, t, self.gamma_a)
        if self.kind == "mirror":
            zero = torch.zeros_like(t)
            if self.gamma_name == "sinesquared":  # sin(pi) = 1.2e-16: make gamma(1) exactly 0
                g = torch.where(t == 1, 0.0, g)
            return Coefficients(zero, torch.ones_like(t), g, zero, zero, gd, ggd)
        if self.path == "linear":
            a, b, ad, bd = 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        elif self.path == "gvp" or (self.path == "trig" and self.gamma_name == "zero"):
            h = math.pi / 2
            a, b, ad, bd = torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)
        elif self.path == "trig":
            h = math.pi / 2
            r = torch.sqrt(1 - g**2)
            rd = -ggd / r
            a, b = r * torch.cos(h * t), r * torch.sin(h * t)
            ad = rd * torch.cos(h * t) - r * h * torch.sin(h * t)
            bd = rd * torch.sin(h * t) + r * h * torch.cos(h * t)
        elif self.path == "vp":
            b0, b1 = self.vp_beta_min, self.vp_beta_max
            u = 1 - t
            b = torch.exp(-0.25 * u**2 * (b1 - b0) - 0.5 * u * b0)
            bd = b * (0.5 * u * (b1 - b0) + 0.5 * b0)
            a = torch.sqrt(1 - b**2)
            with torch.no_grad():
                ad = torch.where(a > 0, -b * bd / torch.where(a > 0, a, torch.ones_like(a)),
                                 torch.full_like(a, -math.inf))
        else:  # encdec
            c = torch.cos(math.pi * t) ** 2
            cd = -math.pi * torch.sin(2 * math.pi * t)
            first = t <= 0.5
            zero = torch.zeros_like(t)
            a, b = torch.where(first, c, zero), torch.where(first, zero, c)
            ad, bd = torch.where(first, cd, zero), torch.where(first, zero, cd)
        # exact zeros where cos / sin round off (cos(pi/2) = 6e-17, sin(pi) = 1.2e-16): the endpoint checks rely on
        # them. (gamma gamma' is left alone: for brownian gammas its limit at 0 and 1 is +-1/2, not 0.)
        if self.gamma_name == "sinesquared":
            g = torch.where(t == 1, 0.0, g)
        if self.path in ("gvp", "trig"):
            a, b = torch.where(t == 1, 0.0, a), torch.where(t == 0, 0.0, b)
        elif self.path == "encdec":
            a, b = torch.where(t == 0.5, 0.0, a), torch.where(t == 0.5, 0.0, b)
        return Coefficients(a, b, g, ad, bd, gd, ggd)

    def noise_coefficient(self, c: Coefficients) -> torch.Tensor:
        """sigma_n: the coefficient of the Gaussian variable (alpha for one-sided, gamma otherwise)."""
        return c.alpha if self.kind == "one_sided" else c.gamma

    def safe_interval(self, prediction: str = "velocity", eps: float = 1e-3) -> tuple[float, float]:
        """``(t_min, t_max)`` on which the training target and its conversions stay finite (SiT's check_interval).

        One-sided: the score (``-x0/alpha``) and VP's alpha' blow up at t = 1, so t_max = 1 - eps there; velocity,
        noise and x1 use the whole [0, 1] (SiT uses eps = 0 for a Linear/GVP velocity model). Two-sided and
        mirror: the score ``-z/gamma`` and, for brownian gammas, gamma' blow up at both ends, so [eps, 1 - eps].
        """
        prediction = canonical_prediction(prediction)
        if self.kind == "one_sided":
            hi = 1.0 - eps if (prediction == "score" or self.path == "vp") else 1.0
            return 0.0, hi
        if prediction == "score" or self.gamma_name in ("brownian", "scaled_brownian"):
            return eps, 1.0 - eps
        return 0.0, 1.0

    # ---------------------------------------------------------------------------------------------- forward
    def sample_xt(self, t, x1: torch.Tensor, x0: torch.Tensor | None = None, z: torch.Tensor | None = None,
                  coefficients: Coefficients | None = None):
        """``x_t = alpha x0 + beta x1 + gamma z`` (``t``: scalar or [B]; x0/z default to zeros where unused).

        Returns ``(x_t, dI/dt, gamma' z)``: the velocity target alpha' x0 + beta' x1 and the latent part of the
        drift target (zero for gamma = 0; contains gamma' = inf at brownian endpoints). ``coefficients``: the
        precomputed :meth:`coefficients` at ``t`` (saves recomputing them).
        """
        c = self.coefficients(t) if coefficients is None else coefficients
        # one [6, B] cast and reshape instead of six
        stacked = torch.stack([c.alpha, c.beta, c.gamma, c.alpha_dot, c.beta_dot, c.gamma_dot]).to(
            device=x1.device, dtype=x1.dtype)
        stacked = stacked.reshape(6, -1, *([1] * (x1.ndim - 1))) if stacked.ndim > 1 else stacked
        a, b, g, ad, bd, gd = stacked.unbind(0)
        if x0 is None or self.kind == "mirror":
            xt, didt = b * x1, bd * x1
        else:
            xt, didt = a * x0 + b * x1, ad * x0 + bd * x1
        if self.kind != "one_sided" and self.gamma_name != "zero":
            if z is None:
                raise ValueError(f"a {self.kind} interpolant with gamma={self.gamma_name!r} needs z")
            return xt + g * z, didt, gd * z
        return xt, didt, torch.zeros_like(x1)

    # ---------------------------------------------------------------------------------------------- conversions
    def means(self, pred, src, x, c: Coefficients, x0):
        """Conditional means ``(E[x0|x], E[x1|x], E[z|x])`` implied by one prediction (float64 maths)."""
        a, b, g, ad, bd, gd = (bcast(v, x) for v in (c.alpha, c.beta, c.gamma, c.alpha_dot, c.beta_dot, c.gamma_dot))
        p = pred.double()
        x = x.double()
        if self.kind == "one_sided":
            if src == "x1":
                m1 = p
                m0 = _div(x - b * p, a, "alpha(t)", "x1 -> other predictions (t = 1 has alpha = 0)")
            elif src in ("noise", "score"):
                m0 = p if src == "noise" else -a * p
                m1 = _div(x - a * m0, b, "beta(t)", f"{src} -> other predictions (t = 0 has beta = 0)")
            else:  # velocity == drift for gamma = 0: solve [[a, b], [ad, bd]] [m0, m1] = [x, p]
                det = a * bd - b * ad
                m0 = _div(bd * x - b * p, det, "alpha beta' - beta alpha'", f"{src} -> other predictions")
                m1 = _div(a * p - ad * x, det, "alpha beta' - beta alpha'", f"{src} -> other predictions")
            return m0, m1, torch.zeros_like(x)
        if self.kind == "mirror":
            if src == "velocity":
                raise ValueError("the velocity of a mirror interpolant is identically 0 and determines nothing; "
                                 "use drift, score, noise or x1")
            if src == "x1":
                mz = _div(x - p, g, "gamma(t)", "x1 -> other predictions (gamma vanishes at t = 0 and 1)")
            elif src == "noise":
                mz = p
            elif src == "score":
                mz = -g * p
            else:
                mz = _div(p, gd, "gamma'(t)", "drift -> other predictions")
            return torch.zeros_like(x), x - g * mz, mz
        # two-sided: needs x0 (paired/conditional bridge) for a single prediction to determine the state
        if x0 is None:
            raise ValueError("a two-sided interpolant's single prediction determines the other fields only when x0 is "
                             "known (conditional bridge: pass x0=); otherwise only score <-> noise convert "
                             "(and drift = velocity - gamma gamma' score)")
        x0 = x0.double()
        r = x - a * x0
        if src == "x1":
            m1 = p
            mz = _div(r - b * p, g, "gamma(t)", "x1 -> other predictions")
        elif src in ("noise", "score"):
            mz = p if src == "noise" else -g * p
            m1 = _div(r - g * mz, b, "beta(t)", f"{src} -> other predictions")
        elif src == "velocity":
            m1 = _div(p - ad * x0, bd, "beta'(t)", "velocity -> other predictions")
            mz = _div(r - b * m1, g, "gamma(t)", "velocity -> other predictions")
        else:  # drift: [[b, g], [bd, gd]] [m1, mz] = [r, p - ad x0]
            q = p - ad * x0
            det = b * gd - g * bd
            m1 = _div(gd * r - g * q, det, "beta gamma' - gamma beta'", "drift -> other predictions")
            mz = _div(b * q - bd * r, det, "beta gamma' - gamma beta'", "drift -> other predictions")
        return x0.expand_as(x), m1, mz

    def from_means(self, m0, m1, mz, dst, c: Coefficients, x):
        a, g, ad, bd, gd = (bcast(v, x) for v in (c.alpha, c.gamma, c.alpha_dot, c.beta_dot, c.gamma_dot))
        if dst == "x1":
            return m1
        if dst == "velocity":
            return ad * m0 + bd * m1
        if dst == "drift":
            out = ad * m0 + bd * m1
            return out if self.kind == "one_sided" else out + gd * mz
        noise = m0 if self.kind == "one_sided" else mz
        if dst == "noise":
            return noise
        sig = a if self.kind == "one_sided" else g
        return -_div(noise, sig, "the noise coefficient " + ("alpha(t)" if self.kind == "one_sided" else "gamma(t)"),
                     "the score s = -eta / sigma_n" + self._gamma_hint())

    def _gamma_hint(self) -> str:
        if self.kind != "one_sided" and self.gamma_name == "zero":
            return f" (gamma={self.gamma_name!r} vanishes for every t: no score exists)"
        return " (it vanishes at an endpoint; sample on [t_min, t_max] inside (0, 1))"

    def convert(self, pred: torch.Tensor, src: str, dst: str, x: torch.Tensor, t, x0: torch.Tensor | None = None,
                score: torch.Tensor | None = None) -> torch.Tensor:
        """Exact conversion of a prediction between b, v, s, eta and x1 at the point ``x`` and time ``t``.

        Uses ``x = alpha E[x0|x] + beta E[x1|x] + gamma E[z|x]`` and the definitions in the module docstring;
        e.g. one-sided ``s = -eta/alpha``, ``eta = (beta' x - beta v) / (alpha beta' - beta alpha')``; mirror
        ``b = gamma' eta``; two-sided ``b = v - gamma gamma' s``.

        Args:
            pred: [B, ...] the prediction of type ``src``.
            src, dst: prediction types (:data:`PREDICTIONS` or the aliases b, v, s, eta, x1).
            x: [B, ...] the point x_t.
            t: scalar or [B] in [0, 1].
            x0: [B, ...] the known base sample of a conditional two-sided bridge (then every conversion works).
            score: [B, ...] for two-sided without x0: velocity <-> drift needs the score.

        Returns:
            [B, ...] in ``pred``'s dtype.

        Raises:
            ValueError: t outside [0, 1]; a conversion that divides by a coefficient that vanishes at t (e.g.
                a score where gamma = 0); a two-sided conversion that the given arguments do not determine.
        """
        src, dst = canonical_prediction(src), canonical_prediction(dst)
        if pred.shape != x.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match x shape {tuple(x.shape)}")
        c = self.coefficients(t)
        if self.kind == "two_sided" and x0 is None:
            return self._convert_two_sided_free(pred, src, dst, x, c, score)
        if src == dst and not (src == "score" or dst == "score"):
            return pred
        m0, m1, mz = self.means(pred, src, x, c, x0)
        return self.from_means(m0, m1, mz, dst, c, x.double()).to(pred.dtype)

    def _convert_two_sided_free(self, pred, src, dst, x, c, score):
        if src == dst:
            return pred
        g, ggd = bcast(c.gamma, x), bcast(c.gamma_gamma_dot, x)
        pair = {src, dst}
        if pair == {"score", "noise"}:
            p = pred.double()
            if src == "noise":
                return (-_div(p, g, "gamma(t)", "noise -> score" + self._gamma_hint())).to(pred.dtype)
            return (-g * p).to(pred.dtype)
        if pair == {"velocity", "drift"} and score is not None:
            shift = (-ggd * score.double())
            return (pred.double() + (shift if dst == "drift" else -shift)).to(pred.dtype)
        raise ValueError(f"cannot convert {src} -> {dst} for a two-sided interpolant without x0; possible: "
                         "score <-> noise, velocity <-> drift with score=..., anything with x0=...")

    def drift_and_score(self, pred, src, x, t, x0=None, need_score: bool = True):
        """``(b, s)`` from one prediction (``s`` is None when ``need_score`` is False)."""
        b = self.convert(pred, src, "drift", x, t, x0=x0)
        s = self.convert(pred, src, "score", x, t, x0=x0) if need_score else None
        return b, s


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] or scalar coefficient to broadcast against ``like`` [B, ...] (float64, like's device)."""
    v = v.to(like.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def _div(num, den, what: str, context: str):
    if (den == 0).any() or not torch.isfinite(den).all():
        raise ValueError(f"{context}: {what} is 0 or infinite at this t, so the conversion is undefined; "
                         "evaluate at interior t (see Interpolant.safe_interval)")
    return num / den
