"""A faithful re-implementation of the authors' Contrastive-DP sampling loop: the baseline of
``sample_guided`` / ``sample_unguided``.

What makes it the authors' loop (METHOD.md §5, as their code does it), and therefore slow:
- fp32 everywhere, eager PyTorch, one Python-level DDIM step per timestep;
- at a guided step f (the feature network) runs forward on BOTH states, x_t and the previous
  x_{t+1} (no feature cache), through the embedding head;
- f's parameters keep ``requires_grad=True``: ``loss.backward()`` computes weight gradients of f
  and of the head as well as the gradient w.r.t. x_t (f's are then zeroed, the head takes one Adam
  step, lr 1e-2, after the x gradient was read);
- the HNM loss is the dense 2B x 2B formula of Robinson et al.'s code (exp of the full similarity
  matrix, masked_select of the negatives), with the clamps of METHOD.md §6;
- the state is copied to the host after every step (their loop keeps the trajectory as numpy);
- the batch is the authors' 512 (= the contrastive group); a larger batch is several such runs.

Nothing here is used by the engine; it exists so the speed-up is measured against the real thing
(and tests/test_guidance.py checks the engine's gradient against ``authors_loop``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

AUTHORS_BATCH = 512


class AuthorsHead(nn.Module):
    """Linear(640,128)-ReLU-Linear(128,128), L2-normalised output (METHOD.md §9)."""

    def __init__(self, in_dim: int = 640, hidden: int = 128, out_dim: int = 128):
        super().__init__()
        self.g = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, h):
        return F.normalize(self.g(h), dim=-1)


def get_negative_mask(batch_size: int, device) -> torch.Tensor:
    mask = torch.ones((batch_size, 2 * batch_size), dtype=torch.bool, device=device)
    for i in range(batch_size):  # as in the original code: a Python loop building the mask
        mask[i, i] = False
        mask[i, i + batch_size] = False
    return torch.cat((mask, mask), 0)


def hnm_loss_authors(out_1: torch.Tensor, out_2: torch.Tensor, *, tau_plus: float = 0.1,
                     beta: float = 1.0, temperature: float = 10.0,
                     mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Robinson et al.'s hard-negative loss as written in their code (dense, exp-space), with the
    clamps of METHOD.md §6: neg >= 1e-4 and pos / (pos + Ng) >= 1e-4."""
    batch_size = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    if mask is None:
        mask = get_negative_mask(batch_size, out.device)
    neg = neg.masked_select(mask).view(2 * batch_size, -1)
    neg = torch.clamp(neg, min=1e-4)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    N = batch_size * 2 - 2
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    Ng = (-tau_plus * N * pos + reweight_neg) / (1 - tau_plus)
    Ng = torch.clamp(Ng, min=N * math.e ** (-1 / temperature))
    return (-torch.log(torch.clamp(pos / (pos + Ng), min=1e-4))).mean()


def authors_loop(eps_model: Callable, alphas_cumprod: torch.Tensor, x_T: torch.Tensor, *, steps: int,
                 features: Callable, head: nn.Module, loss_fn: Callable, scale: float,
                 guided: Optional[Callable[[int, int], bool]], head_lr: float = 1e-2,
                 copy_to_host: bool = False) -> torch.Tensor:
    """The authors' guided DDIM loop (eta 0, uniform skip), literally; returns x0.

    At a guided step (``guided(t, i)``, never without a previous state): f and ``head`` on x_t AND
    on x_{t+1}, ``loss_fn(z_cur, z_prev)``, zero_grad, backward (weight gradients of f and of the
    head too), read x_t.grad, one Adam step of the head, then e += scale * grad and the DDIM update
    of METHOD.md §3 written out. ``head`` is trained in place (pass a copy to keep yours). The
    oracle of tests/test_guidance.py and the baseline of ``AuthorsSampler``.
    """
    abar = alphas_cumprod.double()
    T = abar.numel()
    seq = list(range(0, T, T // steps))
    seq_next = [-1] + seq[:-1]
    opt = torch.optim.Adam(head.parameters(), lr=head_lr)
    x, x_prev, n = x_T, None, x_T.shape[0]
    trajectory = []
    for i, (t, t_next) in enumerate(zip(reversed(seq), reversed(seq_next))):
        with torch.no_grad():
            e = eps_model(x, torch.full((n,), t, device=x.device, dtype=torch.long))
        if guided is not None and x_prev is not None and guided(t, i):
            x_in = x.detach().requires_grad_(True)
            z_cur = head(features((x_in + 1) / 2))
            z_prev = head(features((x_prev + 1) / 2))  # f on the previous state again
            loss = loss_fn(z_cur, z_prev)
            opt.zero_grad()
            if isinstance(features, nn.Module):
                features.zero_grad()
            loss.backward()  # weight gradients of f and of the head, and d loss / d x_t
            grad = x_in.grad.detach()
            opt.step()
            e = e + scale * grad
        a_t = float(abar[t])
        a_next = 1.0 if t_next < 0 else float(abar[t_next])
        x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        x_new = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * e
        x_prev = x
        x = x_new.detach()
        if copy_to_host:
            trajectory.append(x.cpu().numpy())  # the state goes to the host every step
    return x


class AuthorsSampler:
    """DDIM (eta = 0) with the authors' contrastive guidance, step by step in eager fp32.

    ``unet(x, t) -> eps``; ``features(x01) -> [B, F]`` (e.g. a WRN-28-10's pooled features);
    ``guided(t, i) -> bool`` decides the guided steps (authors: t >= 400, never the first step).
    """

    def __init__(self, unet: nn.Module, features: nn.Module, alphas_cumprod: torch.Tensor, *,
                 steps: int = 100, scale: float = 1e5, guided: Optional[Callable[[int, int], bool]] = None,
                 feature_dim: int = 640, head_lr: float = 1e-2, copy_to_host: bool = True):
        self.unet, self.features = unet, features
        self.abar = alphas_cumprod.double()
        self.steps = steps
        self.scale, self.guided = float(scale), guided
        self.feature_dim, self.head_lr, self.copy_to_host = feature_dim, head_lr, copy_to_host

    def sample(self, n: int, shape, *, device, seed: int = 0) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn((n,) + tuple(shape), generator=g, device=device)
        head = AuthorsHead(self.feature_dim).to(device)
        mask = get_negative_mask(n, device) if self.guided is not None else None
        return authors_loop(self.unet, self.abar, x, steps=self.steps, features=self.features, head=head,
                            loss_fn=lambda a, b: hnm_loss_authors(a, b, mask=mask), scale=self.scale,
                            guided=self.guided, head_lr=self.head_lr, copy_to_host=self.copy_to_host)
