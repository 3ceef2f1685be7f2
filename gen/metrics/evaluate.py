"""FID/KID of an image set against reference statistics: the reusable half of ``eval/fid.py``.

Typical use from a benchmark script:

    >>> images, labels, nfe = sample_pipeline_uint8(pipe, 1000, num_inference_steps=25)
    >>> compute_fid_for_images(images, labels, features="digits", ref="test")
    {'fid': ..., 'kid': ..., 'kid_std': ..., 'n': 1000, 'n_ref': 360, 'class_accuracy': ..., ...}

Images are uint8 [N, C, H, W] in 0..255 throughout, i.e. exactly what saved PNGs would hold. Reference
statistics are .npz files (`gen.metrics.fid.save_stats`) that record the extractor and its weights hash, so a
reference computed with other classifier weights is refused instead of silently compared.

Reference names: "train"/"test" mean the shipped ``checkpoints/fid-refs/digits16-{split}-{features}.npz``. For
the Inception features a missing file is computed from the digits split once and cached under
``~/.cache/gen/fid-refs/`` (``$GEN_CACHE_DIR/fid-refs`` if set); for the digits features it must be written
with ``eval/fid.py --write_ref`` (it depends on the classifier checkpoint). Anything else is a path.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gen.metrics.features import (
    REPO_ROOT,
    DigitsFeatures,
    InceptionFeatures,
    build_feature_extractor,
    load_digits_classifier,
    quantize_uint8,
)
from gen.metrics.fid import FeatureStats, frechet_distance, kid, load_stats, save_stats
from gen.metrics.image import class_accuracy

__all__ = [
    "DATASETS",
    "REF_DIR",
    "check_reference",
    "compute_fid_for_images",
    "default_cache_dir",
    "extract_features",
    "fid_kid_against_reference",
    "load_dataset_uint8",
    "load_image_folder_uint8",
    "resolve_reference",
    "sample_pipeline_uint8",
    "save_png_folder",
    "set_scheduler",
    "shipped_reference_path",
    "write_reference",
]

logger = logging.getLogger(__name__)

DATASETS = ("digits16-train", "digits16-test")
REF_SPLITS = ("train", "test")
REF_DIR = REPO_ROOT / "checkpoints" / "fid-refs"


def default_cache_dir() -> Path:
    """Folder for computed reference statistics: ``$GEN_CACHE_DIR/fid-refs`` or ``~/.cache/gen/fid-refs``."""
    root = os.environ.get("GEN_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "gen") / "fid-refs"


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_uint8(name: str, images: Any) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        desc = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise ValueError(
            f"{name} must be a uint8 tensor [N, C, H, W] in 0..255 (use gen.metrics.features.quantize_uint8), "
            f"got {desc}"
        )


# --- image sources -------------------------------------------------------------------------------------------
def load_dataset_uint8(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A digits split as PNG-equivalent pixels.

    Args:
        name: "digits16-train" (1,437 images) or "digits16-test" (360 images).

    Returns:
        images uint8 [N, 1, 16, 16] in 0..255 and labels int64 [N].
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    from gen.data.digits import load_digits16

    images, labels = load_digits16(name.split("-", 1)[1])
    return quantize_uint8(images, (-1.0, 1.0)), labels


def load_image_folder_uint8(folder: str | os.PathLike, progress: bool = True) -> torch.Tensor:
    """Every image under `folder` (recursively, sorted), as uint8 [N, C, S, S].

    Uses `gen.data.folder.ImageFolderDataset(resize=False)`: all images must be square and of one size (a
    ValueError names the first file that is not). C is 1 when the first image is greyscale ("L"), else 3.
    """
    from PIL import Image

    from gen.data.folder import ImageFolderDataset

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"samples folder {str(folder)!r} does not exist or is not a folder")
    # Built with resize=True only to list the files (sorted, recursive); nothing is read yet.
    probe = ImageFolderDataset(folder, resolution=1, channels=1, resize=True)
    with Image.open(probe.files[0]) as first:
        width, height = first.size
        channels = 1 if first.mode in ("L", "LA", "1", "I", "I;16") else 3
    if width != height:
        raise ValueError(f"images must be square, got {width}x{height} (WxH) in {str(probe.files[0])!r}")
    dataset = ImageFolderDataset(folder, resolution=width, channels=channels, resize=False)
    dataset.validate()
    batches = [
        dataset[i]["images"] for i in tqdm(range(len(dataset)), desc="read images", disable=not progress)
    ]
    return quantize_uint8(torch.stack(batches), (-1.0, 1.0))


def save_png_folder(images: torch.Tensor, folder: str | os.PathLike) -> Path:
    """Write uint8 [N, C, H, W] images as ``{index:06d}.png`` into `folder` (created)."""
    from PIL import Image

    _check_uint8("images", images)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = images.cpu().permute(0, 2, 3, 1).numpy()
    for i, image in enumerate(array):
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(folder / f"{i:06d}.png")
    return folder


def set_scheduler(pipe: Any, name: str) -> Any:
    """Switch the pipeline's sampler (the one place that knows how a pipeline takes a scheduler name)."""
    return pipe.use_scheduler(name)


def sample_pipeline_uint8(
    pipe: Any,
    num_samples: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = True,
    **pipe_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """Sample a class-conditional pipeline into PNG-equivalent uint8 images with balanced labels.

    Labels are ``i % num_classes`` for i in range(num_samples) (the null class excluded). One CPU generator
    seeded with `seed` draws all noise, batch after batch, so results depend on (seed, batch_size).

    Args:
        pipe: A `pipelines.ClassConditionalPipeline` (its output is float [B, C, H, W] in [0, 1]).
        num_samples: N >= 1.
        num_inference_steps: Sampler steps.
        guidance_scale: Classifier-free guidance weight (1 = plain conditional).
        batch_size: Images per pipeline call.
        seed: Seed of the noise generator.
        **pipe_kwargs: passed on to every pipeline call (e.g. ``sampler="dls"`` for a ``GBMPipeline``).

    Returns:
        images uint8 [N, C, H, W], labels int64 [N] (None for an unconditional UNet), NFE per image.
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}")
    num_classes = getattr(pipe, "num_classes", None)
    labels = None if num_classes is None else torch.arange(num_samples) % num_classes
    generator = torch.Generator("cpu").manual_seed(seed)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    chunks, nfe = [], None
    for start in tqdm(range(0, num_samples, batch_size), desc="sample", disable=not progress):
        stop = min(start + batch_size, num_samples)
        kwargs = {"class_labels": labels[start:stop]} if labels is not None else {"batch_size": stop - start}
        out = pipe(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="pt",
            **kwargs,
            **pipe_kwargs,
        )
        chunks.append(quantize_uint8(out.images.cpu(), (0.0, 1.0)))
        nfe = getattr(out, "nfe", None)
    return torch.cat(chunks), labels, nfe


# --- features and references ---------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    images: torch.Tensor,
    batch_size: int = 250,
    keep_features: bool = True,
    progress: bool = True,
    desc: str = "features",
) -> FeatureStats:
    """Run `extractor` over uint8 images [N, C, H, W] in batches and accumulate float64 statistics."""
    _check_uint8("images", images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = FeatureStats(int(extractor.num_features), keep_features=keep_features)
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, disable=not progress):
        stats.update(extractor(images[start : start + batch_size]))
    return stats


def _extractor_name(extractor: nn.Module) -> str:
    name = getattr(extractor, "name", None)
    return name if isinstance(name, str) else type(extractor).__name__


def _reference_meta(extractor: nn.Module, source: str, n: int) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "features": _extractor_name(extractor),
        "num_features": int(extractor.num_features),
        "weights_sha256": getattr(extractor, "weights_sha256", None),
        "source": source,
        "n": int(n),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if source in DATASETS:
        meta["split"] = source.split("-", 1)[1]
    if isinstance(extractor, DigitsFeatures):
        meta["config_sha256"] = extractor.config_sha256
        meta["preprocess"] = "uint8 -> u/127.5-1, RGB averaged to grey"
    if isinstance(extractor, InceptionFeatures):
        meta["preprocess"] = "uint8 -> grey to 3 channels -> TF1 bilinear 299x299 -> (x-128)/128"
    return meta


def write_reference(
    path: str | os.PathLike,
    images: torch.Tensor,
    extractor: nn.Module,
    source: str,
    batch_size: int = 250,
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and save reference statistics (with raw features, for KID) of uint8 `images`.

    Returns:
        The saved statistics as `load_stats` returns them.
    """
    stats = extract_features(extractor, images, batch_size=batch_size, progress=progress, desc="reference")
    mu, sigma = stats.mean_cov()
    meta = _reference_meta(extractor, source, stats.n)
    save_stats(path, mu, sigma, stats.n, features=stats.features, meta=meta)
    return load_stats(path)


def shipped_reference_path(split: str, features: str) -> Path:
    """``checkpoints/fid-refs/digits16-{split}-{features}.npz`` under the repository root."""
    return REF_DIR / f"digits16-{split}-{features}.npz"


def check_reference(ref: dict[str, Any], extractor: nn.Module) -> None:
    """Raise ValueError if reference statistics were not made with this extractor and these weights."""
    meta, path = ref.get("meta", {}), ref.get("path", "?")
    name = _extractor_name(extractor)
    source = meta.get("source")
    regenerate = (
        f"`python eval/fid.py --dataset {source} --features {name} --write_ref {path}`"
        if source in DATASETS
        else "`python eval/fid.py ... --write_ref PATH`"
    )
    if meta.get("features") not in (None, name):
        raise ValueError(
            f"reference {path!r} holds {meta['features']!r} features but the extractor is {name!r}; "
            f"use a reference made with features={name!r} or regenerate it with {regenerate}"
        )
    if ref["mu"].shape[0] != int(extractor.num_features):
        raise ValueError(
            f"reference {path!r} has D={ref['mu'].shape[0]} features but the extractor gives "
            f"D={extractor.num_features}; regenerate it with {regenerate}"
        )
    ours, theirs = getattr(extractor, "weights_sha256", None), meta.get("weights_sha256")
    if ours and theirs and ours != theirs:
        raise ValueError(
            f"reference {path!r} is stale: it was computed with {name} weights sha256 {theirs[:12]}..., "
            f"the current ones are {ours[:12]}...; regenerate it with {regenerate}"
        )


def resolve_reference(
    ref: str | os.PathLike,
    extractor: nn.Module,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 250,
    progress: bool = True,
) -> dict[str, Any]:
    """Load (and for Inception, compute on first use) the reference statistics `ref` names.

    Args:
        ref: "train", "test" or a path to an .npz written by `save_stats`.
        extractor: The feature extractor the evaluated images go through (checked against the reference).
        cache_dir: Where computed references go (default `default_cache_dir()`).

    Returns:
        dict as `load_stats` returns it (mu, sigma, n, features, meta, path).
    """
    name = _extractor_name(extractor)
    if str(ref) not in REF_SPLITS:
        stats = load_stats(ref)
        check_reference(stats, extractor)
        return stats
    split = str(ref)
    shipped = shipped_reference_path(split, name)
    if shipped.is_file():
        stats = load_stats(shipped)
        check_reference(stats, extractor)
        return stats
    if name != "inception":
        raise ValueError(
            f"reference statistics {str(shipped)!r} do not exist; create them with "
            f"`python eval/fid.py --dataset digits16-{split} --features {name} --write_ref {shipped}` "
            f"(add --feature_path if the extractor is not the default one)"
        )
    cached = Path(cache_dir or default_cache_dir()) / shipped.name
    if cached.is_file():
        try:
            stats = load_stats(cached)
            check_reference(stats, extractor)
            return stats
        except ValueError as err:
            logger.warning("recomputing cached reference %s: %s", cached, err)
    logger.info("computing reference statistics %s (once)", cached)
    images, _ = load_dataset_uint8(f"digits16-{split}")
    return write_reference(
        cached, images, extractor, f"digits16-{split}", batch_size=batch_size, progress=progress
    )


def fid_kid_against_reference(
    stats: FeatureStats,
    ref: dict[str, Any],
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
) -> dict[str, Any]:
    """FID (and KID when both sides kept raw features) of accumulated statistics against a loaded reference."""
    mu, sigma = stats.mean_cov()
    result: dict[str, Any] = {
        "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        "kid": None,
        "kid_std": None,
        "n": stats.n,
        "n_ref": ref["n"],
    }
    if stats.features is not None and ref.get("features") is not None:
        result["kid"], result["kid_std"] = kid(
            stats.features,
            ref["features"],
            num_subsets=kid_subsets,
            subset_size=kid_subset_size,
            seed=kid_seed,
        )
    return result


def _accuracy_classifier(extractor: nn.Module, classifier: Any, images: torch.Tensor) -> nn.Module | None:
    if isinstance(classifier, nn.Module):
        return classifier
    if classifier is None and isinstance(extractor, DigitsFeatures):
        return extractor.classifier
    if tuple(images.shape[2:]) != (DigitsFeatures.resolution,) * 2:
        return None
    try:
        device = next(extractor.parameters()).device
        return load_digits_classifier(classifier, device=device)[0]
    except ValueError as err:
        logger.warning("no class accuracy: %s", err)
        return None


def compute_fid_for_images(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    features: str = "digits",
    ref: str | os.PathLike = "test",
    feature_path: str | os.PathLike | None = None,
    extractor: nn.Module | None = None,
    classifier: nn.Module | str | os.PathLike | None = None,
    device: Any = None,
    batch_size: int = 250,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """FID, KID (and class accuracy when `labels` are given) of uint8 images against a reference.

    Args:
        images: uint8 [N, C, H, W] in 0..255 (PNG-equivalent; see `quantize_uint8`).
        labels: Optional int [N] intended classes; enables `class_accuracy` (digits classifier, 16x16 only).
        features: "digits" or "inception" (ignored when `extractor` is given).
        ref: "train", "test" or a path to a reference .npz.
        feature_path: Classifier folder / Inception file for `build_feature_extractor`.
        extractor: An already built extractor (saves reloading it across calls).
        classifier: Digits classifier (module or folder) for the accuracy; defaults to the extractor's own
            classifier for digits features, else the default checkpoint when it exists.
        device: Device for the extractor (default cuda if available, else cpu).
        batch_size: Images per feature batch.
        kid_subsets: KID subsets.
        kid_subset_size: KID subset size (clamped to min(N, n_ref)).
        cache_dir: Cache folder for computed references.

    Returns:
        dict with fid, kid, kid_std, n, n_ref, features, ref, ref_path and, with labels, class_accuracy.
    """
    _check_uint8("images", images)
    if images.shape[0] < 2:
        raise ValueError(f"images must hold at least 2 images for a covariance, got N={images.shape[0]}")
    if extractor is None:
        extractor = build_feature_extractor(features, feature_path, device=device or default_device())
    reference = resolve_reference(
        ref, extractor, cache_dir=cache_dir, batch_size=batch_size, progress=progress
    )
    stats = extract_features(extractor, images, batch_size=batch_size, progress=progress)
    result = fid_kid_against_reference(
        stats, reference, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size
    )
    result.update(features=_extractor_name(extractor), ref=str(ref), ref_path=reference["path"])
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) like images, got {tuple(labels.shape)}"
            )
        accuracy_model = _accuracy_classifier(extractor, classifier, images)
        if accuracy_model is not None:
            result["class_accuracy"] = class_accuracy(accuracy_model, images, labels, batch_size=batch_size)
    return result
