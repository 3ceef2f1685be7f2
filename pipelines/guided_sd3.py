"""SD3-style rectified-flow transformers (Esser et al. 2024, MMDiT) with any `gen` guider, sampling through the one
core of :mod:`gen.sampling`.

Subclasses Diffusers' ``StableDiffusion3Pipeline`` and reuses its prompt encoding (two CLIP encoders and an optional
T5; without T5, ``text_encoder_3=None``, Diffusers feeds zero T5 tokens), ``check_inputs``, ``prepare_latents`` and
its timestep retrieval, including the scheduler's static ``shift`` and the resolution-dependent dynamic shift ``mu``
(``calculate_shift`` of the image sequence length) when ``use_dynamic_shifting`` is set. Each branch carries
``encoder_hidden_states`` (CLIP tokens padded to the T5 width, then T5 tokens) and ``pooled_projections``
(the two pooled CLIP embeddings); the unconditional branch is the negative prompt, "" by default.

The transformer predicts the velocity ``v = eps - x0`` at ``x_t = (1 - sigma) x0 + sigma eps``; guiders that work on
x0 (APG, Algorithm 1 of Sadat et al. 2024) see ``x0 = x_t - sigma v`` (:mod:`gen.diffusion.space`).

With ``guidance_scale=w`` (or ``guider=CFG(w)``) and ``w > 1`` the images equal ``StableDiffusion3Pipeline``'s
(``tests/test_families.py``). Differences: ``w < 1`` is CFG(w) here (Diffusers turns guidance off for w <= 1);
skip-layer guidance and IP-adapters are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps
from diffusers.utils import BaseOutput

from gen.guidance import Guider
from gen.sampling import Conditioning, SD3Adapter, denoise, scheduler_step_kwargs
from gen.sampling.pipeline import check_steps, guarded_from_pretrained, nfe_value, resolve_guider, step_end_callback

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class GuidedSD3PipelineOutput(BaseOutput):
    """Images (PIL list, numpy ``[N,H,W,3]`` / torch ``[N,3,H,W]`` in [0, 1], or latents) and the mean number of
    transformer evaluations per image (a CFG step counts 2; AG makes it fractional)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: float


class GuidedStableDiffusion3Pipeline(StableDiffusion3Pipeline):
    """SD3-style text-to-image with a pluggable guider.

    Example:
        >>> from gen.guidance import APG
        >>> pipe = GuidedStableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
        >>> image = pipe("a photo of a cat", guider=APG(guidance_scale=7, eta=0.0, momentum=-0.5)).images[0]
    """

    _callback_tensor_inputs = ["latents"]
    # T5 may be left out (``text_encoder_3=None``); listed here so that such a pipeline also loads back from its folder
    _optional_components = ["image_encoder", "feature_extractor", "text_encoder_3", "tokenizer_3"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a hub id; a missing or broken local folder raises ``ValueError``."""
        return guarded_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        mu: float | None = None,
        guider: Guider | None = None,
        class_labels=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Generate images from text.

        Args:
            prompt ... max_sequence_length: as in ``StableDiffusion3Pipeline`` (``output_type`` in pil / np / pt /
                latent; ``max_sequence_length`` is the number of T5 tokens, zeros without T5).
            mu: the dynamic-shift parameter; None computes it from the image size when the scheduler has
                ``use_dynamic_shifting`` (as Diffusers).
            guidance_scale: CFG weight ``w`` when no guider is given (default 7.0): ``uncond + w (cond - uncond)``.
            guider: a ``gen.guidance.Guider``; reset at the start of every call.
            class_labels: not accepted (a ``ValueError``): SD3 is text-conditional.
            callback_on_step_end: ``f(pipe, step, timestep, {"latents": x}) -> dict`` after each step.
        Returns:
            ``GuidedSD3PipelineOutput(images, nfe)`` or a tuple ``(images, nfe)``.
        """
        # 0. arguments
        adapter = SD3Adapter(self.transformer)
        adapter.check_condition(prompt=prompt, class_labels=class_labels)
        guider = resolve_guider(guidance_scale, guider, default_scale=7.0)
        if sigmas is None:
            check_steps(num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        on_step_end = step_end_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          max_sequence_length=max_sequence_length)
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 1. both branches' text embeddings (always: a guider may need the unconditional one at any step)
        cond_emb, uncond_emb, cond_pooled, uncond_pooled = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=True, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device, clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length)
        conditioning = Conditioning(cond={"encoder_hidden_states": cond_emb, "pooled_projections": cond_pooled},
                                    uncond={"encoder_hidden_states": uncond_emb,
                                            "pooled_projections": uncond_pooled})

        # 2. initial latents (unit noise: the flow starts at sigma = 1)
        latents = self.prepare_latents(batch_size * num_images_per_prompt, self.transformer.config.in_channels,
                                       height, width, cond_emb.dtype, device, generator, latents)

        # 3. timesteps: static shift in the scheduler config; dynamic shift mu from the latent sequence length
        kwargs = {}
        if mu is None and self.scheduler.config.get("use_dynamic_shifting", False):
            p = self.transformer.config.patch_size
            seq_len = (latents.shape[-2] // p) * (latents.shape[-1] // p)
            cfg = self.scheduler.config
            mu = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                 cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        if mu is not None:
            kwargs["mu"] = mu
        _, steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, **kwargs)

        # 4. the sampling core: guided velocity -> Euler step
        result = denoise(adapter, self.scheduler, latents, steps, conditioning, guider,
                         step_kwargs=scheduler_step_kwargs(self.scheduler, None, generator),
                         progress=self.progress_bar, on_step_end=on_step_end)

        # 5. decode: z / scaling_factor + shift_factor (0 when the VAE has none)
        if output_type == "latent":
            images = result.sample
        else:
            z = result.sample / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
            images = self.image_processor.postprocess(self.vae.decode(z, return_dict=False)[0],
                                                      output_type=output_type)
        self.maybe_free_model_hooks()
        nfe = nfe_value(result.nfe)
        if not return_dict:
            return images, nfe
        return GuidedSD3PipelineOutput(images=images, nfe=nfe)
