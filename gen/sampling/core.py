"""The one sampling loop of `gen`: every pipeline, DPS, RED-Diff and AlignProp's sampling with gradients run it.

Per entry ``t`` of ``scheduler.timesteps`` (step index ``k`` in ``0 .. N-1``; second-order schedulers visit an
index twice):

1. ``frame = space.frame(x, t)``: the network input ``x_in`` and the conversions of the scheduler's family
   (:mod:`gen.diffusion.space`);
2. the guider says which rows need the conditional and the unconditional pass; ONE network call evaluates exactly
   those rows (NFE counts them). Plain ``CFG`` gives the same answer at every step, so it is asked once per run;
3. an affine guider (CFG, and gates around it) mixes the two outputs directly, ``u + w (c - u)``; any other guider
   sees both branches as ``(x0, eps)`` (the space its paper uses) and returns a guided x0, converted back;
4. ``scheduler.step``; then an optional per-step ``hook`` may replace the new sample (DPS's measurement gradient,
   RED-Diff-style updates), and ``on_step_end`` may replace it too (Diffusers' ``callback_on_step_end``).

``keep_grad[i]`` (AlignProp's truncated backprop) runs step i's network call with autograd, optionally
checkpointed; other steps run it under ``no_grad``. The scheduler step always runs under the ambient grad mode.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from gen.diffusion.space import Frame, PredictionSpace, prediction_space
from gen.guidance import CFG, Guider, Prediction, StepInfo

from .adapters import Conditioning, ModelAdapter, adapter_for, cat_inputs, select_rows


@dataclass
class StepState:
    """What a per-step hook sees.

    Args:
        step_index: 0 .. N-1 (the guider's step index); ``loop_index`` counts every scheduler timestep.
        timestep: the scheduler timestep.
        x: the sample the network was evaluated at (requires grad when the hook asked for it).
        frame: the evaluation frame (``frame.x_in`` is the network input).
        x0: the guided clean-sample estimate as a function of ``x`` (with graph when the hook needs gradients).
        prev_sample: the scheduler's output (detached when the hook needs gradients).
    """

    step_index: int
    loop_index: int
    timestep: torch.Tensor
    x: torch.Tensor
    frame: Frame
    x0: torch.Tensor
    prev_sample: torch.Tensor


class StepHook:
    """A per-step update after the scheduler step. ``needs_grad``: evaluate the network with autograd on ``x`` so
    that ``state.x0`` can be differentiated (DPS)."""

    needs_grad: bool = False

    def begin(self, num_inference_steps: int) -> None:
        """Called once before the loop."""

    def __call__(self, state: StepState) -> torch.Tensor | None:
        """Return the sample that replaces ``state.prev_sample``, or None to keep it."""
        raise NotImplementedError


@dataclass
class SampleResult:
    """``sample``: the final state ``[B, ...]``; ``nfe``: network evaluations per sample (mean over the batch);
    ``keep_mask``: which steps kept gradients."""

    sample: torch.Tensor
    nfe: float
    keep_mask: list[bool] | None = None


def scheduler_step_kwargs(scheduler, eta: float | None = None, generator=None, strict: bool = False) -> dict:
    """The keyword arguments ``scheduler.step`` accepts among ``eta`` and ``generator`` (one place for all).

    ``eta`` is ignored by schedulers without it, as in Diffusers' pipelines; with ``strict`` a non-zero ``eta`` there
    raises ``ValueError`` instead.
    """
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0 if eta is None else eta
    elif strict and eta not in (None, 0, 0.0):
        raise ValueError(f"eta={eta} given but {type(scheduler).__name__}.step has no eta; use eta=0")
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _guider_step_index(loop_index: int, num_inference_steps: int, num_timesteps: int) -> int:
    return min(loop_index * num_inference_steps // max(num_timesteps, 1), num_inference_steps - 1)


_UNSET = object()


def evaluate(adapter: ModelAdapter, frame: Frame, t, conditioning: Conditioning, cond_rows, uncond_rows,
             grad: bool = True, use_checkpoint: bool = False, dtype=_UNSET, counts: tuple[int, int] | None = None):
    """One network call on the conditional rows ``cond_rows`` and the unconditional rows ``uncond_rows`` ([B] bool).

    ``dtype``: the network's dtype (inputs are cast to it); read from the adapter when not given (for Diffusers
    models that walks every submodule, so the loop reads it once per run). ``counts``: ``(cond_rows.sum(),
    uncond_rows.sum())`` when the caller knows them.

    Returns ``(raw_c, raw_u, n_rows)``: full-batch outputs where rows that were not evaluated hold the other
    branch's values (``raw_u`` is None when no unconditional row ran).
    """
    x_in = frame.x_in
    b = x_in.shape[0]
    n_c, n_u = counts if counts is not None else (int(cond_rows.sum()), int(uncond_rows.sum()))
    all_c = n_c == b
    xs, parts = [], []
    if n_c:
        xs.append(x_in if all_c else x_in[cond_rows])
        parts.append(conditioning.cond if all_c else select_rows(conditioning.cond, cond_rows, b))
    if n_u:
        xs.append(x_in if n_u == b else x_in[uncond_rows])
        parts.append(conditioning.uncond if n_u == b else select_rows(conditioning.uncond, uncond_rows, b))
    x_all = xs[0] if len(xs) == 1 else torch.cat(xs)
    if dtype is _UNSET:
        dtype = adapter.dtype
    if dtype is not None and x_all.is_floating_point() and x_all.dtype != dtype:
        x_all = x_all.to(dtype)
    if len(parts) == 1:
        inputs = parts[0]
    elif all_c and n_u == b:
        inputs = conditioning.both()
    else:
        inputs = cat_inputs(parts[0], parts[1])

    def call(x, *values):
        return adapter(x, t, **dict(zip(keys, values)))

    keys = list(inputs)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if use_checkpoint and torch.is_grad_enabled():
            out = checkpoint(call, x_all, *inputs.values(), use_reentrant=False)
        else:
            out = adapter(x_all, t, **inputs)
    if out.shape[0] != n_c + n_u:
        raise ValueError(f"the network returned {out.shape[0]} rows for {n_c + n_u} inputs")
    out_c, out_u = out[:n_c], out[n_c:]
    if all_c:
        raw_c = out_c
    else:
        raw_c = torch.empty((b,) + tuple(out.shape[1:]), dtype=out.dtype, device=out.device)
        raw_c[cond_rows] = out_c
    if not n_u:
        return raw_c, None, n_c + n_u
    if n_u == b:
        raw_u = out_u
    else:
        raw_u = raw_c.clone()
        raw_u[uncond_rows] = out_u
    if not all_c:  # conditional rows that did not run take the unconditional values
        raw_c = torch.where(cond_rows.reshape((-1,) + (1,) * (out.ndim - 1)), raw_c, raw_u)
    return raw_c, raw_u, n_c + n_u


def guided_output(frame: Frame, guider: Guider, info: StepInfo | None, raw_c: torch.Tensor,
                  raw_u: torch.Tensor | None, need_x0: bool = False, weight=_UNSET) -> tuple[torch.Tensor,
                                                                                           torch.Tensor | None]:
    """Combine the two branches with ``guider``: ``(output in the frame's linear space, guided x0 or None)``.

    ``weight``: the step's linear weight when the caller already has it from a guider that needs no predictions
    (CFG); then ``guider`` and ``info`` are not consulted.
    """
    lin_c = frame.linear(raw_c)
    lin_u = None if raw_u is None else frame.linear(raw_u)
    if weight is _UNSET:
        weight = guider.linear_weight(info)
        predictions = weight is None or guider.needs_predictions(info)
    else:
        predictions = False
    x0_hat = cond = None
    if predictions:
        cond = Prediction(*frame.to_x0_eps(lin_c))
        uncond = None if lin_u is None else Prediction(*frame.to_x0_eps(lin_u))
        x0_hat = guider(cond, uncond, info)
    if weight is not None:
        if lin_u is None:
            lin = lin_c
        else:
            a = weight.to(device=lin_c.device, dtype=lin_c.dtype).reshape((-1,) + (1,) * (lin_c.ndim - 1))
            lin = lin_u + a * (lin_c - lin_u)
        if need_x0:
            x0_hat = frame.to_x0_eps(lin)[0]
        return lin, x0_hat
    return frame.from_guided_x0(x0_hat, cond.x0, cond.eps), x0_hat


def denoise(
    model,
    scheduler,
    latents: torch.Tensor,
    num_inference_steps: int,
    conditioning: Conditioning | None = None,
    guider: Guider | None = None,
    *,
    step_kwargs: dict | None = None,
    space: PredictionSpace | None = None,
    hook: StepHook | None = None,
    keep_grad: Sequence[bool] | None = None,
    gradient_checkpointing: bool = False,
    progress: Callable | None = None,
    on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
) -> SampleResult:
    """Run the scheduler over ``scheduler.timesteps`` (already set) from ``latents`` (already scaled).

    Args:
        model: a :class:`ModelAdapter`, a Diffusers network (see :func:`adapter_for`) or any module.
        scheduler: a Diffusers-style scheduler with ``timesteps`` set for ``num_inference_steps``.
        latents: ``[B, ...]`` initial state.
        num_inference_steps: N, the step count guiders count in (``len(timesteps)`` may be larger).
        conditioning: the branches' network inputs (default: none, unconditional).
        guider: a :class:`gen.guidance.Guider` (default ``CFG(1)``: conditional only); ``begin`` is called here.
        step_kwargs: extra keyword arguments of ``scheduler.step`` (see :func:`scheduler_step_kwargs`).
        space: the prediction space (default: :func:`gen.diffusion.prediction_space` of the scheduler).
        hook: a :class:`StepHook` applied after every scheduler step.
        keep_grad: per loop entry, whether the network call keeps its graph (AlignProp); None: the ambient mode.
        gradient_checkpointing: checkpoint the kept network calls (``use_reentrant=False``).
        progress: wraps the timestep iterator (a pipeline's ``progress_bar``).
        on_step_end: ``on_step_end(step_index, t, x) -> new x or None`` after each step.
    Returns:
        :class:`SampleResult`.
    """
    adapter = adapter_for(model)
    conditioning = conditioning or Conditioning()
    guider = guider if guider is not None else CFG(guidance_scale=1.0)
    space = space or prediction_space(scheduler)
    timesteps = scheduler.timesteps
    n_t = len(timesteps)
    if keep_grad is not None and len(keep_grad) != n_t:
        raise ValueError(f"keep_grad has {len(keep_grad)} entries; expected one per timestep ({n_t})")
    x = latents
    # once per run, not per step: the network's dtype and the frames' schedule coefficients
    net_dtype = adapter.dtype
    prepare = getattr(space, "prepare", None)
    if callable(prepare):
        prepare(timesteps, x)
    b = x.shape[0]
    guider.begin(b, int(num_inference_steps))
    if hook is not None:
        hook.begin(int(num_inference_steps))
    kwargs = dict(step_kwargs or {})
    rows = 0
    # A static guider (CFG) answers the same at every step and keeps no state: when it also needs no predictions, its
    # masks and weight are asked for at the first step and reused (no StepInfo, noise level or guider calls after).
    plan = None
    for i, t in enumerate(timesteps if progress is None else progress(timesteps)):
        k = _guider_step_index(i, int(num_inference_steps), n_t)
        need_grad = hook is not None and hook.needs_grad
        keep = True if keep_grad is None else bool(keep_grad[i])
        with torch.enable_grad() if need_grad else contextlib.nullcontext():
            if need_grad:
                x = x.detach().requires_grad_(True)
            frame = space.frame(x, t)
            if plan is None:
                info = StepInfo(step_index=k, num_inference_steps=int(num_inference_steps),
                                timestep=torch.as_tensor(t), sigma=_step_sigma(frame, guider))
                mask_c = guider.cond_mask(info).to(x.device)
                mask_u = guider.uncond_mask(info).to(x.device)
                counts = (int(mask_c.sum()), int(mask_u.sum()))
                if counts[1] and not conditioning.has_uncond:
                    raise ValueError(f"{type(guider).__name__} needs an unconditional branch, but this model has "
                                     "none (an unconditional or bridge network, or no null class/prompt)")
                fixed = guider.is_static() and not guider.needs_predictions(info)
                weight = guider.linear_weight(info) if fixed else _UNSET
                if fixed:
                    plan = (mask_c, mask_u, counts, weight)
            else:
                info = None
                mask_c, mask_u, counts, weight = plan
            raw_c, raw_u, n = evaluate(adapter, frame, t, conditioning, mask_c, mask_u, grad=keep or need_grad,
                                       use_checkpoint=gradient_checkpointing and keep, dtype=net_dtype,
                                       counts=counts)
            rows += n
            lin, x0_hat = guided_output(frame, guider, info, raw_c, raw_u, need_x0=hook is not None, weight=weight)
            raw = frame.to_scheduler(lin)
        step_in = raw.detach() if need_grad else raw
        prev = scheduler.step(step_in, t, x.detach() if need_grad else x, **kwargs, return_dict=False)[0]
        if hook is not None:
            with torch.enable_grad() if need_grad else contextlib.nullcontext():
                new = hook(StepState(k, i, t, x, frame, x0_hat, prev))
            if new is not None:
                prev = new
            if need_grad:
                prev = prev.detach()
        x = prev
        if on_step_end is not None:
            new = on_step_end(k, t, x)
            if new is not None:
                x = new
    keep_mask = None if keep_grad is None else [bool(v) for v in keep_grad]
    return SampleResult(sample=x, nfe=rows / b, keep_mask=keep_mask)


def _step_sigma(frame: Frame, guider: Guider) -> torch.Tensor:
    # the Karras level every guider may read (GuidanceInterval gates on it); cheap once the frame has alpha, sigma
    try:
        return frame.sigma_ratio()
    except NotImplementedError:
        return torch.full((frame.x_in.shape[0],), float("nan"))
