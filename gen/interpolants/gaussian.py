"""Closed-form fields of an interpolant between Gaussians: the exact answer tests and toy checks compare against.

With x0 ~ N(m0, C0), x1 ~ N(m1, C1), z ~ N(0, I) independent, ``x_t ~ N(mu_t, S_t)`` with

    mu_t = alpha m0 + beta m1,       S_t = alpha^2 C0 + beta^2 C1 + gamma^2 I,

and by Gaussian conditioning (r = x - mu_t):

    E[x0 | x] = m0 + alpha C0 S_t^-1 r,   E[x1 | x] = m1 + beta C1 S_t^-1 r,   E[z | x] = gamma S_t^-1 r,
    s = -S_t^-1 r,   v = alpha' E[x0|x] + beta' E[x1|x],   b = v + gamma' E[z|x].

A one-sided interpolant has m0 = 0, C0 = I, gamma = 0 (so eta = E[x0|x]); a mirror one has alpha = 0.
"""

from __future__ import annotations

import torch

from .interpolant import Interpolant, canonical_prediction


class GaussianFields:
    """Exact b, v, s, eta, x1 of ``interpolant`` between N(m0, C0) and N(m1, C1) (float64, d-dimensional).

    Args:
        interpolant: the :class:`Interpolant`.
        m1, c1: target mean [d] and covariance [d, d].
        m0, c0: base mean and covariance (default N(0, I)).
    """

    def __init__(self, interpolant: Interpolant, m1, c1, m0=None, c0=None):
        self.interpolant = interpolant
        self.m1 = torch.as_tensor(m1, dtype=torch.float64)
        self.c1 = torch.as_tensor(c1, dtype=torch.float64)
        d = self.m1.shape[0]
        self.m0 = torch.zeros(d, dtype=torch.float64) if m0 is None else torch.as_tensor(m0, dtype=torch.float64)
        self.c0 = torch.eye(d, dtype=torch.float64) if c0 is None else torch.as_tensor(c0, dtype=torch.float64)
        self.d = d

    def _coef(self, t, n: int):
        """Per-sample coefficients [n] (t: scalar or [n])."""
        t = torch.as_tensor(t, dtype=torch.float64)
        c = self.interpolant.coefficients(t.expand(n) if t.ndim == 0 else t)
        a = torch.zeros_like(c.alpha) if self.interpolant.kind == "mirror" else c.alpha
        ad = torch.zeros_like(c.alpha) if self.interpolant.kind == "mirror" else c.alpha_dot
        return a, c.beta, c.gamma, ad, c.beta_dot, c.gamma_dot, c.gamma_gamma_dot

    def marginal(self, t):
        """``(mu_t, S_t)``: [d], [d, d] for a scalar ``t``; [B, d], [B, d, d] for ``t`` [B]."""
        scalar = torch.as_tensor(t).ndim == 0
        a, b, g = self._coef(t, 1 if scalar else len(t))[:3]
        eye = torch.eye(self.d, dtype=torch.float64)
        mu = a[:, None] * self.m0 + b[:, None] * self.m1
        cov = a[:, None, None] ** 2 * self.c0 + b[:, None, None] ** 2 * self.c1 + g[:, None, None] ** 2 * eye
        return (mu[0], cov[0]) if scalar else (mu, cov)

    def _solve(self, t, x):
        """``(S_t^-1 (x - mu_t))`` [B, d] and the per-sample coefficients."""
        n = x.shape[0]
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.ndim and t.numel() and bool((t == t.reshape(-1)[0]).all()):
            t = t.reshape(-1)[0]  # one time for the whole batch: one d x d solve
        if t.ndim == 0:
            mu, cov = self.marginal(t)
            r = torch.linalg.solve(cov, (x.double() - mu).T).T
            return r, self._coef(t, n)
        coef = self._coef(t, n)
        a, b, g = coef[:3]
        eye = torch.eye(self.d, dtype=torch.float64)
        mu = a[:, None] * self.m0 + b[:, None] * self.m1
        cov = a[:, None, None] ** 2 * self.c0 + b[:, None, None] ** 2 * self.c1 + g[:, None, None] ** 2 * eye
        r = torch.linalg.solve(cov, (x.double() - mu).unsqueeze(-1)).squeeze(-1)
        return r, coef

    def means(self, t, x: torch.Tensor):
        """``(E[x0|x], E[x1|x], E[z|x])`` at points ``x`` [B, d] (``t`` scalar or [B])."""
        r, (a, b, g, *_rest) = self._solve(t, x)
        return self.m0 + a[:, None] * r @ self.c0.T, self.m1 + b[:, None] * r @ self.c1.T, g[:, None] * r

    def field(self, name: str, t, x: torch.Tensor) -> torch.Tensor:
        """The exact ``name`` field (velocity, drift, score, noise, x1) at ``t`` (scalar or [B]) and ``x`` [B, d];
        returned in x's dtype."""
        name = canonical_prediction(name)
        r, (a, b, g, ad, bd, gd, ggd) = self._solve(t, x)
        m0 = self.m0 + a[:, None] * r @ self.c0.T
        m1 = self.m1 + b[:, None] * r @ self.c1.T
        if name == "score":
            out = -r
        elif name == "x1":
            out = m1
        elif name == "noise":
            out = m0 if self.interpolant.kind == "one_sided" else g[:, None] * r
        else:
            out = ad[:, None] * m0 + bd[:, None] * m1
            if name == "drift" and self.interpolant.kind != "one_sided":
                # gamma' E[z|x] = gamma gamma' S^-1 r: finite where gamma' is not (brownian at t = 0, 1)
                out = out + ggd[:, None] * r
        return out.to(x.dtype)

    def model_fn(self, name: str):
        """``(x [B, d], t [B]) -> field`` for :class:`InterpolantSampler` and :class:`InterpolantLoss`."""

        def fn(x, t):
            return self.field(name, t.reshape(-1).double().expand(x.shape[0]), x)

        return fn

    def log_prob(self, x: torch.Tensor, t: float = 1.0) -> torch.Tensor:
        """log N(x; mu_t, S_t), [B] float64."""
        mu, cov = self.marginal(float(t))
        dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
        return dist.log_prob(x.double())
