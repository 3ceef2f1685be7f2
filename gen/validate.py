"""One input-validation layer: every pipeline argument, guider knob and ``gen.inverse`` operator input goes through it.

Each check takes the argument's ``name`` and its value, returns the value in the form the caller works with
(numbers as ``float``/``int``, numpy arrays as torch tensors: converted once, here) and raises an error that names
the argument, shows the bad value and says what is allowed:

- :class:`ArgumentTypeError` for a value of the wrong type or dtype. It is a ``TypeError`` (Python's convention)
  *and* a ``ValueError`` (the project's contract for bad arguments: ``except ValueError`` and ``gen.cli.run_main``
  catch every bad input, whatever its kind);
- ``ValueError`` for a value of the right type that is not allowed (non-finite, out of range, wrong shape).

The checks are pure and cheap (one pass over a tensor at most); they never change a valid value, so validated
calls give exactly the results unvalidated ones gave.

=============================  ==================================================================================
check                          accepts
=============================  ==================================================================================
:func:`number`                 a finite real number (int, float, numpy scalar, 0-d tensor/array) within a range
:func:`integer`                an integral number (not bool, not 2.5) within a range
:func:`choice`                 one of a list of strings
:func:`tensor`                 a torch tensor or numpy array: float dtype, finite values, a given shape/ndim
:func:`image`                  :func:`tensor` + a value range ([-1, 1] or [0, 1]); uint8 and [0, 255] data refused
:func:`generator`              a ``torch.Generator`` (or one per sample)
:func:`callback`               a callable (or None)
:func:`prompts`                a string or a non-empty list of strings
:func:`divisible_size`         a positive int that a network's downsampling divides
:func:`eps_schedule`           an SDE diffusion eps: a form name, a number >= 0, or a callable checked as it runs
:func:`scheduler_overrides`    keyword arguments a scheduler class accepts, with a valid ``prediction_type``
=============================  ==================================================================================
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
import torch

__all__ = [
    "ArgumentTypeError",
    "PREDICTION_TYPES",
    "callback",
    "choice",
    "describe",
    "divisible_size",
    "eps_schedule",
    "generator",
    "image",
    "integer",
    "number",
    "prompts",
    "scheduler_overrides",
    "tensor",
]

# the prediction types of Diffusers' noise schedulers (the flow-matching schedulers have no prediction_type)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type or dtype (a ``TypeError`` that ``except ValueError`` also catches)."""


def describe(value, limit: int = 60) -> str:
    """A short description of ``value`` for an error message (tensors by shape and dtype, long reprs cut)."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(value, (str, bool, int, float, type(None))) or type(value).__module__ == "builtins":
        return text
    return f"{text} ({type(value).__name__})"


# --- numbers -------------------------------------------------------------------------------------------------------
def _interval(low, high, low_open, high_open) -> str:
    """``">= 0"``, ``"> 0"``, ``"<= 1"`` or ``"in [0, 1)"``."""
    if high is None and low is None:
        return ""
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def _as_real(name: str, value, what: str):
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0 and not isinstance(value, bool):
        if value.dtype in (torch.bool, np.bool_) or str(value.dtype) == "bool":
            raise ArgumentTypeError(f"{name} must be {what}; got {describe(value)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise ArgumentTypeError(f"{name} must be {what}; got {describe(value)}")
    return value


def number(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, allow_none: bool = False, allow_inf: bool = False) -> float | None:
    """A finite real number in ``[low, high]`` (``low_open``/``high_open`` exclude the ends) as a ``float``.

    Raises:
        ArgumentTypeError: not a real number (a string, a bool, a list, a tensor with more than one value).
        ValueError: NaN or inf (``allow_inf`` admits +-inf), or outside the interval.
    """
    if value is None and allow_none:
        return None
    kind = "a number (inf allowed)" if allow_inf else "a finite number"
    allowed = f"{kind} {_interval(low, high, low_open, high_open)}".rstrip() + (" or None" if allow_none else "")
    value = float(_as_real(name, value, allowed))
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    if (low is not None and (value < low or (low_open and value == low))) or \
            (high is not None and (value > high or (high_open and value == high))):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return value


def integer(name: str, value, low: int | None = None, high: int | None = None, *,
            allow_none: bool = False) -> int | None:
    """An integral number in ``[low, high]`` as an ``int`` (``2.0`` is accepted, ``2.5`` and ``True`` are not)."""
    if value is None and allow_none:
        return None
    allowed = f"an integer {_interval(low, high, False, False)}".rstrip() + (" or None" if allow_none else "")
    value = _as_real(name, value, allowed)
    if not isinstance(value, Integral):
        if not math.isfinite(value) or value != int(value):
            raise ArgumentTypeError(f"{name} must be {allowed}; got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}; got {value}")
    return value


def choice(name: str, value, allowed: Sequence[str], *, allow_none: bool = False):
    """``value`` if it is one of ``allowed`` (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={describe(value)}; allowed: {', '.join(map(str, allowed))}"
                         + (" or None" if allow_none else ""))
    return value


# --- tensors -------------------------------------------------------------------------------------------------------
def tensor(name: str, value, *, ndim: int | Sequence[int] | None = None, shape: Sequence[int | None] | None = None,
           floating: bool = True, finite: bool = True, allow_none: bool = False) -> torch.Tensor | None:
    """A torch tensor from a tensor or a numpy array (converted once, sharing memory where it can).

    Args:
        ndim: the allowed number(s) of dimensions.
        shape: the expected shape; ``None`` entries match any size.
        floating: require a floating dtype (integer, bool and complex data are refused).
        finite: require every value finite (one pass).
    Raises:
        ArgumentTypeError: not a tensor/array (lists are refused: say what you mean with ``torch.tensor``), or a
            non-float dtype where floats are needed.
        ValueError: wrong ndim or shape, NaN or inf values.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ArgumentTypeError(f"{name} must be a numeric array; got {describe(value)}")
        value = torch.from_numpy(np.ascontiguousarray(value))
    elif not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor or a numpy array; got {describe(value)}")
    if floating and not value.is_floating_point():
        hint = " (integer pixels: convert with x.float() / 127.5 - 1 for [-1, 1])" if value.dtype == torch.uint8 else ""
        raise ArgumentTypeError(f"{name} must be a float tensor; got dtype {value.dtype}{hint}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in dims:
            text = f"{dims[0]} to {dims[-1]}" if len(dims) > 2 and dims == tuple(range(dims[0], dims[-1] + 1)) \
                else " or ".join(map(str, dims))
            raise ValueError(f"{name} must have {text} dimensions; got shape {tuple(value.shape)}")
    if shape is not None:
        want = tuple(shape)
        if value.ndim != len(want) or any(w is not None and w != s for w, s in zip(want, value.shape)):
            pretty = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
            raise ValueError(f"{name} shape {tuple(value.shape)} does not match the expected {pretty}")
    if finite and value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contains {bad} NaN or inf value(s); only finite values are allowed")
    return value


def image(name: str, value, value_range: tuple[float, float] = (-1.0, 1.0), *, tolerance: float = 0.05,
          ndim: int | Sequence[int] = 4, channels: int | None = None, shape=None,
          allow_none: bool = False) -> torch.Tensor | None:
    """Float images in ``value_range`` (plus ``tolerance``), as a tensor (numpy accepted).

    uint8 or other integer pixels are refused with the conversion to use, and so are float images whose values
    leave the range (``[0, 255]`` data where ``[-1, 1]`` or ``[0, 1]`` is expected), naming the range seen.
    """
    if value is None and allow_none:
        return None
    lo, hi = value_range
    expected = f"float images in [{lo:g}, {hi:g}]"
    if isinstance(value, (torch.Tensor, np.ndarray)) and not (
            value.is_floating_point() if isinstance(value, torch.Tensor) else np.issubdtype(value.dtype, np.floating)):
        conv = "x.float() / 127.5 - 1" if (lo, hi) == (-1.0, 1.0) else "x.float() / 255"
        raise ArgumentTypeError(f"{name} has dtype {value.dtype}; expected {expected}"
                                + (f" (8-bit pixels: use {conv})" if str(value.dtype) in ("uint8", "torch.uint8")
                                   else ""))
    x = tensor(name, value, ndim=ndim, shape=shape)
    if channels is not None and x.ndim >= 3 and x.shape[-3] != channels:
        raise ValueError(f"{name} must have {channels} channel(s) (shape [N, {channels}, H, W]); got shape "
                         f"{tuple(x.shape)}")
    if x.numel():
        vmin, vmax = float(x.min()), float(x.max())
        if vmin < lo - tolerance or vmax > hi + tolerance:
            hint = ""
            if vmax > 2.0 and hi <= 1.0:
                hint = " (this looks like [0, 255] pixel data)"
            elif (lo, hi) == (0.0, 1.0) and vmin < -tolerance:
                hint = " (this looks like [-1, 1] data: use x / 2 + 0.5)"
            raise ValueError(f"{name} must be {expected}; got values in [{vmin:.4g}, {vmax:.4g}]{hint}")
    return x


# --- other kinds ---------------------------------------------------------------------------------------------------
def generator(name: str, value, batch: int | None = None, *, allow_list: bool = True):
    """``value`` if it is None, a ``torch.Generator`` or (``allow_list``) a list of one per sample."""
    if value is None or isinstance(value, torch.Generator):
        return value
    if isinstance(value, list) and allow_list and value and all(isinstance(g, torch.Generator) for g in value):
        if batch is not None and len(value) != batch:
            raise ValueError(f"{name}: got {len(value)} generators for a batch of {batch}; give one, or one per image")
        return value
    what = "a torch.Generator or a list of them (one per image)" if allow_list else "one torch.Generator"
    raise ArgumentTypeError(f"{name} must be {what}; got {describe(value)} "
                            "(seed with torch.Generator().manual_seed(n))")


def callback(name: str, value, *, allow_none: bool = True):
    """A callable (or None)."""
    if value is None and allow_none:
        return None
    if not callable(value):
        raise ArgumentTypeError(f"{name} must be callable{' or None' if allow_none else ''}; got {describe(value)}")
    return value


def prompts(name: str, value, *, batch: int | None = None, allow_empty_string: bool = True) -> list[str]:
    """A string or a non-empty list of strings, as a list (one string is repeated ``batch`` times when given)."""
    if isinstance(value, str):
        out = [value] * (batch or 1)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        out = list(value)
    else:
        raise ArgumentTypeError(f"{name} must be a string or a non-empty list of strings; got {describe(value)}")
    if not allow_empty_string and not all(out):
        raise ValueError(f"{name} holds an empty string")
    if batch is not None and len(out) != batch:
        raise ValueError(f"{name}: got {len(out)} strings for a batch of {batch}; give one string, or one per item")
    return out


def divisible_size(name: str, value, multiple: int, *, default: int | None = None) -> int:
    """A positive integer size divisible by ``multiple`` (``None`` gives ``default``; 0 is an error, not the
    default)."""
    if value is None and default is not None:
        value = default
    value = integer(name, value, 1)
    if value % multiple:
        near = max(multiple, value // multiple * multiple)
        raise ValueError(f"{name}={value} is not divisible by {multiple} (the network's downsampling factor); "
                         f"allowed: positive multiples of {multiple}, e.g. {near}")
    return value


def eps_schedule(name: str, value, forms: Sequence[str]):
    """An SDE diffusion coefficient: a form name, a finite number >= 0, or a callable ``eps(t)`` wrapped so that a
    NaN, inf or negative value it returns is a ``ValueError`` naming ``t``."""
    if isinstance(value, str):
        return choice(name, value, forms)
    if callable(value):
        fn = value

        def checked(t):
            out = fn(t)
            try:
                return number(f"{name}({float(t):.4g})", out, 0.0)
            except ValueError as err:  # ArgumentTypeError included
                raise ValueError(f"the callable {name} returned an invalid value: {err}") from None

        return checked
    if isinstance(value, (str, bytes)) or isinstance(value, (list, tuple, dict)):
        raise ArgumentTypeError(f"{name} must be one of {', '.join(forms)}, a number >= 0 or a callable eps(t); "
                                f"got {describe(value)}")
    return number(name, value, 0.0)


def scheduler_overrides(scheduler_cls: type, overrides: dict, *, name: str = "use_scheduler") -> dict:
    """Check keyword overrides for ``scheduler_cls``: every key a parameter of its ``__init__`` and a valid
    ``prediction_type`` (Diffusers only warns about unknown keys and fails on a bad prediction type at the first
    step)."""
    params = inspect.signature(scheduler_cls.__init__).parameters
    known = [p for p in params if p not in ("self", "kwargs", "args")]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"{name}: {scheduler_cls.__name__} has no setting(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(known)}")
    if "prediction_type" in overrides:
        choice(f"{name}: prediction_type", overrides["prediction_type"], PREDICTION_TYPES)
    return overrides
