"""GBMPipeline end to end: an exact log-normal 'network' through the whole loop, save/load, guidance, the trainer
and the evaluation script on tiny settings, and bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from gen.cli import parse_settings
from gen.evaluation import gbm as gbm_eval
from gen.gbm import GBMScheduler
from gen.guidance import APG
from gen.models.unet import tiny_unet
from pipelines.gbm import GBMPipeline

A, B, OFFSET = math.log(3.0), 0.05, 3.0  # log x0 ~ N(log 3, 0.05^2): x0 in about [2.6, 3.5], inside [2, 4]


def _pipe(exact: bool = False, **sched_kw):
    torch.manual_seed(0)
    sched = GBMScheduler(data_log_mean=[A], data_log_std=[B], data_offset=OFFSET, **sched_kw)
    pipe = GBMPipeline(unet=tiny_unet(sample_size=8), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    if exact:
        def forward(x_in, t, class_labels=None, **kw):
            # x_in = (y - m - A) / sqrt(B^2 + v): the exact E[z | x_t] is sqrt(v) x_in / sqrt(B^2 + v)
            v = sched.log_var(sched.time(torch.as_tensor(t).reshape(-1)[:1])).item()
            z = math.sqrt(v) * x_in / math.sqrt(B**2 + v)
            return SimpleNamespace(sample=sched.convert(z, "log_eps", sched.config.prediction_type,
                                                        torch.ones_like(z), torch.full((z.shape[0],), int(t))))
        pipe.unet.forward = forward
    return pipe


@pytest.mark.parametrize("sampler,steps", [("ddim", 100), ("dls", 1000), ("ums", 1000)])
def test_pipeline_loop_with_exact_network_samples_the_lognormal(sampler, steps):
    pipe = _pipe(exact=True)
    out = pipe(batch_size=64, num_inference_steps=steps, sampler=sampler, output_type="pt",
               generator=torch.Generator().manual_seed(1))
    assert out.nfe == steps
    x_pos = (out.images * 2 - 1) + OFFSET  # undo the pipeline's output mapping
    y = x_pos.log()
    assert y.mean().item() == pytest.approx(A, abs=0.002)
    assert y.std().item() == pytest.approx(B, abs=0.003)


def test_hyvarinen_prediction_type_gives_the_same_samples():
    a = _pipe(exact=True)(batch_size=8, num_inference_steps=20, output_type="pt", sampler="ddim",
                          generator=torch.Generator().manual_seed(0)).images
    b = _pipe(exact=True, prediction_type="hyvarinen")(batch_size=8, num_inference_steps=20, output_type="pt",
                                                        sampler="ddim", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b.images, atol=1e-5, rtol=0)


def test_save_load_round_trip_and_determinism(tmp_path):
    pipe = _pipe()
    kw = dict(class_labels=[1, 2, 3], num_inference_steps=5, sampler="dls", output_type="pt")
    ref = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    pipe.save_pretrained(tmp_path)
    loaded = GBMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, GBMScheduler)
    assert loaded.scheduler.config.data_log_mean == [A]
    torch.testing.assert_close(loaded(generator=torch.Generator().manual_seed(3), **kw).images, ref)


def test_guidance_cfg_equals_apg_invariant_and_counts_nfe():
    pipe = _pipe()
    kw = dict(class_labels=[0, 5], num_inference_steps=4, sampler="ddim", output_type="pt")
    cfg = pipe(guidance_scale=3.0, generator=torch.Generator().manual_seed(0), **kw)
    apg = pipe(guider=APG(guidance_scale=3.0, eta=1.0, momentum=0.0, norm_threshold=None),
               generator=torch.Generator().manual_seed(0), **kw)
    assert cfg.nfe == apg.nfe == 8
    torch.testing.assert_close(cfg.images, apg.images, atol=1e-5, rtol=0)
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw)
    assert plain.nfe == 4 and (plain.images - cfg.images).abs().max() > 1e-4


def test_bad_arguments():
    pipe = _pipe()
    with pytest.raises(ValueError, match="outside the training grid"):
        pipe(batch_size=1, num_inference_steps=1001)
    with pytest.raises(ValueError, match="sampler=.euler.; allowed: dls, ums, ddim"):
        pipe(batch_size=1, num_inference_steps=2, sampler="euler")
    with pytest.raises(ValueError, match="non-positive"):
        pipe(batch_size=1, num_inference_steps=2, latents=-torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="class_labels out of range"):
        pipe(class_labels=[10], num_inference_steps=2)
    with pytest.raises(ValueError, match="GBMScheduler"):
        from diffusers import DDIMScheduler

        GBMPipeline(unet=pipe.unet, scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="sampler="):
        pipe.use_scheduler("ddim")


def test_train_script_smoke_and_config_errors(tmp_path):
    from gen.training import config_class, train

    out = train("gbm", ["--config", "configs/gbm_digits.yaml", "--output_dir", str(tmp_path / "run"), "--unet_preset",
                    "tiny", "--max_train_steps", "3", "--train_batch_size", "8", "--checkpointing_steps", "2"])
    pipe = GBMPipeline.from_pretrained(out)
    s = pipe.scheduler.config
    assert s.data_offset == 3.0 and s.sigma_schedule == "geometric"
    # the fitted prior is the per-channel log-normal fit of digits16-train + 3
    assert s.data_log_mean[0] == pytest.approx(0.9314, abs=1e-3) and s.data_log_std[0] == pytest.approx(0.2346, 1e-2)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(class_labels=[4], num_inference_steps=3, output_type="np").images.shape == (1, 16, 16, 1)
    res = gbm_eval.run(parse_settings(gbm_eval.GBMEvalSettings, [
        "--model", str(out), "--out", str(tmp_path / "eval"), "--num_samples", "20", "--batch_size", "10",
        "--ddim_steps", "2,3", "--dls_steps", "3", "--ums_steps", "3", "--baseline_steps", "2",
        "--baseline_ddpm_steps", "2"]))
    got = {(r["sampler"], r["steps"]) for r in res["rows"]}
    assert got == {("ddim", 2), ("ddim", 3), ("dls", 3), ("ums", 3), ("ddim-additive", 2), ("ddpm-additive", 2)}
    assert all(r["n"] == 20 and r["fid"] > 0 for r in res["rows"])
    assert (tmp_path / "eval" / "rows.md").read_text().count("| GBM |") == 4
    cfg_cls = config_class("gbm")
    from gen.training import parse_config

    with pytest.raises(ValueError, match="sigma_max must be a finite number > 0"):
        parse_config(cfg_cls, ["--config", "configs/gbm_digits.yaml", "--sigma_max", "0"])
    with pytest.raises(ValueError, match="non-positive"):
        train("gbm", ["--config", "configs/gbm_digits.yaml", "--output_dir", str(tmp_path / "bad"), "--unet_preset",
                  "tiny", "--max_train_steps", "1", "--positivity", "false"])
    with pytest.raises(ValueError, match="sigma_scheduel"):
        parse_config(cfg_cls, ["--config", "configs/gbm_digits.yaml", "--sigma_scheduel", "constant"])
