"""scikit-learn's handwritten digits, upsampled to 16x16 and scaled to [-1, 1].

The 1,797 8x8 digits of ``sklearn.datasets.load_digits`` (UCI optical recognition of handwritten digits,
BSD-3) ship inside the scikit-learn wheel, so this is real image data that needs no download. Pixels hold
counts 0..16; we map them linearly to [-1, 1] and upsample to 16x16 with bilinear interpolation
(``align_corners=False``). Both operations are affine per output pixel with non-negative weights summing to 1,
so the order does not matter and the range stays [-1, 1].

The train/test split is a stratified ``train_test_split`` with ``random_state=SPLIT_SEED`` and
``test_size=TEST_SIZE``: 1,437 train and 360 test images, every class in both.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_CLASSES = 10
RESOLUTION = 16
TEST_SIZE = 360
SPLIT_SEED = 0

SPLITS = ("train", "test", "all")
_MAX_PIXEL = 16.0


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loads and converts every digit once; returns images, labels, train indices and test indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1)  # [N,1,8,8] in 0..16
    images = pixels / _MAX_PIXEL * 2.0 - 1.0
    images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    images = images.clamp(-1.0, 1.0).contiguous()  # guard against float round-off only
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))

    indices = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        indices, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=bunch.target
    )
    # Sorted so that each split keeps the original dataset order.
    return images, labels, torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))


def split_indices(split: str) -> torch.Tensor:
    """Indices into the full 1,797-image set that make up ``split``.

    Args:
        split: One of ``"train"``, ``"test"``, ``"all"``.

    Returns:
        int64 tensor [N_split], sorted ascending.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, _, train_idx, test_idx = _load_all()
    if split == "train":
        return train_idx.clone()
    if split == "test":
        return test_idx.clone()
    return torch.arange(images.shape[0])


def load_digits16(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the 16x16 digits of one split.

    pixel p in 0..16 -> x = 2 * p / 16 - 1, then bilinear 8x8 -> 16x16 (align_corners=False).

    Args:
        split: ``"train"`` (1,437 images), ``"test"`` (360 images) or ``"all"`` (1,797 images).

    Returns:
        images: float32 [N, 1, 16, 16] in [-1, 1] (-1 is background).
        labels: int64 [N] in 0..9.

    Raises:
        ValueError: If ``split`` is not one of ``"train"``, ``"test"``, ``"all"``.
    """
    idx = split_indices(split)
    images, labels, _, _ = _load_all()
    return images[idx].clone(), labels[idx].clone()


def shift_image(
    image: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shifts an image by a random integer offset, filling the uncovered border with -1 (background).

    Args:
        image: [C, H, W] in [-1, 1].
        max_shift: Largest shift in pixels along each axis; offsets are uniform in [-max_shift, max_shift].
        generator: Optional torch generator for the offsets.

    Returns:
        [C, H, W], same dtype.
    """
    return shift_images(image.unsqueeze(0), max_shift, generator)[0]


def shift_images(
    images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shifts each image of a batch by its own random integer offset, filling with -1 (background).

    Args:
        images: [N, C, H, W] in [-1, 1].
        max_shift: Largest shift in pixels along each axis; offsets are uniform in [-max_shift, max_shift].
        generator: Optional torch generator for the offsets (one draw of [2, N] per call).

    Returns:
        [N, C, H, W], same dtype.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return images
    n, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width] for i in range(n)])


class Digits16Dataset(Dataset):
    """Map-style dataset over :func:`load_digits16`.

    Items are ``{"images": float32 [1, 16, 16] in [-1, 1], "class_labels": int64 scalar tensor}``.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        random_shift: If > 0, each item is shifted by a random integer offset in
            [-random_shift, random_shift] per axis, padding with -1 (an augmentation for classifier training;
            uses the global torch RNG so DataLoader worker seeding applies).
    """

    def __init__(self, split: str = "train", random_shift: int = 0):
        if not isinstance(random_shift, int) or random_shift < 0 or random_shift >= RESOLUTION:
            raise ValueError(f"random_shift must be an int in [0, {RESOLUTION - 1}], got {random_shift!r}")
        self.images, self.labels = load_digits16(split)
        self.split = split
        self.random_shift = random_shift

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        if self.random_shift > 0:
            image = shift_image(image, self.random_shift)
        return {"images": image, "class_labels": self.labels[index]}
