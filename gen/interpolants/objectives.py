"""Regression objectives for the fields of a stochastic interpolant (Albergo et al. 2023, sec. 2.2 and 3; SiT).

Each loss is the paper's quadratic objective written as a mean squared error; the two differ by a constant that
does not depend on the network, so they have the same minimiser and the same gradients:

    L_b   = E |b(t, x_t) - (dI/dt + gamma' z)|^2        (paper: E[ 1/2 |b|^2 - (dI/dt + gamma' z) . b ])
    L_v   = E |v(t, x_t) - dI/dt|^2                     (paper: E[ 1/2 |v|^2 - dI/dt . v ])
    L_s   = E |s(t, x_t) + n / sigma_n|^2               (paper: E[ 1/2 |s|^2 + gamma^-1 z . s ])
    L_eta = E |eta(t, x_t) - n|^2                       (paper: E[ 1/2 |eta|^2 - z . eta ])
    L_x1  = E |x1hat(t, x_t) - x1|^2

with ``dI/dt = alpha' x0 + beta' x1`` and ``n`` the Gaussian variable (x0 one-sided, z otherwise). ``t`` is uniform
on ``[t_min, t_max]`` (:meth:`Interpolant.safe_interval` by default).

**Antithetic pairs** (paper sec. 6.1 / reference code): for the b and s losses the default evaluates both
``x_t^+ = I + sigma_n n`` and ``x_t^- = I - sigma_n n`` and averages; the ``n / sigma_n`` term of the gradient then
cancels to O(1) near the endpoints where sigma_n -> 0.

**Loss weights** (SiT ``loss_weight``) for score and noise predictions of a one-sided interpolant, written for the
score error |ds|^2 (noise error |d eta|^2 = sigma_n^2 |ds|^2):

- ``"none"``: the field's own units (L_s or L_eta as above);
- ``"noise"``: sigma_n^2 |ds|^2 (= |d eta|^2; SiT's unweighted score/noise loss);
- ``"velocity"``: w_t^2 |ds|^2, the velocity error the score error causes (v = w_t s + (beta'/beta) x);
- ``"likelihood"``: w_t |ds|^2 (SiT's maximum-likelihood weight), with
  ``w_t = alpha^2 beta'/beta - alpha alpha'`` (SiT's ``(alpha'/alpha) sigma^2 - sigma sigma'`` in its naming).
"""

from __future__ import annotations

import torch

from .interpolant import Interpolant, bcast, canonical_prediction

WEIGHTINGS = ("none", "noise", "velocity", "likelihood")


class InterpolantLoss:
    """``loss(model_fn, x1, x0=None, generator=None) -> (scalar, logs)`` for one prediction type.

    Args:
        interpolant: the :class:`Interpolant`.
        prediction: ``"velocity"``, ``"drift"``, ``"score"``, ``"noise"`` or ``"x1"`` (or b, v, s, eta, x1).
        weighting: one of :data:`WEIGHTINGS` (score/noise only; the others take ``"none"``).
        antithetic: evaluate the pair ``I +- sigma_n n``; default True for drift and score, False otherwise.
        t_min, t_max: the training time range; default :meth:`Interpolant.safe_interval` (and t_min >= 1e-3 for the
            velocity/likelihood weights, which are infinite at t = 0).

    ``model_fn(x_t, t)`` takes ``x_t`` [B, ...] and ``t`` [B] in [0, 1] and returns a [B, ...] prediction.
    """

    def __init__(self, interpolant: Interpolant, prediction: str = "velocity", weighting: str = "none",
                 antithetic: bool | None = None, t_min: float | None = None, t_max: float | None = None):
        self.interpolant = interpolant
        self.prediction = canonical_prediction(prediction)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
        if weighting != "none" and self.prediction not in ("score", "noise"):
            raise ValueError(f"weighting={weighting!r} applies to score/noise predictions; "
                             f"prediction={self.prediction!r} takes 'none'")
        if weighting in ("velocity", "likelihood") and interpolant.kind != "one_sided":
            raise ValueError(f"weighting={weighting!r} (SiT's w_t) is defined for one-sided interpolants")
        if interpolant.kind == "mirror" and self.prediction == "velocity":
            raise ValueError("the velocity of a mirror interpolant is identically 0; train drift, score, noise or x1")
        if interpolant.kind == "two_sided" and interpolant.gamma_name == "zero" and self.prediction in ("score",
                                                                                                         "noise"):
            raise ValueError("gamma='zero' vanishes at every t, so a two-sided interpolant has no latent score "
                             "or denoiser; choose a gamma such as 'brownian'")
        self.weighting = weighting
        self.antithetic = self.prediction in ("drift", "score") if antithetic is None else bool(antithetic)
        lo, hi = interpolant.safe_interval(self.prediction)
        if weighting in ("velocity", "likelihood"):
            lo = max(lo, 1e-3)
        self.t_min = lo if t_min is None else float(t_min)
        self.t_max = hi if t_max is None else float(t_max)
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min={self.t_min}, t_max={self.t_max}")

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n] float64 times uniform on [t_min, t_max] (CPU)."""
        return self.t_min + (self.t_max - self.t_min) * torch.rand(n, generator=generator, dtype=torch.float64)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """[B] float64 weight on the squared error of the prediction (see the module docstring)."""
        if self.weighting == "none":
            return torch.ones_like(t)
        c = self.interpolant.coefficients(t)
        sig = self.interpolant.noise_coefficient(c)
        if self.weighting == "noise":
            w_s = sig**2
        else:
            w = c.alpha**2 * c.beta_dot / c.beta - c.alpha * c.alpha_dot
            w_s = w**2 if self.weighting == "velocity" else w
        # the weights above are for |ds|^2; a noise prediction's error is |d eta|^2 = sigma_n^2 |ds|^2
        return w_s if self.prediction == "score" else w_s / sig**2

    def targets(self, t, x1, x0, z, coefficients=None):
        """``(x_t, target)`` for noise draws ``x0`` (one-sided) / ``z`` (otherwise)."""
        interp = self.interpolant
        c = interp.coefficients(t) if coefficients is None else coefficients
        xt, didt, gz = interp.sample_xt(t, x1, x0, z, coefficients=c)
        if self.prediction == "velocity":
            return xt, didt
        if self.prediction == "drift":
            return xt, didt + gz
        if self.prediction == "x1":
            return xt, x1
        n = x0 if interp.kind == "one_sided" else z
        if self.prediction == "noise":
            return xt, n
        sig = bcast(interp.noise_coefficient(c), x1).to(x1.dtype)
        if (sig == 0).any():
            raise ValueError("score target -n/sigma_n is infinite at t where sigma_n = 0; use t_min/t_max inside "
                             "(0, 1) (Interpolant.safe_interval)")
        return xt, -n / sig

    def __call__(self, model_fn, x1: torch.Tensor, x0: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                 z: torch.Tensor | None = None):
        """Monte-Carlo estimate of the objective on a batch.

        Args:
            model_fn: ``(x_t [B,...], t [B]) -> [B,...]``.
            x1: [B, ...] data samples.
            x0: [B, ...] base samples (two-sided: the paired source; one-sided: the Gaussian noise, drawn if None).
            generator: CPU generator for t and the Gaussian draws.
            t, z: optional fixed times [B] and latent noise (for tests).

        Returns:
            ``(loss, logs)``: scalar float32 loss and a dict of floats.
        """
        interp = self.interpolant
        bsz = x1.shape[0]
        t = self.sample_t(bsz, generator) if t is None else Interpolant.check_t(t).reshape(bsz)
        if interp.kind == "one_sided" and x0 is None:
            x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        if interp.kind == "two_sided" and x0 is None:
            x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        if interp.kind != "one_sided" and z is None:
            z = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        tt = t.to(device=x1.device, dtype=torch.float32)
        c = interp.coefficients(t, check=False)  # t was drawn in, or checked into, [0, 1]
        xt, target = self.targets(t, x1, x0, z, c)
        w = None if self.weighting == "none" else bcast(self.weight(t), x1)
        per = self._mean_sq(model_fn(xt, tt), target, w)
        if self.antithetic:
            if interp.kind == "one_sided":
                xt_m, target_m = self.targets(t, x1, -x0, z, c)
            else:
                xt_m, target_m = self.targets(t, x1, x0, -z, c)
            per = 0.5 * (per + self._mean_sq(model_fn(xt_m, tt), target_m, w))
        return per, {}

    @staticmethod
    def _mean_sq(pred, target, w):
        dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32  # half precision -> float32
        sq = (pred.to(dtype) - target.to(dtype)) ** 2
        return (sq if w is None else w.to(dtype) * sq).mean()
