"""Classifiers and their checkpoints.

A checkpoint is a folder holding ``model.safetensors`` (the state dict, incl. the normalisation
buffers) and ``config.json`` (``name``, ``num_classes``, ``in_channels``, ``image_size``,
``build_kwargs`` + whatever extra keys the caller gave ``save``). Never a pickle.

``load`` also reads external weight files of the robustness codebases (see its docstring); every
file goes through the one reader of ``cdp_fast.models.checkpoint`` (no pickle code runs, keys and
shapes checked). The diffusion UNets live in ``cdp_fast.models.unet`` (trained here) and
``cdp_fast.models.ddpm`` (Ho et al.'s released architecture); EDM's networks and preconditioners
(denoisers D(x; sigma)) in ``cdp_fast.models.edm``, read from NVlabs ``.pkl`` files without running
their code by ``cdp_fast.models.edm_pickle``.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..utils import atomic_write_bytes, write_json
from .checkpoint import load_into, read_file, read_json_object, read_state_dict
from .classifiers import (
    NAMES,
    Classifier,
    DMWideResNet,
    PreActResNet18,
    SmallCNN,
    WideResNet,
    build,
)

__all__ = ["build", "save", "load", "read_config", "NAMES", "Classifier", "SmallCNN",
           "PreActResNet18", "WideResNet", "DMWideResNet"]

WEIGHTS, CONFIG = "model.safetensors", "config.json"
_RESERVED = ("name", "num_classes", "in_channels", "image_size", "build_kwargs")


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the module; save the original's parameter names.
    return getattr(model, "_orig_mod", model)


def save(model: nn.Module, folder, *, name: str | None = None, **config) -> Path:
    """Write ``folder/model.safetensors`` + ``folder/config.json`` (each atomically).

    ``name`` defaults to ``model.name`` (set by ``build``); ``num_classes``/``in_channels``/
    ``image_size`` default to the model's attributes; any other keyword is stored as extra metadata
    in config.json (JSON-serialisable values). Returns the folder."""
    from safetensors.torch import save as st_save

    model = _unwrap(model)
    folder = Path(folder)
    cfg = {"name": name or getattr(model, "name", None)}
    if not cfg["name"]:
        raise ValueError("save: give name= (the model was not made by models.build)")
    for k in ("num_classes", "in_channels", "image_size"):
        v = config.pop(k, getattr(model, k, None))
        if v is None:
            raise ValueError(f"save: {k} unknown; pass {k}= (the model was not made by models.build)")
        cfg[k] = int(v)
    cfg["build_kwargs"] = config.pop("build_kwargs", getattr(model, "build_kwargs", {}))
    cfg.update(config)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS, st_save(state, metadata={"format": "pt", "name": cfg["name"]}))
    write_json(folder / CONFIG, cfg)
    return folder


def _folder(path) -> Path:
    p = Path(path)
    if p.is_file() and p.name in (WEIGHTS, CONFIG):
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint folder {p} does not exist (expected {p}/{WEIGHTS} + {p}/{CONFIG})")
    return p


def read_config(folder) -> dict:
    """The checkpoint's config.json as a dict (clear errors when missing/invalid)."""
    p = _folder(folder)
    cf = p / CONFIG
    if not cf.is_file():
        raise FileNotFoundError(f"{cf} is missing: a checkpoint folder holds {WEIGHTS} and {CONFIG}")
    cfg = read_json_object(cf)
    missing = [k for k in ("name", "num_classes", "in_channels", "image_size") if k not in cfg]
    if missing:
        raise ValueError(f"{cf} lacks {missing}: not a classifier checkpoint (name={cfg.get('name')!r})")
    return cfg


def load(path, device="cpu", *, arch: str | None = None, num_classes: int | None = None,
         in_channels: int | None = None, image_size: int = 32, mean=None, std=None) -> nn.Module:
    """Load a classifier -> model on ``device`` in eval mode.

    ``path`` is a cdp-fast checkpoint folder (``model.safetensors`` + ``config.json``: the model is
    rebuilt from config.json), or an external weights file of the robustness codebases
    (``.pt``/``.pth``/``.ckpt``/``.safetensors``; ``{'model_state_dict': ...}``, ``{'state_dict': ...}``
    or a raw state dict, ``module.`` / ``Sequential(Normalization, model)`` prefixes removed), which
    needs ``arch`` (e.g. ``"wrn-28-10-swish"``). For external files ``num_classes`` and
    ``in_channels`` default to what the tensors say; the input normalisation is the file's
    ``Normalization`` when it has one, else ``mean``/``std``, else the architecture's default
    (CIFAR-10 statistics for 3 channels). Files are never unpickled beyond tensors."""
    p = Path(path)
    if p.is_file() and not (p.name in (WEIGHTS, CONFIG) and (p.parent / CONFIG).is_file()):
        return _load_external(p, device, arch, num_classes, in_channels, image_size, mean, std)
    p = _folder(p)
    cfg = read_config(p)
    wf = p / WEIGHTS
    if not wf.is_file():
        raise FileNotFoundError(f"{wf} is missing: a checkpoint folder holds {WEIGHTS} and {CONFIG}")
    try:
        model = build(cfg["name"], num_classes=cfg["num_classes"], in_channels=cfg["in_channels"],
                      image_size=cfg["image_size"], **(cfg.get("build_kwargs") or {}))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{p}: config.json does not describe a classifier this package builds "
                         f"(checkpoint of another model?): {e}") from None
    load_into(model, read_file(wf), str(wf), what=f"a {cfg['name']} built from {CONFIG}")
    model.checkpoint_config = cfg
    return model.to(device).eval()


_HEADS = ("logits.weight", "head.weight", "fc.weight", "linear.weight")
_STEMS = ("init_conv.weight", "stem.weight", "conv1.weight", "conv.0.weight")


def _load_external(p: Path, device, arch, num_classes, in_channels, image_size, mean, std) -> nn.Module:
    if not arch:
        raise ValueError(f"{p} is a weights file, not a cdp-fast checkpoint folder: give its architecture "
                         f"(arch=, --features-arch / --labeler-arch), e.g. wrn-28-10-swish")
    state, norm = read_state_dict(p)
    if num_classes is None:
        head = next((state[k] for k in _HEADS if k in state and state[k].ndim == 2), None)
        if head is None:
            raise ValueError(f"{p}: cannot tell the number of classes (no {'/'.join(_HEADS)}); pass num_classes=")
        num_classes = int(head.shape[0])
    if in_channels is None:
        stem = next((state[k] for k in _STEMS if k in state and state[k].ndim == 4), None)
        in_channels = int(stem.shape[1]) if stem is not None else 3
    if "mean" in norm and "std" in norm:
        mean, std = norm["mean"].flatten().tolist(), norm["std"].flatten().tolist()
    kw = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
    model = build(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw)
    # the reference models keep mean/std outside their state dict: ours come from the build;
    # files saved before PyTorch 0.4.1 have no BatchNorm num_batches_tracked (unused in eval)
    allow = ["mean", "std"] + [k for k in model.state_dict() if k.endswith(".num_batches_tracked")]
    load_into(model, state, str(p), allow_missing=allow, what=f"a {model.name}")
    model.checkpoint_config = {"name": model.name, "num_classes": num_classes, "in_channels": in_channels,
                               "image_size": image_size, "build_kwargs": model.build_kwargs, "source": str(p)}
    return model.to(device).eval()
