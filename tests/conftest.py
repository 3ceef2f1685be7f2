"""Shared test set-up: one torch thread (the CI machine has 2 cores; two threads per process thrash), offline hub,
and a loader for the scripts under train/ and eval/ (they are scripts, not packages)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "deepspeed: needs deepspeed installed (skipped otherwise; not in CI)")


def load_script(relpath: str):
    """Import a script such as ``train/diffusion.py`` as a module."""
    path = ROOT / relpath
    name = "script_" + relpath.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def script():
    return load_script
