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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()


def labelled_grid(
    images: torch.Tensor,
    nrow: int = 8,
    title: str | None = None,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    upscale: int = 1,
    padding: int = 2,
    font_size: int = 13,
) -> Image.Image:
    """:func:`make_grid` as a PIL image with a title above, a label left of every row and above every column, so a
    figure says what it shows without its log.

    Args:
        images: float [N, C, H, W] in [-1, 1] (see :func:`make_grid`).
        nrow: images per row.
        title: one line (or several, split on ``\\n``) above the grid.
        row_labels: one label per grid row (``ceil(N / nrow)`` of them), drawn left of the row.
        col_labels: one label per grid column (``min(nrow, N)``), drawn above the column.
        upscale: integer nearest-neighbour magnification of the images (labels are drawn at full size).
    Returns:
        an RGB PIL image.
    """
    from PIL import ImageDraw

    grid = make_grid(images, nrow=nrow, padding=padding)
    n, _, height, width = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    for name, labels, want in (("row_labels", row_labels, rows), ("col_labels", col_labels, cols)):
        if labels is not None and (isinstance(labels, str) or len(labels) != want):
            raise ValueError(f"{name} must be a list of {want} labels (one per grid {name[:3]}); got "
                             f"{validate.describe(labels)}")
    if not isinstance(upscale, int) or upscale < 1:
        raise ValueError(f"upscale must be an int >= 1, got {upscale!r}")
    body = Image.fromarray(grid)
    if upscale > 1:
        body = body.resize((body.width * upscale, body.height * upscale), resample=Image.Resampling.NEAREST)
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text):
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    line_h = size("Ag")[1] + 4
    title_lines = [] if not title else str(title).split("\n")
    left = 6 + max((size(str(t))[0] for t in row_labels), default=0) if row_labels else 0
    top = 4 + line_h * len(title_lines) + (line_h if col_labels else 0)
    canvas = Image.new("RGB", (max(body.width + left + 4, 4 + max((size(t)[0] for t in title_lines), default=0)),
                               body.height + top + 4), "white")
    canvas.paste(body, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((4, 2 + i * line_h), line, fill="black", font=font)
    cell_w, cell_h = (width + padding) * upscale, (height + padding) * upscale
    for j, label in enumerate(col_labels or []):
        w_text = size(str(label))[0]
        x = left + padding * upscale + j * cell_w + (width * upscale - w_text) // 2
        draw.text((x, top - line_h), str(label), fill="black", font=font)
    for i, label in enumerate(row_labels or []):
        y = top + padding * upscale + i * cell_h + (height * upscale - line_h) // 2
        draw.text((2, y), str(label), fill="black", font=font)
    return canvas


def save_labelled_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, title: str | None = None,
                       row_labels: list[str] | None = None, col_labels: list[str] | None = None,
                       upscale: int = 1) -> Path:
    """Write :func:`labelled_grid` as a PNG (parent folders are created); returns the path."""
    image = labelled_grid(images, nrow=nrow, title=title, row_labels=row_labels, col_labels=col_labels,
                          upscale=upscale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
