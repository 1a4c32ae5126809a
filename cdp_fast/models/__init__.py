"""Classifiers and their checkpoints.

A checkpoint is a folder holding ``model.safetensors`` (the state dict, incl. the normalisation
buffers) and ``config.json`` (``name``, ``num_classes``, ``in_channels``, ``image_size``,
``build_kwargs`` + whatever extra keys the caller gave ``save``). Never a pickle.

The diffusion UNet lives in ``cdp_fast.models.unet`` (imported on demand, not here).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn

from ..utils import atomic_write_bytes, write_json
from .classifiers import NAMES, Classifier, PreActResNet18, SmallCNN, WideResNet, build

__all__ = ["build", "save", "load", "read_config", "NAMES", "Classifier", "SmallCNN",
           "PreActResNet18", "WideResNet"]

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
    try:
        cfg = json.loads(cf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cf} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cf} must hold a JSON object, got {type(cfg).__name__}")
    missing = [k for k in ("name", "num_classes", "in_channels", "image_size") if k not in cfg]
    if missing:
        raise ValueError(f"{cf} lacks {missing}: not a classifier checkpoint (name={cfg.get('name')!r})")
    return cfg


def load(folder, device="cpu") -> nn.Module:
    """Rebuild the model named in config.json, load the weights, move to ``device``, eval mode."""
    from safetensors.torch import load_file

    p = _folder(folder)
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
    try:
        state = load_file(str(wf), device="cpu")
    except Exception as e:  # safetensors raises its own error types (SafetensorError, OSError, ...)
        raise ValueError(f"{wf} is corrupt or not a safetensors file: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:8]) + (f" ... (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatches: {few(shapes)}" if shapes else ""]
        raise ValueError(f"{wf} does not match a {cfg['name']} built from {CONFIG} "
                         f"(checkpoint of another model?); " + "; ".join(x for x in parts if x))
    model.load_state_dict(state, strict=True)
    model.checkpoint_config = cfg
    return model.to(device).eval()
