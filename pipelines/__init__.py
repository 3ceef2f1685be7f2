"""Diffusers pipelines of `gen`: thin loops that wire `gen` pieces together."""

from .class_conditional import ClassConditionalPipeline, ClassConditionalPipelineOutput
from .gbm import GBMPipeline
from .interpolant import InterpolantPipeline, InterpolantPipelineOutput
from .one_step import OneStepPipeline, OneStepPipelineOutput
from .red_diff import InverseProblemPipelineOutput, LatentRedDiffPipeline, RedDiffPipeline

__all__ = [
    "ClassConditionalLoraPipeline",
    "ClassConditionalPipeline",
    "ClassConditionalPipelineOutput",
    "GBMPipeline",
    "GuidedStableDiffusionPipeline",
    "GuidedStableDiffusionPipelineOutput",
    "InterpolantPipeline",
    "InterpolantPipelineOutput",
    "InverseProblemPipelineOutput",
    "OneStepPipeline",
    "OneStepPipelineOutput",
    "LatentRedDiffPipeline",
    "RedDiffPipeline",
    "UNetLoraLoaderMixin",
]


def __getattr__(name):
    # The Stable Diffusion pipeline pulls in transformers: import it only when asked for.
    if name in ("GuidedStableDiffusionPipeline", "GuidedStableDiffusionPipelineOutput"):
        from . import guided_sd

        return getattr(guided_sd, name)
    if name in ("ClassConditionalLoraPipeline", "UNetLoraLoaderMixin"):  # pulls in peft: only when asked for
        from . import lora

        return getattr(lora, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
