"""A time-conditioned residual MLP for low-dimensional (2-D toy) data."""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}

# Sinusoidal time features use frequencies spaced geometrically over [MIN_FREQ, MAX_FREQ], so that both
# t in [0, 1] (flow matching, interpolants) and t in [0, 1000] (DDPM indices) get informative features.
MIN_FREQ = 1e-3
MAX_FREQ = 1e3


def sinusoidal_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Fourier features of a scalar time: ``[sin(w_k t), cos(w_k t)]`` for k < dim / 2.

    The angular frequencies ``w_k`` run geometrically from ``MIN_FREQ`` (1e-3) to ``MAX_FREQ`` (1e3).

    Args:
        t: [N] float, any scale.
        dim: Even feature size.

    Returns:
        [N, dim], same dtype as ``t`` (float32 for integer input).
    """
    if dim % 2 != 0 or dim <= 0:
        raise ValueError(f"dim must be a positive even int, got {dim}")
    dtype = t.dtype if torch.is_floating_point(t) else torch.float32
    half = dim // 2
    freqs = torch.exp(torch.linspace(math.log(MIN_FREQ), math.log(MAX_FREQ), half, device=t.device))
    angles = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(dtype)


class TimeMLP(ModelMixin, ConfigMixin):
    """Residual MLP ``f(x, t, y) -> [N, dim]``: the score / noise / velocity network for 2-D toys.

    h_0 = W_in x;  h_{l+1} = h_l + W_l act(h_l + e),  e = MLP(sinusoidal(t)) [+ Embed(y)];
    out = W_out act(h_L).

    Args:
        dim: Data dimension.
        hidden: Width of the hidden layers.
        depth: Number of residual layers, >= 1.
        time_embed_dim: Size of the sinusoidal time features (even).
        num_classes: If set, ``forward`` needs ``class_labels`` in [0, num_classes) (reserve one index
            yourself for a classifier-free-guidance null label).
        activation: One of ``"silu"``, ``"relu"``, ``"gelu"``, ``"tanh"``.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        time_embed_dim: int = 64,
        num_classes: int | None = None,
        activation: str = "silu",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(time_embed_dim, int) or time_embed_dim < 2 or time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be a positive even int, got {time_embed_dim!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
        self.act = ACTIVATIONS[activation]()
        self.time_embed = nn.Sequential(
            nn.Linear(time_embed_dim, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, hidden)
        )
        self.class_embed = nn.Embedding(num_classes, hidden) if num_classes is not None else None
        self.in_proj = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out_proj = nn.Linear(hidden, dim)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Evaluates the network.

        Args:
            x: [N, dim] float.
            t: [N] or a scalar (tensor or float), any scale; a scalar is shared by the whole batch.
            class_labels: int64 [N] in [0, num_classes); required iff ``num_classes`` is set.

        Returns:
            [N, dim], same dtype as ``x``.
        """
        dim = self.config.dim
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"x must have shape [N, {dim}], got {tuple(x.shape)}")
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(n)
        elif t.shape != (n,):
            raise ValueError(f"t must be a scalar or have shape [{n}], got {tuple(t.shape)}")
        emb = self.time_embed(sinusoidal_features(t.to(x.dtype), self.config.time_embed_dim))
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError(f"class_labels is required when num_classes={self.config.num_classes}")
            if class_labels.shape != (n,):
                raise ValueError(f"class_labels must have shape [{n}], got {tuple(class_labels.shape)}")
            emb = emb + self.class_embed(class_labels.to(x.device))
        elif class_labels is not None:
            raise ValueError("class_labels must be None when num_classes=None")
        h = self.in_proj(x)
        for layer in self.layers:
            h = h + layer(self.act(h + emb))
        return self.out_proj(self.act(h))
