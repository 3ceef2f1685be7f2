"""Stochastic-interpolant benchmarks (``eval/interpolants.py``): 2-D side by side with torchcfm, digits FID against
NFE, the digits bridge.

1. **toys** (checkerboard, 8gaussians): the same ``gen.models.TimeMLP`` (same initial weights), optimiser, batch
   and steps, trained once with ``gen.interpolants.InterpolantLoss`` (one-sided linear, velocity) and once with
   torchcfm's ``ConditionalFlowMatcher(sigma=0)`` (if installed). A: each draws its own data, noise and times;
   training samples per second are timed in interleaved chunks (the two trainers alternate every ``chunk``
   steps, so load changes hit both alike). B ("paired"): both see the same (x0, x1, t) every step, so the two
   trained models differ only by the objectives' arithmetic. Sample quality at equal NFE: sliced Wasserstein-2
   (``sw_projections`` random directions) and MMD (RBF, 5 bandwidths) of ``toy_samples`` samples against as
   many exact ``gen.data.sample_toy`` samples, the same integrator code for both models (Euler at NFE = steps;
   midpoint and Heun at 2 NFE per step), and the noise floor (two exact sample sets).
2. **digits**: FID-digits (vs digits16-test, ``num_samples`` class-balanced samples, fixed seed) of
   ``checkpoints/digits-interpolant`` with the ODE (Euler, Heun) and the SDE (Euler-Maruyama, eps = sigma) at
   several NFE, and of the DDPM teacher ``checkpoints/digits-teacher`` with DDIM at equal NFE; unguided (w = 1)
   and one guided setting (the same w for both).
3. **bridge**: ``checkpoints/digits-bridge`` on the 360 test digits: PSNR to the clean digit, class accuracy of the
   shipped classifier and FID-digits, for the degraded input and the translated output.

Writes ``results.json``, ``toys.png``, ``digits_fid_vs_nfe.png``, ``bridge.png`` (rows: clean test digits, their
degraded observations, two translations with different base noise) and ``rows.md`` under ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from gen.evaluation import REPO_ROOT, option, output_path, repo_path
from gen.metrics.samples import mmd_rbf, sliced_wasserstein

logger = logging.getLogger("gen.evaluation.interpolants")
SECTIONS = ("toys", "digits", "bridge")


@dataclasses.dataclass
class InterpolantEvalSettings:
    out: str = option("outputs/interpolants", "output folder")
    only: list[str] = option(list(SECTIONS), "sections to run", choices=SECTIONS)
    threads: int = option(1, "torch threads")
    seed: int = option(0, "seed")
    toys: list[str] = option(["checkerboard", "8gaussians"], "2-D toy data sets")
    toy_steps: int = option(2000, "toy training steps")
    toy_batch: int = option(256, "toy batch")
    toy_lr: float = option(1e-3, "toy learning rate")
    mlp_hidden: int = option(256, "toy MLP width")
    mlp_depth: int = option(4, "toy MLP depth")
    chunk: int = option(100, "toy steps per interleaved timing chunk")
    toy_samples: int = option(5000, "toy samples for SW2 / MMD")
    toy_nfe: list[int] = option([4, 8, 16, 32], "toy NFE values")
    sw_projections: int = option(256, "sliced Wasserstein projections")
    skip_paired: bool = option(False, "skip the paired-draws toy comparison")
    interpolant: str = option("checkpoints/digits-interpolant", "InterpolantPipeline folder")
    teacher: str = option("checkpoints/digits-teacher", "ClassConditionalPipeline folder")
    num_samples: int = option(500, "digits samples per row")
    batch: int = option(250, "digits sampling batch")
    nfe: list[int] = option([8, 16], "digits NFE per branch (even: Heun uses 2 per step)")
    guidance_scales: list[float] = option([1.0, 2.0], "digits CFG weights")
    bridge: str = option("checkpoints/digits-bridge", "bridge InterpolantPipeline folder")
    bridge_steps: list[int] = option([10], "bridge ODE steps")
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")

    def __post_init__(self):
        if any(n % 2 for n in self.nfe):
            raise ValueError(f"nfe values must be even (Heun uses 2 per step); got {self.nfe}")


# ---------------------------------------------------------------------------------------------------------------
# 1. toys
def _toy_trainers(name: str, settings, paired: bool = False):
    """(our step, torchcfm step or None, our model, their model); same initial weights.

    ``paired=False``: each trainer draws its own batch, noise and times, its library's way (for the timing).
    ``paired=True``: both get the same (x0, x1, t) each step (torchcfm through its ``t=`` argument), so any
    difference between the two trained models is the objective's implementation, not the random draws.
    """
    from gen.data.toys import sample_toy
    from gen.interpolants import Interpolant, InterpolantLoss
    from gen.models import TimeMLP

    torch.manual_seed(settings.seed)
    ours = TimeMLP(dim=2, hidden=settings.mlp_hidden, depth=settings.mlp_depth)
    theirs = TimeMLP(dim=2, hidden=settings.mlp_hidden, depth=settings.mlp_depth)
    theirs.load_state_dict(ours.state_dict())
    opt_o = torch.optim.Adam(ours.parameters(), lr=settings.toy_lr)
    opt_t = torch.optim.Adam(theirs.parameters(), lr=settings.toy_lr)
    loss = InterpolantLoss(Interpolant("linear"), "velocity")
    gen_o = torch.Generator().manual_seed(settings.seed + 1)
    gen_t = torch.Generator().manual_seed(settings.seed + 1)
    shared = []  # paired mode: ours draws (x0, x1, t), theirs replays them

    def step_ours():
        x1 = sample_toy(name, settings.toy_batch, generator=gen_o)
        if paired:
            x0 = torch.randn(x1.shape, generator=gen_o)
            t = loss.sample_t(x1.shape[0], gen_o)
            shared.append((x0, x1, t))
            value, _ = loss(lambda x, tt: ours(x, tt), x1, x0=x0, t=t)
        else:
            value, _ = loss(lambda x, tt: ours(x, tt), x1, generator=gen_o)
        opt_o.zero_grad(set_to_none=True)
        value.backward()
        opt_o.step()
        return float(value.detach())

    step_theirs = None
    try:
        from torchcfm.conditional_flow_matching import ConditionalFlowMatcher
    except ImportError:
        logger.warning("torchcfm is not installed: the side-by-side columns are skipped (pip install torchcfm "
                       "--no-deps; POT)")
    else:
        fm = ConditionalFlowMatcher(sigma=0.0)
        torch_rng = torch.Generator().manual_seed(settings.seed + 2)

        def step_theirs():
            if paired:
                x0, x1, t = shared.pop(0)
                t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1, t=t.float())
            else:
                x1 = sample_toy(name, settings.toy_batch, generator=gen_t)
                x0 = torch.randn(x1.shape, generator=gen_t)
                # torchcfm draws t from the global RNG; reseed it from a generator for reproducibility
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=torch_rng)))
                t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            value = torch.mean((theirs(xt, t) - ut) ** 2)
            opt_t.zero_grad(set_to_none=True)
            value.backward()
            opt_t.step()
            return float(value.detach())

    return step_ours, step_theirs, ours, theirs


def _sample_toy_model(model, n: int, nfe: int, method: str, seed: int):
    """Integrate the velocity of ``model`` from N(0, I) at t = 0 to t = 1 with ``nfe`` network evaluations; the
    same integrator code for both libraries' models (torchcfm leaves integration to the user)."""
    from gen.interpolants import Interpolant, InterpolantSampler

    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sampler = InterpolantSampler(Interpolant("linear"), lambda xx, t: model(xx, t), "velocity")
        out = sampler.sample_ode(x, num_steps=nfe if method == "euler" else nfe // 2, method=method)
        assert sampler.nfe == nfe, (sampler.nfe, nfe)
        return out


def _train_pair(name, settings, paired):
    step_o, step_t, ours, theirs = _toy_trainers(name, settings, paired)
    times = {"ours": 0.0, "torchcfm": 0.0}
    losses = {"ours": [], "torchcfm": []}
    done = 0
    while done < settings.toy_steps:
        n = min(settings.chunk, settings.toy_steps - done)
        for lib, fn in (("ours", step_o), ("torchcfm", step_t)):
            if fn is None:
                continue
            t0 = time.perf_counter()
            for _ in range(n):
                losses[lib].append(fn())
            times[lib] += time.perf_counter() - t0
        done += n
    models = {"ours": ours} if step_t is None else {"ours": ours, "torchcfm": theirs}
    return models, times, losses


def _quality(models, name, settings, ref):
    rows = []
    for nfe in settings.toy_nfe:
        for method in ("euler", "midpoint", "heun"):
            if method != "euler" and nfe % 2:
                continue
            row = {"nfe": nfe, "method": method}
            for lib, model in models.items():
                x = _sample_toy_model(model, settings.toy_samples, nfe, method, settings.seed + 300)
                row[lib] = {"sw2": round(sliced_wasserstein(x, ref, settings.sw_projections), 4),
                            "mmd2": round(mmd_rbf(x, ref), 5)}
            rows.append(row)
    return rows


def run_toys(settings) -> dict:
    from gen.data.toys import sample_toy

    results = {}
    for name in settings.toys:
        ref = sample_toy(name, settings.toy_samples, generator=torch.Generator().manual_seed(settings.seed + 100))
        ref2 = sample_toy(name, settings.toy_samples, generator=torch.Generator().manual_seed(settings.seed + 200))
        entry = {"steps": settings.toy_steps, "batch": settings.toy_batch, "lr": settings.toy_lr,
                 "mlp": {"hidden": settings.mlp_hidden, "depth": settings.mlp_depth},
                 "noise_floor": {"sw2": round(sliced_wasserstein(ref, ref2, settings.sw_projections), 4),
                                 "mmd2": round(mmd_rbf(ref, ref2), 5)},
                 "train": {}}
        # A. independent draws: training throughput (interleaved chunks) and the quality of the two models
        models, times, losses = _train_pair(name, settings, paired=False)
        for lib in models:
            entry["train"][lib] = {"seconds": round(times[lib], 3),
                                   "samples_per_s": round(settings.toy_steps * settings.toy_batch / times[lib], 1),
                                   "final_loss_avg100": round(sum(losses[lib][-100:]) / len(losses[lib][-100:]), 4)}
        if "torchcfm" in models:
            entry["throughput_ratio"] = round(entry["train"]["ours"]["samples_per_s"]
                                              / entry["train"]["torchcfm"]["samples_per_s"], 3)
        entry["quality"] = _quality(models, name, settings, ref)
        # B. paired draws: the same (x0, x1, t) for both objectives
        if "torchcfm" in models and not settings.skip_paired:
            models, _, _ = _train_pair(name, settings, paired=True)
            diff = max(float((p - q).detach().abs().max()) for p, q in zip(models["ours"].parameters(),
                                                                           models["torchcfm"].parameters()))
            entry["paired"] = {"max_abs_weight_difference": diff, "quality": _quality(models, name, settings, ref)}
        results[name] = entry
        logger.info("%s: %s", name, json.dumps(entry["train"]))
    return results


# ---------------------------------------------------------------------------------------------------------------
# 2. digits
def _sample_pipe(pipe, num_samples, batch, seed, **kw):
    labels = torch.arange(num_samples) % 10
    gen = torch.Generator().manual_seed(seed)
    chunks, nfe, t0 = [], 0.0, time.perf_counter()
    for s in range(0, num_samples, batch):
        lab = labels[s:s + batch]
        out = pipe(class_labels=lab, generator=gen, output_type="pt", **kw)
        chunks.append(out.images * 2 - 1)
        nfe += out.nfe * len(lab)
    return torch.cat(chunks), labels, nfe / num_samples, time.perf_counter() - t0


def run_digits(settings) -> dict:
    from gen.data.images import to_uint8
    from gen.metrics import build_feature_extractor
    from gen.metrics.evaluate import compute_fid_for_images
    from pipelines import ClassConditionalPipeline, InterpolantPipeline

    extractor = build_feature_extractor("digits")
    ours = InterpolantPipeline.from_pretrained(settings.interpolant)
    teacher = ClassConditionalPipeline.from_pretrained(settings.teacher)
    for p in (ours, teacher):
        p.set_progress_bar_config(disable=True)
    rows = []

    def record(model, sampler, nfe_target, w, images, labels, nfe, wall):
        res = compute_fid_for_images(to_uint8(images), labels, extractor=extractor, ref="test", progress=False)
        row = {"model": model, "sampler": sampler, "nfe_per_branch": nfe_target, "guidance_scale": w,
               "nfe_per_image": nfe, "fid": round(res["fid"], 3), "class_accuracy": round(res["class_accuracy"], 4),
               "n": res["n"], "wall_s": round(wall, 1)}
        rows.append(row)
        logger.info("%s", json.dumps(row))

    # the floor at this sample count: real training digits against the test split
    from gen.data.digits import load_digits16

    real, real_labels = load_digits16("train")
    pick = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(settings.seed))[:settings.num_samples]
    record("real digits16-train (floor)", "-", 0, 1.0, real[pick], real_labels[pick], 0.0, 0.0)
    for w in settings.guidance_scales:
        for nfe in settings.nfe:
            settings = [("ode-euler", {"sampler": "ode", "method": "euler", "num_inference_steps": nfe}),
                        ("ode-heun", {"sampler": "ode", "method": "heun", "num_inference_steps": nfe // 2}),
                        ("sde-em", {"sampler": "sde", "method": "euler_maruyama", "num_inference_steps": nfe - 1})]
            for name, kw in settings:
                if w != 1.0 and name == "ode-euler":
                    continue  # guided: Heun and the SDE only, to save time
                imgs, labels, n_eval, wall = _sample_pipe(ours, settings.num_samples, settings.batch, settings.seed,
                                                          guidance_scale=w, **kw)
                record("interpolant", name, nfe, w, imgs, labels, n_eval, wall)
            imgs, labels, n_eval, wall = _sample_pipe(teacher, settings.num_samples, settings.batch, settings.seed,
                                                      guidance_scale=w, num_inference_steps=nfe)
            record("ddpm-teacher", "ddim", nfe, w, imgs, labels, n_eval, wall)
    return {"rows": rows, "num_samples": settings.num_samples, "interpolant": str(settings.interpolant),
            "teacher": str(settings.teacher)}


# ---------------------------------------------------------------------------------------------------------------
# 3. bridge
def bridge_test_set(settings):
    """Clean test digits [360,1,16,16], labels and their fixed degraded observations."""
    import yaml

    from gen.data.digits import load_digits16
    from gen.interpolants import degrade

    cfg = yaml.safe_load((Path(settings.bridge) / "train_config.yaml").read_text()) \
        if (Path(settings.bridge) / "train_config.yaml").is_file() else {}
    clean, labels = load_digits16("test")
    d = degrade(clean, cfg.get("degrade_factor", 4), cfg.get("degrade_noise_std", 0.2),
                generator=torch.Generator().manual_seed(settings.seed + 7))
    return clean, labels, d


def run_bridge(settings) -> dict:
    from gen.data.images import to_uint8
    from gen.metrics import build_feature_extractor, psnr
    from gen.metrics.evaluate import compute_fid_for_images
    from pipelines import InterpolantPipeline

    extractor = build_feature_extractor("digits")
    pipe = InterpolantPipeline.from_pretrained(settings.bridge)
    pipe.set_progress_bar_config(disable=True)
    clean, labels, d = bridge_test_set(settings)

    def metrics(x):
        res = compute_fid_for_images(to_uint8(x), labels, extractor=extractor, ref="test", progress=False)
        return {"psnr_db": round(float(psnr(x.clamp(-1, 1), clean).mean()), 3), "fid": round(res["fid"], 3),
                "class_accuracy": round(res["class_accuracy"], 4)}

    out = {"n": int(clean.shape[0]), "degraded": metrics(d.clamp(-1, 1)), "translated": [], "clean": metrics(clean)}
    for steps in settings.bridge_steps:
        t0 = time.perf_counter()
        x = pipe(source_images=d, num_inference_steps=steps, generator=torch.Generator().manual_seed(settings.seed),
                 output_type="pt").images * 2 - 1
        row = {"sampler": "ode-heun", "steps": steps, "nfe": 2 * steps, **metrics(x),
               "wall_s": round(time.perf_counter() - t0, 1)}
        # diversity: a second draw of the base noise for the same observations
        x2 = pipe(source_images=d, num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(settings.seed + 1)).images * 2 - 1
        row["psnr_between_two_draws_db"] = round(float(psnr(x, x2).mean()), 3)
        out["translated"].append(row)
        if steps == settings.bridge_steps[0]:
            idx = torch.arange(0, clean.shape[0], clean.shape[0] // 10)[:10]
            grid = torch.cat([clean[idx], d[idx].clamp(-1, 1), x[idx], x2[idx]])
            out["examples"] = str(save_bridge_grid(grid, Path(settings.out) / "bridge.png", steps))
        logger.info("bridge %s", json.dumps(row))
    return out


# ---------------------------------------------------------------------------------------------------------------
def plots(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots")
        return []
    written = []
    if "toys" in results:
        fig, axes = plt.subplots(1, len(results["toys"]), figsize=(5 * len(results["toys"]), 3.5), squeeze=False)
        for ax, (name, entry) in zip(axes[0], results["toys"].items()):
            for lib, style in (("ours", "-"), ("torchcfm", "--")):
                for method, color in (("euler", "C0"), ("midpoint", "C2"), ("heun", "C1")):
                    pts = [(r["nfe"], r[lib]["sw2"]) for r in entry["quality"] if r["method"] == method and lib in r]
                    if pts:
                        ax.plot(*zip(*pts), style, color=color, marker="o", label=f"{lib} {method}")
            ax.axhline(entry["noise_floor"]["sw2"], color="gray", lw=0.8, label="two exact sets")
            ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="sliced W2 to exact samples", title=name)
            ax.legend(fontsize=7)
        fig.suptitle("2-D toys: sample quality against NFE, gen.interpolants vs torchcfm (same MLP, steps, batch)",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "toys.png", dpi=120)
        plt.close(fig)
        written.append(str(out / "toys.png"))
    if "digits" in results:
        rows = [r for r in results["digits"]["rows"] if r["nfe_per_branch"] > 0]
        floor = [r["fid"] for r in results["digits"]["rows"] if r["nfe_per_branch"] == 0]
        curves = sorted({(r["model"], r["sampler"]) for r in rows})
        colors = {c: f"C{i}" for i, c in enumerate(curves)}
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, w in zip(axes, sorted({r["guidance_scale"] for r in rows})):
            for (model, sampler) in curves:
                pts = sorted((r["nfe_per_branch"], r["fid"]) for r in rows
                             if r["model"] == model and r["sampler"] == sampler and r["guidance_scale"] == w)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colors[(model, sampler)], label=f"{model} {sampler}")
            if floor:
                ax.axhline(floor[0], color="gray", lw=0.8, ls=":", label="real train digits (same N)")
            ax.set(xlabel="NFE per branch", ylabel="FID-digits (vs test)", title=f"w = {w:g}", yscale="log")
            ax.legend(fontsize=7)
        fig.suptitle("digits16: FID-digits against NFE, interpolant (ODE / SDE) vs the DDPM teacher (DDIM)",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "digits_fid_vs_nfe.png", dpi=120)
        plt.close(fig)
        written.append(str(out / "digits_fid_vs_nfe.png"))
    return written


def markdown_rows(results: dict) -> str:
    lines = []
    if "toys" in results:
        lines += ["| toy | NFE | integrator | SW2 ours | SW2 torchcfm | MMD^2 ours | MMD^2 torchcfm |",
                  "|---|---|---|---|---|---|---|"]
        for name, e in results["toys"].items():
            for r in e["quality"]:
                tc = r.get("torchcfm", {})
                lines.append(f"| {name} | {r['nfe']} | {r['method']} | {r['ours']['sw2']:.4f} | "
                             f"{tc.get('sw2', float('nan')):.4f} | {r['ours']['mmd2']:.5f} | "
                             f"{tc.get('mmd2', float('nan')):.5f} |")
        lines += ["", "| toy | ours samples/s | torchcfm samples/s | ratio | noise floor SW2 | paired: max weight "
                  "diff |", "|---|---|---|---|---|---|"]
        for name, e in results["toys"].items():
            tc = e["train"].get("torchcfm", {})
            pd = e.get("paired", {}).get("max_abs_weight_difference", float("nan"))
            lines.append(f"| {name} | {e['train']['ours']['samples_per_s']:.0f} | "
                         f"{tc.get('samples_per_s', float('nan')):.0f} | {e.get('throughput_ratio', float('nan'))} | "
                         f"{e['noise_floor']['sw2']:.4f} | {pd:.2e} |")
        paired = [(n, r) for n, e in results["toys"].items() for r in e.get("paired", {}).get("quality", [])]
        if paired:
            lines += ["", "| toy (paired draws) | NFE | integrator | SW2 ours | SW2 torchcfm |",
                      "|---|---|---|---|---|"]
            lines += [f"| {n} | {r['nfe']} | {r['method']} | {r['ours']['sw2']:.4f} | {r['torchcfm']['sw2']:.4f} |"
                      for n, r in paired]
        lines.append("")
    if "digits" in results:
        lines += ["| model | sampler | NFE/branch | w | NFE/image | FID-digits | class acc. |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["digits"]["rows"]:
            lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe_per_branch']} | {r['guidance_scale']:g} | "
                         f"{r['nfe_per_image']:g} | {r['fid']:.3f} | {100 * r['class_accuracy']:.1f}% |")
        lines.append("")
    if "bridge" in results:
        b = results["bridge"]
        lines += ["| bridge (360 test digits) | NFE | PSNR dB | FID-digits | class acc. | PSNR between 2 draws |",
                  "|---|---|---|---|---|---|",
                  f"| degraded input | - | {b['degraded']['psnr_db']:.2f} | {b['degraded']['fid']:.3f} | "
                  f"{100 * b['degraded']['class_accuracy']:.1f}% | - |"]
        for r in b["translated"]:
            lines.append(f"| translated (ODE Heun) | {r['nfe']} | {r['psnr_db']:.2f} | {r['fid']:.3f} | "
                         f"{100 * r['class_accuracy']:.1f}% | {r['psnr_between_two_draws_db']:.2f} |")
        lines.append(f"| clean test digits | - | inf | {b['clean']['fid']:.3f} | "
                     f"{100 * b['clean']['class_accuracy']:.1f}% | - |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
def save_bridge_grid(grid: torch.Tensor, path: Path, steps: int) -> Path:
    """Rows: clean test digits, their degraded observations, two translations with different base noise."""
    from gen.data.images import save_labelled_grid

    return save_labelled_grid(grid, path, nrow=10, upscale=4,
                              title=f"Interpolant bridge: degraded digit -> clean digit (ODE Heun, {steps} steps)",
                              row_labels=["clean", "degraded", "translated #1", "translated #2"])


def demo_section(out: Path, settings) -> dict:
    """Interpolant digits (one row per class, guided ODE) and a bridge example (clean / degraded / translated)."""
    from gen.data.images import save_labelled_grid
    from pipelines import InterpolantPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed = getattr(settings, "seed", 0)
    written = {}
    t0 = time.time()
    pipe = InterpolantPipeline.from_pretrained(REPO_ROOT / "checkpoints" / "digits-interpolant")
    pipe.set_progress_bar_config(disable=True)
    from gen.evaluation.demo import size

    per, steps = size(settings, 8, 1), size(settings, 10, 2)
    labels = torch.arange(10).repeat_interleave(per)
    w = getattr(settings, "guidance_scale", 2.0)
    res = pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=w, method="heun",
               generator=torch.Generator().manual_seed(seed), output_type="pt")
    written["interpolant_grid"] = str(save_labelled_grid(
        res.images * 2 - 1, out / "interpolant_digits.png", nrow=per, upscale=4,
        title=f"Stochastic interpolant (velocity model): ODE Heun, {steps} steps, CFG w={w:g}\nrows: class; "
              f"columns: {per} samples", row_labels=[f"class {c}" for c in range(10)]))
    logger.info("wrote %s (rows = classes 0-9, probability-flow ODE, Heun, %d steps = %d NFE with CFG w=%g, "
                "%.1f s)", written["interpolant_grid"], steps, res.nfe, w, time.time() - t0)
    bridge = REPO_ROOT / "checkpoints" / "digits-bridge"
    if (bridge / "model_index.json").is_file():
        t0 = time.time()
        clean, _, d = bridge_test_set(SimpleNamespace(bridge=str(bridge), seed=seed))
        idx = torch.arange(0, 360, 36)[:10]
        bp = InterpolantPipeline.from_pretrained(bridge)
        bp.set_progress_bar_config(disable=True)
        x = [bp(source_images=d[idx], num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(seed + k)).images * 2 - 1 for k in range(2)]
        grid = torch.cat([clean[idx], d[idx].clamp(-1, 1), *x])
        written["bridge_grid"] = str(save_bridge_grid(grid, out / "interpolant_bridge.png", steps))
        logger.info("wrote %s (rows: clean test digit, degraded observation, two translations with different base "
                    "noise; ODE Heun %d steps, %.1f s)", written["bridge_grid"], steps, time.time() - t0)
    return written


def run(settings: InterpolantEvalSettings, command: str = "") -> dict:
    """Run the sections, merge into ``out/results.json`` (sections run earlier are kept), plot, write rows.md."""
    for key in ("interpolant", "teacher", "bridge"):
        setattr(settings, key, str(repo_path(getattr(settings, key))))
    torch.set_num_threads(settings.threads)
    out = output_path(settings.out, settings.update_shipped)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, torch {torch.__version__}, "
               f"{settings.threads} thread(s)", "command": command}
    path = out / "results.json"
    if path.is_file():  # keep sections run earlier
        results = {**json.loads(path.read_text()), **results}
    t0 = time.time()
    if "toys" in settings.only:
        results["toys"] = run_toys(settings)
    if "digits" in settings.only:
        new = run_digits(settings)
        if "digits" in results:  # keep rows of earlier runs with other NFE / scales (the same key is replaced)
            def key(r):
                return r["model"], r["sampler"], r["nfe_per_branch"], r["guidance_scale"]

            fresh = {key(r) for r in new["rows"]}
            new["rows"] = [r for r in results["digits"]["rows"] if key(r) not in fresh] + new["rows"]
            new["rows"].sort(key=lambda r: (r["guidance_scale"], r["nfe_per_branch"], r["model"], r["sampler"]))
        results["digits"] = new
    if "bridge" in settings.only:
        results["bridge"] = run_bridge(settings)
    results.setdefault("commands", {})
    for section in settings.only:  # a section merged from several runs lists every command
        before = results["commands"].get(section, [])
        before = [before] if isinstance(before, str) else before
        merge = section == "digits" and "digits" in results
        results["commands"][section] = ([c for c in before if c != results["command"]] if merge else []) + [
            results["command"]]
    results["wall_s"] = round(time.time() - t0, 1)
    path.write_text(json.dumps(results, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o)
                               else str(o)))
    results["plots"] = plots(results, out)
    (out / "rows.md").write_text(markdown_rows(results))
    logger.info("wrote %s, %s", path, out / "rows.md")
    return results
