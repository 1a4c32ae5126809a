"""L-infinity attacks: PGD on cross-entropy, CW-loss (margin) PGD, and the TRADES KL attack (METHOD.md §10).

All attacks take float images in [0, 1] (NCHW) and return adversarial images in the
eps-ball around them, clipped to [0, 1]. Gradients are taken w.r.t. the input only
(``torch.autograd.grad`` on the input: no parameter gradients are computed or accumulated), so
the attacks can run inside a training step without touching ``.grad`` of the model.

Mixed precision: ``precision`` is "fp32", "bf16" or "fp16" (autocast on the input's device).
Softmax, log-softmax, CE, KL and the margin are always computed in fp32 from the logits. The
attack loss is summed over the batch (not averaged), so per-example input gradients are not
shrunk by 1/B; with fp16 it is additionally multiplied by a constant scale (sign-invariant) so
that small gradients do not underflow to zero, which would make sign() = 0 and stall the attack.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .training import PRECISIONS, autocast  # noqa: F401  (PRECISIONS: re-exported)

# Constant loss scale for fp16 attack gradients (sign() ignores it; it only prevents underflow).
FP16_ATTACK_SCALE = 1024.0


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str):
    """Run the body with the model in eval ("eval") or its current mode ("train"/"keep"); restore after."""
    if mode not in ("eval", "train", "keep"):
        raise ValueError(f"bn mode must be 'eval', 'train' or 'keep', got {mode!r}")
    was_training = model.training
    if mode == "eval":
        model.eval()
    elif mode == "train":
        model.train()
    try:
        yield
    finally:
        model.train(was_training)


def _check(x: torch.Tensor, eps: float, steps: int):
    if not torch.is_floating_point(x):
        raise TypeError(f"attacks take float images in [0, 1], got dtype {x.dtype}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + U(-eps, eps), clipped to [0, 1]."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + (2 * noise - 1) * eps).clamp_(0, 1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Projection onto the Linf eps-ball around x intersected with [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy in fp32."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def cw_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example CW margin: max_{j != y} z_j - z_y (fp32). Positive <=> misclassified."""
    z = logits.float()
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf"))
    return other.amax(1) - z_y


LOSSES: dict[str, Callable] = {"ce": ce_loss, "cw": cw_loss}


@torch.enable_grad()  # attacks work inside no_grad (evaluation) code too
def _pgd_run(model, x, y, x_adv, *, eps, step_size, steps, loss_fn, precision, scale):
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        with autocast(x.device, precision):
            logits = model(x_adv)
        loss = loss_fn(logits, y).sum() * scale
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float | None = None,
        steps: int = 20, restarts: int = 1, loss: str = "ce", random_start: bool = True,
        init: torch.Tensor | None = None, generator: torch.Generator | None = None,
        precision: str = "fp32", bn: str = "eval") -> torch.Tensor:
    """Linf PGD maximising CE ("ce") or the CW margin ("cw"); returns the worst case over restarts.

    Each restart starts at x + U(-eps, eps) (or at ``init`` for the first restart, or at x when
    ``random_start`` is False), takes ``steps`` signed-gradient steps of size ``step_size``
    (default 2.5 * eps / steps, Madry et al.) and projects onto the eps-ball and [0, 1]. Per
    example the restart that misclassifies is kept; among equals, the one with the larger loss.
    """
    _check(x, eps, steps)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    loss_fn = LOSSES[loss]
    scale = FP16_ATTACK_SCALE if precision == "fp16" else 1.0
    x = x.detach()
    best = x.clone()
    best_fool = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
    with bn_mode(model, bn):
        for r in range(restarts):
            if r == 0 and init is not None:
                if init.shape != x.shape:
                    raise ValueError(f"init shape {tuple(init.shape)} != x shape {tuple(x.shape)}")
                x0 = project(init.to(x), x, eps)
            elif random_start:
                x0 = uniform_start(x, eps, generator)
            else:
                x0 = x.clone()
            x_adv = _pgd_run(model, x, y, x0, eps=eps, step_size=step_size, steps=steps,
                             loss_fn=loss_fn, precision=precision, scale=scale)
            if restarts == 1:
                return x_adv
            with torch.no_grad(), autocast(x.device, precision):
                logits = model(x_adv)
            fool = logits.float().argmax(1) != y
            lval = loss_fn(logits, y)
            better = (fool & ~best_fool) | ((fool == best_fool) & (lval > best_loss))
            best[better] = x_adv[better]
            best_loss = torch.where(better, lval, best_loss)
            best_fool |= fool
    return best


def cw_pgd(model, x, y, **kw) -> torch.Tensor:
    """PGD on the CW margin loss (see :func:`pgd`)."""
    return pgd(model, x, y, loss="cw", **kw)


def kl_div(logits_adv: torch.Tensor, log_p_nat: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """KL(p_nat || p_adv) in fp32, summed over classes; "sum" / "mean" (over the batch) / "none"."""
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    kl = (log_p_nat.exp() * (log_p_nat - log_p_adv)).sum(1)
    if reduction == "none":
        return kl
    return kl.sum() if reduction == "sum" else kl.mean()


def trades_attack(model: nn.Module, x: torch.Tensor, *, eps: float, step_size: float, steps: int,
                  init: str = "uniform", generator: torch.Generator | None = None,
                  precision: str = "fp32", bn: str = "eval",
                  log_p_nat: torch.Tensor | None = None) -> torch.Tensor:
    """TRADES inner maximisation (METHOD.md §10): signed-gradient ascent of KL(p(x) || p(x_adv)).

    init: "uniform" (x + U(-eps, eps)) or "normal" (x + 0.001 * N(0, 1), the original TRADES).
    p(x) is computed once (under ``bn`` mode, no grad) unless ``log_p_nat`` is given.
    bn: "eval" (default, as the original TRADES code) or "train"/"keep" (current mode).
    """
    _check(x, eps, steps)
    if init not in ("uniform", "normal"):
        raise ValueError(f"init must be 'uniform' or 'normal', got {init!r}")
    x = x.detach()
    scale = FP16_ATTACK_SCALE if precision == "fp16" else 1.0
    with bn_mode(model, bn):
        if log_p_nat is None:
            with torch.no_grad(), autocast(x.device, precision):
                logits_nat = model(x)
            log_p_nat = F.log_softmax(logits_nat.float(), dim=1)
        log_p_nat = log_p_nat.detach().float()
        if init == "uniform":
            x_adv = uniform_start(x, eps, generator)
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_adv = project(x + 0.001 * noise, x, eps)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                with autocast(x.device, precision):
                    logits = model(x_adv)
                loss = kl_div(logits, log_p_nat, "sum") * scale
                (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = project(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    with autocast(x.device, precision):
        return model(x).float()
