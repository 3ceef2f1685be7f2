"""The one sampling core (gen.sampling): CFG exists once, NFE is counted from evaluated rows, the hook and the
keep-gradient mask do what they say, conversions agree with the affine road, and bad input is named."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from gen.gbm import GBMScheduler
from gen.guidance import APG, CFG, AdaptiveGuidance, GuidanceInterval
from gen.interpolants import InterpolantScheduler
from gen.models.unet import tiny_unet
from gen.sampling import CallableAdapter, ClassUNetAdapter, Conditioning, StepHook, adapter_for, denoise
from pipelines import ClassConditionalPipeline, GBMPipeline, InterpolantPipeline

LABELS = [1, 4, 7]


def _class_pipe(kind: str):
    torch.manual_seed(0)
    if kind == "ddim":
        pipe = ClassConditionalPipeline(unet=tiny_unet().eval(), scheduler=DDIMScheduler(clip_sample=False))
    elif kind == "gbm":
        pipe = GBMPipeline(unet=tiny_unet().eval(), scheduler=GBMScheduler(data_offset=3.0, data_log_mean=[1.0],
                                                                           data_log_std=[0.2], sampler="ddim"))
    else:
        pipe = InterpolantPipeline(unet=tiny_unet().eval(), scheduler=InterpolantScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["ddim", "gbm", "interpolant"])
@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guidance_scale_is_cfg_guider(kind, w):
    """Same images and the same NFE through guidance_scale=w and guider=CFG(w); w=1 and w=0 cost one pass."""
    pipe = _class_pipe(kind)
    kw = dict(class_labels=LABELS, num_inference_steps=4, output_type="pt")
    a = pipe(guidance_scale=w, generator=torch.Generator().manual_seed(3), **kw)
    b = pipe(guider=CFG(guidance_scale=w), generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    one = pipe(guidance_scale=1.0, generator=torch.Generator().manual_seed(3), **kw).nfe
    assert a.nfe == b.nfe == (one if w in (0.0, 1.0) else 2 * one)


def test_w0_is_the_null_class_alone():
    """w = 0 samples the null class: the same images as null-class samples (batch_size without labels)."""
    pipe = _class_pipe("ddim")
    a = pipe(class_labels=LABELS, guidance_scale=0.0, num_inference_steps=4, output_type="pt",
             generator=torch.Generator().manual_seed(0))
    b = pipe(batch_size=3, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)


class _RowCounter(torch.nn.Module):
    """A UNet stand-in that records how many rows each call evaluates."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.rows = unet, []

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, x, t, class_labels=None):
        self.rows.append(x.shape[0])
        return self.unet(x, t, class_labels=class_labels)


def test_nfe_counts_evaluated_rows():
    torch.manual_seed(0)
    counter = _RowCounter(tiny_unet().eval())
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(6)
    adapter = ClassUNetAdapter(counter)
    cond = adapter.class_conditioning(torch.tensor([1, 2, 3, 4]))
    # Step AG, the paper's after-switch rule: every sample is guided at steps 0-2 and conditional-only after
    ag = AdaptiveGuidance(inner=CFG(3.0), criterion="step", min_steps=3, after_switch="cond", refresh_every=0)
    res = denoise(adapter, sched, torch.randn(4, 1, 16, 16), 6, cond, ag)
    assert counter.rows == [8, 8, 8, 4, 4, 4]  # guided to step 2 inclusive, conditional-only after
    assert res.nfe == sum(counter.rows) / 4 == 9.0
    counter.rows.clear()
    interval = GuidanceInterval(inner=CFG(3.0), sigma_lo=0.5, sigma_hi=5.0)
    sched.set_timesteps(6)
    res = denoise(adapter, sched, torch.randn(4, 1, 16, 16), 6, cond, interval)
    assert res.nfe == sum(counter.rows) / 4 and 4 < max(counter.rows) <= 8 and min(counter.rows) == 4


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample", "flow"])
def test_affine_road_equals_the_x0_road(pred):
    """APG with eta=1, no momentum and no threshold is CFG, but it goes through x0 and back: both roads agree."""
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    if pred == "flow":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    elif pred == "epsilon":
        sched = EulerDiscreteScheduler(beta_schedule="squaredcos_cap_v2")  # scaled network input, fractional t
    else:
        sched = DDIMScheduler(prediction_type=pred, clip_sample=False)
    pipe = ClassConditionalPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=LABELS, num_inference_steps=5, output_type="pt")
    a = pipe(guider=CFG(2.5), generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(guider=APG(2.5, eta=1.0), generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    c = pipe(guider=APG(2.5, eta=0.0), generator=torch.Generator().manual_seed(0), **kw).images
    assert (a - c).abs().max() > 1e-3  # the x0 road is really taken (eta matters)


class _ShiftHook(StepHook):
    def __init__(self, needs_grad):
        self.needs_grad, self.seen = needs_grad, []

    def __call__(self, state):
        self.seen.append((state.x.requires_grad, state.x0.grad_fn is not None))
        if self.needs_grad:
            (g,) = torch.autograd.grad(state.x0.sum(), state.x)
            assert torch.isfinite(g).all() and g.abs().sum() > 0
        return state.prev_sample + 0.01


@pytest.mark.parametrize("needs_grad", [False, True])
def test_hook_replaces_the_sample(needs_grad):
    torch.manual_seed(0)
    unet = tiny_unet(num_class_embeds=None).eval()
    sched = DDIMScheduler(clip_sample=False)
    x = torch.randn(2, 1, 16, 16)
    sched.set_timesteps(3)
    plain = denoise(unet, sched, x, 3).sample
    sched.set_timesteps(3)
    hook = _ShiftHook(needs_grad)
    with torch.no_grad():
        shifted = denoise(unet, sched, x, 3, hook=hook).sample
    assert hook.seen == [(needs_grad, needs_grad)] * 3
    assert not shifted.requires_grad
    assert (shifted - plain).abs().max() > 0.005  # the hook's output became the next state


def test_keep_grad_mask_and_checkpointing():
    torch.manual_seed(0)
    unet = tiny_unet(num_class_embeds=None)
    calls = []

    def net(x, t):
        calls.append(torch.is_grad_enabled())
        return unet(x, t).sample

    grads = []
    for ckpt in (False, True):
        calls.clear()
        sched = DDIMScheduler(clip_sample=False)
        sched.set_timesteps(4)
        x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
        out = denoise(CallableAdapter(net), sched, x, 4, keep_grad=[False, False, True, True],
                      gradient_checkpointing=ckpt).sample
        unet.zero_grad()
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters() if p.grad is not None])
        assert calls[:2] == [False, False] and all(calls[2:])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_unsupported_family_and_missing_uncond_branch():
    with pytest.raises(ValueError, match=r"unsupported network family Linear; supported: UNet2DModel"):
        adapter_for(torch.nn.Linear(2, 2))
    unet = tiny_unet(num_class_embeds=None).eval()
    sched = DDIMScheduler()
    sched.set_timesteps(2)
    with pytest.raises(ValueError, match="CFG needs an unconditional branch, but this model has none"):
        denoise(unet, sched, torch.randn(1, 1, 16, 16), 2, Conditioning(), CFG(2.0))
    pipe = ClassConditionalPipeline(unet=unet, scheduler=sched)
    with pytest.raises(ValueError, match="class_labels given, but this model is unconditional"):
        pipe(class_labels=[1], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"prompt given, but UNet2DModel \(class_unet\) has no text encoder input"):
        _class_pipe("ddim")(prompt="a cat", num_inference_steps=2)


def test_class_labels_to_a_text_model():
    from gen.models.tiny_sd import build_tiny_sd
    from pipelines import GuidedStableDiffusionPipeline

    pipe = GuidedStableDiffusionPipeline(**build_tiny_sd(0), safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    with pytest.raises(ValueError, match="class_labels given, but UNet2DConditionModel .* is a text-conditional model"):
        pipe("a cat", class_labels=[3], num_inference_steps=2)


def test_callback_on_step_end():
    pipe = _class_pipe("ddim")
    seen = []

    def cb(p, step, t, kw):
        seen.append(step)
        return {"latents": kw["latents"] * 0}

    out = pipe(class_labels=[1], num_inference_steps=3, callback_on_step_end=cb, output_type="pt")
    assert seen == [0, 1, 2] and torch.allclose(out.images, torch.full_like(out.images, 0.5))
    with pytest.raises(ValueError, match=r"returned unknown keys \['prompt_embeds'\]"):
        pipe(class_labels=[1], num_inference_steps=2, callback_on_step_end=lambda p, s, t, kw: {"prompt_embeds": 1})
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(class_labels=[1], num_inference_steps=2, callback_on_step_end=cb,
             callback_on_step_end_tensor_inputs=["noise_pred"])
