"""Shipped model folders: every one has a SHA256SUMS manifest that matches, and loading checks what it can."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gen.checkpoints import (
    CHECKPOINTS,
    MANIFEST_NAME,
    main,
    read_manifest,
    shipped_folders,
    verify_manifest,
    write_manifest,
)
from pipelines import ClassConditionalPipeline, GBMPipeline, InterpolantPipeline, OneStepPipeline

FOLDERS = shipped_folders()


def test_every_shipped_folder_has_a_manifest():
    assert {p.name for p in FOLDERS} >= {"digits-teacher", "digits-gbm", "digits-interpolant", "digits-bridge",
                                         "digits-fdistill-js", "digits-interpolant-fdistill", "digits-alignprop-lora",
                                         "digits-classifier", "fid-refs"}
    for folder in FOLDERS:
        entries = read_manifest(folder)
        assert entries, f"{folder} has no {MANIFEST_NAME}: python -m gen.checkpoints --write-manifests"
        assert not any(name.startswith(("/", "..")) for name in entries)


@pytest.mark.parametrize("folder", FOLDERS, ids=[p.name for p in FOLDERS])
def test_shipped_folder_matches_its_manifest(folder):
    assert verify_manifest(folder) == len(read_manifest(folder)) >= 2


def test_manifest_tool_names_corrupt_missing_and_unlisted_files(tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(CHECKPOINTS / "digits-teacher", folder)
    assert main(["--verify", str(folder)]) == 0
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    (folder / "extra.txt").write_text("x")
    (folder / "train_logs.jsonl").unlink()
    with pytest.raises(ValueError) as err:
        verify_manifest(folder)
    msg = str(err.value)
    assert f"{weights} is corrupt" in msg and "train_logs.jsonl is missing" in msg and "extra.txt is not listed" in msg
    assert "--write-manifests" in msg
    assert main(["--verify", str(folder)]) == 2 and "error:" in capsys.readouterr().err
    write_manifest(folder)
    assert verify_manifest(folder) == len(read_manifest(folder))
    (folder / MANIFEST_NAME).write_text("not a manifest line\n")
    with pytest.raises(ValueError, match=f"{MANIFEST_NAME}:1 is not a sha256sum line"):
        read_manifest(folder)


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(CHECKPOINTS / name, dst)
    return dst


def test_a_pipeline_refuses_a_folder_of_another_pipeline():
    for cls, folder, found in ((ClassConditionalPipeline, "digits-gbm", "GBMPipeline"),
                               (ClassConditionalPipeline, "digits-interpolant", "InterpolantPipeline"),
                               (ClassConditionalPipeline, "digits-fdistill-js", "OneStepPipeline"),
                               (GBMPipeline, "digits-teacher", "ClassConditionalPipeline"),
                               (InterpolantPipeline, "digits-gbm", "GBMPipeline"),
                               (OneStepPipeline, "digits-teacher", "ClassConditionalPipeline")):
        with pytest.raises(ValueError, match=f"was saved by {found} .*and {cls.__name__} does not load it.*"
                                             f"load it with pipelines.{found}"):
            cls.from_pretrained(CHECKPOINTS / folder)


def test_a_scheduler_of_another_family_is_refused_even_when_the_folder_class_is_renamed(tmp_path):
    folder = _copy("digits-gbm", tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "ClassConditionalPipeline"}))
    with pytest.raises(ValueError, match="needs a Diffusers noise scheduler.*got GBMScheduler.*pipelines.GBMPipeline"):
        ClassConditionalPipeline.from_pretrained(folder)


@pytest.mark.parametrize("text,match", [("[]", "holds list"), ("{", "is not valid JSON"), ('"x"', "holds str")])
def test_broken_model_index_is_named(tmp_path, text, match):
    folder = _copy("digits-teacher", tmp_path)
    (folder / "model_index.json").write_text(text)
    with pytest.raises(ValueError, match=f"model_index.json {match}"):
        ClassConditionalPipeline.from_pretrained(folder)


def test_corrupted_weights_are_named_with_their_path(tmp_path):
    # 1. a shipped folder (with its manifest): any changed byte is caught before loading
    folder = _copy("digits-teacher", tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{weights} is corrupt"):
        ClassConditionalPipeline.from_pretrained(folder)
    # 2. a folder without a manifest: data bytes that decode to NaN are caught after loading
    (folder / MANIFEST_NAME).unlink()
    tensors = load_file(str(weights))
    name = sorted(tensors)[3]
    tensors[name].view(-1)[:5] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=rf"{weights}: {name} holds 5 NaN/inf value"):
        ClassConditionalPipeline.from_pretrained(folder)
    # 3. a truncated file
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"could not load a pipeline from '{folder}'"):
        ClassConditionalPipeline.from_pretrained(folder)


def test_corrupt_or_truncated_lora_is_named_with_its_path(tmp_path):
    from pipelines.lora import ClassConditionalLoraPipeline

    folder = _copy("digits-alignprop-lora", tmp_path)
    path = folder / "pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[:2000])
    pipe = ClassConditionalLoraPipeline.from_pretrained(CHECKPOINTS / "digits-teacher")
    with pytest.raises(ValueError, match=f"LoRA file '{path}' is corrupt or truncated"):
        pipe.load_lora_weights(folder)
    tensors = load_file(str(CHECKPOINTS / "digits-alignprop-lora" / "pytorch_lora_weights.safetensors"))
    key = sorted(tensors)[0]
    tensors[key].view(-1)[0] = float("inf")
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=f"LoRA file '{path}': {key} holds NaN/inf"):
        pipe.load_lora_weights(folder)


def test_corrupt_guider_files_are_named_with_their_path(tmp_path):
    from gen.guidance import APG, Guider, LinearAG

    folder = tmp_path / "lag"
    shutil.copytree(CHECKPOINTS / "digits-teacher" / "linear_ag", folder)
    assert isinstance(Guider.from_pretrained(folder), LinearAG)
    config = folder / "guider_config.json"
    with pytest.raises(ValueError, match=f"{config}' holds a LinearAG guider, not a APG"):
        APG.from_pretrained(folder)
    config.write_text(config.read_text()[:50])
    with pytest.raises(ValueError, match=f"could not read a guider config from '{config}'"):
        Guider.from_pretrained(folder)
    config.write_text("[]")
    with pytest.raises(ValueError, match=str(config)):
        Guider.from_pretrained(folder)


def test_loading_a_valid_folder_is_unchanged():
    pipe = ClassConditionalPipeline.from_pretrained(CHECKPOINTS / "digits-teacher")
    assert torch.isfinite(next(pipe.unet.parameters())).all()
