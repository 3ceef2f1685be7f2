"""Class-conditional DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") with any `gen` guider,
sampling through the one core of :mod:`gen.sampling`.

Subclasses Diffusers' ``DiTPipeline`` (so ``id2label`` / ``get_label_ids`` and loading work as there). The
unconditional branch is the null class ``num_embeds_ada_norm`` (1000 for ImageNet; Diffusers hard-codes 1000), the
row DiT's label embedding keeps for label dropout. A learned-variance transformer (``out_channels = 2 x
in_channels``) keeps its first half, the noise prediction, as Diffusers does; guidance acts on all latent channels
(Diffusers' choice; the original DiT code guided only the first three).

``load_lora_weights`` (``pipelines.lora.TransformerLoraLoaderMixin``; Diffusers' ``DiTPipeline`` has none) loads a
Diffusers-format LoRA with ``transformer.`` keys, such as the one ``train/alignprop.py --model_type dit`` writes.

With ``guidance_scale=w`` (or ``guider=CFG(w)``) and ``w > 1`` the images equal ``DiTPipeline``'s
(``tests/test_families.py``). Differences: ``w < 1`` is CFG(w) here (Diffusers turns guidance off for w <= 1); the
initial noise is scaled by the scheduler's ``init_noise_sigma`` (1 for DiT's DDIM; Diffusers' DiT omits it, which
matters only for schedulers such as Euler).
"""

from __future__ import annotations

import torch
from diffusers import DiTPipeline

from gen.guidance import Guider
from gen.sampling import DiTAdapter, denoise, scheduler_step_kwargs
from gen.sampling.pipeline import (
    check_generator,
    check_steps,
    class_labels_tensor,
    guarded_from_pretrained,
    images_to_output,
    initial_noise,
    nfe_value,
    resolve_guider,
    step_end_callback,
)

from .class_conditional import ClassConditionalPipelineOutput
from .lora import TransformerLoraLoaderMixin

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class GuidedDiTPipeline(TransformerLoraLoaderMixin, DiTPipeline):
    """Class-conditional DiT with a pluggable guider; ``load_lora_weights`` reads ``transformer.`` LoRA files.

    Example:
        >>> from gen.guidance import APG
        >>> pipe = GuidedDiTPipeline.from_pretrained("facebook/DiT-XL-2-256")
        >>> ids = pipe.get_label_ids(["white shark", "umbrella"])
        >>> out = pipe(class_labels=ids, num_inference_steps=25, guider=APG(guidance_scale=4, eta=0.0))
    """

    _callback_tensor_inputs = ["latents"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a hub id; a missing or broken local folder raises ``ValueError``."""
        return guarded_from_pretrained(super().from_pretrained, pretrained_model_name_or_path, **kwargs)

    def _labels(self, class_labels, batch_size, num_classes, null_class):
        if isinstance(class_labels, str):
            class_labels = [class_labels]
        if isinstance(class_labels, (list, tuple)) and any(isinstance(c, str) for c in class_labels):
            unknown = [c for c in class_labels if isinstance(c, str) and c not in self.labels]
            if unknown:
                known = ", ".join(list(self.labels)[:8]) + (" ..." if len(self.labels) > 8 else "")
                raise ValueError(f"unknown class names {unknown[:8]} in class_labels; known (pipe.labels): "
                                 f"{known or 'none (this pipeline has no id2label)'}")
            class_labels = [self.labels[c] if isinstance(c, str) else c for c in class_labels]
        return class_labels_tensor(class_labels, num_classes, batch_size, null_class)

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        batch_size: int | None = None,
        guider: Guider | None = None,
        prompt=None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Generate images of the given classes.

        Args:
            class_labels: int, label name (``pipe.labels``) or a 1-D list/array/tensor of them in
                ``[0, num_embeds_ada_norm)``; None with ``batch_size`` gives null-class samples.
            guidance_scale: CFG weight ``w`` when no guider is given (default 4.0): ``uncond + w (cond - uncond)``.
            generator: torch generator(s) for the initial noise and stochastic schedulers.
            num_inference_steps: scheduler steps.
            output_type: ``"pil"``, ``"np"`` (``[N,H,W,3]`` in [0, 1]), ``"pt"`` (``[N,3,H,W]`` in [0, 1]) or
                ``"latent"``.
            eta: DDIM stochasticity (ignored by schedulers without it).
            latents: optional initial noise ``[N, C, S, S]`` (unscaled).
            guider: a ``gen.guidance.Guider``; reset at the start of every call.
            prompt: not accepted (a ``ValueError``): DiT is class-conditional.
            callback_on_step_end: ``f(pipe, step, timestep, {"latents": x}) -> dict`` after each step.
        Returns:
            ``ClassConditionalPipelineOutput(images, nfe)`` or a tuple ``(images, nfe)``.
        """
        # 0. arguments
        adapter = DiTAdapter(self.transformer)
        adapter.check_condition(prompt=prompt, class_labels=class_labels)
        labels, batch = self._labels(class_labels, batch_size, adapter.num_classes, adapter.null_class)
        guider = resolve_guider(guidance_scale, guider, default_scale=4.0)
        steps = check_steps(num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}")
        check_generator(generator, batch)
        on_step_end = step_end_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        device, dtype = self._execution_device, self.transformer.dtype
        conditioning = adapter.class_conditioning(labels.to(device))

        # 1. timesteps and initial noise
        self.scheduler.set_timesteps(steps, device=device)
        cfg = self.transformer.config
        x = initial_noise((batch, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator, latents, device,
                          dtype, getattr(self.scheduler, "init_noise_sigma", 1.0))

        # 2. the sampling core: guided noise prediction (learned variance dropped by the adapter) -> scheduler step
        result = denoise(adapter, self.scheduler, x, steps, conditioning, guider,
                         step_kwargs=scheduler_step_kwargs(self.scheduler, eta, generator),
                         progress=self.progress_bar, on_step_end=on_step_end)

        # 3. decode to [0, 1]
        if output_type == "latent":
            images = result.sample
        else:
            decoded = self.vae.decode(result.sample / self.vae.config.scaling_factor).sample
            images = images_to_output(self, (decoded / 2 + 0.5).clamp(0, 1), output_type)
        self.maybe_free_model_hooks()
        nfe = nfe_value(result.nfe)
        if not return_dict:
            return images, nfe
        return ClassConditionalPipelineOutput(images=images, nfe=nfe)
