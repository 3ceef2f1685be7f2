"""Distil a diffusion teacher into a one-step generator with f-distill (Xu, Nie & Vahdat 2025) and save it.

    accelerate launch train/fdistill.py --config configs/fdistill_digits.yaml [--key value ...]
    accelerate launch --multi_gpu --num_processes 2 train/fdistill.py --config configs/fdistill_digits.yaml \
        --divergence js --max_train_steps 10 --output_dir OUT

Each iteration is one critic step (the fake-score network learns the student's noised distribution by denoising
score matching; the discriminator head learns ``log p_t / q_t`` with the non-saturating GAN loss) and, every
``student_update_freq`` iterations, one student step (the f-weighted distribution-matching gradient plus
``gan_loss_weight`` times the generator's GAN loss). ``max_train_steps`` counts iterations (critic steps).

Teachers: a ``ClassConditionalPipeline`` folder (pixel UNet, e.g. ``checkpoints/digits-teacher``), a Stable
Diffusion folder or hub id (text-to-image, latent; prompts from ``prompts_file``, real images from ``data_dir``),
or ``toy:<8gaussians|25gaussians>`` (an exact 2-D mixture score; the fake score is fitted to it first).
Output: a ``OneStepPipeline`` folder (pixel or SD teacher) or, for toys, ``generator/`` (a ``TimeMLP``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from gen.distill import (  # noqa: E402
    Critic,
    DiscriminatorHead,
    FDistill,
    FDistillSettings,
    FeatureTap,
    RatioBins,
    call_net,
    get_divergence,
    one_step_generate,
)
from gen.training import EMA, CheckpointManager, TrainConfig, make_accelerator, parse_config, step_generator  # noqa: E402
from gen.training.config import _choice, save_config  # noqa: E402

logger = logging.getLogger("train.fdistill")
TOY_PREFIX = "toy:"


@dataclasses.dataclass
class FDistillTrainConfig(TrainConfig):
    teacher: str = dataclasses.field(default="checkpoints/digits-teacher",
                                     metadata={"help": "pipeline folder / hub id, or toy:<8gaussians|25gaussians>"})
    dataset: str = dataclasses.field(default="digits16",
                                     metadata={"help": "real data for the discriminator: digits16 | folder | toy"})
    data_dir: str | None = dataclasses.field(default=None, metadata={"help": "image folder (dataset=folder)"})
    resolution: int | None = dataclasses.field(default=None, metadata={"help": "image side (folder); None: teacher's"})
    channels: int | None = dataclasses.field(default=None, metadata={"help": "1 or 3 (folder); None: teacher's"})
    prompts_file: str | None = dataclasses.field(default=None,
                                                 metadata={"help": "text teacher: one prompt per line"})
    student_init: str | None = dataclasses.field(
        default=None, metadata={"help": "pipeline folder to initialise the student from (default: the teacher)"})
    # f-distill
    divergence: str = dataclasses.field(default="js", metadata={"help": "rkl | kl | js | sh | sf | neyman | "
                                                                        "pearson | jf | alpha:<a>"})
    logit_clamp: float = 10.0
    ratio_min: float = dataclasses.field(default=0.1, metadata={"help": "lower clip of r = exp(logit)"})
    ratio_max: float = dataclasses.field(default=20.0, metadata={"help": "upper clip of r"})
    num_ratio_bins: int = dataclasses.field(default=10, metadata={"help": "time bins of the running mean of r"})
    ratio_ema_rate: float = dataclasses.field(default=0.0, metadata={"help": "EMA rate of the per-bin mean of r"})
    normalize_h: bool = dataclasses.field(default=True, metadata={"help": "divide h by its batch mean"})
    dmd_normalizer: bool = dataclasses.field(default=True, metadata={"help": "DMD's 1 / mean|x - x0_teacher|"})
    gan_loss_weight: float = dataclasses.field(default=1e-3, metadata={"help": "generator GAN loss weight"})
    t_min: int = dataclasses.field(default=20, metadata={"help": "smallest training timestep"})
    t_max: int = dataclasses.field(default=980, metadata={"help": "largest training timestep"})
    teacher_guidance_scale: float = dataclasses.field(default=1.0, metadata={"help": "CFG on the teacher (1: off)"})
    disc_features: str = dataclasses.field(default="fake", metadata={"help": "fake | teacher"})
    disc_hidden: int = 128
    generator_timestep: int = dataclasses.field(default=950, metadata={"help": "the student's input timestep"})
    generator_prediction: str = dataclasses.field(
        default="scheduler", metadata={"help": "read the student's output as: scheduler | sample | epsilon | ..."})
    student_update_freq: int = dataclasses.field(default=5, metadata={"help": "critic steps per student step"})
    critic_learning_rate: float | None = dataclasses.field(default=None,
                                                           metadata={"help": "None: learning_rate"})
    # LoRA (student and fake score), to cut memory on large teachers
    lora_rank: int = dataclasses.field(default=0, metadata={"help": "0: train all weights"})
    lora_alpha: float | None = dataclasses.field(default=None, metadata={"help": "None: lora_rank"})
    lora_targets: str = dataclasses.field(default="to_q,to_k,to_v,to_out.0",
                                          metadata={"help": "comma-separated module names"})
    # toys
    toy_std: float | None = dataclasses.field(default=None, metadata={"help": "component std (None: the toy's)"})
    toy_hidden: int = 128
    toy_depth: int = 3
    fake_init_steps: int = dataclasses.field(default=500, metadata={"help": "toy: DSM steps fitting the fake to p"})
    beta_schedule: str = dataclasses.field(default="squaredcos_cap_v2", metadata={"help": "toy teacher schedule"})

    def validate(self) -> None:
        super().validate()
        get_divergence(self.divergence)  # unknown names list the known ones
        _choice(self, "dataset", ("digits16", "folder", "toy"))
        _choice(self, "disc_features", ("fake", "teacher"))
        if self.student_update_freq < 1:
            raise ValueError(f"student_update_freq must be >= 1; got {self.student_update_freq}")
        if self.student_update_freq > self.max_train_steps:
            raise ValueError(f"student_update_freq={self.student_update_freq} > max_train_steps="
                             f"{self.max_train_steps}: the student would never be updated")
        if self.gradient_accumulation_steps != 1:
            raise ValueError("gradient_accumulation_steps must be 1 for f-distill (the critic and student steps "
                             "alternate); raise train_batch_size or the number of processes instead")
        if self.checkpointing_steps % self.student_update_freq:
            raise ValueError(f"checkpointing_steps={self.checkpointing_steps} must be a multiple of "
                             f"student_update_freq={self.student_update_freq} so a resumed run keeps the schedule")
        if self.critic_learning_rate is not None and not self.critic_learning_rate > 0:
            raise ValueError(f"critic_learning_rate must be > 0; got {self.critic_learning_rate}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0; got {self.lora_rank}")
        is_toy = self.teacher.startswith(TOY_PREFIX)
        if is_toy != (self.dataset == "toy"):
            raise ValueError("teacher=toy:<name> and dataset=toy go together")
        if self.disc_features == "teacher" and is_toy:
            raise ValueError("disc_features=teacher needs a network teacher; the toy teacher is analytic")
        self.settings().validate()

    def settings(self) -> FDistillSettings:
        return FDistillSettings(divergence=self.divergence, logit_clamp=self.logit_clamp, ratio_min=self.ratio_min,
                                ratio_max=self.ratio_max, normalize_h=self.normalize_h,
                                dmd_normalizer=self.dmd_normalizer, gan_loss_weight=self.gan_loss_weight,
                                t_min=self.t_min, t_max=self.t_max, teacher_guidance_scale=self.teacher_guidance_scale)


# ---------------------------------------------------------------------------------------------------------------
class _Pair:
    """Two optimizers (or LR schedulers) saved and restored as one (for :class:`CheckpointManager`)."""

    def __init__(self, **parts):
        self.parts = parts

    def state_dict(self):
        return {k: v.state_dict() for k, v in self.parts.items()}

    def load_state_dict(self, state):
        for k, v in self.parts.items():
            v.load_state_dict(state[k])


def _toy_teacher(cfg):
    from diffusers import DDPMScheduler

    from gen.data.toys import mixture_params, mixture_weights
    from gen.distill.toy import GaussianMixtureTeacher

    name = cfg.teacher[len(TOY_PREFIX):]
    centres, std = mixture_params(name)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, clip_sample=False)
    return GaussianMixtureTeacher(centres, cfg.toy_std or std, sched, weights=mixture_weights(name)), sched


def load_teacher(cfg):
    """``(teacher network, scheduler, kind, extras)`` with kind ``"toy"``, ``"class"`` or ``"text"``."""
    if cfg.teacher.startswith(TOY_PREFIX):
        teacher, sched = _toy_teacher(cfg)
        return teacher, sched, "toy", {}
    from diffusers import DDPMScheduler

    from pipelines._loading import check_pipeline_folder

    check_pipeline_folder(cfg.teacher)
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(cfg.teacher)  # model_index.json of a local folder or a hub id
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the teacher pipeline {cfg.teacher!r}: {err}") from err
    is_text = bool((index.get("text_encoder") or [None])[0])
    if is_text:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(cfg.teacher, safety_checker=None, requires_safety_checker=False)
        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        return pipe.unet, sched, "text", {"vae": pipe.vae, "text_encoder": pipe.text_encoder,
                                          "tokenizer": pipe.tokenizer}
    from pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained(cfg.teacher)
    return pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config), "class", {}


def check_compatible(teacher, student, what: str) -> None:
    """Teacher and student (or data) must share channels and resolution."""
    tc, sc = teacher.config, student.config
    for key in ("in_channels", "out_channels", "sample_size"):
        if getattr(tc, key, None) != getattr(sc, key, None):
            raise ValueError(f"{what} has {key}={getattr(sc, key, None)} but the teacher has "
                             f"{key}={getattr(tc, key, None)}; they must match")


def _add_lora(net, cfg, who: str):
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    names = [n for n, _ in net.named_modules()]
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        raise ValueError(f"lora_targets {targets} match no module of the {who} ({type(net).__name__})")
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, target_modules=targets,
                      init_lora_weights="gaussian")
    return get_peft_model(net, lcfg)


def _unlora(net):
    return net.merge_and_unload() if hasattr(net, "merge_and_unload") else net


def _fit_fake_to_teacher(fake, teacher, sched, cfg, device):
    """Toy only: the analytic teacher has no weights to copy, so the fake score starts as a DSM fit to p."""
    opt = torch.optim.Adam(fake.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    abar = sched.alphas_cumprod
    for _ in range(cfg.fake_init_steps):
        x0 = teacher.sample(cfg.train_batch_size * 4, g).to(device)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g).to(device)
        a = abar[t].sqrt()[:, None].to(device)
        s = (1 - abar[t]).sqrt()[:, None].to(device)
        loss = F.mse_loss(fake(a * x0 + s * eps, t.to(device)), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def _real_batch(cfg, kind, dataset, teacher, n, g, encode=None):
    if kind == "toy":
        return teacher.sample(n, g), None
    idx = torch.randint(0, len(dataset["images"]), (n,), generator=g)
    images = dataset["images"][idx]
    labels = dataset["class_labels"][idx] if "class_labels" in dataset else None
    if encode is not None:
        images = encode(images)
    return images, labels


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(FDistillTrainConfig, argv)
    acc = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    dev = acc.device
    teacher, sched, kind, extras = load_teacher(cfg)
    teacher.requires_grad_(False).eval().to(dev)
    n_train = sched.config.num_train_timesteps
    if cfg.t_max > n_train - 1 or cfg.generator_timestep > n_train - 1:
        raise ValueError(f"t_max={cfg.t_max} and generator_timestep={cfg.generator_timestep} must be < "
                         f"num_train_timesteps={n_train}")

    # 1. networks: student and fake score start as copies of the teacher (toy: an MLP generator, a fitted fake)
    num_classes, encode, prompts, dataset = None, None, None, None
    if kind == "toy":
        from gen.models.mlp import TimeMLP

        dim = teacher.centres.shape[1]
        student = TimeMLP(dim=dim, hidden=cfg.toy_hidden, depth=cfg.toy_depth)
        fake = TimeMLP(dim=dim, hidden=cfg.toy_hidden, depth=cfg.toy_depth).to(dev)
        fit = _fit_fake_to_teacher(fake, teacher, sched, cfg, dev)
        logger.info("fake score fitted to the toy teacher: DSM loss %.4f after %d steps", fit, cfg.fake_init_steps)
        gen_pred = "sample" if cfg.generator_prediction == "scheduler" else cfg.generator_prediction
    else:
        if cfg.student_init:
            from pipelines import OneStepPipeline

            student = OneStepPipeline.from_pretrained(cfg.student_init).unet
            check_compatible(teacher, student, f"student_init {cfg.student_init!r}")
        else:
            student = copy.deepcopy(teacher)
        fake = copy.deepcopy(teacher)
        gen_pred = None if cfg.generator_prediction == "scheduler" else cfg.generator_prediction
        if kind == "class":
            from gen.data.build import build_image_dataset

            dataset, num_classes, channels, resolution = build_image_dataset(
                cfg.dataset, cfg.data_dir, cfg.resolution or teacher.config.sample_size,
                cfg.channels or teacher.config.in_channels)
            if isinstance(dataset, dict):
                shape = tuple(dataset["images"].shape[1:])
            else:
                shape = tuple(dataset[0]["images"].shape)
                dataset = {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in dataset[0]}
            want = (teacher.config.in_channels, teacher.config.sample_size, teacher.config.sample_size)
            if shape != want:
                raise ValueError(f"the data ({cfg.dataset}) has images of shape {shape} but the teacher takes {want}:"
                                 " channels and resolution must match")
            t_classes = teacher.config.num_class_embeds
            if (t_classes is None) != (num_classes is None) or (t_classes and t_classes != num_classes + 1):
                raise ValueError(f"the data has {num_classes} classes but the teacher has num_class_embeds="
                                 f"{t_classes} (expected classes + 1 null class)")
        else:  # text-to-image teacher: prompts, real images from a folder encoded by the VAE
            if not cfg.prompts_file:
                raise ValueError("a text-to-image teacher needs prompts_file (one prompt per line)")
            prompts = [p.strip() for p in Path(cfg.prompts_file).read_text().splitlines() if p.strip()]
            if not prompts:
                raise ValueError(f"prompts_file {cfg.prompts_file!r} has no prompts")
            from gen.data.folder import ImageFolderDataset

            vae = extras["vae"].to(dev).requires_grad_(False)
            side = teacher.config.sample_size * (2 ** (len(vae.config.block_out_channels) - 1))
            ds = ImageFolderDataset(cfg.data_dir, cfg.resolution or side, channels=3, class_from_subfolder=False)
            dataset = {"images": torch.stack([ds[i]["images"] for i in range(len(ds))])}
            if dataset["images"].shape[-1] != side:
                raise ValueError(f"resolution={cfg.resolution} but the teacher's latents decode to {side}px images")

            @torch.no_grad()
            def encode(x):
                return vae.encode(x.to(dev)).latent_dist.sample() * vae.config.scaling_factor

            text_encoder, tokenizer = extras["text_encoder"].to(dev), extras["tokenizer"]

    # 2. discriminator head on the fake score's (or the teacher's) features; size it with one dry forward
    feat_net = fake if cfg.disc_features == "fake" else teacher
    tap = FeatureTap(feat_net)
    with torch.no_grad():
        probe = torch.zeros(1, *_sample_shape(teacher, kind), device=dev)
        call_net(feat_net.to(dev), probe, torch.zeros(1, dtype=torch.long, device=dev),
                 _probe_cond(teacher, kind, dev, extras))
    feats = tap.pop()
    tap.remove()
    head = DiscriminatorHead(feats.shape[1], cfg.disc_hidden, spatial=feats.ndim == 4,
                             num_classes=(num_classes + 1) if num_classes else None)
    student.requires_grad_(True).train()
    fake.requires_grad_(True).train()
    if cfg.lora_rank > 0:
        student = _add_lora(student, cfg, "student")
        fake = _add_lora(fake, cfg, "fake score")
    critic = Critic(fake, head, RatioBins(cfg.num_ratio_bins, cfg.t_min, cfg.t_max, cfg.ratio_ema_rate))

    # 3. optimisers, schedules, Accelerate
    def adam(params, lr):
        return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)

    opt_g = adam(student.parameters(), cfg.learning_rate)
    opt_c = adam(critic.parameters(), cfg.critic_learning_rate or cfg.learning_rate)
    n = acc.num_processes
    n_student = cfg.max_train_steps // cfg.student_update_freq
    lr_g = get_scheduler(cfg.lr_scheduler, opt_g, num_warmup_steps=cfg.lr_warmup_steps // cfg.student_update_freq * n,
                         num_training_steps=n_student * n)
    lr_c = get_scheduler(cfg.lr_scheduler, opt_c, num_warmup_steps=cfg.lr_warmup_steps * n,
                         num_training_steps=cfg.max_train_steps * n)
    student, critic, opt_g, opt_c, lr_g, lr_c = acc.prepare(student, critic, opt_g, opt_c, lr_g, lr_c)
    inner_student, inner_critic = acc.unwrap_model(student), acc.unwrap_model(critic)
    ema = EMA(inner_student, cfg.ema_decay) if cfg.ema_decay > 0 else None
    objective = FDistill(teacher, inner_critic, sched, cfg.settings(), cfg.disc_features)
    ckpt = CheckpointManager(cfg.output_dir, cfg.checkpoints_total_limit)
    models = {"student": student, "critic": critic}
    opts, lrs = _Pair(student=opt_g, critic=opt_c), _Pair(student=lr_g, critic=lr_c)
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        logger.info("%d processes on %s; f=%s; student %.2fM trainable params; critic %.2fM", n, dev,
                    cfg.divergence, sum(p.numel() for p in inner_student.parameters() if p.requires_grad) / 1e6,
                    sum(p.numel() for p in inner_critic.parameters() if p.requires_grad) / 1e6)
    step = 0
    path = ckpt.resolve(cfg.resume)
    if path is None and cfg.resume:
        logger.info("no checkpoint in %s yet; starting a fresh run", ckpt.root)
    if path is not None:
        step = int(ckpt.load(path, acc, models, opts, lrs, ema)["step"])
        logger.info("resumed from %s at step %d", path, step)

    # 4. conditioning of one batch
    null = num_classes

    def conditioning(b, g):
        if kind == "class" and num_classes:
            labels = torch.randint(0, num_classes, (b,), generator=g).to(dev)
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, null)}
        if kind == "text":
            idx = torch.randint(0, len(prompts), (b,), generator=g)
            emb = _encode_text(text_encoder, tokenizer, [prompts[i] for i in idx], dev)
            return {"encoder_hidden_states": emb}, {"encoder_hidden_states": _encode_text(
                text_encoder, tokenizer, [""] * b, dev)}
        return {}, None

    trainable_c = [p for p in critic.parameters() if p.requires_grad]
    params_g = [p for p in student.parameters() if p.requires_grad]
    def update(loss, who, params, opt, lr):
        """Backward, clip, step; returns the gradient norm before clipping (0 when clipping is off)."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{who} loss is {loss.item()} at step {step}; nothing was saved over the last "
                                     f"checkpoint in {ckpt.root} (lower the learning rate)")
        acc.backward(loss)
        norm = acc.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else 0.0
        opt.step()
        lr.step()
        opt.zero_grad(set_to_none=True)
        return norm

    bar = tqdm(total=cfg.max_train_steps, initial=step, disable=not acc.is_local_main_process, desc="f-distill")
    t0, logs = time.time(), {}
    b = cfg.train_batch_size
    shape = _sample_shape(teacher, kind)
    while step < cfg.max_train_steps:
        g = step_generator(cfg.seed, step, acc.process_index)
        logs = {}
        cond, uncond = conditioning(b, g)
        z = torch.randn((b, *shape), generator=g).to(dev)
        # 5. critic step: fake score (DSM) + discriminator on sg(G(z)) and real data
        with torch.no_grad(), acc.autocast():
            x_gen = one_step_generate(inner_student, sched, z, cfg.generator_timestep, cond, gen_pred)
        x_real, real_labels = _real_batch(cfg, kind, dataset, teacher, b, g, encode)
        # real images carry their labels; uncaptioned real images (text teacher) go in with the empty prompt
        cond_real = {"class_labels": real_labels.long().to(dev)} if real_labels is not None else (uncond or {})
        with acc.autocast():
            loss_c, logs_c = objective.critic_loss(critic, x_gen, x_real.to(dev), cond, cond_real, g)
        logs_c["grad_norm_critic"] = update(loss_c, "critic", trainable_c, opt_c, lr_c)
        logs.update(logs_c)
        # 6. student step every student_update_freq iterations (critic frozen meanwhile)
        if (step + 1) % cfg.student_update_freq == 0:
            for p in trainable_c:
                p.requires_grad_(False)
            z = torch.randn((b, *shape), generator=g).to(dev)
            with acc.autocast():
                x_gen = one_step_generate(student, sched, z, cfg.generator_timestep, cond, gen_pred)
                loss_g, logs_g = objective.generator_loss(x_gen, cond, g, uncond)
            logs_g["grad_norm_student"] = update(loss_g, "student", params_g, opt_g, lr_g)
            for p in trainable_c:
                p.requires_grad_(True)
            if ema is not None:
                ema.update(inner_student)
            logs.update(logs_g)
            logs["loss_student"] = loss_g.detach()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_train_steps:
            rec = {k: round(float(v), 6) for k, v in logs.items()}
            rec.update(step=step, lr=lr_c.get_last_lr()[0], elapsed_s=round(time.time() - t0, 2))
            bar.set_postfix(dsm=f"{rec.get('loss_dsm', 0):.4f}", d=f"{rec.get('loss_d', 0):.3f}")
            if acc.is_main_process:
                with open(out / "logs.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            ckpt.save(acc, step, models, opts, lrs, ema)
    bar.close()

    # 7. save the (EMA) student
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = copy.deepcopy(inner_student)
        if ema is not None:
            ema.copy_to(final)
        final = _unlora(final)
        if kind == "toy":
            final.save_pretrained(out / "generator")
            (out / "generator" / "one_step.json").write_text(json.dumps(
                {"generator_timestep": cfg.generator_timestep, "generator_prediction": gen_pred or "scheduler",
                 "teacher": cfg.teacher, "toy_std": cfg.toy_std, "beta_schedule": cfg.beta_schedule}, indent=1))
        else:
            from diffusers import DDIMScheduler

            from pipelines import OneStepPipeline

            pipe = OneStepPipeline(unet=final, scheduler=DDIMScheduler.from_config(sched.config),
                                   generator_timestep=cfg.generator_timestep,
                                   generator_prediction=cfg.generator_prediction, **(extras if kind == "text" else {}))
            pipe.save_pretrained(out)
        logger.info("saved the student to %s (%.1f s)", out, time.time() - t0)
    acc.wait_for_everyone()
    acc.end_training()
    return out


def _sample_shape(teacher, kind):
    if kind == "toy":
        return (teacher.centres.shape[1],)
    c = teacher.config
    size = c.sample_size if isinstance(c.sample_size, (tuple, list)) else (c.sample_size, c.sample_size)
    return (c.in_channels, *size)


def _probe_cond(teacher, kind, dev, extras):
    if kind == "class":
        return {"class_labels": torch.zeros(1, dtype=torch.long, device=dev)} if teacher.config.num_class_embeds \
            else {}
    if kind == "text":
        return {"encoder_hidden_states": torch.zeros(1, extras["tokenizer"].model_max_length,
                                                     teacher.config.cross_attention_dim, device=dev)}
    return {}


@torch.no_grad()
def _encode_text(text_encoder, tokenizer, prompts, dev):
    tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return text_encoder(tok.input_ids.to(dev))[0]


if __name__ == "__main__":
    from gen.cli import run_main

    run_main(main)
