"""The contract between continuous-sigma samplers and the networks they drive (issue 20).

EDM (Karras et al. 2022) writes every diffusion model as a denoiser D(x; sigma) of a noisy image
x = y + sigma * n (y a clean image in [-1, 1]); its samplers (Euler, Heun, the stochastic sampler)
and DPM-Solver++ step through sigma with that D. Two kinds of model satisfy this contract:

* EDM's own preconditioned networks (``cdp_fast.models.edm``: ``EDMPrecond`` / ``VPPrecond`` /
  ``VEPrecond`` around ``SongUNet`` or ``DhariwalUNet``), which compute D directly;
* the engine's epsilon-prediction (DDPM-type, discrete t) networks, through an adapter in
  ``cdp_fast.solvers`` that maps sigma to the network's timestep (METHOD.md, "Samplers").

``class_labels`` follows EDM: one-hot float rows [N, label_dim], or None for an unconditional
model (``label_dim == 0``).
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch

__all__ = ["Denoiser"]


@runtime_checkable
class Denoiser(Protocol):
    """D(x; sigma): the clean-image estimate of x at noise level sigma (EDM's ``forward``)."""

    sigma_min: float      # smallest sigma the network supports (EDM: 0.002, or the model's own)
    sigma_max: float      # largest sigma the network supports (EDM: 80, or the model's own)
    label_dim: int        # 0: unconditional; else the number of classes (one-hot labels)
    img_resolution: int
    img_channels: int

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The nearest sigma the network supports (identity for continuous-sigma models)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """D(x; sigma), x's shape; sigma a scalar tensor or [N] (broadcast over C, H, W)."""
