"""Conversions from model tensors to 8-bit pixels, image grids and PNG files (PIL/numpy/torch only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen import validate


def _check_pixels(name: str, x: torch.Tensor, hi: float, convert: str) -> None:
    """Refuse data in other units than the expected float range ``[lo, hi]``: values that are all >= 0 and reach
    above 2 * hi are 8-bit pixels ([0, 255]); values a little outside the range are fine (they are clipped)."""
    if x.numel() and float(x.min()) >= 0 and float(x.max()) > 2 * hi:
        raise ValueError(f"{name} holds values up to {float(x.max()):.4g}: this looks like [0, 255] pixel data, not "
                         f"float images in the expected range ({convert})")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Quantises [-1, 1] images to 8-bit pixels, rounding half up.

    ``v = (x + 1) * 127.5``, then ``floor(v + 0.5)`` clamped to [0, 255]. (``torch.round`` would round
    half to even; the two agree except on exact ``.5`` ties.) Values outside [-1, 1] are clipped; NaN is not
    handled.

    Args:
        x: float tensor of any shape, values in [-1, 1] (outside: clipped).

    Returns:
        uint8 tensor of the same shape and device.
    """
    return torch.floor((x.float() + 1.0) * 127.5 + 0.5).clamp_(0, 255).to(torch.uint8)


def make_grid(
    images: torch.Tensor,
    nrow: int = 8,
    padding: int = 2,
    pad_value: float = 1.0,
) -> np.ndarray:
    """Tiles a batch of images into one array, row by row.

    With ``n`` images, ``cols = min(nrow, n)`` and ``rows = ceil(n / cols)``; the output is
    ``[rows * (H + padding) + padding, cols * (W + padding) + padding, 3]``. Unused cells keep ``pad_value``.

    Args:
        images: float [N, C, H, W] in [-1, 1] (values outside are clipped; NaN, integer pixels and [0, 255] data
            are refused), C = 1 (expanded to grey RGB) or 3. N >= 1.
        nrow: Images per row, > 0.
        padding: Pixels between and around images, >= 0.
        pad_value: Border colour in the [-1, 1] scale (1.0 is white, -1.0 black).

    Returns:
        uint8 numpy array [H_grid, W_grid, 3].
    """
    images = validate.tensor("images", images)  # float, finite (numpy accepted); uint8 names the conversion
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N>=1, C in (1, 3), H, W], got {tuple(images.shape)}")
    _check_pixels("images", images, 1.0, "[-1, 1]: use x.float() / 127.5 - 1")
    if not isinstance(nrow, int) or nrow <= 0:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    n, channels, height, width = images.shape
    pixels = to_uint8(images.detach().cpu())
    if channels == 1:
        pixels = pixels.expand(n, 3, height, width)
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    fill = int(to_uint8(torch.tensor(float(pad_value))))
    grid_shape = (rows * (height + padding) + padding, cols * (width + padding) + padding, 3)
    grid = np.full(grid_shape, fill, np.uint8)
    hwc = pixels.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        top = padding + (i // cols) * (height + padding)
        left = padding + (i % cols) * (width + padding)
        grid[top : top + height, left : left + width] = hwc[i]
    return grid


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """Converts numpy images to PIL images (the Diffusers convention).

    Args:
        images: [N, H, W, C] or a single [H, W, C] / [H, W] image, C = 1 or 3 (1 gives mode ``"L"``). Either
            uint8 in [0, 255], or float in [0, 1] (scaled by 255, rounded half up, clipped).

    Returns:
        A list of N PIL images (length 1 for a single image).
    """
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None, :, :, None]
    elif images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have shape [N, H, W, C] with C in (1, 3), got {images.shape}")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating):
            raise validate.ArgumentTypeError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
        if not np.isfinite(images).all():
            raise ValueError("images contain NaN or inf values; expected float images in [0, 1]")
        _check_pixels("images", torch.from_numpy(np.ascontiguousarray(images)), 1.0,
                      "[0, 1]: pass uint8 pixels, or x / 255")
        images = np.clip(np.floor(images * 255.0 + 0.5), 0, 255).astype(np.uint8)
    if images.shape[-1] == 1:
        return [Image.fromarray(np.ascontiguousarray(image[:, :, 0])) for image in images]
    return [Image.fromarray(np.ascontiguousarray(image)) for image in images]


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int = 8,
    upscale: int = 1,
) -> Path:
    """Writes :func:`make_grid` of ``images`` as a PNG (parent folders are created).

    Args:
        images: float [N, C, H, W] in [-1, 1], C = 1 or 3.
        path: Output file; written as PNG whatever the suffix.
        nrow: Images per row.
        upscale: Integer nearest-neighbour magnification (e.g. 4 makes 16x16 digits viewable), >= 1.

    Returns:
        The path written.
    """
    if not isinstance(upscale, int) or upscale < 1:
        raise ValueError(f"upscale must be an int >= 1, got {upscale!r}")
    grid = make_grid(images, nrow=nrow)
    image = Image.fromarray(grid)
    if upscale > 1:
        size = (image.width * upscale, image.height * upscale)
        image = image.resize(size, resample=Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
