"""The GBM objective of the one training loop (``train/gbm.py``): multiplicative denoising score matching.

Shetty et al. 2025 ("Dale meets Langevin"): images in [-1, 1] are shifted by ``data_offset``
(:class:`~gen.gbm.PositivityTransform`), noised in closed form by geometric Brownian motion
(``GBMScheduler.add_noise``), and the network regresses the log-space noise z (or h / x0) from the log-space input
``scheduler.scale_model_input``. The log-normal prior is fitted to the training data per channel and stored in the
scheduler config. Label dropout to a null class gives classifier-free guidance. Exports a ``GBMPipeline`` folder.
"""

from __future__ import annotations

import dataclasses

import torch

from gen.training import ImageTrainConfig, Objective, Trained, check_choice, draw_batch

from .losses import LOSS_WEIGHTINGS, mdsm_loss
from .scheduler import GBM_PREDICTION_TYPES, GBM_SAMPLERS, GBM_SCHEDULES, GBMScheduler, fit_log_stats
from .transforms import PositivityTransform


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
        check_choice(self, "sigma_schedule", GBM_SCHEDULES)
        check_choice(self, "prediction_type", GBM_PREDICTION_TYPES)
        check_choice(self, "loss_weighting", LOSS_WEIGHTINGS)
        check_choice(self, "sampler", GBM_SAMPLERS)
        # sigma <= 0, sigma_min >= sigma_max, bad mu: the scheduler names the problem
        GBMScheduler(num_train_timesteps=self.num_train_timesteps, sigma_schedule=self.sigma_schedule,
                     sigma_min=self.sigma_min, sigma_max=self.sigma_max, mu=self.mu)


class GBMObjective(Objective):
    """M-DSM loss of ``unet(scale_model_input(x_t), t, y)`` with x_t the GBM-noised positive image (x0 + offset)."""

    name, config_class = "gbm", GBMTrainConfig
    fingerprint_fields = ("dataset", "unet_preset", "resolution", "channels", "num_train_timesteps", "sigma_schedule",
                          "sigma_min", "sigma_max", "mu", "data_offset", "positivity", "prediction_type")

    def build(self):
        from gen.models.unet import build_unet
        from gen.training.objectives import image_dataset

        cfg = self.cfg
        self.dataset, self.num_classes, channels, resolution, self.class_names = image_dataset(cfg)
        # 1. positivity + log-normal fit of the training data (the prior), stored in the scheduler config
        self.to_pos = PositivityTransform(cfg.data_offset if cfg.positivity else 0.0, data_range=None)
        if isinstance(self.dataset, dict):
            all_images = self.dataset["images"]
        else:
            all_images = torch.stack([self.dataset[i]["images"] for i in range(len(self.dataset))])
        try:
            log_mean, log_std = fit_log_stats(self.to_pos(all_images))
        except ValueError as e:
            raise ValueError(f"{e} (data_offset={cfg.data_offset}, positivity={cfg.positivity})") from None
        self.sched = GBMScheduler(num_train_timesteps=cfg.num_train_timesteps, sigma_schedule=cfg.sigma_schedule,
                                  sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, mu=cfg.mu,
                                  prediction_type=cfg.prediction_type, data_log_mean=log_mean, data_log_std=log_std,
                                  data_offset=self.to_pos.offset, sampler=cfg.sampler)
        self.fit = ([round(v, 4) for v in log_mean], [round(v, 4) for v in log_std])
        unet = build_unet(cfg.unet_preset, self.num_classes, channels, resolution)
        return {"unet": Trained(unet, cfg.learning_rate, ema=True)}

    def describe(self):
        return f"log-normal fit of the data: mean {self.fit[0]} std {self.fit[1]}"

    def loss(self, step, gen, ctx):
        from gen.training.objectives import drop_labels

        cfg, dev = self.cfg, self.device
        batch = draw_batch(self.dataset, cfg.train_batch_size, gen)
        x0 = self.to_pos(batch["images"]).to(dev)
        b = x0.shape[0]
        # 2. level and log-space noise from the step's generator; closed-form GBM noising
        t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=gen)
        z = torch.randn(x0.shape, generator=gen).to(dev)
        x_t = self.sched.add_noise(x0, z, t)
        labels = None
        if self.num_classes is not None:
            labels = drop_labels(batch["class_labels"].long(), cfg.label_dropout, self.num_classes, gen).to(dev)
        # 3. network on the log-space input; M-DSM loss in the prediction space
        pred = self.models["unet"](self.sched.scale_model_input(x_t, t), t.to(dev), class_labels=labels).sample
        return mdsm_loss(self.sched, pred, x0, z, t, weighting=cfg.loss_weighting), {}

    def export(self, models, out):
        from gen.training.objectives import register_class_names
        from pipelines.gbm import GBMPipeline

        pipe = GBMPipeline(unet=models["unet"], scheduler=self.sched)
        register_class_names(pipe, self.class_names)
        pipe.save_pretrained(out)
