"""f-distill (Xu, Nie & Vahdat 2025): f-divergence registry, the distribution-matching losses, noise levels and
read-outs of every teacher family (:mod:`gen.distill.spaces`, :mod:`gen.distill.teachers`), and LoRA student /
fake score over one shared frozen base (:mod:`gen.distill.lora`); students loaded for evaluation from an exported
folder or a training checkpoint (:mod:`gen.distill.students`)."""

from .divergences import FDivergence, available_divergences, get_divergence, register_divergence
from .fdistill import (
    Critic,
    DiscriminatorHead,
    FDistill,
    FDistillSettings,
    FeatureTap,
    RatioBins,
    call_net,
    density_ratio,
    discriminator_loss,
    fdistill_weights,
    gan_generator_loss,
    per_bin_statistics,
    vsd_loss,
)
from .lora import AdapterView, inject_adapters, merged_network
from .spaces import NoiseLevels, one_step_generate
from .students import load_student, student_from_checkpoint
from .teachers import FAMILIES, Teacher, load_teacher

__all__ = [
    "FAMILIES",
    "AdapterView",
    "FDivergence",
    "available_divergences",
    "get_divergence",
    "register_divergence",
    "Critic",
    "DiscriminatorHead",
    "FDistill",
    "FDistillSettings",
    "FeatureTap",
    "NoiseLevels",
    "RatioBins",
    "Teacher",
    "call_net",
    "density_ratio",
    "discriminator_loss",
    "fdistill_weights",
    "gan_generator_loss",
    "inject_adapters",
    "load_student",
    "load_teacher",
    "merged_network",
    "one_step_generate",
    "per_bin_statistics",
    "student_from_checkpoint",
    "vsd_loss",
]
