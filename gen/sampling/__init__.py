"""One sampling core for every pipeline and method: model adapters per network family, the denoising loop with its
guider, per-step hook and keep-gradient mask, and what pipelines share around it."""

from .adapters import (
    SUPPORTED_NETWORKS,
    CallableAdapter,
    ClassUNetAdapter,
    Conditioning,
    DiTAdapter,
    ModelAdapter,
    SD3Adapter,
    UNetTextAdapter,
    adapter_for,
    no_label_dropout,
    unwrap_network,
)
from .core import SampleResult, StepHook, StepState, denoise, scheduler_step_kwargs

__all__ = [
    "SUPPORTED_NETWORKS",
    "CallableAdapter",
    "ClassUNetAdapter",
    "Conditioning",
    "DiTAdapter",
    "ModelAdapter",
    "SD3Adapter",
    "SampleResult",
    "StepHook",
    "StepState",
    "UNetTextAdapter",
    "adapter_for",
    "denoise",
    "no_label_dropout",
    "scheduler_step_kwargs",
    "unwrap_network",
]
