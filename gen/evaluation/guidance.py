"""Guidance benchmark on the shipped digits teacher (``eval/guidance.py``): CFG vs APG across scales; AG and
LinearAG savings against CFG over seeds.

Same seeds for every method (one noise generator per run, seeded identically), DDIM at ``steps`` (default: the
``steps`` of ``configs/guidance_digits.yaml``, whose ``apg`` section also gives the APG defaults).

1. ``scales``: CFG and APG at each scale: FID-digits (vs digits16-test), class accuracy, saturation (fraction of
   pixels clipped at the range ends, and mean |x|), sampling wall time; then the APG wall-time overhead against CFG
   (``overhead_repeats`` interleaved runs at ``overhead_scale``).
2. ``adaptive``: AG with inner CFG at ``ag_scale`` for every spec of ``ag_settings`` (:func:`parse_ag_setting`:
   ``default`` for AdaptiveGuidance's defaults, ``criterion[:gamma_bar[:min_steps[:after_switch[:refresh_every]]]]``,
   or ``step:N[:after_switch[:refresh_every]]`` for the fixed-step "Step AG" baseline) and LinearAG (coefficients
   from ``eval/calibrate_linear_ag.py``), for every seed of ``seeds`` against CFG from the same noise: NFE per image,
   FID-digits and its difference to CFG's (paired per seed; mean and spread over seeds), mean per-image PSNR against
   CFG's images (and the pooled PSNR of the mean squared error), class accuracy, whether AG warned that every sample
   switched off at step 0.

Writes ``results.json``, ``guidance.png`` (FID-digits and saturation against scale) and ``rows.md`` under ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time

import torch

from gen.evaluation import option, output_path, repo_path

logger = logging.getLogger("gen.evaluation.guidance")
PARTS = ("all", "scales", "adaptive")
DEFAULT_AG_SETTINGS = ["default", "eps_cosine:0.999:10", "x0_cosine:0.9995", "x0_cosine:0.9995::frozen_eps_delta",
                       "step:12"]


@dataclasses.dataclass
class GuidanceSettings:
    pipeline: str = option("checkpoints/digits-teacher", "ClassConditionalPipeline folder")
    settings_file: str = option("configs/guidance_digits.yaml", "tuned settings (steps, APG defaults)")
    num_samples: int = option(500, "samples per row and seed")
    steps: int | None = option(None, "DDIM steps (default: steps of the settings file)")
    scales: list[float] = option([1.5, 3.0, 5.0, 8.0, 12.0, 20.0], "scales of the CFG / APG sweep")
    seed: int = option(0, "seed of the CFG / APG scale sweep")
    seeds: list[int] = option([0, 1, 2], "seeds of the AG comparison")
    only: str = option("all", "run only the scale sweep (with the APG overhead) or only the AG comparison",
                       choices=PARTS)
    apg_eta: float | None = option(None, "APG eta (default: the settings file)")
    apg_momentum: float | None = option(None, "APG momentum (default: the settings file)")
    apg_r: float | None = option(None, "APG norm threshold r, L2 over the 16x16 x0 (default: the settings file)")
    ag_scale: float = option(3.0, "scale of the AG / LinearAG comparison")
    ag_settings: list[str] = option(DEFAULT_AG_SETTINGS, "AG runs: 'default', criterion[:gamma_bar[:min_steps"
                                    "[:after_switch[:refresh_every]]]] or step:N[:after_switch[:refresh_every]]")
    overhead_repeats: int = option(7, "interleaved CFG / APG timing runs (0: skip)")
    overhead_scale: float = option(8.0, "scale of the APG overhead timing")
    linear_ag: str = option("checkpoints/digits-teacher/linear_ag", "folder of eval/calibrate_linear_ag.py ('' "
                                                                    "to skip LinearAG)")
    batch_size: int = option(250, "sampling batch")
    out: str = option("outputs/guidance", "output folder (results.json, rows.md, guidance.png)")
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")

    def __post_init__(self):
        if self.only not in PARTS:
            raise ValueError(f"only={self.only!r}; allowed: {', '.join(PARTS)}")
        for name in ("num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (FID needs two samples); got {self.num_samples}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        if self.only != "scales" and not self.seeds:
            raise ValueError("seeds needs at least one seed for the AG comparison")
        for spec in self.ag_settings:  # a bad spec (unknown criterion, gamma_bar outside (0, 1]) fails here
            parse_ag_setting(spec, self.ag_scale)


def load_settings(path="configs/guidance_digits.yaml") -> dict:
    """The tuned digits guidance settings (APG eta/momentum/r, AG section, steps)."""
    import yaml

    return yaml.safe_load(repo_path(path).read_text())


def _resolved(settings: GuidanceSettings) -> GuidanceSettings:
    """``settings`` with the defaults of the settings file filled in (steps, APG eta / momentum / r)."""
    tuned = load_settings(settings.settings_file)
    apg = tuned["apg"]
    return dataclasses.replace(
        settings, steps=settings.steps or tuned["steps"],
        apg_eta=apg["eta"] if settings.apg_eta is None else settings.apg_eta,
        apg_momentum=apg["momentum"] if settings.apg_momentum is None else settings.apg_momentum,
        apg_r=apg["norm_threshold"] if settings.apg_r is None else settings.apg_r)


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


def pooled_psnr(a, b, data_range: float = 2.0, cap: float = 100.0) -> float:
    """PSNR of the mean squared error over all images (a per-image mean would be infinite for identical images);
    identical sets count as ``cap`` dB."""
    import math

    mse = float(((a.double() - b.double()) ** 2).mean())
    return cap if mse == 0 else min(cap, 10 * math.log10(data_range**2 / mse))


def mean_psnr(a, b, data_range: float = 2.0, cap: float = 100.0) -> float:
    """Mean over images of the per-image PSNR (dB); an image identical to its reference counts as ``cap`` dB."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    per = 10 * torch.log10(data_range**2 / mse.clamp_min(data_range**2 * 10 ** (-cap / 10)))
    return float(per.mean())


def parse_ag_setting(spec: str, w: float):
    """``(label, guider)`` for an AG spec ``criterion[:gamma_bar[:min_steps[:after_switch[:refresh_every]]]]``
    (empty fields keep the defaults), ``default`` (AdaptiveGuidance's defaults) or
    ``step:N[:after_switch[:refresh_every]]`` (Step AG: CFG on the first N steps)."""
    from gen.guidance import CFG, AdaptiveGuidance

    if spec == "default":
        g = AdaptiveGuidance(inner=CFG(guidance_scale=w))
        return f"AG defaults ({_describe(g)})", g
    parts = spec.split(":")
    if parts[0] == "step":
        if len(parts) not in (2, 3, 4) or not parts[1].isdigit() or (len(parts) == 4 and not parts[3].isdigit()):
            raise ValueError(f"Step AG is written step:<guided steps>[:<after_switch>[:<refresh_every>]]; got "
                             f"{spec!r}")
        after = parts[2] if len(parts) >= 3 and parts[2] else "cond"
        refresh = int(parts[3]) if len(parts) == 4 else 0
        label = f"Step AG (CFG on the first {parts[1]} steps)" + ("" if after == "cond" else f", {after}") + (
            f", refresh every {refresh}" if refresh else "")
        return label, AdaptiveGuidance(inner=CFG(guidance_scale=w), criterion="step", min_steps=int(parts[1]),
                                       after_switch=after, refresh_every=refresh)
    keys = ("criterion", "gamma_bar", "min_steps", "after_switch", "refresh_every")
    if len(parts) > len(keys):
        raise ValueError(f"AG spec {spec!r} has more than {len(keys)} fields")
    kw = {k: v for k, v in zip(keys, parts) if v != ""}
    try:
        if "gamma_bar" in kw:
            kw["gamma_bar"] = float(kw["gamma_bar"])
        for key in ("min_steps", "refresh_every"):
            if key in kw:
                kw[key] = int(kw[key])
    except ValueError:
        raise ValueError(f"AG spec {spec!r}: gamma_bar must be a number, min_steps and refresh_every integers "
                         "(criterion[:gamma_bar[:min_steps[:after_switch[:refresh_every]]]])") from None
    g = AdaptiveGuidance(inner=CFG(guidance_scale=w), **kw)
    return f"AG {_describe(g)}", g


def _describe(g) -> str:
    c = g.config
    text = (f"{c['criterion']}, gamma_bar={c['gamma_bar']:g}, min_steps={c['min_steps']}, "
            f"after_switch={c['after_switch']}")
    return text + (f", refresh_every={c['refresh_every']}" if c.get("refresh_every") else "")


def run_adaptive(pipe, settings, extractor) -> dict:
    """AG (and LinearAG) against CFG at ``settings.ag_scale`` for every seed: paired differences, then mean and
    sample standard deviation over seeds."""
    import statistics
    import warnings

    from gen.guidance import CFG, LinearAG

    w = settings.ag_scale
    candidates = [parse_ag_setting(spec, w) for spec in settings.ag_settings]
    lag_dir = repo_path(settings.linear_ag) if settings.linear_ag else None
    if lag_dir is not None and lag_dir.is_dir():
        lag = LinearAG.from_pretrained(lag_dir)
        if lag.config.num_inference_steps == settings.steps:
            candidates.append(("LinearAG", LinearAG.from_config({**lag.config, "guidance_scale": w})))
        else:
            logger.warning("LinearAG in %s was fitted for %d steps, not %d: skipped", settings.linear_ag,
                           lag.config.num_inference_steps, settings.steps)
    per_seed = []
    for seed in settings.seeds:
        cfg_images, labels, cfg_nfe, cfg_wall = sample(pipe, CFG(guidance_scale=w), settings.num_samples,
                                                       settings.steps, seed, settings.batch_size)
        cfg_row = {"method": "CFG", "seed": seed, "nfe": cfg_nfe, "wall_s": round(cfg_wall, 2),
                   **evaluate(cfg_images, labels, extractor)}
        per_seed.append(cfg_row)
        logger.info("seed %d CFG w=%g: FID %.2f", seed, w, cfg_row["fid"])
        for name, guider in candidates:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                images, labels, nfe, wall = sample(pipe, guider, settings.num_samples, settings.steps, seed,
                                                   settings.batch_size)
            row = {"method": name, "seed": seed, "nfe": nfe, "nfe_saving": 1 - nfe / cfg_nfe,
                   "psnr_vs_cfg": mean_psnr(images, cfg_images), "pooled_psnr_vs_cfg": pooled_psnr(images, cfg_images),
                   "wall_s": round(wall, 2), "warned_all_off_at_step0": any("step 0" in str(c.message) for c in caught),
                   **evaluate(images, labels, extractor)}
            row["fid_vs_cfg"] = row["fid"] / cfg_row["fid"] - 1
            per_seed.append(row)
            logger.info("seed %d %s: NFE %.2f (%.1f%% saved), FID %.2f (%+.1f%%), PSNR %.2f dB", seed, name, nfe,
                        100 * row["nfe_saving"], row["fid"], 100 * row["fid_vs_cfg"], row["psnr_vs_cfg"])

    def ms(values):
        values = [float(v) for v in values]
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    summary = []
    for name in ["CFG"] + [n for n, _ in candidates]:
        rs = [r for r in per_seed if r["method"] == name]
        entry = {"method": name, "seeds": [r["seed"] for r in rs]}
        for key in ("nfe", "fid", "class_accuracy", "nfe_saving", "fid_vs_cfg", "psnr_vs_cfg", "pooled_psnr_vs_cfg",
                    "frac_white"):
            if key in rs[0]:
                m, sd = ms(r[key] for r in rs)
                entry[key], entry[key + "_std"] = m, sd
        if name != "CFG":
            entry["warned_all_off_at_step0"] = any(r["warned_all_off_at_step0"] for r in rs)
            entry["meets_target"] = bool(entry["nfe_saving"] >= 0.20 and abs(entry["fid_vs_cfg"]) <= 0.02
                                         and entry["psnr_vs_cfg"] >= 30.0)
        summary.append(entry)
    return {"guidance_scale": w, "steps": settings.steps, "num_samples": settings.num_samples,
            "seeds": settings.seeds, "per_seed": per_seed, "summary": summary}


def adaptive_rows(res: dict) -> str:
    lines = [f"| method (w={res['guidance_scale']:g}) | NFE / image | NFE saved | FID-digits | FID vs CFG | "
             "PSNR vs CFG (dB, mean per image) | class acc. | target met |", "|---|---|---|---|---|---|---|---|"]
    for e in res["summary"]:
        if e["method"] == "CFG":
            lines.append(f"| CFG | {e['nfe']:.2f} | - | {e['fid']:.2f} ± {e['fid_std']:.2f} | - | - | "
                         f"{100 * e['class_accuracy']:.1f} % | |")
            continue
        warn = " (warned: all off at step 0)" if e.get("warned_all_off_at_step0") else ""
        lines.append(f"| {e['method']}{warn} | {e['nfe']:.2f} | {100 * e['nfe_saving']:.1f} % | {e['fid']:.2f} ± "
                     f"{e['fid_std']:.2f} | {100 * e['fid_vs_cfg']:+.1f} ± {100 * e['fid_vs_cfg_std']:.1f} % | "
                     f"{e['psnr_vs_cfg']:.2f} ± {e['psnr_vs_cfg_std']:.2f} | {100 * e['class_accuracy']:.1f} % | "
                     f"{'yes' if e['meets_target'] else 'no'} |")
    return "\n".join(lines) + "\n"


def build_guiders(settings):
    from gen.guidance import APG, CFG

    def apg(w):
        return APG(guidance_scale=w, eta=settings.apg_eta, momentum=settings.apg_momentum,
                   norm_threshold=settings.apg_r)

    return {"cfg": lambda w: CFG(guidance_scale=w), "apg": apg}


def guider_overhead(pipe, settings, batch: int = 64) -> dict:
    """Median wall time of whole sampling runs with CFG and with APG at one scale, interleaved so that drift in
    machine load hits both alike (same labels, noise, steps)."""
    import statistics

    from gen.guidance import APG, CFG

    w = settings.overhead_scale
    labels = torch.arange(batch) % pipe.num_classes
    guiders = {"cfg": CFG(guidance_scale=w), "apg": APG(guidance_scale=w, eta=settings.apg_eta,
                                                        momentum=settings.apg_momentum, norm_threshold=settings.apg_r)}
    times = {k: [] for k in guiders}
    for rep in range(settings.overhead_repeats + 1):  # the first round warms up
        for name, guider in guiders.items():
            t0 = time.perf_counter()
            pipe(class_labels=labels, num_inference_steps=settings.steps, guider=guider, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
            if rep:
                times[name].append(time.perf_counter() - t0)
    cfg_t, apg_t = statistics.median(times["cfg"]), statistics.median(times["apg"])
    return {"guidance_scale": w, "batch": batch, "steps": settings.steps, "repeats": settings.overhead_repeats,
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


def run(settings: GuidanceSettings, command: str = "") -> dict:
    """The parts of ``settings.only``; writes ``results.json``, ``rows.md`` and (scale sweep) ``guidance.png``."""
    from gen.data.digits import load_digits16
    from gen.metrics.features import build_feature_extractor
    from pipelines import ClassConditionalPipeline

    settings = _resolved(settings)
    out = output_path(settings.out, settings.update_shipped)
    out.mkdir(parents=True, exist_ok=True)
    pipe = ClassConditionalPipeline.from_pretrained(repo_path(settings.pipeline))
    pipe.set_progress_bar_config(disable=True)
    extractor = build_feature_extractor("digits")
    real_x, real_y = load_digits16("train")
    real = evaluate(real_x, real_y, extractor)
    logger.info("real train vs test: %s", real)

    rows, guiders = [], build_guiders(settings)
    if settings.only in ("all", "scales"):
        for w in settings.scales:
            for method, make in guiders.items():
                images, labels, nfe, wall = sample(pipe, make(w), settings.num_samples, settings.steps, settings.seed,
                                                   settings.batch_size)
                rows.append({"method": method, "guidance_scale": w, "nfe": nfe, "wall_s": round(wall, 2),
                             **evaluate(images, labels, extractor)})
                logger.info("%s w=%g: %s", method, w, rows[-1])
    # AG and LinearAG at one scale, against CFG from the same seeds
    adaptive = run_adaptive(pipe, settings, extractor) if settings.only in ("all", "adaptive") else None
    overhead = guider_overhead(pipe, settings) if settings.overhead_repeats > 0 and settings.only != "adaptive" \
        else None
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} "
              "torch threads", "command": command, "num_samples": settings.num_samples,
              "steps": settings.steps, "seed": settings.seed, "scheduler": "ddim",
              "apg": {"eta": settings.apg_eta, "momentum": settings.apg_momentum, "r": settings.apg_r},
              "real_train_vs_test": real, "scales": rows, "adaptive": adaptive, "overhead": overhead}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    if rows:
        plot(rows, real, out / "guidance.png")
    result["markdown"] = markdown(result)
    (out / "rows.md").write_text(result["markdown"])
    return result


def markdown(result: dict) -> str:
    """Markdown rows of a :func:`run` result (scale sweep, AG comparison, APG overhead)."""
    lines, rows, adaptive, overhead = [], result["scales"], result["adaptive"], result["overhead"]
    if rows:
        lines += ["| method | w | NFE | FID-digits | class acc. | % white | % clipped | mean abs | wall s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method'].upper()} | {r['guidance_scale']:g} | {r['nfe']:g} | {r['fid']:.2f} | "
                         f"{100 * r['class_accuracy']:.1f} | {100 * r['frac_white']:.2f} | "
                         f"{100 * r['frac_clipped']:.1f} | {r['mean_abs']:.3f} | {r['wall_s']:.1f} |")
    if adaptive:
        lines += ["", adaptive_rows(adaptive)]
    if overhead:
        lines += ["", f"APG vs CFG wall time (w={overhead['guidance_scale']:g}, batch {overhead['batch']}, "
                  f"{overhead['steps']} steps, median of {overhead['repeats']} interleaved runs): "
                  f"CFG {overhead['cfg_median_s']:.3f} s, APG {overhead['apg_median_s']:.3f} s, "
                  f"overhead {100 * overhead['overhead']:+.1f}%"]
    return "\n".join(lines) + "\n"
