"""Sampling a stochastic-interpolant UNet (Albergo, Boffi & Vanden-Eijnden 2023; SiT) with guidance.

``InterpolantPipeline(unet, scheduler)`` with a :class:`gen.interpolants.scheduler.InterpolantScheduler`:

- **generation** (one-sided interpolant, ``unet.config.in_channels == out_channels``): start from N(0, I) at t = 0
  and integrate the probability-flow ODE or an SDE to t = 1; class labels, classifier-free guidance.
- **bridge** (two-sided, ``in_channels == 2 * out_channels``): the UNet sees ``cat([x_t, d])`` where ``d`` is the
  observation (``source_images``, e.g. a degraded digit); the sampler starts from ``x0 = d + base_noise_std * zeta``.

Guidance acts on all channels (SiT's ``forward_with_cfg`` guides only 3 of 4 latent channels, a DiT legacy) and
runs through the sampling core (:mod:`gen.sampling`) like every other pipeline:

- ``guidance_scale=w`` is ``gen.guidance.CFG(w)``: ``uncond + w (cond - uncond)`` on the network output. Every
  conversion between b, v, s, eta and x1 is affine in the prediction at a fixed ``(x_t, t)`` with the same
  coefficients for both branches, so this equals CFG on the data prediction E[x1|x] or the score.
- ``guider=``: any ``gen.guidance`` guider (CFG, APG, AG, ...). The prediction is converted to the diffusion pair
  the guiders expect, ``x0`` = E[x1 | x_t] and ``eps`` = E[noise | x_t] (``alpha_t = beta(t)``,
  ``sigma_t = alpha(t)``), by :class:`gen.interpolants.scheduler.InterpolantSpace`; the time grid is the same as
  without a guider.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput

from gen import validate
from gen.interpolants.diffusion_coefficients import DIFFUSION_FORMS
from gen.interpolants.scheduler import InterpolantScheduler
from gen.sampling import ClassUNetAdapter, denoise
from gen.sampling.pipeline import (
    ArgumentTypeError,
    check_batch_size,
    check_class_names,
    check_generator,
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
)


@dataclass
class InterpolantPipelineOutput(BaseOutput):
    """Images (PIL list, numpy ``[N,H,W,C]`` in [0,1] or torch ``[N,C,H,W]`` in [0,1]) and network evaluations per
    image (a guided evaluation counts 2)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: float


class InterpolantPipeline(DiffusionPipeline):
    """Generate (or translate) images with an interpolant UNet.

    Example:
        >>> pipe = InterpolantPipeline.from_pretrained("checkpoints/digits-interpolant")
        >>> out = pipe(class_labels=[3] * 8, num_inference_steps=10, guidance_scale=2.0, output_type="np")
        >>> out.images.shape, out.nfe
        ((8, 16, 16, 1), 40)

    Args:
        unet: ``UNet2DModel`` called as ``unet(x, t * num_train_timesteps, class_labels=...)``.
        scheduler: an ``InterpolantScheduler``.
        base_noise_std: bridge only: std of the fresh noise added to the observation to make x0.
        class_names: optional class names (index order), saved in ``model_index.json``.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]
    _folder_classes = ("InterpolantPipeline",)

    def __init__(self, unet: UNet2DModel, scheduler: InterpolantScheduler, base_noise_std: float = 0.0,
                 class_names: list[str] | None = None):
        super().__init__()
        check_unet(unet, "InterpolantPipeline")
        if not isinstance(scheduler, InterpolantScheduler):
            hint = " (a diffusion model folder? load it with pipelines.ClassConditionalPipeline)" \
                if hasattr(scheduler, "alphas_cumprod") else ""
            raise ArgumentTypeError(f"scheduler must be an InterpolantScheduler; got {type(scheduler).__name__}{hint}")
        base_noise_std = validate.number("base_noise_std", base_noise_std, 0.0)
        n = unet.config.num_class_embeds
        class_names = check_class_names(class_names, None if n is None else n - 1)
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(base_noise_std=base_noise_std, class_names=class_names)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a hub id; a missing or broken local folder raises ``ValueError``."""
        return guarded_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, **kwargs)

    # --- properties ---------------------------------------------------------------------------------------------
    @property
    def is_bridge(self) -> bool:
        return self.unet.config.in_channels == 2 * self.unet.config.out_channels

    @property
    def adapter(self) -> ClassUNetAdapter:
        return ClassUNetAdapter(self.unet)

    @property
    def num_classes(self) -> int | None:
        return self.adapter.num_classes

    def _scheduler_for_call(self, sampler, method):
        # drop Diffusers' private keys: "_use_default_values" would make from_config ignore our overrides
        cfg = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
        over = {}
        if sampler is not None:
            over["sampler"] = validate.choice("sampler", sampler, ("ode", "sde"))
            if method is None:
                over["solver"] = "heun" if sampler == "ode" else "euler_maruyama"
        if method is not None:
            over["solver"] = method  # the scheduler names a solver of the wrong kind (ValueError)
        if not over:
            return self.scheduler
        return InterpolantScheduler.from_config({**cfg, **over})

    # --- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        guider=None,
        sampler: str | None = None,
        method: str | None = None,
        eps=None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        batch_size: int | None = None,
        source_images: torch.Tensor | None = None,
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        prompt=None,
    ):
        """Generate images.

        Args:
            class_labels: int, name or 1-D ints in ``[0, num_classes)``; None with ``batch_size`` gives null-class
                samples.
            num_inference_steps: integration steps (NFE = order * steps, + 1 with a last step, x2 when guided).
            guidance_scale: CFG weight w (1 = off, 0 = unconditional).
            guider: a ``gen.guidance.Guider`` instead of ``guidance_scale``.
            sampler: ``"ode"`` or ``"sde"`` (default: the scheduler's).
            method: ODE ``euler | heun | rk4``; SDE ``euler_maruyama | heun``.
            eps: SDE diffusion eps(t): a form name, a float or a callable (default: the scheduler's form).
            generator: torch generator(s) for the initial noise and the SDE.
            output_type: ``"pil"``, ``"np"`` ([N,H,W,C] in [0,1]) or ``"pt"`` ([N,C,H,W] in [0,1]).
            latents: optional initial x at t_start ``[N,C,H,W]``.
            source_images: bridge only: the observations d, ``[N,C,H,W]`` in [-1, 1].
        Returns:
            ``InterpolantPipelineOutput(images, nfe)`` or ``(images, nfe)``.
        """
        self.adapter.check_condition(prompt=prompt)
        guider = resolve_guider(guidance_scale, guider)
        steps = check_steps(num_inference_steps)
        check_output_type(output_type)
        batch_size = check_batch_size(batch_size)
        if eps is not None:
            eps = validate.eps_schedule("eps", eps, DIFFUSION_FORMS)
        device, dtype = self._execution_device, self.unet.dtype
        cond = None
        if self.is_bridge:
            if source_images is None:
                raise ValueError("this is a bridge UNet (in_channels = 2 x out_channels): pass source_images")
            size = sample_shape(self.unet.config, 1)[2:]
            source_images = validate.image("source_images", source_images, (-1.0, 1.0), tolerance=2.0,
                                           shape=(None, self.unet.config.out_channels, *size))
            if batch_size is None:
                batch_size = source_images.shape[0]
            cond = source_images.to(device=device, dtype=dtype)
        elif source_images is not None:
            raise ValueError("source_images is only for bridge UNets (in_channels = 2 x out_channels)")
        labels, batch = class_labels_tensor(class_labels, self.num_classes, batch_size, self.num_classes,
                                            self.config.get("class_names"))
        if cond is not None and cond.shape[0] != batch:
            raise ValueError(f"{cond.shape[0]} source_images for a batch of {batch}")
        check_generator(generator, batch)
        on_step_end = step_end_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        x = initial_noise(sample_shape(self.unet.config, batch, self.unet.config.out_channels), generator, latents,
                          device, dtype)
        if latents is None and cond is not None:
            x = cond + self.config.base_noise_std * x
        adapter = self.adapter
        conditioning = adapter.class_conditioning(None if labels is None else labels.to(device),
                                                  extra=None if cond is None else {"concat": cond})

        # 1. the scheduler for this call (sampler / method overrides) and its evaluation times
        sched = self._scheduler_for_call(sampler, method)
        sched.set_timesteps(steps, device=device)
        if eps is not None:
            if sched.config.sampler != "sde":
                raise ValueError("eps is the SDE diffusion; pass sampler='sde'")
            sched.set_eps(eps)
        gen = generator[0] if isinstance(generator, list) else generator
        # 2. integrate from t_start to 1 with the sampling core
        result = denoise(adapter, sched, x, steps, conditioning, guider, step_kwargs={"generator": gen},
                         progress=self.progress_bar, on_step_end=on_step_end)
        # 3. to [0, 1] and the requested type
        out = images_to_output(self, (result.sample / 2 + 0.5).clamp(0, 1), output_type)
        self.maybe_free_model_hooks()
        nfe = nfe_value(result.nfe)
        if not return_dict:
            return out, nfe
        return InterpolantPipelineOutput(images=out, nfe=nfe)
