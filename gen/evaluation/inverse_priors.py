"""RED-Diff and DPS with a flow prior (the shipped digits interpolant) against the same methods with the diffusion
prior (the shipped DDPM teacher), on the same digits test images (``eval/inverse_priors.py``).

Both priors are the same UNet preset trained on the same data: the teacher is a VP diffusion model (eps prediction,
DDIM), the interpolant a linear one-sided stochastic interpolant (velocity prediction, time from noise t = 0 to data
t = 1). Both run through ``pipelines.RedDiffPipeline``: RED-Diff takes its noising, ``eps_hat`` and its grid from
each prior's prediction space (``gen.inverse.reddiff_grid``), DPS runs each prior's own sampler with the DPS hook.

Tasks: those of ``eval/inverse.py`` (:func:`gen.evaluation.inverse.task_operator`, definitions read from
``configs/inverse_digits.yaml``'s ``tasks``) at one noise level ``sigma_y``; both priors run unconditionally (null
class) at the same number of steps.

Tuning, the same for both priors, on the first ``tune_images`` *train* images, best mean PSNR per (prior, task,
method): RED-Diff over ``weighting const x noise_max x lr x lam`` (``noise_max`` 0.501 / 0.251 are the teacher's
``t_max`` 500 / 250; ``lam`` relative to the data weight ``1 / sigma_y^2``), DPS over ``sampler x zeta`` where the
sampler is deterministic (``ode``: the teacher's DDIM with eta = 0, the interpolant's Euler ODE) or stochastic
(``sde``: DDIM with eta = 1, the paper's ancestral steps; the interpolant's Euler-Maruyama SDE, whose last step to
t = 1 is one more evaluation). The shipped interpolant's own Heun solver is not used for DPS: it takes 2 evaluations
a step. Then both priors run on the first ``num_images`` *test* images with their tuned settings.

Wall time: besides each row's own run, ``timing_repeats`` interleaved rounds of the four runs on the first task
(after a warm-up round; medians), since the machine is shared.

Writes ``results.json`` (machine, settings, the tuning runs, the rows, the timing), ``rows.md`` and
``inverse_priors.png`` (columns: examples per task; rows: ``H^+ y``, each prior and method, the ground truth).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from pathlib import Path

import torch

from gen.evaluation import REPO_ROOT, machine, option, output_path, repo_path
from gen.evaluation.inverse import slice_operator, task_operator

logger = logging.getLogger("gen.evaluation.inverse_priors")

TASKS = ("inpaint_box", "inpaint_random", "sr2", "deblur_gauss")
PRIORS = ("teacher", "interpolant")
SAMPLERS = ("ode", "sde")


@dataclasses.dataclass
class InversePriorsSettings:
    teacher: str = option("checkpoints/digits-teacher", "diffusion prior: a ClassConditionalPipeline folder")
    interpolant: str = option("checkpoints/digits-interpolant", "flow prior: an InterpolantPipeline folder")
    tasks: list[str] = option(["inpaint_box", "inpaint_random", "sr2", "deblur_gauss"], "tasks", choices=TASKS)
    sigma_y: float = option(0.05, "measurement noise (images in [-1, 1])")
    num_images: int = option(300, "test images (the first N of the digits16 test split)")
    tune_images: int = option(50, "train images for tuning (0: no tuning, the first value of every grid)")
    steps: int = option(20, "RED-Diff grid size / DPS sampler steps")
    batch_size: int = option(300, "images per pipeline call")
    noise_max: list[float] = option([0.501, 0.251], "RED-Diff grid tops to tune over (noise fractions)")
    lr: list[float] = option([0.05, 0.1, 0.2], "RED-Diff Adam learning rates to tune over")
    lam: list[float] = option([0.005, 0.02, 0.1], "RED-Diff lambdas to tune over, relative to 1 / sigma_y^2")
    zeta: list[float] = option([0.5, 1.0, 2.0, 4.0], "DPS step sizes to tune over")
    samplers: list[str] = option(["ode", "sde"], "DPS samplers to tune over", choices=SAMPLERS)
    num_examples: int = option(4, "examples per task in the figure")
    settings_file: str = option("configs/inverse_digits.yaml", "task definitions (its `tasks` section)")
    timing_repeats: int = option(3, "interleaved timing rounds on the first task after a warm-up (0: none)")
    only: str | None = option(None, "quality: tune and measure only; timing: re-time with the tuned settings of "
                                    "an existing results.json in --out", choices=("quality", "timing"))
    seed: int = option(0, "seed of the measurement noise and of the methods' noise")
    threads: int = option(1, "torch threads")
    out: str = option("outputs/inverse_priors", "output folder (results.json, rows.md, inverse_priors.png)")
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")

    def __post_init__(self):
        from gen import validate

        for name in ("num_images", "steps", "batch_size", "threads"):
            validate.integer(name, getattr(self, name), 1)
        validate.integer("tune_images", self.tune_images, 0)
        validate.integer("timing_repeats", self.timing_repeats, 0)
        validate.choice("only", self.only, ("quality", "timing"), allow_none=True)
        validate.integer("num_examples", self.num_examples, 0, self.num_images)
        validate.number("sigma_y", self.sigma_y, 0.0)
        for task in self.tasks:
            validate.choice("tasks", task, TASKS)
        for sampler in self.samplers:
            validate.choice("samplers", sampler, SAMPLERS)
        for name, low in (("noise_max", 0.0), ("lr", 0.0), ("lam", 0.0), ("zeta", 0.0)):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} needs at least one value")
            for v in values:
                validate.number(name, v, low, 1.0 if name == "noise_max" else None, low_open=name != "zeta")
        if not self.samplers:
            raise ValueError("samplers needs at least one value")


# --- tasks and priors -----------------------------------------------------------------------------------------------
def load_priors(settings) -> dict:
    """``{prior: {"reddiff": (pipe, {}), "dps:ode": (pipe, kwargs), "dps:sde": (pipe, kwargs), "pinv": ...}}``: the
    pipeline and fixed call arguments of each method variant."""
    from gen.interpolants.scheduler import InterpolantScheduler
    from pipelines import ClassConditionalPipeline, RedDiffPipeline

    def quiet(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe

    base = ClassConditionalPipeline.from_pretrained(settings.teacher)
    teacher = quiet(RedDiffPipeline(unet=base.unet.eval(), scheduler=base.scheduler))
    flow = quiet(RedDiffPipeline.from_pretrained(settings.interpolant))
    flow.unet.eval()
    cfg = {k: v for k, v in dict(flow.scheduler.config).items() if not k.startswith("_")}
    ode = quiet(RedDiffPipeline(unet=flow.unet, scheduler=InterpolantScheduler.from_config({**cfg, "sampler": "ode",
                                                                                             "solver": "euler"})))
    sde = quiet(RedDiffPipeline(unet=flow.unet, scheduler=InterpolantScheduler.from_config(
        {**cfg, "sampler": "sde", "solver": "euler_maruyama"})))
    return {"teacher": {"reddiff": (teacher, {}), "dps:ode": (teacher, {"eta": 0.0}),
                        "dps:sde": (teacher, {"eta": 1.0}), "pinv": (teacher, {})},
            "interpolant": {"reddiff": (flow, {}), "dps:ode": (ode, {}), "dps:sde": (sde, {}), "pinv": (flow, {})}}


def restore(pipe, op, y, method: str, steps: int, params: dict, seed: int, batch_size: int):
    """Restorations ``[N, 1, 16, 16]`` in [-1, 1], wall seconds, network evaluations per image."""
    chunks, nfe, t0 = [], 0, time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, y.shape[0], batch_size):
        out = pipe(y[start:start + batch_size], slice_operator(op, start, start + batch_size), method=method,
                   num_inference_steps=steps, generator=gen, output_type="pt", **params)
        chunks.append(out.images * 2 - 1)
        nfe = out.nfe
    return torch.cat(chunks), time.perf_counter() - t0, nfe


def _grid(settings) -> dict[str, list[dict]]:
    """The tuning candidates of each method (lam absolute: relative value times ``1 / sigma_y^2``)."""
    scale = 1.0 / settings.sigma_y**2 if settings.sigma_y > 0 else 1.0
    reddiff = [{"lr": lr, "lam": round(lam * scale, 9), "weighting": "const", "noise_max": nm}
               for nm, lr, lam in itertools.product(settings.noise_max, settings.lr, settings.lam)]
    dps = [{"sampler": s, "zeta": z} for s, z in itertools.product(settings.samplers, settings.zeta)]
    return {"reddiff": reddiff, "dps": dps}


def _call(priors, prior: str, method: str, params: dict):
    """``(pipe, pipeline method, call kwargs)`` of a (prior, method, tuned params)."""
    if method == "dps":
        pipe, fixed = priors[prior][f"dps:{params['sampler']}"]
        return pipe, "dps", {**fixed, "zeta": params["zeta"]}
    pipe, fixed = priors[prior][method]
    return pipe, method, {**fixed, **params}


def tune(settings, priors, tasks_cfg) -> tuple[dict, list[dict]]:
    """Best settings per (prior, task, method) by mean PSNR on the first ``tune_images`` train images."""
    from gen.data.digits import load_digits16
    from gen.metrics import psnr

    grid = _grid(settings)
    best = {p: {t: {m: grid[m][0] for m in grid} for t in settings.tasks} for p in PRIORS}
    runs: list[dict] = []
    if settings.tune_images == 0:
        return best, runs
    x, _ = load_digits16("train")
    x = x[:settings.tune_images]
    for task in settings.tasks:
        op = task_operator(task, settings.sigma_y, x.shape[0], tasks_cfg, seed=settings.seed + 1)
        y = op.measure(x, generator=torch.Generator().manual_seed(settings.seed + 3))
        for prior, method in itertools.product(PRIORS, ("reddiff", "dps")):
            scores = []
            for params in grid[method]:
                pipe, name, kwargs = _call(priors, prior, method, params)
                images, wall, nfe = restore(pipe, op, y, name, settings.steps, kwargs, settings.seed,
                                            settings.batch_size)
                score = float(psnr(images.clamp(-1, 1), x).mean())
                runs.append({"task": task, "prior": prior, "method": method, "params": params,
                             "psnr": round(score, 3), "nfe": nfe, "wall_s": round(wall, 2)})
                scores.append(score)
            best[prior][task][method] = grid[method][max(range(len(scores)), key=scores.__getitem__)]
            logger.info("tuned %s %s on %s: %s (%.2f dB)", prior, method, task, best[prior][task][method],
                        max(scores))
    return best, runs


def measure(settings, priors, tasks_cfg, best) -> tuple[list[dict], dict]:
    """Every (task, prior, method) on the first ``num_images`` test images; returns the rows and, per task, the
    example images of the figure."""
    from gen.data.digits import load_digits16
    from gen.metrics import psnr, ssim

    x, _ = load_digits16("test")
    x = x[:settings.num_images]
    rows, examples = [], {}
    k = settings.num_examples
    for task in settings.tasks:
        op = task_operator(task, settings.sigma_y, x.shape[0], tasks_cfg, seed=settings.seed)
        y = op.measure(x, generator=torch.Generator().manual_seed(settings.seed + 3))
        pinv = op.pinv(y, x.shape).clamp(-1, 1)
        rows.append({"task": task, "sigma_y": settings.sigma_y, "prior": "-", "method": "pinv", "params": {},
                     "steps": 0, "nfe": 0, "psnr": round(float(psnr(pinv, x).mean()), 3),
                     "ssim": round(float(ssim(pinv, x).mean()), 4), "wall_s": 0.0, "n": x.shape[0]})
        examples[task] = {"H^+ y": pinv[:k], "ground truth": x[:k]}
        for prior, method in itertools.product(PRIORS, ("dps", "reddiff")):
            params = best[prior][task][method]
            pipe, name, kwargs = _call(priors, prior, method, params)
            images, wall, nfe = restore(pipe, op, y, name, settings.steps, kwargs, settings.seed, settings.batch_size)
            images = images.clamp(-1, 1)
            rows.append({"task": task, "sigma_y": settings.sigma_y, "prior": prior, "method": method,
                         "params": params, "steps": settings.steps, "nfe": nfe,
                         "psnr": round(float(psnr(images, x).mean()), 3),
                         "ssim": round(float(ssim(images, x).mean()), 4), "wall_s": round(wall, 2),
                         "n": x.shape[0]})
            examples[task][f"{'DPS' if method == 'dps' else 'RED-Diff'}, {prior}"] = images[:k]
            logger.info("%s %s %s: %.2f dB, %.1f s", task, prior, method, rows[-1]["psnr"], wall)
    return rows, examples


# --- report ---------------------------------------------------------------------------------------------------------
def _params_text(row) -> str:
    p = row["params"]
    if row["method"] == "reddiff":
        return f"lr {p['lr']:g}, lam {p['lam']:g}, noise_max {p['noise_max']:g}"
    if row["method"] == "dps":
        return f"{p['sampler']}, zeta {p['zeta']:g}"
    return ""


def report(rows: list[dict]) -> str:
    lines = ["| task | sigma_y | prior | method | tuned settings | steps | NFE | PSNR | SSIM | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['sigma_y']:g} | {r['prior']} | {r['method']} | {_params_text(r)} | "
                     f"{r['steps']} | {r['nfe']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def figure(examples: dict, settings, path: Path) -> Path | None:
    from gen.data.images import save_labelled_grid

    if not examples or settings.num_examples == 0:
        return None
    tasks = list(examples)
    row_names = list(examples[tasks[0]])
    order = [row_names[0]] + [r for r in row_names if r not in (row_names[0], "ground truth")] + ["ground truth"]
    k = settings.num_examples
    images = torch.cat([examples[t][r][:k] for r in order for t in tasks])
    short = {"inpaint_box": "box", "inpaint_random": "random", "sr2": "sr2", "deblur_gauss": "deblur"}
    cols = [f"{short[t]} {j + 1}" for t in tasks for j in range(k)]
    title = (f"RED-Diff and DPS: DDPM teacher vs digits interpolant prior, {settings.steps} steps, "
             f"sigma_y {settings.sigma_y:g}\ncolumns: test images per task; rows: pseudo-inverse, each prior and "
             "method (tuned), ground truth")
    return save_labelled_grid(images, path, nrow=len(cols), upscale=4, title=title, row_labels=order,
                              col_labels=cols)


def timing(settings, priors, tasks_cfg, best) -> dict:
    """Wall time at equal steps, controlled: on the first task, ``timing_repeats`` interleaved rounds of the four
    (prior, method) runs after one warm-up round, same images, batch and thread count; medians per run."""
    import statistics

    from gen.data.digits import load_digits16

    x, _ = load_digits16("test")
    x = x[:settings.num_images]
    task = settings.tasks[0]
    op = task_operator(task, settings.sigma_y, x.shape[0], tasks_cfg, seed=settings.seed)
    y = op.measure(x, generator=torch.Generator().manual_seed(settings.seed + 3))
    keys = list(itertools.product(PRIORS, ("reddiff", "dps")))
    walls: dict = {f"{p}/{m}": [] for p, m in keys}
    for round_ in range(settings.timing_repeats + 1):
        for prior, method in keys:
            pipe, name, kwargs = _call(priors, prior, method, best[prior][task][method])
            _, wall, nfe = restore(pipe, op, y, name, settings.steps, kwargs, settings.seed, settings.batch_size)
            if round_:  # round 0 warms up
                walls[f"{prior}/{method}"].append(round(wall, 2))
    out = {"task": task, "n": x.shape[0], "steps": settings.steps, "repeats": settings.timing_repeats,
           "wall_s": walls, "median_s": {k: statistics.median(v) for k, v in walls.items()}}
    logger.info("timing on %s (medians, s): %s", task, out["median_s"])
    return out


def run(settings: InversePriorsSettings) -> dict:
    """Tune (train images), measure (test images), time (interleaved); write ``results.json``, ``rows.md`` and the
    figure. ``only=timing`` re-times with the tuned settings of an existing ``results.json`` in ``out``."""
    import yaml

    for key in ("teacher", "interpolant", "settings_file"):  # repo-relative defaults work from any directory
        setattr(settings, key, str(repo_path(getattr(settings, key))))
    torch.set_num_threads(settings.threads)
    out = output_path(settings.out, settings.update_shipped)
    out.mkdir(parents=True, exist_ok=True)
    tasks_cfg = yaml.safe_load(Path(settings.settings_file).read_text())["tasks"]
    priors = load_priors(settings)
    path = out / "results.json"
    t0 = time.time()
    if settings.only == "timing":
        if not path.exists():
            raise ValueError(f"only=timing needs the tuned settings of a previous run in {path}; run without --only")
        results = json.loads(path.read_text())
        results["timing"] = timing(settings, priors, tasks_cfg, results["tuned"])
        results["timing"]["machine"] = machine()
        path.write_text(json.dumps(results, indent=1) + "\n")
        results["markdown"] = (out / "rows.md").read_text() if (out / "rows.md").exists() else ""
        return results
    best, runs = tune(settings, priors, tasks_cfg)
    tune_s = time.time() - t0
    rows, examples = measure(settings, priors, tasks_cfg, best)
    md = report(rows)
    (out / "rows.md").write_text(md)
    fig = figure(examples, settings, out / "inverse_priors.png")

    def rel(p):
        try:
            return str(Path(p).resolve().relative_to(REPO_ROOT))
        except ValueError:
            return str(p)

    results = {"machine": machine(), "settings": {**dataclasses.asdict(settings),
                                                  **{k: rel(getattr(settings, k)) for k in
                                                     ("teacher", "interpolant", "settings_file", "out")}},
               "tuning": runs, "tuned": best, "rows": rows, "tune_wall_s": round(tune_s, 1)}
    if settings.timing_repeats and settings.only != "quality":
        results["timing"] = timing(settings, priors, tasks_cfg, best)
    results["total_wall_s"] = round(time.time() - t0, 1)
    path.write_text(json.dumps(results, indent=1) + "\n")
    results["markdown"] = md
    results["figure"] = None if fig is None else str(fig)
    return results
