"""Stable Diffusion 1.x/2.x with any `gen` guider (CFG, APG, AdaptiveGuidance, LinearAG, GuidanceInterval).

Loads what ``StableDiffusionPipeline`` loads (a folder or a hub id) and keeps its usual ``__call__`` arguments;
``guider=`` replaces the built-in CFG. eps-, v- and flow-prediction UNets work: predictions are converted to x0/eps
with ``gen.diffusion`` for the scheduler at hand before the guider sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput

from gen import validate
from gen.guidance import Guider
from gen.sampling import Conditioning, UNetTextAdapter, denoise, scheduler_step_kwargs
from gen.sampling.pipeline import (
    check_eta,
    check_generator,
    check_latents,
    check_output_type,
    check_steps,
    guarded_from_pretrained,
    nfe_value,
    resolve_guider,
    step_end_callback,
    train_steps,
)


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

    _callback_tensor_inputs = ["latents"]
    _folder_classes = ("StableDiffusionPipeline", "GuidedStableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                       "LatentRedDiffPipeline")

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
        class_labels=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Generate images from text.

        Args:
            prompt, height, width, num_inference_steps, negative_prompt, num_images_per_prompt, eta, generator,
            latents, prompt_embeds, negative_prompt_embeds, output_type: as in ``StableDiffusionPipeline``.
            guidance_scale: CFG weight when no guider is given (default 7.5).
            guider: a ``gen.guidance.Guider``; reset at the start of every call.
            class_labels: not accepted (a ``ValueError``): Stable Diffusion is text-conditional.
        Returns:
            ``GuidedStableDiffusionPipelineOutput(images, nfe)`` or a tuple ``(images, nfe)``.
        """
        # 0. arguments
        adapter = UNetTextAdapter(self.unet)
        adapter.check_condition(prompt=prompt, class_labels=class_labels)
        guider = resolve_guider(guidance_scale, guider, default_scale=7.5)
        steps = check_steps(num_inference_steps, train_steps(self.scheduler))
        check_output_type(output_type, ("pil", "np", "pt", "latent"))
        on_step_end = step_end_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        f = self.vae_scale_factor
        height = validate.divisible_size("height", height, f, default=self.unet.config.sample_size * f)
        width = validate.divisible_size("width", width, f, default=self.unet.config.sample_size * f)
        num_images_per_prompt = validate.integer("num_images_per_prompt", num_images_per_prompt, 1)
        eta = check_eta(eta)
        if prompt is None and prompt_embeds is None:
            raise ValueError("give prompt (a string or a list of strings) or prompt_embeds; got neither")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if prompt is not None:
            prompt = validate.prompts("prompt", prompt)
        if negative_prompt is not None:
            negative_prompt = validate.prompts("negative_prompt", negative_prompt,
                                               batch=None if prompt is None else len(prompt))
        dim = self.unet.config.cross_attention_dim
        prompt_embeds = validate.tensor("prompt_embeds", prompt_embeds, shape=(None, None, dim), allow_none=True)
        negative_prompt_embeds = validate.tensor("negative_prompt_embeds", negative_prompt_embeds,
                                                 shape=None if prompt_embeds is None else tuple(prompt_embeds.shape),
                                                 ndim=3, allow_none=True)
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        check_generator(generator, batch_size * num_images_per_prompt)
        if latents is not None:
            latents = check_latents(latents, (batch_size * num_images_per_prompt, self.unet.config.in_channels,
                                              height // f, width // f))
        device = self._execution_device

        # 1. text embeddings (the unconditional branch is the negative / empty prompt)
        cond_emb, uncond_emb = self.encode_prompt(prompt, device, num_images_per_prompt, True, negative_prompt,
                                                  prompt_embeds=prompt_embeds,
                                                  negative_prompt_embeds=negative_prompt_embeds)
        n = batch_size * num_images_per_prompt
        conditioning = Conditioning(cond={"encoder_hidden_states": cond_emb},
                                    uncond={"encoder_hidden_states": uncond_emb})

        # 2. timesteps and initial latents
        self.scheduler.set_timesteps(steps, device=device)
        latents = self.prepare_latents(n, self.unet.config.in_channels, height, width, cond_emb.dtype, device,
                                       generator, latents)

        # 3. the sampling core: guided prediction -> scheduler step
        result = denoise(adapter, self.scheduler, latents, steps, conditioning, guider,
                         step_kwargs=scheduler_step_kwargs(self.scheduler, eta, generator),
                         progress=self.progress_bar, on_step_end=on_step_end)
        latents, nfe = result.sample, result.nfe

        # 4. decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type,
                                                      do_denormalize=[True] * decoded.shape[0])
        self.maybe_free_model_hooks()
        nfe = nfe_value(nfe)
        if not return_dict:
            return images, nfe
        return GuidedStableDiffusionPipelineOutput(images=images, nfe=nfe)
