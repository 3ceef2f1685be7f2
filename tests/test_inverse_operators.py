"""Measurement operators of gen.inverse: exact pseudo-inverses against dense linear algebra, adjoint dot-product
tests, shapes, noise, and the ValueErrors naming bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gen.inverse import (
    HDR,
    Colorization,
    Compose,
    Denoising,
    GaussianBlur,
    Inpainting,
    MotionBlur,
    Operator,
    PhaseRetrieval,
    SuperResolution,
    motion_blur_kernel,
)

SHAPE = (2, 3, 8, 8)


def linear_ops():
    return {
        "denoise": Denoising(),
        "inpaint_box": Inpainting.box((8, 8), 3),
        "inpaint_random": Inpainting.random_pixels((8, 8), 0.6, seed=3, batch=2),
        "inpaint_half": Inpainting.half((8, 8), "left"),
        "sr_avgpool": SuperResolution(2),
        "sr_bicubic": SuperResolution(2, kind="bicubic"),
        "gauss_blur": GaussianBlur(3, 0.8),
        "motion_blur": MotionBlur(5, 0.5, seed=1),
        "colorize": Colorization(3),
        "compose": Compose([GaussianBlur(3, 0.8), SuperResolution(2)]),
        "compose_inpaint_sr": Compose([SuperResolution(2, kind="bicubic"), Inpainting.box((4, 4), 2)]),
    }


def dense(op, shape):
    """The matrix of a linear operator acting on one image of ``shape[1:]`` (columns = H e_j)."""
    n = int(np.prod(shape[1:]))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape[1:])
    cols = []
    for j in range(n):
        cols.append(op.forward(basis[j:j + 1]).reshape(-1))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("name", list(linear_ops()))
def test_pinv_reproduces_measurement_on_range(name):
    op = linear_ops()[name]
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = op(x)
    assert tuple(y.shape) == op.measurement_shape(SHAPE)
    x_hat = op.pinv(y, SHAPE)
    assert x_hat.shape == x.shape
    torch.testing.assert_close(op.forward(x_hat), y, atol=1e-8, rtol=1e-8)
    # the minimum-norm solution: no larger than the truth, and H^+ H H^+ = H^+
    assert (x_hat.flatten(1).norm(dim=1) <= x.flatten(1).norm(dim=1) + 1e-9).all()
    torch.testing.assert_close(op.pinv(op.forward(x_hat), SHAPE), x_hat, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", list(linear_ops()))
def test_adjoint_dot_product(name):
    op = linear_ops()[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=g)
    v = torch.randn(op.measurement_shape(SHAPE), dtype=torch.float64, generator=g)
    lhs = (op.forward(x) * v).sum()
    rhs = (x * op.adjoint(v, SHAPE)).sum()
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(op.vjp(x, v), op.adjoint(v, SHAPE), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["denoise", "inpaint_box", "sr_avgpool", "sr_bicubic", "gauss_blur", "colorize",
                                  "compose", "compose_inpaint_sr"])
def test_pinv_matches_dense_moore_penrose(name):
    op = linear_ops()[name]
    shape = (1, 3, 8, 8)
    h = dense(op, shape)
    y = torch.randn(op.measurement_shape(shape), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = (torch.linalg.pinv(h) @ y.reshape(-1)).reshape(shape)  # also off the range
    torch.testing.assert_close(op.pinv(y, shape), expected, atol=1e-7, rtol=1e-7)


def test_motion_blur_pinv_matches_dense_and_kernel_properties():
    k = motion_blur_kernel(7, 0.7, seed=4)
    assert k.shape == (7, 7) and (k >= 0).all() and abs(float(k.sum()) - 1) < 1e-12
    assert torch.equal(k, motion_blur_kernel(7, 0.7, seed=4)) and not torch.equal(k, motion_blur_kernel(7, 0.7, seed=5))
    op = MotionBlur(kernel=k)
    shape = (1, 1, 8, 8)
    h = dense(op, shape)
    # circular convolution with the kernel centred: compare with a direct sum
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    direct = torch.zeros_like(x)
    for a in range(7):
        for b in range(7):
            direct += k[a, b] * torch.roll(x, shifts=(a - 3, b - 3), dims=(2, 3))
    torch.testing.assert_close(op.forward(x), direct, atol=1e-12, rtol=1e-12)
    y = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(h)
    expected = (torch.linalg.pinv(h, rtol=1e-12) @ y.reshape(-1)).reshape(shape)
    if s.min() > 1e-6 * s.max():  # well conditioned: the FFT pinv and the dense pinv agree
        torch.testing.assert_close(op.pinv(y, shape), expected, atol=1e-6, rtol=1e-6)


def test_truncated_pinv_is_an_orthogonal_projection():
    op = GaussianBlur(7, 2.0, rcond=0.05)
    shape = (1, 1, 8, 8)
    h = dense(op, shape)
    p = torch.stack([op.forward(op.pinv(e.reshape(shape), shape)).reshape(-1)
                     for e in torch.eye(64, dtype=torch.float64)], dim=1)  # H H^+
    torch.testing.assert_close(p @ p, p, atol=1e-9, rtol=0)
    torch.testing.assert_close(p, p.T, atol=1e-9, rtol=0)
    rank = int(torch.linalg.matrix_rank(p, atol=1e-6))
    s = torch.linalg.svdvals(h)
    assert rank < 64 and rank > 0 and float(s.min() / s.max()) < 0.05


def test_inpainting_masks_and_noise():
    box = Inpainting.box((16, 16), 6)
    assert int((box.mask == 0).sum()) == 36 and box.mask[0, 0, 5:11, 5:11].sum() == 0
    rnd = Inpainting.random_pixels((16, 16), 0.7, seed=0, batch=3)
    assert rnd.mask.shape == (3, 1, 16, 16)
    assert (rnd.mask.flatten(1).sum(1) == round(0.3 * 256)).all()
    assert not torch.equal(rnd.mask[0], rnd.mask[1])
    assert torch.equal(rnd.mask, Inpainting.random_pixels((16, 16), 0.7, seed=0, batch=3).mask)
    half = Inpainting.half((16, 16), "right")
    assert half.mask[..., 8:].sum() == 0 and half.mask[..., :8].sum() == 128
    op = Inpainting.box((16, 16), 6, sigma_y=0.1)
    x = torch.zeros(200, 1, 16, 16)
    y = op.measure(x, generator=torch.Generator().manual_seed(0))
    assert (y[:, :, 5:11, 5:11] == 0).all()  # no noise on missing pixels
    observed = y[op.mask.expand_as(y) > 0]
    assert abs(float(observed.std()) - 0.1) < 0.005


def test_nonlinear_operators():
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pr = PhaseRetrieval(oversample=2.0)
    y = pr(x)
    assert y.shape == pr.measurement_shape(x.shape) == (2, 1, 16, 16)
    padded = np.pad((x.numpy() + 1) / 2, ((0, 0), (0, 0), (4, 4), (4, 4)))
    np.testing.assert_allclose(y.numpy(), np.abs(np.fft.fft2(padded, norm="ortho")), atol=1e-12)
    torch.testing.assert_close(y.pow(2).flatten(1).sum(1), ((x + 1) / 2).pow(2).flatten(1).sum(1))  # Parseval
    assert not pr.linear and not pr.exact_pinv and pr.pinv(y, x.shape).shape == x.shape
    hdr = HDR(2.0)
    yh = hdr(x)
    assert yh.abs().max() <= 1
    small = x.abs() < 0.5
    torch.testing.assert_close(hdr.pinv(yh)[small], x[small])
    with pytest.raises(NotImplementedError, match="not linear"):
        hdr.adjoint(yh)


def test_bad_input_value_errors():
    op = Inpainting.box((16, 16), 6)
    with pytest.raises(ValueError, match="mask shape"):
        op.measurement_shape((2, 1, 8, 8))
    with pytest.raises(ValueError, match="mask shape"):
        Inpainting.random_pixels((16, 16), 0.5, batch=3).measurement_shape((2, 1, 16, 16))
    with pytest.raises(ValueError, match="measurement shape"):
        SuperResolution(2).check_measurement(torch.zeros(2, 1, 16, 16), (2, 1, 16, 16))
    bad = torch.zeros(2, 1, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SuperResolution(2).check_measurement(bad, (2, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        SuperResolution(3).measurement_shape((1, 1, 16, 16))
    with pytest.raises(ValueError, match="sigma_y"):
        Denoising(sigma_y=-1.0)
    with pytest.raises(ValueError, match="kind"):
        SuperResolution(2, kind="nearest")
    with pytest.raises(ValueError, match="3-channel"):
        Colorization(3).measurement_shape((1, 1, 8, 8))

    class ForwardOnly(Operator):
        def forward(self, x):
            return x.square()

    assert not ForwardOnly().has_pinv and Denoising().has_pinv
    with pytest.raises(NotImplementedError, match="pseudo-inverse"):
        ForwardOnly().pinv(torch.zeros(1, 1, 4, 4))


def test_ssim_closed_forms():
    """gen.metrics.ssim (Wang et al. 2004, Gaussian 11x11 window, sigma 1.5): identical images give 1; constant images
    give the luminance term (2 c1 c2 + C1) / (c1^2 + c2^2 + C1) (variances and covariance vanish, C2/C2 = 1); a
    constant offset d of a textured image gives, per window, (2 mu (mu + d) + C1) / (mu^2 + (mu + d)^2 + C1), recomputed
    here with explicit window sums."""
    from gen.metrics import ssim

    a = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(ssim(a, a), torch.ones(3))
    c1v, c2v = 0.2, 0.5
    const = ssim(torch.full((1, 1, 16, 16), c1v), torch.full((1, 1, 16, 16), c2v), data_range=2.0)
    big_c1 = (0.01 * 2.0) ** 2
    assert float(const) == pytest.approx((2 * c1v * c2v + big_c1) / (c1v**2 + c2v**2 + big_c1), rel=1e-5)
    assert float(const) == pytest.approx(0.2004 / 0.2904, rel=1e-5)  # by hand
    d = 0.3
    g = torch.exp(-0.5 * (torch.arange(-5, 6, dtype=torch.float64) / 1.5) ** 2)
    win = torch.outer(g, g) / g.sum() ** 2
    img = a[:1, :1].double()
    vals = []
    for i in range(16 - 10):
        for j in range(16 - 10):
            mu = float((img[0, 0, i:i + 11, j:j + 11] * win).sum())
            vals.append((2 * mu * (mu + d) + big_c1) / (mu**2 + (mu + d) ** 2 + big_c1))
    assert float(ssim(img, img + d)) == pytest.approx(sum(vals) / len(vals), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, a[:2])
