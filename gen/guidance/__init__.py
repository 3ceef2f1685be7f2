"""Guidance methods on denoised estimates: CFG, APG, Adaptive Guidance, LinearAG and the guidance interval.

All share the ``Guider`` contract in ``base.py`` (``begin`` / ``uncond_mask`` / ``__call__``);
``build_guider`` makes one by registry name.
"""

from .adaptive import AdaptiveGuidance
from .apg import APG
from .base import Guider, GuiderWrapper, Prediction, StepInfo, guider_class
from .cfg import CFG
from .interval import GuidanceInterval
from .linear_ag import REGRESSORS, LinearAG, fit_linear_ag

GUIDERS: dict[str, type[Guider]] = {
    "cfg": CFG,
    "apg": APG,
    "adaptive": AdaptiveGuidance,
    "linear_ag": LinearAG,
    "interval": GuidanceInterval,
}


def build_guider(name: str, **kwargs) -> Guider:
    """Instantiate the guider registered as ``name`` (see ``GUIDERS``) with ``kwargs``."""
    if name not in GUIDERS:
        raise ValueError(f"guider name {name!r} is unknown; allowed: {', '.join(GUIDERS)}")
    return GUIDERS[name](**kwargs)


__all__ = [
    "APG",
    "CFG",
    "GUIDERS",
    "REGRESSORS",
    "AdaptiveGuidance",
    "GuidanceInterval",
    "Guider",
    "GuiderWrapper",
    "LinearAG",
    "Prediction",
    "StepInfo",
    "build_guider",
    "fit_linear_ag",
    "guider_class",
]
