"""gen.training: configs, the one loop (smoke, NaN guard, EMA, keep-last-K, 2 processes), checkpoints (format,
corrupt and missing pieces, fingerprints, DeepSpeed trust flag), output-folder ownership, the engine check, and
the folder dataset's resolution check and class names."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import debug_launcher

from gen.training import (
    EMA,
    CheckpointManager,
    Objective,
    TrainConfig,
    Trained,
    check_engine,
    config_class,
    list_checkpoints,
    parse_config,
    requested_engine,
    train,
)

TINY = ["--unet_preset", "tiny", "--train_batch_size", "4", "--log_every", "1", "--ema_decay", "0.9"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _root():
    os.chdir(ROOT)


def _yaml(tmp_path, **kv):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(kv))
    return str(p)


# --- configs -------------------------------------------------------------------------------------------------------
def test_config_yaml_then_cli_overrides(tmp_path):
    cfg = parse_config(config_class("diffusion"), ["--config", _yaml(tmp_path, learning_rate=0.01, max_train_steps=7),
                                                   "--max_train_steps", "3", "--random_flip=true"])
    assert cfg.max_train_steps == 3 and cfg.learning_rate == 0.01 and cfg.random_flip is True


def test_config_errors_name_the_key(tmp_path):
    cls = config_class("diffusion")
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat'.*did you mean 'learning_rate'"):
        parse_config(cls, ["--config", _yaml(tmp_path, learning_rat=0.1)])
    with pytest.raises(ValueError, match=r"unknown config key 'max_steps' in the command line"):
        parse_config(cls, ["--max_steps", "3"])
    with pytest.raises(ValueError, match=r"'max_train_steps' expects int; got 'ten'"):
        parse_config(cls, ["--max_train_steps", "ten"])
    with pytest.raises(ValueError, match=r"mixed_precision='fp8'; allowed: no, fp16, bf16"):
        parse_config(cls, ["--mixed_precision", "fp8"])
    with pytest.raises(ValueError, match="label_dropout must be in"):
        parse_config(cls, ["--label_dropout", "1.5"])
    with pytest.raises(ValueError, match="unknown scheduler"):
        parse_config(cls, ["--inference_scheduler", "nope"])
    with pytest.raises(ValueError, match="does not exist"):
        parse_config(cls, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="needs a value"):
        parse_config(cls, ["--seed"])
    with pytest.raises(ValueError, match=r"report_to='mlflow'; allowed: none, tensorboard, wandb, all"):
        parse_config(cls, ["--report_to", "mlflow"])
    with pytest.raises(ValueError, match="resume and overwrite_output_dir contradict"):
        parse_config(cls, ["--resume", "latest", "--overwrite_output_dir", "true"])
    with pytest.raises(ValueError, match="unknown trainer 'difusion'"):
        train("difusion", [])


def test_folder_resolution_the_unet_cannot_divide_is_a_config_error(tmp_path):
    cls = config_class("diffusion")
    base = ["--dataset", "folder", "--data_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"resolution=18 does not divide by 4, which unet_preset='digits' needs"
                                         r".*16 or 20"):
        parse_config(cls, base + ["--resolution", "18"])
    with pytest.raises(ValueError, match="unet_preset=tiny supports 1-channel images only"):
        parse_config(cls, base + ["--unet_preset", "tiny", "--channels", "3"])
    assert parse_config(cls, base + ["--resolution", "20"]).resolution == 20


# --- the trainer end to end ----------------------------------------------------------------------------------------
def _train(out, *extra):
    return train("diffusion", ["--config", "configs/digits_teacher.yaml", "--output_dir", str(out), *TINY, *extra])


def test_train_smoke_saves_a_loadable_pipeline_and_a_pickle_free_checkpoint(tmp_path):
    from pipelines import ClassConditionalPipeline

    out = _train(tmp_path / "run", "--max_train_steps", "3", "--checkpointing_steps", "2", "--report_to", "all")
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 3]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_train_steps"] == 3 and saved["unet_preset"] == "tiny"
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    ckpt = out / "checkpoints" / "checkpoint-3"
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3 and state["format"] == "dcp-safetensors"
    assert state["models"]["unet"]["ema_num_updates"] == 3
    assert state["fingerprint"]["objective"] == "diffusion"
    pipe = ClassConditionalPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert images.shape == (2, 16, 16, 1)


def test_resume_latest_with_no_checkpoint_starts_fresh_and_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        _train(tmp_path / "r", "--max_train_steps", "1", "--resume", "latest")
    assert (tmp_path / "r" / "model_index.json").is_file()
    assert "--resume latest: no checkpoint in" in caplog.text
    with pytest.raises(ValueError, match="does not exist"):
        _train(tmp_path / "r2", "--max_train_steps", "1", "--resume", str(tmp_path / "nope"))


def test_corrupt_missing_and_foreign_checkpoints_are_refused_by_name(tmp_path):
    out = _train(tmp_path / "r", "--max_train_steps", "2", "--checkpointing_steps", "1", "--checkpoints_total_limit",
                 "5")
    root = out / "checkpoints"
    # a save interrupted before its rename leaves a .tmp folder: never picked up
    (root / "checkpoint-9.tmp").mkdir()
    assert CheckpointManager(out).resolve("latest") == root / "checkpoint-2"
    resume2 = ["--max_train_steps", "3", "--resume", str(root / "checkpoint-2")]
    # another objective, another setting
    with pytest.raises(ValueError, match=r"written by the 'diffusion' objective; this run is 'gbm'"):
        train("gbm", ["--config", "configs/gbm_digits.yaml", "--output_dir", str(out), *TINY, *resume2])
    with pytest.raises(ValueError, match=r"another model or setting \(prediction_type='epsilon' there, 'v_prediction'"):
        _train(out, *resume2, "--prediction_type", "v_prediction")
    # corrupt shard (data bytes: safetensors itself would not notice), then a missing one
    shard = next(root.glob("checkpoint-2/*.safetensors"))
    good = bytearray(shard.read_bytes())
    good[-8:] = b"garbage!"
    shard.write_bytes(bytes(good))
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-2.*shard-00001.*is corrupt"):
        _train(out, *resume2)
    shard.unlink()
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-2.*shard-00001.*is missing"):
        _train(out, *resume2)
    # an explicit folder without state.json is incomplete; an unreadable one is named
    (root / "checkpoint-1" / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json is not valid JSON"):
        _train(out, "--max_train_steps", "3", "--resume", str(root / "checkpoint-1"))
    (root / "checkpoint-1" / "state.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        _train(out, "--max_train_steps", "3", "--resume", str(root / "checkpoint-1"))


def test_deepspeed_checkpoint_needs_the_trust_flag(tmp_path):
    out = _train(tmp_path / "r", "--max_train_steps", "1", "--checkpointing_steps", "1")
    state_file = out / "checkpoints" / "checkpoint-1" / "state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "format": "deepspeed"}))
    with pytest.raises(ValueError, match=r"is a DeepSpeed checkpoint; its format unpickles.*"
                                         r"--trust_deepspeed_checkpoint"):
        _train(out, "--max_train_steps", "2", "--resume", "latest")
    with pytest.raises(ValueError, match=r"on 1 process\(es\): it was written by 4 and DeepSpeed's format does not "
                                         "reshard"):
        state_file.write_text(json.dumps({**state, "format": "deepspeed", "world_size": 4}))
        _train(out, "--max_train_steps", "2", "--resume", "latest", "--trust_deepspeed_checkpoint", "true")


def test_output_dir_is_owned_by_one_run(tmp_path):
    out = _train(tmp_path / "r", "--max_train_steps", "1")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=r"is not empty \(it holds checkpoints/, config.yaml.*--resume latest.*"
                                         r"--overwrite_output_dir true"):
        _train(out, "--max_train_steps", "1")
    assert sorted(p.name for p in out.iterdir()) == before  # nothing touched
    _train(out, "--max_train_steps", "1", "--overwrite_output_dir", "true")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == before  # moved, not deleted
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="output_dir .*file' is a file, not a folder"):
        _train(tmp_path / "file", "--max_train_steps", "1")
    with pytest.raises(ValueError, match="cannot be created: .* is a file"):
        _train(tmp_path / "file" / "sub", "--max_train_steps", "1")
    with pytest.raises(ValueError, match="is not writable"):
        _train("/proc/gen-output-test", "--max_train_steps", "1")


def test_keep_last_k(tmp_path):
    out = _train(tmp_path / "r", "--max_train_steps", "4", "--checkpointing_steps", "1",
                 "--checkpoints_total_limit", "2")
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 4]


class _NaN(Objective):
    name = "nan-test"

    def build(self):
        return {"m": Trained(torch.nn.Linear(2, 1), lr=0.1)}

    def loss(self, step, gen, ctx):
        return self.models["m"](torch.full((1, 2), float("nan"))).sum(), {}


def test_nan_loss_is_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0; nothing was saved over the last checkpoint"):
        train(_NaN, ["--output_dir", str(tmp_path / "nan"), "--max_train_steps", "2"])


def test_engine_check_names_both_engines(monkeypatch):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    assert requested_engine({}) == "ddp" and check_engine(acc, {}) == "ddp"
    asked = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert requested_engine(asked) == "fsdp2"
    with pytest.raises(ValueError, match=r"asked for the fsdp2 engine but Accelerate set up ddp .*CPU-only machine"):
        check_engine(acc, asked)
    with pytest.raises(ValueError, match=r"asked for the deepspeed engine but Accelerate set up ddp"):
        check_engine(acc, {"ACCELERATE_USE_DEEPSPEED": "true"})
    with pytest.raises(ValueError, match="FSDP version 1 is not supported"):
        check_engine(acc, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})


def test_ema_update_rule():
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, decay=0.9, warmup=False)
    old = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(m)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(ema.shadow[k], 0.9 * old[k] + 0.1 * v)
    warm = EMA(m, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay"):
        EMA(m, decay=1.0)
    zero3 = torch.nn.Linear(3, 2)
    zero3.weight.data = torch.empty(0)
    zero3.weight.ds_id = 0  # what a ZeRO-3 partitioned parameter looks like outside forward
    with pytest.raises(ValueError, match="ZeRO-3 model would be empty"):
        EMA(zero3, decay=0.9)


def test_folder_dataset_class_names_are_saved_with_the_pipeline(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (16, 16), 80 * i).save(tmp_path / "data" / c / f"{i}.png")
    out = _train(tmp_path / "run", "--dataset", "folder", "--data_dir", str(tmp_path / "data"), "--max_train_steps",
                 "1")
    assert json.loads((out / "model_index.json").read_text())["class_names"] == ["cat", "dog"]


# --- two processes -------------------------------------------------------------------------------------------------
def _two_rank_worker(out_dir):
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a pytest process that already had one
    train("diffusion", ["--config", "configs/digits_teacher.yaml", "--output_dir", out_dir, *TINY,
                        "--max_train_steps", "2", "--checkpointing_steps", "2"])
    state = PartialState()
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps({"num_processes": state.num_processes}))


def test_two_process_training(tmp_path):
    debug_launcher(_two_rank_worker, args=(str(tmp_path / "ddp"),), num_processes=2)
    ranks = sorted((tmp_path / "ddp").glob("rank*.json"))
    assert [p.name for p in ranks] == ["rank0.json", "rank1.json"]
    for p in ranks:
        assert json.loads(p.read_text())["num_processes"] == 2
    assert (tmp_path / "ddp" / "model_index.json").is_file()
    assert [s for s, _ in list_checkpoints(tmp_path / "ddp" / "checkpoints")] == [2]


def test_classifier_script_smoke(tmp_path):
    from gen.models.classifier import DigitsClassifier

    out = train("classifier", ["--config", "configs/digits_classifier.yaml", "--output_dir", str(tmp_path / "clf"),
                               "--max_train_steps", "3", "--train_batch_size", "8", "--channels", "4,8",
                               "--feature_dim", "8"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["n_test"] == 360
    clf = DigitsClassifier.from_pretrained(out)
    assert clf.config.channels in ([4, 8], (4, 8)) and clf(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


def test_train_config_defaults_validate():
    TrainConfig().validate()


def test_shipped_accelerate_configs_and_unknown_engine_keys(tmp_path):
    from gen.training.engine import check_accelerate_config

    names = sorted(p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert names == ["ddp.yaml", "fsdp2.yaml", "zero2.yaml", "zero3.yaml"]
    cfgs = {n: check_accelerate_config(ROOT / "configs" / "accelerate" / n) for n in names}
    assert cfgs["fsdp2.yaml"]["fsdp_config"]["fsdp_version"] == 2
    assert [cfgs[n]["deepspeed_config"]["zero_stage"] for n in ("zero2.yaml", "zero3.yaml")] == [2, 3]
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "accelerate" / "fsdp2.yaml").read_text().replace("fsdp_version",
                                                                                        "fsdp_versoin"))
    with pytest.raises(ValueError, match=r"unknown fsdp_config key 'fsdp_versoin' in .*bad.yaml.*'fsdp_version'"):
        check_accelerate_config(bad)
    bad.write_text("distributed_type: FSDP\nfsdp_configs: {}\n")
    with pytest.raises(ValueError, match="is not a valid accelerate config.*unknown keys"):
        check_accelerate_config(bad)
    # engine settings in a trainer config point to accelerate launch
    with pytest.raises(ValueError, match=r"unknown config key 'fsdp_version'.*chosen by accelerate launch"):
        parse_config(config_class("diffusion"), ["--fsdp_version", "2"])


_KILL9 = """
import os, signal, sys
from gen.training import checkpoint, train

save = checkpoint.CheckpointManager._save_dcp

def save_then_kill(folder, slots, state):
    save(folder, slots, state)
    if state["step"] == 4:  # the shards of checkpoint-4 are written, its state.json and the rename are not
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.CheckpointManager._save_dcp = staticmethod(save_then_kill)
train("diffusion", sys.argv[1:])
"""


def test_kill_9_while_writing_a_checkpoint_loses_nothing(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["--config", "configs/digits_teacher.yaml", *TINY, "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--lr_scheduler", "cosine"]
    straight = _train(tmp_path / "straight", *args[2:])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", _KILL9, *args, "--output_dir", str(killed)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (killed / "checkpoints" / "checkpoint-4.tmp").is_dir()  # the half-written checkpoint
    assert [s for s, _ in list_checkpoints(killed / "checkpoints")] == [2]  # the previous one is intact
    assert [json.loads(x)["step"] for x in (killed / "logs.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    _train(killed, *args[2:], "--resume", "latest")
    assert [s for s, _ in list_checkpoints(killed / "checkpoints")] == [2, 4]
    assert not (killed / "checkpoints" / "checkpoint-4.tmp").exists()
    logs = [json.loads(x) for x in (killed / "logs.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (straight / "logs.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in logs] == [(r["step"], r["loss"]) for r in want]
    a = load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(killed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bench_train_overhead_smoke(tmp_path):
    """eval/bench_train.py as a user runs it (a subprocess): the overhead section on two tiny steps."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "eval" / "bench_train.py"), "--only", "overhead", "--steps", "2", "--block",
           "1", "--batch", "2", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    o = json.loads((tmp_path / "bench_train.json").read_text())["overhead"]
    assert o["steps_each"] == 2 and o["loop_median_s"] > 0 and o["bare_median_s"] > 0 and o["blocks"] == 2
    assert "| loop (median step) | bare PyTorch (median step) |" in (tmp_path / "rows.md").read_text()
