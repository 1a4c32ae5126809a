"""`cdp-fast train-robust`: mixed-precision TRADES adversarial training (METHOD.md §10).

    x_adv = TRADES-PGD(x)              (uniform start, K signed steps on KL(p(x) || p(x_adv)))
    loss  = CE(f(x), y) + beta * KL(p(x) || p(x_adv))    (KL summed over classes, mean over batch)

Optimiser: SGD with Nesterov momentum 0.9, or AdamW, with weight decay on weights only (no decay on
biases / BatchNorm / normalisation parameters: every parameter with ndim <= 1). Which one, the
learning rate, schedule, eps, attack steps, beta, EMA and augmentation default to the data set's
entry of ``data.DEFAULTS`` (one table for every command; ``resolve_settings``). The learning rate
is set every step from the global step: ``cosine`` (lr * (1 + cos(pi * s / S)) / 2),
``onecycle`` (linear 0 -> lr over the first 40% of steps, then linear to 0; Rice et al.) or
``constant``.

EMA weight averaging (Gowal et al. 2020, as in the authors' code ``ema_update``): with
``W = round(ema_warmup * total_steps)`` warm-up steps and ``n = step - W`` (``step`` counted from 0
*after* the optimiser update),

    decay(step) = 0                                 if step < W     (the average is a copy)
                = min(ema_decay, (1 + n) / (10 + n)) otherwise         (ema_decay = 0.995)
    ema = decay * ema + (1 - decay) * weights;  buffers (BN statistics) are copied.

Checkpoints (``out``): ``last/`` and ``best/`` (models.save folders of the evaluated model, the
EMA one when ``--ema``), ``train_state.safetensors`` (raw weights, EMA weights, optimiser state (SGD
momentum, AdamW moments and step), grad-scaler state, the training settings (a ``--resume`` must
repeat them), epoch/step/best metadata; written atomically after every epoch),
``metrics.json`` (one entry per epoch) and ``results.json`` (test clean / PGD accuracy of
``best``). ``--resume`` continues from train_state exactly: every epoch's randomness (data order,
augmentation, attack starts, dropout) is derived from (seed, epoch), so a resumed run equals an
uninterrupted one.

Best checkpoint: by PGD robust accuracy on ``val_size`` training images held out from training
(``val_size 0``: no validation, best = last).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from . import attacks, models
from . import data as data_mod
from .config import check_eps, field
from .evaluate import evaluate
from .training import (
    PRECISIONS,
    Dist,
    autocast,
    derive_seed,
    ema_decay_at,
    ema_update,
    init_distributed,
    lr_at,
    make_optimizer,
    optimizer_step,
    resolve_eval_precision,
    resolve_precision,
    unwrap,
)
from .utils import atomic_write_bytes, progress, resolve_device, write_json

STATE_FILE = "train_state.safetensors"
STATE_VERSION = "1"


class NonFiniteLossError(ValueError):
    """The training loss became NaN/inf; the message names the epoch and step."""


@dataclass
class TrainRobustConfig:
    data: str = field("digits", help="dataset: digits, mnist, fashion-mnist, cifar10, gtsrb")
    data_dir: str | None = field(None, help="folder with the dataset files")
    real_limit: int | None = field(None, help="use N real training images: a class-balanced subset, deterministic in --seed")
    synthetic: str | None = field(None, help="synthetic .npz file or folder of shards")
    synthetic_fraction: float = field(0.7, help="fraction of every batch drawn from synthetic data")
    synthetic_store: str = field("auto", help="memory: load the synthetic set into memory (on the device); "
                                 "lazy: read each batch's rows from a consolidated copy written once beside "
                                 "the shards (host memory independent of the set size); auto: lazy above "
                                 "1 GiB of shards", choices=("auto", "memory", "lazy"))
    synthetic_cache: str | None = field(None, help="folder for the consolidated copy of a lazily read "
                                        "synthetic set (default: <synthetic>/consolidated)")
    model: str | None = field(None, help="classifier (default: the dataset's, e.g. small-cnn)")
    epochs: int = field(10, help="training epochs (passes over the real training data)")
    batch_size: int = field(128, help="batch size (real + synthetic)")
    lr: float | None = field(None, help="peak learning rate (default: the dataset's with its optimizer, "
                             "see the README's table; SGD 0.1 / AdamW 1e-3 with the other optimizer)")
    momentum: float = field(0.9, help="SGD momentum")
    optimizer: str | None = field(None, help="sgd (Nesterov, the field's choice) or adamw (default: the "
                                  "dataset's: adamw for digits / mnist / fashion-mnist, sgd for cifar10 / gtsrb)",
                                  choices=("sgd", "adamw"))
    weight_decay: float = field(5e-4, help="weight decay (not applied to biases / BN)")
    schedule: str | None = field(None, help="learning-rate schedule (default: the dataset's, cosine)",
                                 choices=("cosine", "onecycle", "constant"))
    eps: float | None = field(None, help="Linf radius in [0, 1] pixel units, fractions like 8/255 accepted "
                              "(default: the dataset's: digits 0.1, mnist 0.3, fashion-mnist 0.1, cifar10 "
                              "and gtsrb 8/255)")
    step_size: float | None = field(None, help="attack step size (default: the dataset's; with another "
                                    "--eps or --attack-steps scaled to keep step * steps / eps)")
    attack_steps: int | None = field(None, help="TRADES attack steps K (default: dataset's)")
    beta: float | None = field(None, help="TRADES beta (default: dataset's)")
    attack_init: str = field("uniform", help="attack start: uniform U(-eps,eps) or normal 0.001*N(0,1)",
                             choices=("uniform", "normal"))
    attack_bn: str = field("eval", help="BatchNorm mode during the attack", choices=("eval", "train"))
    precision: str = field("auto", help="training precision: auto (bf16 on CUDA, fp32 on CPU: CPU bf16 "
                           "autocast is ~10x slower), bf16, fp16 (with a grad scaler) or fp32",
                           choices=("auto",) + PRECISIONS)
    eval_precision: str = field("auto", help="precision of the validation and test attacks: auto (fp32, "
                                "as the field reports robustness; low-precision gradients can weaken "
                                "an attack), bf16, fp16 or fp32", choices=("auto",) + PRECISIONS)
    channels_last: bool | None = field(None, help="channels_last memory format (default: on CUDA only)")
    fused_optimizer: bool = field(True, help="fused SGD kernel (foreach when unsupported)")
    compile: bool = field(False, help="torch.compile the model (pays compile time once)")
    ema: bool | None = field(None, help="evaluate/save an EMA weight average (Gowal warm-up schedule; "
                             "default: the dataset's, on)")
    ema_decay: float = field(0.995, help="EMA maximum decay")
    ema_warmup: float | None = field(None, help="fraction of training steps before the EMA starts "
                                     "averaging (default: the dataset's, 0.025)")
    augment: str | None = field(None, help="data augmentation (default: the dataset's: crop-flip for "
                                "CIFAR-10, crop for digits/GTSRB, none for MNIST)",
                                choices=("none", "crop", "flip", "crop-flip"))
    val_size: int | None = field(None, help="training images held out to pick the best checkpoint "
                                 "(default min(1024, a tenth); 0: best = last)")
    eval_attack_steps: int = field(20, help="PGD steps for validation and the final test evaluation")
    limit_test: int | None = field(None, help="evaluate on the first N test images only")
    eval_batch_size: int = field(512, help="evaluation batch size")
    stop_after: int | None = field(None, help="stop after this many epochs in this invocation "
                                   "(time-sliced jobs; continue with --resume)")
    resume: bool = field(False, help="continue from <out>/train_state.safetensors")
    log_every: int = field(10, help="steps between progress-bar / NaN checks")
    out: str = field("runs/train-robust", help="output folder")
    seed: int = field(0, help="random seed")
    device: str = field("auto", help="auto | cpu | cuda[:i]")


# --------------------------------------------------------------------------------------------
# The TRADES objective
def trades_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
                steps: int, beta: float, precision: str = "fp32", init: str = "uniform",
                attack_bn: str = "eval", generator: torch.Generator | None = None,
                attack_model: nn.Module | None = None):
    """TRADES loss (model left in train mode). Returns (loss, loss_nat, loss_rob, logits_nat, x_adv).

    ``attack_model``: the module the inner maximisation runs on (default ``model``); under
    DistributedDataParallel the plain module, so that only the loss's forwards go through DDP."""
    x_adv = attacks.trades_attack(attack_model if attack_model is not None else model, x, eps=eps,
                                  step_size=step_size, steps=steps, init=init, generator=generator,
                                  precision=precision, bn=attack_bn)
    model.train()
    with autocast(x.device, precision):
        logits_nat = model(x)
        logits_adv = model(x_adv)
    logits_nat = logits_nat.float()
    loss_nat = F.cross_entropy(logits_nat, y)
    loss_rob = attacks.kl_div(logits_adv, F.log_softmax(logits_nat, 1), "mean")
    return loss_nat + beta * loss_rob, loss_nat, loss_rob, logits_nat, x_adv


# --------------------------------------------------------------------------------------------
# Checkpoint state
def _state_tensors(model, ema_model, opt, scaler) -> dict[str, torch.Tensor]:
    t = {f"model.{k}": v for k, v in unwrap(model).state_dict().items()}
    if ema_model is not None:
        t.update({f"ema.{k}": v for k, v in ema_model.state_dict().items()})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):  # every tensor of the optimiser state: SGD momentum, AdamW moments + step
        for key, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                t[f"opt.{i}.{key}"] = v
    if scaler is not None:
        sd = scaler.state_dict()
        if sd:
            t["scaler.scale"] = torch.tensor([float(sd["scale"])], dtype=torch.float64)
            t["scaler.growth_tracker"] = torch.tensor([int(sd["_growth_tracker"])], dtype=torch.int64)
    return {k: v.detach().to("cpu").contiguous() for k, v in t.items()}


def save_state(path: Path, model, ema_model, opt, scaler, meta: dict) -> None:
    md = {"version": STATE_VERSION, "meta": json.dumps(meta)}
    atomic_write_bytes(path, st_save(_state_tensors(model, ema_model, opt, scaler), metadata=md))


def load_state(path: Path, model, ema_model, opt, scaler, device) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is corrupt or not a training-state file: {e}") from None
    if md.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: unknown training-state version {md.get('version')!r}")
    meta = json.loads(md["meta"])

    def sub(prefix):
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        unwrap(model).load_state_dict(sub("model."), strict=True)
        if ema_model is not None:
            ema = sub("ema.")
            ema_model.load_state_dict(ema if ema else unwrap(model).state_dict(), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match this model/config (resume with the same --model "
                         f"and data): {e}") from None
    # through the optimiser's own load_state_dict, which puts each state tensor where this
    # optimiser (fused, foreach, capturable) wants it
    sd = opt.state_dict()
    state = {}
    for i in range(sum(len(g["params"]) for g in opt.param_groups)):
        entry = sub(f"opt.{i}.")
        if entry:
            state[i] = entry
    try:
        opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: its optimiser state does not fit this optimiser (resume with the same "
                         f"--optimizer): {e}") from None
    if scaler is not None and "scaler.scale" in tensors:
        sd = scaler.state_dict()
        sd["scale"] = float(tensors["scaler.scale"][0])
        sd["_growth_tracker"] = int(tensors["scaler.growth_tracker"][0])
        scaler.load_state_dict(sd)
    return meta


# --------------------------------------------------------------------------------------------
# Settings
# Peak learning rate of the optimiser that is not the dataset's own (``--optimizer`` given).
OTHER_OPTIMIZER_LR = {"sgd": 0.1, "adamw": 1e-3}

# Settings a --resume may change: where and how the run is executed, not what it trains.
RESUME_MAY_CHANGE = frozenset({"resume", "stop_after", "log_every", "device", "out", "eval_batch_size",
                               "compile", "synthetic_cache", "data_dir"})


def resolve_settings(cfg: TrainRobustConfig, data_name: str | None = None) -> dict:
    """Every TRADES setting the dataset decides, with its default filled in (one place:
    ``data.DEFAULTS``): eps, step_size, attack_steps, beta, model, augment, padding, optimizer, lr,
    schedule, ema, ema_warmup. ValueError naming the flag for a bad value."""
    d = data_mod.defaults_for(data_name or cfg.data)
    eps = d.eps if cfg.eps is None else float(cfg.eps)
    steps = d.attack_steps if cfg.attack_steps is None else int(cfg.attack_steps)
    if cfg.step_size is not None:
        step_size = float(cfg.step_size)
    elif eps > 0 and steps > 0:  # keep the dataset's step * steps / eps (METHOD.md §10)
        step_size = d.step_size * (eps / d.eps) * (d.attack_steps / steps)
    else:
        step_size = d.step_size
    optimizer = cfg.optimizer or d.optimizer
    lr = cfg.lr if cfg.lr is not None else d.lr if optimizer == d.optimizer else OTHER_OPTIMIZER_LR[optimizer]
    r = dict(eps=eps, step_size=float(step_size), attack_steps=steps,
             beta=float(d.beta if cfg.beta is None else cfg.beta), model=cfg.model or d.model,
             augment=cfg.augment or d.augment, padding=d.padding, optimizer=optimizer, lr=float(lr),
             schedule=cfg.schedule or d.schedule, ema=d.ema if cfg.ema is None else bool(cfg.ema),
             ema_warmup=float(d.ema_warmup if cfg.ema_warmup is None else cfg.ema_warmup))
    for ok, msg in ((r["eps"] >= 0, f"--eps must be >= 0, got {r['eps']}"),
                    (r["step_size"] > 0, f"--step-size must be > 0, got {r['step_size']}"),
                    (r["attack_steps"] >= 0, f"--attack-steps must be >= 0, got {r['attack_steps']}"),
                    (r["beta"] >= 0, f"--beta must be >= 0, got {r['beta']}"),
                    (r["lr"] > 0, f"--lr must be > 0, got {r['lr']}"),
                    (0 <= r["ema_warmup"] < 1, f"--ema-warmup must be in [0, 1), got {r['ema_warmup']}")):
        if not ok:
            raise ValueError(msg)
    return r


def _check_cfg(cfg: TrainRobustConfig) -> None:
    if cfg.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if not 0.0 <= cfg.synthetic_fraction <= 1.0:
        raise ValueError(f"--synthetic-fraction must be in [0, 1], got {cfg.synthetic_fraction}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {cfg.log_every}")
    if cfg.val_size is not None and cfg.val_size < 0:
        raise ValueError(f"--val-size must be >= 0, got {cfg.val_size}")
    if cfg.real_limit is not None and cfg.real_limit < 1:
        raise ValueError(f"--real-limit must be >= 1, got {cfg.real_limit}")
    if cfg.limit_test is not None and cfg.limit_test < 1:
        raise ValueError(f"--limit-test must be >= 1, got {cfg.limit_test}")
    if cfg.eval_batch_size < 1:
        raise ValueError(f"--eval-batch-size must be >= 1, got {cfg.eval_batch_size}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {cfg.stop_after}")
    check_eps(cfg.eps)


def _check_model(name: str, flag: str = "--model") -> None:
    """A classifier name ``models.build`` accepts, checked without building it (a wrn-70-16 would
    take seconds and a gigabyte; the meta device would import torch._dynamo)."""
    from .models import classifiers as C

    key = str(name).lower().replace("_", "-")
    if key in ("small-cnn", "smallcnn", "preact-resnet18", "preactresnet18", "preact-resnet-18"):
        return
    m = C._WRN.match(key)
    if m is None:
        raise ValueError(f"{flag} {name!r} is not a classifier this package builds; choose small-cnn, "
                         f"preact-resnet18 or wrn-D-W[-swish] (e.g. {', '.join(models.NAMES)})")
    try:
        C._wrn_shape(int(m.group(1)), int(m.group(2)), m.group(3) or "relu")
    except ValueError as e:
        raise ValueError(f"{flag} {name!r}: {e}") from None


def resolve(cfg: TrainRobustConfig) -> TrainRobustConfig:
    """CLI hook: check every setting and fill in the dataset's defaults (so config.json records the
    values used) before anything is loaded or written. The checks that need the data (set size vs
    batch and validation sizes) run in ``train_robust`` before ``--out`` is created."""
    _check_cfg(cfg)
    name = data_mod.canonical_name(cfg.data)
    r = resolve_settings(cfg, name)
    _check_model(r["model"])
    _check_out(cfg)
    return dataclasses.replace(cfg, data=name, eps=r["eps"], step_size=r["step_size"],
                               attack_steps=r["attack_steps"], beta=r["beta"], model=r["model"],
                               augment=r["augment"], optimizer=r["optimizer"], lr=r["lr"],
                               schedule=r["schedule"], ema=r["ema"], ema_warmup=r["ema_warmup"])


def _check_out(cfg: TrainRobustConfig) -> None:
    state_path = Path(cfg.out) / STATE_FILE
    if cfg.resume and not state_path.is_file():
        raise FileNotFoundError(f"--resume: {state_path} not found (nothing to resume)")
    if not cfg.resume and state_path.is_file():  # never restart over (and so destroy) earlier work
        raise ValueError(f"{cfg.out} already holds a training run ({STATE_FILE}); add --resume to continue "
                         f"it, or choose another --out (or delete the folder) to start afresh")


def _training_settings(cfg: TrainRobustConfig, r: dict) -> dict:
    """What a run trains with (the recorded settings a --resume must repeat)."""
    t = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_MAY_CHANGE}
    t.update({k: r[k] for k in ("eps", "step_size", "attack_steps", "beta", "model", "augment", "optimizer",
                                "lr", "schedule", "ema", "ema_warmup")})
    return t


def _check_resume_settings(recorded: dict, now: dict, state_path: Path) -> None:
    def same(a, b):
        if isinstance(a, float) or isinstance(b, float):
            try:
                return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
            except (TypeError, ValueError):
                return False
        return a == b

    diff = [k for k in sorted(set(recorded) | set(now)) if not same(recorded.get(k), now.get(k))]
    if diff:
        raise ValueError(
            f"--resume: {state_path} was trained with other settings: "
            + "; ".join(f"{k} {recorded.get(k)!r} (recorded) vs {now.get(k)!r} (now)" for k in diff)
            + f". A resumed run must repeat them (only {', '.join(sorted(RESUME_MAY_CHANGE - {'resume'}))} may "
            f"change); start a new run with another --out to train with new settings")


def _read_state_meta(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        return json.loads(md.get("meta", "{}"))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is corrupt or not a training-state file: {e}") from None


def chance_level(y: torch.Tensor, num_classes: int) -> float:
    """Accuracy of the best constant prediction on labels ``y`` (the majority class's share)."""
    return float(torch.bincount(y.cpu(), minlength=num_classes).max()) / max(int(y.numel()), 1)


def at_chance(acc: float, y: torch.Tensor, num_classes: int) -> bool:
    """``acc`` is not clearly above a constant prediction: within 3 standard errors of it (and at
    least 2 points), the mark of a run that trained nothing."""
    c, n = chance_level(y, num_classes), max(int(y.numel()), 1)
    return acc <= c + max(0.02, 3.0 * (c * (1.0 - c) / n) ** 0.5)


# Synthetic sets above this size are read lazily under --synthetic-store auto.
IN_MEMORY_MAX_BYTES = 1 << 30


def train_robust(cfg: TrainRobustConfig, data=None, synthetic=None, *, show_progress: bool = True) -> dict:
    """Train with TRADES; returns the final results dict (also written to <out>/results.json).

    data: an ``ImageData`` (default: ``load_dataset(cfg.data, cfg.data_dir, real_limit=...)``).
    synthetic: (images uint8 NCHW, labels int64) or a ``SyntheticStore`` (default: ``cfg.synthetic``
    read as ``cfg.synthetic_store`` says).

    Under torchrun (WORLD_SIZE > 1) every process joins the process group (gloo on CPU, nccl on
    CUDA, one GPU per process), the model is wrapped in DistributedDataParallel and each rank trains
    on rows ``rank::world_size`` of every global batch of ``batch_size`` images, so the schedule
    (steps, learning rates, EMA, data order) is that of one process with the same batch. The TRADES
    attack starts and dropout draw from per-rank streams. Rank 0 alone writes checkpoints, metrics
    and results and evaluates; every rank returns the same results.
    """
    _check_cfg(cfg)
    dev = resolve_device(cfg.device)
    d = init_distributed(dev)
    try:
        results = _train(cfg, data, synthetic, d.device(dev), d, show_progress)
        if d.enabled:  # rank 0 evaluated: every rank returns its results
            box = [results]
            dist.broadcast_object_list(box, src=0)
            results = box[0]
        return results
    finally:
        d.close()


def _rank0_first(d: Dist, fn):
    """Run ``fn`` on rank 0, then on the other ranks (rank 0 writes a cache the others read); an
    error on rank 0 is raised on every rank instead of leaving them waiting."""
    if not d.enabled:
        return fn()
    err, out = None, None
    if d.is_main:
        try:
            out = fn()
        except (ValueError, FileNotFoundError, OSError) as e:
            err = e
    box = [None if err is None else f"{type(err).__name__}: {err}"]
    dist.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    if box[0] is not None:
        raise ValueError(f"rank 0 failed: {box[0]}")
    return out if d.is_main else fn()


def _open_synthetic(cfg: TrainRobustConfig, data, d: Dist):
    kind = cfg.synthetic_store
    if kind == "auto":
        size = sum(f.stat().st_size for f in data_mod.shard_files(cfg.synthetic))
        kind = "lazy" if size > IN_MEMORY_MAX_BYTES else "memory"
    if kind == "memory":
        return data_mod.load_synthetic(cfg.synthetic, like=data)
    return _rank0_first(d, lambda: data_mod.SyntheticStore.open(cfg.synthetic, like=data,
                                                                 cache_dir=cfg.synthetic_cache))


def _train(cfg: TrainRobustConfig, data, synthetic, dev: torch.device, d: Dist, show_progress: bool) -> dict:
    prec = resolve_precision(cfg.precision, dev)
    eval_prec = resolve_eval_precision(cfg.eval_precision, dev)
    channels_last = cfg.channels_last if cfg.channels_last is not None else dev.type == "cuda"
    main = d.is_main
    show_progress = show_progress and main
    if data is None:
        data = data_mod.load_dataset(cfg.data, cfg.data_dir, real_limit=cfg.real_limit, seed=cfg.seed)
    elif cfg.real_limit is not None and cfg.real_limit < data.x_train.shape[0]:
        keep = torch.from_numpy(data_mod.balanced_subset(data.y_train, cfg.real_limit, cfg.seed))
        data = dataclasses.replace(data, x_train=data.x_train[keep].contiguous(),
                                   y_train=data.y_train[keep].contiguous())
    # Every check, the data-dependent ones included, before --out is created or anything written.
    try:
        data_name = data_mod.canonical_name(data.name)
    except ValueError:  # an ImageData under another name: the config's data set decides
        data_name = cfg.data
    r = resolve_settings(cfg, data_name)
    if cfg.batch_size % d.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes "
                         f"({d.world_size}): each rank trains on batch_size / {d.world_size} images per step")
    out = Path(cfg.out)
    state_path = out / STATE_FILE
    _check_out(cfg)
    settings = _training_settings(cfg, r)
    if cfg.resume:
        recorded = _read_state_meta(state_path).get("settings")
        now = settings
        if recorded is None:  # a state written before the settings were kept: config.json's explicit values
            try:
                old = json.loads((out / "config.json").read_text())
                recorded = {k: v for k, v in old.items() if k in settings and v is not None}
            except (OSError, ValueError, AttributeError):
                recorded = {}
            now = {k: settings[k] for k in recorded}
        _check_resume_settings(recorded, now, state_path)

    # Validation split: val_size real training images chosen by a seeded permutation.
    n_train = data.x_train.shape[0]
    val_size = min(1024, n_train // 10) if cfg.val_size is None else cfg.val_size
    if not 0 <= val_size < n_train:
        raise ValueError(f"--val-size {val_size} must be in [0, {n_train}): there are {n_train} real training "
                         f"images{f' (--real-limit {cfg.real_limit})' if cfg.real_limit is not None else ''}")
    if val_size:
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))
        tr_idx, va_idx = perm[val_size:].sort().values, perm[:val_size].sort().values
        x_tr, y_tr = data.x_train[tr_idx], data.y_train[tr_idx]
        x_va, y_va = data.x_train[va_idx], data.y_train[va_idx]
    else:
        x_tr, y_tr, x_va, y_va = data.x_train, data.y_train, None, None
    n_real = cfg.batch_size - (int(round(cfg.batch_size * cfg.synthetic_fraction)) if cfg.synthetic else 0)
    if n_real > x_tr.shape[0]:
        raise ValueError(f"--batch-size {cfg.batch_size}: each batch takes {n_real} real images but there are "
                         f"only {x_tr.shape[0]} training images ({n_train} minus {val_size} held out for "
                         f"validation); lower --batch-size or --val-size")
    build_kw = dict(num_classes=data.num_classes, in_channels=data.x_train.shape[1],
                    image_size=data.x_train.shape[-1])
    _check_model(r["model"])

    if synthetic is None and cfg.synthetic:
        synthetic = _open_synthetic(cfg, data, d)
    if synthetic is not None and not isinstance(synthetic, data_mod.SyntheticStore):
        _check_synthetic(synthetic, data)

    batches = data_mod.DeviceLoader(
        x_tr, y_tr, cfg.batch_size, synthetic=synthetic,
        synthetic_fraction=cfg.synthetic_fraction if synthetic is not None else 0.0,
        augment=r["augment"], padding=r["padding"], device=dev, channels_last=channels_last,
        rank=d.rank, world_size=d.world_size)
    steps_per_epoch = len(batches)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(r["ema_warmup"] * total_steps))

    torch.manual_seed(cfg.seed)
    try:
        model = models.build(r["model"], **build_kw).to(dev)
    except ValueError as e:  # e.g. an image size the model cannot take: still before --out exists
        raise ValueError(f"--model {r['model']!r}: {e}") from None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema_model = None
    if r["ema"]:
        ema_model = models.build(r["model"], **build_kw).to(dev)
        if channels_last:
            ema_model = ema_model.to(memory_format=torch.channels_last)
        ema_model.load_state_dict(model.state_dict())
        ema_model.eval().requires_grad_(False)
    opt = make_optimizer(model, r["lr"], cfg.momentum, cfg.weight_decay, cfg.fused_optimizer, r["optimizer"])
    scaler = torch.amp.GradScaler(dev.type) if prec == "fp16" else None

    meta = {"epoch": 0, "step": 0, "best_val": -1.0, "best_epoch": 0}
    metrics: list[dict] = []
    if cfg.resume:
        meta = load_state(state_path, model, ema_model, opt, scaler, dev)
        if meta.get("total_steps") not in (None, total_steps):
            raise ValueError(f"--resume: {state_path} was made with {meta['total_steps']} total steps, "
                             f"this config has {total_steps} (epochs/batch size/data changed?)")
        mpath = out / "metrics.json"
        if mpath.is_file():
            metrics = [m for m in json.loads(mpath.read_text()) if m.get("epoch", 0) <= meta["epoch"]]
    meta["settings"] = settings
    out.mkdir(parents=True, exist_ok=True)

    attack_model = torch.compile(model) if cfg.compile else model
    # DDP: the loss's forwards and backward go through the wrapper (gradients averaged over ranks,
    # which equals the global batch mean as every rank holds batch_size / world_size images); the
    # attack, which only needs input gradients, runs on the plain module.
    train_model = (nn.parallel.DistributedDataParallel(attack_model, device_ids=[dev.index] if dev.type == "cuda"
                                                       else None) if d.enabled else attack_model)
    eval_model = ema_model if ema_model is not None else model
    save_kw = dict(name=r["model"], data=data.name, eps=r["eps"], trained_with="trades")

    start_epoch = int(meta["epoch"])
    step = int(meta["step"])
    end_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch + 1, end_epoch + 1):
        t0 = time.perf_counter()
        # dropout etc. and attack starts: reproducible per epoch, one stream per rank
        torch.manual_seed(derive_seed(derive_seed(cfg.seed, "torch", epoch), "rank", d.rank))
        gen = torch.Generator(dev).manual_seed(derive_seed(derive_seed(cfg.seed, "attack", epoch), "rank", d.rank))
        model.train()
        sums = torch.zeros(2, device=dev)  # loss * n, correct (device-side: no sync per step)
        count = 0
        pending: list[torch.Tensor] = []
        bar = progress(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                       disable=None if show_progress else True, leave=False)
        batches.generator.manual_seed(derive_seed(cfg.seed, "data", epoch))  # data order, augmentation: every rank
        for i, (x, y) in enumerate(batches):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, r["lr"], r["schedule"])
            loss, _, _, logits_nat, _ = trades_loss(
                train_model, x, y, eps=r["eps"], step_size=r["step_size"], steps=r["attack_steps"],
                beta=r["beta"], precision=prec, init=cfg.attack_init, attack_bn=cfg.attack_bn,
                generator=gen, attack_model=attack_model)
            optimizer_step(loss, opt, scaler)
            step += 1
            if ema_model is not None:
                ema_update(ema_model, model, ema_decay_at(step - 1, warmup, cfg.ema_decay))
            ld = loss.detach()
            pending.append(ld)
            sums += torch.stack([ld * y.shape[0], (logits_nat.argmax(1) == y).sum().float()])
            count += y.shape[0]
            if (i + 1) % cfg.log_every == 0 or i + 1 == steps_per_epoch:
                _check_finite(pending, epoch, i + 1 - len(pending), step - len(pending), out, d)
                pending = []
                if show_progress:
                    s = sums.tolist()
                    bar.set_postfix(loss=f"{s[0] / count:.4f}", acc=f"{s[1] / count:.3f}")
            bar.update(1)
        bar.close()
        if d.enabled:  # metrics over the global batch
            dist.all_reduce(sums)
            count *= d.world_size
        s = sums.tolist()
        entry = {"epoch": epoch, "step": step, "lr": lr_at(step - 1, total_steps, r["lr"], r["schedule"]),
                 "train_loss": s[0] / count, "train_clean_acc": s[1] / count,
                 "train_seconds": time.perf_counter() - t0}
        meta.update(epoch=epoch, step=step, total_steps=total_steps)
        if not main:
            continue
        if x_va is not None:
            v = evaluate(eval_model, x_va, y_va, eps=r["eps"], attack="pgd", steps=cfg.eval_attack_steps,
                         batch_size=cfg.eval_batch_size, device=dev, seed=cfg.seed, precision=eval_prec,
                         show_progress=False)
            entry.update(val_clean_acc=v["clean_acc"], val_robust_acc=v["robust_acc"],
                         val_at_chance=at_chance(v["clean_acc"], y_va, data.num_classes))
            is_best = v["robust_acc"] > meta["best_val"]
        else:
            is_best = True
        models.save(eval_model, out / "last", epoch=epoch, **save_kw)
        if is_best:
            meta["best_val"] = entry.get("val_robust_acc", -1.0)
            meta["best_epoch"] = epoch
            models.save(eval_model, out / "best", epoch=epoch, **save_kw)
        # train_state is the commit point of an epoch: written last.
        save_state(state_path, model, ema_model, opt, scaler, meta)
        metrics.append(entry)
        write_json(out / "metrics.json", metrics)

    n_syn = batches.n_synthetic_total
    results = {"epochs_done": int(meta["epoch"]), "epochs": cfg.epochs, "best_epoch": meta["best_epoch"],
               "model": r["model"], "data": data.name, "eps": r["eps"], "step_size": r["step_size"],
               "attack_steps": r["attack_steps"], "beta": r["beta"], "optimizer": r["optimizer"], "lr": r["lr"],
               "schedule": r["schedule"], "precision": prec, "eval_precision": eval_prec,
               "ema": r["ema"], "n_train": int(x_tr.shape[0]), "n_val": int(val_size),
               "n_synthetic": int(n_syn), "world_size": d.world_size,
               "train_seconds": sum(m["train_seconds"] for m in metrics)}
    if meta["epoch"] < cfg.epochs:  # stopped early (--stop-after): no final evaluation yet
        results["stopped_early"] = True
        return results
    if not main:
        return results  # replaced by rank 0's results
    best = models.load(out / "best", device=dev)
    x_te, y_te = data.x_test, data.y_test
    if cfg.limit_test is not None:
        x_te, y_te = x_te[:cfg.limit_test], y_te[:cfg.limit_test]
    ev = evaluate(best, x_te, y_te, eps=r["eps"], attack="pgd", steps=cfg.eval_attack_steps,
                  batch_size=cfg.eval_batch_size, device=dev, seed=cfg.seed, precision=eval_prec,
                  show_progress=show_progress)
    results.update(clean_acc=ev["clean_acc"], robust_acc=ev["robust_acc"], attack="pgd",
                   eval_attack_steps=cfg.eval_attack_steps, n_test=ev["n"],
                   chance_acc=chance_level(y_te, data.num_classes),
                   at_chance=at_chance(ev["clean_acc"], y_te, data.num_classes))
    if results["at_chance"]:
        results["warning"] = (
            f"the final model is at chance: clean accuracy {ev['clean_acc']:.3f} on {ev['n']} test images, "
            f"a constant prediction gets {results['chance_acc']:.3f}. It learned nothing: try more epochs, "
            f"a smaller --eps, or another --lr / --optimizer (settings: eps {r['eps']:g}, {r['optimizer']} "
            f"lr {r['lr']:g}, {r['attack_steps']} attack steps, beta {r['beta']:g})")
        print(f"[train-robust] WARNING: {results['warning']}", file=sys.stderr, flush=True)
    write_json(out / "results.json", results)
    return results


def _check_finite(pending, epoch, first_step_in_epoch, first_global_step, out, d: Dist | None = None):
    if not pending:
        return
    vals = torch.stack(pending)
    if d is not None and d.enabled:  # a non-finite loss on any rank stops every rank at the same step
        dist.all_reduce(vals)
    bad = ~torch.isfinite(vals)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise NonFiniteLossError(
            f"non-finite TRADES loss ({float(vals[k])}) at epoch {epoch}, step {first_step_in_epoch + k + 1} "
            f"(global step {first_global_step + k + 1}); training stopped. The last good checkpoint "
            f"(end of epoch {epoch - 1}) is kept in {out} (last/, best/, {STATE_FILE}). "
            f"Try a lower --lr, --precision fp32, or a smaller --beta.")


def _check_synthetic(synthetic, data):
    xs, ys = synthetic
    if xs.dtype != torch.uint8:
        raise ValueError(f"synthetic images must be uint8, got {xs.dtype}")
    if tuple(xs.shape[1:]) != tuple(data.x_train.shape[1:]):
        raise ValueError(f"synthetic images have shape {tuple(xs.shape[1:])} (C,H,W) but {data.name} "
                         f"images are {tuple(data.x_train.shape[1:])}")
    if ys.shape[0] != xs.shape[0]:
        raise ValueError(f"{xs.shape[0]} synthetic images but {ys.shape[0]} labels")
    if ys.numel() and (int(ys.min()) < 0 or int(ys.max()) >= data.num_classes):
        raise ValueError(f"synthetic labels must be in [0, {data.num_classes}), got "
                         f"[{int(ys.min())}, {int(ys.max())}]")


def run(cfg: TrainRobustConfig) -> dict | None:
    """CLI entry: under torchrun only rank 0 returns (and so prints) the results."""
    res = train_robust(cfg)
    return res if int(os.environ.get("RANK", "0")) == 0 else None
