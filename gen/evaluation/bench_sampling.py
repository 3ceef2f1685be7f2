"""Sampling overhead of `gen`'s pipelines against Diffusers' own on the same network calls, and APG against CFG
(``eval/bench_sampling.py``).

    python eval/bench_sampling.py --out outputs/bench_sampling.json [--sections ddim sdxl sd3 dit apg]
        [--sizes small medium] [--repeats 11] [--demo_out DIR] [--device cuda --dtype bfloat16]

Sections (each pair of pipelines shares one network, scheduler, seed and step count, and makes the same network
calls: the script checks that both evaluate the same number of rows and give the same output):

- ``ddim``: ``ClassConditionalPipeline`` against ``diffusers.DDIMPipeline`` on the digits UNet without class
  embeddings (so that DDIMPipeline can run it), batch 64, unguided.
- ``sdxl`` / ``sd3`` / ``dit``: ``GuidedStableDiffusionXLPipeline`` / ``GuidedStableDiffusion3Pipeline`` /
  ``GuidedDiTPipeline`` against ``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline`` / ``DiTPipeline`` with
  CFG (w > 1) on random components from :mod:`gen.models.tiny_families` at each ``--sizes`` entry (``small``: a few
  ms per network call, ``medium``: a few tens of ms; the printed table gives the measured cost per call).
- ``apg``: the same `gen` pipeline with ``APG`` against ``CFG`` at the same scale (digits teacher architecture,
  class-conditional, batch 64; and each family at ``medium``).

Timing: the two runs of a pair alternate (ABBA order), ``--repeats`` times after a warm-up; the overhead is the
ratio of the medians minus 1, for wall-clock time and for the process's CPU time (less sensitive to other jobs on a
shared machine), plus the median of the paired per-repeat CPU ratios with a bootstrap 95 % interval. Writes JSON and
prints markdown rows for BENCHMARKS.md.

``--device cuda --dtype bfloat16`` runs the same pairs on a GPU (each timed run ends with a device synchronisation;
there the wall-clock ratio is the figure to read, the CPU time measures the Python side); ``--sizes large`` adds
components of a few million parameters, where a GPU call costs what a small CPU call does.

``demo_section(out, settings)`` is the `make demo` part (section ``families``): each tiny family with CFG and APG,
JSON only (``--demo_out DIR`` runs it from the command line).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from gen.evaluation import option, output_path

logger = logging.getLogger("gen.evaluation.bench_sampling")

# family sizes: builder keyword arguments (see gen.models.tiny_families)
SIZES = {
    "small": {"sdxl": dict(width=32, sample_size=8), "sd3": dict(width=64, sample_size=16, num_layers=2),
              "dit": dict(width=64, sample_size=16, num_layers=2)},
    "medium": {"sdxl": dict(width=64, sample_size=16), "sd3": dict(width=128, sample_size=16, num_layers=4),
               "dit": dict(width=128, sample_size=16, num_layers=4)},
    "large": {"sdxl": dict(width=128, sample_size=32), "sd3": dict(width=256, sample_size=32, num_layers=8),
              "dit": dict(width=256, sample_size=32, num_layers=8)},
}
DEVICE = {"device": torch.device("cpu"), "dtype": torch.float32}  # set by main (--device, --dtype)


def _sync() -> None:
    if DEVICE["device"].type == "cuda":
        torch.cuda.synchronize()


def _place(*modules):
    """Move pipelines / networks to the benchmark's device and dtype."""
    for m in modules:
        m.to(DEVICE["device"], DEVICE["dtype"])
PROMPTS = ["a photo of a cat", "a dog"]
DIT_LABELS = [1, 207, 360, 999]


class RowCounter:
    """Counts the rows (and calls) that go through a network's forward."""

    def __init__(self, net):
        self.rows = self.calls = 0
        self.handle = net.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        self.rows += x.shape[0]
        self.calls += 1

    def remove(self):
        self.handle.remove()


def interleaved(run_a, run_b, repeats: int) -> dict:
    """Median wall and CPU seconds of ``run_a`` and ``run_b``, alternated ABBA after one warm-up of each."""
    run_a(), run_b()
    wall = {"a": [], "b": []}
    cpu = {"a": [], "b": []}
    for i in range(repeats):
        order = (("a", run_a), ("b", run_b)) if i % 2 == 0 else (("b", run_b), ("a", run_a))
        for name, fn in order:
            _sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    med = {f"{k}_{n}": statistics.median(v[n]) for k, v in (("wall", wall), ("cpu", cpu)) for n in "ab"}
    paired_cpu = np.array(cpu["a"]) / np.array(cpu["b"])
    boot = np.random.default_rng(0).choice(paired_cpu, size=(2000, len(paired_cpu)))
    lo, hi = np.percentile(np.median(boot, axis=1), [2.5, 97.5])
    return {"repeats": repeats,
            "a_wall_median_s": round(med["wall_a"], 5), "b_wall_median_s": round(med["wall_b"], 5),
            "a_cpu_median_s": round(med["cpu_a"], 5), "b_cpu_median_s": round(med["cpu_b"], 5),
            "overhead_wall": round(med["wall_a"] / med["wall_b"] - 1, 4),
            "overhead_cpu": round(med["cpu_a"] / med["cpu_b"] - 1, 4),
            "paired_ratio_median_wall": round(statistics.median(a / b for a, b in zip(wall["a"], wall["b"])) - 1, 4),
            "paired_ratio_median_cpu": round(float(np.median(paired_cpu)) - 1, 4),
            "paired_ratio_cpu_ci95": [round(float(lo) - 1, 4), round(float(hi) - 1, 4)],
            "wall_a_s": [round(t, 4) for t in wall["a"]], "wall_b_s": [round(t, 4) for t in wall["b"]]}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _quiet(*pipes):
    for p in pipes:
        p.set_progress_bar_config(disable=True)


def _max_diff(a, b) -> float:
    a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    b = b.detach().cpu().numpy() if torch.is_tensor(b) else np.asarray(b)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _pair(name, net, run_ours, run_ref, repeats, extra) -> dict:
    """Check equal outputs and equal network rows, time per call, then the interleaved timing."""
    counter = RowCounter(net)
    out_ours = run_ours()
    rows_ours, calls = counter.rows, counter.calls
    counter.rows = 0
    out_ref = run_ref()
    rows_ref = counter.rows
    counter.remove()
    res = {"pair": name, **extra, "max_abs_diff": _max_diff(out_ours, out_ref), "rows_ours": rows_ours,
           "rows_ref": rows_ref, "network_calls": calls}
    if rows_ours != rows_ref:
        raise RuntimeError(f"{name}: the pipelines evaluated {rows_ours} vs {rows_ref} network rows")
    res.update(interleaved(run_ours, run_ref, repeats))
    res["ms_per_network_call"] = round(1e3 * res["b_cpu_median_s"] / calls, 2)
    logger.info("%s: ours %.4f s vs ref %.4f s (wall medians) = %+.2f%%, CPU %+.2f%%; %.1f ms/call, |diff| %.2g",
                name, res["a_wall_median_s"], res["b_wall_median_s"], 100 * res["overhead_wall"],
                100 * res["overhead_cpu"], res["ms_per_network_call"], res["max_abs_diff"])
    return res


# --- sections ----------------------------------------------------------------------------------------------------
def bench_ddim(settings) -> list[dict]:
    from diffusers import DDIMPipeline, DDIMScheduler

    from gen.models.unet import digits_unet
    from pipelines import ClassConditionalPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = digits_unet(num_class_embeds=None).eval()
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)   # the digits teacher's schedule
    ours, ref = ClassConditionalPipeline(unet=unet, scheduler=sched), DDIMPipeline(unet=unet, scheduler=sched)
    _quiet(ours, ref)
    _place(unet)
    kw = dict(batch_size=settings.ddim_batch, num_inference_steps=settings.ddim_steps)

    def run_ours():
        return ours(**kw, output_type="np", generator=_gen()).images

    def run_ref():
        return ref(**kw, eta=0.0, output_type="np", generator=_gen()).images

    return [_pair("ClassConditionalPipeline vs DDIMPipeline", unet, run_ours, run_ref, settings.repeats,
                  {"batch": settings.ddim_batch, "steps": settings.ddim_steps, "guidance": "none (w=1)"})]


def family_pipelines(name: str, size: str):
    """(ours, Diffusers' pipeline, network, call kwargs) of family ``name`` at ``size``."""
    from diffusers import DiTPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from gen.models.tiny_families import build_tiny_dit, build_tiny_sd3, build_tiny_sdxl
    from pipelines import GuidedDiTPipeline, GuidedStableDiffusion3Pipeline, GuidedStableDiffusionXLPipeline

    cfg = SIZES[size][name]
    if name == "sdxl":
        parts = build_tiny_sdxl(0, **cfg)
        ours = GuidedStableDiffusionXLPipeline(**parts, add_watermarker=False)
        ref = StableDiffusionXLPipeline(**parts, add_watermarker=False)
        kw = dict(prompt=PROMPTS, guidance_scale=5.0, output_type="latent")
        net = parts["unet"]
    elif name == "sd3":
        parts = build_tiny_sd3(0, **cfg)
        ours, ref = GuidedStableDiffusion3Pipeline(**parts), StableDiffusion3Pipeline(**parts)
        kw = dict(prompt=PROMPTS, guidance_scale=5.0, output_type="latent", max_sequence_length=64)
        net = parts["transformer"]
    elif name == "dit":
        parts = build_tiny_dit(0, **cfg)
        ours, ref = GuidedDiTPipeline(**parts), DiTPipeline(**parts)
        kw = dict(class_labels=DIT_LABELS, guidance_scale=4.0, output_type="pt")
        net = parts["transformer"]
    else:
        raise ValueError(f"unknown family {name!r}; allowed: sdxl, sd3, dit")
    _quiet(ours, ref)
    _place(*[v for v in parts.values() if isinstance(v, torch.nn.Module)])
    return ours, ref, net, kw


def bench_family(name: str, settings) -> list[dict]:
    rows = []
    for size in settings.sizes:
        ours, ref, net, kw = family_pipelines(name, size)

        def run_ours(ours=ours, kw=kw):
            return ours(**kw, num_inference_steps=settings.steps, generator=_gen()).images

        def run_ref(ref=ref, kw=kw):
            return ref(**kw, num_inference_steps=settings.steps, generator=_gen()).images

        rows.append(_pair(f"{type(ours).__name__} vs {type(ref).__name__}", net, run_ours, run_ref, settings.repeats,
                          {"size": size, "config": SIZES[size][name], "steps": settings.steps,
                           "guidance": f"CFG w={kw['guidance_scale']}"}))
    return rows


def _apg(scale):
    from gen.guidance import APG

    return APG(guidance_scale=scale, eta=0.0, momentum=-0.5, norm_threshold=1.5)


def bench_apg(settings) -> list[dict]:
    from diffusers import DDIMScheduler

    from gen.guidance import CFG
    from gen.models.unet import digits_unet
    from pipelines import ClassConditionalPipeline

    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = digits_unet().eval()
    pipe = ClassConditionalPipeline(unet=unet, scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2",
                                                                        clip_sample=False))
    _quiet(pipe)
    _place(unet)
    labels = torch.arange(10).repeat(7)[: settings.ddim_batch]
    cases = [("ClassConditionalPipeline (digits UNet)", pipe, unet,
              dict(class_labels=labels, num_inference_steps=settings.apg_steps, output_type="np"), 8.0)]
    for name in ("sdxl", "sd3", "dit"):
        ours, _, net, kw = family_pipelines(name, "medium")
        kw = {k: v for k, v in kw.items() if k != "guidance_scale"}
        cases.append((f"{type(ours).__name__} (medium)", ours, net, dict(kw, num_inference_steps=settings.steps),
                      5.0))
    for name, pipe, net, kw, w in cases:
        def run_apg(pipe=pipe, kw=kw, w=w):
            return pipe(**kw, guider=_apg(w), generator=_gen()).images

        def run_cfg(pipe=pipe, kw=kw, w=w):
            return pipe(**kw, guider=CFG(guidance_scale=w), generator=_gen()).images

        res = _pair(f"APG vs CFG: {name}", net, run_apg, run_cfg, settings.repeats,
                    {"guidance_scale": w, "apg": dict(_apg(w).config)})
        res["note"] = "max_abs_diff is APG's change of the output, not an error"
        rows.append(res)
    return rows


# --- demo --------------------------------------------------------------------------------------------------------
def demo_section(out: Path, settings) -> dict:
    """`make demo` part: each tiny family (SDXL, SD3, DiT) with CFG and APG at w=5, 10 steps, plus CFG against
    Diffusers' own pipeline on the same components; writes ``out/families_demo.json``."""
    from gen.guidance import CFG

    seed = int(getattr(settings, "seed", 0))
    result = {"date": time.strftime("%Y-%m-%d"), "steps": 10, "guidance_scale": 5.0, "seed": seed,
              "note": "random tiny components (gen.models.tiny_families): the images are noise-like; the point is "
                      "that every family runs every guider and CFG equals Diffusers' pipeline", "families": {}}
    for name in ("sdxl", "sd3", "dit"):
        ours, ref, _, kw = family_pipelines(name, "small")
        kw = {k: v for k, v in kw.items() if k != "guidance_scale"}
        row = {}
        for gname, guider in (("cfg", CFG(guidance_scale=5.0)), ("apg", _apg(5.0))):
            t0 = time.perf_counter()
            res = ours(**kw, num_inference_steps=10, guider=guider, generator=_gen(seed))
            images = torch.as_tensor(np.asarray(res.images.cpu() if torch.is_tensor(res.images) else res.images))
            row[gname] = {"nfe": res.nfe, "wall_s": round(time.perf_counter() - t0, 3),
                          "mean_abs": round(float(images.abs().mean()), 5),
                          "finite": bool(torch.isfinite(images).all())}
        diffusers_out = ref(**kw, num_inference_steps=10, guidance_scale=5.0, generator=_gen(seed)).images
        cfg_out = ours(**kw, num_inference_steps=10, guidance_scale=5.0, generator=_gen(seed)).images
        row["cfg_vs_diffusers_max_abs_diff"] = _max_diff(cfg_out, diffusers_out)
        result["families"][type(ours).__name__] = row
        logger.info("%s: CFG NFE %s, APG NFE %s, |CFG - %s| = %.2g", type(ours).__name__, row["cfg"]["nfe"],
                    row["apg"]["nfe"], type(ref).__name__, row["cfg_vs_diffusers_max_abs_diff"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "families_demo.json").write_text(json.dumps(result, indent=2))
    return {"families_demo": str(out / "families_demo.json"),
            **{k: v["cfg_vs_diffusers_max_abs_diff"] for k, v in result["families"].items()}}


# --- run ---------------------------------------------------------------------------------------------------------
SECTIONS = ("ddim", "sdxl", "sd3", "dit", "apg")


@dataclasses.dataclass
class BenchSamplingSettings:
    sections: list[str] = option(list(SECTIONS), "pairs to time", choices=SECTIONS)
    sizes: list[str] = option(["small", "medium"], "family component sizes", choices=sorted(SIZES))
    repeats: int = option(11, "timed runs of each pipeline (after one warm-up)")
    steps: int = option(10, "sampling steps of the family pipelines")
    ddim_batch: int = option(64, "batch of the ddim and apg (digits) pairs")
    ddim_steps: int = option(25, "steps of the ddim pair")
    apg_steps: int = option(20, "steps of the digits APG pair")
    out: str = option("outputs/bench_sampling.json", "JSON file to write")
    demo_out: str | None = option(None, "also run the demo section, writing families_demo.json here")
    seed: int = option(0, "seed of the demo section")
    device: str = option("cpu", "cpu | cuda | cuda:N")
    dtype: str = option("float32", "network dtype", choices=("float32", "bfloat16", "float16"))
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")

    def __post_init__(self):
        if self.repeats < 1 or self.steps < 1:
            raise ValueError(f"--repeats and --steps must be >= 1; got {self.repeats}, {self.steps}")
        for name, value, allowed in (("sections", self.sections, SECTIONS), ("sizes", self.sizes, tuple(SIZES))):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ValueError(f"--{name} {bad} unknown; allowed: {', '.join(allowed)}")


def run(settings: BenchSamplingSettings, command: str = "") -> dict:
    """Time every section of ``settings``; write the JSON to ``settings.out`` and return it."""
    out = output_path(settings.out, settings.update_shipped)
    DEVICE["device"], DEVICE["dtype"] = torch.device(settings.device), getattr(torch, settings.dtype)
    if DEVICE["device"].type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {settings.device} but torch sees no CUDA device")
    torch.set_grad_enabled(False)
    result = {"date": time.strftime("%Y-%m-%d"), "command": command,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} torch threads", "device": settings.device,
              "dtype": settings.dtype, "rows": []}
    if DEVICE["device"].type == "cuda":
        result["machine"] += f", {torch.cuda.get_device_name(DEVICE['device'])}"
    for section in settings.sections:
        if section == "ddim":
            result["rows"] += bench_ddim(settings)
        elif section == "apg":
            result["rows"] += bench_apg(settings)
        else:
            result["rows"] += bench_family(section, settings)
    if settings.demo_out:
        result["demo"] = demo_section(Path(settings.demo_out), settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return result


def markdown(result: dict) -> str:
    """Rows for BENCHMARKS.md."""
    lines = ["| pair | size | ms / network call | ours / ref wall median (s) | overhead (wall) "
             "| ours / ref CPU median (s) | overhead (CPU) | paired CPU ratio, 95 % CI | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lo, hi = r["paired_ratio_cpu_ci95"]
        lines.append(f"| {r['pair']} | {r.get('size', '-')} | {r['ms_per_network_call']} | "
                     f"{r['a_wall_median_s']:.4f} / {r['b_wall_median_s']:.4f} | {100 * r['overhead_wall']:+.2f} % | "
                     f"{r['a_cpu_median_s']:.4f} / {r['b_cpu_median_s']:.4f} | {100 * r['overhead_cpu']:+.2f} % | "
                     f"{100 * r['paired_ratio_median_cpu']:+.2f} % ({100 * lo:+.2f} .. {100 * hi:+.2f}) | "
                     f"{r['max_abs_diff']:.2g} |")
    return "\n".join(lines)
