"""InterpolantPipeline (generation and bridge), the trainer (1 and 2 processes) and the eval script, all tiny."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher

from gen.guidance import APG, CFG
from gen.interpolants import InterpolantScheduler
from gen.models.unet import tiny_unet
from pipelines import InterpolantPipeline


def _pipe(**sched_kw):
    torch.manual_seed(0)
    return InterpolantPipeline(unet=tiny_unet(), scheduler=InterpolantScheduler(**sched_kw))


def test_generation_shapes_nfe_and_round_trip(tmp_path):
    pipe = _pipe()
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 2, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
               output_type="np")
    assert out.images.shape == (3, 16, 16, 1) and out.nfe == 6  # Heun: 2 evaluations per step
    assert 0 <= out.images.min() and out.images.max() <= 1
    guided = pipe(class_labels=[1, 2, 3], num_inference_steps=3, guidance_scale=2.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    assert guided.nfe == 12 and guided.images.shape == (3, 1, 16, 16)
    sde = pipe(class_labels=[4], num_inference_steps=4, sampler="sde", eps=0.5, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert sde.nfe == 5  # 4 Euler-Maruyama steps to t = 0.96 and the last (mean) step
    pil = pipe(batch_size=2, num_inference_steps=2, method="euler")
    assert len(pil.images) == 2 and pil.nfe == 2
    pipe.save_pretrained(tmp_path)
    back = InterpolantPipeline.from_pretrained(tmp_path)
    back.set_progress_bar_config(disable=True)
    again = back(class_labels=[1, 2, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="np")
    assert abs(again.images - out.images).max() < 1e-6


def test_cfg_scale_equals_cfg_guider_and_apg_runs():
    """CFG on the velocity equals CFG on the data prediction (the conversion is affine in the prediction)."""
    # guiders work on E[x1|x], undefined at t = 1, so the guided grid ends at 1 - 1e-3 (+ a last Euler step);
    # give the CFG run the same grid
    pipe = _pipe(t_end=0.999)
    pipe.set_progress_bar_config(disable=True)
    kw = {"class_labels": [0, 5], "num_inference_steps": 3, "output_type": "pt"}
    a = pipe(guidance_scale=3.0, generator=torch.Generator().manual_seed(1), **kw)
    b = pipe(guider=CFG(guidance_scale=3.0), generator=torch.Generator().manual_seed(1), **kw)
    assert b.nfe == a.nfe == 14
    assert (a.images - b.images).abs().max() < 1e-4
    c = pipe(guider=APG(guidance_scale=3.0, momentum=-0.5), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.isfinite(c.images).all() and not torch.allclose(c.images, b.images)


def test_bridge_pipeline():
    torch.manual_seed(0)
    unet = tiny_unet(num_class_embeds=None)
    unet = type(unet).from_config({**unet.config, "in_channels": 2})
    sched = InterpolantScheduler(kind="two_sided", gamma="bsquared", prediction_type="drift")
    pipe = InterpolantPipeline(unet=unet, scheduler=sched, base_noise_std=0.3)
    pipe.set_progress_bar_config(disable=True)
    d = torch.rand(3, 1, 16, 16) * 2 - 1
    out = pipe(source_images=d, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (3, 1, 16, 16) and out.nfe == 4
    with pytest.raises(ValueError, match="pass source_images"):
        pipe(num_inference_steps=2, batch_size=3)
    with pytest.raises(ValueError, match="needs the score|gives no drift|without x0"):
        pipe(source_images=d, num_inference_steps=2, sampler="sde")


def test_pipeline_bad_arguments(tmp_path):
    pipe = _pipe()
    with pytest.raises(ValueError, match="class_labels out of range"):
        pipe(class_labels=[10], num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(class_labels=[1], num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], num_inference_steps=1, output_type="jpg")
    with pytest.raises(ValueError, match="sampler='ode45'"):
        pipe(class_labels=[1], num_inference_steps=1, sampler="ode45")
    with pytest.raises(ValueError, match="not a ode solver"):
        pipe(class_labels=[1], num_inference_steps=1, method="euler_maruyama")
    with pytest.raises(ValueError, match="eps is the SDE diffusion"):
        pipe(class_labels=[1], num_inference_steps=1, eps=0.3)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(class_labels=[1], num_inference_steps=1, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="source_images is only for bridge"):
        pipe(class_labels=[1], num_inference_steps=1, source_images=torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="does not exist"):
        InterpolantPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="InterpolantScheduler"):
        from diffusers import DDIMScheduler

        InterpolantPipeline(unet=tiny_unet(), scheduler=DDIMScheduler())


# --- the trainer ----------------------------------------------------------------------------------------------------
TINY = ["--unet_preset", "tiny", "--train_batch_size", "4", "--log_every", "1", "--ema_decay", "0.9",
        "--max_train_steps", "2", "--checkpointing_steps", "2"]


def test_train_toy_and_bridge_smoke(tmp_path):
    from gen.models import TimeMLP
    from gen.training import config_class, parse_config, train

    out = train("interpolant", ["--config", "configs/interpolant_checkerboard.yaml", "--output_dir",
                                str(tmp_path / "toy"), "--max_train_steps", "3", "--mlp_hidden", "16", "--mlp_depth",
                                "1", "--train_batch_size", "8"])
    assert TimeMLP.from_pretrained(out / "model").config.hidden == 16
    assert InterpolantScheduler.from_pretrained(out / "scheduler").config.num_train_timesteps == 1.0
    out = train("interpolant", ["--config", "configs/interpolant_bridge_digits.yaml", "--output_dir",
                                str(tmp_path / "bridge"), *TINY])
    pipe = InterpolantPipeline.from_pretrained(out)
    assert pipe.is_bridge and pipe.config.base_noise_std == 0.3
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2] and all(r["loss"] > 0 for r in logs)
    with pytest.raises(ValueError, match="mode=bridge needs kind=two_sided"):
        parse_config(config_class("interpolant"), ["--mode", "bridge"])
    with pytest.raises(ValueError, match="weighting='velocity'"):
        parse_config(config_class("interpolant"), ["--weighting", "velocity"])


def _two_rank_worker(out_dir):
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a pytest process that already had one
    from gen.training import train

    train("interpolant", ["--config", "configs/interpolant_digits.yaml", "--output_dir", out_dir, *TINY])
    state = PartialState()
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps({"num_processes": state.num_processes}))


def test_two_process_training(tmp_path):
    os.chdir(Path(__file__).resolve().parents[1])
    debug_launcher(_two_rank_worker, args=(str(tmp_path / "ddp"),), num_processes=2)
    ranks = sorted((tmp_path / "ddp").glob("rank*.json"))
    assert [p.name for p in ranks] == ["rank0.json", "rank1.json"]
    for p in ranks:
        assert json.loads(p.read_text())["num_processes"] == 2
    pipe = InterpolantPipeline.from_pretrained(tmp_path / "ddp")
    assert pipe.scheduler.config.prediction_type == "velocity"


# --- the eval script --------------------------------------------------------------------------------------------------
def test_eval_script_smoke(tmp_path):
    from gen.cli import parse_settings
    from gen.evaluation import interpolants as ev

    a = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert ev.sliced_wasserstein(a, a) == 0.0
    assert ev.sliced_wasserstein(a, a + 1.0) == pytest.approx(1.0, rel=0.2)
    b = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))
    assert abs(ev.mmd_rbf(a, b)) < 0.02 and ev.mmd_rbf(a, a + 2.0) > 0.1  # unbiased: ~0 for the same law
    res = ev.run(parse_settings(ev.InterpolantEvalSettings, [
        "--out", str(tmp_path), "--only", "toys", "--toys", "8gaussians", "--toy_steps", "4", "--chunk", "2",
        "--toy_batch", "16", "--toy_samples", "64", "--toy_nfe", "2", "--mlp_hidden", "16", "--mlp_depth", "1",
        "--sw_projections", "8"]))
    entry = res["toys"]["8gaussians"]
    assert entry["train"]["ours"]["samples_per_s"] > 0 and entry["quality"][0]["ours"]["sw2"] > 0
    assert (tmp_path / "results.json").is_file() and "8gaussians" in (tmp_path / "rows.md").read_text()
