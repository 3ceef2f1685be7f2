"""eval/inverse.py's tuning machinery: the filtered grid (empty -> ValueError), the relative <-> absolute
RED-Diff settings, the coordinate search on a function with a known optimum, the direct red_diff path against the
pipeline, and the config writer."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler

from gen.inverse import Inpainting
from gen.models.unet import tiny_unet
from pipelines import RedDiffPipeline
from tests.conftest import load_script


@pytest.fixture(scope="module")
def inv():
    return load_script("eval/inverse.py")


def test_tuning_grid_filters_invalid_values_and_an_empty_grid_raises(inv):
    settings = copy.deepcopy(inv.load_settings())
    settings["tuning"]["reddiff"]["grid"].update(t_max=[999, 1000, -5], lr=[0.0, 0.1], optimizer=["adam", "lbfgs"])
    grid = inv.tuning_grid(settings, "reddiff", 1000)
    assert grid["t_max"] == [999] and grid["lr"] == [0.1] and grid["optimizer"] == ["adam"]
    assert inv.tuning_grid(settings, "reddiff", 1000, only={"optimizer": ["adam"]})["optimizer"] == ["adam"]
    with pytest.raises(ValueError, match="optimizer"):
        inv.tuning_grid(settings, "reddiff", 1000, only={"optimizer": ["sgd"]})  # filtered to nothing
    settings["tuning"]["dps"]["zeta"] = [-1.0]
    with pytest.raises(ValueError, match="zeta"):
        inv.tuning_grid(settings, "dps", 1000)


def test_relative_and_absolute_settings_round_trip(inv):
    for sigma_y in (0.0, 0.05):
        for rel in ({"optimizer": "adam", "weighting": "const", "t_max": 250, "lr": 0.1, "lam": 0.02},
                    {"optimizer": "sgd", "weighting": "linear", "t_max": 999, "lr": 0.5, "lam": 2.0}):
            ab = inv.reddiff_absolute(rel, sigma_y)
            w = 1 / sigma_y**2 if sigma_y else 1.0
            assert ab["lam"] == pytest.approx(rel["lam"] * w)
            assert ab["lr"] == pytest.approx(rel["lr"] / w if rel["optimizer"] == "sgd" else rel["lr"])
            back = inv.reddiff_relative(ab, sigma_y)
            assert set(back) == set(rel)
            assert all(back[k] == (pytest.approx(v) if isinstance(v, float) else v) for k, v in rel.items())


def test_coordinate_search_finds_the_grid_optimum_of_a_separable_score(inv):
    grid = {"a": [0, 1, 2, 3], "b": ["x", "y", "z"], "c": [0.1, 1.0, 10.0]}
    target = {"a": 2, "b": "z", "c": 1.0}
    calls = []

    def score(p):
        calls.append(p)
        return -abs(p["a"] - 2) - (p["b"] != "z") - abs(p["c"] - 1.0)

    best, value, cache = inv.coordinate_search(score, [{"a": 0, "b": "x", "c": 10.0}], grid, rounds=2)
    assert best == target and value == 0 and len(cache) == len(calls)  # each setting scored once


def test_direct_red_diff_path_equals_the_pipeline(inv):
    torch.manual_seed(0)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    pipe = RedDiffPipeline(unet=tiny_unet(11).eval(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    op = Inpainting.random_pixels((16, 16), 0.5, seed=0, batch=3, sigma_y=0.05)
    y = op.measure(x, generator=torch.Generator().manual_seed(2))
    params = {"lr": 0.1, "lam": 8.0, "weighting": "const", "t_max": 250}
    a, _, nfe_a = inv.restore(pipe, op, y, "reddiff", 3, params, 0, 2)
    b, _, nfe_b = inv.restore(pipe, op, y, "reddiff", 3, {**params, "optimizer": "adam"}, 0, 2)  # direct path
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert nfe_a == nfe_b == 3
    c, _, _ = inv.restore(pipe, op, y, "reddiff", 3, {**params, "optimizer": "sgd", "lr": 1e-4}, 0, 2)
    assert not torch.allclose(b, c)


def test_write_tuned_config_rewrites_only_the_method_blocks(inv, tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text("# head\nsteps: 20\nreddiff:\n  sr2: {0.0: {lr: 0.1}}\ndps:\n  sr2: {0.0: {zeta: 1.0}}\n"
                    "# tail\ntuning: {dps: {zeta: [1.0]}}\n")
    inv.write_tuned_config(path, [{"method": "reddiff", "task": "sr2", "sigma_y": 0.05,
                                   "params": {"optimizer": "sgd", "lr": 0.001, "lam": 2.0}}])
    import yaml

    text = path.read_text()
    got = yaml.safe_load(text)
    assert text.startswith("# head\nsteps: 20\n") and "# tail" in text and got["tuning"] == {"dps": {"zeta": [1.0]}}
    assert got["reddiff"]["sr2"] == {0.0: {"lr": 0.1}, 0.05: {"optimizer": "sgd", "lr": 0.001, "lam": 2.0}}
    assert got["dps"]["sr2"] == {0.0: {"zeta": 1.0}}
