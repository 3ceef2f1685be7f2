"""gen.diffusion: alpha/sigma per scheduler and prediction conversions against closed forms and the schedulers' own
x0 estimates."""

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from gen.diffusion import (
    PREDICTION_TYPES,
    alpha_sigma,
    convert_prediction,
    from_x0_eps,
    make_scheduler,
    prediction_type_of,
    to_x0_eps,
)

torch.manual_seed(0)
X0 = torch.randn(3, 1, 4, 4, dtype=torch.float64)
EPS = torch.randn(3, 1, 4, 4, dtype=torch.float64)


@pytest.mark.parametrize("alpha,sigma", [(0.8, 0.6), (0.3, 0.95), (0.7, 0.3), (0.999, 0.01)])
@pytest.mark.parametrize("src", PREDICTION_TYPES)
def test_every_space_recovers_x0_and_eps(alpha, sigma, src):
    """Solving x_t = a x0 + s eps with any prediction gives back the x0 and eps that made it (any a, s)."""
    x_t = alpha * X0 + sigma * EPS
    pred = {"epsilon": EPS, "sample": X0, "v_prediction": alpha * EPS - sigma * X0, "flow": EPS - X0}[src]
    x0, eps = to_x0_eps(pred, src, x_t, alpha, sigma)
    torch.testing.assert_close(x0, X0)
    torch.testing.assert_close(eps, EPS)
    for dst in PREDICTION_TYPES:
        back = convert_prediction(convert_prediction(pred, src, dst, x_t, alpha, sigma), dst, src, x_t, alpha, sigma)
        torch.testing.assert_close(back, pred)


def test_v_matches_diffusers_get_velocity():
    s = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    t = torch.tensor([10, 500, 990])
    a, sg = alpha_sigma(s, t, dtype=torch.float64)
    v_ref = s.get_velocity(X0.float(), EPS.float(), t).double()
    torch.testing.assert_close(from_x0_eps(X0, EPS, "v_prediction", a, sg), v_ref, atol=1e-5, rtol=1e-5)


def test_vp_alpha_sigma_closed_form():
    s = DDIMScheduler(beta_schedule="linear")
    t = torch.tensor([0, 1, 250, 999])
    a, sg = alpha_sigma(s, t, dtype=torch.float64)
    abar = s.alphas_cumprod.double()[t]
    torch.testing.assert_close(a.flatten(), abar.sqrt())
    torch.testing.assert_close(sg.flatten(), (1 - abar).sqrt())
    torch.testing.assert_close(a**2 + sg**2, torch.ones_like(a))


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction", "sample"])
def test_x0_equals_ddim_pred_original_sample(pred_type):
    s = DDIMScheduler(prediction_type=pred_type, clip_sample=False)
    s.set_timesteps(10)
    x_t = torch.randn(2, 1, 4, 4)
    model_out = torch.randn(2, 1, 4, 4)
    for t in s.timesteps[:3]:
        ref = s.step(model_out, t, x_t).pred_original_sample
        a, sg = alpha_sigma(s, t)
        x0, _ = to_x0_eps(model_out, pred_type, x_t, a, sg)
        torch.testing.assert_close(x0, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_x0_equals_dpmsolver_model_output(pred_type):
    s = DPMSolverMultistepScheduler(prediction_type=pred_type, algorithm_type="dpmsolver++")
    s.set_timesteps(8)
    x_t = torch.randn(2, 1, 4, 4)
    out = torch.randn(2, 1, 4, 4)
    for i, t in enumerate(s.timesteps[:3]):
        s._step_index = i
        ref = s.convert_model_output(out, sample=x_t)
        a, sg = alpha_sigma(s, t)
        torch.testing.assert_close(to_x0_eps(out, pred_type, x_t, a, sg)[0], ref, atol=1e-4, rtol=1e-4)


def test_euler_fractional_timesteps_match_scaled_input():
    """Euler works on x = x0 + s eps and feeds x / sqrt(1 + s^2) to the network: that is a x0 + sigma eps."""
    s = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s.set_timesteps(7)
    for i, t in enumerate(s.timesteps):
        k = float(s.sigmas[i])
        x_sigma = X0.float() + k * EPS.float()
        s._step_index = i
        x_in = s.scale_model_input(x_sigma, t)
        a, sg = alpha_sigma(s, t)
        torch.testing.assert_close(x_in, a * X0.float() + sg * EPS.float(), atol=1e-4, rtol=1e-4)


def test_flow_matching_scheduler():
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(5)
    assert prediction_type_of(s) == "flow"
    t = s.timesteps[1:2]
    x_t = s.scale_noise(X0.float(), t, EPS.float())
    a, sg = alpha_sigma(s, t)
    torch.testing.assert_close(a + sg, torch.ones_like(a))
    x0, eps = to_x0_eps(EPS.float() - X0.float(), "flow", x_t, a, sg)
    torch.testing.assert_close(x0, X0.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps, EPS.float(), atol=1e-5, rtol=1e-5)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="prediction type"):
        to_x0_eps(X0, "noise", X0, 1.0, 0.0)
    with pytest.raises(ValueError, match="does not match"):
        to_x0_eps(X0[:1], "epsilon", X0, 1.0, 0.0)
    with pytest.raises(ValueError, match="timesteps must lie"):
        alpha_sigma(DDIMScheduler(), torch.tensor([1000]))
    with pytest.raises(ValueError, match="unknown scheduler 'ddimm'.*ddim"):
        make_scheduler("ddimm")


def test_make_scheduler_keeps_noise_schedule():
    base = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    for name in ("ddim", "euler", "dpmsolver++", "unipc", "pndm", "heun"):
        s = make_scheduler(name, base.config)
        assert s.config.prediction_type == "v_prediction"
        assert math.isclose(float(s.alphas_cumprod[500]), float(base.alphas_cumprod[500]), rel_tol=1e-6)
