"""Diffusion checkpoints made elsewhere: the original DDPM files and diffusers folders.

``load_external(path)`` -> (DDPMUNet in eval mode, NoiseSchedule, meta) for
* an original DDPM checkpoint file (``.ckpt``/``.pt``/``.pth``/``.bin``/``.safetensors``, a state dict
  with the original key names, e.g. ``ema_diffusion_cifar10_model/model-790000.ckpt``): the
  architecture is inferred from the tensors, the schedule is DDPM's linear 1e-4..0.02, T = 1000;
* a diffusers ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
  ``.bin``) or a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``); the schedule comes
  from ``scheduler_config.json`` when there is one (the folder itself, or ``../scheduler``).
diffusers itself is not needed: its folders are plain JSON + weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..schedules import NoiseSchedule
from .checkpoint import load_into, read_file, read_json_object, split_prefixes, unwrap
from .ddpm import DDPMUNet, from_diffusers, infer_config

__all__ = ["load_external", "is_diffusers_folder", "schedule_from_scheduler_config", "DDPM_SCHEDULE"]

DDPM_SCHEDULE = {"name": "linear", "num_train_timesteps": 1000, "params": {"beta_start": 1e-4, "beta_end": 0.02}}
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin")


def is_diffusers_folder(path) -> bool:
    p = Path(path)
    if (p / "model_index.json").is_file():
        return True
    cf = p / "config.json"
    if not cf.is_file():
        return False
    try:
        cfg = json.loads(cf.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and ("_class_name" in cfg or "block_out_channels" in cfg)


def schedule_from_scheduler_config(cfg: dict, where: str = "scheduler_config.json") -> dict:
    """cdp-fast schedule entry ({"name", "num_train_timesteps", "params"}) of a diffusers scheduler."""
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{where}: prediction_type={cfg['prediction_type']!r}; the cdp-fast samplers "
                         f"need an epsilon-prediction model")
    if cfg.get("trained_betas") is not None:
        raise ValueError(f"{where}: trained_betas are not supported; use a named beta_schedule")
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError(f"{where}: rescale_betas_zero_snr is not supported with epsilon prediction")
    T = int(cfg.get("num_train_timesteps", 1000))
    name = cfg.get("beta_schedule", "linear")
    if name in ("linear", "scaled_linear"):
        params = {"beta_start": float(cfg.get("beta_start", 1e-4)), "beta_end": float(cfg.get("beta_end", 0.02))}
    elif name == "squaredcos_cap_v2":
        name, params = "cosine", {}
    else:
        raise ValueError(f"{where}: beta_schedule {name!r} is not supported (linear, scaled_linear, "
                         f"squaredcos_cap_v2)")
    return {"name": name, "num_train_timesteps": T, "params": params}


def _weights_file(folder: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no weights ({' or '.join(_WEIGHT_NAMES[:2])})")


def _build(kwargs: dict, state: dict, where: str, source: str) -> DDPMUNet:
    try:
        with torch.device("meta"):  # no random init: every value comes from the file
            model = DDPMUNet(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot build the DDPM UNet from {kwargs}: {e}") from None
    return load_into(model, state, where, what=f"the DDPM UNet inferred from its {source}")


def _meta(model: DDPMUNet, schedule: dict, source: str, path: Path) -> dict:
    c = model.config
    return {"arch": "ddpm", "unet": dict(c), "schedule": schedule, "source": source, "source_path": str(path),
            "image_shape": [c["in_channels"], c["image_size"], c["image_size"]], "prediction": "epsilon",
            "data_range": [-1.0, 1.0], "num_classes": None, "class_conditional": False,
            "num_params": sum(p.numel() for p in model.parameters())}


def load_external(path, device="cpu", *, image_size: int | None = None):
    """Load an original DDPM file or a diffusers folder; see the module docstring."""
    path = Path(path)
    if path.is_dir():
        root = path
        if (root / "model_index.json").is_file():
            index = read_json_object(root / "model_index.json")
            if "unet" not in index or not (root / "unet").is_dir():
                raise ValueError(f"{root}: a diffusers pipeline folder without unet/ (components {sorted(index)})")
            unet_dir = root / "unet"
        else:
            unet_dir = root
        cfg = read_json_object(unet_dir / "config.json")
        wf = _weights_file(unet_dir)
        state, _ = split_prefixes(unwrap(read_file(wf), str(wf)))
        state, kwargs = from_diffusers(state, cfg)
        model = _build(kwargs, state, str(wf), "config.json")
        sched = dict(DDPM_SCHEDULE)
        for cand in (unet_dir / "scheduler_config.json", unet_dir.parent / "scheduler" / "scheduler_config.json"):
            if cand.is_file():
                sched = schedule_from_scheduler_config(read_json_object(cand), str(cand))
                break
        source = "diffusers"
    elif path.is_file():
        state, _ = split_prefixes(unwrap(read_file(path), str(path)))
        if any(k.startswith(("down_blocks.", "time_embedding.")) for k in state):
            raise ValueError(f"{path} holds diffusers-named weights; load its folder (with config.json) instead")
        try:
            kwargs = infer_config(state, image_size=image_size)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        model = _build(kwargs, state, str(path), "tensors")
        sched = dict(DDPM_SCHEDULE)
        source = "ddpm-original"
    else:
        raise FileNotFoundError(f"diffusion checkpoint {path} does not exist (a cdp-fast or diffusers folder, "
                                f"or an original DDPM .ckpt file)")
    model = model.to(device).eval()
    return model, NoiseSchedule.from_name(sched["name"], sched["num_train_timesteps"], **sched["params"]), \
        _meta(model, sched, source, path)
