"""Distances between point clouds (2-D toys): sliced Wasserstein-2 and RBF-kernel MMD."""

from __future__ import annotations

import torch


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between equal-size point clouds [N, d] (random unit directions)."""
    if a.shape != b.shape:
        raise ValueError(f"point clouds must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a.double() @ dirs, dim=0)
    pb, _ = torch.sort(b.double() @ dirs, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, bandwidths=(0.1, 0.3, 1.0, 3.0, 10.0), max_points: int = 2000) -> float:
    """Unbiased squared MMD with a sum of RBF kernels exp(-|x-y|^2 / (2 h^2)) over ``bandwidths``."""
    a, b = a[:max_points].double(), b[:max_points].double()

    def k(x, y):
        d2 = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    m, n = a.shape[0], b.shape[0]
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - kaa.diag().sum()) / (m * (m - 1)) + (kbb.sum() - kbb.diag().sum()) / (n * (n - 1))
                 - 2 * kab.mean())
