"""Class-conditional ``diffusers.UNet2DModel`` presets for the 16x16 digits and for tests.

Class conditioning uses the UNet's own ``nn.Embedding(num_class_embeds, time_embed_dim)``, added to the time
embedding. There are ``NUM_CLASSES + 1`` embeddings: labels 0..9 are the digits and :data:`NULL_CLASS` (10) is
the "no label" token that classifier-free guidance trains with (label dropout) and samples with (the
unconditional branch).
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import UNet2DModel

from gen.data.digits import NUM_CLASSES, RESOLUTION

NULL_CLASS = NUM_CLASSES

# 16x16 -> 8x8 (attention) -> 4x4, mid block at 4x4 with attention. About 1.62M parameters (6.5 MB fp32).
DIGITS_UNET_PRESET: dict[str, Any] = {
    "sample_size": RESOLUTION,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 16,
    "attention_head_dim": 32,
    "num_class_embeds": NUM_CLASSES + 1,
}

_UNET_ARGS = frozenset(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}


def digits_unet(**overrides: Any) -> UNet2DModel:
    """Builds the class-conditional UNet for 16x16x1 digits (:data:`DIGITS_UNET_PRESET`).

    Call it as ``unet(x_t, t, class_labels=labels).sample`` with x_t [N, 1, 16, 16], t [N] and labels
    int64 [N] in 0..10 (10 = :data:`NULL_CLASS`). Pass ``num_class_embeds=None`` for an unconditional UNet
    (then no ``class_labels``).

    Args:
        **overrides: ``UNet2DModel`` config entries replacing the preset's, e.g. tiny test settings
            ``block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
            up_block_types=("UpBlock2D",) * 2, norm_num_groups=8``.

    Raises:
        ValueError: If an override is not a ``UNet2DModel`` argument.
    """
    unknown = sorted(set(overrides) - _UNET_ARGS)
    if unknown:
        raise ValueError(f"overrides must be UNet2DModel arguments, got unknown {unknown}; "
                         f"allowed: {sorted(_UNET_ARGS)}")
    return UNet2DModel(**{**DIGITS_UNET_PRESET, **overrides})


def tiny_unet(num_class_embeds: int | None = NUM_CLASSES + 1, sample_size: int = 16) -> UNet2DModel:
    """A very small 1-channel UNet (about 41k parameters) for fast tests.

    Two stages (8, 16) channels without attention, one ResNet per stage, GroupNorm with 4 groups.

    Args:
        num_class_embeds: Size of the class-embedding table, or None for an unconditional UNet.
        sample_size: Nominal input side; any side divisible by 2 works.
    """
    return digits_unet(
        sample_size=sample_size,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=None,
        add_attention=False,
        num_class_embeds=num_class_embeds,
    )


UNET_PRESETS = ("digits", "tiny")


def build_unet(preset: str, num_classes: int | None, channels: int = 1, resolution: int = RESOLUTION) -> UNet2DModel:
    """The UNet a trainer asks for by preset name (``"digits"`` or ``"tiny"``), with ``num_classes + 1`` class
    embeddings (the last one is the null class) or none for ``num_classes=None``."""
    if preset not in UNET_PRESETS:
        raise ValueError(f"unet preset must be one of {UNET_PRESETS}; got {preset!r}")
    n_embeds = None if num_classes is None else num_classes + 1
    if preset == "tiny":
        if channels != 1:
            raise ValueError("unet_preset=tiny supports 1-channel images only")
        return tiny_unet(num_class_embeds=n_embeds, sample_size=resolution)
    return digits_unet(sample_size=resolution, in_channels=channels, out_channels=channels, num_class_embeds=n_embeds)
