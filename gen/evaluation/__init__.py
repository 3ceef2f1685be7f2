"""What the evaluation scripts do, as library code: one module per script of ``eval/``, each with a settings
dataclass (its command-line options, via ``gen.cli.parse_settings``) and a ``run(settings)`` that the script, the
tests and ``make demo`` call. The scripts under ``eval/`` only parse options and call ``run``.

=====================================  ========================================================================
module                                 script / use
=====================================  ========================================================================
:mod:`gen.evaluation.demo`             ``eval/demo.py`` (``make demo``): the sections of every method
:mod:`gen.evaluation.fid`              ``eval/fid.py``: FID / KID / class accuracy of a pipeline, folder or split
:mod:`gen.evaluation.linear_ag`        ``eval/calibrate_linear_ag.py``: LinearAG coefficients
:mod:`gen.evaluation.bench_teacher`    ``eval/bench_teacher.py``: the teacher's FID and the pipeline overhead
:mod:`gen.evaluation.guidance`         ``eval/guidance.py``: CFG vs APG over scales, AG / Step AG / LinearAG vs CFG
:mod:`gen.evaluation.inverse`          ``eval/inverse.py``: RED-Diff vs DPS vs pinv, the tuning search, timing
:mod:`gen.evaluation.gbm`              ``eval/gbm.py``: multiplicative diffusion against the additive teacher
:mod:`gen.evaluation.interpolants`     ``eval/interpolants.py``: 2-D side by side with torchcfm, digits, bridge
:mod:`gen.evaluation.alignprop`        ``eval/alignprop.py``: reward curve, memory against K, TRL side by side
:mod:`gen.evaluation.inverse_priors`   ``eval/inverse_priors.py``: RED-Diff / DPS, digits interpolant vs teacher
:mod:`gen.evaluation.fdistill`         ``eval/fdistill.py``: 2-D mode coverage, digits students vs the teacher
:mod:`gen.evaluation.bench_fdistill`   ``eval/bench_fdistill.py``: f-distill passes and time, copies held, memory
:mod:`gen.evaluation.fdistill_flow`    ``eval/fdistill_flow.py``: the digits-interpolant student against its ODE
=====================================  ========================================================================

Outputs: every default is under ``outputs/`` (ignored by git). Writing into the shipped folders (``checkpoints/``,
``eval/results/``) takes ``update_shipped=True`` (``--update_shipped``); :func:`output_path` enforces it, so
following the README never changes the repository.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("checkpoints", "eval/results")


def option(default, help: str = "", **metadata):
    """A settings field with its help text (lists get a fresh copy per instance)."""
    meta = {"help": help, **metadata}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def repo_path(path: str | Path) -> Path:
    """``path`` as given when it exists (or is absolute), else relative to the repository root (so that defaults
    such as ``checkpoints/digits-teacher`` work from any working directory)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() or not (REPO_ROOT / p).exists() else REPO_ROOT / p


def shipped_folder(path: str | Path) -> str | None:
    """The shipped folder (``checkpoints`` or ``eval/results``) that ``path`` lies in, or None."""
    resolved = Path(path).expanduser().resolve()
    for name in SHIPPED:
        root = (REPO_ROOT / name).resolve()
        if resolved == root or root in resolved.parents:
            return name
    return None


def output_path(path: str | Path, update_shipped: bool = False, what: str = "--out") -> Path:
    """Check where a script will write: a path inside ``checkpoints/`` or ``eval/results/`` (tracked by git) needs
    ``update_shipped``; a path that is an existing file where a folder is meant is reported by the caller.

    Raises:
        ValueError: naming the path, the shipped folder and the flag.
    """
    path = Path(path).expanduser()
    where = shipped_folder(path)
    if where is not None and not update_shipped:
        raise ValueError(f"{what} {str(path)!r} lies in the shipped {where}/ folder, which git tracks; write under "
                         f"outputs/ instead, or pass --update_shipped to update the shipped results on purpose")
    return path


def refresh_manifest(path: str | Path) -> Path | None:
    """After an intended write into a shipped model folder (``checkpoints/<name>/...``), rewrite that folder's
    SHA256SUMS so the manifest test keeps passing; returns the manifest (None outside ``checkpoints/``)."""
    from gen.checkpoints import write_manifest

    resolved = Path(path).expanduser().resolve()
    root = (REPO_ROOT / "checkpoints").resolve()
    if root not in resolved.parents:
        return None
    return write_manifest(root / resolved.relative_to(root).parts[0])


def machine() -> dict:
    """Where a benchmark ran (recorded beside every number)."""
    return {"platform": platform.platform(), "processor": platform.machine() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
