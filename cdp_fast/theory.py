"""The paper's Gaussian model (METHOD.md §11; Ouyang et al. Eq. 6, Lemma 3, Theorem), runnable: closed-form errors, Lemma 3 by Monte Carlo, the
Theorem's sample-size bound.

Model: y = +-1 uniformly, x | y ~ N(y mu, sigma^2 I_d); a linear classifier predicts sign(theta.x).

    err_standard(theta) = Phi(-mu.theta / (sigma ||theta||_2))
    err_robust(theta)   = Phi((eps ||theta||_1 - mu.theta) / (sigma ||theta||_2))      (Linf ball)

(the worst Linf perturbation of a linear classifier moves y theta.x by -eps ||theta||_1, so the
robust error is the standard error with the margin shrunk by that much: exact, no attack needed).

Lemma 3: n real points give theta_int = mean(y_i x_i); synthetic x~ ~ 0.5 N(mu~, s~^2 I) +
0.5 N(-mu~, s~^2 I) are pseudo-labelled y~ = sign(theta_int.x~) and theta_final = mean(y~ x~).
``lemma3_experiment`` estimates E[err(theta_final)] for several mu~ / s~ by Monte Carlo; by
default it draws only the sufficient statistics (see ``_theta_final_fast``), which are exact in
distribution and make 10^5-10^6 synthetic points per trial cheap.

Every function accepts numpy arrays or torch tensors; errors come back as the type of ``theta``.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "standard_error", "robust_error", "theta_intermediate", "pseudo_label", "theta_final",
    "lemma3_means", "lemma3_experiment", "theorem_sample_bound", "theorem_preconditions",
    "theorem_mu", "theorem_sigma",
]


# ----------------------------------------------------------------------------------------------
# helpers
def _t64(a, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    elif isinstance(a, (np.ndarray, list, tuple, float, int, np.floating, np.integer)):
        t = torch.as_tensor(np.asarray(a, dtype=np.float64))
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(a).__name__}")
    if t.is_complex():
        raise TypeError(f"{name} must be real, got {t.dtype}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _positive_scalar(v, name: str, allow_zero: bool = False) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(v.shape)}")
        v = v.item()
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}") from None
    if not math.isfinite(f) or f < 0 or (f == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return f


def _like(out: torch.Tensor, ref):
    """Return ``out`` as the array type of ``ref`` (numpy -> float64 ndarray / scalar)."""
    if isinstance(ref, torch.Tensor):
        dt = ref.dtype if ref.is_floating_point() else torch.float64
        return out.to(device=ref.device, dtype=dt)
    arr = out.numpy()
    return arr[()] if arr.ndim == 0 else arr


def _check_theta_mu(theta: torch.Tensor, mu: torch.Tensor) -> None:
    if mu.ndim != 1 or mu.numel() < 1:
        raise ValueError(f"mu must be a 1-D vector [d], got shape {tuple(mu.shape)}")
    if theta.ndim < 1 or theta.shape[-1] != mu.shape[0]:
        raise ValueError(f"theta must be [..., d] with d = len(mu) = {mu.shape[0]}, got shape {tuple(theta.shape)}")


def _error_from_margin(num: torch.Tensor, theta: torch.Tensor, sigma: float) -> torch.Tensor:
    nrm = theta.norm(dim=-1)
    z = num / (sigma * nrm.clamp_min(1e-300))
    err = torch.special.ndtr(z)
    # theta = 0 predicts one class everywhere (sign(0) = +1): error 1/2, robust or not.
    return torch.where(nrm > 0, err, torch.full_like(err, 0.5))


# ----------------------------------------------------------------------------------------------
# closed forms
def standard_error(theta, mu, sigma):
    """P(sign(theta.x) != y) = Phi(-mu.theta / (sigma ||theta||_2)); theta [d] or [k, d] (rows)."""
    th, m = _t64(theta, "theta"), _t64(mu, "mu")
    _check_theta_mu(th, m)
    m = m.to(th.device)
    s = _positive_scalar(sigma, "sigma")
    out = _error_from_margin(-(th @ m), th, s)
    return _like(out, theta)


def robust_error(theta, mu, sigma, eps):
    """Linf robust error Phi((eps ||theta||_1 - mu.theta) / (sigma ||theta||_2)); theta [d] / [k, d]."""
    th, m = _t64(theta, "theta"), _t64(mu, "mu")
    _check_theta_mu(th, m)
    m = m.to(th.device)
    s = _positive_scalar(sigma, "sigma")
    e = _positive_scalar(eps, "eps", allow_zero=True)
    out = _error_from_margin(e * th.abs().sum(-1) - th @ m, th, s)
    return _like(out, theta)


# ----------------------------------------------------------------------------------------------
# the estimators of Lemma 3 (batched over leading dims)
def _labels_pm1(y, name: str) -> torch.Tensor:
    t = _t64(y, name)
    if not bool(((t == 1) | (t == -1)).all()):
        raise ValueError(f"{name} must contain only +1 / -1 labels")
    return t


def theta_intermediate(x, y):
    """theta = mean_i(y_i x_i): x [..., n, d], y [..., n] in {-1, +1}; returns [..., d]."""
    xt, yt = _t64(x, "x"), _labels_pm1(y, "y")
    if xt.ndim < 2 or yt.shape != xt.shape[:-1]:
        raise ValueError(f"x must be [..., n, d] and y [..., n]; got {tuple(xt.shape)} and {tuple(yt.shape)}")
    if xt.shape[-2] < 1:
        raise ValueError("need at least one sample")
    return _like((yt.unsqueeze(-1) * xt).mean(-2), x)


def pseudo_label(theta, x):
    """y~ = sign(theta.x) with sign(0) = +1: theta [..., d], x [..., n, d] -> [..., n] (+-1)."""
    th, xt = _t64(theta, "theta"), _t64(x, "x")
    if xt.ndim < 2 or th.shape[-1] != xt.shape[-1]:
        raise ValueError(f"theta [..., d] and x [..., n, d] disagree: {tuple(th.shape)} vs {tuple(xt.shape)}")
    s = (xt @ th.unsqueeze(-1)).squeeze(-1)
    return _like(torch.where(s >= 0, 1.0, -1.0).to(torch.float64), x)


def theta_final(x_syn, theta_int):
    """theta_final = mean(y~ x~) with y~ = pseudo_label(theta_int, x~) (Lemma 3)."""
    return theta_intermediate(x_syn, pseudo_label(theta_int, x_syn))


# ----------------------------------------------------------------------------------------------
# Lemma 3 Monte Carlo
def lemma3_means(mu, eps: float, cs: Sequence[float] = (0.25, 0.5, 1.0, 2.0), seed: int = 0, *,
                 match_norm: bool = True) -> dict[str, np.ndarray]:
    """The synthetic means of Lemma 3: c*mu, c*(mu - eps*1) for each c, and one vector orthogonal
    to mu and one orthogonal to mu - eps*1 (each with the norm of mu).

    ``match_norm``: rescale mu - eps*1 to the norm of mu first, so c*mu and c*(mu - eps*1) differ
    only in direction (the Lemma's claim is about the direction; without it the shorter
    mu - eps*1 also has a lower signal-to-noise ratio at the same c)."""
    m = _t64(mu, "mu").numpy()
    if m.ndim != 1 or m.size < 2:
        raise ValueError(f"mu must be a 1-D vector with d >= 2 (orthogonal means need room), got shape {m.shape}")
    e = _positive_scalar(eps, "eps", allow_zero=True)
    rob = m - e
    nrob = np.linalg.norm(rob)
    rob_dir = rob * (np.linalg.norm(m) / nrob) if match_norm and nrob > 0 else rob
    out: dict[str, np.ndarray] = {}
    for c in cs:
        out[f"c*mu (c={c:g})"] = float(c) * m
    for c in cs:
        out[f"c*(mu-eps) (c={c:g})"] = float(c) * rob_dir
    rng = np.random.default_rng(seed)
    for name, ref in (("orthogonal to mu", m), ("orthogonal to mu-eps", rob)):
        v = rng.standard_normal(m.size)
        nr = np.linalg.norm(ref)
        if nr > 0:
            v -= (v @ ref) / nr**2 * ref
        out[name] = v / np.linalg.norm(v) * np.linalg.norm(m)
    return out


def _theta_final_fast(theta_int: torch.Tensor, mu_syn: torch.Tensor, s_syn: float, n_syn: int,
                      gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-in-distribution theta_final from sufficient statistics; theta_int [k, d].

    x~_i = s_i mu~ + s~ z_i. With u = theta_int/||theta_int||, h_i = u.z_i ~ N(0, 1) and the part
    of z_i orthogonal to u is independent of the pseudo-label y~_i = sign(s_i a + s~||theta|| h_i)
    (a = theta_int.mu~), so sum_i y~_i z_i = u sum_i y~_i h_i + P_perp w with w ~ N(0, n~ I).
    Writing h'_i = s_i h_i (again N(0,1), independent of s_i): y~_i s_i = sign(a + b h'_i) and
    y~_i h_i = sign(a + b h'_i) h'_i, b = s~||theta_int||. Only n~ scalars per trial are drawn.
    Returns (theta_final [k, d], pseudo-label accuracy [k]).
    """
    k, d = theta_int.shape
    nrm = theta_int.norm(dim=1, keepdim=True).clamp_min(1e-300)
    u = theta_int / nrm
    a = theta_int @ mu_syn                                    # [k]
    b = s_syn * nrm.squeeze(1)                                # [k]
    h = torch.randn(k, n_syn, generator=gen, dtype=torch.float64)
    agree = torch.where(a[:, None] + b[:, None] * h >= 0, 1.0, -1.0)   # y~_i s_i
    sum_ys = agree.sum(1)                                     # sum y~_i s_i
    sum_yh = (agree * h).sum(1)                               # sum y~_i h_i
    w = torch.randn(k, d, generator=gen, dtype=torch.float64) * math.sqrt(n_syn)
    w_perp = w - (w * u).sum(1, keepdim=True) * u
    total = sum_ys[:, None] * mu_syn[None, :] + s_syn * (sum_yh[:, None] * u + w_perp)
    acc = (agree > 0).to(torch.float64).mean(1)  # fraction with y~ = true component sign
    return total / n_syn, acc


def _theta_final_direct(theta_int: torch.Tensor, mu_syn: torch.Tensor, s_syn: float, n_syn: int,
                        gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The literal procedure (materialises every synthetic point): the oracle for the fast path."""
    k, d = theta_int.shape
    s = torch.where(torch.rand(k, n_syn, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    x = s[..., None] * mu_syn + s_syn * torch.randn(k, n_syn, d, generator=gen, dtype=torch.float64)
    y = pseudo_label(theta_int, x)
    return theta_intermediate(x, y), (y == s).to(torch.float64).mean(1)


def lemma3_experiment(d: int, n: int, n_syn: int, mu, sigma: float, eps: float,
                      synthetic_means: Mapping[str, object], synthetic_stds: Sequence[float],
                      trials: int = 200, seed: int = 0, *, method: str = "fast",
                      chunk_elems: int = 4_000_000, progress=None) -> dict:
    """Monte-Carlo E[err(theta_final)] for every (synthetic mean, synthetic std) pair.

    Each trial draws n real points (theta_int), then n_syn pseudo-labelled synthetic points.
    The same theta_int draws are shared by every cell (common random numbers: differences between
    cells are less noisy). Returns {"rows": [...], "theta_int": {...}, "optimal": {...}, "settings"}.
    Each row: name, std, standard_error(+_se), robust_error(+_se), pseudo_label_acc, |mu~|,
    cos(mu~, mu), cos(mu~, mu - eps).
    ``method``: "fast" (sufficient statistics, exact in distribution) or "direct" (literal).
    ``progress``: optional callable(iterable, total=..., desc=...) wrapping the cell loop.
    """
    for name, v in (("d", d), ("n", n), ("n_syn", n_syn), ("trials", trials)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if method not in ("fast", "direct"):
        raise ValueError(f"method must be 'fast' or 'direct', got {method!r}")
    m = _t64(mu, "mu")
    if m.shape != (d,):
        raise ValueError(f"mu must have shape [d]=[{d}], got {tuple(m.shape)}")
    sig = _positive_scalar(sigma, "sigma")
    e = _positive_scalar(eps, "eps", allow_zero=True)
    stds = [_positive_scalar(s, "synthetic std") for s in synthetic_stds]
    if not stds:
        raise ValueError("synthetic_stds is empty")
    if not synthetic_means:
        raise ValueError("synthetic_means is empty")
    means = {}
    for k_, v in synthetic_means.items():
        t = _t64(v, f"synthetic mean {k_!r}")
        if t.shape != (d,):
            raise ValueError(f"synthetic mean {k_!r} must have shape [{d}], got {tuple(t.shape)}")
        means[str(k_)] = t

    gen = torch.Generator().manual_seed(int(seed))
    # theta_int = mean(y_i x_i) = mu + sigma/sqrt(n) g exactly in distribution (y_i z_i ~ N(0, I)).
    theta_int = m + sig / math.sqrt(n) * torch.randn(trials, d, generator=gen, dtype=torch.float64)
    rob_dir = m - e
    per_elem = n_syn * (d if method == "direct" else 1) + d
    chunk = max(1, min(trials, chunk_elems // max(per_elem, 1)))
    impl = _theta_final_fast if method == "fast" else _theta_final_direct

    cells = [(name, s) for name in means for s in stds]
    it = cells if progress is None else progress(cells, total=len(cells), desc="lemma 3")
    rows = []
    for name, s in it:
        mu_syn = means[name]
        std_err, rob_err, acc = [], [], []
        for lo in range(0, trials, chunk):
            th, a = impl(theta_int[lo:lo + chunk], mu_syn, s, n_syn, gen)
            std_err.append(standard_error(th, m, sig))
            rob_err.append(robust_error(th, m, sig, e))
            acc.append(a)
        se_, re_, ac_ = torch.cat(std_err), torch.cat(rob_err), torch.cat(acc)
        nmu = float(mu_syn.norm())
        rows.append({
            "name": name, "std": s,
            "standard_error": float(se_.mean()), "standard_error_se": _sem(se_),
            "robust_error": float(re_.mean()), "robust_error_se": _sem(re_),
            "pseudo_label_acc": float(ac_.mean()),
            "norm_mu_syn": nmu,
            "cos_mu": _cos(mu_syn, m), "cos_mu_minus_eps": _cos(mu_syn, rob_dir),
        })
    return {
        "rows": rows,
        "theta_int": {"standard_error": float(standard_error(theta_int, m, sig).mean()),
                      "robust_error": float(robust_error(theta_int, m, sig, e).mean())},
        "optimal": {"standard_error_theta_mu": float(standard_error(m, m, sig)),
                    "robust_error_theta_mu": float(robust_error(m, m, sig, e)),
                    "robust_error_theta_mu_minus_eps": float(robust_error(rob_dir, m, sig, e))},
        "settings": {"d": d, "n": n, "n_syn": n_syn, "sigma": sig, "eps": e, "trials": trials,
                     "seed": int(seed), "method": method, "norm_mu": float(m.norm())},
    }


def _sem(v: torch.Tensor) -> float:
    return float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# the Theorem
def theorem_sample_bound(n: int, d: int, eps: float, c: float = 1.0) -> float:
    """The Theorem's synthetic sample size, as METHOD.md §11 states it: 288 n / (c eps^2) * sqrt(d / n).

    (The extracted paper text is garbled here; Carmon et al. 2019's analogous bound has eps^2 in
    the numerator, 288 n eps^2 sqrt(d/n). We follow the project's reading; ``simulate`` reports both.)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be a positive int, got {d!r}")
    e = _positive_scalar(eps, "eps")
    cc = _positive_scalar(c, "c")
    return 288.0 * n / (cc * e * e) * math.sqrt(d / n)


def theorem_sigma(n: int, d: int) -> float:
    """sigma = (n d)^(1/4), the Theorem's noise level."""
    return float(n * d) ** 0.25


def theorem_mu(d: int) -> np.ndarray:
    """A mean with ||mu||^2 = d (the all-ones vector; every entry exceeds any eps < 1/2)."""
    return np.ones(int(d))


def theorem_preconditions(n: int, d: int, eps: float, sigma: float, mu) -> dict:
    """Which of the Theorem's assumptions hold. The universal constant C of eps^2 sqrt(d/n) >= C
    is not given, so its left side is reported as a number, not checked."""
    m = _t64(mu, "mu")
    norm2 = float(m @ m)
    target_sigma = theorem_sigma(n, d)
    return {
        "eps_lt_half": bool(eps < 0.5),
        "sigma_eq_(nd)^(1/4)": bool(math.isclose(sigma, target_sigma, rel_tol=1e-9)),
        "norm_mu_sq_eq_d": bool(math.isclose(norm2, d, rel_tol=1e-9)),
        "eps2_sqrt_d_over_n": eps * eps * math.sqrt(d / n),
        "sigma": sigma, "sigma_required": target_sigma, "norm_mu_sq": norm2,
        "C": "unspecified universal constant (eps^2 sqrt(d/n) >= C)",
    }
