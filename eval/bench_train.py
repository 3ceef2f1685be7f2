"""Benchmarks of the one training loop (issue 14 targets).

    python eval/bench_train.py --out outputs/bench_train [--only overhead|engines] [--steps 40] [--repeats 2]

1. ``overhead``: the loop's step time against a bare PyTorch loop doing the same maths on a twin network (the
   digits teacher's UNet and batch, AdamW, global-norm clipping, EMA, the same seeded batches and noise), in one
   process, interleaved: every ``--block`` loop steps, ``--block`` bare steps run. Target: overhead <= 3 %.
2. ``engines``: per-rank step time and peak RSS under FSDP2 against DDP on 2 CPU gloo ranks (``torchrun``), for the
   digits teacher and for f-distill on tiny Stable Diffusion components; DDP and FSDP2 runs alternate. On a
   CPU-only machine FSDP2 needs the test-only shim ``tests/_fsdp_shim.py`` (Accelerate enables FSDP only on
   accelerators), so the workers get the repository root on their PYTHONPATH.

Writes ``<out>/bench_train.json`` and ``<out>/rows.md`` (rows for BENCHMARKS.md, with command, machine and date).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench_train")


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}, load average {load}"


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------------------------------------------
# 1. loop overhead
def overhead(args) -> dict:
    """Median step time of the loop and of a bare loop with the same maths, interleaved in blocks."""
    import copy

    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler

    from gen.diffusion import from_x0_eps
    from gen.training import TrainLoop, draw_batch, make_accelerator, parse_config, step_generator
    from gen.training.objectives import DiffusionObjective, drop_labels

    out = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    cfg = parse_config(DiffusionObjective.config_class, [
        "--config", str(ROOT / "configs/digits_teacher.yaml"), "--output_dir", str(out / "run"),
        "--max_train_steps", str(args.steps + args.block + 1), "--train_batch_size", str(args.batch),
        "--checkpointing_steps", "100000", "--log_every", "100000", "--lr_warmup_steps", "10"])
    loop_times, bare_times, ratios = [], [], []

    class Timed(DiffusionObjective):
        def build(self):
            trained = super().build()
            self.twin = copy.deepcopy(trained["unet"].module)  # same initial weights
            return trained

        def on_train_start(self, step):
            p = [q for q in self.twin.parameters() if q.requires_grad]
            self.bare_opt = torch.optim.AdamW(p, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                              weight_decay=cfg.weight_decay)
            self.bare_sched = get_scheduler(cfg.lr_scheduler, self.bare_opt, num_warmup_steps=cfg.lr_warmup_steps,
                                            num_training_steps=cfg.max_train_steps)
            self.bare_params = p
            self.bare_ema = {k: v.detach().clone().float() for k, v in self.twin.state_dict().items()
                             if v.is_floating_point()}
            self.bare_step, self.last = 0, time.perf_counter()

        def bare(self):
            """The same maths as DiffusionObjective.loss + AdamW + clipping + EMA, written out by hand."""
            g = step_generator(cfg.seed, self.bare_step, 0, 0)
            abar = self.noise_sched.alphas_cumprod
            batch = draw_batch(self.dataset, cfg.train_batch_size, g)
            x0 = batch["images"]
            t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            alpha, sigma = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
            labels = drop_labels(batch["class_labels"].long(), cfg.label_dropout, self.num_classes, g)
            pred = self.twin(alpha * x0 + sigma * eps, t, class_labels=labels).sample
            loss = F.mse_loss(pred.float(), from_x0_eps(x0, eps, cfg.prediction_type, alpha, sigma).float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.bare_params, cfg.max_grad_norm)
            self.bare_opt.step()
            self.bare_sched.step()
            self.bare_opt.zero_grad(set_to_none=True)
            n = self.bare_step
            d = min(cfg.ema_decay, (1 + n) / (10 + n))
            with torch.no_grad():
                for k, v in self.twin.state_dict().items():
                    if k in self.bare_ema:
                        self.bare_ema[k].lerp_(v.float(), 1 - d)
            self.bare_step += 1
            return float(loss.detach())

        def on_step_end(self, step):
            now = time.perf_counter()
            if step == cfg.max_train_steps:  # the last step also writes the final checkpoint: not timed
                return
            if step > args.block:  # the first block warms up both
                loop_times.append(now - self.last)
            if step % args.block == 0:
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    self.bare()
                    if step > args.block:
                        bare_times.append(time.perf_counter() - t0)
                if step > args.block:  # this block of loop steps against the bare block right after it
                    k = args.block
                    ratios.append(sum(loop_times[-k:]) / sum(bare_times[-k:]))
            self.last = time.perf_counter()

        def export(self, models, out_dir):
            pass

    acc = make_accelerator(cfg)
    TrainLoop(cfg, acc, Timed(cfg, acc)).run()
    ml, mb = statistics.median(loop_times), statistics.median(bare_times)
    res = {"model": "digits teacher UNet (digits preset, 1.6M params)", "batch": args.batch,
           "steps_each": len(loop_times), "block": args.block, "loop_median_s": ml, "bare_median_s": mb,
           "loop_mean_s": statistics.mean(loop_times), "bare_mean_s": statistics.mean(bare_times),
           "overhead_median_pct": 100 * (ml / mb - 1),
           "overhead_mean_pct": 100 * (statistics.mean(loop_times) / statistics.mean(bare_times) - 1),
           "overhead_paired_blocks_pct": 100 * (statistics.median(ratios) - 1),
           "paired_blocks_quartiles_pct": [100 * (q - 1) for q in statistics.quantiles(ratios, n=4)]
           if len(ratios) > 1 else None, "blocks": len(ratios)}
    logger.info("loop %.4f s/step, bare %.4f s/step: overhead %.2f %% (median), %.2f %% (mean), %.2f %% (median of "
                "%d paired blocks)", ml, mb, res["overhead_median_pct"], res["overhead_mean_pct"],
                res["overhead_paired_blocks_pct"], len(ratios))
    return res


# ---------------------------------------------------------------------------------------------------------------
# 2. engines: one torchrun worker per (model, engine)
def _tiny_sd_assets(folder: Path) -> dict:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from gen.models.tiny_sd import build_tiny_sd

    sd = StableDiffusionPipeline(**build_tiny_sd(), safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.save_pretrained(folder / "sd")
    side = sd.unet.config.sample_size * sd.vae_scale_factor
    (folder / "imgs").mkdir(exist_ok=True)
    for i in range(16):
        Image.new("RGB", (side, side), (15 * i, 40, 200 - 10 * i)).save(folder / "imgs" / f"{i}.png")
    (folder / "prompts.txt").write_text("a photo of a cat\na dog\nthe cat\n")
    return {"teacher": str(folder / "sd"), "data_dir": str(folder / "imgs"), "prompts": str(folder / "prompts.txt")}


def engine_argv(model: str, steps: int, out: str, assets: dict) -> tuple[str, list[str]]:
    common = ["--output_dir", out, "--max_train_steps", str(steps), "--checkpointing_steps", str(10 * steps),
              "--log_every", str(steps)]
    if model == "digits_teacher":
        return "diffusion", ["--config", str(ROOT / "configs/digits_teacher.yaml"), "--train_batch_size", "32",
                             *common]
    return "fdistill", ["--config", str(ROOT / "configs/fdistill_digits.yaml"), "--teacher", assets["teacher"],
                        "--dataset", "folder", "--data_dir", assets["data_dir"], "--prompts_file", assets["prompts"],
                        "--train_batch_size", "8", "--student_update_freq", "2", "--disc_hidden", "32",
                        "--checkpointing_steps", str(10 * steps), "--output_dir", out, "--max_train_steps",
                        str(steps), "--log_every", str(steps)]


def worker(spec_file: str) -> None:
    """One rank of an engine run (started by torchrun): train, time every iteration, record peak RSS."""
    spec = json.loads(Path(spec_file).read_text())
    from gen.training import TrainLoop, check_engine, make_accelerator, objective_class, parse_config

    cls = objective_class(spec["trainer"])
    cfg = parse_config(cls.config_class, spec["argv"])
    if spec["engine"] == "fsdp2":
        from tests._fsdp_shim import FSDP2_ENV, fsdp2_accelerator  # CPU only: see the module docstring

        os.environ.update(FSDP2_ENV)
        acc = fsdp2_accelerator(cfg) if not torch.cuda.is_available() else make_accelerator(cfg)
    else:
        acc = make_accelerator(cfg)
    engine = check_engine(acc)
    stamps = []

    class Timed(cls):
        def on_step_end(self, step):
            super().on_step_end(step)
            stamps.append(time.perf_counter())

    rss_start = _status_mb("VmRSS")
    loop = TrainLoop(cfg, acc, Timed(cfg, acc))
    rss_built = _status_mb("VmRSS")
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                for s in loop.slots.values() for p in s.model.parameters())
    t0 = time.perf_counter()
    loop.run()
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps)][spec["warmup"]:]
    res = {"engine": engine, "rank": acc.process_index, "world": acc.num_processes,
           "step_median_s": statistics.median(times), "step_mean_s": statistics.mean(times), "n_steps": len(times),
           "rss_start_mb": rss_start, "rss_after_prepare_mb": rss_built, "peak_rss_mb": _status_mb("VmHWM"),
           "local_param_numel": local}
    Path(spec["result"].format(rank=acc.process_index)).write_text(json.dumps(res))


def engines(args) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    assets = _tiny_sd_assets(tmp) if "fdistill_tiny_sd" in args.models else {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    rows = []
    for rep in range(args.repeats):
        for model in args.models:
            for engine in ("ddp", "fsdp2"):
                name = f"{model}-{engine}-{rep}"
                trainer, argv = engine_argv(model, args.engine_steps, str(tmp / name), assets)
                spec = {"trainer": trainer, "argv": argv, "engine": engine, "warmup": 2,
                        "result": str(tmp / (name + "-rank{rank}.json"))}
                (tmp / (name + ".json")).write_text(json.dumps(spec))
                cmd = [torchrun, "--standalone", "--nproc_per_node", "2", __file__, "--worker", str(tmp / (name +
                                                                                                      ".json"))]
                t0 = time.time()
                proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
                for rank in (0, 1):
                    r = json.loads(Path(spec["result"].format(rank=rank)).read_text())
                    rows.append({"model": model, "repeat": rep, "wall_s": round(time.time() - t0, 1), **r})
                    logger.info("%s rank %d: %.3f s/step, peak RSS %.0f MB (%.0f MB after prepare), %d local "
                                "params", name, rank, r["step_median_s"], r["peak_rss_mb"], r["rss_after_prepare_mb"],
                                r["local_param_numel"])
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for engine in ("ddp", "fsdp2"):
            rs = [r for r in rows if r["model"] == model and r["engine"] == engine]
            out.append({"model": model, "engine": engine,
                        "step_median_s": statistics.median(r["step_median_s"] for r in rs),
                        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                        "rss_after_prepare_mb": statistics.median(r["rss_after_prepare_mb"] for r in rs),
                        "local_param_numel": rs[0]["local_param_numel"], "runs": len(rs)})
    return out


def markdown(res: dict) -> str:
    lines = [f"Command: `{res['command']}`; machine: {res['machine']}; date: {res['date']}.", ""]
    if "overhead" in res:
        o = res["overhead"]
        q = o["paired_blocks_quartiles_pct"] or [float("nan")] * 3
        lines += ["| loop (median step) | bare PyTorch (median step) | overhead: medians | overhead: means | "
                  "overhead: median of paired blocks [quartiles] | steps each | batch |",
                  "|---|---|---|---|---|---|---|",
                  f"| {o['loop_median_s'] * 1e3:.1f} ms | {o['bare_median_s'] * 1e3:.1f} ms | "
                  f"{o['overhead_median_pct']:+.2f} % | {o['overhead_mean_pct']:+.2f} % | "
                  f"{o['overhead_paired_blocks_pct']:+.2f} % [{q[0]:+.1f}, {q[2]:+.1f}] | {o['steps_each']} | "
                  f"{o['batch']} |", ""]
    if "engines_summary" in res:
        lines += ["| model | engine | step / rank (median) | peak RSS / rank | RSS after prepare | params on rank | "
                  "fp32 weights+grads+Adam on rank (counted) |", "|---|---|---|---|---|---|---|"]
        for r in res["engines_summary"]:
            lines.append(f"| {r['model']} | {r['engine']} | {r['step_median_s'] * 1e3:.0f} ms | "
                         f"{r['peak_rss_mb']:.0f} MB | {r['rss_after_prepare_mb']:.0f} MB | "
                         f"{r['local_param_numel'] / 1e6:.3f}M | {r['local_param_numel'] * 16 / 2 ** 20:.1f} MB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/bench_train")
    parser.add_argument("--only", choices=("overhead", "engines"))
    parser.add_argument("--steps", type=int, default=40, help="overhead: timed steps of each loop")
    parser.add_argument("--block", type=int, default=5, help="overhead: steps per interleaved block")
    parser.add_argument("--batch", type=int, default=32, help="overhead: batch size")
    parser.add_argument("--engine_steps", type=int, default=12, help="engines: iterations per run")
    parser.add_argument("--repeats", type=int, default=2, help="engines: DDP/FSDP2 pairs per model")
    parser.add_argument("--models", default="digits_teacher,fdistill_tiny_sd")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    res = {"command": "python eval/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    if args.only in (None, "overhead"):
        res["overhead"] = overhead(args)
    if args.only in (None, "engines"):
        res["engines"] = engines(args)
        res["engines_summary"] = summarize(res["engines"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps(res, indent=1))
    (out / "rows.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
