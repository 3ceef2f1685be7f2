"""Inverse-problem benchmark on the shipped digits teacher (``eval/inverse.py``): RED-Diff vs DPS vs the
pseudo-inverse, the tuning search, and an interleaved timing.

Tasks (16x16 digits in [-1, 1]; noise ``y = H x + sigma_y n`` in those units, ``sigma_y`` default 0 and 0.05):
``inpaint_box`` (a centred 6x6 hole), ``inpaint_random`` (70% of pixels missing, one seeded mask per image),
``sr2`` (2x block-average downsampling), ``deblur_gauss`` (9-tap Gaussian, std 1.5, reflect borders; its pinv
truncates the 1-D singular values below ``rcond`` times the largest: 0.03 at sigma_y = 0 (DDRM's cut-off), 0.2 at
sigma_y = 0.05, the best pinv PSNR on the 50 train images). The teacher runs unconditionally (null class).

RED-Diff and DPS run at the same number of steps (one network evaluation each; a DPS step also backpropagates
through the UNet) through ``pipelines.RedDiffPipeline``, with the per-task settings of
``configs/inverse_digits.yaml`` (RED-Diff: ``optimizer`` adam or sgd, ``weighting``, ``t_max``, ``lr``, ``lam``),
tuned by ``tune`` on the first 50 images of the *train* split (the benchmark uses the test split).

- default: every (task, sigma_y, method) on ``num_images`` (300) test images: PSNR (mean over images of the
  per-image PSNR, data range 2), SSIM (Gaussian 11x11, sigma 1.5), FID-digits against the digits16 test split,
  class accuracy of the digits classifier on the restorations (ground-truth labels), wall time of the restoration
  and network evaluations per image. Writes ``out`` (JSON), and beside it ``<stem>.png`` (example restorations:
  rows measurement / pinv / DPS / RED-Diff / ground truth per task) and ``<stem>.md`` (markdown rows).
- ``tune``: RED-Diff by coordinate search (:func:`coordinate_search`) over the settings file's
  ``tuning.reddiff.grid`` (filtered by :func:`tuning_grid`; ``tune_only`` restricts it, and a grid left empty is a
  ``ValueError``) from its ``starts`` and the tuned setting; DPS over its full grid; mean PSNR on the train split.
  ``write_config`` writes the best settings into the settings file (a tracked file: only when asked).
- ``timing_repeats > 0``: interleaved RED-Diff / DPS timing runs on ``inpaint_box`` at sigma_y = 0.05.

``demo_section`` is the inverse-problem part of ``make demo``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import platform
import time
from pathlib import Path

import torch

from gen.evaluation import REPO_ROOT, option, output_path, repo_path
from gen.evaluation.demo import size

logger = logging.getLogger("gen.evaluation.inverse")

TASKS = ("inpaint_box", "inpaint_random", "sr2", "deblur_gauss")
METHODS = ("pinv", "dps", "reddiff")


def tune_filter(items) -> dict | None:
    """``["optimizer=sgd", "weighting=linear,const"]`` -> ``{"optimizer": ["sgd"], "weighting": ["linear",
    "const"]}`` (None for no items); ``ValueError`` for an item without ``=``."""
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"tune_only takes name=value[,value...] items (e.g. optimizer=sgd); got {item!r}")
        out[key] = values.split(",")
    return out


@dataclasses.dataclass
class InverseSettings:
    task: list[str] = option(["all"], "tasks ('all': every task)", choices=(*TASKS, "all"))
    method: list[str] = option(["all"], "methods ('all': pinv, dps, reddiff)", choices=(*METHODS, "all"))
    sigma_y: list[float] = option([0.0, 0.05], "measurement noise levels (images in [-1, 1])")
    model: str = option("checkpoints/digits-teacher", "ClassConditionalPipeline folder of the prior")
    num_images: int | None = option(None, "images (default 300; 50 with --tune)")
    split: str | None = option(None, "digits16 split (default test; train with --tune)", choices=("train", "test"))
    steps: int | None = option(None, "RED-Diff / DPS steps, equal (default: steps of the settings file)")
    batch_size: int = option(300, "images per pipeline call")
    seed: int = option(0, "seed of the masks, the measurement noise and the methods' noise")
    num_examples: int = option(6, "example images per task in the figure")
    tune: bool = option(False, "search the settings on the train split instead")
    tune_rounds: int = option(2, "passes of RED-Diff's coordinate search")
    tune_only: list[str] | None = option(None, "restrict the tuning grid, e.g. optimizer=sgd weighting=linear,const")
    write_config: bool = option(False, "--tune: write the best settings into --config (a tracked file: explicit "
                                       "only)")
    timing_repeats: int = option(0, "instead of the benchmark: interleaved RED-Diff / DPS timing runs on "
                                    "inpaint_box (0: off)")
    reddiff_params: list[str] | None = option(None, "override the tuned RED-Diff settings, e.g. lr=0.05 t_max=500 "
                                                    "optimizer=sgd")
    no_fid: bool = option(False, "skip FID-digits and class accuracy")
    threads: int = option(1, "torch threads")
    config: str = option("configs/inverse_digits.yaml", "the settings file (tasks, tuned settings, tuning grids)")
    out: str = option("outputs/inverse/inverse.json", "JSON file to write (figure and markdown next to it)")
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")

    def __post_init__(self):
        self.task = list(TASKS) if "all" in self.task else list(self.task)
        self.method = list(METHODS) if "all" in self.method else [m for m in METHODS if m in self.method]
        for name, allowed in (("task", TASKS), ("method", METHODS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"{name} must be one or more of {', '.join(allowed)} (or all); got "
                                 f"{getattr(self, name)}")
        if not self.sigma_y or any(not s >= 0 for s in self.sigma_y):
            raise ValueError(f"sigma_y must be one or more numbers >= 0; got {self.sigma_y}")
        self.num_images = self.num_images or (50 if self.tune else 300)
        self.split = self.split or ("train" if self.tune else "test")
        if self.num_images < 2 and not self.no_fid and not self.tune:
            raise ValueError("num_images must be >= 2 for FID (or pass --no_fid)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1; got {self.steps}")
        tune_filter(self.tune_only)
        if self.reddiff_params:
            parse_overrides(self.reddiff_params)


def load_settings(path="configs/inverse_digits.yaml") -> dict:
    """The settings file: task definitions, steps, the tuned RED-Diff / DPS settings and the tuning grids."""
    import yaml

    return yaml.safe_load(repo_path(path).read_text())


def task_operator(task: str, sigma_y: float, num_images: int, tasks: dict, seed: int = 0):
    """The measurement operator of ``task`` for ``num_images`` 16x16 images (random masks seeded by ``seed``), from
    the ``tasks`` section of ``configs/inverse_digits.yaml`` (``deblur_gauss``'s ``rcond`` may be given per
    ``sigma_y``)."""
    from gen.inverse import GaussianBlur, Inpainting, SuperResolution

    if task not in TASKS or task not in tasks:
        raise ValueError(f"task={task!r}; allowed: {', '.join(t for t in TASKS if t in tasks)}")
    cfg = tasks[task]
    if task == "inpaint_box":
        return Inpainting.box((16, 16), cfg["box_size"], sigma_y=sigma_y)
    if task == "inpaint_random":
        return Inpainting.random_pixels((16, 16), cfg["missing"], seed=seed, batch=num_images, sigma_y=sigma_y)
    if task == "sr2":
        return SuperResolution(cfg["factor"], kind=cfg["kind"], sigma_y=sigma_y)
    rcond = cfg["rcond"]
    if isinstance(rcond, dict):  # per noise level
        match = [v for k, v in rcond.items() if abs(float(k) - sigma_y) < 1e-9]
        if not match:
            raise ValueError(f"no deblur_gauss rcond for sigma_y={sigma_y}; configured: {sorted(rcond)}")
        rcond = match[0]
    return GaussianBlur(cfg["kernel_size"], cfg["blur_sigma"], sigma_y=sigma_y, rcond=float(rcond))


def make_operator(task: str, sigma_y: float, num_images: int, config: dict, seed: int = 0):
    """:func:`task_operator` with the tasks of a whole settings file (``config["tasks"]``)."""
    return task_operator(task, sigma_y, num_images, config["tasks"], seed)


def slice_operator(op, start, stop):
    """The operator of images ``start:stop`` (per-image masks are sliced; shared operators returned as they are)."""
    from gen.inverse import Inpainting

    if isinstance(op, Inpainting) and op.mask.shape[0] > 1:
        return Inpainting(op.mask[start:stop], sigma_y=op.sigma_y)
    return op


def method_params(config: dict, method: str, task: str, sigma_y: float) -> dict:
    """The tuned keyword arguments of ``method`` for (task, sigma_y) from the settings file."""
    if method == "pinv":
        return {}
    table = config[method][task]
    for key, value in table.items():
        if abs(float(key) - sigma_y) < 1e-9:
            return dict(value)
    raise ValueError(f"the settings file has no {method} settings for {task} at sigma_y={sigma_y}; "
                     f"tuned for {sorted(float(k) for k in table)}")


def restore(pipe, op, y, method: str, steps: int, params: dict, seed: int, batch_size: int):
    """Restorations [N,1,16,16] in [-1,1], wall seconds, network evaluations per image (``params``: keyword
    arguments of ``RedDiffPipeline``, e.g. RED-Diff's ``optimizer``, ``lr``, ``lam``, ``weighting``, ``t_max``)."""
    chunks, nfe, t0 = [], 0, time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, y.shape[0], batch_size):
        out = pipe(y[start:start + batch_size], slice_operator(op, start, start + batch_size), method=method,
                   num_inference_steps=steps, generator=gen, output_type="pt", **params)
        chunks.append(out.images * 2 - 1)
        nfe = out.nfe
    return torch.cat(chunks), time.perf_counter() - t0, nfe


def quality(images, truth, labels, extractor, fid: bool = True) -> dict:
    """PSNR / SSIM (means over images, data range 2), and FID-digits / class accuracy vs the test split."""
    from gen.data.images import to_uint8
    from gen.metrics import psnr, ssim
    from gen.metrics.evaluate import compute_fid_for_images

    res = {"psnr": round(float(psnr(images.clamp(-1, 1), truth).mean()), 3),
           "ssim": round(float(ssim(images.clamp(-1, 1), truth).mean()), 4)}
    if fid:
        f = compute_fid_for_images(to_uint8(images), labels, extractor=extractor, ref="test", progress=False)
        res.update(fid=round(f["fid"], 3), class_accuracy=round(f["class_accuracy"], 4))
    return res


def load_pipe(model: str):
    from pipelines import ClassConditionalPipeline, RedDiffPipeline

    base = ClassConditionalPipeline.from_pretrained(model)
    pipe = RedDiffPipeline(unet=base.unet.eval(), scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_benchmark(settings, config) -> dict:
    """Every (task, sigma_y, method) on ``settings.num_images`` images of ``settings.split``."""
    from gen.data.digits import load_digits16
    from gen.metrics.features import build_feature_extractor

    pipe = load_pipe(repo_path(settings.model))
    extractor = None if settings.no_fid else build_feature_extractor("digits")
    x, labels = load_digits16(settings.split)
    if settings.num_images > x.shape[0]:
        raise ValueError(f"--num_images {settings.num_images} exceeds the {x.shape[0]} images of split "
                         f"{settings.split!r}")
    x, labels = x[:settings.num_images], labels[:settings.num_images]
    rows, examples, reference = [], {}, {}
    if extractor is not None:  # the floor: the ground-truth images themselves against the test reference
        from gen.data.images import to_uint8
        from gen.metrics.evaluate import compute_fid_for_images

        f = compute_fid_for_images(to_uint8(x), labels, extractor=extractor, ref="test", progress=False)
        reference = {"fid": round(f["fid"], 3), "class_accuracy": round(f["class_accuracy"], 4)}
        logger.info("ground truth vs test reference: %s", reference)
    for task, sigma_y in itertools.product(settings.task, settings.sigma_y):
        op = make_operator(task, sigma_y, settings.num_images, config, seed=settings.seed)
        y = op.measure(x, generator=torch.Generator().manual_seed(settings.seed + 1))
        examples[(task, sigma_y)] = {"measurement": _show_measurement(op, y[:settings.num_examples], x.shape),
                                     "truth": x[:settings.num_examples]}
        for method in settings.method:
            params = method_params(config, method, task, sigma_y)
            if method == "reddiff" and settings.reddiff_params:
                params.update(parse_overrides(settings.reddiff_params))
            images, wall, nfe = restore(pipe, op, y, method, settings.steps, params, settings.seed,
                                        settings.batch_size)
            examples[(task, sigma_y)][method] = images[:settings.num_examples]
            row = {"task": task, "sigma_y": sigma_y, "method": method, "steps": settings.steps if nfe else 0,
                   "nfe": nfe, "wall_s": round(wall, 2), "params": params,
                   **quality(images, x, labels, extractor, fid=not settings.no_fid)}
            rows.append(row)
            logger.info("%s sigma_y=%g %s: %s", task, sigma_y, method, row)
    return {"rows": rows, "examples": examples, "ground_truth": reference}


def timing(settings, config, task: str = "inpaint_box", sigma_y: float = 0.05) -> dict:
    """Median wall time of whole RED-Diff and DPS runs at equal steps on the same measurement, interleaved
    (``settings.timing_repeats`` rounds after one warm-up round) so that drift in machine load hits both alike."""
    import statistics

    from gen.data.digits import load_digits16

    pipe = load_pipe(repo_path(settings.model))
    x, _ = load_digits16(settings.split)
    x = x[:settings.num_images]
    op = make_operator(task, sigma_y, settings.num_images, config, seed=settings.seed)
    y = op.measure(x, generator=torch.Generator().manual_seed(settings.seed + 1))
    times = {"reddiff": [], "dps": []}
    for rep in range(settings.timing_repeats + 1):
        for method in times:
            _, wall, _ = restore(pipe, op, y, method, settings.steps, method_params(config, method, task, sigma_y),
                                 settings.seed, settings.batch_size)
            if rep:
                times[method].append(round(wall, 3))
    red, dps_t = statistics.median(times["reddiff"]), statistics.median(times["dps"])
    return {"task": task, "sigma_y": sigma_y, "num_images": settings.num_images, "steps": settings.steps,
            "batch_size": settings.batch_size, "repeats": settings.timing_repeats, "runs_s": times,
            "reddiff_median_s": red, "dps_median_s": dps_t, "ratio": round(red / dps_t, 4)}


def parse_overrides(items) -> dict:
    """``["lr=0.05", "t_max=250", "weighting=const"]`` -> ``{"lr": 0.05, "t_max": 250, "weighting": "const"}``."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--reddiff_params takes key=value items; got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def _show_measurement(op, y, x_shape):
    """A displayable [-1,1] image of a measurement: masked pixels grey (0) for inpainting, pinv upsampling else."""
    from gen.inverse import Inpainting

    if isinstance(op, Inpainting):
        m = op.mask[: y.shape[0]] if op.mask.shape[0] > 1 else op.mask
        return torch.where(m.expand_as(y) > 0, y, torch.zeros_like(y))
    if tuple(y.shape[-2:]) != tuple(x_shape[-2:]):
        return torch.nn.functional.interpolate(y, size=tuple(x_shape[-2:]), mode="nearest")
    return y


REDDIFF_KEYS = ("optimizer", "weighting", "t_max", "lr", "lam")


def tuning_grid(config: dict, method: str, num_train_timesteps: int = 1000, only: dict | None = None) -> dict:
    """The value lists searched per parameter, filtered: values outside their valid range (RED-Diff: an unknown
    optimizer or weighting, ``t_max`` outside ``[0, num_train_timesteps)``, ``lr <= 0``, ``lam < 0``; DPS:
    ``zeta < 0``, ``eta`` outside [0, 1]) are dropped, and ``only`` (``{"optimizer": ["sgd"]}``) keeps only the
    values it lists. A parameter left with no value raises ``ValueError``."""
    from gen.inverse.reddiff import OPTIMIZERS, WEIGHTINGS

    grid = config["tuning"][method]
    grid = grid.get("grid", grid)
    valid = {
        "optimizer": lambda v: v in OPTIMIZERS, "weighting": lambda v: v in WEIGHTINGS,
        "t_max": lambda v: isinstance(v, int) and 0 <= v < num_train_timesteps, "lr": lambda v: v > 0,
        "lam": lambda v: v >= 0, "zeta": lambda v: v >= 0, "eta": lambda v: 0 <= v <= 1,
    }
    out = {}
    for name, values in grid.items():
        kept = [v for v in values if valid.get(name, lambda _: True)(v)]
        if len(kept) < len(values):
            logger.warning("tuning grid %s.%s: dropped invalid values %s", method, name,
                           [v for v in values if v not in kept])
        if only and name in only:
            kept = [v for v in kept if v in only[name] or str(v) in only[name]]
        if not kept:
            raise ValueError(f"the tuning grid of {method} has no valid value left for {name!r} (grid {values}, "
                             f"filter {only.get(name) if only else None}); widen it in the settings file")
        out[name] = kept
    return out


def reddiff_absolute(params: dict, sigma_y: float) -> dict:
    """Search-space RED-Diff settings -> red_diff keywords. ``lam`` is searched relative to the data weight
    ``w = 1 / sigma_y^2`` (1 without noise), and so is the SGD step (``lr / w``), so one grid serves every noise
    level; Adam's ``lr`` is a step in pixel units and stays as it is."""
    w = 1.0 / sigma_y**2 if sigma_y > 0 else 1.0
    out = dict(params)
    out["lam"] = round(params["lam"] * w, 8)
    if params.get("optimizer", "adam") == "sgd":
        out["lr"] = round(params["lr"] / w, 10)
    return out


def reddiff_relative(params: dict, sigma_y: float) -> dict:
    """Inverse of :func:`reddiff_absolute` (the tuned settings in the settings file are absolute)."""
    w = 1.0 / sigma_y**2 if sigma_y > 0 else 1.0
    out = {"optimizer": "adam", **params}
    out["lam"] = params["lam"] / w
    if out["optimizer"] == "sgd":
        out["lr"] = params["lr"] * w
    return out


def coordinate_search(score, starts: list[dict], grid: dict, rounds: int = 2):
    """Maximise ``score(params)`` by coordinate search: from each start, sweep one parameter at a time over its
    grid values (the others fixed), keep the best, for up to ``rounds`` passes (stops early when a pass changes
    nothing). Evaluations are cached. Returns ``(best params, best score, {params key: score})``."""
    cache = {}

    def f(params):
        key = tuple(sorted(params.items()))
        if key not in cache:
            cache[key] = score(params)
        return cache[key]

    best, best_score = None, -float("inf")
    for start in starts:
        cur = dict(start)
        cur_score = f(cur)
        for _ in range(rounds):
            changed = False
            for name, values in grid.items():
                for v in values:
                    cand = {**cur, name: v}
                    sc = f(cand)
                    if sc > cur_score:
                        cur, cur_score, changed = cand, sc, True
            if not changed:
                break
        if cur_score > best_score:
            best, best_score = cur, cur_score
    return best, best_score, cache


def tune(settings, config) -> dict:
    """Per (task, sigma_y), on the first ``settings.num_images`` images of ``settings.split`` (train) at
    ``settings.steps``: RED-Diff by coordinate search over ``config["tuning"]["reddiff"]["grid"]`` from the
    paper's, InverseBench's and the previously tuned settings; DPS over its full (small) grid. Score: mean PSNR."""
    from gen.data.digits import load_digits16

    pipe = load_pipe(repo_path(settings.model))
    x, _ = load_digits16(settings.split)
    x = x[:settings.num_images]
    n_train = pipe.scheduler.config.num_train_timesteps
    only = tune_filter(settings.tune_only)
    results, best = [], []
    for task, sigma_y in itertools.product(settings.task, settings.sigma_y):
        best += _tune_one(pipe, settings, config, x, task, sigma_y, n_train, only, results)
    return {"grid": results, "best": best}


def _tune_one(pipe, settings, config, x, task, sigma_y, n_train, only, results) -> list[dict]:
    op = make_operator(task, sigma_y, settings.num_images, config, seed=settings.seed)
    y = op.measure(x, generator=torch.Generator().manual_seed(settings.seed + 1))
    best = []

    def evaluate(method, params):
        images, wall, _ = restore(pipe, op, y, method, settings.steps, params, settings.seed, settings.batch_size)
        row = {"task": task, "sigma_y": sigma_y, "method": method, "params": params, "wall_s": round(wall, 2),
               **quality(images, x, None, None, fid=False)}
        results.append(row)
        logger.info("tune %s", row)
        return row["psnr"]

    if "reddiff" in settings.method:
        cfg = config["tuning"]["reddiff"]
        grid = tuning_grid(config, "reddiff", n_train, only)
        starts = [dict(v) for v in cfg.get("starts", {}).values()]
        try:
            starts.append(reddiff_relative(method_params(config, "reddiff", task, sigma_y), sigma_y))
        except (KeyError, ValueError):
            pass
        starts = [{k: v for k, v in st.items() if k in REDDIFF_KEYS} for st in starts]
        if only:  # a start outside the filter moves to the filter's first value
            starts = [{k: (grid[k][0] if k in only and v not in grid[k] else v) for k, v in st.items()}
                      for st in starts]
        params, psnr_best, cache = coordinate_search(
            lambda rel: evaluate("reddiff", reddiff_absolute(rel, sigma_y)), starts, grid, settings.tune_rounds)
        best.append({"task": task, "sigma_y": sigma_y, "method": "reddiff", "psnr": psnr_best,
                     "params": reddiff_absolute(params, sigma_y), "search_params": params,
                     "evaluations": len(cache), "at_grid_edge": _at_edge(params, grid)})
    if "dps" in settings.method:
        grid = tuning_grid(config, "dps", n_train, only)
        scores = {}
        for zeta, eta in itertools.product(grid["zeta"], grid["eta"]):
            scores[(zeta, eta)] = evaluate("dps", {"zeta": zeta, "eta": eta})
        (zeta, eta), psnr_best = max(scores.items(), key=lambda kv: kv[1])
        best.append({"task": task, "sigma_y": sigma_y, "method": "dps", "psnr": psnr_best,
                     "params": {"zeta": zeta, "eta": eta}, "evaluations": len(scores),
                     "at_grid_edge": _at_edge({"zeta": zeta, "eta": eta}, grid)})
    for b in best:
        logger.info("best %s %s sigma_y=%g: %.3f dB with %s%s", b["method"], task, sigma_y, b["psnr"], b["params"],
                    f" (at the grid edge: {b['at_grid_edge']})" if b["at_grid_edge"] else "")
    return best


def _at_edge(params: dict, grid: dict) -> list[str]:
    """Numeric parameters whose tuned value is the smallest or largest of its grid (the grid may be too narrow)."""
    edge = []
    for k, v in params.items():
        values = grid.get(k, [])
        if len(values) > 2 and all(isinstance(x, (int, float)) for x in values) and v in (min(values), max(values)):
            edge.append(k)
    return edge


def write_tuned_config(path: Path, best: list[dict]) -> None:
    """Rewrite the ``reddiff:`` and ``dps:`` blocks of the settings file with the tuned settings (other lines, and
    comments outside those blocks, are kept)."""
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    for b in best:
        block = config.setdefault(b["method"], {}).setdefault(b["task"], {})
        block = {float(k): v for k, v in block.items()}
        block[float(b["sigma_y"])] = b["params"]
        config[b["method"]][b["task"]] = block
    lines = Path(path).read_text().splitlines()
    out, skip = [], False
    for line in lines:
        if line.startswith("#"):  # a comment at column 0 belongs to what follows
            skip = False
        top = line and not line[0].isspace() and not line.startswith("#")
        if top:
            skip = line.split(":")[0] in ("reddiff", "dps")
            if skip:
                out.append(f"{line.split(':')[0]}:")
                for task, table in config[line.split(":")[0]].items():
                    items = ", ".join(f"{k}: {_flow(v)}" for k, v in sorted(table.items()))
                    out.append(f"  {task}: {{{items}}}")
                continue
        if not skip:
            out.append(line)
    Path(path).write_text("\n".join(out) + "\n")


def _flow(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def plot(examples, path: Path, methods) -> Path:
    """One block per (task, sigma_y): rows measurement / pinv / DPS / RED-Diff / ground truth, one column per
    example image; blocks side by side."""
    from gen.data.images import save_labelled_grid

    order = ["measurement"] + [m for m in ("pinv", "dps", "reddiff") if m in methods] + ["truth"]
    blocks = []
    for key, ex in examples.items():
        block = torch.cat([ex[name] for name in order if name in ex])  # rows x examples
        n = ex["truth"].shape[0]
        blocks.append((block.reshape(-1, n, *block.shape[1:]), key))
    # interleave: each grid row is one role, the columns run over the blocks' examples with a blank gap
    rows = []
    for r in range(len(order)):
        parts = []
        for block, _ in blocks:
            parts.append(block[r] if r < block.shape[0] else torch.full_like(block[0], -1))
            parts.append(torch.ones_like(block[0][:1]))  # a white separator column
        rows.append(torch.cat(parts))
    ncol = rows[0].shape[0]
    names = {"measurement": "measurement", "pinv": "pinv", "dps": "DPS", "reddiff": "RED-Diff", "truth": "truth"}
    cols = []
    for block, key in blocks:  # the block's (task, sigma_y) over its first column, then blanks and the separator
        cols += [f"{key[0]}, sigma_y {key[1]:g}"] + [""] * (block.shape[1] - 1) + [""]
    return save_labelled_grid(torch.cat(rows), path, nrow=ncol, upscale=3, row_labels=[names[o] for o in order],
                              col_labels=cols, title="example restorations (columns: task, sigma_y; rows: method)")


def markdown_rows(rows) -> str:
    lines = ["| task | sigma_y | method | steps | NFE | PSNR | SSIM | FID-digits | class acc. | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fid, acc = r.get("fid", float("nan")), r.get("class_accuracy", float("nan"))
        lines.append(f"| {r['task']} | {r['sigma_y']:g} | {r['method']} | {r['steps']} | {r['nfe']} |"
                     f" {r['psnr']:.2f} | {r['ssim']:.3f} | {fid:.2f} | {acc:.3f} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def _environment() -> dict:
    return {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}




def run(settings: InverseSettings, command: str = "") -> dict:
    """The benchmark, the tuning search (``tune``) or the timing (``timing_repeats``); writes ``out`` and, for the
    benchmark, the figure and markdown rows next to it."""
    torch.set_num_threads(settings.threads)
    out = output_path(settings.out, settings.update_shipped)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; give the JSON file to write")
    config = load_settings(settings.config)
    settings = dataclasses.replace(settings, steps=settings.steps or config["steps"])
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    meta = {"command": command, "model": _rel(repo_path(settings.model)), "split": settings.split,
            "num_images": settings.num_images, "steps": settings.steps, "seed": settings.seed,
            "config": _rel(repo_path(settings.config)), **_environment()}
    if settings.tune:
        result = {**meta, **tune(settings, config)}
        if settings.write_config:
            write_tuned_config(repo_path(settings.config), result["best"])
            logger.info("wrote the tuned settings into %s", settings.config)
        result["markdown"] = tune_rows(result["best"])
    elif settings.timing_repeats > 0:
        result = {**meta, "timing": timing(settings, config)}
        logger.info("timing: %s", result["timing"])
        t = result["timing"]
        result["markdown"] = (f"RED-Diff {t['reddiff_median_s']:.2f} s, DPS {t['dps_median_s']:.2f} s (median of "
                              f"{t['repeats']} interleaved runs; ratio {t['ratio']:.3f})\n")
    else:
        res = run_benchmark(settings, config)
        result = {**meta, "ground_truth": res["ground_truth"], "rows": res["rows"]}
        fig = plot(res["examples"], out.with_suffix(".png"), settings.method)
        result["markdown"] = markdown_rows(res["rows"])
        out.with_suffix(".md").write_text(result["markdown"])
        logger.info("wrote %s and %s", fig, out.with_suffix(".md"))
    result["total_wall_s"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s (%.0f s)", out, result["total_wall_s"])
    return result


def tune_rows(best: list[dict]) -> str:
    """Markdown rows of the tuning search's best settings."""
    lines = ["| task | sigma_y | method | PSNR (train) | settings | evaluations | at the grid edge |",
             "|---|---|---|---|---|---|---|"]
    for b in best:
        lines.append(f"| {b['task']} | {b['sigma_y']:g} | {b['method']} | {b['psnr']:.2f} | "
                     f"{', '.join(f'{k}={v}' for k, v in b['params'].items())} | {b['evaluations']} | "
                     f"{', '.join(b['at_grid_edge']) or '-'} |")
    return "\n".join(lines) + "\n"


def _rel(path) -> str:
    """A path inside the repository as repo-relative text (results JSON stays machine-independent)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def demo_section(out: Path, settings) -> dict:
    """Demo: box inpainting and 2x super-resolution of 8 test digits (sigma_y = 0.05) with RED-Diff, next to the
    measurement, the pseudo-inverse, DPS and the ground truth; writes ``inverse_examples.png`` and
    ``inverse.json``."""
    from gen.data.digits import load_digits16
    from gen.metrics import psnr

    config = load_settings()
    steps = size(settings, config["steps"], 2)
    pipe = load_pipe(REPO_ROOT / "checkpoints" / "digits-teacher")
    x, _ = load_digits16("test")
    x = x[:8]
    seed = getattr(settings, "seed", 0)
    examples, summary, t0 = {}, {}, time.time()
    for task in ("inpaint_box", "sr2"):
        op = make_operator(task, 0.05, x.shape[0], config, seed=seed)
        y = op.measure(x, generator=torch.Generator().manual_seed(seed + 1))
        ex = {"measurement": _show_measurement(op, y, x.shape), "truth": x}
        for method in METHODS:
            images, wall, nfe = restore(pipe, op, y, method, steps, method_params(config, method, task, 0.05),
                                        seed, x.shape[0])
            ex[method] = images
            summary[f"{task}/{method}"] = {"psnr": round(float(psnr(images.clamp(-1, 1), x).mean()), 2),
                                           "nfe": nfe, "wall_s": round(wall, 2)}
        examples[(task, 0.05)] = ex
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig = plot(examples, out / "inverse_examples.png", METHODS)
    result = {"sigma_y": 0.05, "steps": steps, "num_images": 8, "results": summary,
              "wall_time_s": round(time.time() - t0, 1)}
    (out / "inverse.json").write_text(json.dumps(result, indent=2))
    logger.info("wrote %s (rows: measurement / pinv / DPS / RED-Diff / truth; box inpainting left, 2x SR right) and"
                " %s: %s", fig, out / "inverse.json", summary)
    return result


