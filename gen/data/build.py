"""The image dataset a trainer asks for by name: ``digits16`` or an image folder."""

from __future__ import annotations

IMAGE_DATASETS = ("digits16", "folder")


def build_image_dataset(name: str, data_dir: str | None = None, resolution: int = 16, channels: int = 1,
                        random_flip: bool = False):
    """Returns ``(dataset, num_classes or None, channels, resolution)``.

    ``digits16``: a dict ``{"images": [N, 1, 16, 16] in [-1, 1], "class_labels": [N]}`` of the train split.
    ``folder``: an :class:`ImageFolderDataset` (one subfolder per class, or a flat folder: unconditional).
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"dataset must be one of {IMAGE_DATASETS}; got {name!r}")
    if name == "digits16":
        from gen.data.digits import NUM_CLASSES, RESOLUTION, load_digits16

        images, labels = load_digits16("train")
        return {"images": images, "class_labels": labels}, NUM_CLASSES, 1, RESOLUTION
    if not data_dir:
        raise ValueError("dataset=folder needs data_dir")
    from gen.data.folder import ImageFolderDataset

    ds = ImageFolderDataset(data_dir, resolution, channels=channels, random_flip=random_flip,
                            class_from_subfolder=True)
    classes = len(ds.classes) if len(ds.classes) > 1 else None
    return ds, classes, channels, resolution
