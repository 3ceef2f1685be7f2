"""AlignProp on SDXL, SD3-style flow models and class-conditional DiT (issue 15, item 4), on tiny random components
built offline.

- Gradients of a reward through sampling equal a hand-unrolled reference: SDXL's Euler steps in sigma space,
  SD3's flow-matching Euler steps x <- x + (sigma_next - sigma) v and DiT's DDIM steps on the noise half of its
  learned-sigma output, each with CFG on the family's inputs (DiT: the null class), truncated backprop (predictions
  of steps i < T - K detached) and with / without checkpointing of the network and the VAE.
- The trainer runs a couple of steps per family; the saved LoRA loads with Diffusers' own
  ``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline.load_lora_weights`` and with our family pipelines, and
  their images equal ours (our sampler with our loader) to 1e-5; the LoRA moved the images away from the base.
  DiT (whose Diffusers pipeline has no LoRA loader): the trained network's images equal ``GuidedDiTPipeline`` with
  the file loaded, the frozen base is unchanged, labels by index or ImageNet-style name, and the run resumes.
- The dynamic timestep shift of a flow scheduler reaches the trainer's sampler (equal to Diffusers).
- Defaults equal TRL 0.23.1's ``AlignPropConfig``; the hub configs parse and validate without loading models.
- Bad input: unsupported families, a folder of another family, LoRA targets matching nothing, eta on a flow
  scheduler, DDIM on a flow model, fp16 on a CPU, a resolution the patch grid does not divide; for DiT labels out of
  range or unknown names, a resolution other than its native one, a negative prompt, a ``unet.`` LoRA file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusion3Pipeline, StableDiffusionXLPipeline

from gen.models.tiny_families import build_tiny_dit, build_tiny_sd3, build_tiny_sdxl
from gen.reward import (
    DiTBackend,
    SD3Backend,
    StableDiffusionXLBackend,
    Truncation,
    add_lora,
    lora_metadata,
    lora_state_dict,
    read_lora,
    sample_with_grad,
    save_lora,
)
from gen.reward.lora import load_lora_into_unet
from gen.reward.training import (
    AlignPropConfig,
    AlignPropObjective,
    denoiser,
    generate,
    load_model,
    make_backend,
    select_scheduler,
)
from gen.training import parse_config, train

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a dog"]
LABELS = ["3", "871"]     # DiT: class labels (the tiny DiT has 1000 classes; null class 1000)
STEPS = 4


def _randomise_lora(net, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _reward(images):
    # a smooth differentiable stand-in for a reward: images [B, 3, H, W] in [0, 1] -> [B]
    return (images * torch.linspace(-1, 1, images.shape[-1])).mean(dim=(1, 2, 3)) + images.square().mean(dim=(1, 2, 3))


def _lora_grads(net, loss):
    params = [p for n, p in net.named_parameters() if "lora_" in n]
    return torch.autograd.grad(loss, params)


def _assert_grads_close(a, b):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        # float32 sums in another order (CFG branches batched together): tolerance relative to the tensor's scale
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))


# --- gradients against hand-unrolled references ----------------------------------------------------------------------
def _sdxl_backend(w=3.0):
    pipe = StableDiffusionXLPipeline(**build_tiny_sdxl(0), add_watermarker=False)
    add_lora(pipe.unet, rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    _randomise_lora(pipe.unet)
    return pipe, StableDiffusionXLBackend(pipe, guidance_scale=w)


def _sd3_backend(w=3.0, **kw):
    pipe = StableDiffusion3Pipeline(**build_tiny_sd3(0, **kw))
    add_lora(pipe.transformer, rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"])
    _randomise_lora(pipe.transformer)
    return pipe, SD3Backend(pipe, guidance_scale=w, max_sequence_length=8)


def _dit_backend(w=3.0):
    from pipelines import GuidedDiTPipeline

    pipe = GuidedDiTPipeline(**build_tiny_dit(0))
    add_lora(pipe.transformer, rank=2, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    _randomise_lora(pipe.transformer)
    return pipe, DiTBackend(pipe, guidance_scale=w)


def _hand_sdxl(pipe, cond, x, k, w):
    """Euler (Karras et al. 2022, eq. 5 with eps prediction): x_in = x / sqrt(s^2 + 1), eps = CFG of the UNet,
    x <- x + (s_next - s) eps; eps of steps i < T - k detached. Images: VAE decode of x / scaling_factor."""
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas
    x = x * sched.init_noise_sigma
    c, u = cond.cond, cond.uncond
    for i, t in enumerate(sched.timesteps):
        x_in = x / (sigmas[i] ** 2 + 1).sqrt()

        def eps(branch, x_in=x_in, t=t):
            return pipe.unet(x_in, t, encoder_hidden_states=branch["encoder_hidden_states"],
                             added_cond_kwargs={"text_embeds": branch["text_embeds"],
                                                "time_ids": branch["time_ids"]}).sample

        e_c, e_u = eps(c), eps(u)
        e = e_u + w * (e_c - e_u)
        if i < STEPS - k:
            e = e.detach()
        x = x + (sigmas[i + 1] - sigmas[i]) * e
    img = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1)


def _hand_sd3(pipe, cond, x, k, w):
    """Flow matching (rectified flow, Esser et al. 2024): v = CFG of the transformer at x_t = (1 - s) x0 + s eps,
    x <- x + (s_next - s) v; v of steps i < T - k detached. Images: decode of x / scaling_factor + shift_factor."""
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    sigmas = sched.sigmas
    c, u = cond.cond, cond.uncond
    for i, t in enumerate(sched.timesteps):
        def vel(branch, x=x, t=t):
            return pipe.transformer(hidden_states=x, timestep=t.expand(x.shape[0]),
                                    encoder_hidden_states=branch["encoder_hidden_states"],
                                    pooled_projections=branch["pooled_projections"]).sample

        v_c, v_u = vel(c), vel(u)
        v = v_u + w * (v_c - v_u)
        if i < STEPS - k:
            v = v.detach()
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    img = pipe.vae.decode(x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    return (img / 2 + 0.5).clamp(0, 1)


def _hand_dit(pipe, cond, x, k, w):
    """DDIM (Song et al. 2021, eq. 12, eta 0) on DiT's noise prediction, the first 4 of its 8 output channels (the
    learned sigma dropped): eps = eps_u + w (eps_c - eps_u) with the null class 1000 as the unconditional label,
    x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t), x <- sqrt(a_prev) x0 + sqrt(1 - a_prev) eps (a_prev = 1 after the last
    step: set_alpha_to_one); eps of steps i < T - k detached. Images: decode of x / scaling_factor."""
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    ac = sched.alphas_cumprod
    labels, null = cond.cond["class_labels"], cond.uncond["class_labels"]
    assert null.tolist() == [1000] * len(labels)
    for i, t in enumerate(sched.timesteps):
        def eps(lab, x=x, t=t):
            return pipe.transformer(x, timestep=t.expand(x.shape[0]), class_labels=lab).sample[:, :4]

        e_c, e_u = eps(labels), eps(null)
        e = e_u + w * (e_c - e_u)
        if i < STEPS - k:
            e = e.detach()
        prev = int(t) - 1000 // STEPS
        a_t, a_prev = ac[int(t)], (ac[prev] if prev >= 0 else torch.tensor(1.0))
        x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    img = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "dit"])
def test_gradient_equals_hand_unrolled_sampler(family):
    w = 3.0
    pipe, be = {"sdxl": _sdxl_backend, "sd3": _sd3_backend, "dit": _dit_backend}[family](w)
    hand = {"sdxl": _hand_sdxl, "sd3": _hand_sd3, "dit": _hand_dit}[family]
    net = denoiser(pipe)
    cond = be.encode(LABELS if family == "dit" else PROMPTS, "cpu")
    x_t = torch.randn(be.latent_shape(2), generator=torch.Generator().manual_seed(0))

    def ours(k, ckpt):
        x, info = sample_with_grad(be.model_fn(cond), be.scheduler, x_t, STEPS, Truncation("fixed", k=k),
                                   gradient_checkpointing=ckpt)
        assert info["keep_mask"] == [False] * (STEPS - k) + [True] * k and info["nfe"] == 2 * STEPS
        return _lora_grads(net, _reward(be.decode(x, gradient_checkpointing=ckpt)).mean())

    ref = _lora_grads(net, _reward(hand(pipe, cond, x_t, 2, w)).mean())
    _assert_grads_close(ours(2, ckpt=True), ref)     # network and VAE decode checkpointed
    _assert_grads_close(ours(2, ckpt=False), ref)
    full = _lora_grads(net, _reward(hand(pipe, cond, x_t, STEPS, w)).mean())
    _assert_grads_close(ours(STEPS, ckpt=True), full)
    assert not torch.allclose(full[0], ref[0])       # truncation changes the gradient, so the checks above can fail


def test_flow_dynamic_shift_reaches_the_sampler():
    """With ``use_dynamic_shifting`` the trainer's sampler computes mu from the latent size, as the pipeline; its
    images equal StableDiffusion3Pipeline's."""
    pipe, be = _sd3_backend(4.0, use_dynamic_shifting=True)
    assert "mu" in be.timestep_kwargs(be.latent_shape(2))
    cfg = AlignPropConfig(model_type="sd3", prompts=PROMPTS, eta=0.0, num_inference_steps=STEPS,
                          mixed_precision="no", rewards="contrast:1")
    images, _ = generate(cfg, be, PROMPTS, "cpu", torch.Generator().manual_seed(5), with_grad=False)
    latents = torch.randn(be.latent_shape(2), generator=torch.Generator().manual_seed(5))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0, latents=latents, output_type="pt",
               max_sequence_length=8).images
    torch.testing.assert_close(images, ref, rtol=0, atol=1e-5)


# --- trainer -> Diffusers' own loaders --------------------------------------------------------------------------------
def _train_args(family, out, *extra):
    return ["--model_type", family, "--pretrained_model", "tiny", "--prompts", ",".join(PROMPTS),
            "--rewards", "contrast:1.0,saturation:0.5", "--num_inference_steps", "3", "--mixed_precision", "no",
            "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "0.05", "--eval_prompts", "",
            "--log_every", "1", "--max_sequence_length", "8", "--output_dir", str(out), *extra]


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_trained_lora_loads_in_diffusers(tmp_path, family):
    out = train("alignprop", _train_args(family, tmp_path / "run"))
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2] and all(r["grad_norm"] > 0 for r in logs)
    sd, meta, prefix = read_lora(out, with_prefix=True)
    assert prefix == ("unet" if family == "sdxl" else "transformer") and meta["r"] == 4
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)       # trained away from B = 0

    # ours: the trainer's sampler (eta 0, w 4) on fresh tiny components with the file loaded by our loader
    cfg = parse_config(AlignPropConfig, _train_args(family, tmp_path / "unused", "--eta", "0", "--guidance_scale",
                                                    "4", "--num_inference_steps", str(STEPS)))
    ours_pipe = load_model(cfg)
    select_scheduler(cfg, ours_pipe)
    load_lora_into_unet(denoiser(ours_pipe), out)
    be = make_backend(cfg, ours_pipe, denoiser(ours_pipe))
    ours, _ = generate(cfg, be, PROMPTS, "cpu", torch.Generator().manual_seed(3), with_grad=False)
    latents = torch.randn(be.latent_shape(2), generator=torch.Generator().manual_seed(3))

    def run(cls, lora=True):
        if family == "sdxl":
            pipe = cls(**build_tiny_sdxl(0), add_watermarker=False)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # the trainer's (TRL's) sampler
        else:
            pipe = cls(**build_tiny_sd3(0))
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(str(out))
        kw = {"max_sequence_length": 8} if family == "sd3" else {}
        return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=4.0, latents=latents.clone(),
                    output_type="pt", **kw).images

    from pipelines import GuidedStableDiffusion3Pipeline, GuidedStableDiffusionXLPipeline

    diffusers_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusion3Pipeline
    family_cls = GuidedStableDiffusionXLPipeline if family == "sdxl" else GuidedStableDiffusion3Pipeline
    theirs = run(diffusers_cls)                 # Diffusers' own load_lora_weights and pipeline
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    torch.testing.assert_close(run(family_cls), theirs, rtol=0, atol=1e-5)   # our family pipeline loads it too
    assert (run(diffusers_cls, lora=False) - theirs).abs().max() > 1e-4      # and the LoRA changes the images


# --- DiT: trainer -> GuidedDiTPipeline.load_lora_weights -----------------------------------------------------------
ID2LABEL = {"3": "tiger shark, Galeocerdo cuvieri", "871": "trimaran"}   # as the hub's model_index.json holds them


def _dit_folder(tmp_path) -> str:
    """The tiny DiT saved as a pipeline folder with an ``id2label`` in its model_index.json, as facebook/DiT-XL-2-256
    has (Diffusers' DiTPipeline reads it but does not save it)."""
    from pipelines import GuidedDiTPipeline

    folder = tmp_path / "dit"
    GuidedDiTPipeline(**build_tiny_dit(0)).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": ID2LABEL}))
    return str(folder)


def _dit_args(pretrained, out, *extra):
    return ["--model_type", "dit", "--pretrained_model", pretrained, "--prompts", "3,tiger shark,trimaran,17",
            "--eval_prompts", "", "--rewards", "contrast:1.0,saturation:0.5", "--num_inference_steps", "3",
            "--truncation", "fixed", "--backprop_k", "2", "--gradient_checkpointing", "true", "--checkpoint_decoder",
            "true", "--eta", "0", "--guidance_scale", "4", "--mixed_precision", "no", "--train_batch_size", "2",
            "--max_train_steps", "2", "--checkpointing_steps", "2", "--learning_rate", "0.05", "--log_every", "1",
            "--output_dir", str(out), *extra]


class _KeepObjective(AlignPropObjective):
    """The AlignProp objective, kept after training so the test can sample the trained network itself."""

    last = None

    def build(self):
        models = super().build()
        type(self).last = self
        return models


def test_dit_trained_lora_loads_in_guided_dit_pipeline(tmp_path):
    from pipelines import GuidedDiTPipeline

    folder = _dit_folder(tmp_path)
    out = train(_KeepObjective, _dit_args(folder, tmp_path / "run"))
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [(r["step"], r["k"]) for r in logs] == [(1, 2), (2, 2)] and all(r["grad_norm"] > 0 for r in logs)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    obj = _KeepObjective.last
    net = obj.pipe.transformer
    # the frozen base is unchanged (peft moved each adapted weight under .base_layer); label dropout is off although
    # the loop left the network in training mode
    base = build_tiny_dit(0)["transformer"].state_dict()
    now = {k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if "lora_" not in k}
    assert now.keys() == base.keys() and all(torch.equal(now[k], base[k]) for k in base)
    assert net.training and all(m.dropout_prob == 0 for m in net.modules() if type(m).__name__ == "LabelEmbedding")
    # the file is the trained adapter (keys transformer.), moved away from B = 0
    sd, meta, prefix = read_lora(out, with_prefix=True)
    assert prefix == "transformer" and meta["r"] == 4
    trained = lora_state_dict(net)
    assert sd.keys() == trained.keys() and all(torch.equal(sd[k], trained[k]) for k in sd)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)

    # the trained network's images (the trainer's sampler: DDIM eta 0, CFG 4 against the null class) equal
    # GuidedDiTPipeline's with the file loaded, from the same noise; labels by index and by name
    labels = ["tiger shark", "871", "17"]
    be = make_backend(obj.cfg, obj.pipe, net)
    ours, _ = generate(obj.cfg, be, labels, "cpu", torch.Generator().manual_seed(3), with_grad=False)
    latents = torch.randn(be.latent_shape(len(labels)), generator=torch.Generator().manual_seed(3))
    pipe = GuidedDiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe(class_labels=["tiger shark", 871, 17], num_inference_steps=3, guidance_scale=4.0, eta=0.0,
                    latents=latents.clone(), output_type="pt").images

    before = sample()
    pipe.load_lora_weights(out)
    theirs = sample()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (before - theirs).abs().max() > 1e-4          # the LoRA changes the images
    pipe.unload_lora_weights()
    torch.testing.assert_close(sample(), before, rtol=0, atol=0)

    # resume from checkpoint-2: two more steps
    out2 = train("alignprop", _dit_args(folder, tmp_path / "run", "--max_train_steps", "4", "--resume", "latest"))
    assert [json.loads(r)["step"] for r in (out2 / "logs.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert any(not torch.equal(v, sd[k]) for k, v in read_lora(out2)[0].items())


def test_dit_bad_labels_and_settings_name_the_problem(tmp_path):
    folder = _dit_folder(tmp_path)
    out = tmp_path / "x"
    # a folder: checked before the model loads (transformer/config.json, model_index.json's id2label)
    with pytest.raises(ValueError, match=r"prompts: labels \[1000\] out of range; allowed 0..999"):
        train("alignprop", _dit_args(folder, out, "--prompts", "3,1000"))
    with pytest.raises(ValueError, match=r"eval_prompts: 'goldfish' is neither a class index nor a class name of "
                                         r"this model; model_type=dit takes indices 0..999 or names \(pipe.labels: "
                                         r"Galeocerdo cuvieri, tiger shark, trimaran\)"):
        train("alignprop", _dit_args(folder, out, "--eval_prompts", "goldfish"))
    # the tiny model (as a hub id): checked once loaded
    with pytest.raises(ValueError, match=r"prompts: 'cat' is not a class index, and this model has no class names "
                                         r"\(no id2label\); model_type=dit takes indices 0..999"):
        train("alignprop", _dit_args("tiny", out, "--prompts", "3,cat"))
    with pytest.raises(ValueError, match=r"prompts: labels \[-1\] out of range"):
        train("alignprop", _dit_args("tiny", out, "--prompts", "-1"))
    with pytest.raises(ValueError, match=r"resolution 32 with a DiT: it samples at its native size 16"):
        train("alignprop", _dit_args("tiny", out, "--prompts", "3", "--resolution", "32"))
    with pytest.raises(ValueError, match="negative_prompt with model_type=dit: DiT's unconditional branch is its "
                                         "null class"):
        _parse("--model_type", "dit", "--negative_prompt", "blurry")
    # a file with 'unet.' keys (another family's LoRA: here the DiT's own adapter under the wrong prefix) is refused
    from pipelines import GuidedDiTPipeline

    dit = build_tiny_dit(0)["transformer"]
    meta = lora_metadata(add_lora(dit, rank=2, target_modules=["to_q"]))
    save_lora(tmp_path / "unet_lora", lora_state_dict(dit), meta, prefix="unet")
    with pytest.raises(ValueError, match=r"holds 'unet.' weights, but DiTTransformer2DModel takes 'transformer.' ones"):
        GuidedDiTPipeline(**build_tiny_dit(0)).load_lora_weights(tmp_path / "unet_lora")
    with pytest.raises(ValueError, match=r"labels: 'goldfish' is neither a class index"):
        DiTBackend(GuidedDiTPipeline(**build_tiny_dit(0), id2label=ID2LABEL)).encode(["goldfish"], "cpu")


# --- defaults, configs -----------------------------------------------------------------------------------------------
# TRL 0.23.1 trl/trainer/alignprop_config.py (the last release with AlignProp): field -> default, and ours beside it
TRL_DEFAULTS = {
    "sample_num_steps": (50, "num_inference_steps"),
    "sample_guidance_scale": (5.0, "guidance_scale"),
    "train_batch_size": (1, "train_batch_size"),
    "train_learning_rate": (1e-3, "learning_rate"),
    "train_adam_beta1": (0.9, "adam_beta1"),
    "train_adam_beta2": (0.999, "adam_beta2"),
    "train_adam_weight_decay": (1e-4, "weight_decay"),
    "train_gradient_accumulation_steps": (1, "gradient_accumulation_steps"),
    "train_max_grad_norm": (1.0, "max_grad_norm"),
    "mixed_precision": ("fp16", "mixed_precision"),
    "allow_tf32": (True, "allow_tf32"),
    "num_checkpoint_limit": (5, "checkpoints_total_limit"),
    "num_epochs": (100, "max_train_steps"),        # one TRL "epoch" is one optimizer step
    "save_freq": (1, "checkpointing_steps"),
    "seed": (0, "seed"),
}


def test_defaults_match_trl_alignprop_config():
    cfg = AlignPropConfig(prompts=["x"], mixed_precision="fp16")
    for trl_name, (value, ours) in TRL_DEFAULTS.items():
        assert getattr(cfg, ours) == value, (trl_name, ours, getattr(cfg, ours))
    try:   # side by side with TRL itself when it is installed (pip install --no-deps trl==0.23.1)
        from trl import AlignPropConfig as TRLConfig
    except ImportError:
        TRLConfig = None
    if TRLConfig is not None:
        import dataclasses

        trl = {f.name: f.default for f in dataclasses.fields(TRLConfig)}
        assert {k: trl[k] for k in TRL_DEFAULTS} == {k: v for k, (v, _) in TRL_DEFAULTS.items()}
    # sample_eta=1.0 on DDIM (and 0 on schedulers without eta); Adam eps 1e-8 is torch's AdamW default
    from gen.reward.training import resolve_eta

    assert resolve_eta(cfg.eta, DDIMScheduler()) == 1.0
    assert resolve_eta(cfg.eta, build_tiny_sd3(0)["scheduler"]) == 0.0
    assert torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults["eps"] == 1e-8
    # truncated_backprop_rand=True with truncated_rand_backprop_minmax=(0, 50): a fresh cut r in 0..50 per step
    t = cfg.truncation_spec()
    assert (t.mode, t.cut_min, t.cut_max or cfg.num_inference_steps) == ("per_step_random", 0, 50)
    # LoRA r=4, alpha=4, Gaussian init on to_q/k/v/out.0; negative prompt: the family's empty-prompt branch
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_init) == (4, 4.0, "gaussian")
    assert sorted(cfg.lora_target_modules) == ["to_k", "to_out.0", "to_q", "to_v"] and cfg.negative_prompt is None


def test_shipped_configs_parse_without_loading_models():
    for name, family in (("alignprop_sdxl", "sdxl"), ("alignprop_sd3", "sd3"), ("alignprop_sd15", "stable_diffusion"),
                         ("alignprop_digits", "class_conditional"), ("alignprop_dit", "dit")):
        cfg = parse_config(AlignPropConfig, ["--config", str(ROOT / "configs" / f"{name}.yaml")])
        assert cfg.model_type == family
    digits = parse_config(AlignPropConfig, ["--config", str(ROOT / "configs/alignprop_digits.yaml")])
    # the shipped digits run keeps its settings where the defaults moved to TRL's
    assert (digits.num_inference_steps, digits.eta, digits.guidance_scale, digits.truncation,
            digits.mixed_precision, digits.train_batch_size) == (10, 0.0, 1.0, "uniform", "no", 8)


# --- bad input -------------------------------------------------------------------------------------------------------
def _parse(*args):
    return parse_config(AlignPropConfig, ["--prompts", "a cat", "--rewards", "contrast:1", *args])


def test_bad_family_inputs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"model_type='flux' is not a family AlignProp supports; supported: "
                                         r"class_conditional .*sdxl, sd3 .*, dit \(class-conditional "
                                         r"DiTTransformer2DModel\)"):
        _parse("--model_type", "flux")
    with pytest.raises(ValueError, match="scheduler=ddim with model_type=sd3: SD3-style models are flow-matching"):
        _parse("--model_type", "sd3", "--scheduler", "ddim")
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match=r"is a FluxPipeline, a family AlignProp does not support; supported: .*dit"):
        load_model(_parse("--model_type", "sdxl", "--pretrained_model", str(tmp_path / "flux")))
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    with pytest.raises(ValueError, match=r"is a DiTPipeline \(model_type=dit\), but model_type=sdxl"):
        load_model(_parse("--model_type", "sdxl", "--pretrained_model", str(tmp_path / "dit")))
    (tmp_path / "sd3").mkdir()
    (tmp_path / "sd3" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ValueError, match=r"is a StableDiffusion3Pipeline \(model_type=sd3\), but model_type=sdxl"):
        load_model(_parse("--model_type", "sdxl", "--pretrained_model", str(tmp_path / "sd3")))
    out = str(tmp_path / "x")
    with pytest.raises(ValueError, match=r"LoRA target module 'conv1' matches no Linear/Conv2d in "
                                         r"SD3Transformer2DModel; module names there end with: .*to_q"):
        train("alignprop", _train_args("sd3", out, "--lora_target_modules", "to_q,conv1"))
    with pytest.raises(ValueError, match="eta=0.5 given but FlowMatchEulerDiscreteScheduler.step has no eta"):
        train("alignprop", _train_args("sd3", out, "--eta", "0.5"))
    if not torch.cuda.is_available():
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)   # a fresh process: the state fixes mixed precision
        try:
            with pytest.raises(ValueError, match=r"mixed_precision=fp16 \(TRL's default\) needs a GPU"):
                train("alignprop", _train_args("sdxl", out, "--mixed_precision", "fp16"))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match=r"resolution 18 must be a positive multiple of 4 \(the VAE factor 2 x "
                                         r"patch size 2\)"):
        train("alignprop", _train_args("sd3", out, "--resolution", "18"))


# --- the measurement script ------------------------------------------------------------------------------------------
def test_families_benchmark_smoke(tmp_path):
    from gen.evaluation.alignprop_families import AlignPropFamiliesSettings, markdown, run

    assert AlignPropFamiliesSettings().out.startswith("outputs/")
    settings = AlignPropFamiliesSettings(families=["sd3", "dit"], steps=2, batch=1, width=16, sample_size=4,
                                         sd3_layers=1, dit_layers=1, sd3_max_sequence_length=4, n_steps=1,
                                         out=str(tmp_path / "r.json"))
    result = run(settings, in_process=True)
    assert [(r["family"], r["k"], r["checkpointing"]) for r in result["rows"]] == [
        (f, k, c) for f in ("sd3", "dit") for k in (1, 2) for c in (True, False)]
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [rows[0]["scheduler"], rows[4]["scheduler"]] == ["FlowMatchEulerDiscreteScheduler", "DDIMScheduler"]
    assert rows[4]["network"] == "DiTTransformer2DModel"
    assert markdown(result).count("| sd3 |") == 4 and markdown(result).count("| dit |") == 4
    with pytest.raises(ValueError, match="families .*'flux'.*; allowed: sdxl, sd3, dit"):
        AlignPropFamiliesSettings(families=["flux"])
    with pytest.raises(ValueError, match="lies in the shipped eval/results/ folder"):
        run(AlignPropFamiliesSettings(families=["sd3"], out=str(ROOT / "eval/results/x.json")))
