"""``cdp-fast simulate``: the paper's Gaussian theory (METHOD.md §11), runnable in under a minute on a CPU.

Three parts, all written to ``<out>/results.json`` (schema below) plus two PNG figures:

1. closed forms: err_standard / err_robust of theta = mu, each next to a Monte-Carlo estimate
   (sample x, apply the worst Linf shift, count mistakes) as a sanity check;
2. Lemma 3 (Monte Carlo, ``theory.lemma3_experiment``): E[err] of theta_final for synthetic means
   c*mu, c*(mu - eps), orthogonal to mu / to mu - eps, and several synthetic stds, in the
   Theorem's scaling (||mu||^2 = d, sigma = (n d)^(1/4)); and the Theorem: its sample-size bound,
   its preconditions and the simulated robust error at (and below) that many synthetic points;
3. Figure 1: a 2-D two-class Gaussian mixture sampled with plain DDIM and with conditional HNM
   guidance through ``DDIMSampler`` (features = identity, positive = previous state, the fused
   ``hnm_guided_ddim_update`` step), exact score (``GaussianMixtureEps``), same initial noise.
   Per class: mean alignment c = <class mean, y mu> / ||mu||^2 and variances; downstream errors of
   theta_final trained on pseudo-labelled (and on label-conditioned) samples of each set.

results.json::

    {"closed_form": [{"setting", "d", "sigma", "eps", "standard_error", "standard_error_mc",
                      "robust_error", "robust_error_mc", "mc_samples"}],
     "lemma3": {"rows": [{"name", "family", "c", "std", "std_factor", "standard_error", "..._se",
                          "robust_error", "..._se", "pseudo_label_acc", "norm_mu_syn", "cos_mu",
                          "cos_mu_minus_eps"}], "theta_int", "optimal", "settings", "checks"},
     "theorem": {"n", "d", "eps", "c", "sigma", "n_syn_bound", "n_syn_bound_eps2_numerator",
                 "preconditions", "simulated": [{"n_syn", "robust_error", "robust_error_se",
                 "standard_error"}], "target": 1e-3},
     "figure1": {"mu", "sigma", "eps", "steps", "scale", "lambda", "guided_timesteps", "n_samples",
                 "n_real", "temperature", "tau_plus", "beta", "theta_int", "optimal",
                 "arms": {"true"|"ddim"|"contrastive-dp": {"c", "angle_to_mu_deg", "var",
                          "var_parallel", "var_orth", "per_class": [{"label", "sign", "count",
                          "mean", "c", "var_parallel", "var_orth", "var"}],
                          "downstream": {"pseudo_label"|"true_label": {"m=<k>"|"all":
                                         {"m", "standard_error", "robust_error", "..._se"}}},
                          "pseudo_label_acc"}}},
     "figures": {...paths}, "config": {...}, "wall_s": float, plus top-level scalar summaries}
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import figures, theory
from .config import field
from .gmm import GaussianMixtureEps
from .guidance import ContrastiveGuidance
from .kernels._backend import BACKENDS
from .sampler import DDIMSampler
from .schedules import NoiseSchedule
from .utils import check_output, progress, replace_output, resolve_device, write_json

__all__ = ["SimulateConfig", "run", "sample_figure1", "figure1_stats"]


@dataclass
class SimulateConfig:
    out: str = field("runs/simulate", help="output folder (results.json, figure1.png, lemma3_errors.png)")
    force: bool = field(False, help="replace an existing --out (its files are deleted first; refused without it)")
    seed: int = field(0, help="random seed (every Monte-Carlo draw and the sampler's noise)")
    device: str = field("auto", help="device for the Figure-1 sampler: auto | cpu | cuda[:i]")
    quick: bool = field(False, help="tiny sizes for every size left at its default (seconds; smoke tests)")
    # Lemma 3 ----------------------------------------------------------------------------------
    d: int = field(100, help="Lemma 3: dimension")
    n: int = field(10, help="Lemma 3: real labelled points behind theta_int (sigma = (n d)^(1/4))")
    n_syn: int = field(1000, help="Lemma 3: synthetic points per trial")
    trials: int = field(400, help="Monte-Carlo trials per cell (Lemma 3, Figure-1 downstream)")
    eps: float = field(0.4, help="Linf radius of the robust error (Lemma 3; keep below min mu_i)")
    mu_spread: float = field(0.55, help="Lemma 3: mu_i spread evenly in [1-s, 1+s] (then ||mu||^2 = d); "
                                       "0 gives mu = 1, where mu and mu - eps point the same way")
    cs: tuple[float, ...] = field((0.25, 0.5, 1.0, 2.0), help="Lemma 3: the scalars c of c*mu and c*(mu-eps)")
    std_factors: tuple[float, ...] = field((0.25, 0.5, 1.0, 1.5),
                                           help="Lemma 3: synthetic stds, as multiples of sigma")
    # Theorem ----------------------------------------------------------------------------------
    theorem_n: int = field(4, help="Theorem: real points n")
    theorem_d: int = field(4000, help="Theorem: dimension d (mu = 1, sigma = (n d)^(1/4))")
    theorem_eps: float = field(0.25, help="Theorem: eps (< 1/2)")
    theorem_c: float = field(1.0, help="Theorem: synthetic mean c*mu")
    theorem_trials: int = field(40, help="Theorem: Monte-Carlo trials per synthetic size")
    theorem_max_syn: int = field(1_000_000, help="Theorem: cap on simulated synthetic points")
    # Figure 1 ---------------------------------------------------------------------------------
    fig_mu: tuple[float, ...] = field((2.0, 1.0), help="Figure 1: class means +-mu (2-D)")
    fig_sigma: float = field(1.0, help="Figure 1: class std")
    fig_eps: float = field(0.5, help="Figure 1: Linf radius of the downstream robust error")
    fig_n_real: int = field(4, help="Figure 1: real points behind the pseudo-labelling theta_int")
    fig_subsets: tuple[int, ...] = field((4, 16), help="Figure 1: downstream synthetic-set sizes "
                                                       "(random subsets; the full set is always added)")
    n_samples: int = field(400, help="Figure 1: samples per set (half per class)")
    steps: int = field(50, help="Figure 1: DDIM steps (linear beta schedule, T = 1000)")
    scale: float = field(0.05, help="Figure 1: guidance strength per sample; lambda = scale * n_samples "
                                    "(e = eps + lambda grad; the HNM loss is a mean over 2B rows, so "
                                    "this keeps the push per sample independent of n_samples)")
    guide_t_min: int = field(400, help="Figure 1: guide the steps with t >= this (never the first)")
    guide_t_max: int = field(1000, help="Figure 1: ... and t <= this")
    temperature: float = field(1.0, help="Figure 1: HNM temperature T (the authors' 10 is too flat for raw 2-D "
                                         "points: it mostly inflates the variance; 1 shows the paper's effect)")
    tau_plus: float = field(0.1, help="HNM tau_plus")
    beta: float = field(1.0, help="HNM beta (hardness)")
    backend: str = field("auto", help="kernel backend", choices=BACKENDS)


_QUICK = dict(d=20, n=5, n_syn=100, trials=40, cs=(0.5, 1.0, 2.0), std_factors=(0.5, 1.0),
              theorem_d=400, theorem_trials=8, theorem_max_syn=20_000, n_samples=64, steps=12,
              fig_subsets=(4,))


def _check(cfg: SimulateConfig) -> None:
    for name in ("d", "n", "n_syn", "trials", "theorem_n", "theorem_d", "theorem_trials",
                 "theorem_max_syn", "n_samples", "steps", "fig_n_real"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if cfg.d < 2:
        raise ValueError("d must be >= 2 (Lemma 3 needs orthogonal means)")
    if cfg.n_samples < 4 or cfg.n_samples % 2:
        raise ValueError(f"n_samples must be even and >= 4 (two classes), got {cfg.n_samples}")
    if cfg.steps > 1000:
        raise ValueError(f"steps must be <= 1000 (T), got {cfg.steps}")
    for name in ("eps", "theorem_eps", "fig_eps"):
        if not (getattr(cfg, name) >= 0):
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
    if not 0 <= cfg.mu_spread < 1:
        raise ValueError(f"mu_spread must be in [0, 1), got {cfg.mu_spread!r}")
    if not cfg.cs or any(c <= 0 for c in cfg.cs):
        raise ValueError(f"cs must be non-empty and positive, got {cfg.cs!r}")
    if not cfg.std_factors or any(s <= 0 for s in cfg.std_factors):
        raise ValueError(f"std_factors must be non-empty and positive, got {cfg.std_factors!r}")
    if len(cfg.fig_mu) != 2 or not any(cfg.fig_mu):
        raise ValueError(f"fig_mu must be a non-zero 2-D vector, got {cfg.fig_mu!r}")
    if cfg.fig_sigma <= 0 or cfg.theorem_c <= 0 or cfg.temperature <= 0:
        raise ValueError("fig_sigma, theorem_c and temperature must be > 0")
    if any(m < 2 for m in cfg.fig_subsets):
        raise ValueError(f"fig_subsets must be >= 2, got {cfg.fig_subsets!r}")


# ----------------------------------------------------------------------------------------------
# 1. closed forms next to Monte Carlo
def _closed_form_check(mu: np.ndarray, sigma: float, eps: float, setting: str, gen: torch.Generator,
                       n_mc: int) -> dict:
    m = torch.as_tensor(mu, dtype=torch.float64)
    theta = m
    y = torch.where(torch.rand(n_mc, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    x = y[:, None] * m + sigma * torch.randn(n_mc, m.numel(), generator=gen, dtype=torch.float64)
    x_adv = x - eps * y[:, None] * torch.sign(theta)     # the worst Linf shift of a linear rule
    return {
        "setting": setting, "theta": "mu", "d": int(m.numel()), "sigma": sigma, "eps": eps,
        "standard_error": float(theory.standard_error(theta, m, sigma)),
        "standard_error_mc": float((torch.sign(x @ theta) != y).double().mean()),
        "robust_error": float(theory.robust_error(theta, m, sigma, eps)),
        "robust_error_mc": float((torch.sign(x_adv @ theta) != y).double().mean()),
        "mc_samples": n_mc,
    }


# ----------------------------------------------------------------------------------------------
# 2. Lemma 3 and the Theorem
def lemma3_mu(d: int, spread: float) -> np.ndarray:
    """mu_i evenly spread in [1 - spread, 1 + spread], rescaled so ||mu||^2 = d."""
    mu = np.linspace(1 - spread, 1 + spread, d) if d > 1 else np.ones(1)
    return mu * math.sqrt(d) / np.linalg.norm(mu)


def _lemma3(cfg: SimulateConfig) -> dict:
    mu = lemma3_mu(cfg.d, cfg.mu_spread)
    sigma = theory.theorem_sigma(cfg.n, cfg.d)
    means = theory.lemma3_means(mu, cfg.eps, cs=cfg.cs, seed=cfg.seed)
    stds = [f * sigma for f in cfg.std_factors]
    factor_of = dict(zip(stds, cfg.std_factors))
    res = theory.lemma3_experiment(cfg.d, cfg.n, cfg.n_syn, mu, sigma, cfg.eps, means, stds,
                                   trials=cfg.trials, seed=cfg.seed, progress=_bar)
    for row in res["rows"]:
        name = row["name"]
        if name.startswith("c*mu"):
            row["family"], row["c"] = "c*mu", float(name.split("c=")[1].rstrip(")"))
        elif name.startswith("c*(mu-eps)"):
            row["family"], row["c"] = "c*(mu-eps)", float(name.split("c=")[1].rstrip(")"))
        else:
            row["family"], row["c"] = name, None
        row["std_factor"] = factor_of[row["std"]]
    res["settings"]["mu_spread"] = cfg.mu_spread
    res["settings"]["min_mu"] = float(mu.min())
    res["settings"]["c*(mu-eps)"] = "mu - eps*1 rescaled to ||mu|| first, then times c"
    res["checks"] = _lemma3_checks(res["rows"], cfg)
    return res


def _lemma3_checks(rows: list[dict], cfg: SimulateConfig) -> dict:
    """The Lemma's claims, checked on the simulated table (True/False each, no tolerance)."""
    by = {(r["family"], r["c"], r["std_factor"]): r for r in rows}
    cs = sorted(cfg.cs)
    out = {"c*mu_beats_orthogonal_standard": [], "larger_c_better_standard_c*mu": [],
           "larger_c_better_robust_c*(mu-eps)": [], "c*(mu-eps)_beats_c*mu_robust": [],
           "orthogonal_means_worst_standard_error": [],
           "orthogonal_means_worst_robust_error": [], "smaller_std_better_standard_c=1": None}
    for f in sorted(cfg.std_factors):
        orth = by[("orthogonal to mu", None, f)]["standard_error"]
        out["c*mu_beats_orthogonal_standard"].append(all(by[("c*mu", c, f)]["standard_error"] < orth for c in cs))
        se = [by[("c*mu", c, f)]["standard_error"] for c in cs]
        out["larger_c_better_standard_c*mu"].append(all(a > b for a, b in zip(se, se[1:])))
        re_ = [by[("c*(mu-eps)", c, f)]["robust_error"] for c in cs]
        out["larger_c_better_robust_c*(mu-eps)"].append(all(a > b for a, b in zip(re_, re_[1:])))
        out["c*(mu-eps)_beats_c*mu_robust"].append(
            [by[("c*(mu-eps)", c, f)]["robust_error"] < by[("c*mu", c, f)]["robust_error"] for c in cs])
        orth_rows = [r for r in rows if r["std_factor"] == f and r["c"] is None]
        rest = [r for r in rows if r["std_factor"] == f and r["c"] is not None]
        for key in ("standard_error", "robust_error"):
            out[f"orthogonal_means_worst_{key}"].append(
                max(r[key] for r in rest) < min(r[key] for r in orth_rows))
    if 1.0 in cs:
        v = [by[("c*mu", 1.0, f)]["standard_error"] for f in sorted(cfg.std_factors)]
        out["smaller_std_better_standard_c=1"] = all(a < b for a, b in zip(v, v[1:]))
    out["std_factors_order"] = sorted(cfg.std_factors)
    out["cs_order"] = cs
    return out


def _theorem(cfg: SimulateConfig) -> dict:
    n, d, eps, c = cfg.theorem_n, cfg.theorem_d, cfg.theorem_eps, cfg.theorem_c
    sigma = theory.theorem_sigma(n, d)
    mu = theory.theorem_mu(d)
    bound = theory.theorem_sample_bound(n, d, eps, c)
    alt = 288.0 * n * eps * eps / c * math.sqrt(d / n)   # Carmon et al.'s form (eps^2 on top)
    sizes = sorted({int(math.ceil(v)) for v in (bound, bound / 10, bound / 100, alt, alt / 10)
                    if 1 <= v <= cfg.theorem_max_syn})
    if not sizes:
        sizes = [cfg.theorem_max_syn]
    sim = []
    for m in _bar(sizes, total=len(sizes), desc="theorem"):
        r = theory.lemma3_experiment(d, n, m, mu, sigma, eps, {"c*mu": c * mu}, [sigma],
                                     trials=cfg.theorem_trials, seed=cfg.seed + 1)
        row = r["rows"][0]
        sim.append({"n_syn": m, "robust_error": row["robust_error"],
                    "robust_error_se": row["robust_error_se"],
                    "standard_error": row["standard_error"],
                    "pseudo_label_acc": row["pseudo_label_acc"]})
    return {
        "n": n, "d": d, "eps": eps, "c": c, "sigma": sigma, "synthetic_std": sigma,
        "n_syn_bound": bound, "n_syn_bound_eps2_numerator": alt,
        "bound_note": "METHOD.md §11 form 288 n/(c eps^2) sqrt(d/n); the extract is garbled and Carmon et "
                      "al. (2019) put eps^2 in the numerator, so both are simulated",
        "bound_simulated": bound <= cfg.theorem_max_syn,
        "preconditions": theory.theorem_preconditions(n, d, eps, sigma, mu),
        "optimal_robust_error": float(theory.robust_error(mu, mu, sigma, eps)),
        "theta_int_robust_error": r["theta_int"]["robust_error"],
        "simulated": sim, "target": 1e-3,
    }


# ----------------------------------------------------------------------------------------------
# 3. Figure 1
def sample_figure1(mu, sigma: float, n_samples: int, *, steps: int = 50, scale: float = 0.0,
                   guide_t_min: int = 400, guide_t_max: int = 1000, temperature: float = 10.0,
                   tau_plus: float = 0.1, beta: float = 1.0, seed: int = 0, device="cpu",
                   backend: str = "auto", show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Class-conditional DDIM (eta = 0) on the mixture 0.5 N(mu, s^2) + 0.5 N(-mu, s^2), exact eps.

    Runs :class:`DDIMSampler` (the authors' uniform plan, linear schedule, T = 1000). scale > 0
    adds conditional pixel-space HNM guidance (:class:`ContrastiveGuidance` with features =
    identity, negatives = the other class, positive = the sample's previous, noisier state, one
    group) on the steps with guide_t_min <= t <= guide_t_max except the first; the sampler takes
    the fused ``hnm_guided_ddim_update`` step there (METHOD.md §5, §11). The initial noise
    depends only on ``seed``, so scale 0 and scale > 0 start from the same x_T.
    Returns (x0 [n, 2] float32 on CPU, labels [n] (0 -> +mu, 1 -> -mu), guided timesteps).
    """
    dev = torch.device(device)
    mu_t = torch.as_tensor(mu, dtype=torch.float64)
    sched = NoiseSchedule.linear(1000)
    model = GaussianMixtureEps(torch.stack([mu_t, -mu_t]), [sigma, sigma], [0.5, 0.5], sched).to(dev)
    labels = (torch.arange(n_samples) % 2).to(dev)
    gen = torch.Generator().manual_seed(int(seed))
    x_T = torch.randn(n_samples, mu_t.numel(), generator=gen, dtype=torch.float32).to(dev)
    guidance = None
    if scale:
        guidance = ContrastiveGuidance(
            "hnm", None, scale=float(scale), temperature=temperature, tau_plus=tau_plus, beta=beta,
            when=lambda t, i: guide_t_min <= t <= guide_t_max, group_size=n_samples, backend=backend)
    sampler = DDIMSampler(model, sched, steps=steps, guidance=guidance, backend=backend)
    x = sampler.sample(n_samples, (mu_t.numel(),), seed=int(seed), labels=labels, x_T=x_T, device=dev,
                       dtype=torch.float32, progress=show_progress)
    guided = [t for t, g in zip(sampler.timesteps, sampler.guided_steps()) if g]
    return x.float().cpu(), labels.cpu(), guided


def figure1_stats(x: torch.Tensor, labels: torch.Tensor, mu, sigma: float, eps: float, *,
                  theta_ints: torch.Tensor, subsets=(8, 32), seed: int = 0) -> dict:
    """Per-class alignment/variance of one sample set and downstream errors of theta_final.

    c_k = <mean of class k, y_k mu> / ||mu||^2 (y_k = +1 for label 0, -1 for label 1): c = 1 is
    the true mixture. var_parallel / var_orth: variance along / across mu; var = mean per-coordinate
    variance. Downstream: for each theta_int (one per trial, from real data), pseudo-label a random
    subset of m samples (or all), theta_final = mean(y~ x~), closed-form errors averaged over trials;
    "true_label" uses the conditioning labels instead of pseudo-labels.
    """
    xs = x.to(torch.float64)
    m = torch.as_tensor(mu, dtype=torch.float64)
    u = m / m.norm()
    per_class = []
    for k, sgn in ((0, 1.0), (1, -1.0)):
        xk = xs[labels == k]
        mean = xk.mean(0)
        proj = xk @ u
        resid = xk - proj[:, None] * u
        per_class.append({
            "label": k, "sign": sgn, "count": int(xk.shape[0]),
            "mean": mean.tolist(),
            "c": float(sgn * (mean @ m) / (m @ m)),
            "var_parallel": float(proj.var(unbiased=True)),
            "var_orth": float((resid - resid.mean(0)).pow(2).sum(1).mean() * xk.shape[0] / max(xk.shape[0] - 1, 1)),
            "var": float(xk.var(0, unbiased=True).mean()),
        })
    y_true = torch.where(labels == 0, 1.0, -1.0).to(torch.float64)
    gen = torch.Generator().manual_seed(int(seed))
    K, N = theta_ints.shape[0], xs.shape[0]
    down: dict[str, dict] = {"pseudo_label": {}, "true_label": {}}
    accs = []
    for msize in [s for s in subsets if s < N] + [N]:
        key = "all" if msize == N else f"m={msize}"
        if msize == N:
            idx = torch.arange(N).expand(K, N)
        else:
            idx = torch.argsort(torch.rand(K, N, generator=gen), dim=1)[:, :msize]
        xsub = xs[idx]                                           # [K, m, 2]
        ypl = theory.pseudo_label(theta_ints, xsub)              # [K, m]
        th_pl = theory.theta_intermediate(xsub, ypl)
        th_tl = theory.theta_intermediate(xsub, y_true[idx])
        if msize == N:
            accs = (ypl == y_true[idx]).double().mean(1)
        for name, th in (("pseudo_label", th_pl), ("true_label", th_tl)):
            se = theory.standard_error(th, m, sigma)
            re_ = theory.robust_error(th, m, sigma, eps)
            down[name][key] = {"m": msize, "standard_error": float(se.mean()),
                               "robust_error": float(re_.mean()),
                               "standard_error_se": float(se.std() / math.sqrt(K)) if K > 1 else 0.0,
                               "robust_error_se": float(re_.std() / math.sqrt(K)) if K > 1 else 0.0}
    diff = xs[labels == 0].mean(0) - xs[labels == 1].mean(0)
    cosang = float(diff @ m) / max(float(diff.norm() * m.norm()), 1e-300)
    return {"c": float(np.mean([p["c"] for p in per_class])),
            "angle_to_mu_deg": math.degrees(math.acos(max(-1.0, min(1.0, cosang)))),
            "var": float(np.mean([p["var"] for p in per_class])),
            "var_parallel": float(np.mean([p["var_parallel"] for p in per_class])),
            "var_orth": float(np.mean([p["var_orth"] for p in per_class])),
            "per_class": per_class, "downstream": down,
            "pseudo_label_acc": float(accs.mean())}


def _figure1(cfg: SimulateConfig, device: torch.device) -> tuple[dict, dict]:
    mu = np.asarray(cfg.fig_mu, dtype=np.float64)
    sig = cfg.fig_sigma
    kw = dict(steps=cfg.steps, guide_t_min=cfg.guide_t_min, guide_t_max=cfg.guide_t_max,
              temperature=cfg.temperature, tau_plus=cfg.tau_plus, beta=cfg.beta, seed=cfg.seed,
              device=device, backend=cfg.backend)
    x_ddim, lab, _ = sample_figure1(mu, sig, cfg.n_samples, scale=0.0, **kw)
    lam = cfg.scale * cfg.n_samples
    x_cdp, lab2, guided = sample_figure1(mu, sig, cfg.n_samples, scale=lam, **kw)
    assert torch.equal(lab, lab2)
    # exact samples of the true class-conditional mixture, for reference
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    mt = torch.as_tensor(mu)
    sgn = torch.where(lab == 0, 1.0, -1.0).to(torch.float64)
    x_true = sgn[:, None] * mt + sig * torch.randn(cfg.n_samples, 2, generator=gen, dtype=torch.float64)
    # real data behind the pseudo-labelling classifier: theta_int = mu + sigma/sqrt(n) g (exact)
    theta_ints = mt + sig / math.sqrt(cfg.fig_n_real) * torch.randn(cfg.trials, 2, generator=gen, dtype=torch.float64)
    arms = {}
    for name, xs in (("true", x_true), ("ddim", x_ddim), ("contrastive-dp", x_cdp)):
        arms[name] = figure1_stats(xs, lab, mu, sig, cfg.fig_eps, theta_ints=theta_ints,
                                   subsets=cfg.fig_subsets, seed=cfg.seed + 11)
    res = {"mu": mu.tolist(), "sigma": sig, "eps": cfg.fig_eps, "steps": cfg.steps,
           "scale": cfg.scale, "lambda": lam, "guided_timesteps": guided, "n_samples": cfg.n_samples,
           "n_real": cfg.fig_n_real, "temperature": cfg.temperature, "tau_plus": cfg.tau_plus,
           "beta": cfg.beta, "arms": arms,
           "theta_int": {"standard_error": float(theory.standard_error(theta_ints, mt, sig).mean()),
                         "robust_error": float(theory.robust_error(theta_ints, mt, sig, cfg.fig_eps).mean())},
           "optimal": {"standard_error": float(theory.standard_error(mt, mt, sig)),
                       "robust_error": float(theory.robust_error(mt, mt, sig, cfg.fig_eps))}}
    return res, {"true": x_true, "ddim": x_ddim, "contrastive-dp": x_cdp, "labels": lab}


def _bar(it, total=None, desc=""):
    return progress(it, total=total, desc=desc, leave=False)


# ----------------------------------------------------------------------------------------------
def run(cfg: SimulateConfig) -> dict:
    """Run the whole theory lab; writes results.json, figure1.png, lemma3_errors.png into cfg.out."""
    if not isinstance(cfg, SimulateConfig):
        raise TypeError(f"run expects a SimulateConfig, got {type(cfg).__name__}")
    if cfg.quick:  # tiny sizes for every field still at its default (explicit values win)
        defaults = SimulateConfig()
        cfg = dataclasses.replace(cfg, **{k: v for k, v in _QUICK.items()
                                          if getattr(cfg, k) == getattr(defaults, k)})
    _check(cfg)
    replace = check_output(cfg.out, force=cfg.force, what="an earlier simulate run")  # before any work
    t0 = time.perf_counter()
    out = Path(cfg.out)
    if replace:
        replace_output(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_mc = 20_000 if cfg.quick else 200_000

    closed = [
        _closed_form_check(lemma3_mu(cfg.d, cfg.mu_spread), theory.theorem_sigma(cfg.n, cfg.d),
                           cfg.eps, "lemma3", gen, n_mc),
        _closed_form_check(np.asarray(cfg.fig_mu, dtype=np.float64), cfg.fig_sigma, cfg.fig_eps,
                           "figure1", gen, n_mc),
    ]
    lem = _lemma3(cfg)
    thm = _theorem(cfg)
    fig1, samples = _figure1(cfg, device)
    figs = {"figure1": str(figures.figure1_scatter(fig1, samples, out / "figure1.png")),
            "lemma3_errors": str(figures.lemma3_errors(lem, thm, out / "lemma3_errors.png"))}
    a_d, a_c = fig1["arms"]["ddim"], fig1["arms"]["contrastive-dp"]
    results = {
        "out": str(out),
        "figure1_c_ddim": a_d["c"], "figure1_c_contrastive_dp": a_c["c"],
        "figure1_var_ddim": a_d["var"], "figure1_var_contrastive_dp": a_c["var"],
        "figure1_robust_error_ddim": a_d["downstream"]["pseudo_label"]["all"]["robust_error"],
        "figure1_robust_error_contrastive_dp": a_c["downstream"]["pseudo_label"]["all"]["robust_error"],
        "theorem_n_syn_bound": thm["n_syn_bound"],
        "closed_form": closed, "lemma3": lem, "theorem": thm, "figure1": fig1, "figures": figs,
        "config": dataclasses.asdict(cfg), "device": str(device),
    }
    results["wall_s"] = time.perf_counter() - t0
    write_json(out / "results.json", results)
    return results
