"""One-step generation with a distilled student (f-distill, Xu, Nie & Vahdat 2025; DMD, Yin et al. 2024).

The student is a network of the teacher's architecture evaluated once on pure noise ``z`` at the generator
timestep ``t_g``; its output, read in the teacher's prediction space, is converted to the sample through the
family's conversion (:func:`gen.distill.one_step_generate`: ``x0 = (z - sigma_tg eps_hat) / alpha_tg`` for epsilon
prediction, ``x0 = z - sigma v`` for rectified flow, ``E[x1 | z]`` for an interpolant). No scheduler loop: the
scheduler only supplies the prediction space at ``t_g``. Class-conditional students (a ``UNet2DModel`` with class
embeddings, with a VP or a one-sided interpolant scheduler) take ``class_labels``; SD 1.x/2.x students (a
``UNet2DConditionModel`` with ``vae``, ``text_encoder`` and ``tokenizer``) take ``prompt`` and decode the latent
with the VAE. The other families' one-step pipelines (SDXL, SD3, DiT) subclass their family pipelines and share
:class:`OneStepMixin`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from gen import validate
from gen.diffusion import PREDICTION_TYPES
from gen.distill.spaces import one_step_generate
from gen.sampling.adapters import unwrap_network
from gen.sampling.pipeline import (
    OUTPUT_TYPES,
    ArgumentTypeError,
    check_generator,
    check_output_type,
    images_to_output,
    initial_noise,
    sample_shape,
)

from .class_conditional import ClassConditionalPipeline


@dataclass
class OneStepPipelineOutput(BaseOutput):
    """Images (PIL list, numpy ``[N,H,W,C]`` in [0,1], or torch ``[N,C,H,W]`` in [0,1]) and ``nfe`` (always 1)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int


class OneStepMixin:
    """What every one-step pipeline shares: the ``generator_timestep`` / ``generator_prediction`` settings (in
    ``model_index.json``), the checks that a call asks for one step without guidance, and the one evaluation."""

    def _register_one_step(self, generator_timestep, generator_prediction: str) -> None:
        validate.choice("generator_prediction", generator_prediction, ("scheduler", *PREDICTION_TYPES))
        n_train = self.scheduler.config.get("num_train_timesteps", 1000)
        generator_timestep = validate.integer("generator_timestep", generator_timestep, 0, int(n_train))
        self.register_to_config(generator_timestep=int(generator_timestep), generator_prediction=generator_prediction)

    @staticmethod
    def _check_one_step(num_inference_steps, guidance_scale) -> None:
        if validate.integer("num_inference_steps", num_inference_steps, 1) != 1:
            raise ValueError(f"a one-step generator takes num_inference_steps=1; got {num_inference_steps!r}")
        if validate.number("guidance_scale", guidance_scale, 0.0) != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale!r}: a one-step student has no guidance at sampling time "
                             "(distil with teacher_guidance_scale instead)")

    def _generate(self, net, latents: torch.Tensor, cond: dict) -> torch.Tensor:
        """x0 of the student ``net`` at pure noise ``latents`` (one network evaluation)."""
        p = self.config.generator_prediction
        return one_step_generate(net, self.scheduler, latents, self.config.generator_timestep, cond,
                                 None if p == "scheduler" else p)


class OneStepPipeline(OneStepMixin, ClassConditionalPipeline):
    """Sample a one-step generator: one network evaluation per image.

    Example:
        >>> pipe = OneStepPipeline.from_pretrained("checkpoints/digits-fdistill-js")
        >>> pipe(class_labels=list(range(10)), output_type="np").images.shape
        (10, 16, 16, 1)

    Args:
        unet: the generator (teacher architecture).
        scheduler: the teacher's scheduler (gives its prediction space at ``generator_timestep``): a Diffusers noise
            scheduler or a one-sided ``InterpolantScheduler`` (a flow teacher, e.g. ``checkpoints/digits-interpolant``).
        vae, text_encoder, tokenizer: for latent text-to-image students; None for pixel-space students.
        generator_timestep: the generator's noise timestep ``t_g`` (0 = data, ``num_train_timesteps`` = noise; the
            network timestep of a flow or interpolant teacher follows from it, see :mod:`gen.distill.spaces`).
        generator_prediction: how its output is read: ``"scheduler"`` (the scheduler's prediction type) or one of
            ``epsilon``, ``sample``, ``v_prediction``, ``flow``.
    """

    _optional_components = ["vae", "text_encoder", "tokenizer"]
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _folder_classes = ("OneStepPipeline",)

    def __init__(self, unet, scheduler, vae=None, text_encoder=None, tokenizer=None, generator_timestep: int = 999,
                 generator_prediction: str = "scheduler", class_names: list[str] | None = None):
        super().__init__(unet=unet, scheduler=scheduler, class_names=class_names)
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("a text-to-image student needs both text_encoder and tokenizer (or neither)")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
        self._register_one_step(generator_timestep, generator_prediction)

    def _check_scheduler(self, scheduler) -> None:
        """A Diffusers noise scheduler, or a one-sided interpolant scheduler (a flow teacher's)."""
        from gen.interpolants.scheduler import InterpolantScheduler

        if isinstance(scheduler, InterpolantScheduler):
            if scheduler.interpolant.kind != "one_sided":
                raise ArgumentTypeError(f"OneStepPipeline needs a one-sided (noise -> data) interpolant scheduler; "
                                        f"this one is {scheduler.interpolant.kind!r}")
            return
        super()._check_scheduler(scheduler)

    def _check_unet(self, unet) -> None:
        from diffusers import UNet2DConditionModel, UNet2DModel

        if not isinstance(unwrap_network(unet), (UNet2DModel, UNet2DConditionModel)):
            raise ArgumentTypeError(f"OneStepPipeline needs a UNet2DModel or UNet2DConditionModel as unet; got "
                                    f"{validate.describe(unet)}")

    @property
    def num_classes(self) -> int | None:
        n = getattr(self.unet.config, "num_class_embeds", None)
        return None if n is None else n - 1

    @property
    def is_text_to_image(self) -> bool:
        return self.text_encoder is not None

    def encode_prompt(self, prompt: list[str], device) -> torch.Tensor:
        tok = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(device))[0]

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        prompt: str | list[str] | None = None,
        batch_size: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 1.0,
        return_dict: bool = True,
    ):
        """Generate images with one network evaluation each.

        Args:
            class_labels: int or 1-D list/tensor in ``[0, num_classes)`` (class-conditional students); None with
                ``batch_size``: null-class samples.
            prompt: str or list of str (text-to-image students).
            generator: torch generator(s) for the noise ``z``.
            output_type: ``"pil"``, ``"np"`` ([N,H,W,C] in [0,1]) or ``"pt"`` ([N,C,H,W] in [0,1]).
            latents: optional noise ``z`` ``[N,C,H,W]``.
            num_inference_steps: must be 1 (accepted so that code written for multi-step pipelines runs).
            guidance_scale: must be 1: guidance, if any, was distilled into the student (``teacher_guidance_scale``).
        Returns:
            ``OneStepPipelineOutput(images, nfe=1)`` or a tuple ``(images, 1)``.
        """
        self._check_one_step(num_inference_steps, guidance_scale)
        check_output_type(output_type, OUTPUT_TYPES)
        batch_size = validate.integer("batch_size", batch_size, 1, allow_none=True)
        device, dtype = self._execution_device, self.unet.dtype
        cond: dict = {}
        if self.is_text_to_image:
            if class_labels is not None:
                raise ValueError("this is a text-to-image student: give prompt, not class_labels")
            if prompt is None:
                raise ValueError("a text-to-image student needs prompt (str or list of str)")
            prompts = validate.prompts("prompt", prompt)
            if batch_size is not None and batch_size != len(prompts):
                raise ValueError(f"batch_size={batch_size} does not match {len(prompts)} prompts")
            batch = len(prompts)
            cond["encoder_hidden_states"] = self.encode_prompt(prompts, device).to(dtype)
        else:
            if prompt is not None:
                raise ValueError("prompt given, but this student has no text encoder; use class_labels")
            labels, batch = self._class_tensor(class_labels, batch_size)
            if labels is not None:
                cond["class_labels"] = labels.to(device)
        check_generator(generator, batch)
        latents = initial_noise(sample_shape(self.unet.config, batch), generator, latents, device, dtype)
        # 1. one network evaluation: z -> x0
        x0 = self._generate(self.unet, latents, cond)
        # 2. decode latents (text-to-image), then [-1, 1] -> [0, 1]
        if self.vae is not None:
            x0 = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
        images = images_to_output(self, (x0.float() / 2 + 0.5).clamp(0, 1), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, 1
        return OneStepPipelineOutput(images=images, nfe=1)
