"""The guider contract shared by every guidance method, plus the plumbing for guiders wrapping a guider.

A pipeline drives a guider once per sampling run like this::

    guider.begin(batch_size, num_inference_steps)
    for k, t in enumerate(timesteps):
        info = StepInfo(k, num_inference_steps, t, sigma)         # sigma: [B] Karras level sigma_t / alpha_t
        cond = Prediction(x0=..., eps=...)                          # conditional branch, full batch
        mask = guider.uncond_mask(info)                             # [B] bool: rows needing the uncond pass
        uncond = Prediction(...) if mask.any() else None            # unmasked rows: cond values
        x0_guided = guider(cond, uncond, info)                      # [B, ...], dtype of cond.x0

Guiders work on denoised estimates ``x0`` (APG needs them, and the guidance interval and LinearAG are
simplest there); the pipeline converts the network output to ``(x0, eps)`` and the guided ``x0`` back
(``gen.diffusion``). Settings are ``__init__`` arguments registered in a Diffusers ``ConfigMixin`` config
(``guider_config.json``), so ``save_pretrained`` / ``from_pretrained`` / ``from_config`` work; run state lives
in plain attributes that ``begin`` resets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin

from gen import validate

_GUIDER_CLASSES: dict[str, type[Guider]] = {}


@dataclass
class Prediction:
    """One branch's network output, already converted by the pipeline.

    Args:
        x0: ``[B, ...]`` denoised estimate D(x_t).
        eps: ``[B, ...]`` eps-equivalent, ``(x_t - alpha_t x0) / sigma_t``.
    """

    x0: torch.Tensor
    eps: torch.Tensor


@dataclass
class StepInfo:
    """Where the sampler stands when it asks for guidance.

    Args:
        step_index: ``0 .. num_inference_steps - 1``; second-order samplers may repeat an index.
        num_inference_steps: steps of this run.
        timestep: scheduler timestep (scalar tensor).
        sigma: ``[B]`` (or scalar) Karras noise level ``sigma_t / alpha_t`` of the current ``x_t``.
    """

    step_index: int
    num_inference_steps: int
    timestep: torch.Tensor
    sigma: torch.Tensor


def check_scale(name: str, value: float) -> float:
    """Validate a guidance scale: a finite real number >= 0 (1 means no guidance, 0 means unconditional)."""
    return validate.number(name, value, 0.0)


def rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``[B]`` mask to ``[B, 1, ..., 1]`` so it broadcasts against ``like``."""
    return mask.to(like.device).reshape((-1,) + (1,) * (like.dim() - 1))


class Guider(ConfigMixin):
    """Base class: run bookkeeping and input checks; subclasses implement ``_reset``, ``_uncond_mask`` and
    ``_guide``.

    Run state (momentum, switched-off samples, regression history) is reset by ``begin``. Calling
    ``uncond_mask`` or ``__call__`` before ``begin``, with another batch size or step count, or with a
    ``step_index`` that goes backwards (a new run without ``begin``) raises ``ValueError``. Repeating an index
    is allowed (second-order samplers).
    """

    config_name = "guider_config.json"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _GUIDER_CLASSES[cls.__name__] = cls

    # --- persistence (as diffusers.guiders.BaseGuidance) ----------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write ``guider_config.json`` (settings only, no run state) to ``save_directory``."""
        self.save_config(save_directory, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs
    ):
        """Load a guider saved by ``save_pretrained``; ``Guider.from_pretrained`` picks the saved class.

        A missing, corrupt or foreign ``guider_config.json`` (another guider's settings for a specific class, invalid
        JSON, a non-object) is a ``ValueError`` naming the file."""
        where = Path(os.fspath(pretrained_model_name_or_path)) / (subfolder or "") / cls.config_name
        from gen.sampling.loading import looks_local  # here: gen.sampling imports gen.guidance

        if looks_local(os.fspath(pretrained_model_name_or_path)) and not where.parent.is_dir():
            raise ValueError(f"guider folder {str(where.parent)!r} does not exist")
        try:
            config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (OSError, ValueError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"could not read a guider config from {str(where)!r}: {err}") from None
        if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
            raise ValueError(f"{str(where)!r} is not a guider config (a JSON object with _class_name)")
        name = config["_class_name"]
        if cls is not Guider and name != cls.__name__:
            raise ValueError(f"{str(where)!r} holds a {name} guider, not a {cls.__name__}; load it with "
                             f"{name}.from_pretrained or Guider.from_pretrained")
        target = guider_class(name, f"_class_name in {str(where)!r}") if cls is Guider else cls
        try:
            return target.from_config(config)
        except TypeError as err:  # an unknown or missing setting
            raise ValueError(f"{str(where)!r}: {err}") from None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """``ConfigMixin.from_config``, but every stored value is used: Diffusers' decorator lists
        arguments given positionally in ``_use_default_values``, so ``from_config(CFG(2.0).config)`` would
        otherwise give w = 5."""
        if config is not None:
            config = {k: v for k, v in dict(config).items() if k != "_use_default_values"}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # --- run lifecycle --------------------------------------------------------------------------------------
    def begin(self, batch_size: int, num_inference_steps: int) -> None:
        """Start a run of ``batch_size`` samples and ``num_inference_steps`` steps; resets all run state."""
        for name, value in (("batch_size", batch_size), ("num_inference_steps", num_inference_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self._run = {"batch_size": batch_size, "num_inference_steps": num_inference_steps, "step_index": -1}
        self._reset(batch_size, num_inference_steps)

    def uncond_mask(self, info: StepInfo) -> torch.Tensor:
        """``[B]`` bool: the samples whose unconditional pass is needed at this step."""
        batch = self._check_step(info)
        mask = self._uncond_mask(info)
        return mask.expand(batch).to(self._device(info))

    def cond_mask(self, info: StepInfo) -> torch.Tensor:
        """``[B]`` bool: the samples whose conditional pass is needed at this step (all, except for guiders that
        use the unconditional branch alone, such as CFG with w = 0). Rows not evaluated reach ``__call__`` with the
        other branch's values."""
        batch = self._check_step(info)
        return self._cond_mask(info).expand(batch).to(self._device(info))

    def linear_weight(self, info: StepInfo) -> torch.Tensor | None:
        """``[B]`` weights ``a`` when this step's guided prediction is the affine mix ``u + a (c - u)`` of the two
        branches, the same in every prediction space (CFG: ``a = w``); None when it is not (APG, LinearAG).

        The sampling core then mixes the network outputs directly, exactly as Diffusers' pipelines do, with no
        conversion to x0 and back.
        """
        return None

    def needs_predictions(self, info: StepInfo) -> bool:
        """Whether ``__call__`` must see this step's converted predictions (state updates, or no
        :meth:`linear_weight`). A guider with a linear weight that keeps no state returns False."""
        return True

    def is_static(self) -> bool:
        """True when the masks and :meth:`linear_weight` are the same at every step of a run and depend on nothing
        but the batch (CFG). The sampling core then asks for them once per run, when the guider also needs no
        predictions."""
        return False

    def __call__(self, cond: Prediction, uncond: Prediction | None, info: StepInfo) -> torch.Tensor:
        """The guided ``x0`` ``[B, ...]`` in ``cond.x0``'s dtype.

        Args:
            cond: conditional prediction, ``[B, ...]``.
            uncond: unconditional prediction, full batch; rows where ``uncond_mask`` was False are not read.
                ``None`` when no row needed it.
            info: the current step.
        """
        batch = self._check_step(info)
        if cond.x0.shape[0] != batch or cond.eps.shape != cond.x0.shape:
            raise ValueError(
                f"cond.x0/cond.eps must both be [batch_size={batch}, ...]; got {tuple(cond.x0.shape)} and "
                f"{tuple(cond.eps.shape)} (call begin() before each sampling run)"
            )
        if uncond is not None and (uncond.x0.shape != cond.x0.shape or uncond.eps.shape != cond.x0.shape):
            raise ValueError(
                f"uncond.x0/uncond.eps must have cond's shape {tuple(cond.x0.shape)}; got "
                f"{tuple(uncond.x0.shape)} and {tuple(uncond.eps.shape)}"
            )
        if uncond is None and bool(self._uncond_mask(info).any()):
            raise ValueError(
                "uncond is None but uncond_mask(info) asked for the unconditional pass of some rows"
            )
        return self._guide(cond, uncond, info)

    # --- subclass hooks -------------------------------------------------------------------------------------
    def _reset(self, batch_size: int, num_inference_steps: int) -> None:
        """Clear run state (called by ``begin``)."""

    def _uncond_mask(self, info: StepInfo) -> torch.Tensor:
        raise NotImplementedError

    def _cond_mask(self, info: StepInfo) -> torch.Tensor:
        return torch.ones(self._batch_size(), dtype=torch.bool)

    def _guide(self, cond: Prediction, uncond: Prediction | None, info: StepInfo) -> torch.Tensor:
        raise NotImplementedError

    # --- helpers --------------------------------------------------------------------------------------------
    @staticmethod
    def _device(info: StepInfo) -> torch.device:
        for value in (info.sigma, info.timestep):
            if isinstance(value, torch.Tensor):
                return value.device
        return torch.device("cpu")

    def _batch_size(self) -> int:
        return self._run["batch_size"]

    def _check_step(self, info: StepInfo) -> int:
        run = getattr(self, "_run", None)
        if run is None:
            raise ValueError(
                f"{type(self).__name__} was used without begin(); call begin() before each sampling run"
            )
        if info.num_inference_steps != run["num_inference_steps"]:
            raise ValueError(
                f"info.num_inference_steps={info.num_inference_steps} but begin() was given "
                f"{run['num_inference_steps']}; call begin() before each sampling run"
            )
        if not 0 <= info.step_index < run["num_inference_steps"]:
            raise ValueError(
                f"step_index={info.step_index} is outside [0, {run['num_inference_steps']}); "
                "call begin() before each sampling run"
            )
        if info.step_index < run["step_index"]:
            raise ValueError(
                f"step_index went backwards ({run['step_index']} -> {info.step_index}): a new sampling run "
                "needs fresh state; call begin() before each sampling run"
            )
        sigma = info.sigma
        if isinstance(sigma, torch.Tensor) and sigma.numel() not in (1, run["batch_size"]):
            raise ValueError(
                f"info.sigma has {sigma.numel()} entries but begin() was given "
                f"batch_size={run['batch_size']}; "
                "call begin() before each sampling run"
            )
        run["step_index"] = info.step_index
        return run["batch_size"]


def guider_class(name: str, what: str = "inner_class") -> type[Guider]:
    """The ``Guider`` subclass called ``name`` (class name, as stored in ``inner_class`` or ``_class_name``)."""
    if not isinstance(name, str) or name not in _GUIDER_CLASSES:
        raise ValueError(
            f"{what}={name!r} is not a guider; allowed: {', '.join(sorted(_GUIDER_CLASSES))}"
        )
    return _GUIDER_CLASSES[name]


def _plain(value: Any) -> Any:
    """Config values as plain JSON types (FrozenDict -> dict, tuple -> list)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class GuiderWrapper(Guider):
    """A guider that gates an ``inner`` guider per sample (AdaptiveGuidance, GuidanceInterval).

    The inner guider is serialised as two config entries, ``inner_class`` (its class name) and
    ``inner_config`` (its config dict), so nested wrappers save and load. Construct with either ``inner=``
    or those two.

    Gating rule: the inner guider is called on the *full* batch every step, with the uncond rows of gated-off
    samples replaced by their cond rows (so they contribute ``d = Dc - Du = 0``; APG's momentum stays
    per-sample consistent), and the gated-off rows of the result are replaced by ``cond.x0``.
    """

    ignore_for_config: ClassVar[list[str]] = ["inner"]

    def _init_inner(self, inner: Guider | None, inner_class: str | None, inner_config: dict | None, **config):
        if inner is not None:
            if inner_class is not None or inner_config is not None:
                raise ValueError("pass either inner or inner_class/inner_config, not both")
            if not isinstance(inner, Guider):
                raise validate.ArgumentTypeError(f"inner must be a gen.guidance.Guider; got {validate.describe(inner)}")
        else:
            if inner_class is None:
                raise ValueError("inner (a Guider) or inner_class/inner_config is required")
            if inner_config is not None and not isinstance(inner_config, dict):
                raise validate.ArgumentTypeError(f"inner_config must be a dict of settings; got "
                                                 f"{validate.describe(inner_config)}")
            inner = guider_class(inner_class).from_config(dict(inner_config or {}))
        self.inner = inner
        inner_config = {k: v for k, v in _plain(dict(inner.config)).items() if not k.startswith("_")}
        # Registered by hand: Diffusers' @register_to_config maps positional args onto the signature *minus*
        # ignore_for_config, which would misplace `inner`.
        self.register_to_config(**config, inner_class=type(inner).__name__, inner_config=inner_config)

    def _reset(self, batch_size: int, num_inference_steps: int) -> None:
        self.inner.begin(batch_size, num_inference_steps)

    def _gate(self, info: StepInfo) -> torch.Tensor:
        """``[B]`` bool: samples this wrapper lets the inner guider guide at this step."""
        raise NotImplementedError

    def _uncond_mask(self, info: StepInfo) -> torch.Tensor:
        return self.inner.uncond_mask(info) & self._gate(info).to(self._device(info))

    def _cond_mask(self, info: StepInfo) -> torch.Tensor:
        # gated-off rows are conditional-only
        return self.inner.cond_mask(info) | ~self._gate(info).to(self._device(info))

    def linear_weight(self, info: StepInfo) -> torch.Tensor | None:
        a = self.inner.linear_weight(info)
        if a is None:
            return None
        gate = self._gate(info).to(a.device)
        return torch.where(gate, a, torch.ones_like(a))

    def needs_predictions(self, info: StepInfo) -> bool:
        return self.inner.needs_predictions(info)

    def _gated_call(self, cond: Prediction, uncond: Prediction | None, info: StepInfo, gate: torch.Tensor):
        """Inner guider on the full batch with gated-off rows fed ``uncond := cond``; those rows return
        ``cond.x0``."""
        if uncond is None:
            uncond = cond
        elif not bool(gate.all()):
            g = rows(gate, cond.x0)
            uncond = Prediction(
                x0=torch.where(g, uncond.x0, cond.x0), eps=torch.where(g, uncond.eps, cond.eps)
            )
        guided = self.inner(cond, uncond, info)
        if bool(gate.all()):
            return guided
        return torch.where(rows(gate, cond.x0), guided, cond.x0)
