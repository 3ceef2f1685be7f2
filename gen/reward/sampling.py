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

The scheduler step itself is any Diffusers scheduler's ``step`` (DDIM with ``eta`` included), run with autograd on.
Sampling runs the one core of :mod:`gen.sampling` with its keep-gradient mask; classifier-free guidance is the
core's ``gen.guidance.CFG`` (any other guider works too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from gen.guidance import CFG, Guider
from gen.sampling import CallableAdapter, ClassUNetAdapter, Conditioning, UNetTextAdapter, adapter_for, denoise
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

    Returns:
        ``(x_0 latents [B,C,H,W], info)`` with ``info = {"keep_mask": [...], "k": number of kept steps,
        "nfe": network evaluations per sample}``.
    """
    truncation = truncation or Truncation(mode="fixed", k=None)
    kwargs = step_kwargs_for(scheduler, eta, generator)
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
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


# ---------------------------------------------------------------------------------------------------------------
# Model back-ends: what the trainer needs from a class-conditional UNet or a Stable Diffusion pipeline.
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

    def model_fn(self, cond: torch.Tensor) -> GuidedModel:
        """The network with labels ``cond`` (and the null class) under ``CFG(guidance_scale)``."""
        adapter = ClassUNetAdapter(self.unet)
        return GuidedModel(adapter, adapter.class_conditioning(cond), CFG(guidance_scale=self.guidance_scale))

    def decode(self, latents: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
        return (latents / 2 + 0.5).clamp(0, 1)


class StableDiffusionBackend:
    """Stable Diffusion parts (UNet2DConditionModel, AutoencoderKL, CLIP text encoder + tokenizer).

    Prompts are encoded without gradients; classifier-free guidance with the embedding of ``negative_prompt``
    (default the empty prompt); images are the VAE decoding mapped to [0, 1].
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, guidance_scale: float = 7.5,
                 negative_prompt: str = "", resolution: int | None = None, config_unet=None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler, self.guidance_scale, self.negative_prompt = scheduler, float(guidance_scale), negative_prompt
        self.cfg = (config_unet or unet).config
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = resolution or self.cfg.sample_size * self.vae_scale_factor
        if self.resolution % self.vae_scale_factor:
            raise ValueError(f"resolution {self.resolution} must be divisible by the VAE factor "
                             f"{self.vae_scale_factor}")

    @torch.no_grad()
    def _embed(self, prompts, device):
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    def encode(self, prompts, device) -> Conditioning:
        """Text embeddings of ``prompts`` and, when guided, of ``negative_prompt`` (the unconditional branch)."""
        cond = self._embed(prompts, device)
        if self.guidance_scale == 1.0:
            return Conditioning(cond={"encoder_hidden_states": cond})
        neg = self._embed([self.negative_prompt], device).expand(len(prompts), -1, -1)
        return Conditioning(cond={"encoder_hidden_states": cond}, uncond={"encoder_hidden_states": neg})

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        s = self.resolution // self.vae_scale_factor
        return (batch, self.cfg.in_channels, s, s)

    def model_fn(self, cond: Conditioning) -> GuidedModel:
        """The UNet with the encoded prompts under ``CFG(guidance_scale)``."""
        return GuidedModel(UNetTextAdapter(self.unet), cond, CFG(guidance_scale=self.guidance_scale))

    def decode(self, latents: torch.Tensor, gradient_checkpointing: bool = False) -> torch.Tensor:
        z = latents / self.vae.config.scaling_factor

        def dec(z):
            return self.vae.decode(z.to(self.vae.dtype)).sample

        img = checkpoint(dec, z, use_reentrant=False) if gradient_checkpointing and torch.is_grad_enabled() else dec(z)
        return (img.float() / 2 + 0.5).clamp(0, 1)
