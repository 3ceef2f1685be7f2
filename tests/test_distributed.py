"""FSDP2 against DDP on 2 CPU gloo ranks (``accelerate.debug_launcher``), through the test-only shim
``tests/_fsdp_shim.py`` (Accelerate enables FSDP only on accelerators). Every worker asserts the engine after
``prepare()``: the prepared networks must be ``FSDPModule``s.

Launch 1, the diffusion objective (tiny UNet, EMA, cosine LR): FSDP2 losses equal DDP's to 1e-6; a run killed
after checkpoint-2 and resumed equals the uninterrupted one bit for bit (weights, EMA, logs); checkpoints hold only
``.safetensors`` and ``.json``; the exported pipeline reloads and equals the sharded model's forward; the 2-rank
checkpoint resumes on 1 process (resharding) with the same weights and EMA.
Launch 2, f-distill with LoRA on student and fake score (two networks, two optimizers, per-network clipping): the
student and the fake score are two adapters over ONE shared frozen base (each network sharded as one FSDP2 unit:
its parameters are its adapter); ten iterations; per-network gradient norms and losses equal DDP's; the shared base
stays bit-identical to the teacher.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
DIFF = ["--config", "configs/digits_teacher.yaml", "--unet_preset", "tiny", "--train_batch_size", "4", "--log_every",
        "1", "--ema_decay", "0.9", "--checkpointing_steps", "2", "--lr_scheduler", "cosine"]


def _logs(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "logs.jsonl").read_text().splitlines()]


def _fsdp_loop(name, argv):
    """Run a trainer through the shim; returns the finished loop (its prepared networks are still there)."""
    from gen.training import TrainLoop, check_engine, objective_class, parse_config
    from tests._fsdp_shim import fsdp2_accelerator

    cls = objective_class(name)
    cfg = parse_config(cls.config_class, argv)
    acc = fsdp2_accelerator(cfg)
    assert check_engine(acc) == "fsdp2"
    loop = TrainLoop(cfg, acc, cls(cfg, acc))
    loop.run()
    return loop


def _engines(loop) -> dict:
    from torch.distributed.fsdp import FSDPModule

    from gen.training import running_engine

    return {"engine": running_engine(loop.acc), "num_processes": loop.acc.num_processes,
            "fsdp_modules": {n: isinstance(s.model, FSDPModule) for n, s in loop.slots.items()}}


def _reset():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a pytest process that already had one
    os.chdir(ROOT)


# ---------------------------------------------------------------------------------------------------------------
def _diffusion_worker(root):
    from gen.training import train
    from tests._fsdp_shim import FSDP2_ENV
    from tests.regression.training_cases import Killed, die_after_checkpoint

    _reset()
    root = Path(root)
    train("diffusion", [*DIFF, "--max_train_steps", "4", "--output_dir", str(root / "ddp")])
    os.environ.update(FSDP2_ENV)
    loop = _fsdp_loop("diffusion", [*DIFF, "--max_train_steps", "4", "--output_dir", str(root / "fsdp")])
    # the sharded model's forward with the EMA weights the export holds
    slot = loop.slots["unet"]
    slot.ema.copy_to(slot.model)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 16, 16, generator=g), torch.tensor([10, 500, 990]), torch.tensor([0, 4, 10])
    with torch.no_grad():
        out = slot.model(x, t, class_labels=y).sample
    if loop.acc.is_main_process:
        save_file({"x": x, "t": t, "y": y, "out": out.contiguous()}, str(root / "sharded_forward.safetensors"))
    # killed right after checkpoint-2, then resumed
    try:
        with die_after_checkpoint(2):
            _fsdp_loop("diffusion", [*DIFF, "--max_train_steps", "4", "--output_dir", str(root / "killed")])
    except Killed:
        pass
    _fsdp_loop("diffusion", [*DIFF, "--max_train_steps", "4", "--output_dir", str(root / "killed"), "--resume",
                             "latest"])
    _fsdp_loop("diffusion", [*DIFF, "--max_train_steps", "2", "--output_dir", str(root / "two")])
    rank = loop.acc.process_index
    (root / f"rank{rank}.json").write_text(json.dumps(_engines(loop)))


def _unet_weights(out) -> dict:
    return load_file(str(Path(out) / "unet" / "diffusion_pytorch_model.safetensors"))


def test_fsdp2_diffusion_matches_ddp_resumes_exactly_exports_and_reshards(tmp_path):
    from gen.training import train
    from pipelines import ClassConditionalPipeline

    debug_launcher(_diffusion_worker, args=(str(tmp_path),), num_processes=2)
    for rank in (0, 1):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert info == {"engine": "fsdp2", "num_processes": 2, "fsdp_modules": {"unet": True}}
    # 1. FSDP2 losses equal DDP's; weights too, to float32 round-off
    ddp, fsdp = _logs(tmp_path / "ddp"), _logs(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for a, b in zip(ddp, fsdp):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
    wd, wf = _unet_weights(tmp_path / "ddp"), _unet_weights(tmp_path / "fsdp")
    assert wd.keys() == wf.keys() and all(torch.allclose(wd[k], wf[k], atol=1e-5, rtol=0) for k in wd)
    # 2. killed after checkpoint-2 and resumed: bit for bit (weights with EMA, logs)
    wk = _unet_weights(tmp_path / "killed")
    assert all(torch.equal(wk[k], wf[k]) for k in wf)
    assert _logs(tmp_path / "killed") == [{**r, "elapsed_s": k["elapsed_s"]} for r, k in zip(fsdp, _logs(
        tmp_path / "killed"))]
    # 3. sharded checkpoints: only safetensors and JSON, one shard per rank, optimizer state of both ranks
    ckpt = tmp_path / "fsdp" / "checkpoints" / "checkpoint-4"
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}
    assert len(list(ckpt.glob("*.safetensors"))) == 2
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and state["models"]["unet"]["optim_manifest"]
    # 4. the exported pipeline reloads and equals the sharded model's forward
    ref = load_file(str(tmp_path / "sharded_forward.safetensors"))
    unet = ClassConditionalPipeline.from_pretrained(tmp_path / "fsdp").unet
    with torch.no_grad():
        got = unet(ref["x"], ref["t"], class_labels=ref["y"]).sample
    torch.testing.assert_close(got, ref["out"], rtol=0, atol=1e-6)
    # 5. resharding: the 2-rank checkpoint-2 resumes on this one process with the same weights and EMA
    two = tmp_path / "two"
    w2 = _unet_weights(two)
    shutil.rmtree(two / "unet")
    train("diffusion", [*DIFF, "--max_train_steps", "2", "--output_dir", str(two), "--resume", "latest"])
    w1 = _unet_weights(two)
    assert all(torch.equal(w1[k], w2[k]) for k in w2)
    train("diffusion", [*DIFF, "--max_train_steps", "3", "--output_dir", str(two), "--resume", "latest"])
    assert [r["step"] for r in _logs(two)] == [1, 2, 3] and all(torch.isfinite(v).all() for v in _unet_weights(
        two).values())


# ---------------------------------------------------------------------------------------------------------------
def _fdistill_args(teacher, out):
    return ["--config", "configs/fdistill_digits.yaml", "--teacher", teacher, "--output_dir", out,
            "--train_batch_size", "4", "--log_every", "1", "--student_update_freq", "2", "--checkpointing_steps",
            "10", "--disc_hidden", "16", "--ema_decay", "0.9", "--max_train_steps", "10", "--lora_rank", "2",
            "--lora_targets", "conv1,conv2", "--max_grad_norm", "0.004"]


def _fdistill_worker(teacher, root):
    from gen.training import train
    from tests._fsdp_shim import FSDP2_ENV

    _reset()
    root = Path(root)
    train("fdistill", _fdistill_args(teacher, str(root / "ddp")))
    os.environ.update(FSDP2_ENV)
    loop = _fsdp_loop("fdistill", _fdistill_args(teacher, str(root / "fsdp")))
    # the adapters after ten iterations (gathered on rank 0) and the one base they share (never sharded)
    full = {n: loop.acc.get_state_dict(loop.slots[n].model) for n in ("student", "critic")}
    obj = loop.objective
    base = obj.teacher.base_network
    shared = obj.unwrapped("student").base_network is base and obj.unwrapped("critic").fake_score.base_network is base
    if loop.acc.is_main_process:
        for n, sd in full.items():
            save_file({k: v.contiguous() for k, v in sd.items()}, str(root / f"{n}_full.safetensors"))
        save_file({k: v.contiguous() for k, v in base.state_dict().items() if "lora_" not in k},
                  str(root / "base.safetensors"))
    rank = loop.acc.process_index
    (root / f"rank{rank}.json").write_text(json.dumps({**_engines(loop), "shared_base": shared}))


def test_fsdp2_fdistill_lora_ten_iterations(tmp_path):
    from pipelines import OneStepPipeline
    from tests.test_fdistill_train import tiny_teacher

    teacher = tiny_teacher(tmp_path)
    debug_launcher(_fdistill_worker, args=(teacher, str(tmp_path)), num_processes=2)
    for rank in (0, 1):
        info = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert info == {"engine": "fsdp2", "num_processes": 2, "fsdp_modules": {"student": True, "critic": True},
                        "shared_base": True}
    ddp, fsdp = _logs(tmp_path / "ddp"), _logs(tmp_path / "fsdp")
    assert [r["step"] for r in fsdp] == list(range(1, 11))
    for a, b in zip(ddp, fsdp):  # per-network global norms (clipped at 0.004) and losses: as under DDP
        for key in ("loss_dsm", "loss_d", "grad_norm_critic", "loss_dm", "grad_norm_student"):
            if key in a:
                # reduce-scatter sums in another order than all-reduce: rounding differences grow over the steps
                rel = 1e-3 if key.startswith("grad_norm") else 1e-4
                assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (a["step"], key)
    student_norms = [r["grad_norm_student"] for r in fsdp if "grad_norm_student" in r]
    assert len(student_norms) == 5 and max(student_norms) > 0.004 and min(r["grad_norm_critic"] for r in fsdp) > 0.004
    # the one frozen base: every non-LoRA weight equals the teacher's
    from pipelines import ClassConditionalPipeline

    t_sd = ClassConditionalPipeline.from_pretrained(teacher).unet.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in load_file(str(tmp_path / "base.safetensors")).items()}
    assert base.keys() == t_sd.keys() and all(torch.equal(base[k], t_sd[k]) for k in t_sd)
    # the networks hold their adapters only, and the adapters did train
    for name in ("student", "critic"):
        sd = load_file(str(tmp_path / f"{name}_full.safetensors"))
        lora = [k for k in sd if "lora_" in k]
        assert lora and all(("conv1" in k or "conv2" in k) for k in lora)
        assert not [k for k in sd if "lora_" not in k and not k.startswith(("head.", "ratio_bins."))]
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in sd.items())
    pipe = OneStepPipeline.from_pretrained(tmp_path / "fsdp")  # LoRA merged: a plain UNet2DModel
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, t_sd[k])]
    assert changed and all(("conv1" in k or "conv2" in k) for k in changed)
    # the sharded 2-rank checkpoint read on one process (EMA adapters resharded, merged) is the exported student
    from gen.distill.students import load_student

    again = load_student(tmp_path / "fsdp" / "checkpoints" / "checkpoint-10")
    kw = {"class_labels": [1, 2], "output_type": "pt"}
    torch.testing.assert_close(again(generator=torch.Generator().manual_seed(0), **kw).images,
                               pipe(generator=torch.Generator().manual_seed(0), **kw).images)
