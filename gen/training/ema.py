"""Exponential moving average of model weights (Polyak averaging), stored as a flat tensor dict."""

from __future__ import annotations

import torch


class EMA:
    """Shadow copy ``theta_ema <- d * theta_ema + (1 - d) * theta`` of a model's floating-point state.

    With ``warmup=True`` the decay ramps as ``min(decay, (1 + n) / (10 + n))`` over the first updates ``n``, so early
    averages are not dominated by the random initialisation. Shadows are kept in float32.

    Under FSDP2 the model's state dict holds ``DTensor`` shards: the shadows cloned from them stay sharded like their
    parameters and the update is local to each rank; ``full_tensor()`` (on every rank) gathers them. Under DeepSpeed
    ZeRO-3 a rank holds no weights outside forward/backward, so an EMA of them would be empty: that raises.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1); got {decay}")
        if any(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()):
            raise ValueError("EMA of a DeepSpeed ZeRO-3 model would be empty (each rank holds parameters of shape "
                             "(0,) outside forward/backward): use ZeRO-2 or FSDP2 for EMA, or set ema_decay 0")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes; a plain model takes gathered shadows)."""
        sd = model.state_dict()
        for k, v in self.shadow.items():
            target = sd[k]
            if hasattr(v, "full_tensor") and not hasattr(target, "full_tensor"):
                raise ValueError("the EMA shadows are sharded: gather them with full_shadow() first")
            target.copy_(v.to(target.dtype))

    def full_shadow(self) -> dict[str, torch.Tensor]:
        """The shadows as whole tensors (gathers FSDP2 shards: every rank calls it)."""
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in self.shadow.items()}

    def state_dict(self) -> dict:
        out = {f"shadow.{k}": v for k, v in self.shadow.items()}
        out["num_updates"] = torch.tensor(self.num_updates, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict) -> None:
        shadow = {k[len("shadow."):]: v for k, v in state.items() if k.startswith("shadow.")}
        if set(shadow) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(shadow))[:3]
            raise ValueError(f"EMA state does not match the model (missing e.g. {missing})")
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
        self.num_updates = int(state["num_updates"])
