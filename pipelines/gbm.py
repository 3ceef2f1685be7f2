"""Multiplicative ("Dale meets Langevin") diffusion sampling: a class-conditional UNet + :class:`gen.gbm.GBMScheduler`.

The sampling core starts from the scheduler's fitted log-normal prior, asks the UNet for its prediction on the
log-space network input (``scheduler.scale_model_input``), optionally guides it, and lets the scheduler take a DLS,
UMS or deterministic log-space step. The result is mapped back through the positivity offset to images in [0, 1].

Guidance acts in log space, where GBM noising is additive (:class:`gen.gbm.scheduler.GBMSpace`):
``y - m(t) = log x0 + sqrt(v(t)) z`` is a variance-exploding diffusion with alpha = 1 and sigma = sqrt(v).
``guidance_scale=w`` is CFG on z (``uncond + w (cond - uncond)``, identical to CFG on log x0); ``guider=`` runs any
``gen.guidance`` guider with ``x0 = log x0_hat`` and ``eps = z``.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from gen import validate
from gen.gbm import GBM_SAMPLERS, GBMScheduler
from gen.sampling import denoise
from gen.sampling.pipeline import (
    ArgumentTypeError,
    check_generator,
    check_latents,
    check_output_type,
    check_steps,
    images_to_output,
    nfe_value,
    resolve_guider,
    sample_shape,
    step_end_callback,
)

from .class_conditional import ClassConditionalPipeline, ClassConditionalPipelineOutput


class GBMPipeline(ClassConditionalPipeline):
    """Sample a GBM-trained UNet (class labels optional) with the DLS, UMS or deterministic sampler.

    Example:
        >>> pipe = GBMPipeline.from_pretrained("checkpoints/digits-gbm")
        >>> out = pipe(class_labels=[7] * 8, num_inference_steps=100, sampler="ddim", output_type="np")
        >>> out.images.shape, out.nfe
        ((8, 16, 16, 1), 100)
    """

    _folder_classes = ("GBMPipeline",)

    def __init__(self, unet: UNet2DModel, scheduler: GBMScheduler, class_names: list[str] | None = None):
        super().__init__(unet=unet, scheduler=scheduler, class_names=class_names)

    def _check_scheduler(self, scheduler) -> None:
        if not isinstance(scheduler, GBMScheduler):
            raise ArgumentTypeError(f"GBMPipeline needs a gen.gbm.GBMScheduler; got {type(scheduler).__name__}")

    def use_scheduler(self, name: str, **overrides):
        raise ValueError("GBMPipeline samples with its GBMScheduler; choose the update with sampler='dls'|'ums'|'ddim'")

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        num_inference_steps: int = 100,
        sampler: str | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        batch_size: int | None = None,
        guider=None,
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt=None,
    ):
        """Generate images.

        Args:
            class_labels: class indices or names (None with ``batch_size``: unconditional, the null class).
            num_inference_steps: levels of the sampling grid, at most ``scheduler.config.num_train_timesteps``.
            sampler: ``"dls"`` (sign-preserving Dale-Langevin), ``"ums"`` (unified multiplicative) or ``"ddim"``
                (deterministic log-space); default ``scheduler.config.sampler``.
            guidance_scale / guider: classifier-free guidance in log space (see the module docstring).
            latents: optional positive initial sample ``[N, C, H, W]`` (default: the scheduler's log-normal prior).
        Returns:
            ``ClassConditionalPipelineOutput(images, nfe)``.
        """
        validate.choice("sampler", sampler, GBM_SAMPLERS, allow_none=True)
        self.adapter.check_condition(prompt=prompt)
        labels, batch = self._class_tensor(class_labels, batch_size)
        guider = resolve_guider(guidance_scale, guider)
        steps = check_steps(num_inference_steps)  # the GBM grid names its own limit
        check_output_type(output_type)
        check_generator(generator, batch, allow_list=False)
        on_step_end = step_end_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        s = self.scheduler
        shape = sample_shape(self.unet.config, batch)
        if latents is None:
            x = s.sample_prior(shape, generator=generator, device=device)
        else:
            latents = check_latents(latents, shape)
            s.check_positive("latents", latents)
            x = latents.to(device=device, dtype=torch.float32)
        adapter = self.adapter
        conditioning = adapter.class_conditioning(None if labels is None else labels.to(device))

        # 1. sampling grid (ValueError beyond the training grid), then the core: z (guided) -> DLS / UMS / ddim step
        s.set_timesteps(steps, device=device)
        result = denoise(adapter, s, x, steps, conditioning, guider,
                         step_kwargs={"generator": generator, "sampler": sampler},
                         progress=self.progress_bar, on_step_end=on_step_end)
        # 2. undo the positivity offset; [-1, 1] -> [0, 1]
        out = images_to_output(self, ((result.sample - s.config.data_offset) / 2 + 0.5).clamp(0, 1), output_type)
        self.maybe_free_model_hooks()
        nfe = nfe_value(result.nfe)
        if not return_dict:
            return out, nfe
        return ClassConditionalPipelineOutput(images=out, nfe=nfe)
