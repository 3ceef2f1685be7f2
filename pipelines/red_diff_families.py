"""RED-Diff (Mardani et al., ICLR 2024, Algorithm 1), DPS (Chung et al., ICLR 2023, Algorithm 1) and the
pseudo-inverse with the latent priors of the other model families: SD3-style rectified-flow MMDiTs, class-conditional
DiT and SDXL.

Both pipelines subclass the family's Diffusers pipeline (so hub folders load, and the prompt encoding and label
names are Diffusers' own) and run the one latent loop of :class:`pipelines.red_diff.LatentRedDiffPipeline`
(``InverseProblemMixin._latent_call``): ``mu`` is the latent mean, started at ``E(H^+ y)``; RED-Diff noises it with the
prior scheduler's own ``(alpha_t, sigma_t)`` (flow: ``x_t = (1 - s) mu + s eps``) on a grid spaced by the scheduler
(SD3's ``shift``, or the dynamic ``mu`` of the image size), and the data term ``||y - H(D(mu))||^2`` goes through the
VAE decoder; DPS differentiates ``H(D(x0_hat))`` through decoder and transformer. Only the conditioning differs:

- :class:`RedDiffSD3Pipeline`: ``prompt`` (CLIP-L/G and optional T5 embeddings, pooled projections); guidance
  against the empty prompt. ``class_labels`` is a ``ValueError``.
- :class:`RedDiffDiTPipeline`: ``class_labels`` (ints or ``pipe.labels`` names; default the null class
  ``num_embeds_ada_norm``, i.e. the unconditional prior); guidance against the null class. ``prompt`` is a
  ``ValueError``.
- :class:`RedDiffSDXLPipeline`: ``prompt`` (two CLIP encoders, the pooled ``text_embeds`` and the micro-conditioning
  ``time_ids`` of the image size); the unconditional branch is Diffusers' SDXL one (zeros with
  ``force_zeros_for_empty_prompt``, else the empty prompt).

The solver state (RED-Diff's ``mu`` and its Adam moments, DPS's latents) and the data term are float32 whatever the
networks' dtype. SDXL's VAE overflows in float16: load a float32 VAE (or a float16-safe one) for it.
"""

from __future__ import annotations

import torch
from diffusers import DiTPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from gen import validate
from gen.inverse import Operator
from gen.sampling import Conditioning, DiTAdapter, SD3Adapter, UNetTextAdapter, unwrap_network
from gen.sampling.pipeline import ArgumentTypeError, class_labels_tensor

from .red_diff import InverseProblemMixin, check_prior_scheduler


def _check_network(net, cls, pipeline: str, hint: str) -> None:
    if not isinstance(unwrap_network(net), cls):
        raise ArgumentTypeError(f"{pipeline} needs a {cls.__name__} as transformer; got {validate.describe(net)}"
                                f"{hint}")


class RedDiffSD3Pipeline(InverseProblemMixin, StableDiffusion3Pipeline):
    """Inverse problems with an SD3-style prior (``SD3Transformer2DModel`` + ``FlowMatchEulerDiscreteScheduler``);
    the operator acts on decoded images ``[B, 3, H, W]`` in [-1, 1].

    Example:
        >>> pipe = RedDiffSD3Pipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers",
        ...                                           text_encoder_3=None, tokenizer_3=None)
        >>> op = SuperResolution(4, kind="bicubic", sigma_y=0.01)
        >>> out = pipe(op.measure(x), op, prompt="a photo of a cat", method="reddiff", num_inference_steps=50)
    """

    _prior_attr = "transformer"
    _optional_components = ["image_encoder", "feature_extractor", "text_encoder_3", "tokenizer_3"]
    _folder_classes = ("RedDiffSD3Pipeline", "StableDiffusion3Pipeline", "GuidedStableDiffusion3Pipeline")

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None):
        from diffusers import SD3Transformer2DModel

        _check_network(transformer, SD3Transformer2DModel, "RedDiffSD3Pipeline",
                       " (SD 1.x/2.x UNets: LatentRedDiffPipeline; DiT: RedDiffDiTPipeline)")
        check_prior_scheduler(scheduler, "RedDiffSD3Pipeline")
        super().__init__(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                         text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=image_encoder,
                         feature_extractor=feature_extractor)

    def _shift_mu(self, latent_shape) -> float | None:
        """The dynamic shift ``mu`` of the latent sequence length when the scheduler has ``use_dynamic_shifting``
        (as ``StableDiffusion3Pipeline``), else None (the static ``shift`` of its config applies)."""
        cfg = self.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return None
        p = self.transformer.config.patch_size
        seq_len = (latent_shape[-2] // p) * (latent_shape[-1] // p)
        return calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                               cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))

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
        noise_max: float | None = None,
        noise_min: float | None = None,
        zeta: float = 1.0,
        x_init: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback=None,
        guidance_scale: float = 1.0,
        guider=None,
        max_sequence_length: int = 256,
        class_labels=None,
    ):
        """Restore images from a measurement of ``[B, 3, height, width]`` images in [-1, 1].

        Args are those of :meth:`pipelines.RedDiffPipeline.__call__` (the RED-Diff grid as noise fractions
        ``noise_max``/``noise_min``, spaced by the scheduler's shift), plus ``prompt`` (one string, or one per
        measurement; guidance runs against the empty prompt), ``max_sequence_length`` (T5 tokens, zeros without T5)
        and ``x_init`` (an initial image, encoded to the initial latent). DPS runs the flow scheduler's Euler steps
        (deterministic: DDIM's ``eta`` has no meaning here). ``class_labels`` is refused: SD3 is text-conditional.
        """
        adapter = SD3Adapter(self.transformer)
        adapter.check_condition(prompt=prompt, class_labels=class_labels)
        validate.integer("max_sequence_length", max_sequence_length, 1)

        def check_condition(batch):
            validate.prompts("prompt", prompt, batch=batch)

        def conditioning(batch, device):
            texts = validate.prompts("prompt", prompt, batch=batch)
            cond, uncond, pooled, uncond_pooled = self.encode_prompt(
                prompt=texts, prompt_2=None, prompt_3=None, negative_prompt=[""] * batch, device=device,
                do_classifier_free_guidance=True, num_images_per_prompt=1, max_sequence_length=max_sequence_length)
            return Conditioning(cond={"encoder_hidden_states": cond, "pooled_projections": pooled},
                                uncond={"encoder_hidden_states": uncond, "pooled_projections": uncond_pooled})

        return self._latent_call(adapter, conditioning, measurement, operator, method, num_inference_steps, lr, lam,
                                 weighting, obs_weight, None, None, noise_max, noise_min, zeta, 0.0, x_init, height,
                                 width, generator, output_type, return_dict, callback, guidance_scale, guider,
                                 check_condition, shift_mu_fn=self._shift_mu,
                                 size_multiple=self.transformer.config.patch_size)


class RedDiffDiTPipeline(InverseProblemMixin, DiTPipeline):
    """Inverse problems with a class-conditional DiT prior (``DiTTransformer2DModel`` + VAE + its scheduler); the
    operator acts on decoded images ``[B, 3, H, W]`` in [-1, 1].

    Example:
        >>> pipe = RedDiffDiTPipeline.from_pretrained("facebook/DiT-XL-2-256")
        >>> op = Inpainting.box((256, 256), 96, sigma_y=0.01)
        >>> out = pipe(op.measure(x), op, class_labels=["golden retriever"], method="reddiff", t_max=500)
    """

    _prior_attr = "transformer"
    _folder_classes = ("RedDiffDiTPipeline", "DiTPipeline", "GuidedDiTPipeline")

    def __init__(self, transformer, vae, scheduler, id2label: dict[int, str] | None = None):
        from diffusers import DiTTransformer2DModel

        _check_network(transformer, DiTTransformer2DModel, "RedDiffDiTPipeline",
                       " (SD3-style transformers: RedDiffSD3Pipeline; UNets: RedDiffPipeline, LatentRedDiffPipeline)")
        check_prior_scheduler(scheduler, "RedDiffDiTPipeline")
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)

    def _labels(self, class_labels, batch: int, adapter: DiTAdapter) -> torch.Tensor:
        """``[B]`` labels from ints or ``pipe.labels`` names; None gives the null class (the unconditional prior)."""
        if class_labels is None:
            if adapter.null_class is None:
                raise ValueError("this DiT has no null class row: give class_labels")
            return torch.full((batch,), adapter.null_class, dtype=torch.long)
        if isinstance(class_labels, (int, str)) and not isinstance(class_labels, bool):
            class_labels = [class_labels] * batch
        if isinstance(class_labels, (list, tuple)) and any(isinstance(c, str) for c in class_labels):
            unknown = [c for c in class_labels if isinstance(c, str) and c not in self.labels]
            if unknown:
                raise ValueError(f"unknown class names {unknown[:8]} in class_labels; known: pipe.labels "
                                 f"({len(self.labels)} names)")
            class_labels = [self.labels[c] if isinstance(c, str) else c for c in class_labels]
        labels, n = class_labels_tensor(class_labels, adapter.num_classes, None, adapter.null_class)
        if n != batch:
            raise ValueError(f"class_labels: got {n} labels for {batch} measurements; give one, or one per "
                             "measurement")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        measurement: torch.Tensor,
        operator: Operator,
        class_labels=None,
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
        prompt=None,
    ):
        """Restore images from a measurement of ``[B, 3, height, width]`` images in [-1, 1].

        Args are those of :meth:`pipelines.RedDiffPipeline.__call__`, plus ``class_labels`` (an int or name for
        all, or one per measurement; default the null class, i.e. the unconditional prior; guidance runs against the
        null class). ``prompt`` is refused: DiT is class-conditional.
        """
        adapter = DiTAdapter(self.transformer)
        adapter.check_condition(prompt=prompt, class_labels=class_labels)
        labels = {}

        def check_condition(batch):
            labels["value"] = self._labels(class_labels, batch, adapter)

        def conditioning(batch, device):
            return adapter.class_conditioning(labels["value"].to(device))

        return self._latent_call(adapter, conditioning, measurement, operator, method, num_inference_steps, lr, lam,
                                 weighting, obs_weight, t_max, t_min, noise_max, noise_min, zeta, eta, x_init, height,
                                 width, generator, output_type, return_dict, callback, guidance_scale, guider,
                                 check_condition, size_multiple=self.transformer.config.patch_size)


class RedDiffSDXLPipeline(InverseProblemMixin, StableDiffusionXLPipeline):
    """Inverse problems with an SDXL prior (``UNet2DConditionModel`` with the ``text_time`` embedding, any VP
    scheduler); the operator acts on decoded images ``[B, 3, H, W]`` in [-1, 1].

    Example:
        >>> pipe = RedDiffSDXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
        >>> out = pipe(op.measure(x), op, prompt="a photo of a cat", method="reddiff", t_max=500)
    """

    _folder_classes = ("RedDiffSDXLPipeline", "StableDiffusionXLPipeline", "GuidedStableDiffusionXLPipeline")

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, force_zeros_for_empty_prompt: bool = True,
                 add_watermarker: bool | None = None):
        from diffusers import UNet2DConditionModel

        _check_network(unet, UNet2DConditionModel, "RedDiffSDXLPipeline",
                       " (SD3-style transformers: RedDiffSD3Pipeline; DiT: RedDiffDiTPipeline)")
        if unet.config.addition_embed_type != "text_time":
            raise ValueError("RedDiffSDXLPipeline needs an SDXL UNet (addition_embed_type='text_time'); this one has "
                             f"{unet.config.addition_embed_type!r} (SD 1.x/2.x: LatentRedDiffPipeline)")
        if unet.config.time_cond_proj_dim is not None:
            raise ValueError("this UNet embeds the guidance scale (time_cond_proj_dim is set, a guidance-distilled "
                             "model): it has no plain prior branch")
        check_prior_scheduler(scheduler, "RedDiffSDXLPipeline")
        super().__init__(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
                         feature_extractor=feature_extractor,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)

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

        Args are those of :meth:`pipelines.RedDiffPipeline.__call__`, plus ``prompt`` (one string, or one per
        measurement) and ``x_init`` (an initial image, encoded to the initial latent); the ``time_ids`` are the
        image size (original = target, no crop). ``class_labels`` is refused: SDXL is text-conditional.
        """
        adapter = UNetTextAdapter(self.unet)
        adapter.check_condition(prompt=prompt, class_labels=class_labels)

        def check_condition(batch):
            validate.prompts("prompt", prompt, batch=batch)

        def conditioning(batch, device):
            texts = validate.prompts("prompt", prompt, batch=batch)
            cond, uncond, pooled, uncond_pooled = self.encode_prompt(
                prompt=texts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
            f = self.vae_scale_factor
            size = self.unet.config.sample_size
            size = (height or size * f, width or size * f)
            proj = int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
            ids = self._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype,
                                         text_encoder_projection_dim=proj).to(device).repeat(batch, 1)
            return Conditioning(cond={"encoder_hidden_states": cond, "text_embeds": pooled.to(device), "time_ids": ids},
                                uncond={"encoder_hidden_states": uncond, "text_embeds": uncond_pooled.to(device),
                                        "time_ids": ids})

        return self._latent_call(adapter, conditioning, measurement, operator, method, num_inference_steps, lr, lam,
                                 weighting, obs_weight, t_max, t_min, noise_max, noise_min, zeta, eta, x_init, height,
                                 width, generator, output_type, return_dict, callback, guidance_scale, guider,
                                 check_condition)
