"""Frechet distance, kernel distance (KID) and the feature statistics both are computed from.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
eq. 6) is the Frechet (2-Wasserstein) distance between two Gaussians fitted to feature vectors:

    d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

KID (Binkowski et al. 2018, "Demystifying MMD GANs", eq. 4 with the cubic kernel of sec. 4) is the unbiased
MMD^2 estimate between the two feature sets under k(x, y) = (x.y / D + 1)^3, averaged over random subsets.

Everything here is float64 numpy at the boundary; the running sums live in torch float64 on the features'
device so that they can be all-reduced across processes.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FeatureStats",
    "frechet_distance",
    "kid",
    "load_stats",
    "save_stats",
    "torchmetrics_fid_kid",
]


def _as_float64(name: str, value: Any, ndim: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf); only finite values are allowed")
    return array


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

        d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

    The trace of the matrix square root is taken from the eigenvalues of the symmetric matrix
    S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2 but needs only `eigh`/`eigvalsh` (no complex
    parts, no `sqrtm` iterations). Negative eigenvalues from round-off are clipped to zero.

    Args:
        mu1: Mean of the first set, shape [D].
        sigma1: Covariance of the first set, shape [D, D], symmetric positive semi-definite.
        mu2: Mean of the second set, shape [D].
        sigma2: Covariance of the second set, shape [D, D].

    Returns:
        The squared Frechet distance as a Python float (>= 0 up to round-off).
    """
    mu1 = _as_float64("mu1", mu1, 1)
    mu2 = _as_float64("mu2", mu2, 1)
    sigma1 = _as_float64("sigma1", sigma1, 2)
    sigma2 = _as_float64("sigma2", sigma2, 2)
    dim = mu1.shape[0]
    if mu2.shape != (dim,):
        raise ValueError(f"mu2 must have shape ({dim},) like mu1, got {mu2.shape}")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} must have shape ({dim}, {dim}) to match mu1, got {sigma.shape}")

    # 1. S1^(1/2) from the eigendecomposition of the symmetrised S1.
    evals1, evecs1 = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    sqrt_sigma1 = (evecs1 * np.sqrt(np.clip(evals1, 0.0, None))) @ evecs1.T
    # 2. tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))).
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    evals = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(evals, 0.0, None)).sum())
    # 3. Assemble.
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


class FeatureStats:
    """Running float64 first and second moments of feature vectors (n, sum x, sum x x^T).

    Args:
        num_features: Feature dimension D; inferred from the first `update` when None.
        keep_features: Also keep the raw features (as float32 on the CPU), which KID needs.
    """

    def __init__(self, num_features: int | None = None, keep_features: bool = False) -> None:
        if num_features is not None and num_features < 1:
            raise ValueError(f"num_features must be a positive int or None, got {num_features}")
        self.num_features = num_features
        self.keep_features = keep_features
        self.n = 0
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        self._kept: list[torch.Tensor] = []

    def _init_sums(self, dim: int, device: torch.device) -> None:
        self.num_features = dim
        self._sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features.

        Args:
            features: Tensor [N, D], any float dtype and device; must be finite.
        """
        if not isinstance(features, torch.Tensor) or features.ndim != 2:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a 2-D tensor [N, D], got {shape}")
        if self.num_features is not None and features.shape[1] != self.num_features:
            raise ValueError(f"features must have D={self.num_features} columns, got {features.shape[1]}")
        if not torch.isfinite(features).all():
            raise ValueError(
                "features contains non-finite values (NaN or inf); only finite values are allowed"
            )
        if self._sum is None:
            self._init_sums(features.shape[1], features.device)
        x = features.detach().to(device=self._sum.device, dtype=torch.float64)
        self.n += x.shape[0]
        self._sum += x.sum(dim=0)
        self._outer += x.T @ x
        if self.keep_features:
            self._kept.append(features.detach().to("cpu", torch.float32))

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add the statistics of `other` into this object (in place) and return self."""
        if not isinstance(other, FeatureStats):
            raise TypeError(f"other must be a FeatureStats, got {type(other).__name__}")
        if other.n == 0:
            return self
        if self.num_features is not None and other.num_features != self.num_features:
            raise ValueError(f"other has D={other.num_features} features, this one has D={self.num_features}")
        if self.keep_features and not other.keep_features:
            raise ValueError(
                "other was built with keep_features=False; cannot keep features after merging it"
            )
        if self._sum is None:
            self._init_sums(other.num_features, other._sum.device)
        self.n += other.n
        self._sum += other._sum.to(self._sum.device)
        self._outer += other._outer.to(self._outer.device)
        if self.keep_features:
            self._kept.extend(other._kept)
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D] (divided by n - 1), float64 numpy."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got n={self.n}")
        mean = self._sum / self.n
        cov = (self._outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return mean.cpu().numpy(), cov.cpu().numpy()

    @property
    def features(self) -> np.ndarray | None:
        """Kept raw features [n, D] float32 numpy, or None when keep_features=False."""
        if not self.keep_features:
            return None
        if not self._kept:
            return np.zeros((0, self.num_features or 0), dtype=np.float32)
        return torch.cat(self._kept).numpy()

    def all_reduce(self, accelerator: Any = None) -> FeatureStats:
        """Sum the statistics over all processes (in place; call once, after the last `update`).

        Does nothing unless torch.distributed is initialised with more than one process (an Accelerate
        `Accelerator` with num_processes == 1 is also a no-op). Kept features are gathered with
        `all_gather_object`, so processes may hold different numbers of samples. Every process must call it,
        and every process must have seen at least one `update` (the sums need a shape and device).

        Args:
            accelerator: Optional `accelerate.Accelerator`; only its `num_processes` is consulted.
        """
        if accelerator is not None and getattr(accelerator, "num_processes", 1) <= 1:
            return self
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if self._sum is None:
            raise ValueError("all_reduce needs at least one update() on every process; this one has none")
        count = torch.tensor([float(self.n)], dtype=torch.float64, device=self._sum.device)
        for tensor in (count, self._sum, self._outer):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        self.n = round(count.item())
        if self.keep_features:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.features)
            self._kept = [torch.from_numpy(np.asarray(f)) for f in gathered if len(f)]
        return self


# Above this many kernel entries (n_a^2 + n_b^2 + n_a n_b; 16M = 128 MB in float64) KID computes kernels per subset.
KID_FULL_KERNEL_LIMIT = 16_000_000


def kid(
    features_a: Any,
    features_b: Any,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with a polynomial kernel, averaged over random subsets.

        k(x, y) = (x.y / D + 1)^degree
        MMD^2 = sum_{i!=j} k(a_i, a_j) / (m(m-1)) + sum_{i!=j} k(b_i, b_j) / (m(m-1)) - 2 sum_{i,j} k(a_i, b_j) / m^2

    Each subset draws m = min(subset_size, n_a, n_b) rows without replacement from each set. When both sets
    have at most `subset_size` rows every subset is the whole set, so std is 0.

    Args:
        features_a: Array or tensor [n_a, D].
        features_b: Array or tensor [n_b, D].
        num_subsets: Number of random subsets (>= 1).
        subset_size: Rows per subset before clamping to min(n_a, n_b); the clamped size must be >= 2.
        degree: Polynomial kernel degree (>= 1).
        seed: Seed of the numpy generator that draws the subsets.

    Returns:
        (mean, std) of the per-subset MMD^2 values; std is the population one (ddof=0), as in torch-fidelity
        and torchmetrics.
    """
    a = _as_float64("features_a", features_a, 2)
    b = _as_float64("features_b", features_b, 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a and features_b must have the same D, got {a.shape[1]} and {b.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(
            f"subset_size clamped to min(subset_size, n_a, n_b) = {m}; need >= 2 samples per set"
        )
    dim = a.shape[1]

    # 1. the polynomial kernel
    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        base = x @ y.T / dim + 1.0
        k = base.copy()
        for _ in range(degree - 1):  # repeated products: much faster than ** on large arrays
            k *= base
        return k

    # 2. kernel sums over random subsets (drawn without replacement)
    rng = np.random.default_rng(seed)
    subsets = [
        (rng.choice(a.shape[0], m, replace=False), rng.choice(b.shape[0], m, replace=False))
        for _ in range(num_subsets)
    ]
    full = a.shape[0] ** 2 + b.shape[0] ** 2 + a.shape[0] * b.shape[0] <= KID_FULL_KERNEL_LIMIT
    if full:
        # Small sets: kernel matrices once; a subset's kernel sum is w^T K w with w its 0/1 indicator vector.
        k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
        w_a = np.zeros((num_subsets, a.shape[0]))
        w_b = np.zeros((num_subsets, b.shape[0]))
        for s, (i, j) in enumerate(subsets):
            w_a[s, i] = 1.0
            w_b[s, j] = 1.0
        sum_xx = ((w_a @ k_aa) * w_a).sum(axis=1) - w_a @ np.diag(k_aa)
        sum_yy = ((w_b @ k_bb) * w_b).sum(axis=1) - w_b @ np.diag(k_bb)
        sum_xy = ((w_a @ k_ab) * w_b).sum(axis=1)
    else:
        # Large sets: kernels per subset.
        sum_xx, sum_yy, sum_xy = (np.empty(num_subsets) for _ in range(3))
        for s, (i, j) in enumerate(subsets):
            x, y = a[i], b[j]
            k_xx, k_yy = kernel(x, x), kernel(y, y)
            sum_xx[s] = k_xx.sum() - np.trace(k_xx)
            sum_yy[s] = k_yy.sum() - np.trace(k_yy)
            sum_xy[s] = kernel(x, y).sum()
    # 3. unbiased MMD^2 per subset (off-diagonal within-set sums, full cross sum)
    values = (sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * sum_xy / (m * m)
    return float(values.mean()), float(values.std())


def save_stats(
    path: str | os.PathLike,
    mu: Any,
    sigma: Any,
    n: int,
    features: Any = None,
    meta: dict | None = None,
) -> Path:
    """Write reference statistics to an .npz (atomically: temp file, then rename).

    Keys: `mu` [D] float64, `sigma` [D, D] float64, `n` int64 scalar, optional `features` [n, D] float32,
    `meta_json` (a JSON string). Parent folders are created.

    Args:
        path: Destination file; the name is used as given (no `.npz` is appended).
        mu: Mean [D].
        sigma: Covariance [D, D].
        n: Number of samples the statistics came from.
        features: Optional raw features [n, D] (kept for KID).
        meta: JSON-serialisable dict (extractor name, weights hash, split, date, ...).

    Returns:
        The written path.
    """
    path = Path(path)
    mu = _as_float64("mu", mu, 1)
    sigma = _as_float64("sigma", sigma, 2)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"sigma must have shape ({mu.shape[0]}, {mu.shape[0]}) to match mu, got {sigma.shape}"
        )
    arrays: dict[str, np.ndarray] = {
        "mu": mu,
        "sigma": sigma,
        "n": np.asarray(int(n), dtype=np.int64),
        "meta_json": np.asarray(json.dumps(meta or {}, sort_keys=True)),
    }
    if features is not None:
        feats = _as_float64("features", features, 2).astype(np.float32)
        if feats.shape[1] != mu.shape[0]:
            raise ValueError(f"features must have D={mu.shape[0]} columns like mu, got {feats.shape[1]}")
        arrays["features"] = feats
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Read statistics written by `save_stats` (with allow_pickle=False).

    Returns:
        dict with `mu` [D] float64, `sigma` [D, D] float64, `n` int, `features` [n, D] float32 or None,
        `meta` dict and `path` str.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"statistics file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"statistics file {str(path)!r} is not a readable .npz ({err})") from err
    for key in ("mu", "sigma", "n", "meta_json"):
        if key not in arrays:
            raise ValueError(f"statistics file {str(path)!r} lacks key {key!r}; has {sorted(arrays)}")
    mu = _as_float64(f"mu in {path}", arrays["mu"], 1)
    sigma = _as_float64(f"sigma in {path}", arrays["sigma"], 2)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"sigma in {str(path)!r} has shape {sigma.shape}, expected {(mu.shape[0],) * 2}")
    try:
        meta = json.loads(str(arrays["meta_json"]))
    except json.JSONDecodeError as err:
        raise ValueError(f"meta_json in {str(path)!r} is not valid JSON ({err})") from err
    features = arrays.get("features")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
        raise ValueError(f"features in {str(path)!r} has shape {features.shape}, expected [n, {mu.shape[0]}]")
    return {
        "mu": mu,
        "sigma": sigma,
        "n": int(arrays["n"]),
        "features": features,
        "meta": meta,
        "path": str(path),
    }


def torchmetrics_fid_kid(
    feature_module: torch.nn.Module,
    real_uint8: torch.Tensor,
    fake_uint8: torch.Tensor,
    subset_size: int,
    subsets: int = 100,
) -> dict[str, float]:
    """FID and KID computed by torchmetrics on the same feature module, for cross-checking ours.

    Args:
        feature_module: Module mapping uint8 [N, C, H, W] to [N, D], with a `num_features` attribute.
        real_uint8: Real images, uint8 [N_r, C, H, W] in 0..255.
        fake_uint8: Generated images, uint8 [N_f, C, H, W] in 0..255.
        subset_size: KID subset size (must be <= min(N_r, N_f)).
        subsets: Number of KID subsets.

    Returns:
        dict with `fid`, `kid`, `kid_std` as floats.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if not hasattr(feature_module, "num_features"):
        raise ValueError("feature_module must have a num_features attribute (its output dimension D)")
    for name, images in (("real_uint8", real_uint8), ("fake_uint8", fake_uint8)):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"{name} must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
    fid_metric = FrechetInceptionDistance(feature=feature_module, normalize=False)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": intended here
        warnings.simplefilter("ignore", UserWarning)
        kid_metric = KernelInceptionDistance(feature=feature_module, subsets=subsets, subset_size=subset_size)
    for metric in (fid_metric, kid_metric):
        metric.update(real_uint8, real=True)
        metric.update(fake_uint8, real=False)
    kid_mean, kid_std = kid_metric.compute()
    return {"fid": float(fid_metric.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
