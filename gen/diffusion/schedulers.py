"""Scheduler registry: a short name -> a Diffusers scheduler class, built from another scheduler's config."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "deis": DEISMultistepScheduler,
    "flow_euler": FlowMatchEulerDiscreteScheduler,
}


def make_scheduler(name: str, config=None, **overrides):
    """Build the scheduler registered as ``name`` from ``config`` (another scheduler's config, or None).

    Raises:
        ValueError: if ``name`` is not registered (the message lists the registered names).
    """
    if isinstance(name, str) and name.lower() in SCHEDULERS:
        cls = SCHEDULERS[name.lower()]
    else:
        raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
    if cls is PNDMScheduler:
        overrides.setdefault("skip_prk_steps", True)  # PLMS only, as Stable Diffusion uses it; PRK fails at few steps
    if config is None:
        return cls(**overrides)
    return cls.from_config(config, **overrides)
