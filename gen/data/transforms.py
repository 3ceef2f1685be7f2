"""Image transforms written with PIL, numpy and torch only (no torchvision).

Conventions: PIL images in, ``float32`` tensors ``[C, H, W]`` out; :func:`pil_to_tensor` gives values in
[0, 1], the model-facing range is [-1, 1] (``x = 2 * v - 1``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

_TENSOR_MODES = ("L", "LA", "RGB", "RGBA")


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Converts an 8-bit PIL image to a float tensor.

    Args:
        img: PIL image in mode ``"L"``, ``"LA"``, ``"RGB"`` or ``"RGBA"`` (call ``img.convert(...)`` first for
            other modes).

    Returns:
        float32 [C, H, W] in [0, 1], C = 1, 2, 3 or 4 following the mode.

    Raises:
        ValueError: If the mode is not one of the above.
    """
    if img.mode not in _TENSOR_MODES:
        raise ValueError(
            f"img.mode must be one of {_TENSOR_MODES}, got {img.mode!r}; convert the image first"
        )
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _check_size(size: int, name: str = "size") -> None:
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"{name} must be a positive int, got {size!r}")


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resizes so that the shorter side equals ``size``, keeping the aspect ratio (PIL bicubic).

    The longer side becomes ``round(longer * size / shorter)``. An image whose shorter side already equals
    ``size`` is returned unchanged.

    Args:
        img: PIL image of size (W, H).
        size: Target length of the shorter side, > 0.
    """
    _check_size(size)
    width, height = img.size
    if min(width, height) == size:
        return img
    if width <= height:
        new_size = (size, max(size, round(height * size / width)))
    else:
        new_size = (max(size, round(width * size / height)), size)
    return img.resize(new_size, resample=Image.Resampling.BICUBIC)


def _check_crop(img: Image.Image, size: int) -> None:
    _check_size(size)
    width, height = img.size
    if width < size or height < size:
        raise ValueError(f"size must be <= the image size {width}x{height} to crop, got {size}")


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crops the central ``size x size`` square; offsets ``(H - size) // 2`` and ``(W - size) // 2``.

    Raises:
        ValueError: If ``size`` is larger than either side of ``img``.
    """
    _check_crop(img, size)
    width, height = img.size
    top = (height - size) // 2
    left = (width - size) // 2
    return img.crop((left, top, left + size, top + size))


def random_crop(img: Image.Image, size: int, generator: torch.Generator | None = None) -> Image.Image:
    """Crops a ``size x size`` square at a uniformly random integer offset.

    Args:
        img: PIL image with both sides >= ``size``.
        size: Crop side length.
        generator: Optional torch generator for the offsets (global torch RNG when None).
    """
    _check_crop(img, size)
    width, height = img.size
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return img.crop((left, top, left + size, top + size))


def hflip(img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    """Mirrors left-right: a PIL image, or a tensor [..., H, W] along its last axis."""
    if isinstance(img, torch.Tensor):
        return img.flip(-1)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def normalize_to_neg1_1(x: torch.Tensor) -> torch.Tensor:
    """Maps [0, 1] to [-1, 1]: ``2 * x - 1``."""
    return x * 2.0 - 1.0


def denormalize_to_0_1(x: torch.Tensor) -> torch.Tensor:
    """Maps [-1, 1] to [0, 1] and clamps: ``clamp((x + 1) / 2, 0, 1)``."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


# Aliases so that image_transform's keyword arguments may share the public function names.
_center_crop = center_crop
_random_crop = random_crop


def image_transform(
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """Builds the usual training transform: resize shorter side, crop, optional flip, scale to [-1, 1].

    The image must already be in the wanted mode (e.g. ``convert("RGB")``).

    Args:
        resolution: Output side length, > 0.
        center_crop: Central crop if True, uniformly random crop otherwise.
        random_flip: Mirror left-right with probability 1/2.
        generator: Optional torch generator for the random crop and flip (global torch RNG when None).

    Returns:
        A callable mapping a PIL image to float32 [C, resolution, resolution] in [-1, 1].
    """
    _check_size(resolution, "resolution")

    def transform(img: Image.Image) -> torch.Tensor:
        img = resize_shorter(img, resolution)
        if center_crop:
            img = _center_crop(img, resolution)
        else:
            img = _random_crop(img, resolution, generator=generator)
        if random_flip and bool(torch.rand((), generator=generator) < 0.5):
            img = hflip(img)
        return normalize_to_neg1_1(pil_to_tensor(img))

    return transform
