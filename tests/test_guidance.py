"""gen.guidance: CFG, APG (against Algorithm 1 recomputed here and against diffusers' guider), Adaptive
Guidance, LinearAG, the guidance interval, save/load, and input checks. All closed-form, tiny tensors."""

import math
import warnings

import diffusers.guiders  # imported at collection, not inside a test: peft makes it ~2 s
import diffusers.modular_pipelines.modular_pipeline  # noqa: F401  (BlockState, used by prepare_inputs)
import pytest
import torch

from gen.guidance import (
    APG,
    CFG,
    GUIDERS,
    AdaptiveGuidance,
    GuidanceInterval,
    Guider,
    LinearAG,
    Prediction,
    StepInfo,
    build_guider,
    fit_linear_ag,
)

SHAPE = (2, 3, 3)  # C, H, W


def randn(b, seed, dtype=torch.float64):
    return torch.randn((b,) + SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        dtype
    )


def info(k, n, b, sigma=1.0):
    sigma = sigma if isinstance(sigma, torch.Tensor) else torch.full((b,), float(sigma))
    return StepInfo(step_index=k, num_inference_steps=n, timestep=torch.tensor(float(n - k)), sigma=sigma)


def step(guider, k, n, cond, uncond, sigma=1.0):
    """One pipeline step: ask for the mask, hand over uncond with the unrequested rows set to NaN garbage."""
    inf = info(k, n, cond.x0.shape[0], sigma)
    mask = guider.uncond_mask(inf)
    if not bool(mask.any()):
        return guider(cond, None, inf), mask
    m = mask.view(-1, 1, 1, 1)
    garbage = Prediction(x0=torch.where(m, uncond.x0, math.nan), eps=torch.where(m, uncond.eps, math.nan))
    return guider(cond, garbage, inf), mask


def pair(b, seed, dtype=torch.float64):
    c, u = randn(b, seed, dtype), randn(b, seed + 1, dtype)
    return Prediction(x0=c, eps=-c), Prediction(x0=u, eps=-u)


def flat_dot(a, b):
    return (a.flatten(1) * b.flatten(1)).sum(1)


# --- CFG ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [0.0, 2.0, 7.5])
def test_cfg_formula_and_diffusers(w):
    cond, uncond = pair(3, 0)
    g = CFG(w)
    g.begin(3, 1)
    out, mask = step(g, 0, 1, cond, uncond)
    assert mask.all()
    torch.testing.assert_close(out, cond.x0 + (w - 1) * (cond.x0 - uncond.x0), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, g.to_diffusers().forward(cond.x0, uncond.x0).pred, rtol=0, atol=1e-12)


def test_cfg_scale_one_skips_uncond():
    cond, _ = pair(2, 0)
    g = CFG(1.0)
    g.begin(2, 1)
    out, mask = step(g, 0, 1, cond, None)
    assert not mask.any() and torch.equal(out, cond.x0)


# --- APG ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w", [0.0, 1.5, 4.0, 12.0])
def test_apg_eta1_no_momentum_no_threshold_is_cfg(w):
    cond, uncond = pair(4, 1)
    a, c = APG(w, eta=1.0), CFG(w)
    a.begin(4, 1)
    c.begin(4, 1)
    torch.testing.assert_close(
        step(a, 0, 1, cond, uncond)[0], step(c, 0, 1, cond, uncond)[0], rtol=1e-12, atol=1e-12
    )


def test_apg_eta0_update_is_orthogonal_to_cond():
    cond, uncond = pair(4, 2)
    g = APG(6.0, eta=0.0)
    g.begin(4, 1)
    delta = step(g, 0, 1, cond, uncond)[0] - cond.x0
    cos = flat_dot(delta, cond.x0) / (delta.flatten(1).norm(dim=1) * cond.x0.flatten(1).norm(dim=1))
    assert delta.flatten(1).norm(dim=1).min() > 1e-3  # the update is not trivially zero
    assert cos.abs().max() < 1e-12


def test_apg_rescale_caps_the_guidance_norm():
    cond, uncond = pair(3, 3)
    # per-sample ||d|| of 0.1x, 1x and 10x the raw difference; r between them
    scale = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64).view(-1, 1, 1, 1)
    uncond = Prediction(x0=cond.x0 - scale * (cond.x0 - uncond.x0), eps=uncond.eps)
    d = cond.x0 - uncond.x0
    norms = d.flatten(1).norm(dim=1)
    r = float(norms[1]) * 0.5
    g = APG(2.0, eta=1.0, norm_threshold=r)  # w - 1 = 1, eta = 1: guided - Dc is the rescaled d itself
    g.begin(3, 1)
    got = step(g, 0, 1, cond, uncond)[0] - cond.x0
    assert norms[0] < r < norms[1]
    torch.testing.assert_close(got[0], d[0], rtol=1e-12, atol=1e-12)  # below r: untouched
    torch.testing.assert_close(got[1:], d[1:] * (r / norms[1:]).view(-1, 1, 1, 1), rtol=1e-12, atol=1e-12)
    assert got.flatten(1).norm(dim=1).max() <= r * (1 + 1e-12)


def test_apg_momentum_uses_previous_direction_and_begin_resets_it():
    beta = -0.5
    (c1, u1), (c2, u2) = pair(2, 4), pair(2, 6)
    g = APG(2.0, eta=1.0, momentum=beta)
    g.begin(2, 2)
    out1 = step(g, 0, 2, c1, u1)[0]
    out2 = step(g, 1, 2, c2, u2)[0]
    d1, d2 = c1.x0 - u1.x0, c2.x0 - u2.x0
    torch.testing.assert_close(out1 - c1.x0, d1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out2 - c2.x0, d2 + beta * d1, rtol=1e-12, atol=1e-12)
    g.begin(2, 2)
    assert torch.equal(step(g, 0, 2, c1, u1)[0], out1)


@pytest.mark.parametrize("dims", [None, [-1, -2]])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_apg_matches_diffusers_adaptive_projected_guidance_on_x0(eta, dims):
    ours = APG(4.0, eta=eta, momentum=-0.5, norm_threshold=3.0, dims=dims)
    theirs = ours.to_diffusers()
    kw = ours.to_diffusers_kwargs()
    assert kw["use_original_formulation"] and kw["guidance_scale"] == 3.0
    n = 3
    ours.begin(2, n)
    for k in range(n):
        cond, uncond = pair(2, 10 + 2 * k, torch.float32)
        got = step(ours, k, n, cond, uncond)[0]
        theirs.set_state(k, n, torch.tensor(n - k))
        theirs.prepare_inputs({})  # (re)creates diffusers' momentum buffer at step 0
        ref = theirs.forward(cond.x0, uncond.x0).pred
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


# --- Adaptive Guidance --------------------------------------------------------------------------------------
PAPER = {"after_switch": "cond", "refresh_every": 0}  # the paper's rule after the switch (defaults differ)

def close_pair(b, seed, noise):
    """cond/uncond whose eps differ by `noise` relative size per sample (cosine ~ 1 - noise^2 / 2)."""
    c, u = pair(b, seed)
    noise = torch.as_tensor(noise, dtype=torch.float64).view(-1, 1, 1, 1)
    ue = c.eps + noise * u.eps
    return c, Prediction(x0=u.x0, eps=ue)


@pytest.mark.parametrize(
    "make_inner", [lambda: CFG(4.0), lambda: APG(4.0, momentum=-0.5, norm_threshold=1.0)]
)
def test_ag_with_gamma_bar_one_is_bit_identical_to_inner(make_inner):
    ag, inner = AdaptiveGuidance(make_inner(), gamma_bar=1.0, criterion="eps_cosine"), make_inner()
    n = 4
    ag.begin(3, n)
    inner.begin(3, n)
    for k in range(n):
        cond, uncond = close_pair(3, 20 + 2 * k, 1e-4)  # cosine ~1: any gamma_bar < 1 would switch
        out_ag, mask_ag = step(ag, k, n, cond, uncond)
        out_in, mask_in = step(inner, k, n, cond, uncond)
        assert torch.equal(out_ag, out_in) and torch.equal(mask_ag, mask_in)
    assert (ag.switched_at == -1).all() and (ag.last_gamma > 0.99).all()


def test_ag_switches_a_sample_off_for_the_rest_of_the_run():
    w, n = 3.0, 4
    ag = AdaptiveGuidance(CFG(w), gamma_bar=0.99, criterion="eps_cosine", **PAPER)
    ag.begin(3, n)
    for k in range(n):
        # sample 0 converges (cos ~ 1) from step 1 on; samples 1, 2 keep independent eps (cos ~ 0)
        cond, uncond = close_pair(3, 40 + 2 * k, [1e-3 if k >= 1 else 10.0, 10.0, 10.0])
        out, mask = step(ag, k, n, cond, uncond)
        cfg = cond.x0 + (w - 1) * (cond.x0 - uncond.x0)
        assert mask.tolist() == ([True, True, True] if k <= 1 else [False, True, True])
        if k <= 1:  # the triggering step is still guided
            assert torch.equal(out, cfg)
        else:
            assert torch.equal(out[0], cond.x0[0]) and torch.equal(out[1:], cfg[1:])
        if k == 1:  # a repeated index (second-order sampler) is still the triggering step
            assert ag.switched_at.tolist() == [1, -1, -1] and ag.uncond_mask(info(1, n, 3)).all()
    assert ag.switched_at.tolist() == [1, -1, -1]
    ag.begin(3, n)
    assert ag.switched_at.tolist() == [-1, -1, -1] and ag.uncond_mask(info(0, n, 3)).all()


def test_ag_ands_the_inner_mask():
    ag = AdaptiveGuidance(GuidanceInterval(CFG(3.0), sigma_lo=1.0, sigma_hi=2.0), gamma_bar=0.9,
                          criterion="eps_cosine")
    ag.begin(2, 2)
    cond, uncond = close_pair(2, 50, 1e-3)  # both rows would switch if measured
    out, mask = step(ag, 0, 2, cond, uncond, sigma=torch.tensor([0.5, 1.5]))
    assert mask.tolist() == [False, True]
    assert ag.switched_at.tolist() == [-1, 0]  # only the evaluated row is tested
    assert torch.equal(out[0], cond.x0[0])


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def test_ag_defaults_and_the_paper_rule():
    ag = AdaptiveGuidance(CFG(3.0))
    assert (ag.criterion, ag.gamma_bar, ag.min_steps, ag.after_switch, ag.refresh_every) == (
        "x0_cosine", 0.999, 0, "frozen_eps_delta", 4)
    paper = AdaptiveGuidance(CFG(3.0), gamma_bar=0.99, criterion="eps_cosine", **PAPER)
    assert Guider.from_config(paper.config).config == paper.config


def test_ag_criterion_reads_its_own_space():
    """close_pair: eps nearly equal (cos ~ 1), x0 independent (cos ~ 0). Each criterion records its own cosine."""
    cond, uncond = close_pair(2, 30, 1e-3)
    for criterion, switches, ref in (("eps_cosine", True, _cos(cond.eps, uncond.eps)),
                                     ("x0_cosine", False, _cos(cond.x0, uncond.x0))):
        ag = AdaptiveGuidance(CFG(3.0), gamma_bar=0.99, criterion=criterion)
        ag.begin(2, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step(ag, 0, 3, cond, uncond)
        assert bool((ag.switched_at == 0).all()) is switches
        torch.testing.assert_close(ag.last_gamma, ref.clamp(max=1.0).float(), rtol=0, atol=1e-6)


def test_ag_warns_when_every_sample_switches_off_at_step_0():
    ag = AdaptiveGuidance(CFG(3.0), gamma_bar=0.99, criterion="eps_cosine", **PAPER)
    ag.begin(2, 3)
    cond, uncond = close_pair(2, 10, 1e-3)
    with pytest.warns(UserWarning, match="every sample at step 0"):
        step(ag, 0, 3, cond, uncond)
    assert ag.disabled_at_first_step
    ag.begin(2, 3)  # one sample converged, the other not: no warning, flag reset by begin
    cond, uncond = close_pair(2, 10, [1e-3, 10.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(ag, 0, 3, cond, uncond)
    assert not ag.disabled_at_first_step and ag.switched_at.tolist() == [0, -1]
    step_ag = AdaptiveGuidance(CFG(3.0), criterion="step", min_steps=0, **PAPER)  # Step AG that never guides
    step_ag.begin(2, 3)
    with pytest.warns(UserWarning, match="every sample at step 0"):
        step(step_ag, 0, 3, cond, uncond)


def test_step_ag_guides_exactly_the_first_min_steps():
    w, n = 3.0, 5
    ag = AdaptiveGuidance(CFG(w), criterion="step", min_steps=2, **PAPER)
    ag.begin(2, n)
    for k in range(n):
        cond, uncond = pair(2, 60 + 2 * k)
        out, mask = step(ag, k, n, cond, uncond)
        assert mask.tolist() == [k < 2] * 2
        ref = cond.x0 + (w - 1) * (cond.x0 - uncond.x0) if k < 2 else cond.x0
        assert torch.equal(out, ref)
    assert ag.switched_at.tolist() == [2, 2]


@pytest.mark.parametrize("refresh", [0, 2])
def test_ag_frozen_eps_delta_equals_cfg_when_the_eps_delta_is_constant(refresh):
    """If eps_c - eps_u is the same at every step, CFG's eps offset (w - 1)(eps_c - eps_u) is constant too, so
    freezing it after the switch (refreshed every 2nd step or not) reproduces CFG exactly, from one network
    evaluation per step where the unconditional pass is skipped."""
    w, n, b = 3.0, 6, 2
    d = randn(b, 7, torch.float64)
    ag = AdaptiveGuidance(CFG(w), criterion="step", min_steps=2, after_switch="frozen_eps_delta",
                          refresh_every=refresh)
    cfg, plain = CFG(w), AdaptiveGuidance(CFG(w), criterion="step", min_steps=2, **PAPER)
    for g in (ag, cfg, plain):
        g.begin(b, n)
    for k in range(n):
        a = 0.3 + 0.1 * k
        s = math.sqrt(1 - a * a)
        x_t, eps_c = randn(b, 100 + k, torch.float64), randn(b, 200 + k, torch.float64)
        cond = Prediction(x0=(x_t - s * eps_c) / a, eps=eps_c)
        uncond = Prediction(x0=(x_t - s * (eps_c - d)) / a, eps=eps_c - d)
        sigma = torch.full((b,), s / a, dtype=torch.float64)
        out, mask = step(ag, k, n, cond, uncond, sigma=sigma)
        torch.testing.assert_close(out, step(cfg, k, n, cond, uncond, sigma=sigma)[0], rtol=1e-10, atol=1e-10)
        assert mask.tolist() == [k < 2 or (refresh > 0 and (k - 1) % refresh == 0)] * b  # last guided step: 1
        if k >= 2:  # the paper's rule drops the offset instead
            assert torch.equal(step(plain, k, n, cond, uncond, sigma=sigma)[0], cond.x0)
        else:
            step(plain, k, n, cond, uncond, sigma=sigma)


# --- LinearAG -----------------------------------------------------------------------------------------------
def affine_trajectories(coefs, n_samples=5, seed=60):
    """x0 trajectories with Du[k] exactly affine in (Dc[k], Dc[k-1], Du[k-1]); Du[0] = b Dc[0] + a residual
    orthogonal to Dc[0] (so least squares still returns b, and Du[0] is not collinear with Dc[0])."""
    traj = []
    for k, (b0, b1, b2) in enumerate(coefs):
        c = randn(n_samples, seed + k)
        if k == 0:
            z = randn(n_samples, seed + 100)
            u = b0 * c + z - (z * c).sum() / (c * c).sum() * c
        else:
            u = b0 * c + b1 * traj[-1]["cond"] + b2 * traj[-1]["uncond"]
        traj.append({"cond": c, "uncond": u})
    return traj


COEFS = [[0.7, 0.0, 0.0], [1.1, -0.3, 0.25], [0.9, 0.4, -0.6], [1.3, -0.2, 0.5]]


def test_fit_linear_ag_recovers_exact_affine_coefficients():
    fitted = fit_linear_ag(affine_trajectories(COEFS), num_inference_steps=len(COEFS))
    torch.testing.assert_close(
        torch.tensor(fitted, dtype=torch.float64), torch.tensor(COEFS, dtype=torch.float64), rtol=0, atol=1e-6
    )


def test_linear_ag_estimates_uncond_and_matches_cfg_on_affine_data():
    traj, w, n = affine_trajectories(COEFS, n_samples=2), 4.0, len(COEFS)
    g = LinearAG.from_trajectories(traj, guidance_scale=w, num_exact_steps=1)
    g.begin(2, n)
    for k, t in enumerate(traj):
        cond = Prediction(x0=t["cond"], eps=t["cond"])
        real = Prediction(x0=t["uncond"], eps=t["uncond"])
        for _ in range(2):  # a repeated index (second-order sampler) regresses on the same previous step
            out, mask = step(g, k, n, cond, real)
            assert mask.tolist() == [k == 0] * 2
            cfg = t["cond"] + (w - 1) * (t["cond"] - t["uncond"])
            torch.testing.assert_close(out, cfg, rtol=1e-9, atol=1e-9)


def test_linear_ag_step_count_mismatch():
    g = LinearAG(num_inference_steps=4, coefficients=COEFS)
    with pytest.raises(ValueError, match="fitted for 4 steps; got 5"):
        g.begin(1, 5)
    with pytest.raises(ValueError, match="coefficients"):
        LinearAG(num_inference_steps=3, coefficients=COEFS)
    with pytest.raises(ValueError, match="num_inference_steps"):
        fit_linear_ag(affine_trajectories(COEFS), num_inference_steps=3)


# --- guidance interval --------------------------------------------------------------------------------------
def test_interval_guides_inside_only():
    inner_ref = APG(5.0, momentum=-0.5, norm_threshold=2.0)
    gi = GuidanceInterval(APG(5.0, momentum=-0.5, norm_threshold=2.0), sigma_lo=0.28, sigma_hi=5.42)
    sigma = torch.tensor([0.1, 0.28, 1.0, 5.42, 10.0])  # lo excluded, hi included
    inside = torch.tensor([False, False, True, True, False])
    gi.begin(5, 2)
    inner_ref.begin(5, 2)
    for k in range(2):
        cond, uncond = pair(5, 70 + 2 * k)
        out, mask = step(gi, k, 2, cond, uncond, sigma=sigma)
        ref = step(
            inner_ref,
            k,
            2,
            cond,
            Prediction(torch.where(inside.view(-1, 1, 1, 1), uncond.x0, cond.x0), cond.eps),
        )[0]
        assert torch.equal(mask, inside)
        assert torch.equal(out[inside], ref[inside]) and torch.equal(out[~inside], cond.x0[~inside])


def test_interval_all_outside_gets_no_uncond():
    gi = GuidanceInterval(CFG(3.0))
    gi.begin(2, 1)
    cond, _ = pair(2, 80)
    out, mask = step(gi, 0, 1, cond, None, sigma=20.0)
    assert not mask.any() and torch.equal(out, cond.x0)


# --- persistence, dtype, registry ---------------------------------------------------------------------------
def apg():
    return APG(4.0, eta=0.3, momentum=-0.5, norm_threshold=2.0, dims=[-1, -2])


FACTORIES = {
    "cfg": lambda: CFG(3.0),
    "apg": apg,
    "adaptive_apg": lambda: AdaptiveGuidance(apg(), gamma_bar=0.2),
    "interval_apg": lambda: GuidanceInterval(apg(), sigma_lo=0.5, sigma_hi=3.0),
    "adaptive_interval_apg": lambda: AdaptiveGuidance(GuidanceInterval(apg(), 0.5, 3.0), 0.2),
    "linear_ag": lambda: LinearAG(2.5, num_inference_steps=3, coefficients=COEFS[:3], num_exact_steps=1),
}


def run3(g, dtype=torch.float64):
    g.begin(3, 3)
    outs = []
    for k in range(3):
        cond, uncond = close_pair(3, 90 + 2 * k, [1e-3, 0.5, 10.0])
        cond, uncond = (Prediction(p.x0.to(dtype), p.eps.to(dtype)) for p in (cond, uncond))
        outs.append(step(g, k, 3, cond, uncond, sigma=torch.tensor([0.2, 1.0, 2.5 - k]))[0])
    return outs


@pytest.mark.parametrize("name", list(FACTORIES))
def test_save_load_round_trip(name, tmp_path):
    g = FACTORIES[name]()
    g.save_pretrained(tmp_path)
    assert (tmp_path / "guider_config.json").exists()
    for loaded in (type(g).from_pretrained(tmp_path), Guider.from_pretrained(tmp_path)):
        assert type(loaded) is type(g)
        assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
            k: v for k, v in g.config.items() if not k.startswith("_")
        }
        for a, b in zip(run3(g), run3(loaded)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_output_keeps_input_dtype(name):
    assert all(out.dtype == torch.bfloat16 for out in run3(FACTORIES[name](), torch.bfloat16))


def test_registry_builds_each_guider():
    assert isinstance(build_guider("apg", guidance_scale=2.0, eta=0.0), APG)
    assert isinstance(build_guider("adaptive", inner=CFG(2.0)).inner, CFG)
    assert set(GUIDERS) == {"cfg", "apg", "adaptive", "linear_ag", "interval"}


# --- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: CFG(-1.0), "guidance_scale"),
        (lambda: CFG(math.nan), "guidance_scale"),
        (lambda: CFG(math.inf), "guidance_scale"),
        (lambda: APG(guidance_scale=-0.5), "guidance_scale"),
        (lambda: APG(guidance_scale=math.inf), "guidance_scale"),
        (lambda: APG(norm_threshold=0.0), "norm_threshold"),
        (lambda: APG(norm_threshold=-2.0), "norm_threshold"),
        (lambda: APG(momentum=1.0), "momentum"),
        (lambda: APG(momentum=-1.5), "momentum"),
        (lambda: APG(dims=[0, 1]), "dims"),
        (lambda: LinearAG(math.nan, num_inference_steps=1, coefficients=[[1, 0, 0]]), "guidance_scale"),
        (lambda: AdaptiveGuidance(CFG(), gamma_bar=math.nan), "gamma_bar"),
        (lambda: AdaptiveGuidance(CFG(), gamma_bar=0.0), "gamma_bar"),
        (lambda: AdaptiveGuidance(CFG(), gamma_bar=-1.0), "gamma_bar"),
        (lambda: AdaptiveGuidance(CFG(), gamma_bar=1.01), "gamma_bar"),
        (lambda: AdaptiveGuidance(CFG(), criterion="l2"), "criterion"),
        (lambda: AdaptiveGuidance(CFG(), after_switch="zero"), "after_switch"),
        (lambda: AdaptiveGuidance(CFG(), refresh_every=-1), "refresh_every"),
        (lambda: GuidanceInterval(CFG(), sigma_lo=5.0, sigma_hi=1.0), "sigma_lo"),
        (lambda: GuidanceInterval(CFG(), sigma_lo=-1.0, sigma_hi=1.0), "sigma_lo"),
        (lambda: build_guider("cfgg"), "guider name"),
    ],
)
def test_bad_settings_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_state_misuse_raises():
    cond, uncond = pair(2, 100)
    g = APG(3.0, momentum=-0.5)
    with pytest.raises(ValueError, match=r"call begin\(\)"):
        g.uncond_mask(info(0, 2, 2))
    g.begin(3, 2)
    with pytest.raises(ValueError, match="batch_size"):
        g(cond, uncond, info(0, 2, 2))
    g.begin(2, 2)
    step(g, 0, 2, cond, uncond)
    step(g, 1, 2, cond, uncond)
    step(g, 1, 2, cond, uncond)  # a repeated index (second-order sampler) is fine
    with pytest.raises(ValueError, match=r"backwards.*call begin\(\)"):
        step(g, 0, 2, cond, uncond)
    g.begin(2, 2)
    with pytest.raises(ValueError, match="uncond"):
        g(cond, None, info(0, 2, 2))


def test_ag_min_steps_gate_delays_switching(tmp_path):
    """Every measured sample would switch at once (cosine ~1 > 0.9); min_steps holds the switch back."""
    ag = AdaptiveGuidance(CFG(3.0), gamma_bar=0.9, min_steps=2, criterion="eps_cosine")
    n = 5
    ag.begin(2, n)
    masks = []
    for k in range(n):
        cond, uncond = close_pair(2, 40 + k, 1e-3)
        masks.append(step(ag, k, n, cond, uncond)[1].tolist())
    assert ag.switched_at.tolist() == [2, 2]
    assert masks == [[True, True]] * 3 + [[False, False]] * 2
    ag.save_pretrained(tmp_path / "ag")
    assert Guider.from_pretrained(tmp_path / "ag").min_steps == 2
    with pytest.raises(ValueError, match="min_steps"):
        AdaptiveGuidance(CFG(3.0), min_steps=-1)
