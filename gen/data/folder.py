"""A folder of image files as a training dataset (no torchvision)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from gen.data.transforms import center_crop as center_crop_image
from gen.data.transforms import hflip, normalize_to_neg1_1, pil_to_tensor, random_crop, resize_shorter

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_CHANNEL_MODES = {1: "L", 3: "RGB"}
FLAT_CLASS = "."


class ImageFolderDataset(Dataset):
    """Every image file under ``root`` (searched recursively, sorted by relative path).

    Items are ``{"images": float32 [C, resolution, resolution] in [-1, 1]}``, plus
    ``"class_labels"`` (int64 scalar tensor) when ``class_from_subfolder`` is set.

    Args:
        root: Folder to search for ``.png``, ``.jpg``, ``.jpeg``, ``.bmp`` and ``.webp`` files (any case).
        resolution: Output side length, > 0.
        channels: 1 (``convert("L")``) or 3 (``convert("RGB")``).
        resize: If True, resize the shorter side to ``resolution`` (bicubic) and crop. If False, every image
            must already be ``resolution x resolution``; a file that is not raises ``ValueError`` when read
            (see also :meth:`validate`).
        center_crop: Central crop if True, random crop otherwise (only used when ``resize``).
        random_flip: Mirror left-right with probability 1/2 (global torch RNG, so DataLoader seeding applies).
        class_from_subfolder: Label each image by its top-level subfolder of ``root``; labels index the sorted
            subfolder names in :attr:`classes`. A flat folder (no image in a subfolder) is a single class,
            ``classes == ["."]``, label 0.

    Raises:
        ValueError: If ``root`` is missing or holds no images, ``channels`` is not 1 or 3, ``resolution`` is
            not a positive int, or ``class_from_subfolder`` is set and images lie both directly in ``root``
            and in subfolders.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        channels: int = 3,
        resize: bool = True,
        center_crop: bool = True,
        random_flip: bool = False,
        class_from_subfolder: bool = False,
    ):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root must be an existing folder, got {str(root)!r}")
        if channels not in _CHANNEL_MODES:
            raise ValueError(f"channels must be one of {tuple(_CHANNEL_MODES)}, got {channels!r}")
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        files = sorted(
            (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not files:
            raise ValueError(f"root {str(root)!r} contains no images with extensions {IMAGE_EXTENSIONS}")
        self.root = root
        self.files = files
        self.resolution = resolution
        self.channels = channels
        self.resize = resize
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.class_from_subfolder = class_from_subfolder
        self.classes: list[str] = []
        self.labels: list[int] = []
        if class_from_subfolder:
            parts = [p.relative_to(root).parts for p in files]
            loose = [path for path, part in zip(files, parts, strict=True) if len(part) == 1]
            if len(loose) == len(files):  # a flat folder is one class
                self.classes = [FLAT_CLASS]
                self.labels = [0] * len(files)
            elif loose:
                raise ValueError(
                    f"class_from_subfolder=True needs every image inside a subfolder of root (or none), "
                    f"got {str(loose[0])!r} directly in {str(root)!r} next to subfolders"
                )
            else:
                self.classes = sorted({part[0] for part in parts})
                index = {name: i for i, name in enumerate(self.classes)}
                self.labels = [index[part[0]] for part in parts]

    def __len__(self) -> int:
        return len(self.files)

    def _check_image_size(self, path: Path, size: tuple[int, int]) -> None:
        if size != (self.resolution, self.resolution):
            raise ValueError(
                f"resize=False needs every image to be {self.resolution}x{self.resolution}, "
                f"got {size[0]}x{size[1]} (WxH) in {str(path)!r}"
            )

    def validate(self) -> None:
        """Checks every file's size without decoding pixels (only meaningful when ``resize=False``).

        Raises:
            ValueError: Naming the first file (in sorted order) that is not ``resolution x resolution``.
        """
        if self.resize:
            return
        for path in self.files:
            with Image.open(path) as img:
                self._check_image_size(path, img.size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.files[index]
        with Image.open(path) as img:
            if not self.resize:
                self._check_image_size(path, img.size)
            img = img.convert(_CHANNEL_MODES[self.channels])
        if self.resize:
            img = resize_shorter(img, self.resolution)
            if self.center_crop:
                img = center_crop_image(img, self.resolution)
            else:
                img = random_crop(img, self.resolution)
        if self.random_flip and bool(torch.rand(()) < 0.5):
            img = hflip(img)
        item = {"images": normalize_to_neg1_1(pil_to_tensor(img))}
        if self.class_from_subfolder:
            item["class_labels"] = torch.tensor(self.labels[index], dtype=torch.int64)
        return item
