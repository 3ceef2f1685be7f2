"""Datasets and image utilities: sklearn digits at 16x16, 2-D toys, image folders, transforms, grids."""

from gen.data.digits import (
    NUM_CLASSES,
    RESOLUTION,
    SPLIT_SEED,
    TEST_SIZE,
    Digits16Dataset,
    load_digits16,
    shift_image,
    shift_images,
    split_indices,
)
from gen.data.folder import IMAGE_EXTENSIONS, ImageFolderDataset
from gen.data.images import make_grid, numpy_to_pil, save_grid, to_uint8
from gen.data.toys import TOY_NAMES, mixture_params, sample_toy, toy_log_prob
from gen.data.transforms import (
    center_crop,
    denormalize_to_0_1,
    hflip,
    image_transform,
    normalize_to_neg1_1,
    pil_to_tensor,
    random_crop,
    resize_shorter,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "NUM_CLASSES",
    "RESOLUTION",
    "SPLIT_SEED",
    "TEST_SIZE",
    "TOY_NAMES",
    "Digits16Dataset",
    "ImageFolderDataset",
    "center_crop",
    "denormalize_to_0_1",
    "hflip",
    "image_transform",
    "load_digits16",
    "make_grid",
    "mixture_params",
    "normalize_to_neg1_1",
    "numpy_to_pil",
    "pil_to_tensor",
    "random_crop",
    "resize_shorter",
    "sample_toy",
    "save_grid",
    "shift_image",
    "shift_images",
    "split_indices",
    "to_uint8",
    "toy_log_prob",
]
