"""Atomic training checkpoints: safetensors weights, ``weights_only`` optimizer state, a JSON step counter.

Layout of ``<output_dir>/checkpoints/checkpoint-<step>/``::

    <name>.safetensors      one per registered model (unwrapped state dict)
    ema.safetensors         EMA shadow weights (if EMA is on)
    optimizer.pt            optimizer.state_dict() (loaded with weights_only=True)
    lr_scheduler.pt         lr_scheduler.state_dict() (loaded with weights_only=True)
    state.json              {"step": ...}; written last, so a folder without it is incomplete

A checkpoint is written into ``checkpoint-<step>.tmp`` and renamed into place, so a run killed while saving leaves
the previous checkpoints intact. No RNG state is saved: trainers draw data and noise from generators seeded by
``(seed, step, rank)``, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_CKPT = re.compile(r"^checkpoint-(\d+)$")


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def list_checkpoints(root) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (a ``checkpoints`` folder), sorted by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


class CheckpointManager:
    """Save, prune and restore checkpoints of a training run.

    Args:
        output_dir: the run folder; checkpoints go to ``output_dir/checkpoints``.
        total_limit: how many complete checkpoints to keep (oldest removed first).
    """

    def __init__(self, output_dir, total_limit: int = 3):
        self.root = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

    def save(self, accelerator, step: int, models: dict, optimizer, lr_scheduler=None, ema=None, extra=None) -> Path:
        """Write ``checkpoint-<step>`` atomically (main process) and prune old ones. All ranks must call it."""
        # Gathering weights may be collective (FSDP/DeepSpeed), so every rank calls get_state_dict.
        states = {name: accelerator.get_state_dict(m) for name, m in models.items()}
        final = self.root / f"checkpoint-{step}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f"checkpoint-{step}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name, sd in states.items():
                save_file(_contiguous(sd), str(tmp / f"{name}.safetensors"))
            if ema is not None:
                save_file(_contiguous(ema.state_dict()), str(tmp / "ema.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            if lr_scheduler is not None:
                torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.prune()
        accelerator.wait_for_everyone()
        return final

    def prune(self) -> None:
        for p in self.root.glob("checkpoint-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        ckpts = list_checkpoints(self.root)
        for _, p in ckpts[: max(0, len(ckpts) - self.total_limit)]:
            shutil.rmtree(p, ignore_errors=True)

    def resolve(self, resume: str | None) -> Path | None:
        """Checkpoint folder to resume from: None for a fresh run, the newest for ``"latest"``, or a given path.

        ``"latest"`` with no checkpoint yet starts a fresh run (so a pre-empted job can be restarted with the same
        command); an explicit path that is not a complete checkpoint raises ``ValueError``.
        """
        if resume is None or resume == "":
            return None
        if resume == "latest":
            ckpts = list_checkpoints(self.root)
            return ckpts[-1][1] if ckpts else None
        path = Path(resume)
        if not path.is_dir():
            raise ValueError(f"resume checkpoint {resume!r} does not exist")
        if not (path / "state.json").is_file():
            raise ValueError(f"resume checkpoint {resume!r} is incomplete (no state.json); pick another")
        return path

    @staticmethod
    def load(path, accelerator, models: dict, optimizer, lr_scheduler=None, ema=None) -> dict:
        """Restore weights, optimizer, LR schedule and EMA from ``path``; returns the saved ``state.json``."""
        path = Path(path)
        try:
            state = json.loads((path / "state.json").read_text())
            for name, m in models.items():
                accelerator.unwrap_model(m).load_state_dict(load_file(str(path / f"{name}.safetensors")))
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
            if lr_scheduler is not None and (path / "lr_scheduler.pt").is_file():
                lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
            if ema is not None:
                ema_file = path / "ema.safetensors"
                if not ema_file.is_file():
                    raise ValueError("the run uses EMA but the checkpoint has no ema.safetensors")
                ema.load_state_dict(load_file(str(ema_file)))
        except ValueError as err:
            raise ValueError(f"cannot resume from {str(path)!r}: {err}") from err
        except Exception as err:  # corrupt or mismatched files: name the checkpoint, keep the cause
            raise ValueError(f"cannot resume from {str(path)!r} (corrupt or from another model): {err}") from err
        return state
