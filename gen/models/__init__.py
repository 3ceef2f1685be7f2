"""Networks: digits UNet presets, a time-conditioned MLP, a digits classifier, tiny Stable Diffusion parts."""

from gen.models.classifier import DigitsClassifier
from gen.models.mlp import TimeMLP, sinusoidal_features
from gen.models.unet import DIGITS_UNET_PRESET, NULL_CLASS, digits_unet, tiny_unet

__all__ = [
    "DIGITS_UNET_PRESET",
    "NULL_CLASS",
    "DigitsClassifier",
    "TimeMLP",
    "build_tiny_sd",
    "digits_unet",
    "sinusoidal_features",
    "tiny_clip_tokenizer",
    "tiny_unet",
]


def __getattr__(name):
    # tiny_sd imports transformers (seconds cold): load it only when asked for.
    if name in ("build_tiny_sd", "tiny_clip_tokenizer"):
        from gen.models import tiny_sd

        return getattr(tiny_sd, name)
    raise AttributeError(f"module 'gen.models' has no attribute {name!r}")
