"""Stochastic interpolants (Albergo, Boffi & Vanden-Eijnden, arXiv 2303.08797): families, objectives, samplers.

Time convention: t = 0 is the base (noise), t = 1 the data (the paper's and SiT's; the reverse of Diffusers' flow
matching, see :mod:`gen.interpolants.convention`).
"""

from .bridge import bridge_base, degrade
from .convention import (
    flow_from_velocity,
    flow_model_from_velocity_model,
    sigma_from_t,
    t_from_sigma,
    velocity_from_flow,
    velocity_model_from_flow_model,
)
from .diffusion_coefficients import DIFFUSION_FORMS, diffusion_coefficient
from .gaussian import GaussianFields
from .interpolant import GAMMAS, KINDS, PATHS, PREDICTIONS, Coefficients, Interpolant, canonical_prediction
from .objectives import WEIGHTINGS, InterpolantLoss
from .samplers import InterpolantSampler, standard_normal_log_prob
from .scheduler import InterpolantScheduler, InterpolantSchedulerOutput

__all__ = [
    "DIFFUSION_FORMS",
    "GAMMAS",
    "KINDS",
    "PATHS",
    "PREDICTIONS",
    "WEIGHTINGS",
    "Coefficients",
    "GaussianFields",
    "Interpolant",
    "InterpolantLoss",
    "InterpolantSampler",
    "InterpolantScheduler",
    "InterpolantSchedulerOutput",
    "bridge_base",
    "canonical_prediction",
    "degrade",
    "diffusion_coefficient",
    "flow_from_velocity",
    "flow_model_from_velocity_model",
    "sigma_from_t",
    "standard_normal_log_prob",
    "t_from_sigma",
    "velocity_from_flow",
    "velocity_model_from_flow_model",
]
