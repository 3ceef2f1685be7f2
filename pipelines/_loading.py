"""Shared `from_pretrained` guard: local folders that are missing or broken give a ValueError naming the path."""

from __future__ import annotations

import os
from pathlib import Path


def looks_local(path: str) -> bool:
    """True when ``path`` is meant as a local folder rather than a hub id ``org/name``."""
    p = str(path)
    if p.startswith((".", "/", "~")) or os.sep + os.sep in p or p.count("/") > 1 or os.path.exists(p):
        return True
    head = p.split("/")[0]
    return "/" in p and os.path.isdir(head)


def check_pipeline_folder(path) -> None:
    """Raise ``ValueError`` if ``path`` is meant as a local pipeline folder but is not one."""
    p = Path(os.path.expanduser(str(path)))
    if not looks_local(str(path)):
        return
    if not p.exists():
        raise ValueError(f"pipeline folder {str(path)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"pipeline path {str(path)!r} is a file, not a pipeline folder")
    if not (p / "model_index.json").is_file():
        raise ValueError(f"{str(path)!r} is not a pipeline folder: it has no model_index.json")


def guarded_from_pretrained(load, path, **kwargs):
    """Call ``load(path, **kwargs)`` (a ``DiffusionPipeline.from_pretrained``) after :func:`check_pipeline_folder`;
    loading failures (corrupt weights, missing files, an unreachable hub) become a ``ValueError`` naming ``path``."""
    check_pipeline_folder(path)
    try:
        return load(path, **kwargs)
    except (OSError, KeyError, RuntimeError) as err:
        raise ValueError(f"could not load a pipeline from {str(path)!r}: {err}") from err
