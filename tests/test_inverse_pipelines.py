"""RedDiffPipeline / LatentRedDiffPipeline on tiny models built from config (every prediction type), save/load
round trips, the ValueErrors naming bad input, and a smoke run of eval/inverse.py on the shipped teacher."""

from __future__ import annotations

import json
from argparse import Namespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from gen.inverse import Inpainting, Operator, SuperResolution
from gen.models import tiny_unet
from pipelines import LatentRedDiffPipeline, RedDiffPipeline


def pixel_pipe(pred_type="epsilon", num_class_embeds=11):
    torch.manual_seed(0)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                          prediction_type=pred_type)
    pipe = RedDiffPipeline(unet=tiny_unet(num_class_embeds).eval(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def digits(n=2):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


class ForwardOnly(Operator):
    """A non-linear operator without a pseudo-inverse."""

    def forward(self, x):
        return x.square()


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction", "sample"])
def test_pixel_pipeline_every_method_and_prediction_type(pred_type):
    pipe = pixel_pipe(pred_type)
    x = digits()
    op = SuperResolution(2, sigma_y=0.05)
    y = op.measure(x, generator=torch.Generator().manual_seed(0))
    for method, nfe in (("reddiff", 4), ("dps", 4), ("pinv", 0)):
        out = pipe(y, op, method=method, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                   output_type="pt")
        assert out.images.shape == (2, 1, 16, 16) and torch.isfinite(out.images).all() and out.nfe == nfe
        assert 0 <= float(out.images.min()) and float(out.images.max()) <= 1
    pinv = pipe(y, op, method="pinv", output_type="pt").images
    torch.testing.assert_close(pinv, (op.pinv(y, x.shape) / 2 + 0.5).clamp(0, 1))
    # RED-Diff with lambda = 0 is gradient descent on the data term alone: H(mu) stays on y from mu = H^+ y
    out = pipe(y, op, method="reddiff", num_inference_steps=3, lam=0.0, output_type="pt").images * 2 - 1
    torch.testing.assert_close(op(out), op(op.pinv(y, x.shape).clamp(-1, 1)), atol=1e-5, rtol=0)


def test_pixel_pipeline_round_trip_labels_and_output_types(tmp_path):
    pipe = pixel_pipe()
    x = digits()
    op = Inpainting.box((16, 16), 6, sigma_y=0.05)
    y = op.measure(x, generator=torch.Generator().manual_seed(0))
    ref = pipe(y, op, num_inference_steps=3, class_labels=[3, 4], generator=torch.Generator().manual_seed(5),
               output_type="np").images
    assert ref.shape == (2, 16, 16, 1)
    pipe.save_pretrained(tmp_path / "rd")
    loaded = RedDiffPipeline.from_pretrained(tmp_path / "rd")
    loaded.set_progress_bar_config(disable=True)
    again = loaded(y, op, num_inference_steps=3, class_labels=[3, 4], generator=torch.Generator().manual_seed(5),
                   output_type="np").images
    np.testing.assert_array_equal(ref, again)
    pil = loaded(y, op, method="dps", num_inference_steps=2, generator=torch.Generator().manual_seed(5)).images
    assert len(pil) == 2 and pil[0].size == (16, 16)
    uncond = pixel_pipe(num_class_embeds=None)
    assert uncond(y, op, num_inference_steps=2, output_type="pt").images.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(y, op, num_inference_steps=2, class_labels=[1, 2])
    with pytest.raises(ValueError, match="does not exist"):
        RedDiffPipeline.from_pretrained(str(tmp_path / "missing"))


def test_pixel_pipeline_bad_input():
    pipe = pixel_pipe()
    x = digits()
    op = SuperResolution(2)
    y = op(x)
    with pytest.raises(ValueError, match="method"):
        pipe(y, op, method="ddrm")
    with pytest.raises(ValueError, match="measurement shape"):
        pipe(x, op)
    bad = y.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pipe(bad, op)
    with pytest.raises(ValueError, match="mask shape"):
        pipe(x, Inpainting.box((8, 8), 2))
    with pytest.raises(ValueError, match="mask shape"):
        pipe(x, Inpainting.random_pixels((16, 16), 0.5, batch=3))
    with pytest.raises(ValueError, match="operator"):
        pipe(y, lambda v: v)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(y, op, num_inference_steps=0)
    with pytest.raises(ValueError, match="weighting"):
        pipe(y, op, weighting="cubic")
    with pytest.raises(ValueError, match="output_type"):
        pipe(y, op, output_type="jpg")
    with pytest.raises(ValueError, match="class_labels"):
        pipe(y, op, class_labels=[1, 2, 3])
    no_pinv = ForwardOnly()
    y2 = no_pinv(x)
    for method in ("reddiff", "pinv"):
        with pytest.raises(ValueError, match="has no pinv"):
            pipe(y2, no_pinv, method=method, num_inference_steps=2)
    # DPS needs no pinv, and RED-Diff runs when given x_init
    assert pipe(y2, no_pinv, method="dps", num_inference_steps=2, output_type="pt").images.shape == x.shape
    assert pipe(y2, no_pinv, num_inference_steps=2, x_init=torch.zeros_like(x), output_type="pt").nfe == 2
    with pytest.raises(ValueError, match="x_init shape"):
        pipe(y2, no_pinv, num_inference_steps=2, x_init=torch.zeros(1, 1, 16, 16))


@pytest.fixture(scope="module")
def sd_pipe():
    from gen.models import build_tiny_sd

    pipe = LatentRedDiffPipeline(**build_tiny_sd(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_latent_pipeline_end_to_end(sd_pipe, tmp_path):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    op = SuperResolution(2, sigma_y=0.05)
    y = op.measure(x, generator=torch.Generator().manual_seed(1))
    for method, nfe in (("reddiff", 3), ("dps", 3), ("pinv", 0)):
        out = sd_pipe(y, op, prompt="a digit", method=method, num_inference_steps=3,
                      generator=torch.Generator().manual_seed(0), output_type="np")
        assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all() and out.nfe == nfe
    # the data term reaches the image through the VAE decoder: with lambda = 0 RED-Diff fits y better than the
    # decoded initial latent D(E(H^+ y)) (measured: residual 7.57 -> 4.34 with this random tiny VAE)
    with torch.no_grad():
        start = sd_pipe._decode(sd_pipe._encode(op.pinv(y, x.shape).clamp(-1, 1)))
    fitted = sd_pipe(y, op, prompt=["one", "two"], num_inference_steps=40, lam=0.0, lr=0.05,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images * 2 - 1
    res0, res1 = float((op(start) - y).norm()), float((op(fitted) - y).norm())
    assert res1 < 0.7 * res0, (res0, res1)
    sd_pipe.save_pretrained(tmp_path / "latent")
    loaded = LatentRedDiffPipeline.from_pretrained(tmp_path / "latent")
    loaded.set_progress_bar_config(disable=True)
    a = sd_pipe(y, op, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np").images
    b = loaded(y, op, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-5)  # float round-off through Adam steps
    with pytest.raises(ValueError, match="measurement shape"):
        sd_pipe(torch.zeros(2, 3, 16, 16), op)
    with pytest.raises(ValueError, match="prompt"):
        sd_pipe(y, op, prompt=["only one"])
    with pytest.raises(ValueError, match="has no pinv"):
        sd_pipe(ForwardOnly()(x), ForwardOnly(), num_inference_steps=2)


def test_eval_inverse_smoke(tmp_path):
    """The inverse benchmark (gen.evaluation.inverse, eval/inverse.py) on 6 test digits with 2 steps (the shipped
    teacher), then its demo section."""
    from gen.cli import parse_settings
    from gen.evaluation import inverse as mod

    out = tmp_path / "inv.json"
    result = mod.run(parse_settings(mod.InverseSettings, [
        "--task", "inpaint_box", "sr2", "--sigma_y", "0.05", "--num_images", "6", "--steps", "2",
        "--num_examples", "3", "--out", str(out)]))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 == len(result["rows"])
    assert {r["method"] for r in rows} == {"pinv", "dps", "reddiff"}
    for r in rows:
        assert np.isfinite([r["psnr"], r["ssim"], r["fid"], r["wall_s"]]).all()
        assert r["nfe"] == (0 if r["method"] == "pinv" else 2)
    assert out.with_suffix(".png").stat().st_size > 0 and "| inpaint_box |" in out.with_suffix(".md").read_text()
    demo = mod.demo_section(tmp_path / "demo", Namespace(seed=0))
    assert (tmp_path / "demo" / "inverse_examples.png").exists() and "sr2/reddiff" in demo["results"]


def test_nonlinear_and_composed_operators_run_through_the_pipeline():
    from gen.inverse import HDR, Compose, GaussianBlur, MotionBlur, PhaseRetrieval

    pipe = pixel_pipe()
    x = digits()
    for op in (HDR(2.0), PhaseRetrieval(2.0), MotionBlur(5, 0.5, seed=2, rcond=0.03),
               Compose([GaussianBlur(3, 1.0), SuperResolution(2)], sigma_y=0.05)):
        y = op.measure(x, generator=torch.Generator().manual_seed(0))
        for method in ("reddiff", "dps", "pinv"):
            out = pipe(y, op, method=method, num_inference_steps=2, output_type="pt")
            assert out.images.shape == x.shape and torch.isfinite(out.images).all()
