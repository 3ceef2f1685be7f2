"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) on denoised estimates."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from .base import Guider, Prediction, StepInfo, check_scale


class CFG(Guider):
    """Classifier-free guidance on x0.

        D_w = Dc + (w - 1) (Dc - Du)          (= Du + w (Dc - Du))

    ``w = 1`` is the conditional model alone: the unconditional pass is skipped (mask all False); ``w = 0`` is the
    unconditional model alone: the conditional pass is skipped. CFG is affine in the two branches, so the sampling core
    mixes the raw network outputs (``uncond + w (cond - uncond)``, Diffusers' formula) through ``linear_weight``;
    ``__call__`` gives the same mix on x0.

    Args:
        guidance_scale: w >= 0, finite.
    """

    @register_to_config
    def __init__(self, guidance_scale: float = 5.0):
        self.guidance_scale = check_scale("guidance_scale", guidance_scale)

    def _uncond_mask(self, info: StepInfo) -> torch.Tensor:
        return torch.full((self._batch_size(),), self.guidance_scale != 1.0, dtype=torch.bool)

    def _cond_mask(self, info: StepInfo) -> torch.Tensor:
        return torch.full((self._batch_size(),), self.guidance_scale != 0.0, dtype=torch.bool)

    def linear_weight(self, info: StepInfo) -> torch.Tensor:
        self._check_step(info)
        return torch.full((self._batch_size(),), self.guidance_scale, device=self._device(info))

    def needs_predictions(self, info: StepInfo) -> bool:
        return False

    def is_static(self) -> bool:
        return True

    def _guide(self, cond: Prediction, uncond: Prediction | None, info: StepInfo) -> torch.Tensor:
        if self.guidance_scale == 1.0:
            return cond.x0
        if self.guidance_scale == 0.0:
            return uncond.x0.to(cond.x0.dtype)
        return cond.x0 + (self.guidance_scale - 1.0) * (cond.x0 - uncond.x0.to(cond.x0.dtype))

    def to_diffusers_kwargs(self) -> dict:
        """Kwargs of ``diffusers.guiders.ClassifierFreeGuidance`` giving the same update when fed x0."""
        return {"guidance_scale": self.guidance_scale - 1.0, "use_original_formulation": True}

    def to_diffusers(self):
        """A configured ``diffusers.guiders.ClassifierFreeGuidance`` (feed it x0 predictions)."""
        from diffusers.guiders import ClassifierFreeGuidance

        return ClassifierFreeGuidance(**self.to_diffusers_kwargs())
