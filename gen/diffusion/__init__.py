"""Noise-schedule maths shared by every method: alpha/sigma of a scheduler and prediction-space conversions."""

from .conversions import (
    PREDICTION_TYPES,
    alpha_sigma,
    convert_prediction,
    from_x0_eps,
    prediction_type_of,
    to_x0_eps,
)
from .schedulers import SCHEDULERS, make_scheduler

__all__ = [
    "PREDICTION_TYPES",
    "alpha_sigma",
    "convert_prediction",
    "prediction_type_of",
    "to_x0_eps",
    "from_x0_eps",
    "SCHEDULERS",
    "make_scheduler",
]
