"""Measurement operators ``y = H(x) + sigma_y * n`` for inverse problems on images in [-1, 1].

Protocol (every operator; RED-Diff, DPS and the pipelines use nothing else):

- ``forward(x)`` (also ``op(x)``): ``H(x)``, differentiable with torch autograd. ``x``: float ``[B, C, H, W]``.
- ``measurement_shape(x_shape)``: the shape of ``H(x)`` for an image batch of shape ``x_shape``; raises
  ``ValueError`` (naming the problem) when the operator cannot act on that shape (a mask of another size, a
  side not divisible by the SR factor, ...).
- ``pinv(y, x_shape)``: a pseudo-inverse. For linear operators it is the Moore-Penrose pseudo-inverse ``H^+``
  (``H H^+ H = H``), computed in closed form (SVD of separable factors, FFT diagonalisation, projections), with
  singular values below ``rcond * max`` dropped when ``rcond > 0``. Non-linear operators give the approximate
  inverse used by the RED-Diff reference code (``exact_pinv = False``). Operators without one raise
  :class:`MissingPieceError` (a ``NotImplementedError`` that is also a ``ValueError``); ``has_pinv`` says which.
- ``adjoint(y, x_shape)``: ``H^T y`` (linear operators only, ``linear = True``).
- ``sigma_y``: the standard deviation of the Gaussian measurement noise (in the [-1, 1] units of the images);
  ``measure(x, generator)`` draws ``y = H(x) + sigma_y n``.
- Composition: ``Compose([A, B])`` is ``B(A(x))`` (applied left to right, like the reference's ``"sr4-jpeg20"``).

The degradations follow the list of Mardani et al. 2024 (RED-Diff, arXiv 2305.04391, sec. 5 and the DDRM-style
``H_functions`` of the reference code), written here from the definitions:
denoising, inpainting (box / random pixels / half image, seeded masks), super-resolution (block average, bicubic),
Gaussian blur, motion blur (seeded random-trajectory kernels), colorization, phase retrieval ``|FFT|`` with
oversampling, and HDR (clipping).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gen import validate

__all__ = [
    "Operator",
    "Denoising",
    "Inpainting",
    "SuperResolution",
    "GaussianBlur",
    "MotionBlur",
    "Colorization",
    "PhaseRetrieval",
    "HDR",
    "Compose",
    "MissingPieceError",
    "SeparableLinear",
    "motion_blur_kernel",
]


class MissingPieceError(NotImplementedError, ValueError):
    """An operator asked for a piece it does not have (``adjoint`` of a non-linear operator, a missing ``pinv``).
    A ``NotImplementedError`` by the protocol, and a ``ValueError`` like every other bad request in `gen`."""


def _size2(size) -> tuple[int, int]:
    """``(H, W)`` from a pair of positive integers (a mask or image size)."""
    if isinstance(size, int) or not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2:
        raise validate.ArgumentTypeError(f"size must be a pair (H, W) of positive integers; got "
                                         f"{validate.describe(size)}")
    return validate.integer("size[0] (H)", size[0], 1), validate.integer("size[1] (W)", size[1], 1)


def _shape4(x_shape, what="image batch") -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in x_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"{what} must have shape [B, C, H, W] with positive sizes; got {shape}")
    return shape


class Operator:
    """Base class of a measurement operator (see the module docstring for the protocol).

    Args:
        sigma_y: standard deviation of the additive Gaussian measurement noise, >= 0, in image units ([-1, 1]).
    """

    linear: bool = False
    exact_pinv: bool = False
    # max |H(x)| over images x in [-1, 1] (None: no useful bound, e.g. Fourier magnitudes); used to refuse
    # measurements in other units (such as [0, 255] pixels)
    output_bound: float | None = 1.0

    def __init__(self, sigma_y: float = 0.0):
        self.sigma_y = validate.number("sigma_y", sigma_y, 0.0)

    # --- protocol -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = validate.tensor("x", x, ndim=4)
        self.measurement_shape(x.shape)
        return self.forward(x)

    def measurement_shape(self, x_shape) -> tuple[int, ...]:
        """Shape of ``H(x)`` for ``x`` of shape ``x_shape`` (default: the same shape)."""
        return _shape4(x_shape)

    def adjoint(self, y: torch.Tensor, x_shape=None) -> torch.Tensor:
        raise MissingPieceError(f"{type(self).__name__} is not linear: it has no adjoint (see .linear)")

    def pinv(self, y: torch.Tensor, x_shape=None) -> torch.Tensor:
        raise MissingPieceError(f"{type(self).__name__} has no pseudo-inverse (see .has_pinv; RED-Diff takes x_init=)")

    @property
    def has_pinv(self) -> bool:
        """True when this operator implements ``pinv``."""
        return type(self).pinv is not Operator.pinv

    def noise_support(self, y: torch.Tensor) -> torch.Tensor | float:
        """Where measurement noise lands (1 everywhere by default; inpainting: observed pixels only)."""
        return 1.0

    def measure(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``y = H(x) + sigma_y * n``, ``n ~ N(0, I)`` drawn from ``generator`` (on the CPU, then moved).

        ``x``: images ``[B, C, H, W]`` in [-1, 1] (a tensor or numpy array; uint8 or [0, 255] data is refused; the
        check is loose, |x| <= 10, so that Gaussian test signals pass)."""
        x = validate.image("x", x, (-1.0, 1.0), tolerance=9.0)
        validate.generator("generator", generator, allow_list=False)
        with torch.no_grad():
            y = self(x)
            if self.sigma_y > 0:
                noise = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device, y.dtype)
                y = y + self.sigma_y * noise * self.noise_support(y)
        return y

    def vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J_H(x)^T v`` by autograd (equals ``adjoint(v)`` for linear operators)."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.forward(x), x, v)
        return g

    # --- checks -------------------------------------------------------------------------------------------------
    def check_measurement(self, y, x_shape) -> torch.Tensor:
        """Validate a measurement for images of shape ``x_shape``: a float tensor (or numpy array, converted) of
        ``measurement_shape(x_shape)`` with finite values, within the operator's output range (plus noise) when it
        has one. Returns it as a tensor; raises ``ValueError`` naming the problem."""
        y = validate.tensor("measurement", y, finite=False)  # ArgumentTypeError naming a wrong type or dtype
        expected = self.measurement_shape(x_shape)
        if tuple(y.shape) != tuple(expected):
            raise ValueError(
                f"measurement shape {tuple(y.shape)} does not match {type(self).__name__} applied to images of shape"
                f" {tuple(x_shape)}: expected {tuple(expected)}"
            )
        if not torch.isfinite(y).all():
            raise ValueError("measurement contains NaN or inf values; only finite values are allowed")
        bound = self.output_bound
        if bound is not None and y.numel():
            limit = bound + 0.5 + 8.0 * self.sigma_y
            peak = float(y.abs().max())
            if peak > limit:
                raise ValueError(f"measurement values reach {peak:.4g}, but {type(self).__name__} of images in [-1, 1]"
                                 f" stays within +-{bound:g} (+ noise sigma_y={self.sigma_y:g}); expected the units of"
                                 " images in [-1, 1]" + (" (this looks like [0, 255] pixel data)" if peak > 2 else ""))
        return y

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma_y={self.sigma_y})"


# ------------------------------------------------------------------------------------------------------------------
class Denoising(Operator):
    """``H = I``: the measurement is the noisy image itself."""

    linear = True
    exact_pinv = True

    def forward(self, x):
        return x

    def adjoint(self, y, x_shape=None):
        return y

    def pinv(self, y, x_shape=None):
        return y


class Inpainting(Operator):
    """``H x = m * x``: keep the pixels where the mask is 1 and zero the rest (measurement has the image's shape).

    ``H`` is an orthogonal projection, so ``H^T = H^+ = H``. Noise is added on observed pixels only.

    Args:
        mask: ``[H, W]``, ``[C or 1, H, W]`` or ``[B, C or 1, H, W]`` of {0, 1} (1 = observed); broadcast over
            batch and channels.
        sigma_y: measurement noise std.

    Constructors ``Inpainting.box``, ``Inpainting.random_pixels`` and ``Inpainting.half`` build seeded masks.
    """

    linear = True
    exact_pinv = True

    def __init__(self, mask: torch.Tensor, sigma_y: float = 0.0):
        super().__init__(sigma_y)
        if not isinstance(mask, torch.Tensor):
            mask = validate.tensor("mask", mask, floating=False, finite=False)
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3:
            mask = mask[None]
        if mask.ndim != 4:
            raise ValueError(f"mask must be [H, W], [C, H, W] or [B, C, H, W]; got shape {tuple(mask.shape)}")
        mask = mask.float()
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask values must be 0 (missing) or 1 (observed); got values in "
                             f"[{float(mask.nan_to_num(float('nan')).min()):g}, {float(mask.max()):g}]"
                             + (" and NaN" if bool(mask.isnan().any()) else ""))
        self.mask = mask

    @classmethod
    def box(cls, size, box_size: int, top: int | None = None, left: int | None = None, sigma_y: float = 0.0):
        """Remove a ``box_size x box_size`` square, centred unless ``top``/``left`` are given. ``size = (H, W)``."""
        h, w = _size2(size)
        box_size = validate.integer("box_size", box_size, 1)
        top, left = validate.integer("top", top, 0, allow_none=True), validate.integer("left", left, 0, allow_none=True)
        if not 0 < box_size <= min(h, w):
            raise ValueError(f"box_size must be in 1..{min(h, w)}; got {box_size}")
        top = (h - box_size) // 2 if top is None else top
        left = (w - box_size) // 2 if left is None else left
        if not (0 <= top <= h - box_size and 0 <= left <= w - box_size):
            raise ValueError(f"box at ({top}, {left}) of side {box_size} does not fit in {h}x{w}")
        mask = torch.ones(h, w)
        mask[top:top + box_size, left:left + box_size] = 0
        return cls(mask, sigma_y)

    @classmethod
    def random_pixels(cls, size, missing: float, seed: int = 0, batch: int | None = None, sigma_y: float = 0.0):
        """Drop a fraction ``missing`` of pixels uniformly at random (exactly ``round(missing * H * W)`` per image),
        from ``torch.Generator().manual_seed(seed)``; one mask per image when ``batch`` is given."""
        h, w = _size2(size)
        missing = validate.number("missing", missing, 0.0, 1.0, high_open=True)
        seed = validate.integer("seed", seed)
        batch = validate.integer("batch", batch, 1, allow_none=True)
        gen = torch.Generator().manual_seed(seed)
        n_drop = round(missing * h * w)
        masks = []
        for _ in range(batch or 1):
            m = torch.ones(h * w)
            m[torch.randperm(h * w, generator=gen)[:n_drop]] = 0
            masks.append(m.reshape(1, h, w))
        return cls(torch.stack(masks), sigma_y)

    @classmethod
    def half(cls, size, side: str = "right", sigma_y: float = 0.0):
        """Remove one half of the image: ``side`` in left, right, top, bottom."""
        h, w = _size2(size)
        mask = torch.ones(h, w)
        if side == "right":
            mask[:, w // 2:] = 0
        elif side == "left":
            mask[:, : w - w // 2] = 0
        elif side == "bottom":
            mask[h // 2:] = 0
        elif side == "top":
            mask[: h - h // 2] = 0
        else:
            raise ValueError(f"side={side!r}; allowed: left, right, top, bottom")
        return cls(mask, sigma_y)

    def measurement_shape(self, x_shape):
        b, c, h, w = _shape4(x_shape)
        mb, mc, mh, mw = self.mask.shape
        if (mh, mw) != (h, w) or mb not in (1, b) or mc not in (1, c):
            raise ValueError(
                f"mask shape {tuple(self.mask.shape)} does not match image shape {(b, c, h, w)}"
                f" (mask [H, W] must equal the image's; batch and channels 1 or equal)"
            )
        return (b, c, h, w)

    def _m(self, ref):
        return self.mask.to(ref.device, ref.dtype)

    def forward(self, x):
        return x * self._m(x)

    def adjoint(self, y, x_shape=None):
        return y * self._m(y)

    def pinv(self, y, x_shape=None):
        return y * self._m(y)

    def noise_support(self, y):
        return self._m(y)

    def __repr__(self):
        return f"Inpainting(missing={float(1 - self.mask.mean()):.3f}, mask={tuple(self.mask.shape)}, " \
               f"sigma_y={self.sigma_y})"


# ------------------------------------------------------------------------------------------------------------------
class SeparableLinear(Operator):
    """``Y = A_h X A_w^T`` per channel, for 1-D matrices ``A_h [m, H]``, ``A_w [n, W]`` built per image size.

    ``H = A_h (x) A_w`` (Kronecker product), so ``H^T Y = A_h^T Y A_w`` and ``H^+ Y = A_h^+ Y (A_w^+)^T``
    (the pseudo-inverse of a Kronecker product is the product of the pseudo-inverses), each ``A^+`` from an SVD in
    float64 with singular values below ``rcond * max`` dropped (``rcond = 0``: only numerically zero ones).
    Subclasses implement ``matrix(n) -> [m, n]`` (float64).
    """

    linear = True
    exact_pinv = True

    def __init__(self, sigma_y: float = 0.0, rcond: float = 0.0):
        super().__init__(sigma_y)
        self.rcond = validate.number("rcond", rcond, 0.0, 1.0, high_open=True)
        self._cache: dict = {}

    def matrix(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def _matrix(self, n: int) -> torch.Tensor:
        if n not in self._cache:
            self._cache[n] = self.matrix(n)
        return self._cache[n]

    def _mats(self, h, w, ref):
        key = (h, w, ref.dtype, ref.device)
        if key not in self._cache:
            ah, aw = self._matrix(h), self._matrix(w)
            self._cache[key] = tuple(a.to(ref.device, ref.dtype) for a in (ah, aw, self._pinv1d(ah), self._pinv1d(aw)))
        return self._cache[key]

    def _pinv1d(self, a: torch.Tensor) -> torch.Tensor:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        cut = max(self.rcond, max(a.shape) * torch.finfo(torch.float64).eps) * s.max()
        inv = torch.where(s > cut, 1.0 / s, torch.zeros_like(s))
        return vh.T @ (inv[:, None] * u.T)

    def measurement_shape(self, x_shape):
        b, c, h, w = _shape4(x_shape)
        return (b, c, self._matrix(h).shape[0], self._matrix(w).shape[0])

    def forward(self, x):
        ah, aw, _, _ = self._mats(x.shape[-2], x.shape[-1], x)
        return torch.einsum("ih,bchw,jw->bcij", ah, x, aw)

    def _x_hw(self, y, x_shape):
        if x_shape is None:
            raise ValueError(f"{type(self).__name__}.adjoint/pinv need x_shape (the image shape) to size H")
        _, _, h, w = _shape4(x_shape)
        return h, w

    def adjoint(self, y, x_shape=None):
        ah, aw, _, _ = self._mats(*self._x_hw(y, x_shape), y)
        return torch.einsum("ih,bcij,jw->bchw", ah, y, aw)

    def pinv(self, y, x_shape=None):
        _, _, ph, pw = self._mats(*self._x_hw(y, x_shape), y)
        return torch.einsum("hi,bcij,wj->bchw", ph, y, pw)


def _cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = -0.5, as MATLAB imresize and PIL bicubic)."""
    t = t.abs()
    return torch.where(
        t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
        torch.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, torch.zeros_like(t)),
    )


class SuperResolution(SeparableLinear):
    """Downsampling by an integer ``factor``.

    - ``kind="avgpool"``: block average over ``factor x factor`` pixels (the reference's ``sr<N>``);
      ``H^+`` is nearest-neighbour upsampling.
    - ``kind="bicubic"``: antialiased bicubic downsampling (MATLAB ``imresize`` style: the Keys kernel, a=-0.5,
      stretched by ``factor``, output pixel ``i`` centred at input ``(i + 0.5) f - 0.5``, edges replicated,
      weights normalised to sum 1); ``H^+`` from the SVD of the 1-D matrix.

    Image sides must be divisible by ``factor``.
    """

    def __init__(self, factor: int, kind: str = "avgpool", sigma_y: float = 0.0, rcond: float = 0.0):
        super().__init__(sigma_y, rcond)
        factor = validate.integer("factor", factor, 1)
        validate.choice("kind", kind, ("avgpool", "bicubic"))
        self.factor, self.kind = factor, kind
        if kind == "bicubic":
            self.output_bound = 1.25  # the Keys kernel's negative lobes overshoot a little

    def matrix(self, n):
        f = self.factor
        if n % f:
            raise ValueError(f"image side {n} is not divisible by the super-resolution factor {f}")
        m = n // f
        a = torch.zeros(m, n, dtype=torch.float64)
        if self.kind == "avgpool":
            for i in range(m):
                a[i, i * f:(i + 1) * f] = 1.0 / f
            return a
        for i in range(m):
            c = (i + 0.5) * f - 0.5
            taps = torch.arange(math.floor(c - 2 * f), math.ceil(c + 2 * f) + 1)
            wts = _cubic((taps.double() - c) / f)
            for j, wt in zip(taps.clamp(0, n - 1).tolist(), wts.tolist()):
                a[i, j] += wt
            a[i] /= a[i].sum()
        return a

    def __repr__(self):
        return f"SuperResolution(factor={self.factor}, kind={self.kind!r}, sigma_y={self.sigma_y})"


class GaussianBlur(SeparableLinear):
    """Separable Gaussian blur with a ``kernel_size`` tap kernel of std ``blur_sigma`` (normalised to sum 1) and
    reflect padding (``reflect`` as in ``F.pad``: edge not repeated), folded into the 1-D matrices.

    The exact ``H^+`` of a blur amplifies noise without bound; ``rcond`` (e.g. 0.03, DDRM's cut-off) truncates.
    """

    def __init__(self, kernel_size: int = 5, blur_sigma: float = 1.0, sigma_y: float = 0.0, rcond: float = 0.0):
        super().__init__(sigma_y, rcond)
        kernel_size = validate.integer("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer; got {kernel_size!r}")
        blur_sigma = validate.number("blur_sigma", blur_sigma, 0.0, low_open=True)
        self.kernel_size, self.blur_sigma = kernel_size, float(blur_sigma)
        r = kernel_size // 2
        g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / blur_sigma) ** 2)
        self.kernel1d = g / g.sum()

    def matrix(self, n):
        r = self.kernel_size // 2
        if r >= n:
            raise ValueError(f"image side {n} is too small for a {self.kernel_size}-tap blur (reflect padding)")
        a = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for k in range(self.kernel_size):
                j = i + k - r
                j = -j if j < 0 else (2 * (n - 1) - j if j > n - 1 else j)
                a[i, j] += self.kernel1d[k]
        return a

    def __repr__(self):
        return f"GaussianBlur(kernel_size={self.kernel_size}, blur_sigma={self.blur_sigma}, sigma_y={self.sigma_y})"


def motion_blur_kernel(size: int = 9, intensity: float = 0.5, seed: int = 0) -> torch.Tensor:
    """A ``[size, size]`` motion-blur kernel from a seeded random camera trajectory (sums to 1).

    The trajectory is a random walk with momentum (``intensity`` in [0, 1] raises the turning and the length, in the
    spirit of Boracchi & Foi 2012); its points are splatted bilinearly on the grid and the result is centred on
    its centre of mass.
    """
    size = validate.integer("kernel_size", size, 3)
    if size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd integer >= 3; got {size!r}")
    intensity = validate.number("intensity", intensity, 0.0, 1.0)
    seed = validate.integer("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    n_pts = 64
    length = (0.4 + 0.6 * intensity) * (size - 1)
    angle = float(torch.rand((), generator=gen)) * 2 * math.pi
    pos = torch.zeros(n_pts, 2, dtype=torch.float64)
    vel = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    for i in range(1, n_pts):
        turn = torch.randn((), generator=gen).double() * (0.05 + 0.4 * intensity)
        c, s = math.cos(turn), math.sin(turn)
        vel = torch.stack([c * vel[0] - s * vel[1], s * vel[0] + c * vel[1]])
        pos[i] = pos[i - 1] + vel * length / (n_pts - 1)
    pos = pos - pos.mean(0) + (size - 1) / 2
    pos = pos.clamp(0, size - 1 - 1e-9)
    k = torch.zeros(size, size, dtype=torch.float64)
    i0, f = pos.floor().long(), pos - pos.floor()
    for (r, c), (fr, fc) in zip(i0.tolist(), f.tolist()):
        k[r, c] += (1 - fr) * (1 - fc)
        k[min(r + 1, size - 1), c] += fr * (1 - fc)
        k[r, min(c + 1, size - 1)] += (1 - fr) * fc
        k[min(r + 1, size - 1), min(c + 1, size - 1)] += fr * fc
    return k / k.sum()


class MotionBlur(Operator):
    """Circular 2-D convolution with a seeded motion-blur kernel (:func:`motion_blur_kernel`).

    Circular convolution is diagonal in the 2-D DFT: ``H = F^-1 diag(K) F``, ``H^T = F^-1 diag(conj K) F`` and
    ``H^+ = F^-1 diag(conj K / |K|^2 on |K| > cut, else 0) F`` with ``cut = max(rcond, 1e-12) * max |K|``.

    Args:
        kernel: an explicit ``[k, k]`` kernel (odd k), or None to draw one from ``kernel_size``, ``intensity``,
            ``seed``.
    """

    linear = True
    exact_pinv = True

    def __init__(self, kernel_size: int = 9, intensity: float = 0.5, seed: int = 0, kernel: torch.Tensor | None = None,
                 sigma_y: float = 0.0, rcond: float = 0.0):
        super().__init__(sigma_y)
        self.rcond = validate.number("rcond", rcond, 0.0, 1.0, high_open=True)
        if kernel is None:
            kernel = motion_blur_kernel(kernel_size, intensity, seed)
        kernel = validate.tensor("kernel", kernel).to(torch.float64)
        if float(kernel.sum()) <= 0 or bool((kernel < 0).any()):
            raise ValueError("kernel must be non-negative with a positive sum (a blur kernel)")
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
            raise ValueError(f"kernel must be a square [k, k] tensor with odd k; got shape {tuple(kernel.shape)}")
        self.kernel = kernel
        self._cache: dict = {}

    def _spectrum(self, h, w, ref):
        key = (h, w, ref.device)
        if key not in self._cache:
            k = self.kernel.shape[0]
            if k > min(h, w):
                raise ValueError(f"kernel size {k} exceeds the image size {h}x{w}")
            pad = torch.zeros(h, w, dtype=torch.float64)
            pad[:k, :k] = self.kernel
            pad = torch.roll(pad, shifts=(-(k // 2), -(k // 2)), dims=(0, 1))
            spec = torch.fft.fft2(pad)
            mag = spec.abs()
            cut = max(self.rcond, 1e-12) * mag.max()
            inv = torch.where(mag > cut, spec.conj() / mag.clamp_min(1e-300) ** 2, torch.zeros_like(spec))
            self._cache[key] = (spec.to(ref.device), inv.to(ref.device))
        return self._cache[key]

    def measurement_shape(self, x_shape):
        b, c, h, w = _shape4(x_shape)
        if self.kernel.shape[0] > min(h, w):
            raise ValueError(f"kernel size {self.kernel.shape[0]} exceeds the image size {h}x{w}")
        return (b, c, h, w)

    def _apply(self, x, spec):
        out = torch.fft.ifft2(torch.fft.fft2(x.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64))
                              * spec.to(torch.complex128 if x.dtype == torch.float64 else torch.complex64))
        return out.real.to(x.dtype)

    def forward(self, x):
        spec, _ = self._spectrum(x.shape[-2], x.shape[-1], x)
        return self._apply(x, spec)

    def adjoint(self, y, x_shape=None):
        spec, _ = self._spectrum(y.shape[-2], y.shape[-1], y)
        return self._apply(y, spec.conj())

    def pinv(self, y, x_shape=None):
        _, inv = self._spectrum(y.shape[-2], y.shape[-1], y)
        return self._apply(y, inv)

    def __repr__(self):
        return f"MotionBlur(kernel={tuple(self.kernel.shape)}, sigma_y={self.sigma_y})"


class Colorization(Operator):
    """Grayscale: ``y = mean_c x_c`` (``[B, C, H, W] -> [B, 1, H, W]``). ``H H^T = I / C``, so
    ``H^+ y = y`` repeated over the ``C`` channels and ``H^T y = y / C`` repeated."""

    linear = True
    exact_pinv = True

    def __init__(self, channels: int = 3, sigma_y: float = 0.0):
        super().__init__(sigma_y)
        self.channels = validate.integer("channels", channels, 1)

    def measurement_shape(self, x_shape):
        b, c, h, w = _shape4(x_shape)
        if c != self.channels:
            raise ValueError(f"Colorization expects {self.channels}-channel images; got {c} channels")
        return (b, 1, h, w)

    def forward(self, x):
        return x.mean(dim=1, keepdim=True)

    def adjoint(self, y, x_shape=None):
        return y.expand(-1, self.channels, -1, -1) / self.channels

    def pinv(self, y, x_shape=None):
        return y.expand(-1, self.channels, -1, -1).clone()


class PhaseRetrieval(Operator):
    """Fourier phase retrieval: ``y = |FFT(pad((x + 1) / 2))| / sqrt(N)``, zero padding to ``oversample`` times
    the side (orthonormal 2-D DFT over the padded ``N`` pixels; intensities in [0, 1] so the signal is
    non-negative, as phase retrieval assumes). Non-linear.

    ``pinv`` is the approximate inverse of the reference code: ``2 * crop(|IFFT(y)|) - 1`` (zero phase).
    """

    exact_pinv = False
    output_bound = None  # |FFT| grows with the image size

    def __init__(self, oversample: float = 2.0, sigma_y: float = 0.0):
        super().__init__(sigma_y)
        self.oversample = validate.number("oversample", oversample, 1.0, 8.0)

    def _pads(self, h, w):
        ph, pw = round((self.oversample - 1) * h / 2), round((self.oversample - 1) * w / 2)
        return ph, pw

    def measurement_shape(self, x_shape):
        b, c, h, w = _shape4(x_shape)
        ph, pw = self._pads(h, w)
        return (b, c, h + 2 * ph, w + 2 * pw)

    def forward(self, x):
        ph, pw = self._pads(x.shape[-2], x.shape[-1])
        padded = F.pad((x + 1) / 2, (pw, pw, ph, ph))
        return torch.fft.fft2(padded, norm="ortho").abs()

    def pinv(self, y, x_shape=None):
        if x_shape is None:
            raise ValueError("PhaseRetrieval.pinv needs x_shape (the image shape) to crop the padding")
        _, _, h, w = _shape4(x_shape)
        ph, pw = self._pads(h, w)
        x = torch.fft.ifft2(y.to(torch.complex64 if y.dtype != torch.float64 else torch.complex128), norm="ortho")
        return 2 * x.abs()[..., ph:ph + h, pw:pw + w].to(y.dtype) - 1


class HDR(Operator):
    """High dynamic range: ``y = clip(scale * x, -1, 1)`` (the reference's ``hdr`` uses ``scale = 2``).
    Non-linear; ``pinv y = y / scale`` (exact where nothing was clipped)."""

    exact_pinv = False

    def __init__(self, scale: float = 2.0, sigma_y: float = 0.0):
        super().__init__(sigma_y)
        self.scale = validate.number("scale", scale, 0.0, low_open=True)

    def forward(self, x):
        return (self.scale * x).clamp(-1, 1)

    def pinv(self, y, x_shape=None):
        return y / self.scale


class Compose(Operator):
    """``H = H_n o ... o H_1`` for ``operators = [H_1, ..., H_n]`` (applied left to right).

    - linear if all parts are; ``H^T = H_1^T ... H_n^T``;
    - ``pinv`` for linear parts: the minimum-norm least-squares solution by CGLS (conjugate gradients on
      ``H^T H x = H^T y`` from ``x = 0``, which stays in the row space), in float64, up to ``cg_iters`` iterations
      or relative residual ``cg_tol``; for non-linear parts: the chain ``H_1^+ ... H_n^+`` (approximate).

    Args:
        sigma_y: the noise of the composed measurement (the parts' own ``sigma_y`` are ignored).
    """

    def __init__(self, operators: Sequence[Operator], sigma_y: float = 0.0, cg_iters: int = 500,
                 cg_tol: float = 1e-12):
        super().__init__(sigma_y)
        operators = list(operators)
        if not operators or not all(isinstance(op, Operator) for op in operators):
            raise ValueError("Compose needs a non-empty list of gen.inverse.Operator instances")
        self.operators = operators
        self.linear = all(op.linear for op in operators)
        self.exact_pinv = self.linear
        bounds = [op.output_bound for op in operators]
        self.output_bound = None if None in bounds else math.prod(max(b, 1.0) for b in bounds)
        self.cg_iters = validate.integer("cg_iters", cg_iters, 1)
        self.cg_tol = validate.number("cg_tol", cg_tol, 0.0)

    @property
    def has_pinv(self) -> bool:
        return self.linear or all(op.has_pinv for op in self.operators)

    def _shapes(self, x_shape):
        shapes = [_shape4(x_shape)]
        for op in self.operators:
            shapes.append(tuple(op.measurement_shape(shapes[-1])))
        return shapes

    def measurement_shape(self, x_shape):
        return self._shapes(x_shape)[-1]

    def forward(self, x):
        for op in self.operators:
            x = op.forward(x)
        return x

    def adjoint(self, y, x_shape=None):
        if not self.linear:
            raise MissingPieceError("Compose of non-linear operators has no adjoint (see .linear)")
        if x_shape is None:
            raise ValueError("Compose.adjoint needs x_shape (the image shape)")
        shapes = self._shapes(x_shape)
        for op, shape in zip(reversed(self.operators), reversed(shapes[:-1])):
            y = op.adjoint(y, shape)
        return y

    def pinv(self, y, x_shape=None):
        if x_shape is None:
            raise ValueError("Compose.pinv needs x_shape (the image shape)")
        shapes = self._shapes(x_shape)
        if not self.linear:
            for op, shape in zip(reversed(self.operators), reversed(shapes[:-1])):
                y = op.pinv(y, shape)
            return y
        # CGLS (Paige & Saunders 1982): minimise ||y - H x|| from x = 0, per image
        yd = y.double()
        b = yd.shape[0]
        x = torch.zeros(shapes[0], dtype=torch.float64, device=y.device)
        r = yd.clone()
        s = self.adjoint(r, shapes[0])
        p = s.clone()
        gamma = s.flatten(1).pow(2).sum(1)
        stop = self.cg_tol**2 * gamma.clamp_min(1e-300)
        for _ in range(self.cg_iters):
            if (gamma <= stop).all():
                break
            q = self.forward(p)
            qq = q.flatten(1).pow(2).sum(1)
            alpha = torch.where(qq > 0, gamma / qq.clamp_min(1e-300), torch.zeros_like(gamma)).view(b, 1, 1, 1)
            x = x + alpha * p
            r = r - alpha.view(-1, *([1] * (r.ndim - 1))) * q
            s = self.adjoint(r, shapes[0])
            gamma_new = s.flatten(1).pow(2).sum(1)
            beta = torch.where(gamma > 0, gamma_new / gamma.clamp_min(1e-300), torch.zeros_like(gamma))
            p = s + beta.view(b, 1, 1, 1) * p
            gamma = gamma_new
        return x.to(y.dtype)

    def noise_support(self, y):
        return self.operators[-1].noise_support(y)

    def __repr__(self):
        return f"Compose({self.operators!r}, sigma_y={self.sigma_y})"
