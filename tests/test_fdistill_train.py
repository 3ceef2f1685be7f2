"""f-distill trainer and OneStepPipeline: smoke runs (pixel, toy, text-to-image, LoRA), resume, two ranks, bad
configs, save/load."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from diffusers import DDIMScheduler

from gen.models.unet import tiny_unet
from gen.training import list_checkpoints, train
from pipelines import ClassConditionalPipeline, OneStepPipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--train_batch_size", "4", "--log_every", "1", "--student_update_freq", "2", "--checkpointing_steps", "2",
        "--disc_hidden", "16", "--ema_decay", "0.9"]


def tiny_teacher(tmp_path) -> str:
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    path = tmp_path / "teacher"
    ClassConditionalPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(path)
    return str(path)


def _run(*args):
    return train("fdistill", ["--config", "configs/fdistill_digits.yaml", *FAST, *args])


@pytest.fixture(autouse=True)
def _root():
    os.chdir(ROOT)


def test_digits_smoke_saves_a_one_step_pipeline_and_resumes(tmp_path):
    teacher = tiny_teacher(tmp_path)
    out = _run("--teacher", teacher, "--output_dir", str(tmp_path / "s"), "--max_train_steps", "4")
    logs = [json.loads(x) for x in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and "loss_dm" in logs[1] and "loss_dm" not in logs[0]
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 4]
    pipe = OneStepPipeline.from_pretrained(out)
    assert pipe.config.generator_timestep == 950
    img = pipe(class_labels=[0, 3], output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (2, 16, 16, 1) and 0 <= img.min() and img.max() <= 1
    # a killed run resumes from its last checkpoint and continues the schedule
    out2 = _run("--teacher", teacher, "--output_dir", str(out), "--max_train_steps", "6", "--resume", "latest")
    steps = [json.loads(x)["step"] for x in (out2 / "logs.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_toy_smoke(tmp_path):
    from gen.models.mlp import TimeMLP

    out = train(
        "fdistill", ["--config", "configs/fdistill_toy2d.yaml", "--output_dir", str(tmp_path / "toy"),
                     "--max_train_steps", "4", "--fake_init_steps", "2", "--train_batch_size", "16",
                     "--checkpointing_steps", "2", "--divergence", "kl"])
    gen = TimeMLP.from_pretrained(out / "generator")
    assert gen(torch.randn(5, 2), torch.full((5,), 999.0)).shape == (5, 2)
    assert json.loads((out / "generator" / "one_step.json").read_text())["generator_prediction"] == "sample"


def test_lora_student_and_fake_score(tmp_path):
    teacher = tiny_teacher(tmp_path)
    with pytest.raises(ValueError, match="lora_targets .* match no module"):
        _run("--teacher", teacher, "--output_dir", str(tmp_path / "bad"), "--max_train_steps", "2",
             "--lora_rank", "2")  # the tiny UNet has no attention projections
    out = _run("--teacher", teacher, "--output_dir", str(tmp_path / "lora"), "--max_train_steps", "2",
               "--lora_rank", "2", "--lora_targets", "conv1,conv2")
    pipe = OneStepPipeline.from_pretrained(out)  # LoRA merged: a plain UNet2DModel
    assert type(pipe.unet).__name__ == "UNet2DModel"
    base = ClassConditionalPipeline.from_pretrained(teacher).unet.state_dict()
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(("conv1" in k or "conv2" in k) for k in changed)


def test_text_to_image_teacher(tmp_path):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from gen.models.tiny_sd import build_tiny_sd

    sd = StableDiffusionPipeline(**build_tiny_sd(), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.save_pretrained(tmp_path / "sd")
    side = sd.unet.config.sample_size * sd.vae_scale_factor
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (side, side), (60 * i, 20, 200)).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na dog\n")
    out = _run("--teacher", str(tmp_path / "sd"), "--dataset", "folder", "--data_dir", str(tmp_path / "imgs"),
               "--prompts_file", str(tmp_path / "prompts.txt"), "--output_dir", str(tmp_path / "t2i"),
               "--max_train_steps", "2", "--teacher_guidance_scale", "2.0", "--disc_features", "teacher")
    pipe = OneStepPipeline.from_pretrained(out)
    assert pipe.is_text_to_image
    img = pipe(prompt=["a cat", "a dog"], output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (2, 3, side, side)
    with pytest.raises(ValueError, match="prompt, not class_labels"):
        pipe(class_labels=[1])


def _two_rank_worker(teacher, out_dir):
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    _run("--teacher", teacher, "--output_dir", out_dir, "--max_train_steps", "2")
    state = PartialState()
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps({"num_processes": state.num_processes}))


def test_two_process_distillation(tmp_path):
    teacher = tiny_teacher(tmp_path)
    out = tmp_path / "ddp"
    debug_launcher(_two_rank_worker, args=(teacher, str(out)), num_processes=2)
    ranks = sorted(out.glob("rank*.json"))
    assert [p.name for p in ranks] == ["rank0.json", "rank1.json"]
    assert all(json.loads(p.read_text())["num_processes"] == 2 for p in ranks)
    assert (out / "model_index.json").is_file()


# --- bad input -----------------------------------------------------------------------------------------------------
def test_bad_configs_name_the_problem(tmp_path):
    teacher = tiny_teacher(tmp_path)
    o = ["--teacher", teacher, "--output_dir", str(tmp_path / "x")]
    with pytest.raises(ValueError, match=r"unknown divergence 'kld'; known: .*js"):
        _run(*o, "--divergence", "kld")
    with pytest.raises(ValueError, match="student would never be updated"):
        _run(*o, "--max_train_steps", "3", "--student_update_freq", "5", "--checkpointing_steps", "5")
    with pytest.raises(ValueError, match="student_update_freq must be >= 1"):
        _run(*o, "--student_update_freq", "0")
    with pytest.raises(ValueError, match="multiple of student_update_freq"):
        _run(*o, "--checkpointing_steps", "3")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        _run(*o, "--gradient_accumulation_steps", "2")
    # a student of another resolution
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    OneStepPipeline(unet=tiny_unet(sample_size=32), scheduler=sched).save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match="sample_size=32 but the teacher has sample_size=16"):
        _run(*o, "--student_init", str(tmp_path / "big"), "--max_train_steps", "2")
    # data of another channel count than the teacher
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "rgb" / c).mkdir(parents=True)
        Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "rgb" / c / "0.png")
    with pytest.raises(ValueError, match="channels and resolution must match"):
        _run(*o, "--dataset", "folder", "--data_dir", str(tmp_path / "rgb"), "--channels", "3",
             "--max_train_steps", "2")
    with pytest.raises(ValueError, match="does not exist"):
        _run("--teacher", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "y"))


def test_one_step_pipeline_arguments_and_round_trip(tmp_path):
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    pipe = OneStepPipeline(unet=tiny_unet(), scheduler=sched, generator_timestep=900)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    a = pipe(class_labels=[1, 2], output_type="pt", generator=g)
    assert a.nfe == 1 and a.images.shape == (2, 1, 16, 16)
    pipe.save_pretrained(tmp_path / "p")
    back = OneStepPipeline.from_pretrained(tmp_path / "p")
    assert back.config.generator_timestep == 900
    b = back(class_labels=[1, 2], output_type="pt", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.images, b.images)
    with pytest.raises(ValueError, match="num_inference_steps=1"):
        pipe(class_labels=[1], num_inference_steps=4)
    with pytest.raises(ValueError, match="class_labels out of range"):
        pipe(class_labels=[10])
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], output_type="jpg")
    with pytest.raises(ValueError, match="no text encoder"):
        pipe(prompt="a cat")
    with pytest.raises(ValueError, match="latents shape"):
        pipe(class_labels=[1], latents=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="generator_timestep"):
        OneStepPipeline(unet=tiny_unet(), scheduler=sched, generator_timestep=5000)
    with pytest.raises(ValueError, match="generator_prediction"):
        OneStepPipeline(unet=tiny_unet(), scheduler=sched, generator_prediction="noise")


# --- the benchmark (gen.evaluation.fdistill, eval/fdistill.py) ------------------------------------------------------
def test_eval_toy_and_digits_smoke(tmp_path):
    import yaml

    from gen.cli import parse_settings
    from gen.evaluation import fdistill as ev

    def main(argv):
        return ev.run(parse_settings(ev.FDistillEvalSettings, argv))

    cfg = yaml.safe_load((ROOT / "configs" / "fdistill_toy2d.yaml").read_text())
    cfg.update(max_train_steps=4, fake_init_steps=2, train_batch_size=16, checkpointing_steps=2, toy_hidden=16)
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(cfg))
    res = main(["--toy", "--divergences", "rkl,fkl", "--seeds", "0", "--toy_config", str(tmp_path / "toy.yaml"),
                "--num_samples", "200", "--out", str(tmp_path / "toy.json")])
    assert [r["divergence"] for r in res["rows"]] == ["rkl", "kl"]
    assert res["floor_exact_samples"]["modes_recovered"] == 8 and (tmp_path / "toy.png").is_file()
    assert json.loads((tmp_path / "toy.json").read_text())["summary"]["kl"]["mean_modes"] >= 0

    assert set(res["summary"]["kl"]) >= {"min_recall", "precision", "weight_tv", "recall_per_mode", "h_per_bin"}
    assert res["summary"]["rkl"]["h_per_bin"] and all(v == 1.0 for v in res["summary"]["rkl"]["h_per_bin"].values())

    teacher = tiny_teacher(tmp_path)
    sched = DDIMScheduler.from_pretrained(teacher, subfolder="scheduler")
    OneStepPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(tmp_path / "student")
    res = main(["--digits", "--student", str(tmp_path / "student"), "--teacher", teacher, "--num_samples", "20",
                "--batch_size", "20", "--teacher_steps", "1", "2", "--trailing_steps", "1", "--eval_seeds", "0", "1",
                "--timing_batch", "10", "--timing_repeats", "1", "--out", str(tmp_path / "d" / "digits.json")])
    assert [(r["model"], r["steps"], r["spacing"]) for r in res["rows"]] == [
        ("student", 1, None), ("teacher_x0", 1, None), ("teacher", 1, "leading"), ("teacher", 2, "leading"),
        ("teacher", 1, "trailing")]
    assert res["rows"][0]["nfe"] == 1 and res["targets"]["speedup_vs_teacher"] > 0
    assert [r["seed"] for r in res["rows"][0]["per_seed"]] == [0, 1] and res["rows"][0]["fid_std"] >= 0
    assert len(res["targets"]["fid_student_minus_teacher_per_seed"]) == 2
    assert (tmp_path / "d" / "digits_vs_teacher.png").is_file()

    # a training run's kept checkpoints (DCP + safetensors): FID against iteration (EMA weights)
    run = _run("--teacher", teacher, "--output_dir", str(tmp_path / "run"), "--max_train_steps", "4",
               "--checkpointing_steps", "2", "--checkpoints_total_limit", "5")
    curve = main(["--curve", str(run), "--teacher", teacher, "--num_samples", "20", "--batch_size", "20",
                  "--eval_seeds", "0", "--out", str(tmp_path / "c" / "curve.json")])
    assert [r["iteration"] for r in curve["rows"]] == [2, 4] and (tmp_path / "c" / "curve.png").is_file()
    ab = main(["--students", f"last={run}/checkpoints/checkpoint-4", f"final={run}", "--teacher", teacher,
               "--num_samples", "20", "--batch_size", "20", "--eval_seeds", "0", "--out", str(tmp_path / "ab.json")])
    assert ab["rows"][0]["fid"] == pytest.approx(ab["rows"][1]["fid"], abs=1e-3)  # the saved student is the EMA
    with pytest.raises(ValueError, match="exactly one mode"):
        parse_settings(ev.FDistillEvalSettings, ["--toy", "--digits"])
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_settings(ev.FDistillEvalSettings, ["--students", "only-a-path"])
    with pytest.raises(ValueError, match="eval/results"):  # shipped results need --update_shipped
        main(["--students", f"last={run}/checkpoints/checkpoint-4", "--out", str(ROOT / "eval/results/x.json")])


def test_bf16_mixed_precision_runs(tmp_path):
    from accelerate.state import AcceleratorState

    teacher = tiny_teacher(tmp_path)
    AcceleratorState._reset_state(reset_partial_state=True)  # the precision is fixed per process state
    try:
        out = _run("--teacher", teacher, "--output_dir", str(tmp_path / "bf16"), "--max_train_steps", "2",
                   "--mixed_precision", "bf16")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    logs = [json.loads(x) for x in (out / "logs.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for r in logs for v in r.values() if isinstance(v, float))
    assert OneStepPipeline.from_pretrained(out).unet.dtype == torch.float32  # the saved student stays float32


def test_toy_warm_up_leaves_no_gradient_behind():
    """The fake score's DSM warm-up on the toy teacher must not leak its last gradients into the first critic
    update (they did before the one loop; the f-distill toy regression case was re-recorded for it)."""
    from gen.distill.training import fit_fake_to_teacher, toy_teacher
    from gen.models.mlp import TimeMLP
    from gen.training import config_class, parse_config

    cfg = parse_config(config_class("fdistill"), ["--config", "configs/fdistill_toy2d.yaml", "--fake_init_steps", "2",
                                                  "--train_batch_size", "8"])
    teacher, sched = toy_teacher(cfg)
    fake = TimeMLP(dim=2, hidden=8, depth=1)
    fit_fake_to_teacher(fake, teacher, sched, cfg, "cpu")
    assert all(p.grad is None for p in fake.parameters())
