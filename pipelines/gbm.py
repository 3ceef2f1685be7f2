"""Multiplicative ("Dale meets Langevin") diffusion sampling: a class-conditional UNet + :class:`gen.gbm.GBMScheduler`.

The loop starts from the scheduler's fitted log-normal prior, asks the UNet for its prediction on the log-space
network input (``scheduler.scale_model_input``), optionally guides it, and lets the scheduler take a DLS, UMS or
deterministic log-space step. The result is mapped back through the positivity offset to images in [0, 1].

Guidance acts in log space, where GBM noising is additive: ``y - m(t) = log x0 + sqrt(v(t)) z`` is a
variance-exploding diffusion with alpha = 1 and sigma = sqrt(v). ``guidance_scale=w`` is CFG on z
(``uncond + w (cond - uncond)``, identical to CFG on log x0); ``guider=`` runs any ``gen.guidance`` guider with
``x0 = log x0_hat`` and ``eps = z``, through the same shared step as the other pipelines.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from gen.gbm import GBM_SAMPLERS, GBMScheduler

from ._common import images_to_output, nfe_value
from .class_conditional import ClassConditionalPipeline, ClassConditionalPipelineOutput


class GBMPipeline(ClassConditionalPipeline):
    """Sample a GBM-trained UNet (class labels optional) with the DLS, UMS or deterministic sampler.

    Example:
        >>> pipe = GBMPipeline.from_pretrained("checkpoints/digits-gbm")
        >>> out = pipe(class_labels=[7] * 8, num_inference_steps=100, sampler="ddim", output_type="np")
        >>> out.images.shape, out.nfe
        ((8, 16, 16, 1), 100)
    """

    def __init__(self, unet: UNet2DModel, scheduler: GBMScheduler):
        if not isinstance(scheduler, GBMScheduler):
            raise ValueError(f"GBMPipeline needs a gen.gbm.GBMScheduler; got {type(scheduler).__name__}")
        super().__init__(unet=unet, scheduler=scheduler)

    def use_scheduler(self, name: str, **overrides):
        raise ValueError("GBMPipeline samples with its GBMScheduler; choose the update with sampler='dls'|'ums'|'ddim'")

    def _z(self, x, t, labels):
        """Network output at positive x, converted to the log-space noise z."""
        s = self.scheduler
        k = torch.full((x.shape[0],), int(t), dtype=torch.long)
        raw = self.unet(s.scale_model_input(x, k).to(self.unet.dtype), t, class_labels=labels).sample
        return s.convert(raw.float(), s.config.prediction_type, "log_eps", x.float(), k)

    def _guided_z(self, x, t, labels, guidance_scale, guider, step_index, num_steps):
        """z for one step with CFG (``guidance_scale``) or a ``gen.guidance`` guider; returns (z, NFE per image)."""
        if guider is None:
            if labels is None or guidance_scale == 1.0:
                return self._z(x, t, labels), 1
            null = torch.full_like(labels, self.null_class)
            if guidance_scale == 0.0:
                return self._z(x, t, null), 1
            both = self._z(torch.cat([x, x]), t, torch.cat([labels, null]))
            cond, uncond = both.chunk(2)
            return uncond + guidance_scale * (cond - uncond), 2
        from gen.guidance.sampling import guided_prediction

        s = self.scheduler
        m, sd = s._levels(torch.tensor([int(t)]), x)
        y_tilde = torch.log(x.float()) - m.float()

        def net(y, tt, class_labels):
            return self._z(torch.exp(y + m.float()), tt, class_labels)

        null = torch.full_like(labels, self.null_class)
        return guided_prediction(net, y_tilde, t, {"class_labels": labels}, {"class_labels": null}, guider,
                                 step_index, num_steps, torch.ones_like(sd.float()), sd.float(), "epsilon")

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
    ):
        """Generate images.

        Args:
            class_labels: class indices (None with ``batch_size``: unconditional, the null class).
            num_inference_steps: levels of the sampling grid, at most ``scheduler.config.num_train_timesteps``.
            sampler: ``"dls"`` (sign-preserving Dale-Langevin), ``"ums"`` (unified multiplicative) or ``"ddim"``
                (deterministic log-space); default ``scheduler.config.sampler``.
            guidance_scale / guider: classifier-free guidance in log space (see the module docstring).
            latents: optional positive initial sample ``[N, C, H, W]`` (default: the scheduler's log-normal prior).
        Returns:
            ``ClassConditionalPipelineOutput(images, nfe)``.
        """
        if sampler is not None and sampler not in GBM_SAMPLERS:
            raise ValueError(f"sampler must be one of {GBM_SAMPLERS}; got {sampler!r}")
        labels, batch = self._class_tensor(class_labels, batch_size)
        self._check_args(num_inference_steps, guidance_scale, output_type, generator, batch, guider)
        if isinstance(generator, list):
            raise ValueError("GBMPipeline takes one torch.Generator (not a list)")
        if guider is not None and labels is None:
            raise ValueError("a guider needs class labels (the unconditional branch is the null class)")
        device = self._execution_device
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
        shape = (batch, cfg.in_channels, *size)
        s = self.scheduler
        if latents is None:
            x = s.sample_prior(shape, generator=generator, device=device)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents shape {tuple(latents.shape)} != expected {shape}")
            s.check_positive("latents", latents)
            x = latents.to(device=device, dtype=torch.float32)
        if labels is not None:
            labels = labels.to(device)

        # 1. sampling grid (ValueError beyond the training grid)
        s.set_timesteps(num_inference_steps, device=device)
        if guider is not None:
            guider.begin(batch, num_inference_steps)
        nfe = 0
        # 2. loop: z prediction (guided) -> back to the scheduler's prediction type -> DLS / UMS / ddim step
        for i, t in enumerate(self.progress_bar(s.timesteps)):
            z, evals = self._guided_z(x, t, labels, guidance_scale, guider, i, num_inference_steps)
            nfe += evals
            k = torch.full((batch,), int(t), dtype=torch.long)
            pred = s.convert(z, "log_eps", s.config.prediction_type, x, k)
            x = s.step(pred, t, x, generator=generator, sampler=sampler).prev_sample

        # 3. undo the positivity offset; [-1, 1] -> [0, 1]
        out = images_to_output(self, ((x - s.config.data_offset) / 2 + 0.5).clamp(0, 1), output_type)
        self.maybe_free_model_hooks()
        nfe = nfe_value(nfe)
        if not return_dict:
            return out, nfe
        return ClassConditionalPipelineOutput(images=out, nfe=nfe)
