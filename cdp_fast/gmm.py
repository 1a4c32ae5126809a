"""Exact epsilon of a Gaussian mixture under the forward diffusion: a 'model' with no network.

If x_0 ~ sum_k w_k N(mu_k, s_k^2 I) then x_t | k ~ N(sqrt(a) mu_k, (a s_k^2 + 1 - a) I) with
a = alphabar_t, so the score is known in closed form and eps(x_t, t) = -sqrt(1 - a) * score.
Used by the sampler tests (samples must reproduce weights, means, variances) and the theory lab.
"""
from __future__ import annotations

import torch

from .schedules import NoiseSchedule


class GaussianMixtureEps(torch.nn.Module):
    """Callable ``eps = model(x, t)`` (optionally ``model(x, t, y)`` for a class-conditional score).

    means [K, d], stds [K] (isotropic per component), weights [K] (normalised here).
    x may be [n, d] or [n, *shape] with prod(shape) = d.
    """

    def __init__(self, means, stds, weights, schedule: NoiseSchedule):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(means.shape)}")
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        weights = torch.as_tensor(weights, dtype=torch.float64).expand(K).clone()
        if (stds <= 0).any() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("stds must be > 0 and weights >= 0 with a positive sum")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        xf = x.reshape(shape[0], -1).to(torch.float64)
        d = xf.shape[1]
        if d != self.means.shape[1]:
            raise ValueError(f"x has {d} features per sample, the mixture has {self.means.shape[1]}")
        a = self.alphas_cumprod.to(xf.device)[t.to(xf.device).long()].view(-1, 1, 1)  # [n,1,1]
        mu = a.sqrt() * self.means.unsqueeze(0)                                        # [n,K,d]
        var = a * self.stds.view(1, -1, 1) ** 2 + (1 - a)                              # [n,K,1]
        diff = xf.unsqueeze(1) - mu                                                    # [n,K,d]
        logp = (-0.5 * (diff ** 2).sum(-1) / var.squeeze(-1)
                - 0.5 * d * torch.log(var.squeeze(-1)) + torch.log(self.weights.clamp_min(1e-300)))
        if y is not None:  # class-conditional: only component y contributes
            mask = torch.full_like(logp, float("-inf"))
            mask.scatter_(1, y.to(xf.device).long().view(-1, 1), 0.0)
            logp = logp + mask
        r = torch.softmax(logp, dim=1).unsqueeze(-1)                                   # [n,K,1]
        score = -(r * diff / var).sum(1)                                               # [n,d]
        eps = -(1 - a.view(-1, 1)).sqrt() * score
        return eps.to(dtype).reshape(shape)
