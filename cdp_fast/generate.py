"""`cdp-fast generate`: a synthetic data set (npz shards) from a diffusion checkpoint.

DDIM (or DDPM ancestral) sampling, optionally with contrastive guidance (Contrastive-DP,
Algorithm 1). Each batch is written as its own shard ``shard-NNNNN.npz`` (``image`` uint8 NHWC,
``label`` int64, ``confidence`` float32) the moment it is finished, atomically, so a crash or a
Ctrl-C loses nothing already written and a rerun resumes at the first missing shard. Shard i
starts from the noise of seed ``seed + i``: a DDIM run and a Contrastive-DP run with the same
seed begin from the same x_T, image for image.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import field
from .utils import progress, resolve_device, write_json

GUIDANCE = ("none", "hnm", "hnm-easy", "infonce")


@dataclass
class GenerateConfig:
    checkpoint: str = field("runs/pipeline/diffusion", help="diffusion checkpoint folder (train-diffusion)")
    out: str = field("runs/generate", help="output folder for the npz shards, grid.png, summary.json")
    n: int = field(1000, help="number of images")
    batch_size: int = field(500, help="images per sampling batch (= one shard)")
    steps: int = field(100, help="sampling steps")
    method: str = field("ddim", help="ddim, or ddpm ancestral (the authors' MNIST/GTSRB sampler)",
                        choices=("ddim", "ddpm"))
    eta: float = field(0.0, help="DDIM eta (0 deterministic)")
    skip: str = field("uniform", help="DDIM timestep spacing", choices=("uniform", "quad"))
    guidance: str = field("none", help="contrastive loss for Contrastive-DP guidance", choices=GUIDANCE)
    scale: float | None = field(None, help="guidance scale lambda. None: the feature space's default "
                                "(guidance.SPACE_SCALES, chosen with `cdp-fast sweep` on digits), for "
                                "HNM x G/512 for contrastive group G. HNM / InfoNCE: with the head 1e5 "
                                "(the authors') / 3e2; features without head 5e4 / 3e2; pixel space "
                                "(L2-normalised pixels) 5e4 / 1e4 x C*H*W/64 (MNIST 6.1e5 / 1.2e5, "
                                "CIFAR-10 2.4e6 / 4.8e5)")
    t_min: int | None = field(400, help="guide only steps with t >= t_min (authors' CIFAR-10: 400)")
    t_max: int | None = field(None, help="guide only steps with t < t_max (authors' MNIST: 150)")
    group_size: int | None = field(None, help="contrastive group size (None: 512 or the whole batch)")
    features: str = field("identity", help="'identity' (pixel space) or a classifier checkpoint "
                                           "folder whose penultimate features guide")
    head: bool = field(True, help="online embedding head (Linear-ReLU-Linear-L2) trained during sampling")
    labeler: str | None = field(None, help="classifier checkpoint folder for pseudo-labels "
                                           "(class-conditional models use their conditioning labels)")
    seed: int = field(0, help="seed of the first shard's initial noise")
    device: str = field("auto", help="auto | cpu | cuda[:i]")
    bf16: bool | None = field(None, help="bf16 autocast for the networks (None: on CUDA)")
    cuda_graphs: bool | None = field(None, help="capture the sampling steps as CUDA graphs (None: on CUDA)")


def make_guidance(cfg: GenerateConfig, device: torch.device, features_model=None, image_shape=None):
    """ContrastiveGuidance from the config (None when cfg.guidance == 'none')."""
    if cfg.guidance == "none":
        return None
    from .guidance import ContrastiveGuidance

    feats = features_model
    if feats is None and cfg.features != "identity":
        from . import models

        feats = models.load(cfg.features, device=device).features
    head = bool(cfg.head) and feats is not None
    return ContrastiveGuidance(cfg.guidance, feats, head=head,
                               scale=resolve_scale(cfg, feats, head, image_shape),
                               t_min=cfg.t_min, t_max=cfg.t_max, group_size=cfg.group_size,
                               normalize=True)  # pixel space too: raw pixels vanish / overflow


def resolve_scale(cfg: GenerateConfig, feats, head: bool, image_shape=None) -> float:
    """cfg.scale, or the feature space's default (guidance.default_scale) for this group size."""
    from .guidance import default_group_size, default_scale

    if cfg.scale is not None:
        return cfg.scale
    G = cfg.group_size or default_group_size(cfg.batch_size)
    space = "head" if head else ("features" if feats is not None else "pixel")
    dim = None
    if space == "pixel":
        if image_shape is None:
            from .diffusion_train import _read_meta

            image_shape = _read_meta(Path(cfg.checkpoint))["image_shape"]
        dim = int(np.prod(image_shape))
    return default_scale(cfg.guidance, space, dim=dim, group_size=G)


def sample_batches(model, schedule, meta: dict, cfg: GenerateConfig, *, guidance=None, labeler=None,
                   device=None, out: Path | None = None, desc: str = "generate"):
    """Yield (shard index, images uint8 NCHW, labels, confidence) batch by batch.

    With ``out``, a shard already on disk is read back instead of sampled again (resume).
    """
    from .data import load_synthetic, save_synthetic, to_uint8
    from .sampler import DDIMSampler

    C, H, W = meta["image_shape"]
    conditional = bool(meta.get("class_conditional"))
    num_classes = int(meta.get("num_classes") or 10)
    if not conditional and labeler is None:
        raise ValueError("an unconditional diffusion model needs a --labeler classifier checkpoint "
                         "to pseudo-label the synthetic images")
    sampler = DDIMSampler(model, schedule, steps=cfg.steps, eta=cfg.eta, skip=cfg.skip,
                          guidance=guidance, method=cfg.method, bf16=cfg.bf16,
                          cuda_graphs=cfg.cuda_graphs)
    n_shards = -(-cfg.n // cfg.batch_size)
    for i in progress(range(n_shards), desc=desc, unit="shard"):
        n = min(cfg.batch_size, cfg.n - i * cfg.batch_size)
        path = None if out is None else out / f"shard-{i:05d}.npz"
        if path is not None and path.exists():
            imgs, labels, extra = load_synthetic(path, with_extra=True)
            if len(imgs) == n:
                conf = extra.get("confidence", np.ones(n, np.float32))
                yield i, imgs, labels, torch.as_tensor(conf)
                continue
        y = None
        if conditional:
            y = (torch.arange(cfg.batch_size, device=device) + i * cfg.batch_size) % num_classes
        # always a full batch (then trimmed): a short last shard keeps the contrastive groups
        x0 = sampler.sample(cfg.batch_size, (C, H, W), seed=cfg.seed + i, labels=y, device=device)[:n]
        y = None if y is None else y[:n]
        imgs = to_uint8((x0.float().clamp(-1, 1) + 1) / 2).cpu()
        if conditional:
            labels, conf = y.cpu(), torch.ones(n)
        else:
            from .pseudolabel import pseudo_label

            labels, conf = pseudo_label(labeler, imgs.to(device))
            labels, conf = labels.cpu(), conf.cpu()
        if path is not None:
            save_synthetic(path, imgs, labels, confidence=conf.numpy().astype(np.float32))
        yield i, imgs, labels, conf


def generate(cfg: GenerateConfig, *, model=None, schedule=None, meta=None, features_model=None,
             labeler=None) -> dict:
    """Sample ``cfg.n`` images into ``cfg.out``; returns a summary dict (also summary.json)."""
    import time

    from .diffusion_train import load_diffusion
    from .figures import sample_grids

    if cfg.n < 1 or cfg.batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={cfg.n}, batch_size={cfg.batch_size}")
    device = resolve_device(cfg.device)
    if model is None:
        model, schedule, meta = load_diffusion(cfg.checkpoint, device=device)
    if labeler is None and cfg.labeler:
        from . import models

        labeler = models.load(cfg.labeler, device=device)
    guidance = make_guidance(cfg, device, features_model, image_shape=meta["image_shape"])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, cfg)
    t0 = time.perf_counter()
    first, counts = None, np.zeros(int(meta.get("num_classes") or 10), dtype=np.int64)
    for i, imgs, labels, _ in sample_batches(model, schedule, meta, cfg, guidance=guidance,
                                             labeler=labeler, device=device, out=out,
                                             desc=f"generate ({cfg.guidance})"):
        first = imgs[:100] if first is None else first
        counts += np.bincount(labels.numpy(), minlength=len(counts))[:len(counts)]
    wall = time.perf_counter() - t0
    sample_grids({f"{cfg.guidance if cfg.guidance != 'none' else cfg.method}": first.numpy()},
                 out / "grid.png")
    summary = {"n": cfg.n, "shards": -(-cfg.n // cfg.batch_size), "out": str(out),
               "guidance": cfg.guidance, "wall_s": round(wall, 2),
               "images_per_s": round(cfg.n / wall, 2) if wall > 0 else None,
               "label_counts": counts.tolist(), "device": str(device)}
    write_json(out / "summary.json", summary)
    return summary


# settings that change the images of a shard (n only decides how many shards there are)
_NOT_FINGERPRINTED = ("out", "device", "n", "bf16", "cuda_graphs")


def _claim(out: Path, cfg: GenerateConfig) -> None:
    """Resume only what the same settings made: refuse a folder written with other settings,
    and drop shards beyond this run's count so the folder holds exactly this set."""
    from .config import to_dict

    fp = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_FINGERPRINTED}
    path = out / "generate.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old != fp:
            diff = sorted(k for k in fp if not isinstance(old, dict) or old.get(k) != fp[k])
            raise ValueError(f"{out} holds shards made with other settings ({', '.join(diff)} differ); "
                             f"use another --out or delete the folder")
    elif any(out.glob("shard-*.npz")):
        raise ValueError(f"{out} holds shards of unknown origin (no generate.json); use another --out")
    write_json(path, fp)
    n_shards = -(-cfg.n // cfg.batch_size)
    for p in out.glob("shard-*.npz"):
        if int(p.stem.split("-")[1]) >= n_shards:
            p.unlink()


def run(cfg: GenerateConfig) -> dict:
    return generate(cfg)
