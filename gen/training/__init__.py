"""Shared Accelerate training pieces: typed configs, atomic checkpoints and resume, EMA, the loop."""

from .batches import draw_batch
from .checkpoint import CheckpointManager, atomic_write_text, list_checkpoints
from .config import ImageTrainConfig, TrainConfig, config_from_dict, config_to_dict, parse_config, save_config
from .ema import EMA
from .loop import TrainLoop, make_accelerator, step_generator

__all__ = [
    "ImageTrainConfig",
    "CheckpointManager",
    "atomic_write_text",
    "list_checkpoints",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "parse_config",
    "save_config",
    "EMA",
    "draw_batch",
    "TrainLoop",
    "make_accelerator",
    "step_generator",
]
