"""What every `gen` pipeline shares around the sampling core: the guider of a call, label and noise set-up,
Diffusers' ``callback_on_step_end`` convention, output conversion and guarded loading."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from gen.guidance import CFG, Guider

OUTPUT_TYPES = ("pil", "np", "pt")


# --- guidance ---------------------------------------------------------------------------------------------------
def resolve_guider(guidance_scale, guider, default_scale: float = 1.0) -> Guider:
    """The guider of one call: ``guider`` as given, or ``CFG(guidance_scale)`` (``guidance_scale=w`` anywhere means
    ``gen.guidance.CFG(w)``; None means ``default_scale``).

    Raises:
        ValueError: both given (a guider carries its own scale), a non-guider, or a scale that is not a finite
            number >= 0.
    """
    if guider is not None:
        if not isinstance(guider, Guider):
            raise ValueError(f"guider must be a gen.guidance.Guider; got {type(guider).__name__}")
        if guidance_scale is not None and guidance_scale != default_scale:
            raise ValueError("give guidance_scale or guider, not both (the guider carries its own scale)")
        return guider
    scale = default_scale if guidance_scale is None else guidance_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(scale)) or scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0; got {guidance_scale!r}")
    return CFG(guidance_scale=float(scale))


def check_steps(num_inference_steps) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}")
    return int(num_inference_steps)


def check_output_type(output_type, allowed=OUTPUT_TYPES) -> str:
    if output_type not in allowed:
        raise ValueError(f"output_type={output_type!r}; allowed: {', '.join(allowed)}")
    return output_type


def check_generator(generator, batch: int | None = None, allow_list: bool = True):
    """``ValueError`` for a generator that is not a ``torch.Generator`` (or a list of one per sample)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, list) and allow_list and all(isinstance(g, torch.Generator) for g in generator):
        if batch is not None and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}; give one, or one per image")
        return generator
    what = "a torch.Generator or a list of them" if allow_list else "one torch.Generator"
    raise ValueError(f"generator must be {what}; got {type(generator).__name__} "
                     "(seed with torch.Generator().manual_seed(n))")


# --- labels -----------------------------------------------------------------------------------------------------
def check_conditioning_kind(kind: str, prompt=None, class_labels=None) -> None:
    """``ValueError`` for prompts given to a class-conditional model or class labels given to a text model."""
    if kind == "class" and prompt is not None:
        raise ValueError("prompt given, but this is a class-conditional model: give class_labels (class indices"
                         " or names), not prompt")
    if kind == "text" and class_labels is not None:
        raise ValueError("class_labels given, but this is a text-conditioned model: give prompt, not class_labels")


def class_labels_tensor(class_labels, num_classes: int | None, batch_size=None, null_class: int | None = None,
                        class_names: list[str] | None = None):
    """``(labels [B] long or None, batch)`` from user input.

    ``class_labels`` is an int, a class name (when ``class_names`` is known), or a 1-D sequence/array/tensor of
    them; None with ``batch_size`` gives null-class samples (or unconditional ones for a model without classes).
    """
    if num_classes is None:
        if class_labels is not None:
            raise ValueError("class_labels given, but this model is unconditional (no class embedding)")
        if batch_size is None or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer for an unconditional model; got {batch_size!r}")
        return None, int(batch_size)
    if class_labels is None:
        if batch_size is None or int(batch_size) < 1:
            raise ValueError("give class_labels, or batch_size for unconditional (null-class) samples")
        return torch.full((int(batch_size),), null_class, dtype=torch.long), int(batch_size)
    if isinstance(class_labels, (str, int, np.integer)):
        class_labels = [class_labels]
    if isinstance(class_labels, (list, tuple)) and any(isinstance(c, str) for c in class_labels):
        if not class_names:
            raise ValueError(f"class_labels {class_labels!r} holds names, but this model has no class_names; "
                             f"give class indices 0..{num_classes - 1}")
        unknown = [c for c in class_labels if isinstance(c, str) and c not in class_names]
        if unknown:
            raise ValueError(f"unknown class names {unknown[:8]}; known: {', '.join(class_names)}")
        class_labels = [class_names.index(c) if isinstance(c, str) else c for c in class_labels]
    labels = torch.as_tensor(np.asarray(class_labels) if not torch.is_tensor(class_labels) else class_labels)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"class_labels must be a non-empty 1-D list of ints; got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"class_labels must be integers; got dtype {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        hint = f" (the null class {null_class} is chosen with guidance_scale=0)" if null_class is not None else ""
        raise ValueError(f"class_labels out of range: {bad.tolist()[:8]}; allowed 0..{num_classes - 1}{hint}")
    if batch_size is not None and int(batch_size) != labels.numel():
        raise ValueError(f"batch_size={batch_size} does not match len(class_labels)={labels.numel()}")
    return labels.long(), labels.numel()


# --- noise ------------------------------------------------------------------------------------------------------
def initial_noise(shape, generator, latents, device, dtype, scale: float = 1.0) -> torch.Tensor:
    """The starting state ``[B, ...]``: unit noise drawn with ``generator`` (or the given ``latents`` after a shape
    and finiteness check), times ``scale`` (a scheduler's ``init_noise_sigma``)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = tuple(int(s) for s in shape)
    if latents is None:
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    else:
        latents = torch.as_tensor(latents)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents shape {tuple(latents.shape)} != expected {shape}")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or inf")
        x = latents.to(device=device, dtype=dtype)
    return x * scale if scale != 1.0 else x


def sample_shape(net_config, batch: int, channels: int | None = None) -> tuple[int, ...]:
    size = net_config.sample_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return (batch, channels if channels is not None else net_config.in_channels, *size)


# --- callbacks --------------------------------------------------------------------------------------------------
def step_end_callback(pipe, callback_on_step_end, tensor_inputs, allowed=("latents",)):
    """Diffusers' ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`` as the core's
    ``on_step_end(step, t, x) -> x``. Only ``latents`` can be read or replaced here; other names are a
    ``ValueError`` before sampling and unknown returned keys a ``ValueError`` when they come back."""
    if callback_on_step_end is None:
        return None
    if not callable(callback_on_step_end):
        raise ValueError(f"callback_on_step_end must be callable; got {type(callback_on_step_end).__name__}")
    names = list(tensor_inputs or ["latents"])
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not available; allowed: {', '.join(allowed)}")

    def on_step_end(step, t, x):
        out = callback_on_step_end(pipe, step, t, {"latents": x} if "latents" in names else {})
        if out is None:
            return None
        if not isinstance(out, dict):
            raise ValueError(f"callback_on_step_end must return a dict; got {type(out).__name__}")
        unknown = sorted(set(out) - set(allowed))
        if unknown:
            raise ValueError(f"callback_on_step_end returned unknown keys {unknown}; allowed: {', '.join(allowed)}")
        return out.get("latents")

    return on_step_end


# --- outputs ----------------------------------------------------------------------------------------------------
def images_to_output(pipe, images: torch.Tensor, output_type: str):
    """``[N, C, H, W]`` images in [0, 1] -> torch (``"pt"``), numpy ``[N, H, W, C]`` (``"np"``) or PIL list."""
    if output_type == "pt":
        return images.detach().cpu().float()
    out = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(out) if output_type == "pil" else out


def nfe_value(nfe: float) -> int | float:
    """Network evaluations per image: an int when whole, else rounded to 4 decimals (AG makes it fractional)."""
    return int(nfe) if float(nfe).is_integer() else round(nfe, 4)


# --- loading ----------------------------------------------------------------------------------------------------
def looks_local(path) -> bool:
    """True when ``path`` is meant as a local folder rather than a hub id ``org/name``."""
    p = str(path)
    if p.startswith((".", "/", "~")) or os.sep + os.sep in p or p.count("/") > 1 or os.path.exists(p):
        return True
    head = p.split("/")[0]
    return "/" in p and os.path.isdir(head)


def check_pipeline_folder(path) -> None:
    """Raise ``ValueError`` if ``path`` is meant as a local pipeline folder but is not one."""
    p = Path(os.path.expanduser(str(path)))
    if not looks_local(str(path)):
        return
    if not p.exists():
        raise ValueError(f"pipeline folder {str(path)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"pipeline path {str(path)!r} is a file, not a pipeline folder")
    if not (p / "model_index.json").is_file():
        raise ValueError(f"{str(path)!r} is not a pipeline folder: it has no model_index.json")


def guarded_from_pretrained(load, path, **kwargs):
    """Call ``load(path, **kwargs)`` (a ``DiffusionPipeline.from_pretrained``) after :func:`check_pipeline_folder`;
    loading failures (corrupt weights, missing files, an unreachable hub) become a ``ValueError`` naming ``path``."""
    check_pipeline_folder(path)
    try:
        return load(path, **kwargs)
    except (OSError, KeyError, RuntimeError, TypeError) as err:
        raise ValueError(f"could not load a pipeline from {str(path)!r}: {err}") from err
