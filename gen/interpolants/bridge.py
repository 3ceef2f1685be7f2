"""A degraded-digit -> clean-digit bridge: the paired coupling of Albergo et al., "Stochastic interpolants with
data-dependent couplings" (arXiv 2310.03725, sec. 3), specialised to 16x16 digits.

Observation (the condition xi):   d = up(avgpool_k(x1)) + obs_noise_std * n,     n ~ N(0, I)
Base sample (t = 0):              x0 = d + base_noise_std * zeta,                  zeta ~ N(0, I)

``avgpool_k`` averages k x k blocks (k = 4: 16x16 -> 4x4), ``up`` is bilinear back to 16x16. The network sees
``cat([x_t, d])`` and learns the conditional drift b(t, x | d); integrating the ODE from x0 (random through zeta)
draws different clean digits consistent with d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def degrade(x1: torch.Tensor, factor: int = 4, noise_std: float = 0.2, generator: torch.Generator | None = None):
    """The observation ``d`` of clean images ``x1`` [B, C, H, W] in [-1, 1] (H, W divisible by ``factor``)."""
    if factor < 1 or x1.shape[-1] % factor or x1.shape[-2] % factor:
        raise ValueError(f"factor must be >= 1 and divide the image side {tuple(x1.shape[-2:])}; got {factor}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0; got {noise_std}")
    low = F.avg_pool2d(x1, factor) if factor > 1 else x1
    d = F.interpolate(low, size=x1.shape[-2:], mode="bilinear", align_corners=False) if factor > 1 else low
    if noise_std > 0:
        d = d + noise_std * torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
    return d


def bridge_base(d: torch.Tensor, base_noise_std: float = 0.3, generator: torch.Generator | None = None):
    """The base sample ``x0 = d + base_noise_std * zeta`` of the bridge."""
    if base_noise_std < 0:
        raise ValueError(f"base_noise_std must be >= 0; got {base_noise_std}")
    if base_noise_std == 0:
        return d.clone()
    return d + base_noise_std * torch.randn(d.shape, generator=generator, dtype=d.dtype).to(d.device)
