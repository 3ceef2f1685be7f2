"""The shipped checkpoints still give the outputs recorded before the sampling core (see tests/regression/cases.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.regression.cases import CASES, EXPECTED, run_case

_EXPECTED = load_file(str(EXPECTED))


def test_every_case_is_recorded():
    assert sorted(_EXPECTED) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_regression_output(name):
    got, want = run_case(name), _EXPECTED[name]
    assert got.shape == want.shape
    assert torch.isfinite(got).all()
    err = (got - want).abs().max().item()
    assert err <= 1e-5, f"{name}: max |diff| {err:.3g} > 1e-5 (an intended change is re-recorded and explained)"
