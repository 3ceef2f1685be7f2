"""Sample-quality metrics: FID/KID with pluggable features (digits classifier, Inception), PSNR, saturation,
class accuracy, and the evaluation helpers behind ``eval/fid.py``."""

from gen.metrics.evaluate import (
    compute_fid_for_images,
    extract_features,
    load_dataset_uint8,
    load_image_folder_uint8,
    resolve_reference,
    sample_pipeline_uint8,
    write_reference,
)
from gen.metrics.features import (
    FEATURE_EXTRACTORS,
    DigitsFeatures,
    InceptionFeatures,
    build_feature_extractor,
    quantize_uint8,
    resize_bilinear_tf1,
)
from gen.metrics.fid import FeatureStats, frechet_distance, kid, load_stats, save_stats, torchmetrics_fid_kid
from gen.metrics.image import class_accuracy, psnr, saturation, ssim
from gen.metrics.samples import mmd_rbf, sliced_wasserstein

__all__ = [
    "FEATURE_EXTRACTORS",
    "DigitsFeatures",
    "FeatureStats",
    "InceptionFeatures",
    "build_feature_extractor",
    "class_accuracy",
    "compute_fid_for_images",
    "extract_features",
    "frechet_distance",
    "kid",
    "load_dataset_uint8",
    "load_image_folder_uint8",
    "load_stats",
    "mmd_rbf",
    "psnr",
    "quantize_uint8",
    "resize_bilinear_tf1",
    "resolve_reference",
    "sample_pipeline_uint8",
    "saturation",
    "save_stats",
    "sliced_wasserstein",
    "ssim",
    "torchmetrics_fid_kid",
    "write_reference",
]
