"""The AlignProp objective of the one training loop (``train/alignprop.py``): reward backpropagation into a LoRA.

Prabhudesai, Goyal, Pathak, Fragkiadaki, "Aligning Text-to-Image Diffusion Models with Reward Backpropagation"
(arXiv 2310.03739). Per micro-step: draw prompts (or class labels), sample x_T -> x_0 with the current LoRA
weights through :func:`gen.reward.sample_with_grad` (gradient checkpointing of every network call, truncated backprop
through the last K steps), decode to images in [0, 1], evaluate the weighted reward R, and minimise

    loss_type = "neg_reward":  L = -loss_scale * mean(R)
    loss_type = "target":      L =  loss_scale * mean(|R - reward_target|)    (the original aesthetic loss)

over the LoRA parameters only. Families (``model_type``): ``class_conditional`` (digits ``UNet2DModel``),
``stable_diffusion`` (SD 1.x/2.x), ``sdxl``, ``sd3`` (SD3-style flow transformers) and ``dit`` (class-conditional
``DiTTransformer2DModel``; prompts are class indices or ImageNet names), loaded through our family pipelines
(Diffusers' subclasses) so that prompts are encoded by the pipeline's own encoders; the LoRA file is the one
Diffusers' ``load_lora_weights`` of each family reads (``unet.`` or ``transformer.`` keys; for DiT, whose Diffusers
pipeline has no LoRA loader, ``pipelines.GuidedDiTPipeline.load_lora_weights``).

Held-out evaluation (fixed noise; reward, and for the digits model FID-digits against the test split and against
the base model's samples: the drift that shows reward hacking) runs at the start
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

from .lora import add_lora, lora_metadata, lora_prefix, lora_state_dict, save_lora
from .rewards import build_reward, reward_names
from .sampling import TRUNCATION_MODES, Truncation, check_reward, class_label_ids, sample_with_grad, step_kwargs_for

logger = logging.getLogger(__name__)
MODEL_TYPES = ("class_conditional", "stable_diffusion", "sdxl", "sd3", "dit")
LOSS_TYPES = ("neg_reward", "target")
SCHEDULERS = ("auto", "ddim", "pipeline")
# the Diffusers pipeline classes of each family (ours subclass them), read from a folder's model_index.json
FAMILY_PIPELINES = {
    "class_conditional": ("ClassConditionalPipeline", "ClassConditionalLoraPipeline"),
    "stable_diffusion": ("StableDiffusionPipeline", "GuidedStableDiffusionPipeline"),
    "sdxl": ("StableDiffusionXLPipeline", "GuidedStableDiffusionXLPipeline"),
    "sd3": ("StableDiffusion3Pipeline", "GuidedStableDiffusion3Pipeline"),
    "dit": ("DiTPipeline", "GuidedDiTPipeline"),
}
SUPPORTED = ("class_conditional (UNet2DModel with class labels), stable_diffusion (SD 1.x/2.x), sdxl, "
             "sd3 (SD3-style flow transformers), dit (class-conditional DiTTransformer2DModel)")


@dataclasses.dataclass
class AlignPropConfig(TrainConfig):
    """AlignProp settings. Defaults follow TRL 0.23's ``AlignPropConfig`` where TRL had the setting (50 DDIM steps,
    eta 1, CFG 5, AdamW lr 1e-3 / betas 0.9, 0.999 / eps 1e-8 / wd 1e-4, clip 1, batch 1, fp16, TF32, its per-step
    random truncation over 0..50, LoRA r 4 / alpha 4 Gaussian on to_q/k/v/out.0, 100 steps, a checkpoint every
    step, 5 kept); README.md lists the differences that remain."""

    # model
    model_type: str = dataclasses.field(default="class_conditional",
                                        metadata={"help": "class_conditional | stable_diffusion | sdxl | sd3 | "
                                                          "dit"})
    pretrained_model: str = dataclasses.field(default="checkpoints/digits-teacher",
                                              metadata={"help": "pipeline folder or hub id; 'tiny' = tiny random "
                                                                "components of the family (tests)"})
    resolution: int | None = dataclasses.field(default=None, metadata={"help": "image side (default: native; dit: "
                                                                             "native only)"})
    use_t5: bool = dataclasses.field(default=True, metadata={"help": "sd3: load the T5 encoder (false: zeros, as "
                                                                     "Diffusers without it; saves its memory)"})
    max_sequence_length: int = dataclasses.field(default=256, metadata={"help": "sd3: T5 tokens"})
    # sampling (TRL: sample_num_steps, sample_eta, sample_guidance_scale, negative_prompts)
    scheduler: str = dataclasses.field(
        default="auto", metadata={"help": "auto (DDIM for SD 1.x/SDXL as TRL; the pipeline's own for class_conditional "
                                          "and dit, the flow scheduler for sd3) | ddim | pipeline"})
    num_inference_steps: int = dataclasses.field(default=50, metadata={"help": "T sampling steps (TRL: 50)"})
    eta: float | None = dataclasses.field(
        default=None, metadata={"help": "DDIM eta; default (none): 1.0 on schedulers with eta (TRL's sample_eta), 0 "
                                        "on those without (Euler, flow). The paper's code: 0"})
    guidance_scale: float = dataclasses.field(default=5.0, metadata={"help": "CFG weight w (1 = off; TRL: 5)"})
    negative_prompt: str | None = dataclasses.field(
        default=None, metadata={"help": "unconditional branch; none = the family's default (the empty prompt; SDXL: "
                                        "zeros when force_zeros_for_empty_prompt, as Diffusers)"})
    # truncated backprop + checkpointing (TRL: truncated_backprop_rand=True, minmax (0, 50), timestep 49)
    truncation: str = dataclasses.field(default="per_step_random",
                                        metadata={"help": "fixed | uniform | per_step_random (TRL's default)"})
    backprop_k: int = dataclasses.field(default=1, metadata={"help": "fixed: last K steps (0 = all steps); TRL's "
                                                                     "truncated_backprop_timestep t is K = T - t"})
    backprop_k_min: int = dataclasses.field(default=1, metadata={"help": "uniform: K ~ U{min..max} once per batch"})
    backprop_k_max: int = dataclasses.field(default=0, metadata={"help": "uniform: upper K (0 = T)"})
    cut_min: int = dataclasses.field(default=0, metadata={"help": "per_step_random (original/TRL) lower cut"})
    cut_max: int = dataclasses.field(default=0, metadata={"help": "per_step_random upper cut (0 = T; TRL: 50)"})
    gradient_checkpointing: bool = dataclasses.field(default=True, metadata={"help": "checkpoint each network call"})
    checkpoint_decoder: bool = dataclasses.field(default=True,
                                                 metadata={"help": "also checkpoint the VAE decode (TRL: no)"})
    # LoRA
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_target_modules: list[str] = dataclasses.field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                                       metadata={"help": "module-name suffixes (peft)"})
    lora_init: str = dataclasses.field(default="gaussian", metadata={"help": "gaussian | kaiming (B = 0 either way)"})
    # optimisation and checkpoints: TRL's defaults where they differ from other trainers' (TRL's num_epochs counts
    # optimizer steps, its save_freq epochs)
    max_train_steps: int = dataclasses.field(default=100, metadata={"help": "optimizer steps (TRL: num_epochs)"})
    train_batch_size: int = dataclasses.field(default=1, metadata={"help": "prompts per process per micro-step"})
    weight_decay: float = 1e-4
    mixed_precision: str = dataclasses.field(default="fp16", metadata={"help": "no | fp16 (GPU) | bf16"})
    allow_tf32: bool = dataclasses.field(default=True, metadata={"help": "TF32 matmuls on Ampere+ GPUs (TRL: true)"})
    checkpointing_steps: int = dataclasses.field(default=1, metadata={"help": "LoRA checkpoint every N steps (TRL: "
                                                                              "save_freq)"})
    checkpoints_total_limit: int = dataclasses.field(default=5, metadata={"help": "keep the last K (TRL: "
                                                                                  "num_checkpoint_limit)"})
    # prompts / labels
    prompts: list[str] = dataclasses.field(default_factory=list,
                                           metadata={"help": "training prompts (class labels for class_conditional; "
                                                             "class indices or id2label names for dit)"})
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
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not a family AlignProp supports; supported: "
                             f"{SUPPORTED}")
        check_choice(self, "scheduler", SCHEDULERS)
        if self.model_type == "sd3" and self.scheduler == "ddim":
            raise ValueError("scheduler=ddim with model_type=sd3: SD3-style models are flow-matching (velocity) "
                             "models; use scheduler=auto or pipeline (FlowMatchEulerDiscreteScheduler)")
        if self.model_type == "dit" and self.negative_prompt is not None:
            raise ValueError("negative_prompt with model_type=dit: DiT's unconditional branch is its null class "
                             "(num_embeds_ada_norm); leave negative_prompt unset")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1; got {self.max_sequence_length}")
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
        if self.eta is not None and self.eta < 0:
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


def check_labels(items, key: str, num_classes: int | None = None, names: dict[str, int] | None = None,
                 model_type: str = "class_conditional") -> list[int]:
    """Class labels given as prompts: integers, in ``0..num_classes-1`` when the number of classes is known; with
    ``names`` (name -> index, DiT's ``id2label``) also class names (:func:`gen.reward.sampling.class_label_ids`)."""
    return class_label_ids(items, num_classes, names, key=key, model_type=model_type)


def read_prompts(items: list[str], path: str | None) -> list[str]:
    """The prompts of a config list plus those of a file (one per line, ``#`` comments skipped)."""
    out = [str(p) for p in items]
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"prompt file {path!r} does not exist")
        out += [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return out


def check_family(cfg: AlignPropConfig) -> None:
    """A local pipeline folder's class (``model_index.json``) must be a family AlignProp supports and the one
    ``model_type`` names; ``ValueError`` naming both otherwise (hub ids are checked after loading)."""
    index = Path(cfg.pretrained_model) / "model_index.json"
    if not index.is_file():
        return
    name = json.loads(index.read_text()).get("_class_name", "?")
    family = next((f for f, names in FAMILY_PIPELINES.items() if name in names), None)
    if family is None:
        raise ValueError(f"pretrained_model {cfg.pretrained_model!r} is a {name}, a family AlignProp does not "
                         f"support; supported: {SUPPORTED}")
    if family != cfg.model_type:
        raise ValueError(f"pretrained_model {cfg.pretrained_model!r} is a {name} (model_type={family}), but "
                         f"model_type={cfg.model_type}")


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


def dit_labels(cfg: AlignPropConfig) -> tuple[int, dict[str, int]] | None:
    """``(number of classes, name -> index)`` of a DiT read without loading weights: a local pipeline folder's
    ``transformer/config.json`` (``num_embeds_ada_norm``) and ``model_index.json`` (``id2label``, split on commas
    as ``DiTPipeline`` does); None for a hub id or the tiny model (checked after loading)."""
    path = Path(cfg.pretrained_model)
    if cfg.pretrained_model == "tiny" or not path.exists():
        return None
    check_family(cfg)   # a folder of another family is named as such
    config = path / "transformer" / "config.json"
    if not config.is_file():
        raise ValueError(f"pretrained_model {cfg.pretrained_model!r} is not a DiT pipeline folder (no "
                         "transformer/config.json)")
    n = json.loads(config.read_text()).get("num_embeds_ada_norm")
    if not n:
        raise ValueError(f"pretrained_model {cfg.pretrained_model!r} has no class embeddings (num_embeds_ada_norm)")
    index = path / "model_index.json"
    id2label = (json.loads(index.read_text()).get("id2label") or {}) if index.is_file() else {}
    names = {name.strip(): int(k) for k, v in id2label.items() for name in str(v).split(",")}
    return int(n), dict(sorted(names.items()))


def _tiny_pipeline(cfg: AlignPropConfig):
    """Tiny random components of the family (tests and benchmarks; nothing downloaded)."""
    if cfg.model_type == "stable_diffusion":
        from diffusers import StableDiffusionPipeline

        from gen.models.tiny_sd import build_tiny_sd

        return StableDiffusionPipeline(**build_tiny_sd(cfg.seed), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    from gen.models.tiny_families import build_tiny_dit, build_tiny_sd3, build_tiny_sdxl
    from pipelines import GuidedDiTPipeline, GuidedStableDiffusion3Pipeline, GuidedStableDiffusionXLPipeline

    if cfg.model_type == "dit":
        return GuidedDiTPipeline(**build_tiny_dit(cfg.seed))
    if cfg.model_type == "sdxl":
        return GuidedStableDiffusionXLPipeline(**build_tiny_sdxl(cfg.seed), add_watermarker=False)
    return GuidedStableDiffusion3Pipeline(**build_tiny_sd3(cfg.seed))


def load_model(cfg: AlignPropConfig):
    """The base pipeline of the config: ``ClassConditionalLoraPipeline``, Diffusers' ``StableDiffusionPipeline``, or
    our family pipelines ``GuidedStableDiffusionXLPipeline`` / ``GuidedStableDiffusion3Pipeline`` /
    ``GuidedDiTPipeline`` (Diffusers' subclasses: their prompt encoding or labels, and ``load_lora_weights`` for the
    saved LoRA). The network is then checked against ``model_type`` (a hub id whose pipeline is of another family is
    a ``ValueError``)."""
    if cfg.model_type == "class_conditional":
        from pipelines.lora import ClassConditionalLoraPipeline

        return ClassConditionalLoraPipeline.from_pretrained(cfg.pretrained_model)
    if cfg.pretrained_model == "tiny":
        pipe = _tiny_pipeline(cfg)
    else:
        check_family(cfg)
        from diffusers import StableDiffusionPipeline

        from pipelines import GuidedDiTPipeline, GuidedStableDiffusion3Pipeline, GuidedStableDiffusionXLPipeline

        cls = {"stable_diffusion": StableDiffusionPipeline, "sdxl": GuidedStableDiffusionXLPipeline,
               "sd3": GuidedStableDiffusion3Pipeline, "dit": GuidedDiTPipeline}[cfg.model_type]
        kwargs = {"safety_checker": None} if cfg.model_type == "stable_diffusion" else {}
        if cfg.model_type == "sd3" and not cfg.use_t5:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        try:
            pipe = cls.from_pretrained(cfg.pretrained_model, **kwargs)
        except (OSError, TypeError, AttributeError) as err:
            raise ValueError(f"could not load a {cls.__name__} (model_type={cfg.model_type}) from "
                             f"{cfg.pretrained_model!r}: {err}") from err
    check_network(cfg, pipe)
    return pipe


def check_network(cfg: AlignPropConfig, pipe) -> None:
    """``ValueError`` when the loaded pipeline's denoiser is not of the family ``model_type`` names."""
    net = denoiser(pipe)
    name = type(net).__name__ if net is not None else "no denoiser"
    unet_kind = getattr(getattr(net, "config", None), "addition_embed_type", None)
    ok = {"stable_diffusion": name == "UNet2DConditionModel" and unet_kind != "text_time",
          "sdxl": name == "UNet2DConditionModel" and unet_kind == "text_time",
          "sd3": name == "SD3Transformer2DModel", "dit": name == "DiTTransformer2DModel"}.get(cfg.model_type, True)
    if not ok:
        raise ValueError(f"pretrained_model {cfg.pretrained_model!r} holds a {type(pipe).__name__} with a {name}"
                         f"{' (text_time embedding: SDXL)' if unet_kind == 'text_time' else ''}, which is not "
                         f"model_type={cfg.model_type}; supported: {SUPPORTED}")


def denoiser(pipe):
    """The pipeline's trained network: ``unet`` or ``transformer``."""
    return getattr(pipe, "unet", None) if getattr(pipe, "unet", None) is not None else getattr(pipe, "transformer",
                                                                                                None)


def select_scheduler(cfg: AlignPropConfig, pipe):
    """The sampling scheduler (set on ``pipe`` too): ``ddim`` is ``DDIMScheduler.from_config`` of the pipeline's (as
    TRL does for SD); ``pipeline`` keeps the pipeline's own; ``auto`` is DDIM for SD 1.x/SDXL and the pipeline's own
    for class-conditional models (digits UNet, DiT) and SD3 (its flow-matching Euler scheduler)."""
    from diffusers import DDIMScheduler

    ddim = cfg.scheduler == "ddim" or (cfg.scheduler == "auto" and cfg.model_type in ("stable_diffusion", "sdxl"))
    if ddim and not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe.scheduler


def resolve_eta(eta: float | None, scheduler) -> float:
    """``eta`` as given, or TRL's 1.0 on a scheduler whose ``step`` takes ``eta`` (DDIM) and 0 on the others."""
    if eta is not None:
        return float(eta)
    import inspect

    return 1.0 if "eta" in inspect.signature(scheduler.step).parameters else 0.0


def make_backend(cfg: AlignPropConfig, pipe, network):
    """The :mod:`gen.reward.sampling` backend of the pipeline, calling ``network`` (e.g. the DDP-wrapped one)."""
    from .sampling import (
        ClassConditionalBackend,
        DiTBackend,
        SD3Backend,
        StableDiffusionBackend,
        StableDiffusionXLBackend,
    )

    if cfg.model_type == "class_conditional":
        return ClassConditionalBackend(network, pipe.scheduler, cfg.guidance_scale, config_unet=pipe.unet)
    if cfg.model_type == "dit":
        return DiTBackend(pipe, network, guidance_scale=cfg.guidance_scale, resolution=cfg.resolution)
    if cfg.model_type == "sdxl":
        return StableDiffusionXLBackend(pipe, network, guidance_scale=cfg.guidance_scale,
                                        negative_prompt=cfg.negative_prompt, resolution=cfg.resolution)
    if cfg.model_type == "sd3":
        return SD3Backend(pipe, network, guidance_scale=cfg.guidance_scale, negative_prompt=cfg.negative_prompt,
                          resolution=cfg.resolution, max_sequence_length=cfg.max_sequence_length)
    return StableDiffusionBackend(network, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                                  cfg.guidance_scale, cfg.negative_prompt, cfg.resolution, config_unet=pipe.unet)


def compute_loss(cfg: AlignPropConfig, rewards: torch.Tensor) -> torch.Tensor:
    """Loss shaping of the config (no constant of any reward hidden here)."""
    if cfg.loss_type == "neg_reward":
        return -cfg.loss_scale * rewards.mean()
    return cfg.loss_scale * (rewards - cfg.reward_target).abs().mean()


def generate(cfg, backend, prompts, device, generator, truncation=None, with_grad=True, keep_mask=None):
    """Images [B,C,H,W] in [0,1] for ``prompts`` (noise and K from ``generator``) and the sampling info."""
    cond = backend.encode(prompts, device)
    shape = backend.latent_shape(len(prompts))
    latents = torch.randn(shape, generator=generator).to(device)
    with torch.set_grad_enabled(with_grad):
        x, info = sample_with_grad(backend.model_fn(cond), backend.scheduler, latents, cfg.num_inference_steps,
                                   truncation=truncation, eta=resolve_eta(cfg.eta, backend.scheduler),
                                   generator=generator, gradient_checkpointing=cfg.gradient_checkpointing and with_grad,
                                   keep_mask=keep_mask, timestep_kwargs=backend.timestep_kwargs(shape))
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
        labels = dit_labels(cfg) if cfg.model_type == "dit" else None
        if labels is not None:  # a DiT folder: indices and names checked before it loads
            self.check_dit_labels(*labels)
        n_eval = len(self.eval_prompts) * cfg.eval_samples_per_prompt + (cfg.fid_num_samples if self.eval_prompts
                                                                          else 0)
        if self.eval_prompts:
            logger.info("each evaluation samples %d images of %d steps (eval_every=%d, at start %s, at end %s)",
                        n_eval, cfg.num_inference_steps, cfg.eval_every, cfg.eval_at_start, cfg.eval_at_end)
        # 2. model (of a supported family), frozen parts in the mixed-precision dtype (as TRL does), scheduler
        if cfg.mixed_precision == "fp16" and acc.device.type == "cpu":
            raise ValueError("mixed_precision=fp16 (TRL's default) needs a GPU; on a CPU set --mixed_precision no "
                             "(or bf16)")
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        pipe = load_model(cfg)
        pipe.set_progress_bar_config(disable=True)
        if cfg.model_type == "dit" and labels is None:  # a hub id or tiny: checked against the loaded pipeline
            from gen.sampling import DiTAdapter

            self.check_dit_labels(DiTAdapter(pipe.transformer).num_classes, dict(pipe.labels))
        weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        for name, part in pipe.components.items():
            if not isinstance(part, torch.nn.Module):
                continue
            # SDXL's VAE overflows in float16 (its config says force_upcast): it stays float32, as Diffusers decodes
            keep32 = (name == "vae" and cfg.model_type == "sdxl" and weight_dtype == torch.float16
                      and getattr(part.config, "force_upcast", False))
            part.to(acc.device) if weight_dtype == torch.float32 or keep32 else part.to(acc.device, dtype=weight_dtype)
            part.requires_grad_(False)
        select_scheduler(cfg, pipe)
        step_kwargs_for(pipe.scheduler, resolve_eta(cfg.eta, pipe.scheduler))  # eta on a scheduler without it
        # 3. LoRA on the denoiser (a target matching no module: ValueError listing the module names), reward
        net = denoiser(pipe)
        if cfg.model_type == "dit":  # the loop puts the network in training mode: sample with the labels given
            from gen.sampling import no_label_dropout

            no_label_dropout(net)
        self.net_name = "transformer" if "Transformer" in type(net).__name__ else "unet"
        lcfg = add_lora(net, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules,
                        init="gaussian" if cfg.lora_init == "gaussian" else True)
        for p in net.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable LoRA in fp32 (as TRL does)
        self.reward = build_reward(cfg.rewards).to(acc.device)
        self.pipe, self.meta, self.truncation = pipe, lora_metadata(lcfg), cfg.truncation_spec()
        self.prefix = lora_prefix(net)
        self.extractor, self.base_images = None, None
        self.fid_prompts = sorted(set(self.train_prompts) | set(self.eval_prompts), key=lambda p: (len(p), p))
        return {self.net_name: Trained(net, cfg.learning_rate, save_frozen=False)}

    def check_dit_labels(self, num_classes: int, names: dict[str, int]) -> None:
        """The prompts of a DiT run: class indices in ``0..num_classes-1`` or names of its ``id2label``."""
        check_labels(self.train_prompts, "prompts", num_classes, names, "dit")
        check_labels(self.eval_prompts, "eval_prompts", num_classes, names, "dit")

    def describe(self):
        cfg = self.cfg
        n = sum(p.numel() for p in self.trainable_parameters(self.net_name))
        return (f"{n} LoRA parameters (rank {cfg.lora_rank} on {cfg.lora_target_modules}); rewards "
                f"{self.reward.names}; K mode {cfg.truncation}")

    def on_train_start(self, step):
        self.backend = make_backend(self.cfg, self.pipe, self.models[self.net_name])
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
            loss = loss + 0.0 * sum(p.sum() for p in self.trainable_parameters(self.net_name))
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
        unet = self.unwrapped(self.net_name)
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
        return lora_state_dict(self.unwrapped(self.net_name))

    def checkpoint_files(self, folder):
        if folder is not None:
            save_lora(folder, self._lora(), self.meta, prefix=self.prefix)

    def export(self, models, out):
        save_lora(out, lora_state_dict(models[self.net_name]), self.meta, prefix=self.prefix)
