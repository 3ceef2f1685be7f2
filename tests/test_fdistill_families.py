"""f-distill on every teacher family (issue 15): tiny random components built offline, a few iterations end to end,
the exported one-step pipeline reloads and samples; the read-out through each family's conversion; one shared LoRA
base (same first-step losses as separate copies, resume, merge); the pass structure against a hand-written loop;
bad inputs; the GPU configs parse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from gen.training import train
from tests.test_fdistill_train import tiny_teacher

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--config", "configs/fdistill_digits.yaml", "--train_batch_size", "2", "--log_every", "1",
        "--student_update_freq", "2", "--checkpointing_steps", "2", "--disc_hidden", "16", "--ema_decay", "0.9",
        "--max_train_steps", "2"]


@pytest.fixture(autouse=True)
def _root():
    os.chdir(ROOT)


def _logs(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "logs.jsonl").read_text().splitlines()]


def _images(folder: Path, side: int, classes=None) -> str:
    for c in classes or [None]:
        d = folder if c is None else folder / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (side, side), (40 * i, 90, 200 - 30 * i)).save(d / f"{i}.png")
    return str(folder)


def _prompts(tmp_path) -> str:
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na dog\n")
    return str(tmp_path / "prompts.txt")


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- tiny teachers ---------------------------------------------------------------------------------------------
def _interpolant_teacher(tmp_path) -> str:
    from gen.interpolants.scheduler import InterpolantScheduler
    from gen.models.unet import tiny_unet
    from pipelines import InterpolantPipeline

    torch.manual_seed(0)
    InterpolantPipeline(unet=tiny_unet(), scheduler=InterpolantScheduler()).save_pretrained(tmp_path / "interp")
    return str(tmp_path / "interp")


def _dit_teacher(tmp_path) -> str:
    from gen.models.tiny_families import build_tiny_dit
    from pipelines import GuidedDiTPipeline

    GuidedDiTPipeline(**build_tiny_dit(num_classes=4)).save_pretrained(tmp_path / "dit")
    return str(tmp_path / "dit")


def _sdxl_teacher(tmp_path) -> str:
    from diffusers import StableDiffusionXLPipeline

    from gen.models.tiny_families import build_tiny_sdxl

    StableDiffusionXLPipeline(**build_tiny_sdxl()).save_pretrained(tmp_path / "sdxl")
    return str(tmp_path / "sdxl")


def _sd3_teacher(tmp_path) -> str:
    from diffusers import StableDiffusion3Pipeline

    from gen.models.tiny_families import build_tiny_sd3

    StableDiffusion3Pipeline(**build_tiny_sd3()).save_pretrained(tmp_path / "sd3")
    return str(tmp_path / "sd3")


# --- every family end to end ---------------------------------------------------------------------------------------
def test_interpolant_teacher_end_to_end_and_flow_read_out(tmp_path):
    """A class-conditional flow teacher: the student's velocity is read out as x1 = z + v at t = 0."""
    from pipelines import OneStepPipeline

    out = train("fdistill", [*FAST, "--teacher", _interpolant_teacher(tmp_path), "--output_dir", str(tmp_path / "o"),
                             "--generator_timestep", "1000", "--t_max", "1000", "--timestep_shift", "2.0"])
    assert [r["step"] for r in _logs(out)] == [1, 2] and "loss_dm" in _logs(out)[1]
    pipe = _quiet(OneStepPipeline.from_pretrained(out))
    assert type(pipe.scheduler).__name__ == "InterpolantScheduler" and pipe.config.generator_timestep == 1000
    z = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    x = pipe(class_labels=[1, 2], latents=z, output_type="pt")
    with torch.no_grad():
        v = pipe.unet(z, torch.zeros(2), class_labels=torch.tensor([1, 2])).sample
    torch.testing.assert_close(x.images, ((z + v) / 2 + 0.5).clamp(0, 1))
    assert x.nfe == 1
    # the training checkpoint (EMA student, the last step) loads as the same pipeline as the export
    from gen.distill.students import load_student

    again = _quiet(load_student(out / "checkpoints" / "checkpoint-2"))
    assert type(again.scheduler).__name__ == "InterpolantScheduler" and again.config.generator_timestep == 1000
    torch.testing.assert_close(again(class_labels=[1, 2], latents=z, output_type="pt").images, x.images, rtol=0,
                               atol=0)


def test_dit_teacher_end_to_end_with_lora_on_one_base(tmp_path):
    from pipelines import OneStepDiTPipeline

    data = _images(tmp_path / "imgs", 16, classes=["a", "b"])
    out = train("fdistill", [*FAST, "--teacher", _dit_teacher(tmp_path), "--dataset", "folder", "--data_dir", data,
                             "--output_dir", str(tmp_path / "o"), "--lora_rank", "2", "--generator_timestep", "999"])
    assert "loss_dm" in _logs(out)[1]
    pipe = _quiet(OneStepDiTPipeline.from_pretrained(out))
    img = pipe(class_labels=[0, 3], output_type="np", generator=torch.Generator().manual_seed(0))
    assert img.images.shape == (2, 16, 16, 3) and img.nfe == 1 and type(pipe.transformer).__name__ == \
        "DiTTransformer2DModel"
    # label names (DiT-XL-2-256 has ImageNet's) survive the export
    named = OneStepDiTPipeline(pipe.transformer, pipe.vae, pipe.scheduler, id2label={0: "cat, tabby", 3: "dog"})
    named.save_pretrained(tmp_path / "named")
    assert OneStepDiTPipeline.from_pretrained(tmp_path / "named").get_label_ids(["tabby", "dog"]) == [0, 3]


def test_sdxl_teacher_end_to_end(tmp_path):
    from pipelines import OneStepSDXLPipeline

    out = train("fdistill", [*FAST, "--teacher", _sdxl_teacher(tmp_path), "--dataset", "folder", "--data_dir",
                             _images(tmp_path / "imgs", 16), "--prompts_file", _prompts(tmp_path), "--output_dir",
                             str(tmp_path / "o"), "--lora_rank", "2", "--teacher_guidance_scale", "2.0",
                             "--generator_timestep", "999"])
    assert "loss_dm" in _logs(out)[1]
    pipe = _quiet(OneStepSDXLPipeline.from_pretrained(out))
    img = pipe(["a cat", "a dog"], output_type="pt", generator=torch.Generator().manual_seed(0))
    assert img.images.shape == (2, 3, 16, 16) and img.nfe == 1
    with pytest.raises(ValueError, match="num_inference_steps=1"):
        pipe("a cat", num_inference_steps=4)


def test_sd3_teacher_end_to_end_and_flow_read_out(tmp_path):
    """An SD3-style flow transformer with the timestep shift; the student's output is read out as x0 = z - v."""
    from pipelines import OneStepSD3Pipeline

    out = train("fdistill", [*FAST, "--teacher", _sd3_teacher(tmp_path), "--dataset", "folder", "--data_dir",
                             _images(tmp_path / "imgs", 16), "--prompts_file", _prompts(tmp_path), "--output_dir",
                             str(tmp_path / "o"), "--generator_timestep", "1000", "--t_max", "1000",
                             "--disc_features", "teacher"])
    assert "loss_dm" in _logs(out)[1]
    pipe = _quiet(OneStepSD3Pipeline.from_pretrained(out))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    x0 = pipe("a cat", latents=z, output_type="latent").images
    emb, _, pooled, _ = pipe.encode_prompt("a cat", None, None, do_classifier_free_guidance=False)
    with torch.no_grad():
        v = pipe.transformer(hidden_states=z, timestep=torch.full((1,), 1000.0), encoder_hidden_states=emb,
                             pooled_projections=pooled).sample
    torch.testing.assert_close(x0, z - v)
    assert pipe("a cat", output_type="np").images.shape == (1, 16, 16, 3)


def test_flow_training_levels_are_shifted():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from gen.distill.spaces import NoiseLevels

    levels = NoiseLevels(FlowMatchEulerDiscreteScheduler(shift=3.0), 0, 1000)
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert levels.shift == 3.0  # the scheduler's own shift
    torch.testing.assert_close(levels.timestep(u * 1000), (1000 * 3 * u / (1 + 2 * u)).float())
    frame = levels.frame(torch.zeros(4, 1, 2, 2), u * 1000)
    alpha, sigma = frame.alpha_sigma()
    torch.testing.assert_close(sigma.flatten(), (3 * u / (1 + 2 * u)).float())
    torch.testing.assert_close(alpha.flatten(), 1 - sigma.flatten())


# --- one shared base ---------------------------------------------------------------------------------------------
def test_shared_base_gives_the_losses_of_separate_copies(tmp_path):
    teacher = tiny_teacher(tmp_path)
    lora = ["--lora_rank", "2", "--lora_targets", "conv1,conv2", "--train_batch_size", "4"]
    runs = {name: _logs(train("fdistill", [*FAST, "--teacher", teacher, "--output_dir", str(tmp_path / name),
                                           *lora, "--lora_shared_base", flag]))
            for name, flag in (("shared", "true"), ("separate", "false"))}
    full = _logs(train("fdistill", [*FAST, "--teacher", teacher, "--output_dir", str(tmp_path / "full"),
                                    "--train_batch_size", "4"]))
    first = {k: v for k, v in runs["shared"][0].items() if k != "elapsed_s"}
    assert first == {k: v for k, v in runs["separate"][0].items() if k != "elapsed_s"}
    # the adapters start at zero: every network is the teacher, so the critic's losses are full fine-tuning's too
    assert (first["loss_dsm"], first["loss_d"]) == (full[0]["loss_dsm"], full[0]["loss_d"])
    for key in ("loss_critic", "loss_student", "loss_dm", "grad_norm_critic", "grad_norm_student"):  # same seeds
        assert runs["shared"][1][key] == pytest.approx(runs["separate"][1][key], rel=1e-6)


def test_shared_base_resumes_exactly(tmp_path):
    from gen.training import list_checkpoints
    from tests.regression.training_cases import Killed, die_after_checkpoint, weights_digest

    teacher = tiny_teacher(tmp_path)
    args = [*FAST, "--teacher", teacher, "--lora_rank", "2", "--lora_targets", "conv1,conv2", "--max_train_steps",
            "4"]
    whole = train("fdistill", [*args, "--output_dir", str(tmp_path / "whole")])
    with pytest.raises(Killed), die_after_checkpoint(2):
        train("fdistill", [*args, "--output_dir", str(tmp_path / "killed")])
    ckpt = list_checkpoints(tmp_path / "killed" / "checkpoints")[-1][1]
    state = json.loads((ckpt / "state.json").read_text())
    assert all("lora_" in k for k in state["models"]["student"]["model_keys"])  # the adapter, not the base
    resumed = train("fdistill", [*args, "--output_dir", str(tmp_path / "killed"), "--resume", "latest"])
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _logs(whole)]
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in _logs(resumed)] == strip
    assert weights_digest(resumed) == weights_digest(whole)


def test_adapter_views_switch_one_base_and_merge():
    from gen.distill.lora import AdapterView, inject_adapters, merged_network
    from gen.models.tiny_families import build_tiny_dit
    from gen.models.unet import tiny_unet

    for net, targets, call in (
            (tiny_unet().eval(), ("conv1", "conv2", "time_emb_proj"),
             lambda m, x: m(x, torch.tensor([3, 700]), class_labels=torch.tensor([1, 2])).sample),
            (build_tiny_dit(num_classes=4)["transformer"], ("to_q", "to_v", "proj_out"),
             lambda m, x: m(x, timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 2])).sample)):
        x = torch.randn(2, net.config.in_channels, net.config.sample_size, net.config.sample_size)
        with torch.no_grad():
            before = call(net, x)
        inject_adapters(net, ("student", "fake"), 2, None, targets, seed=0)
        student, fake, teacher = AdapterView(net, "student"), AdapterView(net, "fake"), AdapterView(net, None)
        assert not list(teacher.parameters()) and all("lora_" in n for n, _ in student.named_parameters())
        assert {id(p) for p in student.parameters()}.isdisjoint({id(p) for p in fake.parameters()})
        with torch.no_grad():
            for p in [*student.parameters(), *fake.parameters()]:
                p.normal_(0, 0.1)  # B = 0 at init: make both adapters act
            s, f, t = call(student, x), call(fake, x), call(teacher, x)
        assert torch.equal(t, before)  # the teacher is the base with the adapters off, bit for bit
        assert not torch.allclose(s, before, atol=1e-4) and not torch.allclose(s, f, atol=1e-4)
        assert torch.equal(call(student, x), s)  # switching back and forth changes nothing
        merged = merged_network(student)
        assert type(merged) is type(net) and not any("lora" in k for k in merged.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(call(merged, x), s, rtol=1e-4, atol=1e-5)


def test_feature_tap_stop_and_grad_off_give_the_full_forward_features():
    from gen.distill.fdistill import FeatureTap
    from gen.models.unet import tiny_unet

    net = tiny_unet()
    x, t, y = torch.randn(3, 1, 16, 16, requires_grad=True), torch.tensor([1, 400, 900]), torch.tensor([0, 5, 9])
    tap = FeatureTap(net)
    with tap.capture("keep"):
        out = net(x, t, class_labels=y).sample
    full = tap.pop()
    early = tap.run_to_features(net, x, t, class_labels=y)
    torch.testing.assert_close(early, full, rtol=0, atol=0)
    with tap.capture("grad_off"):
        out2 = net(x, t, class_labels=y).sample
    feats = tap.pop()
    assert torch.is_grad_enabled() and feats.requires_grad and not out2.requires_grad and out.requires_grad
    torch.testing.assert_close(out2, out.detach(), rtol=0, atol=0)


# --- the pass structure --------------------------------------------------------------------------------------------
def test_iterations_equal_a_hand_written_loop_with_only_the_needed_passes(tmp_path):
    """The loop's f-distill iterations (one student forward, encoder-only real half, no graph after the fake score's
    mid block in the student step) give the losses and gradient norms of :class:`BareFDistill`, which runs the UNet's
    encoder and decoder by hand, bit for bit."""
    from gen.evaluation.bench_fdistill import max_loss_difference, run_loop_and_bare

    argv = [*FAST, "--teacher", tiny_teacher(tmp_path), "--output_dir", str(tmp_path / "r"), "--max_train_steps",
            "7", "--train_batch_size", "4", "--checkpointing_steps", "100", "--log_every", "100"]
    res = run_loop_and_bare(argv, 4, warmup=2)
    assert len(res["losses"]["loop"]) == 4 and sum(res["student_iterations"]) == 2
    assert max_loss_difference(res["losses"]["loop"], res["losses"]["bare"]) <= 1e-7


# --- bad input ---------------------------------------------------------------------------------------------------
def test_bad_teachers_students_and_settings(tmp_path):
    teacher = tiny_teacher(tmp_path)
    o = [*FAST, "--output_dir", str(tmp_path / "x")]
    with pytest.raises(ValueError, match=r"not a teacher family f-distill supports; supported: class_unet: .*sd3"):
        train("fdistill", [*o, "--teacher", str(ROOT / "checkpoints" / "digits-gbm")])
    with pytest.raises(ValueError, match="two-sided bridge"):
        train("fdistill", [*o, "--teacher", str(ROOT / "checkpoints" / "digits-bridge")])
    with pytest.raises(ValueError, match="is a one-step student"):
        train("fdistill", [*o, "--teacher", str(ROOT / "checkpoints" / "digits-fdistill-js")])
    with pytest.raises(ValueError, match="is a DiTTransformer2DModel but the teacher is a UNet2DModel"):
        train("fdistill", [*o, "--teacher", teacher, "--student_init", _dit_teacher(tmp_path)])
    with pytest.raises(ValueError, match="timestep_shift=3.0 needs a flow-matching teacher"):
        train("fdistill", [*o, "--teacher", teacher, "--timestep_shift", "3"])
    with pytest.raises(ValueError, match="must be Linear or Conv2d"):
        train("fdistill", [*o, "--teacher", teacher, "--lora_rank", "2", "--lora_targets", "time_embedding"])
    with pytest.raises(ValueError, match="match no module"):
        train("fdistill", [*o, "--teacher", teacher, "--lora_rank", "2", "--lora_targets", "to_q"])
    with pytest.raises(ValueError, match=r"generator_timestep=1000 must lie in \[0, 999\]"):
        train("fdistill", [*o, "--teacher", teacher, "--generator_timestep", "1000"])
    with pytest.raises(ValueError, match="set lora_shared_base false"):
        train("fdistill", [*o, "--teacher", teacher, "--lora_rank", "2", "--student_init", teacher])


@pytest.mark.parametrize("name", ["sdxl", "sd3", "dit"])
def test_gpu_configs_parse(name):
    """The hub-model configs are GPU settings (not run here): they parse and validate without loading a model."""
    from gen.training import config_class, parse_config

    cfg = parse_config(config_class("fdistill"), ["--config", f"configs/fdistill_{name}.yaml"])
    assert cfg.teacher.count("/") == 1 and not Path(cfg.teacher).exists()  # a hub id
    assert (cfg.timestep_shift == 3.0) == (name == "sd3")


# --- the eval scripts ----------------------------------------------------------------------------------------------
def test_bench_copies_and_flow_eval_smoke(tmp_path):
    from gen.evaluation.bench_fdistill import BenchFDistillSettings
    from gen.evaluation.bench_fdistill import run as bench
    from gen.evaluation.fdistill_flow import FDistillFlowSettings
    from gen.evaluation.fdistill_flow import run as flow
    from pipelines import InterpolantPipeline, OneStepPipeline

    res = bench(BenchFDistillSettings(out=str(tmp_path / "b"), only=["copies"], teacher=tiny_teacher(tmp_path),
                                      lora_rank=2, lora_targets="conv1,conv2"))
    rows = res["copies"]["rows"]
    assert rows["shared"]["copies"] < rows["separate"]["copies"] - 1.9 < rows["full"]["copies"]
    assert rows["shared"]["parts"]["teacher (the shared base)"] == pytest.approx(1.0)
    assert (tmp_path / "b" / "rows.md").is_file()
    interp = InterpolantPipeline.from_pretrained("checkpoints/digits-interpolant")
    OneStepPipeline(unet=interp.unet, scheduler=interp.scheduler, generator_timestep=1000).save_pretrained(
        tmp_path / "student")
    res = flow(FDistillFlowSettings(out=str(tmp_path / "f"), student=str(tmp_path / "student"), num_samples=20,
                                    batch=20, seeds=[0, 1], nfe=[2], samplers=["ode-euler"], timing_batch=10,
                                    timing_repeats=1))
    assert [r["nfe"] for r in res["rows"]] == [1, 2] and len(res["rows"][0]["fids"]) == 2
    assert (tmp_path / "f" / "samples.png").is_file() and "student_vs_best_8_nfe_ode" not in res
