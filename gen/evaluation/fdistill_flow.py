"""A flow teacher on real data (issue 15, item 6; ``eval/fdistill_flow.py``): the one-step f-distill student of the
shipped digits interpolant against the interpolant's own ODE at 4 / 8 / 16 network evaluations.

Rows: FID-digits and class accuracy exactly as the interpolant's benchmark rows (``gen.evaluation.interpolants``:
``num_samples`` class-balanced samples, labels ``i % 10``, one generator seeded per run and drawn through batches of
``batch``, features of the shipped digits classifier against the 360 digits16-test images), for every seed in
``seeds`` (mean and standard deviation), and sampling throughput (images per second, median of ``timing_repeats``
runs of ``timing_batch`` images, ``threads`` torch threads). The student is a ``OneStepPipeline`` folder, or the EMA
weights of a training checkpoint (``--checkpoint``, to follow a run; read by
:func:`gen.distill.students.student_from_checkpoint`). The real-data floor (500 training digits) is listed too.

Writes ``results.json``, ``rows.md`` and ``samples.png`` (rows: the student, the ODE at each NFE; columns: the ten
classes) under ``out``.
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

logger = logging.getLogger("gen.evaluation.fdistill_flow")


@dataclasses.dataclass
class FDistillFlowSettings:
    out: str = option("outputs/fdistill_flow", "output folder")
    student: str = option("checkpoints/digits-interpolant-fdistill", "OneStepPipeline folder of the student")
    checkpoint: str | None = option(None, "a training checkpoint folder: evaluate its EMA student instead")
    interpolant: str = option("checkpoints/digits-interpolant", "the teacher's InterpolantPipeline folder")
    num_samples: int = option(500, "samples per row and seed (the interpolant rows use 500)")
    batch: int = option(250, "sampling batch (the interpolant rows use 250)")
    seeds: list[int] = option([0, 1, 2], "seeds of the FID rows")
    nfe: list[int] = option([4, 8, 16], "ODE network evaluations (even: Heun takes 2 per step)")
    samplers: list[str] = option(["ode-heun", "ode-euler"], "ODE samplers of the teacher rows",
                                 choices=("ode-heun", "ode-euler"))
    timing_batch: int = option(250, "images per timed sampling run")
    timing_repeats: int = option(3, "timed runs per row (median)")
    threads: int = option(1, "torch threads")
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")

    def __post_init__(self):
        if any(n % 2 for n in self.nfe):
            raise ValueError(f"nfe values must be even (Heun takes 2 evaluations per step); got {self.nfe}")
        if self.num_samples < 10 or self.batch < 1:
            raise ValueError("num_samples must be >= 10 and batch >= 1")


def _sample(pipe, settings, seed, **kw):
    labels = torch.arange(settings.num_samples) % 10
    gen = torch.Generator().manual_seed(seed)
    chunks, nfe = [], 0.0
    for s in range(0, settings.num_samples, settings.batch):
        lab = labels[s:s + settings.batch]
        out = pipe(class_labels=lab, generator=gen, output_type="pt", **kw)
        chunks.append(out.images * 2 - 1)
        nfe += out.nfe * len(lab)
    return torch.cat(chunks), labels, nfe / settings.num_samples


def _throughput(pipe, settings, **kw) -> float:
    labels = torch.arange(settings.timing_batch) % 10
    pipe(class_labels=labels[:10], generator=torch.Generator().manual_seed(0), output_type="pt", **kw)  # warm-up
    times = []
    for r in range(settings.timing_repeats):
        t0 = time.perf_counter()
        pipe(class_labels=labels, generator=torch.Generator().manual_seed(r), output_type="pt", **kw)
        times.append(time.perf_counter() - t0)
    return settings.timing_batch / statistics.median(times)


def run(settings: FDistillFlowSettings, command: str = "") -> dict:
    from gen.data.digits import load_digits16
    from gen.data.images import save_labelled_grid, to_uint8
    from gen.distill.students import student_from_checkpoint
    from gen.metrics import build_feature_extractor
    from gen.metrics.evaluate import compute_fid_for_images
    from pipelines import InterpolantPipeline, OneStepPipeline

    torch.set_num_threads(settings.threads)
    out = output_path(settings.out, settings.update_shipped)
    out.mkdir(parents=True, exist_ok=True)
    interp = InterpolantPipeline.from_pretrained(str(repo_path(settings.interpolant)))
    if settings.checkpoint:
        student = student_from_checkpoint(repo_path(settings.checkpoint), teacher=str(repo_path(settings.interpolant)))
        source = str(settings.checkpoint)
    else:
        student = OneStepPipeline.from_pretrained(str(repo_path(settings.student)))
        source = str(settings.student)
    for p in (interp, student):
        p.set_progress_bar_config(disable=True)
    extractor = build_feature_extractor("digits")
    rows, grid = [], []

    def measure(model, label, pipe, **kw):
        fids, accs, n_eval = [], [], 0.0
        for seed in settings.seeds:
            images, labels, n_eval = _sample(pipe, settings, seed, **kw)
            res = compute_fid_for_images(to_uint8(images), labels, extractor=extractor, ref="test", progress=False)
            fids.append(res["fid"])
            accs.append(res["class_accuracy"])
            if seed == settings.seeds[0]:
                grid.append(torch.stack([images[labels == c][0] for c in range(10)]))
        row = {"model": model, "sampler": label, "nfe": n_eval, "fid_mean": statistics.mean(fids),
               "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0, "fids": fids,
               "class_accuracy_mean": statistics.mean(accs), "samples_per_s": _throughput(pipe, settings, **kw)}
        rows.append(row)
        logger.info("%s", json.dumps(row))
        return row

    # the floor: real training digits against the test split (seeded picks)
    real, real_labels = load_digits16("train")
    floor = []
    for seed in settings.seeds:
        pick = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))[:settings.num_samples]
        floor.append(compute_fid_for_images(to_uint8(real[pick]), real_labels[pick], extractor=extractor, ref="test",
                                            progress=False)["fid"])
    measure("one-step f-distill student", "one step", student)
    row_names = ["f-distill, 1 NFE"]
    for nfe in settings.nfe:
        for sampler in settings.samplers:
            method = sampler.split("-")[1]
            steps = nfe // 2 if method == "heun" else nfe
            measure("digits-interpolant", f"ODE {method}", interp, sampler="ode", method=method,
                    num_inference_steps=steps)
            row_names.append(f"ODE {method}, {nfe} NFE")
    results = {"date": time.strftime("%Y-%m-%d"), "command": command, "student": source,
               "machine": f"CPU box: {platform.machine()}, torch {torch.__version__}, {settings.threads} thread(s)",
               "settings": dataclasses.asdict(settings), "floor_fid_mean": statistics.mean(floor),
               "floor_fids": floor, "rows": rows}
    best8 = min((r for r in rows if r["model"] == "digits-interpolant" and r["nfe"] == 8), key=lambda r: r["fid_mean"],
                default=None)
    if best8 is not None:
        results["student_vs_best_8_nfe_ode"] = {"ode": best8["sampler"], "ode_fid": best8["fid_mean"],
                                                "student_fid": rows[0]["fid_mean"],
                                                "at_least_as_good": rows[0]["fid_mean"] <= best8["fid_mean"]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    save_labelled_grid(torch.cat(grid), out / "samples.png", nrow=10,
                       title="digits-interpolant: one-step f-distill student vs the ODE (seed 0)",
                       row_labels=row_names, col_labels=[str(c) for c in range(10)], upscale=4)
    (out / "rows.md").write_text(markdown(results))
    return results


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"Command: `{results['command']}` ({results['date']}, {results['machine']}); student: "
             f"`{results['student']}`; {s['num_samples']} samples per seed, seeds {s['seeds']}.", "",
             "| model | sampler | NFE / image | FID-digits (mean ± std over seeds) | class accuracy | images / s |",
             "|---|---|---|---|---|---|",
             f"| real digits16-train (floor) | - | - | {results['floor_fid_mean']:.2f} ± "
             f"{statistics.stdev(results['floor_fids']) if len(results['floor_fids']) > 1 else 0:.2f} | 100.0 % | - |"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe']:g} | {r['fid_mean']:.2f} ± {r['fid_std']:.2f} | "
                     f"{100 * r['class_accuracy_mean']:.1f} % | {r['samples_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def demo_section(out: Path, settings) -> dict:
    """`make demo`: the shipped one-step flow student (``checkpoints/digits-interpolant-fdistill``) beside its teacher,
    the digits interpolant's ODE (Heun, 8 network evaluations; 2 with ``quick``), from the same noise, one row of
    ten classes each, and the time for 100 images of each."""
    from gen.data.images import save_labelled_grid
    from gen.evaluation.demo import size
    from pipelines import InterpolantPipeline, OneStepPipeline

    t0 = time.time()
    steps = size(settings, 4, 1)  # Heun: 2 evaluations per step
    student = OneStepPipeline.from_pretrained(REPO_ROOT / "checkpoints" / "digits-interpolant-fdistill")
    teacher = InterpolantPipeline.from_pretrained(REPO_ROOT / "checkpoints" / "digits-interpolant")
    for p in (student, teacher):
        p.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat(10)
    timings, rows = {}, []
    for name, pipe, kw in (("student", student, {}),
                           ("ode", teacher, {"sampler": "ode", "method": "heun", "num_inference_steps": steps})):
        t1 = time.perf_counter()
        images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(settings.seed), output_type="pt",
                      **kw).images
        timings[name] = time.perf_counter() - t1
        rows.append(images[:10])
    path = save_labelled_grid(torch.cat(rows), out / "fdistill_flow.png", nrow=10, upscale=4,
                              title="digits interpolant: one-step f-distill student vs its ODE (same noise)",
                              row_labels=["student, 1 NFE", f"ODE Heun, {2 * steps} NFE"],
                              col_labels=[str(c) for c in range(10)])
    logger.info("wrote %s; 100 images: student %.2f s, ODE %d NFE %.2f s", path, timings["student"], 2 * steps,
                timings["ode"])
    return {"grid": str(path), "ode_nfe": 2 * steps, "student_s_per_100": round(timings["student"], 3),
            "ode_s_per_100": round(timings["ode"], 3), "wall_time_s": round(time.time() - t0, 1)}
