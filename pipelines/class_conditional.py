"""Class-conditional image generation with classifier-free guidance (Ho & Salimans 2022) or any `gen` guider.

Works with a class-conditional ``UNet2DModel`` (``num_class_embeds = num_classes + 1``; the last index is the
"null" class the network was trained on with label dropout) and any Diffusers scheduler. Sampling runs the one core
of :mod:`gen.sampling`:

- ``guidance_scale=w`` is ``gen.guidance.CFG(w)``: ``uncond + w (cond - uncond)`` (eq. 6 of the paper, with
  ``w = 1 + omega``); ``w = 1`` skips the unconditional pass, ``w = 0`` the conditional one.
- ``guider=``: any ``gen.guidance`` guider (CFG, APG, AdaptiveGuidance, LinearAG, GuidanceInterval); each step the
  predictions are converted to x0/eps with ``gen.diffusion`` for the scheduler at hand, the guider combines them in
  the space its paper uses and may skip unconditional passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput

from gen import validate
from gen.diffusion import SCHEDULERS, make_scheduler
from gen.sampling import ClassUNetAdapter, denoise, scheduler_step_kwargs
from gen.sampling.pipeline import (
    check_class_names,
    check_eta,
    check_generator,
    check_noise_scheduler,
    check_output_type,
    check_steps,
    check_unet,
    class_labels_tensor,
    guarded_from_pretrained,
    images_to_output,
    initial_noise,
    nfe_value,
    resolve_guider,
    sample_shape,
    step_end_callback,
    train_steps,
)


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

    Args:
        unet: a ``UNet2DModel`` (class-conditional with a null class, or unconditional).
        scheduler: any Diffusers scheduler.
        class_names: optional names of the classes (index order), saved in ``model_index.json``; ``class_labels``
            may then be given by name.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]
    # model_index.json class names this pipeline loads (Diffusers' unconditional DDPM/DDIM folders too)
    _folder_classes = ("ClassConditionalPipeline", "ClassConditionalLoraPipeline", "DDPMPipeline", "DDIMPipeline")

    def __init__(self, unet: UNet2DModel, scheduler, class_names: list[str] | None = None):
        super().__init__()
        self._check_unet(unet)
        self._check_scheduler(scheduler)
        self.register_modules(unet=unet, scheduler=scheduler)
        n = unet.config.num_class_embeds
        class_names = check_class_names(class_names, None if n is None else n - 1)
        self.register_to_config(class_names=class_names)

    def _check_unet(self, unet) -> None:
        check_unet(unet, type(self).__name__)

    def _check_scheduler(self, scheduler) -> None:
        """A Diffusers noise scheduler (DDPM family or flow matching) with a valid prediction type."""
        check_noise_scheduler(scheduler, type(self).__name__)

    # --- loading ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a hub id; a missing or broken local folder raises ``ValueError``."""
        return guarded_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, **kwargs)

    def use_scheduler(self, name: str, **overrides) -> ClassConditionalPipeline:
        """Swap in the scheduler registered as ``name`` (see ``gen.diffusion.SCHEDULERS``), keeping the noise
        schedule of the current one. Returns ``self``."""
        if isinstance(name, str) and name.lower() in SCHEDULERS:
            validate.scheduler_overrides(SCHEDULERS[name.lower()], overrides, name=f"use_scheduler({name!r})")
        where = f"use_scheduler({name!r}{''.join(f', {k}={v!r}' for k, v in overrides.items())})"
        try:
            scheduler = make_scheduler(name, self.scheduler.config, **overrides)
            scheduler.set_timesteps(2)  # Diffusers checks some settings only here: fail now, not mid-sampling
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        except (TypeError, IndexError, KeyError, RuntimeError, ZeroDivisionError, NotImplementedError) as err:
            raise ValueError(f"{where}: these settings do not give a working scheduler "
                             f"({type(err).__name__}: {err})") from None
        self._check_scheduler(scheduler)
        self.scheduler = scheduler
        return self

    # --- properties ---------------------------------------------------------------------------------------------
    @property
    def adapter(self) -> ClassUNetAdapter:
        return ClassUNetAdapter(self.unet)

    @property
    def num_classes(self) -> int | None:
        """Number of real classes (the null class excluded), or None for an unconditional UNet."""
        return self.adapter.num_classes

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.config.get("class_names")

    def _class_tensor(self, class_labels, batch_size):
        return class_labels_tensor(class_labels, self.num_classes, batch_size, self.null_class, self.class_names)

    # --- sampling -----------------------------------------------------------------------------------------------
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
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt=None,
    ):
        """Generate images.

        Args:
            class_labels: int, class name or 1-D list/array/tensor of them in ``[0, num_classes)``; None with
                ``batch_size`` gives null-class (unconditional) samples.
            num_inference_steps: number of scheduler steps.
            guidance_scale: CFG weight ``w`` (``uncond + w (cond - uncond)``); 1 disables guidance.
            generator: torch generator(s) for the initial noise and stochastic schedulers.
            output_type: ``"pil"``, ``"np"`` (``[N,H,W,C]`` float in [0,1]) or ``"pt"`` (``[N,C,H,W]`` in [0,1]).
            eta: DDIM stochasticity (ignored by schedulers without it).
            latents: optional initial noise ``[N,C,H,W]``.
            guider: a ``gen.guidance.Guider`` instead of ``guidance_scale`` (reset at the start of every call).
            callback_on_step_end: ``f(pipe, step, timestep, {"latents": x}) -> dict`` after each step (Diffusers'
                convention; returning ``{"latents": ...}`` replaces the sample).
        Returns:
            ``ClassConditionalPipelineOutput(images, nfe)`` or a tuple ``(images, nfe)``; ``nfe`` is the mean number
            of network evaluations per image (AG makes it fractional).
        """
        self.adapter.check_condition(prompt=prompt)
        labels, batch = self._class_tensor(class_labels, batch_size)
        guider = resolve_guider(guidance_scale, guider)
        steps = check_steps(num_inference_steps, train_steps(self.scheduler))
        check_output_type(output_type)
        check_generator(generator, batch)
        eta = check_eta(eta)
        on_step_end = step_end_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        device, dtype = self._execution_device, self.unet.dtype
        adapter = self.adapter
        conditioning = adapter.class_conditioning(None if labels is None else labels.to(device))

        # 1. timesteps and initial noise (flow-matching schedulers start from unit noise)
        self.scheduler.set_timesteps(steps, device=device)
        x = initial_noise(sample_shape(self.unet.config, batch), generator, latents, device, dtype,
                          getattr(self.scheduler, "init_noise_sigma", 1.0))
        # 2. the sampling core: guided prediction -> scheduler step
        result = denoise(adapter, self.scheduler, x, steps, conditioning, guider,
                         step_kwargs=scheduler_step_kwargs(self.scheduler, eta, generator),
                         progress=self.progress_bar, on_step_end=on_step_end)
        # 3. to [0, 1] and the requested type
        out = images_to_output(self, (result.sample / 2 + 0.5).clamp(0, 1), output_type)
        self.maybe_free_model_hooks()
        nfe = nfe_value(result.nfe)
        if not return_dict:
            return out, nfe
        return ClassConditionalPipelineOutput(images=out, nfe=nfe)
