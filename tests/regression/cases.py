"""Outputs of the shipped checkpoints with fixed seeds and explicit settings, kept as a regression test.

Recorded before the sampling core replaced the per-pipeline loops (issue 13); ``tests/test_regression.py`` checks
that every case still gives the recorded tensor to 1e-5. A case whose output changes on purpose is re-recorded with

    python -m tests.regression.cases --write NAME [NAME ...]

and the reason goes into BENCHMARKS.md ("Regression outputs"). Each case uses the public pipeline API only, so it
survives refactors of what is behind it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "checkpoints"
EXPECTED = Path(__file__).with_name("expected.safetensors")
LABELS = [0, 3, 7, 9]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _teacher():
    from pipelines import ClassConditionalPipeline

    return _quiet(ClassConditionalPipeline.from_pretrained(CKPT / "digits-teacher"))


def teacher_cfg_scale():
    return _teacher()(class_labels=LABELS, num_inference_steps=10, guidance_scale=2.0, generator=_g(),
                      output_type="pt").images


def teacher_cfg_guider():
    from gen.guidance import CFG

    return _teacher()(class_labels=LABELS, num_inference_steps=10, guider=CFG(guidance_scale=2.0), generator=_g(),
                      output_type="pt").images


def teacher_apg():
    from gen.guidance import APG

    apg = APG(guidance_scale=6.0, eta=0.0, momentum=-0.5, norm_threshold=1.5)
    return _teacher()(class_labels=LABELS, num_inference_steps=10, guider=apg, generator=_g(),
                      output_type="pt").images


def teacher_ag():
    from gen.guidance import CFG, AdaptiveGuidance

    ag = AdaptiveGuidance(inner=CFG(guidance_scale=3.0), gamma_bar=0.999, min_steps=4, criterion="eps_cosine",
                          after_switch="cond", refresh_every=0)  # the rule recorded before issue 17's defaults
    return _teacher()(class_labels=LABELS, num_inference_steps=10, guider=ag, generator=_g(),
                      output_type="pt").images


def teacher_eta_unguided():
    return _teacher()(class_labels=LABELS, num_inference_steps=10, eta=0.5, generator=_g(1), output_type="pt").images


def _gbm():
    from pipelines import GBMPipeline

    return _quiet(GBMPipeline.from_pretrained(CKPT / "digits-gbm"))


def gbm_ddim():
    return _gbm()(class_labels=LABELS, num_inference_steps=20, sampler="ddim", generator=_g(),
                  output_type="pt").images


def gbm_dls():
    return _gbm()(class_labels=LABELS, num_inference_steps=40, sampler="dls", generator=_g(),
                  output_type="pt").images


def gbm_ddim_cfg():
    return _gbm()(class_labels=LABELS, num_inference_steps=20, sampler="ddim", guidance_scale=2.0, generator=_g(),
                  output_type="pt").images


def _interp(name="digits-interpolant"):
    from pipelines import InterpolantPipeline

    return _quiet(InterpolantPipeline.from_pretrained(CKPT / name))


def interpolant_ode_w2():
    return _interp()(class_labels=LABELS, num_inference_steps=8, guidance_scale=2.0, generator=_g(),
                     output_type="pt").images


def interpolant_ode_cfg_guider():
    from gen.guidance import CFG

    return _interp()(class_labels=LABELS, num_inference_steps=8, guider=CFG(guidance_scale=2.0), generator=_g(),
                     output_type="pt").images


def interpolant_sde():
    return _interp()(class_labels=LABELS, num_inference_steps=20, sampler="sde", generator=_g(),
                     output_type="pt").images


def interpolant_bridge():
    from gen.data.digits import load_digits16
    from gen.interpolants.bridge import degrade

    x, _ = load_digits16("test")
    d = degrade(x[:4], 4, 0.2, generator=_g(5))
    return _interp("digits-bridge")(source_images=d, num_inference_steps=8, generator=_g(),
                                    output_type="pt").images


def one_step_student():
    from pipelines import OneStepPipeline

    pipe = _quiet(OneStepPipeline.from_pretrained(CKPT / "digits-fdistill-js"))
    return pipe(class_labels=LABELS, generator=_g(), output_type="pt").images


def one_step_flow_student():
    """The one-step student distilled from the digits interpolant (shipped after the sampling core landed)."""
    from pipelines import OneStepPipeline

    pipe = _quiet(OneStepPipeline.from_pretrained(CKPT / "digits-interpolant-fdistill"))
    return pipe(class_labels=LABELS, generator=_g(), output_type="pt").images


def _inverse_setup(sigma_y=0.05):
    from gen.data.digits import load_digits16
    from gen.inverse import Inpainting
    from pipelines import RedDiffPipeline

    teacher = _teacher()
    pipe = _quiet(RedDiffPipeline(unet=teacher.unet, scheduler=teacher.scheduler))
    x, _ = load_digits16("test")
    op = Inpainting.box((16, 16), 6, sigma_y=sigma_y)
    y = op.measure(x[:4], generator=_g(3))
    return pipe, op, y


def reddiff_box():
    pipe, op, y = _inverse_setup()
    return pipe(y, op, method="reddiff", num_inference_steps=20, lr=0.1, lam=8.0, weighting="const", t_max=250,
                generator=_g(), output_type="pt").images


def dps_box():
    pipe, op, y = _inverse_setup()
    return pipe(y, op, method="dps", num_inference_steps=20, zeta=1.0, eta=1.0, generator=_g(),
                output_type="pt").images


def alignprop_lora():
    from pipelines import ClassConditionalLoraPipeline

    pipe = _quiet(ClassConditionalLoraPipeline.from_pretrained(CKPT / "digits-teacher"))
    pipe.load_lora_weights(CKPT / "digits-alignprop-lora")
    return pipe(class_labels=[1, 2, 5, 5], num_inference_steps=10, generator=_g(), output_type="pt").images


def alignprop_sample_with_grad():
    """The grad-enabled sampling loop of AlignProp on the teacher (eta 0.7, CFG 2, all steps kept)."""
    from gen.reward import ClassConditionalBackend, sample_with_grad

    pipe = _teacher()
    backend = ClassConditionalBackend(pipe.unet, pipe.scheduler, guidance_scale=2.0)
    cond = backend.encode(LABELS, "cpu")
    latents = torch.randn(backend.latent_shape(len(LABELS)), generator=_g())
    x, _ = sample_with_grad(backend.model_fn(cond), pipe.scheduler, latents, 10, eta=0.7, generator=_g(1),
                            gradient_checkpointing=False)
    return backend.decode(x.detach())


def tiny_sd_cfg():
    """Stable Diffusion 1.x road on tiny random components (built from configs with a fixed seed)."""
    from gen.models.tiny_sd import build_tiny_sd
    from pipelines import GuidedStableDiffusionPipeline

    pipe = _quiet(GuidedStableDiffusionPipeline(**build_tiny_sd(0), safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False))
    return pipe(["a photo of a cat", "a dog"], num_inference_steps=6, guidance_scale=5.0, generator=_g(),
                output_type="pt").images


CASES: dict[str, Callable[[], torch.Tensor]] = {
    f.__name__: f
    for f in (
        teacher_cfg_scale, teacher_cfg_guider, teacher_apg, teacher_ag, teacher_eta_unguided,
        gbm_ddim, gbm_dls, gbm_ddim_cfg,
        interpolant_ode_w2, interpolant_ode_cfg_guider, interpolant_sde, interpolant_bridge,
        one_step_student, one_step_flow_student, reddiff_box, dps_box,
        alignprop_lora, alignprop_sample_with_grad, tiny_sd_cfg,
    )
}


def run_case(name: str) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        out = CASES[name]()
    return torch.as_tensor(out).detach().float().contiguous().cpu()


def main(argv=None) -> None:
    from safetensors.torch import load_file, save_file

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", nargs="*", metavar="NAME",
                   help="record these cases (none given: all) into expected.safetensors")
    args = p.parse_args(argv)
    if args.write is None:
        p.error("nothing to do: pass --write [NAME ...]")
    unknown = sorted(set(args.write) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    torch.set_num_threads(1)
    stored = load_file(str(EXPECTED)) if EXPECTED.is_file() else {}
    for name in args.write or list(CASES):
        stored[name] = run_case(name)
        print(f"{name}: {tuple(stored[name].shape)} mean {stored[name].mean():.6f}")
    save_file(dict(sorted(stored.items())), str(EXPECTED))


if __name__ == "__main__":
    main()
