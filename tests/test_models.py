"""Tests for gen.models: digits UNet presets, TimeMLP, DigitsClassifier, tiny Stable Diffusion parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DModel

from gen.models import (
    DIGITS_UNET_PRESET,
    NULL_CLASS,
    DigitsClassifier,
    TimeMLP,
    build_tiny_sd,
    digits_unet,
    sinusoidal_features,
    tiny_clip_tokenizer,
    tiny_unet,
)


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------ UNet


def test_digits_unet_size_and_forward():
    torch.manual_seed(0)
    unet = digits_unet()
    assert isinstance(unet, UNet2DModel)
    assert 1_500_000 <= _num_params(unet) < 2_000_000  # < 8 MB as fp32 safetensors
    assert unet.config.num_class_embeds == NULL_CLASS + 1 == 11
    x = torch.randn(3, 1, 16, 16)
    labels = torch.tensor([0, 9, NULL_CLASS])
    with torch.no_grad():
        out = unet(x, torch.tensor([1, 500, 999]), class_labels=labels).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert DIGITS_UNET_PRESET["sample_size"] == 16


def test_digits_unet_overrides_and_unconditional():
    unet = digits_unet(
        block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=None,
    )
    assert unet.class_embedding is None and tuple(unet.config.block_out_channels) == (16, 32)
    with torch.no_grad():
        assert unet(torch.randn(2, 1, 16, 16), 10).sample.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="block_channels"):
        digits_unet(block_channels=(8, 16))


def test_tiny_unet_is_small_and_class_conditional():
    unet = tiny_unet()
    assert _num_params(unet) < 50_000
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        a = unet(x, 5, class_labels=torch.tensor([1, 1])).sample
        b = unet(x, 5, class_labels=torch.tensor([2, 2])).sample
    assert a.shape == x.shape and not torch.equal(a, b)
    assert tiny_unet(num_class_embeds=None, sample_size=8).class_embedding is None


# ------------------------------------------------------------------------------------------------- MLP


def test_sinusoidal_features_shape_and_range():
    feats = sinusoidal_features(torch.tensor([0.0, 0.5, 999.0]), 16)
    assert feats.shape == (3, 16) and feats.abs().max() <= 1.0
    torch.testing.assert_close(feats[0], torch.cat([torch.zeros(8), torch.ones(8)]))
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_features(torch.zeros(2), 7)


def test_time_mlp_shapes_and_time_dependence():
    torch.manual_seed(0)
    net = TimeMLP(dim=2, hidden=32, depth=2, time_embed_dim=16)
    x = torch.randn(5, 2)
    out_scalar = net(x, 0.3)
    assert out_scalar.shape == (5, 2)
    torch.testing.assert_close(out_scalar, net(x, torch.full((5,), 0.3)))
    assert not torch.allclose(net(x, 0.3), net(x, 0.7))
    assert not torch.allclose(net(x, 300.0), net(x, 700.0))  # DDPM-scale times are distinguished too
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(5, 3), 0.1)
    with pytest.raises(ValueError, match="t must be"):
        net(x, torch.zeros(4))
    with pytest.raises(ValueError, match="activation"):
        TimeMLP(activation="swish")


def test_time_mlp_class_conditional():
    net = TimeMLP(dim=3, hidden=16, depth=1, time_embed_dim=8, num_classes=4)
    x = torch.randn(2, 3)
    assert net(x, 0.5, class_labels=torch.tensor([0, 3])).shape == (2, 3)
    with pytest.raises(ValueError, match="class_labels"):
        net(x, 0.5)


def test_time_mlp_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = TimeMLP(dim=2, hidden=24, depth=3, time_embed_dim=16, num_classes=3, activation="gelu").eval()
    net.save_pretrained(tmp_path)
    loaded = TimeMLP.from_pretrained(tmp_path).eval()
    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.config) == public(net.config)
    x, t, y = torch.randn(6, 2), torch.rand(6), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        assert torch.equal(net(x, t, y), loaded(x, t, y))


# ------------------------------------------------------------------------------------------ classifier


def test_classifier_shapes_and_size(tmp_path):
    torch.manual_seed(0)
    clf = DigitsClassifier()
    assert _num_params(clf) * 4 < 1_000_000  # under 1 MB of fp32 weights
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert clf(x).shape == (4, 10)
    assert clf.features(x).shape == (4, 128)
    clf.train()
    pred = clf.predict(x)
    assert pred.dtype == torch.int64 and pred.shape == (4,)
    assert torch.equal(pred, clf.predict(x))  # no dropout in predict, even in train mode
    assert torch.equal(pred, clf.eval()(x).argmax(1))
    with pytest.raises(ValueError, match="x must have shape"):
        clf(torch.zeros(4, 1, 8, 8))
    clf.save_pretrained(tmp_path)
    assert torch.equal(DigitsClassifier.from_pretrained(tmp_path).predict(x), pred)


def test_classifier_rejects_too_many_stages():
    with pytest.raises(ValueError, match="channels"):
        DigitsClassifier(channels=(8, 8, 8, 8, 8))


# ------------------------------------------------------------------------------------------- tiny SD


def test_tiny_tokenizer_has_real_vocabulary():
    tokenizer = tiny_clip_tokenizer()
    assert len(tokenizer) > 50 and tokenizer.model_max_length == 16
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=16, truncation=True).input_ids
    assert len(ids) == 16 and ids[0] == tokenizer.bos_token_id
    content = [i for i in ids if i not in (tokenizer.bos_token_id, tokenizer.eos_token_id)]
    assert len(set(content)) >= 4  # "a", "photo", "of", "cat"
    assert tokenizer.decode(content).replace(" ", "") == "aphotoofacat"


def _run(pipe: StableDiffusionPipeline) -> np.ndarray:
    return pipe(
        "a photo of a cat", height=32, width=32, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images


@pytest.fixture(scope="module")
def tiny_sd_run():
    """A tiny pipeline and its seeded 2-step output, shared by the tests below (one run only)."""
    pipe = StableDiffusionPipeline(
        **build_tiny_sd(seed=0), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, _run(pipe)


def test_build_tiny_sd_is_seeded():
    a, b = build_tiny_sd(seed=0), build_tiny_sd(seed=0)
    for key in ("unet", "vae", "text_encoder"):
        pairs = zip(a[key].state_dict().items(), b[key].state_dict().values(), strict=True)
        for (name, p), q in pairs:
            assert torch.equal(p, q), f"{key}.{name} differs between two builds with the same seed"
    assert a["text_encoder"].config.eos_token_id == a["tokenizer"].eos_token_id
    assert a["vae"].config.latent_channels == a["unet"].config.in_channels == 4


def test_tiny_sd_pipeline_end_to_end(tiny_sd_run):
    _, images = tiny_sd_run
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0


def test_tiny_sd_save_load_round_trip(tiny_sd_run, tmp_path):
    pipe, images = tiny_sd_run
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert len(loaded.tokenizer) == len(pipe.tokenizer)
    assert loaded.scheduler.config.steps_offset == 1
    np.testing.assert_allclose(_run(loaded), images, atol=1e-6)  # same weights, same seed: same image
