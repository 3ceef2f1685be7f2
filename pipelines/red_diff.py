"""Inverse problems with a diffusion or flow prior: RED-Diff (Mardani et al., ICLR 2024, arXiv 2305.04391,
Algorithm 1), DPS (Chung et al., ICLR 2023, Algorithm 1) and the pseudo-inverse baseline, as Diffusers pipelines.

- :class:`RedDiffPipeline` (``unet``, ``scheduler``): pixel-space UNets: diffusion models (VP or rectified-flow
  scheduler) such as the digits teacher, and one-sided stochastic interpolants such as the digits interpolant (class
  labels optional; a class-conditional UNet runs on its null class when none are given).
- :class:`LatentRedDiffPipeline` (``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``): Stable
  Diffusion 1.x/2.x components. RED-Diff fits the latent mean ``mu`` (initialised at ``E(H^+ y)``) and the data term
  goes through the VAE decoder, ``||y - H(D(mu))||^2``; DPS differentiates ``H(D(x0_hat))`` through decoder and UNet.
  The SD3-style, DiT and SDXL pipelines of :mod:`pipelines.red_diff_families` run the same latent loop
  (``InverseProblemMixin._latent_call``) with their own conditioning.

All take ``measurement`` (``[B, ...]``, the operator's measurement shape), ``operator`` (a ``gen.inverse.Operator``)
and ``method`` in ``reddiff``, ``dps``, ``pinv``; eps-, v-, x0- and flow-prediction models work through
``gen.diffusion``. Network evaluations per image are returned as ``nfe`` (a DPS step also backpropagates; a guided
step counts both branches). Both methods run on the sampling core (:mod:`gen.sampling`): RED-Diff as
:class:`gen.inverse.RedDiffSolver` with the prior scheduler's noising, conversions and grid
(:func:`gen.inverse.reddiff_grid`), DPS as the per-step :class:`gen.inverse.dps.DPSHook` on the prior's own
scheduler; ``guidance_scale``/``guider`` guide the prior (class labels or prompt against the null class or empty
prompt) as in every pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from gen import validate
from gen.inverse import WEIGHTINGS, Operator
from gen.inverse.dps import DPSHook
from gen.inverse.reddiff import OPTIMIZERS, RedDiffSolver, prior_space, reddiff_grid, run_red_diff
from gen.sampling import ClassUNetAdapter, Conditioning, UNetTextAdapter, denoise, scheduler_step_kwargs
from gen.sampling.pipeline import (
    ArgumentTypeError,
    check_eta,
    check_noise_scheduler,
    check_unet,
    guarded_from_pretrained,
    nfe_value,
    resolve_guider,
)

METHODS = ("reddiff", "dps", "pinv")
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class InverseProblemPipelineOutput(BaseOutput):
    """Restored images (PIL list, numpy ``[N,H,W,C]`` in [0,1] or torch ``[N,C,H,W]`` in [0,1]) and the number of
    network evaluations per image (0 for ``pinv``; a DPS evaluation includes a backward pass; a guided step counts
    2)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int | float


def check_prior_scheduler(scheduler, pipeline: str) -> None:
    """The prior's scheduler is one RED-Diff and DPS support: a Diffusers VP or rectified-flow noise scheduler, or a
    one-sided ``InterpolantScheduler``; anything else (GBM, a two-sided or mirror interpolant) is a ``ValueError``
    that lists the supported families (``gen.inverse.reddiff.SUPPORTED_PRIORS``)."""
    from gen.interpolants.scheduler import InterpolantScheduler

    if isinstance(scheduler, InterpolantScheduler) or callable(getattr(scheduler, "prediction_space", None)):
        prior_space(scheduler, pipeline)
        return
    check_noise_scheduler(scheduler, pipeline)


class InverseProblemMixin:
    """What every inverse-problem pipeline shares: argument checks, the RED-Diff grid bounds, RED-Diff / DPS on the
    sampling core, the latent loop (VAE encoder for ``mu``'s start, decoder in the data term) and the output
    conversion. A pipeline names its prior network in ``_prior_attr`` and builds the family's conditioning."""

    _prior_attr = "unet"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a hub id; a missing or broken local folder raises ``ValueError``."""
        return guarded_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, **kwargs)

    @property
    def prior(self):
        """The prior network (``unet`` or ``transformer``)."""
        return getattr(self, self._prior_attr)

    def _grid_bounds(self, t_max, t_min, noise_max, noise_min) -> tuple[float, float]:
        """RED-Diff's grid as noise fractions ``(noise_max, noise_min)``: from ``t_max``/``t_min`` (training timesteps
        of a discrete-time VP prior, ``noise_max = (t_max + 1) / T``, ``noise_min = t_min / T``) or as given."""
        discrete = hasattr(self.scheduler, "alphas_cumprod")
        if t_max is not None or t_min is not None:
            if not discrete:
                raise ValueError(f"t_max/t_min are training-timestep indices of a discrete-time (VP) prior; "
                                 f"{type(self.scheduler).__name__} is not one: give noise_max/noise_min instead "
                                 "(fractions of the noise range: 1 = pure noise, 0 = data)")
            if noise_max is not None or noise_min is not None:
                raise ValueError("give t_max/t_min or noise_max/noise_min, not both")
            n_train = int(self.scheduler.config.num_train_timesteps)
            t_max = validate.integer("t_max", t_max, 0, n_train - 1, allow_none=True)
            t_min = validate.integer("t_min", t_min, 0, n_train - 1, allow_none=True)
            t_max = n_train - 1 if t_max is None else t_max
            t_min = 0 if t_min is None else t_min
            if t_min > t_max:
                raise ValueError(f"need t_min <= t_max; got t_min={t_min}, t_max={t_max}")
            return (t_max + 1) / n_train, t_min / n_train
        noise_max = validate.number("noise_max", noise_max, 0.0, 1.0, low_open=True, allow_none=True)
        noise_min = validate.number("noise_min", noise_min, 0.0, 1.0, high_open=True, allow_none=True)
        noise_max = 1.0 if noise_max is None else noise_max
        noise_min = 0.0 if noise_min is None else noise_min
        if noise_min >= noise_max:
            raise ValueError(f"need noise_min < noise_max; got noise_min={noise_min}, noise_max={noise_max}")
        return noise_max, noise_min

    def _check_args(self, measurement, operator, method, num_inference_steps, output_type, generator, x_shape,
                    x_init, lr, lam, weighting, zeta, eta, obs_weight, t_max, t_min, noise_max, noise_min, callback):
        """Every argument through :mod:`gen.validate`; returns ``(measurement, x_init, (noise_max, noise_min))``."""
        if not isinstance(operator, Operator):
            raise ArgumentTypeError(f"operator must be a gen.inverse.Operator (Inpainting, SuperResolution, ...); got "
                                    f"{validate.describe(operator)}")
        validate.choice("method", method, METHODS)
        validate.integer("num_inference_steps", num_inference_steps, 1)
        validate.choice("output_type", output_type, OUTPUT_TYPES)
        validate.generator("generator", generator, allow_list=False)
        validate.number("lr", lr, 0.0, low_open=True)
        validate.number("lam", lam, 0.0)
        if not callable(weighting):
            validate.choice("weighting", weighting, WEIGHTINGS)
        validate.number("zeta", zeta, 0.0)
        check_eta(eta)
        validate.number("obs_weight", obs_weight, 0.0, low_open=True, allow_none=True)
        bounds = self._grid_bounds(t_max, t_min, noise_max, noise_min)
        validate.callback("callback", callback)
        y = operator.check_measurement(measurement, x_shape)
        x_init = validate.image("x_init", x_init, (-1.0, 1.0), tolerance=0.5, shape=x_shape, allow_none=True)
        if method in ("reddiff", "pinv") and x_init is None and not operator.has_pinv:
            raise ValueError(
                f"{type(operator).__name__} has no pinv, which method={method!r} needs"
                + (" to initialise mu: pass x_init=" if method == "reddiff" else "")
            )
        return y, x_init, bounds

    def _solve(self, adapter, conditioning, guider, method, operator, y, x_shape, x_init, lr, lam, weighting,
               obs_weight, bounds, zeta, eta, num_inference_steps, generator, callback, dtype, device,
               encode=None, decode=None, latent_shape=None, shift_mu=None, optimizer: str = "adam"):
        """RED-Diff or DPS on the sampling core; returns ``(final state, network evaluations per image)``.

        RED-Diff's grid and noising come from the prior scheduler's prediction space (``gen.inverse.reddiff_grid``,
        ``RedDiffSolver(prior=...)``); DPS runs the prior's own scheduler with the DPS hook.
        """

        def on_step_end(k, t, x):
            if callback is not None:
                callback(k, t, x)

        if method == "reddiff":
            start = operator.pinv(y, x_shape) if x_init is None else x_init.to(device, dtype)
            mu0 = encode(start.clamp(-1, 1)) if encode is not None else start
            steps = reddiff_grid(self.scheduler, num_inference_steps, *bounds, mu=shift_mu)
            solver = RedDiffSolver(operator, y, mu0, timesteps=steps, prior=self.scheduler, lr=lr, lam=lam,
                                   weighting=weighting, obs_weight=obs_weight, generator=generator, decode=decode,
                                   optimizer=optimizer)
            result = run_red_diff(adapter, solver, conditioning, guider, callback=callback,
                                  progress=self.progress_bar, return_result=True)
            return result.sample, nfe_value(result.nfe)

        self.scheduler.set_timesteps(num_inference_steps, device=device,
                                     **({} if shift_mu is None else {"mu": shift_mu}))
        latents = randn_tensor(latent_shape or x_shape, generator=generator, device=device, dtype=dtype)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        result = denoise(adapter, self.scheduler, latents, num_inference_steps, conditioning, guider,
                         hook=DPSHook(operator, y, zeta, decode),
                         step_kwargs=scheduler_step_kwargs(self.scheduler, eta, generator),
                         progress=self.progress_bar, on_step_end=on_step_end)
        return result.sample.detach(), nfe_value(result.nfe)

    @staticmethod
    def _to_output(images: torch.Tensor, output_type: str, numpy_to_pil):
        images = (images / 2 + 0.5).clamp(0, 1).detach().cpu().float()
        if output_type == "pt":
            return images
        out = images.permute(0, 2, 3, 1).numpy()
        return numpy_to_pil(out) if output_type == "pil" else out

    # --- latent priors ------------------------------------------------------------------------------------------
    def _decode(self, z):
        """``D(z / scaling_factor + shift_factor)`` in float32 (the VAE's ``shift_factor`` is 0 for SD 1.x and DiT;
        a half-precision VAE gets its own dtype)."""
        cfg = self.vae.config
        z = z / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()

    def _encode(self, x):
        """``(E(x).mean - shift_factor) * scaling_factor`` in float32: the latent whose decoding is closest to
        ``x``."""
        cfg = self.vae.config
        mean = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float()
        return (mean - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor

    def _latent_call(self, adapter, conditioning_fn, measurement, operator, method, num_inference_steps, lr, lam,
                     weighting, obs_weight, t_max, t_min, noise_max, noise_min, zeta, eta, x_init, height, width,
                     generator, output_type, return_dict, callback, guidance_scale, guider, check_condition,
                     shift_mu_fn=None, size_multiple: int = 1):
        """The whole call of a latent prior: ``conditioning_fn(batch, device)`` builds the family's two branches,
        ``check_condition(batch)`` validates the condition before anything runs, ``shift_mu_fn(latent_shape)`` gives
        a flow scheduler's dynamic shift (or None); latent sides are multiples of ``size_multiple`` (a transformer's
        patch size)."""
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.prior.config.sample_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        height = validate.divisible_size("height", height, f * size_multiple, default=size[0] * f)
        width = validate.divisible_size("width", width, f * size_multiple, default=size[1] * f)
        measurement = validate.tensor("measurement", measurement, ndim=range(1, 9), finite=False)
        batch = measurement.shape[0]
        x_shape = (batch, self.vae.config.in_channels, height, width)
        measurement, x_init, bounds = self._check_args(measurement, operator, method, num_inference_steps,
                                                       output_type, generator, x_shape, x_init, lr, lam, weighting,
                                                       zeta, eta, obs_weight, t_max, t_min, noise_max, noise_min,
                                                       callback)
        check_condition(batch)
        guider = resolve_guider(guidance_scale, guider)
        # the solver state (RED-Diff's mu and its Adam moments, DPS's latents) and the data term stay in float32
        # whatever the networks' dtype; the core casts the network input to the network's dtype
        device, dtype = self._execution_device, torch.float32
        y = measurement.to(device, dtype)
        if method == "pinv":
            images, nfe = operator.pinv(y, x_shape), 0
        else:
            conditioning = conditioning_fn(batch, device)
            latent_shape = (batch, self.prior.config.in_channels, height // f, width // f)
            shift_mu = shift_mu_fn(latent_shape) if shift_mu_fn is not None else None
            z, nfe = self._solve(adapter, conditioning, guider, method, operator, y, x_shape, x_init, lr, lam,
                                 weighting, obs_weight, bounds, zeta, eta, num_inference_steps, generator, callback,
                                 dtype, device, encode=self._encode, decode=self._decode, latent_shape=latent_shape,
                                 shift_mu=shift_mu)
            images = self._decode(z)
        out = self._to_output(images, output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        if not return_dict:
            return out, nfe
        return InverseProblemPipelineOutput(images=out, nfe=nfe)


class RedDiffPipeline(InverseProblemMixin, DiffusionPipeline):
    """Solve ``y = H(x) + sigma_y n`` with a pixel-space prior (``UNet2DModel``): a diffusion model (VP or
    rectified-flow scheduler) or a one-sided stochastic interpolant (``InterpolantScheduler``, e.g. the shipped
    ``checkpoints/digits-interpolant``, whose folder loads here directly).

    Example:
        >>> from gen.inverse import Inpainting
        >>> pipe = RedDiffPipeline.from_pretrained("checkpoints/digits-interpolant")
        >>> op = Inpainting.box((16, 16), 6, sigma_y=0.05)
        >>> y = op.measure(x, generator=torch.Generator().manual_seed(0))
        >>> out = pipe(y, op, method="reddiff", num_inference_steps=20, noise_max=0.25, output_type="pt")
    """

    model_cpu_offload_seq = "unet"
    _folder_classes = ("RedDiffPipeline", "ClassConditionalPipeline", "ClassConditionalLoraPipeline", "DDPMPipeline",
                       "DDIMPipeline", "InterpolantPipeline")

    def __init__(self, unet, scheduler):
        super().__init__()
        check_unet(unet, "RedDiffPipeline")
        if unet.config.in_channels != unet.config.out_channels:
            raise ValueError(f"RedDiffPipeline needs a prior with in_channels == out_channels; this UNet has "
                             f"{unet.config.in_channels} -> {unet.config.out_channels} (a bridge UNet, conditioned on "
                             "an observation, is not a prior)")
        check_prior_scheduler(scheduler, "RedDiffPipeline")
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def null_class(self) -> int | None:
        n = self.unet.config.num_class_embeds
        return None if n is None else n - 1

    def _labels(self, class_labels, batch):
        if self.null_class is None:
            if class_labels is not None:
                raise ValueError("class_labels given, but this UNet is unconditional (num_class_embeds is None)")
            return None
        if class_labels is None:
            return torch.full((batch,), self.null_class, dtype=torch.long)
        if isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, bool):
            class_labels = [int(class_labels)] * batch
        if isinstance(class_labels, (str, bool, float)) or (isinstance(class_labels, (list, tuple)) and not all(
                isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in class_labels)):
            raise ArgumentTypeError(f"class_labels must be an int or {batch} ints (one per measurement); got "
                                    f"{validate.describe(class_labels)}")
        if not isinstance(class_labels, (list, tuple, np.ndarray, torch.Tensor)):
            raise ArgumentTypeError(f"class_labels must be an int or {batch} ints (one per measurement); got "
                                    f"{validate.describe(class_labels)}")
        labels = torch.as_tensor(class_labels)
        if labels.ndim != 1 or labels.numel() != batch or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be an int or {batch} ints (one per measurement); got "
                             f"shape {tuple(labels.shape)} dtype {labels.dtype}")
        if ((labels < 0) | (labels > self.null_class)).any():
            raise ValueError(f"class_labels out of range; allowed 0..{self.null_class} "
                             f"({self.null_class} = null class)")
        return labels.long()

    @torch.no_grad()
    def __call__(
        self,
        measurement: torch.Tensor,
        operator: Operator,
        method: str = "reddiff",
        num_inference_steps: int = 50,
        class_labels=None,
        lr: float = 0.25,
        lam: float = 0.25,
        weighting: str = "linear",
        obs_weight: float | None = None,
        t_max: int | None = None,
        t_min: int | None = None,
        zeta: float = 1.0,
        eta: float = 1.0,
        x_init: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        guidance_scale: float = 1.0,
        guider=None,
        noise_max: float | None = None,
        noise_min: float | None = None,
        prompt=None,
        optimizer: str = "adam",
    ):
        """Restore images from a measurement.

        Args:
            measurement: ``[B, ...]``, ``operator.measurement_shape([B, C, height, width])``, finite values.
            operator: a ``gen.inverse.Operator`` (its ``sigma_y`` sets RED-Diff's data weight ``1 / sigma_y^2``).
            method: ``"reddiff"`` (RED-Diff, Adam on ``mu``), ``"dps"`` or ``"pinv"`` (``H^+ y``, no network).
            num_inference_steps: RED-Diff time-grid size / DPS sampler steps (one network evaluation each).
            class_labels: int or ``[B]`` ints for a class-conditional UNet; None: the null class (unconditional).
            lr, lam, weighting, obs_weight: RED-Diff's Adam step, ``lambda``, SNR weighting and data weight.
            optimizer: RED-Diff's optimizer of ``mu``: ``"adam"`` (Algorithm 1) or ``"sgd"`` (plain gradient steps;
                see ``gen.inverse.red_diff``).
            t_max, t_min: RED-Diff's descending time grid runs from ``t_max`` (default the last training step) to
                ``t_min`` (see ``gen.inverse.reddiff_timesteps``); VP priors only.
            noise_max, noise_min: the same grid for every prior, as noise fractions (1 = pure noise, 0 = data;
                default 1 and 0): ``num_inference_steps`` equal parts of ``[noise_min, noise_max)`` visited from the
                top down, mapped to the prior's timesteps by its scheduler (``gen.inverse.reddiff_grid``: VP
                ``t = floor(u T)``, so ``t_max=249`` is ``noise_max=0.25``; flow with the scheduler's shift; an
                interpolant at ``t = 1 - u``).
            zeta, eta: DPS step size and DDIM stochasticity (DPS runs the prior's scheduler as configured).
            x_init: RED-Diff's initial ``mu`` ``[B, C, H, W]`` in [-1, 1] (default ``H^+ y``).
            height, width: image size (default the UNet's ``sample_size``).
            generator: one torch generator for all noise (RED-Diff's ``eps``, DPS's initial and ancestral noise).
            output_type: ``"pil"``, ``"np"`` (``[N,H,W,C]`` in [0,1]) or ``"pt"`` (``[N,C,H,W]`` in [0,1]).
            callback: ``callback(i, t, x)`` after each step.
            guidance_scale, guider: guidance of the prior (CFG ``w`` or a ``gen.guidance`` guider) between the
                labelled branch and the null class; 1 (default) is the plain prior.
            prompt: not accepted (a ``ValueError``): this prior is class-conditional or unconditional.
        Returns:
            ``InverseProblemPipelineOutput(images, nfe)`` or the tuple ``(images, nfe)``.
        """
        adapter = ClassUNetAdapter(self.unet)
        adapter.check_condition(prompt=prompt)
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size, cfg.sample_size)
        down = 2 ** (len(cfg.block_out_channels) - 1)
        height = validate.divisible_size("height", height, down, default=size[0])
        width = validate.divisible_size("width", width, down, default=size[1])
        measurement = validate.tensor("measurement", measurement, ndim=range(1, 9), finite=False)
        batch = measurement.shape[0]
        x_shape = (batch, cfg.in_channels, height, width)
        measurement, x_init, bounds = self._check_args(measurement, operator, method, num_inference_steps,
                                                       output_type, generator, x_shape, x_init, lr, lam, weighting,
                                                       zeta, eta, obs_weight, t_max, t_min, noise_max, noise_min,
                                                       callback)
        validate.choice("optimizer", optimizer, OPTIMIZERS)
        labels = self._labels(class_labels, batch)
        guider = resolve_guider(guidance_scale, guider)
        device, dtype = self._execution_device, self.unet.dtype
        y = measurement.to(device, dtype)
        if labels is not None:
            labels = labels.to(device)

        conditioning = adapter.class_conditioning(labels)
        if method == "pinv":
            images, nfe = operator.pinv(y, x_shape), 0
        else:
            images, nfe = self._solve(adapter, conditioning, guider, method, operator, y, x_shape, x_init, lr, lam,
                                      weighting, obs_weight, bounds, zeta, eta, num_inference_steps, generator,
                                      callback, dtype, device, optimizer=optimizer)
        out = self._to_output(images, output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        if not return_dict:
            return out, nfe
        return InverseProblemPipelineOutput(images=out, nfe=nfe)


class LatentRedDiffPipeline(InverseProblemMixin, DiffusionPipeline):
    """RED-Diff / DPS / pseudo-inverse with Stable Diffusion 1.x/2.x components; the operator acts on decoded images
    ``[B, 3, H, W]`` in [-1, 1].

    RED-Diff here: ``mu`` is the latent mean, initialised at ``E(H^+ y)`` (VAE encoder mean times
    ``scaling_factor``); ``x_t = alpha_t mu + sigma_t eps`` feeds the text-conditioned UNet without gradient, and the
    data term ``w ||y - H(D(mu))||^2 / 2`` is differentiated through the decoder ``D`` only. The SD3-style and DiT
    priors are :class:`pipelines.red_diff_families.RedDiffSD3Pipeline` and
    :class:`pipelines.red_diff_families.RedDiffDiTPipeline` (the same loop, their own conditioning).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _folder_classes = ("LatentRedDiffPipeline", "StableDiffusionPipeline", "GuidedStableDiffusionPipeline")

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        from diffusers import UNet2DConditionModel

        from gen.sampling import unwrap_network

        if not isinstance(unwrap_network(unet), UNet2DConditionModel):
            raise ArgumentTypeError(f"LatentRedDiffPipeline needs a UNet2DConditionModel (SD 1.x/2.x) as unet; got "
                                    f"{validate.describe(unet)} (SD3-style transformers: RedDiffSD3Pipeline; DiT: "
                                    "RedDiffDiTPipeline)")
        check_prior_scheduler(scheduler, "LatentRedDiffPipeline")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_prompt(self, prompt, batch: int, device) -> torch.Tensor:
        """CLIP text embeddings ``[B, L, D]`` of ``prompt`` (a string for all, or one per measurement)."""
        prompt = validate.prompts("prompt", prompt, batch=batch)
        ids = self.tokenizer(list(prompt), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def __call__(
        self,
        measurement: torch.Tensor,
        operator: Operator,
        prompt: str | list[str] = "",
        method: str = "reddiff",
        num_inference_steps: int = 50,
        lr: float = 0.1,
        lam: float = 0.25,
        weighting: str = "linear",
        obs_weight: float | None = None,
        t_max: int | None = None,
        t_min: int | None = None,
        zeta: float = 1.0,
        eta: float = 1.0,
        x_init: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        guidance_scale: float = 1.0,
        guider=None,
        noise_max: float | None = None,
        noise_min: float | None = None,
        class_labels=None,
    ):
        """Restore images from a measurement of ``[B, 3, height, width]`` images in [-1, 1].

        Args are those of :meth:`RedDiffPipeline.__call__`, plus ``prompt`` (text conditioning of the UNet; guidance
        runs against the empty prompt) and ``x_init`` (an initial image ``[B, 3, H, W]``, encoded to the initial
        latent ``mu``). ``class_labels`` is refused (a ``ValueError``): SD is text-conditional.
        """
        adapter = UNetTextAdapter(self.unet)
        adapter.check_condition(prompt=prompt, class_labels=class_labels)

        def check_condition(batch):
            validate.prompts("prompt", prompt, batch=batch)

        def conditioning(batch, device):
            return Conditioning(cond={"encoder_hidden_states": self.encode_prompt(prompt, batch, device)},
                                uncond={"encoder_hidden_states": self.encode_prompt("", batch, device)})

        return self._latent_call(adapter, conditioning, measurement, operator, method, num_inference_steps, lr, lam,
                                 weighting, obs_weight, t_max, t_min, noise_max, noise_min, zeta, eta, x_init, height,
                                 width, generator, output_type, return_dict, callback, guidance_scale, guider,
                                 check_condition)
