"""Shared training helpers: precision and autocast, learning-rate schedules, EMA weight averaging,
the optimiser (parameter groups, fused/foreach construction, one step) and seed derivation.

Used by the TRADES trainer (:mod:`.trades`), the intermediate classifier (:mod:`.pseudolabel`), the
attacks and the evaluation, so each of these formulas is written once.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "PRECISIONS", "resolve_precision", "resolve_eval_precision", "autocast", "lr_at", "ema_decay_at", "ema_update", "param_groups",
    "make_optimizer", "optimizer_step", "SEED_STREAMS", "derive_seed", "unwrap", "Dist", "init_distributed",
]

# --------------------------------------------------------------------------------------------
# Precision
PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 on CUDA, fp32 elsewhere.

    Measured on the 2-core dev CPU (torch 2.13, small-cnn-like net, batch 128, forward + input
    gradient): fp32 12.9 ms vs bf16 autocast 116 ms at 8x8, 163 ms vs 3040 ms at 28x28, so bf16
    autocast is 9-19x slower on that CPU and fp32 is the CPU default.
    """
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto' or one of {PRECISIONS}, got {precision!r}")
    return precision


def resolve_eval_precision(precision: str, device: torch.device) -> str:
    """Precision of attacks and evaluation: "auto" -> fp32 on every device.

    Robustness is reported against fp32 attacks in the field; bf16/fp16 input gradients can
    weaken an attack (and so overstate robust accuracy). Training may use bf16 (``resolve_precision``);
    an explicit "bf16" / "fp16" is honoured here too.
    """
    if precision == "auto":
        return "fp32"
    return resolve_precision(precision, device)


def autocast(device: torch.device | str, precision: str):
    """Autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dev = torch.device(device).type
    return torch.autocast(dev, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# --------------------------------------------------------------------------------------------
# Learning-rate schedules
def lr_at(step: int, total: int, lr: float, schedule: str) -> float:
    """Learning rate for optimiser step ``step`` (0-based) of ``total``: ``cosine``
    (lr * (1 + cos(pi * s / S)) / 2), ``onecycle`` (linear 0 -> lr over the first 40% of steps, then
    linear to 0; Rice et al.) or ``constant``."""
    if schedule == "constant":
        return lr
    frac = min(step / max(total, 1), 1.0)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    if schedule == "onecycle":
        peak = 0.4
        return lr * (frac / peak if frac < peak else max(0.0, (1.0 - frac) / (1.0 - peak)))
    raise ValueError(f"schedule must be cosine, onecycle or constant, got {schedule!r}")


# --------------------------------------------------------------------------------------------
# EMA weight averaging (Gowal et al. 2020; the authors' ``ema_update``)
def ema_decay_at(step: int, warmup_steps: int, decay_max: float = 0.995) -> float:
    """EMA decay after optimiser step ``step`` (counted from 0 after the update): 0 (a copy) during
    the ``warmup_steps`` first steps, then min(decay_max, (1 + n) / (10 + n)) with n = step - warmup."""
    if step < warmup_steps:
        return 0.0
    n = step - warmup_steps
    return min(decay_max, (1.0 + n) / (10.0 + n))


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * weights; buffers (BN statistics) are copied."""
    ep = [p for p in ema_model.parameters()]
    mp = [p.detach() for p in model.parameters()]
    if decay == 0.0:
        torch._foreach_copy_(ep, mp)
    else:
        torch._foreach_lerp_(ep, mp, 1.0 - decay)
    for be, bm in zip(ema_model.buffers(), model.buffers(), strict=False):
        be.copy_(bm)


# --------------------------------------------------------------------------------------------
# Optimiser
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights (ndim > 1) only; none on biases, BN and normalisation params."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float, fused: bool,
                   kind: str = "sgd"):
    """SGD Nesterov (the field's choice) or AdamW; fused kernels when available, else foreach."""
    groups = param_groups(model, weight_decay)
    if kind == "sgd":
        cls, kw = torch.optim.SGD, dict(lr=lr, momentum=momentum, nesterov=momentum > 0)
    elif kind == "adamw":
        cls, kw = torch.optim.AdamW, dict(lr=lr)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {kind!r}")
    if fused:
        try:
            return cls(groups, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return cls(groups, foreach=True, **kw)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler=None) -> None:
    """zero_grad, backward and step; through the GradScaler when training in fp16."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (``_orig_mod``) and DistributedDataParallel (``module``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


# --------------------------------------------------------------------------------------------
# Seeds: every random stream is derived from the one user seed
#
#     derive_seed(seed, stream, index) = (seed * mult + index * 7919 + offset) mod (2**63 - 1)
#
# with (mult, offset) per stream. The trainers' per-epoch streams (index = epoch) are the formula
# of the former ``trades._epoch_seed(seed, epoch, salt)`` (mult 1_000_003, offset salt * 104_729),
# so their values are unchanged: each epoch's randomness depends on (seed, epoch) alone, which makes
# --resume exact. The one-off streams (index 0) are ``seed + offset`` as the sampler and the guidance
# have used so far (equal for 0 <= seed < 2**63 - 1 - offset).
SEED_STREAMS: dict[str, tuple[int, int]] = {
    "epoch": (1_000_003, 0),                 # salt 0 of the former _epoch_seed (unused so far)
    "data": (1_000_003, 1 * 104_729),        # data order, augmentation, synthetic draws (per epoch)
    "torch": (1_000_003, 2 * 104_729),       # the global torch RNG: dropout etc. (per epoch)
    "attack": (1_000_003, 3 * 104_729),      # TRADES attack random starts (per epoch)
    "sampler-noise": (1, 0x5EED),            # sampler.NOISE_SEED_OFFSET: per-step DDIM/DDPM noise
    "guidance-positives": (1, 0xC0DE),       # guidance: the real positive drawn per anchor
    "guidance-head": (1, 0x4EAD),            # guidance: embedding-head initialisation
    "rank": (1, 0),                          # per-process stream under torch.distributed (rank 0: seed)
}
_SEED_MOD = 2**63 - 1


def derive_seed(seed: int, stream: str, index: int = 0) -> int:
    """Seed of random stream ``stream`` (a key of ``SEED_STREAMS``) number ``index`` (e.g. the epoch)
    derived from the user's ``seed``; a non-negative int that ``torch.manual_seed`` accepts."""
    try:
        mult, offset = SEED_STREAMS[stream]
    except KeyError:
        raise ValueError(f"unknown seed stream {stream!r}; known: {', '.join(SEED_STREAMS)}") from None
    return (int(seed) * mult + int(index) * 7_919 + offset) % _SEED_MOD


# --------------------------------------------------------------------------------------------
# torch.distributed (torchrun)
@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # the process group was created here (and is destroyed by close())

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: cuda -> cuda:LOCAL_RANK under torchrun."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1 (nccl for CUDA, gloo
    otherwise; rendezvous from torchrun's environment); without torchrun, a single-process ``Dist()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, False)
    if device.type == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local, True)
