"""Benchmark f-distill (``eval/fdistill.py``): mode coverage on a 2-D mixture, and one-step digits students against
their teacher.

Modes (exactly one):

- ``toy``: for every divergence of ``divergences`` and training seed of ``seeds``, ``train/fdistill.py --config
  <toy_config>`` (default ``configs/fdistill_toy2d_imbalanced.yaml``, the imbalanced mixture
  ``8gaussians_imbalanced``) distils the exact score of a Gaussian mixture into a one-step MLP generator (same
  teacher, budget and initialisation across divergences; run folders kept next to ``out`` and reused unless
  ``retrain``). Each student draws ``num_samples`` points (default 20,000): per-mode recall (found mass / true
  weight, within 3 std of a centre), modes recovered (recall >= 0.25), precision (on-mode mass), weight TV, mass
  per mode, sliced Wasserstein-2 and MMD^2 against exact mixture samples (on the first 5,000), and the normalised
  f-weight h per time bin from each run's ``logs.jsonl`` (``gen.distill.per_bin_statistics``). Writes the JSON, a
  scatter plot, a recall plot and markdown rows next to ``out``.
- ``digits``: FID-digits (against digits16-test) and class accuracy of ``num_samples`` (default 300) one-step samples
  and of the teacher with DDIM at ``teacher_steps`` (``leading`` spacing as shipped, plus ``trailing`` at
  ``trailing_steps``: one trailing DDIM step evaluates t = 999, one leading step t = 0), balanced labels, for every
  seed of ``eval_seeds`` (mean and spread reported); samples per second of each (median of ``timing_repeats`` timed
  runs on ``threads`` torch threads, after a warm-up).
- ``students NAME=PATH ...``: the same FID-digits / class accuracy over ``eval_seeds`` for several students, for
  ablation tables. PATH is a ``OneStepPipeline`` folder or a training checkpoint ``RUN/checkpoints/checkpoint-N`` of
  ``train/fdistill.py`` (the EMA student; ``--no-ema``: the raw weights), read by
  :func:`gen.distill.students.load_student` with ``teacher`` as the run's teacher.
- ``curve RUN``: every kept checkpoint of a training run, FID-digits against iteration, with a plot (the teacher's
  FID at its largest leading step count drawn from ``teacher_ref``, a ``digits`` JSON, when given).

Outputs go to ``out`` (default ``outputs/fdistill/<mode>.json``); a path inside ``eval/results/`` takes
``update_shipped``. ``demo_section`` is the f-distill part of ``make demo``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from gen.evaluation import REPO_ROOT, option, output_path, repo_path

logger = logging.getLogger("gen.evaluation.fdistill")
ALIASES = {"fkl": "kl", "forward_kl": "kl", "reverse_kl": "rkl"}
DISTANCE_SAMPLES = 5000
MODES = ("toy", "digits", "students", "curve")


def _split(items) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (comma-separated items, as the commands in BENCHMARKS.md write them)."""
    return [s.strip() for item in items or [] for s in str(item).split(",") if s.strip()]


@dataclasses.dataclass
class FDistillEvalSettings:
    toy: bool = option(False, "mode: 2-D mixture, mode coverage per divergence (trains the students)")
    digits: bool = option(False, "mode: the digits student against the teacher")
    students: list[str] | None = option(None, "mode: NAME=PATH items (a OneStepPipeline folder or a training "
                                              "checkpoint RUN/checkpoints/checkpoint-N): FID of several students")
    curve: str | None = option(None, "mode: a training run folder, FID of every kept checkpoint")
    teacher_ref: str | None = option(None, "curve: a digits-mode JSON whose teacher row is drawn")
    out: str | None = option(None, "JSON file to write, plots next to it (default outputs/fdistill/<mode>.json)")
    divergences: list[str] = option(["rkl", "fkl", "js"], "toy: divergences (fkl = kl; alpha:<a>)")
    seeds: list[int] = option([0, 1, 2], "toy: training seeds")
    toy_config: str = option("configs/fdistill_toy2d_imbalanced.yaml", "toy: the trainer config")
    max_train_steps: int | None = option(None, "toy: override the config's budget")
    retrain: bool = option(False, "toy: retrain even if a run folder exists")
    num_samples: int | None = option(None, "samples per student and seed (toy: 20000; digits: 300)")
    eval_seeds: list[int] = option([0, 1, 2], "digits / students / curve: sampling seeds")
    student: str = option("checkpoints/digits-fdistill-js", "digits: the student (folder or training checkpoint)")
    teacher: str = option("checkpoints/digits-teacher", "the teacher pipeline (its rows; the teacher of checkpoints)")
    ema: bool = option(True, "training checkpoints: the EMA student (--no-ema: the raw weights)")
    teacher_steps: list[int] = option([1, 4, 10, 50], "digits: DDIM steps of the teacher, leading spacing")
    trailing_steps: list[int] = option([1, 50], "digits: DDIM steps of the teacher, trailing spacing")
    batch_size: int = option(500, "sampling batch")
    timing_batch: int = option(100, "digits: images per timed run")
    timing_repeats: int = option(3, "digits: timed runs per row (median; 0: no timing)")
    seed: int = option(0, "demo: seed of the sampling noise")
    threads: int = option(1, "torch threads")
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")

    def __post_init__(self):
        given = [m for m in MODES if getattr(self, m)]
        if len(given) != 1:
            raise ValueError(f"give exactly one mode of --toy, --digits, --students or --curve; got "
                             f"{', '.join(given) or 'none'}")
        self.divergences = _split(self.divergences)
        if self.students is not None:
            self.students = _split(self.students)
            bad = [s for s in self.students if not s.partition("=")[2] or not s.partition("=")[0]]
            if bad:
                raise ValueError(f"students takes NAME=PATH items; got {bad}")
        if self.toy and not self.divergences:
            raise ValueError("divergences needs at least one name")
        if self.toy and not self.seeds:
            raise ValueError("seeds needs at least one training seed")
        if not self.toy and not self.eval_seeds:
            raise ValueError("eval_seeds needs at least one seed")
        if self.num_samples is not None and self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (FID needs two samples); got {self.num_samples}")

    @property
    def mode(self) -> str:
        return next(m for m in MODES if getattr(self, m))


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


def _mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def h_per_bin(run: Path, last_fraction: float = 0.2) -> dict:
    """Mean of the logged per-time-bin statistics (``h_bin{k}``, ``r_bin{k}``) over the last ``last_fraction`` of
    a run's logged steps (``logs.jsonl``); bins never logged are left out."""
    logs = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines() if line.strip()]
    logs = [r for r in logs if any(k.startswith("h_bin") for k in r)]
    if not logs:
        return {}
    tail = logs[int(len(logs) * (1 - last_fraction)):] or logs[-1:]
    out = {}
    keys = {k for r in tail for k in r if k.startswith(("h_bin", "h_std_bin", "r_bin"))}
    for key in sorted(keys, key=lambda k: (k.rsplit("bin", 1)[0], int(k.rsplit("bin", 1)[1]))):
        vals = [r[key] for r in tail if key in r]
        out[key] = round(statistics.mean(vals), 4)
    return out


def run_toy(settings, out: Path) -> dict:
    from gen.distill import get_divergence
    from gen.distill.toy import mode_statistics
    from gen.distill.training import FDistillTrainConfig, toy_teacher
    from gen.metrics.samples import mmd_rbf, sliced_wasserstein
    from gen.training import config_to_dict, parse_config, train

    toy_config = str(repo_path(settings.toy_config))
    base = parse_config(FDistillTrainConfig, ["--config", toy_config])
    teacher, _ = toy_teacher(base)
    centres, std, weights = teacher.centres.float(), teacher.std, teacher.log_weights.exp()
    ref = teacher.sample(settings.num_samples, torch.Generator().manual_seed(10_000))
    ref2 = teacher.sample(settings.num_samples, torch.Generator().manual_seed(10_001))
    nd = min(settings.num_samples, DISTANCE_SAMPLES)  # SW2 / MMD on the first nd points (MMD is quadratic in n)
    floor = {"sw2": round(sliced_wasserstein(ref2[:nd], ref[:nd]), 4), "mmd2": round(mmd_rbf(ref2[:nd], ref[:nd]), 5),
             **mode_statistics(ref2, centres, std, weights)}
    rows, samples = [], {}
    runs_dir = out.parent / (out.stem + "_runs")
    for name in settings.divergences:
        div = get_divergence(ALIASES.get(name, name)).name
        for seed in settings.seeds:
            run = runs_dir / f"{div.replace(':', '')}-seed{seed}"
            argv = ["--config", toy_config, "--divergence", div, "--seed", str(seed), "--output_dir", str(run)]
            if settings.max_train_steps:
                argv += ["--max_train_steps", str(settings.max_train_steps)]
            if not (run / "generator" / "one_step.json").is_file() or settings.retrain:
                if settings.retrain and (run / "logs.jsonl").is_file():
                    (run / "logs.jsonl").unlink()
                t0 = time.time()
                train("fdistill", argv)
                wall = time.time() - t0
            else:
                wall = None
                logger.info("reusing %s", run)
            x = toy_student_samples(run, settings.num_samples, seed + 100)
            stats = mode_statistics(x, centres, std, weights)
            row = {"divergence": div, "seed": seed, "sw2": round(sliced_wasserstein(x[:nd], ref[:nd]), 4),
                   "mmd2": round(mmd_rbf(x[:nd], ref[:nd]), 5),
                   "train_wall_s": None if wall is None else round(wall, 1), **stats, "h_per_bin": h_per_bin(run)}
            rows.append(row)
            samples.setdefault(div, x)
            logger.info("%s seed %d: %d/%d modes, min recall %.3f, precision %.3f, weight TV %.3f, SW2 %.4f", div,
                        seed, row["modes_recovered"], row["num_modes"], row["min_recall"], row["precision"],
                        row["weight_tv"], row["sw2"])
    summary = {}
    k = centres.shape[0]
    for div in dict.fromkeys(r["divergence"] for r in rows):
        rs = [r for r in rows if r["divergence"] == div]
        entry = {"modes_recovered": [r["modes_recovered"] for r in rs],
                 "mean_modes": round(statistics.mean(r["modes_recovered"] for r in rs), 2)}
        for key in ("min_recall", "precision", "weight_tv", "sw2", "mass_tv", "off_mode_fraction"):
            m, sd = _mean_std(r[key] for r in rs)
            entry[key], entry[key + "_std"] = round(m, 4), round(sd, 4)
        for key in ("recall_per_mode", "weight_error_per_mode"):
            per = [_mean_std(r[key][j] for r in rs) for j in range(k)]
            entry[key] = [round(m, 4) for m, _ in per]
            entry[key + "_std"] = [round(sd, 4) for _, sd in per]
        for prefix, name in (("h_bin", "h_per_bin"), ("h_std_bin", "h_std_per_bin")):
            bins = sorted({b for r in rs for b in r["h_per_bin"] if b.startswith(prefix)},
                          key=lambda b: int(b.rsplit("bin", 1)[1]))
            entry[name] = {b.replace(prefix, "h_bin"): round(statistics.mean(
                r["h_per_bin"][b] for r in rs if b in r["h_per_bin"]), 4) for b in bins}
        # backwards-compatible keys of the earlier (equal-weight) table
        entry["mean_sw2"], entry["mean_mass_tv"], entry["mean_off_mode"] = (entry["sw2"], entry["mass_tv"],
                                                                              entry["off_mode_fraction"])
        summary[div] = entry
    cfg = config_to_dict(base)
    result = {"config": _rel(toy_config), "teacher": base.teacher, "toy_std": std,
              "weights": [round(float(w), 4) for w in weights], "num_samples": settings.num_samples,
              "max_train_steps": settings.max_train_steps or base.max_train_steps, "seeds": settings.seeds,
              "rows": rows, "summary": summary, "floor_exact_samples": floor, "machine": _machine(),
              "date": time.strftime("%Y-%m-%d"), "trainer_config": cfg}
    result["plot"] = _toy_plot(samples, ref, centres, weights, out.with_suffix(".png"))
    result["recall_plot"] = _recall_plot(result, out.with_name(out.stem + "_recall.png"))
    result["markdown"] = toy_rows(result)
    return result


def toy_rows(result: dict) -> str:
    """Markdown: the summary per divergence (mean ± std over seeds), per-mode recall, and h per time bin."""
    k = result["rows"][0]["num_modes"]
    lines = ["| divergence | modes recovered per seed | min recall | precision (on-mode mass) | weight TV | SW2 |",
             "|---|---|---|---|---|---|"]
    for div, s in result["summary"].items():
        lines.append(f"| {div} | {', '.join(str(m) for m in s['modes_recovered'])} of {k} | "
                     f"{s['min_recall']:.3f} ± {s['min_recall_std']:.3f} | {s['precision']:.3f} ± "
                     f"{s['precision_std']:.3f} | {s['weight_tv']:.3f} ± {s['weight_tv_std']:.3f} | "
                     f"{s['sw2']:.4f} ± {s['sw2_std']:.4f} |")
    f = result["floor_exact_samples"]
    lines.append(f"| exact samples (floor) | {f['modes_recovered']} of {k} | {f['min_recall']:.3f} | "
                 f"{f['precision']:.3f} | {f['weight_tv']:.3f} | {f['sw2']:.4f} |")
    w = result["weights"]
    lines += ["", "Recall per mode (mass within 3 std / true weight; mean ± std over seeds):", "",
              "| divergence | " + " | ".join(f"w={x:g}" for x in w) + " |", "|---|" + "---|" * len(w)]
    for div, s in result["summary"].items():
        lines.append(f"| {div} | " + " | ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in zip(s["recall_per_mode"],
                                                                                        s["recall_per_mode_std"]))
                     + " |")
    lines.append("| exact samples | " + " | ".join(f"{m:.2f}" for m in f["recall_per_mode"]) + " |")
    bins = sorted({b for s in result["summary"].values() for b in s["h_per_bin"]}, key=lambda b: int(b[5:]))
    if bins:
        lines += ["", "Normalised weight h per time bin, mean / standard deviation within the bin (over the last 20 % "
                  "of logged steps and the seeds; bin 0 = least noise; r is normalised per bin, so the mean of "
                  "h = r is 1 by construction):", "",
                  "| divergence | " + " | ".join(b.replace("h_bin", "bin ") for b in bins) + " |",
                  "|---|" + "---|" * len(bins)]
        for div, s in result["summary"].items():
            std = s.get("h_std_per_bin", {})
            lines.append(f"| {div} | " + " | ".join(
                f"{s['h_per_bin'].get(b, float('nan')):.2f} / {std.get(b, float('nan')):.2f}" for b in bins) + " |")
    return "\n".join(lines) + "\n"


def _toy_plot(samples: dict, ref, centres, weights, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [("exact mixture", ref)] + [(f"one-step student, {d}", x) for d, x in samples.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5), squeeze=False)
    lim = float(centres.abs().max()) * 1.5 + 0.5
    for ax, (title, x) in zip(axes[0], panels):
        ax.scatter(x[:2000, 0], x[:2000, 1], s=1.5, alpha=0.5)
        ax.scatter(centres[:, 0], centres[:, 1], s=12, c="red", marker="x")
        for c, w in zip(centres, weights):
            ax.annotate(f"{float(w):g}", (float(c[0]), float(c[1])), fontsize=6, color="red",
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("2-D mixture: 2,000 samples of each one-step student (seed 0; red: centres with their weights)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _recall_plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    w = result["weights"]
    order = sorted(range(len(w)), key=lambda j: w[j])
    divs = list(result["summary"])
    fig, ax = plt.subplots(figsize=(1.1 * len(w) + 2, 3.8))
    width = 0.8 / len(divs)
    for i, div in enumerate(divs):
        s = result["summary"][div]
        ax.bar([j + (i - (len(divs) - 1) / 2) * width for j in range(len(w))], [s["recall_per_mode"][o] for o in order],
               width, yerr=[s["recall_per_mode_std"][o] for o in order], capsize=2, label=div)
    floor = result["floor_exact_samples"]["recall_per_mode"]
    ax.plot(range(len(w)), [floor[o] for o in order], "k_", ms=14, label="exact samples")
    ax.set_xticks(range(len(w)), [f"{w[o]:g}" for o in order])
    ax.set_xlabel("mode (true weight)")
    ax.set_ylabel("recall: found mass / true weight")
    ax.set_title(f"Per-mode recall at equal budget ({result['max_train_steps']} iterations, "
                 f"mean ± std over {len(result['seeds'])} seeds)", fontsize=9)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


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


def fid_over_seeds(pipe, steps: int, num_samples: int, seeds, batch_size: int, extractor) -> dict:
    """FID-digits (vs digits16-test) and class accuracy of ``num_samples`` balanced samples for every seed; the
    mean and the sample standard deviation over seeds."""
    from gen.metrics.evaluate import compute_fid_for_images, sample_pipeline_uint8

    per_seed, nfe, wall = [], None, 0.0
    for seed in seeds:
        t0 = time.time()
        images, labels, nfe = sample_pipeline_uint8(pipe, num_samples, steps, 1.0, batch_size=batch_size,
                                                    seed=seed, progress=False)
        wall += time.time() - t0
        res = compute_fid_for_images(images, labels, extractor=extractor, ref="test", progress=False)
        per_seed.append({"seed": seed, "fid": round(res["fid"], 3), "class_accuracy": round(res["class_accuracy"], 4)})
    fids = [r["fid"] for r in per_seed]
    accs = [r["class_accuracy"] for r in per_seed]
    return {"steps": steps, "nfe": nfe, "n": num_samples, "per_seed": per_seed,
            "fid": round(statistics.mean(fids), 3),
            "fid_std": round(statistics.stdev(fids), 3) if len(fids) > 1 else 0.0,
            "class_accuracy": round(statistics.mean(accs), 4),
            "class_accuracy_std": round(statistics.stdev(accs), 4) if len(accs) > 1 else 0.0,
            "sample_wall_s": round(wall, 1)}


def _ddim(teacher, spacing: str):
    """The teacher pipeline with a DDIM scheduler of the given timestep spacing (a copy; the weights are shared)."""
    from diffusers import DDIMScheduler

    from pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline(unet=teacher.unet, scheduler=DDIMScheduler.from_config(
        teacher.scheduler.config, timestep_spacing=spacing))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_digits(settings, out: Path) -> dict:
    from gen.distill.students import load_student
    from gen.metrics.features import build_feature_extractor
    from pipelines import ClassConditionalPipeline, OneStepPipeline

    extractor = build_feature_extractor("digits")
    teacher_path = str(repo_path(settings.teacher))
    teacher = ClassConditionalPipeline.from_pretrained(teacher_path)
    student = load_student(repo_path(settings.student), teacher=teacher_path, ema=settings.ema)
    for p in (student, teacher):
        p.set_progress_bar_config(disable=True)
    rows = []

    def measure(name, pipe, steps, spacing=None):
        row = {"model": name, "spacing": spacing, **fid_over_seeds(
            pipe, steps, settings.num_samples, settings.eval_seeds, settings.batch_size, extractor)}
        row["samples_per_s"] = round(_timed_samples_per_s(
            pipe, settings.timing_batch, steps, settings.timing_repeats), 2) if settings.timing_repeats > 0 else None
        rows.append(row)
        logger.info("%s %d step(s)%s: FID-digits %.2f +- %.2f, accuracy %.1f%%, %s samples/s", name, steps,
                    f" ({spacing})" if spacing else "", row["fid"], row["fid_std"], 100 * row["class_accuracy"],
                    row["samples_per_s"])

    measure("student", student, 1)
    # the teacher's own one-step x0 estimate from noise at the student's generator timestep (the eps read-out)
    init = OneStepPipeline(unet=teacher.unet, scheduler=teacher.scheduler,
                           generator_timestep=min(student.config.generator_timestep, 950))
    init.set_progress_bar_config(disable=True)
    measure("teacher_x0", init, 1)
    leading = _ddim(teacher, "leading")
    for steps in settings.teacher_steps:
        measure("teacher", leading, steps, "leading")
    trailing = _ddim(teacher, "trailing")
    for steps in settings.trailing_steps:
        measure("teacher", trailing, steps, "trailing")
    s = rows[0]
    top = max(settings.teacher_steps)
    t50 = next(r for r in rows if r["model"] == "teacher" and r["steps"] == top and r["spacing"] == "leading")
    per_seed_diff = [a["fid"] - b["fid"] for a, b in zip(s["per_seed"], t50["per_seed"])]
    targets = {
        "teacher_steps": top,
        "fid_student_minus_teacher_per_seed": [round(d, 3) for d in per_seed_diff],
        "fid_student_minus_teacher_mean": round(statistics.mean(per_seed_diff), 3),
        "fid_at_or_below_teacher": s["fid"] <= t50["fid"],
        "accuracy_at_or_above_teacher": s["class_accuracy"] >= t50["class_accuracy"],
    }
    if s["samples_per_s"] and t50["samples_per_s"]:
        targets["speedup_vs_teacher"] = round(s["samples_per_s"] / t50["samples_per_s"], 1)
    result = {"student": _rel(repo_path(settings.student)), "teacher": _rel(teacher_path),
              "num_samples": settings.num_samples, "eval_seeds": settings.eval_seeds, "rows": rows,
              "targets": targets, "machine": _machine(), "date": time.strftime("%Y-%m-%d")}
    out_dir, stem = out.parent, out.stem
    result["grid"] = side_by_side(student, teacher, out_dir / f"{stem}_vs_teacher.png", settings.eval_seeds[0], top)
    result["plot"] = _digits_plot(rows, out_dir / f"{stem}_fid_vs_nfe.png")
    result["markdown"] = digits_rows(result)
    return result


def run_students(settings, students: list[str] | None = None) -> dict:
    """FID-digits / class accuracy over seeds for named students (ablation tables): ``students`` (default
    ``settings.students``) holds ``NAME=PATH`` items, PATH a one-step pipeline folder or a training checkpoint."""
    from gen.distill.students import load_student
    from gen.metrics.features import build_feature_extractor

    extractor = build_feature_extractor("digits")
    teacher = str(repo_path(settings.teacher))
    rows = []
    for item in students or settings.students:
        name, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--students takes NAME=PATH items; got {item!r}")
        pipe = load_student(repo_path(path), teacher=teacher, ema=settings.ema)
        pipe.set_progress_bar_config(disable=True)
        rows.append({"name": name, "path": _rel(repo_path(path)), **fid_over_seeds(
            pipe, 1, settings.num_samples, settings.eval_seeds, settings.batch_size, extractor)})
        logger.info("%s: FID-digits %.2f +- %.2f, accuracy %.1f%%", name, rows[-1]["fid"], rows[-1]["fid_std"],
                    100 * rows[-1]["class_accuracy"])
    lines = ["| student | FID-digits (mean ± std over seeds) | class accuracy |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['fid']:.2f} ± {r['fid_std']:.2f} | {100 * r['class_accuracy']:.1f} ± "
              f"{100 * r['class_accuracy_std']:.1f} % |" for r in rows]
    return {"num_samples": settings.num_samples, "eval_seeds": settings.eval_seeds, "rows": rows,
            "markdown": "\n".join(lines) + "\n", "machine": _machine(), "date": time.strftime("%Y-%m-%d")}


def run_curve(settings, out: Path) -> dict:
    """FID-digits against training iteration from every kept checkpoint of a run (EMA weights)."""
    from gen.training.checkpoint import list_checkpoints

    run = repo_path(settings.curve)
    ckpts = list_checkpoints(run / "checkpoints")
    if not ckpts:
        raise ValueError(f"no complete checkpoints under {run / 'checkpoints'}")
    result = run_students(settings, [f"{step}={path}" for step, path in ckpts])
    for r in result["rows"]:
        r["iteration"] = int(r.pop("name"))
    result["run"] = _rel(run)
    teacher = None
    if settings.teacher_ref:
        ref = json.loads(repo_path(settings.teacher_ref).read_text())
        teacher = next((r for r in ref["rows"] if r["model"] == "teacher" and r.get("spacing", "leading") == "leading"
                        and r["steps"] == max(x["steps"] for x in ref["rows"] if x["model"] == "teacher")), None)
        if teacher and teacher.get("n") not in (None, settings.num_samples):
            raise ValueError(f"--teacher_ref has {teacher['n']} samples per seed, the curve {settings.num_samples}: "
                             "FID is only comparable at equal sample counts")
    result["teacher_reference"] = teacher
    lines = ["| iteration | FID-digits (mean ± std over seeds) | class accuracy |", "|---|---|---|"]
    lines += [f"| {r['iteration']} | {r['fid']:.2f} ± {r['fid_std']:.2f} | {100 * r['class_accuracy']:.1f} % |"
              for r in result["rows"]]
    result["markdown"] = "\n".join(lines) + "\n"
    result["plot"] = _curve_plot(result, out.with_suffix(".png"))
    return result


def _curve_plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.errorbar([r["iteration"] for r in rows], [r["fid"] for r in rows], yerr=[r["fid_std"] for r in rows],
                marker="o", capsize=3, label="one-step student (EMA), mean ± std over seeds")
    t = result.get("teacher_reference")
    if t:
        ax.axhline(t["fid"], color="gray", ls="--", label=f"teacher, DDIM {t['steps']} steps ({t['fid']:.1f})")
    ax.set_xlabel("training iteration (critic steps)")
    ax.set_ylabel("FID-digits (lower is better)")
    ax.set_title(f"FID-digits against iteration, {result['num_samples']} samples x {len(result['eval_seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _rel(p) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(p)


def digits_rows(result: dict) -> str:
    lines = ["| model | steps (NFE) | FID-digits (mean ± std) | class accuracy | samples / s |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        name = {"student": "one-step f-distill student", "teacher_x0": "teacher's one-step x0 estimate (eps read-out)",
                "teacher": f"teacher, DDIM ({r.get('spacing')})"}[r["model"]]
        sps = f"{r['samples_per_s']:.1f}" if r.get("samples_per_s") else "-"
        lines.append(f"| {name} | {r['steps']} ({r['nfe']}) | {r['fid']:.2f} ± {r['fid_std']:.2f} | "
                     f"{100 * r['class_accuracy']:.1f} ± {100 * r['class_accuracy_std']:.1f} % | {sps} |")
    return "\n".join(lines) + "\n"


def side_by_side(student, teacher, path: Path, seed: int, teacher_steps: int) -> str:
    from gen.data.images import save_labelled_grid
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
    cols = ["student", *[""] * 5, f"teacher, {teacher_steps} steps", *[""] * 5, "teacher x0", *[""] * 5]
    title = (f"per class (rows): 6 one-step student samples | 6 teacher samples at {teacher_steps} DDIM steps | "
             "6 one-step x0 estimates of the teacher (the student's start), same noise")
    return str(save_labelled_grid(torch.cat(rows) * 2 - 1, path, nrow=18, upscale=4,
                                  row_labels=[str(c) for c in range(10)], col_labels=cols, title=title))


def _digits_plot(rows, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for spacing, marker in (("leading", "o"), ("trailing", "s")):
        t = sorted((r["nfe"], r["fid"], r["fid_std"]) for r in rows if r["model"] == "teacher"
                   and r.get("spacing") == spacing)
        if t:
            ax.errorbar([a for a, _, _ in t], [b for _, b, _ in t], yerr=[c for _, _, c in t], marker=marker,
                        capsize=3, label=f"teacher, DDIM ({spacing} spacing)")
    s = rows[0]
    ax.errorbar([s["nfe"]], [s["fid"]], yerr=[s["fid_std"]], color="red", marker="*", ms=10, zorder=3,
                label="one-step f-distill student")
    ax.set_title("FID-digits against network evaluations (mean ± std over seeds)", fontsize=10)
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
def demo_section(out: Path, settings) -> dict:
    """`make demo`: one-step samples of the shipped f-distill student beside the teacher's (50 DDIM steps; 2 with
    ``quick``) and the teacher's own one-step x0 estimate (the student's starting point)."""
    from gen.evaluation.demo import size
    from pipelines import ClassConditionalPipeline, OneStepPipeline

    t0 = time.time()
    steps = size(settings, 50, 2)
    student = OneStepPipeline.from_pretrained(REPO_ROOT / "checkpoints" / "digits-fdistill-js")
    teacher = ClassConditionalPipeline.from_pretrained(REPO_ROOT / "checkpoints" / "digits-teacher")
    for p in (student, teacher):
        p.set_progress_bar_config(disable=True)
    path = side_by_side(student, teacher, out / "fdistill_vs_teacher.png", settings.seed, steps)
    labels = torch.arange(10).repeat_interleave(10)
    t1 = time.perf_counter()
    student(class_labels=labels, output_type="pt", generator=torch.Generator().manual_seed(settings.seed))
    one = time.perf_counter() - t1
    t1 = time.perf_counter()
    teacher(class_labels=labels, num_inference_steps=steps, output_type="pt",
            generator=torch.Generator().manual_seed(settings.seed))
    many = time.perf_counter() - t1
    logger.info("wrote %s (per class: 6 one-step student samples | 6 teacher samples at %d DDIM steps | 6 one-step "
                "x0 estimates of the teacher, the student's start); 100 samples: student %.2f s, teacher %d steps "
                "%.2f s (%.0fx)", path, steps, one, steps, many, many / one)
    return {"grid": str(path), "teacher_steps": steps, "student_s_per_100": round(one, 3),
            f"teacher{steps}_s_per_100": round(many, 3), "wall_time_s": round(time.time() - t0, 1)}


def run(settings: FDistillEvalSettings, command: str = "") -> dict:
    """Run the mode of ``settings``; writes the JSON (with ``markdown``, ``command``, plots next to it)."""
    torch.set_num_threads(settings.threads)
    out = output_path(settings.out or f"outputs/fdistill/{settings.mode}.json", settings.update_shipped)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; give the JSON file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    if settings.num_samples is None:
        settings = dataclasses.replace(settings, num_samples=20000 if settings.toy else 300)
    if settings.toy:
        result = run_toy(settings, out)
    elif settings.digits:
        result = run_digits(settings, out)
    elif settings.students:
        result = run_students(settings)
    else:
        result = run_curve(settings, out)
    result["command"] = command
    out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", out)
    return result
