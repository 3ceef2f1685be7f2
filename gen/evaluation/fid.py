"""FID / KID (and class accuracy) of a pipeline, a folder of images or a digits split against reference statistics
(``eval/fid.py``).

Samples are quantised to uint8 exactly as saved PNGs would be; report N, the reference and the features with every
number (FID depends on all three).

KID is reported with Inception features only (``kid="auto"``): its polynomial kernel ``(x.y / d + 1)^3`` was designed
for Inception pool3 features (non-negative, O(1) values). On the digits classifier's 128-d features the kernel is
dominated by the features' scale, and the unbiased estimate swings to large negative values (``-111 +- 45`` on
1,437 train digits against the test split), which readers take for a bug; ``kid="on"`` computes it anyway (with a
note on its scale), ``"off"`` never.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import time

from gen.evaluation import option, output_path, refresh_manifest, repo_path
from gen.metrics.evaluate import DATASETS
from gen.metrics.features import FEATURE_EXTRACTORS

logger = logging.getLogger("gen.evaluation.fid")
KID_SCALE_NOTE = ("KID's polynomial kernel (x.y/d + 1)^3 is calibrated for Inception pool3 features; on {features} "
                  "features its value is dominated by the feature scale (large, even negative, unbiased estimates), "
                  "so compare it only between runs with the same features and N")


@dataclasses.dataclass
class FIDSettings:
    pipeline: str | None = option(None, "class-conditional pipeline folder to sample")
    samples: str | None = option(None, "folder of images (all the same square size)")
    dataset: str | None = option(None, "a digits split", choices=DATASETS)
    num_samples: int = option(1000, "samples to draw from --pipeline")
    steps: int = option(50, "sampler steps for --pipeline")
    guidance_scale: float = option(1.0, "classifier-free guidance weight")
    scheduler: str = option("ddim", "sampler name (gen.diffusion.SCHEDULERS)")
    batch_size: int = option(250, "images per sampling / feature batch")
    seed: int = option(0, "seed of the sampling noise")
    save_samples: str | None = option(None, "also write the --pipeline samples as PNGs into this folder")
    features: str = option("digits", "feature extractor", choices=FEATURE_EXTRACTORS)
    feature_path: str | None = option(None, "classifier folder (digits) or Inception TorchScript (inception)")
    classifier: str | None = option(None, "digits classifier folder for class accuracy (default: the shipped one)")
    ref: str = option("test", "'train', 'test' or a reference .npz")
    write_ref: str | None = option(None, "write the input's statistics to this .npz instead of comparing")
    kid: str = option("auto", "report KID: auto (Inception features only), on, off", choices=("auto", "on", "off"))
    kid_subsets: int = option(100, "KID subsets")
    kid_subset_size: int = option(1000, "KID subset size (clamped to the N's)")
    device: str | None = option(None, "torch device (default: cuda if available, else cpu)")
    out: str | None = option(None, "write the results as JSON to this file")
    no_progress: bool = option(False, "hide progress bars")
    update_shipped: bool = option(False, "allow --out / --write_ref inside checkpoints/ or eval/results/")

    def __post_init__(self):
        given = [name for name in ("pipeline", "samples", "dataset") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of --pipeline, --samples, --dataset; got "
                             f"{', '.join('--' + g for g in given) or 'none'}")
        for name in ("num_samples", "steps", "batch_size", "kid_subsets"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def kid_policy(kid: str, features: str) -> dict:
    """Whether to report KID for these features, and the note that goes with it."""
    if kid == "off":
        return {"report": False, "note": "KID not requested (--kid off)"}
    if features == "inception":
        return {"report": True, "note": None}
    if kid == "on":
        return {"report": True, "note": KID_SCALE_NOTE.format(features=features)}
    return {"report": False, "note": KID_SCALE_NOTE.format(features=features) + "; not reported (--kid on to "
            "compute it anyway)"}


def load_source(settings: FIDSettings, device):
    """Returns (uint8 images [N, C, H, W], labels or None, description of the source, nfe or None)."""
    from gen.metrics import evaluate

    progress = not settings.no_progress
    if settings.dataset:
        images, labels = evaluate.load_dataset_uint8(settings.dataset)
        return images, labels, settings.dataset, None
    if settings.samples:
        return evaluate.load_image_folder_uint8(settings.samples, progress=progress), None, settings.samples, None
    from pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(repo_path(settings.pipeline)).to(device)
    evaluate.set_scheduler(pipe, settings.scheduler)
    images, labels, nfe = evaluate.sample_pipeline_uint8(
        pipe,
        settings.num_samples,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        batch_size=settings.batch_size,
        seed=settings.seed,
        progress=progress,
    )
    if settings.save_samples:
        evaluate.save_png_folder(images, settings.save_samples)
    return images, labels, settings.pipeline, nfe


def run(settings: FIDSettings) -> dict:
    import torch

    from gen.metrics import evaluate
    from gen.metrics.features import build_feature_extractor

    start = time.perf_counter()
    device = torch.device(settings.device) if settings.device else evaluate.default_device()
    progress = not settings.no_progress
    extractor = build_feature_extractor(settings.features, settings.feature_path, device=device)
    images, labels, source, nfe = load_source(settings, device)

    if settings.write_ref:
        target = output_path(settings.write_ref, settings.update_shipped, "--write_ref")
        saved = evaluate.write_reference(target, images, extractor, source, batch_size=settings.batch_size,
                                         progress=progress)
        refresh_manifest(target)
        logger.info(f"wrote {saved['path']}: {settings.features} features of {saved['n']} images from {source}")
        return {"write_ref": saved["path"], "n": saved["n"], "features": settings.features, "source": source}

    result = evaluate.compute_fid_for_images(
        images,
        labels,
        ref=settings.ref,
        extractor=extractor,
        classifier=settings.classifier,
        batch_size=settings.batch_size,
        kid_subsets=settings.kid_subsets,
        kid_subset_size=settings.kid_subset_size,
        progress=progress,
    )
    kid_note = kid_policy(settings.kid, settings.features)
    if kid_note["report"] is False:
        result.update(kid=None, kid_std=None)
    if kid_note["note"]:
        result["kid_note"] = kid_note["note"]
    is_pipeline = settings.pipeline is not None
    result.update(
        source=source,
        steps=settings.steps if is_pipeline else None,
        guidance_scale=settings.guidance_scale if is_pipeline else None,
        scheduler=settings.scheduler if is_pipeline else None,
        seed=settings.seed if is_pipeline else None,
        nfe=nfe,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        wall_time_s=round(time.perf_counter() - start, 3),
    )
    if settings.out:
        out = output_path(settings.out, settings.update_shipped)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    kid_text = "not reported (see kid_note)" if result["kid"] is None else \
        f"{result['kid']:.5f}+-{result['kid_std']:.5f}"
    accuracy = f" acc={result['class_accuracy']:.4f}" if "class_accuracy" in result else ""
    logger.info(
        f"FID={result['fid']:.4f} KID={kid_text}{accuracy} n={result['n']} n_ref={result['n_ref']} "
        f"features={result['features']} ref={result['ref']} source={source}"
    )
    return result


