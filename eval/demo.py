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


SECTIONS = {"teacher": section_teacher}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs", help="output folder")
    p.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--guidance_scale", type=float, default=2.0, help="classifier-free guidance weight")
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
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
