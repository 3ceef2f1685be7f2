"""The bad-input suite: a table of bad inputs across pipelines, guiders, operators, loaders and configs, and how each
is answered. ``tests/test_bad_inputs.py`` runs it; ``python -m tests.bad_inputs`` rewrites ``tests/bad_inputs.md``.

An outcome is classified as

- **clear**: a ``ValueError`` or ``TypeError`` raised by `gen`'s own code (the innermost frame is in ``gen/`` or
  ``pipelines/``) whose message matches the case's pattern (the argument's name, and often the bad value);
- **raw**: any other exception (an ``AttributeError`` from inside torch, a library's error, a message that does not
  name the problem);
- **silent**: no exception at all (the bad input was accepted).

Every case must be clear. A case with ``pending`` names the helper or file that owns the fix; it is expected not to
be clear yet (an xfail in the test, so that fixing it turns the mark into a reminder to drop it).
Fixtures are tiny networks built from configs (milliseconds per call) plus copies of the shipped folders.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints"
OURS = (str(ROOT / "gen") + "/", str(ROOT / "pipelines") + "/")
NAN, INF = float("nan"), float("inf")


@dataclass
class Case:
    group: str
    what: str
    call: Callable
    match: str
    pending: str | None = None


@dataclass
class Outcome:
    status: str  # clear | raw | silent
    kind: str  # exception class name, or "-"
    message: str
    origin: str  # "gen" | "library" | "-"


def classify(case: Case) -> Outcome:
    try:
        case.call()
    except Exception as err:  # noqa: BLE001 - the point is to see every kind
        frames = traceback.extract_tb(err.__traceback__)
        inner = frames[-1].filename if frames else ""
        origin = "gen" if inner.startswith(OURS) else "library"
        msg = str(err).replace("\n", " ")
        ok = isinstance(err, (ValueError, TypeError)) and origin == "gen" and re.search(case.match, msg) is not None
        return Outcome("clear" if ok else "raw", type(err).__name__, msg, origin)
    return Outcome("silent", "-", "", "-")


# --- fixtures --------------------------------------------------------------------------------------------------------
def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@lru_cache(None)
def cc():
    from diffusers import DDIMScheduler

    from gen.models.unet import tiny_unet
    from pipelines import ClassConditionalPipeline

    torch.manual_seed(0)
    return _quiet(ClassConditionalPipeline(tiny_unet(sample_size=8).eval(), DDIMScheduler(num_train_timesteps=100)))


@lru_cache(None)
def uncond():
    from diffusers import DDIMScheduler

    from gen.models.unet import tiny_unet
    from pipelines import ClassConditionalPipeline

    return _quiet(ClassConditionalPipeline(tiny_unet(None, sample_size=8).eval(), DDIMScheduler()))


@lru_cache(None)
def gbm():
    from gen.gbm import GBMScheduler
    from gen.models.unet import tiny_unet
    from pipelines import GBMPipeline

    sched = GBMScheduler(num_train_timesteps=50, data_log_mean=[1.0], data_log_std=[0.1], data_offset=3.0)
    return _quiet(GBMPipeline(tiny_unet(sample_size=8).eval(), sched))


@lru_cache(None)
def interp():
    from gen.interpolants.scheduler import InterpolantScheduler
    from gen.models.unet import tiny_unet
    from pipelines import InterpolantPipeline

    return _quiet(InterpolantPipeline(tiny_unet(sample_size=8).eval(), InterpolantScheduler()))


@lru_cache(None)
def bridge():
    from gen.interpolants.scheduler import InterpolantScheduler
    from gen.models.unet import digits_unet
    from pipelines import InterpolantPipeline

    unet = digits_unet(sample_size=8, in_channels=2, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                       attention_head_dim=None, add_attention=False, num_class_embeds=None)
    sched = InterpolantScheduler(kind="two_sided", gamma="brownian", prediction_type="drift")
    return _quiet(InterpolantPipeline(unet.eval(), sched, base_noise_std=0.1))


@lru_cache(None)
def one_step():
    from diffusers import DDIMScheduler

    from gen.models.unet import tiny_unet
    from pipelines import OneStepPipeline

    return _quiet(OneStepPipeline(tiny_unet(sample_size=8).eval(), DDIMScheduler(), generator_timestep=900))


@lru_cache(None)
def red():
    from diffusers import DDIMScheduler

    from gen.models.unet import tiny_unet
    from pipelines import RedDiffPipeline

    return _quiet(RedDiffPipeline(tiny_unet(sample_size=8).eval(), DDIMScheduler(num_train_timesteps=100)))


@lru_cache(None)
def tiny_sd_parts():
    from gen.models import build_tiny_sd

    return build_tiny_sd(0)


@lru_cache(None)
def sd():
    from pipelines import GuidedStableDiffusionPipeline

    parts = tiny_sd_parts()
    return _quiet(GuidedStableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False))


@lru_cache(None)
def latent_red():
    from pipelines import LatentRedDiffPipeline

    return _quiet(LatentRedDiffPipeline(**tiny_sd_parts()))


@lru_cache(None)
def tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="gen_bad_inputs_"))


def folder(name: str, edit: Callable[[Path], None] | None = None, tag: str = "") -> Path:
    """A copy of ``checkpoints/<name>`` (edited by ``edit``), made once per tag."""
    dst = tmp() / f"{name}{tag}"
    if not dst.exists():
        shutil.copytree(CKPT / name, dst)
        if edit is not None:
            edit(dst)
    return dst


def _write(rel: str, text: str):
    return lambda d: (d / rel).write_text(text)


def _truncate(rel: str, keep: int):
    return lambda d: (d / rel).write_bytes((d / rel).read_bytes()[:keep])


def _flip_byte(rel: str):
    def edit(d):
        data = bytearray((d / rel).read_bytes())
        data[len(data) // 2] ^= 0x10
        (d / rel).write_bytes(bytes(data))
    return edit


def _nan_weights(rel: str):
    def edit(d):
        from safetensors.torch import load_file, save_file

        (d / "SHA256SUMS").unlink(missing_ok=True)
        t = load_file(str(d / rel))
        k = sorted(t)[0]
        t[k].view(-1)[0] = NAN
        save_file(t, str(d / rel))
    return edit


def _index(**changes):
    def edit(d):
        index = json.loads((d / "model_index.json").read_text())
        (d / "model_index.json").write_text(json.dumps({**index, **changes}))
    return edit


def _sched_config(**changes):
    def edit(d):
        (d / "SHA256SUMS").unlink(missing_ok=True)
        path = d / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def g(seed: int = 0):
    return torch.Generator().manual_seed(seed)


# --- cases -----------------------------------------------------------------------------------------------------------
def _numbers(name: str, good: dict, bad: list, call, match: str | None = None, group: str = "", pending=None):
    """One case per bad value of a numeric argument."""
    return [Case(group, f"{name}={_show(v)}", (lambda v=v: call(**{**good, name: v})), match or name, pending)
            for v in bad]


def _show(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}" + (
            " NaN" if v.is_floating_point() and v.isnan().any() else "")
    if isinstance(v, np.ndarray):
        return f"ndarray{v.shape} {v.dtype}"
    if isinstance(v, torch.Generator):
        return "Generator"
    if isinstance(v, list) and v and all(isinstance(x, torch.Generator) for x in v):
        return f"[Generator x{len(v)}]"
    if callable(v) and getattr(v, "__name__", "") == "<lambda>":
        return "lambda"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


FLOAT_BAD = [NAN, INF, -INF, "2", None, [2.0], True]


def class_conditional_cases() -> list[Case]:
    grp = "ClassConditionalPipeline"
    base = {"class_labels": [1, 2], "num_inference_steps": 2, "output_type": "pt"}

    def run(**kw):
        return cc()(**{**base, **kw})

    cases = []
    cases += _numbers("class_labels", base, ["3", "three", 3.5, [1.5], [True], True, [[1, 2]], [], [-1], [10],
                                             torch.tensor([1.0]), np.array([0.5]), {"a": 1}, object(),
                                             torch.tensor([[1]])], run, "class_labels", grp)
    cases += _numbers("batch_size", {**base, "class_labels": None}, [0, -1, 2.5, "2", [2], NAN], run, "batch_size", grp)
    cases.append(Case(grp, "batch_size=3 with 2 class_labels", lambda: run(batch_size=3), "batch_size"))
    cases.append(Case(grp, "class_labels=None and batch_size=None", lambda: run(class_labels=None), "batch_size"))
    cases += _numbers("num_inference_steps", base, [0, -1, 2.5, "10", None, NAN, True, 10 ** 6], run,
                      "num_inference_steps", grp)
    cases += _numbers("guidance_scale", base, [*FLOAT_BAD[:4], -1.0, [2.0], torch.tensor([1.0, 2.0]), True], run,
                      "guidance_scale", grp)
    cases += _numbers("guider", base, ["cfg", 2.0, object()], run, "guider", grp)
    cases.append(Case(grp, "guider=CFG (the class, not an instance)", lambda: run(guider=__import__(
        "gen.guidance", fromlist=["CFG"]).CFG), "guider"))
    cases.append(Case(grp, "guider and guidance_scale both", lambda: run(guider=__import__(
        "gen.guidance", fromlist=["CFG"]).CFG(2.0), guidance_scale=3.0), "guidance_scale or guider"))
    cases += _numbers("generator", base, [0, "seed", [0], [g(), g(), g()], np.random.default_rng(0), []], run,
                      "generator", grp)
    cases += _numbers("output_type", base, ["jpg", None, "PIL", 3], run, "output_type", grp)
    cases += _numbers("eta", base, [-1.0, NAN, INF, 2.0, "0", None], run, "eta", grp)
    cases += _numbers("latents", base, [torch.full((2, 1, 8, 8), NAN), torch.full((2, 1, 8, 8), INF),
                                        torch.zeros(2, 1, 16, 16), torch.zeros(3, 1, 8, 8), torch.zeros(2, 3, 8, 8),
                                        torch.zeros(2, 1, 8, 8, dtype=torch.long),
                                        torch.zeros(2, 1, 8, 8, dtype=torch.uint8), np.zeros((2, 1, 16, 16)),
                                        np.zeros((2, 1, 8, 8), dtype=np.int64), [[0.0]], "noise"], run, "latents", grp)
    cases += _numbers("callback_on_step_end", base, [3, "print"], run, "callback_on_step_end", grp)
    cases.append(Case(grp, "callback_on_step_end returns a list", lambda: run(
        callback_on_step_end=lambda p, i, t, kw: [kw]), "callback_on_step_end"))
    cases.append(Case(grp, "callback_on_step_end returns an unknown key", lambda: run(
        callback_on_step_end=lambda p, i, t, kw: {"noise": 1}), "callback_on_step_end"))
    cases.append(Case(grp, "callback_on_step_end returns NaN latents", lambda: run(
        callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * NAN}), "latents returned by callback"))
    cases.append(Case(grp, "callback_on_step_end returns latents of another size", lambda: run(
        callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros(2, 1, 4, 4)}), "latents returned by callback"))
    cases += _numbers("callback_on_step_end_tensor_inputs", {**base, "callback_on_step_end": lambda *a: None},
                      [["noise"], "latents", 3], run, "callback_on_step_end_tensor_inputs", grp)
    cases.append(Case(grp, "class_labels on an unconditional UNet", lambda: uncond()(
        class_labels=[1], num_inference_steps=1), "unconditional"))
    cases.append(Case(grp, "unconditional UNet without batch_size", lambda: uncond()(num_inference_steps=1),
                      "batch_size"))
    # use_scheduler (on a fresh pipeline: a wrongly accepted scheduler must not leak into other cases)
    def fresh():
        from pipelines import ClassConditionalPipeline

        return ClassConditionalPipeline(cc().unet, cc().scheduler)

    cases.append(Case(grp, "use_scheduler('foo')", lambda: fresh().use_scheduler("foo"), "unknown scheduler 'foo'"))
    cases.append(Case(grp, "use_scheduler(3)", lambda: fresh().use_scheduler(3), "scheduler 3"))
    cases.append(Case(grp, "use_scheduler('ddim', bogus_key=1)", lambda: fresh().use_scheduler("ddim", bogus_key=1),
                      "bogus_key"))
    cases.append(Case(grp, "use_scheduler('ddim', prediction_type='bogus')", lambda: fresh().use_scheduler(
        "ddim", prediction_type="bogus"), "prediction_type"))
    cases.append(Case(grp, "use_scheduler('euler', timestep_spacing='sideways')",
                      lambda: fresh().use_scheduler("euler", timestep_spacing="sideways"), "sideways"))
    cases.append(Case(grp, "use_scheduler('ddim', num_train_timesteps=0)",
                      lambda: fresh().use_scheduler("ddim", num_train_timesteps=0), "num_train_timesteps"))

    def make(**kw):
        from diffusers import DDIMScheduler

        from gen.models.unet import tiny_unet
        from pipelines import ClassConditionalPipeline

        args = {"unet": tiny_unet(sample_size=8), "scheduler": DDIMScheduler(), **kw}
        return ClassConditionalPipeline(**args)

    from diffusers import DDIMScheduler

    cases += [
        Case(grp, "unet=None", lambda: make(unet=None), "unet"),
        Case(grp, "unet=a UNet2DConditionModel", lambda: make(unet=tiny_sd_parts()["unet"]), "UNet2DModel"),
        Case(grp, "scheduler=GBMScheduler", lambda: make(scheduler=gbm().scheduler), "GBMScheduler"),
        Case(grp, "scheduler=InterpolantScheduler", lambda: make(scheduler=interp().scheduler),
             "InterpolantScheduler"),
        Case(grp, "scheduler=None", lambda: make(scheduler=None), "scheduler"),
        Case(grp, "scheduler prediction_type='bogus'", lambda: make(scheduler=DDIMScheduler(prediction_type="bogus")),
             "prediction_type"),
        Case(grp, "class_names='0123456789' (a string)", lambda: make(class_names="0123456789"), "class_names"),
        Case(grp, "class_names with 3 names for 10 classes", lambda: make(class_names=["a", "b", "c"]),
             "class_names has 3 names"),
        Case(grp, "class_names with a repeat", lambda: make(class_names=["a"] * 10), "distinct"),
        Case(grp, "class_names with an empty name", lambda: make(class_names=[""] + list("abcdefghi")), "class_names"),
        Case(grp, "class_names on an unconditional UNet", lambda: make(unet=uncond().unet, class_names=["a"]),
             "no classes"),
    ]
    named = make(class_names=[f"c{i}" for i in range(10)])
    named.set_progress_bar_config(disable=True)
    cases.append(Case(grp, "unknown class name 'dog'", lambda: named(class_labels=["dog"], num_inference_steps=1),
                      "unknown class names"))
    return cases


def gbm_cases() -> list[Case]:
    grp = "GBMPipeline"
    base = {"class_labels": [1, 2], "num_inference_steps": 2, "output_type": "pt"}

    def run(**kw):
        return gbm()(**{**base, **kw})

    cases = _numbers("sampler", base, ["euler", 3, ""], run, "sampler", grp)
    cases += _numbers("num_inference_steps", base, [0, 51, 2.5, "2", None], run, "num_inference_steps", grp)
    cases += _numbers("latents", base, [torch.full((2, 1, 8, 8), NAN), -torch.ones(2, 1, 8, 8), torch.zeros(2, 1, 8, 8),
                                        torch.ones(2, 1, 16, 16), torch.ones(2, 1, 8, 8, dtype=torch.long), "x"],
                      run, "latents", grp)
    cases += _numbers("guidance_scale", base, [NAN, -2.0, "3"], run, "guidance_scale", grp)
    cases += _numbers("generator", base, [0, [g(), g()]], run, "generator", grp)
    cases += _numbers("class_labels", base, ["3", [10], 2.0], run, "class_labels", grp)
    cases += _numbers("output_type", base, ["jpg"], run, "output_type", grp)
    cases.append(Case(grp, "use_scheduler('ddim')", lambda: gbm().use_scheduler("ddim"), "sampler="))
    cases.append(Case(grp, "constructed with a DDIMScheduler", lambda: type(gbm())(gbm().unet, cc().scheduler),
                      "GBMScheduler"))
    return cases


def interpolant_cases() -> list[Case]:
    grp = "InterpolantPipeline"
    base = {"class_labels": [1, 2], "num_inference_steps": 2, "output_type": "pt"}

    def run(**kw):
        return interp()(**{**base, **kw})

    cases = _numbers("sampler", base, ["ode45", 1], run, "sampler", grp)
    cases += _numbers("method", base, ["rk5", "euler_maruyama", 3], run, "solver|method", grp)
    sde = {**base, "sampler": "sde"}
    cases += _numbers("eps", sde, [NAN, -1.0, INF, "bogus", [1.0], True, (lambda t: NAN), (lambda t: -1.0),
                                   (lambda t: "x")], run, "eps", grp)
    cases.append(Case(grp, "eps=0.5 without sampler='sde'", lambda: run(eps=0.5), "eps"))
    cases.append(Case(grp, "source_images on a generation UNet", lambda: run(source_images=torch.zeros(2, 1, 8, 8)),
                      "source_images"))
    cases += _numbers("latents", base, [torch.full((2, 1, 8, 8), NAN), torch.zeros(2, 1, 4, 4), "x"], run, "latents",
                      grp)
    cases += _numbers("guidance_scale", base, [NAN, -1.0], run, "guidance_scale", grp)
    cases += _numbers("batch_size", {**base, "class_labels": None}, [0, 1.5], run, "batch_size", grp)
    cases += _numbers("generator", base, [0, "x"], run, "generator", grp)

    def make(**kw):
        from gen.interpolants.scheduler import InterpolantScheduler
        from gen.models.unet import tiny_unet
        from pipelines import InterpolantPipeline

        return InterpolantPipeline(**{"unet": tiny_unet(sample_size=8), "scheduler": InterpolantScheduler(), **kw})

    cases += [
        Case(grp, "base_noise_std=nan", lambda: make(base_noise_std=NAN), "base_noise_std"),
        Case(grp, "base_noise_std=-1", lambda: make(base_noise_std=-1.0), "base_noise_std"),
        Case(grp, "base_noise_std='0.1'", lambda: make(base_noise_std="0.1"), "base_noise_std"),
        Case(grp, "scheduler=DDIMScheduler", lambda: make(scheduler=cc().scheduler), "InterpolantScheduler"),
        Case(grp, "class_names of the wrong length", lambda: make(class_names=["a"]), "class_names"),
    ]
    bbase = {"num_inference_steps": 2, "output_type": "pt", "source_images": torch.zeros(2, 1, 8, 8)}

    def brun(**kw):
        return bridge()(**{**bbase, **kw})

    cases += _numbers("source_images", bbase, [None, torch.full((2, 1, 8, 8), NAN), torch.zeros(2, 3, 8, 8),
                                               torch.zeros(2, 1, 16, 16), torch.zeros(1, 8, 8),
                                               torch.zeros(2, 1, 8, 8, dtype=torch.uint8),
                                               torch.full((2, 1, 8, 8), 255.0), np.full((2, 1, 8, 8), 200.0),
                                               [[0.0]], "img"], brun, "source_images", "InterpolantPipeline (bridge)")
    cases.append(Case("InterpolantPipeline (bridge)", "source_images for 2 with batch_size=3",
                      lambda: brun(batch_size=3), "source_images|batch"))
    cases.append(Case("InterpolantPipeline (bridge)", "guidance_scale=2 (a bridge has no unconditional branch)",
                      lambda: brun(guidance_scale=2.0), "unconditional branch"))

    return cases


def one_step_cases() -> list[Case]:
    grp = "OneStepPipeline"
    base = {"class_labels": [1, 2], "output_type": "pt"}

    def run(**kw):
        return one_step()(**{**base, **kw})

    cases = _numbers("num_inference_steps", base, [2, 0, "1", 1.5], run, "num_inference_steps", grp)
    cases += _numbers("guidance_scale", base, [2.0, NAN, "1"], run, "guidance_scale", grp)
    cases += _numbers("prompt", base, ["a cat"], run, "prompt", grp)
    cases += _numbers("generator", base, [0, [g()]], run, "generator", grp)
    cases += _numbers("latents", base, [torch.full((2, 1, 8, 8), NAN), torch.zeros(2, 1, 4, 4),
                                        torch.zeros(2, 1, 8, 8, dtype=torch.int32)], run, "latents", grp)
    cases += _numbers("output_type", base, ["jpg"], run, "output_type", grp)
    cases += _numbers("class_labels", base, ["3", [11]], run, "class_labels", grp)
    cases += _numbers("batch_size", {**base, "class_labels": None}, [0, "4"], run, "batch_size", grp)

    def make(**kw):
        from diffusers import DDIMScheduler

        from gen.models.unet import tiny_unet
        from pipelines import OneStepPipeline

        return OneStepPipeline(**{"unet": tiny_unet(sample_size=8), "scheduler": DDIMScheduler(), **kw})

    cases += [
        Case(grp, "generator_timestep=5000", lambda: make(generator_timestep=5000), "generator_timestep"),
        Case(grp, "generator_timestep=nan", lambda: make(generator_timestep=NAN), "generator_timestep"),
        Case(grp, "generator_timestep=2.5", lambda: make(generator_timestep=2.5), "generator_timestep"),
        Case(grp, "generator_prediction='x'", lambda: make(generator_prediction="x"), "generator_prediction"),
        Case(grp, "text_encoder without tokenizer", lambda: make(text_encoder=tiny_sd_parts()["text_encoder"]),
             "tokenizer"),
    ]
    return cases


def red_diff_cases() -> list[Case]:
    from gen.inverse import Inpainting

    grp = "RedDiffPipeline"
    op = Inpainting.box((8, 8), 3, sigma_y=0.05)
    y = op.measure(torch.rand(2, 1, 8, 8, generator=g(1)) * 2 - 1, generator=g())
    base = {"measurement": y, "operator": op, "num_inference_steps": 2, "output_type": "pt"}

    def run(**kw):
        return red()(**{**base, **kw})

    cases = _numbers("measurement", base, [torch.full_like(y, NAN), y.tolist(), (y * 127.5 + 127.5).round(),
                                           ((y + 1) * 127.5).clamp(0, 255).to(torch.uint8), torch.zeros(2, 1, 4, 4),
                                           torch.zeros(2, 1, 8), torch.tensor(1.0), "y", None], run, "measurement",
                      grp)
    cases += _numbers("operator", base, ["box", None, lambda x: x], run, "operator", grp)
    cases += _numbers("method", base, ["admm", None, 1], run, "method", grp)
    cases += _numbers("lr", base, [0.0, -1.0, NAN, "0.1", None], run, "lr", grp)
    cases += _numbers("lam", base, [-1.0, NAN, INF, "1"], run, "lam", grp)
    cases += _numbers("weighting", base, ["cubic", 3], run, "weighting", grp)
    cases += _numbers("obs_weight", base, [0.0, NAN, -1.0, "1"], run, "obs_weight", grp)
    cases += _numbers("t_max", base, [5000, -1, 2.5, "50"], run, "t_max", grp)
    cases += _numbers("t_min", base, [-1, 1000, "0"], run, "t_min", grp)
    cases.append(Case(grp, "t_min=60 > t_max=50", lambda: run(t_min=60, t_max=50), "t_min"))
    cases += _numbers("zeta", {**base, "method": "dps"}, [NAN, -1.0, "1"], run, "zeta", grp)
    cases += _numbers("eta", {**base, "method": "dps"}, [-1.0, NAN, 2.0], run, "eta", grp)
    cases += _numbers("x_init", base, [torch.full((2, 1, 8, 8), NAN), torch.full((2, 1, 8, 8), 255.0),
                                       torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(1, 1, 8, 8), "x"], run,
                      "x_init", grp)
    cases += _numbers("height", base, [0, -8, 7, "8", 2.5], run, "height", grp)
    cases += _numbers("width", base, [0, 5], run, "width", grp)
    cases += _numbers("generator", base, [0, [g(), g()]], run, "generator", grp)
    cases += _numbers("output_type", base, ["jpg"], run, "output_type", grp)
    cases += _numbers("callback", base, [3], run, "callback", grp)
    cases += _numbers("class_labels", base, ["3", 1.5, [1], [1, 11], True], run, "class_labels", grp)
    cases += _numbers("guidance_scale", base, [NAN, -1.0, "2"], run, "guidance_scale", grp)
    cases += _numbers("num_inference_steps", base, [0, 2.5, None], run, "num_inference_steps", grp)
    cases += _numbers("optimizer", base, ["lbfgs", None], run, "optimizer", grp)

    lgrp = "LatentRedDiffPipeline"
    lop = Inpainting.box((16, 16), 4, sigma_y=0.01)
    ly = lop.measure(torch.rand(1, 3, 16, 16, generator=g(2)) * 2 - 1)
    lbase = {"measurement": ly, "operator": lop, "num_inference_steps": 1, "output_type": "pt"}

    def lrun(**kw):
        return latent_red()(**{**lbase, **kw})

    cases += _numbers("prompt", lbase, [3, ["a", "b"], None, [3]], lrun, "prompt", lgrp)
    cases += _numbers("height", lbase, [0, 15], lrun, "height", lgrp)
    cases += _numbers("measurement", lbase, [torch.full_like(ly, NAN), ly * 255], lrun, "measurement", lgrp)
    cases += _numbers("x_init", lbase, [torch.full((1, 3, 16, 16), NAN)], lrun, "x_init", lgrp)
    return cases


def sd_cases() -> list[Case]:
    grp = "GuidedStableDiffusionPipeline"
    base = {"prompt": "a cat", "num_inference_steps": 1, "output_type": "pt"}

    def run(**kw):
        return sd()(**{**base, **kw})

    emb = torch.zeros(1, 77, 32)
    cases = _numbers("height", base, [0, -16, 13, "16", 2.5], run, "height", grp)
    cases += _numbers("width", base, [0, 7], run, "width", grp)
    cases += _numbers("latents", base, [torch.zeros(1, 4, 16, 16), torch.full((1, 4, 8, 8), NAN),
                                        torch.zeros(2, 4, 8, 8), torch.zeros(1, 4, 8, 8, dtype=torch.long)], run,
                      "latents", grp)
    cases += _numbers("prompt", base, [3, [], [3], None], run, "prompt", grp)
    cases += _numbers("prompt_embeds", {**base, "prompt": None},
                      [torch.full_like(emb, NAN), torch.zeros(1, 77, 16), torch.zeros(77, 32), "emb"], run,
                      "prompt_embeds", grp)
    cases.append(Case(grp, "negative_prompt_embeds of another shape", lambda: run(
        prompt=None, prompt_embeds=emb, negative_prompt_embeds=torch.zeros(2, 77, 32)), "negative_prompt_embeds"))
    cases.append(Case(grp, "negative_prompt_embeds with NaN", lambda: run(
        prompt=None, prompt_embeds=emb, negative_prompt_embeds=torch.full_like(emb, NAN)), "negative_prompt_embeds"))
    cases += _numbers("negative_prompt", base, [3, ["a", "b"]], run, "negative_prompt", grp)
    cases += _numbers("num_images_per_prompt", base, [0, 2.5, "2"], run, "num_images_per_prompt", grp)
    cases += _numbers("guidance_scale", base, [NAN, -1.0, "7"], run, "guidance_scale", grp)
    cases += _numbers("eta", base, [-1.0, NAN], run, "eta", grp)
    cases += _numbers("generator", base, [0, [g(), g()]], run, "generator", grp)
    cases += _numbers("output_type", base, ["jpg"], run, "output_type", grp)
    cases += _numbers("num_inference_steps", base, [0, 10 ** 5, "3"], run, "num_inference_steps", grp)
    return cases


def guider_cases() -> list[Case]:
    from gen.guidance import APG, CFG, AdaptiveGuidance, GuidanceInterval, Guider, LinearAG, build_guider
    from gen.guidance.diffusers_compat import DiffusersAdaptiveGuidance

    grp = "guiders"
    cases = _numbers("guidance_scale", {}, [NAN, INF, -1.0, "2", None, [2.0], True], lambda **k: CFG(**k),
                     "guidance_scale", "guiders: CFG")
    cases += _numbers("eta", {}, [NAN, INF, "0", None], lambda **k: APG(**k), "eta", "guiders: APG")
    cases += _numbers("momentum", {}, [1.0, -1.0, NAN, "x", None], lambda **k: APG(**k), "momentum", "guiders: APG")
    cases += _numbers("norm_threshold", {}, [0.0, -1.0, NAN, INF, "1"], lambda **k: APG(**k), "norm_threshold",
                      "guiders: APG")
    cases += _numbers("dims", {}, [[0], "ab", 3, [], [1.5]], lambda **k: APG(**k), "dims", "guiders: APG")
    cases += _numbers("guidance_scale", {}, [NAN, -1.0], lambda **k: APG(**k), "guidance_scale", "guiders: APG")
    lag = {"guidance_scale": 2.0, "num_inference_steps": 2, "coefficients": [[1, 0, 0], [1, 0, 0]]}
    cases += _numbers("coefficients", lag, [[[1, 0, 0]], [[1, 0], [1, 0]], [[NAN, 0, 0], [1, 0, 0]],
                                            [["a", 0, 0], [1, 0, 0]], "abc", None, [[INF, 0, 0], [1, 0, 0]]],
                      lambda **k: LinearAG(**k), "coefficients", "guiders: LinearAG")
    cases += _numbers("num_inference_steps", lag, [0, 2.5, "2"], lambda **k: LinearAG(**k), "num_inference_steps",
                      "guiders: LinearAG")
    cases += _numbers("num_exact_steps", lag, [-1, 3, 1.5], lambda **k: LinearAG(**k), "num_exact_steps",
                      "guiders: LinearAG")
    cases += _numbers("guidance_scale", lag, [NAN, "2"], lambda **k: LinearAG(**k), "guidance_scale",
                      "guiders: LinearAG")
    gi = {"inner": CFG(2.0)}
    cases += _numbers("sigma_lo", gi, [NAN, -1.0, "0.2", 10.0], lambda **k: GuidanceInterval(**k), "sigma_lo",
                      "guiders: GuidanceInterval")
    cases += _numbers("sigma_hi", gi, [NAN, 0.1, "5"], lambda **k: GuidanceInterval(**k), "sigma_hi|sigma_lo",
                      "guiders: GuidanceInterval")
    cases += _numbers("inner", {}, ["cfg", 2.0, CFG], lambda **k: GuidanceInterval(**k), "inner",
                      "guiders: GuidanceInterval")
    ag = {"inner": CFG(2.0)}
    cases += _numbers("gamma_bar", ag, [NAN, INF, "0.9"], lambda **k: AdaptiveGuidance(**k), "gamma_bar",
                      "guiders: AdaptiveGuidance")
    cases += _numbers("gamma_bar", ag, [2.0, -3.0, 0.0], lambda **k: AdaptiveGuidance(**k), r"gamma_bar.*\(0, 1\]",
                      "guiders: AdaptiveGuidance")
    cases += _numbers("criterion", ag, ["l2", "x0", None], lambda **k: AdaptiveGuidance(**k),
                      "criterion.*x0_cosine, eps_cosine, step", "guiders: AdaptiveGuidance")
    cases += _numbers("after_switch", ag, ["uncond", None], lambda **k: AdaptiveGuidance(**k),
                      "after_switch.*cond, frozen_eps_delta", "guiders: AdaptiveGuidance")
    cases += _numbers("refresh_every", ag, [-1, 2.5, True], lambda **k: AdaptiveGuidance(**k), "refresh_every",
                      "guiders: AdaptiveGuidance")
    cases += _numbers("min_steps", ag, [-1, 1.5, "2"], lambda **k: AdaptiveGuidance(**k), "min_steps",
                      "guiders: AdaptiveGuidance")
    cases += _numbers("inner", {}, ["cfg", None], lambda **k: AdaptiveGuidance(**k), "inner",
                      "guiders: AdaptiveGuidance")
    cases += _numbers("inner_class", {}, ["Bogus", 3], lambda **k: AdaptiveGuidance(**k), "inner_class",
                      "guiders: AdaptiveGuidance")
    cases += _numbers("gamma_bar", {}, [NAN, "x"], lambda **k: DiffusersAdaptiveGuidance(**k), "gamma_bar",
                      "guiders: DiffusersAdaptiveGuidance")
    cases += _numbers("guidance_scale", {}, [NAN], lambda **k: DiffusersAdaptiveGuidance(**k), "guidance_scale",
                      "guiders: DiffusersAdaptiveGuidance")
    cases.append(Case("guiders", "build_guider('cfgg')", lambda: build_guider("cfgg"), "guider name"))
    cases.append(Case("guiders", "a guider used without begin()", lambda: CFG(2.0).uncond_mask(
        __import__("gen.guidance", fromlist=["StepInfo"]).StepInfo(0, 2, torch.tensor(1), torch.ones(2))),
        r"begin\(\)"))
    lag_dir = CKPT / "digits-teacher" / "linear_ag"
    cases.append(Case("guiders", "LinearAG fitted for 20 steps used with 10", lambda: cc()(
        class_labels=[1], num_inference_steps=10, guider=LinearAG.from_pretrained(lag_dir)), "fitted for 20 steps"))
    cases.append(Case(grp, "Guider.from_pretrained(missing folder)", lambda: Guider.from_pretrained(tmp() / "nope"),
                      "nope"))
    return cases


def operator_cases() -> list[Case]:
    from gen import inverse as inv

    grp = "operators"
    cases = _numbers("sigma_y", {}, [NAN, -0.1, INF, "0.1", None], lambda **k: inv.Denoising(**k), "sigma_y",
                     "operators: constructors")
    cases += [
        Case(grp, "Inpainting(mask with a 2)", lambda: inv.Inpainting(torch.tensor([[0.0, 2.0]])), "mask"),
        Case(grp, "Inpainting(mask with NaN)", lambda: inv.Inpainting(torch.tensor([[0.0, NAN]])), "mask"),
        Case(grp, "Inpainting(mask of 5 dims)", lambda: inv.Inpainting(torch.ones(1, 1, 1, 2, 2)), "mask"),
        Case(grp, "Inpainting(mask='box')", lambda: inv.Inpainting("box"), "mask"),
        Case(grp, "Inpainting.box(box_size=0)", lambda: inv.Inpainting.box((8, 8), 0), "box_size"),
        Case(grp, "Inpainting.box(box_size=9 > 8)", lambda: inv.Inpainting.box((8, 8), 9), "box_size"),
        Case(grp, "Inpainting.box(box_size='3')", lambda: inv.Inpainting.box((8, 8), "3"), "box_size"),
        Case(grp, "Inpainting.box(size=8)", lambda: inv.Inpainting.box(8, 3), "size"),
        Case(grp, "Inpainting.box(top=7) outside", lambda: inv.Inpainting.box((8, 8), 3, top=7), "box at"),
        Case(grp, "Inpainting.random_pixels(missing=1.0)", lambda: inv.Inpainting.random_pixels((8, 8), 1.0),
             "missing"),
        Case(grp, "Inpainting.random_pixels(missing=nan)", lambda: inv.Inpainting.random_pixels((8, 8), NAN),
             "missing"),
        Case(grp, "Inpainting.random_pixels(seed='a')", lambda: inv.Inpainting.random_pixels((8, 8), 0.5, seed="a"),
             "seed"),
        Case(grp, "Inpainting.half(side='middle')", lambda: inv.Inpainting.half((8, 8), "middle"), "side"),
        Case(grp, "SuperResolution(factor=0)", lambda: inv.SuperResolution(0), "factor"),
        Case(grp, "SuperResolution(factor=2.5)", lambda: inv.SuperResolution(2.5), "factor"),
        Case(grp, "SuperResolution(factor='2')", lambda: inv.SuperResolution("2"), "factor"),
        Case(grp, "SuperResolution(kind='nearest')", lambda: inv.SuperResolution(2, kind="nearest"), "kind"),
        Case(grp, "SuperResolution(rcond=1)", lambda: inv.SuperResolution(2, rcond=1.0), "rcond"),
        Case(grp, "SuperResolution(rcond=nan)", lambda: inv.SuperResolution(2, rcond=NAN), "rcond"),
        Case(grp, "GaussianBlur(kernel_size=4)", lambda: inv.GaussianBlur(4), "kernel_size"),
        Case(grp, "GaussianBlur(kernel_size=0)", lambda: inv.GaussianBlur(0), "kernel_size"),
        Case(grp, "GaussianBlur(blur_sigma=0)", lambda: inv.GaussianBlur(5, 0.0), "blur_sigma"),
        Case(grp, "GaussianBlur(blur_sigma=nan)", lambda: inv.GaussianBlur(5, NAN), "blur_sigma"),
        Case(grp, "GaussianBlur(blur_sigma='1')", lambda: inv.GaussianBlur(5, "1"), "blur_sigma"),
        Case(grp, "MotionBlur(intensity=2)", lambda: inv.MotionBlur(9, 2.0), "intensity"),
        Case(grp, "MotionBlur(kernel_size=8)", lambda: inv.MotionBlur(8), "kernel_size"),
        Case(grp, "MotionBlur(kernel 4x4)", lambda: inv.MotionBlur(kernel=torch.ones(4, 4) / 16), "kernel"),
        Case(grp, "MotionBlur(kernel with NaN)", lambda: inv.MotionBlur(kernel=torch.full((3, 3), NAN)), "kernel"),
        Case(grp, "MotionBlur(negative kernel)", lambda: inv.MotionBlur(kernel=-torch.ones(3, 3)), "kernel"),
        Case(grp, "Colorization(channels=0)", lambda: inv.Colorization(0), "channels"),
        Case(grp, "Colorization(channels='3')", lambda: inv.Colorization("3"), "channels"),
        Case(grp, "PhaseRetrieval(oversample=0.5)", lambda: inv.PhaseRetrieval(0.5), "oversample"),
        Case(grp, "PhaseRetrieval(oversample=inf)", lambda: inv.PhaseRetrieval(INF), "oversample"),
        Case(grp, "PhaseRetrieval(oversample=nan)", lambda: inv.PhaseRetrieval(NAN), "oversample"),
        Case(grp, "HDR(scale=0)", lambda: inv.HDR(0.0), "scale"),
        Case(grp, "HDR(scale=inf)", lambda: inv.HDR(INF), "scale"),
        Case(grp, "Compose([])", lambda: inv.Compose([]), "Compose"),
        Case(grp, "Compose(['sr'])", lambda: inv.Compose(["sr"]), "Compose"),
        Case(grp, "Compose(cg_iters=0)", lambda: inv.Compose([inv.Denoising()], cg_iters=0), "cg_iters"),
    ]
    x = torch.rand(2, 1, 8, 8, generator=g(3)) * 2 - 1
    sr = inv.SuperResolution(2)
    ugrp = "operators: inputs"
    cases += [
        Case(ugrp, "measure(x uint8)", lambda: sr.measure(((x + 1) * 127.5).to(torch.uint8)), "x"),
        Case(ugrp, "measure(x in [0, 255])", lambda: sr.measure((x + 1) * 127.5), r"x must be .*\[-1, 1\]"),
        Case(ugrp, "measure(x with NaN)", lambda: sr.measure(x * NAN), "x"),
        Case(ugrp, "measure(x as a list)", lambda: sr.measure(x.tolist()), "x"),
        Case(ugrp, "measure(generator=0)", lambda: sr.measure(x, generator=0), "generator"),
        Case(ugrp, "op(x of 3 dims)", lambda: sr(x[0]), "x"),
        Case(ugrp, "op(x with a side not divisible by 2)", lambda: sr(torch.zeros(1, 1, 7, 8)), "divisible"),
        Case(ugrp, "Inpainting op on another image size",
             lambda: inv.Inpainting.box((8, 8), 3)(torch.zeros(1, 1, 4, 4)), "mask shape"),
        Case(ugrp, "Colorization op on 1-channel images", lambda: inv.Colorization(3)(x), "channel"),
        Case(ugrp, "check_measurement(y of the wrong shape)", lambda: sr.check_measurement(torch.zeros(2, 1, 8, 8),
                                                                                           x.shape), "measurement"),
        Case(ugrp, "check_measurement(y int64)", lambda: sr.check_measurement(torch.zeros(2, 1, 4, 4,
                                                                                          dtype=torch.long), x.shape),
             "measurement"),
        Case(ugrp, "check_measurement(y in [0, 255])", lambda: sr.check_measurement(torch.full((2, 1, 4, 4), 200.0),
                                                                                   x.shape), "measurement"),
        Case(ugrp, "pinv without x_shape", lambda: sr.pinv(torch.zeros(2, 1, 4, 4)), "x_shape"),
        Case(ugrp, "adjoint of a non-linear operator", lambda: inv.HDR().adjoint(x), "adjoint"),
        Case(ugrp, "pinv of an operator without one", lambda: type("NoPinv", (inv.Operator,), {
            "forward": lambda self, x: x})().pinv(x), "pseudo-inverse"),
    ]
    return cases


def loader_cases() -> list[Case]:
    from gen.guidance import Guider, LinearAG
    from pipelines import ClassConditionalPipeline, GBMPipeline, InterpolantPipeline, OneStepPipeline, RedDiffPipeline
    from pipelines.lora import ClassConditionalLoraPipeline

    grp = "loaders"
    W = "unet/diffusion_pytorch_model.safetensors"
    cc_load = ClassConditionalPipeline.from_pretrained
    cases = [
        Case(grp, "missing folder", lambda: cc_load(tmp() / "nope"), "does not exist"),
        Case(grp, "a file, not a folder", lambda: cc_load(CKPT / "digits-teacher" / "model_index.json"), "is a file"),
        Case(grp, "a folder without model_index.json", lambda: cc_load(CKPT / "digits-teacher" / "unet"),
             "no model_index.json"),
        Case(grp, "model_index.json holding []", lambda: cc_load(folder("digits-teacher", _write(
            "model_index.json", "[]"), "_list")), "model_index.json holds list"),
        Case(grp, "model_index.json truncated", lambda: cc_load(folder("digits-teacher", _truncate(
            "model_index.json", 20), "_trunc_index")), "not valid JSON"),
        Case(grp, "model_index.json without _class_name", lambda: cc_load(folder("digits-teacher", _write(
            "model_index.json", '{"unet": ["diffusers", "UNet2DModel"]}'), "_noclass")), "_class_name"),
        Case(grp, "ClassConditionalPipeline on the GBM folder", lambda: cc_load(CKPT / "digits-gbm"), "GBMPipeline"),
        Case(grp, "ClassConditionalPipeline on the interpolant folder", lambda: cc_load(CKPT / "digits-interpolant"),
             "InterpolantPipeline"),
        Case(grp, "ClassConditionalPipeline on the f-distill folder", lambda: cc_load(CKPT / "digits-fdistill-js"),
             "OneStepPipeline"),
        Case(grp, "ClassConditionalPipeline on the classifier folder", lambda: cc_load(CKPT / "digits-classifier"),
             "model_index.json"),
        Case(grp, "ClassConditionalPipeline on the LoRA folder", lambda: cc_load(CKPT / "digits-alignprop-lora"),
             "model_index.json"),
        Case(grp, "GBMPipeline on the teacher folder", lambda: GBMPipeline.from_pretrained(CKPT / "digits-teacher"),
             "ClassConditionalPipeline"),
        Case(grp, "InterpolantPipeline on the teacher folder",
             lambda: InterpolantPipeline.from_pretrained(CKPT / "digits-teacher"), "ClassConditionalPipeline"),
        Case(grp, "OneStepPipeline on the teacher folder",
             lambda: OneStepPipeline.from_pretrained(CKPT / "digits-teacher"), "ClassConditionalPipeline"),
        Case(grp, "ClassConditionalLoraPipeline on the GBM folder",
             lambda: ClassConditionalLoraPipeline.from_pretrained(CKPT / "digits-gbm"), "GBMPipeline"),
        Case(grp, "RedDiffPipeline on the GBM folder", lambda: RedDiffPipeline.from_pretrained(CKPT / "digits-gbm"),
             "GBMPipeline"),
        Case(grp, "GBM folder renamed to ClassConditionalPipeline", lambda: cc_load(folder(
            "digits-gbm", _index(_class_name="ClassConditionalPipeline"), "_renamed")), "GBMScheduler"),
        Case(grp, "scheduler config with prediction_type 'bogus'", lambda: cc_load(folder(
            "digits-teacher", _sched_config(prediction_type="bogus"), "_badpred")), "prediction_type"),
        Case(grp, "a flipped byte in the shipped weights", lambda: cc_load(folder("digits-teacher", _flip_byte(W),
                                                                                  "_flip")), "is corrupt"),
        Case(grp, "NaN weights, no manifest", lambda: cc_load(folder("digits-teacher", _nan_weights(W), "_nan")),
             "NaN/inf"),
        Case(grp, "truncated weights (the manifest names them)", lambda: cc_load(folder(
            "digits-teacher", _truncate(W, 5000), "_truncw")), "diffusion_pytorch_model.safetensors is corrupt"),
        Case(grp, "truncated weights, no manifest", lambda: cc_load(folder(
            "digits-teacher", lambda d: (_truncate(W, 5000)(d), (d / "SHA256SUMS").unlink()), "_truncw2")),
             "digits-teacher_truncw2"),
        Case(grp, "weights file replaced by text, no manifest", lambda: cc_load(folder(
            "digits-teacher", lambda d: (_write(W, "hello")(d), (d / "SHA256SUMS").unlink()), "_textw")),
             "digits-teacher_textw"),
        Case(grp, "unet/config.json missing", lambda: cc_load(folder(
            "digits-teacher", lambda d: (d / "unet" / "config.json").unlink(), "_noconf")), "digits-teacher_noconf"),
    ]
    lora = "pytorch_lora_weights.safetensors"

    def lora_pipe():
        return ClassConditionalLoraPipeline.from_pretrained(CKPT / "digits-teacher")

    cases += [
        Case(grp, "LoRA: missing folder", lambda: lora_pipe().load_lora_weights(tmp() / "nolora"), "no LoRA weights"),
        Case(grp, "LoRA: truncated file", lambda: lora_pipe().load_lora_weights(folder(
            "digits-alignprop-lora", _truncate(lora, 3000), "_trunc")), "corrupt or truncated"),
        Case(grp, "LoRA: NaN values", lambda: lora_pipe().load_lora_weights(folder(
            "digits-alignprop-lora", _nan_weights(lora), "_nan")), "NaN/inf"),
        Case(grp, "LoRA: a file that is not safetensors", lambda: lora_pipe().load_lora_weights(folder(
            "digits-alignprop-lora", _write(lora, "hello"), "_text")), "corrupt or truncated"),
        Case(grp, "LoRA: the teacher's folder", lambda: lora_pipe().load_lora_weights(CKPT / "digits-teacher"),
             "no LoRA weights"),
        Case(grp, "LoRA: path=3", lambda: lora_pipe().load_lora_weights(3), "pretrained_model_name_or_path"),
        Case(grp, "LoRA: adapter_name=3", lambda: lora_pipe().load_lora_weights(CKPT / "digits-alignprop-lora",
                                                                                adapter_name=3), "adapter_name"),
        Case(grp, "LoRA: onto a UNet without the target modules", lambda: __import__(
            "gen.reward.lora", fromlist=["load_lora_into_unet"]).load_lora_into_unet(
            cc().unet, CKPT / "digits-alignprop-lora" / lora), "does not fit|match no module"),
        Case(grp, "guider: missing folder", lambda: Guider.from_pretrained(tmp() / "noguider"), "noguider"),
        Case(grp, "guider: truncated guider_config.json", lambda: Guider.from_pretrained(folder(
            "digits-teacher", _truncate("linear_ag/guider_config.json", 40), "_gtrunc") / "linear_ag"),
             "guider_config.json"),
        Case(grp, "guider: guider_config.json holding []", lambda: Guider.from_pretrained(folder(
            "digits-teacher", _write("linear_ag/guider_config.json", "[]"), "_glist") / "linear_ag"),
             "guider_config.json"),
        Case(grp, "guider: unknown _class_name", lambda: Guider.from_pretrained(folder(
            "digits-teacher", _write("linear_ag/guider_config.json", '{"_class_name": "Bogus"}'), "_gbogus")
                                                                                / "linear_ag"), "Bogus"),
        Case(grp, "guider: LinearAG config with NaN coefficients", lambda: LinearAG.from_pretrained(folder(
            "digits-teacher", _write("linear_ag/guider_config.json", json.dumps(
                {"_class_name": "LinearAG", "guidance_scale": 3.0, "num_inference_steps": 1,
                 "coefficients": [[NAN, 0, 0]]})), "_gnan") / "linear_ag"), "coefficients"),
        Case(grp, "guider: APG.from_pretrained on a LinearAG folder", lambda: __import__(
            "gen.guidance", fromlist=["APG"]).APG.from_pretrained(CKPT / "digits-teacher" / "linear_ag"), "LinearAG"),
    ]
    return cases


def image_io_cases() -> list[Case]:
    from gen.data.images import make_grid, numpy_to_pil, save_grid

    grp = "gen.data.images"
    return [
        Case(grp, "make_grid(images uint8)", lambda: make_grid(torch.zeros(2, 1, 4, 4, dtype=torch.uint8)), "images"),
        Case(grp, "make_grid(images in [0, 255])", lambda: make_grid(torch.full((2, 1, 4, 4), 255.0)), "images"),
        Case(grp, "make_grid(images with NaN)", lambda: make_grid(torch.full((2, 1, 4, 4), NAN)), "images"),
        Case(grp, "make_grid(images of 3 dims)", lambda: make_grid(torch.zeros(1, 4, 4)), "images"),
        Case(grp, "make_grid(nrow=0)", lambda: make_grid(torch.zeros(2, 1, 4, 4), nrow=0), "nrow"),
        Case(grp, "make_grid(images as a list)", lambda: make_grid([[0.0]]), "images"),
        Case(grp, "make_grid(images in [0, 1] with a 255 pixel)", lambda: make_grid(torch.cat(
            [torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 255.0)])), "images"),
        Case(grp, "numpy_to_pil(images int64)", lambda: numpy_to_pil(np.zeros((1, 4, 4, 1), np.int64)), "images"),
        Case(grp, "numpy_to_pil(float images in [0, 255])", lambda: numpy_to_pil(np.full((1, 4, 4, 1), 200.0)),
             "images"),
        Case(grp, "numpy_to_pil(images with NaN)", lambda: numpy_to_pil(np.full((1, 4, 4, 1), NAN)), "images"),
        Case(grp, "save_grid(upscale=0)", lambda: save_grid(torch.zeros(2, 1, 4, 4), tmp() / "g.png", upscale=0),
             "upscale"),
    ]


def mixture_and_benchmark_cases() -> list[Case]:
    """Issue 17: mixture weights of the 2-D toys and the f-distill toy teacher; the benchmarks' settings (an AG spec,
    an empty tuning grid, f-distill's modes and students)."""
    from diffusers import DDPMScheduler

    from gen.cli import parse_settings
    from gen.data.toys import check_mixture_weights
    from gen.distill.toy import GaussianMixtureTeacher, mode_statistics
    from gen.evaluation import fdistill, guidance, inverse

    grp = "mixture weights"
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    cases = _numbers("weights", {}, [[0.5, 0.5, 0.0], [0.6, -0.1, 0.5], [1.0, NAN, 1.0], [], [[0.5, 0.5]]],
                     lambda **k: check_mixture_weights(**k), "weights", grp)
    cases += _numbers("weights", {"centres": torch.zeros(3, 2), "std": 0.1, "scheduler": sched},
                      [[0.5, 0.5, 0.0], [1.0, 2.0]], lambda **k: GaussianMixtureTeacher(**k), "weights",
                      grp + ": GaussianMixtureTeacher")
    cases += _numbers("weights", {"samples": torch.zeros(4, 2), "centres": torch.zeros(3, 2), "std": 0.1},
                      [[0.5, -0.5, 1.0]], lambda **k: mode_statistics(**k), "weights", grp + ": mode_statistics")

    bgrp = "benchmark settings"
    config = inverse.load_settings()

    def grid(only):
        return inverse.tuning_grid(config, "reddiff", 1000, only=only)

    cases += [
        Case(bgrp, "inverse: tuning grid filtered to nothing (optimizer=lbfgs)",
             lambda: grid({"optimizer": ["lbfgs"]}), "tuning grid.*no valid value left for 'optimizer'"),
        Case(bgrp, "inverse: tuning grid with only invalid t_max", lambda: inverse.tuning_grid(
            {"tuning": {"reddiff": {"grid": {"t_max": [1000, -5]}}}}, "reddiff", 1000), "no valid value left.*t_max"),
        Case(bgrp, "inverse: --tune_only without '='",
             lambda: parse_settings(inverse.InverseSettings, ["--tune_only", "sgd"]), "tune_only"),
        Case(bgrp, "guidance: --ag_settings with an unknown criterion",
             lambda: parse_settings(guidance.GuidanceSettings, ["--ag_settings", "l2:0.9"]), "criterion"),
        Case(bgrp, "guidance: --ag_settings with gamma_bar 1.5",
             lambda: parse_settings(guidance.GuidanceSettings, ["--ag_settings", "x0_cosine:1.5"]), "gamma_bar"),
        Case(bgrp, "fdistill: two modes", lambda: parse_settings(fdistill.FDistillEvalSettings, ["--toy", "--digits"]),
             "exactly one mode"),
        Case(bgrp, "fdistill: a student without NAME=",
             lambda: parse_settings(fdistill.FDistillEvalSettings, ["--students", "runs/x"]), "NAME=PATH"),
        Case(bgrp, "fdistill: a student folder that is neither a pipeline nor a checkpoint",
             lambda: __import__("gen.distill.students", fromlist=["load_student"]).load_student(tmp()),
             "neither a one-step pipeline folder"),
    ]
    return cases


def all_cases() -> list[Case]:
    cases = []
    for build in (class_conditional_cases, gbm_cases, interpolant_cases, one_step_cases, red_diff_cases, sd_cases,
                  guider_cases, operator_cases, loader_cases, image_io_cases, mixture_and_benchmark_cases):
        cases += build()
    return cases


BEFORE = ("Before the validation layer (486 of these cases, all but the ClassConditionalLoraPipeline loader case, run "
          "on commit 97deb1f, 2026-11-29): 304 clear, 98 silent, "
          "84 raw. The last two left open then (AdaptiveGuidance gamma_bar outside (0, 1], silent) are clear since "
          "issue 17's merge.")


# --- the table -------------------------------------------------------------------------------------------------------
def table(results: list[tuple[Case, Outcome]]) -> str:
    counts = {s: sum(o.status == s for _, o in results) for s in ("clear", "raw", "silent")}
    lines = ["# Bad-input suite: every case and how it is answered", "",
             "Generated by `python -m tests.bad_inputs` (the cases live in `tests/bad_inputs.py`; "
             "`tests/test_bad_inputs.py` runs them). A case is **clear** when `gen` itself raises a `ValueError` or "
             "`TypeError` (`gen.validate.ArgumentTypeError` is both) whose message names the argument; **raw** when "
             "another exception escapes or a library raises it; **silent** when nothing is raised. *pending* marks a "
             "case whose fix belongs to another part of the project (the reason is given).", "",
             f"**{len(results)} cases: {counts['clear']} clear, {counts['silent']} silent, {counts['raw']} raw.**",
             "", BEFORE, "", "| group | cases | clear | silent | raw |", "|---|---|---|---|---|"]
    names = list(dict.fromkeys(c.group for c, _ in results))
    for name in names:
        outs = [o for c, o in results if c.group == name]
        lines.append(f"| {name} | {len(outs)} | " + " | ".join(str(sum(o.status == s for o in outs))
                                                            for s in ("clear", "silent", "raw")) + " |")
    group = None
    for case, out in results:
        if case.group != group:
            group = case.group
            n = [o for c, o in results if c.group == group]
            lines += ["", f"## {group} ({len(n)} cases)", "", "| bad input | answer | message |", "|---|---|---|"]
        answer = out.status if out.status != "clear" else f"clear ({out.kind})"
        if case.pending:
            answer += f"; *pending: {case.pending}*"
        msg = out.message if len(out.message) <= 160 else out.message[:157] + "..."
        msg = msg.replace("|", "\\|").replace(str(tmp()), "TMP").replace(str(ROOT) + "/", "")
        msg = re.sub(r"0x[0-9a-fA-F]+", "0x...", msg)
        what = re.sub(r"0x[0-9a-fA-F]+", "0x...", case.what.replace("|", "\\|"))
        lines.append(f"| `{what}` | {answer} | {msg} |")
    return "\n".join(lines) + "\n"


def run_all() -> list[tuple[Case, Outcome]]:
    return [(c, classify(c)) for c in all_cases()]


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    results = run_all()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("bad_inputs.md")
    out.write_text(table(results))
    counts = {s: sum(o.status == s for _, o in results) for s in ("clear", "raw", "silent")}
    print(f"{len(results)} cases: {counts} -> {out}")
    shutil.rmtree(tmp(), ignore_errors=True)
