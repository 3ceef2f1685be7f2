"""Class-conditional image generation with classifier-free guidance (Ho & Salimans 2022) or any `gen` guider.

Works with a class-conditional ``UNet2DModel`` (``num_class_embeds = num_classes + 1``; the last index is the
"null" class the network was trained on with label dropout) and any Diffusers scheduler.

- ``guidance_scale=w`` (no guider): CFG in the network's own prediction space, ``uncond + w * (cond - uncond)``
  (eq. 6 of the paper, with ``w = 1 + omega``); ``w = 1`` skips the unconditional pass, ``w = 0`` is unconditional.
- ``guider=``: a ``gen.guidance`` guider (CFG, APG, AdaptiveGuidance, LinearAG, GuidanceInterval). Each step the
  predictions are converted to x0/eps with ``gen.diffusion`` for the scheduler at hand, the guider combines them in
  the space its paper uses and may skip unconditional passes; the result goes back to the network's space.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput

from gen.diffusion import make_scheduler

from ._common import check_sampling_args, images_to_output, initial_noise, nfe_value
from ._loading import guarded_from_pretrained


@dataclass
class ClassConditionalPipelineOutput(BaseOutput):
    """Images (PIL list, numpy ``[N,H,W,C]`` in [0,1], or torch ``[N,C,H,W]`` in [0,1]) and the number of network
    evaluations per image (a guided step counts 2)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: float


class ClassConditionalPipeline(DiffusionPipeline):
    """Sample a class-conditional UNet with classifier-free guidance.

    Example:
        >>> pipe = ClassConditionalPipeline.from_pretrained("checkpoints/digits-teacher")
        >>> out = pipe(class_labels=[3] * 8, num_inference_steps=25, guidance_scale=2.0, output_type="np")
        >>> out.images.shape
        (8, 16, 16, 1)
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    # --- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a hub id; a missing or broken local folder raises ``ValueError``."""
        return guarded_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, **kwargs)

    def use_scheduler(self, name: str, **overrides) -> ClassConditionalPipeline:
        """Swap in the scheduler registered as ``name`` (see ``gen.diffusion.SCHEDULERS``), keeping the noise
        schedule of the current one. Returns ``self``."""
        self.scheduler = make_scheduler(name, self.scheduler.config, **overrides)
        return self

    # --- properties ---------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int | None:
        """Number of real classes (the null class excluded), or None for an unconditional UNet."""
        n = self.unet.config.num_class_embeds
        return None if n is None else n - 1

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    # --- argument checks ----------------------------------------------------------------------------------------
    def _class_tensor(self, class_labels, batch_size):
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError("class_labels given, but this UNet is unconditional (num_class_embeds is None)")
            if batch_size is None or int(batch_size) < 1:
                raise ValueError(f"batch_size must be a positive integer for an unconditional UNet; got {batch_size}")
            return None, int(batch_size)
        if class_labels is None:
            if batch_size is None or int(batch_size) < 1:
                raise ValueError("give class_labels, or batch_size for unconditional (null-class) samples")
            labels = torch.full((int(batch_size),), self.null_class, dtype=torch.long)
            return labels, int(batch_size)
        if isinstance(class_labels, (int, np.integer)):
            class_labels = [int(class_labels)]
        labels = torch.as_tensor(class_labels)
        if labels.ndim != 1 or labels.numel() == 0:
            raise ValueError(f"class_labels must be a non-empty 1-D list of ints; got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers; got dtype {labels.dtype}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(
                f"class_labels out of range: {bad.tolist()[:8]}; allowed 0..{self.num_classes - 1}"
                f" (the null class {self.null_class} is chosen with guidance_scale=0)"
            )
        if batch_size is not None and int(batch_size) != labels.numel():
            raise ValueError(f"batch_size={batch_size} does not match len(class_labels)={labels.numel()}")
        return labels.long(), labels.numel()

    @staticmethod
    def _check_args(num_inference_steps, guidance_scale, output_type, generator, batch, guider=None):
        check_sampling_args(num_inference_steps, guidance_scale, output_type, generator, batch, guider)

    # --- sampling -----------------------------------------------------------------------------------------------
    def _predict(self, x_in, t, labels, guidance_scale):
        """Network prediction with classifier-free guidance; returns (prediction, network evaluations per image)."""
        if labels is None or guidance_scale == 1.0:
            return self.unet(x_in, t, class_labels=labels).sample, 1
        null = torch.full_like(labels, self.null_class)
        if guidance_scale == 0.0:
            return self.unet(x_in, t, class_labels=null).sample, 1
        both = self.unet(torch.cat([x_in, x_in]), t, class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond), 2

    def _guided(self, x_in, t, labels, guider, loop_index, num_steps):
        from gen.guidance.sampling import scheduler_guided_prediction

        null = torch.full_like(labels, self.null_class)

        def net(x, tt, class_labels):
            return self.unet(x, tt, class_labels=class_labels).sample

        return scheduler_guided_prediction(net, self.scheduler, loop_index, t, x_in, {"class_labels": labels},
                                           {"class_labels": null}, guider, num_steps)

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        batch_size: int | None = None,
        guider=None,
        return_dict: bool = True,
    ):
        """Generate images.

        Args:
            class_labels: int or 1-D list/tensor of class indices in ``[0, num_classes)``; None with ``batch_size``
                gives null-class (unconditional) samples.
            num_inference_steps: number of scheduler steps.
            guidance_scale: CFG weight ``w`` (``uncond + w (cond - uncond)``); 1 disables guidance.
            generator: torch generator(s) for the initial noise and stochastic schedulers.
            output_type: ``"pil"``, ``"np"`` (``[N,H,W,C]`` float in [0,1]) or ``"pt"`` (``[N,C,H,W]`` in [0,1]).
            eta: DDIM stochasticity (ignored by schedulers without it).
            latents: optional initial noise ``[N,C,H,W]``.
            guider: a ``gen.guidance.Guider`` instead of ``guidance_scale`` (reset at the start of every call).
        Returns:
            ``ClassConditionalPipelineOutput(images, nfe)`` or a tuple ``(images, nfe)``; ``nfe`` is the mean number
            of network evaluations per image (AG makes it fractional).
        """
        labels, batch = self._class_tensor(class_labels, batch_size)
        self._check_args(num_inference_steps, guidance_scale, output_type, generator, batch, guider)
        if guider is not None and labels is None:
            raise ValueError("a guider needs class labels (the unconditional branch is the null class)")
        device, dtype = self._execution_device, self.unet.dtype
        latents = initial_noise(self.unet, batch, latents, generator, device, dtype)
        if labels is not None:
            labels = labels.to(device)

        # 1. timesteps and initial noise scale
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # flow-matching schedulers start from unit noise and take the sample unscaled
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        scale_input = getattr(self.scheduler, "scale_model_input", lambda x, t: x)
        step_kwargs = {}
        params = inspect.signature(self.scheduler.step).parameters
        if "eta" in params:
            step_kwargs["eta"] = eta
        if "generator" in params:
            step_kwargs["generator"] = generator
        nfe = 0
        if guider is not None:
            guider.begin(batch, num_inference_steps)
        # 2. denoising loop: prediction (with guidance) -> scheduler step
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            x_in = scale_input(latents, t)
            if guider is None:
                pred, evals = self._predict(x_in, t, labels, guidance_scale)
            else:
                pred, evals = self._guided(x_in, t, labels, guider, i, num_inference_steps)
            nfe += evals
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample

        # 3. to [0, 1] and the requested type
        out = images_to_output(self, (latents / 2 + 0.5).clamp(0, 1), output_type)
        self.maybe_free_model_hooks()
        nfe = nfe_value(nfe)
        if not return_dict:
            return out, nfe
        return ClassConditionalPipelineOutput(images=out, nfe=nfe)
