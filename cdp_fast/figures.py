"""PNG figures people would rather look at than JSON (matplotlib, Agg backend, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


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
