"""Seeded batch drawing from a map-style dataset (in-memory tensors or any ``Dataset`` of dicts)."""

from __future__ import annotations

import torch


def draw_batch(dataset, batch_size: int, generator: torch.Generator) -> dict:
    """Draw ``batch_size`` examples uniformly with replacement, using ``generator`` only.

    ``dataset`` is either a dict of equal-length tensors (``{"images": [N,...], "class_labels": [N]}``) or a
    ``torch.utils.data.Dataset`` whose items are dicts of tensors.
    """
    n = len(next(iter(dataset.values()))) if isinstance(dataset, dict) else len(dataset)
    if n == 0:
        raise ValueError("the training dataset is empty")
    idx = torch.randint(0, n, (batch_size,), generator=generator)
    if isinstance(dataset, dict):
        return {k: v[idx] for k, v in dataset.items()}
    items = [dataset[int(i)] for i in idx]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
