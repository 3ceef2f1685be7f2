"""Train a stochastic-interpolant model (Albergo, Boffi & Vanden-Eijnden, arXiv 2303.08797) with Accelerate.

    accelerate launch train/interpolant.py --config configs/interpolant_digits.yaml [--key value ...]
    accelerate launch train/interpolant.py --config configs/interpolant_checkerboard.yaml
    accelerate launch train/interpolant.py --config configs/interpolant_bridge_digits.yaml
    accelerate launch --multi_gpu --num_processes 2 train/interpolant.py --config ... --max_train_steps 20

Three modes:

- ``dataset: digits16`` (``mode: generate``): a class-conditional UNet learns a field of the interpolant from
  N(0, I) (t = 0) to digits (t = 1), with label dropout to the null class for classifier-free guidance; saves an
  ``InterpolantPipeline`` folder.
- a 2-D toy (``checkerboard``, ``8gaussians``, ...): a ``TimeMLP`` on fresh exact samples each step; saves
  ``model/`` and ``scheduler/`` folders.
- ``mode: bridge`` on digits16: a paired, data-dependent coupling (arXiv 2310.03725): x0 = degraded digit + noise,
  x1 = the clean digit, the UNet sees ``cat([x_t, d])`` (d = the observation); saves an ``InterpolantPipeline``.

The objective is :class:`gen.interpolants.InterpolantLoss` (velocity / drift / score / noise / x1, antithetic pairs,
SiT weights); the network is called with time ``t * time_scale`` (1000 for the UNet, as Diffusers schedulers do).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from gen.data.toys import TOY_NAMES  # noqa: E402
from gen.interpolants import WEIGHTINGS, Interpolant, InterpolantLoss, InterpolantScheduler  # noqa: E402
from gen.interpolants.bridge import bridge_base, degrade  # noqa: E402
from gen.training import TrainConfig, TrainLoop, draw_batch, make_accelerator, parse_config  # noqa: E402
from gen.training.config import _choice  # noqa: E402

logger = logging.getLogger("train.interpolant")


@dataclasses.dataclass
class InterpolantTrainConfig(TrainConfig):
    dataset: str = dataclasses.field(default="digits16", metadata={"help": "digits16 | " + " | ".join(TOY_NAMES)})
    mode: str = dataclasses.field(default="generate", metadata={"help": "generate (noise -> data) | bridge (digits)"})
    # interpolant
    path: str = dataclasses.field(default="linear", metadata={"help": "linear | trig | gvp | vp | encdec"})
    gamma: str = dataclasses.field(default="zero",
                                   metadata={"help": "brownian | scaled_brownian | bsquared | sinesquared | zero"})
    kind: str = dataclasses.field(default="one_sided", metadata={"help": "one_sided | two_sided | mirror"})
    gamma_a: float = dataclasses.field(default=1.0, metadata={"help": "scale a of the gamma family"})
    prediction: str = dataclasses.field(default="velocity", metadata={"help": "velocity | drift | score | noise | x1"})
    weighting: str = dataclasses.field(default="none", metadata={"help": "none | noise | velocity | likelihood"})
    antithetic: str = dataclasses.field(default="auto", metadata={"help": "auto (drift/score) | true | false"})
    t_min: float | None = dataclasses.field(default=None, metadata={"help": "training t range (default safe)"})
    t_max: float | None = None
    time_scale: float = dataclasses.field(default=1000.0, metadata={"help": "network time input = t * time_scale"})
    # models
    unet_preset: str = dataclasses.field(default="digits",
                                         metadata={"help": "digits (1.6M) | small (digits at half width) | tiny"})
    mlp_hidden: int = dataclasses.field(default=256, metadata={"help": "TimeMLP width (2-D toys)"})
    mlp_depth: int = dataclasses.field(default=4, metadata={"help": "TimeMLP residual layers (2-D toys)"})
    label_dropout: float = dataclasses.field(default=0.1, metadata={"help": "P(label -> null class) for CFG"})
    # bridge
    degrade_factor: int = dataclasses.field(default=4, metadata={"help": "bridge: avg-pool factor of the observation"})
    degrade_noise_std: float = dataclasses.field(default=0.2, metadata={"help": "bridge: observation noise std"})
    base_noise_std: float = dataclasses.field(default=0.3, metadata={"help": "bridge: x0 = d + base_noise_std * zeta"})
    # inference defaults saved with the scheduler
    sampler: str = dataclasses.field(default="ode", metadata={"help": "ode | sde (saved scheduler default)"})
    solver: str = dataclasses.field(default="heun", metadata={"help": "euler | heun | rk4 | euler_maruyama"})

    def validate(self) -> None:
        super().validate()
        _choice(self, "dataset", ("digits16",) + TOY_NAMES)
        _choice(self, "mode", ("generate", "bridge"))
        _choice(self, "unet_preset", ("digits", "small", "tiny"))
        _choice(self, "weighting", WEIGHTINGS)
        _choice(self, "antithetic", ("auto", "true", "false"))
        if self.mode == "bridge" and self.dataset != "digits16":
            raise ValueError("mode=bridge is defined on dataset=digits16")
        if self.mode == "bridge" and self.kind != "two_sided":
            raise ValueError("mode=bridge needs kind=two_sided (x0 is the degraded digit, not noise)")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1); got {self.label_dropout}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0; got {self.time_scale}")
        self.build_loss()  # raises ValueError for bad interpolant / prediction / weighting combinations
        InterpolantScheduler(**self.scheduler_kwargs())

    def interpolant(self) -> Interpolant:
        return Interpolant(self.path, self.gamma, self.kind, gamma_a=self.gamma_a)

    def build_loss(self) -> InterpolantLoss:
        anti = None if self.antithetic == "auto" else self.antithetic == "true"
        return InterpolantLoss(self.interpolant(), self.prediction, self.weighting, anti, self.t_min, self.t_max)

    def scheduler_kwargs(self) -> dict:
        return {"path": self.path, "gamma": self.gamma, "kind": self.kind, "gamma_a": self.gamma_a,
                "prediction_type": self.prediction, "sampler": self.sampler, "solver": self.solver,
                "num_train_timesteps": self.time_scale}


def build_model(cfg: InterpolantTrainConfig, num_classes):
    if cfg.dataset != "digits16":
        from gen.models import TimeMLP

        return TimeMLP(dim=2, hidden=cfg.mlp_hidden, depth=cfg.mlp_depth)
    from gen.models.unet import digits_unet, tiny_unet

    n_embeds = None if (num_classes is None or cfg.mode == "bridge") else num_classes + 1
    in_ch = 2 if cfg.mode == "bridge" else 1
    if cfg.unet_preset == "tiny":
        unet = tiny_unet(num_class_embeds=n_embeds)
        if in_ch != 1:
            unet = type(unet).from_config({**unet.config, "in_channels": in_ch})
        return unet
    if cfg.unet_preset == "small":
        return digits_unet(in_channels=in_ch, out_channels=1, num_class_embeds=n_embeds,
                           block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=16)
    return digits_unet(in_channels=in_ch, out_channels=1, num_class_embeds=n_embeds)


def main(argv=None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(InterpolantTrainConfig, argv)
    acc = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    toy = cfg.dataset != "digits16"
    if toy:
        dataset, num_classes = None, None
    else:
        from gen.data.digits import NUM_CLASSES, load_digits16

        images, labels = load_digits16("train")
        dataset, num_classes = {"images": images, "class_labels": labels}, NUM_CLASSES
    model = build_model(cfg, num_classes)
    objective = cfg.build_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                            weight_decay=cfg.weight_decay)
    loop = TrainLoop(cfg, acc, {"model": model}, opt, ema_model=model)
    net = loop.models["model"]
    if acc.is_main_process:
        logger.info("%d processes on %s; %.2fM parameters; %r; prediction=%s antithetic=%s t in [%g, %g]",
                    acc.num_processes, acc.device, sum(p.numel() for p in model.parameters()) / 1e6,
                    objective.interpolant, objective.prediction, objective.antithetic, objective.t_min,
                    objective.t_max)

    def loss_fn(step, gen):
        if toy:
            from gen.data.toys import sample_toy

            x1 = sample_toy(cfg.dataset, cfg.train_batch_size, generator=gen).to(acc.device)

            def model_fn(x, t):
                return net(x, t * cfg.time_scale)

            return objective(model_fn, x1, generator=gen)
        batch = draw_batch(dataset, cfg.train_batch_size, gen)
        x1 = batch["images"].to(acc.device)
        b = x1.shape[0]
        x0, cond, labels = None, None, None
        if cfg.mode == "bridge":
            cond = degrade(x1, cfg.degrade_factor, cfg.degrade_noise_std, generator=gen)
            x0 = bridge_base(cond, cfg.base_noise_std, generator=gen)
        else:
            labels = batch["class_labels"].long()
            drop = torch.rand(b, generator=gen) < cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, num_classes), labels).to(acc.device)

        def model_fn(x, t):
            inp = x if cond is None else torch.cat([x, cond], dim=1)
            return net(inp, t * cfg.time_scale, class_labels=labels).sample

        return objective(model_fn, x1, x0=x0, generator=gen)

    t0 = time.time()
    loop.run(loss_fn)
    acc.wait_for_everyone()
    out = Path(cfg.output_dir)
    if acc.is_main_process:
        final = loop.final_model("model")
        sched = InterpolantScheduler(**cfg.scheduler_kwargs())
        if toy:
            final.save_pretrained(out / "model")
            sched.save_pretrained(out / "scheduler")
        else:
            # the pieces first, so a failure in the pipeline class cannot lose the trained weights
            final.save_pretrained(out / "unet")
            sched.save_pretrained(out / "scheduler")
            from pipelines import InterpolantPipeline

            base_std = cfg.base_noise_std if cfg.mode == "bridge" else 0.0
            InterpolantPipeline(unet=final, scheduler=sched, base_noise_std=base_std).save_pretrained(out)
        logger.info("saved to %s (%.1f s)", out, time.time() - t0)
    acc.wait_for_everyone()
    acc.end_training()
    return out


if __name__ == "__main__":
    from gen.cli import run_main

    run_main(main)
