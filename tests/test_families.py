"""The model families on the sampling core: SDXL, SD3-style flow transformers and class-conditional DiT (plus SD
1.x/2.x for the every-guider grid).

- With plain CFG each pipeline equals Diffusers' own (``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
  ``DiTPipeline``) on the same tiny random components, seeds and scheduler, at w = 1 (no unconditional pass) and
  w > 1, with the NFE counted from the network rows really evaluated.
- APG on the flow model is Algorithm 1 of Sadat et al. 2024 on x0 = x_t - sigma v, recomputed here by hand from the
  network outputs the pipeline recorded.
- Every guider runs on every family with the NFE it implies; wrong-kind conditions and impossible guidance are
  ``ValueError``s; the pipelines round-trip ``save_pretrained`` / ``from_pretrained``.
"""

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline

from gen.guidance import APG, CFG, AdaptiveGuidance, GuidanceInterval, LinearAG, Prediction, StepInfo
from gen.models.tiny_families import build_tiny_dit, build_tiny_sd3, build_tiny_sdxl
from gen.models.tiny_sd import build_tiny_sd
from pipelines import (
    GuidedDiTPipeline,
    GuidedStableDiffusion3Pipeline,
    GuidedStableDiffusionPipeline,
    GuidedStableDiffusionXLPipeline,
)

STEPS = 4
PROMPTS = ["a photo of a cat", "a dog"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _RowCounter:
    """Counts the batch rows that go through ``module`` (its first positional or ``hidden_states``/``sample``)."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        self.rows += x.shape[0]


def _counted(pipe, net, **kw):
    counter = _RowCounter(net)
    try:
        out = pipe(**kw)
    finally:
        counter.handle.remove()
    return out, counter.rows


# --- equal to Diffusers' pipelines with plain CFG ------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_parts():
    return build_tiny_sdxl(0)


@pytest.fixture(scope="module")
def sd3_parts():
    return build_tiny_sd3(0)


@pytest.fixture(scope="module")
def dit_parts():
    return build_tiny_dit(0)


def _sdxl(parts, cls=GuidedStableDiffusionXLPipeline):
    return _quiet(cls(**parts, add_watermarker=False))


@pytest.mark.parametrize("w,negative", [(1.0, None), (5.0, None), (5.0, ["blurry", "dark"])])
def test_sdxl_equals_diffusers(sdxl_parts, w, negative):
    """Latents and images equal StableDiffusionXLPipeline's; unconditional branch = zeros (no negative prompt,
    force_zeros_for_empty_prompt) or the negative prompt, each with pooled text_embeds and time_ids."""
    ours, ref = _sdxl(sdxl_parts), _sdxl(sdxl_parts, StableDiffusionXLPipeline)
    kw = dict(prompt=PROMPTS, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=w,
              original_size=(32, 24), target_size=(16, 16))
    for output_type in ("latent", "np"):
        a, rows = _counted(ours, ours.unet, generator=_gen(), output_type=output_type, **kw)
        b = ref(generator=_gen(), output_type=output_type, **kw)
        diff = np.abs(np.asarray(a.images) - np.asarray(b.images)).max()
        assert diff <= 1e-5, f"{output_type}: max |diff| {diff:.3g}"
        nfe = STEPS if w == 1 else 2 * STEPS
        assert a.nfe == nfe and rows == nfe * len(PROMPTS)
    if w != 1:   # guidance really acts: the w=1 image is far away
        plain = ref(generator=_gen(), output_type="np", **{**kw, "guidance_scale": 1.0}).images
        assert np.abs(plain - a.images).max() > 1e-2


@pytest.mark.parametrize("w,dynamic", [(1.0, False), (5.0, False), (5.0, True)])
def test_sd3_equals_diffusers(w, dynamic, sd3_parts):
    """Latents and images equal StableDiffusion3Pipeline's (FlowMatchEuler, static shift 3 or dynamic shift mu from
    the image size), T5 absent, pooled projections on both branches."""
    parts = sd3_parts if not dynamic else build_tiny_sd3(0, use_dynamic_shifting=True)
    ours, ref = _quiet(GuidedStableDiffusion3Pipeline(**parts)), _quiet(StableDiffusion3Pipeline(**parts))
    kw = dict(prompt=PROMPTS, negative_prompt=["blurry", ""], num_inference_steps=STEPS, guidance_scale=w,
              max_sequence_length=8)
    for output_type in ("latent", "np"):
        a, rows = _counted(ours, ours.transformer, generator=_gen(), output_type=output_type, **kw)
        b = ref(generator=_gen(), output_type=output_type, **kw)
        diff = np.abs(np.asarray(a.images) - np.asarray(b.images)).max()
        assert diff <= 1e-5, f"{output_type}: max |diff| {diff:.3g}"
        nfe = STEPS if w == 1 else 2 * STEPS
        assert a.nfe == nfe and rows == nfe * len(PROMPTS)
    if dynamic:   # the dynamic shift changed the time grid (mu from the 4x4-token sequence)
        assert not torch.allclose(ours.scheduler.sigmas, _quiet(GuidedStableDiffusion3Pipeline(**sd3_parts))
                                  .scheduler.sigmas)
    if w != 1:
        plain = ref(generator=_gen(), output_type="np", **{**kw, "guidance_scale": 1.0}).images
        assert np.abs(plain - a.images).max() > 1e-2


@pytest.mark.parametrize("w", [1.0, 4.0])
def test_dit_equals_diffusers(dit_parts, w):
    """Images equal DiTPipeline's (null class 1000, learned-sigma half dropped, all latent channels guided)."""
    ours, ref = _quiet(GuidedDiTPipeline(**dit_parts)), _quiet(DiTPipeline(**dit_parts))
    labels = [1, 207, 999]
    a, rows = _counted(ours, ours.transformer, class_labels=labels, guidance_scale=w, num_inference_steps=STEPS,
                       generator=_gen(), output_type="pt")
    b = ref(class_labels=labels, guidance_scale=w, num_inference_steps=STEPS, generator=_gen(), output_type="pt")
    diff = (a.images - b.images.cpu()).abs().max().item()
    assert diff <= 1e-5, f"max |diff| {diff:.3g}"
    nfe = STEPS if w == 1 else 2 * STEPS
    assert a.nfe == nfe and rows == nfe * len(labels)
    if w != 1:
        plain = ref(class_labels=labels, guidance_scale=1.0, num_inference_steps=STEPS, generator=_gen(),
                    output_type="pt").images
        assert (plain - a.images).abs().max() > 1e-2


# --- APG on a flow model is Algorithm 1 on x0 = x_t - sigma v ------------------------------------------------------
def _algorithm1(x0_c, x0_u, m, w, eta, beta, r):
    """Sadat et al. 2024, Algorithm 1, per sample over all non-batch dims (float64)."""
    d = x0_c - x0_u
    m = d + beta * m
    d = m
    norm = d.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    d = d * torch.clamp(r / norm, max=1.0)
    unit = x0_c / x0_c.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    d_par = (d * unit).sum(dim=(1, 2, 3), keepdim=True) * unit
    d_orth = d - d_par
    return x0_c + (w - 1) * (d_orth + eta * d_par), m, norm.flatten()


def test_apg_on_flow_model_is_algorithm1_on_x0(sd3_parts):
    pipe = _quiet(GuidedStableDiffusion3Pipeline(**sd3_parts))
    calls, steps_in = [], []

    def record_net(module, args, kwargs, out):
        calls.append((kwargs["hidden_states"].double(), kwargs["timestep"].double(), out[0].double()))

    handle = pipe.transformer.register_forward_hook(record_net, with_kwargs=True)
    step = pipe.scheduler.step

    def record_step(model_output, t, sample, **kw):
        steps_in.append(model_output.double())
        return step(model_output, t, sample, **kw)

    pipe.scheduler.step = record_step
    w, eta, beta, r = 6.0, 0.0, -0.5, 0.3
    try:
        out = pipe(prompt=PROMPTS, num_inference_steps=STEPS, max_sequence_length=8, output_type="latent",
                   guider=APG(guidance_scale=w, eta=eta, momentum=beta, norm_threshold=r), generator=_gen())
    finally:
        handle.remove()
        del pipe.scheduler.step
    assert out.nfe == 2 * STEPS and len(calls) == STEPS and len(steps_in) == STEPS
    b = len(PROMPTS)
    m, clipped, sigmas = 0.0, [], pipe.scheduler.sigmas.double()
    for k, (x_in, t, v) in enumerate(calls):
        x_t = x_in[:b]
        assert torch.equal(x_in[:b], x_in[b:])                    # both branches at the same x_t
        sigma = sigmas[k]
        torch.testing.assert_close(t[0] / 1000, sigma, rtol=0, atol=1e-6)
        x0_c, x0_u = x_t - sigma * v[:b], x_t - sigma * v[b:]       # rectified flow: x0 = x_t - sigma v
        x0_hat, m, norm = _algorithm1(x0_c, x0_u, m, w, eta, beta, r)
        clipped.append(bool((norm > r).any()))
        # the guider's x0 as the pipeline applied it (x0 = x_t - sigma v of the velocity handed to the scheduler;
        # comparing velocities instead would scale float32 rounding by 1 / sigma, 112 at the last step)
        torch.testing.assert_close(x_t - sigma * steps_in[k], x0_hat, rtol=0, atol=1e-5)
        v_hat = (x_t - x0_hat) / sigma                              # back to the velocity the scheduler steps with
        if k + 1 < STEPS:                                           # and the Euler step moved x_t accordingly
            torch.testing.assert_close(calls[k + 1][0][:b], x_t + (sigmas[k + 1] - sigma) * v_hat,
                                       rtol=1e-5, atol=1e-5)
    assert any(clipped) and not all(clipped)   # both branches of the rescale were exercised
    # APG is not CFG here: the guided velocity differs from uncond + w (cond - uncond)
    x_in, _, v = calls[1]
    assert (steps_in[1] - (v[b:] + w * (v[:b] - v[b:]))).abs().max() > 1e-3


# --- every guider on every family ----------------------------------------------------------------------------------
class _Recorder(CFG):
    """CFG that records each step's conditional and unconditional x0 (to fit LinearAG on a tiny run)."""

    def needs_predictions(self, info):
        return True

    def _reset(self, batch_size, num_inference_steps):
        self.trajectories = []

    def _guide(self, cond: Prediction, uncond: Prediction | None, info: StepInfo):
        self.trajectories.append({"cond": cond.x0.clone(), "uncond": uncond.x0.clone()})
        return super()._guide(cond, uncond, info)


@pytest.fixture(scope="module")
def families(sdxl_parts, sd3_parts, dit_parts):
    sd = _quiet(GuidedStableDiffusionPipeline(**build_tiny_sd(0), safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False))
    text = dict(prompt=PROMPTS, negative_prompt=["blurry", "blurry"], num_inference_steps=STEPS, output_type="np")
    return {
        "sd": (sd, dict(text, height=32, width=32)),
        "sdxl": (_sdxl(sdxl_parts), text),
        "sd3": (_quiet(GuidedStableDiffusion3Pipeline(**sd3_parts)), dict(text, max_sequence_length=8)),
        "dit": (_quiet(GuidedDiTPipeline(**dit_parts)), dict(class_labels=[3, 8], num_inference_steps=STEPS,
                                                             output_type="np")),
    }


def _karras_levels(scheduler) -> np.ndarray:
    """sigma_t / alpha_t of each step's x_t, in closed form: s / (1 - s) for rectified flow (s = t / 1000),
    sqrt((1 - abar_t) / abar_t) for variance-preserving schedulers."""
    t = scheduler.timesteps.double().numpy()
    if not hasattr(scheduler, "alphas_cumprod"):
        s = t / scheduler.config.num_train_timesteps
        with np.errstate(divide="ignore"):
            return s / (1 - s)
    abar = scheduler.alphas_cumprod.double().numpy()
    return np.interp(t, np.arange(len(abar)), np.sqrt((1 - abar) / abar))


GUIDERS = ["cfg", "apg", "adaptive", "linear_ag", "interval"]


@pytest.mark.parametrize("guider_name", GUIDERS)
@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "dit"])
def test_every_guider_on_every_family(families, family, guider_name):
    pipe, kw = families[family]
    n = 2
    if guider_name == "cfg":
        guider, nfe = CFG(guidance_scale=3.0), 2 * STEPS
    elif guider_name == "apg":
        guider, nfe = APG(guidance_scale=3.0, eta=0.0, momentum=-0.5, norm_threshold=1.0), 2 * STEPS
    elif guider_name == "adaptive":   # Step AG: guided at steps 0 and 1, then the frozen eps offset, no refresh
        guider, nfe = AdaptiveGuidance(inner=APG(guidance_scale=3.0), criterion="step", min_steps=2,
                                       refresh_every=0), STEPS + 2
    elif guider_name == "linear_ag":   # coefficients fitted on a recorded CFG run of this family
        rec = _Recorder(guidance_scale=3.0)
        pipe(guider=rec, generator=_gen(1), **kw)
        guider = LinearAG.from_trajectories(rec.trajectories, guidance_scale=3.0, num_exact_steps=1)
        nfe = STEPS + 1
    else:
        guider, nfe = GuidanceInterval(inner=CFG(guidance_scale=3.0), sigma_lo=0.5, sigma_hi=5.0), None
    out = pipe(guider=guider, generator=_gen(), **kw)
    assert out.images.shape[0] == n and np.isfinite(out.images).all()
    if nfe is None:   # one unconditional pass per step whose noise level lies in (0.5, 5.0]
        levels = _karras_levels(pipe.scheduler)
        inside = int(((levels > 0.5) & (levels <= 5.0)).sum())
        assert 0 < inside < STEPS, levels   # the interval really gates
        nfe = STEPS + inside
    assert out.nfe == nfe
    if guider_name == "adaptive":
        assert guider.switched_at.tolist() == [2, 2]   # Step AG records the first unguided step


# --- wrong conditions, impossible guidance, loading --------------------------------------------------------------
def test_condition_kind_errors(families):
    for name in ("sd", "sdxl", "sd3"):
        pipe, kw = families[name]
        with pytest.raises(ValueError, match="text-conditional model: give prompt"):
            pipe(class_labels=[1, 2], **{k: v for k, v in kw.items() if k != "negative_prompt"})
    dit, kw = families["dit"]
    with pytest.raises(ValueError, match="give class_labels, not prompt"):
        dit(prompt="a cat", num_inference_steps=2)
    with pytest.raises(ValueError, match="class_labels out of range"):
        dit(class_labels=[1000], num_inference_steps=2)
    with pytest.raises(ValueError, match="unknown class names"):
        dit(class_labels=["tabby cat"], num_inference_steps=2)


def test_dit_without_null_class_rejects_guidance(dit_parts):
    """A DiT whose label table lacks the null row has no unconditional branch: w=1 samples, guidance is a clear
    ValueError from the core."""
    parts = build_tiny_dit(0, num_classes=10)
    for block in parts["transformer"].transformer_blocks:
        emb = block.norm1.emb.class_embedder
        table = torch.nn.Embedding(10, emb.embedding_table.embedding_dim)
        table.weight.data.copy_(emb.embedding_table.weight.data[:10])
        emb.embedding_table = table
    pipe = _quiet(GuidedDiTPipeline(**parts))
    out = pipe(class_labels=[1, 9], guidance_scale=1.0, num_inference_steps=2, output_type="np")
    assert out.nfe == 2 and np.isfinite(out.images).all()
    for guider in (CFG(guidance_scale=4.0), APG(guidance_scale=4.0)):
        with pytest.raises(ValueError, match="needs an unconditional branch, but this model has none"):
            pipe(class_labels=[1, 9], guider=guider, num_inference_steps=2)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "dit"])
def test_round_trip_callback_and_loading_errors(families, family, tmp_path):
    pipe, kw = families[family]
    cls = type(pipe)
    pipe.save_pretrained(tmp_path / family)
    loaded = _quiet(cls.from_pretrained(tmp_path / family))
    guider = APG(guidance_scale=4.0, eta=0.0, momentum=-0.5)
    seen = []

    def callback(p, step, t, tensors):
        seen.append(step)
        return {"latents": tensors["latents"]}

    a = pipe(guider=guider, generator=_gen(), callback_on_step_end=callback, **kw)
    b = loaded(guider=guider, generator=_gen(), **kw)
    np.testing.assert_allclose(a.images, b.images, atol=1e-6)
    assert seen == list(range(STEPS))
    pil = pipe(generator=_gen(), **{**kw, "output_type": "pil"}).images
    assert len(pil) == 2 and pil[0].size == (16, 16)
    with pytest.raises(ValueError, match="unknown keys"):
        pipe(callback_on_step_end=lambda p, i, t, d: {"prompt_embeds": 0}, **kw)
    with pytest.raises(ValueError, match="output_type"):
        pipe(**{**kw, "output_type": "jpg"})
    with pytest.raises(ValueError, match="not both"):
        pipe(guider=guider, guidance_scale=3.0, **kw)
    with pytest.raises(ValueError, match="does not exist"):
        cls.from_pretrained(str(tmp_path / "missing"))


# --- what the core caches per run or per network gives the values it replaces ----------------------------------
def test_core_caches_follow_changes(sd3_parts):
    from gen.diffusion.space import prediction_space
    from gen.sampling import Conditioning, adapter_for

    a, b = torch.randn(2, 3), torch.randn(2, 3)
    cond = Conditioning(cond={"e": a, "k": 1}, uncond={"e": b, "k": 1})
    assert torch.equal(cond.both()["e"], torch.cat([a, b])) and cond.both() is cond.both()
    cond.cond["e"] = c = torch.randn(2, 3)   # a new tensor: concatenated again
    assert torch.equal(cond.both()["e"], torch.cat([c, b]))

    net = build_tiny_dit(0)["transformer"]
    assert adapter_for(net).dtype == torch.float32
    net.to(torch.float64)                    # the remembered dtype follows .to()
    assert adapter_for(net).dtype == torch.float64

    for scheduler in (sd3_parts["scheduler"], build_tiny_dit(0)["scheduler"]):
        scheduler.set_timesteps(7)
        x = torch.randn(2, 4, 8, 8)
        fresh, prepared = prediction_space(scheduler), prediction_space(scheduler)
        prepared.prepare(scheduler.timesteps, x)
        x0, eps = torch.randn_like(x), torch.randn_like(x)
        for t in scheduler.timesteps:        # precomputed coefficients are bit-identical to per-step ones
            for u, v in zip(fresh.alpha_sigma(t, x), prepared.alpha_sigma(t, x)):
                assert torch.equal(u, v)
            f, g = fresh.frame(x, t), prepared.frame(x, t)
            assert torch.equal(f.sigma_ratio(), g.sigma_ratio())
            assert torch.equal(f.from_guided_x0(x0, x0, eps), g.from_guided_x0(x0, x0, eps))


def test_bench_sampling_script_smoke(tmp_path):
    """eval/bench_sampling.py as a user runs it (a subprocess): one tiny pair, one repeat, and the demo section."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "b.json"
    cmd = [sys.executable, str(root / "eval" / "bench_sampling.py"), "--sections", "dit", "--sizes", "small",
           "--repeats", "1", "--steps", "1", "--out", str(out), "--demo_out", str(tmp_path / "demo")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    assert row["pair"] == "GuidedDiTPipeline vs DiTPipeline" and row["max_abs_diff"] <= 1e-5
    assert row["rows_ours"] == row["rows_ref"] == 2 * len([1, 207, 360, 999]) and row["a_cpu_median_s"] > 0
    demo = json.loads((tmp_path / "demo" / "families_demo.json").read_text())["families"]
    assert set(demo) == {"GuidedStableDiffusionXLPipeline", "GuidedStableDiffusion3Pipeline", "GuidedDiTPipeline"}
    for fam in demo.values():
        assert fam["cfg"]["nfe"] == fam["apg"]["nfe"] == 20 and fam["apg"]["finite"]
        assert fam["cfg_vs_diffusers_max_abs_diff"] <= 1e-5
