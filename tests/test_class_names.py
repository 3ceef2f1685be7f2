"""Class names end to end: a folder dataset's subfolder names become the pipeline's ``class_names`` (saved in
``model_index.json``), survive save/load, and ``class_labels`` may then be given by name in every class-conditional
pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from gen.data.folder import ImageFolderDataset
from gen.gbm import GBMScheduler
from gen.interpolants.scheduler import InterpolantScheduler
from gen.models.unet import tiny_unet
from pipelines import ClassConditionalPipeline, GBMPipeline, InterpolantPipeline, OneStepPipeline


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    """The classes of a folder dataset with subfolders cat/, dog/, fox/ (what train/diffusion.py --dataset folder
    reads)."""
    root = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(0)
    for name in ("dog", "cat", "fox"):
        (root / name).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / name / f"{i}.png")
    dataset = ImageFolderDataset(root, resolution=8, channels=1, class_from_subfolder=True)
    assert dataset.classes == ["cat", "dog", "fox"]
    return dataset.classes


def _build(kind, names, num_classes: int = 3):
    torch.manual_seed(0)
    unet = tiny_unet(num_class_embeds=num_classes + 1, sample_size=8).eval()
    if kind == "class_conditional":
        return ClassConditionalPipeline(unet, DDIMScheduler(), class_names=names)
    if kind == "gbm":
        return GBMPipeline(unet, GBMScheduler(num_train_timesteps=20, data_log_mean=[1.0], data_log_std=[0.1],
                                              data_offset=3.0), class_names=names)
    if kind == "interpolant":
        return InterpolantPipeline(unet, InterpolantScheduler(), class_names=names)
    return OneStepPipeline(unet, DDIMScheduler(), generator_timestep=900, class_names=names)


@pytest.mark.parametrize("kind", ["class_conditional", "gbm", "interpolant", "one_step"])
def test_class_names_round_trip_and_select_classes(kind, classes, tmp_path):
    _build(kind, classes).save_pretrained(tmp_path / kind)
    assert json.loads((tmp_path / kind / "model_index.json").read_text())["class_names"] == classes
    cls = {"class_conditional": ClassConditionalPipeline, "gbm": GBMPipeline, "interpolant": InterpolantPipeline,
           "one_step": OneStepPipeline}[kind]
    pipe = cls.from_pretrained(tmp_path / kind)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.class_names == classes
    steps = {} if kind == "one_step" else {"num_inference_steps": 2}

    def sample(labels):
        return pipe(class_labels=labels, generator=torch.Generator().manual_seed(0), output_type="pt", **steps).images

    by_name, by_index = sample(["fox", "cat"]), sample([2, 0])
    assert torch.equal(by_name, by_index)
    assert not torch.equal(by_name, sample([1, 1]))  # the label reaches the network
    assert torch.equal(sample(np.array(["fox", "cat"])), by_index)  # numpy string arrays too
    assert torch.equal(sample(["fox", 0]), by_index)  # names and indices mixed
    with pytest.raises(ValueError, match="unknown class names \\['wolf'\\]; known: cat, dog, fox"):
        sample(["wolf"])


def test_bad_class_names_are_refused(classes):
    with pytest.raises(ValueError, match="class_names has 2 names but the network has 3 classes"):
        _build("class_conditional", classes[:2])
    with pytest.raises(ValueError, match="distinct"):
        _build("interpolant", ["cat", "cat", "dog"])
    with pytest.raises(TypeError, match="class_names must be a list of strings"):
        _build("gbm", "cat")
    pipe = ClassConditionalPipeline(tiny_unet(num_class_embeds=4, sample_size=8), DDIMScheduler())
    with pytest.raises(ValueError, match="holds names, but this model has no class_names"):
        pipe(class_labels=["cat"], num_inference_steps=1)
