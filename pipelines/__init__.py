"""Diffusers pipelines of `gen`: thin loops that wire `gen` pieces together."""

from .class_conditional import ClassConditionalPipeline, ClassConditionalPipelineOutput

__all__ = ["ClassConditionalPipeline", "ClassConditionalPipelineOutput"]
