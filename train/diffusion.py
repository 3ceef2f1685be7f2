"""Train a (class-conditional) diffusion model and save a `ClassConditionalPipeline` folder.

    accelerate launch train/diffusion.py --config configs/digits_teacher.yaml [--key value ...]
    accelerate launch --multi_gpu --num_processes 2 train/diffusion.py --config configs/digits_teacher.yaml \
        --max_train_steps 20 --output_dir OUT

Objective: DDPM's simple loss (Ho et al. 2020, eq. 14) in the configured prediction space, with label dropout
to a null class so one network gives both conditional and unconditional predictions for classifier-free guidance
(Ho & Salimans 2022, Algorithm 1).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402

from gen.data.build import build_image_dataset  # noqa: E402
from gen.diffusion import from_x0_eps, make_scheduler  # noqa: E402
from gen.models.unet import build_unet  # noqa: E402
from gen.training import ImageTrainConfig, TrainLoop, draw_batch, make_accelerator, parse_config  # noqa: E402
from gen.training.config import _choice  # noqa: E402

logger = logging.getLogger("train.diffusion")


@dataclasses.dataclass
class DiffusionTrainConfig(ImageTrainConfig):
    num_train_timesteps: int = 1000
    beta_schedule: str = dataclasses.field(default="squaredcos_cap_v2",
                                           metadata={"help": "linear | scaled_linear | squaredcos_cap_v2"})
    prediction_type: str = dataclasses.field(default="epsilon", metadata={"help": "epsilon | v_prediction | sample"})
    inference_scheduler: str = dataclasses.field(default="ddim", metadata={"help": "scheduler saved with the pipeline"})

    def validate(self) -> None:
        super().validate()
        _choice(self, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
        _choice(self, "prediction_type", ("epsilon", "v_prediction", "sample"))
        make_scheduler(self.inference_scheduler)  # raises for unknown names


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(DiffusionTrainConfig, argv)
    acc = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    dataset, num_classes, channels, resolution = build_image_dataset(cfg.dataset, cfg.data_dir, cfg.resolution,
                                                                     cfg.channels, cfg.random_flip)
    unet = build_unet(cfg.unet_preset, num_classes, channels, resolution)
    null_class = num_classes
    noise_sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                prediction_type=cfg.prediction_type, clip_sample=False)
    abar = noise_sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    loop = TrainLoop(cfg, acc, {"unet": unet}, opt, ema_model=unet)
    model = loop.models["unet"]
    if acc.is_main_process:
        logger.info("%d processes on %s; %.2fM parameters", acc.num_processes, acc.device,
                    sum(p.numel() for p in unet.parameters()) / 1e6)

    def loss_fn(step, gen):
        batch = draw_batch(dataset, cfg.train_batch_size, gen)
        x0 = batch["images"].to(acc.device)
        b = x0.shape[0]
        # 1. noise level and noise, from the step's generator
        t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(acc.device)
        alpha = abar[t].sqrt().view(-1, 1, 1, 1).to(acc.device)
        sigma = (1 - abar[t]).sqrt().view(-1, 1, 1, 1).to(acc.device)
        x_t = alpha * x0 + sigma * eps
        # 2. label dropout to the null class
        labels = None
        if num_classes is not None:
            labels = batch["class_labels"].long()
            drop = torch.rand(b, generator=gen) < cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, null_class), labels).to(acc.device)
        # 3. regression target in the configured prediction space
        target = from_x0_eps(x0, eps, cfg.prediction_type, alpha, sigma)
        pred = model(x_t, t.to(acc.device), class_labels=labels).sample
        return F.mse_loss(pred.float(), target.float()), {}

    t0 = time.time()
    loop.run(loss_fn)
    acc.wait_for_everyone()
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        from pipelines import ClassConditionalPipeline

        final = loop.final_model("unet")
        sched = make_scheduler(cfg.inference_scheduler, noise_sched.config)
        ClassConditionalPipeline(unet=final, scheduler=sched).save_pretrained(out)
        logger.info("saved pipeline to %s (%.1f s)", out, time.time() - t0)
    acc.wait_for_everyone()
    acc.end_training()
    return out


if __name__ == "__main__":
    from gen.cli import run_main

    run_main(main)
