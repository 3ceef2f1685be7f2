"""The AlignProp objective of the one training loop (``train/alignprop.py``): reward backpropagation into a LoRA.

Prabhudesai, Goyal, Pathak, Fragkiadaki, "Aligning Text-to-Image Diffusion Models with Reward Backpropagation"
(arXiv 2310.03739). Per micro-step: draw prompts (or class labels), sample x_T -> x_0 with the current LoRA
weights through :func:`gen.reward.sample_with_grad` (gradient checkpointing of every network call, truncated backprop
through the last K steps), decode to images in [0, 1], evaluate the weighted reward R, and minimise

    loss_type = "neg_reward":  L = -loss_scale * mean(R)
    loss_type = "target":      L =  loss_scale * mean(|R - reward_target|)    (the original aesthetic loss)

over the LoRA parameters only. Held-out evaluation (fixed noise; reward, and for the digits model FID-digits against
the test split and against the base model's samples: the drift that shows reward hacking) runs at the start
(``eval_at_start``), every ``eval_every`` steps and at the end (``eval_at_end``); its cost is
``len(eval_prompts) * eval_samples_per_prompt + fid_num_samples`` samples of ``num_inference_steps`` steps each time.
Export: ``pytorch_lora_weights.safetensors`` (Diffusers LoRA format) in ``output_dir`` and in each checkpoint;
``eval.jsonl`` beside ``logs.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from gen.training import Objective, TrainConfig, Trained, atomic_write_text, check_choice

from .lora import add_lora, lora_metadata, lora_state_dict, save_lora
from .rewards import build_reward, reward_names
from .sampling import TRUNCATION_MODES, Truncation, check_reward, sample_with_grad

logger = logging.getLogger(__name__)
MODEL_TYPES = ("class_conditional", "stable_diffusion")
LOSS_TYPES = ("neg_reward", "target")


@dataclasses.dataclass
class AlignPropConfig(TrainConfig):
    # model
    model_type: str = dataclasses.field(default="class_conditional",
                                        metadata={"help": "class_conditional | stable_diffusion"})
    pretrained_model: str = dataclasses.field(default="checkpoints/digits-teacher",
                                              metadata={"help": "pipeline folder or hub id; 'tiny' = tiny SD (tests)"})
    resolution: int | None = dataclasses.field(default=None, metadata={"help": "SD image size (default: native)"})
    # sampling
    num_inference_steps: int = dataclasses.field(default=10, metadata={"help": "T sampling steps (DDIM)"})
    eta: float = dataclasses.field(default=0.0, metadata={"help": "DDIM eta (AlignProp: 0; TRL default: 1)"})
    guidance_scale: float = dataclasses.field(default=1.0, metadata={"help": "CFG weight w (1 = off)"})
    negative_prompt: str = ""
    # truncated backprop + checkpointing
    truncation: str = dataclasses.field(default="fixed", metadata={"help": "fixed | uniform | per_step_random"})
    backprop_k: int = dataclasses.field(default=1, metadata={"help": "fixed: last K steps (0 = all steps)"})
    backprop_k_min: int = dataclasses.field(default=1, metadata={"help": "uniform: K ~ U{min..max} once per batch"})
    backprop_k_max: int = dataclasses.field(default=0, metadata={"help": "uniform: upper K (0 = T)"})
    cut_min: int = dataclasses.field(default=0, metadata={"help": "per_step_random (original/TRL quirk) lower cut"})
    cut_max: int = dataclasses.field(default=0, metadata={"help": "per_step_random upper cut (0 = T)"})
    gradient_checkpointing: bool = dataclasses.field(default=True, metadata={"help": "checkpoint each UNet call"})
    checkpoint_decoder: bool = dataclasses.field(default=True,
                                                 metadata={"help": "also checkpoint the VAE decode (SD; TRL: no)"})
    # LoRA
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                                       metadata={"help": "module-name suffixes (peft)"})
    lora_init: str = dataclasses.field(default="gaussian", metadata={"help": "gaussian | kaiming (B = 0 either way)"})
    # prompts / labels
    prompts: list[str] = dataclasses.field(default_factory=list,
                                           metadata={"help": "training prompts (class labels for class_conditional)"})
    prompt_file: str | None = dataclasses.field(default=None, metadata={"help": "one prompt/label per line"})
    eval_prompts: list[str] = dataclasses.field(default_factory=list,
                                                metadata={"help": "held-out prompts/labels (empty: no evaluation)"})
    eval_prompt_file: str | None = None
    # reward and loss shaping
    rewards: list[dict] | str = dataclasses.field(
        default="digits_classifier:1.0",
        metadata={"help": "'name:weight,...' or a YAML list of {name, weight, **kwargs}"})
    loss_type: str = dataclasses.field(default="neg_reward", metadata={"help": "neg_reward | target"})
    reward_target: float = dataclasses.field(default=0.0, metadata={"help": "loss_type=target: |R - target|"})
    loss_scale: float = dataclasses.field(default=1.0, metadata={"help": "loss multiplier (AlignProp: 0.01)"})
    # evaluation (its cost: len(eval_prompts) * eval_samples_per_prompt + fid_num_samples samples per evaluation)
    eval_every: int = dataclasses.field(default=50, metadata={"help": "evaluate every N steps (0 = not in between)"})
    eval_at_start: bool = dataclasses.field(default=True, metadata={"help": "evaluate the base model at step 0"})
    eval_at_end: bool = dataclasses.field(default=True, metadata={"help": "evaluate after the last step"})
    eval_samples_per_prompt: int = dataclasses.field(default=8, metadata={"help": "held-out samples per prompt"})
    fid_num_samples: int = dataclasses.field(default=0, metadata={"help": "digits: samples for FID-digits (0 = off)"})
    eval_seed: int = 1234

    def validate(self) -> None:
        super().validate()
        check_choice(self, "model_type", MODEL_TYPES)
        check_choice(self, "truncation", TRUNCATION_MODES)
        check_choice(self, "loss_type", LOSS_TYPES)
        check_choice(self, "lora_init", ("gaussian", "kaiming"))
        if not self.prompts and not self.prompt_file:
            raise ValueError("give training prompts (prompts: [...]) or prompt_file")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1; got {self.num_inference_steps}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(f"lora_rank must be >= 1 and lora_alpha > 0; got {self.lora_rank}, {self.lora_alpha}")
        if self.eval_every < 0 or self.fid_num_samples < 0 or self.eval_samples_per_prompt < 1:
            raise ValueError("eval_every and fid_num_samples must be >= 0, eval_samples_per_prompt >= 1")
        if self.fid_num_samples == 1:
            raise ValueError("fid_num_samples must be 0 (off) or >= 2")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0; got {self.eta}")
        self.truncation_spec().validate(self.num_inference_steps)  # K > T etc. -> ValueError naming it
        items = self.rewards.split(",") if isinstance(self.rewards, str) else self.rewards
        names = [r.get("name") if isinstance(r, dict) else str(r).partition(":")[0].strip() for r in items]
        bad = [n for n in names if n not in reward_names()]
        if bad:
            raise ValueError(f"unknown reward(s) {bad}; known rewards: {', '.join(reward_names())}")
        for key, items in (("prompts", self.prompts), ("eval_prompts", self.eval_prompts)):
            if self.model_type == "class_conditional":
                check_labels(items, key)

    def truncation_spec(self) -> Truncation:
        return Truncation(mode=self.truncation, k=self.backprop_k or None, k_min=self.backprop_k_min,
                          k_max=self.backprop_k_max or None, cut_min=self.cut_min, cut_max=self.cut_max or None)


def check_labels(items, key: str, num_classes: int | None = None) -> list[int]:
    """Class labels given as prompts: integers, in ``0..num_classes-1`` when the number of classes is known."""
    labels = []
    for p in items:
        try:
            labels.append(int(str(p).strip()))
        except ValueError:
            raise ValueError(f"{key}: {p!r} is not a class label; model_type=class_conditional takes integer labels "
                             "as prompts") from None
    bad = [v for v in labels if v < 0 or (num_classes is not None and v >= num_classes)]
    if bad:
        allowed = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        raise ValueError(f"{key}: labels {bad[:8]} out of range; allowed {allowed}")
    return labels


def read_prompts(items: list[str], path: str | None) -> list[str]:
    """The prompts of a config list plus those of a file (one per line, ``#`` comments skipped)."""
    out = [str(p) for p in items]
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"prompt file {path!r} does not exist")
        out += [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return out


def class_count(cfg: AlignPropConfig) -> int | None:
    """Number of classes of a class-conditional pipeline folder, read from ``unet/config.json`` (no weights)."""
    path = Path(cfg.pretrained_model)
    config = path / "unet" / "config.json"
    if not config.is_file():
        if path.exists():
            raise ValueError(f"pretrained_model {cfg.pretrained_model!r} is not a class-conditional pipeline folder "
                             "(no unet/config.json)")
        return None  # a hub id: checked after loading
    n = json.loads(config.read_text()).get("num_class_embeds")
    if not n:
        raise ValueError(f"pretrained_model {cfg.pretrained_model!r} has no class embeddings; use "
                         "model_type=stable_diffusion for text prompts")
    return n - 1  # the last embedding is the null class


def load_model(cfg: AlignPropConfig):
    """The base pipeline of the config (class-conditional with a LoRA loader, or Stable Diffusion)."""
    if cfg.model_type == "class_conditional":
        from pipelines.lora import ClassConditionalLoraPipeline

        return ClassConditionalLoraPipeline.from_pretrained(cfg.pretrained_model)
    from diffusers import StableDiffusionPipeline

    if cfg.pretrained_model == "tiny":
        from gen.models.tiny_sd import build_tiny_sd

        return StableDiffusionPipeline(**build_tiny_sd(cfg.seed), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    try:
        return StableDiffusionPipeline.from_pretrained(cfg.pretrained_model, safety_checker=None)
    except OSError as err:
        raise ValueError(f"could not load Stable Diffusion from {cfg.pretrained_model!r}: {err}") from err


def make_backend(cfg: AlignPropConfig, pipe, unet):
    """The :mod:`gen.reward.sampling` backend of the pipeline, calling ``unet`` (e.g. the DDP-wrapped one)."""
    from .sampling import ClassConditionalBackend, StableDiffusionBackend

    if cfg.model_type == "class_conditional":
        return ClassConditionalBackend(unet, pipe.scheduler, cfg.guidance_scale, config_unet=pipe.unet)
    return StableDiffusionBackend(unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                                  cfg.guidance_scale, cfg.negative_prompt, cfg.resolution, config_unet=pipe.unet)


def compute_loss(cfg: AlignPropConfig, rewards: torch.Tensor) -> torch.Tensor:
    """Loss shaping of the config (no constant of any reward hidden here)."""
    if cfg.loss_type == "neg_reward":
        return -cfg.loss_scale * rewards.mean()
    return cfg.loss_scale * (rewards - cfg.reward_target).abs().mean()


def generate(cfg, backend, prompts, device, generator, truncation=None, with_grad=True, keep_mask=None):
    """Images [B,C,H,W] in [0,1] for ``prompts`` (noise and K from ``generator``) and the sampling info."""
    cond = backend.encode(prompts, device)
    latents = torch.randn(backend.latent_shape(len(prompts)), generator=generator).to(device)
    with torch.set_grad_enabled(with_grad):
        x, info = sample_with_grad(backend.model_fn(cond), backend.scheduler, latents, cfg.num_inference_steps,
                                   truncation=truncation, eta=cfg.eta, generator=generator,
                                   gradient_checkpointing=cfg.gradient_checkpointing and with_grad,
                                   keep_mask=keep_mask)
        images = backend.decode(x, gradient_checkpointing=cfg.gradient_checkpointing and cfg.checkpoint_decoder
                                and with_grad)
    return images, info


@torch.no_grad()
def evaluate(cfg, backend, reward, prompts, device, fid_prompts=None, base_images=None, extractor=None):
    """Held-out evaluation with fixed noise (``eval_seed``).

    Mean reward (and per term) over ``eval_samples_per_prompt`` samples of each held-out prompt; for the digits
    model with ``fid_num_samples > 0`` also FID-digits of ``fid_num_samples`` samples of ``fid_prompts`` (all
    labels, balanced) against the digits16 test split and against ``base_images`` (the base model's samples of the
    same labels and noise): the drift. Returns ``(metrics, fid images or None)``.
    """
    def sample(labels, seed):
        g = torch.Generator().manual_seed(seed)
        imgs, vals, comps = [], [], {}
        for s in range(0, len(labels), 250):
            chunk = labels[s:s + 250]
            im, _ = generate(cfg, backend, chunk, device, g, with_grad=False)
            vals.append(check_reward(reward(im, chunk), len(chunk)).cpu())
            for k, v in reward.components.items():
                comps.setdefault(k, []).append(v.cpu())
            imgs.append(im.cpu())
        return torch.cat(imgs), torch.cat(vals), {k: torch.cat(v) for k, v in comps.items()}

    labels = [p for p in prompts for _ in range(cfg.eval_samples_per_prompt)]
    _, vals, comps = sample(labels, cfg.eval_seed)
    out = {"eval_reward": float(vals.mean()), "eval_n": len(labels)}
    out.update({f"eval_reward/{k}": float(v.mean()) for k, v in comps.items()})
    if not (cfg.fid_num_samples and cfg.model_type == "class_conditional" and fid_prompts):
        return out, None
    from gen.data.images import to_uint8
    from gen.metrics.evaluate import compute_fid_for_images
    from gen.metrics.fid import frechet_distance

    fid_labels = [fid_prompts[i % len(fid_prompts)] for i in range(cfg.fid_num_samples)]
    images, fvals, _ = sample(fid_labels, cfg.eval_seed + 1)
    u8 = to_uint8(images * 2 - 1)
    res = compute_fid_for_images(u8, torch.tensor([int(p) for p in fid_labels]), extractor=extractor, ref="test",
                                 progress=False)
    out.update(fid_digits=res["fid"], class_accuracy=res["class_accuracy"], fid_reward=float(fvals.mean()))
    if base_images is not None:
        fa = extractor(u8).double()
        fb = extractor(to_uint8(base_images * 2 - 1)).double()
        out["fid_vs_base"] = float(frechet_distance(fa.mean(0), torch.cov(fa.T), fb.mean(0), torch.cov(fb.T)))
    return out, images


class AlignPropObjective(Objective):
    """Reward backpropagation through sampling into a LoRA of the UNet (frozen base, trainable adapters in fp32)."""

    name, config_class = "alignprop", AlignPropConfig
    fingerprint_fields = ("model_type", "pretrained_model", "lora_rank", "lora_target_modules")

    def build(self):
        from gen.training.engine import is_sharded

        cfg, acc = self.cfg, self.acc
        if is_sharded(acc):
            raise ValueError("AlignProp trains a LoRA of a few MB and evaluates on one process: run it with DDP "
                             "(FSDP2 / ZeRO-3 sharding saves nothing here)")
        # 1. prompts and labels, checked before any model loads
        self.train_prompts = read_prompts(cfg.prompts, cfg.prompt_file)
        self.eval_prompts = read_prompts(cfg.eval_prompts, cfg.eval_prompt_file)
        if not self.train_prompts:
            raise ValueError("no training prompts (prompts / prompt_file are empty)")
        if cfg.model_type == "class_conditional":
            n = class_count(cfg)
            check_labels(self.train_prompts, "prompts", n)
            check_labels(self.eval_prompts, "eval_prompts", n)
        n_eval = len(self.eval_prompts) * cfg.eval_samples_per_prompt + (cfg.fid_num_samples if self.eval_prompts
                                                                          else 0)
        if self.eval_prompts:
            logger.info("each evaluation samples %d images of %d steps (eval_every=%d, at start %s, at end %s)",
                        n_eval, cfg.num_inference_steps, cfg.eval_every, cfg.eval_at_start, cfg.eval_at_end)
        # 2. model, LoRA, reward
        pipe = load_model(cfg)
        pipe.set_progress_bar_config(disable=True)
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        for name in ("unet", "vae", "text_encoder"):  # frozen parts in the mixed-precision dtype (as TRL does)
            part = getattr(pipe, name, None)
            if part is not None:
                part.to(acc.device) if weight_dtype == torch.float32 else part.to(acc.device, dtype=weight_dtype)
                part.requires_grad_(False)
        unet = pipe.unet
        lcfg = add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules,
                        init="gaussian" if cfg.lora_init == "gaussian" else True)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable LoRA in fp32 (as TRL does)
        self.reward = build_reward(cfg.rewards).to(acc.device)
        self.pipe, self.meta, self.truncation = pipe, lora_metadata(lcfg), cfg.truncation_spec()
        self.extractor, self.base_images = None, None
        self.fid_prompts = sorted(set(self.train_prompts) | set(self.eval_prompts), key=lambda p: (len(p), p))
        return {"unet": Trained(unet, cfg.learning_rate, save_frozen=False)}

    def describe(self):
        cfg = self.cfg
        n = sum(p.numel() for p in self.trainable_parameters("unet"))
        return (f"{n} LoRA parameters (rank {cfg.lora_rank} on {cfg.lora_target_modules}); rewards "
                f"{self.reward.names}; K mode {cfg.truncation}")

    def on_train_start(self, step):
        self.backend = make_backend(self.cfg, self.pipe, self.models["unet"])
        if step == 0 and self.cfg.eval_at_start:
            self.run_eval(0)

    def loss(self, step, gen, ctx):
        cfg, acc = self.cfg, self.acc
        idx = torch.randint(0, len(self.train_prompts), (cfg.train_batch_size,), generator=gen)
        prompts = [self.train_prompts[int(i)] for i in idx]
        with acc.autocast():
            images, info = generate(cfg, self.backend, prompts, acc.device, gen, self.truncation)
            r = check_reward(self.reward(images.float(), prompts), len(prompts))
            loss = compute_loss(cfg, r)
        if not loss.requires_grad:  # per_step_random detached every step: a zero gradient, ranks in step
            loss = loss + 0.0 * sum(p.sum() for p in self.trainable_parameters("unet"))
        logs = {"reward": acc.gather(r.detach()).float().mean(), "k": info["k"]}
        logs.update({f"reward/{k}": v.mean() for k, v in self.reward.components.items()})
        return loss, logs

    def on_step_end(self, step):
        if self.cfg.eval_every and step % self.cfg.eval_every == 0 and step != self.cfg.max_train_steps:
            self.run_eval(step)

    def on_train_end(self, step):
        if self.cfg.eval_at_end:
            self.run_eval(step)

    def run_eval(self, at_step: int) -> None:
        """Held-out evaluation on the main process, appended to ``eval.jsonl``."""
        cfg, acc = self.cfg, self.acc
        if not (self.eval_prompts and acc.is_main_process):
            acc.wait_for_everyone()
            return
        unet = self.unwrapped("unet")
        ev_backend = make_backend(cfg, self.pipe, unet)
        if cfg.fid_num_samples and cfg.model_type == "class_conditional" and self.extractor is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            from gen.metrics.features import build_feature_extractor

            self.extractor = build_feature_extractor("digits", device=acc.device)
            layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
            for m in layers:
                m.enable_adapters(False)
            _, self.base_images = evaluate(cfg, ev_backend, self.reward, self.eval_prompts, acc.device,
                                           self.fid_prompts)
            for m in layers:
                m.enable_adapters(True)
        t0 = time.time()
        res, _ = evaluate(cfg, ev_backend, self.reward, self.eval_prompts, acc.device, self.fid_prompts,
                          self.base_images, self.extractor)
        res.update(step=at_step, eval_s=round(time.time() - t0, 2))
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if at_step == 0 or not (out / "eval.jsonl").is_file():
            lines = []
        else:  # a resumed run redoes evaluations after its checkpoint
            lines = [x for x in (out / "eval.jsonl").read_text().splitlines() if json.loads(x)["step"] < at_step]
        atomic_write_text(out / "eval.jsonl", "".join(x + "\n" for x in [*lines, json.dumps(res)]))
        logger.info("eval step %d: %s", at_step,
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()})
        acc.wait_for_everyone()

    def _lora(self) -> dict:
        return lora_state_dict(self.unwrapped("unet"))

    def checkpoint_files(self, folder):
        if folder is not None:
            save_lora(folder, self._lora(), self.meta)

    def export(self, models, out):
        save_lora(out, lora_state_dict(models["unet"]), self.meta)
