"""Guidance benchmark on the shipped digits teacher: CFG vs APG across scales; AG and LinearAG savings.

    python eval/guidance.py --out outputs/guidance [--num_samples 500] [--steps 20]

Same seeds for every method (one noise generator per run, seeded identically), DDIM.
1. CFG and APG at each scale: FID-digits (vs digits16-test), class accuracy, saturation (fraction of pixels
   clipped at the range ends, and mean |x|), sampling wall time.
2. AG (several gamma_bar, inner CFG) and LinearAG (coefficients from eval/calibrate_linear_ag.py) at one scale:
   NFE per image, PSNR against the CFG image of the same seed, FID-digits.
Writes ``results.json``, ``guidance.png`` (FID-digits and saturation against scale) and ``rows.md``.
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

logger = logging.getLogger("eval.guidance")


def load_settings(path=ROOT / "configs" / "guidance_digits.yaml") -> dict:
    """The tuned digits guidance settings (APG eta/momentum/r, AG gamma_bar, steps)."""
    import yaml

    return yaml.safe_load(Path(path).read_text())


def sample(pipe, guider, num_samples: int, steps: int, seed: int, batch_size: int = 250):
    """Float images [N,1,H,W] in [-1,1], balanced labels, mean NFE per image, wall seconds."""
    labels = torch.arange(num_samples) % pipe.num_classes
    gen = torch.Generator().manual_seed(seed)
    chunks, nfe, t0 = [], 0.0, time.perf_counter()
    for start in range(0, num_samples, batch_size):
        lab = labels[start:start + batch_size]
        out = pipe(class_labels=lab, num_inference_steps=steps, guider=guider, generator=gen, output_type="pt")
        chunks.append(out.images * 2 - 1)
        nfe += out.nfe * len(lab)
    return torch.cat(chunks), labels, nfe / num_samples, time.perf_counter() - t0


def evaluate(images, labels, extractor) -> dict:
    from gen.data.images import to_uint8
    from gen.metrics import saturation
    from gen.metrics.evaluate import compute_fid_for_images

    res = compute_fid_for_images(to_uint8(images), labels, extractor=extractor, ref="test", progress=False)
    sat = saturation(images)
    return {"fid": res["fid"], "class_accuracy": res["class_accuracy"], **sat,
            "frac_white": float((images.clamp(-1, 1) >= 1 - 1 / 255).float().mean())}


def pooled_psnr(a, b, data_range: float = 2.0) -> float:
    """PSNR of the mean squared error over all images (identical images would make a per-image mean infinite)."""
    import math

    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def build_guiders(args):
    from gen.guidance import APG, CFG

    def apg(w):
        return APG(guidance_scale=w, eta=args.apg_eta, momentum=args.apg_momentum, norm_threshold=args.apg_r)

    return {"cfg": lambda w: CFG(guidance_scale=w), "apg": apg}


def guider_overhead(pipe, args, batch: int = 64) -> dict:
    """Median wall time of whole sampling runs with CFG and with APG at one scale, interleaved so that drift in
    machine load hits both alike (same labels, noise, steps)."""
    import statistics

    from gen.guidance import APG, CFG

    w = args.overhead_scale
    labels = torch.arange(batch) % pipe.num_classes
    guiders = {"cfg": CFG(guidance_scale=w), "apg": APG(guidance_scale=w, eta=args.apg_eta,
                                                        momentum=args.apg_momentum, norm_threshold=args.apg_r)}
    times = {k: [] for k in guiders}
    for rep in range(args.overhead_repeats + 1):  # the first round warms up
        for name, guider in guiders.items():
            t0 = time.perf_counter()
            pipe(class_labels=labels, num_inference_steps=args.steps, guider=guider, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
            if rep:
                times[name].append(time.perf_counter() - t0)
    cfg_t, apg_t = statistics.median(times["cfg"]), statistics.median(times["apg"])
    return {"guidance_scale": w, "batch": batch, "steps": args.steps, "repeats": args.overhead_repeats,
            "cfg_median_s": round(cfg_t, 4), "apg_median_s": round(apg_t, 4), "overhead": round(apg_t / cfg_t - 1, 4)}


def plot(rows, real, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for method, style in (("cfg", "o-"), ("apg", "s-")):
        r = [x for x in rows if x["method"] == method]
        w = [x["guidance_scale"] for x in r]
        axes[0].plot(w, [x["fid"] for x in r], style, label=method.upper())
        axes[1].plot(w, [100 * x["frac_white"] for x in r], style, label=method.upper())
        axes[2].plot(w, [100 * x["class_accuracy"] for x in r], style, label=method.upper())
    axes[0].axhline(real["fid"], color="gray", ls="--", label="train vs test")
    axes[1].axhline(100 * real["frac_white"], color="gray", ls="--", label="real data")
    scales = sorted({x["guidance_scale"] for x in rows})
    for ax, title in zip(axes, ("FID-digits (lower is better)", "% pixels saturated white", "class accuracy %")):
        ax.set_xscale("log")
        ax.set_xticks(scales, [f"{w:g}" for w in scales])
        ax.minorticks_off()
        ax.set_xlabel("guidance scale w")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", default=str(ROOT / "checkpoints" / "digits-teacher"))
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=load_settings()["steps"])
    p.add_argument("--scales", type=float, nargs="+", default=[1.5, 3, 5, 8, 12, 20])
    p.add_argument("--seed", type=int, default=0)
    defaults = load_settings()
    p.add_argument("--apg_eta", type=float, default=defaults["apg"]["eta"])
    p.add_argument("--apg_momentum", type=float, default=defaults["apg"]["momentum"])
    p.add_argument("--apg_r", type=float, default=defaults["apg"]["norm_threshold"],
                   help="APG norm threshold r (L2 over the 16x16 x0)")
    p.add_argument("--ag_scale", type=float, default=3.0, help="scale for the AG / LinearAG comparison")
    p.add_argument("--ag_settings", nargs="+",
                   default=["0.999:0", "0.999:6", "0.999:8", "0.999:9", "0.999:10", "0.9995:6", "0.9995:8"],
                   help="AG runs as gamma_bar:min_steps")
    p.add_argument("--overhead_repeats", type=int, default=7, help="interleaved CFG/APG timing runs (0 = skip)")
    p.add_argument("--overhead_scale", type=float, default=8.0)
    p.add_argument("--linear_ag", default=str(ROOT / "checkpoints" / "digits-teacher" / "linear_ag"),
                   help="folder written by eval/calibrate_linear_ag.py ('' to skip)")
    p.add_argument("--out", default="outputs/guidance")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from gen.data.digits import load_digits16
    from gen.guidance import CFG, AdaptiveGuidance, LinearAG
    from gen.metrics.features import build_feature_extractor
    from pipelines import ClassConditionalPipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = ClassConditionalPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    extractor = build_feature_extractor("digits")
    real_x, real_y = load_digits16("train")
    real = evaluate(real_x, real_y, extractor)
    logger.info("real train vs test: %s", real)

    rows, guiders, cfg_images = [], build_guiders(args), {}
    for w in args.scales:
        for method, make in guiders.items():
            images, labels, nfe, wall = sample(pipe, make(w), args.num_samples, args.steps, args.seed)
            if method == "cfg":
                cfg_images[w] = images
            rows.append({"method": method, "guidance_scale": w, "nfe": nfe, "wall_s": round(wall, 2),
                         **evaluate(images, labels, extractor)})
            logger.info("%s w=%g: %s", method, w, rows[-1])

    # AG and LinearAG at one scale, against CFG from the same seeds
    w = args.ag_scale
    if w not in cfg_images:
        cfg_images[w], _, _, _ = sample(pipe, CFG(guidance_scale=w), args.num_samples, args.steps, args.seed)
    cfg_ref = cfg_images[w]
    cfg_row = next((r for r in rows if r["method"] == "cfg" and r["guidance_scale"] == w), None)
    savings = []
    candidates = []
    for setting in args.ag_settings:
        g, _, m = setting.partition(":")
        candidates.append((f"ag(gamma_bar={g}, min_steps={m or 0})",
                           AdaptiveGuidance(inner=CFG(guidance_scale=w), gamma_bar=float(g), min_steps=int(m or 0))))
    if args.linear_ag and Path(args.linear_ag).is_dir():
        lag = LinearAG.from_pretrained(args.linear_ag)
        if lag.config.num_inference_steps == args.steps:
            candidates.append(("linear_ag", LinearAG.from_config({**lag.config, "guidance_scale": w})))
        else:
            logger.warning("LinearAG in %s was fitted for %d steps, not %d: skipped", args.linear_ag,
                           lag.config.num_inference_steps, args.steps)
    for name, guider in candidates:
        images, labels, nfe, wall = sample(pipe, guider, args.num_samples, args.steps, args.seed)
        row = {"method": name, "guidance_scale": w, "nfe": nfe, "nfe_saving": 1 - nfe / (2 * args.steps),
               "psnr_vs_cfg": pooled_psnr(images, cfg_ref), "wall_s": round(wall, 2),
               **evaluate(images, labels, extractor)}
        if cfg_row:
            row["fid_vs_cfg"] = row["fid"] / cfg_row["fid"] - 1
        savings.append(row)
        logger.info("%s: %s", name, row)

    overhead = guider_overhead(pipe, args) if args.overhead_repeats > 0 else None
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} "
              "torch threads", "command": " ".join(["python", *sys.argv]), "num_samples": args.num_samples,
              "steps": args.steps, "seed": args.seed, "scheduler": "ddim",
              "apg": {"eta": args.apg_eta, "momentum": args.apg_momentum, "r": args.apg_r},
              "real_train_vs_test": real, "scales": rows, "adaptive": savings, "overhead": overhead}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(rows, real, out / "guidance.png")
    lines = ["| method | w | NFE | FID-digits | class acc. | % white | % clipped | mean abs | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method'].upper()} | {r['guidance_scale']:g} | {r['nfe']:g} | {r['fid']:.2f} | "
                     f"{100 * r['class_accuracy']:.1f} | {100 * r['frac_white']:.2f} | {100 * r['frac_clipped']:.1f} | "
                     f"{r['mean_abs']:.3f} | {r['wall_s']:.1f} |")
    lines += ["", "| method | w | NFE | NFE saved | PSNR vs CFG (dB) | FID-digits | FID vs CFG | class acc. |",
              "|---|---|---|---|---|---|---|---|"]
    for r in savings:
        lines.append(f"| {r['method']} | {w:g} | {r['nfe']:.2f} | {100 * r['nfe_saving']:.1f}% | "
                     f"{r['psnr_vs_cfg']:.2f} | {r['fid']:.2f} | {100 * r.get('fid_vs_cfg', float('nan')):+.1f}% | "
                     f"{100 * r['class_accuracy']:.1f} |")
    if overhead:
        lines += ["", f"APG vs CFG wall time (w={overhead['guidance_scale']:g}, batch {overhead['batch']}, "
                  f"{overhead['steps']} steps, median of {overhead['repeats']} interleaved runs): "
                  f"CFG {overhead['cfg_median_s']:.3f} s, APG {overhead['apg_median_s']:.3f} s, "
                  f"overhead {100 * overhead['overhead']:+.1f}%"]
    (out / "rows.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
