"""`cdp-fast eval`: clean and robust accuracy of a classifier checkpoint (PGD, CW-PGD, AutoAttack).

PGD and CW-PGD are ours (:mod:`cdp_fast.attacks`); AutoAttack (standard version, Linf) uses
torchattacks when the ``eval`` extra is installed. All accuracies are fractions in [0, 1].
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import attacks
from .config import field
from .data import as_float01
from .training import PRECISIONS, resolve_precision
from .utils import progress, resolve_device, write_json

ATTACKS = ("pgd", "cw", "autoattack")


@dataclass
class EvalConfig:
    checkpoint: str = field("", help="model folder (model.safetensors + config.json)")
    data: str = field("digits", help="dataset name: digits, mnist, fashion-mnist, cifar10, gtsrb")
    data_dir: str | None = field(None, help="folder with the dataset files")
    eps: float | None = field(None, help="Linf radius in [0,1] pixel units (default: the dataset's)")
    attack: str = field("pgd", help="attack", choices=ATTACKS)
    steps: int = field(20, help="attack steps (PGD / CW)")
    step_size: float | None = field(None, help="attack step size (default 2.5*eps/steps)")
    restarts: int = field(1, help="random restarts (worst case per example is kept)")
    limit: int | None = field(None, help="evaluate only the first N test images")
    batch_size: int = field(256, help="evaluation batch size")
    precision: str = field("auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16",
                           choices=("auto",) + PRECISIONS)
    json: str | None = field(None, help="write the result JSON here")
    device: str = field("auto", help="auto | cpu | cuda[:i]")
    seed: int = field(0, help="random seed (attack random starts)")


def _autoattack(model, x, y, eps, seed, batch_size):
    try:
        import torchattacks  # noqa: F401
    except ImportError as e:
        raise ValueError("attack 'autoattack' needs torchattacks: pip install 'cdp-fast[eval]' "
                         "(or pip install torchattacks); 'pgd' and 'cw' work without it") from e
    n_classes = None
    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    atk = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                  n_classes=n_classes, seed=seed)
    return atk(x, y)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, attack: str = "pgd",
             steps: int = 20, restarts: int = 1, step_size: float | None = None,
             batch_size: int = 256, device: str | torch.device | None = None, seed: int = 0,
             precision: str = "auto", show_progress: bool = True) -> dict:
    """Clean and robust accuracy of ``model`` on (x, y); x uint8 or float [0,1] NCHW.

    Returns {"clean_acc", "robust_acc", "attack", "eps", "steps", "restarts", "n", "seconds"}.
    Robust accuracy counts an example as robust only if it is classified correctly both clean
    and under the attack.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} images but y has {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("nothing to evaluate: 0 images")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    prec = resolve_precision(precision, dev)
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
            ok = attacks.predict(model, xb, prec).argmax(1) == yb
            if attack == "autoattack":
                xa = _autoattack(model, xb, yb, eps, seed, batch_size)
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
    return {"clean_acc": clean / n, "robust_acc": robust / n, "attack": attack, "eps": float(eps),
            "steps": int(steps), "restarts": int(restarts), "n": n,
            "seconds": time.perf_counter() - t0}


def run(cfg: EvalConfig) -> dict:
    from . import data as data_mod
    from . import models

    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required (a folder with model.safetensors + config.json)")
    dev = resolve_device(cfg.device)
    model = models.load(cfg.checkpoint, device=dev)
    ds = data_mod.load_dataset(cfg.data, cfg.data_dir)
    ck = getattr(model, "checkpoint_config", {}) or {}
    want = {"in_channels": ds.x_test.shape[1], "image_size": ds.x_test.shape[-1], "num_classes": ds.num_classes}
    wrong = {k: (ck[k], v) for k, v in want.items() if k in ck and int(ck[k]) != int(v)}
    if wrong:
        raise ValueError(f"checkpoint {cfg.checkpoint} does not fit dataset {cfg.data!r}: "
                         + ", ".join(f"{k} {a} (checkpoint) vs {b} (data)" for k, (a, b) in wrong.items()))
    eps = cfg.eps if cfg.eps is not None else float(data_mod.dataset_defaults(cfg.data)["eps"])
    x, y = ds.x_test, ds.y_test
    if cfg.limit is not None:
        if cfg.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {cfg.limit}")
        x, y = x[:cfg.limit], y[:cfg.limit]
    res = evaluate(model, x, y, eps=eps, attack=cfg.attack, steps=cfg.steps, restarts=cfg.restarts,
                   step_size=cfg.step_size, batch_size=cfg.batch_size, device=dev, seed=cfg.seed,
                   precision=cfg.precision)
    res.update(checkpoint=str(cfg.checkpoint), data=cfg.data)
    if cfg.json:
        write_json(cfg.json, res)
    return res
