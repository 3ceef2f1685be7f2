"""One-step SDXL student (f-distill of an SDXL teacher): one UNet evaluation per image, then the SDXL VAE decode.

Subclasses :class:`pipelines.GuidedStableDiffusionXLPipeline` (so prompt encoding with both text encoders, the
micro-conditioning ``time_ids``, the VAE decode and loading are the family pipeline's) with the settings of
:class:`pipelines.one_step.OneStepMixin`. The initial latents are unit noise (the student's input at
``generator_timestep``), not noise scaled by the Euler scheduler's ``init_noise_sigma``.
"""

from __future__ import annotations

import torch

from gen.sampling import UNetTextAdapter
from gen.sampling.pipeline import check_generator, check_output_type, initial_noise

from .guided_sdxl import OUTPUT_TYPES, GuidedStableDiffusionXLPipeline
from .one_step import OneStepMixin, OneStepPipelineOutput


class OneStepSDXLPipeline(OneStepMixin, GuidedStableDiffusionXLPipeline):
    """Sample an SDXL one-step student.

    Example:
        >>> pipe = OneStepSDXLPipeline.from_pretrained("runs/sdxl-fdistill-js")
        >>> image = pipe("a photo of a cat").images[0]

    Args:
        vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
        feature_extractor, force_zeros_for_empty_prompt, add_watermarker: as ``StableDiffusionXLPipeline``
            (``unet``: the student; ``scheduler``: the teacher's, for its prediction space).
        generator_timestep, generator_prediction: see :class:`pipelines.OneStepPipeline`.
    """

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder=None,
                 feature_extractor=None, force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None,
                 generator_timestep: int = 999, generator_prediction: str = "scheduler"):
        super().__init__(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
                         feature_extractor=feature_extractor,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self._register_one_step(generator_timestep, generator_prediction)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        class_labels=None,
    ):
        """Generate images from text with one UNet evaluation each.

        Args:
            prompt ... clip_skip: as in ``StableDiffusionXLPipeline`` (sizes in pixels; ``output_type`` in pil / np /
                pt / latent).
            num_inference_steps, guidance_scale: must be 1 (accepted so that code written for multi-step pipelines
                runs; guidance, if any, was distilled with ``teacher_guidance_scale``).
            class_labels: not accepted (a ``ValueError``): SDXL is text-conditional.
        Returns:
            ``OneStepPipelineOutput(images, nfe=1)`` or a tuple ``(images, 1)``.
        """
        self._check_one_step(num_inference_steps, guidance_scale)
        UNetTextAdapter(self.unet).check_condition(prompt=prompt, class_labels=class_labels)
        check_output_type(output_type, OUTPUT_TYPES)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, prompt_2, height, width, None, None, None, prompt_embeds, None,
                          pooled_prompt_embeds, None)
        batch = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        n = batch * num_images_per_prompt
        check_generator(generator, n)
        device = self._execution_device
        # 1. the conditional branch only
        emb, _, pooled, _ = self.encode_prompt(prompt=prompt, prompt_2=prompt_2, device=device,
                                               num_images_per_prompt=num_images_per_prompt,
                                               do_classifier_free_guidance=False, prompt_embeds=prompt_embeds,
                                               pooled_prompt_embeds=pooled_prompt_embeds, clip_skip=clip_skip)
        proj = int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
        time_ids = self._get_add_time_ids(original_size or (height, width), crops_coords_top_left,
                                          target_size or (height, width), dtype=emb.dtype,
                                          text_encoder_projection_dim=proj)
        cond = {"encoder_hidden_states": emb, "text_embeds": pooled.to(device),
                "time_ids": time_ids.to(device).repeat(n, 1)}
        # 2. one evaluation at unit noise
        shape = (n, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        z = initial_noise(shape, generator, latents, device, emb.dtype)
        x0 = self._generate(self.unet, z, cond)
        # 3. decode as the family pipeline does
        images = x0 if output_type == "latent" else self._decode(x0, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, 1
        return OneStepPipelineOutput(images=images, nfe=1)
