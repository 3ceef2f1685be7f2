"""eval/fid.py (gen.evaluation.fid) and gen.metrics.evaluate end to end with a tiny random digits classifier and a
tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from gen.metrics import evaluate
from gen.metrics.fid import load_stats


@pytest.fixture(scope="module")
def fid_script():
    """What eval/fid.py does: options -> gen.evaluation.fid.run; bad input is exit code 2 with 'error: ...'."""
    import sys

    from gen.cli import parse_settings
    from gen.evaluation.fid import FIDSettings, run

    def main(argv):
        try:
            run(parse_settings(FIDSettings, argv))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0

    return SimpleNamespace(main=main)


def save_tiny_classifier(folder: Path, seed: int) -> Path:
    from gen.models.classifier import DigitsClassifier

    torch.manual_seed(seed)
    DigitsClassifier(channels=(4,), feature_dim=8).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fid_script):
    """A tiny random classifier and the digits16-test reference written by the script itself."""
    root = tmp_path_factory.mktemp("fid")
    classifier = save_tiny_classifier(root / "classifier", seed=0)
    ref = root / "refs" / "digits16-test-tiny.npz"
    argv = [
        "--dataset",
        "digits16-test",
        "--feature_path",
        str(classifier),
        "--write_ref",
        str(ref),
        "--no_progress",
    ]
    assert fid_script.main(argv) == 0
    return SimpleNamespace(root=root, classifier=classifier, ref=ref)


def test_write_ref_stores_stats_features_and_meta(setup):
    stats = load_stats(setup.ref)
    assert stats["n"] == 360 and stats["mu"].shape == (8,) and stats["features"].shape == (360, 8)
    meta = stats["meta"]
    assert meta["features"] == "digits" and meta["split"] == "test" and meta["n"] == 360
    assert len(meta["weights_sha256"]) == 64 and "date" in meta


def test_dataset_against_reference_writes_json(setup, fid_script):
    out = setup.root / "results" / "train.json"
    argv = ["--dataset", "digits16-train", "--feature_path", str(setup.classifier), "--ref", str(setup.ref)]
    assert fid_script.main([*argv, "--out", str(out), "--no_progress"]) == 0
    result = json.loads(out.read_text())
    for key in (
        "fid",
        "kid",
        "kid_std",
        "n",
        "n_ref",
        "features",
        "ref",
        "source",
        "steps",
        "guidance_scale",
        "scheduler",
        "seed",
        "date",
        "wall_time_s",
        "class_accuracy",
    ):
        assert key in result, key
    assert result["n"] == 1437 and result["n_ref"] == 360 and result["features"] == "digits"
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    # KID is meaningful with Inception features only: on digits features it is not reported unless asked for
    assert result["kid"] is None and "calibrated for Inception" in result["kid_note"]
    assert 0.0 <= result["class_accuracy"] <= 1.0 and result["steps"] is None
    assert fid_script.main([*argv, "--out", str(out), "--no_progress", "--kid", "on"]) == 0
    result = json.loads(out.read_text())
    assert np.isfinite(result["kid"]) and "feature scale" in result["kid_note"]


def test_pipeline_samples_and_saved_pngs_give_the_same_fid(setup, fid_script):
    from diffusers import DDIMScheduler

    from gen.models.unet import tiny_unet
    from pipelines import ClassConditionalPipeline

    torch.manual_seed(0)
    pipe_dir = setup.root / "pipe"
    ClassConditionalPipeline(unet=tiny_unet(), scheduler=DDIMScheduler()).save_pretrained(pipe_dir)
    common = ["--feature_path", str(setup.classifier), "--ref", str(setup.ref), "--no_progress"]
    sampled, pngs = setup.root / "pipe.json", setup.root / "pngs"
    argv = [
        "--pipeline",
        str(pipe_dir),
        "--num_samples",
        "20",
        "--steps",
        "2",
        "--batch_size",
        "8",
        "--save_samples",
        str(pngs),
        "--out",
        str(sampled),
        *common,
    ]
    assert fid_script.main(argv) == 0
    result = json.loads(sampled.read_text())
    assert result["n"] == 20 and result["steps"] == 2 and result["scheduler"] == "ddim" and result["nfe"] == 2
    assert "class_accuracy" in result and len(list(pngs.glob("*.png"))) == 20

    from_folder = setup.root / "folder.json"
    # same feature batches, so the PNGs (exact uint8) must reproduce the in-memory samples' numbers
    assert (
        fid_script.main(["--samples", str(pngs), "--batch_size", "8", "--out", str(from_folder), *common])
        == 0
    )
    assert json.loads(from_folder.read_text())["fid"] == pytest.approx(result["fid"], rel=1e-12)


def test_stale_reference_is_refused(setup, fid_script, capsys):
    other = save_tiny_classifier(setup.root / "other-classifier", seed=1)
    argv = [
        "--dataset",
        "digits16-test",
        "--feature_path",
        str(other),
        "--ref",
        str(setup.ref),
        "--no_progress",
    ]
    assert fid_script.main(argv) == 2
    err = capsys.readouterr().err
    assert "stale" in err and "--write_ref" in err


def test_missing_digits_reference_says_how_to_create_it(setup, fid_script, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate, "REF_DIR", tmp_path)
    argv = [
        "--dataset",
        "digits16-test",
        "--feature_path",
        str(setup.classifier),
        "--ref",
        "test",
        "--no_progress",
    ]
    assert fid_script.main(argv) == 2
    err = capsys.readouterr().err
    assert "digits16-test-digits.npz" in err and "--write_ref" in err


def test_image_folder_round_trip_and_size_check(tmp_path):
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    evaluate.save_png_folder(images, tmp_path / "ok")
    assert torch.equal(evaluate.load_image_folder_uint8(tmp_path / "ok", progress=False), images)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "ok" / "zz_small.png")
    with pytest.raises(ValueError, match="zz_small.png"):
        evaluate.load_image_folder_uint8(tmp_path / "ok", progress=False)


class FakePipe:
    num_classes = 10

    def __init__(self):
        self.calls = []

    def __call__(self, class_labels, num_inference_steps, guidance_scale, generator, output_type):
        self.calls.append(class_labels.tolist())
        noise = torch.rand(len(class_labels), 1, 2, 2, generator=generator)
        images = torch.full_like(noise, 0.5 / 255)  # exactly half a level: must round up to 1
        images[:, :, 0, 0] = noise[:, :, 0, 0]
        return SimpleNamespace(images=images, nfe=2 * num_inference_steps)


def test_sample_pipeline_uint8_balances_labels_and_rounds():
    pipe = FakePipe()
    images, labels, nfe = evaluate.sample_pipeline_uint8(
        pipe, 25, num_inference_steps=3, batch_size=10, progress=False
    )
    assert labels.tolist() == [i % 10 for i in range(25)] and nfe == 6
    assert [len(c) for c in pipe.calls] == [10, 10, 5]
    assert images.dtype == torch.uint8 and images.shape == (25, 1, 2, 2) and (images[:, :, 1, 1] == 1).all()
    again, _, _ = evaluate.sample_pipeline_uint8(
        FakePipe(), 25, num_inference_steps=3, batch_size=10, progress=False
    )
    assert torch.equal(images, again)


class FakeInception(nn.Module):
    name = "inception"
    num_features = 4

    def __init__(self, weights_sha256: str = "a" * 64):
        super().__init__()
        self.weights_sha256 = weights_sha256

    def forward(self, images):
        return images.float().reshape(images.shape[0], -1)[:, :4]


def test_inception_reference_is_computed_once_and_cached(monkeypatch, tmp_path):
    calls = []

    def fake_dataset(name):
        calls.append(name)
        return torch.randint(
            0, 256, (12, 1, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
        ), None

    monkeypatch.setattr(evaluate, "REF_DIR", tmp_path / "shipped")
    monkeypatch.setattr(evaluate, "load_dataset_uint8", fake_dataset)
    first = evaluate.resolve_reference("train", FakeInception(), cache_dir=tmp_path / "cache", progress=False)
    again = evaluate.resolve_reference("train", FakeInception(), cache_dir=tmp_path / "cache", progress=False)
    assert calls == ["digits16-train"] and first["n"] == 12
    assert Path(again["path"]) == tmp_path / "cache" / "digits16-train-inception.npz"
    evaluate.resolve_reference("train", FakeInception("b" * 64), cache_dir=tmp_path / "cache", progress=False)
    assert calls == ["digits16-train", "digits16-train"]  # other weights: the cache was recomputed


def test_compute_fid_for_images_api(setup):
    images, labels = evaluate.load_dataset_uint8("digits16-test")
    result = evaluate.compute_fid_for_images(
        images, labels, features="digits", ref=setup.ref, feature_path=setup.classifier, progress=False
    )
    # the reference itself: FID 0; the unbiased MMD^2 of a set with itself is only ~0 (diagonal terms)
    assert abs(result["fid"]) < 1e-6 and abs(result["kid"]) < 1e-4
    assert result["n"] == result["n_ref"] == 360 and "class_accuracy" in result
    with pytest.raises(ValueError, match="uint8"):
        evaluate.compute_fid_for_images(images.float(), ref=setup.ref, feature_path=setup.classifier)
