"""Benchmark multiplicative (GBM) diffusion against the additive DDPM teacher trained with the same network and budget.

    python eval/gbm.py --out outputs/gbm                                   # everything below, defaults
    python eval/gbm.py --out outputs/gbm --only gbm_stochastic             # one part (parts merge into results.json)
    python eval/gbm.py --out outputs/gbm --report                          # rebuild plot + markdown from results.json

Parts (N samples each, balanced labels, the same seed, FID-digits against digits16-test, class accuracy):
- ``gbm_deterministic``: the log-space deterministic sampler (ours) at ``--ddim_steps``;
- ``gbm_stochastic``: the paper's DLS at ``--dls_steps`` and UMS at ``--ums_steps`` (1000 = every training level);
- ``baseline``: the additive teacher (``checkpoints/digits-teacher``, same UNet preset, batch, steps, optimizer, EMA)
  with DDIM at ``--baseline_steps``;
- ``baseline_stochastic``: the same teacher with DDPM ancestral sampling at ``--baseline_ddpm_steps``.
Writes ``results.json`` (merged across parts), ``gbm_fid_vs_steps.png``, ``rows.md`` and a sample grid.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

logger = logging.getLogger("eval.gbm")
PARTS = ("gbm_deterministic", "gbm_stochastic", "baseline", "baseline_stochastic")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _measure(pipe, runs, args, extractor, model: str) -> list[dict]:
    from gen.metrics.evaluate import compute_fid_for_images, sample_pipeline_uint8

    rows = []
    for sampler, steps in runs:
        kwargs = {} if sampler.endswith("-additive") else {"sampler": sampler}
        t0 = time.time()
        images, labels, nfe = sample_pipeline_uint8(pipe, args.num_samples, steps, args.guidance_scale,
                                                    batch_size=args.batch_size, seed=args.seed, progress=False,
                                                    **kwargs)
        wall = time.time() - t0
        res = compute_fid_for_images(images, labels, extractor=extractor, ref="test", progress=False)
        extra = {}
        if sampler == "ums":
            extra["ums_clamped_values"] = int(pipe.scheduler.nonpositive_count)  # of the last batch
        row = {"model": model, "sampler": sampler, "steps": steps, "nfe": nfe, "guidance_scale": args.guidance_scale,
               "fid": round(res["fid"], 3), "class_accuracy": round(res["class_accuracy"], 4), "n": res["n"],
               "sample_wall_s": round(wall, 1), **extra}
        rows.append(row)
        logger.info("%s %s %d steps: FID-digits %.2f, accuracy %.1f%%, %.0f s", model, sampler, steps, row["fid"],
                    100 * row["class_accuracy"], wall)
    return rows


def run_part(part: str, args, extractor) -> list[dict]:
    from pipelines import ClassConditionalPipeline
    from pipelines.gbm import GBMPipeline

    if part == "baseline":
        pipe = ClassConditionalPipeline.from_pretrained(args.baseline)
        return _measure(pipe, [("ddim-additive", s) for s in _ints(args.baseline_steps)], args, extractor,
                        args.baseline)
    if part == "baseline_stochastic":  # DDPM ancestral sampling of the same teacher
        pipe = ClassConditionalPipeline.from_pretrained(args.baseline).use_scheduler("ddpm")
        return _measure(pipe, [("ddpm-additive", s) for s in _ints(args.baseline_ddpm_steps)], args, extractor,
                        args.baseline)
    pipe = GBMPipeline.from_pretrained(args.model)
    if part == "gbm_deterministic":
        runs = [("ddim", s) for s in _ints(args.ddim_steps)]
    else:
        runs = [("dls", s) for s in _ints(args.dls_steps)] + [("ums", s) for s in _ints(args.ums_steps)]
    return _measure(pipe, runs, args, extractor, args.model)


def sample_grid(args, out: Path) -> str:
    from gen.data.images import save_grid
    from pipelines.gbm import GBMPipeline

    pipe = GBMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(6)
    img = pipe(class_labels=labels, num_inference_steps=100, sampler="ddim", output_type="pt",
               generator=torch.Generator().manual_seed(args.seed)).images
    return str(save_grid(img * 2 - 1, out / "gbm_samples.png", nrow=6, upscale=4))


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
    ax.set_title(f"digits16, N={rows[0]['n']}, w={rows[0]['guidance_scale']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gbm_fid_vs_steps.png", dpi=120)
    plt.close(fig)
    return md


def demo_section(out: Path, args) -> dict:
    """`make demo`: a grid of GBM samples (one row per class) and the sign check of the DLS sampler."""
    from gen.data.images import save_grid
    from pipelines.gbm import GBMPipeline

    pipe = GBMPipeline.from_pretrained(ROOT / "checkpoints" / "digits-gbm")
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(8)
    t0 = time.time()
    det = pipe(class_labels=labels, num_inference_steps=50, sampler="ddim", output_type="pt",
               generator=torch.Generator().manual_seed(args.seed))
    dls = pipe(class_labels=labels[::4], num_inference_steps=200, sampler="dls", output_type="pt",
               generator=torch.Generator().manual_seed(args.seed))
    path = save_grid(det.images * 2 - 1, out / "gbm_samples.png", nrow=8, upscale=4)
    path_dls = save_grid(dls.images * 2 - 1, out / "gbm_samples_dls.png", nrow=10, upscale=4)
    logger.info("wrote %s (deterministic log-space sampler, 50 steps) and %s (Dale-Langevin, 200 steps), %.0f s",
                path, path_dls, time.time() - t0)
    return {"grid": str(path), "grid_dls": str(path_dls), "wall_time_s": round(time.time() - t0, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="checkpoints/digits-gbm", help="GBMPipeline folder")
    p.add_argument("--baseline", default="checkpoints/digits-teacher", help="ClassConditionalPipeline folder")
    p.add_argument("--out", default="outputs/gbm")
    p.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    p.add_argument("--report", action="store_true", help="only rebuild rows.md and the plot from results.json")
    p.add_argument("--num_samples", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=400)
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--ddim_steps", default="10,25,50,100,200")
    p.add_argument("--dls_steps", default="100,250,1000")
    p.add_argument("--ums_steps", default="1000")
    p.add_argument("--baseline_steps", default="10,25,50,100,200")
    p.add_argument("--baseline_ddpm_steps", default="100,1000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    for key in ("model", "baseline"):  # repo-relative defaults work from any working directory
        value = getattr(args, key)
        if not Path(value).exists() and (ROOT / value).exists():
            setattr(args, key, str(ROOT / value))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if not args.report:
        from gen.metrics.features import build_feature_extractor

        extractor = build_feature_extractor("digits")
        for part in args.only or PARTS:
            new = run_part(part, args, extractor)
            # re-read: another part may have finished meanwhile; replace rows of the same (model, sampler, steps)
            results = json.loads(path.read_text()) if path.exists() else {"rows": []}
            keys = {(r["model"], r["sampler"], r["steps"], r["n"], r["guidance_scale"]) for r in new}
            results["rows"] = [r for r in results["rows"]
                               if (r["model"], r["sampler"], r["steps"], r["n"], r["guidance_scale"]) not in keys]
            results["rows"] += new
            results["machine"] = (f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                                  f"torch {torch.__version__}")
            results["date"] = time.strftime("%Y-%m-%d")
            results["seed"] = args.seed
            path.write_text(json.dumps(results, indent=2))
        if set(args.only or PARTS) - {"baseline", "baseline_stochastic"}:
            results["grid"] = sample_grid(args, out)
            path.write_text(json.dumps(results, indent=2))
    if not results["rows"]:
        raise ValueError(f"no results in {path}; run without --report first")
    print(report(results, out))
    return results


if __name__ == "__main__":
    from gen.cli import run_main

    run_main(main)
