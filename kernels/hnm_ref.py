"""Pure-PyTorch reference of the hard-negative-mining (HNM) contrastive loss, METHOD.md §6.

This is the oracle the fused Triton kernel (``hnm.py``) is tested against. It builds the dense
2B x (2B + M) similarity matrix, so it is for tests, benchmarks and CPU work, not for large N.

    Z = [A; P] (2B rows), s_rc = z_r . z_c / T, columns = [Z; bank]
    neg_rc   = max(exp(s_rc), 1e-4)     for the negative columns c of row r (N_r of them)
    pos_r    = exp(a_j . p_j / T),  j = r mod B
    hard:    reweight_r = N_r * sum_c neg_rc^(1+beta) / sum_c neg_rc^beta
             Ng_r = max((-tau_plus * N_r * pos_r + reweight_r) / (1 - tau_plus), N_r * exp(-1/T))
    easy:    Ng_r = sum_c neg_rc
    loss     = mean_r -log(max(pos_r / (pos_r + Ng_r), 1e-4))

The sums of powers are taken in log space (max(exp(s), 1e-4)^k = exp(k * max(s, ln 1e-4)), a
row-wise log-sum-exp) and -log max(pos/(pos+Ng), 1e-4) as min(softplus(log Ng - s_pos), -ln 1e-4):
the same function with the same (zero where clamped) gradient, without overflow at small
temperatures or fp32 cancellation when Ng << pos.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import check_embedding_pair, check_extra_rows, check_temperature, launch_only
from .ddim_ref import ddim_coefficients, ddim_step_ref

NEG_CLAMP = 1e-4                      # max(exp(s), 1e-4) on every negative similarity
LOG_NEG_CLAMP = math.log(NEG_CLAMP)   # ... i.e. s' = max(s, ln 1e-4)
RATIO_CLAMP = 1e-4                    # max(pos / (pos + Ng), 1e-4) inside the log
ESTIMATORS = ("hard", "easy")

__all__ = ["hnm_loss_reference", "negative_mask", "validate_hnm_inputs", "check_negative_counts",
           "check_label_negatives", "LOG_NEG_CLAMP"]


def _capturing() -> bool:
    """Inside CUDA-graph capture the value checks (which read tensors on the host) are skipped."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_finite(**tensors) -> None:
    """NaN/inf check of several tensors with a single host sync."""
    named = [(k, t) for k, t in tensors.items() if t is not None]
    ok = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    for (name, _), good in zip(named, ok, strict=True):
        if not good:
            raise ValueError(f"{name} contains NaN or inf")


def check_negative_counts(counts: torch.Tensor, row_labels: torch.Tensor | None) -> None:
    """Raise if a row of Z = [A; P] has no negatives (possible only with conditional negatives).

    ``counts`` [2B]: negatives per row, as the forward computes them anyway (the reference's mask,
    the Triton forward kernel's count output), so the check costs one host sync and no dense
    2B x (2B + M) mask. ``row_labels`` [2B] (labels of A then P), None when unconditional.
    Skipped during CUDA-graph capture and while the AOT gate records launches (no values then).
    """
    if row_labels is None or _capturing() or launch_only():
        return
    empty = counts == 0
    if bool(empty.any()):
        r = int(torch.nonzero(empty)[0, 0])
        raise ValueError(
            f"row {r} has no negatives: every column it sees has its label "
            f"{int(row_labels[r])} (conditional negatives need a different class in its group or the bank)")


def check_label_negatives(labels: torch.Tensor, group_size: int, *, bank_labels=None, n_bank: int = 0) -> None:
    """Raise if a row would have no negatives, from the labels alone (no embeddings, no kernel).

    For callers that fix the labels for many loss calls (the sampler's guidance checks once per
    run and then calls ``hnm_loss(..., check=False)``). Row j of group g sees 2 (G - same_j)
    in-group negatives (same_j: anchors of g with j's label, itself included) plus the bank rows
    of another label (all ``n_bank`` without ``bank_labels``). O(B G + B M) work, one host sync.
    """
    B = labels.shape[0]
    lg = labels.reshape(B // group_size, group_size)
    counts = 2 * (group_size - (lg[:, :, None] == lg[:, None, :]).sum(-1).reshape(B))
    if n_bank:
        counts = counts + (n_bank if bank_labels is None else
                           n_bank - (labels[:, None] == bank_labels[None, :]).sum(1))
    check_negative_counts(torch.cat([counts, counts]), torch.cat([labels, labels]))


def validate_hnm_inputs(anchor, positive, *, temperature, tau_plus, beta, estimator, labels,
                        bank, bank_labels, group_size, check_values: bool = True) -> int:
    """Check the arguments of ``hnm_loss``; returns the group size actually used (B if None).

    Raises TypeError / ValueError naming the problem. ``check_values`` also runs the NaN/inf check
    (one host sync, skipped while a CUDA graph is being captured). Empty conditional negative sets
    are caught later, from the negative counts the forward computes (check_negative_counts).
    """
    B, d = check_embedding_pair(anchor, positive, "anchor", "positive")
    if B < 2:
        raise ValueError(f"hnm_loss needs at least 2 anchors (a row needs negatives), got B={B}")
    check_temperature(temperature)
    if isinstance(tau_plus, bool) or not isinstance(tau_plus, (int, float)) or not (0.0 <= tau_plus < 1.0):
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")

    G = B if group_size is None else group_size
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a row needs negatives), got {group_size}")
        if B % group_size != 0:
            raise ValueError(f"group_size={group_size} does not divide the batch size B={B}")

    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be an integer torch.Tensor, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != (B,):
            raise ValueError(f"labels must have shape [B]=[{B}], got {tuple(labels.shape)}")
        if labels.device != anchor.device:
            raise ValueError(f"labels are on {labels.device}, embeddings on {anchor.device}")
    if bank is not None:
        check_extra_rows(bank, anchor, d, "bank", "embeddings", " (pass bank=None for no bank)")
    if bank_labels is not None:
        if bank is None:
            raise ValueError("bank_labels given without a bank")
        if labels is None:
            raise ValueError("bank_labels given without labels (conditional bank needs both)")
        if not isinstance(bank_labels, torch.Tensor):
            raise TypeError(f"bank_labels must be an integer torch.Tensor, got {type(bank_labels).__name__}")
        if bank_labels.is_floating_point() or bank_labels.is_complex() or bank_labels.dtype == torch.bool:
            raise TypeError(f"bank_labels must be an integer tensor, got {bank_labels.dtype}")
        if bank_labels.shape != (bank.shape[0],):
            raise ValueError(f"bank_labels must have shape [M]=[{bank.shape[0]}], got {tuple(bank_labels.shape)}")
        if bank_labels.device != anchor.device:
            raise ValueError(f"bank_labels are on {bank_labels.device}, embeddings on {anchor.device}")

    if check_values and not _capturing():
        _check_finite(anchor=anchor, positive=positive, bank=bank)
    return G


def negative_mask(B: int, M: int, *, labels=None, bank_labels=None, group_size=None,
                  device=None) -> torch.Tensor:
    """Bool [2B, 2B + M]: True where column c is a negative of row r (columns = [Z; bank])."""
    n = 2 * B
    G = B if group_size is None else group_size
    r = torch.arange(n, device=device)
    partner = (r + B) % n
    zz = (r[None, :] != r[:, None]) & (r[None, :] != partner[:, None])
    grp = (r % B) // G
    zz &= grp[:, None] == grp[None, :]
    if labels is not None:
        lab = torch.cat([labels, labels])
        zz &= lab[:, None] != lab[None, :]
    zb = torch.ones(n, M, dtype=torch.bool, device=device)
    if labels is not None and bank_labels is not None:
        lab = torch.cat([labels, labels])
        zb = lab[:, None] != bank_labels[None, :]
    return torch.cat([zz, zb], dim=1)


def hnm_rows_reference(anchor, positive, *, temperature=10.0, tau_plus=0.1, beta=1.0,
                       estimator="hard", labels=None, bank=None, bank_labels=None, group_size=None,
                       check_counts: bool = False):
    """Per-row losses [2B] (in fp32, or fp64 for fp64 inputs); no argument checks, but with
    ``check_counts`` a row without negatives raises (check_negative_counts)."""
    ct = torch.float64 if anchor.dtype == torch.float64 else torch.float32
    A, P = anchor.to(ct), positive.to(ct)
    B = A.shape[0]
    T = float(temperature)
    Z = torch.cat([A, P], dim=0)
    cols = Z if bank is None else torch.cat([Z, bank.to(ct)], dim=0)
    M = 0 if bank is None else bank.shape[0]
    valid = negative_mask(B, M, labels=labels, bank_labels=bank_labels, group_size=group_size,
                          device=Z.device)
    N = valid.sum(1).to(ct)
    if check_counts:
        check_negative_counts(N, None if labels is None else torch.cat([labels, labels]))
    s = Z @ cols.t() / T
    sp = torch.clamp(s, min=LOG_NEG_CLAMP)          # log max(exp(s), 1e-4)
    neg_inf = torch.tensor(float("-inf"), dtype=ct, device=Z.device)
    pos_logit = torch.cat([(A * P).sum(-1) / T] * 2)
    pos = torch.exp(pos_logit)
    if estimator == "hard":
        lse1 = torch.logsumexp(torch.where(valid, (1.0 + beta) * sp, neg_inf), dim=1)
        lse0 = torch.logsumexp(torch.where(valid, beta * sp, neg_inf), dim=1)
        reweight = N * torch.exp(lse1 - lse0)
        Ng = (-tau_plus * N * pos + reweight) / (1.0 - tau_plus)
        Ng = torch.clamp(Ng, min=N * math.exp(-1.0 / T))
    elif estimator == "easy":
        Ng = torch.exp(torch.logsumexp(torch.where(valid, sp, neg_inf), dim=1))
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    # -log max(pos / (pos + Ng), 1e-4) = min(log(1 + Ng / pos), -ln 1e-4) = min(softplus(log Ng -
    # s_pos), -ln 1e-4): same function and clamp, but no cancellation in fp32 when Ng << pos
    return torch.clamp(F.softplus(torch.log(Ng) - pos_logit), max=-math.log(RATIO_CLAMP))


def hnm_loss_reference(anchor, positive, *, temperature=10.0, tau_plus=0.1, beta=1.0,
                       estimator="hard", labels=None, bank=None, bank_labels=None,
                       group_size=None, check: bool = True, check_counts: bool | None = None) -> torch.Tensor:
    """METHOD.md §6 HNM loss (mean over the 2B rows), differentiable w.r.t. anchor, positive, bank.

    Computed in fp32 (fp64 for fp64 inputs); the scalar is returned in the inputs' dtype for
    fp32/fp64 inputs and in fp32 for half-precision inputs. ``check``: argument checks;
    ``check_counts`` (default: ``check``): raise on a row without negatives.
    """
    if check:
        validate_hnm_inputs(anchor, positive, temperature=temperature, tau_plus=tau_plus, beta=beta,
                            estimator=estimator, labels=labels, bank=bank, bank_labels=bank_labels,
                            group_size=group_size)
    rows = hnm_rows_reference(anchor, positive, temperature=temperature, tau_plus=tau_plus,
                              beta=beta, estimator=estimator, labels=labels, bank=bank,
                              bank_labels=bank_labels, group_size=group_size,
                              check_counts=check if check_counts is None else check_counts)
    return rows.mean()


def ddim_coefficients_per_sample(a_t, a_next, eta: float, B: int, device) -> tuple[torch.Tensor, ...]:
    """Per-sample fp32 [B] DDIM coefficients (sqrt a_t, sqrt(1-a_t), sqrt a_next, c1, c2) of
    METHOD.md §3, computed in float64 by :func:`.ddim_ref.ddim_coefficients`."""
    def per_sample(v, name):
        t = torch.as_tensor(v, dtype=torch.float64, device=device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"{name} must be a float or a per-sample tensor [B]=[{B}], got shape {tuple(t.shape)}")
        return t
    if not isinstance(a_t, torch.Tensor) and not isinstance(a_next, torch.Tensor):
        # Python numbers: coefficients on the host (CPU float64), then fills (no host-to-device
        # copy, so this is safe inside CUDA-graph capture)
        vals = ddim_coefficients(float(a_t), float(a_next), eta)
        return tuple(torch.full((B,), float(v), dtype=torch.float32, device=device) for v in vals)
    out = ddim_coefficients(per_sample(a_t, "a_t"), per_sample(a_next, "a_next"), eta)
    return tuple(v.to(torch.float32) for v in out)


def hnm_pixel_grad_reference(x, positive, *, temperature=10.0, tau_plus=0.1, beta=1.0, estimator="hard",
                             labels=None, bank=None, bank_labels=None, group_size=None, check: bool = True):
    """g = d hnm_loss(x.flatten(1), positive.flatten(1)) / d x in fp32 (the guidance gradient of
    METHOD.md §7 in pixel space, features = identity), shaped [B, d]. ``check``: raise on a row
    without negatives (the argument checks are the caller's)."""
    anchor = x.detach().flatten(1).float().requires_grad_(True)
    pos = positive.detach().flatten(1).float()
    bank32 = None if bank is None else bank.detach().float()
    with torch.enable_grad():
        loss = hnm_loss_reference(anchor, pos, temperature=temperature, tau_plus=tau_plus, beta=beta,
                                  estimator=estimator, labels=labels, bank=bank32,
                                  bank_labels=bank_labels, group_size=group_size, check=False,
                                  check_counts=check)
        (g,) = torch.autograd.grad(loss, anchor)
    return g


def hnm_guided_ddim_reference(x, eps, a_t, a_next, positive, *, scale, temperature=10.0,
                              tau_plus=0.1, beta=1.0, estimator="hard", labels=None, bank=None,
                              bank_labels=None, group_size=None, eta=0.0, noise=None, clip_x0=None,
                              check: bool = True):
    """Pixel-space Contrastive-DP step: g = d hnm_loss(x.flatten(1), positive.flatten(1)) / d x,
    e = eps + scale * g, then the DDIM update of METHOD.md §3. fp32 math, result in x's dtype.
    ``check``: raise on a row without negatives (the argument checks are the caller's)."""
    B = x.shape[0]
    g = hnm_pixel_grad_reference(x, positive, temperature=temperature, tau_plus=tau_plus, beta=beta,
                                 estimator=estimator, labels=labels, bank=bank, bank_labels=bank_labels,
                                 group_size=group_size, check=check)
    coefficients = ddim_coefficients_per_sample(a_t, a_next, eta, B, x.device)
    view = (B,) + (1,) * (x.dim() - 1)
    coefficients = tuple(v.view(view) for v in coefficients)
    e = eps.detach().float() + scale * g.view(x.shape)
    out, _ = ddim_step_ref(x.detach().float(), e, coefficients, clip_x0=clip_x0,
                           noise=None if noise is None else noise.detach().float())
    return out.to(x.dtype)


def _affine_coefficient(c, B: int, x: torch.Tensor):
    """A coefficient of the affine step as fp32, broadcastable against x: a Python number, or a
    0-d / one-element / per-sample [B] tensor."""
    if not isinstance(c, torch.Tensor):
        return float(c)
    t = c.detach().to(device=x.device, dtype=torch.float32).reshape(-1)
    return t.expand(B).reshape((B,) + (1,) * (x.dim() - 1))


def hnm_guided_affine_reference(x, eps, positive, *, c_x, c_e, h=None, c_h=0.0, scale, temperature=10.0,
                                tau_plus=0.1, beta=1.0, estimator="hard", labels=None, bank=None,
                                bank_labels=None, group_size=None, write_eps: bool = False,
                                check: bool = True):
    """The guided affine solver step (METHOD.md §7): g = d hnm_loss(x.flatten(1),
    positive.flatten(1)) / d x, e = eps + scale * g, out = c_x x + c_e e + c_h h (the h term only
    when h is given). fp32 math; out (and e, with ``write_eps``: returns (out, e)) in x's dtype.
    ``check``: raise on a row without negatives (the argument checks are the caller's)."""
    B = x.shape[0]
    g = hnm_pixel_grad_reference(x, positive, temperature=temperature, tau_plus=tau_plus, beta=beta,
                                 estimator=estimator, labels=labels, bank=bank, bank_labels=bank_labels,
                                 group_size=group_size, check=check)
    e = eps.detach().float() + scale * g.view(x.shape)
    out = _affine_coefficient(c_x, B, x) * x.detach().float() + _affine_coefficient(c_e, B, x) * e
    if h is not None:
        out = out + _affine_coefficient(c_h, B, x) * h.detach().float()
    if write_eps:
        return out.to(x.dtype), e.to(x.dtype)
    return out.to(x.dtype)
