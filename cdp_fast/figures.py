"""PNG figures people would rather look at than JSON (matplotlib, Agg backend, no display)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .utils import atomic_write_bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(images: np.ndarray, ncol: int) -> np.ndarray:
    """uint8 NHWC (or NCHW) images -> one H x W (x 3) mosaic with 1-pixel gaps."""
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    n, h, w, c = images.shape
    nrow = int(np.ceil(n / ncol))
    out = np.full((nrow * (h + 1) + 1, ncol * (w + 1) + 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        out[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[i]
    return out[..., 0] if c == 1 else out


def sample_grids(sets: Mapping[str, np.ndarray], path: str | Path, *, ncol: int = 10,
                 title: str = "") -> Path:
    """Side-by-side sample grids, e.g. DDIM vs Contrastive-DP from the same initial noise."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 4.6), squeeze=False)
    for ax, (name, imgs) in zip(axes[0], sets.items()):
        g = _grid(np.asarray(imgs), ncol)
        ax.imshow(g, cmap="gray" if g.ndim == 2 else None, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def accuracy_bars(arms: Mapping[str, Mapping[str, float]], path: str | Path, *,
                  errors: Mapping[str, Mapping[str, float]] | None = None, title: str = "") -> Path:
    """Clean and robust accuracy per training arm (error bars = std over seeds when given)."""
    plt = _plt()
    names = list(arms)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.8))
    for k, (key, label) in enumerate([("clean_acc", "clean"), ("robust_acc", "robust (PGD)")]):
        vals = [100 * arms[n][key] for n in names]
        err = [100 * errors[n][key] for n in names] if errors else None
        bars = ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, yerr=err, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def embedding_scatter(features: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                      path: str | Path, *, method: str = "pca", title: str = "") -> Path:
    """2-D embedding (PCA fitted on all sets together, or t-SNE) of classifier features per set."""
    plt = _plt()
    names = list(features)
    allf = np.concatenate([features[n] for n in names]).astype(np.float64)
    if method == "tsne":
        from sklearn.manifold import TSNE

        emb = TSNE(n_components=2, init="pca", random_state=0,
                   perplexity=min(30, max(5, len(allf) // 10))).fit_transform(allf)
    elif method == "pca":
        from sklearn.decomposition import PCA

        emb = PCA(n_components=2, random_state=0).fit_transform(allf)
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    fig, axes = plt.subplots(1, len(names), figsize=(4.0 * len(names) + 1.0, 4.2), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    start = 0
    for ax, n in zip(axes[0], names):
        e = emb[start:start + len(features[n])]
        start += len(features[n])
        sc = ax.scatter(e[:, 0], e[:, 1], c=labels[n], cmap="tab10", s=6, vmin=0, vmax=9)
        ax.set_title(n)
    fig.colorbar(sc, ax=axes[0].tolist(), shrink=0.8, label="pseudo-label")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def markdown_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def guidance_sweep_figures(rows: Sequence[Mapping], strip: Mapping[float, np.ndarray],
                           metrics_path: str | Path, images_path: str | Path, *,
                           reference: Mapping | None = None, chosen: float | None = None,
                           title: str = "") -> tuple[Path, Path]:
    """The guidance-scale sweep: every metric against lambda (symlog x axis: log above the smallest
    positive scale, linear down to 0; dashed = the real training images; dotted = the chosen scale),
    and the same initial noise across the scales (one row of images per scale)."""
    plt = _plt()
    keys = [("pixel_change", "pixel change |x_l - x_0|"), ("separability", "Fisher ratio (separability)"),
            ("probe_accuracy", "linear-probe accuracy"), ("diversity", "within-class spread (diversity)"),
            ("fidelity", "feature Frechet distance to test"), ("confidence", "pseudo-label confidence")]
    ok = [r for r in rows if not r.get("broken")]
    pos = [r["scale"] for r in rows if r["scale"] > 0]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), squeeze=False)
    for ax, (k, label) in zip(axes.flat, keys):
        ax.plot([r["scale"] for r in ok], [r[k] for r in ok], "o-")
        for r in rows:
            if r.get("broken"):
                ax.axvline(r["scale"], color="red", alpha=0.25, lw=4)
        if reference is not None and reference.get(k) is not None:
            ax.axhline(reference[k], color="gray", ls="--", label="real train")
        if chosen is not None:
            ax.axvline(chosen, color="green", ls=":", label="chosen")
        if pos:
            ax.set_xscale("symlog", linthresh=min(pos))
            ax.set_xlim(0, max(pos) * 1.5)  # no negative half of the symlog axis
            grid = [r["scale"] for r in rows]
            ax.set_xticks(grid, [f"{v:g}" for v in grid], rotation=45, fontsize=8)
            ax.minorticks_off()
        ax.set_xlabel("guidance scale lambda")
        ax.set_title(label, fontsize=10)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title + " (red band: sampling broke)")
    fig.tight_layout()
    p1 = _save(fig, metrics_path)
    names = sorted(strip)
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 0.75 * len(names) + 0.6), squeeze=False)
    for ax, s in zip(axes[:, 0], names):
        g = _grid(np.asarray(strip[s]), len(strip[s]))
        ax.imshow(g, cmap="gray" if g.ndim == 2 else None, interpolation="nearest")
        ax.set_ylabel(f"{s:g}", rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("same initial noise, lambda per row")
    fig.tight_layout()
    return p1, _save(fig, images_path)


# ----------------------------------------------------------------------------------------------
# ``cdp-fast simulate`` (METHOD.md §11)
def _save_tight(fig, path) -> Path:
    """PNG with a tight bounding box, written atomically (simulate's figures)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())


def figure1_scatter(res: Mapping, samples: Mapping, path: str | Path) -> Path:
    """Figure 1: the 2-D mixture sampled with DDIM (a) and with conditional HNM guidance (b).

    ``res``: simulate's ``results["figure1"]``; ``samples``: {"ddim", "contrastive-dp": [n, 2]
    tensors, "labels": [n]}.
    """
    plt = _plt()
    mu = np.asarray(res["mu"])
    lab = np.asarray(samples["labels"])
    allx = np.concatenate([np.asarray(samples["ddim"]), np.asarray(samples["contrastive-dp"])])
    lo, hi = np.percentile(allx, 0.5, axis=0), np.percentile(allx, 99.5, axis=0)
    pad = 0.1 * (hi - lo)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), sharex=True, sharey=True)
    for ax, (key, title) in zip(axes, (("ddim", "(a) DDIM"),
                                       ("contrastive-dp", "(b) DDIM + conditional HNM guidance"))):
        x = np.asarray(samples[key])
        st = res["arms"][key]
        for k, col in ((0, "tab:blue"), (1, "tab:orange")):
            sel = lab == k
            ax.scatter(x[sel, 0], x[sel, 1], s=5, alpha=0.5, c=col, label=f"class {'+' if k == 0 else '-'}1")
        for sgn in (1, -1):
            ax.plot(*(sgn * mu), "k*", ms=12)
        ax.plot([-1.5 * mu[0], 1.5 * mu[0]], [-1.5 * mu[1], 1.5 * mu[1]], "k--", lw=0.8, alpha=0.6)
        ax.set_title(f"{title}\nc = {st['c']:.3f}, var = {st['var']:.3f} "
                     f"(par {st['var_parallel']:.2f}, orth {st['var_orth']:.2f})", fontsize=9)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_aspect("equal", adjustable="box")
        ax.legend(loc="upper left", fontsize=8, markerscale=2)
    mu_s = "(" + ", ".join(f"{v:g}" for v in mu) + ")"
    fig.suptitle(f"2-D Gaussian mixture +-mu = +-{mu_s}, sigma = {res['sigma']:g}; "
                 f"{res['steps']} DDIM steps, HNM T = {res['temperature']:g}, lambda = {res['lambda']:g} "
                 f"on t in [{min(res['guided_timesteps'], default=0)}, {max(res['guided_timesteps'], default=0)}] "
                 "(stars: true means)", fontsize=10)
    return _save_tight(fig, path)


def lemma3_errors(lem: Mapping, thm: Mapping, path: str | Path) -> Path:
    """Lemma 3 / Lemma 2 / Theorem panels from simulate's ``results["lemma3"]`` and ``["theorem"]``."""
    plt = _plt()
    rows = lem["rows"]
    factors = sorted({r["std_factor"] for r in rows})
    f_ref = min(factors, key=lambda f: abs(f - 1.0))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for ax, key, title in ((axes[0, 0], "standard_error", "standard error vs c"),
                           (axes[0, 1], "robust_error", "robust error vs c")):
        for fam, mk in (("c*mu", "o-"), ("c*(mu-eps)", "s-")):
            pts = sorted((r["c"], r[key], r[key + "_se"]) for r in rows
                         if r["family"] == fam and r["std_factor"] == f_ref)
            c, v, se = map(np.asarray, zip(*pts))
            ax.errorbar(c, v, yerr=2 * se, fmt=mk, capsize=3, label=f"mu~ = {fam}")
        for fam, ls in (("orthogonal to mu", ":"), ("orthogonal to mu-eps", "-.")):
            r = next(r for r in rows if r["family"] == fam and r["std_factor"] == f_ref)
            ax.axhline(r[key], color="gray", ls=ls, label=f"mu~ {fam}")
        opt = lem["optimal"]["standard_error_theta_mu"] if key == "standard_error" else \
            lem["optimal"]["robust_error_theta_mu_minus_eps"]
        ax.axhline(opt, color="k", lw=0.8,
                   label="optimal theta" + (" (= mu)" if key == "standard_error" else " (= mu - eps)"))
        ax.axhline(lem["theta_int"][key], color="r", lw=0.8, ls="--", label="theta_int (real only)")
        ax.set_xscale("log")
        cs_all = sorted({r["c"] for r in rows if r["c"] is not None})
        ax.set_xticks(cs_all, [f"{c:g}" for c in cs_all])
        ax.minorticks_off()
        ax.set_xlabel("c")
        ax.set_ylabel(f"E[{key.replace('_', ' ')}] of theta_final")
        ax.set_title(f"{title} (synthetic std = {f_ref:g} sigma)", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[1, 0]
    cs_ = sorted({r["c"] for r in rows if r["family"] == "c*mu"})
    for c in cs_:
        pts = sorted((r["std_factor"], r["standard_error"], r["robust_error"]) for r in rows
                     if r["family"] == "c*mu" and r["c"] == c)
        f, s, rb = map(np.asarray, zip(*pts))
        line, = ax.plot(f, s, "o-", label=f"standard, c={c:g}")
        ax.plot(f, rb, "s--", color=line.get_color(), label=f"robust, c={c:g}")
    ax.set_xlabel("synthetic std / sigma")
    ax.set_ylabel("E[error] of theta_final (mu~ = c mu)")
    ax.set_title("Lemma 2: smaller synthetic variance", fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1, 1]
    sim = thm["simulated"]
    ns = np.array([s["n_syn"] for s in sim])
    rb = np.array([s["robust_error"] for s in sim])
    se = np.array([s["robust_error_se"] for s in sim])
    ax.errorbar(ns, rb, yerr=2 * se, fmt="o-", capsize=3, label="simulated E[robust error]")
    ax.axhline(thm["target"], color="r", ls="--", label="1e-3 target")
    ax.axhline(thm["optimal_robust_error"], color="k", lw=0.8, label="optimal (theta = mu)")
    ax.axvline(thm["n_syn_bound"], color="g", ls=":", label="bound 288n/(c eps^2) sqrt(d/n)")
    ax.axvline(thm["n_syn_bound_eps2_numerator"], color="m", ls=":", label="288n eps^2/c sqrt(d/n)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("synthetic points n~")
    ax.set_title(f"Theorem: n={thm['n']}, d={thm['d']}, eps={thm['eps']}, c={thm['c']}", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(f"Lemma 3 (d={lem['settings']['d']}, n={lem['settings']['n']}, "
                 f"n~={lem['settings']['n_syn']}, eps={lem['settings']['eps']}, "
                 f"{lem['settings']['trials']} trials; bars: 2 s.e.)", fontsize=11)
    fig.tight_layout()
    return _save_tight(fig, path)


def study_curves(table: Mapping[int, Mapping[str, Mapping[str, float]]], path: str | Path, *,
                 baseline: Mapping[str, float] | None = None, total: int | None = None,
                 title: str = "") -> Path:
    """Figure 3 of the paper: clean and robust accuracy against the real count, one line per arm
    (error bars = std over seeds), the all-real baseline dashed. ``table``: k -> arm -> stats."""
    plt = _plt()
    ks = sorted(table)
    arms = list(dict.fromkeys(a for k in ks for a in table[k]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, [("clean_acc", "clean accuracy (%)"),
                                       ("robust_acc", "robust accuracy, PGD (%)")]):
        for arm in arms:
            xs = [k for k in ks if arm in table[k]]
            ax.errorbar(xs, [100 * table[k][arm][key] for k in xs],
                        yerr=[100 * table[k][arm].get(key + "_std", 0.0) for k in xs],
                        marker="o", capsize=3, label=arm)
        if baseline is not None:
            ax.axhline(100 * baseline[key], ls="--", color="k", lw=1,
                       label=f"all real ({total})" if total else "all real")
        ax.set_xlabel("real training images (rest synthetic)" + (f", total {total}" if total else ""))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
