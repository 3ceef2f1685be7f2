"""RED-Diff, DPS and the pseudo-inverse with flow and transformer priors, end to end: the shipped digits interpolant
(pixel space, ``RedDiffPipeline``), a tiny SD3-style MMDiT with a flow-matching scheduler (``RedDiffSD3Pipeline``),
a tiny class-conditional DiT (``RedDiffDiTPipeline``) and a tiny SDXL UNet (``RedDiffSDXLPipeline``), all built
offline; the RED-Diff grid each one runs on, save/load round trips, and the ``ValueError``s naming unsupported priors
and conditions of the wrong kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from gen.inverse import Inpainting, SuperResolution
from gen.inverse.reddiff import reddiff_grid
from gen.models import tiny_unet
from gen.models.tiny_families import build_tiny_dit, build_tiny_sd3, build_tiny_sdxl

CKPT = Path(__file__).resolve().parents[1] / "checkpoints"


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def rgb(n=2, seed=0):
    return torch.rand(n, 3, 16, 16, generator=_g(seed)) * 2 - 1


def _times(pipe, y, op, **kwargs):
    """The timesteps a call visits (from its callback) and its output."""
    seen = []
    out = pipe(y, op, callback=lambda i, t, x: seen.append(float(t)), output_type="pt", **kwargs)
    return torch.tensor(seen, dtype=torch.float64), out


# --- the shipped digits interpolant as a pixel flow prior -----------------------------------------------------------
@pytest.fixture(scope="module")
def interpolant():
    from pipelines import RedDiffPipeline

    return _quiet(RedDiffPipeline.from_pretrained(CKPT / "digits-interpolant"))


def test_interpolant_prior_every_method(interpolant):
    """The interpolant folder loads as a RED-Diff prior; RED-Diff runs on the reversed-time grid (noise first) and
    beats the pseudo-inverse by a margin on box inpainting; DPS runs the interpolant's own (Heun) sampler."""
    from gen.data.digits import load_digits16
    from gen.metrics import psnr

    x, _ = load_digits16("test")
    x = x[:4]
    op = Inpainting.box((16, 16), 6, sigma_y=0.05)
    y = op.measure(x, generator=_g(3))
    seen, red = _times(interpolant, y, op, method="reddiff", num_inference_steps=20, noise_max=0.25, lr=0.1,
                       lam=8.0, weighting="const", generator=_g())
    torch.testing.assert_close(seen, reddiff_grid(interpolant.scheduler, 20, noise_max=0.25).double())
    assert seen[0] == pytest.approx(762.5) and seen[-1] == 1000.0   # t = 1 - u: from u = 0.2375 down to the data
    pinv = interpolant(y, op, method="pinv", output_type="pt")
    dps = interpolant(y, op, method="dps", num_inference_steps=4, generator=_g(), output_type="pt")
    assert red.nfe == 20 and pinv.nfe == 0 and dps.nfe == 8   # Heun: 2 evaluations per step, velocity finite at 1
    gain = {k: float(psnr(v.images * 2 - 1, x).mean()) for k, v in (("reddiff", red), ("pinv", pinv), ("dps", dps))}
    assert gain["reddiff"] > gain["pinv"] + 5, gain   # measured: 27.7 vs 19.6 dB (DPS at 4 steps: 16.5)
    assert torch.isfinite(dps.images).all() and dps.images.shape == x.shape
    guided = interpolant(y, op, num_inference_steps=3, class_labels=[7, 2, 1, 0], guidance_scale=2.0,
                         noise_max=0.25, output_type="pt")
    assert guided.nfe == 6
    with pytest.raises(ValueError, match="noise_max"):
        interpolant(y, op, t_max=250)
    with pytest.raises(ValueError, match="noise_min"):
        interpolant(y, op, noise_max=0.2, noise_min=0.3)
    with pytest.raises(ValueError, match="prompt"):
        interpolant(y, op, prompt="a seven")


def test_unsupported_priors_are_named():
    """A GBM or two-sided interpolant scheduler, a bridge UNet, or a network of another family is a ValueError that
    says what is supported."""
    from gen.gbm.scheduler import GBMScheduler
    from gen.interpolants.scheduler import InterpolantScheduler
    from pipelines import LatentRedDiffPipeline, RedDiffDiTPipeline, RedDiffPipeline, RedDiffSD3Pipeline

    unet = tiny_unet(11).eval()
    for sched in (GBMScheduler(), InterpolantScheduler(kind="two_sided", gamma="bsquared", prediction_type="drift")):
        with pytest.raises(ValueError, match="supported: variance-preserving .* rectified flow .* one-sided"):
            RedDiffPipeline(unet=unet, scheduler=sched)
    with pytest.raises(ValueError, match="bridge"):
        RedDiffPipeline.from_pretrained(CKPT / "digits-bridge")
    sd3, dit = build_tiny_sd3(0), build_tiny_dit(0)
    with pytest.raises(ValueError, match="RedDiffDiTPipeline"):
        RedDiffSD3Pipeline(**{**sd3, "transformer": dit["transformer"]})
    with pytest.raises(ValueError, match="RedDiffSD3Pipeline"):
        RedDiffDiTPipeline(**{**dit, "transformer": sd3["transformer"]})
    with pytest.raises(ValueError, match="supported"):
        RedDiffDiTPipeline(**{**dit, "scheduler": GBMScheduler()})
    from gen.models import build_tiny_sd

    with pytest.raises(ValueError, match="RedDiffSD3Pipeline"):
        LatentRedDiffPipeline(**{**build_tiny_sd(0), "unet": sd3["transformer"]})


# --- SD3-style latent flow prior ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3():
    from pipelines import RedDiffSD3Pipeline

    return _quiet(RedDiffSD3Pipeline(**build_tiny_sd3(0)))


def test_sd3_prior_every_method(sd3, tmp_path):
    """RED-Diff on the scheduler's shifted grid (shift 3), DPS with its Euler steps, pinv; the data term reaches the
    image through the VAE decoder with SD3's shift_factor; save/load; condition of the wrong kind refused."""
    from pipelines import RedDiffSD3Pipeline

    x = rgb()
    op = SuperResolution(2, sigma_y=0.05)
    y = op.measure(x, generator=_g(1))
    seen, red = _times(sd3, y, op, prompt="a digit", num_inference_steps=4, max_sequence_length=8, generator=_g())
    u = torch.tensor([0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(seen, (1000 * 3 * u / (1 + 2 * u)).double(), atol=1e-3, rtol=0)
    assert red.nfe == 4 and red.images.shape == (2, 3, 16, 16) and torch.isfinite(red.images).all()
    dps = sd3(y, op, prompt=["one", "two"], method="dps", num_inference_steps=3, max_sequence_length=8,
              generator=_g(), output_type="np")
    assert dps.nfe == 3 and dps.images.shape == (2, 16, 16, 3) and np.isfinite(dps.images).all()
    pinv = sd3(y, op, method="pinv", output_type="pt")
    torch.testing.assert_close(pinv.images, (op.pinv(y, x.shape) / 2 + 0.5).clamp(0, 1))
    assert pinv.nfe == 0
    guided = sd3(y, op, prompt="a digit", num_inference_steps=2, guidance_scale=3.0, max_sequence_length=8,
                 output_type="pt")
    assert guided.nfe == 4
    # lambda = 0: Adam on the data term through the decoder fits y better than D(E(H^+ y)) (measured 7.57 -> 4.68)
    with torch.no_grad():
        start = sd3._decode(sd3._encode(op.pinv(y, x.shape).clamp(-1, 1)))
    fitted = sd3(y, op, num_inference_steps=30, lam=0.0, lr=0.05, max_sequence_length=8, generator=_g(),
                 output_type="pt").images * 2 - 1
    res0, res1 = float((op(start) - y).norm()), float((op(fitted) - y).norm())
    assert res1 < 0.75 * res0, (res0, res1)
    sd3.save_pretrained(tmp_path / "sd3")
    loaded = _quiet(RedDiffSD3Pipeline.from_pretrained(tmp_path / "sd3"))
    a = sd3(y, op, num_inference_steps=2, max_sequence_length=8, generator=_g(4), output_type="np").images
    b = loaded(y, op, num_inference_steps=2, max_sequence_length=8, generator=_g(4), output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="class_labels"):
        sd3(y, op, class_labels=[1, 2])
    with pytest.raises(ValueError, match="prompt"):
        sd3(y, op, prompt=["only one"], num_inference_steps=1)
    with pytest.raises(ValueError, match="height"):
        sd3(y, op, height=18)


def test_sd3_dynamic_shift_grid():
    """With use_dynamic_shifting the grid uses the resolution-dependent mu of the latent sequence length, as
    StableDiffusion3Pipeline does for sampling."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    from pipelines import RedDiffSD3Pipeline

    pipe = _quiet(RedDiffSD3Pipeline(**build_tiny_sd3(0, use_dynamic_shifting=True)))
    op = SuperResolution(2)
    y = op(rgb(1))
    seen, out = _times(pipe, y, op, num_inference_steps=3, max_sequence_length=8)
    cfg = pipe.scheduler.config
    mu = calculate_shift(16, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    torch.testing.assert_close(seen, reddiff_grid(pipe.scheduler, 3, mu=mu).double())
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert not torch.allclose(seen.float(), reddiff_grid(static, 3))
    dps = pipe(y, op, method="dps", num_inference_steps=2, max_sequence_length=8, output_type="pt")
    assert dps.nfe == 2 and torch.isfinite(dps.images).all()


# --- DiT latent prior -----------------------------------------------------------------------------------------------
def test_dit_prior_every_method(tmp_path):
    """Class-conditional DiT (learned sigma dropped by the adapter): RED-Diff on its DDIM training steps (t_max
    works: a VP prior), DPS, pinv; labels default to the null class; save/load; prompt refused."""
    from pipelines import RedDiffDiTPipeline

    pipe = _quiet(RedDiffDiTPipeline(**build_tiny_dit(0)))
    x = rgb()
    op = Inpainting.box((16, 16), 6, sigma_y=0.05)
    y = op.measure(x, generator=_g(2))
    seen, red = _times(pipe, y, op, class_labels=[3, 4], num_inference_steps=4, t_max=499, generator=_g())
    assert seen.tolist() == [375.0, 250.0, 125.0, 0.0] and red.nfe == 4
    assert red.images.shape == (2, 3, 16, 16) and torch.isfinite(red.images).all()
    dps = pipe(y, op, method="dps", num_inference_steps=3, generator=_g(), output_type="pt")
    assert dps.nfe == 3 and torch.isfinite(dps.images).all()
    assert pipe(y, op, method="pinv", output_type="pt").nfe == 0
    guided = pipe(y, op, class_labels=7, num_inference_steps=2, guidance_scale=4.0, output_type="pt")
    assert guided.nfe == 4
    pipe.save_pretrained(tmp_path / "dit")
    loaded = _quiet(RedDiffDiTPipeline.from_pretrained(tmp_path / "dit"))
    a = pipe(y, op, num_inference_steps=2, generator=_g(5), output_type="np").images
    b = loaded(y, op, num_inference_steps=2, generator=_g(5), output_type="np").images
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="prompt"):
        pipe(y, op, prompt="a cat")
    with pytest.raises(ValueError, match="class_labels"):
        pipe(y, op, class_labels=[1, 2, 3])
    with pytest.raises(ValueError, match="class_labels"):
        pipe(y, op, class_labels=[1, 5000])
    with pytest.raises(ValueError, match="t_min"):
        pipe(y, op, t_min=600, t_max=500)


def test_pixel_flow_unet_prior_uses_the_shift():
    """A pixel UNet with a FlowMatchEulerDiscreteScheduler: the RED-Diff grid is the shifted one, t_max refused."""
    from pipelines import RedDiffPipeline

    pipe = _quiet(RedDiffPipeline(unet=tiny_unet(11).eval(),
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=2.0)))
    op = SuperResolution(2)
    y = op(torch.rand(2, 1, 16, 16, generator=_g()) * 2 - 1)
    seen, out = _times(pipe, y, op, num_inference_steps=2)
    torch.testing.assert_close(seen, torch.tensor([1000 * 1.0 / 1.5, 0.0], dtype=torch.float64), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="noise_max"):
        pipe(y, op, t_min=3)
    vp = _quiet(RedDiffPipeline(unet=tiny_unet(11).eval(), scheduler=DDIMScheduler()))
    with pytest.raises(ValueError, match="not both"):
        vp(y, op, t_max=500, noise_max=0.5)


# --- SDXL latent prior ----------------------------------------------------------------------------------------------
def test_sdxl_prior_every_method():
    """SDXL (text_time embedding, Euler scheduler with init_noise_sigma > 1): RED-Diff on its training steps, DPS on
    its own scaled sampler, pinv; guidance counts both branches; an SD 1.x UNet is refused."""
    from pipelines import RedDiffSDXLPipeline

    pipe = _quiet(RedDiffSDXLPipeline(**build_tiny_sdxl(0)))
    x = rgb()
    op = SuperResolution(2, sigma_y=0.05)
    y = op.measure(x, generator=_g(1))
    seen, red = _times(pipe, y, op, prompt=["a cat", "a dog"], num_inference_steps=3, t_max=599, generator=_g())
    assert seen.tolist() == [400.0, 200.0, 0.0] and red.nfe == 3 and torch.isfinite(red.images).all()
    dps = pipe(y, op, prompt="a cat", method="dps", num_inference_steps=3, guidance_scale=2.0, generator=_g(),
               output_type="pt")
    assert dps.nfe == 6 and torch.isfinite(dps.images).all() and dps.images.shape == (2, 3, 16, 16)
    assert pipe(y, op, method="pinv", output_type="pt").nfe == 0
    with pytest.raises(ValueError, match="class_labels"):
        pipe(y, op, class_labels=[1, 2])
    from gen.models import build_tiny_sd

    sd = build_tiny_sd(0)
    with pytest.raises(ValueError, match="text_time"):
        RedDiffSDXLPipeline(**{**build_tiny_sdxl(0), "unet": sd["unet"]})


def test_half_precision_prior_keeps_a_float32_state():
    """A bfloat16 transformer and VAE: mu (and DPS's latents) stay float32; the core casts the network input."""
    from pipelines import RedDiffSD3Pipeline

    pipe = _quiet(RedDiffSD3Pipeline(**build_tiny_sd3(0)).to(dtype=torch.bfloat16))
    op = SuperResolution(2, sigma_y=0.05)
    y = op.measure(rgb(1), generator=_g(1))
    dtypes = []
    for method in ("reddiff", "dps"):
        out = pipe(y, op, method=method, num_inference_steps=2, max_sequence_length=8, output_type="pt",
                   callback=lambda i, t, z: dtypes.append(z.dtype))
        assert torch.isfinite(out.images).all()
    assert dtypes == [torch.float32] * 4


def test_hub_config_calls_are_accepted():
    """configs/inverse_hub.yaml (GPU settings, not run here): every call section is accepted by its pipeline on tiny
    components of the same family (1 step), and its load keys are components of the pipeline or torch_dtype."""
    import inspect

    import yaml

    import pipelines

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "inverse_hub.yaml").read_text())
    build = {"sd3": build_tiny_sd3, "dit": build_tiny_dit, "sdxl": build_tiny_sdxl}
    assert set(cfg) == set(build)
    op = SuperResolution(2, sigma_y=0.05)
    y = op.measure(rgb(1), generator=_g())
    for family, section in cfg.items():
        cls = getattr(pipelines, section["pipeline"])
        assert set(section["load"]) - {"torch_dtype"} <= set(inspect.signature(cls.__init__).parameters)
        assert section["height"] % 8 == 0 and section["width"] % 8 == 0
        pipe = _quiet(cls(**build[family](0)))
        for call in ("reddiff", "dps"):
            out = pipe(y, op, **{**section[call], "num_inference_steps": 1}, output_type="pt")
            assert out.nfe == 1 and torch.isfinite(out.images).all()


def test_eval_inverse_priors_smoke(tmp_path):
    """eval/inverse_priors.py (gen.evaluation.inverse_priors) on 4 test digits, 2 steps, a 2-point tuning grid on 2
    train images: the rows, the tuned settings, the figure; defaults write under outputs/, shipped folders refused."""
    import dataclasses
    import json

    from gen.cli import parse_settings
    from gen.evaluation import inverse_priors

    settings = parse_settings(inverse_priors.InversePriorsSettings, [
        "--tasks", "sr2", "--num_images", "4", "--tune_images", "2", "--steps", "2", "--lam", "0.02", "0.1",
        "--noise_max", "0.5", "--lr", "0.1", "--zeta", "1", "--samplers", "ode", "--num_examples", "2",
        "--timing_repeats", "1", "--out", str(tmp_path / "ip")])
    res = inverse_priors.run(settings)
    rows = json.loads((tmp_path / "ip" / "results.json").read_text())["rows"]
    assert [(r["prior"], r["method"]) for r in rows] == [("-", "pinv"), ("teacher", "dps"), ("teacher", "reddiff"),
                                                         ("interpolant", "dps"), ("interpolant", "reddiff")]
    assert all(np.isfinite(r["psnr"]) and r["nfe"] == (0 if r["method"] == "pinv" else 2) for r in rows)
    assert len(res["tuning"]) == 2 * (2 + 1)   # per prior: 2 RED-Diff candidates (lam) + 1 DPS candidate
    assert "| sr2 | 0.05 | interpolant | reddiff |" in (tmp_path / "ip" / "rows.md").read_text()
    assert (tmp_path / "ip" / "inverse_priors.png").stat().st_size > 0
    assert set(res["timing"]["median_s"]) == {"teacher/reddiff", "teacher/dps", "interpolant/reddiff",
                                              "interpolant/dps"}
    defaults = {f.name: f.default for f in dataclasses.fields(inverse_priors.InversePriorsSettings)}
    assert defaults["out"].startswith("outputs")
    with pytest.raises(ValueError, match="update_shipped"):
        inverse_priors.run(parse_settings(inverse_priors.InversePriorsSettings,
                                          ["--out", "eval/results/inverse_priors_x", "--num_images", "1",
                                           "--num_examples", "1"]))
    with pytest.raises(ValueError, match="tasks"):
        inverse_priors.InversePriorsSettings(tasks=["inpaint_box", "colorize"])
    with pytest.raises(ValueError, match="noise_max"):
        inverse_priors.InversePriorsSettings(noise_max=[1.5])
