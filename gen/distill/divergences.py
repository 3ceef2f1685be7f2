"""f-divergences and their f-distill weightings h(r) = r^2 f''(r) (Xu, Nie & Vahdat 2025, arXiv 2502.15681).

For D_f(p || q) = E_q[f(p/q)] with r = p_t / q_t (teacher over student, both noised at time t), the paper's
Theorem gives the student gradient

    grad_theta D_f(p_t || q_t) = -E[ h(r(x_t)) (grad log p_t(x_t) - grad log q_t(x_t))^T dx_t/dtheta ],
    h(r) = r^2 f''(r),

so a divergence enters f-distill only through h. Reverse KL (f = -log r) has h = 1: plain DMD / VSD.

Each :class:`FDivergence` holds the generator ``f`` (used by the tests to check ``h`` by automatic
differentiation) and the closed-form ``h``. Constant factors in ``h`` (e.g. 1/2 for squared Hellinger) are kept
so that ``h == r^2 f''`` exactly; f-distill divides ``h`` by its batch mean, which removes them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FDivergence:
    """One f-divergence: ``f(r)`` (convex, ``f(1) = 0``) and its weighting ``h(r) = r^2 f''(r)``.

    Both take a positive tensor ``r`` and return a tensor of the same shape.
    """

    name: str
    description: str
    f: Callable[[torch.Tensor], torch.Tensor]
    h: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        return self.h(r)


def _xlogx(r):
    return r * torch.log(r)


def _alpha_divergence(a: float) -> FDivergence:
    if a in (0.0, 1.0):
        raise ValueError(f"alpha={a} is a limit of the alpha family: use 'rkl' (alpha=0) or 'kl' (alpha=1)")
    return FDivergence(
        name=f"alpha:{a:g}",
        description=f"alpha-divergence with alpha={a:g}; h = r^alpha (0: reverse KL, 1: forward KL, 1/2: Hellinger)",
        f=lambda r: (r**a - a * r - (1.0 - a)) / (a * (a - 1.0)),
        h=lambda r: r**a,
    )


_REGISTRY: dict[str, FDivergence] = {
    d.name: d
    for d in (
        FDivergence("rkl", "reverse KL, KL(q||p); h = 1 (DMD / VSD); mode-seeking",
                    f=lambda r: -torch.log(r), h=lambda r: torch.ones_like(r)),
        FDivergence("kl", "forward KL, KL(p||q); h = r; mode-covering, unbounded weights",
                    f=_xlogx, h=lambda r: r),
        FDivergence("js", "Jensen-Shannon; h = r / (1 + r), bounded in (0, 1)",
                    f=lambda r: _xlogx(r) - (1.0 + r) * torch.log((1.0 + r) / 2.0), h=lambda r: r / (1.0 + r)),
        FDivergence("sh", "squared Hellinger, (sqrt(r) - 1)^2; h = sqrt(r) / 2",
                    f=lambda r: (torch.sqrt(r) - 1.0) ** 2, h=lambda r: 0.5 * torch.sqrt(r)),
        FDivergence("sf", "softened reverse KL; h = 1 / (1 + r), bounded, mode-seeking",
                    f=lambda r: (1.0 + r) * torch.log((1.0 + r) / 2.0) - _xlogx(r) - torch.log(r),
                    h=lambda r: 1.0 / (1.0 + r)),
        FDivergence("neyman", "Neyman chi^2, (1 - r)^2 / r; h = 2 / r",
                    f=lambda r: (1.0 - r) ** 2 / r, h=lambda r: 2.0 / r),
        FDivergence("pearson", "Pearson chi^2, (r - 1)^2; h = 2 r^2 (very high variance)",
                    f=lambda r: (r - 1.0) ** 2, h=lambda r: 2.0 * r**2),
        FDivergence("jf", "Jeffreys, forward + reverse KL, (r - 1) log r; h = 1 + r",
                    f=lambda r: (r - 1.0) * torch.log(r), h=lambda r: 1.0 + r),
    )
}
# Common spellings of the same divergences.
_ALIASES = {"reverse_kl": "rkl", "dmd": "rkl", "vsd": "rkl", "fkl": "kl", "forward_kl": "kl",
            "jensen_shannon": "js", "hellinger": "sh", "jeffreys": "jf"}

def available_divergences() -> list[str]:
    """Names accepted by :func:`get_divergence` (aliases included); ``alpha:<a>`` takes any real ``a`` not 0 or 1."""
    return sorted(_REGISTRY) + sorted(_ALIASES) + ["alpha:<a>"]


def get_divergence(name: str) -> FDivergence:
    """The divergence registered as ``name`` (``"rkl"``, ``"kl"``/``"fkl"``, ``"js"``, ``"sh"``, ``"sf"``,
    ``"neyman"``, ``"pearson"``, ``"jf"``, or ``"alpha:0.5"`` for the alpha family).

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if isinstance(name, FDivergence):
        return name
    if not isinstance(name, str):
        raise ValueError(f"divergence must be a name; got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key.startswith("alpha:"):
        try:
            a = float(key.split(":", 1)[1])
        except ValueError:
            a = math.nan
        if not math.isfinite(a):
            raise ValueError(f"divergence {name!r}: the alpha family is written 'alpha:<number>', e.g. 'alpha:0.5'")
        return _alpha_divergence(a)
    raise ValueError(f"unknown divergence {name!r}; known: {', '.join(available_divergences())}")


def register_divergence(name: str, f: Callable, h: Callable, description: str = "") -> FDivergence:
    """Add a divergence to the registry (``h`` must equal ``r^2 f''(r)``; ``tests`` check the built-in ones)."""
    key = name.strip().lower()
    if key in _REGISTRY or key in _ALIASES or key.startswith("alpha:"):
        raise ValueError(f"divergence {name!r} is already registered")
    _REGISTRY[key] = FDivergence(key, description or key, f, h)
    return _REGISTRY[key]
