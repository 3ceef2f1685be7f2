"""Typed training configs: a dataclass per trainer, loaded from YAML, overridden from the command line.

    cfg = parse_config(DiffusionTrainConfig, ["--config", "configs/x.yaml", "--max_train_steps", "20"])

Unknown keys (in the YAML file or on the command line) and values of the wrong type raise ``ValueError`` naming
the key; ``validate()`` on each dataclass checks ranges. The resolved config is saved beside the checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclasses.dataclass
class TrainConfig:
    """Settings every trainer shares. Subclasses add their method's fields and extend ``validate``."""

    output_dir: str = dataclasses.field(default="runs/default",
                                        metadata={"help": "checkpoints, logs and the final pipeline"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seeds init, data order and noise (per step and rank)"})
    max_train_steps: int = dataclasses.field(default=1000, metadata={"help": "optimizer steps in total"})
    train_batch_size: int = dataclasses.field(default=64, metadata={"help": "examples per process per micro-step"})
    gradient_accumulation_steps: int = dataclasses.field(default=1, metadata={"help": "micro-steps per optimizer step"})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={"help": "peak learning rate"})
    lr_scheduler: str = dataclasses.field(default="constant",
                                          metadata={"help": "constant | cosine | linear (diffusers names)"})
    lr_warmup_steps: int = dataclasses.field(default=0, metadata={"help": "linear warm-up steps"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float = dataclasses.field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    mixed_precision: str = dataclasses.field(default="no", metadata={"help": "no | fp16 | bf16"})
    ema_decay: float = dataclasses.field(default=0.0, metadata={"help": "EMA decay of the weights (0 = no EMA)"})
    checkpointing_steps: int = dataclasses.field(default=500, metadata={"help": "save a checkpoint every N steps"})
    checkpoints_total_limit: int = dataclasses.field(default=3, metadata={"help": "keep the last K checkpoints"})
    resume: str | None = dataclasses.field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    overwrite_output_dir: bool = dataclasses.field(
        default=False, metadata={"help": "start fresh in a non-empty output_dir: its contents move to "
                                         "<output_dir>.old-<time> (nothing is deleted)"})
    trust_deepspeed_checkpoint: bool = dataclasses.field(
        default=False, metadata={"help": "allow resuming a DeepSpeed checkpoint (its format unpickles: only "
                                         "checkpoints you wrote yourself)"})
    log_every: int = dataclasses.field(default=50, metadata={"help": "log loss every N steps"})
    report_to: str = dataclasses.field(default="none",
                                       metadata={"help": "Accelerate trackers: none | tensorboard | wandb | all"})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        check_positive(self, "max_train_steps", "train_batch_size", "gradient_accumulation_steps",
                       "checkpointing_steps",
                  "checkpoints_total_limit", "log_every")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")
        check_choice(self, "mixed_precision", ("no", "fp16", "bf16"))
        check_choice(self, "lr_scheduler", ("constant", "constant_with_warmup", "cosine", "linear"))
        check_choice(self, "report_to", ("none", "tensorboard", "wandb", "all"))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay}")
        if self.max_grad_norm < 0 or self.lr_warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("max_grad_norm, lr_warmup_steps and weight_decay must be >= 0")
        if self.resume and self.overwrite_output_dir:
            raise ValueError("resume and overwrite_output_dir contradict each other: resume continues the run in "
                             "output_dir, overwrite_output_dir starts a fresh one there")


@dataclasses.dataclass
class ImageTrainConfig(TrainConfig):
    """Settings of trainers on (class-labelled) images with a UNet preset: the dataset, the UNet, label dropout."""

    dataset: str = dataclasses.field(default="digits16", metadata={"help": "digits16 | folder"})
    data_dir: str | None = dataclasses.field(default=None, metadata={"help": "image folder (dataset=folder)"})
    resolution: int = dataclasses.field(default=16, metadata={"help": "image size (dataset=folder)"})
    channels: int = dataclasses.field(default=1, metadata={"help": "1 or 3 (dataset=folder)"})
    random_flip: bool = False
    unet_preset: str = dataclasses.field(default="digits", metadata={"help": "digits | tiny"})
    label_dropout: float = dataclasses.field(default=0.1, metadata={"help": "P(label -> null class) for CFG"})

    def validate(self) -> None:
        super().validate()
        check_choice(self, "dataset", ("digits16", "folder"))
        check_choice(self, "unet_preset", ("digits", "tiny"))
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1); got {self.label_dropout}")
        if self.dataset == "folder" and not self.data_dir:
            raise ValueError("dataset=folder needs data_dir")
        if self.dataset == "folder":
            check_unet_resolution(self.unet_preset, self.resolution, self.channels)


def check_unet_resolution(preset: str, resolution: int, channels: int) -> None:
    """Raise ``ValueError`` when the UNet ``preset`` cannot take ``channels`` x ``resolution`` x ``resolution``
    images: each of its down blocks but the last halves the side, so the side must divide by 2^(blocks - 1)."""
    import torch

    from gen.models.unet import build_unet

    if resolution < 1:
        raise ValueError(f"resolution must be >= 1; got {resolution}")
    with torch.device("meta"):  # the architecture only: no memory, no weights
        unet = build_unet(preset, None, channels, resolution)
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    if resolution % factor:
        ok = [r for r in (resolution - resolution % factor, resolution - resolution % factor + factor) if r > 0]
        raise ValueError(f"resolution={resolution} does not divide by {factor}, which unet_preset={preset!r} needs "
                         f"({len(unet.config.block_out_channels)} down blocks); use e.g. "
                         f"{' or '.join(map(str, ok))}")


def check_positive(cfg, *names: str) -> None:
    """Raise ``ValueError`` naming the first of ``names`` whose value on ``cfg`` is below 1."""
    for n in names:
        if getattr(cfg, n) < 1:
            raise ValueError(f"{n} must be >= 1; got {getattr(cfg, n)}")


def check_choice(cfg, name: str, allowed) -> None:
    """Raise ``ValueError`` naming ``name`` and the allowed values when ``getattr(cfg, name)`` is not one of them."""
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"{name}={getattr(cfg, name)!r}; allowed: {', '.join(map(str, allowed))}")


ENGINE_KEYS = ("fsdp", "deepspeed", "zero", "use_fsdp", "use_deepspeed", "distributed_type", "num_processes",
               "multi_gpu")


def _unknown(key: str, known: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if key.lower().startswith(ENGINE_KEYS):
        hint = (" (the engine is chosen by accelerate launch, not the trainer config: --use_fsdp --fsdp_version 2, "
                "--use_deepspeed, or --config_file configs/accelerate/<ddp|fsdp2|zero2|zero3>.yaml)")
    return ValueError(f"unknown config key {key!r} in {where}{hint}; known keys: {', '.join(sorted(known))}")


def _coerce(value, tp, key: str):
    """Convert a YAML or command-line value to the field's type, or raise ``ValueError`` naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} expects a list; got {value!r}")
        seq = [_coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in value]
        return tuple(seq) if origin is tuple else seq
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in _TRUE | _FALSE:
                return str(value).lower() in _TRUE
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r} expects {getattr(tp, '__name__', tp)}; got {value!r}") from None
    return value


def config_from_dict(cls, data: dict, where: str = "config"):
    """Build and validate ``cls`` from a mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in known:
            raise _unknown(key, known, where)
        kwargs[key] = _coerce(value, hints[key], key)
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def parse_config(cls, argv: list[str] | None = None):
    """Parse ``[--config FILE.yaml] [--key value | --key=value ...]`` into a validated ``cls`` instance.

    Command-line values override the YAML file. ``--help`` prints every field with its default and help text.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(describe(cls))
        raise SystemExit(0)
    data: dict = {}
    overrides: dict = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}; use --key value")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"--{key} needs a value")
            val = argv[i + 1]
            i += 1
        i += 1
        key = key.replace("-", "_")
        if key == "config":
            path = Path(val)
            if not path.is_file():
                raise ValueError(f"config file {val!r} does not exist")
            try:
                loaded = yaml.safe_load(path.read_text())
            except yaml.YAMLError as err:
                raise ValueError(f"config file {val!r} is not valid YAML: {err}") from err
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"config file {val!r} must hold a mapping of keys to values")
            data.update(loaded or {})
            where = val
        else:
            overrides[key] = val
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise _unknown(key, known, where)
    for key in overrides:
        if key not in known:
            raise _unknown(key, known, "the command line")
    data.update(overrides)
    return config_from_dict(cls, data)


def describe(cls) -> str:
    lines = [f"{cls.__name__} keys (--key value):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  --{f.name:<28} {default!r:<16} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def config_to_dict(cfg) -> dict:
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def save_config(cfg, path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from .checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
