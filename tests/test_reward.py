"""Differentiable rewards (gen.reward.rewards): registry, CLIP preprocessing, aesthetic / CLIP score with tiny
CLIPs built from config, compressibility against scipy's DCT, image statistics, digits classifier, weighted sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gen.reward import (
    AestheticMLP,
    build_reward,
    center_crop,
    check_reward,
    clip_preprocess,
    get_reward_class,
    resize_short_side,
    reward_names,
)
from gen.reward.rewards import (
    CLIP_MEAN,
    CLIP_STD,
    AestheticReward,
    ClipScoreReward,
    CompressibilityReward,
    DigitsClassifierReward,
    dct_matrix,
    jpeg_quant_table,
)


def _tiny_vision(projection_dim=16, image_size=32):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8, projection_dim=projection_dim)
    return CLIPVisionModelWithProjection(cfg).eval()


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from gen.models.tiny_sd import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(cfg).eval(), tok


# --- registry -------------------------------------------------------------------------------------------------------
def test_registry_and_unknown_names():
    assert {"aesthetic", "clip_score", "compressibility", "saturation", "contrast",
            "digits_classifier"} <= set(reward_names())
    with pytest.raises(ValueError, match=r"unknown reward 'aestetic'; known rewards: .*aesthetic"):
        get_reward_class("aestetic")
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        build_reward("nope:1.0")
    with pytest.raises(ValueError, match="not a number"):
        build_reward("contrast:abc")


def test_weighted_sum_and_components():
    x = torch.rand(3, 3, 16, 16)
    r = build_reward([{"name": "contrast", "weight": 2.0}, {"name": "saturation", "weight": -0.5}])
    c, s = get_reward_class("contrast")()(x), get_reward_class("saturation")()(x)
    torch.testing.assert_close(r(x), 2.0 * c - 0.5 * s)
    torch.testing.assert_close(r.components["contrast"], c)
    assert build_reward(["contrast:2", "saturation:-0.5"]).weights == [2.0, -0.5]


def test_check_reward_rejects_bad_outputs():
    with pytest.raises(ValueError, match=r"shape \(4, 1\); expected \[4\]"):
        check_reward(torch.zeros(4, 1), 4)
    with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\) at indices \[1\]"):
        check_reward(torch.tensor([0.0, float("nan"), 1.0]), 3)
    with pytest.raises(ValueError, match="torch.Tensor"):
        check_reward([1.0, 2.0], 2)


# --- CLIP preprocessing ---------------------------------------------------------------------------------------------
def test_center_crop_of_non_square_image_picks_the_centre():
    cols = torch.arange(20.0).view(1, 1, 1, 20).expand(2, 3, 10, 20)
    crop = center_crop(cols, 10)
    assert crop.shape == (2, 3, 10, 10)
    assert crop[0, 0, 0].tolist() == list(range(5, 15))
    rows = torch.arange(30.0).view(1, 1, 30, 1).expand(1, 1, 30, 8)
    assert center_crop(rows, 8)[0, 0, :, 0].tolist() == list(range(11, 19))


def test_clip_preprocess_resizes_short_side_crops_centre_and_normalises():
    # short side already 32: no resize, so the output is exactly the centre crop, normalised
    x = torch.rand(2, 3, 32, 64)
    out = clip_preprocess(x, 32)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x[..., 16:48] - mean) / std)
    # a tall image: short side 16 -> 32, long side 48 -> 96, crop rows 32..64; grey input repeated to RGB
    y = torch.rand(1, 1, 48, 16, requires_grad=True)
    r = resize_short_side(y, 32)
    assert r.shape == (1, 1, 96, 32)
    out = clip_preprocess(y, 32)
    assert out.shape == (1, 3, 32, 32)
    out.sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


# --- aesthetic / CLIP score -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_aesthetic_reward_tiny_clip_head_from_file(tmp_path, fmt):
    clip = _tiny_vision()
    torch.manual_seed(1)
    head = AestheticMLP(16).eval()
    assert [k for k in head.state_dict() if k.endswith("weight")] == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
    path = tmp_path / f"head.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(head.state_dict(), str(path))
    else:
        torch.save(head.state_dict(), path)
    clip.save_pretrained(tmp_path / "clip")
    reward = AestheticReward(str(tmp_path / "clip"), head_weights=str(path))
    x = torch.rand(3, 3, 40, 56, requires_grad=True)
    r = reward(x)
    assert r.shape == (3,)
    with torch.no_grad():  # recomputed by hand: crop, normalise, embed, L2-normalise, MLP
        e = clip(pixel_values=clip_preprocess(x, 32)).image_embeds
        expect = head(e / e.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(r, expect)
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="head_weights"):
        AestheticReward(clip)


def test_clip_score_matches_cosine():
    clip, tok = _tiny_clip()
    reward = ClipScoreReward(clip, tokenizer=tok)
    x = torch.rand(2, 3, 32, 32)
    prompts = ["a photo of a cat", "a dog"]
    r = reward(x, prompts)
    with torch.no_grad():
        ids = tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        i = clip.get_image_features(pixel_values=clip_preprocess(x, 32))
        t = clip.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        i = i if torch.is_tensor(i) else i.pooler_output
        t = t if torch.is_tensor(t) else t.pooler_output
    torch.testing.assert_close(r, torch.nn.functional.cosine_similarity(i, t, dim=-1))
    scaled = ClipScoreReward(clip, tokenizer=tok, use_logit_scale=True)(x, prompts)
    torch.testing.assert_close(scaled, r * clip.logit_scale.exp())


# --- image statistics -----------------------------------------------------------------------------------------------
def test_compressibility_against_scipy_dct():
    from scipy.fft import dctn

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 24)
    r = CompressibilityReward(quality=75)(x)
    y = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).numpy() * 255 - 128
    q = jpeg_quant_table(75).numpy()
    for b in range(2):
        vals = []
        for i in range(0, 16, 8):
            for j in range(0, 24, 8):
                c = np.abs(dctn(y[b, i:i + 8, j:j + 8], norm="ortho")) / q
                vals.append(np.delete(c.flatten(), 0))
        assert r[b].item() == pytest.approx(-np.mean(vals), rel=1e-5)
    d = dct_matrix(8)
    torch.testing.assert_close(d @ d.T, torch.eye(8), atol=1e-6, rtol=0)
    flat = torch.full((1, 1, 16, 16), 0.3)
    assert CompressibilityReward()(flat).item() == pytest.approx(0.0, abs=1e-4)
    assert CompressibilityReward()(torch.rand(1, 1, 16, 16)).item() < -0.5


def test_saturation_and_contrast():
    grey = torch.rand(2, 1, 8, 8)
    assert torch.all(get_reward_class("saturation")()(grey) == 0)
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1
    assert get_reward_class("saturation")()(red).item() == pytest.approx(1.0)
    torch.testing.assert_close(get_reward_class("contrast")()(grey), grey.flatten(1).std(1))


def test_digits_classifier_log_prob():
    from gen.models.classifier import DigitsClassifier

    torch.manual_seed(0)
    clf = DigitsClassifier(channels=(4, 8), feature_dim=8).eval()
    x = torch.rand(4, 1, 16, 16)
    r = DigitsClassifierReward(clf)(x, [0, 3, 9, "5"])
    logp = torch.log_softmax(clf(x * 2 - 1), -1)
    torch.testing.assert_close(r, logp[torch.arange(4), torch.tensor([0, 3, 9, 5])])
    torch.testing.assert_close(DigitsClassifierReward(clf, target_class=7)(x), logp[:, 7])
    with pytest.raises(ValueError, match="target_class=12"):
        DigitsClassifierReward(clf, target_class=12)
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        DigitsClassifierReward(clf)(x, [0, 1, 2, 10])
    shipped = DigitsClassifierReward()  # checkpoints/digits-classifier
    assert not any(p.requires_grad for p in shipped.parameters())
