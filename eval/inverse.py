"""Inverse-problem benchmark on the shipped digits teacher: RED-Diff vs DPS vs the pseudo-inverse.

    python eval/inverse.py --task inpaint_box --method reddiff --model checkpoints/digits-teacher \\
        --num_images 300 --out OUT/inverse.json
    python eval/inverse.py --out eval/results/inverse/inverse.json            # all tasks x sigma_y x methods
    python eval/inverse.py --tune --out OUT/inverse_tune.json                 # grids on 50 *train* images
    python eval/inverse.py --timing_repeats 3 --out OUT/inverse_timing.json   # interleaved RED-Diff / DPS timing

Tasks (16x16 digits in [-1, 1]; noise ``y = H x + sigma_y n`` in those units, sigma_y in --sigma_y, default 0 and
0.05): ``inpaint_box`` (a centred 6x6 hole), ``inpaint_random`` (70% of pixels missing, one seeded mask per image),
``sr2`` (2x block-average downsampling), ``deblur_gauss`` (9-tap Gaussian, std 1.5, reflect borders; its pinv
truncates the 1-D singular values below ``rcond`` times the largest: 0.03 at sigma_y = 0 (DDRM's cut-off), 0.2 at
sigma_y = 0.05, the best pinv PSNR on the 50 train images). The teacher runs unconditionally (null class).

RED-Diff and DPS run at the same number of steps (one network evaluation each; a DPS step also backpropagates
through the UNet), with the per-task settings of ``configs/inverse_digits.yaml``, tuned by ``--tune`` on the first
50 images of the *train* split (the benchmark uses the test split). Metrics per (task, sigma_y, method): PSNR
(mean over images of the per-image PSNR, data range 2), SSIM (Gaussian 11x11, sigma 1.5), FID-digits against the
digits16 test split, class accuracy of the digits classifier on the restorations (ground-truth labels), wall time
of the restoration (one thread) and network evaluations per image.

Writes ``--out`` (JSON), and beside it ``<stem>.png`` (example restorations: rows measurement / pinv / DPS /
RED-Diff / ground truth per task) and ``<stem>.md`` (markdown table rows).
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import logging
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

logger = logging.getLogger("eval.inverse")

TASKS = ("inpaint_box", "inpaint_random", "sr2", "deblur_gauss")
METHODS = ("pinv", "dps", "reddiff")


def _rel(path) -> str:
    """A path inside the repository as repo-relative text (results JSON stays machine-independent)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def load_settings(path=ROOT / "configs" / "inverse_digits.yaml") -> dict:
    """Task definitions, steps, the tuned RED-Diff / DPS settings and the tuning grids."""
    import yaml

    return yaml.safe_load(Path(path).read_text())


def make_operator(task: str, sigma_y: float, num_images: int, settings: dict, seed: int = 0):
    """The measurement operator of ``task`` for ``num_images`` 16x16 images (random masks seeded by ``seed``)."""
    from gen.inverse import GaussianBlur, Inpainting, SuperResolution

    cfg = settings["tasks"][task]
    if task == "inpaint_box":
        return Inpainting.box((16, 16), cfg["box_size"], sigma_y=sigma_y)
    if task == "inpaint_random":
        return Inpainting.random_pixels((16, 16), cfg["missing"], seed=seed, batch=num_images, sigma_y=sigma_y)
    if task == "sr2":
        return SuperResolution(cfg["factor"], kind=cfg["kind"], sigma_y=sigma_y)
    if task == "deblur_gauss":
        rcond = cfg["rcond"]
        if isinstance(rcond, dict):  # per noise level
            match = [v for k, v in rcond.items() if abs(float(k) - sigma_y) < 1e-9]
            if not match:
                raise ValueError(f"no deblur_gauss rcond for sigma_y={sigma_y}; configured: {sorted(rcond)}")
            rcond = match[0]
        return GaussianBlur(cfg["kernel_size"], cfg["blur_sigma"], sigma_y=sigma_y, rcond=float(rcond))
    raise ValueError(f"task={task!r}; allowed: {', '.join(TASKS)}")


def method_params(settings: dict, method: str, task: str, sigma_y: float) -> dict:
    """The tuned keyword arguments of ``method`` for (task, sigma_y) from the settings file."""
    if method == "pinv":
        return {}
    table = settings[method][task]
    for key, value in table.items():
        if abs(float(key) - sigma_y) < 1e-9:
            return dict(value)
    raise ValueError(f"configs/inverse_digits.yaml has no {method} settings for {task} at sigma_y={sigma_y}; "
                     f"tuned for {sorted(float(k) for k in table)}")


def restore(pipe, op, y, method: str, steps: int, params: dict, seed: int, batch_size: int):
    """Restorations [N,1,16,16] in [-1,1], wall seconds, network evaluations per image."""
    chunks, nfe, t0 = [], 0, time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    accepted = inspect.signature(pipe.__call__).parameters
    direct = method == "reddiff" and any(k not in accepted for k in params)
    for start in range(0, y.shape[0], batch_size):
        sub = _slice_operator(op, start, start + batch_size)
        if direct:
            images, nfe = _red_diff_direct(pipe, sub, y[start:start + batch_size], steps, params, gen)
            chunks.append(images)
            continue
        out = pipe(y[start:start + batch_size], sub, method=method, num_inference_steps=steps, generator=gen,
                   output_type="pt", **params)
        chunks.append(out.images * 2 - 1)
        nfe = out.nfe
    return torch.cat(chunks), time.perf_counter() - t0, nfe


def _red_diff_direct(pipe, op, y, steps: int, params: dict, generator):
    """RED-Diff with keyword options of ``gen.inverse.red_diff`` that ``RedDiffPipeline`` does not forward yet
    (``optimizer``): the pipeline's own wiring (null class, ``mu0 = H^+ y``, the descending grid), same result as
    the pipeline for the options it does take, and the same [0, 1] clamp of the output."""
    from gen.diffusion import alpha_sigma, prediction_type_of
    from gen.inverse import red_diff
    from gen.inverse.reddiff import eps_predictor, reddiff_timesteps

    params = dict(params)
    t_max, t_min = params.pop("t_max", None), params.pop("t_min", 0)
    unet, sched = pipe.unet, pipe.scheduler
    size = unet.config.sample_size
    x_shape = (y.shape[0], unet.config.in_channels, size, size)
    labels = pipe._labels(None, y.shape[0])

    def model_fn(x, t):
        t = torch.as_tensor(t, device=x.device)
        return unet(x, t.expand(x.shape[0]) if t.ndim else t, class_labels=labels).sample

    grid = reddiff_timesteps(steps, sched.config.num_train_timesteps, t_max, t_min)
    with torch.no_grad():
        mu0 = op.pinv(y, x_shape)
    x = red_diff(eps_predictor(model_fn, prediction_type_of(sched), sched), op, y, mu0,
                 lambda t: alpha_sigma(sched, t, ndim=4, dtype=mu0.dtype), grid, generator=generator, **params)
    return (x / 2 + 0.5).clamp(0, 1) * 2 - 1, steps


def _slice_operator(op, start, stop):
    """The operator of images ``start:stop`` (per-image masks are sliced; shared operators returned as they are)."""
    from gen.inverse import Inpainting

    if isinstance(op, Inpainting) and op.mask.shape[0] > 1:
        return Inpainting(op.mask[start:stop], sigma_y=op.sigma_y)
    return op


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


def run(args, settings) -> dict:
    """Every (task, sigma_y, method) on ``args.num_images`` images of ``args.split``."""
    from gen.data.digits import load_digits16
    from gen.metrics.features import build_feature_extractor

    pipe = load_pipe(args.model)
    extractor = None if args.no_fid else build_feature_extractor("digits")
    x, labels = load_digits16(args.split)
    if args.num_images > x.shape[0]:
        raise ValueError(f"--num_images {args.num_images} exceeds the {x.shape[0]} images of split {args.split!r}")
    x, labels = x[:args.num_images], labels[:args.num_images]
    rows, examples, reference = [], {}, {}
    if extractor is not None:  # the floor: the ground-truth images themselves against the test reference
        from gen.data.images import to_uint8
        from gen.metrics.evaluate import compute_fid_for_images

        f = compute_fid_for_images(to_uint8(x), labels, extractor=extractor, ref="test", progress=False)
        reference = {"fid": round(f["fid"], 3), "class_accuracy": round(f["class_accuracy"], 4)}
        logger.info("ground truth vs test reference: %s", reference)
    for task, sigma_y in itertools.product(args.task, args.sigma_y):
        op = make_operator(task, sigma_y, args.num_images, settings, seed=args.seed)
        y = op.measure(x, generator=torch.Generator().manual_seed(args.seed + 1))
        examples[(task, sigma_y)] = {"measurement": _show_measurement(op, y[:args.num_examples], x.shape),
                                     "truth": x[:args.num_examples]}
        for method in args.method:
            params = method_params(settings, method, task, sigma_y)
            if method == "reddiff" and args.reddiff_params:
                params.update(_parse_overrides(args.reddiff_params))
            images, wall, nfe = restore(pipe, op, y, method, args.steps, params, args.seed, args.batch_size)
            examples[(task, sigma_y)][method] = images[:args.num_examples]
            row = {"task": task, "sigma_y": sigma_y, "method": method, "steps": args.steps if nfe else 0,
                   "nfe": nfe, "wall_s": round(wall, 2), "params": params,
                   **quality(images, x, labels, extractor, fid=not args.no_fid)}
            rows.append(row)
            logger.info("%s sigma_y=%g %s: %s", task, sigma_y, method, row)
    return {"rows": rows, "examples": examples, "ground_truth": reference}


def timing(args, settings, task: str = "inpaint_box", sigma_y: float = 0.05) -> dict:
    """Median wall time of whole RED-Diff and DPS runs at equal steps on the same measurement, interleaved
    (``args.timing_repeats`` rounds after one warm-up round) so that drift in machine load hits both alike."""
    import statistics

    from gen.data.digits import load_digits16

    pipe = load_pipe(args.model)
    x, _ = load_digits16(args.split)
    x = x[:args.num_images]
    op = make_operator(task, sigma_y, args.num_images, settings, seed=args.seed)
    y = op.measure(x, generator=torch.Generator().manual_seed(args.seed + 1))
    times = {"reddiff": [], "dps": []}
    for rep in range(args.timing_repeats + 1):
        for method in times:
            _, wall, _ = restore(pipe, op, y, method, args.steps, method_params(settings, method, task, sigma_y),
                                 args.seed, args.batch_size)
            if rep:
                times[method].append(round(wall, 3))
    red, dps_t = statistics.median(times["reddiff"]), statistics.median(times["dps"])
    return {"task": task, "sigma_y": sigma_y, "num_images": args.num_images, "steps": args.steps,
            "batch_size": args.batch_size, "repeats": args.timing_repeats, "runs_s": times,
            "reddiff_median_s": red, "dps_median_s": dps_t, "ratio": round(red / dps_t, 4)}


def _parse_overrides(items) -> dict:
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


def tuning_grid(settings: dict, method: str, num_train_timesteps: int = 1000, only: dict | None = None) -> dict:
    """The value lists searched per parameter, filtered: values outside their valid range (RED-Diff: an unknown
    optimizer or weighting, ``t_max`` outside ``[0, num_train_timesteps)``, ``lr <= 0``, ``lam < 0``; DPS:
    ``zeta < 0``, ``eta`` outside [0, 1]) are dropped, and ``only`` (``{"optimizer": ["sgd"]}``) keeps only the
    values it lists. A parameter left with no value raises ``ValueError``."""
    from gen.inverse.reddiff import OPTIMIZERS, WEIGHTINGS

    grid = settings["tuning"][method]
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
    """Inverse of :func:`reddiff_absolute` (tuned settings in the config file are absolute)."""
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


def tune(args, settings) -> dict:
    """Per (task, sigma_y), on the first ``args.num_images`` images of ``args.split`` (train) at ``args.steps``:
    RED-Diff by coordinate search over ``settings["tuning"]["reddiff"]["grid"]`` from the paper's, InverseBench's
    and the previously tuned settings; DPS over its full (small) grid. Score: mean PSNR."""
    from gen.data.digits import load_digits16

    pipe = load_pipe(args.model)
    x, _ = load_digits16(args.split)
    x = x[:args.num_images]
    n_train = pipe.scheduler.config.num_train_timesteps
    only = dict(f.split("=", 1) for f in args.tune_only) if args.tune_only else None
    only = {k: v.split(",") for k, v in only.items()} if only else None
    results, best = [], []
    for task, sigma_y in itertools.product(args.task, args.sigma_y):
        best += _tune_one(pipe, args, settings, x, task, sigma_y, n_train, only, results)
    return {"grid": results, "best": best}


def _tune_one(pipe, args, settings, x, task, sigma_y, n_train, only, results) -> list[dict]:
    op = make_operator(task, sigma_y, args.num_images, settings, seed=args.seed)
    y = op.measure(x, generator=torch.Generator().manual_seed(args.seed + 1))
    best = []

    def evaluate(method, params):
        images, wall, _ = restore(pipe, op, y, method, args.steps, params, args.seed, args.batch_size)
        row = {"task": task, "sigma_y": sigma_y, "method": method, "params": params, "wall_s": round(wall, 2),
               **quality(images, x, None, None, fid=False)}
        results.append(row)
        logger.info("tune %s", row)
        return row["psnr"]

    if "reddiff" in args.method:
        cfg = settings["tuning"]["reddiff"]
        grid = tuning_grid(settings, "reddiff", n_train, only)
        starts = [dict(v) for v in cfg.get("starts", {}).values()]
        try:
            starts.append(reddiff_relative(method_params(settings, "reddiff", task, sigma_y), sigma_y))
        except (KeyError, ValueError):
            pass
        starts = [{k: v for k, v in st.items() if k in REDDIFF_KEYS} for st in starts]
        if only:  # a start outside the filter moves to the filter's first value
            starts = [{k: (grid[k][0] if k in only and v not in grid[k] else v) for k, v in st.items()}
                      for st in starts]
        params, psnr_best, cache = coordinate_search(
            lambda rel: evaluate("reddiff", reddiff_absolute(rel, sigma_y)), starts, grid, args.tune_rounds)
        best.append({"task": task, "sigma_y": sigma_y, "method": "reddiff", "psnr": psnr_best,
                     "params": reddiff_absolute(params, sigma_y), "search_params": params,
                     "evaluations": len(cache), "at_grid_edge": _at_edge(params, grid)})
    if "dps" in args.method:
        grid = tuning_grid(settings, "dps", n_train, only)
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

    settings = yaml.safe_load(Path(path).read_text())
    for b in best:
        block = settings.setdefault(b["method"], {}).setdefault(b["task"], {})
        block = {float(k): v for k, v in block.items()}
        block[float(b["sigma_y"])] = b["params"]
        settings[b["method"]][b["task"]] = block
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
                for task, table in settings[line.split(":")[0]].items():
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
    from gen.data.images import save_grid

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
    return save_grid(torch.cat(rows), path, nrow=ncol, upscale=3)


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


def parse_args(argv=None):
    settings = load_settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", nargs="+", default=["all"], choices=(*TASKS, "all"))
    p.add_argument("--method", nargs="+", default=["all"], choices=(*METHODS, "all"))
    p.add_argument("--sigma_y", type=float, nargs="+", default=[0.0, 0.05])
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "digits-teacher"))
    p.add_argument("--num_images", type=int, default=None, help="default 300 (50 with --tune)")
    p.add_argument("--split", default=None, help="default test (train with --tune)")
    p.add_argument("--steps", type=int, default=settings["steps"], help="RED-Diff / DPS steps (equal)")
    p.add_argument("--batch_size", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_examples", type=int, default=6, help="example images per task in the figure")
    p.add_argument("--tune", action="store_true", help="search the settings on the train split instead")
    p.add_argument("--tune_rounds", type=int, default=2, help="passes of RED-Diff's coordinate search")
    p.add_argument("--tune_only", nargs="*", default=None,
                   help="restrict the tuning grid, e.g. optimizer=sgd weighting=linear,const")
    p.add_argument("--write_config", action="store_true",
                   help="--tune: write the best settings into --config (a tracked file: explicit only)")
    p.add_argument("--timing_repeats", type=int, default=0,
                   help="instead of the benchmark: interleaved RED-Diff / DPS timing runs on inpaint_box (0 = off)")
    p.add_argument("--reddiff_params", nargs="*", default=None,
                   help="override the tuned RED-Diff settings, e.g. lr=0.05 t_max=500 (a steps study)")
    p.add_argument("--no_fid", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--config", default=str(ROOT / "configs" / "inverse_digits.yaml"))
    p.add_argument("--out", default="outputs/inverse/inverse.json")
    args = p.parse_args(argv)
    args.task = list(TASKS) if "all" in args.task else args.task
    args.method = list(METHODS) if "all" in args.method else [m for m in METHODS if m in args.method]
    args.num_images = args.num_images or (50 if args.tune else 300)
    args.split = args.split or ("train" if args.tune else "test")
    if args.num_images < 2 and not args.no_fid:
        raise ValueError("--num_images must be >= 2 for FID (or pass --no_fid)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = load_settings(args.config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    meta = {"command": "python eval/inverse.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": _rel(args.model), "split": args.split, "num_images": args.num_images, "steps": args.steps,
            "seed": args.seed, "config": _rel(args.config), **_environment()}
    if args.tune:
        result = {**meta, **tune(args, settings)}
        if args.write_config:
            write_tuned_config(Path(args.config), result["best"])
            logger.info("wrote the tuned settings into %s", args.config)
    elif args.timing_repeats > 0:
        result = {**meta, "timing": timing(args, settings)}
        logger.info("timing: %s", result["timing"])
    else:
        res = run(args, settings)
        result = {**meta, "ground_truth": res["ground_truth"], "rows": res["rows"]}
        fig = plot(res["examples"], out.with_suffix(".png"), args.method)
        out.with_suffix(".md").write_text(markdown_rows(res["rows"]))
        logger.info("wrote %s and %s", fig, out.with_suffix(".md"))
    result["total_wall_s"] = round(time.time() - t0, 1)
    out.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s (%.0f s)", out, result["total_wall_s"])
    return result


def demo_section(out: Path, args) -> dict:
    """Demo: box inpainting and 2x super-resolution of 8 test digits (sigma_y = 0.05) with RED-Diff, next to the
    measurement, the pseudo-inverse, DPS and the ground truth; writes ``inverse_examples.png`` and
    ``inverse.json``."""
    from gen.data.digits import load_digits16
    from gen.metrics import psnr

    settings = load_settings()
    steps = settings["steps"]
    pipe = load_pipe(str(ROOT / "checkpoints" / "digits-teacher"))
    x, _ = load_digits16("test")
    x = x[:8]
    seed = getattr(args, "seed", 0)
    examples, summary, t0 = {}, {}, time.time()
    for task in ("inpaint_box", "sr2"):
        op = make_operator(task, 0.05, x.shape[0], settings, seed=seed)
        y = op.measure(x, generator=torch.Generator().manual_seed(seed + 1))
        ex = {"measurement": _show_measurement(op, y, x.shape), "truth": x}
        for method in METHODS:
            images, wall, nfe = restore(pipe, op, y, method, steps, method_params(settings, method, task, 0.05),
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


if __name__ == "__main__":
    main()
