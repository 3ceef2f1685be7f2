"""A 2-D Gaussian-mixture teacher with an exact score, and mode statistics, for f-distill experiments in 2-D.

For a mixture ``p_0 = sum_k pi_k N(mu_k, s^2 I)`` noised by ``x_t = alpha_t x_0 + sigma_t eps`` the marginal is
``p_t = sum_k pi_k N(alpha_t mu_k, v_t I)`` with ``v_t = alpha_t^2 s^2 + sigma_t^2``, so the teacher's noise
prediction is exact: ``eps(x_t) = -sigma_t grad log p_t(x_t) = sigma_t sum_k gamma_k(x_t) (x_t - alpha_t mu_k) / v_t``
with responsibilities ``gamma_k``.
"""

from __future__ import annotations

import torch
from torch import nn

from gen.data.toys import check_mixture_weights
from gen.diffusion import alpha_sigma


class GaussianMixtureTeacher(nn.Module):
    """Exact epsilon-prediction of an isotropic Gaussian mixture noised by ``scheduler`` (no trainable weights).

    Args:
        centres: [K, D] component means.
        std: common component standard deviation s.
        scheduler: a Diffusers VP scheduler (``alphas_cumprod``).
        weights: [K] mixture weights (default uniform); normalised here.
    """

    def __init__(self, centres: torch.Tensor, std: float, scheduler, weights: torch.Tensor | None = None):
        super().__init__()
        centres = torch.as_tensor(centres, dtype=torch.float64)
        if centres.ndim != 2:
            raise ValueError(f"centres must be [K, D]; got {tuple(centres.shape)}")
        if not std > 0:
            raise ValueError(f"std must be > 0; got {std}")
        k = centres.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else check_mixture_weights(weights, k)
        self.register_buffer("centres", centres)
        self.register_buffer("log_weights", (w / w.sum()).log())
        self.std, self.scheduler = float(std), scheduler

    def log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """``log p_t(x)`` [N] (float64)."""
        alpha, sigma = alpha_sigma(self.scheduler, torch.as_tensor(t).expand(x.shape[0]), ndim=2, dtype=torch.float64)
        v = alpha**2 * self.std**2 + sigma**2  # [N, 1]
        d = x.shape[1]
        diff = x.double()[:, None, :] - alpha[:, None, :] * self.centres[None]  # [N, K, D]
        logn = -0.5 * (diff**2).sum(-1) / v - 0.5 * d * torch.log(2 * torch.pi * v)
        return torch.logsumexp(logn + self.log_weights, dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        alpha, sigma = alpha_sigma(self.scheduler, t, ndim=2, dtype=torch.float64, device=x.device)
        v = alpha**2 * self.std**2 + sigma**2
        diff = x.double()[:, None, :] - alpha[:, None, :] * self.centres[None]
        logits = -0.5 * (diff**2).sum(-1) / v + self.log_weights
        gamma = torch.softmax(logits, dim=1)[..., None]
        eps = sigma * (gamma * diff).sum(1) / v
        return eps.to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples of ``p_0`` [n, D] float32."""
        idx = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.centres.shape[1], generator=generator, dtype=torch.float64)
        return (self.centres[idx] + self.std * z).float()


def mode_statistics(samples: torch.Tensor, centres: torch.Tensor, std: float, weights: torch.Tensor | None = None,
                    radius: float = 3.0, min_fraction: float = 0.25) -> dict:
    """Mode coverage of a sample set against a mixture with the given centres and weights.

    Each sample is assigned to its nearest centre if it lies within ``radius * std`` of it (else "off-mode").
    With ``m_k`` the fraction of all samples assigned to mode k and ``pi_k`` its true weight:

        recall_k       = m_k / pi_k                  (1: the mode holds its full weight; exact samples give
                                                      P(chi2_2 <= radius^2) = 0.989 at radius 3)
        precision      = sum_k m_k                   (mass near some mode; 1 - precision is the off-mode mass)
        weight_error_k = (m_k / sum_j m_j - pi_k) / pi_k     (relative error of the on-mode weights)
        weight_tv      = 0.5 sum_k |m_k / sum_j m_j - pi_k|
    A mode counts as recovered when ``recall_k >= min_fraction``.

    Returns:
        ``{"modes_recovered", "num_modes", "mass_per_mode" [K], "off_mode_fraction", "mass_tv", "recall_per_mode"
        [K], "min_recall", "precision", "weight_error_per_mode" [K], "weight_tv", "weights" [K]}``; ``mass_tv`` is
        the total-variation distance between the unnormalised on-mode masses (plus the off-mode mass) and the
        weights.
    """
    centres = torch.as_tensor(centres, dtype=torch.float64)
    k = centres.shape[0]
    w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else check_mixture_weights(weights, k)
    d = torch.cdist(samples.double(), centres)
    dist, idx = d.min(dim=1)
    on = dist <= radius * std
    mass = torch.bincount(idx[on], minlength=k).double() / max(samples.shape[0], 1)
    recall = mass / w
    norm = mass / mass.sum().clamp_min(1e-12)
    recovered = int((recall >= min_fraction).sum())
    return {"modes_recovered": recovered, "num_modes": k, "mass_per_mode": [round(float(m), 4) for m in mass],
            "off_mode_fraction": round(float(1.0 - on.double().mean()), 4),
            "mass_tv": round(float(0.5 * (mass - w).abs().sum() + 0.5 * (1.0 - mass.sum())), 4),
            "recall_per_mode": [round(float(r), 4) for r in recall], "min_recall": round(float(recall.min()), 4),
            "precision": round(float(mass.sum()), 4),
            "weight_error_per_mode": [round(float(e), 4) for e in (norm - w) / w],
            "weight_tv": round(float(0.5 * (norm - w).abs().sum()), 4), "weights": [round(float(x), 4) for x in w]}
