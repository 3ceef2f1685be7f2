"""AlignProp: truncated backprop through sampling (against hand-unrolled autograd), checkpointing, DDIM eta against
the pipeline, LoRA injection / Diffusers-format save-load / mixing, the trainer (1 and 2 processes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from diffusers import DDIMScheduler

from gen.reward import (
    LORA_WEIGHT_NAME,
    ClassConditionalBackend,
    Truncation,
    add_lora,
    lora_metadata,
    lora_state_dict,
    mix_lora,
    read_lora,
    sample_with_grad,
    save_lora,
)
from gen.training import config_class, parse_config, train

ROOT = Path(__file__).resolve().parents[1]


def _sched():
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                         set_alpha_to_one=True)


def _attn_unet(seed=0):
    from gen.models.unet import digits_unet

    torch.manual_seed(seed)
    return digits_unet(block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D",
                       "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=8).eval()


def _randomise_lora(unet, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


class TinyNet(torch.nn.Module):
    """eps(x, t) = conv(x) * (1 + w t / 1000): a differentiable stand-in with two parameters tensors."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t):
        return self.conv(x) * (1 + self.w * t.float() / 1000)


def _hand_ddim(net, sched, x, steps, k):
    """DDIM (eta = 0, eq. 12 of Song et al.) unrolled by hand; predictions of steps i < T - k detached."""
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod
    for i, t in enumerate(sched.timesteps):
        eps = net(x, t)
        if i < steps - k:
            eps = eps.detach()
        prev = int(t) - 1000 // steps
        a_t, a_prev = ac[int(t)], (ac[prev] if prev >= 0 else torch.tensor(1.0))
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def _grads(net, loss):
    net.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in net.parameters()]


# --- truncated backprop ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 6])
def test_truncated_gradient_equals_hand_unrolled_detach(k):
    net, sched = TinyNet(), _sched()
    x_t = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    x, info = sample_with_grad(net, sched, x_t, 6, Truncation("fixed", k=k), gradient_checkpointing=False)
    assert info["k"] == k and info["keep_mask"] == [False] * (6 - k) + [True] * k
    ours = _grads(net, (x ** 2).mean())
    ref = _grads(net, (_hand_ddim(net, _sched(), x_t.clone(), 6, k) ** 2).mean())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if k < 6:  # truncation changes the gradient (so the comparison above can fail)
        full = _grads(net, (_hand_ddim(net, _sched(), x_t.clone(), 6, 6) ** 2).mean())
        assert not torch.allclose(full[0], ref[0])


def test_k_all_equals_full_backprop_and_checkpointing_is_exact():
    unet = _attn_unet()
    add_lora(unet, rank=2, target_modules=["to_q", "to_v"])
    _randomise_lora(unet)
    be = ClassConditionalBackend(unet, _sched(), guidance_scale=2.0)
    cond = be.encode([1, 7], "cpu")
    x_t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    params = [p for p in unet.parameters() if p.requires_grad]

    def grads(**kw):
        x, _ = sample_with_grad(be.model_fn(cond), _sched(), x_t, 4, **kw)
        return torch.autograd.grad(x.square().mean(), params)

    full = grads(truncation=None, gradient_checkpointing=False)
    for a, b in zip(full, grads(truncation=Truncation("fixed", k=4), gradient_checkpointing=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    for a, b in zip(grads(truncation=Truncation("fixed", k=2), gradient_checkpointing=False),
                    grads(truncation=Truncation("fixed", k=2), gradient_checkpointing=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_k_once_per_batch_versus_per_step_random_quirk():
    g = torch.Generator().manual_seed(0)
    ks = set()
    for _ in range(30):
        mask = Truncation("uniform", k_min=2, k_max=5).keep_mask(8, g)
        k = sum(mask)
        assert 2 <= k <= 5 and mask == [False] * (8 - k) + [True] * k  # one K, a contiguous suffix
        ks.add(k)
    assert ks == {2, 3, 4, 5}
    masks = [Truncation("per_step_random", cut_min=0, cut_max=8).keep_mask(8, g) for _ in range(300)]
    assert any(m != [False] * (8 - sum(m)) + [True] * sum(m) for m in masks)  # not of the "last K" form
    freq = torch.tensor(masks, dtype=torch.float).mean(0)  # P(keep step i) = P(r <= i) = (i + 1) / 9
    torch.testing.assert_close(freq, (torch.arange(8) + 1.0) / 9, atol=0.09, rtol=0)

    calls = []

    def counting(x, t):
        calls.append(torch.is_grad_enabled())
        return x * 0.1 * torch.ones((), requires_grad=True)

    sample_with_grad(counting, _sched(), torch.randn(1, 1, 4, 4), 8, Truncation("uniform", k_min=3, k_max=3),
                     gradient_checkpointing=False)
    assert calls == [False] * 5 + [True] * 3


def test_bad_k_and_modes_raise():
    with pytest.raises(ValueError, match="K=11 is larger than the number of sampling steps 10"):
        Truncation("fixed", k=11).validate(10)
    with pytest.raises(ValueError, match="k_max=12 is larger"):
        Truncation("uniform", k_min=1, k_max=12).validate(10)
    with pytest.raises(ValueError, match="allowed: fixed, uniform, per_step_random"):
        Truncation("random").validate(10)
    with pytest.raises(ValueError, match="eta=0.5 given but EulerDiscreteScheduler"):
        from diffusers import EulerDiscreteScheduler

        sample_with_grad(TinyNet(), EulerDiscreteScheduler(), torch.randn(1, 1, 4, 4), 3, eta=0.5)


def test_ddim_eta_with_gradients_matches_the_pipeline():
    from pipelines import ClassConditionalPipeline

    unet, sched = _attn_unet(), _sched()
    pipe = ClassConditionalPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(class_labels=[2, 5], num_inference_steps=5, eta=0.7, guidance_scale=1.5, output_type="pt",
               generator=torch.Generator().manual_seed(3)).images
    be = ClassConditionalBackend(unet, _sched(), guidance_scale=1.5)
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(2, 1, 16, 16, generator=g)
    x, _ = sample_with_grad(be.model_fn(be.encode([2, 5], "cpu")), be.scheduler, x_t, 5, eta=0.7, generator=g)
    torch.testing.assert_close(be.decode(x), ref, rtol=0, atol=1e-5)


# --- LoRA -----------------------------------------------------------------------------------------------------------
def test_lora_zero_b_is_identity_and_bad_target_raises():
    unet = _attn_unet()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        before = unet(x, t, class_labels=y).sample
    add_lora(unet, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    assert all(("lora_" in n) == p.requires_grad for n, p in unet.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, class_labels=y).sample, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"LoRA target module 'attn_q' matches no Linear/Conv2d in UNet2DModel"):
        add_lora(_attn_unet(), target_modules=["to_q", "attn_q"])


def test_lora_save_load_class_conditional(tmp_path):
    from pipelines import ClassConditionalPipeline
    from pipelines.lora import ClassConditionalLoraPipeline

    unet = _attn_unet()
    cfg = add_lora(unet, rank=2, alpha=6, target_modules=["to_q", "to_out.0", "conv1"])
    _randomise_lora(unet)
    save_lora(tmp_path / "lora", lora_state_dict(unet), lora_metadata(cfg))
    ClassConditionalPipeline(unet=_attn_unet(), scheduler=_sched()).save_pretrained(tmp_path / "base")
    pipe = ClassConditionalLoraPipeline.from_pretrained(tmp_path / "base")
    pipe.load_lora_weights(tmp_path / "lora")
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, class_labels=y).sample, unet(x, t, class_labels=y).sample)
        pipe.unload_lora_weights()
        torch.testing.assert_close(pipe.unet(x, t, class_labels=y).sample,
                                   _attn_unet()(x, t, class_labels=y).sample)
    with pytest.raises(ValueError, match="no LoRA weights"):
        pipe.load_lora_weights(tmp_path / "missing")


def test_lora_save_load_stable_diffusion_with_diffusers_loader(tmp_path):
    from diffusers import StableDiffusionPipeline

    from gen.models.tiny_sd import build_tiny_sd

    parts = build_tiny_sd(0)
    cfg = add_lora(parts["unet"], rank=4, alpha=2)
    _randomise_lora(parts["unet"])
    save_lora(tmp_path, lora_state_dict(parts["unet"]), lora_metadata(cfg))
    pipe = StableDiffusionPipeline(**build_tiny_sd(0), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path))  # diffusers' own loader
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor(300), torch.randn(2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=c).sample,
                                   parts["unet"](x, t, encoder_hidden_states=c).sample, rtol=1e-5, atol=1e-6)
    # and the file is what StableDiffusionPipeline.save_lora_weights writes (same keys)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "ref", unet_lora_layers=lora_state_dict(parts["unet"]))
    assert set(read_lora(tmp_path / "ref")[0]) == set(read_lora(tmp_path)[0])


def test_lora_mixing(tmp_path):
    from pipelines.lora import ClassConditionalLoraPipeline

    def fine_tune(seed, rank, alpha, name):
        unet = _attn_unet()
        cfg = add_lora(unet, rank=rank, alpha=alpha, target_modules=["to_q", "to_v"])
        _randomise_lora(unet, seed=seed)
        return save_lora(tmp_path / name, lora_state_dict(unet), lora_metadata(cfg)).parent

    a, b = fine_tune(1, 2, 4, "a"), fine_tune(2, 3, 3, "b")

    def loaded(folder):
        from pipelines import ClassConditionalPipeline

        ClassConditionalPipeline(unet=_attn_unet(), scheduler=_sched()).save_pretrained(tmp_path / "base")
        pipe = ClassConditionalLoraPipeline.from_pretrained(tmp_path / "base")
        pipe.load_lora_weights(folder)
        return pipe.unet

    def deltas(unet):
        from peft.tuners.lora import LoraLayer

        return {n: m.get_delta_weight("default") for n, m in unet.named_modules() if isinstance(m, LoraLayer)}

    da, db = deltas(loaded(a)), deltas(loaded(b))
    for c in (1.0, 0.0, 0.5, 0.25):
        dm = deltas(loaded(mix_lora(a, b, c, tmp_path / f"mix{c}").parent))
        for n in da:
            torch.testing.assert_close(dm[n], c * da[n] + (1 - c) * db[n], rtol=1e-5, atol=1e-7)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tmp_path / "mix1.0")(x, t, class_labels=y).sample,
                                   loaded(a)(x, t, class_labels=y).sample, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="equal rank"):
        mix_lora(a, b, 0.5, tmp_path / "f", mode="factors")


# --- trainer --------------------------------------------------------------------------------------------------------
def tiny_teacher(tmp_path) -> str:
    from pipelines import ClassConditionalPipeline

    folder = tmp_path / "teacher"
    if not folder.is_dir():
        ClassConditionalPipeline(unet=_attn_unet(), scheduler=_sched()).save_pretrained(folder)
    return str(folder)


def _tiny_args(tmp_path, out):
    return ["--config", str(ROOT / "configs/alignprop_digits.yaml"), "--pretrained_model", tiny_teacher(tmp_path),
            "--output_dir", str(out), "--num_inference_steps", "3", "--backprop_k_max", "3", "--train_batch_size",
            "2", "--eval_samples_per_prompt", "2", "--fid_num_samples", "0", "--log_every", "1",
            "--checkpointing_steps", "2", "--max_train_steps", "2", "--eval_every", "1"]


def test_trainer_smoke_resume_and_lora_loads(tmp_path):
    from pipelines.lora import ClassConditionalLoraPipeline

    out = train("alignprop", _tiny_args(tmp_path, tmp_path / "run"))
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2] and all(1 <= r["k"] <= 3 for r in logs)
    assert [r["step"] for r in evals] == [0, 1, 2] and all(r["eval_reward"] <= 0 for r in evals)
    assert (out / "checkpoints" / "checkpoint-2" / LORA_WEIGHT_NAME).is_file()
    pipe = ClassConditionalLoraPipeline.from_pretrained(tiny_teacher(tmp_path))
    pipe.load_lora_weights(out)
    trained = read_lora(out)[0]
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # B moved away from 0
    # resume: two more steps from checkpoint-2
    out2 = train("alignprop", _tiny_args(tmp_path, tmp_path / "run") + ["--max_train_steps", "4", "--resume", "latest"])
    assert [json.loads(r)["step"] for r in (out2 / "logs.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_trainer_steps_when_per_step_random_keeps_no_step(tmp_path):
    # the original/TRL quirk can detach every step (r = T for the last step); the step must still run
    out = train("alignprop", _tiny_args(tmp_path, tmp_path / "none") + [
        "--truncation", "per_step_random", "--cut_min", "3", "--cut_max", "3", "--max_train_steps", "1",
        "--eval_at_start", "false", "--eval_every", "0"])
    log = json.loads((out / "logs.jsonl").read_text().splitlines()[-1])
    assert log["k"] == 0 and log["grad_norm"] == 0.0
    evals = [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evals == [1]  # evaluation cost is configurable: only the final one here


def test_trainer_stable_diffusion_tiny(tmp_path):
    (tmp_path / "eval.txt").write_text("# held-out\na photo of a cat\n")
    out = train("alignprop", ["--config", str(ROOT / "configs/alignprop_digits.yaml"), "--model_type",
                              "stable_diffusion",
                    "--pretrained_model", "tiny", "--prompts", "a cat,a dog", "--eval_prompts", "",
                    "--eval_prompt_file", str(tmp_path / "eval.txt"),
                    "--rewards", "contrast:1.0,saturation:0.5", "--num_inference_steps", "2", "--truncation",
                    "per_step_random", "--cut_min", "0", "--cut_max", "1", "--guidance_scale", "3.0",
                    "--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--log_every", "1",
                    "--fid_num_samples", "0", "--eval_samples_per_prompt", "1", "--max_train_steps", "1",
                    "--output_dir", str(tmp_path / "sd")])
    from diffusers import StableDiffusionPipeline

    from gen.models.tiny_sd import build_tiny_sd

    pipe = StableDiffusionPipeline(**build_tiny_sd(0), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(out))
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["eval_n"] for e in evals] == [1, 1]  # one held-out prompt from the file, at steps 0 and 1
    log = json.loads((out / "logs.jsonl").read_text().splitlines()[-1])
    assert log["step"] == 1 and 1 <= log["k"] <= 2 and set(log) >= {"reward/contrast", "reward/saturation"}


def test_config_errors_name_the_problem(tmp_path):
    cls = config_class("alignprop")
    base = ["--config", str(ROOT / "configs/alignprop_digits.yaml")]
    with pytest.raises(ValueError, match="K=20 is larger than the number of sampling steps 10"):
        parse_config(cls, base + ["--truncation", "fixed", "--backprop_k", "20"])
    with pytest.raises(ValueError, match=r"unknown reward\(s\) \['aesthtic'\]; known rewards: aesthetic"):
        parse_config(cls, base + ["--rewards", "aesthtic:1"])
    with pytest.raises(ValueError, match=r"prompts: 'a cat' is not a class label"):
        parse_config(cls, base + ["--prompts", "3,a cat"])
    # labels out of the model's range are refused before any weights load: this folder has no weights at all
    (tmp_path / "configonly" / "unet").mkdir(parents=True)
    (tmp_path / "configonly" / "unet" / "config.json").write_text(
        (Path(tiny_teacher(tmp_path)) / "unet" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"eval_prompts: labels \[12\] out of range; allowed 0..9"):
        train("alignprop", _tiny_args(tmp_path, tmp_path / "bad") + ["--pretrained_model", str(tmp_path / "configonly"),
                                                                      "--eval_prompts", "1,12"])
    with pytest.raises(ValueError, match="LoRA target module 'to_qq' matches no"):
        train("alignprop", _tiny_args(tmp_path, tmp_path / "bad") + ["--lora_target_modules", "to_qq"])


def test_trainer_rejects_bad_reward_output(tmp_path):
    from gen.reward import register_reward
    from gen.reward.rewards import REWARDS, Reward

    @register_reward("_test_bad_shape")
    class Bad(Reward):
        def forward(self, images, prompts=None):
            return images.mean(dim=(2, 3))  # [B, 1], not [B]

    try:
        msg = r"reward '_test_bad_shape' returned shape \(6, 1\); expected \[6\] \(one per image\)"
        with pytest.raises(ValueError, match=msg):
            train("alignprop", _tiny_args(tmp_path, tmp_path / "bad") + ["--rewards", "_test_bad_shape:1"])
    finally:
        REWARDS.pop("_test_bad_shape")


# --- two processes --------------------------------------------------------------------------------------------------
def _two_rank_worker(tmp, out):
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train("alignprop", _tiny_args(Path(tmp), out))
    state = PartialState()
    Path(out, f"rank{state.process_index}.json").write_text(json.dumps({"num_processes": state.num_processes}))


def test_two_process_training(tmp_path):
    os.chdir(ROOT)
    tiny_teacher(tmp_path)
    out = tmp_path / "ddp"
    debug_launcher(_two_rank_worker, args=(str(tmp_path), str(out)), num_processes=2)
    ranks = sorted(out.glob("rank*.json"))
    assert [p.name for p in ranks] == ["rank0.json", "rank1.json"]
    assert all(json.loads(p.read_text())["num_processes"] == 2 for p in ranks)
    assert (out / LORA_WEIGHT_NAME).is_file()
