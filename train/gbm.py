"""Train a multiplicative ("Dale meets Langevin") diffusion model and save a `GBMPipeline` folder.

    accelerate launch train/gbm.py --config configs/gbm_digits.yaml [--key value ...]
    accelerate launch --multi_gpu --num_processes 2 train/gbm.py --config configs/gbm_digits.yaml \
        --max_train_steps 20 --output_dir OUT

Objective: multiplicative denoising score matching (Shetty et al. 2025) on positive images: images in [-1, 1] are
shifted by ``data_offset`` (``gen.gbm.PositivityTransform``), noised in closed form by geometric Brownian motion
(``GBMScheduler.add_noise``), and the network regresses the log-space noise z (or h / x0) from the log-space input
``scheduler.scale_model_input``. The log-normal prior is fitted to the training data per channel and stored in the
scheduler config. Label dropout to a null class gives classifier-free guidance, as in ``train/diffusion.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gen.gbm import (  # noqa: E402
    GBM_PREDICTION_TYPES,
    GBM_SAMPLERS,
    GBM_SCHEDULES,
    LOSS_WEIGHTINGS,
    GBMScheduler,
    PositivityTransform,
    fit_log_stats,
    mdsm_loss,
)
from gen.training import ImageTrainConfig, TrainLoop, draw_batch, make_accelerator, parse_config  # noqa: E402
from gen.training.config import _choice  # noqa: E402

logger = logging.getLogger("train.gbm")


@dataclasses.dataclass
class GBMTrainConfig(ImageTrainConfig):
    num_train_timesteps: int = 1000
    sigma_schedule: str = dataclasses.field(default="geometric", metadata={"help": "constant | geometric"})
    sigma_min: float = dataclasses.field(default=0.005, metadata={"help": "log-space noise scale at t -> 0"})
    sigma_max: float = dataclasses.field(default=2.0, metadata={"help": "log-space noise scale at t = 1"})
    mu: float | None = dataclasses.field(default=None,
                                         metadata={"help": "GBM drift; None: sigma^2/2 (zero log drift)"})
    data_offset: float = dataclasses.field(default=3.0, metadata={"help": "positivity offset: x + offset > 0"})
    positivity: bool = dataclasses.field(default=True,
                                         metadata={"help": "apply the offset (false: data must already be > 0)"})
    prediction_type: str = dataclasses.field(default="log_eps", metadata={"help": "log_eps | hyvarinen | x0"})
    loss_weighting: str = dataclasses.field(default="simple", metadata={"help": "simple | mdsm"})
    sampler: str = dataclasses.field(default="ddim", metadata={"help": "default sampler saved with the pipeline"})

    def validate(self) -> None:
        super().validate()
        _choice(self, "sigma_schedule", GBM_SCHEDULES)
        _choice(self, "prediction_type", GBM_PREDICTION_TYPES)
        _choice(self, "loss_weighting", LOSS_WEIGHTINGS)
        _choice(self, "sampler", GBM_SAMPLERS)
        # sigma <= 0, sigma_min >= sigma_max, bad mu: the scheduler names the problem
        GBMScheduler(num_train_timesteps=self.num_train_timesteps, sigma_schedule=self.sigma_schedule,
                     sigma_min=self.sigma_min, sigma_max=self.sigma_max, mu=self.mu)


def main(argv=None) -> Path:
    from gen.data.build import build_image_dataset
    from gen.models.unet import build_unet

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(GBMTrainConfig, argv)
    acc = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    dataset, num_classes, channels, resolution = build_image_dataset(cfg.dataset, cfg.data_dir, cfg.resolution,
                                                                     cfg.channels, cfg.random_flip)
    # 1. positivity + log-normal fit of the training data (the prior), stored in the scheduler config
    to_pos = PositivityTransform(cfg.data_offset if cfg.positivity else 0.0, data_range=None)
    if isinstance(dataset, dict):
        all_images = dataset["images"]
    else:
        all_images = torch.stack([dataset[i]["images"] for i in range(len(dataset))])
    try:
        log_mean, log_std = fit_log_stats(to_pos(all_images))
    except ValueError as e:
        raise ValueError(f"{e} (data_offset={cfg.data_offset}, positivity={cfg.positivity})") from None
    sched = GBMScheduler(num_train_timesteps=cfg.num_train_timesteps, sigma_schedule=cfg.sigma_schedule,
                         sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, mu=cfg.mu,
                         prediction_type=cfg.prediction_type, data_log_mean=log_mean, data_log_std=log_std,
                         data_offset=to_pos.offset, sampler=cfg.sampler)
    unet = build_unet(cfg.unet_preset, num_classes, channels, resolution)
    null_class = num_classes
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    loop = TrainLoop(cfg, acc, {"unet": unet}, opt, ema_model=unet)
    model = loop.models["unet"]
    if acc.is_main_process:
        logger.info("%d processes on %s; %.2fM parameters; log-normal fit mean %s std %s", acc.num_processes,
                    acc.device, sum(p.numel() for p in unet.parameters()) / 1e6,
                    [round(v, 4) for v in log_mean], [round(v, 4) for v in log_std])

    def loss_fn(step, gen):
        batch = draw_batch(dataset, cfg.train_batch_size, gen)
        x0 = to_pos(batch["images"]).to(acc.device)
        b = x0.shape[0]
        # 2. level and log-space noise from the step's generator; closed-form GBM noising
        t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=gen)
        z = torch.randn(x0.shape, generator=gen).to(acc.device)
        x_t = sched.add_noise(x0, z, t)
        labels = None
        if num_classes is not None:
            labels = batch["class_labels"].long()
            drop = torch.rand(b, generator=gen) < cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, null_class), labels).to(acc.device)
        # 3. network on the log-space input; M-DSM loss in the prediction space
        pred = model(sched.scale_model_input(x_t, t), t.to(acc.device), class_labels=labels).sample
        return mdsm_loss(sched, pred, x0, z, t, weighting=cfg.loss_weighting), {}

    t0 = time.time()
    loop.run(loss_fn)
    acc.wait_for_everyone()
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        from pipelines.gbm import GBMPipeline

        GBMPipeline(unet=loop.final_model("unet"), scheduler=sched).save_pretrained(out)
        logger.info("saved pipeline to %s (%.1f s)", out, time.time() - t0)
    acc.wait_for_everyone()
    acc.end_training()
    return out


if __name__ == "__main__":
    from gen.cli import run_main

    run_main(main)
