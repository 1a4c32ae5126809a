"""``cdp-fast train-diffusion --objective edm``: EDM's training objective and preconditioning
(Karras et al. 2022; docs/METHOD.md §14, "EDM networks and preconditioning").

The network is ``EDMPrecond`` around a ``SongUNet`` (DDPM++) sized per preset (``EDM_PRESETS``;
the digits default is 2 levels of 32/64 channels, ~0.5M parameters). Loss: EDM's, ln sigma ~
N(-1.2, 1.2^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, sigma_data = 0.5
(``cdp_fast.models.edm.edm_loss``), averaged over pixels and the batch. Everything else (data and
the no-leakage rule, AdamW, warm-up, clipping, EMA, bf16 autocast, logging, atomic writes) is the
DDPM objective's (``cdp_fast.diffusion_train``). The checkpoint is an EDM folder
(``cdp_fast.models.edm.save_folder``) that ``load_diffusion`` returns as a ``Denoiser``.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from . import config as _config
from .models import edm
from .training import ema_decay_at, ema_update
from .utils import progress, resolve_device, seed_everything, write_json

__all__ = ["EDM_PRESETS", "edm_network_kwargs", "train_edm"]

# SongUNet (DDPM++) settings per train-diffusion preset; "ddpm-cifar10" is EDM's CIFAR-10 DDPM++
# (56M parameters, no augmentation here).
EDM_PRESETS: dict[str, dict] = {
    "tiny": dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0),
    "small": dict(model_channels=64, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[7], dropout=0.1),
    "ddpm-cifar10": dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
                         dropout=0.13),
}


def edm_network_kwargs(preset: str, *, channels: int, resolution: int, label_dim: int) -> dict:
    """EDMPrecond init kwargs for ``preset`` (SongUNet DDPM++ inside)."""
    if preset not in EDM_PRESETS:
        raise ValueError(f"train-diffusion --objective edm: unknown preset {preset!r} (known: {sorted(EDM_PRESETS)})")
    p = EDM_PRESETS[preset]
    levels = len(p["channel_mult"])
    if resolution % (1 << (levels - 1)):
        raise ValueError(f"train-diffusion --objective edm: image size {resolution} is not divisible by "
                         f"{1 << (levels - 1)} (preset {preset!r} has {levels} levels)")
    return dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim, model_type="SongUNet",
                embedding_type="positional", encoder_type="standard", decoder_type="standard",
                channel_mult_noise=1, resample_filter=[1, 1], **p)


def train_edm(cfg, data, name: str, s: dict) -> Path:
    """Train ``EDMPrecond(SongUNet)`` with EDM's loss; ``s`` are the resolved settings
    (``diffusion_train.resolve_settings``) and ``data`` the loaded ``ImageData``."""
    from .diffusion_train import CHECKPOINT_FORMAT

    x_all = data.x_train
    N, C, H, _ = x_all.shape
    num_classes = int(data.num_classes)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    kw = edm_network_kwargs(s["preset"], channels=C, resolution=H,
                            label_dim=num_classes if cfg.class_conditional else 0)
    net = edm.build("EDMPrecond", kw).to(device).train()  # init on the CPU: same weights on every device
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    params = list(net.parameters())
    fwd = torch.compile(net) if cfg.compile else net
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=cfg.weight_decay,
                            **({"fused": True} if device.type == "cuda" else {}))
    warm = s["warmup"]
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0)

    x_dev = x_all.to(device)
    y_dev = data.y_train.to(device=device, dtype=torch.long)
    flip = name in ("cifar10",)
    B = s["batch_size"]
    folder = Path(cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "train_config.json", _config.to_dict(cfg))
    meta = {"objective": "edm", "preset": s["preset"], "dataset": name, "num_classes": num_classes,
            "real_images": N, "real_limit": cfg.real_limit, "seed": cfg.seed,
            "num_params": sum(p.numel() for p in params), "lr": s["lr"], "warmup": warm, "batch_size": B,
            "ema_decay": cfg.ema_decay, "precision": "bf16" if bf16 else "fp32", "device": str(device),
            "loss": {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}}
    losses: list[list] = []

    def save(step, final_loss, wall):
        edm.save_folder(folder, ema, dict(meta, iters=step, final_loss=final_loss, wall_s=round(wall, 2),
                                          train_config=_config.to_dict(cfg)), fmt=CHECKPOINT_FORMAT, loss_log=losses)

    loss_sum = torch.zeros((), device=device)
    window, last_loss = 0, None
    t0 = time.perf_counter()
    bar = progress(range(1, s["iters"] + 1), desc="train-diffusion (edm)")
    for step in bar:
        idx = torch.randint(0, N, (B,), device=device, generator=gen)
        y = x_dev[idx].to(torch.float32).div_(127.5).sub_(1.0)
        if flip:
            m = torch.rand(B, device=device, generator=gen) < 0.5
            y = torch.where(m[:, None, None, None], y.flip(3), y)
        labels = (torch.nn.functional.one_hot(y_dev[idx], num_classes).to(torch.float32)
                  if cfg.class_conditional else None)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = edm.edm_loss(fwd, y, labels, generator=gen).float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        lr_sched.step()
        ema_update(ema, net, ema_decay_at(step - 1, 0, cfg.ema_decay))
        loss_sum += loss.detach()
        window += 1
        if step % cfg.log_every == 0 or step == s["iters"]:
            last_loss = (loss_sum / window).item()
            if not math.isfinite(last_loss):
                raise ValueError(f"train-diffusion: loss became {last_loss} by step {step} "
                                 f"(last good checkpoint, if any, kept in {folder}); lower --lr?")
            losses.append([step, round(last_loss, 6)])
            loss_sum.zero_()
            window = 0
            bar.set_postfix(loss=f"{last_loss:.4f}")
        if cfg.save_every and step % cfg.save_every == 0 and step != s["iters"]:
            save(step, last_loss, time.perf_counter() - t0)
    bar.close()
    save(s["iters"], last_loss, time.perf_counter() - t0)
    return folder
