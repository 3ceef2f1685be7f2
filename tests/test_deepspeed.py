"""DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU gloo ranks through the test-only shim ``tests/_deepspeed_shim.py``.

Marked ``deepspeed`` and skipped where deepspeed is not installed (CI). Install it with
``DS_BUILD_OPS=0 pip install deepspeed`` (it leaves torch as it is); the first engine start compiles a
communication op. One launch: a DDP reference; ZeRO-2 with EMA: losses as DDP's, killed after checkpoint-2 and
resumed (with the trust flag; refused without) equals the uninterrupted run; ZeRO-3: EMA refused by name, training
without EMA exports gathered full weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from safetensors.torch import load_file

pytestmark = [pytest.mark.deepspeed,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")]

ROOT = Path(__file__).resolve().parents[1]
DIFF = ["--config", "configs/digits_teacher.yaml", "--unet_preset", "tiny", "--train_batch_size", "4", "--log_every",
        "1", "--checkpointing_steps", "2", "--lr_scheduler", "cosine", "--max_train_steps", "4"]


def _ds_train(argv, stage):
    from gen.training import train
    from tests._deepspeed_shim import deepspeed_accelerator

    return train("diffusion", argv, make_accelerator_fn=lambda cfg: deepspeed_accelerator(cfg, stage))


def _worker(root):
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    from gen.training import TrainLoop, running_engine, train
    from tests.regression.training_cases import Killed, die_after_checkpoint

    AcceleratorState._reset_state(reset_partial_state=True)
    os.chdir(ROOT)
    root = Path(root)
    res = {}
    train("diffusion", [*DIFF, "--ema_decay", "0.9", "--output_dir", str(root / "ddp")])
    # ZeRO-2 with EMA: uninterrupted, then killed after checkpoint-2 and resumed
    engines = []
    prepare = TrainLoop.__init__

    def record(self, *a, **k):
        prepare(self, *a, **k)
        engines.append([running_engine(self.acc), type(self.slots["unet"].model).__name__])

    TrainLoop.__init__ = record
    _ds_train([*DIFF, "--ema_decay", "0.9", "--output_dir", str(root / "z2")], 2)
    try:
        with die_after_checkpoint(2):
            _ds_train([*DIFF, "--ema_decay", "0.9", "--output_dir", str(root / "z2k")], 2)
    except Killed:
        pass
    try:
        _ds_train([*DIFF, "--ema_decay", "0.9", "--output_dir", str(root / "z2k"), "--resume", "latest"], 2)
    except ValueError as err:
        res["untrusted"] = str(err)
    _ds_train([*DIFF, "--ema_decay", "0.9", "--output_dir", str(root / "z2k"), "--resume", "latest",
               "--trust_deepspeed_checkpoint", "true"], 2)
    # ZeRO-3: EMA refused; without EMA the export gathers the partitioned weights
    try:
        _ds_train([*DIFF, "--ema_decay", "0.9", "--output_dir", str(root / "z3ema")], 3)
    except ValueError as err:
        res["zero3_ema"] = str(err)
    _ds_train([*DIFF, "--ema_decay", "0", "--output_dir", str(root / "z3")], 3)
    TrainLoop.__init__ = prepare
    res["engines"] = engines
    (root / f"rank{PartialState().process_index}.json").write_text(json.dumps(res))


def _logs(out):
    return [json.loads(line) for line in (Path(out) / "logs.jsonl").read_text().splitlines()]


def _weights(out):
    return load_file(str(Path(out) / "unet" / "diffusion_pytorch_model.safetensors"))


def test_deepspeed_zero2_resume_and_zero3(tmp_path):
    from pipelines import ClassConditionalPipeline

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    debug_launcher(_worker, args=(str(tmp_path),), num_processes=2)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["engines"] == [["deepspeed", "DeepSpeedEngine"]] * 4  # z2, z2k, z2k resumed, z3
        assert "is a DeepSpeed checkpoint; its format unpickles" in res["untrusted"]
        assert "ema_decay > 0 under DeepSpeed ZeRO-3" in res["zero3_ema"]
    ddp, z2 = _logs(tmp_path / "ddp"), _logs(tmp_path / "z2")
    assert [r["step"] for r in z2] == [1, 2, 3, 4]
    for a, b in zip(ddp, z2):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["lr"] == pytest.approx(b["lr"])
    wz2, wk = _weights(tmp_path / "z2"), _weights(tmp_path / "z2k")
    assert all(torch.equal(wz2[k], wk[k]) for k in wz2)  # resumed == uninterrupted (weights with EMA)
    assert [r["loss"] for r in _logs(tmp_path / "z2k")] == [r["loss"] for r in z2]
    state = json.loads((tmp_path / "z2" / "checkpoints" / "checkpoint-4" / "state.json").read_text())
    assert state["format"] == "deepspeed" and state["world_size"] == 2
    unet = ClassConditionalPipeline.from_pretrained(tmp_path / "z3").unet  # gathered from ZeRO-3 partitions
    assert all(torch.isfinite(p).all() and p.numel() > 0 for p in unet.parameters())
