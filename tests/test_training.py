"""gen.training and train/*.py: configs, 2-process training, exact resume, atomic checkpoints, EMA, NaN handling."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import debug_launcher
from safetensors.torch import load_file

from gen.training import EMA, CheckpointManager, TrainLoop, list_checkpoints, parse_config
from tests.conftest import load_script

TINY = ["--unet_preset", "tiny", "--train_batch_size", "4", "--log_every", "1", "--ema_decay", "0.9"]


def _yaml(tmp_path, **kv):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(kv))
    return str(p)


# --- configs -------------------------------------------------------------------------------------------------------
def test_config_yaml_then_cli_overrides(tmp_path):
    cfg_cls = load_script("train/diffusion.py").DiffusionTrainConfig
    cfg = parse_config(cfg_cls, ["--config", _yaml(tmp_path, learning_rate=0.01, max_train_steps=7),
                                 "--max_train_steps", "3", "--random_flip=true"])
    assert cfg.max_train_steps == 3 and cfg.learning_rate == 0.01 and cfg.random_flip is True


def test_config_errors_name_the_key(tmp_path):
    cls = load_script("train/diffusion.py").DiffusionTrainConfig
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


# --- the trainer end to end ----------------------------------------------------------------------------------------
def _train(out, *extra):
    return load_script("train/diffusion.py").main(["--config", "configs/digits_teacher.yaml", "--output_dir", str(out),
                                                   *TINY, *extra])


def test_train_smoke_saves_a_loadable_pipeline(tmp_path):
    from pipelines import ClassConditionalPipeline

    out = _train(tmp_path / "run", "--max_train_steps", "3", "--checkpointing_steps", "2")
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2, 3]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_train_steps"] == 3 and saved["unet_preset"] == "tiny"
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    pipe = ClassConditionalPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert images.shape == (2, 16, 16, 1)


class _Killed(Exception):
    pass


def test_resume_continues_exactly(tmp_path, monkeypatch):
    """Kill after the step-4 checkpoint, resume with --resume latest: the result equals an uninterrupted run, so the
    step counter, optimizer state (Adam moments), LR schedule, EMA and data order all continued."""
    args = ("--max_train_steps", "6", "--checkpointing_steps", "2", "--lr_scheduler", "cosine")
    _train(tmp_path / "straight", *args)

    orig_save = TrainLoop.save

    def save_then_die(self):
        path = orig_save(self)
        if self.step == 4:
            raise _Killed
        return path

    monkeypatch.setattr(TrainLoop, "save", save_then_die)
    with pytest.raises(_Killed):
        _train(tmp_path / "resumed", *args)
    monkeypatch.setattr(TrainLoop, "save", orig_save)
    ckpts = list_checkpoints(tmp_path / "resumed" / "checkpoints")
    assert [s for s, _ in ckpts] == [2, 4]
    opt_state = torch.load(ckpts[-1][1] / "optimizer.pt", weights_only=True)
    assert int(next(iter(opt_state["state"].values()))["step"]) == 4

    _train(tmp_path / "resumed", *args, "--resume", "latest")
    logs = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "logs.jsonl").read_text().splitlines()]
    assert logs == [1, 2, 3, 4, 5, 6]
    a = load_file(str(next((tmp_path / "straight" / "unet").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "resumed" / "unet").glob("*.safetensors"))))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    opt_b = torch.load(tmp_path / "resumed" / "checkpoints" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    opt_a = torch.load(tmp_path / "straight" / "checkpoints" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    for sa, sb in zip(opt_a["state"].values(), opt_b["state"].values()):
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=0, atol=1e-9)


def test_resume_latest_with_no_checkpoint_starts_fresh_and_bad_paths_fail(tmp_path):
    _train(tmp_path / "r", "--max_train_steps", "1", "--resume", "latest")
    assert (tmp_path / "r" / "model_index.json").is_file()
    with pytest.raises(ValueError, match="does not exist"):
        _train(tmp_path / "r2", "--max_train_steps", "1", "--resume", str(tmp_path / "nope"))


def test_partial_and_corrupt_checkpoints(tmp_path):
    out = _train(tmp_path / "r", "--max_train_steps", "2", "--checkpointing_steps", "1",
                 "--checkpoints_total_limit", "5")
    root = out / "checkpoints"
    # a save interrupted before its rename leaves a .tmp folder: never picked up
    (root / "checkpoint-9.tmp").mkdir()
    assert CheckpointManager(out).resolve("latest") == root / "checkpoint-2"
    # corrupt weights: a ValueError naming the checkpoint
    (root / "checkpoint-2" / "unet.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-2"):
        _train(tmp_path / "r", "--max_train_steps", "3", "--resume", "latest")
    # an explicit folder without state.json is incomplete
    (root / "checkpoint-1" / "state.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        _train(tmp_path / "r", "--max_train_steps", "3", "--resume", str(root / "checkpoint-1"))


def test_keep_last_k(tmp_path):
    out = _train(tmp_path / "r", "--max_train_steps", "4", "--checkpointing_steps", "1",
                 "--checkpoints_total_limit", "2")
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [3, 4]


def test_nan_loss_is_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        _nan_run(tmp_path)


def _nan_run(tmp_path):
    from accelerate import Accelerator

    from gen.training import TrainConfig

    cfg = TrainConfig(output_dir=str(tmp_path / "nan"), max_train_steps=2)
    model = torch.nn.Linear(2, 1)
    loop = TrainLoop(cfg, Accelerator(cpu=True), {"m": model}, torch.optim.SGD(model.parameters(), lr=0.1))
    loop.run(lambda step, gen: (model(torch.full((1, 2), float("nan"))).sum(), {}))


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


# --- two processes -------------------------------------------------------------------------------------------------
def _two_rank_worker(out_dir):
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a pytest process that already had one

    load_script("train/diffusion.py").main(["--config", "configs/digits_teacher.yaml", "--output_dir", out_dir,
                                            *TINY, "--max_train_steps", "2", "--checkpointing_steps", "2"])
    state = PartialState()
    Path(out_dir, f"rank{state.process_index}.json").write_text(json.dumps({"num_processes": state.num_processes}))


def test_two_process_training(tmp_path):
    os.chdir(Path(__file__).resolve().parents[1])
    debug_launcher(_two_rank_worker, args=(str(tmp_path / "ddp"),), num_processes=2)
    ranks = sorted((tmp_path / "ddp").glob("rank*.json"))
    assert [p.name for p in ranks] == ["rank0.json", "rank1.json"]
    for p in ranks:
        assert json.loads(p.read_text())["num_processes"] == 2
    assert (tmp_path / "ddp" / "model_index.json").is_file()
    assert [s for s, _ in list_checkpoints(tmp_path / "ddp" / "checkpoints")] == [2]


def test_classifier_script_smoke(tmp_path):
    from gen.models.classifier import DigitsClassifier

    out = load_script("train/classifier.py").main(["--config", "configs/digits_classifier.yaml", "--output_dir",
                                                  str(tmp_path / "clf"), "--max_train_steps", "3",
                                                  "--train_batch_size", "8", "--channels", "4,8", "--feature_dim", "8"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["n_test"] == 360
    clf = DigitsClassifier.from_pretrained(out)
    assert clf.config.channels in ([4, 8], (4, 8)) and clf(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
