"""Smoke tests of what the eval/ scripts run (``gen.evaluation``): tiny settings, the artefacts exist and hold what
they claim; the scripts themselves only parse options (``gen.cli.parse_settings``)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from gen.cli import parse_settings
from gen.evaluation import bench_teacher, demo, guidance, linear_ag
from gen.guidance import LinearAG
from gen.models.unet import tiny_unet
from pipelines import ClassConditionalPipeline
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    ClassConditionalPipeline(tiny_unet().eval(), DDIMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(path)
    return str(path)


def test_calibrate_then_guidance_benchmark(tiny_pipeline, tmp_path):
    lag_dir = tmp_path / "lag"
    guider = linear_ag.run(parse_settings(linear_ag.CalibrationSettings, [
        "--pipeline", tiny_pipeline, "--steps", "3", "--num_samples", "12", "--num_exact_steps", "1",
        "--out", str(lag_dir)]))
    assert isinstance(LinearAG.from_pretrained(lag_dir), LinearAG)
    assert guider.config.num_inference_steps == 3 and len(guider.config.coefficients) == 3
    meta = json.loads((lag_dir / "calibration.json").read_text())
    assert len(meta["relative_residual_per_step"]) == 3

    out = tmp_path / "g"
    res = guidance.run(parse_settings(guidance.GuidanceSettings, [
        "--pipeline", tiny_pipeline, "--num_samples", "20", "--steps", "3", "--scales", "2", "8",
        "--ag_scale", "2", "--seeds", "0", "1", "--ag_settings", "default", "eps_cosine:1::cond:0", "step:1",
        "x0_cosine:0.5:2:frozen_eps_delta:0", "--overhead_repeats", "1", "--linear_ag", str(lag_dir),
        "--out", str(out)]))
    assert (out / "guidance.png").stat().st_size > 1000 and "target met" in (out / "rows.md").read_text()
    runs = [(r["method"], r["guidance_scale"]) for r in res["scales"]]
    assert runs == [("cfg", 2), ("apg", 2), ("cfg", 8), ("apg", 8)]
    summary = {e["method"]: e for e in res["adaptive"]["summary"]}
    assert len(summary) == 6 and summary["CFG"]["nfe"] == 6 and summary["CFG"]["seeds"] == [0, 1]
    never = summary["AG eps_cosine, gamma_bar=1, min_steps=0, after_switch=cond"]
    step1 = summary["Step AG (CFG on the first 1 steps)"]
    gated = summary["AG x0_cosine, gamma_bar=0.5, min_steps=2, after_switch=frozen_eps_delta"]
    assert never["nfe"] == 6 and never["fid_vs_cfg"] == 0 and never["psnr_vs_cfg"] == 100  # gamma_bar=1: CFG exactly
    assert step1["nfe"] == pytest.approx(3 + 1) and step1["nfe_saving"] == pytest.approx(1 / 3)
    assert gated["nfe"] == pytest.approx(3 + 3)  # nobody switches before min_steps=2: guided at steps 0..2
    assert summary["LinearAG"]["nfe"] == pytest.approx(3 + 1)     # one exact step
    assert all(len([r for r in res["adaptive"]["per_seed"] if r["method"] == m]) == 2 for m in summary)
    assert res["overhead"]["repeats"] == 1 and res["overhead"]["cfg_median_s"] > 0
    assert 0 <= res["scales"][0]["frac_clipped"] <= 1
    for spec, match in (("bogus:0.9", "criterion"), ("x0_cosine:2", "gamma_bar"), ("x0_cosine:high", "AG spec"),
                        ("step:x", "Step AG")):  # a bad AG spec is a ValueError when the options are parsed
        with pytest.raises(ValueError, match=match):
            parse_settings(guidance.GuidanceSettings, ["--ag_settings", spec])
    with pytest.raises(ValueError, match="eval/results"):
        guidance.run(guidance.GuidanceSettings(out=str(ROOT / "eval" / "results" / "guidance")))


def test_bench_teacher_and_demo_smoke(tiny_pipeline, tmp_path):
    res = bench_teacher.run(parse_settings(bench_teacher.BenchTeacherSettings, [
        "--pipeline", tiny_pipeline, "--num_samples", "20", "--steps", "2", "--guidance_scales", "1", "2",
        "--bench_batch", "2", "--bench_steps", "2", "--bench_repeats", "1", "--out", str(tmp_path / "b.json")]))
    assert [r["steps"] for r in res["quality"]] == [None, 2, 2]
    assert res["quality"][0]["source"].startswith("digits16-train")
    assert res["overhead"]["ours_median_s"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["overhead"]["batch"] == 2


@pytest.mark.skipif(not (ROOT / "checkpoints" / "digits-teacher" / "model_index.json").is_file(),
                    reason="shipped teacher not present")
def test_demo_on_shipped_teacher(tmp_path):
    summary = demo.run(demo.DemoSettings(out=str(tmp_path), steps=3, num_fid_samples=20, quick=True))
    assert (tmp_path / "digits_grid.png").stat().st_size > 1000
    fid = json.loads((tmp_path / "fid_digits.json").read_text())
    assert fid["n"] == 20 and fid["fid"] > 0 and 0 <= fid["class_accuracy"] <= 1
    assert set(summary) == {*demo.SECTIONS, "wall_time_s"}
    for name in ("digits_grid", "guidance_cfg_vs_apg", "gbm_samples", "gbm_samples_dls", "interpolant_digits",
                 "interpolant_bridge", "alignprop_before_after"):
        image = Image.open(tmp_path / f"{name}.png")
        # a labelled figure: a white title band above the images and a label column left of them
        top, left = np.asarray(image)[:12], np.asarray(image)[:, :12]
        assert (top < 128).any() and (left < 128).any(), name
