"""Diffusers pipelines of `gen`: thin loops that wire `gen` pieces together."""

from .class_conditional import ClassConditionalPipeline, ClassConditionalPipelineOutput

__all__ = [
    "ClassConditionalPipeline",
    "ClassConditionalPipelineOutput",
    "GuidedStableDiffusionPipeline",
    "GuidedStableDiffusionPipelineOutput",
]


def __getattr__(name):
    # The Stable Diffusion pipeline pulls in transformers: import it only when asked for.
    if name in ("GuidedStableDiffusionPipeline", "GuidedStableDiffusionPipelineOutput"):
        from . import guided_sd

        return getattr(guided_sd, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
