"""The diffusion coefficient eps(t) of the interpolant SDEs (Albergo et al. 2023, eq. 2.33; SiT ``diffusion_form``).

    forward SDE (t: 0 -> 1):  dX = [b(t, X) + eps(t) s(t, X)] dt + sqrt(2 eps(t)) dW

Every eps(t) >= 0 gives the same marginals rho_t as the probability-flow ODE (eps = 0). Named forms, in this
package's convention (t = 0 noise, t = 1 data), each multiplied by ``norm``:

- ``"constant"``: 1;
- ``"sigma"``: sigma_n(t), the noise coefficient (alpha for one-sided, gamma otherwise); SiT's CLI default;
- ``"linear"``: 1 - t;
- ``"decreasing"``: (cos(pi t) + 1)^2 / 4 (SiT: 0.25 (norm cos(pi t) + 1)^2 with the norm outside here);
- ``"increasing_decreasing"``: sin^2(pi t) (SiT's dictionary spells it "inccreasing-decreasing", a KeyError);
- ``"sbdm"``: w_t = alpha^2 beta'/beta - alpha alpha' (one-sided), the coefficient for which the SDE is the
  reverse-time SDE of score-based diffusion. It is infinite at t = 0 (beta = 0): SiT then diverges with a velocity
  model (whose t_start is 0). Since any eps gives the same marginals, we evaluate it at max(t, ``sbdm_floor``),
  which keeps it finite and changes nothing in distribution.
"""

from __future__ import annotations

import math

import torch

from .interpolant import Interpolant

DIFFUSION_FORMS = ("constant", "sigma", "linear", "decreasing", "increasing_decreasing", "sbdm")


def diffusion_coefficient(form, interpolant: Interpolant, norm: float = 1.0, sbdm_floor: float = 1e-3):
    """Return ``eps(t) -> float`` for a named form, a float (constant) or a user callable (returned as is).

    Raises:
        ValueError: unknown form, negative norm, or ``"sbdm"`` on an interpolant that is not one-sided.
    """
    if callable(form):
        return form
    if isinstance(form, (int, float)) and not isinstance(form, bool):
        if form < 0:
            raise ValueError(f"eps must be >= 0; got {form}")
        value = float(form)
        return lambda t: value
    if form not in DIFFUSION_FORMS:
        raise ValueError(f"unknown diffusion form {form!r}; allowed: {', '.join(DIFFUSION_FORMS)}, a float or a "
                         "callable eps(t)")
    if norm < 0:
        raise ValueError(f"diffusion_norm must be >= 0; got {norm}")
    if form == "sbdm" and interpolant.kind != "one_sided":
        raise ValueError("diffusion form 'sbdm' (w_t of SiT) is defined for one-sided interpolants")

    def eps(t: float) -> float:
        if form == "constant":
            return norm
        if form == "linear":
            return norm * (1.0 - t)
        if form == "decreasing":
            return norm * 0.25 * (math.cos(math.pi * t) + 1.0) ** 2
        if form == "increasing_decreasing":
            return norm * math.sin(math.pi * t) ** 2
        if form == "sigma":
            c = interpolant.coefficients(torch.tensor(float(t)))
            return norm * float(interpolant.noise_coefficient(c))
        c = interpolant.coefficients(torch.tensor(max(float(t), sbdm_floor)))
        return norm * float(c.alpha**2 * c.beta_dot / c.beta - c.alpha * c.alpha_dot)

    return eps
