"""`cdp-fast train-robust`: mixed-precision TRADES adversarial training (METHOD.md §10).

    x_adv = TRADES-PGD(x)              (uniform start, K signed steps on KL(p(x) || p(x_adv)))
    loss  = CE(f(x), y) + beta * KL(p(x) || p(x_adv))    (KL summed over classes, mean over batch)

Optimiser: SGD with Nesterov momentum 0.9 and weight decay on weights only (no decay on
biases / BatchNorm / normalisation parameters: every parameter with ndim <= 1). The learning rate
is set every step from the global step: ``cosine`` (lr * (1 + cos(pi * s / S)) / 2) or
``onecycle`` (linear 0 -> lr over the first 40% of steps, then linear to 0; Rice et al.).

EMA weight averaging (Gowal et al. 2020, as in the authors' code ``ema_update``): with
``W = round(ema_warmup * total_steps)`` warm-up steps and ``n = step - W`` (``step`` counted from 0
*after* the optimiser update),

    decay(step) = 0                                 if step < W     (the average is a copy)
                = min(ema_decay, (1 + n) / (10 + n)) otherwise         (ema_decay = 0.995)
    ema = decay * ema + (1 - decay) * weights;  buffers (BN statistics) are copied.

Checkpoints (``out``): ``last/`` and ``best/`` (models.save folders of the evaluated model, the
EMA one when ``--ema``), ``train_state.safetensors`` (raw weights, EMA weights, optimiser momentum,
grad-scaler state, epoch/step/best metadata; written atomically after every epoch),
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
    lr: float | None = field(None, help="peak learning rate (default: SGD 0.1, digits 0.3; AdamW 3e-3)")
    momentum: float = field(0.9, help="SGD momentum")
    optimizer: str = field("sgd", help="sgd (Nesterov, the field's choice) or adamw",
                           choices=("sgd", "adamw"))
    weight_decay: float = field(5e-4, help="weight decay (not applied to biases / BN)")
    schedule: str = field("cosine", help="learning-rate schedule", choices=("cosine", "onecycle", "constant"))
    eps: float | None = field(None, help="Linf radius in [0, 1] pixel units, fractions like 8/255 accepted "
                              "(default: the dataset's: digits and mnist 0.3, fashion-mnist 0.1, cifar10 and "
                              "gtsrb 8/255; the pipeline uses 0.1 on digits, see its --help)")
    step_size: float | None = field(None, help="attack step size (default: dataset's)")
    attack_steps: int | None = field(None, help="TRADES attack steps K (default: dataset's)")
    beta: float | None = field(None, help="TRADES beta (default: dataset's)")
    attack_init: str = field("uniform", help="attack start: uniform U(-eps,eps) or normal 0.001*N(0,1)",
                             choices=("uniform", "normal"))
    attack_bn: str = field("eval", help="BatchNorm mode during the attack", choices=("eval", "train"))
    precision: str = field("auto", help="auto (bf16 on CUDA, fp32 on CPU: CPU bf16 autocast is ~10x "
                           "slower), bf16, fp16 (with a grad scaler) or fp32",
                           choices=("auto",) + PRECISIONS)
    channels_last: bool | None = field(None, help="channels_last memory format (default: on CUDA only)")
    fused_optimizer: bool = field(True, help="fused SGD kernel (foreach when unsupported)")
    compile: bool = field(False, help="torch.compile the model (pays compile time once)")
    ema: bool = field(True, help="evaluate/save an EMA weight average (Gowal warm-up schedule)")
    ema_decay: float = field(0.995, help="EMA maximum decay")
    ema_warmup: float = field(0.025, help="fraction of training steps before the EMA starts averaging")
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
    for i, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            t[f"opt.{i}.momentum_buffer"] = buf
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
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        buf = tensors.get(f"opt.{i}.momentum_buffer")
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.to(device=p.device, dtype=p.dtype)
    if scaler is not None and "scaler.scale" in tensors:
        sd = scaler.state_dict()
        sd["scale"] = float(tensors["scaler.scale"][0])
        sd["_growth_tracker"] = int(tensors["scaler.growth_tracker"][0])
        scaler.load_state_dict(sd)
    return meta


# --------------------------------------------------------------------------------------------
# Training
# Peak learning rates when --lr is not given: 0.1 (batch 128, Rice et al.); the tiny digits set
# has ~11 steps per epoch, so a larger rate (measured: 0.3) is needed to learn in a few epochs.
_LR_DEFAULTS = {"digits": 0.3}  # SGD
ADAMW_LR = 3e-3


def _resolve(cfg: TrainRobustConfig, data_defaults: dict, data_name: str = "") -> dict:
    def pick(v, key, fallback=None):
        return v if v is not None else data_defaults.get(key, fallback)

    r = dict(eps=float(pick(cfg.eps, "eps")), step_size=pick(cfg.step_size, "step_size"),
             attack_steps=int(pick(cfg.attack_steps, "attack_steps", 10)),
             beta=float(pick(cfg.beta, "beta", 6.0)), model=pick(cfg.model, "model", "small-cnn"),
             augment=str(pick(cfg.augment, "augment", "none")),
             padding=int(data_defaults.get("padding", 4)),
             lr=float(cfg.lr if cfg.lr is not None else
                      ADAMW_LR if cfg.optimizer == "adamw" else _LR_DEFAULTS.get(data_name, 0.1)))
    if r["step_size"] is None:
        r["step_size"] = r["eps"] / 4
    r["step_size"] = float(r["step_size"])
    if r["eps"] < 0 or r["step_size"] <= 0 or r["attack_steps"] < 0 or r["beta"] < 0:
        raise ValueError(f"invalid attack settings: {r}")
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
    check_eps(cfg.eps)


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
    channels_last = cfg.channels_last if cfg.channels_last is not None else dev.type == "cuda"
    main = d.is_main
    show_progress = show_progress and main
    if data is None:
        data = data_mod.load_dataset(cfg.data, cfg.data_dir, real_limit=cfg.real_limit, seed=cfg.seed)
    elif cfg.real_limit is not None and cfg.real_limit < data.x_train.shape[0]:
        keep = torch.from_numpy(data_mod.balanced_subset(data.y_train, cfg.real_limit, cfg.seed))
        data = dataclasses.replace(data, x_train=data.x_train[keep].contiguous(),
                                   y_train=data.y_train[keep].contiguous())
    try:
        defaults = dict(data_mod.dataset_defaults(data.name))
    except (ValueError, KeyError, AttributeError):
        defaults = dict(data_mod.dataset_defaults(cfg.data))
    r = _resolve(cfg, defaults, data.name)
    if cfg.batch_size % d.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes "
                         f"({d.world_size}): each rank trains on batch_size / {d.world_size} images per step")
    if synthetic is None and cfg.synthetic:
        synthetic = _open_synthetic(cfg, data, d)
    if synthetic is not None and not isinstance(synthetic, data_mod.SyntheticStore):
        _check_synthetic(synthetic, data)

    out = Path(cfg.out)
    state_path = out / STATE_FILE
    if cfg.resume and not state_path.is_file():
        raise FileNotFoundError(f"--resume: {state_path} not found (nothing to resume)")
    if not cfg.resume and state_path.is_file():  # never restart over (and so destroy) earlier work
        raise ValueError(f"{out} already holds a training run ({STATE_FILE}); add --resume to continue "
                         f"it, or choose another --out (or delete the folder) to start afresh")
    out.mkdir(parents=True, exist_ok=True)

    # Validation split: val_size real training images chosen by a seeded permutation.
    n_train = data.x_train.shape[0]
    val_size = min(1024, n_train // 10) if cfg.val_size is None else cfg.val_size
    if not 0 <= val_size < n_train:
        raise ValueError(f"--val-size {val_size} must be in [0, {n_train})")
    if val_size:
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed))
        tr_idx, va_idx = perm[val_size:].sort().values, perm[:val_size].sort().values
        x_tr, y_tr = data.x_train[tr_idx], data.y_train[tr_idx]
        x_va, y_va = data.x_train[va_idx], data.y_train[va_idx]
    else:
        x_tr, y_tr, x_va, y_va = data.x_train, data.y_train, None, None

    batches = data_mod.DeviceLoader(
        x_tr, y_tr, cfg.batch_size, synthetic=synthetic,
        synthetic_fraction=cfg.synthetic_fraction if synthetic is not None else 0.0,
        augment=r["augment"], padding=r["padding"], device=dev, channels_last=channels_last,
        rank=d.rank, world_size=d.world_size)
    steps_per_epoch = len(batches)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.ema_warmup * total_steps))

    torch.manual_seed(cfg.seed)
    build_kw = dict(num_classes=data.num_classes, in_channels=data.x_train.shape[1],
                    image_size=data.x_train.shape[-1])
    model = models.build(r["model"], **build_kw).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema_model = None
    if cfg.ema:
        ema_model = models.build(r["model"], **build_kw).to(dev)
        if channels_last:
            ema_model = ema_model.to(memory_format=torch.channels_last)
        ema_model.load_state_dict(model.state_dict())
        ema_model.eval().requires_grad_(False)
    opt = make_optimizer(model, r["lr"], cfg.momentum, cfg.weight_decay, cfg.fused_optimizer, cfg.optimizer)
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
                g["lr"] = lr_at(step, total_steps, r["lr"], cfg.schedule)
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
        entry = {"epoch": epoch, "step": step, "lr": lr_at(step - 1, total_steps, r["lr"], cfg.schedule),
                 "train_loss": s[0] / count, "train_clean_acc": s[1] / count,
                 "train_seconds": time.perf_counter() - t0}
        meta.update(epoch=epoch, step=step, total_steps=total_steps)
        if not main:
            continue
        if x_va is not None:
            v = evaluate(eval_model, x_va, y_va, eps=r["eps"], attack="pgd", steps=cfg.eval_attack_steps,
                         batch_size=cfg.eval_batch_size, device=dev, seed=cfg.seed, precision=prec,
                         show_progress=False)
            entry.update(val_clean_acc=v["clean_acc"], val_robust_acc=v["robust_acc"])
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
               "attack_steps": r["attack_steps"], "beta": r["beta"], "lr": r["lr"], "precision": prec,
               "ema": cfg.ema, "n_train": int(x_tr.shape[0]), "n_val": int(val_size),
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
                  batch_size=cfg.eval_batch_size, device=dev, seed=cfg.seed, precision=prec,
                  show_progress=show_progress)
    results.update(clean_acc=ev["clean_acc"], robust_acc=ev["robust_acc"], attack="pgd",
                   eval_attack_steps=cfg.eval_attack_steps, n_test=ev["n"])
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
