"""Shared test set-up: one torch thread (the CI machine has 2 cores; two threads per process thrash) and an offline
hub. The scripts under train/ and eval/ are thin: tests call what they run in ``gen`` (``gen.training.train``,
``gen.evaluation.<module>.run``), never the scripts by path."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "deepspeed: needs deepspeed installed (skipped otherwise; not in CI)")
