"""LinearAG (Castillo et al. 2023, arXiv 2312.12487, sec. on LinearAG): replace the unconditional pass by an
affine combination of earlier predictions, with per-step coefficients fitted offline by least squares on
recorded CFG trajectories."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import register_to_config

from gen import validate

from .base import Guider, Prediction, StepInfo, check_scale

REGRESSORS = ("cond_x0[k]", "cond_x0[k-1]", "uncond_x0[k-1]")


def regressors(cond_k: torch.Tensor, prev: tuple[torch.Tensor, torch.Tensor] | None) -> list[torch.Tensor]:
    """h_k = [Dc_k, Dc_{k-1}, Du_{k-1}]; at the first step there is no history and only Dc_k is used."""
    return [cond_k] if prev is None else [cond_k, prev[0], prev[1]]


class LinearAG(Guider):
    """LinearAG: CFG on x0 where the unconditional x0 is estimated instead of evaluated.

        Du_hat[k] = b[k,0] Dc[k] + b[k,1] Dc[k-1] + b[k,2] Du[k-1]      (no bias term)
        D[k]      = Dc[k] + (w - 1) (Dc[k] - Du_hat[k])

    Space: the regression is done on the x0 predictions (``Prediction.x0``), the space the guided output
    lives in, so no x_t / alpha / sigma is needed to turn the estimate into the output, and the least-squares
    error is exactly the error of the guided x0 (up to the factor w - 1). ``Du[k-1]`` is the real
    unconditional x0 on exact steps and the previous estimate afterwards (the fit uses real ones: the estimate
    drifts from CFG, as the paper notes). Regressing eps instead (the paper's models predict eps) is not done
    here: turning an eps estimate into x0 needs ``sigma_t / alpha_t``, which is infinite at the first step of
    rectified-flow schedules.

    Steps ``k < num_exact_steps`` evaluate the unconditional pass (``uncond_mask`` True) and apply plain CFG.
    First-step fallback: at k = 0 there is no history, so ``Du_hat[0] = b[0,0] Dc[0]`` (``fit_linear_ag`` fits
    only that coefficient and stores 0 for the others). "Previous step" means the last step index called
    before k (the later call of a repeated index wins).

    Args:
        guidance_scale: w >= 0, finite.
        num_inference_steps: the step count the coefficients were fitted for; ``begin`` must match it.
        coefficients: ``num_inference_steps`` rows of 3 finite floats (``REGRESSORS`` order).
        num_exact_steps: how many leading steps use the real unconditional pass, 0..num_inference_steps.
    """

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 5.0,
        *,
        num_inference_steps: int,
        coefficients: list[list[float]],
        num_exact_steps: int = 0,
    ):
        self.guidance_scale = check_scale("guidance_scale", guidance_scale)
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be a positive int; got {num_inference_steps!r}")
        if (
            isinstance(num_exact_steps, bool)
            or not isinstance(num_exact_steps, int)
            or not 0 <= num_exact_steps <= num_inference_steps
        ):
            raise ValueError(
                f"num_exact_steps must be an int in [0, {num_inference_steps}]; got {num_exact_steps!r}"
            )
        if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, (list, tuple)) or not all(
                isinstance(r, (list, tuple)) for r in coefficients):
            raise validate.ArgumentTypeError(f"coefficients must be a list of rows of {len(REGRESSORS)} numbers; got "
                                             f"{validate.describe(coefficients)}")
        rows = [[validate.number(f"coefficients[{k}][{j}]", v) for j, v in enumerate(row)]
                for k, row in enumerate(coefficients)]
        if len(rows) != num_inference_steps or any(len(r) != len(REGRESSORS) for r in rows):
            raise ValueError(
                f"coefficients must be {num_inference_steps} rows (one per step) of {len(REGRESSORS)} floats "
                f"{REGRESSORS}; got {len(rows)} rows of lengths {sorted({len(r) for r in rows})}"
            )
        if not all(math.isfinite(v) for r in rows for v in r):
            raise ValueError("coefficients must all be finite")
        self.num_inference_steps = num_inference_steps
        self.coefficients = rows
        self.num_exact_steps = num_exact_steps
        self._prev = self._cur = None

    @classmethod
    def from_trajectories(
        cls,
        trajectories: Sequence[dict[str, torch.Tensor]],
        guidance_scale: float = 5.0,
        num_exact_steps: int = 0,
    ) -> LinearAG:
        """Fit coefficients on recorded trajectories (see ``fit_linear_ag``) and build the guider."""
        coefficients = fit_linear_ag(trajectories)
        return cls(
            guidance_scale,
            num_inference_steps=len(coefficients),
            coefficients=coefficients,
            num_exact_steps=num_exact_steps,
        )

    def begin(self, batch_size: int, num_inference_steps: int) -> None:
        if num_inference_steps != self.num_inference_steps:
            raise ValueError(
                f"LinearAG coefficients were fitted for {self.num_inference_steps} steps; "
                f"got {num_inference_steps} (num_inference_steps)"
            )
        super().begin(batch_size, num_inference_steps)

    def _reset(self, batch_size: int, num_inference_steps: int) -> None:
        self._prev = None  # (Dc, Du) of the last step index before the current one
        self._cur = None  # (k, Dc, Du) of the latest call

    def _uncond_mask(self, info: StepInfo) -> torch.Tensor:
        exact = info.step_index < self.num_exact_steps and self.guidance_scale != 1.0
        return torch.full((self._batch_size(),), exact, dtype=torch.bool)

    def _guide(self, cond: Prediction, uncond: Prediction | None, info: StepInfo) -> torch.Tensor:
        k = info.step_index
        if self._cur is not None and self._cur[0] != k:
            self._prev = self._cur[1:]
        dc = cond.x0
        if k < self.num_exact_steps and uncond is not None:
            du = uncond.x0.to(dc.dtype)
        else:
            h = regressors(dc, self._prev)
            if h[1:] and (h[1].shape != dc.shape or h[2].shape != dc.shape):
                raise ValueError(
                    f"x0 shape changed from {tuple(h[1].shape)} to {tuple(dc.shape)} within a run; "
                    "call begin() before each sampling run"
                )
            du = sum(b * x for b, x in zip(self.coefficients[k], h))
        self._cur = (k, dc, du)
        return dc + (self.guidance_scale - 1.0) * (dc - du)


def fit_linear_ag(
    trajectories: Sequence[dict[str, torch.Tensor]], num_inference_steps: int | None = None
) -> list[list[float]]:
    """Least-squares LinearAG coefficients, one row per step, over all samples and pixels.

        b[k] = argmin_b || Du[k] - sum_j b_j h_j[k] ||^2,   h[k] = [Dc[k], Dc[k-1], Du[k-1]],  h[0] = [Dc[0]]

    Solved in float64 and streamed over samples: the QR factor R of the stacked ``[H | y]`` is updated one
    chunk of samples at a time, then ``torch.linalg.lstsq(R_H, R_y)`` (rank-deficient steps get the
    minimum-norm solution).
    This equals lstsq on the full stacked system without holding N x pixels x 3 float64 values.

    Args:
        trajectories: one dict per step ``{"cond": Tensor[N, ...], "uncond": Tensor[N, ...]}`` of x0
            predictions from CFG runs (the same N samples at every step, real unconditional passes).
        num_inference_steps: optional check that ``len(trajectories)`` equals it.
    Returns:
        ``len(trajectories)`` rows of 3 floats (``REGRESSORS`` order; row 0 is ``[b, 0, 0]``).
    """
    if num_inference_steps is not None and num_inference_steps != len(trajectories):
        raise ValueError(
            f"num_inference_steps={num_inference_steps} but got {len(trajectories)} trajectory steps"
        )
    if len(trajectories) == 0:
        raise ValueError("trajectories is empty; need one {'cond', 'uncond'} dict per step")
    shape = None
    for k, step in enumerate(trajectories):
        if not isinstance(step, dict) or not {"cond", "uncond"} <= set(step):
            raise ValueError(f"trajectories[{k}] must be a dict with 'cond' and 'uncond' tensors")
        for key in ("cond", "uncond"):
            shape = shape or tuple(step[key].shape)
            if tuple(step[key].shape) != shape:
                raise ValueError(
                    f"trajectories[{k}][{key!r}] has shape {tuple(step[key].shape)}, expected {shape}"
                )
    n = shape[0]
    chunk = max(1, (1 << 20) // max(1, math.prod(shape[1:])))
    coefficients = []
    for k, step in enumerate(trajectories):
        prev = None if k == 0 else (trajectories[k - 1]["cond"], trajectories[k - 1]["uncond"])
        p = 1 if prev is None else len(REGRESSORS)
        r = torch.zeros(0, p + 1, dtype=torch.float64)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            cols = regressors(step["cond"][sl], None if prev is None else (prev[0][sl], prev[1][sl]))
            cols.append(step["uncond"][sl])
            a = torch.stack([c.detach().reshape(-1).to("cpu", torch.float64) for c in cols], dim=1)
            r = torch.linalg.qr(torch.cat([r, a]), mode="r").R
        sol = torch.linalg.lstsq(r[:p, :p], r[:p, p:], driver="gelsd").solution.reshape(-1)
        coefficients.append(sol.tolist() + [0.0] * (len(REGRESSORS) - p))
    return coefficients
