"""Sampling a stochastic-interpolant UNet (Albergo, Boffi & Vanden-Eijnden 2023; SiT) with guidance.

``InterpolantPipeline(unet, scheduler)`` with a :class:`gen.interpolants.scheduler.InterpolantScheduler`:

- **generation** (one-sided interpolant, ``unet.config.in_channels == out_channels``): start from N(0, I) at t = 0
  and integrate the probability-flow ODE or an SDE to t = 1; class labels, classifier-free guidance.
- **bridge** (two-sided, ``in_channels == 2 * out_channels``): the UNet sees ``cat([x_t, d])`` where ``d`` is the
  observation (``source_images``, e.g. a degraded digit); the sampler starts from ``x0 = d + base_noise_std * zeta``.

Guidance acts on all channels (SiT's ``forward_with_cfg`` guides only 3 of 4 latent channels, a DiT legacy):

- ``guidance_scale=w``: CFG ``uncond + w (cond - uncond)`` on the network output. Every conversion between
  b, v, s, eta and x1 is affine in the prediction at a fixed ``(x_t, t)`` with the same coefficients for both
  branches, so this equals CFG on the data prediction E[x1|x] or the score, as in Ho & Salimans (2022).
- ``guider=``: any ``gen.guidance`` guider (CFG, APG, AG, ...). The prediction is converted to the diffusion
  pair the guiders expect: ``x0`` (their clean image) = E[x1 | x_t] and ``eps`` = E[noise | x_t], with
  ``alpha_t = beta(t)``, ``sigma_t = alpha(t)`` of the interpolant; the guided data prediction is converted back.
  The conversion needs alpha(t) > 0, so with a guider the grid ends at ``t_end <= 1 - 1e-3`` and a last Euler
  step lands on t = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from gen.interpolants.scheduler import InterpolantScheduler

from ._common import check_sampling_args, images_to_output, nfe_value
from ._loading import guarded_from_pretrained

GUIDED_T_END = 1.0 - 1e-3


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
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: InterpolantScheduler, base_noise_std: float = 0.0):
        super().__init__()
        if not isinstance(scheduler, InterpolantScheduler):
            raise ValueError(f"scheduler must be an InterpolantScheduler; got {type(scheduler).__name__}")
        if not base_noise_std >= 0:
            raise ValueError(f"base_noise_std must be >= 0; got {base_noise_std}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(base_noise_std=float(base_noise_std))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a hub id; a missing or broken local folder raises ``ValueError``."""
        return guarded_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, **kwargs)

    # --- properties ---------------------------------------------------------------------------------------------
    @property
    def is_bridge(self) -> bool:
        return self.unet.config.in_channels == 2 * self.unet.config.out_channels

    @property
    def num_classes(self) -> int | None:
        n = self.unet.config.num_class_embeds
        return None if n is None else n - 1

    # --- argument checks ----------------------------------------------------------------------------------------
    def _labels(self, class_labels, batch_size):
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError("class_labels given, but this UNet is unconditional (num_class_embeds is None)")
            return None, batch_size
        if class_labels is None:
            if batch_size is None or int(batch_size) < 1:
                raise ValueError("give class_labels, or batch_size for unconditional (null-class) samples")
            return torch.full((int(batch_size),), self.num_classes, dtype=torch.long), int(batch_size)
        if isinstance(class_labels, (int, np.integer)):
            class_labels = [int(class_labels)]
        labels = torch.as_tensor(class_labels)
        if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be a non-empty 1-D list of ints; got {class_labels!r}")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"class_labels out of range: {bad.tolist()[:8]}; allowed 0..{self.num_classes - 1}")
        if batch_size is not None and int(batch_size) != labels.numel():
            raise ValueError(f"batch_size={batch_size} does not match len(class_labels)={labels.numel()}")
        return labels.long(), labels.numel()

    def _scheduler_for_call(self, sampler, method, guider):
        # drop Diffusers' private keys: "_use_default_values" would make from_config ignore our overrides
        cfg = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
        over = {}
        if sampler is not None:
            if sampler not in ("ode", "sde"):
                raise ValueError(f"sampler={sampler!r}; allowed: ode, sde")
            over["sampler"] = sampler
            if method is None:
                over["solver"] = "heun" if sampler == "ode" else "euler_maruyama"
        if method is not None:
            over["solver"] = method
        if guider is not None and (cfg.get("t_end") is None or cfg["t_end"] > GUIDED_T_END):
            over["t_end"] = GUIDED_T_END
        if not over:
            return self.scheduler
        return InterpolantScheduler.from_config({**cfg, **over})

    # --- sampling -----------------------------------------------------------------------------------------------
    def _net(self, x, t, labels, cond):
        inp = x if cond is None else torch.cat([x, cond], dim=1)
        return self.unet(inp, t, class_labels=labels).sample

    def _predict(self, sched, x, t, labels, cond, guidance_scale, guider, step_index, num_steps):
        if labels is None or (guider is None and guidance_scale == 1.0):
            return self._net(x, t, labels, cond), 1
        null = torch.full_like(labels, self.num_classes)
        if guider is None:
            if guidance_scale == 0.0:
                return self._net(x, t, null, cond), 1
            both = self._net(torch.cat([x, x]), t, torch.cat([labels, null]),
                             None if cond is None else torch.cat([cond, cond]))
            c, u = both.chunk(2)
            return u + guidance_scale * (c - u), 2
        return self._guided(sched, x, t, labels, null, cond, guider, step_index, num_steps)

    def _guided(self, sched, x, t, labels, null, cond, guider, step_index, num_steps):
        """A ``gen.guidance`` guider on (x0 = E[x1|x], eps = E[noise|x]); see the module docstring."""
        from gen.guidance.sampling import guided_prediction

        interp, pred_type = sched.interpolant, sched.prediction
        if interp.kind != "one_sided":
            raise ValueError("guiders need a one-sided (noise -> data) interpolant")
        tt = float(t) / sched.config.num_train_timesteps
        c = interp.coefficients(torch.tensor(tt))
        alpha_d, sigma_d = float(c.beta), float(c.alpha)  # diffusion naming: x = alpha_d * data + sigma_d * noise

        def net_as_sample(xx, ts, class_labels):
            raw = self._net(xx, ts, class_labels, cond)
            return interp.convert(raw, pred_type, "x1", xx, tt)

        x1_hat, evals = guided_prediction(net_as_sample, x, t, {"class_labels": labels}, {"class_labels": null},
                                          guider, step_index, num_steps, max(alpha_d, 1e-12), sigma_d, "sample")
        return interp.convert(x1_hat, "x1", pred_type, x, tt), evals

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
    ):
        """Generate images.

        Args:
            class_labels: int or 1-D ints in ``[0, num_classes)``; None with ``batch_size`` gives null-class samples.
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
        check_sampling_args(num_inference_steps, guidance_scale, output_type, guider=guider)
        device, dtype = self._execution_device, self.unet.dtype
        cond = None
        if self.is_bridge:
            if source_images is None:
                raise ValueError("this is a bridge UNet (in_channels = 2 x out_channels): pass source_images")
            if source_images.ndim != 4 or source_images.shape[1] != self.unet.config.out_channels:
                raise ValueError(f"source_images must be [N, {self.unet.config.out_channels}, H, W]; "
                                 f"got {tuple(source_images.shape)}")
            if batch_size is None:
                batch_size = source_images.shape[0]
            cond = source_images.to(device=device, dtype=dtype)
        elif source_images is not None:
            raise ValueError("source_images is only for bridge UNets (in_channels = 2 x out_channels)")
        labels, batch = self._labels(class_labels, batch_size)
        if batch is None or int(batch) < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        if cond is not None and cond.shape[0] != batch:
            raise ValueError(f"{cond.shape[0]} source_images for a batch of {batch}")
        check_sampling_args(num_inference_steps, guidance_scale, output_type, generator, batch, guider)
        if guider is not None and labels is None:
            raise ValueError("a guider needs class labels (the unconditional branch is the null class)")
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
        shape = (batch, cfg.out_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if cond is not None:
                latents = cond + self.config.base_noise_std * latents
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents shape {tuple(latents.shape)} != expected {shape}")
        latents = latents.to(device=device, dtype=dtype)
        if labels is not None:
            labels = labels.to(device)

        # 1. the scheduler for this call (sampler / method overrides) and its evaluation times
        sched = self._scheduler_for_call(sampler, method, guider)
        sched.set_timesteps(int(num_inference_steps), device=device)
        if eps is not None:
            if sched.config.sampler != "sde":
                raise ValueError("eps is the SDE diffusion; pass sampler='sde'")
            sched.set_eps(eps)
        if guider is not None:
            guider.begin(batch, int(num_inference_steps))
        gen = generator[0] if isinstance(generator, list) else generator
        nfe = 0.0
        # 2. integrate from t_start to 1: prediction (with guidance) -> scheduler step
        for k, t in enumerate(self.progress_bar(sched.timesteps)):
            step_index = min(k * int(num_inference_steps) // len(sched.timesteps), int(num_inference_steps) - 1)
            pred, evals = self._predict(sched, latents, t, labels, cond, guidance_scale, guider,
                                        step_index, int(num_inference_steps))
            nfe += evals
            latents = sched.step(pred, t, latents, generator=gen).prev_sample

        # 3. to [0, 1] and the requested type
        out = images_to_output(self, (latents / 2 + 0.5).clamp(0, 1), output_type)
        self.maybe_free_model_hooks()
        nfe = nfe_value(nfe)
        if not return_dict:
            return out, nfe
        return InterpolantPipelineOutput(images=out, nfe=nfe)
