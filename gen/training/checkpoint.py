"""Atomic, pickle-free training checkpoints that shard with the engine: ``torch.distributed.checkpoint`` (DCP) with
the Hugging Face safetensors storage, plus JSON.

Layout of ``<output_dir>/checkpoints/checkpoint-<step>/`` (DDP, one process and FSDP2 alike)::

    shard-0000R-model-00001-of-00001.safetensors   rank R's tensors: for every trained model <name>,
                                                   <name>.model.<fqn>          weights (FSDP2: this rank's shard)
                                                   <name>.optim.<fqn>.<key>    optimizer state (Adam moments, step)
                                                   <name>.ema.<key>            EMA shadows (sharded like the weights)
                                                   (replicated tensors are written once, by one rank)
    state.json                                     step, format, world size, config fingerprint, and per model:
                                                   optimizer param groups, LR-scheduler state, EMA counter, the
                                                   manifest of optimizer tensors; written last
    <extra files>                                  an objective's own files (AlignProp: its Diffusers-format LoRA)

Every file is written into ``checkpoint-<step>.tmp`` and the folder is renamed into place, so a run killed while
saving leaves the previous checkpoints intact and the half-written one is never picked up. Shard offsets live in
the safetensors headers, so nothing is unpickled on load, and DCP reshards: a 2-rank FSDP2 checkpoint resumes on
one process and vice versa. No RNG state is saved: trainers draw data and noise from generators seeded by
``(seed, step, rank)``, so a resumed run sees the same batches as an uninterrupted one (on the same world size).

DeepSpeed runs keep DeepSpeed's own format (``<name>/`` folders from ``engine.save_checkpoint``). It unpickles on
load, so resuming one needs ``trust_deepspeed_checkpoint``; it does not reshard.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gen.checkpoints import sha256

logger = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
FORMAT_DCP = "dcp-safetensors"
FORMAT_DEEPSPEED = "deepspeed"
STATE_FILE = "state.json"


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
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


@dataclass
class Slot:
    """What one trained model puts into a checkpoint: the prepared model, its optimizer and LR schedule, its EMA,
    and whether frozen weights are saved too (False for adapters over a frozen base: only trainable weights)."""

    model: torch.nn.Module
    optimizer: object
    scheduler: object
    ema: object | None = None
    save_frozen: bool = True
    trainable: set = field(default_factory=set)


def _canonical(name: str) -> str:
    """A parameter or buffer name without the wrappers' leading ``module.`` (DDP) / ``_orig_mod.`` (compile)."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in the checkpoint manifest")
    return dt


def verify_files(path, state: dict) -> None:
    """Check every file a checkpoint's ``state.json`` lists against its sha256 (safetensors has no checksum of its
    data: flipped bytes would load as wrong weights)."""
    path = Path(path)
    for name, digest in state.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"cannot resume from {str(path)!r}: {name} is missing")
        if sha256(f) != digest:
            raise ValueError(f"cannot resume from {str(path)!r}: {name} is corrupt (its sha256 differs from the one "
                             "recorded when it was written)")


def _json_safe(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return "nan"
    return value


def _model_state(slot: Slot) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(slot.model)
    if not slot.save_frozen:
        buffers = {_canonical(n) for n, _ in slot.model.named_buffers()}
        sd = {k: v for k, v in sd.items() if k in slot.trainable or k in buffers}
    return sd


class CheckpointManager:
    """Save, prune and restore checkpoints of a training run.

    Args:
        output_dir: the run folder; checkpoints go to ``output_dir/checkpoints``.
        total_limit: how many complete checkpoints to keep (oldest removed first).
    """

    def __init__(self, output_dir, total_limit: int = 3):
        self.root = Path(output_dir) / "checkpoints"
        self.total_limit = total_limit

    # -- save -----------------------------------------------------------------------------------------------------
    def save(self, accelerator, step: int, slots: dict[str, Slot], meta: dict, extra_files=None,
             deepspeed: bool = False) -> Path:
        """Write ``checkpoint-<step>`` (every rank calls it) and prune old ones.

        Args:
            slots: name -> :class:`Slot` of each trained model.
            meta: JSON-able run facts stored in ``state.json`` (config fingerprint, objective name, ...).
            extra_files: ``fn(folder or None)`` called on every rank after the tensors are written; rank 0 gets the
                temporary folder and writes its files there (before the rename), the others get None.
            deepspeed: write each model with DeepSpeed's own ``save_checkpoint`` (unpickles on load).
        """
        final = self.root / f"checkpoint-{step}"
        tmp = self.root / f"checkpoint-{step}.tmp"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        state = {"step": step, "format": FORMAT_DEEPSPEED if deepspeed else FORMAT_DCP,
                 "world_size": accelerator.num_processes, **meta, "models": {}}
        if deepspeed:
            self._save_deepspeed(accelerator, tmp, slots, state)
        else:
            self._save_dcp(tmp, slots, state)
        if extra_files is not None:
            extra_files(tmp if accelerator.is_main_process else None)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state["files"] = {str(f.relative_to(tmp)): sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
            atomic_write_text(tmp / STATE_FILE, json.dumps(_json_safe(state), indent=1))
            if final.exists():  # the same step saved again (a resumed run re-reaching its end)
                old = self.root / f"checkpoint-{step}.tmp-old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            self.prune()
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def _save_dcp(folder: Path, slots: dict[str, Slot], state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        tensors = {}
        for name, slot in slots.items():
            msd = _model_state(slot)
            tensors.update({f"{name}.model.{k}": v for k, v in msd.items()})
            osd = get_optimizer_state_dict(slot.model, _inner(slot.optimizer))
            manifest, scalars = {}, {}
            for fqn, entries in osd["state"].items():
                for key, value in entries.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"{name}.optim.{fqn}.{key}"] = value
                        like = value.ndim > 0
                        manifest.setdefault(fqn, {})[key] = {"like_param": like, "shape": list(value.shape),
                                                             "dtype": str(value.dtype)}
                    else:
                        scalars.setdefault(fqn, {})[key] = value
            entry = {"param_groups": osd["param_groups"], "optim_manifest": manifest, "optim_scalars": scalars,
                     "scheduler": slot.scheduler.state_dict(), "model_keys": sorted(msd)}
            if slot.ema is not None:
                tensors.update({f"{name}.ema.{k}": v for k, v in slot.ema.shadow.items()})
                entry["ema_num_updates"] = slot.ema.num_updates
            state["models"][name] = entry
        with warnings.catch_warnings():  # one process without a process group is the intended use too
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True))

    @staticmethod
    def _save_deepspeed(accelerator, folder: Path, slots: dict[str, Slot], state: dict) -> None:
        from safetensors.torch import save_file

        for name, slot in slots.items():
            slot.model.save_checkpoint(str(folder / name), tag="state")  # collective; pickles (DeepSpeed's format)
            entry = {"scheduler": slot.scheduler.state_dict()}
            if slot.ema is not None:
                if accelerator.is_main_process:
                    save_file({k: v.detach().cpu().contiguous() for k, v in slot.ema.shadow.items()},
                              str(folder / f"{name}.ema.safetensors"))
                entry["ema_num_updates"] = slot.ema.num_updates
            state["models"][name] = entry

    def prune(self) -> None:
        for p in self.root.glob("checkpoint-*.tmp*"):
            shutil.rmtree(p, ignore_errors=True)
        ckpts = list_checkpoints(self.root)
        for _, p in ckpts[: max(0, len(ckpts) - self.total_limit)]:
            shutil.rmtree(p, ignore_errors=True)

    # -- resume ---------------------------------------------------------------------------------------------------
    def resolve(self, resume: str | None) -> Path | None:
        """Checkpoint folder to resume from: None for a fresh run, the newest for ``"latest"``, or a given path.

        ``"latest"`` with no checkpoint yet starts a fresh run (so a pre-empted job can be restarted with the same
        command; the loop says so in its log); an explicit path that is not a complete checkpoint raises
        ``ValueError``.
        """
        if resume is None or resume == "":
            return None
        if resume == "latest":
            ckpts = list_checkpoints(self.root)
            return ckpts[-1][1] if ckpts else None
        path = Path(resume)
        if not path.is_dir():
            raise ValueError(f"resume checkpoint {resume!r} does not exist")
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"resume checkpoint {resume!r} is incomplete (no {STATE_FILE}); pick another")
        return path

    @staticmethod
    def read_state(path) -> dict:
        """``state.json`` of a checkpoint, checked for the fields every format has."""
        path = Path(path)
        file = path / STATE_FILE
        if not file.is_file():
            raise ValueError(f"cannot resume from {str(path)!r}: {STATE_FILE} is missing")
        try:
            state = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot resume from {str(path)!r}: {STATE_FILE} is not valid JSON ({err})") from None
        if "format" not in state:
            raise ValueError(f"cannot resume from {str(path)!r}: it was written before the one training loop "
                             "(optimizer.pt format); start a fresh run")
        return state

    @staticmethod
    def load(path, accelerator, slots: dict[str, Slot], state: dict, trust_deepspeed: bool = False) -> None:
        """Restore weights, optimizer state, LR schedules and EMA of ``slots`` from ``path`` (every rank calls it).

        Raises:
            ValueError: naming the checkpoint, for a missing or corrupt shard, a model set that differs, a
                DeepSpeed checkpoint without ``trust_deepspeed`` or on another world size.
        """
        path = Path(path)
        if sorted(state["models"]) != sorted(slots):
            raise ValueError(f"cannot resume from {str(path)!r}: it holds models {sorted(state['models'])} but this "
                             f"run trains {sorted(slots)}")
        verify_files(path, state)
        if state["format"] == FORMAT_DEEPSPEED:
            return CheckpointManager._load_deepspeed(path, accelerator, slots, state, trust_deepspeed)
        if state["format"] != FORMAT_DCP:
            raise ValueError(f"cannot resume from {str(path)!r}: unknown checkpoint format {state['format']!r}")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"cannot resume from {str(path)!r}: it has no .safetensors shards")
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            CheckpointManager._load_dcp(path, slots, state)
        except ValueError:
            raise
        except (Exception, CheckpointException) as err:  # unreadable shards, mismatched shapes: name the checkpoint
            raise ValueError(f"cannot resume from {str(path)!r} (a shard is missing or corrupt, or the checkpoint "
                             f"is of another model): {type(err).__name__}: {str(err)[:500]}") from err

    @staticmethod
    def _load_dcp(path: Path, slots: dict[str, Slot], state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        tensors, templates = {}, {}
        for name, slot in slots.items():
            entry = state["models"][name]
            msd = _model_state(slot)
            if sorted(msd) != sorted(entry["model_keys"]):
                extra = sorted(set(msd) ^ set(entry["model_keys"]))[:4]
                raise ValueError(f"cannot resume from {str(path)!r}: model {name!r} has other weights than the "
                                 f"checkpoint (e.g. {extra})")
            full = get_model_state_dict(slot.model)
            optim_state = {}
            for fqn, keys in entry["optim_manifest"].items():
                if fqn not in full:
                    raise ValueError(f"cannot resume from {str(path)!r}: optimizer state for {fqn!r}, which model "
                                     f"{name!r} does not have")
                for key, spec in keys.items():
                    t = (torch.empty_like(full[fqn], dtype=_dtype(spec["dtype"])) if spec["like_param"]
                         else torch.empty(spec["shape"], dtype=_dtype(spec["dtype"])))
                    optim_state.setdefault(fqn, {})[key] = t
                    tensors[f"{name}.optim.{fqn}.{key}"] = t
            for fqn, keys in entry["optim_scalars"].items():
                optim_state.setdefault(fqn, {}).update(keys)
            model_t = {k: torch.empty_like(v) for k, v in msd.items()}
            tensors.update({f"{name}.model.{k}": v for k, v in model_t.items()})
            if slot.ema is not None:
                if "ema_num_updates" not in entry:
                    raise ValueError(f"cannot resume from {str(path)!r}: the run uses EMA but the checkpoint has "
                                     f"none for {name!r}")
                ema_t = {k: torch.empty_like(v) for k, v in slot.ema.shadow.items()}
                tensors.update({f"{name}.ema.{k}": v for k, v in ema_t.items()})
            else:
                ema_t = None
            templates[name] = (model_t, optim_state, ema_t)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
        for name, slot in slots.items():
            entry = state["models"][name]
            model_t, optim_state, ema_t = templates[name]
            set_model_state_dict(slot.model, model_t, options=StateDictOptions(strict=slot.save_frozen))
            set_optimizer_state_dict(slot.model, _inner(slot.optimizer),
                                     {"state": optim_state, "param_groups": entry["param_groups"]})
            slot.scheduler.load_state_dict(entry["scheduler"])
            if ema_t is not None:
                with torch.no_grad():
                    for k, v in ema_t.items():
                        slot.ema.shadow[k].copy_(v)
                slot.ema.num_updates = int(entry["ema_num_updates"])

    @staticmethod
    def _load_deepspeed(path: Path, accelerator, slots: dict[str, Slot], state: dict, trust: bool) -> None:
        if not trust:
            raise ValueError(f"{str(path)!r} is a DeepSpeed checkpoint; its format unpickles (it can run code on "
                             "load). Pass --trust_deepspeed_checkpoint true to resume it if you wrote it yourself")
        if state["world_size"] != accelerator.num_processes:
            raise ValueError(f"cannot resume the DeepSpeed checkpoint {str(path)!r} on {accelerator.num_processes} "
                             f"process(es): it was written by {state['world_size']} and DeepSpeed's format does not "
                             "reshard (convert it with DeepSpeed's universal-checkpoint tools, or resume on the same "
                             "number of processes)")
        from safetensors.torch import load_file

        for name, slot in slots.items():
            folder = path / name
            if not folder.is_dir():
                raise ValueError(f"cannot resume from {str(path)!r}: the DeepSpeed folder {name!r} is missing")
            load_path, _ = slot.model.load_checkpoint(str(folder), tag="state")
            if load_path is None:
                raise ValueError(f"cannot resume from {str(path)!r}: DeepSpeed found no checkpoint in {str(folder)!r}")
            entry = state["models"][name]
            slot.scheduler.load_state_dict(entry["scheduler"])  # DeepSpeed's own copy does not reach our scheduler
            if slot.ema is not None:
                ema_file = path / f"{name}.ema.safetensors"
                if not ema_file.is_file():
                    raise ValueError(f"cannot resume from {str(path)!r}: {ema_file.name} is missing")
                slot.ema.load_state_dict({**{f"shadow.{k}": v for k, v in load_file(str(ema_file)).items()},
                                          "num_updates": torch.tensor(entry["ema_num_updates"])})
