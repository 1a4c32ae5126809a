"""`cdp-fast eval`: clean and robust accuracy of a classifier checkpoint (PGD, CW-PGD, AutoAttack).

PGD and CW-PGD are :mod:`cdp_fast.attacks`; ``autoattack`` is APGD-CE + APGD-T
(:mod:`cdp_fast.autoattack`, Croce & Hein 2020: the gradient-based part of standard AutoAttack,
named as such in the results). Nothing beyond the package's own dependencies is needed. All
accuracies are fractions in [0, 1]; the result carries the settings of the attack that ran.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import attacks, models
from . import autoattack as aa
from . import data as data_mod
from .config import check_eps, field
from .data import DATASETS, as_float01, dataset_defaults
from .training import PRECISIONS, resolve_eval_precision, resolve_precision  # noqa: F401 (re-exported)
from .utils import progress, resolve_device, write_json

ATTACKS = ("pgd", "cw", "autoattack")


def _eps_defaults() -> str:
    def fmt(e):
        k = e * 255
        return f"{round(k)}/255" if abs(k - round(k)) < 1e-9 else f"{e:g}"

    return ", ".join(f"{n} {fmt(dataset_defaults(n)['eps'])}" for n in DATASETS)


@dataclass
class EvalConfig:
    checkpoint: str = field("", help="classifier checkpoint folder (model.safetensors + config.json), "
                                     "a train-robust run folder (its best/ is used), or an external "
                                     "weights file (.pt/.pth/.ckpt/.safetensors, with --arch)", required=True)
    arch: str | None = field(None, help="architecture of an external weights file (e.g. wrn-28-10-swish, "
                             "preact-resnet18, small-cnn); not needed for cdp-fast checkpoint folders")
    data: str = field("digits", help="dataset name: digits, mnist, fashion-mnist, cifar10, gtsrb")
    data_dir: str | None = field(None, help="folder with the dataset files")
    eps: float | None = field(None, help="Linf radius in [0, 1] pixel units, fractions like 8/255 accepted "
                                         "(default: the eps the checkpoint was trained with when its "
                                         "config.json records one, else the dataset's: "
                                         f"{_eps_defaults()}; the output says which)")
    attack: str = field("pgd", help="pgd (PGD on cross-entropy), cw (PGD on the CW margin) or autoattack "
                                    "(APGD-CE + APGD-T, the gradient-based part of standard AutoAttack, "
                                    "Croce & Hein 2020; built in)", choices=ATTACKS)
    steps: int = field(20, help="attack steps (PGD / CW)")
    step_size: float | None = field(None, help="attack step size (default 2.5*eps/steps)")
    restarts: int = field(1, help="random restarts (worst case per example is kept; AutoAttack: per "
                                  "APGD run, standard 1)")
    aa_iters: int = field(100, help="AutoAttack: iterations per APGD run (standard: 100)")
    aa_targets: int = field(9, help="AutoAttack: APGD-T target classes (standard: 9; at most classes - 1)")
    limit: int | None = field(None, help="evaluate only the first N test images")
    batch_size: int = field(256, help="evaluation batch size")
    precision: str = field("auto", help="precision of the model under attack: auto (fp32 on every "
                           "device, as the field reports robustness: low-precision gradients can weaken an "
                           "attack), fp32, bf16, fp16", choices=("auto",) + PRECISIONS)
    json: str | None = field(None, help="write the result JSON here (checked writable before the "
                                        "evaluation starts; the metrics are printed in any case)")
    device: str = field("auto", help="auto | cpu | cuda[:i]")
    seed: int = field(0, help="random seed (attack random starts)")




def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, attack: str = "pgd",
             steps: int = 20, restarts: int = 1, step_size: float | None = None,
             batch_size: int = 256, device: str | torch.device | None = None, seed: int = 0,
             precision: str = "auto", show_progress: bool = True, aa_iters: int = 100,
             aa_targets: int = 9) -> dict:
    """Clean and robust accuracy of ``model`` on (x, y); x uint8 or float [0,1] NCHW.

    Returns {"clean_acc", "robust_acc", "attack", "eps", "n", "seconds"} plus the attack's own
    settings: "steps", "restarts" for PGD / CW; ``autoattack.settings`` (attack_name, components,
    n_iter, n_target_classes, restarts, ...) for AutoAttack. Robust accuracy counts an example as
    robust only if it is classified correctly both clean and under the attack.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("nothing to evaluate: 0 images")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    prec = resolve_eval_precision(precision, dev)  # auto: fp32 attacks
    was_training = model.training
    model.eval()
    gen = torch.Generator(dev).manual_seed(seed)
    clean = robust = 0
    t0 = time.perf_counter()
    starts = range(0, x.shape[0], batch_size)
    try:
        for i in progress(starts, total=len(starts), desc=f"eval {attack}", leave=False,
                          disable=None if show_progress else True):
            xb = as_float01(x[i:i + batch_size].to(dev, non_blocking=True))
            yb = y[i:i + batch_size].to(dev, non_blocking=True)
            logits = attacks.predict(model, xb, prec)
            n_classes = logits.shape[1]
            ok = logits.argmax(1) == yb
            if attack == "autoattack":
                xa = aa.autoattack(model, xb, yb, eps=eps, n_iter=aa_iters, n_targets=aa_targets,
                                   restarts=restarts, generator=gen, precision=prec,
                                   show_progress=show_progress)
            else:
                xa = attacks.pgd(model, xb, yb, eps=eps, step_size=step_size, steps=steps,
                                 restarts=restarts, loss="ce" if attack == "pgd" else "cw",
                                 generator=gen, precision=prec)
            ok_adv = ok & (attacks.predict(model, xa, prec).argmax(1) == yb)
            clean += int(ok.sum())
            robust += int(ok_adv.sum())
    finally:
        model.train(was_training)
    n = int(x.shape[0])
    res = {"clean_acc": clean / n, "robust_acc": robust / n, "attack": attack, "eps": float(eps), "n": n,
           "seconds": time.perf_counter() - t0, "precision": prec}
    if attack == "autoattack":
        res.update(aa.settings(eps=eps, n_iter=aa_iters, restarts=restarts,
                               n_targets=aa.target_count(aa_targets, n_classes)))
    else:
        res.update(steps=int(steps), restarts=int(restarts),
                   step_size=float(step_size if step_size is not None else 2.5 * eps / max(steps, 1)))
    return res


def resolve_checkpoint(path: str) -> Path:
    """A classifier checkpoint folder; a train-robust run folder resolves to its best/ (said on stderr)."""
    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").is_file():
        for sub in ("best", "last"):
            if (p / sub / "model.safetensors").is_file():
                print(f"[eval] {p} is a training run folder: evaluating its {sub}/ checkpoint "
                      f"({p / sub})", file=sys.stderr)
                return p / sub
    return p


def _check_json_path(path: str) -> None:
    """--json must be writable: checked before the evaluation (which can take hours) starts."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--json {path} is a folder; give a file name (e.g. {p / 'eval.json'})")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folders that would be created under the first existing one
    if not parent.is_dir():
        raise ValueError(f"--json {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"--json {path} is not writable (no permission in {parent}); choose another path")


def resolve(cfg: EvalConfig) -> EvalConfig:
    """CLI hook: every setting checked before the checkpoint or the data is loaded."""
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required (a folder with model.safetensors + config.json)")
    check_eps(cfg.eps)
    data_mod.canonical_name(cfg.data)
    for ok, msg in ((cfg.steps >= 1 or cfg.attack == "autoattack", f"--steps must be >= 1, got {cfg.steps}"),
                    (cfg.restarts >= 1, f"--restarts must be >= 1, got {cfg.restarts}"),
                    (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}"),
                    (cfg.limit is None or cfg.limit >= 1, f"--limit must be >= 1, got {cfg.limit}"),
                    (cfg.aa_iters >= 1, f"--aa-iters must be >= 1, got {cfg.aa_iters}"),
                    (cfg.aa_targets >= 0, f"--aa-targets must be >= 0, got {cfg.aa_targets}"),
                    (cfg.step_size is None or cfg.step_size > 0, f"--step-size must be > 0, got {cfg.step_size}")):
        if not ok:
            raise ValueError(msg)
    p = Path(cfg.checkpoint)  # a missing one is reported by models.load (a clean error, exit 2)
    if p.is_file() and p.name not in ("model.safetensors", "config.json") and not cfg.arch:
        raise ValueError(f"--checkpoint {cfg.checkpoint} is a weights file, not a cdp-fast checkpoint folder: "
                         f"give its architecture with --arch (e.g. --arch wrn-28-10-swish)")
    return cfg


def checkpoint_eps(model: nn.Module, data: str) -> float | None:
    """The eps a checkpoint was trained with (train-robust records it in config.json), if it was
    trained on ``data``; None when not recorded."""
    ck = getattr(model, "checkpoint_config", {}) or {}
    eps = ck.get("eps")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    try:
        if "data" in ck and data_mod.canonical_name(str(ck["data"])) != data_mod.canonical_name(data):
            return None
    except ValueError:
        return None
    return float(eps)


def run(cfg: EvalConfig) -> dict:
    cfg = resolve(cfg)
    if cfg.json:  # before the checkpoint, the data or the evaluation (which can take hours)
        _check_json_path(cfg.json)
    dev = resolve_device(cfg.device)
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    if not checkpoint.exists():  # before the data set is read (or downloaded)
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist (a checkpoint folder with "
                                f"model.safetensors + config.json, a train-robust run folder or a weights file)")
    ds = data_mod.load_dataset(cfg.data, cfg.data_dir)
    model = models.load(checkpoint, device=dev, arch=cfg.arch, image_size=ds.x_test.shape[-1])
    ck = getattr(model, "checkpoint_config", {}) or {}
    want = {"in_channels": ds.x_test.shape[1], "image_size": ds.x_test.shape[-1], "num_classes": ds.num_classes}
    wrong = {k: (ck[k], v) for k, v in want.items() if k in ck and int(ck[k]) != int(v)}
    if wrong:
        raise ValueError(f"checkpoint {checkpoint} does not fit dataset {cfg.data!r}: "
                         + ", ".join(f"{k} {a} (checkpoint) vs {b} (data)" for k, (a, b) in wrong.items()))
    if cfg.eps is not None:
        eps, eps_source = float(cfg.eps), "--eps"
    elif (trained := checkpoint_eps(model, cfg.data)) is not None:
        eps, eps_source = trained, "the checkpoint's training eps"
    else:
        eps, eps_source = float(data_mod.defaults_for(cfg.data).eps), f"the {data_mod.canonical_name(cfg.data)} default"
    if cfg.eps is None:
        print(f"[eval] eps {eps:.6g} ({eps_source}; --eps to choose another)", file=sys.stderr)
    x, y = ds.x_test, ds.y_test
    if cfg.limit is not None:
        x, y = x[:cfg.limit], y[:cfg.limit]
    res = evaluate(model, x, y, eps=eps, attack=cfg.attack, steps=cfg.steps, restarts=cfg.restarts,
                   step_size=cfg.step_size, batch_size=cfg.batch_size, device=dev, seed=cfg.seed,
                   precision=cfg.precision, aa_iters=cfg.aa_iters, aa_targets=cfg.aa_targets)
    res.update(checkpoint=str(checkpoint), data=cfg.data, eps_source=eps_source)
    if cfg.json:
        try:
            write_json(cfg.json, res)
        except OSError:
            print(json.dumps(res, indent=2, default=str))  # the metrics are never lost
            raise
    return res
