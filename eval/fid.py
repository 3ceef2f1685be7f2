"""FID / KID (and class accuracy) of a pipeline, a folder of images or a digits split against reference statistics.

Examples (from the repository root):

    # reference statistics of the digits test split in the digits-classifier feature space
    python eval/fid.py --dataset digits16-test --features digits \
        --write_ref checkpoints/fid-refs/digits16-test-digits.npz
    # 1000 balanced samples of a pipeline, 25 DDIM steps, against the test split
    python eval/fid.py --pipeline checkpoints/digits-teacher --steps 25 --ref test --out outputs/fid.json
    # a folder of PNGs, Inception features (reference computed and cached on first use)
    python eval/fid.py --samples outputs/samples --features inception --ref train

Samples are quantised to uint8 exactly as saved PNGs would be; report N, the reference and the features with
every number (FID depends on all three).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)  # `import gen` without installing the package


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from gen.metrics.evaluate import DATASETS
    from gen.metrics.features import FEATURE_EXTRACTORS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="class-conditional pipeline folder to sample")
    source.add_argument("--samples", help="folder of images (all the same square size)")
    source.add_argument("--dataset", choices=DATASETS, help="a digits split")
    parser.add_argument("--num_samples", type=int, default=1000, help="samples to draw from --pipeline")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps for --pipeline")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="classifier-free guidance weight")
    parser.add_argument("--scheduler", default="ddim", help="sampler name (gen.diffusion.SCHEDULERS)")
    parser.add_argument("--batch_size", type=int, default=250, help="images per sampling / feature batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    parser.add_argument("--save_samples", help="also write the --pipeline samples as PNGs into this folder")
    parser.add_argument("--features", choices=FEATURE_EXTRACTORS, default="digits", help="feature extractor")
    parser.add_argument(
        "--feature_path", help="classifier folder (digits) or Inception TorchScript (inception)"
    )
    parser.add_argument(
        "--classifier", help="digits classifier folder for class accuracy (default: the default one)"
    )
    parser.add_argument("--ref", default="test", help="'train', 'test' or a reference .npz")
    parser.add_argument("--write_ref", help="write the input's statistics to this .npz instead of comparing")
    parser.add_argument("--kid_subsets", type=int, default=100, help="KID subsets")
    parser.add_argument(
        "--kid_subset_size", type=int, default=1000, help="KID subset size (clamped to the N's)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    for name in ("num_samples", "steps", "batch_size", "kid_subsets"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def load_source(args: argparse.Namespace, device):
    """Returns (uint8 images [N, C, H, W], labels or None, description of the source, nfe or None)."""
    from gen.metrics import evaluate

    progress = not args.no_progress
    if args.dataset:
        images, labels = evaluate.load_dataset_uint8(args.dataset)
        return images, labels, args.dataset, None
    if args.samples:
        return evaluate.load_image_folder_uint8(args.samples, progress=progress), None, args.samples, None
    from pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(args.pipeline).to(device)
    evaluate.set_scheduler(pipe, args.scheduler)
    images, labels, nfe = evaluate.sample_pipeline_uint8(
        pipe,
        args.num_samples,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=progress,
    )
    if args.save_samples:
        evaluate.save_png_folder(images, args.save_samples)
    return images, labels, args.pipeline, nfe


def run(args: argparse.Namespace) -> dict:
    import torch

    from gen.metrics import evaluate
    from gen.metrics.features import build_feature_extractor

    start = time.perf_counter()
    device = torch.device(args.device) if args.device else evaluate.default_device()
    progress = not args.no_progress
    extractor = build_feature_extractor(args.features, args.feature_path, device=device)
    images, labels, source, nfe = load_source(args, device)

    if args.write_ref:
        saved = evaluate.write_reference(
            args.write_ref, images, extractor, source, batch_size=args.batch_size, progress=progress
        )
        print(f"wrote {saved['path']}: {args.features} features of {saved['n']} images from {source}")
        return {"write_ref": saved["path"], "n": saved["n"], "features": args.features, "source": source}

    result = evaluate.compute_fid_for_images(
        images,
        labels,
        ref=args.ref,
        extractor=extractor,
        classifier=args.classifier,
        batch_size=args.batch_size,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
        progress=progress,
    )
    is_pipeline = args.pipeline is not None
    result.update(
        source=source,
        steps=args.steps if is_pipeline else None,
        guidance_scale=args.guidance_scale if is_pipeline else None,
        scheduler=args.scheduler if is_pipeline else None,
        seed=args.seed if is_pipeline else None,
        nfe=nfe,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        wall_time_s=round(time.perf_counter() - start, 3),
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    kid_text = "n/a" if result["kid"] is None else f"{result['kid']:.5f}+-{result['kid_std']:.5f}"
    accuracy = f" acc={result['class_accuracy']:.4f}" if "class_accuracy" in result else ""
    print(
        f"FID={result['fid']:.4f} KID={kid_text}{accuracy} n={result['n']} n_ref={result['n_ref']} "
        f"features={result['features']} ref={result['ref']} source={source}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
