"""What every trainer produces with a fixed seed and a few steps, kept as a regression test of the training loop.

Recorded with the trainers as they were before the one training loop (issue 14); ``tests/test_training_regression.py``
runs each case again and checks the per-step losses and a hash of the exported weights bit for bit. A case whose
output changes on purpose is re-recorded with

    python -m tests.regression.training_cases --write NAME [NAME ...]

and the reason goes into BENCHMARKS.md ("Training loop: intended changes").
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = Path(__file__).with_name("training_expected.json")
LOSS_KEYS = ("loss", "loss_dsm", "loss_d", "loss_dm", "loss_gan", "loss_student", "reward", "grad_norm",
             "grad_norm_critic", "grad_norm_student")


def _tiny_teacher(folder: Path, attention: bool = False) -> str:
    from diffusers import DDIMScheduler

    from gen.models.unet import digits_unet, tiny_unet
    from pipelines import ClassConditionalPipeline

    torch.manual_seed(0)
    if attention:
        unet = digits_unet(block_out_channels=(8, 16), layers_per_block=1, down_block_types=(
            "DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
            attention_head_dim=8)
    else:
        unet = tiny_unet()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                          set_alpha_to_one=True)
    ClassConditionalPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return str(folder)


IMG = ["--unet_preset", "tiny", "--log_every", "1", "--checkpointing_steps", "2"]

# name -> (trainer, argv builder(tmp folder) without --output_dir)
CASES = {
    "diffusion": ("diffusion", lambda tmp: [
        "--config", "configs/digits_teacher.yaml", *IMG, "--train_batch_size", "4", "--max_train_steps", "3",
        "--gradient_accumulation_steps", "2", "--ema_decay", "0.9", "--lr_warmup_steps", "1"]),
    "classifier": ("classifier", lambda tmp: [
        "--config", "configs/digits_classifier.yaml", "--max_train_steps", "3", "--train_batch_size", "8",
        "--channels", "4,8", "--feature_dim", "8", "--log_every", "1", "--lr_warmup_steps", "1",
        "--checkpointing_steps", "2"]),
    "gbm": ("gbm", lambda tmp: [
        "--config", "configs/gbm_digits.yaml", *IMG, "--train_batch_size", "4", "--max_train_steps", "3"]),
    "interpolant_digits": ("interpolant", lambda tmp: [
        "--config", "configs/interpolant_digits.yaml", *IMG, "--train_batch_size", "4", "--max_train_steps", "2",
        "--ema_decay", "0.9"]),
    "interpolant_bridge": ("interpolant", lambda tmp: [
        "--config", "configs/interpolant_bridge_digits.yaml", *IMG, "--train_batch_size", "4",
        "--max_train_steps", "2"]),
    "interpolant_toy": ("interpolant", lambda tmp: [
        "--config", "configs/interpolant_8gaussians.yaml", "--max_train_steps", "3", "--mlp_hidden", "16",
        "--mlp_depth", "1", "--train_batch_size", "8", "--log_every", "1", "--max_grad_norm", "1.0",
        "--checkpointing_steps", "2"]),
    "fdistill_digits": ("fdistill", lambda tmp: [
        "--config", "configs/fdistill_digits.yaml", "--teacher", _tiny_teacher(tmp / "teacher"),
        "--train_batch_size", "4", "--log_every", "1", "--student_update_freq", "2", "--checkpointing_steps", "2",
        "--disc_hidden", "16", "--ema_decay", "0.9", "--max_train_steps", "4"]),
    "fdistill_toy": ("fdistill", lambda tmp: [
        "--config", "configs/fdistill_toy2d.yaml", "--max_train_steps", "4", "--fake_init_steps", "2",
        "--train_batch_size", "16", "--checkpointing_steps", "2", "--toy_hidden", "16", "--disc_hidden", "16",
        "--log_every", "1"]),
    "alignprop_digits": ("alignprop", lambda tmp: [
        "--config", "configs/alignprop_digits.yaml", "--pretrained_model", _tiny_teacher(tmp / "teacher", True),
        "--num_inference_steps", "3", "--backprop_k_max", "3", "--train_batch_size", "2", "--eval_prompts", "",
        "--fid_num_samples", "0", "--log_every", "1", "--checkpointing_steps", "2", "--max_train_steps", "2"]),
}


def run_trainer(trainer: str, argv: list[str]) -> Path:
    """Run ``train/<trainer>.py``'s main with ``argv`` through the public entry point of ``gen``."""
    from gen.training import train

    return train(trainer, argv)


def weights_digest(out: Path) -> dict:
    """sha256 over every exported ``.safetensors`` tensor (sorted file and key order) and a few float64 sums."""
    from safetensors.torch import load_file

    files = sorted(p for p in out.rglob("*.safetensors") if "checkpoints" not in p.relative_to(out).parts)
    h, sums = hashlib.sha256(), {}
    for f in files:
        sd = load_file(str(f))
        for k in sorted(sd):
            t = sd[k].contiguous()
            h.update(f"{f.relative_to(out)}:{k}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        sums[str(f.relative_to(out))] = float(sum(v.double().sum() for v in sd.values()))
    return {"sha256": h.hexdigest(), "sums": sums}


class Killed(Exception):
    """Raised in place of a kill, right after a checkpoint was written."""


@contextlib.contextmanager
def die_after_checkpoint(step: int):
    """Inside this block a run raises :class:`Killed` right after writing ``checkpoint-<step>``."""
    from gen.training import TrainLoop

    save = TrainLoop.save

    def save_then_die(self):
        path = save(self)
        if self.step == step:
            raise Killed(path)
        return path

    TrainLoop.save = save_then_die
    try:
        yield
    finally:
        TrainLoop.save = save


def run_case(name: str, kill_at: int | None = None) -> dict:
    """``{"losses": [{key: value} per logged step], "weights": weights_digest}`` of one case.

    With ``kill_at``, the run dies right after writing ``checkpoint-<kill_at>`` and is started again with
    ``--resume latest``: the result must equal the uninterrupted run's.
    """
    import os

    trainer, argv = CASES[name]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            args = [*argv(tmp), "--output_dir", str(tmp / "run")]
            if kill_at is not None:
                try:
                    with die_after_checkpoint(kill_at):
                        run_trainer(trainer, args)
                    raise AssertionError(f"{name}: the run was not killed at step {kill_at}")
                except Killed:
                    pass
                args += ["--resume", "latest"]
            out = run_trainer(trainer, args)
            logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
            losses = [{"step": r["step"], **{k: r[k] for k in LOSS_KEYS if k in r}} for r in logs]
            return {"losses": losses, "weights": weights_digest(out)}
    finally:
        os.chdir(cwd)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", nargs="*", metavar="NAME", help="record these cases (none given: all)")
    args = parser.parse_args(argv)
    names = args.write or sorted(CASES)
    data = json.loads(EXPECTED.read_text()) if EXPECTED.is_file() else {}
    for name in names:
        data[name] = run_case(name)
        print(name, data[name]["weights"]["sha256"][:16])
    EXPECTED.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
