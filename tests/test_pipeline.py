"""ClassConditionalPipeline: equals Diffusers' DDIMPipeline, applies CFG exactly, round-trips, rejects bad input."""

import os

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from gen.diffusion import SCHEDULERS
from gen.models.unet import tiny_unet
from pipelines import ClassConditionalPipeline


def _pipe(num_class_embeds=11, seed=0):
    torch.manual_seed(seed)
    unet = tiny_unet(num_class_embeds=num_class_embeds).eval()
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True)
    pipe = ClassConditionalPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_equals_diffusers_ddim_pipeline_on_unconditional_unet():
    pipe = _pipe(num_class_embeds=None)
    ours = pipe(batch_size=3, num_inference_steps=6, generator=torch.Generator().manual_seed(1), output_type="np")
    ref = DDIMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(batch_size=3, num_inference_steps=6, generator=torch.Generator().manual_seed(1), eta=0.0,
                 output_type="np").images
    np.testing.assert_allclose(ours.images, theirs, atol=1e-6)
    assert ours.nfe == 6


class _LabelEchoUNet(torch.nn.Module):
    """Stand-in network whose output encodes the class label, to check the guidance arithmetic exactly."""

    def __init__(self, unet):
        super().__init__()
        self.inner = unet
        self.config, self.dtype, self.device = unet.config, unet.dtype, unet.device
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append(class_labels.clone())
        out = 0.1 * x + 0.01 * class_labels.view(-1, 1, 1, 1).float()
        return type("O", (), {"sample": out})()


def test_cfg_formula_and_nfe():
    """One guided evaluation of the core on the echo network: the CFG formula, and the rows each w evaluates."""
    from gen.diffusion.space import prediction_space
    from gen.guidance import CFG, StepInfo
    from gen.sampling import ClassUNetAdapter
    from gen.sampling.core import evaluate, guided_output

    pipe = _pipe()
    echo = _LabelEchoUNet(pipe.unet)
    adapter = ClassUNetAdapter(echo)
    x = torch.randn(2, 1, 16, 16)
    labels = torch.tensor([3, 7])
    pipe.scheduler.set_timesteps(4)
    frame = prediction_space(pipe.scheduler).frame(x, torch.tensor(5))
    for w in (0.0, 1.0, 2.5):
        echo.calls.clear()
        guider = CFG(w)
        guider.begin(2, 4)
        info = StepInfo(0, 4, torch.tensor(5), frame.sigma_ratio())
        raw_c, raw_u, n = evaluate(adapter, frame, torch.tensor(5), adapter.class_conditioning(labels),
                                   guider.cond_mask(info), guider.uncond_mask(info))
        pred, _ = guided_output(frame, guider, info, raw_c, raw_u)
        cond = 0.1 * x + 0.01 * labels.view(-1, 1, 1, 1)
        uncond = 0.1 * x + 0.01 * 10
        torch.testing.assert_close(pred, uncond + w * (cond - uncond))
        assert n == (4 if w not in (0.0, 1.0) else 2)  # network rows: both branches, or one
        assert len(echo.calls) == 1  # one batched call either way
        if w == 1.0:
            assert echo.calls[0].tolist() == [3, 7]
        if w == 0.0:
            assert echo.calls[0].tolist() == [10, 10]  # unconditional pass only


def test_guided_sampling_counts_nfe_and_is_seeded(tmp_path):
    pipe = _pipe()
    a = pipe(class_labels=[3] * 2, num_inference_steps=4, guidance_scale=2.0,
             generator=torch.Generator().manual_seed(0), output_type="pt")
    b = pipe(class_labels=[3] * 2, num_inference_steps=4, guidance_scale=2.0,
             generator=torch.Generator().manual_seed(0), output_type="pt")
    assert a.nfe == 8
    assert a.images.shape == (2, 1, 16, 16) and 0 <= a.images.min() and a.images.max() <= 1
    torch.testing.assert_close(a.images, b.images)
    pil = pipe(class_labels=1, num_inference_steps=2).images
    assert len(pil) == 1 and pil[0].size == (16, 16)


@pytest.mark.parametrize("name", sorted(set(SCHEDULERS) - {"flow_euler"}))
def test_any_vp_scheduler_runs(name):
    pipe = _pipe().use_scheduler(name)
    out = pipe(class_labels=[0, 1], num_inference_steps=3, guidance_scale=1.5,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 16, 16, 1) and np.isfinite(out.images).all()


def test_save_load_round_trip(tmp_path):
    pipe = _pipe()
    pipe.save_pretrained(tmp_path / "p")
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[3] * 2, num_inference_steps=3, guidance_scale=2.0, output_type="np")
    np.testing.assert_array_equal(pipe(generator=torch.Generator().manual_seed(4), **kw).images,
                                  loaded(generator=torch.Generator().manual_seed(4), **kw).images)


def test_bad_arguments():
    pipe = _pipe()
    with pytest.raises(ValueError, match=r"out of range: \[10\]; allowed 0..9"):
        pipe(class_labels=[10], num_inference_steps=1)
    with pytest.raises(ValueError, match="out of range"):
        pipe(class_labels=[-1], num_inference_steps=1)
    with pytest.raises(ValueError, match="1-D"):
        pipe(class_labels=[[1, 2]], num_inference_steps=1)
    with pytest.raises(ValueError, match="1-D"):
        pipe(class_labels=[], num_inference_steps=1)
    with pytest.raises(ValueError, match="integers"):
        pipe(class_labels=[1.5], num_inference_steps=1)
    with pytest.raises(ValueError, match="batch_size=3 does not match"):
        pipe(class_labels=[1, 2], batch_size=3, num_inference_steps=1)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        pipe(class_labels=[1, 2, 3], generator=[torch.Generator()] * 2, num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(class_labels=[1], guidance_scale=float("nan"), num_inference_steps=1)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(class_labels=[1], guidance_scale=-1.0, num_inference_steps=1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(class_labels=[1], num_inference_steps=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], num_inference_steps=1, output_type="jpg")
    with pytest.raises(ValueError, match="latents shape"):
        pipe(class_labels=[1], num_inference_steps=1, latents=torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="unknown scheduler 'foo'"):
        pipe.use_scheduler("foo")
    unc = _pipe(num_class_embeds=None)
    with pytest.raises(ValueError, match="unconditional"):
        unc(class_labels=[1], num_inference_steps=1)


def test_missing_or_broken_folders(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ClassConditionalPipeline.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="does not exist"):
        # relative, "org/name"-shaped, but its first part is a local folder: treated as local, no hub request
        ClassConditionalPipeline.from_pretrained(os.path.join("checkpoints", "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        ClassConditionalPipeline.from_pretrained(str(tmp_path / "empty"))
    pipe = _pipe()
    pipe.save_pretrained(tmp_path / "p")
    weights = next((tmp_path / "p" / "unet").glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not load a pipeline"):
        ClassConditionalPipeline.from_pretrained(str(tmp_path / "p"))


def test_null_class_unconditional_samples():
    pipe = _pipe()
    out = pipe(batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 1, 16, 16)
