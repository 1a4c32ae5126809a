"""AutoAttack's gradient-based attacks, in this package: APGD-CE and APGD-T (Linf).

F. Croce and M. Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020. The standard AutoAttack (Linf) runs APGD-CE, APGD-T (the
targeted DLR loss, 9 target classes), FAB-T and Square one after the other, each on the points
the previous ones did not break. This module implements the first two, so its result is named
``NAME`` ("AutoAttack (APGD-CE + APGD-T subset)"): its robust accuracy is an upper bound of the
full ensemble's (FAB-T and Square can only break more points). No third-party attack package is
needed, so evaluating never installs or replaces the user's PyTorch.

APGD (Algorithm 1 of the paper) per example: random start in the eps-ball, step size 2 eps, a
momentum step ``x_{k+1} = P(x_k + 0.75 (z_{k+1} - x_k) + 0.25 (x_k - x_{k-1}))`` with
``z_{k+1} = P(x_k + eta sign(grad))``, and at checkpoints (first after 22% of the iterations, then
every max(prev - 3%, 6%)) the step size is halved and the iterate reset to the best point when the
loss rose in at most 75% of the steps since the last checkpoint, or when neither the step size
nor the best loss changed. The checkpoint rule and the DLR losses follow the authors' reference
code; inputs are float images in [0, 1] and every iterate stays in the eps-ball and in [0, 1].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .attacks import FP16_ATTACK_SCALE, autocast, bn_mode, ce_loss, predict, project
from .utils import progress

NAME = "AutoAttack (APGD-CE + APGD-T subset)"
COMPONENTS = ("apgd-ce", "apgd-t")
NOT_RUN = ("fab-t", "square")  # the rest of standard AutoAttack


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (untargeted): -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3)."""
    z = logits.float()
    zs, idx = z.sort(dim=1)
    top_is_y = (idx[:, -1] == y).float()
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = zs[:, -2] * top_is_y + zs[:, -1] * (1.0 - top_is_y)
    return -(z_y - other) / (zs[:, -1] - zs[:, -3] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (needs >= 4 classes)."""
    z = logits.float()
    zs = z.sort(dim=1).values
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)


def _oscillation(loss_steps: torch.Tensor, j: int, k: int, rho: float) -> torch.Tensor:
    """True where the loss rose in at most rho * k of the last k steps (the authors' check,
    including its look at row j - k, which is the last row at the first checkpoint)."""
    t = torch.zeros_like(loss_steps[0])
    for c in range(k):
        t += (loss_steps[j - c] > loss_steps[j - c - 1]).float()
    return t <= k * rho


@torch.enable_grad()
def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, *, eps: float,
         n_iter: int = 100, rho: float = 0.75, generator: torch.Generator | None = None,
         precision: str = "fp32", on_step: Callable[[], None] | None = None):
    """One APGD run maximising ``loss_fn(logits, y)`` (per example) in the Linf eps-ball.

    Returns (fooled, x_adv): ``fooled`` marks examples misclassified at some iterate;
    ``x_adv`` holds that iterate for them (and the random start for the others).
    """
    if n_iter < 1:
        raise ValueError(f"APGD needs n_iter >= 1, got {n_iter}")
    x = x.detach()
    scale = FP16_ATTACK_SCALE if precision == "fp16" else 1.0
    n_iter_2, n_iter_min, size_decr = (max(int(f * n_iter), 1) for f in (0.22, 0.06, 0.03))
    view = (-1,) + (1,) * (x.dim() - 1)

    def loss_grad(xa):
        xa = xa.detach().requires_grad_(True)
        with autocast(x.device, precision):
            logits = model(xa)
        loss = loss_fn(logits.float(), y)
        (g,) = torch.autograd.grad(loss.sum() * scale, xa)
        return loss.detach(), g.detach(), logits.detach().float()

    t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
    x_adv = (x + eps * t / (t.abs().flatten(1).amax(1).view(view) + 1e-12)).clamp(0, 1)
    loss, grad, logits = loss_grad(x_adv)
    fooled = logits.argmax(1) != y
    x_fool = x_adv.clone()
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    step = torch.full((x.shape[0],) + (1,) * (x.dim() - 1), 2.0 * eps, device=x.device, dtype=x.dtype)
    x_prev = x_adv.clone()
    loss_steps = torch.zeros((n_iter, x.shape[0]), device=x.device)
    loss_best_last = loss_best.clone()
    reduced_last = torch.ones_like(fooled)
    k, counter = n_iter_2, 0
    for i in range(n_iter):
        with torch.no_grad():
            momentum = x_adv - x_prev
            x_prev = x_adv
            a = 0.75 if i > 0 else 1.0
            z = project(x_adv + step * grad.sign(), x, eps)
            x_adv = project(x_adv + (z - x_adv) * a + momentum * (1 - a), x, eps)
        loss, grad, logits = loss_grad(x_adv)
        wrong = logits.argmax(1) != y
        x_fool[wrong] = x_adv[wrong]
        fooled |= wrong
        loss_steps[i] = loss
        better = loss > loss_best
        x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss[better]
        counter += 1
        if counter == k:
            reduce = _oscillation(loss_steps, i, k, rho) | (~reduced_last & (loss_best_last >= loss_best))
            reduced_last, loss_best_last = reduce, loss_best.clone()
            step[reduce] /= 2.0
            x_adv = x_adv.clone()
            x_adv[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
            k, counter = max(k - size_decr, n_iter_min), 0
        if on_step is not None:
            on_step()
    return fooled, x_fool


def settings(*, eps: float, n_iter: int, n_targets: int, restarts: int, rho: float = 0.75) -> dict:
    """The attack's own settings, for result files."""
    return {"attack_name": NAME, "components": list(COMPONENTS), "not_run": list(NOT_RUN),
            "norm": "Linf", "eps": float(eps), "n_iter": int(n_iter), "n_target_classes": int(n_targets),
            "restarts": int(restarts), "rho": rho, "losses": {"apgd-ce": "ce", "apgd-t": "dlr-targeted"},
            "reference": "Croce & Hein, ICML 2020"}


def target_count(n_targets: int, num_classes: int) -> int:
    """APGD-T target classes actually used: at most num_classes - 1."""
    return max(0, min(int(n_targets), num_classes - 1))


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, n_iter: int = 100,
               n_targets: int = 9, restarts: int = 1, rho: float = 0.75,
               generator: torch.Generator | None = None, precision: str = "fp32",
               show_progress: bool = True) -> torch.Tensor:
    """Adversarial examples for (x, y): APGD-CE, then APGD-T per target class, each run only on
    the points still classified correctly (as AutoAttack does). x: float [0, 1] NCHW."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    with bn_mode(model, "eval"):
        x = x.detach()
        x_adv = x.clone()
        logits = predict(model, x, precision)
        if logits.shape[1] < 4:
            raise ValueError(f"APGD-T's targeted DLR loss needs >= 4 classes, the model has {logits.shape[1]}")
        robust = logits.argmax(1) == y
        runs = [("apgd-ce", None)] * restarts + [
            ("apgd-t", t) for t in range(2, target_count(n_targets, logits.shape[1]) + 2) for _ in range(restarts)]
        bar = progress(total=len(runs) * n_iter, desc="autoattack", unit="it", leave=False,
                       disable=None if show_progress else True)
        try:
            for name, t in runs:
                idx = robust.nonzero().squeeze(1)
                bar.set_postfix(attack=name if t is None else f"{name} target {t - 1}", robust=idx.numel())
                if idx.numel() == 0:
                    bar.update(n_iter)
                    continue
                xs, ys = x[idx], y[idx]
                if t is None:
                    loss_fn = ce_loss
                else:  # the t-th most likely class on the clean input
                    target = predict(model, xs, precision).sort(dim=1).indices[:, -t]
                    loss_fn = lambda z, yy, target=target: dlr_targeted_loss(z, yy, target)  # noqa: E731
                fooled, adv = apgd(model, xs, ys, loss_fn, eps=eps, n_iter=n_iter, rho=rho,
                                   generator=generator, precision=precision, on_step=lambda: bar.update(1))
                x_adv[idx[fooled]] = adv[fooled]
                robust[idx[fooled]] = False
        finally:
            bar.close()
    return x_adv
