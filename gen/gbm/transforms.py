"""Positivity transform: GBM needs strictly positive data; images live in [-1, 1]."""

from __future__ import annotations

import math

import torch


class PositivityTransform:
    """``x_pos = x + offset`` and its inverse ``x = x_pos - offset`` (optionally clamped to the data range).

    The reference code shifts [0, 1] images by +1 into [1, 2]; for our [-1, 1] images ``offset=3`` gives [2, 4],
    the same ratio max/min = 2 (the same geometry in log space, shifted by log 2).

    Args:
        offset: added to the data; must make every value > 0 (checked in :meth:`forward`).
        data_range: ``(lo, hi)`` the inverse clamps to (``None``: no clamp).
    """

    def __init__(self, offset: float = 3.0, data_range: tuple[float, float] | None = (-1.0, 1.0)):
        if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
            raise ValueError(f"offset must be a finite number; got {offset!r}")
        if data_range is not None and not data_range[0] < data_range[1]:
            raise ValueError(f"data_range must be (lo, hi) with lo < hi; got {data_range}")
        self.offset = float(offset)
        self.data_range = data_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shift data into the positive orthant; ValueError if some value stays <= 0 or is not finite."""
        if not torch.isfinite(x).all():
            raise ValueError("data contains NaN or inf")
        out = x + self.offset
        if (out <= 0).any():
            raise ValueError(
                f"positivity offset {self.offset} leaves non-positive values (data min {x.min().item():.4g}); "
                f"use offset > {-x.min().item():.4g}"
            )
        return out

    def inverse(self, x_pos: torch.Tensor) -> torch.Tensor:
        out = x_pos - self.offset
        if self.data_range is not None:
            out = out.clamp(*self.data_range)
        return out

    __call__ = forward
