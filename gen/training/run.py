"""``train(objective, argv)``: config -> output-folder checks -> Accelerator and engine check -> objective -> the
one loop -> export. Every ``train/<method>.py`` is this one call::

    accelerate launch train/diffusion.py --config configs/digits_teacher.yaml [--key value ...]
    python -c "from gen.training import train; train('diffusion', ['--config', 'configs/digits_teacher.yaml'])"
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from .config import parse_config
from .engine import check_engine, make_accelerator
from .loop import Objective, TrainLoop
from .outputs import check_output_dir, move_aside

# trainer name -> "module:Objective" (imported on use, so gen.training does not import every method)
TRAINERS = {
    "diffusion": "gen.training.objectives:DiffusionObjective",
    "classifier": "gen.training.objectives:ClassifierObjective",
    "gbm": "gen.gbm.training:GBMObjective",
    "interpolant": "gen.interpolants.training:InterpolantObjective",
    "fdistill": "gen.distill.training:FDistillObjective",
    "alignprop": "gen.reward.training:AlignPropObjective",
}


def objective_class(objective) -> type[Objective]:
    """An :class:`Objective` subclass, from itself or a trainer name of :data:`TRAINERS`."""
    if isinstance(objective, type) and issubclass(objective, Objective):
        return objective
    if objective not in TRAINERS:
        raise ValueError(f"unknown trainer {objective!r}; known: {', '.join(TRAINERS)}")
    module, _, name = TRAINERS[objective].partition(":")
    return getattr(importlib.import_module(module), name)


def config_class(objective):
    """The config dataclass of a trainer (name or :class:`Objective` subclass)."""
    return objective_class(objective).config_class


def train(objective, argv: list[str] | None = None, make_accelerator_fn=make_accelerator) -> Path:
    """Parse ``argv`` into the objective's config, train, export; returns ``output_dir``.

    Args:
        objective: a trainer name (``"diffusion"``, ``"classifier"``, ``"gbm"``, ``"interpolant"``,
            ``"fdistill"``, ``"alignprop"``) or an :class:`Objective` subclass.
        argv: ``["--config", FILE, "--key", "value", ...]``; None reads ``sys.argv``.
        make_accelerator_fn: ``cfg -> Accelerator`` (tests swap in one that fakes FSDP2 on CPU; see
            ``tests/_fsdp_shim.py``).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cls = objective_class(objective)
    cfg = parse_config(cls.config_class, argv)
    check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite_output_dir)
    acc = make_accelerator_fn(cfg)
    check_engine(acc)
    if cfg.overwrite_output_dir and not cfg.resume:
        if acc.is_main_process:
            move_aside(cfg.output_dir)
        acc.wait_for_everyone()
    loop = TrainLoop(cfg, acc, cls(cfg, acc))
    loop.run()
    return Path(cfg.output_dir)
