"""Adaptive Projected Guidance (Sadat, Hilliges & Weber 2024, arXiv 2410.02416, Algorithm 1) on x0."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from gen import validate

from .base import Guider, Prediction, StepInfo, check_scale


class APG(Guider):
    """Adaptive Projected Guidance: CFG whose guidance direction is momentum-averaged, norm-capped and split
    into parts parallel and orthogonal to the conditional prediction, the parallel part weighted by eta.

        d = Dc - Du                                   (per sample, all of x0's non-batch dims, or `dims`)
        m <- d + beta m ;  d <- m                     (m = 0 at begin(); beta < 0 is "reverse momentum")
        d <- d min(1, r / ||d||_2)                    (only if norm_threshold r is set)
        u = Dc / ||Dc|| ; d_par = <d, u> u ; d_orth = d - d_par        (float64, cast back to the input dtype)
        D_hat = Dc + (w - 1) (d_orth + eta d_par)

    With eta = 1, beta = 0 and no threshold this is CFG. All but the projection runs in the input dtype.
    SDXL setting (paper Table 10, as quoted in diffusers#9626): eta = 0, beta = -0.5, r = 15.

    Parameter map (ours -> Diffusers ``AdaptiveProjectedGuidance`` -> ComfyUI ``APG`` node):

    ================  =============================================  ======================================
    ours (paper)      diffusers AdaptiveProjectedGuidance            ComfyUI ``APG`` node (nodes_apg.py)
    ================  =============================================  ======================================
    guidance_scale w  guidance_scale = w - 1 and                     sampler ``cfg`` = w - 1 (the node makes
                      use_original_formulation=True (the default     the sampler's CFG return
                      Du + w (...) differs from the paper, eta != 1)  Dc + cfg (d_orth + eta d_par))
    eta               eta                                            eta
    momentum (beta)   adaptive_projected_guidance_momentum (None=0)  momentum (older versions: >= 0 only)
    norm_threshold r  adaptive_projected_guidance_rescale (0 = off)  norm_threshold (0 = off)
    dims              adaptive_projected_guidance_norm_dim           fixed to [-1, -2, -3]
    ================  =============================================  ======================================

    Diffusers applies the guider to whatever the network outputs (eps, v, ...); it matches us only when it is
    fed x0 predictions (``to_diffusers_kwargs`` / ``to_diffusers``). ComfyUI's node already sees x0.

    Args:
        guidance_scale: w >= 0, finite; w = 1 skips the unconditional pass.
        eta: weight of the parallel component (0 recommended; 1 keeps it as in CFG).
        momentum: beta with |beta| < 1; the paper recommends negative values such as -0.5.
        norm_threshold: r > 0 caps ||d|| per sample; None disables it.
        dims: dims of the norms and the projection (non-batch; None = all non-batch dims). For video latents
            ``[B, C, T, H, W]``, ``[-1, -2, -3]`` projects each frame-channel slab separately.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 5.0,
        eta: float = 0.0,
        momentum: float = 0.0,
        norm_threshold: float | None = None,
        dims: list[int] | None = None,
    ):
        self.guidance_scale = check_scale("guidance_scale", guidance_scale)
        eta = validate.number("eta", eta)
        momentum = validate.number("momentum (beta, |beta| < 1)", momentum, -1.0, 1.0, low_open=True, high_open=True)
        norm_threshold = validate.number("norm_threshold (r)", norm_threshold, 0.0, low_open=True, allow_none=True)
        if dims is not None:
            if isinstance(dims, (str, bytes)) or not isinstance(dims, (list, tuple)):
                raise validate.ArgumentTypeError(f"dims must be a list of non-batch dims (ints != 0) or None; got "
                                                 f"{validate.describe(dims)}")
            dims = list(dims)
            if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d == 0 for d in dims):
                raise ValueError(
                    f"dims must be a non-empty list of non-batch dims (ints != 0) or None; got {dims!r}"
                )
        self.eta = float(eta)
        self.momentum = float(momentum)
        self.norm_threshold = None if norm_threshold is None else float(norm_threshold)
        self.dims = dims
        self._m = None

    def _reset(self, batch_size: int, num_inference_steps: int) -> None:
        self._m = None  # m = 0

    def _uncond_mask(self, info: StepInfo) -> torch.Tensor:
        return torch.full((self._batch_size(),), self.guidance_scale != 1.0, dtype=torch.bool)

    def _reduce_dims(self, ndim: int) -> list[int]:
        if self.dims is None:
            return list(range(1, ndim))
        out = [d % ndim for d in self.dims if -ndim <= d < ndim]
        if len(out) != len(self.dims) or 0 in out:
            raise ValueError(f"dims={self.dims} are not non-batch dims of a {ndim}-D tensor")
        return out

    def _guide(self, cond: Prediction, uncond: Prediction | None, info: StepInfo) -> torch.Tensor:
        if self.guidance_scale == 1.0:
            return cond.x0
        dc = cond.x0
        dims = self._reduce_dims(dc.dim())
        # 1. guidance direction d = Dc - Du
        d = dc - uncond.x0.to(dc.dtype)
        # 2. momentum m <- d + beta m, d <- m
        if self.momentum != 0.0:
            if self._m is not None and self._m.shape != d.shape:
                raise ValueError(
                    f"x0 shape changed from {tuple(self._m.shape)} to {tuple(d.shape)} within a run; "
                    "call begin() before each sampling run"
                )
            self._m = d if self._m is None else d + self.momentum * self._m
            d = self._m
        # 3. rescale d <- d min(1, r / ||d||)
        if self.norm_threshold is not None:
            norm = d.norm(p=2, dim=dims, keepdim=True)
            d = d * torch.clamp(self.norm_threshold / norm, max=1.0)
        # 4. projection onto Dc in float64
        d64 = d.double()
        u = torch.nn.functional.normalize(dc.double(), dim=dims)
        d_par64 = (d64 * u).sum(dim=dims, keepdim=True) * u
        d_par, d_orth = d_par64.to(d.dtype), (d64 - d_par64).to(d.dtype)
        # 5. D_hat = Dc + (w - 1) (d_orth + eta d_par)
        return dc + (self.guidance_scale - 1.0) * (d_orth + self.eta * d_par)

    def to_diffusers_kwargs(self) -> dict:
        """Kwargs of ``diffusers.guiders.AdaptiveProjectedGuidance`` giving this exact update when it is fed
        x0 predictions (not eps/v: Diffusers guides the raw network output)."""
        return {
            "guidance_scale": self.guidance_scale - 1.0,
            "use_original_formulation": True,
            "adaptive_projected_guidance_momentum": self.momentum if self.momentum != 0.0 else None,
            "adaptive_projected_guidance_rescale": self.norm_threshold
            if self.norm_threshold is not None
            else 0.0,
            "eta": self.eta,
            "adaptive_projected_guidance_norm_dim": None if self.dims is None else list(self.dims),
        }

    def to_diffusers(self):
        """A configured ``diffusers.guiders.AdaptiveProjectedGuidance`` (feed it x0 predictions)."""
        from diffusers.guiders import AdaptiveProjectedGuidance

        return AdaptiveProjectedGuidance(**self.to_diffusers_kwargs())
