"""One-step class-conditional DiT student (f-distill of a DiT teacher): one transformer evaluation per image (the
noise half of a learned-variance output), then the VAE decode.

Subclasses :class:`pipelines.GuidedDiTPipeline` (labels by index or name, ``id2label``, the decode, loading) with
the settings of :class:`pipelines.one_step.OneStepMixin`.
"""

from __future__ import annotations

import torch

from gen.sampling import DiTAdapter
from gen.sampling.pipeline import check_generator, check_output_type, images_to_output, initial_noise

from .guided_dit import OUTPUT_TYPES, GuidedDiTPipeline
from .one_step import OneStepMixin, OneStepPipelineOutput


class OneStepDiTPipeline(OneStepMixin, GuidedDiTPipeline):
    """Sample a DiT one-step student.

    Example:
        >>> pipe = OneStepDiTPipeline.from_pretrained("runs/dit-fdistill-js")
        >>> out = pipe(class_labels=pipe.get_label_ids(["white shark", "umbrella"]), output_type="np")

    Args:
        transformer, vae, scheduler, id2label: as ``DiTPipeline`` (``transformer``: the student; ``scheduler``: the
            teacher's); ``id2label`` is saved in ``model_index.json`` here, so the label names load back.
        generator_timestep, generator_prediction: see :class:`pipelines.OneStepPipeline`.
    """

    def __init__(self, transformer, vae, scheduler, id2label: dict | None = None, generator_timestep: int = 999,
                 generator_prediction: str = "scheduler"):
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        self._register_one_step(generator_timestep, generator_prediction)
        if id2label:
            self.register_to_config(id2label={str(k): v for k, v in id2label.items()})

    @torch.no_grad()
    def __call__(
        self,
        class_labels=None,
        num_inference_steps: int = 1,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        batch_size: int | None = None,
        return_dict: bool = True,
        prompt=None,
    ):
        """Generate images of the given classes with one transformer evaluation each.

        Args:
            class_labels: int, label name (``pipe.labels``) or a 1-D list/array/tensor of them; None with
                ``batch_size`` gives null-class samples.
            num_inference_steps, guidance_scale: must be 1 (see :class:`pipelines.OneStepPipeline`).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            latents: optional unit noise ``[N, C, S, S]``.
            prompt: not accepted (a ``ValueError``): DiT is class-conditional.
        Returns:
            ``OneStepPipelineOutput(images, nfe=1)`` or a tuple ``(images, 1)``.
        """
        self._check_one_step(num_inference_steps, guidance_scale)
        adapter = DiTAdapter(self.transformer)
        adapter.check_condition(prompt=prompt, class_labels=class_labels)
        labels, batch = self._labels(class_labels, batch_size, adapter.num_classes, adapter.null_class)
        check_output_type(output_type, OUTPUT_TYPES)
        check_generator(generator, batch)
        device, dtype = self._execution_device, self.transformer.dtype
        cfg = self.transformer.config
        z = initial_noise((batch, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator, latents, device,
                          dtype)
        x0 = self._generate(self.transformer, z, {"class_labels": labels.to(device)})
        if output_type == "latent":
            images = x0
        else:
            decoded = self.vae.decode(x0 / self.vae.config.scaling_factor).sample
            images = images_to_output(self, (decoded / 2 + 0.5).clamp(0, 1), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, 1
        return OneStepPipelineOutput(images=images, nfe=1)
