"""Two-dimensional toy distributions with exact samplers and, where one exists, exact log densities.

The constants follow FFJORD (Grathwohl et al., 2019, ``lib/toy_data.py``), the usual reference for these toys:

* ``8gaussians``: equal-weight mixture of 8 isotropic Gaussians with centres on a circle of radius
  ``2 * sqrt(2)`` at angles ``k * pi / 4`` and standard deviation ``0.5 / sqrt(2)`` (about 0.354).
  Mean 0, covariance ``(R^2 / 2 + std^2) I = 4.125 I``.
* ``25gaussians``: equal-weight mixture of 25 isotropic Gaussians with centres on the grid
  ``{-2, -1, 0, 1, 2}^2 / (2 * sqrt(2))`` and standard deviation ``0.05 / (2 * sqrt(2))`` (about 0.0177).
  Mean 0, covariance ``(2 / 8 + std^2) I``.
* ``8gaussians_imbalanced``: the 8 centres of ``8gaussians`` with standard deviation 0.1 and mode weights
  spanning 20x, large and small modes alternating around the circle: ``(0.30, 0.015, 0.20, 0.045, 0.15, 0.07,
  0.12, 0.10)`` at angles ``0, pi/4, ...`` (a mode-coverage stress test: a student that drops or starves the
  0.015 and 0.045 modes shows it in their recall).
* ``checkerboard``: uniform on the 8 "black" 2x2 squares of a 4x4 board covering ``[-4, 4)^2``; a square with
  lower-left corner ``(2i, 2j)`` is black when ``i + j`` is even. Density ``1 / 32`` there, 0 elsewhere.
* ``moons``: two interleaved half circles (as in ``sklearn.datasets.make_moons``) with Gaussian noise of
  standard deviation 0.1, then centred and scaled by 2: ``x = 2 * (moon + noise - (0.5, 0.25))``. No
  closed-form density is provided.
"""

from __future__ import annotations

import math

import torch

TOY_NAMES = ("8gaussians", "8gaussians_imbalanced", "25gaussians", "checkerboard", "moons")
MIXTURE_NAMES = ("8gaussians", "8gaussians_imbalanced", "25gaussians")

EIGHT_GAUSSIANS_RADIUS = 2.0 * math.sqrt(2.0)
EIGHT_GAUSSIANS_STD = 0.5 / math.sqrt(2.0)
TWENTY_FIVE_GAUSSIANS_SPACING = 1.0 / (2.0 * math.sqrt(2.0))
TWENTY_FIVE_GAUSSIANS_STD = 0.05 / (2.0 * math.sqrt(2.0))
CHECKERBOARD_SQUARE = 2.0
CHECKERBOARD_HALF_WIDTH = 4.0
MOONS_NOISE = 0.1
MOONS_SCALE = 2.0
IMBALANCED_STD = 0.1
IMBALANCED_WEIGHTS = (0.30, 0.015, 0.20, 0.045, 0.15, 0.07, 0.12, 0.10)


def _check_name(name: str) -> None:
    if name not in TOY_NAMES:
        raise ValueError(f"name must be one of {TOY_NAMES}, got {name!r}")


def mixture_params(name: str) -> tuple[torch.Tensor, float]:
    """Centres and common standard deviation of the Gaussian-mixture toys (weights: :func:`mixture_weights`).

    Args:
        name: one of :data:`MIXTURE_NAMES`.

    Returns:
        centres: float32 [K, 2] (K = 8 or 25).
        std: Standard deviation of every isotropic component.
    """
    if name in ("8gaussians", "8gaussians_imbalanced"):
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4.0)
        centres = EIGHT_GAUSSIANS_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        return centres.float(), (EIGHT_GAUSSIANS_STD if name == "8gaussians" else IMBALANCED_STD)
    if name == "25gaussians":
        grid = torch.arange(-2, 3, dtype=torch.float32) * TWENTY_FIVE_GAUSSIANS_SPACING
        gx, gy = torch.meshgrid(grid, grid, indexing="ij")
        return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1), TWENTY_FIVE_GAUSSIANS_STD
    raise ValueError(f"name must be one of {MIXTURE_NAMES} for mixture_params, got {name!r}")


def check_mixture_weights(weights, num_components: int | None = None) -> torch.Tensor:
    """Mixture weights as float64 [K] summing to 1; ``ValueError`` unless every weight is finite and > 0 (and there
    are ``num_components`` of them, when given)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.ndim != 1 or w.numel() == 0:
        raise ValueError(f"mixture weights must be a non-empty 1-D sequence; got shape {tuple(w.shape)}")
    if num_components is not None and w.numel() != num_components:
        raise ValueError(f"got {w.numel()} mixture weights for {num_components} components")
    if not torch.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"mixture weights must be finite and > 0; got {w.tolist()}")
    return w / w.sum()


def mixture_weights(name: str) -> torch.Tensor:
    """Mixture weights [K] (float64, sum 1) of a Gaussian-mixture toy: uniform except ``8gaussians_imbalanced``."""
    centres, _ = mixture_params(name)
    if name == "8gaussians_imbalanced":
        return check_mixture_weights(IMBALANCED_WEIGHTS, centres.shape[0])
    return torch.full((centres.shape[0],), 1.0 / centres.shape[0], dtype=torch.float64)


def _sample_mixture(name: str, n: int, generator: torch.Generator | None) -> torch.Tensor:
    centres, std = mixture_params(name)
    weights = mixture_weights(name)
    if name == "8gaussians_imbalanced":
        component = torch.multinomial(weights, n, replacement=True, generator=generator) if n else \
            torch.zeros(0, dtype=torch.long)
    else:  # equal weights: the historical sampler (same samples for the same seed as before)
        component = torch.randint(0, centres.shape[0], (n,), generator=generator)
    return centres[component] + std * torch.randn(n, 2, generator=generator)


def _sample_checkerboard(n: int, generator: torch.Generator | None) -> torch.Tensor:
    # In board units (squares of side 1 on [-2, 2)^2): pick a column u, then a row of matching parity.
    u = torch.rand(n, generator=generator) * 4.0 - 2.0
    row_offset = torch.rand(n, generator=generator) - 2.0 * torch.randint(0, 2, (n,), generator=generator)
    v = row_offset + torch.remainder(torch.floor(u), 2.0)
    return torch.stack([u, v], dim=1) * CHECKERBOARD_SQUARE


def _sample_moons(n: int, generator: torch.Generator | None) -> torch.Tensor:
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x, y], dim=1) + MOONS_NOISE * torch.randn(n, 2, generator=generator)
    return MOONS_SCALE * (points - torch.tensor([0.5, 0.25]))


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws exact samples from a toy distribution (see the module docstring for the definitions).

    Args:
        name: One of :data:`TOY_NAMES`.
        n: Number of samples, >= 0.
        generator: Optional CPU ``torch.Generator``; the same seed gives the same samples.

    Returns:
        float32 [n, 2] on the CPU.

    Raises:
        ValueError: If ``name`` is unknown or ``n`` is negative.
    """
    _check_name(name)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if name in MIXTURE_NAMES:
        return _sample_mixture(name, n, generator)
    if name == "checkerboard":
        return _sample_checkerboard(n, generator)
    return _sample_moons(n, generator)


def toy_log_prob(name: str, x: torch.Tensor) -> torch.Tensor:
    """Exact log density of a toy distribution.

    Mixtures: log p(x) = logsumexp_k [log pi_k + log N(x; c_k, std^2 I)] (pi_k = 1/K for the equal ones).
    Checkerboard: log p(x) = -log 32 on the black squares, -inf elsewhere.

    Args:
        name: one of :data:`MIXTURE_NAMES` or ``"checkerboard"``.
        x: Points, float [..., 2].

    Returns:
        Log densities [...], same dtype as ``x`` (float32 for integer input).

    Raises:
        ValueError: If ``name`` is unknown, is ``"moons"`` (no closed form), or ``x`` does not end in 2.
    """
    _check_name(name)
    if name == "moons":
        raise ValueError("toy_log_prob has no closed form for name='moons'; use one of "
                         f"{MIXTURE_NAMES} or 'checkerboard'")
    if x.shape[-1] != 2:
        raise ValueError(f"x must have shape [..., 2], got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.float()
    if name == "checkerboard":
        u = x / CHECKERBOARD_SQUARE
        half = CHECKERBOARD_HALF_WIDTH / CHECKERBOARD_SQUARE
        inside = ((u >= -half) & (u < half)).all(dim=-1)
        black = torch.remainder(torch.floor(u).sum(dim=-1), 2.0) == 0
        area = 8 * CHECKERBOARD_SQUARE**2
        return torch.where(inside & black, torch.full_like(x[..., 0], -math.log(area)),
                           torch.full_like(x[..., 0], -math.inf))
    centres, std = mixture_params(name)
    centres = centres.to(device=x.device, dtype=x.dtype)
    sq_dist = ((x.unsqueeze(-2) - centres) ** 2).sum(dim=-1)  # [..., K]
    log_normal = -0.5 * sq_dist / std**2 - math.log(2.0 * math.pi * std**2)
    log_w = mixture_weights(name).log().to(device=x.device, dtype=x.dtype)
    return torch.logsumexp(log_normal + log_w, dim=-1)
