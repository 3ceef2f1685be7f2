"""Stable Diffusion 1.x/2.x with any `gen` guider (CFG, APG, AdaptiveGuidance, LinearAG, GuidanceInterval).

Loads what ``StableDiffusionPipeline`` loads (a folder or a hub id) and keeps its usual ``__call__`` arguments;
``guider=`` replaces the built-in CFG. eps-, v- and flow-prediction UNets work: predictions are converted to x0/eps
with ``gen.diffusion`` for the scheduler at hand before the guider sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput

from gen.guidance import CFG, Guider
from gen.guidance.sampling import scheduler_guided_prediction

from ._loading import guarded_from_pretrained


@dataclass
class GuidedStableDiffusionPipelineOutput(BaseOutput):
    """Images and the mean number of UNet evaluations per image (a CFG step counts 2; AG makes it fractional)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: float


class GuidedStableDiffusionPipeline(StableDiffusionPipeline):
    """Text-to-image with a pluggable guider.

    Example:
        >>> from gen.guidance import APG
        >>> pipe = GuidedStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
        >>> out = pipe("a photo of a cat", guider=APG(guidance_scale=15, eta=0.0, momentum=-0.5, norm_threshold=15))
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a hub id; a missing or broken local folder raises ``ValueError``."""
        return guarded_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guider: Guider | None = None,
    ):
        """Generate images from text.

        Args:
            prompt, height, width, num_inference_steps, negative_prompt, num_images_per_prompt, eta, generator,
            latents, prompt_embeds, negative_prompt_embeds, output_type: as in ``StableDiffusionPipeline``.
            guidance_scale: CFG weight when no guider is given (default 7.5).
            guider: a ``gen.guidance.Guider``; reset at the start of every call.
        Returns:
            ``GuidedStableDiffusionPipelineOutput(images, nfe)`` or a tuple ``(images, nfe)``.
        """
        # 0. arguments
        if guider is not None and guidance_scale is not None:
            raise ValueError("give guidance_scale or guider, not both (the guider carries its own scale)")
        if guider is None:
            scale = 7.5 if guidance_scale is None else guidance_scale
            if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
                raise ValueError(f"guidance_scale must be a finite number >= 0; got {guidance_scale!r}")
            guider = CFG(guidance_scale=float(scale))
        elif not isinstance(guider, Guider):
            raise ValueError(f"guider must be a gen.guidance.Guider; got {type(guider).__name__}")
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type={output_type!r}; allowed: pil, np, pt, latent")
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 1. text embeddings (the unconditional branch is the negative / empty prompt)
        cond_emb, uncond_emb = self.encode_prompt(prompt, device, num_images_per_prompt, True, negative_prompt,
                                                  prompt_embeds=prompt_embeds,
                                                  negative_prompt_embeds=negative_prompt_embeds)
        n = batch_size * num_images_per_prompt

        # 2. timesteps and initial latents
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(n, self.unet.config.in_channels, height, width, cond_emb.dtype, device,
                                       generator, latents)
        step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        guider.begin(n, num_inference_steps)

        def net(x, t, encoder_hidden_states):
            return self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample

        # 3. denoising loop: guided prediction -> scheduler step
        nfe = 0.0
        for i, t in enumerate(self.progress_bar(timesteps)):
            x_in = self.scheduler.scale_model_input(latents, t)
            pred, evals = scheduler_guided_prediction(net, self.scheduler, i, t, x_in,
                                                      {"encoder_hidden_states": cond_emb},
                                                      {"encoder_hidden_states": uncond_emb}, guider,
                                                      num_inference_steps)
            nfe += evals
            latents = self.scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]

        # 4. decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type,
                                                      do_denormalize=[True] * decoded.shape[0])
        self.maybe_free_model_hooks()
        nfe = int(nfe) if float(nfe).is_integer() else round(nfe, 4)
        if not return_dict:
            return images, nfe
        return GuidedStableDiffusionPipelineOutput(images=images, nfe=nfe)
