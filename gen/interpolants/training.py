"""The stochastic-interpolant objective of the one training loop (``train/interpolant.py``).

Albergo, Boffi & Vanden-Eijnden (arXiv 2303.08797). Three modes:

- ``dataset: digits16`` (``mode: generate``): a class-conditional UNet learns a field of the interpolant from
  N(0, I) (t = 0) to digits (t = 1), with label dropout to the null class for classifier-free guidance; exports an
  ``InterpolantPipeline`` folder.
- a 2-D toy (``checkerboard``, ``8gaussians``, ...): a ``TimeMLP`` on fresh exact samples each step; exports
  ``model/`` and ``scheduler/`` folders.
- ``mode: bridge`` on digits16: a paired, data-dependent coupling (arXiv 2310.03725): x0 = degraded digit + noise,
  x1 = the clean digit, the UNet sees ``cat([x_t, d])`` (d = the observation); exports an ``InterpolantPipeline``.

The loss is :class:`~gen.interpolants.InterpolantLoss` (velocity / drift / score / noise / x1, antithetic pairs,
SiT weights); the network is called with time ``t * time_scale`` (1000 for the UNet, as Diffusers schedulers do).
"""

from __future__ import annotations

import dataclasses

import torch

from gen.data.toys import TOY_NAMES
from gen.training import Objective, TrainConfig, Trained, check_choice, draw_batch

from .bridge import bridge_base, degrade
from .interpolant import Interpolant
from .objectives import WEIGHTINGS, InterpolantLoss
from .scheduler import InterpolantScheduler


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
        check_choice(self, "dataset", ("digits16",) + TOY_NAMES)
        check_choice(self, "mode", ("generate", "bridge"))
        check_choice(self, "unet_preset", ("digits", "small", "tiny"))
        check_choice(self, "weighting", WEIGHTINGS)
        check_choice(self, "antithetic", ("auto", "true", "false"))
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
    """The network of a config: a ``TimeMLP`` for 2-D toys, else a UNet preset (2 input channels for the bridge)."""
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


class InterpolantObjective(Objective):
    """:class:`InterpolantLoss` of the model on x1 ~ data (digits or an exact 2-D toy sample), x0 ~ N(0, I) or the
    bridge's degraded digit."""

    name, config_class = "interpolant", InterpolantTrainConfig
    fingerprint_fields = ("dataset", "mode", "path", "gamma", "kind", "gamma_a", "prediction", "time_scale",
                          "unet_preset", "mlp_hidden", "mlp_depth")

    def build(self):
        cfg = self.cfg
        self.toy = cfg.dataset != "digits16"
        if self.toy:
            self.dataset, self.num_classes = None, None
        else:
            from gen.data.digits import NUM_CLASSES, load_digits16

            images, labels = load_digits16("train")
            self.dataset, self.num_classes = {"images": images, "class_labels": labels}, NUM_CLASSES
        model = build_model(cfg, self.num_classes)
        self.objective = cfg.build_loss()
        return {"model": Trained(model, cfg.learning_rate, ema=True)}

    def describe(self):
        o = self.objective
        return f"{o.interpolant!r}; prediction={o.prediction} antithetic={o.antithetic} t in [{o.t_min:g}, {o.t_max:g}]"

    def loss(self, step, gen, ctx):
        cfg, dev, net = self.cfg, self.device, self.models["model"]
        if self.toy:
            from gen.data.toys import sample_toy

            x1 = sample_toy(cfg.dataset, cfg.train_batch_size, generator=gen).to(dev)

            def toy_fn(x, t):
                return net(x, t * cfg.time_scale)

            return self.objective(toy_fn, x1, generator=gen)
        batch = draw_batch(self.dataset, cfg.train_batch_size, gen)
        x1 = batch["images"].to(dev)
        x0, cond, labels = None, None, None
        if cfg.mode == "bridge":
            cond = degrade(x1, cfg.degrade_factor, cfg.degrade_noise_std, generator=gen)
            x0 = bridge_base(cond, cfg.base_noise_std, generator=gen)
        else:
            from gen.training.objectives import drop_labels

            labels = drop_labels(batch["class_labels"].long(), cfg.label_dropout, self.num_classes, gen).to(dev)

        def model_fn(x, t):
            inp = x if cond is None else torch.cat([x, cond], dim=1)
            return net(inp, t * cfg.time_scale, class_labels=labels).sample

        return self.objective(model_fn, x1, x0=x0, generator=gen)

    def export(self, models, out):
        final = models["model"]
        sched = InterpolantScheduler(**self.cfg.scheduler_kwargs())
        if self.toy:
            final.save_pretrained(out / "model")
            sched.save_pretrained(out / "scheduler")
            return
        # the pieces first, so a failure in the pipeline class cannot lose the trained weights
        final.save_pretrained(out / "unet")
        sched.save_pretrained(out / "scheduler")
        from pipelines import InterpolantPipeline

        base_std = self.cfg.base_noise_std if self.cfg.mode == "bridge" else 0.0
        InterpolantPipeline(unet=final, scheduler=sched, base_noise_std=base_std).save_pretrained(out)
