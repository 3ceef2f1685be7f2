"""`make demo`: what `gen` does, on the models it ships, on a CPU in a few minutes (``eval/demo.py``).

Each method has a section, a function ``section(out, settings) -> dict`` that writes labelled images and JSON under
``out`` (most live with their benchmark as ``gen.evaluation.<method>.demo_section``); :data:`SECTIONS` lists them
in order and :func:`run` runs them (``only``: a subset).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from pathlib import Path

import torch

from gen.evaluation import REPO_ROOT, option, output_path

logger = logging.getLogger("gen.evaluation.demo")


@dataclasses.dataclass
class DemoSettings:
    out: str = option("outputs", "output folder")
    only: list[str] | None = option(None, "run only these sections")
    steps: int = option(25, "DDIM steps")
    guidance_scale: float = option(2.0, "classifier-free guidance weight")
    high_scale: float = option(12.0, "scale of the CFG-vs-APG comparison")
    num_fid_samples: int = option(500, "samples for FID-digits")
    seed: int = option(0, "seed of the sampling noise")
    quick: bool = option(False, "smoke-test sizes: one sample per class and at most 3 steps per sampler (seconds; "
                                "the figures are then mostly noise)")


def size(settings, full: int, quick: int) -> int:
    """A demo size: ``full``, or ``quick`` when ``settings.quick`` (other sections' settings may lack it)."""
    return quick if getattr(settings, "quick", False) else full


def section_teacher(out: Path, settings) -> dict:
    """Class-conditional digits teacher: a 10x8 grid with CFG, and FID-digits / class accuracy of guided samples."""
    from gen.data.images import save_labelled_grid
    from gen.metrics.evaluate import compute_fid_for_images, sample_pipeline_uint8
    from pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(REPO_ROOT / "checkpoints" / "digits-teacher")
    pipe.set_progress_bar_config(disable=True)
    per = size(settings, 8, 1)
    labels = torch.arange(10).repeat_interleave(per)
    t0 = time.time()
    grid = pipe(class_labels=labels, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                generator=torch.Generator().manual_seed(settings.seed), output_type="pt")
    path = save_labelled_grid(grid.images * 2 - 1, out / "digits_grid.png", nrow=per, upscale=4,
                              title=f"digits teacher: CFG w={settings.guidance_scale:g}, {settings.steps} DDIM steps\n"
                                    f"rows: class; columns: {per} samples",
                              row_labels=[f"class {c}" for c in range(10)])
    logger.info("wrote %s (one row per class 0-9, %d DDIM steps, w=%.1f, %.1f s)", path, settings.steps,
                settings.guidance_scale, time.time() - t0)

    t0 = time.time()
    images, sample_labels, nfe = sample_pipeline_uint8(pipe, settings.num_fid_samples, settings.steps,
                                                       settings.guidance_scale, batch_size=250, seed=settings.seed)
    result = compute_fid_for_images(images, sample_labels, features="digits", ref="test", progress=False)
    result.update(num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale, scheduler="ddim", nfe=nfe,
                  seed=settings.seed, wall_time_s=round(time.time() - t0, 1),
                  date=time.strftime("%Y-%m-%d"), pipeline="checkpoints/digits-teacher")
    (out / "fid_digits.json").write_text(json.dumps(result, indent=2))
    logger.info("FID-digits %.3f (N=%d vs digits16-test), class accuracy %.1f%% -> %s", result["fid"], result["n"],
                100 * result["class_accuracy"], out / "fid_digits.json")
    return {"grid": str(path), "fid_digits": result["fid"], "class_accuracy": result["class_accuracy"]}


def section_guidance(out: Path, settings) -> dict:
    """CFG vs APG at a high scale (same seeds, side by side), and AG's saving of network evaluations."""
    import yaml

    from gen.data.images import save_labelled_grid
    from gen.guidance import APG, CFG, AdaptiveGuidance
    from gen.metrics import psnr, saturation
    from pipelines import ClassConditionalPipeline

    config = yaml.safe_load((REPO_ROOT / "configs" / "guidance_digits.yaml").read_text())
    pipe = ClassConditionalPipeline.from_pretrained(REPO_ROOT / "checkpoints" / "digits-teacher")
    pipe.set_progress_bar_config(disable=True)
    rows = size(settings, 4, 1)
    steps, w, labels = size(settings, config["steps"], 3), settings.high_scale, torch.arange(10).repeat(rows)
    apg_kw = config["apg"]

    def run(guider, scale_labels=labels):
        return pipe(class_labels=scale_labels, num_inference_steps=steps, guider=guider, output_type="pt",
                    generator=torch.Generator().manual_seed(settings.seed))

    cfg, apg = run(CFG(guidance_scale=w)), run(APG(guidance_scale=w, **apg_kw))
    # 4 rows of CFG above 4 rows of APG, the same noise in the same place
    grid = torch.cat([cfg.images, apg.images]) * 2 - 1
    path = save_labelled_grid(grid, out / "guidance_cfg_vs_apg.png", nrow=10, upscale=4,
                              title=f"CFG (top {rows} rows) vs APG (bottom {rows} rows) at w={w:g}, {steps} DDIM "
                                    f"steps, the same noise in the same place\nAPG: eta={apg_kw['eta']}, momentum="
                                    f"{apg_kw['momentum']}, norm_threshold={apg_kw['norm_threshold']}",
                              row_labels=["CFG"] * rows + ["APG"] * rows, col_labels=[f"class {c}" for c in range(10)])
    sat = {name: saturation(x.images * 2 - 1) for name, x in (("cfg", cfg), ("apg", apg))}
    logger.info("wrote %s: top 4 rows CFG w=%g, bottom 4 rows APG (eta=%g, beta=%g, r=%g); mean |x| %.3f vs %.3f",
                path, w, apg_kw["eta"], apg_kw["momentum"], apg_kw["norm_threshold"], sat["cfg"]["mean_abs"],
                sat["apg"]["mean_abs"])

    w_ag = settings.guidance_scale
    base = run(CFG(guidance_scale=w_ag))
    ag = run(AdaptiveGuidance(inner=CFG(guidance_scale=w_ag), **config["ag"]))
    result = {"high_scale": w, "apg": apg_kw, "saturation": sat, "ag": {
        "guidance_scale": w_ag, **config["ag"], "nfe_cfg": base.nfe, "nfe_ag": ag.nfe,
        "nfe_saving": round(1 - ag.nfe / base.nfe, 4),
        "psnr_vs_cfg_db": round(float(psnr(ag.images * 2 - 1, base.images * 2 - 1, data_range=2.0).mean()), 2)}}
    (out / "guidance.json").write_text(json.dumps(result, indent=2))
    logger.info("AG (%s) at w=%g: %.2f network evaluations per image vs %d for CFG (%.0f%% saved), PSNR %.1f dB "
                "against the CFG images", ", ".join(f"{k}={v}" for k, v in config["ag"].items()), w_ag, ag.nfe,
                base.nfe, 100 * result["ag"]["nfe_saving"], result["ag"]["psnr_vs_cfg_db"])
    return {"grid": str(path), **result["ag"]}


def _lazy(module: str):
    """The section ``gen.evaluation.<module>.demo_section``, imported only when it runs (so that ``--only`` loads
    only what it needs)."""

    def section(out: Path, settings) -> dict:
        return importlib.import_module(f"gen.evaluation.{module}").demo_section(out, settings)

    section.__name__ = section.__qualname__ = f"section_{module}"
    return section


# name -> section, in the order `make demo` runs them
SECTIONS = {"teacher": section_teacher, "guidance": section_guidance, "families": _lazy("bench_sampling"),
            "inverse": _lazy("inverse"), "gbm": _lazy("gbm"), "interpolants": _lazy("interpolants"),
            "fdistill": _lazy("fdistill"), "fdistill_flow": _lazy("fdistill_flow"), "alignprop": _lazy("alignprop")}


def run(settings: DemoSettings, sections: dict | None = None) -> dict:
    """Run ``sections`` (default :data:`SECTIONS`; ``settings.only`` picks some) and write ``demo_summary.json``."""
    sections = sections or SECTIONS
    unknown = sorted(set(settings.only or []) - set(sections))
    if unknown:
        raise ValueError(f"unknown demo sections {unknown}; allowed: {', '.join(sections)}")
    out = output_path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, t0 = {}, time.time()
    for name in settings.only or sections:
        logger.info("== %s ==", name)
        summary[name] = sections[name](out, settings)
    summary["wall_time_s"] = round(time.time() - t0, 1)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("demo done in %.0f s; outputs in %s", summary["wall_time_s"], out)
    return summary
