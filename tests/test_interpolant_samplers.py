"""Interpolant samplers with the exact Gaussian fields: transport, ODE = SDE marginals, likelihood, scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from gen.interpolants import GaussianFields, Interpolant, InterpolantSampler, InterpolantScheduler

M1 = torch.tensor([2.0, -1.0], dtype=torch.float64)
A1 = torch.tensor([[1.0, 0.3], [0.0, 0.5]], dtype=torch.float64)
C1 = A1 @ A1.T
N = 8_000


def _noise(seed=0, n=N):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _moments_close(x, mean, cov, tol_mean=0.04, tol_cov=0.06):
    torch.testing.assert_close(x.mean(0), mean, atol=tol_mean, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=tol_cov, rtol=0)


@pytest.mark.parametrize("method,steps", [("euler", 200), ("heun", 20), ("rk4", 10)])
@pytest.mark.parametrize("pred", ["velocity", "score", "x1"])
def test_ode_transports_gaussian_to_target(method, steps, pred):
    interp = Interpolant("linear")
    sampler = InterpolantSampler(interp, GaussianFields(interp, M1, C1).model_fn(pred), pred)
    x = sampler.sample_ode(_noise(), num_steps=steps, method=method)
    _moments_close(x, M1, C1)


@pytest.mark.parametrize("kind,path,gamma", [("two_sided", "linear", "brownian"), ("two_sided", "trig", "bsquared"),
                                             ("one_sided", "vp", "zero"), ("one_sided", "gvp", "zero")])
def test_ode_other_families(kind, path, gamma):
    interp = Interpolant(path, gamma, kind)
    sampler = InterpolantSampler(interp, GaussianFields(interp, M1, C1).model_fn("drift"), "drift")
    x0 = _noise()
    if path == "vp":  # SiT's VP does not start at pure noise: x_0 = 0.9999 noise + 0.0066 x1
        c = interp.coefficients(torch.tensor(0.0))
        x0 = float(c.alpha) * x0 + float(c.beta) * (M1 + _noise(5) @ A1.T)
    _moments_close(sampler.sample_ode(x0, num_steps=25, method="heun"), M1, C1)


def test_ode_convergence_order():
    """Heun's error falls ~4x and Euler's ~2x when the step halves (mean of the transported samples)."""
    interp = Interpolant("gvp")
    field = GaussianFields(interp, M1, C1).model_fn("velocity")
    x0 = _noise(n=2000)
    ref = InterpolantSampler(interp, field).sample_ode(x0, num_steps=200, method="rk4")
    for method, factor in (("euler", 1.7), ("heun", 3.3)):
        errs = [float((InterpolantSampler(interp, field).sample_ode(x0, num_steps=n, method=method) - ref).abs().max())
                for n in (8, 16)]
        assert errs[0] / errs[1] > factor, (method, errs)


@pytest.mark.parametrize("eps", [0.5, "sigma", "linear", "decreasing", "increasing_decreasing", "sbdm",
                                 lambda t: 2.0 * t * (1 - t)])
def test_sde_marginals_match_ode(eps):
    interp = Interpolant("linear")
    gf = GaussianFields(interp, M1, C1)
    sampler = InterpolantSampler(interp, gf.model_fn("velocity"), "velocity")
    x = sampler.sample_sde(_noise(), num_steps=100, eps=eps, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all()  # SBDM is infinite at t = 0 in SiT; here it is capped (same marginals)
    _moments_close(x, M1, C1, tol_cov=0.08)


def test_sde_intermediate_marginal_and_heun():
    """Stopping at t = 0.6 (no last step): ODE, Euler-Maruyama and stochastic Heun all give N(mu_t, S_t)."""
    interp = Interpolant("linear", "brownian", "two_sided")
    gf = GaussianFields(interp, M1, C1)
    mu, cov = gf.marginal(0.6)
    # two-sided fields from a bridge-free drift + score: use a mirror-free score model with x0 unknown ->
    # integrate the drift (ODE) and the SDE through the one-sided equivalent below
    ode = InterpolantSampler(interp, gf.model_fn("drift"), "drift").sample_ode(
        _noise(), num_steps=40, method="heun", t_start=0.0, t_end=0.6, last_step="none")
    _moments_close(ode, mu, cov)
    one = Interpolant("linear")
    gf1 = GaussianFields(one, M1, C1)
    mu1, cov1 = gf1.marginal(0.6)
    for method in ("euler_maruyama", "heun"):
        x = InterpolantSampler(one, gf1.model_fn("velocity"), "velocity").sample_sde(
            _noise(), num_steps=60, method=method, eps=1.0, t_end=0.6, last_step="none",
            generator=torch.Generator().manual_seed(3))
        _moments_close(x, mu1, cov1)


def test_mirror_sde_keeps_the_data_distribution():
    interp = Interpolant(None, "brownian", "mirror")
    gf = GaussianFields(interp, M1, C1)
    x1 = M1 + _noise(7) @ A1.T
    sampler = InterpolantSampler(interp, gf.model_fn("score"), "score")
    x = sampler.sample_sde(x1, num_steps=100, eps=0.5, generator=torch.Generator().manual_seed(2))
    _moments_close(x, M1, C1)


@pytest.mark.parametrize("last_step", ["mean", "tweedie", "euler"])
def test_sde_last_step_options(last_step):
    interp = Interpolant("linear")
    gf = GaussianFields(interp, M1, C1)
    sampler = InterpolantSampler(interp, gf.model_fn("noise"), "noise")
    x = sampler.sample_sde(_noise(), num_steps=100, eps="sigma", last_step=last_step,
                           generator=torch.Generator().manual_seed(4))
    _moments_close(x, M1, C1, tol_cov=0.1 if last_step == "tweedie" else 0.06)
    assert sampler.nfe == 101


def test_log_likelihood_exact_and_hutchinson():
    interp = Interpolant("linear")
    gf = GaussianFields(interp, M1, C1)
    x1 = M1 + _noise(9, n=64) @ A1.T
    truth = gf.log_prob(x1)
    sampler = InterpolantSampler(interp, gf.model_fn("velocity"), "velocity")
    exact = sampler.log_likelihood(x1, num_steps=20, method="rk4")
    torch.testing.assert_close(exact, truth, atol=2e-3, rtol=0)
    # Hutchinson is unbiased: 40 independent probes per point (the batch repeated), averaged
    reps = 40
    hutch = sampler.log_likelihood(x1.repeat(reps, 1), num_steps=20, exact=False,
                                   generator=torch.Generator().manual_seed(0)).reshape(reps, -1)
    assert float((hutch.mean(0) - truth).abs().mean()) < 0.1
    assert float(hutch.std(0).mean()) > 1e-3  # it is a stochastic estimate
    with pytest.raises(ValueError, match="mirror"):
        InterpolantSampler(Interpolant(None, "brownian", "mirror"), gf.model_fn("score"), "score").log_likelihood(x1)


def test_adaptive_ode_with_torchdiffeq():
    pytest.importorskip("torchdiffeq")
    interp = Interpolant("linear")
    sampler = InterpolantSampler(interp, GaussianFields(interp, M1, C1).model_fn("velocity"))
    _moments_close(sampler.sample_ode_adaptive(_noise(n=4000)), M1, C1, tol_mean=0.08, tol_cov=0.12)


def test_adaptive_without_torchdiffeq_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchdiffeq(name, *args, **kwargs):
        if name.startswith("torchdiffeq"):
            raise ImportError("no torchdiffeq")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchdiffeq)
    interp = Interpolant("linear")
    sampler = InterpolantSampler(interp, GaussianFields(interp, M1, C1).model_fn("velocity"))
    with pytest.raises(ImportError, match="pip install torchdiffeq"):
        sampler.sample_ode(_noise(n=8), method="dopri5")


# --- the scheduler ---------------------------------------------------------------------------------------------------
def test_scheduler_config_round_trip(tmp_path):
    sched = InterpolantScheduler(path="gvp", prediction_type="score", sampler="sde", solver="heun",
                                 diffusion="linear", diffusion_norm=0.5, last_step="tweedie", num_train_timesteps=1000)
    sched.save_pretrained(tmp_path)
    back = InterpolantScheduler.from_pretrained(tmp_path)
    def public(cfg):
        return {k: v for k, v in dict(cfg).items() if not k.startswith("_")}

    assert public(back.config) == public(sched.config)
    again = InterpolantScheduler.from_config(back.config)
    assert again.config.solver == "heun" and again.interpolant.path == "gvp"


def test_scheduler_timesteps_and_endpoints():
    sched = InterpolantScheduler(solver="rk4")
    sched.set_timesteps(5)
    assert sched.nfe == len(sched.timesteps) == 20
    torch.testing.assert_close(sched.timesteps[:4], torch.tensor([0.0, 100.0, 100.0, 200.0]))
    assert float(sched.timesteps[-1]) == pytest.approx(1000.0)  # the last RK4 stage sits on t = 1
    sde = InterpolantScheduler(sampler="sde", solver="euler_maruyama")
    sde.set_timesteps(10)
    # the one-sided score -x0/alpha is infinite at t = 1: stop at 1 - 0.04 and take one last (mean) step
    assert sde.t_grid[-1] == pytest.approx(0.96) and sde.nfe == 11 and sde.last_step_kind == "mean"
    noise_ode = InterpolantScheduler(prediction_type="noise", solver="euler")
    noise_ode.set_timesteps(4)  # eta -> drift divides by beta, which is 0 at t = 0
    assert 0 < noise_ode.t_grid[0] < 0.01


def test_scheduler_loop_matches_sampler_and_checks_its_input():
    interp = Interpolant("linear")
    field = GaussianFields(interp, M1, C1).model_fn("velocity")
    sched = InterpolantScheduler(solver="heun", num_train_timesteps=1000)
    sched.set_timesteps(6)
    x = _noise(n=100)
    for t in sched.timesteps:
        x = sched.step(field(x, (t / 1000).expand(x.shape[0]).double()), t, x).prev_sample
    ref = InterpolantSampler(interp, field).sample_ode(_noise(n=100), num_steps=6, method="heun")
    torch.testing.assert_close(x, ref)
    with pytest.raises(ValueError, match="does not match the planned"):
        sched.set_timesteps(3)
        sched.step(torch.zeros(2, 2), 500.0, torch.zeros(2, 2))


def test_scheduler_add_noise():
    sched = InterpolantScheduler(path="gvp", num_train_timesteps=1000)
    x1, noise = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0.0, 250.0, 500.0, 1000.0])
    out = sched.add_noise(x1, noise, t)
    s = (t / 1000)[:, None]
    torch.testing.assert_close(out, torch.cos(math.pi / 2 * s) * noise + torch.sin(math.pi / 2 * s) * x1)


def test_scheduler_bad_input():
    with pytest.raises(ValueError, match="not a ode solver"):
        InterpolantScheduler(sampler="ode", solver="euler_maruyama")
    with pytest.raises(ValueError, match="unknown diffusion form 'huge'"):
        InterpolantScheduler(sampler="sde", solver="heun", diffusion="huge")
    with pytest.raises(ValueError, match=r"t_end must lie in \[0, 1\]"):
        InterpolantScheduler(t_end=1.5)
    with pytest.raises(ValueError, match="unknown interpolant path 'cosine'"):
        InterpolantScheduler(path="cosine")
    with pytest.raises(ValueError, match="num_inference_steps"):
        InterpolantScheduler().set_timesteps(0)
    sched = InterpolantScheduler(sampler="sde", solver="euler_maruyama", t_end=1.0, last_step="none",
                                 prediction_type="score")
    with pytest.raises(ValueError, match="not finite at t=1.0"):
        sched.set_timesteps(4)
