"""Adaptive Guidance as a Diffusers guider, for Diffusers' modular pipelines (``pipe.update_components(guider=...)``).

``gen.guidance.AdaptiveGuidance`` is the per-sample, x0/eps-aware version our pipelines use. Diffusers' guiders
instead see the raw network output and decide, per step and for the whole batch, how many forward passes to run
(``num_conditions``). This subclass of ``ClassifierFreeGuidance`` adds AG's rule (Castillo et al. 2023,
arXiv 2312.12487): once the cosine similarity of the conditional and unconditional predictions exceeds
``gamma_bar`` for every sample of the batch, the rest of the run is conditional-only and ``num_conditions``
drops to 1, so the pipeline skips the unconditional forward pass. For eps-prediction models the raw output is the
eps the paper measures; for v- or flow-prediction models use our pipelines, which convert to eps first.
APG needs no subclass: ``gen.guidance.APG(...).to_diffusers()`` configures Diffusers' own guider.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance

from gen import validate


class DiffusersAdaptiveGuidance(ClassifierFreeGuidance):
    """Diffusers CFG guider that switches itself off once the batch's predictions align (AG).

    Args:
        guidance_scale, guidance_rescale, use_original_formulation, start, stop, enabled: as in
            ``diffusers.guiders.ClassifierFreeGuidance``.
        gamma_bar: cosine-similarity threshold; above 1 the guider is exactly ``ClassifierFreeGuidance``.
    """

    @register_to_config
    def __init__(self, guidance_scale: float = 7.5, gamma_bar: float = 0.99, guidance_rescale: float = 0.0,
                 use_original_formulation: bool = False, start: float = 0.0, stop: float = 1.0,
                 enabled: bool = True):
        guidance_scale = validate.number("guidance_scale", guidance_scale)
        gamma_bar = validate.number("gamma_bar (a cosine threshold, ~0.99; > 1 never switches)", gamma_bar)
        guidance_rescale = validate.number("guidance_rescale", guidance_rescale, 0.0, 1.0)
        start, stop = validate.number("start", start, 0.0, 1.0), validate.number("stop", stop, 0.0, 1.0)
        super().__init__(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                         use_original_formulation=use_original_formulation, start=start, stop=stop, enabled=enabled)
        self.gamma_bar = gamma_bar
        self.switched_at: int | None = None
        self.last_gamma: torch.Tensor | None = None

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        if step == 0:  # a new sampling run: guide again
            self.switched_at, self.last_gamma = None, None
        super().set_state(step, num_inference_steps, timestep)

    def _is_cfg_enabled(self) -> bool:
        return self.switched_at is None and super()._is_cfg_enabled()

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None):
        out = super().forward(pred_cond, pred_uncond)
        if pred_uncond is not None and self.switched_at is None:
            gamma = torch.nn.functional.cosine_similarity(pred_cond.flatten(1).double(),
                                                          pred_uncond.flatten(1).double(), dim=1)
            self.last_gamma = gamma
            if bool((gamma > self.gamma_bar).all()):
                self.switched_at = self._step  # this step was guided; later ones skip the unconditional pass
        return out
