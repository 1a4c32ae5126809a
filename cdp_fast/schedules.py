"""Noise schedules (betas and alphabar) for epsilon-prediction diffusion models.

``NoiseSchedule.linear`` is the DDPM/CIFAR-10 schedule of the authors (beta 1e-4 .. 0.02, T=1000);
``NoiseSchedule.cosine`` is the improved-DDPM schedule (s = 0.008) they use for MNIST/GTSRB.
Computed in float64 and stored as float64 tensors: the samplers cast per-step coefficients once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    betas: torch.Tensor  # [T] float64

    def __post_init__(self):
        b = self.betas
        if b.ndim != 1 or b.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(b.shape)}")
        if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
            raise ValueError("betas must be finite and in (0, 1)")

    # constructors -----------------------------------------------------------------------------
    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> "NoiseSchedule":
        _check_T(num_train_timesteps)
        return cls(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> "NoiseSchedule":
        """diffusers' "scaled_linear": linear in sqrt(beta)."""
        _check_T(num_train_timesteps)
        return cls(torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps,
                                  dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008,
               max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal's cosine schedule (diffusers' "squaredcos_cap_v2")."""
        _check_T(num_train_timesteps)

        def abar(t: float) -> float:
            return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
        return cls(torch.tensor(betas, dtype=torch.float64))

    @classmethod
    def from_name(cls, name: str, num_train_timesteps: int = 1000, **kw) -> "NoiseSchedule":
        makers = {"linear": cls.linear, "scaled_linear": cls.scaled_linear, "cosine": cls.cosine,
                  "squaredcos_cap_v2": cls.cosine}
        if name not in makers:
            raise ValueError(f"unknown schedule {name!r}; choose from {sorted(makers)}")
        return makers[name](num_train_timesteps, **kw)

    # derived quantities -------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alphabar_t = prod_{s<=t} (1 - beta_s), shape [T], float64."""
        return torch.cumprod(self.alphas, dim=0)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with t a LongTensor [B]."""
        ab = self.alphas_cumprod.to(device=x0.device)[t].to(x0.dtype)
        ab = ab.view(-1, *([1] * (x0.ndim - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {T!r}")
