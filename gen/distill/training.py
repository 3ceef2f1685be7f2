"""The f-distill objective of the one training loop (``train/fdistill.py``; Xu, Nie & Vahdat 2025, arXiv 2502.15681).

Each iteration is one critic step (phase ``critic``: the fake-score network learns the student's noised distribution
by denoising score matching; the discriminator head learns ``log p_t / q_t`` with the non-saturating GAN loss) and,
every ``student_update_freq`` iterations, one student step (phase ``student``, critic frozen: the f-weighted
distribution-matching gradient plus ``gan_loss_weight`` times the generator's GAN loss). ``max_train_steps``
counts iterations (critic steps). The losses are :class:`gen.distill.FDistill`'s.

Teachers: a ``ClassConditionalPipeline`` folder (pixel UNet, e.g. ``checkpoints/digits-teacher``), a Stable
Diffusion folder or hub id (text-to-image, latent; prompts from ``prompts_file``, real images from ``data_dir``),
or ``toy:<8gaussians|25gaussians>`` (an exact 2-D mixture score; the fake score is fitted to it first).
Export: a ``OneStepPipeline`` folder (pixel or SD teacher; LoRA merged) or, for toys, ``generator/`` (a ``TimeMLP``)
with ``one_step.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from gen.training import Objective, Phase, TrainConfig, Trained, check_choice

from .divergences import get_divergence
from .fdistill import (
    Critic,
    DiscriminatorHead,
    FDistill,
    FDistillSettings,
    FeatureTap,
    RatioBins,
    call_net,
    one_step_generate,
)

logger = logging.getLogger(__name__)
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
        check_choice(self, "dataset", ("digits16", "folder", "toy"))
        check_choice(self, "disc_features", ("fake", "teacher"))
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
# teachers and networks
def toy_teacher(cfg: FDistillTrainConfig):
    """``(GaussianMixtureTeacher, DDPMScheduler)`` of a ``teacher: toy:<name>`` config."""
    from diffusers import DDPMScheduler

    from gen.data.toys import mixture_params

    from .toy import GaussianMixtureTeacher

    name = cfg.teacher[len(TOY_PREFIX):]
    centres, std = mixture_params(name)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, clip_sample=False)
    return GaussianMixtureTeacher(centres, cfg.toy_std or std, sched), sched


def load_teacher(cfg: FDistillTrainConfig):
    """``(teacher network, DDPM scheduler, kind, extras)`` with kind ``"toy"``, ``"class"`` or ``"text"``; extras
    hold the text teacher's ``vae``, ``text_encoder`` and ``tokenizer``."""
    if cfg.teacher.startswith(TOY_PREFIX):
        teacher, sched = toy_teacher(cfg)
        return teacher, sched, "toy", {}
    from diffusers import DDPMScheduler, DiffusionPipeline

    from gen.sampling.pipeline import check_pipeline_folder

    check_pipeline_folder(cfg.teacher)
    try:
        index = DiffusionPipeline.load_config(cfg.teacher)  # model_index.json of a local folder or a hub id
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the teacher pipeline {cfg.teacher!r}: {err}") from err
    if (index.get("text_encoder") or [None])[0]:
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


def add_lora(net, cfg: FDistillTrainConfig, who: str):
    """peft LoRA (``lora_rank``, ``lora_alpha``, ``lora_targets``) on ``net``; a target matching nothing raises."""
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    names = [n for n, _ in net.named_modules()]
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        raise ValueError(f"lora_targets {targets} match no module of the {who} ({type(net).__name__})")
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, target_modules=targets,
                      init_lora_weights="gaussian")
    return get_peft_model(net, lcfg)


def merge_lora(net):
    """The plain network with LoRA merged into its weights (a network without LoRA is returned as is)."""
    return net.merge_and_unload() if hasattr(net, "merge_and_unload") else net


def fit_fake_to_teacher(fake, teacher, sched, cfg: FDistillTrainConfig, device) -> float:
    """Toy only: the analytic teacher has no weights to copy, so the fake score starts as a DSM fit to p
    (``fake_init_steps`` Adam steps, noise from its own generator ``seed + 12345``). Leaves no gradient behind."""
    opt = torch.optim.Adam(fake.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(cfg.seed + 12345)
    abar = sched.alphas_cumprod
    loss = torch.zeros(())
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
    fake.zero_grad(set_to_none=True)  # the last step's gradients must not enter the first critic update
    return float(loss.detach())


def sample_shape(teacher, kind: str) -> tuple[int, ...]:
    """Shape of one sample: ``(D,)`` for a toy, ``(C, H, W)`` for a UNet teacher."""
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


# ---------------------------------------------------------------------------------------------------------------
class FDistillObjective(Objective):
    """Two networks, two phases: ``critic`` (fake score + discriminator head + ratio bins) every iteration,
    ``student`` every ``student_update_freq`` iterations with the critic frozen; EMA on the student."""

    name, config_class = "fdistill", FDistillTrainConfig
    fingerprint_fields = ("teacher", "dataset", "student_init", "disc_features", "disc_hidden", "lora_rank",
                          "lora_targets", "num_ratio_bins", "toy_hidden", "toy_depth", "generator_timestep")

    def build(self):
        cfg, dev = self.cfg, self.device
        teacher, sched, kind, extras = load_teacher(cfg)
        teacher.requires_grad_(False).eval().to(dev)
        n_train = sched.config.num_train_timesteps
        if cfg.t_max > n_train - 1 or cfg.generator_timestep > n_train - 1:
            raise ValueError(f"t_max={cfg.t_max} and generator_timestep={cfg.generator_timestep} must be < "
                             f"num_train_timesteps={n_train}")
        self.teacher, self.sched, self.kind, self.extras = teacher, sched, kind, extras
        self.num_classes, self.encode, self.prompts, self.dataset = None, None, None, None
        # 1. networks: student and fake score start as copies of the teacher (toy: an MLP generator, a fitted fake)
        if kind == "toy":
            from gen.models.mlp import TimeMLP

            dim = teacher.centres.shape[1]
            student = TimeMLP(dim=dim, hidden=cfg.toy_hidden, depth=cfg.toy_depth)
            fake = TimeMLP(dim=dim, hidden=cfg.toy_hidden, depth=cfg.toy_depth).to(dev)
            if not self.resuming:  # a resumed run loads the fitted (and trained) fake score from its checkpoint
                fit = fit_fake_to_teacher(fake, teacher, sched, cfg, dev)
                logger.info("fake score fitted to the toy teacher: DSM loss %.4f after %d steps", fit,
                            cfg.fake_init_steps)
            self.gen_pred = "sample" if cfg.generator_prediction == "scheduler" else cfg.generator_prediction
        else:
            if cfg.student_init:
                from pipelines import OneStepPipeline

                student = OneStepPipeline.from_pretrained(cfg.student_init).unet
                check_compatible(teacher, student, f"student_init {cfg.student_init!r}")
            else:
                student = copy.deepcopy(teacher)
            fake = copy.deepcopy(teacher)
            self.gen_pred = None if cfg.generator_prediction == "scheduler" else cfg.generator_prediction
            if kind == "class":
                self._class_data(teacher)
            else:
                self._text_data(teacher, extras)
        # 2. discriminator head on the fake score's (or the teacher's) features; size it with one dry forward
        feat_net = fake if cfg.disc_features == "fake" else teacher
        tap = FeatureTap(feat_net)
        with torch.no_grad():
            probe = torch.zeros(1, *sample_shape(teacher, kind), device=dev)
            call_net(feat_net.to(dev), probe, torch.zeros(1, dtype=torch.long, device=dev),
                     _probe_cond(teacher, kind, dev, extras))
        feats = tap.pop()
        tap.remove()
        head = DiscriminatorHead(feats.shape[1], cfg.disc_hidden, spatial=feats.ndim == 4,
                                 num_classes=(self.num_classes + 1) if self.num_classes else None)
        student.requires_grad_(True).train()
        fake.requires_grad_(True).train()
        if cfg.lora_rank > 0:
            student = add_lora(student, cfg, "student")
            fake = add_lora(fake, cfg, "fake score")
        critic = Critic(fake, head, RatioBins(cfg.num_ratio_bins, cfg.t_min, cfg.t_max, cfg.ratio_ema_rate))
        return {"student": Trained(student, cfg.learning_rate, ema=True),
                "critic": Trained(critic, cfg.critic_learning_rate or cfg.learning_rate, export=False)}

    def _class_data(self, teacher):
        from gen.data.build import build_image_dataset

        cfg = self.cfg
        dataset, self.num_classes, _, _ = build_image_dataset(
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
        if (t_classes is None) != (self.num_classes is None) or (t_classes and t_classes != self.num_classes + 1):
            raise ValueError(f"the data has {self.num_classes} classes but the teacher has num_class_embeds="
                             f"{t_classes} (expected classes + 1 null class)")
        self.dataset = dataset

    def _text_data(self, teacher, extras):
        """Text-to-image teacher: prompts, and real images from a folder encoded by the VAE."""
        cfg, dev = self.cfg, self.device
        if not cfg.prompts_file:
            raise ValueError("a text-to-image teacher needs prompts_file (one prompt per line)")
        prompts = [p.strip() for p in Path(cfg.prompts_file).read_text().splitlines() if p.strip()]
        if not prompts:
            raise ValueError(f"prompts_file {cfg.prompts_file!r} has no prompts")
        from gen.data.folder import ImageFolderDataset

        vae = extras["vae"].to(dev).requires_grad_(False)
        side = teacher.config.sample_size * (2 ** (len(vae.config.block_out_channels) - 1))
        ds = ImageFolderDataset(cfg.data_dir, cfg.resolution or side, channels=3, class_from_subfolder=False)
        self.dataset = {"images": torch.stack([ds[i]["images"] for i in range(len(ds))])}
        if self.dataset["images"].shape[-1] != side:
            raise ValueError(f"resolution={cfg.resolution} but the teacher's latents decode to {side}px images")

        @torch.no_grad()
        def encode(x):
            return vae.encode(x.to(dev)).latent_dist.sample() * vae.config.scaling_factor

        self.encode, self.prompts = encode, prompts
        self.text_encoder, self.tokenizer = extras["text_encoder"].to(dev), extras["tokenizer"]

    def describe(self):
        return f"f={self.cfg.divergence}; " + ", ".join(
            f"{n} {sum(p.numel() for p in m.parameters() if p.requires_grad) / 1e6:.2f}M trainable"
            for n, m in self.models.items())

    def phases(self):
        return [Phase("critic", self.critic_loss, name="critic"),
                Phase("student", self.student_loss, every=self.cfg.student_update_freq, freeze=("critic",),
                      name="student")]

    def on_train_start(self, step):
        self.losses = FDistill(self.teacher, self.unwrapped("critic"), self.sched, self.cfg.settings(),
                               self.cfg.disc_features)

    # -- one batch --------------------------------------------------------------------------------------------
    def _conditioning(self, b, g):
        dev = self.device
        if self.kind == "class" and self.num_classes:
            labels = torch.randint(0, self.num_classes, (b,), generator=g).to(dev)
            return {"class_labels": labels}, {"class_labels": torch.full_like(labels, self.num_classes)}
        if self.kind == "text":
            idx = torch.randint(0, len(self.prompts), (b,), generator=g)
            emb = _encode_text(self.text_encoder, self.tokenizer, [self.prompts[i] for i in idx], dev)
            return {"encoder_hidden_states": emb}, {"encoder_hidden_states": _encode_text(
                self.text_encoder, self.tokenizer, [""] * b, dev)}
        return {}, None

    def _real_batch(self, n, g):
        if self.kind == "toy":
            return self.teacher.sample(n, g), None
        idx = torch.randint(0, len(self.dataset["images"]), (n,), generator=g)
        images = self.dataset["images"][idx]
        labels = self.dataset["class_labels"][idx] if "class_labels" in self.dataset else None
        if self.encode is not None:
            images = self.encode(images)
        return images, labels

    def critic_loss(self, step, g, ctx):
        """Fake score (DSM) + discriminator on sg(G(z)) and real data; draws the iteration's conditioning."""
        cfg, dev, acc = self.cfg, self.device, self.acc
        b = cfg.train_batch_size
        cond, uncond = self._conditioning(b, g)
        ctx["cond"], ctx["uncond"] = cond, uncond
        z = torch.randn((b, *sample_shape(self.teacher, self.kind)), generator=g).to(dev)
        with torch.no_grad(), acc.autocast():
            x_gen = one_step_generate(self.unwrapped("student"), self.sched, z, cfg.generator_timestep, cond,
                                      self.gen_pred)
        x_real, real_labels = self._real_batch(b, g)
        # real images carry their labels; uncaptioned real images (text teacher) go in with the empty prompt
        cond_real = {"class_labels": real_labels.long().to(dev)} if real_labels is not None else (uncond or {})
        with acc.autocast():
            return self.losses.critic_loss(self.models["critic"], x_gen, x_real.to(dev), cond, cond_real, g)

    def student_loss(self, step, g, ctx):
        """f-weighted distribution matching + GAN loss of G(z) (the critic is frozen by the phase)."""
        cfg, acc = self.cfg, self.acc
        z = torch.randn((cfg.train_batch_size, *sample_shape(self.teacher, self.kind)), generator=g).to(self.device)
        with acc.autocast():
            x_gen = one_step_generate(self.models["student"], self.sched, z, cfg.generator_timestep, ctx["cond"],
                                      self.gen_pred)
            return self.losses.generator_loss(x_gen, ctx["cond"], g, ctx["uncond"])

    # -- export -------------------------------------------------------------------------------------------------
    def export(self, models, out):
        cfg = self.cfg
        final = merge_lora(models["student"])
        if self.kind == "toy":
            final.save_pretrained(out / "generator")
            (out / "generator" / "one_step.json").write_text(json.dumps(
                {"generator_timestep": cfg.generator_timestep, "generator_prediction": self.gen_pred or "scheduler",
                 "teacher": cfg.teacher, "toy_std": cfg.toy_std, "beta_schedule": cfg.beta_schedule}, indent=1))
            return
        from diffusers import DDIMScheduler

        from pipelines import OneStepPipeline

        pipe = OneStepPipeline(unet=final, scheduler=DDIMScheduler.from_config(self.sched.config),
                               generator_timestep=cfg.generator_timestep,
                               generator_prediction=cfg.generator_prediction,
                               **(self.extras if self.kind == "text" else {}))
        pipe.save_pretrained(out)
