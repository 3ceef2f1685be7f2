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
    "GuidedDiTPipeline",
    "GuidedSD3PipelineOutput",
    "GuidedSDXLPipelineOutput",
    "GuidedStableDiffusion3Pipeline",
    "GuidedStableDiffusionPipeline",
    "GuidedStableDiffusionPipelineOutput",
    "GuidedStableDiffusionXLPipeline",
    "InterpolantPipeline",
    "InterpolantPipelineOutput",
    "InverseProblemPipelineOutput",
    "OneStepDiTPipeline",
    "OneStepPipeline",
    "OneStepPipelineOutput",
    "OneStepSD3Pipeline",
    "OneStepSDXLPipeline",
    "LatentRedDiffPipeline",
    "RedDiffDiTPipeline",
    "RedDiffPipeline",
    "RedDiffSD3Pipeline",
    "RedDiffSDXLPipeline",
    "TransformerLoraLoaderMixin",
    "UNetLoraLoaderMixin",
]


def __getattr__(name):
    # The text-to-image pipelines pull in transformers (and DiT's the Diffusers DiT module): import them only when
    # asked for.
    if name in ("GuidedStableDiffusionPipeline", "GuidedStableDiffusionPipelineOutput"):
        from . import guided_sd

        return getattr(guided_sd, name)
    if name in ("GuidedStableDiffusionXLPipeline", "GuidedSDXLPipelineOutput"):
        from . import guided_sdxl

        return getattr(guided_sdxl, name)
    if name in ("GuidedStableDiffusion3Pipeline", "GuidedSD3PipelineOutput"):
        from . import guided_sd3

        return getattr(guided_sd3, name)
    if name == "GuidedDiTPipeline":
        from . import guided_dit

        return guided_dit.GuidedDiTPipeline
    if name in ("RedDiffSD3Pipeline", "RedDiffDiTPipeline", "RedDiffSDXLPipeline"):
        from . import red_diff_families

        return getattr(red_diff_families, name)
    if name in ("OneStepSDXLPipeline", "OneStepSD3Pipeline", "OneStepDiTPipeline"):
        from importlib import import_module

        module = {"OneStepSDXLPipeline": "one_step_sdxl", "OneStepSD3Pipeline": "one_step_sd3",
                  "OneStepDiTPipeline": "one_step_dit"}[name]
        return getattr(import_module(f".{module}", __name__), name)
    if name in ("ClassConditionalLoraPipeline", "UNetLoraLoaderMixin", "TransformerLoraLoaderMixin"):
        # pulls in peft: only when asked for
        from . import lora

        return getattr(lora, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
