"""What every `gen` pipeline shares around the sampling core: the guider of a call, label and noise set-up,
Diffusers' ``callback_on_step_end`` convention, output conversion and guarded loading."""

from __future__ import annotations

import numpy as np
import torch

from gen import validate
from gen.guidance import CFG, Guider
from gen.validate import ArgumentTypeError

from .loading import check_pipeline_folder, guarded_from_pretrained, looks_local  # noqa: F401 (re-exported)

OUTPUT_TYPES = ("pil", "np", "pt")


# --- guidance ---------------------------------------------------------------------------------------------------
def resolve_guider(guidance_scale, guider, default_scale: float = 1.0) -> Guider:
    """The guider of one call: ``guider`` as given, or ``CFG(guidance_scale)`` (``guidance_scale=w`` anywhere means
    ``gen.guidance.CFG(w)``; None means ``default_scale``).

    Raises:
        ValueError: both given (a guider carries its own scale), or a scale that is not a finite number >= 0.
        ArgumentTypeError: a guider that is not a ``gen.guidance.Guider``, a scale that is not a number.
    """
    if guider is not None:
        if not isinstance(guider, Guider):
            raise ArgumentTypeError(f"guider must be a gen.guidance.Guider (CFG, APG, AdaptiveGuidance, LinearAG, "
                                    f"GuidanceInterval); got {validate.describe(guider)}")
        if guidance_scale is not None and guidance_scale != default_scale:
            raise ValueError("give guidance_scale or guider, not both (the guider carries its own scale)")
        return guider
    scale = default_scale if guidance_scale is None else guidance_scale
    return CFG(guidance_scale=validate.number("guidance_scale", scale, 0.0))


def check_steps(num_inference_steps, max_steps: int | None = None) -> int:
    """A positive integer step count (at most ``max_steps``: a noise scheduler's ``num_train_timesteps``)."""
    return validate.integer("num_inference_steps", num_inference_steps, 1, max_steps)


def train_steps(scheduler) -> int | None:
    """``num_train_timesteps`` of a discrete-time noise scheduler (the most sampling steps it has), else None."""
    n = scheduler.config.get("num_train_timesteps") if hasattr(scheduler, "config") else None
    return int(n) if isinstance(n, int) and hasattr(scheduler, "alphas_cumprod") else None


def check_output_type(output_type, allowed=OUTPUT_TYPES) -> str:
    return validate.choice("output_type", output_type, allowed)


def check_generator(generator, batch: int | None = None, allow_list: bool = True):
    """An ``ArgumentTypeError`` (a ``ValueError`` too) for a generator that is not a ``torch.Generator`` (or a list
    of one per sample)."""
    return validate.generator("generator", generator, batch, allow_list=allow_list)


def check_eta(eta) -> float:
    """DDIM's eta in [0, 1] (0: deterministic DDIM, 1: DDPM-like ancestral noise)."""
    return validate.number("eta", eta, 0.0, 1.0)


# --- components -------------------------------------------------------------------------------------------------
def check_unet(unet, pipeline: str) -> None:
    """A Diffusers ``UNet2DModel`` (possibly wrapped), which the class-conditional family needs."""
    from diffusers import UNet2DModel

    from .adapters import unwrap_network

    if not isinstance(unwrap_network(unet), UNet2DModel):
        raise ArgumentTypeError(f"{pipeline} needs a diffusers UNet2DModel as unet; got {validate.describe(unet)}")


def check_noise_scheduler(scheduler, pipeline: str) -> None:
    """A Diffusers noise scheduler: DDPM family (``alphas_cumprod``) or flow matching, with a prediction type the
    conversions know. GBM and interpolant schedulers (their own prediction spaces) belong to their pipelines."""
    from gen.diffusion import prediction_type_of

    own = {"GBMScheduler": "GBMPipeline", "InterpolantScheduler": "InterpolantPipeline"}
    name = type(scheduler).__name__
    if name in own or callable(getattr(scheduler, "prediction_space", None)):
        hint = f" (from a folder saved by {own[name]}? load it with pipelines.{own[name]})" if name in own else ""
        raise ArgumentTypeError(f"{pipeline} needs a Diffusers noise scheduler (DDIM, DDPM, DPM-Solver, Euler, "
                                f"flow matching, ...); got {name}{hint}")
    flow = not hasattr(scheduler, "alphas_cumprod") and "shift" in getattr(scheduler, "config", {})
    if not hasattr(scheduler, "alphas_cumprod") and not flow:
        raise ArgumentTypeError(f"{pipeline} needs a Diffusers noise scheduler with alphas_cumprod or a "
                                f"flow-matching config; got {validate.describe(scheduler)}")
    prediction_type_of(scheduler)  # ValueError naming an unknown prediction_type


# --- labels -----------------------------------------------------------------------------------------------------
def check_class_names(class_names, num_classes: int | None) -> list[str] | None:
    """``class_names`` as a list of distinct non-empty strings, one per class of the network (index order)."""
    if class_names is None:
        return None
    if isinstance(class_names, (str, bytes)) or not isinstance(class_names, (list, tuple)):
        raise ArgumentTypeError(f"class_names must be a list of strings (one per class); got "
                                f"{validate.describe(class_names)}")
    names = [str(c) if isinstance(c, (int, np.integer)) and not isinstance(c, bool) else c for c in class_names]
    if not all(isinstance(c, str) and c for c in names):
        raise ArgumentTypeError(f"class_names must be non-empty strings; got {validate.describe(list(class_names))}")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ValueError(f"class_names must be distinct; repeated: {dup[:8]}")
    if num_classes is None or len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names but the network has "
                         f"{'no classes' if num_classes is None else f'{num_classes} classes'}")
    return names


def check_batch_size(batch_size, allow_none: bool = True) -> int | None:
    return validate.integer("batch_size", batch_size, 1, allow_none=allow_none)


def class_labels_tensor(class_labels, num_classes: int | None, batch_size=None, null_class: int | None = None,
                        class_names: list[str] | None = None):
    """``(labels [B] long or None, batch)`` from user input.

    ``class_labels`` is an int, a class name (when ``class_names`` is known), or a 1-D sequence/array/tensor of
    them; None with ``batch_size`` gives null-class samples (or unconditional ones for a model without classes).
    """
    batch_size = check_batch_size(batch_size)
    if num_classes is None:
        if class_labels is not None:
            raise ValueError("class_labels given, but this model is unconditional (no class embedding); "
                             "give batch_size instead")
        if batch_size is None:
            raise ValueError("batch_size must be a positive integer for an unconditional model; got None")
        return None, batch_size
    if class_labels is None:
        if batch_size is None:
            raise ValueError("give class_labels, or batch_size for unconditional (null-class) samples")
        return torch.full((batch_size,), null_class, dtype=torch.long), batch_size
    if isinstance(class_labels, (str, int, np.integer)) and not isinstance(class_labels, bool):
        class_labels = [class_labels]
    if isinstance(class_labels, np.ndarray) and class_labels.dtype.kind in "US":
        class_labels = class_labels.tolist()
    if isinstance(class_labels, (list, tuple)) and any(isinstance(c, str) for c in class_labels):
        if not class_names:
            digits = [c for c in class_labels if isinstance(c, str) and c.strip().lstrip("-").isdigit()]
            hint = f" (did you mean the integer {int(digits[0])}?)" if digits else ""
            raise ArgumentTypeError(f"class_labels {validate.describe(class_labels)} holds names, but this model has "
                                    f"no class_names; give class indices 0..{num_classes - 1}{hint}")
        unknown = [c for c in class_labels if isinstance(c, str) and c not in class_names]
        if unknown:
            raise ValueError(f"unknown class names {unknown[:8]}; known: {', '.join(class_names)}")
        class_labels = [class_names.index(c) if isinstance(c, str) else c for c in class_labels]
    if not isinstance(class_labels, (list, tuple, np.ndarray, torch.Tensor)):
        raise ArgumentTypeError(f"class_labels must be an int, a class name or a 1-D list/array/tensor of them; got "
                                f"{validate.describe(class_labels)}")
    nested = isinstance(class_labels, (list, tuple)) and any(
        isinstance(c, (list, tuple, np.ndarray, torch.Tensor)) for c in class_labels)
    if nested:
        raise ValueError(f"class_labels must be a non-empty 1-D list of ints; got nested "
                         f"{validate.describe(class_labels)}")
    if isinstance(class_labels, (list, tuple)) and not all(
            isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)) for c in class_labels):
        bad = next(c for c in class_labels
                   if not isinstance(c, (int, np.integer)) or isinstance(c, (bool, np.bool_)))
        raise ArgumentTypeError(f"class_labels must hold integers (or class names); got {validate.describe(bad)} "
                                "among them")
    labels = class_labels if torch.is_tensor(class_labels) else torch.as_tensor(np.asarray(class_labels))
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"class_labels must be a non-empty 1-D list of ints; got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ArgumentTypeError(f"class_labels must be integers; got dtype {labels.dtype}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        hint = f" (the null class {null_class} is chosen with guidance_scale=0)" if null_class is not None else ""
        raise ValueError(f"class_labels out of range: {bad.tolist()[:8]}; allowed 0..{num_classes - 1}{hint}")
    if batch_size is not None and batch_size != labels.numel():
        raise ValueError(f"batch_size={batch_size} does not match len(class_labels)={labels.numel()}")
    return labels.long(), labels.numel()


# --- noise ------------------------------------------------------------------------------------------------------
def initial_noise(shape, generator, latents, device, dtype, scale: float = 1.0) -> torch.Tensor:
    """The starting state ``[B, ...]``: unit noise drawn with ``generator`` (or the given ``latents``, a float
    tensor or numpy array of exactly ``shape`` with finite values), times ``scale`` (a scheduler's
    ``init_noise_sigma``)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = tuple(int(s) for s in shape)
    if latents is None:
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    else:
        x = check_latents(latents, shape).to(device=device, dtype=dtype)
    return x * scale if scale != 1.0 else x


def check_latents(latents, shape) -> torch.Tensor:
    """``latents`` of exactly ``shape`` (a wrong size would silently change the output size), float, finite."""
    x = validate.tensor("latents", latents)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"latents shape {tuple(x.shape)} != expected {tuple(shape)} (batch, channels, height, "
                         "width of this call; latents of another size would change the output size)")
    return validate.tensor("latents", x, finite=True)


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
    validate.callback("callback_on_step_end", callback_on_step_end)
    if tensor_inputs is not None and (isinstance(tensor_inputs, str) or not isinstance(tensor_inputs, (list, tuple))):
        raise ArgumentTypeError(f"callback_on_step_end_tensor_inputs must be a list of names; got "
                                f"{validate.describe(tensor_inputs)}")
    names = list(tensor_inputs or ["latents"])
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs {bad} are not available; allowed: {', '.join(allowed)}")

    def on_step_end(step, t, x):
        out = callback_on_step_end(pipe, step, t, {"latents": x} if "latents" in names else {})
        if out is None:
            return None
        if not isinstance(out, dict):
            raise ArgumentTypeError(f"callback_on_step_end must return a dict (or None); got "
                                    f"{validate.describe(out)}")
        unknown = sorted(set(out) - set(allowed))
        if unknown:
            raise ValueError(f"callback_on_step_end returned unknown keys {unknown}; allowed: {', '.join(allowed)}")
        new = out.get("latents")
        if new is not None:
            new = validate.tensor(f"latents returned by callback_on_step_end at step {step}", new,
                                  shape=tuple(x.shape)).to(device=x.device, dtype=x.dtype)
        return new

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
# guarded_from_pretrained, check_pipeline_folder and looks_local live in gen.sampling.loading (imported above).
