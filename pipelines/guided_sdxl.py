"""Stable Diffusion XL (Podell et al. 2023) with any `gen` guider (CFG, APG, AdaptiveGuidance, LinearAG,
GuidanceInterval), sampling through the one core of :mod:`gen.sampling`.

Subclasses Diffusers' ``StableDiffusionXLPipeline`` and reuses its prompt encoding (two CLIP encoders, pooled
embedding of the second), ``_get_add_time_ids``, ``prepare_latents`` and ``check_inputs``; only the loop differs.
Each branch carries the UNet's three inputs:

=======================  ======================================  =============================================
input                     conditional branch                      unconditional branch
=======================  ======================================  =============================================
``encoder_hidden_states``  prompt tokens [B, L, 2048]              negative prompt, or zeros when no negative
                                                                  prompt is given and the pipeline config has
                                                                  ``force_zeros_for_empty_prompt`` (as Diffusers)
``text_embeds``            pooled prompt embedding [B, 1280]       pooled negative prompt (or zeros, idem)
``time_ids``               original size, crop corner, target      the ``negative_*`` sizes when given, else the
                          size [B, 6]                             same as the conditional branch
=======================  ======================================  =============================================

With ``guidance_scale=w`` (or ``guider=CFG(w)``) and ``w > 1`` the images equal ``StableDiffusionXLPipeline``'s
(``tests/test_families.py``). Differences: ``w < 1`` is CFG(w) here (Diffusers turns guidance off for w <= 1);
``guidance_rescale``, ``denoising_end``, IP-adapters and guidance-embedded UNets (``time_cond_proj_dim``) are not
supported; with ``num_images_per_prompt > 1`` and distinct negative time ids each unconditional row gets the
negative ids (Diffusers interleaves the two sets over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from diffusers.utils import BaseOutput

from gen.guidance import Guider
from gen.sampling import Conditioning, UNetTextAdapter, denoise, scheduler_step_kwargs
from gen.sampling.pipeline import check_steps, guarded_from_pretrained, nfe_value, resolve_guider, step_end_callback

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class GuidedSDXLPipelineOutput(BaseOutput):
    """Images (PIL list, numpy ``[N,H,W,3]`` / torch ``[N,3,H,W]`` in [0, 1], or latents) and the mean number of
    UNet evaluations per image (a CFG step counts 2; AG makes it fractional)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: float


class GuidedStableDiffusionXLPipeline(StableDiffusionXLPipeline):
    """SDXL text-to-image with a pluggable guider.

    Example:
        >>> from gen.guidance import APG
        >>> pipe = GuidedStableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
        >>> image = pipe("a photo of a cat", guider=APG(guidance_scale=15, eta=0.0, momentum=-0.5,
        ...                                            norm_threshold=15)).images[0]
    """

    _callback_tensor_inputs = ["latents"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a hub id; a missing or broken local folder raises ``ValueError``."""
        return guarded_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        guider: Guider | None = None,
        class_labels=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Generate images from text.

        Args:
            prompt ... clip_skip: as in ``StableDiffusionXLPipeline`` (``height``/``width`` default to the UNet's
                sample size times the VAE factor, sizes in pixels, ``output_type`` in pil / np / pt / latent).
            guidance_scale: CFG weight ``w`` when no guider is given (default 5.0): ``uncond + w (cond - uncond)``.
            guider: a ``gen.guidance.Guider``; reset at the start of every call.
            class_labels: not accepted (a ``ValueError``): SDXL is text-conditional.
            callback_on_step_end: ``f(pipe, step, timestep, {"latents": x}) -> dict`` after each step.
        Returns:
            ``GuidedSDXLPipelineOutput(images, nfe)`` or a tuple ``(images, nfe)``.
        """
        # 0. arguments
        adapter = UNetTextAdapter(self.unet)
        adapter.check_condition(prompt=prompt, class_labels=class_labels)
        guider = resolve_guider(guidance_scale, guider, default_scale=5.0)
        if timesteps is None and sigmas is None:
            check_steps(num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        if self.unet.config.time_cond_proj_dim is not None:
            raise ValueError("this UNet embeds the guidance scale (time_cond_proj_dim is set, a guidance-distilled "
                             "model); guiders need a UNet with a real unconditional branch")
        on_step_end = step_end_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        self.check_inputs(prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        n = batch_size * num_images_per_prompt
        device = self._execution_device

        # 1. both branches' text embeddings (always: a guider may need the unconditional one at any step)
        cond_emb, uncond_emb, cond_pooled, uncond_pooled = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=True, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=clip_skip)

        # 2. micro-conditioning time ids [n, 6] per branch
        proj_dim = (int(cond_pooled.shape[-1]) if self.text_encoder_2 is None
                    else self.text_encoder_2.config.projection_dim)
        time_ids = self._get_add_time_ids(original_size, crops_coords_top_left, target_size, dtype=cond_emb.dtype,
                                          text_encoder_projection_dim=proj_dim)
        if negative_original_size is not None and negative_target_size is not None:
            uncond_time_ids = self._get_add_time_ids(negative_original_size, negative_crops_coords_top_left,
                                                     negative_target_size, dtype=cond_emb.dtype,
                                                     text_encoder_projection_dim=proj_dim)
        else:
            uncond_time_ids = time_ids
        conditioning = Conditioning(
            cond={"encoder_hidden_states": cond_emb, "text_embeds": cond_pooled.to(device),
                  "time_ids": time_ids.to(device).repeat(n, 1)},
            uncond={"encoder_hidden_states": uncond_emb, "text_embeds": uncond_pooled.to(device),
                    "time_ids": uncond_time_ids.to(device).repeat(n, 1)})

        # 3. timesteps (custom timesteps / sigmas as Diffusers) and initial latents
        timesteps, steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(n, self.unet.config.in_channels, height, width, cond_emb.dtype, device,
                                       generator, latents)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)

        # 4. the sampling core: guided prediction -> scheduler step
        result = denoise(adapter, self.scheduler, latents, steps, conditioning, guider,
                         step_kwargs=scheduler_step_kwargs(self.scheduler, eta, generator),
                         progress=self.progress_bar, on_step_end=on_step_end)

        # 5. decode
        images = result.sample if output_type == "latent" else self._decode(result.sample, output_type)
        self.maybe_free_model_hooks()
        nfe = nfe_value(result.nfe)
        if not return_dict:
            return images, nfe
        return GuidedSDXLPipelineOutput(images=images, nfe=nfe)

    def _decode(self, latents: torch.Tensor, output_type: str):
        """Latents -> images as Diffusers' SDXL does: a float16 VAE with ``force_upcast`` decodes in float32; latents
        are un-normalised with ``latents_mean``/``latents_std`` when the VAE config has them, else divided by
        ``scaling_factor``; the watermark, when the pipeline has one, is applied before post-processing."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        z = latents.to(vae.dtype) if upcast else latents
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(z.device, z.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(z.device, z.dtype)
            z = z * std / vae.config.scaling_factor + mean
        else:
            z = z / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)
