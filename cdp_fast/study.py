"""`cdp-fast study`: the paper's MNIST protocol (Figure 3, §5.1 and footnote 2; docs/METHOD.md §15
"Study protocol").

A fixed total of ``--total`` training images; for each real count k of a grid (default 20/40/60/
80/100% of the total), the k real images are a class-balanced, seeded prefix of one ordering of the
training split (so the subsets are nested). For each k:

1. a class-balanced validation split V is held out from the k real images (selection only);
2. the intermediate classifier and the diffusion model are trained on the k real images only;
3. every candidate guidance setting of the grid (``none`` = plain DDIM, then losses / pairs /
   conditional, each at a multiple of the loss's default scale) samples ``total - k`` images from
   the same initial noise (``total`` at k = total: footnote 2's all-synthetic point, from the
   model trained on all the real images), pseudo-labelled by the intermediate classifier;
4. a short TRADES run per candidate on (k real minus V) + the candidate's images, evaluated on V;
   the Contrastive-DP setting is the candidate with the best V robust accuracy (rule in
   :func:`choose`);
5. final TRADES runs (``--seeds`` each) on one training set of exactly ``total`` images and the
   same number of optimiser steps: k real alone (tiled to ``total``), k real + DDIM, k real +
   the chosen Contrastive-DP set; at k = total the real arm is the all-real baseline and the
   synthetic arms are ``total`` synthetic images alone; evaluated on the test split.

The test split is read only in step 5, after every selection run has finished. Diagnostics per
synthetic set: pseudo-label agreement with an "oracle" classifier trained on all real training
images, per-class counts, the sweep's fidelity / diversity / separability proxies (reference: the
k real images), the fraction of images whose pseudo-label changed from the unguided twin (same
noise), and one controlled run (``--control``). Every stage is cached (pipeline's ``_Stage``).

``python -m cdp_fast.study --summarize OUT`` prints the markdown tables of a finished study.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import diffusion_train, models, pseudolabel, trades
from .config import check_data_dir, check_eps, field, to_dict
from .figures import markdown_table, study_curves
from .guidance import LOSSES, ContrastiveGuidance, default_group_size, default_scale
from .pipeline import _comparisons, _key, _load_note, _Stage
from .sampler import DDIMSampler
from .sweep import _features_probs, set_metrics
from .utils import atomic_write_bytes, resolve_device, write_json

ARMS = ("real", "ddim", "contrastive-dp")
# a candidate: "none" (plain DDIM) or LOSS[-conditional][-real-positive|-real-negative]@FACTOR
_CAND = re.compile(r"^(?P<loss>" + "|".join(sorted(LOSSES, key=len, reverse=True)) +
                   r")(?P<cond>-conditional)?(?P<pair>-real-positive|-real-negative)?@(?P<f>[0-9.eE+-]+)$")
DEFAULT_GRID = ("none", "hnm@0.3", "hnm@1", "hnm-conditional@1", "hnm-real-negative@1", "infonce@1")
CONTROLS = ("oracle-labels", "twin-labels", "none")


@dataclass
class StudyConfig:
    data: str = field("digits", help="dataset: digits (built in), mnist, fashion-mnist, cifar10, gtsrb")
    data_dir: str | None = field(None, help="folder with the dataset files (not needed for digits)")
    out: str = field("runs/study", help="output folder (every stage cached here)")
    device: str = field("auto", help="auto | cpu | cuda[:i]")
    seed: int = field(0, help="seed of the real subsets, models and sampling noise")
    seeds: int = field(3, help="TRADES seeds per arm and real count (mean ± std over them)")
    total: int = field(500, help="training images of every final TRADES run (real + synthetic)")
    fractions: tuple[float, ...] = field((0.2, 0.4, 0.6, 0.8, 1.0), help="real counts as fractions "
                                          "of --total, each in (0, 1]")
    real_counts: tuple[int, ...] | None = field(None, help="real counts (overrides --fractions)")
    val_fraction: float = field(0.2, help="fraction of the k real images held out (class-balanced) "
                                "as the validation split that chooses the guidance")
    classifier_epochs: int = field(15, help="intermediate classifier epochs (at least; see --classifier-steps)")
    classifier_steps: int = field(300, help="at least this many optimiser steps (batch 64) for every "
                                  "classifier: 15 epochs of 100 images are 30 steps, which left the k = 100 "
                                  "classifier labelling every image one class")
    diffusion_iters: int = field(400, help="diffusion training iterations per real count "
                                 "(trimmed from the pipeline's 1000 for the budget)")
    sample_steps: int = field(20, help="DDIM steps (trimmed from the pipeline's 50)")
    sample_batch: int = field(500, help="sampling batch = contrastive group")
    t_min: int | None = field(400, help="guide steps with t >= t_min")
    grid: tuple[str, ...] = field(DEFAULT_GRID, help="guidance candidates: none (DDIM, always "
                                  "added) or LOSS[-conditional][-real-positive|-real-negative]@FACTOR, "
                                  "FACTOR x the loss's default scale (head space, this group size)")
    robust_steps: int = field(100, help="optimiser steps of every final TRADES run (rounded up to "
                              "whole epochs of the total-image set)")
    select_steps: int = field(100, help="optimiser steps of each selection TRADES run")
    batch_size: int = field(64, help="TRADES batch size")
    robust_model: str | None = field(None, help="robust classifier (default: the dataset's)")
    lr: float = field(3e-3, help="TRADES AdamW peak learning rate (the pipeline's)")
    schedule: str = field("constant", help="TRADES learning-rate schedule (digits' default, data.DEFAULTS: "
                          "cosine-to-zero left every 60-step selection run at chance)",
                          choices=("constant", "cosine", "onecycle"))
    eps: float | None = field(None, help="Linf radius (default: 0.1 on digits as in the pipeline, "
                              "else the dataset's)")
    attack_steps: int = field(5, help="TRADES attack steps (step size 2.5 eps / steps)")
    beta: float | None = field(None, help="TRADES beta (default: the dataset's, 1 on digits)")
    eval_attack_steps: int = field(20, help="PGD steps of validation and test evaluation")
    control: str = field("oracle-labels", help="controlled run at --control-k: the chosen "
                         "Contrastive-DP images relabelled by the all-real classifier "
                         "(oracle-labels) or by their unguided twins' pseudo-labels (twin-labels)",
                         choices=CONTROLS)
    control_k: int | None = field(None, help="real count of the controlled run (default: the smallest)")
    force: bool = field(False, help="recompute every stage")


# ---------------------------------------------------------------------------------------------
# settings
def parse_candidate(c: str) -> dict:
    """'none' or 'LOSS[-conditional][-real-positive|-real-negative]@FACTOR' -> its settings."""
    if c == "none":
        return {"name": "none", "loss": None, "conditional": False, "pair": None, "factor": 0.0}
    m = _CAND.match(c)
    if not m:
        raise ValueError(f"--grid entry {c!r} is not 'none' or LOSS[-conditional][-real-positive|"
                         f"-real-negative]@FACTOR with LOSS one of {', '.join(LOSSES)}")
    try:
        f = float(m["f"])
    except ValueError:
        raise ValueError(f"--grid entry {c!r}: factor {m['f']!r} is not a number") from None
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"--grid entry {c!r}: the scale factor must be a finite number > 0 "
                         f"('none' is the scale-0 candidate)")
    return {"name": c, "loss": m["loss"], "conditional": bool(m["cond"]),
            "pair": (m["pair"] or "-previous")[1:], "factor": f}


def real_counts(cfg: StudyConfig, n_train: int | None = None) -> list[int]:
    """The grid of real counts (sorted, unique); ValueError for bad input."""
    if cfg.real_counts is not None:
        if len(cfg.real_counts) == 0:
            raise ValueError("--real-counts is empty: give at least one real count")
        ks = [int(k) for k in cfg.real_counts]
    else:
        if len(cfg.fractions) == 0:
            raise ValueError("--fractions is empty: give at least one fraction in (0, 1]")
        for f in cfg.fractions:
            if not (isinstance(f, (int, float)) and math.isfinite(f) and 0 < f <= 1):
                raise ValueError(f"--fractions: {f!r} is outside (0, 1]")
        ks = [int(round(f * cfg.total)) for f in cfg.fractions]
    for k in ks:
        if k < 1:
            raise ValueError(f"real count {k} must be >= 1 (check --fractions / --real-counts)")
        if k > cfg.total:
            raise ValueError(f"real count {k} exceeds --total {cfg.total}")
        if n_train is not None and k > n_train:
            raise ValueError(f"real count {k} exceeds the {n_train} training images of the data set")
    return sorted(set(ks))


def _checks(cfg: StudyConfig) -> list[tuple[bool, str]]:
    c = cfg
    return [
        (c.total >= 2, f"--total must be >= 2, got {c.total}"),
        (c.seeds >= 1, f"--seeds must be >= 1, got {c.seeds}"),
        (0 < c.val_fraction < 1, f"--val-fraction must be in (0, 1), got {c.val_fraction}"),
        (c.classifier_epochs >= 1, f"--classifier-epochs must be >= 1, got {c.classifier_epochs}"),
        (c.classifier_steps >= 0, f"--classifier-steps must be >= 0, got {c.classifier_steps}"),
        (c.diffusion_iters >= 1, f"--diffusion-iters must be >= 1, got {c.diffusion_iters}"),
        (c.sample_steps >= 1, f"--sample-steps must be >= 1, got {c.sample_steps}"),
        (c.sample_batch >= 2, f"--sample-batch must be >= 2, got {c.sample_batch}"),
        (c.robust_steps >= 1, f"--robust-steps must be >= 1, got {c.robust_steps}"),
        (c.select_steps >= 1, f"--select-steps must be >= 1, got {c.select_steps}"),
        (c.batch_size >= 1, f"--batch-size must be >= 1, got {c.batch_size}"),
        (math.isfinite(c.lr) and c.lr > 0, f"--lr must be > 0, got {c.lr}"),
        (c.eps is None or c.eps > 0, f"--eps must be > 0, got {c.eps}"),
        (c.attack_steps >= 1, f"--attack-steps must be >= 1, got {c.attack_steps}"),
        (c.beta is None or c.beta >= 0, f"--beta must be >= 0, got {c.beta}"),
        (c.eval_attack_steps >= 1, f"--eval-attack-steps must be >= 1, got {c.eval_attack_steps}"),
        (len(c.grid) > 0, "--grid is empty: give at least one guidance candidate"),
    ]


_N_TRAIN = {"digits": 1437, "mnist": 60000, "fashion-mnist": 60000, "cifar10": 50000}


def resolve(cfg: StudyConfig) -> StudyConfig:
    """Check every setting (ValueError naming the flag) and fill in the defaults; nothing is
    loaded or written."""
    for ok, msg in _checks(cfg):
        if not ok:
            raise ValueError(msg)
    check_eps(cfg.eps)
    name = data_mod.canonical_name(cfg.data)
    check_data_dir(name, cfg.data_dir)
    resolve_device(cfg.device)
    ks = real_counts(cfg, _N_TRAIN.get(name))
    cands = [parse_candidate(c) for c in cfg.grid]
    if not any(c["loss"] for c in cands):
        raise ValueError("--grid has no guided candidate (only 'none'): nothing to choose")
    grid = tuple(dict.fromkeys(["none", *cfg.grid]))
    d = data_mod.dataset_defaults(name)
    model = cfg.robust_model or d["model"]
    if model.lower().replace("_", "-") not in models.NAMES:
        raise ValueError(f"--robust-model {model!r} is not a classifier this package builds")
    if cfg.control_k is not None and cfg.control_k not in ks:
        raise ValueError(f"--control-k {cfg.control_k} is not one of the real counts {ks}")
    for k in ks:
        v = _val_size(k, cfg.val_fraction, d["num_classes"])
        if k - v < 0 or (k < cfg.total and k - v < 1):
            raise ValueError(f"real count {k} is too small to hold out a validation split")
    return dataclasses.replace(
        cfg, data=name, grid=grid, robust_model=model, real_counts=tuple(ks),
        eps=float(cfg.eps if cfg.eps is not None else (0.1 if name == "digits" else d["eps"])),
        beta=float(cfg.beta if cfg.beta is not None else d["beta"]),
        control_k=cfg.control_k if cfg.control_k is not None else ks[0])


def _val_size(k: int, frac: float, num_classes: int) -> int:
    return min(k - 1, max(num_classes, int(round(frac * k)))) if k > 1 else 0


# ---------------------------------------------------------------------------------------------
# the real subsets (nested, class-balanced, seeded)
def subsets(y_train, ks, val_fraction: float, seed: int, num_classes: int) -> dict:
    """k -> {"real": sorted indices of the k real images, "val": V (held out from them),
    "fit": real minus V}. The real sets are prefixes of one class-balanced ordering, so nested."""
    y = np.asarray(y_train)
    # balanced_subset(y, n, seed) is the first n of one seeded class-balanced ordering: nested in n
    rng_sets = {k: data_mod.balanced_subset(y, k, seed) for k in ks}
    out = {}
    for k in ks:
        real = rng_sets[k]
        v = _val_size(k, val_fraction, num_classes)
        val = real[data_mod.balanced_subset(y[real], v, seed + 1)] if v else np.zeros(0, np.int64)
        fit = np.setdiff1d(real, val)
        out[k] = {"real": real.astype(np.int64), "val": val.astype(np.int64), "fit": fit.astype(np.int64)}
    return out


# ---------------------------------------------------------------------------------------------
def _image_data(name, x, y, xv, yv, num_classes) -> data_mod.ImageData:
    return data_mod.ImageData(name, x.contiguous(), y.contiguous(), xv.contiguous(), yv.contiguous(),
                              num_classes)


def _save_set(path: Path, images, labels, conf) -> None:
    buf = io.BytesIO()
    np.savez(buf, image=images.numpy(), label=labels.numpy(), confidence=conf.numpy())
    atomic_write_bytes(path, buf.getvalue())


def _load_set(path: Path):
    with np.load(path) as z:
        return (torch.from_numpy(z["image"].copy()), torch.from_numpy(z["label"].copy()),
                torch.from_numpy(z["confidence"].copy()))


def _guidance(cand: dict, clf, batch: int, t_min, real_x=None, real_y=None):
    if cand["loss"] is None:
        return None, 0.0
    G = default_group_size(batch)
    scale = cand["factor"] * default_scale(cand["loss"], "head", group_size=G)
    kw = {}
    if cand["pair"] != "previous":
        kw = dict(real_images=real_x, real_labels=real_y if cand["conditional"] else None)
    g = ContrastiveGuidance(cand["loss"], clf.features, head=True, scale=scale, t_min=t_min,
                            pair=cand["pair"], conditional=cand["conditional"], **kw)  # group: the batch
    return g, scale


def sample_set(unet, schedule, meta, guide, n: int, batch: int, steps: int, seed: int, device,
               labels=None) -> torch.Tensor:
    """n images (uint8 NCHW, CPU); batch i starts from seed + i with the same size whatever the
    guidance, so every candidate starts from the same initial noise image for image."""
    sampler = DDIMSampler(unet, schedule, steps=steps, guidance=guide, class_conditional=False)
    C, H, W = meta["image_shape"]
    out = []
    try:
        for i in range(-(-n // batch)):
            m = min(batch, n - i * batch)
            y = None if labels is None else labels[i * batch:i * batch + m].to(device)
            x0 = sampler.sample(m, (C, H, W), seed=seed + i, labels=y, device=device)
            out.append(data_mod.to_uint8((x0.float().clamp(-1, 1) + 1) / 2).cpu())
    finally:
        sampler.close()
    return torch.cat(out)


def _tile(idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n indices cycling through a seeded permutation of idx (each used floor or ceil(n/len) times)."""
    perm = np.random.RandomState(seed % 2**32).permutation(idx)
    return np.resize(perm, n)


def _clf_epochs(cfg, n: int, batch: int = 64) -> int:
    """Epochs of a classifier on n images: --classifier-epochs, or more to reach --classifier-steps."""
    per = max(1, -(-n // batch))
    return max(cfg.classifier_epochs, -(-cfg.classifier_steps // per))


def _steps_epochs(n: int, batch: int, steps: int) -> tuple[int, int]:
    """(epochs, optimiser steps) for >= steps steps on a set of n images (drop_last batches)."""
    per = max(1, n // batch)
    e = -(-steps // per)
    return e, e * per


def _trades_cfg(cfg: StudyConfig, out: Path, n: int, steps: int, seed: int) -> trades.TrainRobustConfig:
    """Explicit TRADES settings (the pipeline's: AdamW, eps 0.1 on digits, step 2.5 eps / K), no
    hidden validation split (val_size 0: best = last), synthetic images already in the set."""
    bs = min(cfg.batch_size, n)
    epochs, _ = _steps_epochs(n, bs, steps)
    return trades.TrainRobustConfig(
        data=cfg.data, data_dir=cfg.data_dir, model=cfg.robust_model, epochs=epochs, batch_size=bs,
        lr=cfg.lr, optimizer="adamw", schedule=cfg.schedule, eps=cfg.eps, step_size=2.5 * cfg.eps / cfg.attack_steps,
        attack_steps=cfg.attack_steps, beta=cfg.beta, eval_attack_steps=cfg.eval_attack_steps,
        val_size=0, synthetic_fraction=0.0, out=str(out), seed=seed, device=cfg.device)


def _train(cfg, st: _Stage, rcfg, data) -> dict:
    """Run (or reuse) one TRADES stage; its results plus the optimiser steps it actually took."""
    if not st.fresh:
        resume = st.resuming and (st.dir / trades.STATE_FILE).is_file()
        trades.train_robust(dataclasses.replace(rcfg, out=str(st.dir), resume=resume), data=data,
                            show_progress=False)
    r = json.loads((st.dir / "results.json").read_text())
    return {**r, "steps": json.loads((st.dir / "metrics.json").read_text())[-1]["step"]}


def choose(rows: list[dict]) -> dict:
    """The rule: the highest validation robust accuracy; ties -> higher validation clean accuracy,
    then the smaller scale (so 'none', plain DDIM, wins a full tie)."""
    if not rows:
        raise ValueError("choose: no candidates")
    best = max(rows, key=lambda r: (r["val_robust_acc"], r["val_clean_acc"], -r["scale"]))
    return {"candidate": best["name"], "scale": best["scale"],
            "rule": "highest validation PGD robust accuracy of a short TRADES run; ties: higher "
                    "validation clean accuracy, then the smaller scale (plain DDIM first)"}


def spearman(a, b) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when undefined."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return None

    def rank(x):
        o = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[o] = np.arange(len(x))
        for v in np.unique(x):
            m = x == v
            r[m] = r[m].mean()
        return r

    ra, rb = rank(a), rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


# ---------------------------------------------------------------------------------------------
def run(cfg: StudyConfig) -> dict:
    cfg = resolve(cfg)
    t_start = time.perf_counter()
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    full = data_mod.load_dataset(cfg.data, cfg.data_dir)
    name, nc = full.name, full.num_classes
    ks = real_counts(cfg, int(full.x_train.shape[0]))  # the data set's own size: before any file
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = full.x_train, full.y_train
    # the test split stays in `sealed` until every selection run has finished (phase 3)
    sealed = (full.x_test, full.y_test)
    del full
    subs = subsets(y_tr, ks, cfg.val_fraction, cfg.seed, nc)
    base = {"data": name, "data_dir": cfg.data_dir, "seed": cfg.seed, "total": cfg.total}
    write_json(out / "subsets.json", {str(k): {a: v.tolist() for a, v in s.items()} for k, s in subs.items()})
    timings: dict[str, float | None] = {}
    cached: list[str] = []

    def finish(key: str, st: _Stage, t0: float, **info) -> None:
        if st.fresh:
            cached.append(key)
        else:
            st.done(seconds=round(time.perf_counter() - t0, 2), **info)
        timings[key] = st.seconds

    def log(msg, st=None):
        print(f"[study] {msg}{' (cached)' if st is not None and st.fresh else ''}", flush=True)

    cands = {c: parse_candidate(c) for c in cfg.grid}
    per_k: dict[int, dict] = {}
    # --- phase 1: per real count, models, candidate sets, selection on V -----------------------
    for k in ks:
        s = subs[k]
        kdir = out / f"k{k}"
        kdir.mkdir(exist_ok=True)
        real, val, fit = (torch.from_numpy(s[a]) for a in ("real", "val", "fit"))
        xv, yv = x_tr[val], y_tr[val]
        kbase = {**base, "k": k, "real_idx": _key({"i": s["real"].tolist()})}
        d_k = _image_data(name, x_tr[real], y_tr[real], xv, yv, nc)  # x_test = V, never the test split
        t0 = time.perf_counter()
        st = _Stage(kdir, "classifier", {**kbase, "epochs": _clf_epochs(cfg, k)}, cfg.force)
        log(f"k={k}: intermediate classifier on the {k} real images", st)
        if not st.fresh:
            clf = pseudolabel.train_classifier(d_k, None, epochs=_clf_epochs(cfg, k), seed=cfg.seed,
                                               device=device, show_progress=False)
            models.save(clf, st.dir, name=_clf_name(name), data=name,
                        role="intermediate classifier")
        finish(f"k{k}/classifier", st, t0)
        clf_key = st.key
        clf = models.load(st.dir, device=device).eval()

        t0 = time.perf_counter()
        dcfg = diffusion_train.TrainDiffusionConfig(data=name, data_dir=cfg.data_dir, iters=cfg.diffusion_iters,
                                                    seed=cfg.seed, device=cfg.device)
        dbatch = diffusion_train.resolve_settings(dcfg, name)["batch_size"]
        if dbatch > k:  # train-diffusion refuses a batch larger than its set (tiny real counts)
            dcfg = dataclasses.replace(dcfg, batch_size=k)
        st = _Stage(kdir, "diffusion", {**kbase, "iters": cfg.diffusion_iters}, cfg.force)
        log(f"k={k}: diffusion model on the {k} real images ({cfg.diffusion_iters} iterations)", st)
        if not st.fresh:
            diffusion_train.train_diffusion(dataclasses.replace(dcfg, out=str(st.dir)), data=d_k)
        finish(f"k{k}/diffusion", st, t0)
        diff_key = st.key
        unet, schedule, meta = diffusion_train.load_diffusion(st.dir, device=device)

        # candidate sets: total - k images (footnote 2: total at k = total), same noise
        n_syn = cfg.total - k if k < cfg.total else cfg.total
        real_model = (x_tr[real].float() / 127.5 - 1).to(device)
        sets, set_keys, scales, broken = {}, {}, {}, {}
        for c in cfg.grid:  # "none" first: the conditional candidates use its pseudo-labels
            cand = cands[c]
            t0 = time.perf_counter()
            g, scale = _guidance(cand, clf, min(cfg.sample_batch, n_syn), cfg.t_min, real_model,
                                 y_tr[real].to(device))
            scales[c] = scale
            st = _Stage(kdir / "sets", _safe(c), {**kbase, "clf": clf_key, "diffusion": diff_key, "n": n_syn,
                                                   "steps": cfg.sample_steps, "batch": cfg.sample_batch,
                                                   "t_min": cfg.t_min, "cand": c}, cfg.force)
            log(f"k={k}: {n_syn} images, {c}", st)
            if not st.fresh:
                labels = sets["none"][1] if cand["conditional"] else None
                try:
                    imgs = sample_set(unet, schedule, meta, g, n_syn, cfg.sample_batch, cfg.sample_steps,
                                      cfg.seed + 1000, device, labels=labels)
                except ValueError as e:  # NaN/inf or a guidance precondition: out of the grid, not fatal
                    if c == "none":
                        raise
                    broken[c] = str(e)
                    log(f"k={k}: candidate {c} failed ({e}); left out of the selection")
                    continue
                lab, conf = pseudolabel.pseudo_label(clf, imgs.to(device))
                _save_set(st.dir / "set.npz", imgs, lab.cpu(), conf.cpu())
            finish(f"k{k}/set/{c}", st, t0, scale=scale)
            set_keys[c] = st.key
            sets[c] = _load_set(st.dir / "set.npz")
        del unet

        # selection: short TRADES on (k real minus V) + candidate, evaluated on V
        rows = []
        use_real = k < cfg.total
        for c in sets:
            xs, ys, _ = sets[c]
            x = torch.cat([x_tr[fit], xs]) if use_real else xs
            y = torch.cat([y_tr[fit], ys]) if use_real else ys
            t0 = time.perf_counter()
            rcfg = _trades_cfg(cfg, kdir / "select" / _safe(c), len(x), cfg.select_steps, cfg.seed)
            st = _Stage(kdir / "select", _safe(c), {**kbase, **_tkey(rcfg), "set": set_keys[c],
                                                    "val_idx": _key({"i": s["val"].tolist()})}, cfg.force)
            log(f"k={k}: selection run {c} ({len(x)} images, validation {len(val)})", st)
            r = _train(cfg, st, rcfg, _image_data(name, x, y, xv, yv, nc))
            finish(f"k{k}/select/{c}", st, t0)
            rows.append({"name": c, "scale": scales[c], "val_clean_acc": r["clean_acc"],
                         "val_robust_acc": r["robust_acc"], "n_train": len(x),
                         "steps": r["steps"]})
        chosen = choose(rows)
        log(f"k={k}: chosen {chosen['candidate']}")
        per_k[k] = {"sets": sets, "set_keys": set_keys, "selection": rows, "choice": chosen, "broken": broken,
                    "clf_key": clf_key, "n_syn": n_syn, "scales": scales}

    # --- phase 2: diagnostics (oracle classifier: all real training images; no test split) ------
    t0 = time.perf_counter()
    st = _Stage(out, "oracle", {**base, "epochs": _clf_epochs(cfg, int(x_tr.shape[0]))}, cfg.force)
    log("oracle classifier on all real training images (diagnostics only)", st)
    n_all = int(x_tr.shape[0])
    if not st.fresh:
        d_all = _image_data(name, x_tr, y_tr, x_tr[:0], y_tr[:0], nc)
        o = pseudolabel.train_classifier(d_all, None, epochs=_clf_epochs(cfg, len(d_all.y_train)), seed=cfg.seed,
                                         device=device, show_progress=False)
        models.save(o, st.dir, name=_clf_name(name), data=name, role="oracle (diagnostics)")
    finish("oracle", st, t0)
    oracle = models.load(st.dir, device=device).eval()
    diagnostics = {}
    for k in ks:
        clf = models.load(out / f"k{k}" / "classifier", device=device).eval()
        ref_f, _ = _features_probs(clf, x_tr[torch.from_numpy(subs[k]["real"])], device)
        sets = per_k[k]["sets"]
        twin = sets["none"][1]
        dk = {}
        for c, (xs, ys, conf) in sets.items():
            f, p = _features_probs(clf, xs, device)
            ol, _ = pseudolabel.pseudo_label(oracle, xs.to(device))
            m = set_metrics(f, p, ref_f, seed=cfg.seed)
            dk[c] = {"n": len(xs), "oracle_agreement": float((ol.cpu() == ys).float().mean()),
                     "label_changed_vs_ddim": float((ys != twin).float().mean()),
                     "mean_confidence": float(conf.float().mean()),
                     "label_counts": torch.bincount(ys, minlength=nc).tolist(),
                     "pixel_change_vs_ddim": float((xs.float() - sets["none"][0].float()).abs().mean() / 255),
                     **{a: m[a] for a in ("fidelity", "diversity", "separability", "probe_accuracy", "confidence")}}
            if c == per_k[k]["choice"]["candidate"]:
                per_k[k]["oracle_labels"] = ol.cpu()
        diagnostics[k] = dk
    # proxy vs downstream (validation robust accuracy) rank correlations, pooled over k
    proxies = ("fidelity", "diversity", "separability", "probe_accuracy", "confidence", "oracle_agreement",
               "label_changed_vs_ddim")
    pairs = [(diagnostics[k][r["name"]], r["val_robust_acc"]) for k in ks for r in per_k[k]["selection"]]
    proxy_corr = {p: spearman([d[p] for d, _ in pairs], [v for _, v in pairs]) for p in proxies}
    proxy_corr_per_k = {k: {p: spearman([diagnostics[k][r["name"]][p] for r in per_k[k]["selection"]],
                                        [r["val_robust_acc"] for r in per_k[k]["selection"]]) for p in proxies}
                        for k in ks}

    # --- phase 3: final runs on the test split (first read here) --------------------------------
    x_te, y_te = sealed
    final: dict[int, dict[str, list]] = {}
    for k in ks:
        s = subs[k]
        kdir = out / f"k{k}"
        real = s["real"]
        kbase = {**base, "k": k, "real_idx": _key({"i": real.tolist()})}
        sets = per_k[k]["sets"]
        ch = per_k[k]["choice"]["candidate"]
        arm_sets = {"real": None, "ddim": "none", "contrastive-dp": ch}
        if k == cfg.control_k and cfg.control != "none":
            arm_sets["control"] = ch
        final[k] = {a: [] for a in arm_sets}
        for seed_i in range(cfg.seeds):
            for arm, c in arm_sets.items():
                if arm == "real":
                    idx = torch.from_numpy(_tile(real, cfg.total, cfg.seed + seed_i))
                    x, y = x_tr[idx], y_tr[idx]
                else:
                    xs, ys, _ = sets[c]
                    if arm == "control":
                        ys = per_k[k]["oracle_labels"] if cfg.control == "oracle-labels" else sets["none"][1]
                    x = torch.cat([x_tr[torch.from_numpy(real)], xs]) if k < cfg.total else xs
                    y = torch.cat([y_tr[torch.from_numpy(real)], ys]) if k < cfg.total else ys
                assert len(x) == cfg.total, (arm, k, len(x))
                t0 = time.perf_counter()
                rcfg = _trades_cfg(cfg, kdir / "final" / f"{arm}-seed{seed_i}", len(x), cfg.robust_steps,
                                   cfg.seed + seed_i)
                st = _Stage(kdir / "final", f"{arm}-seed{seed_i}",
                            {**kbase, **_tkey(rcfg), "arm": arm, "control": cfg.control if arm == "control" else None,
                             "set": None if c is None else per_k[k]["set_keys"][c]}, cfg.force)
                log(f"k={k}: final TRADES {arm} seed {cfg.seed + seed_i} ({len(x)} images)", st)
                r = _train(cfg, st, rcfg, _image_data(name, x, y, x_te, y_te, nc))
                finish(f"k{k}/final/{arm}-seed{seed_i}", st, t0)
                final[k][arm].append({**{a: r[a] for a in ("clean_acc", "robust_acc", "n_test", "steps")},
                                      "n_train": len(x), "seed": cfg.seed + seed_i})

    # --- phase 4: aggregate, verdicts, figures, results.json --------------------------------------
    n_test = int(x_te.shape[0])
    table = {}
    for k in ks:
        arms = {}
        for arm, rs in final[k].items():
            c = np.array([r["clean_acc"] for r in rs])
            rb = np.array([r["robust_acc"] for r in rs])
            arms[arm] = {"clean_acc": float(c.mean()), "robust_acc": float(rb.mean()),
                         "clean_acc_std": float(c.std()), "robust_acc_std": float(rb.std()),
                         "seeds": len(rs), "steps": rs[0]["steps"], "n_train": rs[0]["n_train"],
                         "per_seed": rs}
        cmp = _comparisons(arms, n_test)
        if "control" in arms:  # the same formula: control in the "ddim" slot, Contrastive-DP in "real"
            swapped = {"real": arms["contrastive-dp"], "ddim": arms["control"], "contrastive-dp": arms["control"]}
            cmp += [dict(c, a="control", b="contrastive-dp") for c in _comparisons(swapped, n_test)
                    if c["a"] == "ddim" and c["b"] == "real"]
        table[k] = {"arms": arms, "comparisons": cmp}
    baseline = table[max(ks)]["arms"]["real"] if max(ks) == cfg.total else None
    fig = study_curves({k: table[k]["arms"] for k in ks}, out / "study.png", baseline=baseline,
                       total=cfg.total, title=f"{name}: {cfg.total} training images, TRADES eps={cfg.eps:g}")
    timings["total_this_run"] = round(time.perf_counter() - t_start, 2)
    results = {
        "data": name, "total": cfg.total, "real_counts": ks, "n_test": n_test, "n_train_available": n_all,
        "table": {str(k): table[k] for k in ks},
        "all_real_baseline": baseline,
        "choices": {str(k): {**per_k[k]["choice"], "selection": per_k[k]["selection"],
                             "failed_candidates": per_k[k]["broken"]} for k in ks},
        "diagnostics": {str(k): diagnostics[k] for k in ks},
        "proxy_rank_correlation": proxy_corr,
        "proxy_rank_correlation_per_k": {str(k): v for k, v in proxy_corr_per_k.items()},
        "control": {"kind": cfg.control, "k": cfg.control_k},
        "validation_sizes": {str(k): int(len(subs[k]["val"])) for k in ks},
        "timings_s": timings, "cached_stages": cached, "device": str(device), "load_at_end": _load_note(),
        "figure": str(fig), "config": to_dict(cfg),
    }
    write_json(out / "results.json", results)
    atomic_write_bytes(out / "report.md", (summarize(out) + "\n").encode())
    print(f"[study] done in {timings['total_this_run']:.0f}s: {out / 'report.md'}")
    return results


def _clf_name(name: str) -> str:
    return data_mod.dataset_defaults(name)["model"]


def _safe(c: str) -> str:
    return c.replace("@", "_at_")


def _tkey(rcfg) -> dict:
    return {k: v for k, v in to_dict(rcfg).items() if k not in ("out", "device", "resume")}



# ---------------------------------------------------------------------------------------------
def _pm(a: dict, key: str) -> str:
    return f"{100 * a[key]:.2f} ± {100 * a[key + '_std']:.2f}"


def _findings(r: dict) -> list[str]:
    """Plain statements read off the comparisons (robust and clean), one per real count, plus the
    controlled run; every number and verdict comes from results.json."""
    out = []
    names = {("ddim", "real"): "synthetic (DDIM) vs k real alone",
             ("contrastive-dp", "real"): "Contrastive-DP vs k real alone",
             ("contrastive-dp", "ddim"): "guidance (Contrastive-DP vs DDIM)",
             ("control", "contrastive-dp"): "controlled run vs Contrastive-DP"}
    for k in r["real_counts"]:
        t = r["table"][str(k)]
        parts = []
        for (a, b), label in names.items():
            cs = {c["metric"]: c for c in t["comparisons"] if c["a"] == a and c["b"] == b}
            if not cs:
                continue
            parts.append(f"{label}: " + ", ".join(
                f"{m.replace('_acc', '')} {100 * c['difference']:+.2f} ({'within' if c['within_noise'] else 'beyond'} noise)"
                for m, c in cs.items()))
        ch = r["choices"][str(k)]
        real_note = " (all synthetic vs the all-real baseline)" if k == r["total"] else ""
        if ch["candidate"] == "none":
            parts.append("validation chose no guidance, so the Contrastive-DP arm is the DDIM set")
        out.append(f"k = {k}{real_note}, chosen guidance {ch['candidate']}: " + "; ".join(parts) + ".")
    return out


def summarize(out) -> str:
    """Markdown tables of a finished study (from its results.json)."""
    r = json.loads((Path(out) / "results.json").read_text())
    seeds = r["config"]["seeds"]
    rows = []
    for k in r["real_counts"]:
        t = r["table"][str(k)]
        for arm, a in t["arms"].items():
            rows.append([k, arm, a["n_train"], a["steps"], _pm(a, "clean_acc"), _pm(a, "robust_acc")])
    cmp_rows = []
    for k in r["real_counts"]:
        for c in r["table"][str(k)]["comparisons"]:
            cmp_rows.append([k, f"{c['a']} − {c['b']}", c["metric"].replace("_acc", ""),
                             f"{100 * c['difference']:+.2f}", f"± {200 * c['noise_se']:.2f}",
                             "within noise" if c["within_noise"] else "beyond noise"])
    ch_rows = []
    for k in r["real_counts"]:
        ch = r["choices"][str(k)]
        sel = " · ".join(f"{s['name']}: {100 * s['val_robust_acc']:.0f}" for s in ch["selection"])
        ch_rows.append([k, r["validation_sizes"][str(k)], ch["candidate"], f"{ch['scale']:.3g}", sel])
    dg_rows = []
    for k in r["real_counts"]:
        chosen = r["choices"][str(k)]["candidate"]
        for c, d in r["diagnostics"][str(k)].items():
            if c not in ("none", chosen):
                continue
            dg_rows.append([k, "ddim" if c == "none" else f"cdp ({c})", f"{100 * d['oracle_agreement']:.1f}",
                            f"{100 * d['label_changed_vs_ddim']:.1f}", f"{d['pixel_change_vs_ddim']:.4f}",
                            f"{d['fidelity']:.3g}", f"{d['diversity']:.3g}", f"{d['confidence']:.3f}",
                            "/".join(map(str, d["label_counts"]))])
    facts = _findings(r)
    pc = r["proxy_rank_correlation"]
    per_k = r["proxy_rank_correlation_per_k"]

    def fmt(v):
        return "n/a" if v is None else f"{v:+.2f}"

    pc_rows = [[p, fmt(v), *(fmt(per_k[str(k)][p]) for k in r["real_counts"])] for p, v in pc.items()]
    base = r["all_real_baseline"]
    tim = r["timings_s"]
    ctl = r["control"]
    return "\n\n".join([
        f"# cdp-fast study: {r['data']}, {r['total']} training images per run",
        f"Test split: {r['n_test']} images; mean ± std over {seeds} TRADES seeds (%); all-real baseline "
        + (f"{_pm(base, 'clean_acc')} clean / {_pm(base, 'robust_acc')} robust." if base else "not in the grid."),
        markdown_table(rows, ["real k", "arm", "train images", "steps", "clean", "robust (PGD)"]),
        "Differences (points) with a 95% noise interval (2 s.e.: binomial on the test size or the "
        "seed spread, whichever is larger):",
        markdown_table(cmp_rows, ["real k", "arms", "acc", "difference", "noise (95%)", "verdict"]),
        "## Guidance chosen on the validation split",
        markdown_table(ch_rows, ["real k", "|V|", "chosen", "scale", "validation robust acc per candidate (%)"]),
        "## Diagnostics of the synthetic sets",
        "oracle agr = pseudo-labels agreeing with a classifier trained on all real training images; "
        "label moved = pseudo-label differs from the unguided twin (same noise); fidelity = "
        "classifier-feature Fréchet distance to the k real images (lower is closer).",
        markdown_table(dg_rows, ["real k", "set", "oracle agr %", "label moved %", "pixel change",
                                 "fidelity", "diversity", "confidence", "class counts"]),
        "Spearman rank correlation of each proxy with validation robust accuracy: pooled over every "
        "candidate and real count (confounded by k), then within each real count (over its candidates):",
        markdown_table(pc_rows, ["proxy", "pooled", *(f"k={k}" for k in r["real_counts"])]),
        f"Controlled run ({ctl['kind']}) at k = {ctl['k']}: see the 'control' arm and its "
        f"'control − contrastive-dp' rows above.",
        "## What the numbers say (generated from results.json)",
        "\n".join(f"- {f}" for f in facts),
        f"Wall time this run: {tim.get('total_this_run')} s (cached stages keep their own time); "
        f"1-min load average at the end: {(r.get('load_at_end') or {}).get('load_1min')}.",
        "![study](study.png)",
    ])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--summarize":
        print(summarize(argv[1]))
        return 0
    print("usage: python -m cdp_fast.study --summarize OUT   (run the study with `cdp-fast study`)")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
