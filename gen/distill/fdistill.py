"""f-distill: one-step generators by f-divergence distribution matching (Xu, Nie & Vahdat 2025, arXiv 2502.15681).

Symbols (paper -> code):
    G_theta(z)              ``x_gen``: the one-step student's sample, :func:`gen.distill.one_step_generate`
    x_t = a_t x + s_t eps   ``x_t`` with ``a_t, s_t`` of the teacher's prediction space at noise timestep ``t``
                            (:class:`gen.distill.spaces.NoiseLevels`: VP, rectified flow, interpolants)
    grad log p_t            teacher score, through its x0 prediction ``x0_teacher``
    grad log q_t            fake-score network (trained on student samples by DSM), ``x0_fake``
    s_p - s_q = (a_t / s_t^2) (x0_teacher - x0_fake)
    r = p_t / q_t           ``exp(D(x_t))``: the discriminator's logit estimates log r
    h(r) = r^2 f''(r)       :mod:`gen.distill.divergences`

Student loss (FastGen's ``variational_score_distillation_loss`` form):
    r  <- clip(exp(clamp(logit, -10, 10)), 0.1, 20), divided by its running mean in the time bin of t
    h  <- h(r) / mean_batch(h)                                  (both means all-reduced across processes)
    w  = 1 / mean_CHW |x_gen - x0_teacher|                      (DMD per-sample normaliser)
    g  = h w (x0_fake - x0_teacher)
    L_G = 0.5 mean (x_gen - sg(x_gen - g))^2 + lambda_gan softplus(-D(x_t))     (dL/dx_gen is g / numel)
Critic (fake score + discriminator head) loss:
    L_C = || net_fake(x_t(sg x_gen)) - target ||^2 + softplus(D(x_t(sg x_gen))) + softplus(-D(x_t(x_real)))
    (``target``: the teacher's own prediction space: eps, v, flow velocity or interpolant velocity)
The discriminator is a small head on the fake-score network's mid-level features (DMD2), or on the frozen
teacher's (FastGen). All ratio maths is done in float32 whatever the networks' precision. Networks are called
through their family's adapter (:func:`call_net`), so the same losses serve every family.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .divergences import get_divergence
from .spaces import one_step_generate  # noqa: F401  (re-exported: gen.distill.one_step_generate)

# ---------------------------------------------------------------------------------------------------------------
# networks


def call_net(net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    """The prediction of ``net`` at ``(x, t)`` through its family's adapter (:func:`gen.sampling.adapter_for`: the
    class-conditional ``UNet2DModel``, SD 1.x/2.x and SDXL ``UNet2DConditionModel``, ``SD3Transformer2DModel``,
    ``DiTTransformer2DModel``, under any DDP/FSDP/peft wrapper or :class:`gen.distill.lora.AdapterView`); any other
    module is called as ``net(x, t, **cond)`` (a 2-D ``TimeMLP``, the exact toy teacher).

    ``cond`` holds the family's conditioning inputs batched like ``x``: ``{"class_labels"}`` (class UNet, DiT),
    ``{"encoder_hidden_states"}`` (SD), plus ``text_embeds`` and ``time_ids`` (SDXL) or ``pooled_projections`` (SD3);
    ``{}``/None for unconditional models.
    """
    from gen.sampling.adapters import adapter_for

    try:
        adapter = adapter_for(net)
    except ValueError:
        out = net(x, t, **(cond or {}))
        return out.sample if hasattr(out, "sample") else out
    return adapter(x, t, **(cond or {}))


def default_feature_module(net: nn.Module) -> tuple:
    """``(module name, "output" | "input"[, index])`` of the features a discriminator head reads from ``net``: the
    UNet mid block's output ``[B, C, h, w]``; the middle transformer block's image tokens ``[B, N, C]`` (DiT; SD3's
    joint blocks return ``(text, image)``, index 1); the input of an MLP's output projection ``[B, C]``."""
    from gen.sampling.adapters import unwrap_network

    net = unwrap_network(net)
    kind = type(net).__name__
    if kind in ("DiTTransformer2DModel", "SD3Transformer2DModel"):
        middle = f"transformer_blocks.{len(net.transformer_blocks) // 2}"
        return (middle, "output", 1) if kind == "SD3Transformer2DModel" else (middle, "output")
    names = [n for n, _ in net.named_modules()]  # wrappers (peft, DDP) prefix the names
    for leaf, where in (("mid_block", "output"), ("out_proj", "input")):
        hits = [n for n in names if n == leaf or n.endswith("." + leaf)]
        if hits:
            return min(hits, key=len), where
    raise ValueError(f"no default feature layer for {type(net).__name__}; pass feature_module=(name, 'output'|'input')")


class _FeaturesReached(Exception):
    """Raised by a :class:`FeatureTap` in ``"stop"`` mode once its layer has run: ends the forward there."""


class FeatureTap:
    """Reads the features of one layer of a network during chosen calls (a forward hook; the network is unchanged).

    Outside :meth:`capture` the hook does nothing. Inside, by ``mode``:

    - ``"keep"``: the features are kept (:meth:`pop`);
    - ``"stop"``: kept, and the forward ends at the layer (:meth:`run_to_features`: a discriminator that needs only
      the encoder / mid-block features pays for no decoder);
    - ``"grad_off"``: kept with their graph, and autograd is switched off for the rest of the forward (the
      prediction that follows is detached anyway: no graph is recorded for it); restored when the block ends.

    The hook is registered at the first capture, so on a network prepared by an engine it runs after the engine's
    own hooks of that layer (an FSDP2 unit finishes its forward before a stop).

    Args:
        net: the network (any wrapper, or a :class:`gen.distill.lora.AdapterView` of a shared base).
        module: ``(name, "output" | "input"[, index of a tuple output])``; None: :func:`default_feature_module`.
    """

    def __init__(self, net: nn.Module, module: tuple | None = None):
        from gen.sampling.adapters import unwrap_network

        base = unwrap_network(net)
        spec = tuple(module or default_feature_module(base))
        name, where, index = (*spec, 0)[:3] if len(spec) == 2 else spec
        mods = dict(base.named_modules())
        if name not in mods:
            raise ValueError(f"feature module {name!r} not found in {type(base).__name__}")
        if where not in ("output", "input"):
            raise ValueError(f"feature position must be 'output' or 'input'; got {where!r}")
        self.name, self.where, self.index, self.module = name, where, int(index), mods[name]
        self.features, self._mode, self._handle = None, None, None

    def _pick(self, value):
        return value[self.index] if isinstance(value, (tuple, list)) else value

    def _output_hook(self, module, args, output):
        self._reached(self._pick(output))

    def _input_hook(self, module, args):
        self._reached(self._pick(args))

    def _reached(self, features):
        if self._mode is None:
            return
        self.features = features
        if self._mode == "stop":
            raise _FeaturesReached
        if self._mode == "grad_off":
            torch.set_grad_enabled(False)

    @contextlib.contextmanager
    def capture(self, mode: str = "keep"):
        """Keep the layer's features of the calls inside the block (see the class docstring for ``mode``)."""
        if mode not in ("keep", "stop", "grad_off"):
            raise ValueError(f"capture mode must be keep, stop or grad_off; got {mode!r}")
        if self._handle is None:
            self._handle = (self.module.register_forward_hook(self._output_hook) if self.where == "output"
                            else self.module.register_forward_pre_hook(self._input_hook))
        previous, grad = self._mode, torch.is_grad_enabled()
        self._mode, self.features = mode, None
        try:
            yield self
        finally:
            self._mode = previous
            torch.set_grad_enabled(grad)

    def run_to_features(self, fn, *args, **kwargs) -> torch.Tensor:
        """The layer's features of ``fn(*args, **kwargs)``, running the network only up to that layer."""
        with self.capture("stop"):
            try:
                fn(*args, **kwargs)
            except _FeaturesReached:
                pass
        return self.pop()

    def pop(self) -> torch.Tensor:
        feats, self.features = self.features, None
        if feats is None:
            raise RuntimeError(f"no features captured from {self.name!r}: call the network inside capture()")
        return feats

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class DiscriminatorHead(nn.Module):
    """Logit ``D(x_t) ~ log p_t(x_t) / q_t(x_t)`` from a score network's features (DMD2's ``cls_pred_branch`` idea).

    Spatial features ``[B, C, H, W]``: conv3x3 -> GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> mean over
    H, W; vector features ``[B, C]`` or token features ``[B, N, C]`` (transformers): Linear -> SiLU -> Linear -> SiLU
    (per token, then the mean over tokens). Then a linear logit plus, with ``num_classes``, a projection term
    ``<embed(y), phi>`` (Miyato & Koyama 2018) so the ratio can depend on the class.

    Args:
        in_channels: C of the features.
        hidden: width of the head.
        spatial: True for ``[B, C, H, W]`` features, False for ``[B, C]`` / ``[B, N, C]``.
        num_classes: size of the label embedding (include the null class), or None.
    """

    def __init__(self, in_channels: int, hidden: int = 128, spatial: bool = True, num_classes: int | None = None):
        super().__init__()
        if spatial:
            groups = 8 if hidden % 8 == 0 else 1
            self.body = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU(),
                nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.SiLU(),
            )
        else:
            self.body = nn.Sequential(nn.Linear(in_channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.spatial = spatial
        self.out = nn.Linear(hidden, 1)
        self.embed = nn.Embedding(num_classes, hidden) if num_classes else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)

    def forward(self, features: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        expected = (4,) if self.spatial else (2, 3)
        if features.ndim not in expected:
            raise ValueError(f"discriminator features must have {' or '.join(map(str, expected))} dims; got "
                             f"{tuple(features.shape)}")
        phi = self.body(features)
        if self.spatial:
            phi = phi.mean(dim=(2, 3))
        elif phi.ndim == 3:
            phi = phi.mean(dim=1)
        logit = self.out(phi).squeeze(1)
        if self.embed is not None and class_labels is not None:
            logit = logit + (self.embed(class_labels) * phi).sum(1)
        return logit


class Critic(nn.Module):
    """What the critic optimiser trains: the fake-score network and the discriminator head, plus the running
    per-time-bin mean of the density ratio (a buffer, so it is checkpointed with them).

    One call (so one DDP/FSDP2-wrapped forward) per use, returning ``(fake prediction, logits or None)``:

    - critic step (``real`` given, head on the fake score): the fake score runs in full on the generated half
      (DSM needs its prediction) and only up to the feature layer on the real half; the head sees both halves;
    - critic step with ``features`` (head on the teacher): the fake score on the generated half, the head on the
      teacher's features of both halves;
    - student step (``detach_prediction=True``): the prediction comes without a graph; the logits keep theirs to
      ``x_t`` (through the fake score's layers up to the features, or the teacher's ``features``).

    Args:
        fake_score: the fake-score network (teacher architecture; an :class:`AdapterView` with a shared base).
        head: the :class:`DiscriminatorHead`.
        ratio_bins: the :class:`RatioBins`.
        feature_module: the fake score's feature layer (None: :func:`default_feature_module`).
    """

    def __init__(self, fake_score: nn.Module, head: DiscriminatorHead, ratio_bins: RatioBins, feature_module=None):
        super().__init__()
        self.fake_score, self.head, self.ratio_bins = fake_score, head, ratio_bins
        self._tap = FeatureTap(fake_score, feature_module)

    def forward(self, x_t, t, cond=None, head_labels=None, features=None, logits: bool = True, real=None,
                detach_prediction: bool = False):
        """Args:
            x_t, t, cond: the generated half: noised samples, network timesteps [B], conditioning.
            head_labels: class labels of every row the head sees (both halves in the critic step), or None.
            features: the teacher's features of every row the head sees (head on the teacher), or None.
            logits: False: the prediction alone (no head).
            real: ``(x_t, t, cond)`` of the real half (critic step, head on the fake score).
            detach_prediction: the student step: no graph for the prediction.
        """
        if not logits:
            with torch.no_grad():
                return call_net(self.fake_score, x_t, t, cond), None
        if features is not None:
            if detach_prediction:
                with torch.no_grad():
                    pred = call_net(self.fake_score, x_t, t, cond)
            else:
                pred = call_net(self.fake_score, x_t, t, cond)
            return pred, self.head(features, head_labels)
        with self._tap.capture("grad_off" if detach_prediction else "keep"):
            pred = call_net(self.fake_score, x_t, t, cond)
        own = self._tap.pop()
        if real is not None:
            x_r, t_r, cond_r = real
            own = torch.cat([own, self._tap.run_to_features(call_net, self.fake_score, x_r, t_r, cond_r)])
        return pred, self.head(own, head_labels)


# ---------------------------------------------------------------------------------------------------------------
# ratio and weights


def density_ratio(logits: torch.Tensor, logit_clamp: float | None = 10.0, r_min: float | None = 0.1,
                  r_max: float | None = 20.0) -> torch.Tensor:
    """``r = clip(exp(clamp(logit, -c, c)), r_min, r_max)`` in float32, detached. None switches a bound off."""
    logits = logits.detach().float()
    if logit_clamp is not None:
        logits = logits.clamp(-logit_clamp, logit_clamp)
    r = logits.exp()
    if r_min is not None or r_max is not None:
        r = r.clamp(min=r_min, max=r_max)
    return r


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


class RatioBins(nn.Module):
    """Per-time-bin running mean of r, used to normalise r before h is applied (FastGen's first stage).

    ``[t_min, t_max]`` is cut into ``num_bins`` equal bins; each batch's mean r per bin (summed over all processes)
    updates ``mean <- ema_rate * mean + (1 - ema_rate) * batch_mean`` (``ema_rate = 0``: the batch mean alone).
    """

    def __init__(self, num_bins: int = 10, t_min: float = 0.0, t_max: float = 999.0, ema_rate: float = 0.0):
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1; got {num_bins}")
        if not t_max > t_min:
            raise ValueError(f"t_max must be > t_min; got {t_min}, {t_max}")
        if not 0.0 <= ema_rate < 1.0:
            raise ValueError(f"ratio_ema_rate must be in [0, 1); got {ema_rate}")
        self.num_bins, self.t_min, self.t_max, self.ema_rate = num_bins, float(t_min), float(t_max), ema_rate
        self.register_buffer("mean", torch.ones(num_bins))
        self.register_buffer("seen", torch.zeros(num_bins))

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        u = (t.float() - self.t_min) / (self.t_max - self.t_min)
        return (u * self.num_bins).long().clamp(0, self.num_bins - 1)

    @torch.no_grad()
    def normalize(self, r: torch.Tensor, t: torch.Tensor, update: bool = True) -> torch.Tensor:
        """``r / (running mean of r in t's bin + 1e-6)``; updates the running means first when ``update``."""
        idx = self.bin_of(t).to(r.device)
        if update:
            stats = torch.zeros(2, self.num_bins, device=r.device, dtype=torch.float32)
            stats[0].index_add_(0, idx, r.float())
            stats[1].index_add_(0, idx, torch.ones_like(r, dtype=torch.float32))
            stats = _all_reduce_sum(stats).to(self.mean.device)
            hit = stats[1] > 0
            batch_mean = stats[0][hit] / stats[1][hit]
            first = self.seen[hit] == 0
            old = self.mean[hit]
            self.mean[hit] = torch.where(first, batch_mean, self.ema_rate * old + (1 - self.ema_rate) * batch_mean)
            self.seen[hit] = 1
        return r / (self.mean.to(r.device)[idx] + 1e-6)


def fdistill_weights(r: torch.Tensor, divergence, normalize_h: bool = True) -> torch.Tensor:
    """``h(r)``, divided by its mean over the whole (all-process) batch when ``normalize_h``; float32, detached."""
    h = get_divergence(divergence).h(r.detach().float())
    if not torch.isfinite(h).all():
        raise FloatingPointError("h(r) is not finite: bound r with r_min/r_max (e.g. 0.1, 20)")
    if normalize_h:
        stats = _all_reduce_sum(torch.stack([h.sum(), torch.tensor(float(h.numel()), device=h.device)]))
        h = h / (stats[0] / stats[1] + 1e-6)
    return h


def vsd_loss(x_gen: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor, h: torch.Tensor | None = None,
             dmd_normalizer: bool = True) -> tuple[torch.Tensor, dict]:
    """The f-weighted distribution-matching loss whose gradient w.r.t. ``x_gen`` is ``h w (x0_fake - x0_teacher)``
    divided by ``x_gen.numel()``.

    Args:
        x_gen: [B, ...] student samples (with gradient).
        x0_teacher, x0_fake: [B, ...] x0 predictions of the teacher and fake score at the noised ``x_gen``.
        h: [B] per-sample weights (None: 1, i.e. reverse KL / DMD).
        dmd_normalizer: multiply by ``w = 1 / mean |x_gen - x0_teacher|`` per sample (DMD, eq. 8).
    """
    if x0_teacher.shape != x_gen.shape or x0_fake.shape != x_gen.shape:
        raise ValueError(f"x0 predictions {tuple(x0_teacher.shape)}, {tuple(x0_fake.shape)} must match x_gen "
                         f"{tuple(x_gen.shape)}")
    b = x_gen.shape[0]
    with torch.no_grad():
        xg, xt, xf = x_gen.detach().float(), x0_teacher.detach().float(), x0_fake.detach().float()
        diff = xf - xt
        scale = torch.ones(b, device=x_gen.device)
        if h is not None:
            if h.shape != (b,):
                raise ValueError(f"h must have shape [{b}]; got {tuple(h.shape)}")
            scale = scale * h.float()
        if dmd_normalizer:
            w = 1.0 / (xg - xt).abs().reshape(b, -1).mean(1).clamp_min(1e-8)
            scale = scale * w
        g = scale.reshape(-1, *([1] * (x_gen.ndim - 1))) * diff
        target = (xg - g).to(x_gen.dtype)
    loss = 0.5 * F.mse_loss(x_gen.float(), target.float())
    return loss, {"grad_norm_dm": float(g.reshape(b, -1).norm(dim=1).mean())}


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the discriminator: ``softplus(D(fake)) + softplus(-D(real))`` (optimum:
    ``D = log p_t / q_t``)."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss of the generator, ``softplus(-D(x_t(G(z))))``."""
    return F.softplus(-fake_logits.float()).mean()


# ---------------------------------------------------------------------------------------------------------------
# the objective


@dataclasses.dataclass
class FDistillSettings:
    """The f-distill knobs that are not about optimisation (see the trainer config for their help text).

    ``t_min``, ``t_max``: training noise timesteps (0 = data, T = noise; :class:`gen.distill.spaces.NoiseLevels`);
    ``timestep_shift``: SD3's shift of the training levels of a flow teacher (None: the scheduler's own).
    """

    divergence: str = "js"
    logit_clamp: float = 10.0
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    normalize_h: bool = True
    dmd_normalizer: bool = True
    gan_loss_weight: float = 1e-3
    t_min: int = 20
    t_max: int = 980
    teacher_guidance_scale: float = 1.0
    same_t_noise_for_real: bool = False
    timestep_shift: float | None = None

    def validate(self) -> None:
        get_divergence(self.divergence)
        if not self.ratio_min > 0 or not self.ratio_max > self.ratio_min:
            raise ValueError(f"need 0 < ratio_min < ratio_max; got {self.ratio_min}, {self.ratio_max}")
        if self.gan_loss_weight < 0:
            raise ValueError(f"gan_loss_weight must be >= 0; got {self.gan_loss_weight}")
        if not 0 <= self.t_min < self.t_max:
            raise ValueError(f"need 0 <= t_min < t_max; got {self.t_min}, {self.t_max}")
        if self.teacher_guidance_scale < 0:
            raise ValueError(f"teacher_guidance_scale must be >= 0; got {self.teacher_guidance_scale}")
        if self.timestep_shift is not None and not self.timestep_shift > 0:
            raise ValueError(f"timestep_shift must be > 0; got {self.timestep_shift}")


class FDistill:
    """The f-distill losses over a teacher, a critic (fake score + discriminator head) and a generator.

    Pass structure (DMD2's): the caller makes ONE student forward per iteration; its detached output is what the
    critic trains on, and the student step reuses the same (graph-carrying) output. Inside the losses:

    - critic step: fake score in full on the generated half (DSM), up to the feature layer only on the real half
      (head on the fake score) or teacher up to the feature layer on both halves, without gradient (head on the
      teacher);
    - student step: teacher without gradient (head on the fake score) or with gradient only up to its feature
      layer (head on the teacher); fake score without gradient, or with gradient only up to its feature layer
      (head on it); the logits' graph reaches ``x_t``, the predictions carry none.

    Args:
        teacher: frozen score network (any prediction type of ``scheduler``; any family of :func:`call_net`).
        critic: :class:`Critic`; its fake score has the teacher's architecture and prediction space.
        scheduler: the teacher's scheduler (prediction space, noise levels).
        settings: :class:`FDistillSettings`.
        disc_features: ``"fake"`` (DMD2: head on the fake-score network) or ``"teacher"`` (FastGen: frozen teacher).
        feature_module: the teacher's feature layer when ``disc_features="teacher"`` (the fake score's is given to
            :class:`Critic`); None: :func:`default_feature_module`.
    """

    def __init__(self, teacher: nn.Module, critic: Critic, scheduler, settings: FDistillSettings,
                 disc_features: str = "fake", feature_module=None):
        from .spaces import NoiseLevels

        settings.validate()
        if disc_features not in ("fake", "teacher"):
            raise ValueError(f"disc_features must be 'fake' or 'teacher'; got {disc_features!r}")
        self.teacher, self.critic, self.scheduler, self.s = teacher, critic, scheduler, settings
        self.disc_features = disc_features
        self.levels = NoiseLevels(scheduler, settings.t_min, settings.t_max, settings.timestep_shift)
        self.divergence = get_divergence(settings.divergence)
        # the fake score's features are tapped by the critic itself; the teacher's only when the head reads them
        self.tap = FeatureTap(teacher, feature_module) if disc_features == "teacher" else None

    # -- pieces ---------------------------------------------------------------------------------------------------
    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` training noise timesteps (see :class:`gen.distill.spaces.NoiseLevels`)."""
        return self.levels.sample(n, generator)

    def noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha_t x0 + sigma_t eps`` at noise timesteps ``t`` (in ``x0``'s dtype)."""
        alpha, sigma = self.levels.frame(x0, t).alpha_sigma()
        return alpha * x0 + sigma * eps

    def x0_of(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 implied by a prediction in the teacher's space at ``(x_t, t)``, in float32."""
        return self.levels.frame(x_t.float(), t).to_x0_eps(pred.float())[0]

    def _teacher_x0(self, x_t, t_net, t, cond, uncond, features: bool = False):
        """The teacher's (guided) x0 at ``x_t``, without graph; with ``features`` also its features of the
        conditional pass, with a graph to ``x_t`` up to the feature layer only."""
        w = self.s.teacher_guidance_scale
        if features:
            with self.tap.capture("grad_off"):
                pred_c = call_net(self.teacher, x_t, t_net, cond)
            feats = self.tap.pop()
        else:
            with torch.no_grad():
                pred_c = call_net(self.teacher, x_t, t_net, cond)
            feats = None
        with torch.no_grad():
            x0 = self.x0_of(pred_c, x_t, t)
            if w != 1.0 and uncond is not None:
                x0_u = self.x0_of(call_net(self.teacher, x_t, t_net, uncond), x_t, t)
                x0 = x0_u + w * (x0 - x0_u)
        return x0, feats

    def _labels(self, cond):
        return (cond or {}).get("class_labels")

    # -- losses ---------------------------------------------------------------------------------------------------
    def critic_loss(self, critic: nn.Module, x_gen: torch.Tensor, x_real: torch.Tensor, cond_gen: dict | None,
                    cond_real: dict | None, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Denoising score matching of the fake score on ``sg(x_gen)`` plus the discriminator loss (real vs.
        generated, both noised). ``critic`` is the (possibly DDP-wrapped) :class:`Critic`."""
        b, dev = x_gen.shape[0], x_gen.device
        x_gen = x_gen.detach()
        t_g = self.sample_t(b, generator)
        eps_g = torch.randn(x_gen.shape, generator=generator).to(dev, x_gen.dtype)
        n_real = x_real.shape[0]
        if self.s.same_t_noise_for_real and n_real == b:
            t_r, eps_r = t_g, eps_g
        else:
            t_r = self.sample_t(n_real, generator)
            eps_r = torch.randn(x_real.shape, generator=generator).to(dev, x_gen.dtype)
        x_real = x_real.to(dev, x_gen.dtype)
        xt_g, xt_r = self.noise(x_gen, t_g, eps_g), self.noise(x_real, t_r, eps_r)
        net_g, net_r = self.levels.timestep(t_g).to(dev), self.levels.timestep(t_r).to(dev)
        cond_gen, cond_real = cond_gen or {}, cond_real or {}
        labels = self._labels(_cat_cond(cond_gen, cond_real))
        if self.disc_features == "fake":
            # fake score: in full on the generated half, up to its feature layer on the real half
            pred_g, logits = critic(xt_g, net_g, cond_gen, labels, real=(xt_r, net_r, cond_real))
        else:
            with torch.no_grad():  # the teacher's features of both halves: up to the feature layer only
                feats = self.tap.run_to_features(call_net, self.teacher, torch.cat([xt_g, xt_r]),
                                                 torch.cat([net_g, net_r]), _cat_cond(cond_gen, cond_real))
            pred_g, logits = critic(xt_g, net_g, cond_gen, labels, features=feats)
        # 1. fake score: DSM in the teacher's prediction space
        target = self.levels.frame(xt_g.float(), t_g).from_x0_eps(x_gen.float(), eps_g.float())
        loss_dsm = F.mse_loss(pred_g.float(), target)
        # 2. discriminator: generated first, real second
        loss_d = discriminator_loss(logits[b:], logits[:b])
        with torch.no_grad():
            acc_real = (logits[b:] > 0).float().mean()
            acc_fake = (logits[:b] < 0).float().mean()
        return loss_dsm + loss_d, {"loss_dsm": loss_dsm.detach(), "loss_d": loss_d.detach(),
                                   "d_acc_real": acc_real, "d_acc_fake": acc_fake}

    def generator_loss(self, x_gen: torch.Tensor, cond: dict | None, generator: torch.Generator,
                       uncond: dict | None = None) -> tuple[torch.Tensor, dict]:
        """The f-weighted distribution-matching loss plus ``gan_loss_weight`` times the non-saturating GAN loss.
        The critic's parameters must not require gradients here (the trainer freezes them)."""
        b, dev = x_gen.shape[0], x_gen.device
        inner = self.critic
        t = self.sample_t(b, generator)
        eps = torch.randn(x_gen.shape, generator=generator).to(dev, x_gen.dtype)
        x_t = self.noise(x_gen, t, eps)
        td = self.levels.timestep(t).to(dev)
        # 1. teacher and fake x0 at x_t (no graph for either prediction); discriminator logit with graph to x_t
        labels = self._labels(cond)
        if self.disc_features == "fake":
            x0_teacher, _ = self._teacher_x0(x_t, td, t, cond, uncond)
            fake_pred, logits = inner(x_t, td, cond, labels, detach_prediction=True)
        else:
            x0_teacher, feats = self._teacher_x0(x_t, td, t, cond, uncond, features=True)
            fake_pred, logits = inner(x_t, td, cond, labels, features=feats, detach_prediction=True)
        x0_fake = self.x0_of(fake_pred.detach(), x_t.detach(), t)
        # 2. r and h (float32, detached), normalised per time bin and by the batch mean
        r = density_ratio(logits, self.s.logit_clamp, self.s.ratio_min, self.s.ratio_max)
        r_norm = inner.ratio_bins.normalize(r, t)
        h = fdistill_weights(r_norm, self.divergence, self.s.normalize_h)
        # 3. losses
        loss_dm, logs = vsd_loss(x_gen, x0_teacher, x0_fake, h, self.s.dmd_normalizer)
        loss = loss_dm
        loss_gan = gan_generator_loss(logits)
        if self.s.gan_loss_weight > 0:
            loss = loss + self.s.gan_loss_weight * loss_gan
        logs.update({"loss_dm": loss_dm.detach(), "loss_gan": loss_gan.detach(), "r_mean": r.mean(),
                     "h_min": h.min(), "h_max": h.max(), "logit_mean": logits.detach().float().mean()})
        logs.update(per_bin_statistics(h, r, inner.ratio_bins.bin_of(t).to(h.device), inner.ratio_bins.num_bins))
        return loss, logs


def per_bin_statistics(h: torch.Tensor, r: torch.Tensor, bins: torch.Tensor, num_bins: int) -> dict:
    """Per time bin ``k`` of this batch: ``h_bin{k}`` / ``h_std_bin{k}`` (mean and standard deviation of the
    normalised weight h), ``h_max_bin{k}``, ``r_bin{k}`` (mean of the clipped ratio r before the per-bin
    normalisation) and ``n_bin{k}`` (samples); bins without samples are left out. Logged by the trainer, so a run
    shows where in time, and how unequally, the f-weighting reweights samples. (With the per-bin normalisation of
    r, the mean of ``h = r`` (forward KL) is 1 in every bin by construction: the spread is what differs.)"""
    out = {}
    h, r = h.detach().float(), r.detach().float().to(h.device)
    for k in range(num_bins):
        sel = bins == k
        n = int(sel.sum())
        if n:
            out[f"h_bin{k}"] = h[sel].mean()
            out[f"h_std_bin{k}"] = h[sel].std(unbiased=False)
            out[f"h_max_bin{k}"] = h[sel].max()
            out[f"r_bin{k}"] = r[sel].mean()
            out[f"n_bin{k}"] = n
    return out


def _cat_cond(a: dict | None, b: dict | None) -> dict:
    a, b = a or {}, b or {}
    if set(a) != set(b):
        raise ValueError(f"generated and real conditioning differ: {sorted(a)} vs {sorted(b)}")
    return {k: torch.cat([a[k], b[k].to(a[k].device)]) for k in a}
