"""A small CNN classifier for the 16x16 digits; its penultimate layer is the feature space of "FID-digits"."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from gen.data.digits import RESOLUTION


class DigitsClassifier(ModelMixin, ConfigMixin):
    """CNN: per stage two 3x3 conv + SiLU then 2x2 average pooling; then flatten -> Linear -> SiLU (features)
    -> dropout -> Linear (logits).

    With the defaults: 16x16 -> 8x8 (32 ch) -> 4x4 (64 ch) -> 1024 -> 128 features -> 10 logits,
    about 197k parameters (0.8 MB in fp32).

    Args:
        in_channels: Image channels.
        num_classes: Number of logits.
        channels: Output channels of each conv stage; each stage halves the side, so 16 must be divisible by
            ``2 ** len(channels)``.
        feature_dim: Size of the penultimate layer returned by :meth:`features`.
        dropout: Dropout probability before the last layer (train mode only).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: tuple[int, ...] = (32, 64),
        feature_dim: int = 128,
        dropout: float = 0.1,
    ):
        super().__init__()
        channels = tuple(channels)
        if not channels or RESOLUTION % (2 ** len(channels)) != 0:
            raise ValueError(
                f"channels must have 1..{RESOLUTION.bit_length() - 1} entries so that {RESOLUTION} is "
                f"divisible by 2**len(channels), got {channels}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.SiLU(),
                nn.AvgPool2d(2),
            ]
            previous = width
        self.convs = nn.Sequential(*layers)
        side = RESOLUTION // 2 ** len(channels)
        self.feature_head = nn.Sequential(
            nn.Flatten(), nn.Linear(previous * side * side, feature_dim), nn.SiLU()
        )
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(feature_dim, num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.config.in_channels, RESOLUTION, RESOLUTION)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [N, {', '.join(map(str, expected))}], got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (after the SiLU, before dropout).

        Args:
            x: [N, in_channels, 16, 16] in [-1, 1].

        Returns:
            [N, feature_dim].
        """
        self._check_input(x)
        return self.feature_head(self.convs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits.

        Args:
            x: [N, in_channels, 16, 16] in [-1, 1].

        Returns:
            [N, num_classes] unnormalised log-probabilities.
        """
        return self.classifier(self.drop(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Most likely class, without dropout whatever the module's mode.

        Args:
            x: [N, in_channels, 16, 16] in [-1, 1].

        Returns:
            int64 [N].
        """
        return self.classifier(self.features(x)).argmax(dim=1)
