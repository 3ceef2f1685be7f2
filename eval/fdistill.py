"""Benchmark f-distill: mode coverage on a 2-D mixture, and the one-step digits student against its teacher.

    python eval/fdistill.py --toy --divergences rkl,fkl,js --out OUT/fdistill_toy.json
    python eval/fdistill.py --digits --student checkpoints/digits-fdistill-js --out eval/results/fdistill/digits.json

``--toy``: for every divergence and seed, ``train/fdistill.py --config configs/fdistill_toy2d.yaml`` distils the
exact score of a Gaussian mixture into a one-step MLP generator (same teacher, budget and initialisation across
divergences). Each student draws ``--num_samples`` points: modes recovered (a mode counts when it holds at least
a quarter of its weight within 3 std of its centre), mass per mode, off-mode mass, sliced Wasserstein-2 and MMD^2
against exact mixture samples. Writes the JSON, a scatter plot and markdown rows next to ``--out``.

``--digits``: FID-digits (against digits16-test) and class accuracy of N one-step samples and of the teacher
with DDIM at ``--teacher_steps``, balanced labels, the same seed; samples per second of each (median of
``--timing_repeats`` timed runs on ``--threads`` torch threads, after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

logger = logging.getLogger("eval.fdistill")
ALIASES = {"fkl": "kl", "forward_kl": "kl", "reverse_kl": "rkl"}


def _machine() -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------------------------
# 1. 2-D mixture
def toy_student_samples(run_dir: Path, n: int, seed: int) -> torch.Tensor:
    from gen.models.mlp import TimeMLP

    info = json.loads((run_dir / "generator" / "one_step.json").read_text())
    gen = TimeMLP.from_pretrained(run_dir / "generator").eval()
    z = torch.randn(n, gen.config.dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return gen(z, torch.full((n,), float(info["generator_timestep"])))


def run_toy(args, out: Path) -> dict:
    from gen.distill import get_divergence
    from gen.distill.toy import mode_statistics
    from gen.metrics.samples import mmd_rbf, sliced_wasserstein
    from gen.training import config_to_dict, parse_config

    trainer = _load_train_script()
    base = parse_config(trainer.FDistillTrainConfig, ["--config", args.toy_config])
    teacher, _ = trainer._toy_teacher(base)
    centres, std = teacher.centres.float(), teacher.std
    ref = teacher.sample(args.num_samples, torch.Generator().manual_seed(10_000))
    ref2 = teacher.sample(args.num_samples, torch.Generator().manual_seed(10_001))
    floor = {"sw2": round(sliced_wasserstein(ref2, ref), 4), "mmd2": round(mmd_rbf(ref2, ref), 5),
             **mode_statistics(ref2, centres, std)}
    rows, samples = [], {}
    runs_dir = out.parent / (out.stem + "_runs")
    for name in args.divergences:
        div = ALIASES.get(name, name)
        get_divergence(div)
        for seed in args.seeds:
            run = runs_dir / f"{div}-seed{seed}"
            argv = ["--config", args.toy_config, "--divergence", div, "--seed", str(seed), "--output_dir", str(run)]
            if args.max_train_steps:
                argv += ["--max_train_steps", str(args.max_train_steps)]
            if not (run / "generator" / "one_step.json").is_file() or args.retrain:
                t0 = time.time()
                trainer.main(argv)
                wall = time.time() - t0
            else:
                wall = None
                logger.info("reusing %s", run)
            x = toy_student_samples(run, args.num_samples, seed + 100)
            stats = mode_statistics(x, centres, std)
            row = {"divergence": div, "seed": seed, "sw2": round(sliced_wasserstein(x, ref), 4),
                   "mmd2": round(mmd_rbf(x, ref), 5), "train_wall_s": None if wall is None else round(wall, 1),
                   **stats}
            rows.append(row)
            samples.setdefault(div, x)
            logger.info("%s seed %d: %d/%d modes, off-mode %.3f, SW2 %.4f", div, seed, row["modes_recovered"],
                        row["num_modes"], row["off_mode_fraction"], row["sw2"])
    summary = {}
    for div in dict.fromkeys(r["divergence"] for r in rows):
        rs = [r for r in rows if r["divergence"] == div]
        summary[div] = {"modes_recovered": [r["modes_recovered"] for r in rs],
                        "mean_modes": round(statistics.mean(r["modes_recovered"] for r in rs), 2),
                        "mean_sw2": round(statistics.mean(r["sw2"] for r in rs), 4),
                        "mean_mass_tv": round(statistics.mean(r["mass_tv"] for r in rs), 4),
                        "mean_off_mode": round(statistics.mean(r["off_mode_fraction"] for r in rs), 4)}
    cfg = config_to_dict(base)
    result = {"config": args.toy_config, "teacher": base.teacher, "toy_std": std, "num_samples": args.num_samples,
              "max_train_steps": args.max_train_steps or base.max_train_steps, "seeds": args.seeds, "rows": rows,
              "summary": summary, "floor_exact_samples": floor, "machine": _machine(),
              "date": time.strftime("%Y-%m-%d"), "trainer_config": cfg}
    result["plot"] = _toy_plot(samples, ref, centres, out.with_suffix(".png"))
    result["markdown"] = toy_rows(result)
    return result


def toy_rows(result: dict) -> str:
    lines = ["| divergence | modes recovered per seed | mean modes | off-mode mass | mass TV | SW2 |",
             "|---|---|---|---|---|---|"]
    for div, s in result["summary"].items():
        lines.append(f"| {div} | {', '.join(str(m) for m in s['modes_recovered'])} | {s['mean_modes']} of "
                     f"{result['rows'][0]['num_modes']} | {s['mean_off_mode']:.3f} | {s['mean_mass_tv']:.3f} | "
                     f"{s['mean_sw2']:.4f} |")
    f = result["floor_exact_samples"]
    lines.append(f"| exact samples (floor) | {f['modes_recovered']} | | {f['off_mode_fraction']:.3f} | "
                 f"{f['mass_tv']:.3f} | {f['sw2']:.4f} |")
    return "\n".join(lines) + "\n"


def _toy_plot(samples: dict, ref, centres, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [("exact mixture", ref)] + [(f"one-step student, {d}", x) for d, x in samples.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.3), squeeze=False)
    lim = float(centres.abs().max()) * 1.5 + 0.5
    for ax, (title, x) in zip(axes[0], panels):
        ax.scatter(x[:2000, 0], x[:2000, 1], s=1.5, alpha=0.5)
        ax.scatter(centres[:, 0], centres[:, 1], s=12, c="red", marker="x")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _load_train_script():
    import importlib.util

    name = "script_train_fdistill"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "train" / "fdistill.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------------------------
# 2. digits
def _timed_samples_per_s(pipe, n: int, steps: int, repeats: int, **kw) -> float:
    labels = torch.arange(n) % 10
    pipe(class_labels=labels[:8], num_inference_steps=steps, output_type="pt", **kw)  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        pipe(class_labels=labels, num_inference_steps=steps, output_type="pt",
             generator=torch.Generator().manual_seed(r), **kw)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def run_digits(args) -> dict:
    from gen.metrics.evaluate import compute_fid_for_images, sample_pipeline_uint8
    from gen.metrics.features import build_feature_extractor
    from pipelines import ClassConditionalPipeline, OneStepPipeline

    extractor = build_feature_extractor("digits")
    student = OneStepPipeline.from_pretrained(args.student)
    teacher = ClassConditionalPipeline.from_pretrained(args.teacher)
    for p in (student, teacher):
        p.set_progress_bar_config(disable=True)
    rows = []

    def measure(name, pipe, steps):
        t0 = time.time()
        images, labels, nfe = sample_pipeline_uint8(pipe, args.num_samples, steps, 1.0, batch_size=args.batch_size,
                                                    seed=args.seed, progress=False)
        wall = time.time() - t0
        res = compute_fid_for_images(images, labels, extractor=extractor, ref="test", progress=False)
        sps = _timed_samples_per_s(pipe, args.timing_batch, steps, args.timing_repeats)
        row = {"model": name, "steps": steps, "nfe": nfe, "fid": round(res["fid"], 3),
               "class_accuracy": round(res["class_accuracy"], 4), "n": res["n"], "samples_per_s": round(sps, 2),
               "sample_wall_s": round(wall, 1)}
        rows.append(row)
        logger.info("%s %d step(s): FID-digits %.2f, accuracy %.1f%%, %.1f samples/s", name, steps, row["fid"],
                    100 * row["class_accuracy"], sps)

    measure("student", student, 1)
    # the student's starting point: the teacher's own one-step x0 estimate from noise at the generator timestep
    init = OneStepPipeline(unet=teacher.unet, scheduler=teacher.scheduler,
                           generator_timestep=student.config.generator_timestep)
    init.set_progress_bar_config(disable=True)
    measure("teacher_x0", init, 1)
    for steps in args.teacher_steps:
        measure("teacher", teacher, steps)
    s = rows[0]
    t50 = next((r for r in rows if r["model"] == "teacher" and r["steps"] == max(args.teacher_steps)), None)
    t1 = next((r for r in rows if r["model"] == "teacher" and r["steps"] == 1), None)
    targets = {}
    if t50:
        targets["fid_ratio_vs_teacher_max_steps"] = round(s["fid"] / t50["fid"], 3)
        targets["speedup_vs_teacher_max_steps"] = round(s["samples_per_s"] / t50["samples_per_s"], 1)
    if t1:
        targets["fid_ratio_vs_teacher_1_step"] = round(s["fid"] / t1["fid"], 3)
    result = {"student": _rel(args.student), "teacher": _rel(args.teacher), "num_samples": args.num_samples,
              "seed": args.seed, "rows": rows, "targets": targets, "machine": _machine(),
              "date": time.strftime("%Y-%m-%d")}
    out_dir = Path(args.out).parent
    result["grid"] = side_by_side(student, teacher, out_dir / "fdistill_vs_teacher.png", args.seed,
                                  max(args.teacher_steps))
    result["plot"] = _digits_plot(rows, out_dir / "fdistill_fid_vs_nfe.png")
    result["markdown"] = digits_rows(result)
    return result


def _rel(p) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def digits_rows(result: dict) -> str:
    lines = ["| model | steps (NFE) | FID-digits | class accuracy | samples / s |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        name = {"student": "one-step f-distill student", "teacher_x0": "teacher's one-step x0 estimate (student init)",
                "teacher": "teacher, DDIM"}[r["model"]]
        lines.append(f"| {name} | {r['steps']} ({r['nfe']}) | {r['fid']:.2f} | {100 * r['class_accuracy']:.1f} % | "
                     f"{r['samples_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def side_by_side(student, teacher, path: Path, seed: int, teacher_steps: int) -> str:
    from gen.data.images import save_grid
    from pipelines import OneStepPipeline

    labels = torch.arange(10).repeat_interleave(6)
    a = student(class_labels=labels, output_type="pt", generator=torch.Generator().manual_seed(seed)).images
    b = teacher(class_labels=labels, num_inference_steps=teacher_steps, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images
    init = OneStepPipeline(unet=teacher.unet, scheduler=teacher.scheduler,
                           generator_timestep=student.config.generator_timestep)
    init.set_progress_bar_config(disable=True)
    c = init(class_labels=labels, output_type="pt", generator=torch.Generator().manual_seed(seed)).images
    # per class: 6 student samples | 6 teacher samples at teacher_steps | the teacher's one-step x0 (student init)
    rows = [torch.cat([a[i * 6:(i + 1) * 6], b[i * 6:(i + 1) * 6], c[i * 6:(i + 1) * 6]]) for i in range(10)]
    return str(save_grid(torch.cat(rows) * 2 - 1, path, nrow=18, upscale=4))


def _digits_plot(rows, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    t = sorted((r["nfe"], r["fid"]) for r in rows if r["model"] == "teacher")
    ax.plot(*zip(*t), marker="o", label="teacher (DDIM)")
    s = rows[0]
    ax.scatter([s["nfe"]], [s["fid"]], color="red", zorder=3, label="one-step f-distill (JS) student")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("FID-digits (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
def demo_section(out: Path, args) -> dict:
    """`make demo`: one-step samples of the shipped f-distill student beside the teacher's (50 DDIM steps) and the
    teacher's own one-step x0 estimate (the student's starting point)."""
    from pipelines import ClassConditionalPipeline, OneStepPipeline

    t0 = time.time()
    student = OneStepPipeline.from_pretrained(ROOT / "checkpoints" / "digits-fdistill-js")
    teacher = ClassConditionalPipeline.from_pretrained(ROOT / "checkpoints" / "digits-teacher")
    for p in (student, teacher):
        p.set_progress_bar_config(disable=True)
    path = side_by_side(student, teacher, out / "fdistill_vs_teacher.png", args.seed, 50)
    labels = torch.arange(10).repeat_interleave(10)
    t1 = time.perf_counter()
    student(class_labels=labels, output_type="pt", generator=torch.Generator().manual_seed(args.seed))
    one = time.perf_counter() - t1
    t1 = time.perf_counter()
    teacher(class_labels=labels, num_inference_steps=50, output_type="pt",
            generator=torch.Generator().manual_seed(args.seed))
    fifty = time.perf_counter() - t1
    logger.info("wrote %s (per class: 6 one-step student samples | 6 teacher samples at 50 DDIM steps | 6 one-step "
                "x0 estimates of the teacher, the student's start); 100 samples: student %.2f s, teacher 50 steps "
                "%.2f s (%.0fx)", path, one, fifty, fifty / one)
    return {"grid": str(path), "student_s_per_100": round(one, 3), "teacher50_s_per_100": round(fifty, 3),
            "wall_time_s": round(time.time() - t0, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="2-D mixture: mode coverage per divergence")
    p.add_argument("--digits", action="store_true", help="digits student against the teacher")
    p.add_argument("--out", required=True, help="JSON file to write (plots go next to it)")
    p.add_argument("--divergences", default="rkl,fkl,js", help="comma-separated (toy)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (toy)")
    p.add_argument("--toy_config", default=str(ROOT / "configs" / "fdistill_toy2d.yaml"))
    p.add_argument("--max_train_steps", type=int, default=None, help="toy: override the config's budget")
    p.add_argument("--retrain", action="store_true", help="toy: retrain even if a run folder exists")
    p.add_argument("--num_samples", type=int, default=None, help="toy: 5000; digits: 300")
    p.add_argument("--student", default="checkpoints/digits-fdistill-js")
    p.add_argument("--teacher", default="checkpoints/digits-teacher")
    p.add_argument("--teacher_steps", default="1,4,10,50")
    p.add_argument("--batch_size", type=int, default=300)
    p.add_argument("--timing_batch", type=int, default=100)
    p.add_argument("--timing_repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    if args.toy == args.digits:
        p.error("give exactly one of --toy or --digits")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.divergences = [d.strip() for d in args.divergences.split(",") if d.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.teacher_steps = [int(s) for s in args.teacher_steps.split(",") if s.strip()]
    for key in ("student", "teacher"):
        value = getattr(args, key)
        if not Path(value).exists() and (ROOT / value).exists():
            setattr(args, key, str(ROOT / value))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.toy:
        args.num_samples = args.num_samples or 5000
        result = run_toy(args, out)
    else:
        args.num_samples = args.num_samples or 300
        result = run_digits(args)
    out.write_text(json.dumps(result, indent=2))
    print(result["markdown"])
    return result


if __name__ == "__main__":
    from gen.cli import run_main

    run_main(main)
