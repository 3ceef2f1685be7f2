"""`make demo`: what `gen` does, on the models it ships, on a CPU in a few minutes.

    python eval/demo.py --out outputs [--only teacher] [--num_fid_samples 500]

Each method adds a section (a function registered in SECTIONS) that writes images and JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

logger = logging.getLogger("demo")


def section_teacher(out: Path, args) -> dict:
    """Class-conditional digits teacher: a 10x8 grid with CFG, and FID-digits / class accuracy of guided samples."""
    from gen.data.images import save_grid
    from gen.metrics.evaluate import compute_fid_for_images, sample_pipeline_uint8
    from pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(ROOT / "checkpoints" / "digits-teacher")
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(8)
    t0 = time.time()
    grid = pipe(class_labels=labels, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                generator=torch.Generator().manual_seed(args.seed), output_type="pt")
    path = save_grid(grid.images * 2 - 1, out / "digits_grid.png", nrow=8, upscale=4)
    logger.info("wrote %s (one row per class 0-9, %d DDIM steps, w=%.1f, %.1f s)", path, args.steps,
                args.guidance_scale, time.time() - t0)

    t0 = time.time()
    images, sample_labels, nfe = sample_pipeline_uint8(pipe, args.num_fid_samples, args.steps, args.guidance_scale,
                                                       batch_size=250, seed=args.seed)
    result = compute_fid_for_images(images, sample_labels, features="digits", ref="test", progress=False)
    result.update(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, scheduler="ddim", nfe=nfe,
                  seed=args.seed, wall_time_s=round(time.time() - t0, 1),
                  date=time.strftime("%Y-%m-%d"), pipeline="checkpoints/digits-teacher")
    (out / "fid_digits.json").write_text(json.dumps(result, indent=2))
    logger.info("FID-digits %.3f (N=%d vs digits16-test), class accuracy %.1f%% -> %s", result["fid"], result["n"],
                100 * result["class_accuracy"], out / "fid_digits.json")
    return {"grid": str(path), "fid_digits": result["fid"], "class_accuracy": result["class_accuracy"]}


def section_guidance(out: Path, args) -> dict:
    """CFG vs APG at a high scale (same seeds, side by side), and AG's saving of network evaluations."""
    import yaml

    from gen.data.images import save_grid
    from gen.guidance import APG, CFG, AdaptiveGuidance
    from gen.metrics import psnr, saturation
    from pipelines import ClassConditionalPipeline

    settings = yaml.safe_load((ROOT / "configs" / "guidance_digits.yaml").read_text())
    pipe = ClassConditionalPipeline.from_pretrained(ROOT / "checkpoints" / "digits-teacher")
    pipe.set_progress_bar_config(disable=True)
    steps, w, labels = settings["steps"], args.high_scale, torch.arange(10).repeat(4)
    apg_kw = settings["apg"]

    def run(guider, scale_labels=labels):
        return pipe(class_labels=scale_labels, num_inference_steps=steps, guider=guider, output_type="pt",
                    generator=torch.Generator().manual_seed(args.seed))

    cfg, apg = run(CFG(guidance_scale=w)), run(APG(guidance_scale=w, **apg_kw))
    # 4 rows of CFG above 4 rows of APG, the same noise in the same place
    grid = torch.cat([cfg.images, apg.images]) * 2 - 1
    path = save_grid(grid, out / "guidance_cfg_vs_apg.png", nrow=10, upscale=4)
    sat = {name: saturation(x.images * 2 - 1) for name, x in (("cfg", cfg), ("apg", apg))}
    logger.info("wrote %s: top 4 rows CFG w=%g, bottom 4 rows APG (eta=%g, beta=%g, r=%g); mean |x| %.3f vs %.3f",
                path, w, apg_kw["eta"], apg_kw["momentum"], apg_kw["norm_threshold"], sat["cfg"]["mean_abs"],
                sat["apg"]["mean_abs"])

    w_ag = args.guidance_scale
    base = run(CFG(guidance_scale=w_ag))
    ag = run(AdaptiveGuidance(inner=CFG(guidance_scale=w_ag), **settings["ag"]))
    result = {"high_scale": w, "apg": apg_kw, "saturation": sat, "ag": {
        "guidance_scale": w_ag, **settings["ag"], "nfe_cfg": base.nfe, "nfe_ag": ag.nfe,
        "nfe_saving": round(1 - ag.nfe / base.nfe, 4),
        "psnr_vs_cfg_db": round(float(psnr(ag.images * 2 - 1, base.images * 2 - 1, data_range=2.0).mean()), 2)}}
    (out / "guidance.json").write_text(json.dumps(result, indent=2))
    logger.info("AG (gamma_bar=%g, min_steps=%d) at w=%g: %.2f network evaluations per image vs %d for CFG "
                "(%.0f%% saved), PSNR %.1f dB against the CFG images", settings["ag"]["gamma_bar"],
                settings["ag"]["min_steps"], w_ag, ag.nfe, base.nfe,
                100 * result["ag"]["nfe_saving"], result["ag"]["psnr_vs_cfg_db"])
    return {"grid": str(path), **result["ag"]}


def _script_section(relpath: str):
    """The ``demo_section(out, args)`` of another eval script (each method's benchmark script owns its demo)."""

    def section(out: Path, args) -> dict:
        import importlib.util

        name = "demo_" + Path(relpath).stem
        spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.demo_section(out, args)

    section.__doc__ = f"demo_section of {relpath}"
    return section


SECTIONS = {
    "teacher": section_teacher,
    "guidance": section_guidance,
    "inverse": _script_section("eval/inverse.py"),
    "gbm": _script_section("eval/gbm.py"),
    "interpolants": _script_section("eval/interpolants.py"),
    "fdistill": _script_section("eval/fdistill.py"),
    "alignprop": _script_section("eval/alignprop.py"),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs", help="output folder")
    p.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance_scale", type=float, default=2.0, help="classifier-free guidance weight")
    p.add_argument("--high_scale", type=float, default=12.0, help="scale of the CFG-vs-APG comparison")
    p.add_argument("--num_fid_samples", type=int, default=500, help="samples for FID-digits")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, t0 = {}, time.time()
    for name in args.only or SECTIONS:
        logger.info("== %s ==", name)
        summary[name] = SECTIONS[name](out, args)
    summary["wall_time_s"] = round(time.time() - t0, 1)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("demo done in %.0f s; outputs in %s", summary["wall_time_s"], out)
    return summary


if __name__ == "__main__":
    from gen.cli import run_main

    run_main(main)
