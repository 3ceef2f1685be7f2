"""One-step SD3-style student (f-distill of a rectified-flow transformer teacher): one transformer evaluation per
image, read out as ``x0 = z - sigma v`` at the generator's noise level, then the VAE decode.

Subclasses :class:`pipelines.GuidedStableDiffusion3Pipeline` (prompt encoding with the CLIP and T5 encoders, the VAE
decode with its ``shift_factor``, loading) with the settings of :class:`pipelines.one_step.OneStepMixin`.
"""

from __future__ import annotations

import torch

from gen.sampling import SD3Adapter
from gen.sampling.pipeline import check_generator, check_output_type, initial_noise

from .guided_sd3 import OUTPUT_TYPES, GuidedStableDiffusion3Pipeline
from .one_step import OneStepMixin, OneStepPipelineOutput


class OneStepSD3Pipeline(OneStepMixin, GuidedStableDiffusion3Pipeline):
    """Sample an SD3-style one-step student.

    Example:
        >>> pipe = OneStepSD3Pipeline.from_pretrained("runs/sd3-fdistill-js")
        >>> image = pipe("a photo of a cat").images[0]

    Args:
        transformer, scheduler, vae, text_encoder ... tokenizer_3, image_encoder, feature_extractor: as
            ``StableDiffusion3Pipeline`` (``transformer``: the student; ``scheduler``: the teacher's).
        generator_timestep, generator_prediction: see :class:`pipelines.OneStepPipeline` (1000: pure noise).
    """

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None,
                 generator_timestep: int = 1000, generator_prediction: str = "scheduler"):
        super().__init__(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                         text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=image_encoder,
                         feature_extractor=feature_extractor)
        self._register_one_step(generator_timestep, generator_prediction)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
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
        clip_skip: int | None = None,
        max_sequence_length: int = 256,
        class_labels=None,
    ):
        """Generate images from text with one transformer evaluation each.

        Args:
            prompt ... max_sequence_length: as in ``StableDiffusion3Pipeline`` (``output_type`` in pil / np / pt /
                latent).
            num_inference_steps, guidance_scale: must be 1 (see :class:`pipelines.OneStepPipeline`).
            class_labels: not accepted (a ``ValueError``): SD3 is text-conditional.
        Returns:
            ``OneStepPipelineOutput(images, nfe=1)`` or a tuple ``(images, 1)``.
        """
        self._check_one_step(num_inference_steps, guidance_scale)
        SD3Adapter(self.transformer).check_condition(prompt=prompt, class_labels=class_labels)
        check_output_type(output_type, OUTPUT_TYPES)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds, max_sequence_length=max_sequence_length)
        batch = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        n = batch * num_images_per_prompt
        check_generator(generator, n)
        device = self._execution_device
        # 1. the conditional branch only
        emb, _, pooled, _ = self.encode_prompt(prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3,
                                               do_classifier_free_guidance=False, prompt_embeds=prompt_embeds,
                                               pooled_prompt_embeds=pooled_prompt_embeds, device=device,
                                               clip_skip=clip_skip, num_images_per_prompt=num_images_per_prompt,
                                               max_sequence_length=max_sequence_length)
        cond = {"encoder_hidden_states": emb, "pooled_projections": pooled}
        # 2. one evaluation at unit noise (the flow's noise end)
        shape = (n, self.transformer.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        z = initial_noise(shape, generator, latents, device, emb.dtype)
        x0 = self._generate(self.transformer, z, cond)
        # 3. decode: z / scaling_factor + shift_factor
        if output_type == "latent":
            images = x0
        else:
            x = x0 / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
            images = self.image_processor.postprocess(self.vae.decode(x.to(self.vae.dtype), return_dict=False)[0],
                                                      output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, 1
        return OneStepPipelineOutput(images=images, nfe=1)
