"""Tests for gen.data: digits, toys, transforms, image folders and grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits  # imported here so that its import time is not charged to a test

from gen.data import (
    NUM_CLASSES,
    TEST_SIZE,
    TOY_NAMES,
    Digits16Dataset,
    ImageFolderDataset,
    center_crop,
    denormalize_to_0_1,
    hflip,
    image_transform,
    load_digits16,
    make_grid,
    mixture_params,
    normalize_to_neg1_1,
    numpy_to_pil,
    pil_to_tensor,
    random_crop,
    resize_shorter,
    sample_toy,
    save_grid,
    shift_image,
    split_indices,
    to_uint8,
    toy_log_prob,
)

# --------------------------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_split_sizes():
    for split, size in (("train", 1437), ("test", TEST_SIZE), ("all", 1797)):
        images, labels = load_digits16(split)
        assert images.shape == (size, 1, 16, 16) and images.dtype == torch.float32
        assert labels.shape == (size,) and labels.dtype == torch.int64
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert images.min() == -1.0 and images.max() > 0.9  # background and ink both present
        assert set(labels.tolist()) == set(range(NUM_CLASSES))


def test_digits_match_closed_form_preprocessing():
    raw = torch.from_numpy(load_digits().images[:5].astype(np.float32))[:, None]
    expected = torch.nn.functional.interpolate(raw / 8.0 - 1.0, size=(16, 16), mode="bilinear",
                                               align_corners=False)
    images, _ = load_digits16("all")
    torch.testing.assert_close(images[:5], expected)


def test_digits_split_disjoint_deterministic_stratified():
    train, test = split_indices("train"), split_indices("test")
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))
    images_a, labels_a = load_digits16("test")
    images_a.fill_(0.0)  # a clone: must not corrupt the cache
    images_b, labels_b = load_digits16("test")
    assert torch.equal(labels_a, labels_b) and images_b.min() == -1.0
    _, all_labels = load_digits16("all")
    counts_all = torch.bincount(all_labels, minlength=NUM_CLASSES).float()
    counts_test = torch.bincount(labels_b, minlength=NUM_CLASSES).float()
    assert (counts_test > 0).all()
    # Stratified: each class's share in the test split is within one image of its overall share.
    assert (counts_test - counts_all * TEST_SIZE / len(all_labels)).abs().max() <= 1.0


def test_digits_split_rejects_unknown():
    with pytest.raises(ValueError, match="split"):
        load_digits16("val")


def test_digits_dataset_item_and_shift():
    dataset = Digits16Dataset("test")
    assert len(dataset) == TEST_SIZE
    item = dataset[3]
    assert set(item) == {"images", "class_labels"}
    assert item["images"].shape == (1, 16, 16)
    assert item["class_labels"].dtype == torch.int64 and item["class_labels"].ndim == 0
    with pytest.raises(ValueError, match="random_shift"):
        Digits16Dataset("test", random_shift=-1)
    shifted = Digits16Dataset("test", random_shift=2)[3]["images"]
    assert shifted.shape == (1, 16, 16) and shifted.min() >= -1.0


def test_shift_image_is_a_translation_with_background_fill():
    image = load_digits16("test")[0][0]
    shifted = shift_image(image, 2, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2), value=-1.0)
    candidates = [padded[:, 2 - dy : 18 - dy, 2 - dx : 18 - dx] for dy in range(-2, 3) for dx in range(-2, 3)]
    assert any(torch.equal(shifted, c) for c in candidates)


# ----------------------------------------------------------------------------------------------- toys


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_shapes_and_seeded_determinism(name):
    a = sample_toy(name, 64, generator=torch.Generator().manual_seed(0))
    b = sample_toy(name, 64, generator=torch.Generator().manual_seed(0))
    c = sample_toy(name, 64, generator=torch.Generator().manual_seed(1))
    assert a.shape == (64, 2) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_toy_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="8gaussians"):
        sample_toy("spirals", 4)
    with pytest.raises(ValueError, match="moons"):
        toy_log_prob("moons", torch.zeros(3, 2))


def test_8gaussians_moments_match_closed_form():
    centres, std = mixture_params("8gaussians")
    # Equal-weight isotropic mixture: mean = avg c_k, cov = avg (c_k - mean)(c_k - mean)^T + std^2 I.
    mean = centres.mean(0)
    cov = (centres - mean).T @ (centres - mean) / centres.shape[0] + std**2 * torch.eye(2)
    x = sample_toy("8gaussians", 200_000, generator=torch.Generator().manual_seed(0)).double()
    # Standard errors: mean ~ sqrt(4.1 / n) = 0.0045, variance ~ sqrt(10 / n) = 0.007; allow ~6 sigma.
    torch.testing.assert_close(x.mean(0).float(), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T).float(), cov, atol=0.05, rtol=0)
    assert math.isclose(cov[0, 0].item(), 4.125, rel_tol=1e-5)


def test_checkerboard_samples_lie_on_support():
    x = sample_toy("checkerboard", 5000, generator=torch.Generator().manual_seed(0))
    log_p = toy_log_prob("checkerboard", x)
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p, torch.full_like(log_p, -math.log(32.0)))
    assert toy_log_prob("checkerboard", torch.tensor([[1.0, -1.0], [5.0, 0.5]])).isinf().all()


@pytest.mark.parametrize(("name", "half_width", "step"),
                         [("8gaussians", 6.0, 0.1), ("25gaussians", 1.0, 0.01), ("checkerboard", 5.0, 0.05)])
def test_toy_log_prob_integrates_to_one(name, half_width, step):
    # Midpoint rule; for Gaussians with step <= std its error is far below the tolerance.
    grid = torch.arange(-half_width + step / 2, half_width, step, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([gx, gy], dim=-1)
    mass = toy_log_prob(name, points).exp().sum().item() * step**2
    assert abs(mass - 1.0) < 1e-3


def test_mixture_log_prob_matches_direct_formula():
    centres, std = mixture_params("25gaussians")
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
    dens = torch.zeros(7, dtype=torch.float64)
    for c in centres.double():
        dens += torch.exp(-((x - c) ** 2).sum(1) / (2 * std**2)) / (2 * math.pi * std**2) / len(centres)
    torch.testing.assert_close(toy_log_prob("25gaussians", x), dens.log())


# ----------------------------------------------------------------------------------------- transforms


def _gradient_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    array = (np.arange(width * height * 3).reshape(height, width, 3) % 256).astype(np.uint8)
    return Image.fromarray(array).convert(mode)


def test_pil_to_tensor_values_and_modes():
    img = _gradient_image(5, 4)
    tensor = pil_to_tensor(img)
    assert tensor.shape == (3, 4, 5) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    assert pil_to_tensor(img.convert("L")).shape == (1, 4, 5)
    with pytest.raises(ValueError, match="mode"):
        pil_to_tensor(img.convert("CMYK"))


def test_resize_crop_flip():
    img = _gradient_image(30, 20)
    assert resize_shorter(img, 10).size == (15, 10)
    assert resize_shorter(img.transpose(Image.Transpose.ROTATE_90), 10).size == (10, 15)
    cropped = center_crop(img, 10)
    assert cropped.size == (10, 10)
    assert np.array_equal(np.asarray(cropped), np.asarray(img)[5:15, 10:20])
    with pytest.raises(ValueError, match="size"):
        center_crop(img, 25)
    a = random_crop(img, 8, generator=torch.Generator().manual_seed(3))
    b = random_crop(img, 8, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(hflip(img)), np.asarray(img)[:, ::-1])
    x = torch.arange(6.0).reshape(1, 2, 3)
    assert torch.equal(hflip(x), x.flip(-1))


def test_normalize_round_trip():
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(denormalize_to_0_1(normalize_to_neg1_1(x)), x)
    assert denormalize_to_0_1(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


def test_image_transform_shape_range_and_flip():
    img = _gradient_image(24, 18)
    x = image_transform(8)(img)
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    flips = set()
    for seed in range(8):
        flip_transform = image_transform(8, random_flip=True, generator=torch.Generator().manual_seed(seed))
        flips.add(bool(torch.equal(flip_transform(img), x.flip(-1))))
    assert flips == {True, False}
    with pytest.raises(ValueError, match="resolution"):
        image_transform(0)


# -------------------------------------------------------------------------------------- image folder


def _write_png(path, width, height, mode="RGB", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), color=value).save(path)


def test_folder_resize_path(tmp_path):
    _write_png(tmp_path / "b.png", 20, 12)
    _write_png(tmp_path / "nested" / "a.jpg", 9, 9)
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert [p.name for p in dataset.files] == ["b.png", "a.jpg"]  # sorted by relative path
    for item in (dataset[0], dataset[1]):
        assert set(item) == {"images"} and item["images"].shape == (3, 8, 8)
        assert item["images"].min() >= -1 and item["images"].max() <= 1
    grey = ImageFolderDataset(tmp_path, resolution=8, channels=1, center_crop=False, random_flip=True)
    assert grey[0]["images"].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(tmp_path, resolution=8, channels=2)


def test_folder_exact_pixels_without_resize(tmp_path):
    array = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    Image.fromarray(array).save(tmp_path / "x.png")
    image = ImageFolderDataset(tmp_path, resolution=4, channels=1, resize=False)[0]["images"]
    torch.testing.assert_close(image[0], torch.from_numpy(array).float() / 127.5 - 1.0)


def test_folder_wrong_size_names_the_file(tmp_path):
    _write_png(tmp_path / "good.png", 8, 8)
    _write_png(tmp_path / "zz_bad.png", 10, 8)
    dataset = ImageFolderDataset(tmp_path, resolution=8, resize=False)
    assert dataset[0]["images"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"zz_bad\.png"):
        dataset[1]
    with pytest.raises(ValueError, match="10x8") as info:
        dataset.validate()
    assert "zz_bad.png" in str(info.value)
    ImageFolderDataset(tmp_path, resolution=8, resize=True).validate()  # nothing to check


def test_folder_missing_or_empty(tmp_path):
    with pytest.raises(ValueError, match="missing_dir"):
        ImageFolderDataset(tmp_path / "missing_dir", resolution=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", resolution=8)


def test_folder_subfolder_classes(tmp_path):
    _write_png(tmp_path / "dog" / "1.png", 8, 8)
    _write_png(tmp_path / "cat" / "2.png", 8, 8)
    _write_png(tmp_path / "cat" / "deeper" / "3.png", 8, 8)
    dataset = ImageFolderDataset(tmp_path, resolution=8, class_from_subfolder=True)
    assert dataset.classes == ["cat", "dog"]
    labels = [int(dataset[i]["class_labels"]) for i in range(len(dataset))]
    assert labels == [0, 0, 1]
    assert dataset[0]["class_labels"].dtype == torch.int64
    _write_png(tmp_path / "loose.png", 8, 8)
    with pytest.raises(ValueError, match=r"loose\.png"):
        ImageFolderDataset(tmp_path, resolution=8, class_from_subfolder=True)


def test_folder_flat_is_one_class(tmp_path):
    _write_png(tmp_path / "a.png", 8, 8)
    _write_png(tmp_path / "b.png", 8, 8)
    dataset = ImageFolderDataset(tmp_path, resolution=8, class_from_subfolder=True)
    assert dataset.classes == ["."] and int(dataset[1]["class_labels"]) == 0


# --------------------------------------------------------------------------------------------- images


def test_to_uint8_rounds_half_up():
    x = torch.tensor([-1.0, 1.0, 0.0, -2.0, 2.0, -1.0 + 1.0 / 255.0])
    assert to_uint8(x).tolist() == [0, 255, 128, 0, 255, 1]  # 127.5 -> 128 and 0.5 -> 1
    assert to_uint8(x).dtype == torch.uint8


def test_make_grid_shape_and_placement():
    images = torch.linspace(-1, 1, 10).view(10, 1, 1, 1).expand(10, 1, 16, 16)
    grid = make_grid(images, nrow=4, padding=2, pad_value=-1.0)
    assert grid.shape == (3 * 18 + 2, 4 * 18 + 2, 3) and grid.dtype == np.uint8
    expected = to_uint8(images[6, 0, 0, 0]).item()
    top, left = 2 + 1 * 18, 2 + 2 * 18  # image 6 sits in row 1, column 2
    assert (grid[top : top + 16, left : left + 16] == expected).all()
    assert (grid[:2] == 0).all() and (grid[-18:, -18:] == 0).all()  # padding and the unused cells
    assert make_grid(torch.zeros(3, 3, 5, 7), nrow=8, padding=0).shape == (5, 21, 3)
    with pytest.raises(ValueError, match="images"):
        make_grid(torch.zeros(2, 2, 4, 4))


def test_save_grid_and_numpy_to_pil(tmp_path):
    path = save_grid(torch.zeros(5, 1, 16, 16), tmp_path / "sub" / "grid.png", nrow=5, upscale=4)
    with Image.open(path) as img:
        assert img.size == ((5 * 18 + 2) * 4, 20 * 4) and img.mode == "RGB"
    pils = numpy_to_pil(np.full((2, 3, 4, 3), 0.5, dtype=np.float32))
    assert len(pils) == 2 and pils[0].size == (4, 3) and np.asarray(pils[0])[0, 0, 0] == 128
    assert numpy_to_pil(np.zeros((3, 4, 1), dtype=np.uint8))[0].mode == "L"
