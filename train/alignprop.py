"""AlignProp: fine-tune a diffusion model's LoRA by backpropagating a differentiable reward through sampling.

    accelerate launch train/alignprop.py --config configs/alignprop_digits.yaml [--key value ...]
    accelerate launch --multi_gpu --num_processes 2 train/alignprop.py --config configs/alignprop_digits.yaml \
        --max_train_steps 4 --output_dir OUT

Prabhudesai, Goyal, Pathak, Fragkiadaki, "Aligning Text-to-Image Diffusion Models with Reward Backpropagation"
(arXiv 2310.03739). Per micro-step: draw prompts (or class labels), sample x_T -> x_0 with the current LoRA
weights through ``gen.reward.sample_with_grad`` (gradient checkpointing of every network call, truncated backprop
through the last K steps), decode to images in [0, 1], evaluate the weighted reward R, and minimise

    loss_type = "neg_reward":  L = -loss_scale * mean(R)
    loss_type = "target":      L =  loss_scale * mean(|R - reward_target|)    (the original aesthetic loss)

over the LoRA parameters only (AdamW, clipping, accumulation, mixed precision through Accelerate). Every
``eval_every`` steps the held-out prompts/labels are sampled without gradients with fixed noise: mean reward and,
for the digits model, FID-digits against the test split and against the base model's samples of the same noise
(the drift that shows reward hacking). Output: ``pytorch_lora_weights.safetensors`` (Diffusers format) in
``output_dir`` and in each checkpoint, ``logs.jsonl``, ``eval.jsonl``, ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gen.reward import (  # noqa: E402
    TRUNCATION_MODES,
    LoraParameters,
    Truncation,
    add_lora,
    build_reward,
    check_reward,
    lora_metadata,
    lora_state_dict,
    reward_names,
    sample_with_grad,
    save_lora,
)
from gen.training import CheckpointManager, TrainConfig, make_accelerator, parse_config, step_generator  # noqa: E402
from gen.training.config import _choice, save_config  # noqa: E402

logger = logging.getLogger("train.alignprop")
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
    eval_prompts: list[str] = dataclasses.field(default_factory=list, metadata={"help": "held-out prompts/labels"})
    eval_prompt_file: str | None = None
    # reward and loss shaping
    rewards: list[dict] | str = dataclasses.field(
        default="digits_classifier:1.0",
        metadata={"help": "'name:weight,...' or a YAML list of {name, weight, **kwargs}"})
    loss_type: str = dataclasses.field(default="neg_reward", metadata={"help": "neg_reward | target"})
    reward_target: float = dataclasses.field(default=0.0, metadata={"help": "loss_type=target: |R - target|"})
    loss_scale: float = dataclasses.field(default=1.0, metadata={"help": "loss multiplier (AlignProp: 0.01)"})
    # evaluation
    eval_every: int = dataclasses.field(default=50, metadata={"help": "evaluate every N steps (0 = only at the end)"})
    eval_samples_per_prompt: int = dataclasses.field(default=8, metadata={"help": "held-out samples per prompt"})
    fid_num_samples: int = dataclasses.field(default=0, metadata={"help": "digits: samples for FID-digits (0 = off)"})
    eval_seed: int = 1234

    def validate(self) -> None:
        super().validate()
        _choice(self, "model_type", MODEL_TYPES)
        _choice(self, "truncation", TRUNCATION_MODES)
        _choice(self, "loss_type", LOSS_TYPES)
        _choice(self, "lora_init", ("gaussian", "kaiming"))
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

    def truncation_spec(self) -> Truncation:
        return Truncation(mode=self.truncation, k=self.backprop_k or None, k_min=self.backprop_k_min,
                          k_max=self.backprop_k_max or None, cut_min=self.cut_min, cut_max=self.cut_max or None)


def read_prompts(items: list[str], path: str | None) -> list[str]:
    out = [str(p) for p in items]
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"prompt file {path!r} does not exist")
        out += [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return out


def load_model(cfg: AlignPropConfig):
    """(backend pieces, base pipeline) for the configured model: a dict with unet, scheduler (+ SD parts)."""
    if cfg.model_type == "class_conditional":
        from pipelines.lora import ClassConditionalLoraPipeline

        pipe = ClassConditionalLoraPipeline.from_pretrained(cfg.pretrained_model)
        return pipe
    from diffusers import StableDiffusionPipeline

    if cfg.pretrained_model == "tiny":
        from gen.models.tiny_sd import build_tiny_sd

        return StableDiffusionPipeline(**build_tiny_sd(cfg.seed), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    try:
        return StableDiffusionPipeline.from_pretrained(cfg.pretrained_model, safety_checker=None)
    except OSError as err:
        raise ValueError(f"could not load Stable Diffusion from {cfg.pretrained_model!r}: {err}") from err


def make_backend(cfg, pipe, unet):
    from gen.reward import ClassConditionalBackend, StableDiffusionBackend

    if cfg.model_type == "class_conditional":
        return ClassConditionalBackend(unet, pipe.scheduler, cfg.guidance_scale, config_unet=pipe.unet)
    return StableDiffusionBackend(unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                                  cfg.guidance_scale, cfg.negative_prompt, cfg.resolution, config_unet=pipe.unet)


def compute_loss(cfg, rewards: torch.Tensor) -> torch.Tensor:
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


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(AlignPropConfig, argv)
    acc = make_accelerator(cfg)
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    train_prompts = read_prompts(cfg.prompts, cfg.prompt_file)
    eval_prompts = read_prompts(cfg.eval_prompts, cfg.eval_prompt_file)
    if not train_prompts:
        raise ValueError("no training prompts (prompts / prompt_file are empty)")

    # 1. model, LoRA, reward
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
    reward = build_reward(cfg.rewards).to(acc.device)
    holder = LoraParameters(unet)
    params = list(holder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    from diffusers.optimization import get_scheduler

    n = acc.num_processes
    lr_sched = get_scheduler(cfg.lr_scheduler, opt, num_warmup_steps=cfg.lr_warmup_steps * n,
                             num_training_steps=cfg.max_train_steps * n)
    model, opt, lr_sched = acc.prepare(unet, opt, lr_sched)
    backend = make_backend(cfg, pipe, model)
    ckpt = CheckpointManager(out, cfg.checkpoints_total_limit)
    truncation = cfg.truncation_spec()
    meta = lora_metadata(lcfg)

    def save_lora_to(folder):
        if acc.is_main_process:
            save_lora(folder, lora_state_dict(acc.unwrap_model(model)), meta)

    # 2. resume
    step = 0
    path = ckpt.resolve(cfg.resume)
    if path is not None:
        state = ckpt.load(path, acc, {"lora": holder}, opt, lr_sched)
        step = int(state["step"])
        logger.info("resumed from %s at step %d", path, step)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        logger.info("%d processes on %s; %d LoRA parameters (rank %d on %s); rewards %s; K mode %s",
                    acc.num_processes, acc.device, sum(p.numel() for p in params), cfg.lora_rank,
                    cfg.lora_target_modules, reward.names, cfg.truncation)

    # 3. held-out evaluation (main process; base-model samples of the same noise kept for the drift)
    extractor, base_images = None, None
    do_eval = bool(eval_prompts)
    fid_prompts = sorted(set(train_prompts) | set(eval_prompts), key=lambda p: (len(p), p))

    def run_eval(at_step):
        nonlocal extractor, base_images
        if not (do_eval and acc.is_main_process):
            return
        ev_backend = make_backend(cfg, pipe, acc.unwrap_model(model))
        if cfg.fid_num_samples and cfg.model_type == "class_conditional" and extractor is None:
            from gen.metrics.features import build_feature_extractor

            extractor = build_feature_extractor("digits", device=acc.device)
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers = [m for m in acc.unwrap_model(model).modules() if isinstance(m, BaseTunerLayer)]
            for m in layers:
                m.enable_adapters(False)
            _, base_images = evaluate(cfg, ev_backend, reward, eval_prompts, acc.device, fid_prompts)
            for m in layers:
                m.enable_adapters(True)
        t0 = time.time()
        res, _ = evaluate(cfg, ev_backend, reward, eval_prompts, acc.device, fid_prompts, base_images, extractor)
        res.update(step=at_step, eval_s=round(time.time() - t0, 2))
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
        logger.info("eval step %d: %s", at_step,
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()})

    if step == 0:
        run_eval(0)
    acc.wait_for_everyone()

    # 4. training loop (LoRA parameters only)
    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(total=cfg.max_train_steps, initial=step, disable=not acc.is_local_main_process, desc="alignprop")
    t0 = time.time()
    while step < cfg.max_train_steps:
        logs: dict = {}
        rs, ks = [], []
        for micro in range(cfg.gradient_accumulation_steps):
            gen = step_generator(cfg.seed, step, acc.process_index, micro)
            idx = torch.randint(0, len(train_prompts), (cfg.train_batch_size,), generator=gen)
            prompts = [train_prompts[int(i)] for i in idx]
            with acc.accumulate(model), acc.autocast():
                images, info = generate(cfg, backend, prompts, acc.device, gen, truncation)
                r = check_reward(reward(images.float(), prompts), len(prompts))
                loss = compute_loss(cfg, r)
                if not loss.requires_grad:  # per_step_random detached every step: a zero gradient, ranks in step
                    loss = loss + 0.0 * sum(p.sum() for p in params)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}")
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    logs["grad_norm"] = float(acc.clip_grad_norm_(params, cfg.max_grad_norm))
                opt.step()
                lr_sched.step()
                opt.zero_grad(set_to_none=True)
            rs.append(acc.gather(r.detach()).float().mean())
            ks.append(info["k"])
        step += 1
        logs.update(loss=float(loss.detach()), reward=float(torch.stack(rs).mean()), k=sum(ks) / len(ks),
                    **{f"reward/{k}": float(v.mean()) for k, v in reward.components.items()})
        bar.update(1)
        bar.set_postfix(reward=f"{logs['reward']:.4f}")
        if acc.is_main_process and (step % cfg.log_every == 0 or step == cfg.max_train_steps):
            with open(out / "logs.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "lr": lr_sched.get_last_lr()[0],
                                    "elapsed_s": round(time.time() - t0, 2), **logs}) + "\n")
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            folder = ckpt.save(acc, step, {"lora": holder}, opt, lr_sched)
            save_lora_to(folder)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.max_train_steps:
            run_eval(step)
        acc.wait_for_everyone()
    bar.close()
    run_eval(step)
    save_lora_to(out)
    if acc.is_main_process:
        logger.info("saved LoRA to %s (%.1f s)", out / "pytorch_lora_weights.safetensors", time.time() - t0)
    acc.wait_for_everyone()
    acc.end_training()
    return out


if __name__ == "__main__":
    from gen.cli import run_main

    run_main(main)
