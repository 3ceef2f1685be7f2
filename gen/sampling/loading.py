"""Loading checks shared by every `gen` pipeline's ``from_pretrained``.

Before Diffusers loads a local folder:

1. the path exists, is a folder and holds a ``model_index.json`` that is a JSON object;
2. the folder was written for this pipeline: its ``_class_name`` is one the pipeline class accepts
   (``_folder_classes``), so a GBM folder is not sampled as a plain diffusion model;
3. the weight files its ``SHA256SUMS`` manifest lists (the shipped ``checkpoints/`` folders have one) match.

After loading (hub ids too): every parameter and buffer of every component is finite, else the error names the
component's weight file. Loading failures inside Diffusers become a ``ValueError`` naming the path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gen.checkpoints import MANIFEST_NAME, WEIGHT_SUFFIXES, verify_manifest


def looks_local(path) -> bool:
    """True when ``path`` is meant as a local folder rather than a hub id ``org/name``."""
    p = str(path)
    if p.startswith((".", "/", "~")) or os.sep + os.sep in p or p.count("/") > 1 or os.path.exists(p):
        return True
    head = p.split("/")[0]
    return "/" in p and os.path.isdir(head)


def read_model_index(folder) -> dict:
    """``folder/model_index.json`` as a dict.

    Raises:
        ValueError: missing, not JSON, or not a JSON object (``[]``, a string), naming the file.
    """
    path = Path(os.path.expanduser(str(folder))) / "model_index.json"
    if not path.is_file():
        raise ValueError(f"{str(folder)!r} is not a pipeline folder: it has no model_index.json")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); a pipeline folder's model_index.json is the object "
                         "save_pretrained writes") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__} {json.dumps(data)[:40]}, not a JSON object with "
                         "_class_name and the components")
    return data


def check_pipeline_folder(path, accepted: tuple[str, ...] | None = None, pipeline: str | None = None) -> dict | None:
    """Raise ``ValueError`` if ``path`` is meant as a local pipeline folder but is not one (or not one for this
    pipeline: ``accepted`` lists the ``_class_name`` values it loads). Returns the model index (None for hub ids)."""
    if not looks_local(str(path)):
        return None
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ValueError(f"pipeline folder {str(path)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"pipeline path {str(path)!r} is a file, not a pipeline folder")
    index = read_model_index(p)
    found = index.get("_class_name")
    if not isinstance(found, str) or not found:
        raise ValueError(f"{p / 'model_index.json'} has no _class_name (the pipeline class that saved the folder)")
    if accepted and found not in accepted:
        raise ValueError(f"{str(path)!r} was saved by {found} (model_index.json _class_name), and "
                         f"{pipeline or 'this pipeline'} does not load it (it loads: {', '.join(accepted)}); "
                         f"load it with pipelines.{found}")
    return index


def weight_files(path, component: str) -> list[str]:
    """The weight files of ``component`` inside a local pipeline folder (for error messages)."""
    folder = Path(os.path.expanduser(str(path))) / component
    if not folder.is_dir():
        return []
    return sorted(str(f) for f in folder.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))


def check_finite_module(module: torch.nn.Module, where: str) -> None:
    """``ValueError`` naming ``where`` (a file or component) and the first tensor with NaN or inf values."""
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_floating_point() and t.numel() and not t.is_meta and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: {name} holds {bad} NaN/inf value(s) of {t.numel()}; the weights are corrupt "
                             "(restore or re-export the file)")


def check_finite_weights(pipe, path) -> None:
    """Every ``nn.Module`` component of ``pipe`` has finite parameters and buffers; the message names the
    component's weight file (local folders) or the component and ``path``."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            files = weight_files(path, name) if looks_local(str(path)) else []
            where = " / ".join(files) if files else f"component {name!r} of {str(path)!r}"
            check_finite_module(component, where)


def guarded_from_pretrained(load, path, **kwargs):
    """``load(path, **kwargs)`` (a ``DiffusionPipeline.from_pretrained`` bound to a pipeline class) with the checks
    of this module. The class's ``_folder_classes`` (if it has one, inherited or its own) lists the
    ``model_index.json`` class names it loads, besides its own name. Loading failures (corrupt or truncated weights,
    missing files, an unreachable hub) become a ``ValueError`` naming ``path``."""
    cls = getattr(load, "__self__", None)
    accepted = getattr(cls, "_folder_classes", None) if isinstance(cls, type) else None
    if accepted is not None and cls.__name__ not in accepted:  # a subclass loads its own folders too
        accepted = (*accepted, cls.__name__)
    check_pipeline_folder(path, accepted, getattr(cls, "__name__", None))
    if looks_local(str(path)) and (Path(os.path.expanduser(str(path))) / MANIFEST_NAME).is_file():
        verify_manifest(os.path.expanduser(str(path)), weights_only=True)
    try:
        pipe = load(path, **kwargs)
    except ValueError:  # our own checks (component classes, schedulers) already name the problem
        raise
    except (OSError, KeyError, RuntimeError, TypeError, AttributeError, json.JSONDecodeError) as err:
        raise ValueError(f"could not load a pipeline from {str(path)!r}: {type(err).__name__}: {err}") from err
    check_finite_weights(pipe, path)
    return pipe
