"""The f-distill objective of the one training loop (``train/fdistill.py``; Xu, Nie & Vahdat 2025, arXiv 2502.15681).

Each iteration is one critic step (phase ``critic``: the fake-score network learns the student's noised distribution
by denoising score matching in the teacher's prediction space; the discriminator head learns ``log p_t / q_t`` with
the non-saturating GAN loss) and, every ``student_update_freq`` iterations, one student step (phase ``student``,
critic frozen: the f-weighted distribution-matching gradient plus ``gan_loss_weight`` times the generator's GAN
loss). ``max_train_steps`` counts iterations (critic steps). The losses are :class:`gen.distill.FDistill`'s.

Passes (DMD2's structure): ONE student forward per iteration, made in the critic phase; its detached output is what
the critic trains on, and on a student iteration the same output (with its graph) feeds the student step. See
:class:`gen.distill.FDistill` for what runs inside each loss.

Teachers (:mod:`gen.distill.teachers`): every family the sampling core supports: a ``ClassConditionalPipeline``
(e.g. ``checkpoints/digits-teacher``), a one-sided ``InterpolantPipeline`` (``checkpoints/digits-interpolant``),
DiT, Stable Diffusion 1.x/2.x, SDXL and SD3-style flow transformers (folders or hub ids; text prompts from
``prompts_file``, real images from ``data_dir``), or ``toy:<name>`` with a Gaussian-mixture toy of
:data:`gen.data.toys.MIXTURE_NAMES` (an exact 2-D mixture score, with the toy's mixture weights; the fake score is
fitted to it first). Export: the family's one-step pipeline (LoRA merged) or, for toys, ``generator/`` (a
``TimeMLP``) with ``one_step.json``.

Networks. Full fine-tuning (``lora_rank: 0``): the student and the fake score are copies of the teacher. With LoRA,
by default (``lora_shared_base``) they are two peft adapters over ONE frozen copy of the teacher's weights
(:mod:`gen.distill.lora`), switched per forward; the teacher is that base with the adapters off, and the EMA,
optimizer and checkpoints hold the adapters only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from gen.sampling.adapters import no_label_dropout
from gen.training import Objective, Phase, TrainConfig, Trained, check_choice

from .divergences import get_divergence
from .fdistill import Critic, DiscriminatorHead, FDistill, FDistillSettings, FeatureTap, RatioBins, call_net
from .spaces import one_step_generate

logger = logging.getLogger(__name__)
TOY_PREFIX = "toy:"


@dataclasses.dataclass
class FDistillTrainConfig(TrainConfig):
    teacher: str = dataclasses.field(
        default="checkpoints/digits-teacher",
        metadata={"help": "teacher pipeline folder / hub id (class UNet, interpolant, DiT, SD 1.x/2.x, SDXL, SD3), or "
                          "toy:<8gaussians|8gaussians_imbalanced|25gaussians>"})
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
    t_min: int = dataclasses.field(default=20, metadata={"help": "smallest training noise timestep (0 = data)"})
    t_max: int = dataclasses.field(default=980, metadata={"help": "largest training noise timestep (T = noise)"})
    timestep_shift: float | None = dataclasses.field(
        default=None, metadata={"help": "flow teachers: SD3's shift k of the training noise levels, "
                                        "s = k u / (1 + (k - 1) u); None: the scheduler's own (SD3: 3; interpolant: "
                                        "1); a VP teacher takes none"})
    teacher_guidance_scale: float = dataclasses.field(default=1.0, metadata={"help": "CFG on the teacher (1: off)"})
    disc_features: str = dataclasses.field(default="fake", metadata={"help": "fake | teacher"})
    disc_hidden: int = 128
    generator_timestep: int = dataclasses.field(
        default=950, metadata={"help": "the student's input noise timestep (VP: <= T - 1; flow: T is pure noise)"})
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
    lora_shared_base: bool = dataclasses.field(
        default=True, metadata={"help": "LoRA: student and fake score are adapters over ONE frozen copy of the "
                                        "teacher (false: over two more copies, as before; for comparisons)"})
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
        if self.lora_rank > 0 and self.student_init and self.lora_shared_base:
            raise ValueError("student_init with LoRA and lora_shared_base: the student's base would not be the "
                             "teacher's weights; set lora_shared_base false (or drop student_init)")
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
                                t_min=self.t_min, t_max=self.t_max, teacher_guidance_scale=self.teacher_guidance_scale,
                                timestep_shift=self.timestep_shift)


# ---------------------------------------------------------------------------------------------------------------
# teachers and networks
def toy_teacher(cfg: FDistillTrainConfig):
    """``(GaussianMixtureTeacher, DDPMScheduler)`` of a ``teacher: toy:<name>`` config."""
    from diffusers import DDPMScheduler

    from gen.data.toys import mixture_params, mixture_weights

    from .toy import GaussianMixtureTeacher

    name = cfg.teacher[len(TOY_PREFIX):]
    centres, std = mixture_params(name)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=cfg.beta_schedule, clip_sample=False)
    return GaussianMixtureTeacher(centres, cfg.toy_std or std, sched, weights=mixture_weights(name)), sched


def load_student_init(path: str):
    """The denoiser of a pipeline folder (a one-step student or any pipeline of the teacher's family)."""
    import diffusers
    from diffusers import DiffusionPipeline

    from gen.sampling.pipeline import check_pipeline_folder

    check_pipeline_folder(path)
    index = DiffusionPipeline.load_config(path)
    for key in ("unet", "transformer"):
        entry = index.get(key)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and hasattr(diffusers, entry[1] or ""):
            return getattr(diffusers, entry[1]).from_pretrained(path, subfolder=key)
    raise ValueError(f"student_init {path!r} has no unet or transformer to start the student from")


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


def _targets(cfg) -> list[str]:
    return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]


# ---------------------------------------------------------------------------------------------------------------
class FDistillObjective(Objective):
    """Two networks, two phases: ``critic`` (fake score + discriminator head + ratio bins) every iteration,
    ``student`` every ``student_update_freq`` iterations with the critic frozen; EMA on what the student trains."""

    name, config_class = "fdistill", FDistillTrainConfig
    fingerprint_fields = ("teacher", "dataset", "student_init", "disc_features", "disc_hidden", "lora_rank",
                          "lora_targets", "lora_shared_base", "num_ratio_bins", "toy_hidden", "toy_depth",
                          "generator_timestep", "timestep_shift")

    def build(self):
        from .lora import AdapterView, inject_adapters

        cfg, dev = self.cfg, self.device
        self.info, self.dataset, self.prompts, self.classes = None, None, None, None
        if cfg.teacher.startswith(TOY_PREFIX):
            teacher, sched = toy_teacher(cfg)
            teacher.requires_grad_(False).eval().to(dev)
            self.sched, self.shape, self.teacher = sched, (teacher.centres.shape[1],), teacher
            student, fake, feat_net, probe_cond = self._toy_networks(teacher, sched)
        else:
            from .spaces import NoiseLevels
            from .teachers import check_student, load_teacher

            info = load_teacher(cfg.teacher)
            self.info, self.sched, self.shape = info, info.scheduler, info.sample_shape
            net = info.net.requires_grad_(False).eval().to(dev)
            for module in info.pipe.components.values():  # text encoders, VAE: frozen, on the device
                if isinstance(module, torch.nn.Module) and module is not net:
                    module.requires_grad_(False).eval().to(dev)
            levels = NoiseLevels(self.sched, cfg.t_min, cfg.t_max, cfg.timestep_shift)  # shift / range checks
            levels.check("generator_timestep", cfg.generator_timestep)
            init = None
            if cfg.student_init:
                init = load_student_init(cfg.student_init)
                check_student(net, init, f"student_init {cfg.student_init!r}")
            if cfg.lora_rank > 0 and cfg.lora_shared_base:
                # one frozen base: the student and the fake score are adapters over the teacher's own weights
                inject_adapters(net, ("student", "fake"), cfg.lora_rank, cfg.lora_alpha, _targets(cfg), cfg.seed)
                student, fake, self.teacher = AdapterView(net, "student"), AdapterView(net, "fake"), \
                    AdapterView(net, None)
            elif cfg.lora_rank > 0:
                # separate copies (the layout before the shared base; kept for comparisons): same adapter seeds
                bases = [(init or copy.deepcopy(net)).to(dev), copy.deepcopy(net)]
                for i, (base, adapter) in enumerate(zip(bases, ("student", "fake"))):
                    inject_adapters(base, (adapter,), cfg.lora_rank, cfg.lora_alpha, _targets(cfg), cfg.seed + i)
                student, fake, self.teacher = AdapterView(bases[0], "student"), AdapterView(bases[1], "fake"), net
            else:
                student, fake, self.teacher = (init or copy.deepcopy(net)).to(dev), copy.deepcopy(net), net
                for m in (student, fake):
                    m.requires_grad_(True)
                    no_label_dropout(m)
            if info.is_text:
                self._text_data(info)
            else:
                self._class_data(info)
            feat_net = fake if cfg.disc_features == "fake" else self.teacher
            probe_cond = info.probe_conditioning(dev)
            self.gen_pred = None if cfg.generator_prediction == "scheduler" else cfg.generator_prediction
        # the discriminator head on the fake score's (or the teacher's) features; sized by one dry forward
        tap = FeatureTap(feat_net)
        with torch.no_grad():
            probe = torch.zeros(1, *self.shape, device=dev)
            feats = tap.run_to_features(call_net, feat_net.to(dev), probe,
                                        torch.zeros(1, dtype=torch.long, device=dev), probe_cond)
        tap.remove()
        spatial = feats.ndim == 4
        head = DiscriminatorHead(feats.shape[1] if feats.ndim != 3 else feats.shape[-1], cfg.disc_hidden,
                                 spatial=spatial, num_classes=(self._head_classes() or None))
        student.train()
        fake.train()
        critic = Critic(fake, head, RatioBins(cfg.num_ratio_bins, cfg.t_min, cfg.t_max, cfg.ratio_ema_rate))
        return {"student": Trained(student, cfg.learning_rate, ema=True),
                "critic": Trained(critic, cfg.critic_learning_rate or cfg.learning_rate, export=False)}

    def _toy_networks(self, teacher, sched):
        from gen.models.mlp import TimeMLP

        cfg, dev = self.cfg, self.device
        dim = teacher.centres.shape[1]
        student = TimeMLP(dim=dim, hidden=cfg.toy_hidden, depth=cfg.toy_depth)
        fake = TimeMLP(dim=dim, hidden=cfg.toy_hidden, depth=cfg.toy_depth).to(dev)
        if not self.resuming:  # a resumed run loads the fitted (and trained) fake score from its checkpoint
            fit = fit_fake_to_teacher(fake, teacher, sched, cfg, dev)
            logger.info("fake score fitted to the toy teacher: DSM loss %.4f after %d steps", fit, cfg.fake_init_steps)
        self.gen_pred = "sample" if cfg.generator_prediction == "scheduler" else cfg.generator_prediction
        return student, fake, fake, {}

    def _head_classes(self) -> int | None:
        """Size of the head's label embedding: the teacher's classes plus its null row (class teachers)."""
        if self.info is None or self.info.num_classes is None:
            return None
        return self.info.num_classes + 1

    def _class_data(self, info):
        """Class-conditional (or unconditional) teacher: images (latent teachers: encoded per batch by its VAE)."""
        from gen.data.build import build_image_dataset

        cfg = self.cfg
        channels = 3 if info.is_latent else info.sample_shape[0]
        side = info.image_side
        dataset, n_data, _, _ = build_image_dataset(cfg.dataset, cfg.data_dir, cfg.resolution or side,
                                                    cfg.channels or channels)
        shape = tuple((dataset["images"] if isinstance(dataset, dict) else dataset[0]["images"]).shape[-3:])
        if shape != (channels, side, side):
            raise ValueError(f"the data ({cfg.dataset}) has images of shape {shape} but the teacher takes "
                             f"{(channels, side, side)}: channels and resolution must match")
        t_classes = info.num_classes
        if info.family == "dit":
            if n_data is not None and n_data > t_classes:
                raise ValueError(f"the data has {n_data} classes but the DiT teacher has {t_classes}")
        elif (t_classes is None) != (n_data is None) or (t_classes and t_classes != n_data):
            raise ValueError(f"the data has {n_data} classes but the teacher has num_class_embeds="
                             f"{None if t_classes is None else t_classes + 1} (expected classes + 1 null class)")
        self.classes = n_data
        self.dataset = dataset

    def _text_data(self, info):
        """Text-to-image teacher: prompts, and real images from a folder (encoded by the VAE per batch)."""
        cfg = self.cfg
        if not cfg.prompts_file:
            raise ValueError("a text-to-image teacher needs prompts_file (one prompt per line)")
        prompts = [p.strip() for p in Path(cfg.prompts_file).read_text().splitlines() if p.strip()]
        if not prompts:
            raise ValueError(f"prompts_file {cfg.prompts_file!r} has no prompts")
        if not cfg.data_dir:
            raise ValueError("a text-to-image teacher needs data_dir (a folder of real images)")
        from gen.data.folder import ImageFolderDataset

        side = info.image_side
        ds = ImageFolderDataset(cfg.data_dir, cfg.resolution or side, channels=3, class_from_subfolder=False)
        if ds[0]["images"].shape[-1] != side:
            raise ValueError(f"resolution={cfg.resolution} but the teacher's latents decode to {side}px images")
        self.dataset = ds  # read lazily, one batch at a time
        self.prompts = prompts

    def describe(self):
        how = "full fine-tuning" if self.cfg.lora_rank == 0 else (
            f"LoRA rank {self.cfg.lora_rank} " + ("over one shared base" if self.cfg.lora_shared_base
                                                  else "over separate copies"))
        family = self.info.family if self.info else "toy"
        return f"f={self.cfg.divergence}; {family} teacher; {how}; " + ", ".join(
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
        info, dev = self.info, self.device
        if info is None:
            return {}, None
        if info.is_text:
            idx = torch.randint(0, len(self.prompts), (b,), generator=g)
            return info.text_conditioning([self.prompts[i] for i in idx], dev)
        if self.classes:
            return info.class_conditioning(torch.randint(0, self.classes, (b,), generator=g).to(dev))
        return {}, None

    def _real_batch(self, n, g):
        if self.info is None:
            return self.teacher.sample(n, g), None
        data = self.dataset
        if isinstance(data, dict):  # a tensor data set (digits16)
            idx = torch.randint(0, len(data["images"]), (n,), generator=g)
            images, labels = data["images"][idx], data["class_labels"][idx] if "class_labels" in data else None
        else:  # an image folder, read one batch at a time
            idx = torch.randint(0, len(data), (n,), generator=g)
            rows = [data[int(i)] for i in idx]
            images = torch.stack([r["images"] for r in rows])
            labels = torch.stack([torch.as_tensor(r["class_labels"]) for r in rows]) \
                if "class_labels" in rows[0] else None
        return self.info.encode(images.to(self.device)), (labels if self.classes else None)

    def _generate(self, net, z, cond):
        return one_step_generate(net, self.sched, z, self.cfg.generator_timestep, cond, self.gen_pred)

    def critic_loss(self, step, g, ctx):
        """The iteration's one student forward (with its graph on a student iteration, kept for the student step),
        then the fake score (DSM) and the discriminator on its detached output and on real data."""
        cfg, dev, acc = self.cfg, self.device, self.acc
        b = cfg.train_batch_size
        cond, uncond = self._conditioning(b, g)
        ctx["cond"], ctx["uncond"] = cond, uncond
        z = torch.randn((b, *self.shape), generator=g).to(dev)
        if (step + 1) % cfg.student_update_freq == 0:
            with acc.autocast():
                x_gen = ctx["x_gen"] = self._generate(self.models["student"], z, cond)
        else:
            with torch.no_grad(), acc.autocast():
                x_gen = self._generate(self.unwrapped("student"), z, cond)
        x_real, real_labels = self._real_batch(b, g)
        # real images carry their labels; uncaptioned real images (text teacher) go in with the empty prompt
        cond_real = {"class_labels": real_labels.long().to(dev)} if real_labels is not None else (uncond or {})
        with acc.autocast():
            return self.losses.critic_loss(self.models["critic"], x_gen.detach(), x_real.to(dev), cond, cond_real, g)

    def student_loss(self, step, g, ctx):
        """f-weighted distribution matching + GAN loss of this iteration's G(z) (the critic is frozen by the phase)."""
        with self.acc.autocast():
            return self.losses.generator_loss(ctx.pop("x_gen"), ctx["cond"], g, ctx["uncond"])

    # -- export -------------------------------------------------------------------------------------------------
    def export(self, models, out):
        from .lora import AdapterView, merged_network

        cfg = self.cfg
        final = models["student"]
        if isinstance(final, AdapterView):
            final = merged_network(final)
        if self.info is None:
            final.save_pretrained(out / "generator")
            (out / "generator" / "one_step.json").write_text(json.dumps(
                {"generator_timestep": cfg.generator_timestep, "generator_prediction": self.gen_pred or "scheduler",
                 "teacher": cfg.teacher, "toy_std": cfg.toy_std, "beta_schedule": cfg.beta_schedule}, indent=1))
            return
        self.info.one_step_pipeline(final, cfg.generator_timestep, cfg.generator_prediction).save_pretrained(out)
