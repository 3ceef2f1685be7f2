"""The one training loop: typed configs, objectives, engines (DDP / FSDP2 / DeepSpeed), sharded pickle-free
checkpoints and resume, EMA, output-folder rules.

    from gen.training import train
    train("diffusion", ["--config", "configs/digits_teacher.yaml", "--max_train_steps", "20"])
"""

from .batches import draw_batch
from .checkpoint import CheckpointManager, Slot, atomic_write_text, list_checkpoints
from .config import (
    ImageTrainConfig,
    TrainConfig,
    check_choice,
    check_positive,
    check_unet_resolution,
    config_from_dict,
    config_to_dict,
    parse_config,
    save_config,
)
from .ema import EMA
from .engine import check_engine, clip_grad_norm, make_accelerator, requested_engine, running_engine
from .loop import Objective, Phase, Trained, TrainLoop, step_generator
from .outputs import check_output_dir, move_aside
from .run import TRAINERS, config_class, objective_class, train

__all__ = [
    "EMA",
    "TRAINERS",
    "CheckpointManager",
    "ImageTrainConfig",
    "Objective",
    "Phase",
    "Slot",
    "TrainConfig",
    "TrainLoop",
    "Trained",
    "atomic_write_text",
    "check_choice",
    "check_engine",
    "check_output_dir",
    "check_positive",
    "check_unet_resolution",
    "clip_grad_norm",
    "config_class",
    "config_from_dict",
    "config_to_dict",
    "draw_batch",
    "list_checkpoints",
    "make_accelerator",
    "move_aside",
    "objective_class",
    "parse_config",
    "requested_engine",
    "running_engine",
    "save_config",
    "step_generator",
    "train",
]
