"""Guidance interval (Kynkaanniemi et al. 2024, arXiv 2404.07724): guide only in a middle band of noise
levels."""

from __future__ import annotations

import torch

from gen import validate

from .base import Guider, GuiderWrapper, Prediction, StepInfo


class GuidanceInterval(GuiderWrapper):
    """Apply an inner guider only where the noise level lies in ``(sigma_lo, sigma_hi]``.

        D = inner(Dc, Du)   if sigma in (sigma_lo, sigma_hi]
        D = Dc              otherwise (and the unconditional pass is skipped)

    ``sigma`` is the Karras/EDM level ``sigma_t / alpha_t`` of the current ``x_t`` (``StepInfo.sigma``, per
    sample), so the interval is the same for every scheduler and step count, and both calls of a second-order
    step are gated by their own sigma. The paper's SDXL setting is (0.28, 5.42]; for EDM2 on ImageNet-512 the
    code gates by step indices (17..22 of 32 Heun steps), which corresponds to a sigma band of that schedule.

    Inner state is kept as in ``GuiderWrapper``: rows outside the interval feed ``d = 0`` to the inner guider.

    Args:
        inner: the guider to gate (or give ``inner_class`` + ``inner_config``, as stored in the config).
        sigma_lo: lower end (excluded), >= 0.
        sigma_hi: upper end (included), > sigma_lo; may be ``inf``.
    """

    def __init__(
        self,
        inner: Guider | None = None,
        sigma_lo: float = 0.28,
        sigma_hi: float = 5.42,
        inner_class: str | None = None,
        inner_config: dict | None = None,
    ):
        sigma_lo = validate.number("sigma_lo", sigma_lo, 0.0)
        sigma_hi = validate.number("sigma_hi", sigma_hi, 0.0, allow_inf=True)
        if not sigma_lo < sigma_hi:
            raise ValueError(
                f"need a finite sigma_lo < sigma_hi; got sigma_lo={sigma_lo!r}, sigma_hi={sigma_hi!r}"
            )
        self.sigma_lo, self.sigma_hi = float(sigma_lo), float(sigma_hi)
        self._init_inner(inner, inner_class, inner_config, sigma_lo=self.sigma_lo, sigma_hi=self.sigma_hi)

    def _gate(self, info: StepInfo) -> torch.Tensor:
        sigma = torch.as_tensor(info.sigma).reshape(-1).expand(self._batch_size())
        return (sigma > self.sigma_lo) & (sigma <= self.sigma_hi)

    def _guide(self, cond: Prediction, uncond: Prediction | None, info: StepInfo) -> torch.Tensor:
        return self._gated_call(cond, uncond, info, self._gate(info))
