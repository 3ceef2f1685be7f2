"""Guiders inside the pipelines: CFG through a guider equals plain CFG (and Diffusers' SD pipeline), AG really skips
unconditional rows, every guider runs end to end on tiny class-conditional and Stable Diffusion models."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from gen.guidance import APG, CFG, AdaptiveGuidance, GuidanceInterval, LinearAG
from gen.models.unet import tiny_unet
from pipelines import ClassConditionalPipeline, GuidedStableDiffusionPipeline

STEPS = 5


def _cc_pipe(pred_type="epsilon"):
    torch.manual_seed(0)
    pipe = ClassConditionalPipeline(tiny_unet().eval(), DDIMScheduler(beta_schedule="squaredcos_cap_v2",
                                                                      prediction_type=pred_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _linear_ag(steps=STEPS, scale=3.0):
    coeffs = [[1.0, 0.0, 0.0] for _ in range(steps)]
    return LinearAG(guidance_scale=scale, num_inference_steps=steps, coefficients=coeffs, num_exact_steps=1)


def _all_guiders():
    return {
        "cfg": CFG(guidance_scale=3.0),
        "apg": APG(guidance_scale=3.0, eta=0.0, momentum=-0.5, norm_threshold=1.0),
        "ag": AdaptiveGuidance(inner=CFG(guidance_scale=3.0), gamma_bar=0.9),
        "ag_apg": AdaptiveGuidance(inner=APG(guidance_scale=3.0), gamma_bar=0.9),
        "linear_ag": _linear_ag(),
        "interval": GuidanceInterval(inner=APG(guidance_scale=3.0), sigma_lo=0.5, sigma_hi=5.0),
    }


class _RowCounter:
    def __init__(self, unet):
        self.rows = 0
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        self.rows += x.shape[0]


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction", "sample"])
def test_cfg_guider_equals_plain_cfg(pred_type):
    pipe = _cc_pipe(pred_type)
    kw = dict(class_labels=[1, 4, 7], num_inference_steps=STEPS, output_type="pt")
    plain = pipe(guidance_scale=3.0, generator=torch.Generator().manual_seed(0), **kw)
    guided = pipe(guider=CFG(guidance_scale=3.0), generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(guided.images, plain.images, atol=5e-5, rtol=0)
    assert guided.nfe == plain.nfe == 2 * STEPS


def test_ag_above_one_is_bit_identical_and_low_gamma_skips_rows():
    pipe = _cc_pipe()
    kw = dict(class_labels=[1, 4, 7, 9], num_inference_steps=STEPS, output_type="pt")
    cfg = pipe(guider=CFG(guidance_scale=3.0), generator=torch.Generator().manual_seed(0), **kw)
    same = pipe(guider=AdaptiveGuidance(inner=CFG(guidance_scale=3.0), gamma_bar=1.0),
                generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(cfg.images, same.images) and same.nfe == 2 * STEPS
    counter = _RowCounter(pipe.unet)
    ag = AdaptiveGuidance(inner=CFG(guidance_scale=3.0), criterion="step", min_steps=1, after_switch="cond",
                          refresh_every=0)   # guided at step 0 only
    out = pipe(guider=ag, generator=torch.Generator().manual_seed(0), **kw)
    counter.handle.remove()
    assert counter.rows == 4 * (STEPS + 1)   # one unconditional pass per sample, at step 0 only
    assert out.nfe == pytest.approx(STEPS + 1)
    assert ag.switched_at.tolist() == [1, 1, 1, 1] and not ag.disabled_at_first_step


@pytest.mark.parametrize("name", list(_all_guiders()))
def test_every_guider_runs_in_class_conditional_pipeline(name):
    pipe = _cc_pipe()
    guider = _all_guiders()[name]
    for _ in range(2):   # the same guider object serves two runs: begin() resets it
        out = pipe(class_labels=[0, 5], num_inference_steps=STEPS, guider=guider, output_type="np",
                   generator=torch.Generator().manual_seed(1))
        assert out.images.shape == (2, 16, 16, 1) and np.isfinite(out.images).all()
        assert STEPS <= out.nfe <= 2 * STEPS


def test_guider_argument_errors():
    pipe = _cc_pipe()
    with pytest.raises(ValueError, match="not both"):
        pipe(class_labels=[1], num_inference_steps=2, guidance_scale=2.0, guider=CFG(guidance_scale=2.0))
    with pytest.raises(ValueError, match="Guider"):
        pipe(class_labels=[1], num_inference_steps=2, guider="apg")
    with pytest.raises(ValueError, match="fitted for 5 steps"):
        pipe(class_labels=[1], num_inference_steps=3, guider=_linear_ag())


# --- Stable Diffusion ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_parts():
    from gen.models.tiny_sd import build_tiny_sd

    return build_tiny_sd(0)


def _sd(parts, cls, scheduler=None):
    kw = dict(parts)
    if scheduler is not None:
        kw["scheduler"] = scheduler
    pipe = cls(**kw, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD_KW = dict(prompt=["a photo of a cat", "a dog"], negative_prompt=["blurry", "blurry"], num_inference_steps=4,
             height=32, width=32, output_type="np")


@pytest.mark.parametrize("pred_type,sched", [("epsilon", "ddim"), ("v_prediction", "ddim"), ("epsilon", "euler")])
def test_sd_cfg_equals_diffusers(sd_parts, pred_type, sched):
    base = sd_parts["scheduler"].config
    cls = DDIMScheduler if sched == "ddim" else EulerDiscreteScheduler
    scheduler = cls.from_config(base, prediction_type=pred_type)
    ours = _sd(sd_parts, GuidedStableDiffusionPipeline, scheduler)
    ref = _sd(sd_parts, StableDiffusionPipeline, cls.from_config(base, prediction_type=pred_type))
    a = ours(guidance_scale=5.0, generator=torch.Generator().manual_seed(0), **SD_KW)
    b = ref(guidance_scale=5.0, generator=torch.Generator().manual_seed(0), **SD_KW)
    np.testing.assert_allclose(a.images, b.images, atol=2e-5)
    assert a.nfe == 8


@pytest.mark.parametrize("name", list(_all_guiders()))
def test_sd_every_guider(sd_parts, name):
    guider = _all_guiders()[name]
    if name == "linear_ag":
        guider = _linear_ag(steps=4)
    out = _sd(sd_parts, GuidedStableDiffusionPipeline)(guider=guider, generator=torch.Generator().manual_seed(0),
                                                       **SD_KW)
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    assert 4 <= out.nfe <= 8


def test_sd_round_trip_and_errors(sd_parts, tmp_path):
    pipe = _sd(sd_parts, GuidedStableDiffusionPipeline)
    pipe.save_pretrained(tmp_path / "sd")
    loaded = GuidedStableDiffusionPipeline.from_pretrained(tmp_path / "sd")
    loaded.set_progress_bar_config(disable=True)
    g = APG(guidance_scale=4.0, eta=0.0)
    a = pipe(guider=g, generator=torch.Generator().manual_seed(0), **SD_KW).images
    b = loaded(guider=g, generator=torch.Generator().manual_seed(0), **SD_KW).images
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        pipe(guider=g, guidance_scale=3.0, **SD_KW)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(guidance_scale=float("inf"), **SD_KW)
    with pytest.raises(ValueError, match="does not exist"):
        GuidedStableDiffusionPipeline.from_pretrained(str(tmp_path / "missing"))
    next((tmp_path / "sd" / "unet").glob("*.safetensors")).write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="could not load a pipeline"):
        GuidedStableDiffusionPipeline.from_pretrained(tmp_path / "sd")


def test_flow_matching_model_with_guiders():
    """A flow-prediction model (FlowMatchEuler): CFG through the x0-space guider equals CFG on the raw velocity,
    and APG runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    pipe = ClassConditionalPipeline(tiny_unet().eval(), FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[2, 6], num_inference_steps=STEPS, output_type="pt")
    plain = pipe(guidance_scale=3.0, generator=torch.Generator().manual_seed(0), **kw)
    guided = pipe(guider=CFG(guidance_scale=3.0), generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(guided.images, plain.images, atol=5e-5, rtol=0)
    apg = pipe(guider=APG(guidance_scale=3.0), generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isfinite(apg.images).all() and apg.nfe == 2 * STEPS
