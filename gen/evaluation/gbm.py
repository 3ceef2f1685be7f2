"""Multiplicative (GBM) diffusion against the additive DDPM teacher trained with the same network and budget
(``eval/gbm.py``).

Parts (N samples each, balanced labels, the same seed, FID-digits against digits16-test, class accuracy):
- ``gbm_deterministic``: the log-space deterministic sampler (ours) at ``ddim_steps``;
- ``gbm_stochastic``: the paper's DLS at ``dls_steps`` and UMS at ``ums_steps`` (1000 = every training level);
- ``baseline``: the additive teacher (``checkpoints/digits-teacher``, same UNet preset, batch, steps, optimizer, EMA)
  with DDIM at ``baseline_steps``;
- ``baseline_stochastic``: the same teacher with DDPM ancestral sampling at ``baseline_ddpm_steps``.
Writes ``results.json`` (merged across parts), ``gbm_fid_vs_steps.png``, ``rows.md`` and a sample grid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from pathlib import Path

import torch

from gen.evaluation import REPO_ROOT, option, output_path, repo_path

logger = logging.getLogger("gen.evaluation.gbm")
PARTS = ("gbm_deterministic", "gbm_stochastic", "baseline", "baseline_stochastic")


@dataclasses.dataclass
class GBMEvalSettings:
    model: str = option("checkpoints/digits-gbm", "GBMPipeline folder")
    baseline: str = option("checkpoints/digits-teacher", "ClassConditionalPipeline folder")
    out: str = option("outputs/gbm", "output folder (results.json, rows.md, plots)")
    only: list[str] | None = option(None, "run only these parts", choices=PARTS)
    report: bool = option(False, "only rebuild rows.md and the plot from results.json")
    num_samples: int = option(400, "samples per row")
    batch_size: int = option(400, "sampling batch")
    guidance_scale: float = option(1.0, "CFG weight")
    ddim_steps: str = option("10,25,50,100,200", "deterministic GBM sampler steps (comma-separated)")
    dls_steps: str = option("100,250,1000", "DLS steps")
    ums_steps: str = option("1000", "UMS steps")
    baseline_steps: str = option("10,25,50,100,200", "teacher DDIM steps")
    baseline_ddpm_steps: str = option("100,1000", "teacher DDPM ancestral steps")
    seed: int = option(0, "seed of the sampling noise")
    threads: int = option(1, "torch threads")
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _measure(pipe, runs, settings, extractor, model: str) -> list[dict]:
    from gen.metrics.evaluate import compute_fid_for_images, sample_pipeline_uint8

    rows = []
    for sampler, steps in runs:
        kwargs = {} if sampler.endswith("-additive") else {"sampler": sampler}
        t0 = time.time()
        images, labels, nfe = sample_pipeline_uint8(pipe, settings.num_samples, steps, settings.guidance_scale,
                                                    batch_size=settings.batch_size, seed=settings.seed, progress=False,
                                                    **kwargs)
        wall = time.time() - t0
        res = compute_fid_for_images(images, labels, extractor=extractor, ref="test", progress=False)
        extra = {}
        if sampler == "ums":
            extra["ums_clamped_values"] = int(pipe.scheduler.nonpositive_count)  # of the last batch
        row = {"model": model, "sampler": sampler, "steps": steps, "nfe": nfe,
               "guidance_scale": settings.guidance_scale,
               "fid": round(res["fid"], 3), "class_accuracy": round(res["class_accuracy"], 4), "n": res["n"],
               "sample_wall_s": round(wall, 1), **extra}
        rows.append(row)
        logger.info("%s %s %d steps: FID-digits %.2f, accuracy %.1f%%, %.0f s", model, sampler, steps, row["fid"],
                    100 * row["class_accuracy"], wall)
    return rows


def run_part(part: str, settings, extractor) -> list[dict]:
    from pipelines import ClassConditionalPipeline
    from pipelines.gbm import GBMPipeline

    if part == "baseline":
        pipe = ClassConditionalPipeline.from_pretrained(settings.baseline)
        return _measure(pipe, [("ddim-additive", s) for s in _ints(settings.baseline_steps)], settings, extractor,
                        settings.baseline)
    if part == "baseline_stochastic":  # DDPM ancestral sampling of the same teacher
        pipe = ClassConditionalPipeline.from_pretrained(settings.baseline).use_scheduler("ddpm")
        return _measure(pipe, [("ddpm-additive", s) for s in _ints(settings.baseline_ddpm_steps)], settings, extractor,
                        settings.baseline)
    pipe = GBMPipeline.from_pretrained(settings.model)
    if part == "gbm_deterministic":
        runs = [("ddim", s) for s in _ints(settings.ddim_steps)]
    else:
        runs = [("dls", s) for s in _ints(settings.dls_steps)] + [("ums", s) for s in _ints(settings.ums_steps)]
    return _measure(pipe, runs, settings, extractor, settings.model)


def sample_grid(settings, out: Path) -> str:
    from gen.data.images import save_labelled_grid
    from pipelines.gbm import GBMPipeline

    pipe = GBMPipeline.from_pretrained(settings.model)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(6)
    img = pipe(class_labels=labels, num_inference_steps=100, sampler="ddim", output_type="pt",
               generator=torch.Generator().manual_seed(settings.seed)).images
    return str(save_labelled_grid(img * 2 - 1, out / "gbm_samples.png", nrow=6, upscale=4,
                                  title="GBM (multiplicative) diffusion, deterministic log-space sampler, 100 steps",
                                  row_labels=[f"class {c}" for c in range(10)],
                                  col_labels=[f"seed {settings.seed}, #{j}" for j in range(6)]))


def report(results: dict, out: Path) -> str:
    """Markdown rows + a plot of FID-digits against steps, from the merged results."""
    rows = results["rows"]
    lines = ["| model | sampler | steps (NFE) | FID-digits | class accuracy | sampling wall (s) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["sampler"], r["steps"])):
        name = "additive teacher" if r["sampler"].endswith("-additive") else "GBM"
        sampler = {"ddim-additive": "DDIM", "ddpm-additive": "DDPM ancestral", "ddim": "deterministic (log-space DDIM)",
                   "dls": "DLS", "ums": "UMS"}[r["sampler"]]
        lines.append(f"| {name} | {sampler} | {r['steps']} ({r['nfe']}) | {r['fid']:.2f} | "
                     f"{100 * r['class_accuracy']:.1f} % | {r['sample_wall_s']:.0f} |")
    md = "\n".join(lines) + "\n"
    (out / "rows.md").write_text(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional
        logger.warning("matplotlib not installed: no plot")
        return md
    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler, label in (("ddim-additive", "additive DDPM teacher, DDIM"),
                           ("ddpm-additive", "additive DDPM teacher, DDPM ancestral"), ("ddim", "GBM deterministic"),
                           ("dls", "GBM DLS"), ("ums", "GBM UMS")):
        pts = sorted((r["steps"], r["fid"]) for r in rows if r["sampler"] == sampler)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps (= network evaluations)")
    ax.set_ylabel("FID-digits (lower is better)")
    ax.set_title(f"Multiplicative (GBM) vs additive diffusion on digits16\nFID-digits against sampling steps "
                 f"(N={rows[0]['n']} per point, w={rows[0]['guidance_scale']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gbm_fid_vs_steps.png", dpi=120)
    plt.close(fig)
    return md


def demo_section(out: Path, settings) -> dict:
    """`make demo`: a grid of GBM samples (one row per class) and the sign check of the DLS sampler."""
    from gen.data.images import save_labelled_grid
    from pipelines.gbm import GBMPipeline

    pipe = GBMPipeline.from_pretrained(REPO_ROOT / "checkpoints" / "digits-gbm")
    pipe.set_progress_bar_config(disable=True)
    from gen.evaluation.demo import size

    per, det_steps, dls_steps = size(settings, 8, 1), size(settings, 50, 3), size(settings, 200, 3)
    labels = torch.arange(10).repeat_interleave(per)
    t0 = time.time()
    det = pipe(class_labels=labels, num_inference_steps=det_steps, sampler="ddim", output_type="pt",
               generator=torch.Generator().manual_seed(settings.seed))
    dls = pipe(class_labels=torch.arange(10).repeat(2), num_inference_steps=dls_steps, sampler="dls",
               output_type="pt", generator=torch.Generator().manual_seed(settings.seed))
    rows = [f"class {c}" for c in range(10)]
    path = save_labelled_grid(det.images * 2 - 1, out / "gbm_samples.png", nrow=per, upscale=4, row_labels=rows,
                              title=f"GBM (multiplicative) diffusion: deterministic log-space sampler, {det_steps} "
                                    f"steps\nrows: class; columns: {per} samples")
    path_dls = save_labelled_grid(dls.images * 2 - 1, out / "gbm_samples_dls.png", nrow=10, upscale=4,
                                  row_labels=["sample 1", "sample 2"], col_labels=[f"class {c}" for c in range(10)],
                                  title=f"GBM, Dale-Langevin sampler (paper), {dls_steps} steps")
    logger.info("wrote %s (deterministic log-space sampler, %d steps) and %s (Dale-Langevin, %d steps), %.0f s",
                path, det_steps, path_dls, dls_steps, time.time() - t0)
    return {"grid": str(path), "grid_dls": str(path_dls), "wall_time_s": round(time.time() - t0, 1)}


def run(settings: GBMEvalSettings) -> dict:
    """Run the parts (merging into ``out/results.json``), then write ``rows.md`` and the plot."""
    for key in ("model", "baseline"):  # repo-relative defaults work from any working directory
        setattr(settings, key, str(repo_path(getattr(settings, key))))
    torch.set_num_threads(settings.threads)
    out = output_path(settings.out, settings.update_shipped)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if not settings.report:
        from gen.metrics.features import build_feature_extractor

        extractor = build_feature_extractor("digits")
        for part in settings.only or PARTS:
            new = run_part(part, settings, extractor)
            # re-read: another part may have finished meanwhile; replace rows of the same (model, sampler, steps)
            results = json.loads(path.read_text()) if path.exists() else {"rows": []}
            keys = {(r["model"], r["sampler"], r["steps"], r["n"], r["guidance_scale"]) for r in new}
            results["rows"] = [r for r in results["rows"]
                               if (r["model"], r["sampler"], r["steps"], r["n"], r["guidance_scale"]) not in keys]
            results["rows"] += new
            results["machine"] = (f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                                  f"torch {torch.__version__}")
            results["date"] = time.strftime("%Y-%m-%d")
            results["seed"] = settings.seed
            path.write_text(json.dumps(results, indent=2))
        if set(settings.only or PARTS) - {"baseline", "baseline_stochastic"}:
            results["grid"] = sample_grid(settings, out)
            path.write_text(json.dumps(results, indent=2))
    if not results["rows"]:
        raise ValueError(f"no results in {path}; run without --report first")
    results["markdown"] = report(results, out)
    return results
