"""Stochastic interpolants: coefficients, objectives and conversions against closed forms (Gaussian to Gaussian)."""

from __future__ import annotations

import math

import pytest
import torch

from gen.interpolants import (
    GAMMAS,
    GaussianFields,
    Interpolant,
    InterpolantLoss,
    flow_from_velocity,
    sigma_from_t,
    velocity_model_from_flow_model,
)

M1 = torch.tensor([2.0, -1.0], dtype=torch.float64)
A1 = torch.tensor([[1.0, 0.3], [0.0, 0.5]], dtype=torch.float64)
C1 = A1 @ A1.T

FAMILIES = [
    ("one_sided", "linear", "zero"),
    ("one_sided", "gvp", "zero"),
    ("one_sided", "trig", "zero"),
    ("one_sided", "vp", "zero"),
    ("two_sided", "linear", "brownian"),
    ("two_sided", "linear", "scaled_brownian"),
    ("two_sided", "trig", "bsquared"),
    ("two_sided", "gvp", "sinesquared"),
    ("two_sided", "encdec", "sinesquared"),
    ("mirror", None, "brownian"),
    ("mirror", None, "sinesquared"),
]


def _interp(kind, path, gamma):
    return Interpolant(path, gamma, kind, gamma_a=0.5 if gamma == "scaled_brownian" else 1.0)


# --- coefficients --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,path,gamma", FAMILIES)
def test_derivatives_match_finite_differences(kind, path, gamma):
    interp = _interp(kind, path, gamma)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    t = t[(t - 0.5).abs() > 0.02]  # encdec switches branch at 1/2
    h = 1e-6
    c, cp, cm = interp.coefficients(t), interp.coefficients(t + h), interp.coefficients(t - h)
    for name in ("alpha", "beta", "gamma"):
        fd = (getattr(cp, name) - getattr(cm, name)) / (2 * h)
        torch.testing.assert_close(getattr(c, name + "_dot"), fd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.gamma_gamma_dot, c.gamma * c.gamma_dot)


@pytest.mark.parametrize("kind,path,gamma", [f for f in FAMILIES if f[1] != "vp"])
def test_boundary_values(kind, path, gamma):
    c = _interp(kind, path, gamma).coefficients(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert c.gamma.abs().max() == 0
    if kind != "mirror":
        torch.testing.assert_close(c.alpha, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(c.beta, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_vp_matches_sit_definition():
    interp = Interpolant("vp")
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    c = interp.coefficients(t)
    u = 1 - t
    beta = torch.exp(-0.25 * u**2 * (20 - 0.1) - 0.5 * u * 0.1)
    torch.testing.assert_close(c.beta, beta)
    torch.testing.assert_close(c.alpha, (1 - beta**2).sqrt())
    assert 0.006 < float(c.beta[0]) < 0.007  # SiT's VP does not reach pure noise at t = 0


def test_scaled_brownian_uses_its_scale():
    # the reference code's a-brownian reads an undefined name; here gamma_a is used
    t = torch.tensor([0.25], dtype=torch.float64)
    g = Interpolant("linear", "scaled_brownian", "two_sided", gamma_a=3.0).coefficients(t).gamma
    torch.testing.assert_close(g, torch.sqrt(3.0 * t * (1 - t)))


def test_sample_xt_recomputed_by_hand():
    g = torch.Generator().manual_seed(0)
    x0, x1, z = (torch.randn(5, 3, generator=g) for _ in range(3))
    t = torch.rand(5, generator=g, dtype=torch.float64)
    interp = Interpolant("linear", "brownian", "two_sided")
    xt, didt, gz = interp.sample_xt(t, x1, x0, z)
    tt = t.float()[:, None]
    torch.testing.assert_close(xt, (1 - tt) * x0 + tt * x1 + torch.sqrt(tt * (1 - tt)) * z)
    torch.testing.assert_close(didt, x1 - x0)
    torch.testing.assert_close(gz, (1 - 2 * tt) / (2 * torch.sqrt(tt * (1 - tt))) * z)


# --- objectives: the analytic fields minimise the losses ------------------------------------------------------------
LOSS_CASES = [
    (("one_sided", "linear", "zero"), "velocity"),
    (("one_sided", "linear", "zero"), "score"),
    (("one_sided", "gvp", "zero"), "noise"),
    (("one_sided", "linear", "zero"), "x1"),
    (("two_sided", "linear", "brownian"), "drift"),
    (("two_sided", "linear", "brownian"), "score"),
    (("two_sided", "trig", "bsquared"), "velocity"),
    (("mirror", None, "brownian"), "drift"),
]


@pytest.mark.parametrize("family,pred", LOSS_CASES)
def test_analytic_field_minimises_loss(family, pred):
    """L(f* + delta g) - L(f*) = delta^2 E|g|^2 > 0, and dL/d delta at 0 = 2 E[(f* - target) . g] ~ 0."""
    interp = _interp(*family)
    m0 = M1 if interp.kind == "mirror" else None
    gf = GaussianFields(interp, M1, C1)
    loss = InterpolantLoss(interp, pred, t_min=0.05, t_max=0.95)
    n = 60_000
    g = torch.Generator().manual_seed(1)
    x1 = (M1 + torch.randn(n, 2, generator=g, dtype=torch.float64) @ A1.T)
    x0 = torch.randn(n, 2, generator=g, dtype=torch.float64) if interp.kind != "mirror" else None
    t = loss.sample_t(n, g)
    z = torch.randn(n, 2, generator=g, dtype=torch.float64)

    def exact(x, tt):
        return gf.field(pred, tt.double(), x)

    perturbations = [lambda x, tt: torch.ones_like(x), lambda x, tt: x, lambda x, tt: x.flip(1) * tt[:, None]]
    base, _ = loss(exact, x1, x0=x0, t=t, z=z)
    for k, pert in enumerate(perturbations):
        for delta in (0.1, -0.1):
            value, _ = loss(lambda x, tt, d=delta, p=pert: exact(x, tt) + d * p(x, tt), x1, x0=x0, t=t, z=z)
            assert value > base, (k, delta, float(value), float(base))
        # Monte-Carlo gradient at the minimiser: 2 E[(f* - y) g] ~ 0 relative to the curvature 2 E|g|^2
        plus, _ = loss(lambda x, tt, p=pert: exact(x, tt) + 1e-3 * p(x, tt), x1, x0=x0, t=t, z=z)
        minus, _ = loss(lambda x, tt, p=pert: exact(x, tt) - 1e-3 * p(x, tt), x1, x0=x0, t=t, z=z)
        grad = (plus - minus) / 2e-3
        curv = (plus + minus - 2 * base) / 1e-6
        assert abs(float(grad)) < 0.05 * float(curv) + 1e-3, (k, float(grad), float(curv))
    del m0


def test_antithetic_reduces_score_gradient_variance():
    """Near an endpoint the gradient term z/gamma . ds/dtheta of L_s has huge variance; the pair I +- gamma z
    cancels it (paper sec. 6.1). Gradient of the loss wrt delta for s* + delta * x, over 30 seeds."""
    interp = Interpolant("linear", "brownian", "two_sided")
    gf = GaussianFields(interp, M1, C1)
    grads = {True: [], False: []}
    for anti in (True, False):
        loss = InterpolantLoss(interp, "score", antithetic=anti)
        for seed in range(30):
            g = torch.Generator().manual_seed(seed)
            x1 = M1 + torch.randn(256, 2, generator=g, dtype=torch.float64) @ A1.T
            t = torch.full((256,), 0.01, dtype=torch.float64)
            delta = torch.zeros((), dtype=torch.float64, requires_grad=True)
            value, _ = loss(lambda x, tt, d=delta: gf.field("score", tt, x) + d * x, x1, generator=g, t=t)
            grads[anti].append(float(torch.autograd.grad(value, delta)[0]))
    var = {k: torch.tensor(v).var() for k, v in grads.items()}
    assert var[True] < 0.2 * var[False], var


def test_sit_loss_weights():
    interp = Interpolant("linear")
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    w_t = (1 - t) ** 2 / t + (1 - t)  # alpha^2 beta'/beta - alpha alpha' for the linear path
    torch.testing.assert_close(InterpolantLoss(interp, "score", "velocity").weight(t), w_t**2)
    torch.testing.assert_close(InterpolantLoss(interp, "score", "likelihood").weight(t), w_t)
    torch.testing.assert_close(InterpolantLoss(interp, "score", "noise").weight(t), (1 - t) ** 2)
    torch.testing.assert_close(InterpolantLoss(interp, "noise", "velocity").weight(t), w_t**2 / (1 - t) ** 2)
    assert InterpolantLoss(interp, "score", "velocity").t_min >= 1e-3  # w_t is infinite at t = 0


# --- conversions -----------------------------------------------------------------------------------------------------
PREDS = ("velocity", "drift", "score", "noise", "x1")


@pytest.mark.parametrize("kind,path,gamma", FAMILIES)
def test_conversions_match_exact_fields_and_round_trip(kind, path, gamma):
    interp = _interp(kind, path, gamma)
    gf = GaussianFields(interp, M1, C1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64) * 2
    t = 0.63 if path == "encdec" else 0.37  # encdec: beta = beta' = 0 on t <= 1/2, so v does not give E[x1|x]
    usable = [p for p in PREDS if not (kind == "mirror" and p == "velocity")]
    x0 = None
    if kind == "two_sided":
        # a single prediction determines the others only for a known x0 (conditional bridge): use x0 = m0 + ...;
        # the unconditional fields then need the score to go between drift and velocity
        v, s = gf.field("velocity", t, x), gf.field("score", t, x)
        torch.testing.assert_close(interp.convert(v, "v", "b", x, t, score=s), gf.field("drift", t, x))
        torch.testing.assert_close(interp.convert(gf.field("drift", t, x), "b", "v", x, t, score=s), v)
        torch.testing.assert_close(interp.convert(s, "s", "eta", x, t), gf.field("noise", t, x))
        torch.testing.assert_close(interp.convert(gf.field("noise", t, x), "eta", "s", x, t), s)
        with pytest.raises(ValueError, match="without x0"):
            interp.convert(v, "velocity", "score", x, t)
        x0 = torch.randn(16, 2, generator=g, dtype=torch.float64)
        pred = torch.randn(16, 2, generator=g, dtype=torch.float64)
        for src in usable:
            for dst in usable:
                back = interp.convert(interp.convert(pred, src, dst, x, t, x0=x0), dst, src, x, t, x0=x0)
                torch.testing.assert_close(back, pred, msg=f"{src} -> {dst} -> {src}")
        return
    for src in usable:
        for dst in PREDS if kind != "mirror" else usable:
            out = interp.convert(gf.field(src, t, x), src, dst, x, t)
            torch.testing.assert_close(out, gf.field(dst, t, x), msg=f"{src} -> {dst}")
            back = interp.convert(out, dst, src, x, t)
            torch.testing.assert_close(back, gf.field(src, t, x), msg=f"{src} -> {dst} -> {src}")


def test_mirror_velocity_is_zero():
    interp = Interpolant(None, "brownian", "mirror")
    x = torch.randn(4, 2)
    out = interp.convert(torch.randn(4, 2), "score", "velocity", x, 0.3)
    assert out.abs().max() == 0
    with pytest.raises(ValueError, match="identically 0"):
        interp.convert(x, "velocity", "score", x, 0.3)


def test_eta_sign_follows_the_paper():
    # eta = E[z|x] and s = -eta / gamma (the reference code stores -E[z|x] and s = eta / gamma)
    interp = Interpolant("linear", "brownian", "two_sided")
    x, eta = torch.randn(3, 2), torch.randn(3, 2)
    gamma = math.sqrt(0.3 * 0.7)
    torch.testing.assert_close(interp.convert(eta, "eta", "s", x, 0.3), -eta / gamma)


def test_flow_matching_adapter_matches_diffusers_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    interp = Interpolant("linear")
    gf = GaussianFields(interp, M1, C1)

    def model_fn(x, t):
        return gf.field("velocity", float(t[0]), x.double()).float()

    n = 8
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    t_grid = torch.linspace(0, 1, n + 1)
    sched.set_timesteps(sigmas=sigma_from_t(t_grid[:-1]).tolist())
    net = velocity_model_from_flow_model(lambda x, ts: flow_from_velocity(model_fn(x, 1 - ts / 1000)))
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    ours = x.clone()
    for i in range(n):
        h = float(t_grid[i + 1] - t_grid[i])
        ours = ours + h * net(ours, t_grid[i].expand(32))
    theirs = x.clone()
    for ts in sched.timesteps:
        u = flow_from_velocity(model_fn(theirs, (1 - ts / 1000).expand(32)))
        theirs = sched.step(u, ts, theirs).prev_sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# --- bad input -------------------------------------------------------------------------------------------------------
def test_bad_input_raises_value_errors_naming_the_problem():
    interp = Interpolant("linear", "brownian", "two_sided")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        interp.coefficients(torch.tensor([1.5]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        interp.convert(torch.zeros(2, 2), "s", "eta", torch.zeros(2, 2), -0.1)
    with pytest.raises(ValueError, match="unknown interpolant path 'cosine'"):
        Interpolant("cosine")
    with pytest.raises(ValueError, match=f"unknown gamma 'bm'; allowed: {', '.join(GAMMAS)}"):
        Interpolant("linear", "bm", "two_sided")
    with pytest.raises(ValueError, match="unknown interpolant kind"):
        Interpolant("linear", "zero", "three_sided")
    with pytest.raises(ValueError, match="unknown prediction type 'epsilon_hat'"):
        interp.convert(torch.zeros(1, 2), "epsilon_hat", "s", torch.zeros(1, 2), 0.5)
    # a gamma that vanishes where a score is needed
    flat = Interpolant("linear", "zero", "two_sided")
    with pytest.raises(ValueError, match="gamma='zero' vanishes"):
        flat.convert(torch.ones(2, 2), "noise", "score", torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError, match="gamma='zero' vanishes"):
        InterpolantLoss(flat, "score")
    with pytest.raises(ValueError, match="gamma='zero' vanishes"):
        Interpolant(None, "zero", "mirror")
    with pytest.raises(ValueError, match="gamma"):  # score at an endpoint where gamma = 0
        interp.convert(torch.ones(2, 2), "noise", "score", torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="one-sided interpolant has gamma='zero'"):
        Interpolant("linear", "brownian", "one_sided")
    with pytest.raises(ValueError, match="gamma < 1"):
        Interpolant("trig", "sinesquared", "two_sided")
    with pytest.raises(ValueError, match="unknown weighting"):
        InterpolantLoss(Interpolant(), "score", "snr")
