"""The inverse benchmark's tuning machinery (``gen.evaluation.inverse``, ``eval/inverse.py``): the filtered grid
(empty -> ValueError), the relative <-> absolute RED-Diff settings, the coordinate search on a function with a known
optimum, RED-Diff's optimizer option through the pipeline against a direct red_diff call, the settings checks and
the config writer."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler

from gen.inverse import Inpainting
from gen.models.unet import tiny_unet
from pipelines import RedDiffPipeline


@pytest.fixture(scope="module")
def inv():
    from gen.evaluation import inverse

    return inverse


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


def _direct_red_diff(pipe, op, y, steps: int, params: dict, generator):
    """RED-Diff wired by hand from gen.inverse (null class, mu0 = H^+ y, the descending grid, the [0, 1] clamp)."""
    from gen.diffusion import alpha_sigma, prediction_type_of
    from gen.inverse import red_diff
    from gen.inverse.reddiff import eps_predictor, reddiff_timesteps

    params = dict(params)
    t_max, t_min = params.pop("t_max", None), params.pop("t_min", 0)
    unet, sched = pipe.unet, pipe.scheduler
    x_shape = (y.shape[0], unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    labels = torch.full((y.shape[0],), unet.config.num_class_embeds - 1)

    def model_fn(x, t):
        t = torch.as_tensor(t, device=x.device)
        return unet(x, t.expand(x.shape[0]) if t.ndim else t, class_labels=labels).sample

    grid = reddiff_timesteps(steps, sched.config.num_train_timesteps, t_max, t_min)
    with torch.no_grad():
        mu0 = op.pinv(y, x_shape)
    x = red_diff(eps_predictor(model_fn, prediction_type_of(sched), sched), op, y, mu0,
                 lambda t: alpha_sigma(sched, t, ndim=4, dtype=mu0.dtype), grid, generator=generator, **params)
    return (x / 2 + 0.5).clamp(0, 1) * 2 - 1


def test_reddiff_optimizer_through_the_pipeline_equals_a_direct_red_diff(inv):
    torch.manual_seed(0)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    pipe = RedDiffPipeline(unet=tiny_unet(11).eval(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    op = Inpainting.random_pixels((16, 16), 0.5, seed=0, batch=3, sigma_y=0.05)
    y = op.measure(x, generator=torch.Generator().manual_seed(2))
    params = {"lr": 0.1, "lam": 8.0, "weighting": "const", "t_max": 250}
    a, _, nfe_a = inv.restore(pipe, op, y, "reddiff", 3, params, 0, 3)
    b, _, nfe_b = inv.restore(pipe, op, y, "reddiff", 3, {**params, "optimizer": "adam"}, 0, 3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # adam is the default
    assert nfe_a == nfe_b == 3
    sgd = {**params, "optimizer": "sgd", "lr": 1e-4}
    c, _, _ = inv.restore(pipe, op, y, "reddiff", 3, sgd, 0, 3)
    assert not torch.allclose(b, c)
    for p, got in ((params, a), (sgd, c)):
        ref = _direct_red_diff(pipe, op, y, 3, p, torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="optimizer"):
        pipe(y, op, num_inference_steps=2, optimizer="lbfgs")


def test_settings_are_checked_when_parsed(inv):
    from gen.cli import parse_settings

    s = parse_settings(inv.InverseSettings, [])
    assert s.task == list(inv.TASKS) and s.method == list(inv.METHODS) and (s.num_images, s.split) == (300, "test")
    t = parse_settings(inv.InverseSettings, ["--tune", "--method", "reddiff", "--tune_only", "optimizer=sgd"])
    assert (t.num_images, t.split, t.method) == (50, "train", ["reddiff"])
    for argv, match in ((["--tune_only", "optimizer"], "tune_only"), (["--reddiff_params", "lr"], "reddiff_params"),
                        (["--sigma_y", "-0.1"], "sigma_y"), (["--num_images", "1"], "num_images")):
        with pytest.raises(ValueError, match=match):
            parse_settings(inv.InverseSettings, argv)
    with pytest.raises(ValueError, match="eval/results"):
        inv.run(inv.InverseSettings(out=str(inv.REPO_ROOT / "eval" / "results" / "inverse" / "x.json")))


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
