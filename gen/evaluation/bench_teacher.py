"""Benchmark the shipped digits teacher and the pipeline's sampling overhead (``eval/bench_teacher.py``).

1. FID-digits (against digits16-test) and class accuracy of N samples at each DDIM step count, unguided (w=1)
   and guided (w=2), next to the floor: digits16-train against digits16-test.
2. Overhead of ClassConditionalPipeline against Diffusers' DDIMPipeline on the same UNet and steps. DDIMPipeline
   cannot pass class labels, so both run the unconditional variant of the teacher's architecture
   (``digits_unet(num_class_embeds=None)``): identical network calls, only the loops differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import statistics
import time

import torch

from gen.evaluation import option, output_path, repo_path

logger = logging.getLogger("gen.evaluation.bench_teacher")


@dataclasses.dataclass
class BenchTeacherSettings:
    pipeline: str = option("checkpoints/digits-teacher", "ClassConditionalPipeline folder")
    num_samples: int = option(1000, "samples per FID row")
    steps: list[int] = option([10, 25, 50], "DDIM step counts")
    guidance_scales: list[float] = option([1.0, 2.0], "CFG weights")
    seed: int = option(0, "seed of the sampling noise")
    bench_batch: int = option(64, "overhead benchmark: batch")
    bench_steps: int = option(25, "overhead benchmark: steps")
    bench_repeats: int = option(7, "overhead benchmark: interleaved repeats")
    skip_quality: bool = option(False, "only the overhead benchmark")
    out: str = option("outputs/bench_teacher.json", "JSON file to write")
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")


def quality(settings) -> list[dict]:
    from gen.metrics.evaluate import compute_fid_for_images, load_dataset_uint8, sample_pipeline_uint8
    from gen.metrics.features import build_feature_extractor
    from pipelines import ClassConditionalPipeline

    extractor = build_feature_extractor("digits")
    rows = []
    train_u8, train_labels = load_dataset_uint8("digits16-train")
    floor = compute_fid_for_images(train_u8, train_labels, extractor=extractor, ref="test", progress=False)
    rows.append({"source": "digits16-train (floor)", "steps": None, "guidance_scale": None, **floor})
    logger.info("floor: FID-digits %.3f, accuracy %.4f (N=%d)", floor["fid"], floor["class_accuracy"], floor["n"])
    pipe = ClassConditionalPipeline.from_pretrained(repo_path(settings.pipeline))
    for steps in settings.steps:
        for w in settings.guidance_scales:
            t0 = time.time()
            images, labels, nfe = sample_pipeline_uint8(pipe, settings.num_samples, steps, w, batch_size=250,
                                                        seed=settings.seed, progress=False)
            wall = time.time() - t0
            res = compute_fid_for_images(images, labels, extractor=extractor, ref="test", progress=False)
            rows.append({"source": settings.pipeline, "steps": steps, "guidance_scale": w, "nfe": nfe,
                         "sample_wall_s": round(wall, 1), **res})
            logger.info("steps %d w %.1f: FID-digits %.3f (%.2fx floor), accuracy %.4f, %.0f s", steps, w,
                        res["fid"], res["fid"] / floor["fid"], res["class_accuracy"], wall)
    return rows


def overhead(settings) -> dict:
    from diffusers import DDIMPipeline

    from gen.models.unet import digits_unet
    from pipelines import ClassConditionalPipeline

    torch.manual_seed(0)
    unet = digits_unet(num_class_embeds=None).eval()
    sched = ClassConditionalPipeline.from_pretrained(repo_path(settings.pipeline)).scheduler
    ours = ClassConditionalPipeline(unet=unet, scheduler=sched)
    ref = DDIMPipeline(unet=unet, scheduler=sched)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)

    def run_ours():
        ours(batch_size=settings.bench_batch, num_inference_steps=settings.bench_steps, output_type="pt",
             generator=torch.Generator().manual_seed(0))

    def run_ref():
        ref(batch_size=settings.bench_batch, num_inference_steps=settings.bench_steps, output_type="np", eta=0.0,
            generator=torch.Generator().manual_seed(0))

    run_ours(), run_ref()  # warm-up
    t_ours, t_ref = [], []
    for _ in range(settings.bench_repeats):  # interleaved, so drift in machine load hits both alike
        t0 = time.perf_counter(); run_ours(); t_ours.append(time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); run_ref(); t_ref.append(time.perf_counter() - t0)  # noqa: E702
    mo, mr = statistics.median(t_ours), statistics.median(t_ref)
    res = {"batch": settings.bench_batch, "steps": settings.bench_steps, "repeats": settings.bench_repeats,
           "ours_median_s": round(mo, 4), "ddim_pipeline_median_s": round(mr, 4),
           "ours_images_per_s": round(settings.bench_batch / mo, 2),
           "ddim_images_per_s": round(settings.bench_batch / mr, 2),
           "overhead": round(mo / mr - 1, 4)}
    logger.info("overhead: ours %.3f s vs DDIMPipeline %.3f s -> %+.1f%%", mo, mr, 100 * res["overhead"])
    return res


def markdown(result: dict) -> str:
    """The rows for BENCHMARKS.md."""
    lines = ["| source | DDIM steps | w | NFE | FID-digits | x floor | class acc. |", "|---|---|---|---|---|---|---|"]
    floor = None
    for r in result.get("quality", []):
        floor = floor or r["fid"]
        lines.append(f"| {r['source']} | {r['steps'] or '-'} | {r['guidance_scale'] or '-'} | {r.get('nfe') or '-'} | "
                     f"{r['fid']:.3f} | {r['fid'] / floor:.2f} | {100 * r['class_accuracy']:.1f}% |")
    o = result["overhead"]
    lines.append(f"\noverhead vs DDIMPipeline (batch {o['batch']}, {o['steps']} steps, median of {o['repeats']}): "
                 f"{o['ours_median_s']} s vs {o['ddim_pipeline_median_s']} s = {100 * o['overhead']:+.1f}%")
    return "\n".join(lines)


def run(settings: BenchTeacherSettings, command: str = "") -> dict:
    out = output_path(settings.out, settings.update_shipped)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}"
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "torch": torch.__version__, "command": command}
    if not settings.skip_quality:
        result["quality"] = quality(settings)
    result["overhead"] = overhead(settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    logger.info("%s", markdown(result))
    return result
