"""Sampling with gradients for reward backpropagation (AlignProp, Prabhudesai et al. 2023, arXiv 2310.03739).

AlignProp differentiates a reward of the final sample x_0 through the whole denoising chain
x_T -> x_{T-1} -> ... -> x_0 with respect to the (LoRA) weights theta of the network. Two devices keep the memory
bounded (Sec. 4 of the paper):

- **gradient checkpointing** of every network call (``torch.utils.checkpoint``, ``use_reentrant=False``): only the
  inputs of each call are kept; activations are recomputed in the backward pass;
- **truncated backpropagation**: the network's prediction at step i is detached for i < T - K, so the gradient
  flows through the last K steps only (K = 1 is the paper's "AlignProp K=1").

Because x_T does not depend on theta, running the first T - K network calls under ``torch.no_grad`` gives exactly
the gradient of the original ``noise_pred.detach()`` formulation, without building their graphs.

How K is chosen (:class:`Truncation`):

- ``fixed``: the same K every batch;
- ``uniform``: K drawn once per batch, uniformly in ``[k_min, k_max]`` (the fixed version of the randomised
  truncation in the 2024-10 rewrite of the official code);
- ``per_step_random``: **the original code's and TRL's quirk**, kept for comparison: at every step i an integer
  r ~ U{cut_min..cut_max} is drawn and the prediction is detached if i < r, so each step independently keeps its
  gradient with probability P(r <= i); this is not "one random K" and the kept steps need not be contiguous.

The scheduler step itself is any Diffusers scheduler's ``step`` run with autograd on: DDIM (with ``eta``), SDXL's
Euler (x <- x + (sigma_next - sigma) eps at x_in = x / sqrt(sigma^2 + 1)), the flow-matching Euler of SD3-style models
(x <- x + (sigma_next - sigma) v, with the scheduler's static shift or the dynamic shift ``mu``). Sampling runs the one
core of :mod:`gen.sampling` with its keep-gradient mask; classifier-free guidance is the core's ``gen.guidance.CFG``
(any other guider works too), never inline.

Back-ends (what the trainer needs from a family: prompt encoding into both CFG branches, latent shape, the guided
network, VAE decode with optional checkpointing): :class:`ClassConditionalBackend` (digits ``UNet2DModel``),
:class:`StableDiffusionBackend` (SD 1.x/2.x), :class:`StableDiffusionXLBackend` and :class:`SD3Backend` (the family
pipelines' own ``encode_prompt``, SDXL's added time ids and pooled embeddings, SD3's pooled projections) and
:class:`DiTBackend` (class-conditional ``DiTTransformer2DModel``: labels by index or ImageNet name, the null class,
the core's ``DiTAdapter`` dropping the learned-variance channels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch.utils.checkpoint import checkpoint

from gen.guidance import CFG, Guider
from gen.sampling import (
    CallableAdapter,
    ClassUNetAdapter,
    Conditioning,
    DiTAdapter,
    SD3Adapter,
    UNetTextAdapter,
    adapter_for,
    denoise,
)
from gen.sampling.core import scheduler_step_kwargs

TRUNCATION_MODES = ("fixed", "uniform", "per_step_random")


@dataclasses.dataclass
class Truncation:
    """Which of the T sampling steps keep their gradient.

    Args:
        mode: ``fixed`` | ``uniform`` | ``per_step_random`` (see the module docstring).
        k: ``fixed``: backpropagate through the last ``k`` steps; ``None`` means all steps (full backprop).
        k_min, k_max: ``uniform``: K ~ U{k_min..k_max}, drawn once per batch (``k_max=None``: T).
        cut_min, cut_max: ``per_step_random``: per step r ~ U{cut_min..cut_max}, step i detached if i < r
            (TRL's ``truncated_rand_backprop_minmax``; ``cut_max=None``: T).
    """

    mode: str = "fixed"
    k: int | None = 1
    k_min: int = 1
    k_max: int | None = None
    cut_min: int = 0
    cut_max: int | None = None

    def validate(self, num_steps: int) -> None:
        """Raise ``ValueError`` naming the bad setting for ``num_steps`` sampling steps."""
        if self.mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation mode {self.mode!r}; allowed: {', '.join(TRUNCATION_MODES)}")
        if num_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1; got {num_steps}")
        if self.mode == "fixed" and self.k is not None:
            if self.k < 1:
                raise ValueError(f"backprop K must be >= 1 (or None for all steps); got {self.k}")
            if self.k > num_steps:
                raise ValueError(f"backprop K={self.k} is larger than the number of sampling steps {num_steps}")
        if self.mode == "uniform":
            hi = num_steps if self.k_max is None else self.k_max
            if not 1 <= self.k_min <= hi:
                raise ValueError(f"uniform K range needs 1 <= k_min <= k_max; got k_min={self.k_min}, k_max={hi}")
            if hi > num_steps:
                raise ValueError(f"uniform K range k_max={hi} is larger than the number of sampling steps {num_steps}")
        if self.mode == "per_step_random":
            hi = num_steps if self.cut_max is None else self.cut_max
            if not 0 <= self.cut_min <= hi:
                raise ValueError(f"per_step_random needs 0 <= cut_min <= cut_max; got {self.cut_min}, {hi}")

    def draw_k(self, num_steps: int, generator: torch.Generator | None = None) -> int | None:
        """The batch's K (``fixed``/``uniform``), or None for ``per_step_random``."""
        self.validate(num_steps)
        if self.mode == "fixed":
            return num_steps if self.k is None else self.k
        if self.mode == "uniform":
            hi = num_steps if self.k_max is None else self.k_max
            return int(torch.randint(self.k_min, hi + 1, (1,), generator=generator))
        return None

    def keep_mask(self, num_steps: int, generator: torch.Generator | None = None) -> list[bool]:
        """``mask[i]`` is True when step i (0 = the noisiest) keeps its gradient."""
        k = self.draw_k(num_steps, generator)
        if k is not None:
            return [i >= num_steps - k for i in range(num_steps)]
        hi = num_steps if self.cut_max is None else self.cut_max
        cuts = torch.randint(self.cut_min, hi + 1, (num_steps,), generator=generator)
        return [i >= int(r) for i, r in enumerate(cuts)]


def step_kwargs_for(scheduler, eta: float = 0.0, generator=None) -> dict:
    """Keyword arguments ``scheduler.step`` accepts among ``eta`` and ``generator``; a non-zero ``eta`` on a
    scheduler without it is a ``ValueError``."""
    return scheduler_step_kwargs(scheduler, eta, generator, strict=True)


@dataclasses.dataclass
class GuidedModel:
    """A network with the inputs of its branches and a guider: what :func:`sample_with_grad` samples.

    Args:
        model: a network or :class:`gen.sampling.ModelAdapter`.
        conditioning: the conditional / unconditional inputs (rows aligned with the latents).
        guider: a ``gen.guidance.Guider`` (``CFG(w)`` for the usual classifier-free guidance).
    """

    model: object
    conditioning: Conditioning
    guider: Guider


def sample_with_grad(
    model_fn,
    scheduler,
    latents: torch.Tensor,
    num_inference_steps: int,
    truncation: Truncation | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    gradient_checkpointing: bool = True,
    keep_mask: list[bool] | None = None,
    progress: Callable | None = None,
    timestep_kwargs: dict | None = None,
) -> tuple[torch.Tensor, dict]:
    """Run the scheduler loop from ``latents`` with gradients through the kept steps (the sampling core's
    keep-gradient mask).

    Per step i with timestep t (x_in = scheduler.scale_model_input(x, t)):
        pred = guided network output at x_in   (checkpointed, with grad, if step i is kept; else under no_grad)
        x    = scheduler.step(pred, t, x, eta=eta, generator=generator).prev_sample   (autograd on)

    Args:
        model_fn: a :class:`GuidedModel` (network + conditioning + guider), a network, or a callable
            ``(x_in [B,C,H,W], t) -> prediction`` in the scheduler's ``prediction_type``. Must be deterministic
            (no dropout) for checkpointing.
        scheduler: any Diffusers scheduler; ``set_timesteps(num_inference_steps)`` is called here.
        latents: x_T [B,C,H,W], unscaled unit noise (multiplied by ``init_noise_sigma`` here).
        num_inference_steps: T.
        truncation: which steps keep gradients (default: all steps).
        eta: DDIM eta (0 = deterministic DDIM; only for schedulers whose ``step`` takes ``eta``).
        generator: for the scheduler's own noise (DDIM with eta > 0, ancestral samplers) and for drawing K.
        gradient_checkpointing: checkpoint every kept network call (``use_reentrant=False``).
        keep_mask: explicit per-step mask (overrides ``truncation``; for tests and benchmarks).
        progress: optional wrapper around the timestep iterator (e.g. a pipeline's ``progress_bar``).
        timestep_kwargs: extra arguments of ``scheduler.set_timesteps`` (the dynamic shift ``mu`` of flow
            schedulers with ``use_dynamic_shifting``; see :meth:`SD3Backend.timestep_kwargs`).

    Returns:
        ``(x_0 latents [B,C,H,W], info)`` with ``info = {"keep_mask": [...], "k": number of kept steps,
        "nfe": network evaluations per sample}``.
    """
    truncation = truncation or Truncation(mode="fixed", k=None)
    kwargs = step_kwargs_for(scheduler, eta, generator)
    scheduler.set_timesteps(num_inference_steps, device=latents.device, **(timestep_kwargs or {}))
    if hasattr(scheduler, "set_begin_index"):  # Euler / flow schedulers count their steps from 0, as the pipelines
        scheduler.set_begin_index(0)
    n_t = len(scheduler.timesteps)  # second-order schedulers list more timesteps than steps
    if keep_mask is None:
        keep_mask = truncation.keep_mask(n_t, generator)
    elif len(keep_mask) != n_t:
        raise ValueError(f"keep_mask has {len(keep_mask)} entries; expected {n_t}")
    if isinstance(model_fn, GuidedModel):
        model, conditioning, guider = model_fn.model, model_fn.conditioning, model_fn.guider
    else:
        try:  # a network of a supported family gets its adapter; any other callable is called as is
            model = adapter_for(model_fn)
        except ValueError:
            model = CallableAdapter(model_fn)
        conditioning, guider = None, None
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    result = denoise(model, scheduler, x, num_inference_steps, conditioning, guider, step_kwargs=kwargs,
                     keep_grad=keep_mask, gradient_checkpointing=gradient_checkpointing, progress=progress)
    return result.sample, {"keep_mask": list(keep_mask), "k": int(sum(keep_mask)), "nfe": result.nfe}


def check_reward(rewards, batch_size: int, name: str = "reward") -> torch.Tensor:
    """Validate a reward's output: a finite float tensor of shape [batch_size]; else ``ValueError`` naming it."""
    if not torch.is_tensor(rewards):
        raise ValueError(f"{name} must return a torch.Tensor of shape [{batch_size}]; got {type(rewards).__name__}")
    if tuple(rewards.shape) != (batch_size,):
        raise ValueError(f"{name} returned shape {tuple(rewards.shape)}; expected [{batch_size}] (one per image)")
    if not rewards.is_floating_point():
        raise ValueError(f"{name} returned dtype {rewards.dtype}; expected a floating tensor")
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()[:8]
        raise ValueError(f"{name} returned non-finite values (NaN/inf) at indices {bad}")
    return rewards


def class_label_ids(items, num_classes: int | None = None, names: Mapping[str, int] | None = None,
                    key: str = "labels", model_type: str = "class_conditional") -> list[int]:
    """Class indices of labels given as prompts: integers (or their strings) and, for a model with class names
    (DiT's ImageNet ``id2label``, as ``DiTPipeline.labels``: name -> index), names.

    Args:
        items: the prompts (strings or ints).
        num_classes: labels must lie in ``0 .. num_classes - 1`` (None: only ``>= 0`` is checked).
        names: name -> index; None when the family takes integer labels only (the digits UNet), ``{}`` for a model
            without names.
        key, model_type: named in the error (the config key and the family).
    Raises:
        ValueError: naming the bad items and what is allowed.
    """
    labels = []
    for p in items:
        text = str(p).strip()
        try:
            labels.append(int(text))
            continue
        except ValueError:
            pass
        if names and text in names:
            labels.append(int(names[text]))
        elif names is None:
            raise ValueError(f"{key}: {p!r} is not a class label; model_type={model_type} takes integer labels "
                             "as prompts") from None
        elif names:
            known = ", ".join(list(names)[:8]) + (" ..." if len(names) > 8 else "")
            raise ValueError(f"{key}: {p!r} is neither a class index nor a class name of this model; model_type="
                             f"{model_type} takes indices 0..{num_classes - 1 if num_classes else 'N-1'} or names "
                             f"(pipe.labels: {known})") from None
        else:
            raise ValueError(f"{key}: {p!r} is not a class index, and this model has no class names (no id2label); "
                             f"model_type={model_type} takes indices "
                             f"0..{num_classes - 1 if num_classes else 'N-1'}") from None
    bad = [v for v in labels if v < 0 or (num_classes is not None and v >= num_classes)]
    if bad:
        allowed = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise ValueError(f"{key}: labels {bad[:8]} out of range; allowed {allowed}")
    return labels


# ---------------------------------------------------------------------------------------------------------------
# Model back-ends: what the trainer needs from each model family. A backend encodes the prompts (or labels) into a
# Conditioning (both CFG branches), gives the latent shape and the scheduler's set_timesteps arguments, wraps the
# network (possibly DDP-wrapped, LoRA-injected) with its adapter under CFG(w), and decodes latents to [0, 1].
# ---------------------------------------------------------------------------------------------------------------
class ClassConditionalBackend:
    """A class-conditional pixel-space ``UNet2DModel`` (``gen.models.digits_unet``; null class = num_classes).

    Conditions are integer labels; images are x_0 mapped from [-1, 1] to [0, 1].

    Args:
        unet: the (possibly LoRA-injected, possibly DDP-wrapped) UNet called in ``model_fn``.
        config_unet: the unwrapped UNet (for its config).
        scheduler: a Diffusers scheduler.
        guidance_scale: CFG weight w (``uncond + w (cond - uncond)``); 1 = no unconditional pass.
    """

    family = "class_conditional"

    def __init__(self, unet, scheduler, guidance_scale: float = 1.0, config_unet=None):
        self.unet, self.scheduler, self.guidance_scale = unet, scheduler, float(guidance_scale)
        cfg = (config_unet or unet).config
        self.cfg = cfg
        if cfg.num_class_embeds is None:
            raise ValueError("ClassConditionalBackend needs a class-conditional UNet (num_class_embeds is None)")
        self.num_classes = cfg.num_class_embeds - 1

    def encode(self, prompts, device) -> torch.Tensor:
        labels = torch.as_tensor([int(p) for p in prompts], dtype=torch.long)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"labels out of range: {bad.tolist()[:8]}; allowed 0..{self.num_classes - 1}")
        return labels.to(device)

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        s = self.cfg.sample_size
        size = tuple(s) if isinstance(s, (tuple, list)) else (s, s)
        return (batch, self.cfg.in_channels, *size)

    def timestep_kwargs(self, shape) -> dict:
        return {}

    def model_fn(self, cond: torch.Tensor) -> GuidedModel:
        """The network with labels ``cond`` (and the null class) under ``CFG(guidance_scale)``."""
        adapter = ClassUNetAdapter(self.unet)
        return GuidedModel(adapter, adapter.class_conditioning(cond), CFG(guidance_scale=self.guidance_scale))

    def decode(self, latents: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
        return (latents / 2 + 0.5).clamp(0, 1)


class LatentTextBackend:
    """What the latent families share (the text-to-image ones and DiT): the image size, the latent shape, the guided
    network and the VAE decode (optionally checkpointed, so the decoder's activations are recomputed in backward
    instead of kept).

    Subclasses set ``adapter_class`` and implement :meth:`encode` and :meth:`to_vae_latents`.

    Args:
        network: the denoiser called while sampling (LoRA-injected, possibly DDP-wrapped).
        vae: the ``AutoencoderKL``.
        scheduler: a Diffusers scheduler.
        guidance_scale: CFG weight w; 1 = no unconditional pass (and no negative prompt is encoded).
        resolution: image side in pixels (default: the network's ``sample_size`` times the VAE factor).
        config_net: the unwrapped network (for its config) when ``network`` is wrapped.
        multiple: the latent side must divide by this (a transformer's patch size).
    """

    family = "text"
    adapter_class: type = UNetTextAdapter

    def __init__(self, network, vae, scheduler, guidance_scale: float, resolution: int | None = None,
                 config_net=None, multiple: int = 1):
        self.network, self.vae, self.scheduler = network, vae, scheduler
        self.guidance_scale = float(guidance_scale)
        self.cfg = (config_net or network).config
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or self.cfg.sample_size * self.vae_scale_factor)
        step = self.vae_scale_factor * multiple
        if self.resolution < step or self.resolution % step:
            what = f"the VAE factor {self.vae_scale_factor}" + (f" x patch size {multiple}" if multiple > 1 else "")
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of {step} ({what})")

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0

    def encode(self, prompts, device) -> Conditioning:
        raise NotImplementedError

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        s = self.resolution // self.vae_scale_factor
        return (batch, self.cfg.in_channels, s, s)

    def timestep_kwargs(self, shape) -> dict:
        """Extra ``scheduler.set_timesteps`` arguments for latents of ``shape`` (none by default)."""
        return {}

    def model_fn(self, cond: Conditioning) -> GuidedModel:
        """The network with the encoded prompts under ``CFG(guidance_scale)`` (the core's guider, not inline)."""
        return GuidedModel(self.adapter_class(self.network), cond, CFG(guidance_scale=self.guidance_scale))

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Un-normalise the denoiser's latents for ``vae.decode`` (the family's scaling/shift)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1]: ``(vae.decode(to_vae_latents(z)) / 2 + 0.5).clamp(0, 1)``, the VAE call
        checkpointed when asked. A float32 VAE decodes in float32 even under an fp16 autocast (SDXL's VAE, kept in
        float32 because it overflows in float16, as Diffusers' ``force_upcast``)."""
        vae = self.vae

        def dec(z):
            z = z.to(vae.dtype)
            if vae.dtype == torch.float32 and torch.is_autocast_enabled(z.device.type):
                with torch.autocast(z.device.type, enabled=False):
                    return vae.decode(z).sample
            return vae.decode(z).sample

        z = self.to_vae_latents(latents)
        img = checkpoint(dec, z, use_reentrant=False) if gradient_checkpointing and torch.is_grad_enabled() else dec(z)
        return (img.float() / 2 + 0.5).clamp(0, 1)


class StableDiffusionBackend(LatentTextBackend):
    """Stable Diffusion 1.x/2.x parts (UNet2DConditionModel, AutoencoderKL, CLIP text encoder + tokenizer).

    Prompts are encoded without gradients; classifier-free guidance with the embedding of ``negative_prompt``
    (default the empty prompt); images are the VAE decoding of ``z / scaling_factor`` mapped to [0, 1].
    """

    family = "stable_diffusion"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, guidance_scale: float = 7.5,
                 negative_prompt: str | None = "", resolution: int | None = None, config_unet=None):
        super().__init__(unet, vae, scheduler, guidance_scale, resolution, config_unet)
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.negative_prompt = "" if negative_prompt is None else negative_prompt

    @torch.no_grad()
    def _embed(self, prompts, device):
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    def encode(self, prompts, device) -> Conditioning:
        """Text embeddings of ``prompts`` and, when guided, of ``negative_prompt`` (the unconditional branch)."""
        cond = self._embed(prompts, device)
        if not self.guided:
            return Conditioning(cond={"encoder_hidden_states": cond})
        neg = self._embed([self.negative_prompt], device).expand(len(prompts), -1, -1)
        return Conditioning(cond={"encoder_hidden_states": cond}, uncond={"encoder_hidden_states": neg})

    def to_vae_latents(self, latents):
        return latents / self.vae.config.scaling_factor


class StableDiffusionXLBackend(LatentTextBackend):
    """SDXL (Podell et al. 2023): the pipeline's own prompt encoding (two CLIP encoders; pooled embedding of the
    second) and micro-conditioning time ids, as ``pipelines.GuidedStableDiffusionXLPipeline``.

    Branches (each ``[B, ...]``): ``encoder_hidden_states`` [B, L, 2048], ``text_embeds`` [B, 1280] and ``time_ids``
    [B, 6] = (resolution, resolution, 0, 0, resolution, resolution). The unconditional branch is ``negative_prompt``;
    with ``negative_prompt=None`` it is zeros when the pipeline config has ``force_zeros_for_empty_prompt`` (SDXL
    base), else the empty prompt, exactly as Diffusers' ``encode_prompt``. Latents are un-normalised with the VAE's
    ``latents_mean``/``latents_std`` when its config has them, else divided by ``scaling_factor``.

    Args:
        pipe: a ``StableDiffusionXLPipeline`` (or our subclass) for its encoders, tokenizers, VAE and config.
        network: the UNet to call (default ``pipe.unet``; the DDP-wrapped one while training).
        scheduler: default ``pipe.scheduler``.
    """

    family = "sdxl"
    adapter_class = UNetTextAdapter

    def __init__(self, pipe, network=None, scheduler=None, guidance_scale: float = 5.0,
                 negative_prompt: str | None = None, resolution: int | None = None):
        super().__init__(network if network is not None else pipe.unet, pipe.vae, scheduler or pipe.scheduler,
                         guidance_scale, resolution, pipe.unet)
        self.pipe, self.negative_prompt = pipe, negative_prompt
        if pipe.unet.config.time_cond_proj_dim is not None:
            raise ValueError("this SDXL UNet embeds the guidance scale (time_cond_proj_dim is set, a guidance-"
                             "distilled model); AlignProp's CFG needs a UNet with a real unconditional branch")

    @torch.no_grad()
    def encode(self, prompts, device) -> Conditioning:
        pipe, n, r = self.pipe, len(prompts), self.resolution
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=self.guided,
            negative_prompt=self.negative_prompt)
        proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((r, r), (0, 0), (r, r), dtype=emb.dtype,
                                          text_encoder_projection_dim=proj).to(device).repeat(n, 1)
        cond = {"encoder_hidden_states": emb, "text_embeds": pooled.to(device), "time_ids": time_ids}
        if not self.guided:
            return Conditioning(cond=cond)
        uncond = {"encoder_hidden_states": neg, "text_embeds": neg_pooled.to(device), "time_ids": time_ids}
        return Conditioning(cond=cond, uncond=uncond)

    def to_vae_latents(self, latents):
        c = self.vae.config
        mean, std = getattr(c, "latents_mean", None), getattr(c, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            return latents * std / c.scaling_factor + mean
        return latents / c.scaling_factor


class SD3Backend(LatentTextBackend):
    """SD3-style rectified-flow transformers (Esser et al. 2024): the pipeline's own prompt encoding (two CLIP
    encoders, optional T5; zeros for T5 without it), ``FlowMatchEulerDiscreteScheduler`` steps with gradients.

    Branches: ``encoder_hidden_states`` [B, 77+L_T5, D] and ``pooled_projections`` [B, D']; the unconditional branch
    is ``negative_prompt`` ("" when None, as Diffusers). The transformer predicts v = eps - x0 at
    x_t = (1 - sigma) x0 + sigma eps, and the Euler step is x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v (autograd on).
    The scheduler's static ``shift`` is in its config; with ``use_dynamic_shifting`` the shift ``mu`` is computed
    from the latent sequence length (:meth:`timestep_kwargs`), as the pipeline. Latents are decoded as
    ``z / scaling_factor + shift_factor``.

    Args:
        pipe: a ``StableDiffusion3Pipeline`` (or our subclass).
        network: the transformer to call (default ``pipe.transformer``).
        max_sequence_length: T5 tokens (zeros without T5).
    """

    family = "sd3"
    adapter_class = SD3Adapter

    def __init__(self, pipe, network=None, scheduler=None, guidance_scale: float = 7.0,
                 negative_prompt: str | None = None, resolution: int | None = None, max_sequence_length: int = 256):
        net = network if network is not None else pipe.transformer
        super().__init__(net, pipe.vae, scheduler or pipe.scheduler, guidance_scale, resolution, pipe.transformer,
                         multiple=pipe.transformer.config.patch_size)
        self.pipe, self.negative_prompt, self.max_sequence_length = pipe, negative_prompt, int(max_sequence_length)

    @torch.no_grad()
    def encode(self, prompts, device) -> Conditioning:
        emb, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=self.guided, negative_prompt=self.negative_prompt,
            max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": emb, "pooled_projections": pooled}
        if not self.guided:
            return Conditioning(cond=cond)
        return Conditioning(cond=cond, uncond={"encoder_hidden_states": neg, "pooled_projections": neg_pooled})

    def timestep_kwargs(self, shape) -> dict:
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        p = self.cfg.patch_size
        seq_len = (shape[-2] // p) * (shape[-1] // p)
        return {"mu": calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))}

    def to_vae_latents(self, latents):
        return latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)


class DiTBackend(LatentTextBackend):
    """Class-conditional DiT (Peebles & Xie 2023): ``DiTTransformer2DModel`` + ``AutoencoderKL`` + its scheduler, as
    ``pipelines.GuidedDiTPipeline`` (Diffusers' ``DiTPipeline``) samples it.

    Conditions are class labels: integers, or class names of the pipeline's ``id2label`` (``pipe.labels``; ImageNet's
    for DiT-XL/2). The unconditional branch is the null class ``num_embeds_ada_norm`` (the core's
    :class:`gen.sampling.DiTAdapter`, which also keeps the noise half of a learned-variance output), combined by
    ``CFG(guidance_scale)``; latents decode as ``vae.decode(z / scaling_factor)`` to [0, 1]. DiT samples at its native
    size only (``sample_size`` latents; its pipeline has no height/width), so ``resolution`` must equal it.

    Args:
        pipe: a ``DiTPipeline`` (or our ``GuidedDiTPipeline``) for its transformer, VAE, scheduler and labels.
        network: the transformer to call (default ``pipe.transformer``; the DDP-wrapped one while training).
        scheduler: default ``pipe.scheduler``.
        guidance_scale: CFG weight w (DiT's default 4.0); 1 = no unconditional pass.
        resolution: None or the native image side ``sample_size x VAE factor``.
    """

    family = "dit"
    adapter_class = DiTAdapter

    def __init__(self, pipe, network=None, scheduler=None, guidance_scale: float = 4.0,
                 resolution: int | None = None):
        net = network if network is not None else pipe.transformer
        super().__init__(net, pipe.vae, scheduler or pipe.scheduler, guidance_scale, resolution, pipe.transformer,
                         multiple=pipe.transformer.config.patch_size)
        native = self.cfg.sample_size * self.vae_scale_factor
        if self.resolution != native:
            raise ValueError(f"resolution {self.resolution} with a DiT: it samples at its native size {native} "
                             f"(sample_size {self.cfg.sample_size} x VAE factor {self.vae_scale_factor}; "
                             "GuidedDiTPipeline has no height/width); leave resolution unset")
        self.pipe = pipe
        self.num_classes = DiTAdapter(pipe.transformer).num_classes
        self.names = dict(getattr(pipe, "labels", None) or {})

    def label_ids(self, prompts, key: str = "labels") -> list[int]:
        """Class indices of ``prompts`` (indices or names); ``ValueError`` naming a bad one."""
        return class_label_ids(prompts, self.num_classes, self.names, key=key, model_type="dit")

    def encode(self, prompts, device) -> Conditioning:
        """The labels and the null class (the unconditional branch)."""
        labels = torch.tensor(self.label_ids(prompts), dtype=torch.long, device=device)
        return self.adapter_class(self.network).class_conditioning(labels)

    def to_vae_latents(self, latents):
        return latents / self.vae.config.scaling_factor


BACKENDS = {"class_conditional": ClassConditionalBackend, "stable_diffusion": StableDiffusionBackend,
            "sdxl": StableDiffusionXLBackend, "sd3": SD3Backend, "dit": DiTBackend}
