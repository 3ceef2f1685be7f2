"""Adaptive Guidance (Castillo et al. 2023, arXiv 2312.12487): stop guiding a sample once its conditional and
unconditional predictions agree; plus the fixed-step baseline "Step AG" (Zhang, Zhang & Wan 2025, arXiv
2506.08351)."""

from __future__ import annotations

import math
import warnings

import torch

from .base import Guider, GuiderWrapper, Prediction, StepInfo

CRITERIA = ("x0_cosine", "eps_cosine", "step")
AFTER_SWITCH = ("cond", "frozen_eps_delta")


class AdaptiveGuidance(GuiderWrapper):
    """Adaptive Guidance (AG) around an inner guider (CFG or APG).

    Per sample, at every step where its unconditional pass ran, a criterion decides whether to switch it off:

        criterion="x0_cosine":   gamma = cos( flat(x0_c), flat(x0_u) )    (denoised estimates; the default)
        criterion="eps_cosine":  gamma = cos( flat(eps_c), flat(eps_u) )  (the paper's statistic on eps-models)
        gamma > gamma_bar and step index >= min_steps  =>  switched off for the rest of the run
        criterion="step":        every sample is guided for step indices < min_steps and never after (Step AG;
                                 no cosine, gamma_bar unused)

    Why x0: at high noise both branches predict eps ~ x_t / sigma whatever the label, so the eps cosine is ~1 from
    the first step (on the digits teacher 1 - gamma_eps is 1e-4 .. 4e-4 at step 0 of 20, and stays there) and the
    paper's rule switches guidance off before it has acted. The x0 estimates differ most at high noise and agree
    more and more towards the end (1 - gamma_x0: ~0.08 at step 0, ~5e-4 at step 11, ~1e-5 at step 18), which is
    the behaviour the rule assumes. ComfyUI-Adaptive-Guidance (asagi4) computes its cosine on denoised outputs for
    the same reason.

    After the switch (``after_switch``):
        "cond":              the guided x0 is ``x0_c`` (the paper: conditional only).
        "frozen_eps_delta":  the guidance offset of the sample's last guided step, frozen in eps space, is added
                             to the conditional prediction: ``eps = eps_c + d_eps`` with
                             ``d_eps = eps_guided - eps_c`` at that step, i.e. ``x0 = x0_c - (sigma / alpha) d_eps``
                             (the "CFG gating" of FastVideo PR #1372 / sglang PR #25848, a zeroth-order LinearAG:
                             on the digits teacher the eps-space offsets of consecutive steps have cosine ~0.97 and
                             norm ratio ~1.05 over the second half of a 20-step run). Still one network evaluation
                             per step.
    ``refresh_every = k > 0``: a switched-off sample gets its unconditional pass back every k-th step after its
    last guided step, which refreshes the frozen offset (the CFG-Cache of FasterCache, Lv et al. 2024, arXiv
    2410.19355: the conditional/unconditional residual reused across steps). ``0``: the switch is permanent.

    The step that triggers the switch is still guided (its uncond pass has been paid for); from the next step
    index on the sample's unconditional pass is skipped (``uncond_mask`` False). A repeated index, as
    second-order samplers issue, still counts as the triggering step. The inner guider's own mask is ANDed in,
    and only rows the pipeline actually evaluated are tested. Since gamma <= 1, ``gamma_bar = 1`` never switches
    and reproduces the inner guider bit for bit.

    A run in which every sample is switched off at step index 0 for good (``refresh_every = 0``) is reported: a
    ``UserWarning`` and ``disabled_at_first_step = True`` (guidance then acted on one step only; raise
    ``gamma_bar`` or ``min_steps``).

    Inner state: the inner guider runs on the full batch every step with switched-off rows fed ``uncond :=
    cond`` (d = 0), so per-sample state such as APG momentum stays aligned with the batch.

    Attributes (reset by ``begin``):
        switched_at: ``[B]`` long, the step index at which each sample switched off, -1 if never (``step``: the
            first unguided index).
        last_gamma: ``[B]`` float, the latest cosine per sample (NaN where not measured yet).
        disabled_at_first_step: True when every sample switched off at step index 0.

    Args:
        inner: the guider to gate (or give ``inner_class`` + ``inner_config``, as stored in the config).
        gamma_bar: threshold on the cosine, in (0, 1].
        min_steps: no sample switches before this step index; for ``criterion="step"``, the number of guided steps.
        criterion: ``"x0_cosine"`` (default), ``"eps_cosine"`` or ``"step"``.
        after_switch: ``"frozen_eps_delta"`` (default) or ``"cond"`` (the paper).
        refresh_every: k >= 1 (an unconditional pass every k-th step after the switch; 1 is plain guidance;
            default 4) or ``0`` (a permanent switch, as in the paper).

    Defaults (``x0_cosine``, ``gamma_bar=0.999``, ``frozen_eps_delta``, ``refresh_every=4``) were chosen on the
    digits teacher at w = 3, 20 DDIM steps (BENCHMARKS.md): the paper's rule (``eps_cosine``, ``cond``, no
    refresh) switches every sample off at step 0 there; the defaults save 19.9 % of the network evaluations at
    +1.7 % FID-digits and 47 dB PSNR against CFG's images (3 seeds of 500), where the x0 criterion followed by
    ``cond`` saves 19-26 % at +5 to +7 % (one seed). ``AdaptiveGuidance(inner, gamma_bar, min_steps=...,
    criterion="eps_cosine", after_switch="cond", refresh_every=0)`` is the paper's AG.
    """

    def __init__(
        self,
        inner: Guider | None = None,
        gamma_bar: float = 0.999,
        inner_class: str | None = None,
        inner_config: dict | None = None,
        min_steps: int = 0,
        criterion: str = "x0_cosine",
        after_switch: str = "frozen_eps_delta",
        refresh_every: int = 4,
    ):
        if (
            isinstance(gamma_bar, bool)
            or not isinstance(gamma_bar, (int, float))
            or not math.isfinite(gamma_bar)
            or not 0.0 < gamma_bar <= 1.0
        ):
            raise ValueError(f"gamma_bar must be a cosine threshold in (0, 1] (e.g. 0.999); got {gamma_bar!r}")
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
            raise ValueError(f"min_steps must be an integer >= 0; got {min_steps!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r} is unknown; allowed: {', '.join(CRITERIA)}")
        if after_switch not in AFTER_SWITCH:
            raise ValueError(f"after_switch={after_switch!r} is unknown; allowed: {', '.join(AFTER_SWITCH)}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 0:
            raise ValueError(f"refresh_every must be an integer >= 0 (0: never); got {refresh_every!r}")
        self.gamma_bar = float(gamma_bar)
        self.min_steps = min_steps
        self.criterion, self.after_switch, self.refresh_every = criterion, after_switch, refresh_every
        self._init_inner(inner, inner_class, inner_config, gamma_bar=self.gamma_bar, min_steps=min_steps,
                         criterion=criterion, after_switch=after_switch, refresh_every=refresh_every)
        self.switched_at = None
        self.last_gamma = None
        self.disabled_at_first_step = False
        self._delta_eps = None

    def _reset(self, batch_size: int, num_inference_steps: int) -> None:
        super()._reset(batch_size, num_inference_steps)
        self.switched_at = torch.full((batch_size,), -1, dtype=torch.long)
        self.last_gamma = torch.full((batch_size,), float("nan"))
        self.disabled_at_first_step = False
        self._delta_eps = None

    def _gate(self, info: StepInfo) -> torch.Tensor:
        k = info.step_index
        if self.criterion == "step":
            last = torch.full((self._batch_size(),), self.min_steps - 1, dtype=torch.long)  # last guided index
            gate = torch.full((self._batch_size(),), k < self.min_steps, dtype=torch.bool)
        else:
            last = self.switched_at
            gate = (last < 0) | (last >= k)
        if self.refresh_every:  # switched-off rows get their unconditional pass back every refresh_every steps
            gate |= ~gate & ((k - last) % self.refresh_every == 0)
        return gate

    def _statistic(self, cond: Prediction, uncond: Prediction) -> torch.Tensor:
        a, b = (cond.x0, uncond.x0) if self.criterion == "x0_cosine" else (cond.eps, uncond.eps)
        dtype = torch.promote_types(a.dtype, torch.float32)
        cos = torch.nn.functional.cosine_similarity(a.flatten(1).to(dtype), b.flatten(1).to(dtype), dim=1)
        return cos.clamp(max=1.0).cpu()  # rounding can give 1 + 1e-7; gamma_bar = 1 must never switch

    def needs_predictions(self, info: StepInfo) -> bool:
        return True  # the cosine test reads the converted predictions of every evaluated row

    def _guide(self, cond: Prediction, uncond: Prediction | None, info: StepInfo) -> torch.Tensor:
        active = self._gate(info)
        guided = self._gated_call(cond, uncond, info, active)
        if self.after_switch == "frozen_eps_delta":
            guided = self._frozen_delta(cond, guided, active, info)
        if self.criterion == "step":
            self.switched_at[(self.switched_at < 0) & ~active] = info.step_index
        elif uncond is not None:
            measured = self._uncond_mask(info).cpu()  # rows whose uncond pass really ran
            if bool(measured.any()):
                gamma = self._statistic(cond, uncond)
                self.last_gamma = torch.where(measured, gamma.to(self.last_gamma.dtype), self.last_gamma)
                newly = measured & (gamma > self.gamma_bar) & (self.switched_at < 0)
                newly &= info.step_index >= self.min_steps
                self.switched_at[newly] = info.step_index
        if (info.step_index == 0 and not self.refresh_every and bool((self.switched_at == 0).all())
                and not self.disabled_at_first_step):
            self.disabled_at_first_step = True
            what = "the first unguided step is 0" if self.criterion == "step" else (
                f"{self.criterion} > gamma_bar={self.gamma_bar:g} for every sample")
            hint = "raise min_steps" if self.criterion == "step" else "raise gamma_bar or min_steps" + (
                ", or use criterion='x0_cosine'" if self.criterion == "eps_cosine" else "")
            warnings.warn(f"AdaptiveGuidance switched guidance off for every sample at step 0 ({what}): the rest "
                          f"of the run is unguided; {hint}.", UserWarning, stacklevel=2)
        return guided

    def _frozen_delta(self, cond: Prediction, guided: torch.Tensor, active: torch.Tensor, info: StepInfo):
        """Rows still guided record their eps-space offset; switched-off rows reuse the last one recorded."""
        alpha_over_sigma = (1.0 / torch.as_tensor(info.sigma, dtype=torch.float64)).reshape(-1)  # sigma_edm = s / a
        ratio = alpha_over_sigma.expand(self._batch_size()).reshape((-1,) + (1,) * (cond.x0.dim() - 1))
        ratio = ratio.to(device=cond.x0.device)
        # eps_guided - eps_c = -(alpha / sigma) (x0_guided - x0_c)
        delta = (-(ratio * (guided.double() - cond.x0.double()))).to(torch.float64)
        if self._delta_eps is None:
            self._delta_eps = torch.zeros_like(delta)
        act = active.to(cond.x0.device).reshape((-1,) + (1,) * (cond.x0.dim() - 1))
        self._delta_eps = torch.where(act, delta, self._delta_eps)
        frozen = (cond.x0.double() - self._delta_eps / ratio).to(guided.dtype)
        return torch.where(act, guided, frozen)
