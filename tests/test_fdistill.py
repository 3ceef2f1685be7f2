"""f-distill: h(r) against f by differentiation, the student gradient against the closed-form f-divergence gradient
of two Gaussians, the ratio normalisations (also across two processes), the exact mixture teacher, the losses."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import debug_launcher
from diffusers import DDPMScheduler

from gen.data.toys import (
    IMBALANCED_WEIGHTS,
    check_mixture_weights,
    mixture_params,
    mixture_weights,
    sample_toy,
    toy_log_prob,
)
from gen.diffusion import alpha_sigma
from gen.distill import (
    Critic,
    DiscriminatorHead,
    FDistill,
    FDistillSettings,
    RatioBins,
    available_divergences,
    density_ratio,
    discriminator_loss,
    fdistill_weights,
    get_divergence,
    one_step_generate,
    per_bin_statistics,
    vsd_loss,
)
from gen.distill.toy import GaussianMixtureTeacher, mode_statistics
from gen.models.unet import tiny_unet

NAMES = ["rkl", "kl", "js", "sh", "sf", "neyman", "pearson", "jf", "alpha:0.5", "alpha:2", "alpha:-1"]


# --- the registry ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_h_is_r2_times_f_second_derivative(name):
    d = get_divergence(name)
    r = torch.logspace(-1.5, 1.5, 41, dtype=torch.float64, requires_grad=True)
    f = d.f(r)
    (df,) = torch.autograd.grad(f.sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r)
    torch.testing.assert_close(d.h(r.detach()), r.detach() ** 2 * d2f, rtol=1e-9, atol=1e-12)
    assert abs(float(d.f(torch.tensor(1.0, dtype=torch.float64)))) < 1e-12  # f(1) = 0
    assert (d2f > 0).all()  # convex


def test_known_weightings_and_aliases():
    r = torch.tensor([0.5, 1.0, 4.0])
    torch.testing.assert_close(get_divergence("rkl").h(r), torch.ones(3))
    torch.testing.assert_close(get_divergence("fkl").h(r), r)
    torch.testing.assert_close(get_divergence("js").h(r), r / (1 + r))
    torch.testing.assert_close(get_divergence("alpha:0.5").h(r), r.sqrt())
    assert get_divergence("reverse_kl") is get_divergence("rkl")


def test_unknown_divergence_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown divergence 'tv'.*js.*rkl"):
        get_divergence("tv")
    with pytest.raises(ValueError, match="alpha"):
        get_divergence("alpha:x")
    with pytest.raises(ValueError, match="rkl"):
        get_divergence("alpha:0")
    assert "js" in available_divergences()


# --- the student gradient against the closed form ------------------------------------------------------------------
def _gauss_logpdf(x, m, v):
    return -0.5 * (x - m) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)


@pytest.mark.parametrize("name", ["rkl", "kl", "js", "sh", "jf", "alpha:1.5"])
def test_student_gradient_matches_f_divergence_gradient(name):
    """p_0 = N(m_p, s_p^2), student x = theta + s_q z. With exact x0 predictors and the exact ratio r = p_t/q_t (no
    clipping, no normalisation), d loss / d theta = (sigma^2 / alpha^2) d D_f(p_t || q_t) / d theta (the paper's
    theorem, with s_p - s_q = (alpha / sigma^2)(x0_p - x0_q)). D_f is computed by quadrature on a grid."""
    torch.manual_seed(0)
    div = get_divergence(name)
    m_p, s_p, s_q, theta0 = 0.5, 1.0, 0.8, 0.0
    alpha, sigma = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    v_p, v_q = alpha**2 * s_p**2 + sigma**2, alpha**2 * s_q**2 + sigma**2

    def d_f(theta):  # D_f(p_t || q_t) = int q f(p / q)
        x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
        lp, lq = _gauss_logpdf(x, alpha * m_p, v_p), _gauss_logpdf(x, alpha * theta, v_q)
        return float(torch.trapezoid(lq.exp() * div.f((lp - lq).exp()), x))

    eps_fd = 1e-4
    expected = (sigma**2 / alpha**2) * (d_f(theta0 + eps_fd) - d_f(theta0 - eps_fd)) / (2 * eps_fd)

    n = 400_000
    theta = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    z, eps = torch.randn(n, 1, dtype=torch.float64), torch.randn(n, 1, dtype=torch.float64)
    x_gen = theta + s_q * z
    x_t = (alpha * x_gen + sigma * eps).detach()
    x0_p = m_p + alpha * s_p**2 / v_p * (x_t - alpha * m_p)
    x0_q = theta.detach() + alpha * s_q**2 / v_q * (x_t - alpha * theta.detach())
    logit = (_gauss_logpdf(x_t, alpha * m_p, v_p) - _gauss_logpdf(x_t, alpha * theta.detach(), v_q)).squeeze(1)
    r = density_ratio(logit.double(), logit_clamp=None, r_min=None, r_max=None).double()
    h = div.h(r)
    loss, _ = vsd_loss(x_gen, x0_p, x0_q, h, dmd_normalizer=False)
    (grad,) = torch.autograd.grad(loss, theta)
    assert float(grad) == pytest.approx(float(expected), rel=0.05, abs=2e-4)
    assert abs(float(expected)) > 0.02  # the check is not vacuous: theta = 0 is away from the optimum m_p


def test_vsd_loss_gradient_is_the_weighted_score_difference():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    xt, xf = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    h = torch.tensor([0.5, 1.0, 2.0])
    loss, _ = vsd_loss(x, xt, xf, h, dmd_normalizer=True)
    loss.backward()
    w = 1.0 / (x.detach() - xt).abs().reshape(3, -1).mean(1)
    expected = (h * w).reshape(3, 1, 1, 1) * (xf - xt) / x.numel()
    torch.testing.assert_close(x.grad, expected)


# --- ratio, bins, weights ------------------------------------------------------------------------------------------
def test_density_ratio_clamps_and_clips():
    r = density_ratio(torch.tensor([-50.0, -1.0, 0.0, 2.0, 50.0]))
    torch.testing.assert_close(r, torch.tensor([0.1, math.exp(-1), 1.0, math.exp(2), 20.0]))
    assert r.dtype == torch.float32 and density_ratio(torch.zeros(2, dtype=torch.bfloat16)).dtype == torch.float32


def test_ratio_bins_normalise_each_time_bin_and_keep_an_ema():
    bins = RatioBins(num_bins=2, t_min=0, t_max=100, ema_rate=0.5)
    r = torch.tensor([1.0, 3.0, 10.0, 30.0])
    t = torch.tensor([10, 20, 80, 90])
    out = bins.normalize(r, t)
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5, 0.5, 1.5]), rtol=1e-5, atol=1e-5)
    bins.normalize(torch.tensor([4.0]), torch.tensor([30]))  # bin 0: 0.5 * 2 + 0.5 * 4 = 3
    torch.testing.assert_close(bins.mean, torch.tensor([3.0, 20.0]))


def test_h_is_normalised_by_its_batch_mean():
    r = torch.tensor([0.5, 1.0, 4.0, 9.0])
    h = fdistill_weights(r, "kl")
    torch.testing.assert_close(h.mean(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, r / r.mean(), rtol=1e-5, atol=1e-5)
    with pytest.raises(FloatingPointError, match="r_min"):
        fdistill_weights(torch.tensor([0.0, 1.0]), "neyman")


def _two_rank_weights(out):
    import torch.distributed as dist
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a pytest process that already had one
    state = PartialState(cpu=True)  # cpu=True: gloo ranks on a CPU-only machine
    r_all = torch.tensor([0.2, 1.0, 3.0, 8.0, 0.5, 2.0])
    t_all = torch.tensor([5, 60, 10, 70, 20, 90])
    mine = slice(0, 3) if state.process_index == 0 else slice(3, 6)
    bins = RatioBins(num_bins=2, t_min=0, t_max=100)
    h = fdistill_weights(bins.normalize(r_all[mine], t_all[mine]), "js")
    gathered = [torch.zeros(3) for _ in range(2)]
    dist.all_gather(gathered, h)
    if state.is_main_process:
        torch.save({"h": torch.cat(gathered), "n": state.num_processes}, out)


def test_ratio_and_h_normalisation_are_all_reduced_across_two_processes(tmp_path):
    out = tmp_path / "h.pt"
    debug_launcher(_two_rank_weights, args=(str(out),), num_processes=2)
    got = torch.load(out, weights_only=True)
    assert got["n"] == 2
    single = fdistill_weights(RatioBins(2, 0, 100).normalize(torch.tensor([0.2, 1.0, 3.0, 8.0, 0.5, 2.0]),
                                                             torch.tensor([5, 60, 10, 70, 20, 90])), "js")
    torch.testing.assert_close(got["h"], single)


def test_discriminator_loss_optimum_is_the_log_ratio():
    # for fixed points with densities p, q, the minimiser of p softplus(-D) + q softplus(D) is D = log p / q
    d = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([d], max_iter=100)
    p, q = 0.7, 0.2

    def closure():
        opt.zero_grad()
        loss = (p * torch.nn.functional.softplus(-d) + q * torch.nn.functional.softplus(d)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert float(d.detach()) == pytest.approx(math.log(p / q), abs=1e-4)
    # and the loss itself: real logits high, fake logits low -> small loss
    assert float(discriminator_loss(torch.full((4,), 5.0), torch.full((4,), -5.0))) < 0.02


# --- the exact toy teacher -----------------------------------------------------------------------------------------
def test_mixture_teacher_eps_is_minus_sigma_times_score():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    centres = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.0, -2.0]])
    teacher = GaussianMixtureTeacher(centres, 0.3, sched, weights=torch.tensor([0.5, 0.3, 0.2]))
    x = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
    for t in (50, 500, 950):
        (score,) = torch.autograd.grad(teacher.log_prob(x, t).sum(), x)
        _, sigma = alpha_sigma(sched, torch.full((16,), t), ndim=2, dtype=torch.float64)
        torch.testing.assert_close(teacher(x.detach(), torch.full((16,), t)), -sigma * score)
    s = teacher.sample(20000, torch.Generator().manual_seed(0))
    stats = mode_statistics(s, centres, 0.3, weights=torch.tensor([0.5, 0.3, 0.2]))
    assert stats["modes_recovered"] == 3 and stats["mass_tv"] < 0.02
    assert mode_statistics(s[s[:, 0] > 1.0], centres, 0.3)["modes_recovered"] == 1


# --- generator and the objective on tiny networks ------------------------------------------------------------------
def test_one_step_generate_reads_eps_as_x0():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    net = tiny_unet()
    z = torch.randn(2, 1, 16, 16)
    cond = {"class_labels": torch.tensor([1, 2])}
    x0 = one_step_generate(net, sched, z, 950, cond)
    eps = net(z, torch.full((2,), 950), class_labels=cond["class_labels"]).sample
    a, s = sched.alphas_cumprod[950].sqrt(), (1 - sched.alphas_cumprod[950]).sqrt()
    torch.testing.assert_close(x0, (z - s * eps) / a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["fake", "teacher"])
def test_objective_runs_and_only_the_right_networks_get_gradients(where):
    torch.manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    teacher = tiny_unet().requires_grad_(False)
    student, fake = tiny_unet(), tiny_unet()
    fake.load_state_dict(teacher.state_dict())
    head = DiscriminatorHead(16, 16, spatial=True, num_classes=11)
    critic = Critic(fake, head, RatioBins(4, 20, 980))
    obj = FDistill(teacher, critic, sched, FDistillSettings(divergence="js", teacher_guidance_scale=2.0), where)
    g = torch.Generator().manual_seed(0)
    cond = {"class_labels": torch.tensor([0, 1, 2, 3])}
    uncond = {"class_labels": torch.full((4,), 10)}
    x_gen = one_step_generate(student, sched, torch.randn(4, 1, 16, 16), 950, cond)
    loss_c, logs = obj.critic_loss(critic, x_gen, torch.randn(4, 1, 16, 16), cond, cond, g)
    loss_c.backward()
    assert all(p.grad is not None for p in critic.parameters()) and all(p.grad is None for p in student.parameters())
    assert 0 <= logs["d_acc_real"] <= 1
    critic.zero_grad()
    critic.requires_grad_(False)
    loss_g, logs = obj.generator_loss(x_gen, cond, g, uncond)
    loss_g.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in critic.parameters())
    assert torch.isfinite(loss_g) and logs["h_max"] >= logs["h_min"] > 0


def test_settings_reject_bad_values():
    with pytest.raises(ValueError, match="unknown divergence"):
        FDistillSettings(divergence="nope").validate()
    with pytest.raises(ValueError, match="ratio_min"):
        FDistillSettings(ratio_min=5, ratio_max=1).validate()
    with pytest.raises(ValueError, match="t_min"):
        FDistillSettings(t_min=500, t_max=100).validate()


# --- the imbalanced mode-coverage toy ----------------------------------------------------------------------------
def test_imbalanced_mixture_weights_span_20x_and_its_density_is_the_weighted_sum():
    centres, std = mixture_params("8gaussians_imbalanced")
    w = mixture_weights("8gaussians_imbalanced")
    assert float(w.sum()) == pytest.approx(1.0) and float(w.max() / w.min()) >= 20
    x = torch.randn(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    direct = sum(float(wk) * torch.exp(-((x - c.double()) ** 2).sum(1) / (2 * std**2)) / (2 * math.pi * std**2)
                 for wk, c in zip(w, centres))
    torch.testing.assert_close(toy_log_prob("8gaussians_imbalanced", x), direct.log())
    # exact samples: every mode's recall is P(chi2_2 <= 9) = 1 - exp(-4.5) at radius 3 std, up to sampling error
    samples = sample_toy("8gaussians_imbalanced", 200_000, generator=torch.Generator().manual_seed(1))
    stats = mode_statistics(samples, centres, std, w)
    inside = 1 - math.exp(-4.5)
    for k, (r, wk) in enumerate(zip(stats["recall_per_mode"], IMBALANCED_WEIGHTS)):
        se = math.sqrt(inside * (1 - wk * inside) / (200_000 * wk))  # binomial count / (N w_k)
        assert abs(r - inside) < 5 * se, (k, r)
    assert stats["precision"] == pytest.approx(inside, abs=0.002) and stats["weight_tv"] < 0.01


def test_mode_statistics_closed_form_on_placed_samples():
    """Samples placed at known distances: recall, precision and weight errors follow from the counts."""
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    w = torch.tensor([0.5, 0.3, 0.2])
    # 50 at mode 0, 10 at mode 1 (within 3 std), 0 at mode 2, 40 far from every mode
    x = torch.cat([torch.zeros(50, 2), torch.tensor([[10.2, 0.0]]).repeat(10, 1), torch.full((40, 2), 5.0)])
    st = mode_statistics(x, centres, 0.1, w)
    assert st["recall_per_mode"] == pytest.approx([0.5 / 0.5, 0.1 / 0.3, 0.0], abs=1e-4)
    assert st["precision"] == pytest.approx(0.6) and st["off_mode_fraction"] == pytest.approx(0.4)
    norm = torch.tensor([50 / 60, 10 / 60, 0.0])
    assert st["weight_error_per_mode"] == pytest.approx(((norm - w) / w).tolist(), abs=1e-4)
    assert st["weight_tv"] == pytest.approx(float(0.5 * (norm - w).abs().sum()), abs=1e-4)
    assert st["modes_recovered"] == 2 and st["min_recall"] == 0.0


@pytest.mark.parametrize("bad", [[0.5, 0.5, 0.0], [0.6, -0.1, 0.5], [1.0, float("nan"), 1.0], []])
def test_mixture_with_non_positive_weights_is_rejected(bad):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="weights"):
        check_mixture_weights(bad)
    if len(bad) == 3:
        with pytest.raises(ValueError, match="weights"):
            GaussianMixtureTeacher(torch.zeros(3, 2), 0.1, sched, weights=torch.tensor(bad))
        with pytest.raises(ValueError, match="weights"):
            mode_statistics(torch.zeros(4, 2), torch.zeros(3, 2), 0.1, weights=torch.tensor(bad))


def test_per_bin_statistics_are_the_bin_means():
    h = torch.tensor([1.0, 3.0, 2.0, 4.0, 8.0])
    r = torch.tensor([0.5, 1.5, 1.0, 2.0, 3.0])
    bins = torch.tensor([0, 0, 2, 2, 2])
    out = per_bin_statistics(h, r, bins, 4)
    assert set(out) == {f"{k}_bin{b}" for k in ("h", "h_std", "h_max", "r", "n") for b in (0, 2)}  # empty: left out
    assert float(out["h_bin0"]) == 2.0 and float(out["h_bin2"]) == pytest.approx(14 / 3)
    assert float(out["h_std_bin0"]) == 1.0 and float(out["h_max_bin2"]) == 8.0
    m = 14 / 3
    assert float(out["h_std_bin2"]) == pytest.approx(math.sqrt(((2 - m) ** 2 + (4 - m) ** 2 + (8 - m) ** 2) / 3))
    assert float(out["r_bin2"]) == 2.0 and out["n_bin2"] == 3
