"""The intermediate classifier (standard, non-robust training on the real data) and pseudo-labels.

METHOD.md §1 step 3: synthetic images are labelled by a classifier trained on the real images only;
the confidence (max softmax probability) is kept beside each label.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as data_mod
from . import models
from .attacks import predict
from .training import (
    autocast,
    derive_seed,
    lr_at,
    make_optimizer,
    optimizer_step,
    resolve_precision,
)
from .utils import progress, resolve_device


def train_classifier(data, model_name: str | None = None, epochs: int = 10, *, batch_size: int = 64,
                     optimizer: str = "adam", lr: float | None = None, momentum: float = 0.9,
                     weight_decay: float = 5e-4,
                     augment: str | None = None, device=None, seed: int = 0, precision: str = "auto",
                     show_progress: bool = True) -> nn.Module:
    """Train ``model_name`` (default: the dataset's) with cross-entropy on ``data.x_train``.

    optimizer "adam" (default, lr 3e-3, no weight decay) or "sgd" (Nesterov, lr 0.1, weight decay
    on weights only); cosine learning rate; the dataset's augmentation (``augment`` overrides).
    Adam is the default because the TRADES small-cnn (zero-initialised head) sits on a loss plateau
    for a seed-dependent ~70-200 SGD steps on digits (measured), which short runs cannot afford.
    Returns the model in eval mode on ``device``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    try:
        d = data_mod.dataset_defaults(data.name)
    except ValueError:
        d = {}
    name = model_name or d.get("model", "small-cnn")
    torch.manual_seed(seed)
    model = models.build(name, num_classes=data.num_classes, in_channels=data.x_train.shape[1],
                         image_size=data.x_train.shape[-1]).to(dev)
    bs = min(batch_size, data.x_train.shape[0])
    loader = data_mod.DeviceLoader(data.x_train, data.y_train, bs, augment=augment or d.get("augment", "none"),
                                   padding=d.get("padding", 4), device=dev)
    if optimizer == "sgd":
        lr = 0.1 if lr is None else lr
        opt = make_optimizer(model, lr, momentum, weight_decay, fused=True)
    elif optimizer == "adam":
        lr = 3e-3 if lr is None else lr
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    total, step = epochs * len(loader), 0
    scaler = torch.amp.GradScaler(dev.type) if prec == "fp16" else None
    bar = progress(total=total, desc="intermediate classifier", disable=None if show_progress else True,
                   leave=False)
    model.train()
    for epoch in range(1, epochs + 1):
        torch.manual_seed(derive_seed(seed, "torch", epoch))
        loader.generator.manual_seed(derive_seed(seed, "data", epoch))
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr, "cosine")
            with autocast(dev, prec):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer_step(loss, opt, scaler)
            step += 1
            bar.update(1)
    bar.close()
    return model.eval()


@torch.no_grad()
def pseudo_label(model: nn.Module, images: torch.Tensor, *, batch_size: int = 512, device=None,
                 precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (int64) and confidences (float32 max softmax probability) for uint8 NCHW images (CPU out)."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not torch.is_floating_point(images):
        raise TypeError(f"images must be uint8 (or float in [0,1]), got {images.dtype}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    labels, conf = [], []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(dev)
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
            p = predict(model, x, precision).softmax(1)
            c, lab = p.max(1)
            labels.append(lab.cpu())
            conf.append(c.cpu())
    finally:
        model.train(was_training)
    if not labels:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    return torch.cat(labels).to(torch.int64), torch.cat(conf).float()
