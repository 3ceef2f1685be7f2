"""RED-Diff and DPS against a Gaussian prior whose exact noise predictor is known in closed form.

Prior ``x0 ~ N(m, s^2 I)`` under the VP process ``x_t = alpha_t x0 + sigma_t eps``: ``x_t ~ N(alpha m,
(alpha^2 s^2 + sigma^2) I)`` and ``(eps, x_t)`` are jointly Gaussian with ``Cov(eps, x_t) = sigma``, so

    eps*(x_t, t) = E[eps | x_t] = sigma (x_t - alpha m) / (alpha^2 s^2 + sigma^2).

RED-Diff's regulariser gradient at ``mu`` is ``lambda_t (eps*(alpha mu + sigma eps) - eps)``, whose mean over eps is
``lambda_t alpha sigma (mu - m) / (alpha^2 s^2 + sigma^2) = p_t (mu - m)``: a Gaussian prior of precision ``p_t``.
With the data term ``w ||y - H mu||^2 / 2`` the stationary point of the expected loss is

    mu* = (w H^T H + p_t I)^-1 (w H^T y + p_t m).

With the weighting ``lambda_t = (alpha^2 s^2 + sigma^2) / (alpha sigma s^2)`` the precision is ``1 / s^2`` at every
``t``, and with ``w = 1 / sigma_y^2`` ``mu*`` is the exact posterior mean (= MAP) of the linear-Gaussian problem.

None of this needs the VP relation ``alpha^2 + sigma^2 = 1``: the same holds for rectified flow (``alpha = 1 - s``,
``sigma = s``, the network predicting ``u = eps - x0``) and for a one-sided linear interpolant ``x = (1 - t) z + t x1``
(``alpha = t``, ``sigma = 1 - t``, time running from noise to data, the network predicting the velocity
``E[x1 - z | x]``), so the posterior-mean test runs on all three priors with the RED-Diff grid of each.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from gen.diffusion import alpha_sigma, from_x0_eps
from gen.interpolants.scheduler import InterpolantScheduler
from gen.inverse import (
    WEIGHTINGS,
    GaussianBlur,
    Inpainting,
    SuperResolution,
    dps,
    eps_predictor,
    red_diff,
    reddiff_timesteps,
    snr_weight,
)
from gen.inverse.dps import DPSHook
from gen.inverse.reddiff import RedDiffSolver, reddiff_grid, run_red_diff
from gen.sampling import CallableAdapter, denoise

SHAPE = (2, 1, 4, 4)
S = 0.5  # prior std


def scheduler(pred_type="epsilon"):
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                         prediction_type=pred_type)


def prior_mean():
    return torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 0.3


def gaussian_model(m, sched, pred_type):
    """The exact network of the Gaussian prior in the prediction space ``pred_type``."""

    def model(x_t, t):
        a, s = alpha_sigma(sched, t, ndim=x_t.ndim, dtype=x_t.dtype)
        eps = s * (x_t - a * m) / (a**2 * S**2 + s**2)
        x0 = (x_t - s * eps) / a
        return from_x0_eps(x0, eps, pred_type, a, s)

    return model


def dense(op, shape):
    n = math.prod(shape[1:])
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
    return torch.stack([op.forward(basis[j:j + 1]).reshape(-1) for j in range(n)], dim=1)


def stationary_point(op, y, m, w, p):
    """``(w H^T H + p I)^-1 (w H^T y + p m)`` per image."""
    h = dense(op, (1, *SHAPE[1:]))
    a = w * h.T @ h + p * torch.eye(h.shape[1], dtype=torch.float64)
    out = []
    for i in range(SHAPE[0]):
        yi = y[i].reshape(-1)
        hi = dense(op_single(op, i), (1, *SHAPE[1:])) if isinstance(op, Inpainting) else h
        ai = w * hi.T @ hi + p * torch.eye(hi.shape[1], dtype=torch.float64) if hi is not h else a
        out.append(torch.linalg.solve(ai, w * hi.T @ yi + p * m[i].reshape(-1)))
    return torch.stack(out).reshape(SHAPE)


def op_single(op, i):
    return Inpainting(op.mask[i:i + 1] if op.mask.shape[0] > 1 else op.mask, sigma_y=op.sigma_y)


def run_averaged(model, pred_type, sched, op, y, x_init, timesteps, lam, weighting, lr, seed=0, optimizer="adam"):
    """RED-Diff, returning the final mu and the mean of mu over the second half of the steps."""
    iterates = []
    n = len(timesteps)
    mu = red_diff(eps_predictor(model, pred_type, sched), op, y, x_init,
                  lambda t: alpha_sigma(sched, t, ndim=4, dtype=torch.float64), timesteps, lr=lr, lam=lam,
                  weighting=weighting, generator=torch.Generator().manual_seed(seed), optimizer=optimizer,
                  callback=lambda i, t, mu: iterates.append(mu.clone()) if i >= n // 2 else None)
    return mu, torch.stack(iterates).mean(0)


def operators():
    return {
        "sr2": SuperResolution(2),
        "inpaint": Inpainting.random_pixels((4, 4), 0.5, seed=1, batch=2),
        "blur": GaussianBlur(3, 0.7),
    }


def test_gaussian_eps_predictor_is_the_conditional_mean():
    """eps* recomputed by regression of eps on x_t over samples of the joint (x0, eps)."""
    sched = scheduler()
    g = torch.Generator().manual_seed(0)
    m = 0.4
    for t in (100, 500, 900):
        a, s = (float(v) for v in alpha_sigma(sched, t, ndim=1, dtype=torch.float64))
        x0 = m + S * torch.randn(400_000, dtype=torch.float64, generator=g)
        eps = torch.randn(400_000, dtype=torch.float64, generator=g)
        x_t = a * x0 + s * eps
        xc = x_t - x_t.mean()
        slope = float((xc * eps).sum() / (xc * xc).sum())
        assert slope == pytest.approx(s / (a**2 * S**2 + s**2), rel=0.02)
        assert float(x_t.mean()) == pytest.approx(a * m, abs=0.01)
        model = gaussian_model(torch.full((1,), m, dtype=torch.float64), sched, "epsilon")
        pred = model(torch.tensor([0.3], dtype=torch.float64), torch.tensor([t]))
        assert float(pred) == pytest.approx(s * (0.3 - a * m) / (a**2 * S**2 + s**2), rel=1e-12)


@pytest.mark.parametrize(("name", "optimizer", "lr"), [("sr2", "adam", 0.01), ("inpaint", "adam", 0.01),
                                                     ("blur", "adam", 0.01), ("inpaint", "sgd", 0.2)])
def test_reddiff_fixed_t_converges_to_gaussian_stationary_point(name, optimizer, lr):
    """At a fixed t with the paper's linear weighting, RED-Diff settles at (w H^T H + p_t I)^-1 (w H^T y + p_t m),
    whichever optimizer moves mu (the stationary point of the expected loss does not depend on it)."""
    sched, op, m = scheduler(), operators()[name], prior_mean()
    x = m + S * torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = op.forward(x)
    t0, lam = 800, 0.25  # at t = 800 the noise of the estimate is small against its mean (ratio alpha s^2 / sigma)
    a, s = (float(v) for v in alpha_sigma(sched, t0, ndim=1, dtype=torch.float64))
    p = lam * (s / a) * a * s / (a**2 * S**2 + s**2)  # lambda_t = lam * sigma / alpha (linear)
    expected = stationary_point(op, y, m, 1.0, p)
    _, avg = run_averaged(gaussian_model(m, sched, "epsilon"), "epsilon", sched, op, y, op.pinv(y, SHAPE),
                          torch.full((600,), t0), lam, "linear", lr=lr, optimizer=optimizer)
    err, rms = float((avg - expected).abs().max()), float((avg - expected).pow(2).mean().sqrt())
    # the answer is not the data fit alone, nor the MAP of the true prior (precision 1/s^2 instead of p_t)
    wrong_prior = stationary_point(op, y, m, 1.0, 1 / S**2)
    gap = min(float((op.pinv(y, SHAPE) - expected).abs().max()), float((wrong_prior - expected).abs().max()))
    assert gap > 0.1
    assert err < 0.03 and rms < 0.01, (err, rms, gap)  # measured: max 0.006-0.011, rms 0.003-0.004


def family_prior(family: str, m):
    """``(scheduler, network)``: the exact network of the prior N(m, S^2 I) in the family's own prediction space and
    time, recomputed here from ``x = a x0 + s eps`` (no library conversion)."""

    def means(x, a, s):
        d = a**2 * S**2 + s**2
        return m + a * S**2 * (x - a * m) / d, s * (x - a * m) / d   # E[x0 | x], E[eps | x]

    if family == "vp":
        sched = scheduler()
        return sched, gaussian_model(m, sched, "epsilon")
    if family == "flow":   # SD3-style: FlowMatchEulerDiscreteScheduler with shift 3, t = 1000 s, a = 1 - s
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

        def flow(x, t):
            s = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1) / 1000
            x0, eps = means(x, 1 - s, s)
            return eps - x0

        return sched, flow
    sched = InterpolantScheduler(path="linear", prediction_type="velocity")   # x = (1 - t) z + t x1, t = T / 1000

    def velocity(x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1) / 1000
        x1, z = means(x, t, 1 - t)
        return x1 - z   # d/dt [(1 - t) z + t x1]

    return sched, velocity


@pytest.mark.parametrize("family", ["vp", "flow", "interpolant"])
@pytest.mark.parametrize("name", ["sr2", "inpaint"])
def test_reddiff_converges_to_gaussian_posterior_mean(name, family):
    """Over a descending grid, with the weighting that makes p_t = 1/s^2 and w = 1/sigma_y^2, RED-Diff settles at the
    exact posterior mean E[x | y] of y = H x + sigma_y n, x ~ N(m, s^2 I), with a VP, a rectified-flow (shift 3) and
    an interpolant prior (the noising, eps_hat and the grid from each prior's scheduler)."""
    m = prior_mean()
    sched, model = family_prior(family, m)
    op = operators()[name]
    op.sigma_y = 0.3
    x = m + S * torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = op.measure(x, generator=torch.Generator().manual_seed(5))
    posterior_mean = stationary_point(op, y, m, 1 / op.sigma_y**2, 1 / S**2)

    def weighting(alpha, sigma):
        return (alpha**2 * S**2 + sigma**2) / (alpha * sigma * S**2)

    # the noise of the regulariser is alpha/sigma * eps here: keep noise fractions where alpha/sigma < 1
    # (VP: t in 550..950, the reference grid reddiff_timesteps(800, 1000, t_max=950, t_min=550))
    steps = reddiff_grid(sched, 800, noise_max=0.951, noise_min=0.55)
    if family == "vp":
        assert torch.equal(steps, reddiff_timesteps(800, 1000, t_max=950, t_min=550))
    iterates = []
    solver = RedDiffSolver(op, y, op.pinv(y, SHAPE), timesteps=steps, prior=sched, lr=0.01, lam=1.0,
                           weighting=weighting, generator=torch.Generator().manual_seed(0))
    run_red_diff(CallableAdapter(model), solver,
                 callback=lambda i, t, mu: iterates.append(mu.clone()) if i >= 400 else None)
    avg = torch.stack(iterates).mean(0)
    err, rms = float((avg - posterior_mean).abs().max()), float((avg - posterior_mean).pow(2).mean().sqrt())
    wrong_prior = stationary_point(op, y, m, 1 / op.sigma_y**2, 0.25 / S**2)
    gap = min(float((op.pinv(y, SHAPE) - posterior_mean).abs().max()),
              float((wrong_prior - posterior_mean).abs().max()))
    assert gap > 0.1
    assert err < 0.03 and rms < 0.01, (err, rms, gap)


def test_reddiff_grid_in_each_priors_own_timesteps():
    """The grid from high to low noise: VP training steps (the reference grid), the flow scheduler's own shifted
    timesteps (Diffusers' set_timesteps at the same unshifted sigmas), the interpolant's reversed time."""
    vp = scheduler()
    for n in (1, 7, 20, 50, 333):
        assert torch.equal(reddiff_grid(vp, n), reddiff_timesteps(n))
        assert torch.equal(reddiff_grid(vp, n, noise_max=0.251), reddiff_timesteps(n, t_max=250))
    u = torch.arange(6, dtype=torch.float64).flip(0) / 6   # 5/6, ..., 0
    for kwargs, mu in (({"shift": 3.0}, None), ({"shift": 1.0}, None), ({"use_dynamic_shifting": True}, 0.8)):
        flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kwargs)
        grid = reddiff_grid(flow, 6, mu=mu)
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kwargs)
        with torch.no_grad(), pytest.warns(RuntimeWarning) if mu is not None else _nullcontext():
            ref.set_timesteps(sigmas=u.tolist(), **({} if mu is None else {"mu": mu}))
        torch.testing.assert_close(grid, ref.timesteps.float(), atol=2e-4, rtol=0)
        assert (grid[:-1] > grid[1:]).all() and float(grid[-1]) == 0.0
    shift3 = reddiff_grid(FlowMatchEulerDiscreteScheduler(shift=3.0), 4)
    torch.testing.assert_close(shift3, torch.tensor([1000 * 3 * 0.75 / 2.5, 1000 * 1.5 / 2, 1000 * 0.75 / 1.5, 0.0]))
    interp = InterpolantScheduler()
    grid = reddiff_grid(interp, 4, noise_max=0.8, noise_min=0.0)
    torch.testing.assert_close(grid, torch.tensor([400.0, 600.0, 800.0, 1000.0]))   # t = 1 - u: noise first
    # an x1 prediction gives no E[z | x] at t = 1 (alpha = 0), a noise prediction no E[x1 | x] at t = 0: 1e-3 inside
    assert float(reddiff_grid(InterpolantScheduler(prediction_type="x1"), 4)[-1]) == pytest.approx(999.0)
    assert float(reddiff_grid(InterpolantScheduler(prediction_type="noise"), 1, noise_max=1.0)[0]) == 1000.0
    assert float(InterpolantScheduler(prediction_type="noise").prediction_space().timestep_at([1.0])[0]) == 1.0
    with pytest.raises(ValueError, match="dynamic"):
        reddiff_grid(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 4)
    with pytest.raises(ValueError, match="noise_min"):
        reddiff_grid(vp, 4, noise_max=0.3, noise_min=0.5)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_reddiff_interpolant_is_the_flow_with_time_reversed():
    """The linear one-sided interpolant at time t is rectified flow at s = 1 - t with the velocity negated: RED-Diff
    with a network read both ways (same eps draws) gives the same iterates, so the interpolant's reversed time and
    its (x1, z) <-> (x0, eps) reading are right."""
    torch.manual_seed(0)
    w = torch.randn(1, 1, 4, 4, dtype=torch.float64) * 0.3

    def interp_net(x, t):   # any network, as a function of interpolant time t (0 = noise)
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1) / 1000
        return torch.tanh(x * (1 + t)) + w * t

    def flow_net(x, t):     # the same network as a rectified flow: s = 1 - t, u = eps - x0 = -(x1 - z)
        return -interp_net(x, 1000 - torch.as_tensor(t, dtype=torch.float64))

    op = SuperResolution(2, sigma_y=0.1)
    y = op.forward(prior_mean())
    outs = []
    for sched, net in ((InterpolantScheduler(path="linear"), interp_net),
                       (FlowMatchEulerDiscreteScheduler(shift=1.0), flow_net)):
        steps = reddiff_grid(sched, 12, noise_max=0.9)
        solver = RedDiffSolver(op, y, op.pinv(y, SHAPE), timesteps=steps, prior=sched, lr=0.05, lam=0.5,
                               generator=torch.Generator().manual_seed(3))
        outs.append(run_red_diff(CallableAdapter(net), solver))
    # equal up to the float32 rounding of the two grids' timesteps (measured: 5e-9)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-7, rtol=0)
    assert float((outs[0] - op.pinv(y, SHAPE)).abs().max()) > 0.01


@pytest.mark.parametrize("family", ["vp", "flow", "interpolant"])
def test_dps_moves_towards_the_measurement_every_family(family):
    """DPS as the core's hook: x0_hat comes from each prior's frame (flow: x_t - s u; interpolant: E[x1 | x]), and
    zeta > 0 ends with a far smaller data residual than the plain sampler from the same noise."""
    m = prior_mean()
    op = Inpainting.box((4, 4), 2, sigma_y=0.05)
    batch = (64, 1, 4, 4)
    m_b = m[:1].expand(batch)
    x = m_b + S * torch.randn(batch, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = op.measure(x, generator=torch.Generator().manual_seed(9))
    noise = torch.randn(batch, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    res = {}
    for zeta in (0.0, 0.5):
        sched, model = family_prior(family, m_b)
        sched.set_timesteps(30)
        out = denoise(CallableAdapter(model), sched, noise, 30, hook=DPSHook(op, y, zeta)).sample
        res[zeta] = float((y - op.forward(out)).flatten(1).norm(dim=1).mean())
    assert res[0.5] < 0.3 * res[0.0], res


@pytest.mark.parametrize("pred_type", ["sample", "v_prediction"])
def test_reddiff_same_result_in_every_prediction_space(pred_type):
    """The exact model written as x0- or v-prediction gives the eps run's iterates (gen.diffusion conversions)."""
    sched_eps, sched_other, m = scheduler(), scheduler(pred_type), prior_mean()
    op = SuperResolution(2)
    y = op.forward(m + 0.2)
    steps = reddiff_timesteps(50)
    mu_eps, _ = run_averaged(gaussian_model(m, sched_eps, "epsilon"), "epsilon", sched_eps, op, y,
                             op.pinv(y, SHAPE), steps, 0.25, "linear", lr=0.05)
    mu_other, _ = run_averaged(gaussian_model(m, sched_other, pred_type), pred_type, sched_other, op, y,
                               op.pinv(y, SHAPE), steps, 0.25, "linear", lr=0.05)
    torch.testing.assert_close(mu_other, mu_eps, atol=1e-7, rtol=1e-7)
    assert float((mu_eps - op.pinv(y, SHAPE)).abs().max()) > 0.01  # it moved


def test_reddiff_never_differentiates_the_network():
    sched, m = scheduler(), prior_mean()
    model = gaussian_model(m, sched, "epsilon")
    calls = []

    def guarded(x_t, t):
        assert not torch.is_grad_enabled() and not x_t.requires_grad
        calls.append(1)
        return model(x_t, t)

    op = SuperResolution(2)
    y = op.forward(m)
    red_diff(eps_predictor(guarded, "epsilon", sched), op, y, op.pinv(y, SHAPE),
             lambda t: alpha_sigma(sched, t, ndim=4, dtype=torch.float64), reddiff_timesteps(7))
    assert len(calls) == 7


def test_dps_moves_towards_the_measurement():
    """DPS (zeta > 0) ends with a far smaller data residual than the unconditional sampler from the same noise,
    and closer to the exact posterior mean."""
    m = prior_mean()
    op = Inpainting.box((4, 4), 2, sigma_y=0.05)
    batch = (64, 1, 4, 4)
    m_b = m[:1].expand(batch)
    x = m_b + S * torch.randn(batch, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = op.measure(x, generator=torch.Generator().manual_seed(9))
    noise = torch.randn(batch, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    out = {}
    for zeta in (0.0, 0.5):
        sched = scheduler()
        out[zeta] = dps(gaussian_model(m_b, sched, "epsilon"), "epsilon", sched, op, y, noise, 50, zeta=zeta,
                        generator=torch.Generator().manual_seed(11))
    res = {z: float((y - op.forward(v)).flatten(1).norm(dim=1).mean()) for z, v in out.items()}
    assert res[0.5] < 0.3 * res[0.0], res
    # observed pixels end near the measurement
    obs = op.mask.expand(batch) > 0
    assert float((out[0.5] - y)[obs].abs().mean()) < 0.1


def test_snr_weightings_and_grid():
    a, s = torch.tensor([0.6]), torch.tensor([0.8])
    r = s / a
    expected = {"linear": r, "sqrt": r.sqrt(), "square": r**2, "log": torch.log1p(r), "clip_linear": r.clamp(max=1),
                "const": torch.ones(1)}
    assert set(expected) == set(WEIGHTINGS)
    for name, value in expected.items():
        torch.testing.assert_close(snr_weight(name, a, s), value)
    torch.testing.assert_close(snr_weight(lambda al, sg: al * sg, a, s), a * s)
    with pytest.raises(ValueError, match="weighting"):
        snr_weight("cubic", a, s)
    ts = reddiff_timesteps(50)
    assert ts[0] == 980 and ts[-1] == 0 and (ts[:-1] > ts[1:]).all() and len(ts) == 50
    assert reddiff_timesteps(4, 1000, t_max=499, t_min=100).tolist() == [400, 300, 200, 100]
    with pytest.raises(ValueError, match="t_min"):
        reddiff_timesteps(4, 1000, t_max=2000)


def test_reddiff_sgd_step_is_a_plain_gradient_step_and_bad_optimizer_raises():
    """One SGD step from mu0 is mu0 - lr (w H^T (H mu0 - y) + lambda_t (eps_hat - eps)), recomputed here."""
    sched, m, op = scheduler(), prior_mean(), SuperResolution(2)
    y = op.forward(m + 0.2)
    model = gaussian_model(m, sched, "epsilon")
    mu0 = op.pinv(y, SHAPE) + 0.1
    t = torch.tensor([700])
    lr, lam = 0.3, 0.5
    got = red_diff(eps_predictor(model, "epsilon", sched), op, y, mu0,
                   lambda tt: alpha_sigma(sched, tt, ndim=4, dtype=torch.float64), t, lr=lr, lam=lam,
                   weighting="const", generator=torch.Generator().manual_seed(3), optimizer="sgd")
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float32).double()
    a, s = alpha_sigma(sched, t.expand(SHAPE[0]), ndim=4, dtype=torch.float64)
    eps_hat = model(a * mu0 + s * eps, t)
    mu = mu0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(0.5 * (y - op.forward(mu)).pow(2).sum(), mu)
    torch.testing.assert_close(got, mu0 - lr * (g + lam * (eps_hat - eps)))
    with pytest.raises(ValueError, match="optimizer"):
        red_diff(eps_predictor(model, "epsilon", sched), op, y, mu0,
                 lambda tt: alpha_sigma(sched, tt, ndim=4, dtype=torch.float64), t, optimizer="lbfgs")
