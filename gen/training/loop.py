"""The one training loop of every trainer, and the objective interface each method implements.

An :class:`Objective` declares what a method trains: its networks (:class:`Trained`, one AdamW each) and its
phases (:class:`Phase`: which network one optimizer update trains, with which loss, how often). The loop owns
everything else: LR schedules, gradient accumulation, clipping by the global norm (per network), the NaN guard,
logging (``logs.jsonl``, a tqdm bar, Accelerate trackers), EMA, checkpoint cadence, resume and the final export
(full weights gathered on every rank, the objective writes its folder on rank 0)::

    class MyObjective(Objective):
        name, config_class = "mine", MyConfig
        fingerprint_fields = ("unet_preset",)

        def build(self):
            return {"unet": Trained(build_unet(...), lr=self.cfg.learning_rate, ema=True)}

        def loss(self, step, generator, ctx):              # one micro-batch
            x = ...
            return F.mse_loss(self.models["unet"](x, ...).sample, target), {}

        def export(self, models, out):
            MyPipeline(unet=models["unet"], ...).save_pretrained(out)

    train(MyObjective, ["--config", "configs/x.yaml"])     # what train/<method>.py does

Phases of one iteration run in order and share the iteration's generators (one per micro-step, seeded by
``(seed, step, rank, micro)``) and a scratch dict ``ctx``. f-distill's phases are ``Phase("critic", ...)`` every
iteration and ``Phase("student", ..., every=k, freeze=("critic",))``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from .checkpoint import CheckpointManager, Slot
from .config import TrainConfig, config_to_dict, save_config
from .ema import EMA
from .engine import (
    clip_grad_norm,
    describe_engine,
    fsdp_auto_wrap_for,
    is_sharded,
    materialize,
    meta_copy,
    running_engine,
    zero_stage,
)

logger = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int = 0, micro: int = 0) -> int:
    """The seed of ``(seed, step, rank, micro-step)``."""
    return ((seed * 1_000_003 + step) * 1_009 + rank) * 101 + micro


def step_generator(seed: int, step: int, rank: int = 0, micro: int = 0, device="cpu") -> torch.Generator:
    """A generator seeded by ``(seed, step, rank, micro-step)``: data order and noise do not depend on history,
    so a resumed run draws exactly what an uninterrupted one would."""
    g = torch.Generator(device=device)
    g.manual_seed(step_seed(seed, step, rank, micro))
    return g


@dataclasses.dataclass
class Trained:
    """A network the loop trains with its own AdamW (``cfg.adam_beta1/2``, ``cfg.weight_decay``) and LR schedule.

    Args:
        module: the network (not yet prepared); only its parameters with ``requires_grad`` are optimised.
        lr: its peak learning rate.
        ema: keep an EMA of its weights when ``cfg.ema_decay > 0`` (the export then uses the EMA weights).
        save_frozen: save its frozen weights in checkpoints too (False for adapters over a frozen base).
        export: hand it to :meth:`Objective.export` (gathering full weights costs time and memory under sharding).
    """

    module: torch.nn.Module
    lr: float
    ema: bool = False
    save_frozen: bool = True
    export: bool = True


@dataclasses.dataclass
class Phase:
    """One optimizer update of one network inside a training iteration.

    Args:
        model: name of the :class:`Trained` network this phase updates.
        loss: ``loss(step, generator, ctx) -> (scalar loss, logs dict)`` for one micro-batch.
        every: run on iterations ``i`` with ``(i + 1) % every == 0``; the network's LR schedule has
            ``max_train_steps // every`` steps.
        freeze: networks whose trainable parameters stop requiring gradients during this phase.
        name: used in log keys (``loss_<name>``, ``grad_norm_<name>``) when an objective has several phases.
    """

    model: str
    loss: Callable
    every: int = 1
    freeze: tuple[str, ...] = ()
    name: str = ""


class Objective:
    """A method's training maths; subclasses set ``name`` and ``config_class`` and implement :meth:`build`,
    :meth:`loss` (or :meth:`phases`) and :meth:`export`. After :meth:`build` the loop fills ``self.models`` with the
    prepared networks (wrapped by DDP/FSDP2/DeepSpeed: call these in losses)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = TrainConfig
    fingerprint_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, accelerator: Accelerator):
        self.cfg, self.acc = cfg, accelerator
        self.device = accelerator.device
        self.models: dict[str, torch.nn.Module] = {}
        self.resuming = False

    # -- what subclasses implement -----------------------------------------------------------------------------
    def build(self) -> dict[str, Trained]:
        """Build the networks (same initial weights on every rank: the loop seeds torch with ``cfg.seed`` first)."""
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        """The phases of one iteration; default: one phase training the only network with :meth:`loss`."""
        names = list(self.models)
        if len(names) != 1:
            raise NotImplementedError(f"{type(self).__name__} trains {names}: declare its phases")
        return [Phase(names[0], self.loss)]

    def loss(self, step: int, generator: torch.Generator, ctx: dict):
        raise NotImplementedError

    def export(self, models: dict[str, torch.nn.Module], out: Path) -> None:
        """Write the trained networks (plain modules with full, EMA-averaged weights) to ``out``; rank 0 only."""
        raise NotImplementedError

    def describe(self) -> str:
        """One log line about the run (shown once at start)."""
        return ""

    def fingerprint(self) -> dict:
        """Config values a resumed run must share with its checkpoint (besides the objective's name)."""
        return {k: getattr(self.cfg, k) for k in self.fingerprint_fields}

    def checkpoint_files(self, folder: Path | None) -> None:
        """Extra files of a checkpoint; called on every rank, ``folder`` (the temporary one) on rank 0 only."""

    def on_train_start(self, step: int) -> None:
        """After resume, before the first iteration (AlignProp evaluates the base model here)."""

    def on_step_end(self, step: int) -> None:
        """After iteration ``step`` was logged and checkpointed."""

    def on_train_end(self, step: int) -> None:
        """After the last iteration, before the export."""

    # -- helpers ----------------------------------------------------------------------------------------------
    def unwrapped(self, name: str) -> torch.nn.Module:
        """The network ``name`` without its DDP/DeepSpeed wrapper (under FSDP2 the module itself)."""
        return self.acc.unwrap_model(self.models[name])

    def trainable_parameters(self, name: str) -> list[torch.nn.Parameter]:
        return [p for p in self.models[name].parameters() if p.requires_grad]


class TrainLoop:
    """Run ``objective`` for ``cfg.max_train_steps`` iterations.

    Args:
        cfg: the trainer's config (a :class:`TrainConfig` subclass).
        accelerator: from :func:`gen.training.make_accelerator` (engine already checked).
        objective: the method's :class:`Objective`.
    """

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, objective: Objective):
        self.cfg, self.acc, self.objective = cfg, accelerator, objective
        self.out = Path(cfg.output_dir)
        self.engine = running_engine(accelerator)
        self.ckpt = CheckpointManager(self.out, cfg.checkpoints_total_limit)
        self.step = 0
        # 1. the checkpoint to resume, checked against this run before any network is built
        self.resume_path = self.ckpt.resolve(cfg.resume)
        self.resume_state = None
        if self.resume_path is None and cfg.resume:
            logger.warning("--resume %s: no checkpoint in %s; starting a fresh run", cfg.resume, self.ckpt.root)
        if self.resume_path is not None:
            self.resume_state = self.ckpt.read_state(self.resume_path)
            self._check_fingerprint(self.resume_state)
        objective.resuming = self.resume_path is not None
        if self.engine == "deepspeed" and zero_stage(accelerator) == 3 and cfg.ema_decay > 0:
            raise ValueError("ema_decay > 0 under DeepSpeed ZeRO-3: each rank holds parameters of shape (0,) "
                             "outside forward/backward, so the EMA would be empty. Use ZeRO-2 or FSDP2 for EMA, "
                             "or set ema_decay 0")
        # 2. networks, optimizers, schedules, one prepare() per network (FSDP2 takes one model per call)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        trained = objective.build()
        self.trained = trained
        objective.models = {name: t.module for name, t in trained.items()}
        self.phases = objective.phases()
        every = {}
        for ph in self.phases:
            if ph.model not in trained:
                raise ValueError(f"phase {ph.name or ph.model!r} trains {ph.model!r}, which is not one of "
                                 f"{sorted(trained)}")
            if ph.every < 1 or ph.every > cfg.max_train_steps:
                raise ValueError(f"phase {ph.name or ph.model!r} runs every {ph.every} iterations; it must be in "
                                 f"1..max_train_steps={cfg.max_train_steps}")
            every[ph.model] = ph.every
        self.multi_phase = len(self.phases) > 1
        self.blueprints = {n: meta_copy(t.module) for n, t in trained.items()
                           if t.export and is_sharded(accelerator)}
        self.slots: dict[str, Slot] = {}
        self.params: dict[str, list] = {}
        n = accelerator.num_processes
        if self.engine == "deepspeed":
            if len(trained) > 1:
                raise ValueError(f"{objective.name} trains {len(trained)} networks; DeepSpeed runs one engine per "
                                 "process here: use DDP or FSDP2")
            # the batch and clipping DeepSpeed needs from us ("auto" in the shipped configs)
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
            if ds.get("gradient_clipping", "auto") == "auto":
                ds["gradient_clipping"] = cfg.max_grad_norm
        for name, t in trained.items():
            params = [p for p in t.module.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"the network {name!r} has no trainable parameters")
            trainable = {k for k, p in t.module.named_parameters() if p.requires_grad}
            opt = torch.optim.AdamW(params, lr=t.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    weight_decay=cfg.weight_decay)
            k = every.get(name, 1)
            # Accelerate's wrapped scheduler steps once per process per call: lengths are scaled by the world size
            sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps // k * n,
                                  num_training_steps=cfg.max_train_steps // k * n)
            with fsdp_auto_wrap_for(accelerator, t.module):
                model, opt, sched = accelerator.prepare(t.module, opt, sched)
            ema = None
            if t.ema and cfg.ema_decay > 0:
                ema = EMA(accelerator.unwrap_model(model), cfg.ema_decay)
            self.slots[name] = Slot(model, opt, sched, ema, t.save_frozen, trainable)
            self.params[name] = [p for p in model.parameters() if p.requires_grad]
            objective.models[name] = model
        # 3. resume
        if self.resume_path is not None:
            self.ckpt.load(self.resume_path, accelerator, self.slots, self.resume_state,
                           trust_deepspeed=cfg.trust_deepspeed_checkpoint)
            self.step = int(self.resume_state["step"])
            if self.resume_state["world_size"] != n:
                logger.warning("resumed on %d process(es) a checkpoint written by %d: the weights and optimizer "
                               "state reshard, but batches differ from an uninterrupted run", n,
                               self.resume_state["world_size"])
            logger.info("resumed from %s at step %d", self.resume_path, self.step)

    def _fingerprint(self) -> dict:
        return {"objective": self.objective.name, "config": self.objective.fingerprint()}

    def _check_fingerprint(self, state: dict) -> None:
        saved, here = state.get("fingerprint", {}), self._fingerprint()
        where = f"cannot resume from {str(self.resume_path)!r}"
        if saved.get("objective") != here["objective"]:
            raise ValueError(f"{where}: it was written by the {saved.get('objective')!r} objective; this run is "
                             f"{here['objective']!r}")
        there = saved.get("config", {})
        diff = [f"{k}={there.get(k)!r} there, {v!r} here" for k, v in here["config"].items()
                if json.loads(json.dumps(v)) != there.get(k)]
        if diff:
            raise ValueError(f"{where}: it is from another model or setting ({'; '.join(diff)})")

    # ------------------------------------------------------------------------------------------------------------
    def save(self) -> Path:
        return self.ckpt.save(self.acc, self.step, self.slots, {"fingerprint": self._fingerprint()},
                              extra_files=self.objective.checkpoint_files, deepspeed=self.engine == "deepspeed")

    def _trim_logs(self) -> None:
        """Keep only the log records of steps up to the one this run starts from (a killed run's later records
        are redone, identically)."""
        path = self.out / "logs.jsonl"
        if not (self.acc.is_main_process and path.is_file()):
            return
        lines = path.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        if len(keep) != len(lines):
            logger.info("logs.jsonl: %d record(s) after step %d dropped (they are redone)", len(lines) - len(keep),
                        self.step)
            from .checkpoint import atomic_write_text

            atomic_write_text(path, "".join(x + "\n" for x in keep))

    def _log(self, record: dict) -> None:
        if self.acc.is_main_process:
            with open(self.out / "logs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.cfg.report_to != "none":
            self.acc.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def _update(self, phase: Phase, gens: list, ctx: dict, logs: dict) -> None:
        """One optimizer update of ``phase.model`` over the accumulated micro-batches; adds to ``logs``."""
        cfg, acc = self.cfg, self.acc
        slot = self.slots[phase.model]
        model, opt, sched = slot.model, slot.optimizer, slot.scheduler
        tag = f"_{phase.name or phase.model}" if self.multi_phase else ""
        frozen = [p for name in phase.freeze for p in self.params[name]]
        for p in frozen:
            p.requires_grad_(False)
        sums: dict = {}
        try:
            for gen in gens:
                with acc.accumulate(model):
                    loss, extra = phase.loss(self.step, gen, ctx)
                    if not torch.isfinite(loss):
                        who = f"{phase.name or phase.model} " if self.multi_phase else ""
                        raise FloatingPointError(
                            f"{who}loss is {loss.item()} at step {self.step}; nothing was saved over the last "
                            f"checkpoint in {self.ckpt.root} (lower the learning rate or check the data)")
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0 and self.engine != "deepspeed":
                        acc.unscale_gradients(optimizer=opt)
                        extra = {**extra, "grad_norm": clip_grad_norm(self.params[phase.model], cfg.max_grad_norm)}
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                for k, v in {"loss": loss.detach(), **extra}.items():
                    sums[k] = sums.get(k, 0.0) + (float(v) if torch.is_tensor(v) else v)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        if slot.ema is not None:
            slot.ema.update(acc.unwrap_model(model))
        for k, v in sums.items():
            key = f"{k}{tag}" if k in ("loss", "grad_norm") else k
            logs[key] = v / len(gens) if k != "grad_norm" else v
        if self.engine == "deepspeed" and cfg.max_grad_norm > 0:
            norm = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
            if norm is not None:
                logs[f"grad_norm{tag}"] = float(norm)

    # ------------------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Train until ``cfg.max_train_steps``, then export."""
        cfg, acc, obj = self.cfg, self.acc, self.objective
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            logger.info("%s on %s; %s", obj.name, describe_engine(acc), obj.describe() or ", ".join(
                f"{name}: {sum(p.numel() for p in ps) / 1e6:.2f}M trainable" for name, ps in self.params.items()))
        self._trim_logs()
        if cfg.report_to != "none":
            acc.init_trackers(obj.name or "gen", config={k: v for k, v in config_to_dict(cfg).items()
                                                         if isinstance(v, (int, float, str, bool))})
        obj.on_train_start(self.step)
        for m in self.slots.values():
            m.model.train()
        bar = tqdm(total=cfg.max_train_steps, initial=self.step, disable=not acc.is_local_main_process,
                   desc=obj.name or "train")
        t0 = time.time()
        while self.step < cfg.max_train_steps:
            # the global RNG too (dropout, anything drawing without a generator) restarts from (seed, step, rank)
            torch.manual_seed(step_seed(cfg.seed, self.step, acc.process_index, 100))
            gens = [step_generator(cfg.seed, self.step, acc.process_index, micro)
                    for micro in range(cfg.gradient_accumulation_steps)]
            ctx, logs = {}, {}
            for phase in self.phases:
                if (self.step + 1) % phase.every == 0:
                    self._update(phase, gens, ctx, logs)
            self.step += 1
            bar.update(1)
            if logs:
                first = next(iter(logs))
                bar.set_postfix({first: f"{logs[first]:.4f}"})
            if self.step % cfg.log_every == 0 or self.step == cfg.max_train_steps:
                self._log({"step": self.step, "lr": self.slots[self.phases[0].model].scheduler.get_last_lr()[0],
                           "elapsed_s": round(time.time() - t0, 2), **logs})
            if self.step % cfg.checkpointing_steps == 0 or self.step == cfg.max_train_steps:
                self.save()
            obj.on_step_end(self.step)
        bar.close()
        obj.on_train_end(self.step)
        self.export()
        acc.end_training()

    def final_models(self) -> dict[str, torch.nn.Module]:
        """Plain modules with full weights (EMA-averaged where there is an EMA) of the networks to export; on rank 0
        (empty elsewhere). Every rank calls it: gathering sharded weights is collective."""
        acc, out = self.acc, {}
        for name, t in self.trained.items():
            if not t.export:
                continue
            slot = self.slots[name]
            if name in self.blueprints:  # FSDP2 / ZeRO-3: gather, then fill a plain copy on rank 0
                state = acc.get_state_dict(slot.model)
                ema = slot.ema.full_shadow() if slot.ema is not None else None
                if acc.is_main_process:
                    model = materialize(self.blueprints[name], state, live=acc.unwrap_model(slot.model))
                    if ema is not None:
                        sd = model.state_dict()
                        with torch.no_grad():
                            for k, v in ema.items():
                                sd[k].copy_(v.to(sd[k].dtype))
                    out[name] = model
            elif acc.is_main_process:
                model = acc.unwrap_model(slot.model)
                if slot.ema is not None:
                    slot.ema.copy_to(model)
                out[name] = model
        return out

    def export(self) -> None:
        self.acc.wait_for_everyone()
        t0 = time.time()
        models = self.final_models()
        if self.acc.is_main_process:
            self.objective.export(models, self.out)
            logger.info("saved to %s (%.1f s)", self.out, time.time() - t0)
        self.acc.wait_for_everyone()
