"""f-distill teachers of every family the sampling core supports: loading, conditioning, real data, export.

=============  ========================================  ==================================  ====================
family         teacher folder (``model_index.json``)      conditioning of a row               one-step pipeline
=============  ========================================  ==================================  ====================
class_unet     ``ClassConditionalPipeline``: class       ``class_labels`` (null: last class)  ``OneStepPipeline``
               ``UNet2DModel`` + VP scheduler
interpolant    ``InterpolantPipeline``: class            ``class_labels``                     ``OneStepPipeline``
               ``UNet2DModel`` + one-sided interpolant    (a flow teacher)                     (interpolant
                                                                                               scheduler)
dit            ``DiTPipeline``: ``DiTTransformer2DModel``  ``class_labels`` (null:               ``OneStepDiT
               + VAE + VP scheduler                        ``num_embeds_ada_norm``)            Pipeline``
sd             ``StableDiffusionPipeline`` (1.x / 2.x)    ``encoder_hidden_states``           ``OneStepPipeline``
sdxl           ``StableDiffusionXLPipeline``              + ``text_embeds``, ``time_ids``      ``OneStepSDXL
                                                                                               Pipeline``
sd3            ``StableDiffusion3Pipeline``: SD3-style    ``encoder_hidden_states``,          ``OneStepSD3
               flow transformer (FlowMatch scheduler)     ``pooled_projections``              Pipeline``
=============  ========================================  ==================================  ====================

Text families draw prompts from a file and encode them with the teacher pipeline's own ``encode_prompt``; their
unconditional branch (teacher CFG, and the real images, which carry no caption) is the empty prompt as the family
pipeline makes it. Latent families (DiT, SD, SDXL, SD3) noise VAE latents: real images are encoded with the
teacher's VAE (its ``shift_factor`` / ``latents_mean`` / ``latents_std`` and ``scaling_factor``), the one-step
pipeline decodes them the family pipeline's way.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

FAMILIES = {
    "class_unet": "class-conditional UNet2DModel (ClassConditionalPipeline folder, e.g. checkpoints/digits-teacher)",
    "interpolant": "class-conditional flow UNet2DModel (one-sided InterpolantPipeline folder, e.g. "
                   "checkpoints/digits-interpolant)",
    "dit": "class-conditional DiT (DiTPipeline, e.g. facebook/DiT-XL-2-256)",
    "sd": "Stable Diffusion 1.x/2.x (StableDiffusionPipeline)",
    "sdxl": "SDXL (StableDiffusionXLPipeline)",
    "sd3": "SD3-style flow transformer (StableDiffusion3Pipeline, e.g. SD3-medium)",
    "toy": "toy:<8gaussians|8gaussians_imbalanced|25gaussians> (an exact 2-D mixture score)",
}
TEXT_FAMILIES = ("sd", "sdxl", "sd3")
LATENT_FAMILIES = ("dit", "sd", "sdxl", "sd3")


def _supported() -> str:
    return "; ".join(f"{k}: {v}" for k, v in FAMILIES.items())


def family_of(index: dict, where: str = "the teacher") -> str:
    """The family of a pipeline folder from its ``model_index.json`` (component classes).

    Raises:
        ValueError: a family f-distill does not support (the message lists the supported ones), or a folder that is
            a one-step student rather than a teacher.
    """
    comps = {k: v[1] for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2 and v[1]}
    name = index.get("_class_name", "?")
    if name.startswith("OneStep"):
        raise ValueError(f"{where} is a one-step student ({name}), not a diffusion teacher; give the teacher's "
                         "folder (a student goes to student_init)")
    denoiser = comps.get("transformer") or comps.get("unet")
    if comps.get("scheduler") == "InterpolantScheduler" and denoiser == "UNet2DModel":
        return "interpolant"
    if denoiser == "SD3Transformer2DModel":
        return "sd3"
    if denoiser == "DiTTransformer2DModel":
        return "dit"
    if denoiser == "UNet2DConditionModel":
        return "sdxl" if "text_encoder_2" in comps else "sd"
    if denoiser == "UNet2DModel" and name not in ("GBMPipeline",) and comps.get("scheduler") != "GBMScheduler":
        return "class_unet"
    raise ValueError(f"{where} ({name} with {denoiser or 'no denoiser'} and {comps.get('scheduler', 'no scheduler')})"
                     f" is not a teacher family f-distill supports; supported: {_supported()}")


def vae_encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Latents of images in [-1, 1] as the family pipelines expect them: ``(z - shift) * scaling`` (SD3's VAE has a
    ``shift_factor``), ``(z - mean) * scaling / std`` for a VAE with ``latents_mean`` / ``latents_std``."""
    cfg = vae.config
    z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample()
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(z)
        std = torch.tensor(std).view(1, -1, 1, 1).to(z)
        return (z - mean) * cfg.scaling_factor / std
    return (z - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor


@dataclasses.dataclass
class Teacher:
    """A loaded teacher: its denoiser, scheduler, the pipeline it came from (text encoders, VAE) and facts the
    objective needs.

    Attributes:
        family: a key of :data:`FAMILIES`.
        net: the denoiser (frozen by the caller).
        scheduler: the teacher's scheduler as loaded (its prediction space; VP teachers: their noise schedule).
        pipe: the pipeline (None for the toy).
        num_classes: classes of a class-conditional teacher (labels ``0 .. num_classes - 1``), else None.
        null_class: the label of its unconditional branch, or None.
    """

    family: str
    net: nn.Module
    scheduler: object
    pipe: object = None
    num_classes: int | None = None
    null_class: int | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample the denoiser sees: ``(C, H, W)`` (pixels or latents)."""
        c = self.net.config
        size = c.sample_size if isinstance(c.sample_size, (tuple, list)) else (c.sample_size, c.sample_size)
        return (c.in_channels, *size)

    @property
    def is_text(self) -> bool:
        return self.family in TEXT_FAMILIES

    @property
    def is_latent(self) -> bool:
        return self.family in LATENT_FAMILIES

    @property
    def image_side(self) -> int:
        """Side of the images the real data must have: the latent side times the VAE factor (latent families)."""
        side = self.sample_shape[-1]
        if self.is_latent:
            side *= 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return side

    # -- conditioning -----------------------------------------------------------------------------------------
    def class_conditioning(self, labels: torch.Tensor) -> tuple[dict, dict | None]:
        if self.num_classes is None:
            return {}, None
        null = None if self.null_class is None else {"class_labels": torch.full_like(labels, self.null_class)}
        return {"class_labels": labels}, null

    @torch.no_grad()
    def text_conditioning(self, prompts: list[str], device) -> tuple[dict, dict]:
        """Both branches' inputs of ``prompts`` (unconditional: the empty prompt) from the pipeline's encode_prompt."""
        pipe, n = self.pipe, len(prompts)
        if self.family == "sd":
            cond, uncond = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=None)
            return {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}
        if self.family == "sdxl":
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt=prompts, device=device,
                                                                     num_images_per_prompt=1,
                                                                     do_classifier_free_guidance=True)
            side = self.image_side
            proj = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                    else pipe.text_encoder_2.config.projection_dim)
            ids = pipe._get_add_time_ids((side, side), (0, 0), (side, side), dtype=cond.dtype,
                                         text_encoder_projection_dim=proj).to(device).repeat(n, 1)
            return ({"encoder_hidden_states": cond, "text_embeds": pooled, "time_ids": ids},
                    {"encoder_hidden_states": uncond, "text_embeds": uncond_pooled, "time_ids": ids})
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                                 device=device, do_classifier_free_guidance=True)
        return ({"encoder_hidden_states": cond, "pooled_projections": pooled},
                {"encoder_hidden_states": uncond, "pooled_projections": uncond_pooled})

    def probe_conditioning(self, device) -> dict:
        """One row of valid conditioning (for a dry forward that sizes the discriminator head)."""
        if self.is_text:
            return self.text_conditioning([""], device)[0]
        if self.num_classes is None:
            return {}
        return {"class_labels": torch.zeros(1, dtype=torch.long, device=device)}

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Real images in [-1, 1] -> what the denoiser noises (VAE latents for latent families)."""
        return vae_encode(self.pipe.vae, images) if self.is_latent else images

    # -- export -----------------------------------------------------------------------------------------------
    def one_step_pipeline(self, student: nn.Module, generator_timestep: int, generator_prediction: str):
        """The family's one-step pipeline around ``student`` (a plain network of the teacher's architecture) with
        the teacher's other components."""
        import pipelines

        comps = dict(self.pipe.components)
        kw = {"generator_timestep": int(generator_timestep), "generator_prediction": generator_prediction}
        if self.family in ("class_unet", "interpolant"):
            names = getattr(self.pipe.config, "class_names", None)
            return pipelines.OneStepPipeline(unet=student, scheduler=comps["scheduler"], class_names=names, **kw)
        if self.family == "sd":
            return pipelines.OneStepPipeline(unet=student, scheduler=comps["scheduler"], vae=comps["vae"],
                                             text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"], **kw)
        if self.family == "dit" and getattr(self.pipe, "labels", None):  # DiTPipeline keeps names, not id2label
            id2label: dict = {}
            for name, i in self.pipe.labels.items():
                id2label.setdefault(str(i), []).append(name)
            kw["id2label"] = {k: ", ".join(v) for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
        cls = {"dit": pipelines.OneStepDiTPipeline, "sdxl": pipelines.OneStepSDXLPipeline,
               "sd3": pipelines.OneStepSD3Pipeline}[self.family]
        key = "unet" if self.family == "sdxl" else "transformer"
        comps[key] = student
        if self.family == "sdxl":
            kw["force_zeros_for_empty_prompt"] = self.pipe.config.get("force_zeros_for_empty_prompt", True)
        return cls(**comps, **kw)


def load_teacher(path: str) -> Teacher:
    """Load the teacher pipeline at ``path`` (a folder or hub id) as a :class:`Teacher`.

    Raises:
        ValueError: an unreadable folder, or a family f-distill does not support (listing the supported ones).
    """
    from diffusers import DiffusionPipeline

    from gen.sampling.pipeline import check_pipeline_folder

    check_pipeline_folder(path)
    try:
        index = DiffusionPipeline.load_config(path)  # model_index.json of a local folder or a hub id
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the teacher pipeline {path!r}: {err}") from err
    family = family_of(index, f"the teacher {path!r}")
    import pipelines

    if family == "class_unet":
        pipe = pipelines.ClassConditionalPipeline.from_pretrained(path)
        n = pipe.unet.config.num_class_embeds
        return Teacher(family, pipe.unet, _vp_scheduler(pipe.scheduler), pipe, None if n is None else n - 1,
                       None if n is None else n - 1)
    if family == "interpolant":
        pipe = pipelines.InterpolantPipeline.from_pretrained(path)
        if pipe.is_bridge:
            raise ValueError(f"the teacher {path!r} is a two-sided bridge (its UNet takes the observation); f-distill "
                             "distils one-sided (noise -> data) interpolants")
        n = pipe.unet.config.num_class_embeds
        return Teacher(family, pipe.unet, pipe.scheduler, pipe, None if n is None else n - 1,
                       None if n is None else n - 1)
    if family == "dit":
        from gen.sampling.adapters import DiTAdapter

        pipe = pipelines.GuidedDiTPipeline.from_pretrained(path)
        adapter = DiTAdapter(pipe.transformer)
        return Teacher(family, pipe.transformer, _vp_scheduler(pipe.scheduler), pipe, adapter.num_classes,
                       adapter.null_class)
    if family == "sd":
        pipe = pipelines.GuidedStableDiffusionPipeline.from_pretrained(path, safety_checker=None,
                                                                       requires_safety_checker=False)
        return Teacher(family, pipe.unet, _vp_scheduler(pipe.scheduler), pipe)
    if family == "sdxl":
        pipe = pipelines.GuidedStableDiffusionXLPipeline.from_pretrained(path)
        return Teacher(family, pipe.unet, _vp_scheduler(pipe.scheduler), pipe)
    pipe = pipelines.GuidedStableDiffusion3Pipeline.from_pretrained(path)
    return Teacher(family, pipe.transformer, pipe.scheduler, pipe)


def _vp_scheduler(scheduler):
    """A DDPM scheduler with the teacher's noise schedule and prediction type (what training noises with; the
    sampling scheduler, e.g. SDXL's Euler, would rescale the network input)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config)


def check_student(teacher: nn.Module, student: nn.Module, what: str) -> None:
    """The student must have the teacher's architecture: the same network class and the same config.

    Raises:
        ValueError: naming the class or the first config key that differs.
    """
    from gen.sampling.adapters import unwrap_network

    t, s = unwrap_network(teacher), unwrap_network(student)
    if type(t) is not type(s):
        raise ValueError(f"{what} is a {type(s).__name__} but the teacher is a {type(t).__name__}: the student must "
                         "have the teacher's architecture")
    tc, sc = dict(t.config), dict(s.config)
    for key in sorted(set(tc) | set(sc)):
        if key.startswith("_"):
            continue
        if tc.get(key) != sc.get(key):
            raise ValueError(f"{what} has {key}={sc.get(key)} but the teacher has {key}={tc.get(key)}; the student "
                             "must have the teacher's architecture")
