"""f-distill benchmarks of issue 15 (``eval/bench_fdistill.py``): network passes and iteration time, copies of the
network held in memory, peak memory.

1. ``passes``: the f-distill iteration of the one training loop (``configs/fdistill_digits.yaml``: the digits
   teacher, batch 64, a student step every 2nd iteration) against a bare PyTorch loop written out here
   (:class:`BareFDistill`) that does only the passes the algorithm needs, with the same initial weights, the same
   seeded draws, AdamW, clipping and EMA, interleaved iteration by iteration:

   - one student forward per iteration (with its graph on student iterations), its detached output to the critic;
   - critic: the fake score in full on the generated half (DSM), only up to its mid block on the real half (the
     discriminator reads mid-block features), the head on both;
   - student: the teacher without gradient, the fake score with gradient up to its mid block (the GAN term's path
     to ``x_t``) and without a graph after it.

   The bare loop runs the UNet's encoder and decoder by hand (:func:`unet_encode`, :func:`unet_decode`), so it
   checks the loop's early stop and graph cut too. Target: loop time within 5 % of the bare loop, losses equal
   (1e-7). A third loop in the interleaving, ``legacy``, does the passes the f-distill objective made before issue 15
   (a second student forward with gradient in the student step, the full fake score on the real half, a graph for
   the fake score's whole forward in the student step): the work that was surplus.
2. ``copies``: how many full-network copies a run holds (parameters, buffers, optimizer states and EMA shadows,
   counted by distinct storage, over the teacher's parameter bytes) with LoRA over one shared base, over separate
   copies, and with full fine-tuning, on the digits config (LoRA rank 4 on the attention projections).
3. ``memory``: peak RSS of a process running f-distill on tiny Stable Diffusion components (the UNet widened so that
   a copy weighs tens of MB) for each layout, each in a fresh process, and of one that only loads the teacher and
   runs it (the floor).

Writes ``<out>/bench_fdistill.json`` and ``<out>/rows.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gen.evaluation import REPO_ROOT, option, output_path

logger = logging.getLogger("gen.evaluation.bench_fdistill")
SECTIONS = ("passes", "copies", "memory")
LAYOUTS = ("shared", "separate", "full")


@dataclasses.dataclass
class BenchFDistillSettings:
    out: str = option("outputs/bench_fdistill", "output folder")
    only: list[str] = option(list(SECTIONS), "sections to run", choices=SECTIONS)
    config: str = option("configs/fdistill_digits.yaml", "f-distill config of the passes and copies sections")
    teacher: str = option("checkpoints/digits-teacher", "teacher of the passes and copies sections")
    iterations: int = option(40, "timed iterations of each loop (after 4 warm-up iterations)")
    batch: int = option(64, "batch of the passes section")
    legacy: bool = option(True, "also time the pre-issue-15 pass structure")
    lora_rank: int = option(4, "LoRA rank of the copies and memory sections")
    lora_targets: str = option("to_q,to_k,to_v,to_out.0", "LoRA targets of the copies section")
    memory_steps: int = option(6, "iterations of each memory run")
    memory_width: int = option(192, "first-stage channels of the widened tiny-SD UNet (memory section)")
    threads: int = option(1, "torch threads")
    update_shipped: bool = option(False, "allow --out inside eval/results/ (the shipped results)")


# ---------------------------------------------------------------------------------------------------------------
# the UNet by hand
def unet_encode(unet, x, t, class_labels=None):
    """``UNet2DModel`` up to and including its mid block, written out: ``(h, down residuals, embedding)``."""
    if unet.config.center_input_sample or unet.config.time_embedding_type != "positional":
        raise ValueError("unet_encode covers positional-embedding UNets without input centring")
    emb = unet.time_embedding(unet.time_proj(t.expand(x.shape[0])).to(x.dtype))
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(class_labels).to(x.dtype)
    h = unet.conv_in(x)
    res = (h,)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            raise ValueError("unet_encode covers UNets without skip blocks")
        h, more = block(hidden_states=h, temb=emb)
        res += more
    return unet.mid_block(h, emb), res, emb


def unet_decode(unet, h, res, emb):
    """The rest of ``UNet2DModel.forward`` after :func:`unet_encode`."""
    for block in unet.up_blocks:
        n = len(block.resnets)
        h = block(h, res[-n:], emb)
        res = res[:-n]
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


# ---------------------------------------------------------------------------------------------------------------
class BareFDistill:
    """f-distill iterations written out with plain PyTorch, for a class-conditional ``UNet2DModel`` VP teacher with
    epsilon prediction and the head on the fake score's mid block (``configs/fdistill_digits.yaml``).

    Built from a prepared (single-process) f-distill objective, whose networks it copies before any training: the
    same initial weights. ``iteration(step)`` draws exactly what the loop's iteration ``step`` draws.

    Args:
        objective: the :class:`gen.distill.training.FDistillObjective` (its ``build`` has run).
        cfg: its config.
        legacy: do the passes of the objective before issue 15 (see the module docstring); its losses then differ.
    """

    def __init__(self, objective, cfg, legacy: bool = False):
        if cfg.disc_features != "fake" or cfg.lora_rank or cfg.teacher_guidance_scale != 1.0:
            raise ValueError("the bare loop covers disc_features=fake, full fine-tuning and no teacher CFG")
        critic = objective.unwrapped("critic")
        self.cfg, self.legacy = cfg, legacy
        self.teacher = objective.teacher
        self.student = copy.deepcopy(objective.unwrapped("student"))
        self.fake, self.head = copy.deepcopy(critic.fake_score), copy.deepcopy(critic.head)
        self.bins = copy.deepcopy(critic.ratio_bins)
        for net in (self.student, self.fake, self.head):  # no feature taps on the copies
            for m in net.modules():
                m._forward_hooks.clear()
                m._forward_pre_hooks.clear()
        self.data, self.classes, self.shape = objective.dataset, objective.classes, objective.shape
        abar = objective.sched.alphas_cumprod.to(torch.float64)
        self.alpha, self.sigma = abar.sqrt().float(), (1 - abar).sqrt().float()
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        self.s_params = [p for p in self.student.parameters() if p.requires_grad]
        self.c_params = [p for p in [*self.fake.parameters(), *self.head.parameters()] if p.requires_grad]
        self.opt_s = torch.optim.AdamW(self.s_params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay)
        self.opt_c = torch.optim.AdamW(self.c_params, lr=cfg.critic_learning_rate or cfg.learning_rate, betas=betas,
                                       weight_decay=cfg.weight_decay)
        self.ema = {k: v.detach().clone().float() for k, v in self.student.state_dict().items()
                    if v.is_floating_point()}
        self.ema_updates = 0

    def _ab(self, t, like):
        shape = (-1,) + (1,) * (like.ndim - 1)
        return self.alpha[t].reshape(shape), self.sigma[t].reshape(shape)

    def _step(self, params, opt, loss) -> float:
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm) if self.cfg.max_grad_norm > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else float("nan")

    def _generate(self, z, labels):
        tg = torch.full((z.shape[0],), self.cfg.generator_timestep, dtype=torch.long)
        a, s = self._ab(tg, z)
        return (z - s * self.student(z, tg, class_labels=labels).sample) / a

    def iteration(self, step: int) -> dict:
        """One iteration; returns its losses and gradient norms under the loop's log keys."""
        from gen.distill.fdistill import (
            density_ratio,
            discriminator_loss,
            fdistill_weights,
            gan_generator_loss,
            vsd_loss,
        )
        from gen.training.loop import step_generator, step_seed

        cfg, b = self.cfg, self.cfg.train_batch_size
        torch.manual_seed(step_seed(cfg.seed, step, 0, 100))
        g = step_generator(cfg.seed, step, 0, 0)
        student_step = (step + 1) % cfg.student_update_freq == 0
        # 1. the one student forward (with its graph when the student steps)
        labels = torch.randint(0, self.classes, (b,), generator=g)
        z = torch.randn((b, *self.shape), generator=g)
        with torch.set_grad_enabled(student_step and not self.legacy):
            x_gen = self._generate(z, labels)
        idx = torch.randint(0, len(self.data["images"]), (b,), generator=g)
        x_real, y_real = self.data["images"][idx], self.data["class_labels"][idx].long()
        # 2. critic: DSM on the generated half, the discriminator on both halves
        t_g = torch.randint(cfg.t_min, cfg.t_max + 1, (b,), generator=g)
        eps_g = torch.randn(x_gen.shape, generator=g)
        t_r = torch.randint(cfg.t_min, cfg.t_max + 1, (b,), generator=g)
        eps_r = torch.randn(x_real.shape, generator=g)
        xg = x_gen.detach()
        a, s = self._ab(t_g, xg)
        xt_g = a * xg + s * eps_g
        a, s = self._ab(t_r, x_real)
        xt_r = a * x_real + s * eps_r
        if self.legacy:  # the full fake score on both halves at once
            h_all, res, emb = unet_encode(self.fake, torch.cat([xt_g, xt_r]), torch.cat([t_g, t_r]),
                                          torch.cat([labels, y_real]))
            pred_g = unet_decode(self.fake, h_all, res, emb)[:b]
        else:
            h_g, res, emb = unet_encode(self.fake, xt_g, t_g, labels)
            pred_g = unet_decode(self.fake, h_g, res, emb)
            h_all = torch.cat([h_g, unet_encode(self.fake, xt_r, t_r, y_real)[0]])
        logits = self.head(h_all, torch.cat([labels, y_real]))
        loss_dsm = F.mse_loss(pred_g.float(), eps_g.float())
        loss_d = discriminator_loss(logits[b:], logits[:b])
        loss_c = loss_dsm + loss_d
        logs = {"loss_critic": float(loss_c.detach()), "loss_dsm": float(loss_dsm.detach()),
                "loss_d": float(loss_d.detach())}
        logs["grad_norm_critic"] = self._step(self.c_params, self.opt_c, loss_c)
        if not student_step:
            return logs
        # 3. student, critic frozen
        for p in self.c_params:
            p.requires_grad_(False)
        try:
            if self.legacy:  # a fresh student forward with gradient
                z = torch.randn((b, *self.shape), generator=g)
                x_gen = self._generate(z, labels)
            t = torch.randint(cfg.t_min, cfg.t_max + 1, (b,), generator=g)
            eps = torch.randn(x_gen.shape, generator=g)
            a, s = self._ab(t, x_gen)
            x_t = a * x_gen + s * eps
            with torch.no_grad():
                x0_teacher = (x_t.float() - s * self.teacher(x_t, t, class_labels=labels).sample.float()) / a
            h, res, emb = unet_encode(self.fake, x_t, t, labels)
            if self.legacy:  # a graph through the whole fake score
                fake_eps = unet_decode(self.fake, h, res, emb)
            else:
                with torch.no_grad():
                    fake_eps = unet_decode(self.fake, h, res, emb)
            logits = self.head(h, labels)
            x0_fake = (x_t.detach().float() - s * fake_eps.detach().float()) / a
            r = density_ratio(logits, cfg.logit_clamp, cfg.ratio_min, cfg.ratio_max)
            weights = fdistill_weights(self.bins.normalize(r, t), cfg.divergence, cfg.normalize_h)
            loss_dm, _ = vsd_loss(x_gen, x0_teacher, x0_fake, weights, cfg.dmd_normalizer)
            loss_gan = gan_generator_loss(logits)
            loss = loss_dm + cfg.gan_loss_weight * loss_gan if cfg.gan_loss_weight > 0 else loss_dm
            logs.update({"loss_student": float(loss.detach()), "loss_dm": float(loss_dm), "loss_gan": float(loss_gan)})
            logs["grad_norm_student"] = self._step(self.s_params, self.opt_s, loss)
        finally:
            for p in self.c_params:
                p.requires_grad_(True)
        # EMA of the student, as the loop's (warm-up decay)
        d = min(cfg.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        with torch.no_grad():
            for k, v in self.student.state_dict().items():
                if k in self.ema:
                    self.ema[k].lerp_(v.float(), 1 - d)
        self.ema_updates += 1
        return logs


LOSS_KEYS = ("loss_critic", "loss_dsm", "loss_d", "loss_student", "loss_dm", "loss_gan", "grad_norm_critic",
             "grad_norm_student")


def run_loop_and_bare(argv: list[str], iterations: int, warmup: int = 4, legacy: bool = False) -> dict:
    """Train ``iterations + warmup`` iterations with the loop and, interleaved after each, one bare iteration (and
    one legacy iteration); returns per-iteration times and losses of each."""
    from gen.distill.training import FDistillObjective
    from gen.training import TrainLoop, make_accelerator, parse_config

    cfg = parse_config(FDistillObjective.config_class, argv)
    times = {"loop": [], "bare": [], "legacy": []}
    losses = {"loop": [], "bare": [], "legacy": []}
    student_its = []

    class Timed(FDistillObjective):
        def build(self):
            trained = super().build()
            self.models = {n: t.module for n, t in trained.items()}  # unwrapped() works before prepare
            self.bare = BareFDistill(self, cfg)
            self.old = BareFDistill(self, cfg, legacy=True) if legacy else None
            self.logs = {}
            return trained

        def critic_loss(self, step, g, ctx):
            loss, logs = super().critic_loss(step, g, ctx)
            self.logs = {"loss_critic": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}
            return loss, logs

        def student_loss(self, step, g, ctx):
            loss, logs = super().student_loss(step, g, ctx)
            self.logs.update({"loss_student": float(loss.detach()), **{k: float(v) for k, v in logs.items()}})
            return loss, logs

        def on_train_start(self, step):
            super().on_train_start(step)
            self.last = time.perf_counter()

        def on_step_end(self, step):
            if step == cfg.max_train_steps:  # the last iteration also writes the final checkpoint: not timed
                return
            loop_s = time.perf_counter() - self.last
            it = step - 1
            t0 = time.perf_counter()
            bare = self.bare.iteration(it)
            bare_s = time.perf_counter() - t0
            old_s = None
            if self.old is not None:
                t0 = time.perf_counter()
                old = self.old.iteration(it)
                old_s = time.perf_counter() - t0
            if it >= warmup:
                times["loop"].append(loop_s)
                times["bare"].append(bare_s)
                if old_s is not None:
                    times["legacy"].append(old_s)
                    losses["legacy"].append(old)
                losses["loop"].append({k: v for k, v in self.logs.items() if k in LOSS_KEYS})
                losses["bare"].append({k: v for k, v in bare.items() if k in LOSS_KEYS})
                student_its.append((it + 1) % cfg.student_update_freq == 0)
            self.last = time.perf_counter()

        def export(self, models, out):
            pass

    class TimedLoop(TrainLoop):
        def _update(self, phase, gens, ctx, logs):  # the loop's gradient norms, for the comparison
            super()._update(phase, gens, ctx, logs)
            self.objective.logs.update({k: v for k, v in logs.items() if k.startswith("grad_norm_")})

    acc = make_accelerator(cfg)
    loop = TimedLoop(cfg, acc, Timed(cfg, acc))
    loop.run()
    return {"times": times, "losses": losses, "student_iterations": student_its,
            "logged": [{k: r[k] for k in LOSS_KEYS if k in r} for r in losses["loop"]]}


def max_loss_difference(a: list[dict], b: list[dict]) -> float:
    """The largest relative difference ``|x - y| / max(|y|, 1)`` over every logged value of paired iterations."""
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        if set(ra) != set(rb):
            raise ValueError(f"different log keys: {sorted(ra)} vs {sorted(rb)}")
        for k in ra:
            worst = max(worst, abs(ra[k] - rb[k]) / max(abs(rb[k]), 1.0))
    return worst


def _summary(times: list[float], base: list[float], mask: list[bool] | None = None) -> dict:
    pairs = [(x, y) for i, (x, y) in enumerate(zip(times, base)) if mask is None or mask[i]]
    if not pairs:
        return {}
    ratios = [x / y for x, y in pairs]
    return {"n": len(pairs), "median_s": statistics.median(x for x, _ in pairs),
            "base_median_s": statistics.median(y for _, y in pairs),
            "ratio_of_sums": sum(x for x, _ in pairs) / sum(y for _, y in pairs),
            "median_paired_ratio": statistics.median(ratios),
            "paired_ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else None}


def run_passes(settings) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-fdistill-"))
    n = settings.iterations + 4
    argv = ["--config", str(REPO_ROOT / settings.config), "--teacher", str(REPO_ROOT / settings.teacher),
            "--output_dir", str(out / "run"), "--max_train_steps", str(n + 1), "--train_batch_size",
            str(settings.batch), "--checkpointing_steps", str(100 * n), "--log_every", str(100 * n)]
    res = run_loop_and_bare(argv, settings.iterations, legacy=settings.legacy)
    t, stud = res["times"], res["student_iterations"]
    out_res = {"config": settings.config, "batch": settings.batch, "iterations": len(t["loop"]),
               "max_rel_loss_difference_loop_vs_bare": max_loss_difference(res["losses"]["loop"],
                                                                            res["losses"]["bare"]),
               "loop_vs_bare": _summary(t["loop"], t["bare"]),
               "loop_vs_bare_critic_only": _summary(t["loop"], t["bare"], [not s for s in stud]),
               "loop_vs_bare_student": _summary(t["loop"], t["bare"], stud)}
    if t["legacy"]:
        out_res["legacy_vs_bare"] = _summary(t["legacy"], t["bare"])
        out_res["legacy_vs_bare_critic_only"] = _summary(t["legacy"], t["bare"], [not s for s in stud])
        out_res["legacy_vs_bare_student"] = _summary(t["legacy"], t["bare"], stud)
    logger.info("passes: %s", json.dumps(out_res))
    return out_res


# ---------------------------------------------------------------------------------------------------------------
# 2. copies
def count_copies(loop) -> dict:
    """Bytes held by a built (and stepped) f-distill run, by distinct storage, in units of the teacher's parameter
    bytes: parameters and buffers of the teacher and of every trained network, optimizer states, EMA shadows."""
    obj = loop.objective
    seen: dict = {}
    parts: dict = {}

    def add(part, t):
        if torch.is_tensor(t) and t.numel():
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen[key] = t.untyped_storage().nbytes()
                parts[part] = parts.get(part, 0) + seen[key]

    from gen.sampling.adapters import unwrap_network

    def tensors(net, frozen_only=False):
        named = [*net.named_parameters(), *net.named_buffers()]
        return [t for n, t in named if not (frozen_only and "lora_" in n)]

    teacher = unwrap_network(obj.teacher)
    for t in tensors(teacher, frozen_only=True):
        add("teacher" + (" (the shared base)" if loop.cfg.lora_rank and loop.cfg.lora_shared_base else ""), t)
    for name, slot in loop.slots.items():
        for t in tensors(obj.unwrapped(name)):
            add(f"{name} trained weights", t)
        net = obj.unwrapped(name) if name == "student" else obj.unwrapped(name).fake_score
        for t in tensors(unwrap_network(net), frozen_only=True):
            add(f"{name} frozen base copy", t)
        for state in slot.optimizer.state.values():
            for v in state.values():
                add(f"{name} optimizer", v)
        if slot.ema is not None:
            for v in slot.ema.shadow.values():
                add(f"{name} EMA", v)
    unit = sum(p.numel() * p.element_size() for n, p in teacher.named_parameters() if "lora_" not in n)
    return {"copies": sum(seen.values()) / unit, "parts": {k: v / unit for k, v in parts.items()},
            "teacher_mb": unit / 2**20}


def run_copies(settings) -> dict:
    from gen.training import TrainLoop, make_accelerator, objective_class, parse_config

    rows = {}
    for layout in LAYOUTS:
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["--config", str(REPO_ROOT / settings.config), "--teacher", str(REPO_ROOT / settings.teacher),
                    "--output_dir", tmp, "--max_train_steps", "2", "--student_update_freq", "2",
                    "--checkpointing_steps", "2", "--train_batch_size", "4", "--log_every", "100"]
            if layout != "full":
                argv += ["--lora_rank", str(settings.lora_rank), "--lora_shared_base", str(layout == "shared"),
                         "--lora_targets", settings.lora_targets]
            cls = objective_class("fdistill")
            cfg = parse_config(cls.config_class, argv)
            acc = make_accelerator(cfg)
            loop = TrainLoop(cfg, acc, cls(cfg, acc))
            loop.run()  # two iterations: every optimizer has its state
            rows[layout] = count_copies(loop)
            logger.info("copies %s: %.3f", layout, rows[layout]["copies"])
    return {"config": settings.config, "lora_rank": settings.lora_rank, "lora_targets": settings.lora_targets,
            "rows": rows}


# ---------------------------------------------------------------------------------------------------------------
# 3. memory
def _memory_assets(folder: Path, width: int) -> dict:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from PIL import Image

    from gen.models.tiny_sd import build_tiny_sd

    parts = build_tiny_sd()
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(width, 2 * width), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    sd = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sd.save_pretrained(folder / "sd")
    side = sd.unet.config.sample_size * sd.vae_scale_factor
    (folder / "imgs").mkdir(exist_ok=True)
    for i in range(8):
        Image.new("RGB", (side, side), (20 * i, 40, 200 - 10 * i)).save(folder / "imgs" / f"{i}.png")
    (folder / "prompts.txt").write_text("a photo of a cat\na dog\n")
    return {"teacher": str(folder / "sd"), "data_dir": str(folder / "imgs"), "prompts": str(folder / "prompts.txt"),
            "unet_params": sum(p.numel() for p in sd.unet.parameters())}


def memory_worker(spec: dict) -> dict:
    """One memory run (in its own process): ``layout`` in LAYOUTS trains; ``floor`` loads the teacher and runs it."""
    torch.set_num_threads(1)
    if spec["layout"] == "floor":
        from pipelines import GuidedStableDiffusionPipeline

        pipe = GuidedStableDiffusionPipeline.from_pretrained(spec["teacher"], safety_checker=None,
                                                             requires_safety_checker=False)
        with torch.no_grad():
            x = torch.randn(4, 4, 8, 8)
            pipe.unet(x, torch.full((4,), 500), encoder_hidden_states=torch.zeros(4, 16, 32))
    else:
        from gen.training import train

        argv = ["--config", str(REPO_ROOT / "configs/fdistill_sd15.yaml"), "--teacher", spec["teacher"],
                "--data_dir", spec["data_dir"], "--prompts_file", spec["prompts"], "--resolution", "16",
                "--output_dir", spec["out"], "--max_train_steps", str(spec["steps"]), "--student_update_freq", "2",
                "--train_batch_size", "4", "--checkpointing_steps", str(10 * spec["steps"]), "--log_every", "100",
                "--mixed_precision", "no", "--disc_hidden", "32", "--lora_targets", "to_q,to_k,to_v,to_out.0"]
        if spec["layout"] != "full":
            argv += ["--lora_rank", str(spec["lora_rank"]), "--lora_shared_base", str(spec["layout"] == "shared")]
        train("fdistill", argv)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_memory(settings) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        assets = _memory_assets(Path(tmp), settings.memory_width)
        for layout in ("floor", *LAYOUTS):
            spec = {**assets, "layout": layout, "out": str(Path(tmp) / f"run-{layout}"),
                    "steps": settings.memory_steps, "lora_rank": settings.lora_rank}
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
            proc = subprocess.run([sys.executable, "-m", "gen.evaluation.bench_fdistill", "--memory_worker",
                                   json.dumps(spec)], capture_output=True, text=True, env=env, cwd=REPO_ROOT)
            if proc.returncode:
                raise RuntimeError(f"memory run {layout} failed:\n{proc.stderr[-3000:]}")
            rows[layout] = json.loads(proc.stdout.strip().splitlines()[-1])
            logger.info("memory %s: %s", layout, rows[layout])
    floor = rows["floor"]["peak_rss_mb"]
    for r in rows.values():
        r["above_floor_mb"] = r["peak_rss_mb"] - floor
    mb = assets["unet_params"] * 4 / 2**20
    return {"unet_params": assets["unet_params"], "unet_mb": mb, "lora_rank": settings.lora_rank,
            "steps": settings.memory_steps, "rows": rows}


# ---------------------------------------------------------------------------------------------------------------
def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"CPU box: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} (load average {load})"


def markdown(results: dict) -> str:
    lines = [f"Command: `{results.get('command', '')}` ({results['date']}, {results['machine']})", ""]
    p = results.get("passes")
    if p:
        lines += ["| loop | iterations | median s / iteration | x bare (ratio of sums) | x bare (median paired) | "
                  "critic-only iterations | student iterations |", "|---|---|---|---|---|---|---|"]
        for name, key in (("one loop (gen.training + FDistill)", "loop_vs_bare"),
                          ("legacy passes (before issue 15)", "legacy_vs_bare")):
            s = p.get(key)
            if s:
                lines.append(f"| {name} | {s['n']} | {s['median_s']:.3f} | {s['ratio_of_sums']:.3f} | "
                             f"{s['median_paired_ratio']:.3f} | {p[key + '_critic_only']['ratio_of_sums']:.3f} | "
                             f"{p[key + '_student']['ratio_of_sums']:.3f} |")
        s = p["loop_vs_bare"]
        lines += [f"| bare loop (only the needed passes) | {s['n']} | {s['base_median_s']:.3f} | 1 | 1 | 1 | 1 |", "",
                  f"Largest relative loss difference, loop vs bare, over {p['iterations']} iterations: "
                  f"{p['max_rel_loss_difference_loop_vs_bare']:.2e}.", ""]
    c = results.get("copies")
    if c:
        lines += ["| layout | full-network copies held | of which |", "|---|---|---|"]
        for layout, r in c["rows"].items():
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r["parts"].items())
            lines.append(f"| {layout} | {r['copies']:.2f} | {parts} |")
        lines.append("")
    m = results.get("memory")
    if m:
        lines += ["| layout | peak RSS (MB) | above the floor (MB) |", "|---|---|---|"]
        for layout, r in m["rows"].items():
            lines.append(f"| {layout} | {r['peak_rss_mb']:.0f} | {r['above_floor_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def run(settings: BenchFDistillSettings, command: str = "") -> dict:
    torch.set_num_threads(settings.threads)
    out = output_path(settings.out, settings.update_shipped)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_fdistill.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update({"date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command})
    if "copies" in settings.only:
        results["copies"] = run_copies(settings)
    if "memory" in settings.only:
        results["memory"] = run_memory(settings)
    if "passes" in settings.only:
        results["passes"] = run_passes(settings)
    path.write_text(json.dumps(results, indent=1))
    (out / "rows.md").write_text(markdown(results))
    return results


if __name__ == "__main__":  # the memory runs' worker processes
    if len(sys.argv) == 3 and sys.argv[1] == "--memory_worker":
        print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
