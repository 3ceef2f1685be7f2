"""Adaptive Guidance (Castillo et al. 2023, arXiv 2312.12487): stop guiding a sample once its conditional and
unconditional predictions agree."""

from __future__ import annotations

import math

import torch

from .base import Guider, GuiderWrapper, Prediction, StepInfo


class AdaptiveGuidance(GuiderWrapper):
    """Adaptive Guidance (AG) around an inner guider (CFG or APG).

    Per sample, at every step where its unconditional pass ran:

        gamma = cos( flat(eps_c), flat(eps_u) )       (eps-equivalents, as in the paper's eps-models)
        gamma > gamma_bar  =>  the sample is switched off for the rest of the run

    The step that triggers the switch is still guided (its uncond pass has been paid for); from the next step
    index on the sample's unconditional pass is skipped (``uncond_mask`` False) and its guided x0 is
    ``cond.x0`` (a repeated index, as second-order samplers issue, still counts as the triggering step). The
    inner guider's own mask is ANDed in, and only rows the pipeline actually evaluated are tested. Since
    gamma <= 1, ``gamma_bar > 1`` never switches and reproduces the inner guider bit for bit.

    Inner state: the inner guider runs on the full batch every step with switched-off rows fed ``uncond :=
    cond`` (d = 0), so per-sample state such as APG momentum stays aligned with the batch.

    Attributes (reset by ``begin``):
        switched_at: ``[B]`` long, the step index at which each sample switched off, -1 if never.
        last_gamma: ``[B]`` float, the latest cosine per sample (NaN where not measured yet).

    Args:
        inner: the guider to gate (or give ``inner_class`` + ``inner_config``, as stored in the config).
        gamma_bar: threshold on the cosine, finite; close to 1 (0.99 ... 1.0) in practice.
        min_steps: no sample switches before this step index (the "min_steps" gate). At high noise the eps
            predictions of both branches are close to ``x_t / sigma`` whatever the label, so their cosine is near 1
            at the first steps; without a gate AG may switch off before guidance has done anything.
    """

    def __init__(
        self,
        inner: Guider | None = None,
        gamma_bar: float = 0.99,
        inner_class: str | None = None,
        inner_config: dict | None = None,
        min_steps: int = 0,
    ):
        if (
            isinstance(gamma_bar, bool)
            or not isinstance(gamma_bar, (int, float))
            or not math.isfinite(gamma_bar)
        ):
            raise ValueError(
                f"gamma_bar must be a finite number (a cosine threshold, ~0.99); got {gamma_bar!r}"
            )
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
            raise ValueError(f"min_steps must be an integer >= 0; got {min_steps!r}")
        self.gamma_bar = float(gamma_bar)
        self.min_steps = min_steps
        self._init_inner(inner, inner_class, inner_config, gamma_bar=self.gamma_bar, min_steps=min_steps)
        self.switched_at = None
        self.last_gamma = None

    def _reset(self, batch_size: int, num_inference_steps: int) -> None:
        super()._reset(batch_size, num_inference_steps)
        self.switched_at = torch.full((batch_size,), -1, dtype=torch.long)
        self.last_gamma = torch.full((batch_size,), float("nan"))

    def _gate(self, info: StepInfo) -> torch.Tensor:
        return (self.switched_at < 0) | (self.switched_at >= info.step_index)

    def needs_predictions(self, info: StepInfo) -> bool:
        return True  # the cosine test reads the converted predictions of every evaluated row

    def _guide(self, cond: Prediction, uncond: Prediction | None, info: StepInfo) -> torch.Tensor:
        active = self._gate(info)
        measured = self._uncond_mask(info).cpu()  # rows whose uncond pass really ran
        guided = self._gated_call(cond, uncond, info, active)
        if uncond is not None and bool(measured.any()):
            dtype = torch.promote_types(cond.eps.dtype, torch.float32)
            gamma = torch.nn.functional.cosine_similarity(
                cond.eps.flatten(1).to(dtype), uncond.eps.flatten(1).to(dtype), dim=1
            ).cpu()
            self.last_gamma = torch.where(measured, gamma.to(self.last_gamma.dtype), self.last_gamma)
            newly = measured & (gamma > self.gamma_bar) & (self.switched_at < 0)
            newly &= info.step_index >= self.min_steps
            self.switched_at[newly] = info.step_index
        return guided
