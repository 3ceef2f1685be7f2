"""AlignProp benchmark: reward curve on held-out labels, memory and time against K, and TRL side by side.

    python eval/alignprop.py --out outputs/alignprop --run RUN_DIR     [--only curve|memory|trl]

Parts:
1. ``curve``: the trainer's held-out evaluations (``RUN_DIR/eval.jsonl`` from ``train/alignprop.py``): mean reward
   on held-out labels, FID-digits (500 samples of all labels vs the digits16 test split) and FID-digits against
   the base model's samples of the same labels and noise (the drift), against training steps. Plot + rows.
2. ``memory``: one training step (sample T DDIM steps with gradients, digits-classifier reward, backward, AdamW)
   of the digits teacher with rank-4 LoRA, for K in {1, 5, T} with gradient checkpointing on and off. Each
   configuration runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_`` fixed (freed tensors go back to the
   OS, so RSS tracks live memory). Reported: seconds per step (mean of timed steps after one warm-up), the
   process's peak RSS (``os.wait4`` ru_maxrss), the step's RSS high-water above the pre-step RSS
   (``/proc/self/clear_refs`` reset, then ``VmHWM``; the target measure) and the bytes autograd saves for
   backward (``torch.autograd.graph.saved_tensors_hooks``; excludes checkpoint recomputation).
   On CUDA the worker reports ``torch.cuda.max_memory_allocated`` instead.
3. ``trl``: TRL 0.23.1's ``AlignPropTrainer`` and ours on the same tiny Stable Diffusion folder
   (``gen.models.tiny_sd.build_tiny_sd``), same T, K, batch, CFG, eta, LoRA (r=4, alpha=4, to_q/k/v/out.0),
   AdamW, clipping: seconds per step and the same memory measures, each in its own subprocess.

Writes ``results.json``, ``reward_curve.png`` and ``rows.md`` under ``--out`` (the curve part and the report are
``gen.evaluation.alignprop``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from gen.evaluation import REPO_ROOT as ROOT
from gen.evaluation import output_path
from gen.evaluation.alignprop import SavedBytes, measure_steps, part_curve, report  # noqa: F401

logger = logging.getLogger("eval.alignprop")
PARTS = ("curve", "memory", "trl")
MMAP_THRESHOLD = "131072"


# ---------------------------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------------------------
def worker_ours(spec: dict) -> dict:
    """One configuration of our trainer's step (digits teacher or a Stable Diffusion folder)."""
    from gen.reward import LoraParameters, add_lora, build_reward, check_reward
    from gen.reward import training as alignprop
    from gen.training import parse_config

    torch.manual_seed(0)
    args = ["--config", str(ROOT / spec["config"]), "--output_dir", "/tmp/unused", *spec.get("overrides", [])]
    cfg = parse_config(alignprop.AlignPropConfig, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = alignprop.load_model(cfg)
    alignprop.select_scheduler(cfg, pipe)
    pipe.to(device)
    for name in ("unet", "vae", "text_encoder"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    add_lora(pipe.unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
    reward = build_reward(cfg.rewards).to(device)
    params = list(LoraParameters(pipe.unet).parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    backend = alignprop.make_backend(cfg, pipe, pipe.unet)
    prompts = alignprop.read_prompts(cfg.prompts, cfg.prompt_file)
    trunc = cfg.truncation_spec()
    g = torch.Generator().manual_seed(0)

    def step(saved):
        batch = [prompts[int(i)] for i in torch.randint(0, len(prompts), (cfg.train_batch_size,), generator=g)]
        if saved is not None:
            with saved:
                images, _ = alignprop.generate(cfg, backend, batch, device, g, trunc)
                loss = alignprop.compute_loss(cfg, check_reward(reward(images, batch), len(batch)))
        else:
            images, _ = alignprop.generate(cfg, backend, batch, device, g, trunc)
            loss = alignprop.compute_loss(cfg, check_reward(reward(images, batch), len(batch)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    parts = [getattr(pipe, n) for n in ("unet", "vae", "text_encoder") if getattr(pipe, n, None) is not None]
    return measure_steps(step, spec.get("n_steps", 3), device, [*parts, reward])


def worker_trl(spec: dict) -> dict:
    """TRL 0.23.1 AlignPropTrainer.step on the same Stable Diffusion folder."""
    import random

    from accelerate import PartialState

    PartialState()  # TRL's pipeline code asks for the state before the trainer creates its Accelerator
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    from gen.reward import build_reward

    torch.manual_seed(0)
    random.seed(0)
    s = spec["trl"]
    T, K = s["steps"], s["k"]
    cfg = AlignPropConfig(num_epochs=1000, sample_num_steps=T, sample_eta=s["eta"],
                          sample_guidance_scale=s["guidance_scale"], train_batch_size=s["batch"],
                          train_learning_rate=s["lr"], train_max_grad_norm=s["max_grad_norm"],
                          train_adam_weight_decay=s["weight_decay"], mixed_precision="no",
                          truncated_backprop_rand=False, truncated_backprop_timestep=T - K, log_with=None,
                          save_freq=10 ** 9, logdir=spec["tmp"], project_kwargs={"project_dir": spec["tmp"]})
    pipe = DefaultDDPOStableDiffusionPipeline(spec["sd_folder"], use_lora=True)
    reward = build_reward(s["rewards"])
    prompts = s["prompts"]

    def reward_fn(images, prompts_, metadata):
        return reward(images, list(prompts_)), {}

    def prompt_fn():
        return random.choice(prompts), {}

    trainer = AlignPropTrainer(cfg, reward_fn, prompt_fn, pipe)
    device = trainer.accelerator.device
    state = {"epoch": 0, "gs": 0}

    def step(saved):
        if saved is not None:
            with saved:
                state["gs"] = trainer.step(state["epoch"], state["gs"])
        else:
            state["gs"] = trainer.step(state["epoch"], state["gs"])
        state["epoch"] += 1

    return measure_steps(step, spec.get("n_steps", 3), device, [pipe.unet, pipe.vae, pipe.text_encoder, reward])


def run_worker(spec: dict, threads: int) -> dict:
    """Run one worker spec in a fresh subprocess; add its peak RSS (os.wait4 ru_maxrss)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD,
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec),
                             "--threads", str(threads)], env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec.get('name')} failed ({proc.returncode}):\n{err[-3000:]}")
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["peak_rss_mb"] = max(res.pop("_maxrss_kb") / 1024, res.get("hwm_before_mb", 0))
    return res


# ---------------------------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------------------------
def part_memory(args) -> list[dict]:
    rows = []
    T = args.memory_steps
    for k in sorted({1, min(5, T), T}):
        for ckpt in (True, False):
            spec = {"kind": "ours", "name": f"K={k} ckpt={'on' if ckpt else 'off'}", "config":
                    "configs/alignprop_digits.yaml", "n_steps": args.n_steps,
                    "overrides": ["--num_inference_steps", str(T), "--truncation", "fixed", "--backprop_k", str(k),
                                  "--gradient_checkpointing", str(ckpt).lower(), "--train_batch_size",
                                  str(args.memory_batch)]}
            res = run_worker(spec, args.threads)
            res.update(k=k, checkpointing=ckpt, steps=T, batch=args.memory_batch)
            logger.info("%s: %.3f s/step, step peak RSS %.1f MB, saved %.1f MB, peak RSS %.0f MB", spec["name"],
                        res["s_per_step"], res.get("step_peak_rss_mb", float("nan")), res["saved_tensor_mb"],
                        res["peak_rss_mb"])
            rows.append(res)
    return rows


def _tiny_sd_folder(folder: Path, sample_size: int) -> str:
    from diffusers import StableDiffusionPipeline

    from gen.models.tiny_sd import build_tiny_sd

    parts = build_tiny_sd(0)
    parts["unet"].register_to_config(sample_size=sample_size)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return str(folder)


def part_trl(args) -> list[dict]:
    import tempfile

    try:
        import trl  # noqa: F401
    except ImportError:
        logger.warning("trl is not installed (pip install --no-deps trl==0.23.1): skipping the TRL comparison")
        return []
    tmp = Path(tempfile.mkdtemp(prefix="alignprop_trl_"))
    folder = _tiny_sd_folder(tmp / "tiny_sd", args.trl_latent)
    prompts = ["a photo of a cat", "a photo of a dog"]
    rows = []
    for k in (1, args.trl_steps):
        common = dict(steps=args.trl_steps, k=k, eta=0.0, guidance_scale=5.0, batch=args.trl_batch, lr=1e-3,
                      max_grad_norm=1.0, weight_decay=1e-4, rewards="contrast:1.0", prompts=prompts)
        spec_trl = {"kind": "trl", "name": f"TRL K={k}", "sd_folder": folder, "tmp": str(tmp / f"trl{k}"),
                    "trl": common, "n_steps": args.n_steps}
        spec_ours = {"kind": "ours", "name": f"ours K={k}", "config": "configs/alignprop_sd15.yaml",
                     "n_steps": args.n_steps,
                     "overrides": ["--pretrained_model", folder, "--resolution", "none", "--mixed_precision", "no",
                                   "--num_inference_steps", str(args.trl_steps),
                                   "--truncation", "fixed", "--backprop_k", str(k), "--eta", "0.0",
                                   "--guidance_scale", "5.0", "--train_batch_size", str(args.trl_batch),
                                   "--rewards", "contrast:1.0", "--prompts", ",".join(prompts),
                                   "--lora_rank", "4", "--lora_alpha", "4", "--learning_rate", "1e-3",
                                   "--weight_decay", "1e-4", "--max_grad_norm", "1.0", "--gradient_checkpointing",
                                   "true", "--loss_type", "target", "--reward_target", "10"]}
        spec_ours_nodec = dict(spec_ours, name=f"ours K={k} (decoder not checkpointed, as TRL)",
                               overrides=[*spec_ours["overrides"], "--checkpoint_decoder", "false"])
        for spec, impl in ((spec_trl, "trl"), (spec_ours, "ours"), (spec_ours_nodec, "ours_nodec")):
            reps = []
            for rep in range(args.reps):  # fresh subprocess each time; the best repetition is kept (CPU noise)
                res = run_worker(spec, args.threads)
                logger.info("%s (rep %d): %.3f s/step (median), step peak RSS %.1f MB, peak RSS %.0f MB", spec["name"],
                            rep, res["s_per_step"], res.get("step_peak_rss_mb", float("nan")), res["peak_rss_mb"])
                reps.append(res)
            best = min(reps, key=lambda r: r["s_per_step"])
            best.update(impl=impl, k=k, steps=args.trl_steps, batch=args.trl_batch, image_size=args.trl_latent * 2,
                        reps=[{k2: r.get(k2) for k2 in ("s_per_step", "step_peak_rss_mb", "peak_rss_mb")}
                              for r in reps],
                        min_step_peak_rss_mb=min(r.get("step_peak_rss_mb", float("inf")) for r in reps))
            rows.append(best)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/alignprop")
    p.add_argument("--update_shipped", action="store_true", help="allow --out inside eval/results/ (shipped results)")
    p.add_argument("--run", default="checkpoints/digits-alignprop-lora/run", help="trainer output folder (curve)")
    p.add_argument("--only", choices=PARTS, action="append")
    p.add_argument("--report", action="store_true", help="only rebuild rows.md and the plot from results.json")
    p.add_argument("--memory_steps", type=int, default=10, help="T for the memory part")
    p.add_argument("--memory_batch", type=int, default=8)
    p.add_argument("--trl_steps", type=int, default=10)
    p.add_argument("--trl_batch", type=int, default=2)
    p.add_argument("--trl_latent", type=int, default=16, help="tiny SD latent side (images are 2x)")
    p.add_argument("--n_steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    p.add_argument("--reps", type=int, default=2, help="TRL part: fresh-process repetitions per configuration")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._worker:
        import resource

        spec = json.loads(args._worker)
        res = worker_trl(spec) if spec["kind"] == "trl" else worker_ours(spec)
        res["_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("RESULT " + json.dumps(res), flush=True)
        return res
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = output_path(args.out, args.update_shipped)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if not args.report:
        for part in args.only or PARTS:
            t0 = time.time()
            results[part] = {"curve": part_curve, "memory": part_memory, "trl": part_trl}[part](args)
            logger.info("%s done in %.0f s", part, time.time() - t0)
        results["machine"] = {"platform": platform.platform(), "processor": platform.machine(),
                              "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                              "date": time.strftime("%Y-%m-%d")}
        path.write_text(json.dumps(results, indent=2))
    md = report(results, out)
    print(md)
    return results


if __name__ == "__main__":
    from gen.cli import run_main

    run_main(main)
