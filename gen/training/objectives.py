"""The diffusion and classifier objectives of the one loop (``train/diffusion.py``, ``train/classifier.py``).

- :class:`DiffusionObjective`: DDPM's simple loss (Ho et al. 2020, eq. 14) in the configured prediction space, with
  label dropout to a null class so one network gives the conditional and unconditional predictions of
  classifier-free guidance (Ho & Salimans 2022, Algorithm 1). Exports a ``ClassConditionalPipeline`` folder.
- :class:`ClassifierObjective`: cross-entropy of the digits classifier (random shifts + pixel noise); exports the
  model and ``metrics.json`` with the test accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .batches import draw_batch
from .config import ImageTrainConfig, TrainConfig, check_choice
from .loop import Objective, Trained


def drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``p`` (label dropout for classifier-free guidance).

    Args:
        labels: int64 [B]; p in [0, 1); generator: draws the [B] uniforms (on the CPU).
    """
    drop = torch.rand(labels.shape[0], generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def image_dataset(cfg: ImageTrainConfig):
    """``(dataset, num_classes or None, channels, resolution, class names or None)`` of an image config."""
    from gen.data.build import build_image_dataset

    dataset, num_classes, channels, resolution = build_image_dataset(cfg.dataset, cfg.data_dir, cfg.resolution,
                                                                     cfg.channels, cfg.random_flip)
    names = list(dataset.classes) if num_classes and hasattr(dataset, "classes") else None
    return dataset, num_classes, channels, resolution, names


def register_class_names(pipe, class_names) -> None:
    """Record a folder dataset's class-name -> index mapping (index = position) in the pipeline's config."""
    if class_names:
        pipe.register_to_config(class_names=list(class_names))


@dataclasses.dataclass
class DiffusionTrainConfig(ImageTrainConfig):
    num_train_timesteps: int = 1000
    beta_schedule: str = dataclasses.field(default="squaredcos_cap_v2",
                                           metadata={"help": "linear | scaled_linear | squaredcos_cap_v2"})
    prediction_type: str = dataclasses.field(default="epsilon", metadata={"help": "epsilon | v_prediction | sample"})
    inference_scheduler: str = dataclasses.field(default="ddim", metadata={"help": "scheduler saved with the pipeline"})

    def validate(self) -> None:
        from gen.diffusion import make_scheduler

        super().validate()
        check_choice(self, "beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check_choice(self, "prediction_type", ("epsilon", "v_prediction", "sample"))
        make_scheduler(self.inference_scheduler)  # raises for unknown names


class DiffusionObjective(Objective):
    """DDPM simple loss ``|| f(x_t, t, y) - target ||^2`` with ``x_t = alpha_t x0 + sigma_t eps`` (alpha_t^2 =
    abar_t), target eps / v / x0 by ``prediction_type``; x0 [B, C, H, W] in [-1, 1], t uniform in 0..T-1."""

    name, config_class = "diffusion", DiffusionTrainConfig
    fingerprint_fields = ("dataset", "unet_preset", "resolution", "channels", "num_train_timesteps", "beta_schedule",
                          "prediction_type")

    def build(self):
        from diffusers import DDPMScheduler

        from gen.models.unet import build_unet

        cfg = self.cfg
        self.dataset, self.num_classes, channels, resolution, self.class_names = image_dataset(cfg)
        unet = build_unet(cfg.unet_preset, self.num_classes, channels, resolution)
        self.noise_sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                         prediction_type=cfg.prediction_type, clip_sample=False)
        return {"unet": Trained(unet, cfg.learning_rate, ema=True)}

    def loss(self, step, gen, ctx):
        from gen.diffusion import from_x0_eps

        cfg, dev = self.cfg, self.device
        abar = self.noise_sched.alphas_cumprod
        batch = draw_batch(self.dataset, cfg.train_batch_size, gen)
        x0 = batch["images"].to(dev)
        b = x0.shape[0]
        # 1. noise level and noise, from the step's generator
        t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        alpha = abar[t].sqrt().view(-1, 1, 1, 1).to(dev)
        sigma = (1 - abar[t]).sqrt().view(-1, 1, 1, 1).to(dev)
        x_t = alpha * x0 + sigma * eps
        # 2. label dropout to the null class
        labels = None
        if self.num_classes is not None:
            labels = drop_labels(batch["class_labels"].long(), cfg.label_dropout, self.num_classes, gen).to(dev)
        # 3. regression target in the configured prediction space
        target = from_x0_eps(x0, eps, cfg.prediction_type, alpha, sigma)
        pred = self.models["unet"](x_t, t.to(dev), class_labels=labels).sample
        return F.mse_loss(pred.float(), target.float()), {}

    def export(self, models, out):
        from gen.diffusion import make_scheduler
        from pipelines import ClassConditionalPipeline

        sched = make_scheduler(self.cfg.inference_scheduler, self.noise_sched.config)
        pipe = ClassConditionalPipeline(unet=models["unet"], scheduler=sched)
        register_class_names(pipe, self.class_names)
        pipe.save_pretrained(out)


@dataclasses.dataclass
class ClassifierTrainConfig(TrainConfig):
    random_shift: int = dataclasses.field(default=1, metadata={"help": "random translation augmentation, pixels"})
    noise_std: float = dataclasses.field(default=0.05, metadata={"help": "Gaussian pixel noise augmentation"})
    label_smoothing: float = 0.0
    channels: tuple[int, ...] = (32, 64)
    feature_dim: int = 128
    dropout: float = 0.1

    def validate(self) -> None:
        super().validate()
        if self.random_shift < 0 or self.noise_std < 0:
            raise ValueError("random_shift and noise_std must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")


class ClassifierObjective(Objective):
    """Cross-entropy of the digits classifier on digits16-train with random shifts and pixel noise."""

    name, config_class = "classifier", ClassifierTrainConfig
    fingerprint_fields = ("channels", "feature_dim")

    def build(self):
        from gen.data.digits import NUM_CLASSES, load_digits16
        from gen.models.classifier import DigitsClassifier

        cfg = self.cfg
        images, labels = load_digits16("train")
        self.data = {"images": images, "class_labels": labels}
        model = DigitsClassifier(num_classes=NUM_CLASSES, channels=cfg.channels, feature_dim=cfg.feature_dim,
                                 dropout=cfg.dropout)
        self.t0 = time.time()
        return {"classifier": Trained(model, cfg.learning_rate, ema=True)}

    def loss(self, step, gen, ctx):
        from gen.data.digits import shift_images

        cfg = self.cfg
        batch = draw_batch(self.data, cfg.train_batch_size, gen)
        x = shift_images(batch["images"], cfg.random_shift, gen)
        x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
        logits = self.models["classifier"](x.to(self.device))
        y = batch["class_labels"].to(self.device)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        return loss, {"train_acc": (logits.argmax(1) == y).float().mean()}

    def export(self, models, out: Path):
        from gen.data.digits import load_digits16

        final = models["classifier"].eval()
        x_test, y_test = load_digits16("test")
        with torch.no_grad():
            device = next(final.parameters()).device
            acc_test = (final.predict(x_test.to(device)).cpu() == y_test).float().mean().item()
        final.save_pretrained(out)
        metrics = {"test_accuracy": acc_test, "n_test": len(y_test), "steps": self.cfg.max_train_steps,
                   "wall_time_s": round(time.time() - self.t0, 1)}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
