"""f-distill (Xu, Nie & Vahdat 2025): f-divergence registry and the distribution-matching losses."""

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
    one_step_generate,
    per_bin_statistics,
    vsd_loss,
)

__all__ = [
    "FDivergence",
    "available_divergences",
    "get_divergence",
    "register_divergence",
    "Critic",
    "DiscriminatorHead",
    "FDistill",
    "FDistillSettings",
    "FeatureTap",
    "RatioBins",
    "call_net",
    "density_ratio",
    "discriminator_loss",
    "fdistill_weights",
    "gan_generator_loss",
    "one_step_generate",
    "per_bin_statistics",
    "vsd_loss",
]
