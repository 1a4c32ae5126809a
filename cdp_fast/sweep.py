"""`cdp-fast sweep`: what the contrastive guidance does to the samples as its scale grows.

Same diffusion model, same initial noise (batch i starts from seed ``seed + i`` at every scale),
a grid of guidance scales lambda from 0 (plain DDIM, the reference) up to where the samples
break. Per scale, measured with the intermediate classifier (features = its penultimate layer,
pseudo-labels = its argmax):

- ``pixel_change``: mean |x_lambda - x_0| in [0, 1] pixel units, image for image (uint8 / 255);
- ``separability``: Fisher ratio tr(S_B) / tr(S_W) of the features under the pseudo-labels
  (between-class over within-class scatter; scale-free), and ``probe_accuracy``: held-out
  accuracy of a ridge least-squares linear probe fitted on half the set, tested on the other half;
- ``diversity``: within-class spread, the RMS distance between two features of the same
  pseudo-class (sqrt(2 tr Cov_c), averaged over classes weighted by size);
- ``fidelity``: classifier-feature Frechet distance between the set and the real test images
  (the FID formula on this classifier's features, not Inception's: not comparable to an FID);
- ``confidence``: mean max softmax probability (pseudo-label confidence).

The same metrics are computed for the real training images as a reference. A scale is chosen by
the rule of :func:`choose_scale` (the largest scale whose fidelity stays within ``tolerance`` of
lambda 0's); a scale whose sampling hits NaN/inf is recorded as broken and the larger ones are
skipped. A classifier at chance on the real test split, or one that puts 90% of it in one class
(:func:`classifier_degenerate`), measures nothing: the sweep warns and chooses no scale.
Outputs: ``sweep.json``, ``sweep.png`` (metrics against lambda, log x axis) and
``sweep_images.png`` (one row of noise across the scales); an ``--out`` that already holds files
is refused unless ``--force``.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import models
from .config import field
from .diffusion_train import load_diffusion
from .figures import guidance_sweep_figures, markdown_table
from .generate import GenerateConfig, make_guidance, sample_shard
from .guidance import LOSSES
from .sampler import DDIMSampler
from .utils import progress, resolve_device, write_json

# log spaced, 0 (the reference) then 1e3 .. 1e6
DEFAULT_SCALES = (0.0, 1e3, 1e4, 3e4, 1e5, 3e5, 1e6)
METRICS = ("pixel_change", "separability", "diversity", "fidelity", "confidence")


@dataclass
class SweepConfig:
    checkpoint: str = field("runs/pipeline/diffusion", help="diffusion checkpoint folder (train-diffusion)")
    classifier: str = field("runs/pipeline/classifier", help="intermediate classifier checkpoint folder: "
                            "its features measure every scale (and guide, with --features classifier)")
    data: str = field("digits", help="dataset of the real reference (test split for fidelity)")
    data_dir: str | None = field(None, help="folder with the dataset files (not needed for digits)")
    real_limit: int | None = field(None, help="real training images (as the checkpoints were made)")
    out: str = field("runs/sweep", help="output folder: sweep.json, sweep.png, sweep_images.png")
    scales: tuple[float, ...] = field(DEFAULT_SCALES, help="guidance scales lambda (>= 0; 0, the "
                                "unguided reference, is always added)")
    guidance: str = field("hnm", help="contrastive loss", choices=LOSSES)
    features: str = field("classifier", help="guidance feature space: the classifier's features, "
                          "or identity (pixel space)", choices=("classifier", "identity"))
    head: bool = field(True, help="online embedding head on the classifier features")
    n: int = field(500, help="images per scale")
    batch_size: int = field(500, help="sampling batch (the contrastive group is min(512, batch))")
    steps: int = field(20, help="DDIM steps")
    t_min: int | None = field(400, help="guide steps with t >= t_min")
    t_max: int | None = field(None, help="guide steps with t < t_max")
    group_size: int | None = field(None, help="contrastive group (None: min(512, batch))")
    tolerance: float = field(0.5, help="choice rule: the largest scale whose fidelity is at most "
                             "(1 + tolerance) x lambda 0's")
    min_change: float = field(0.01, help="pixel change (in [0, 1] units) below which the guidance "
                              "counts as invisible")
    seed: int = field(0, help="seed of the first batch's initial noise")
    device: str = field("auto", help="auto | cpu | cuda[:i]")
    force: bool = field(False, help="replace existing outputs")

    def __post_init__(self):  # bad input fails before anything is loaded or written
        validate_scales(self.scales)
        if self.n < 4 or self.batch_size < 1 or self.steps < 1:
            raise ValueError(f"n must be >= 4, batch_size and steps >= 1, got n={self.n}, "
                             f"batch_size={self.batch_size}, steps={self.steps}")
        if not (isinstance(self.tolerance, (int, float)) and math.isfinite(self.tolerance)
                and self.tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance!r}")


# ---------------------------------------------------------------------------------------------
# metrics (float64, O(n d^2) at most)
def _f64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).double()


def fisher_ratio(features, labels) -> float:
    """tr(S_B) / tr(S_W): between-class over within-class scatter (class-size weighted).

    Two classes of equal size at means m1, m2 with covariance s^2 I in d dimensions give
    |m1 - m2|^2 / (4 d s^2).
    """
    f, y = _f64(features), torch.as_tensor(labels).long()
    mu = f.mean(0)
    sb = sw = 0.0
    for c in y.unique():
        fc = f[y == c]
        w = len(fc) / len(f)
        sb += w * float((fc.mean(0) - mu).square().sum())
        sw += w * float((fc - fc.mean(0)).square().sum(1).mean())
    return sb / sw if sw > 0 else float("inf")


def within_class_spread(features, labels) -> float:
    """RMS distance between two different members of the same class, averaged over classes
    (weighted by size; classes with one member are skipped): sqrt(2 n/(n-1) tr Cov_c)."""
    f, y = _f64(features), torch.as_tensor(labels).long()
    tot, wsum = 0.0, 0
    for c in y.unique():
        fc = f[y == c]
        n = len(fc)
        if n < 2:
            continue
        # mean over i != j of |f_i - f_j|^2 = 2 n / (n - 1) * mean_i |f_i - mean|^2
        msd = 2.0 * n / (n - 1) * float((fc - fc.mean(0)).square().sum(1).mean())
        tot += n * math.sqrt(msd)
        wsum += n
    return tot / wsum if wsum else float("nan")


def probe_accuracy(features, labels, seed: int = 0, ridge: float = 1e-3) -> float:
    """Held-out accuracy of a ridge least-squares linear probe (one-hot targets, standardised
    features) fitted on a random half of the set and tested on the other half."""
    f, y = _f64(features), torch.as_tensor(labels).long()
    n = len(f)
    if n < 4:
        raise ValueError(f"the linear probe needs at least 4 samples, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[: n // 2], perm[n // 2:]
    mu, sd = f[tr].mean(0), f[tr].std(0).clamp_min(1e-8)
    x = torch.cat([(f - mu) / sd, torch.ones(n, 1, dtype=f.dtype)], 1)
    classes = y.unique()
    t = (y[:, None] == classes[None, :]).double()
    a = x[tr]
    w = torch.linalg.solve(a.T @ a + ridge * len(tr) * torch.eye(a.shape[1], dtype=f.dtype), a.T @ t[tr])
    pred = classes[(x[te] @ w).argmax(1)]
    return float((pred == y[te]).double().mean())


def frechet_from_stats(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), via the symmetric C1^(1/2) C2 C1^(1/2)."""
    mu1, mu2, c1, c2 = (_f64(v) for v in (mu1, mu2, cov1, cov2))
    e, v = torch.linalg.eigh((c1 + c1.T) / 2)
    s1 = (v * e.clamp_min(0).sqrt()) @ v.T
    m = s1 @ c2 @ s1
    cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + torch.trace(c1) + torch.trace(c2) - 2 * cross)


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (unbiased covariances)."""
    a, b = _f64(features_a), _f64(features_b)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    return frechet_from_stats(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1),
                              b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1))


def set_metrics(features, probs, reference_features, *, seed: int = 0) -> dict:
    """Every metric but pixel_change for one set: features [n, d], class probabilities [n, C]."""
    p = torch.as_tensor(probs).double()
    labels = p.argmax(1)
    return {"separability": fisher_ratio(features, labels),
            "probe_accuracy": probe_accuracy(features, labels, seed=seed),
            "diversity": within_class_spread(features, labels),
            "fidelity": frechet_distance(features, reference_features),
            "confidence": float(p.max(1).values.mean())}


# ---------------------------------------------------------------------------------------------
def validate_scales(scales) -> list[float]:
    """Sorted, unique, finite, >= 0, with 0 (the reference) added; at least one positive scale."""
    if scales is None or len(scales) == 0:
        raise ValueError("the guidance-scale grid is empty: give at least one positive scale "
                         "(e.g. --scales 0 1e3 1e4 1e5)")
    out = set()
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"guidance scales must be finite numbers, got {s!r}")
        if s < 0:
            raise ValueError(f"guidance scales must be >= 0 (a negative lambda ascends the "
                             f"contrastive loss), got {s!r}")
        out.add(float(s))
    out.add(0.0)
    if len(out) < 2:
        raise ValueError("the guidance-scale grid has no positive scale (only 0)")
    return sorted(out)


def at_chance(accuracy: float, num_classes: int) -> bool:
    """Accuracy less than 5% of the way from chance (1/C) to perfect: the model learned nothing."""
    chance = 1.0 / num_classes
    return accuracy < chance + 0.05 * (1.0 - chance)


def classifier_degenerate(pred, labels, num_classes: int) -> str | None:
    """Why a classifier's features and pseudo-labels carry no class information (None: they do):
    its accuracy on real labelled images is at chance (:func:`at_chance`), or it puts 90% or more
    of them in one class. ``pred``: its argmax on the images, ``labels``: their true labels."""
    pred, labels = torch.as_tensor(pred).long().cpu(), torch.as_tensor(labels).long().cpu()
    acc = float((pred == labels).double().mean())
    counts = torch.bincount(pred, minlength=num_classes)
    top = int(counts.argmax())
    share = float(counts[top]) / max(1, len(pred))
    if at_chance(acc, num_classes):
        return (f"the intermediate classifier is at chance: accuracy {acc:.3f} on {len(pred)} real test "
                f"images, {num_classes} classes (chance {1 / num_classes:.3f}), {share:.0%} of them labelled {top}")
    if share >= 0.9:
        return (f"the intermediate classifier labels {share:.0%} of {len(pred)} real test images as class "
                f"{top} (accuracy {acc:.3f})")
    return None


def choose_scale(rows: list[dict], tolerance: float = 0.5, min_change: float = 0.01,
                 degenerate: str | None = None) -> dict:
    """The rule: the largest scale > 0 that did not break and whose fidelity (classifier-feature
    Frechet distance to the real test set) is at most (1 + tolerance) x lambda 0's.

    Returns {"scale", "rule", "visible", "note"}. When no positive scale qualifies, the smallest
    positive unbroken scale is returned with a note saying so; ``visible`` says whether the
    chosen scale's pixel_change reaches ``min_change``. ``degenerate``: why the measuring
    classifier carries no class information (:func:`classifier_degenerate`); then every metric is
    meaningless and no scale is chosen: "scale" is None and "note" says why.
    """
    base = next((r for r in rows if r["scale"] == 0.0), None)
    if base is None or base.get("fidelity") is None:
        raise ValueError("choose_scale needs the lambda = 0 row")
    limit = (1.0 + tolerance) * base["fidelity"]
    rule = (f"the largest scale whose classifier-feature Frechet distance to the real test set is at "
            f"most (1 + {tolerance:g}) x that of lambda 0 ({base['fidelity']:.4g} -> limit {limit:.4g})")
    if degenerate:
        return {"scale": None, "rule": rule, "visible": False, "refused": degenerate,
                "note": f"No scale chosen: {degenerate}, so its features and pseudo-labels cannot rank "
                        f"the scales."}
    ok = [r for r in rows if r["scale"] > 0 and not r["broken"] and r["fidelity"] <= limit]
    note = ""
    if ok:
        pick = max(ok, key=lambda r: r["scale"])
    else:
        alive = [r for r in rows if r["scale"] > 0 and not r["broken"]]
        if not alive:
            raise ValueError("every positive guidance scale broke the sampler (NaN/inf); "
                             "try smaller scales")
        pick = min(alive, key=lambda r: r["scale"])
        note = (f"No positive scale keeps the fidelity within the limit; the smallest one "
                f"({pick['scale']:g}) is used.")
    visible = pick["pixel_change"] >= min_change
    if not visible:
        note += (f" At lambda = {pick['scale']:g} the guidance changes the images by only "
                 f"{pick['pixel_change']:.4f} (< {min_change:g}) in [0, 1] pixel units: no scale "
                 f"changes the images visibly without breaking the fidelity limit.")
    return {"scale": pick["scale"], "rule": rule, "visible": visible, "note": note.strip()}


# ---------------------------------------------------------------------------------------------
def _features_probs(clf, images_uint8: torch.Tensor, device, batch: int = 1024):
    fs, ps = [], []
    with torch.no_grad():
        for i in range(0, len(images_uint8), batch):
            x = data_mod.to_float(images_uint8[i:i + batch].to(device))
            f = clf.features(x).float()
            fs.append(f.cpu())
            ps.append(torch.softmax(clf.head(f).float(), 1).cpu())
    return torch.cat(fs), torch.cat(ps)


def run_sweep(cfg: SweepConfig, *, model, schedule, meta: dict, clf, data, device=None) -> dict:
    """Sample the grid, measure it, choose a scale; writes sweep.json + the two PNGs to cfg.out."""
    scales = validate_scales(cfg.scales)
    device = resolve_device(cfg.device) if device is None else device
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ref_test, test_p = _features_probs(clf, data.x_test, device)
    degenerate = classifier_degenerate(test_p.argmax(1), data.y_test, data.num_classes)
    if degenerate:
        print(f"sweep: WARNING: {degenerate}: the metrics below cannot rank the scales; no scale will "
              f"be chosen", file=sys.stderr)
    real_f, real_p = _features_probs(clf, data.x_train, device)
    reference = {"scale": None, "pixel_change": None, **set_metrics(real_f, real_p, ref_test, seed=cfg.seed)}

    rows, strip, x0 = [], {}, None
    broken_at = None
    for s in progress(scales, desc=f"guidance sweep ({cfg.guidance})", unit="scale"):
        if broken_at is not None:  # a larger scale than one that broke: not sampled
            rows.append({"scale": s, "broken": True, **{k: None for k in METRICS}, "probe_accuracy": None})
            continue
        guided = s > 0
        gcfg = GenerateConfig(checkpoint=cfg.checkpoint, out=str(out), n=cfg.n, batch_size=cfg.batch_size,
                              steps=cfg.steps, guidance=cfg.guidance if guided else "none",
                              scale=s if guided else None, t_min=cfg.t_min, t_max=cfg.t_max,
                              group_size=cfg.group_size, head=cfg.head,
                              features="identity", seed=cfg.seed, device=str(device))
        feats = clf.features if cfg.features == "classifier" else None
        g = make_guidance(gcfg, device, feats, image_shape=meta["image_shape"]) if guided else None
        sampler = DDIMSampler(model, schedule, steps=gcfg.steps, eta=gcfg.eta, skip=gcfg.skip, guidance=g,
                              method=gcfg.method, bf16=gcfg.bf16, cuda_graphs=gcfg.cuda_graphs)
        try:  # the same shards (same seeds, so the same initial noise) at every scale
            imgs = torch.cat([sample_shard(sampler, gcfg, meta, i, labeler=clf, device=device)[0]
                              for i in range(-(-cfg.n // cfg.batch_size))])
        except ValueError as e:
            if "NaN" not in str(e) and "inf" not in str(e):
                raise
            broken_at = s
            rows.append({"scale": s, "broken": True, **{k: None for k in METRICS}, "probe_accuracy": None,
                         "error": str(e)})
            continue
        if x0 is None:
            x0 = imgs
        f, p = _features_probs(clf, imgs, device)
        change = float((imgs.float() - x0.float()).abs().mean() / 255.0)
        rows.append({"scale": s, "broken": False, "pixel_change": change,
                     **set_metrics(f, p, ref_test, seed=cfg.seed)})
        strip[s] = imgs[: min(10, len(imgs))].numpy()
    choice = choose_scale(rows, cfg.tolerance, cfg.min_change, degenerate=degenerate)
    figs = guidance_sweep_figures(rows, strip, out / "sweep.png", out / "sweep_images.png",
                                  reference=reference, chosen=choice["scale"],
                                  title=f"{data.name}: {cfg.guidance} guidance, {cfg.features} features")
    result = {"guidance_sweep": rows, "guidance_scale": choice["scale"], "choice": choice,
              "reference_real_train": reference, "loss": cfg.guidance, "features": cfg.features,
              "head": bool(cfg.head) and cfg.features == "classifier", "n": cfg.n, "steps": cfg.steps,
              "figures": {"metrics": str(figs[0]), "images": str(figs[1])}}
    write_json(out / "sweep.json", result)
    return result


def sweep_table(result: dict) -> tuple[list[list], list[str]]:
    """Rows + header of the markdown table (the real training images last, for reference)."""
    def fmt(v, spec):
        return "broken" if v is None else format(v, spec)

    rows = []
    for r in result["guidance_sweep"]:
        mark = " (chosen)" if r["scale"] == result["guidance_scale"] else ""
        rows.append([f"{r['scale']:g}{mark}", fmt(r["pixel_change"], ".4f"), fmt(r["separability"], ".3f"),
                     fmt(r.get("probe_accuracy"), ".3f"), fmt(r["diversity"], ".3f"),
                     fmt(r["fidelity"], ".3f"), fmt(r["confidence"], ".3f")])
    ref = result["reference_real_train"]
    rows.append(["real train", "-", f"{ref['separability']:.3f}", f"{ref['probe_accuracy']:.3f}",
                 f"{ref['diversity']:.3f}", f"{ref['fidelity']:.3f}", f"{ref['confidence']:.3f}"])
    return rows, ["lambda", "pixel change", "Fisher ratio", "probe acc", "within-class spread",
                  "feature Frechet dist", "confidence"]


def describe() -> str:
    """How each metric is computed (for the report)."""
    return ("Per scale, same initial noise, features = the intermediate classifier's penultimate "
            "layer, pseudo-labels = its argmax. pixel change: mean |x_lambda - x_0| in [0, 1] units, "
            "image for image. Fisher ratio: tr(S_between) / tr(S_within) of the features under the "
            "pseudo-labels (higher = classes more distinguishable). probe acc: held-out accuracy of a "
            "ridge linear probe on the pseudo-labels (fit on half, test on the other half). "
            "within-class spread: RMS feature distance between two images of the same pseudo-class "
            "(diversity). feature Frechet dist: the Frechet distance between Gaussians fitted to "
            "the set's and the real test split's classifier features (fidelity, lower = closer to "
            "real; the FID formula on this classifier's features, not an FID). confidence: mean "
            "max softmax probability. The real-train row measures the real training images the "
            "same way.")


def _check_out(cfg: SweepConfig) -> None:
    out = Path(cfg.out)
    if out.is_file():
        raise ValueError(f"--out {out} is a file; give a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not cfg.force:
        raise ValueError(f"--out {out} already holds {', '.join(held[:4])}{' ...' if len(held) > 4 else ''}; "
                         f"add --force to replace the sweep's outputs there, or choose another --out")


def resolve(cfg: SweepConfig) -> SweepConfig:
    """CLI hook, before anything is loaded or written: an existing output folder needs --force."""
    _check_out(cfg)
    return cfg


def run(cfg: SweepConfig) -> dict:
    _check_out(cfg)
    device = resolve_device(cfg.device)
    data = data_mod.load_dataset(cfg.data, cfg.data_dir, real_limit=cfg.real_limit, seed=cfg.seed)
    model, schedule, meta = load_diffusion(cfg.checkpoint, device=device)
    clf = models.load(cfg.classifier, device=device)
    res = run_sweep(cfg, model=model, schedule=schedule, meta=meta, clf=clf, data=data, device=device)
    rows, header = sweep_table(res)
    print(markdown_table(rows, header))
    if res["guidance_scale"] is None:
        print(f"sweep: no scale chosen: {res['choice']['note']}", file=sys.stderr)
    else:
        print(f"chosen scale {res['guidance_scale']:g}: {res['choice']['rule']}. {res['choice']['note']}")
    return {"guidance_scale": res["guidance_scale"], "out": cfg.out}
