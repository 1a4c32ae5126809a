"""Selection of informative synthetic images (METHOD.md §12, the paper's ablation).

Each criterion is a per-image score computed with a classifier, and :func:`select` keeps the
top-k by that score. The paper ("four proposed selection criteria for choosing more informative
data", Table "Ablation Study") names the criteria but the extracted text does not state which end
of each ranking is kept, so the direction is our documented choice (override with ``keep``):

| criterion       | score                                              | kept by default |
|-----------------|----------------------------------------------------|-----------------|
| entropy         | H(softmax(f(x)))                                   | highest (most uncertain) |
| gradnorm        | ||grad_x CE(f(x), y)||_2                           | highest (largest loss sensitivity) |
| gradnorm-rob    | ||grad_x CE(f(x_adv), y)||_2, x_adv = PGD(x)       | highest |
| separability    | top-1 minus top-2 logit (margin)                   | highest (most separable) |
| confidence      | max softmax probability (pseudo-label confidence)  | highest (DM-Improves-AT) |

Rationale: entropy and gradient norms are uncertainty / informativeness scores from active
learning, where the informative samples are the uncertain ones (high). Separability follows the
paper's theory (Lemma 3 and Figure 1: more separable synthetic classes, larger c, help), so the
most separable (largest margin) images are kept. ``keep="low"`` flips any criterion.
``confidence`` is the filter of DM-Improves-AT (Wang et al. 2023): per class, the top 20% of the
generated images by the labeller's confidence (:func:`top_k_per_class`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import attacks
from .data import as_float01

CRITERIA = ("entropy", "gradnorm", "gradnorm-rob", "separability", "confidence")
DEFAULT_KEEP = {"entropy": "high", "gradnorm": "high", "gradnorm-rob": "high", "separability": "high",
                "confidence": "high"}
_ALIASES = {"gradient-norm": "gradnorm", "grad-norm": "gradnorm", "gradient_norm": "gradnorm",
            "gradnorm_rob": "gradnorm-rob", "gradient-norm-rob": "gradnorm-rob",
            "grad-norm-rob": "gradnorm-rob", "margin": "separability"}


def _criterion(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in CRITERIA:
        raise ValueError(f"selection criterion must be one of {CRITERIA}, got {name!r}")
    return name



def _input_grad_norm(model, x, y, precision):
    x = x.detach().requires_grad_(True)
    with attacks.autocast(x.device, precision):
        logits = model(x)
    # Sum over the batch: each example's input gradient is its own CE gradient (eval-mode BN).
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return g.flatten(1).norm(dim=1)


def scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
           criterion: str = "entropy", *, batch_size: int = 256, eps: float | None = None,
           steps: int = 10, step_size: float | None = None, device=None, seed: int = 0,
           precision: str = "fp32") -> torch.Tensor:
    """Per-image score (CPU fp32 tensor [N]) of ``criterion`` for images (uint8 or float [0,1] NCHW).

    labels: the (pseudo-)labels used by the gradient criteria; the model's prediction when None.
    gradnorm-rob needs ``eps`` (the PGD radius); PGD on CE with ``steps`` steps.
    """
    crit = _criterion(criterion)
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if crit == "gradnorm-rob" and eps is None:
        raise ValueError("criterion 'gradnorm-rob' needs eps (the attack radius)")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    gen = torch.Generator(dev).manual_seed(seed)
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = as_float01(images[i:i + batch_size].to(dev))
            if crit in ("entropy", "separability", "confidence") or labels is None:
                logits = attacks.predict(model, x, precision)
            if crit == "confidence":
                s = logits.softmax(1).max(1).values
            elif crit == "entropy":
                logp = F.log_softmax(logits, 1)
                s = -(logp.exp() * logp).sum(1)
            elif crit == "separability":
                top2 = logits.topk(2, dim=1).values
                s = top2[:, 0] - top2[:, 1]
            else:
                y = labels[i:i + batch_size].to(dev) if labels is not None else logits.argmax(1)
                if crit == "gradnorm-rob":
                    x = attacks.pgd(model, x, y, eps=eps, steps=steps, step_size=step_size,
                                    generator=gen, precision=precision)
                s = _input_grad_norm(model, x, y, precision)
            out.append(s.detach().float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def top_k(score: torch.Tensor, k: int, keep: str = "high") -> torch.Tensor:
    """Indices of the k best scores ("high" = largest first, "low" = smallest first); stable ties."""
    if keep not in ("high", "low"):
        raise ValueError(f"keep must be 'high' or 'low', got {keep!r}")
    n = score.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    order = torch.argsort(score, descending=(keep == "high"), stable=True)
    return order[:k]


def top_k_per_class(score: torch.Tensor, labels: torch.Tensor, fraction: float,
                    keep: str = "high") -> torch.Tensor:
    """Indices (sorted, int64) of the best ``fraction`` of each class by ``score`` (at least one
    image of every class present, round(fraction * n_c) otherwise), as DM-Improves-AT filters."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if score.shape != labels.shape or score.ndim != 1:
        raise ValueError(f"score {tuple(score.shape)} and labels {tuple(labels.shape)} must be the same [N]")
    picked = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        k = max(1, int(round(fraction * idx.numel())))
        picked.append(idx[top_k(score[idx], k, keep)])
    return torch.sort(torch.cat(picked)).values if picked else torch.zeros(0, dtype=torch.int64)


def select(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None, criterion: str,
           k: int, *, keep: str | None = None, **kw) -> torch.Tensor:
    """Indices (int64, CPU) of the k most informative images by ``criterion`` (see module doc)."""
    crit = _criterion(criterion)
    s = scores(model, images, labels, crit, **kw)
    return top_k(s, k, keep or DEFAULT_KEEP[crit])
