"""gen.validate: each check accepts what it should (numpy converted once, values unchanged) and names the argument,
the value and what is allowed when it refuses; numpy inputs give the same images as tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gen import validate
from gen.validate import ArgumentTypeError


def test_argument_type_error_is_both_kinds():
    err = ArgumentTypeError("x")
    assert isinstance(err, TypeError) and isinstance(err, ValueError)


@pytest.mark.parametrize("value,kw,want", [
    (2, {}, 2.0), (np.float32(0.5), {"low": 0}, 0.5), (torch.tensor(3.0), {}, 3.0), (np.array(1.5), {"high": 2}, 1.5),
    (math.inf, {"allow_inf": True}, math.inf), (None, {"allow_none": True}, None)])
def test_number_accepts(value, kw, want):
    assert validate.number("w", value, **kw) == want


@pytest.mark.parametrize("value,kw,kind,match", [
    (math.nan, {}, ValueError, r"w must be a finite number; got nan"),
    (-1.0, {"low": 0}, ValueError, r"w must be a finite number >= 0; got -1.0"),
    (0.0, {"low": 0, "low_open": True}, ValueError, r"> 0"),
    (1.0, {"low": 0, "high": 1, "high_open": True}, ValueError, r"in \[0, 1\)"),
    ("2", {}, ArgumentTypeError, r"got '2'"),
    (True, {}, ArgumentTypeError, r"got True"),
    (torch.ones(2), {}, ArgumentTypeError, r"tensor of shape \(2,\)"),
])
def test_number_refuses(value, kw, kind, match):
    with pytest.raises(kind, match=match):
        validate.number("w", value, **kw)


def test_integer_choice_and_sizes():
    assert validate.integer("n", 3.0, 1) == 3 and isinstance(validate.integer("n", np.int64(4)), int)
    with pytest.raises(ArgumentTypeError, match="n must be an integer >= 1; got 2.5"):
        validate.integer("n", 2.5, 1)
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 4\]; got 5"):
        validate.integer("n", 5, 1, 4)
    with pytest.raises(ValueError, match="kind='x'; allowed: a, b"):
        validate.choice("kind", "x", ("a", "b"))
    assert validate.divisible_size("height", None, 8, default=64) == 64
    with pytest.raises(ValueError, match="height must be an integer >= 1; got 0"):
        validate.divisible_size("height", 0, 8, default=64)  # 0 is an error, not the default
    with pytest.raises(ValueError, match="height=60 is not divisible by 8"):
        validate.divisible_size("height", 60, 8)


def test_tensor_converts_numpy_once_and_keeps_values():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = validate.tensor("x", a, shape=(2, None))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(a))
    same = torch.zeros(2, 3)
    assert validate.tensor("x", same) is same  # tensors pass through untouched
    with pytest.raises(ValueError, match=r"x contains 1 NaN or inf value\(s\)"):
        validate.tensor("x", np.array([1.0, np.nan]))
    with pytest.raises(ArgumentTypeError, match="x must be a float tensor; got dtype torch.int64"):
        validate.tensor("x", np.arange(3))
    with pytest.raises(ValueError, match=r"x shape \(2, 3\) does not match the expected \(3, \*\)"):
        validate.tensor("x", same, shape=(3, None))


def test_image_names_the_expected_range():
    with pytest.raises(ValueError, match=r"img must be float images in \[-1, 1\]; got values in \[0, 255\] "
                                         r"\(this looks like \[0, 255\] pixel data\)"):
        validate.image("img", torch.tensor([[[[0.0, 255.0]]]]))
    with pytest.raises(ArgumentTypeError, match=r"img has dtype torch.uint8; expected float images in \[0, 1\] "
                                                r"\(8-bit pixels: use x.float\(\) / 255\)"):
        validate.image("img", torch.zeros(1, 1, 2, 2, dtype=torch.uint8), (0.0, 1.0))
    with pytest.raises(ValueError, match=r"looks like \[-1, 1\] data"):
        validate.image("img", -torch.ones(1, 1, 2, 2), (0.0, 1.0))


def test_eps_schedule_wraps_callables():
    f = validate.eps_schedule("eps", lambda t: 1.0 - t, ("sigma",))
    assert f(0.25) == 0.75
    bad = validate.eps_schedule("eps", lambda t: -t, ("sigma",))
    with pytest.raises(ValueError, match=r"the callable eps returned an invalid value: eps\(0.5\) must be"):
        bad(0.5)


def test_numpy_inputs_give_the_same_images_as_tensors():
    from diffusers import DDIMScheduler

    from gen.inverse import Inpainting
    from gen.models.unet import tiny_unet
    from pipelines import ClassConditionalPipeline, RedDiffPipeline

    torch.manual_seed(0)
    pipe = ClassConditionalPipeline(tiny_unet(sample_size=8).eval(), DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 1, 8, 8)
    kw = {"num_inference_steps": 2, "output_type": "pt"}
    a = pipe(class_labels=torch.tensor([1, 2]), latents=z, **kw).images
    b = pipe(class_labels=np.array([1, 2]), latents=z.numpy(), **kw).images
    assert torch.equal(a, b)
    red = RedDiffPipeline(pipe.unet, pipe.scheduler)
    red.set_progress_bar_config(disable=True)
    op = Inpainting.box((8, 8), 3)
    y = op.measure(torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    kw = {"num_inference_steps": 2, "output_type": "pt", "generator": torch.Generator().manual_seed(1)}
    a = red(y, op, **kw).images
    kw["generator"] = torch.Generator().manual_seed(1)
    assert torch.equal(a, red(y.numpy(), op, **kw).images)
