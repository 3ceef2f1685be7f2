"""Per-image quality measures: PSNR, SSIM, saturation at the range ends, and classifier accuracy."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["class_accuracy", "psnr", "saturation", "ssim"]


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image.

        PSNR = 10 log10(data_range^2 / mean((a - b)^2))   (inf where the images are equal)

    Args:
        a: Tensor [N, ...].
        b: Tensor with the same shape as `a`.
        data_range: Peak-to-peak range of the values, 2.0 for [-1, 1], 1.0 for [0, 1], 255 for uint8.

    Returns:
        float32 tensor [N] in dB.
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError(f"a must have a non-empty batch dimension, got shape {tuple(a.shape)}")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = (a.float() - b.float()).pow(2).reshape(a.shape[0], -1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def saturation(x: torch.Tensor) -> dict[str, float]:
    """How much of an image batch sits at the ends of [-1, 1] (a symptom of over-guidance).

    After clamping to [-1, 1], a pixel counts as clipped when |x| >= 1 - 1/255, i.e. it would land on 0 or 255
    (give or take half a level) once saved.

    Args:
        x: Float tensor [N, ...] in (nominally) [-1, 1].

    Returns:
        dict with `frac_clipped` (fraction of clipped values, in [0, 1]) and `mean_abs` (mean |x| after clamping).
    """
    if not x.is_floating_point() or x.numel() == 0:
        raise ValueError(f"x must be a non-empty float tensor in [-1, 1], got {x.dtype} {tuple(x.shape)}")
    clamped = x.float().clamp(-1.0, 1.0).abs()
    return {
        "frac_clipped": float((clamped >= 1.0 - 1.0 / 255.0).float().mean()),
        "mean_abs": float(clamped.mean()),
    }


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(
        f"classifier returned {type(output).__name__}; expected logits, an object with .logits or a tuple"
    )


@torch.no_grad()
def class_accuracy(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor | Any, batch_size: int = 512
) -> float:
    """Fraction of images the classifier assigns to their intended label.

    Args:
        classifier: Module mapping float [B, C, H, W] in [-1, 1] to logits [B, num_classes] (a tensor, an object
            with `.logits`, or a tuple whose first item is the logits).
        images: float [N, C, H, W] in [-1, 1], or uint8 [N, C, H, W] in 0..255 (mapped by u / 127.5 - 1).
        labels: int [N] target classes.
        batch_size: Images per forward pass.

    Returns:
        Accuracy in [0, 1].
    """
    labels = torch.as_tensor(labels).long().reshape(-1)
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"images must be [N, C, H, W] with N = len(labels) = {labels.shape[0]}, got {tuple(images.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if images.shape[0] == 0:
        raise ValueError("images is empty; need at least one image for an accuracy")
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    correct = 0
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            batch = batch.float() / 127.5 - 1.0 if batch.dtype == torch.uint8 else batch.float()
            pred = _logits(classifier(batch)).argmax(dim=1).cpu()
            correct += int((pred == labels[start : start + batch_size]).sum())
    finally:
        classifier.train(was_training)
    return correct / images.shape[0]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window_size: int = 11,
         window_sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image (Wang, Bovik, Sheikh, Simoncelli 2004, eq. 13) with a Gaussian window.

        SSIM = mean over windows of ((2 mu_a mu_b + C1)(2 cov_ab + C2)) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))

    with ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = data_range``; local statistics are weighted by an 11x11
    Gaussian of std 1.5 (normalised to sum 1), computed per channel over the "valid" positions only (no padding;
    the window is shrunk to the image side when the image is smaller), and the map is averaged over positions and
    channels. Variances are the biased (window-weighted) ones, as in the paper's reference code.

    Args:
        a: float [N, C, H, W].
        b: float, same shape as ``a``.
        data_range: peak-to-peak range (2.0 for [-1, 1], 1.0 for [0, 1], 255 for uint8).

    Returns:
        float32 tensor [N].
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim != 4 or a.shape[0] == 0:
        raise ValueError(f"a must be [N, C, H, W] with N >= 1, got shape {tuple(a.shape)}")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    n, c, h, w = a.shape
    size = min(window_size, h if h % 2 else h - 1, w if w % 2 else w - 1)
    r = size // 2
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / window_sigma) ** 2)
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size).to(a.device)
    x, y = a.double(), b.double()

    def filt(z):
        return torch.nn.functional.conv2d(z, win, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return smap.reshape(n, -1).mean(dim=1).float()
