"""The shared Accelerate training loop: accumulation, clipping, EMA, periodic atomic checkpoints, resume, logging.

A trainer supplies ``loss_fn(step, generator) -> (loss, logs)``; the loop owns everything else::

    loop = TrainLoop(cfg, accelerator, models={"unet": unet}, optimizer=opt, ema_model=unet)
    loop.run(loss_fn)
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from .checkpoint import CheckpointManager
from .config import TrainConfig, save_config
from .ema import EMA

logger = logging.getLogger(__name__)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An ``Accelerator`` that uses the GPU when there is one and the CPU otherwise.

    On a CPU-only machine ``cpu=True`` makes ``accelerate launch --multi_gpu --num_processes N`` run N gloo ranks
    (plain ``--cpu --num_processes N`` silently runs one process).
    """
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )


def step_generator(seed: int, step: int, rank: int = 0, micro: int = 0, device="cpu") -> torch.Generator:
    """A generator seeded by ``(seed, step, rank, micro-step)``: data order and noise do not depend on history,
    so a resumed run draws exactly what an uninterrupted one would."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + step) * 1_009 + rank) * 101 + micro)
    return g


class TrainLoop:
    """Run ``cfg.max_train_steps`` optimizer steps of ``loss_fn``.

    Args:
        cfg: the trainer's config (a :class:`TrainConfig` subclass).
        accelerator: from :func:`make_accelerator`.
        models: name -> module; all are trained by ``optimizer`` and saved in checkpoints under these names.
        optimizer: an optimizer over the models' trainable parameters (not yet ``prepare``-d).
        ema_model: the model whose weights the EMA tracks (``cfg.ema_decay > 0``), or None.
    """

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, models: dict, optimizer, ema_model=None):
        self.cfg, self.acc = cfg, accelerator
        self.out = Path(cfg.output_dir)
        # Accelerate's wrapped scheduler steps once per process per call, so lengths are scaled by the world size.
        n = accelerator.num_processes
        lr_sched = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * n,
                                 num_training_steps=cfg.max_train_steps * n)
        names = list(models)
        prepared = accelerator.prepare(*models.values(), optimizer, lr_sched)
        self.models = dict(zip(names, prepared[: len(names)]))
        self.optimizer, self.lr_scheduler = prepared[len(names):]
        self.ema = None
        if cfg.ema_decay > 0:
            if ema_model is None:
                raise ValueError("ema_decay > 0 but no ema_model was given")
            self._ema_name = next(n for n, m in models.items() if m is ema_model)
            self.ema = EMA(accelerator.unwrap_model(self.models[self._ema_name]), cfg.ema_decay)
        self.ckpt = CheckpointManager(self.out, cfg.checkpoints_total_limit)
        self.step = 0

    # ------------------------------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Restore the checkpoint named by ``cfg.resume`` (if any); returns the step to continue from."""
        path = self.ckpt.resolve(self.cfg.resume)
        if path is None:
            if self.cfg.resume:
                logger.info("no checkpoint in %s yet; starting a fresh run", self.ckpt.root)
            return 0
        state = self.ckpt.load(path, self.acc, self.models, self.optimizer, self.lr_scheduler, self.ema)
        self.step = int(state["step"])
        logger.info("resumed from %s at step %d", path, self.step)
        return self.step

    def save(self) -> Path:
        return self.ckpt.save(self.acc, self.step, self.models, self.optimizer, self.lr_scheduler, self.ema)

    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / "logs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------------------------------
    def run(self, loss_fn) -> None:
        """Train until ``cfg.max_train_steps``. ``loss_fn(step, generator)`` returns ``(loss, logs: dict)``."""
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        self.resume()
        if self.step >= cfg.max_train_steps:
            logger.info("already at step %d >= max_train_steps=%d", self.step, cfg.max_train_steps)
            return
        for m in self.models.values():
            m.train()
        bar = tqdm(total=cfg.max_train_steps, initial=self.step, disable=not acc.is_local_main_process, desc="train")
        params = [p for m in self.models.values() for p in m.parameters() if p.requires_grad]
        t0, logs = time.time(), {}
        while self.step < cfg.max_train_steps:
            for micro in range(cfg.gradient_accumulation_steps):
                gen = step_generator(cfg.seed, self.step, acc.process_index, micro, device="cpu")
                with acc.accumulate(*self.models.values()):
                    loss, logs = loss_fn(self.step, gen)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"loss is {loss.item()} at step {self.step}; nothing was saved over the last checkpoint"
                            f" in {self.ckpt.root} (lower learning_rate or check the data)")
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        logs["grad_norm"] = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.ema is not None:
                self.ema.update(acc.unwrap_model(self.models[self._ema_name]))
            logs = {k: (float(v) if torch.is_tensor(v) else v) for k, v in logs.items()}
            logs["loss"] = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_train_steps:
                self._log({"step": self.step, "lr": self.lr_scheduler.get_last_lr()[0],
                           "elapsed_s": round(time.time() - t0, 2), **logs})
            if self.step % cfg.checkpointing_steps == 0 or self.step == cfg.max_train_steps:
                self.save()
        bar.close()

    def final_model(self, name: str) -> torch.nn.Module:
        """The unwrapped model ``name`` with EMA weights copied in when EMA tracks it."""
        model = self.acc.unwrap_model(self.models[name])
        if self.ema is not None and name == self._ema_name:
            self.ema.copy_to(model)
        return model


