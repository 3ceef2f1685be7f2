"""Train the digits classifier used for class accuracy and "FID-digits" features, and save it.

    accelerate launch train/classifier.py --config configs/digits_classifier.yaml [--key value ...]

Cross-entropy on digits16-train with random shifts; test accuracy is written to ``<output_dir>/metrics.json``.
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
import torch.nn.functional as F  # noqa: E402

from gen.training import TrainConfig, TrainLoop, draw_batch, make_accelerator, parse_config  # noqa: E402

logger = logging.getLogger("train.classifier")


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


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(ClassifierTrainConfig, argv)
    from gen.data.digits import NUM_CLASSES, load_digits16, shift_images
    from gen.models.classifier import DigitsClassifier

    acc = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    images, labels = load_digits16("train")
    data = {"images": images, "class_labels": labels}
    model = DigitsClassifier(num_classes=NUM_CLASSES, channels=cfg.channels, feature_dim=cfg.feature_dim,
                             dropout=cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    loop = TrainLoop(cfg, acc, {"classifier": model}, opt, ema_model=model)
    net = loop.models["classifier"]

    def loss_fn(step, gen):
        batch = draw_batch(data, cfg.train_batch_size, gen)
        x = shift_images(batch["images"], cfg.random_shift, gen)
        x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
        logits = net(x.to(acc.device))
        y = batch["class_labels"].to(acc.device)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        return loss, {"train_acc": (logits.argmax(1) == y).float().mean()}

    t0 = time.time()
    loop.run(loss_fn)
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        final = loop.final_model("classifier").eval()
        x_test, y_test = load_digits16("test")
        with torch.no_grad():
            acc_test = (final.predict(x_test.to(acc.device)).cpu() == y_test).float().mean().item()
        final.save_pretrained(out)
        metrics = {"test_accuracy": acc_test, "n_test": len(y_test), "steps": cfg.max_train_steps,
                   "wall_time_s": round(time.time() - t0, 1)}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info("test accuracy %.4f; saved to %s", acc_test, out)
    acc.wait_for_everyone()
    acc.end_training()
    return out


if __name__ == "__main__":
    from gen.cli import run_main

    run_main(main)
