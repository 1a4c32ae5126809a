"""One checkpoint reader for every model this package loads (classifiers and diffusion UNets).

Files are read with safetensors or ``torch.load(weights_only=True)`` only: a file whose unpickling
would need arbitrary code (a pickled class, a function call) is refused with a ValueError before
anything in it runs. The state dict is then taken out of the usual training-script wrappers
(``{'model_state_dict': ...}``, ``{'state_dict': ...}``, ``{'model': ...}``, ...), DataParallel /
``torch.compile`` prefixes (``module.``, ``_orig_mod.``) are removed, and a
``Sequential(Normalization, model)`` (keys ``0.mean``/``0.std`` + ``1.<model keys>``) is split into
the model's keys and its normalisation. Keys are checked against the model: missing, unexpected and
mis-shaped keys are listed in one ValueError (never a silent ``strict=False``).
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn

__all__ = ["read_state_dict", "read_file", "unwrap", "split_prefixes", "check_keys", "load_into"]

# wrappers training scripts put around the weights, in the order they are looked for
WRAPPER_KEYS = ("model_state_dict", "state_dict", "ema_state_dict", "model", "net", "module")
_NORM_NAMES = {"mean": "mean", "std": "std", "mu": "mean", "sigma": "std"}


def read_json_object(path) -> dict:
    """A JSON file holding one object (a config), with errors that name the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def read_file(path) -> object:
    """The object stored in ``path`` (safetensors, or a torch/pickle file restricted to weights)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path} is corrupt or not a safetensors file: {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} was refused: reading it would need arbitrary unpickling (it stores Python objects, "
            f"not only tensors), which can run code, so nothing in it was executed. Re-save only the "
            f"state dict (torch.save(model.state_dict(), ...) or safetensors) from a trusted session. "
            f"Detail: {_pickle_detail(e)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is corrupt or not a torch checkpoint: {type(e).__name__}: {e}") from None


def _pickle_detail(e: Exception) -> str:
    """What torch's refusal found, without its advice to retry with weights_only=False (which
    would run the file's code): the disallowed global, or the unpickler's own error line."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        return f"it needs the Python object {m.group(1)}"
    m = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    line = m.group(1) if m else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if not line or "weights_only" in line or "Re-running" in line:
        return type(e).__name__
    return line.split(". ")[0].rstrip(".")


def _is_state(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def unwrap(obj, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object (raw or in a known wrapper)."""
    for _ in range(3):  # wrappers can nest ({'model': {'state_dict': ...}})
        if _is_state(obj):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        keys = list(obj)[:12]
        raise ValueError(f"{where}: no state dict found (looked for a dict of tensors, or one under "
                         f"{list(WRAPPER_KEYS)}); top-level keys: {keys}")
    raise ValueError(f"{where}: expected a state dict, got {type(obj).__name__}")


def split_prefixes(state: Mapping[str, torch.Tensor]):
    """Remove ``module.`` / ``_orig_mod.`` prefixes and split ``Sequential(Normalization, model)``.

    Returns ``(model_state, norm)`` where ``norm`` maps "mean"/"std" to the normaliser's tensors
    (empty when there is none)."""
    state = dict(state)
    changed = True
    while changed:
        changed = False
        for pre in ("module.", "_orig_mod."):
            if state and all(k.startswith(pre) for k in state):
                state = {k[len(pre):]: v for k, v in state.items()}
                changed = True
    norm: dict[str, torch.Tensor] = {}
    if state and all(re.match(r"^\d+\.", k) for k in state):
        groups: dict[str, dict] = {}
        for k, v in state.items():
            i, rest = k.split(".", 1)
            groups.setdefault(i, {})[rest] = v
        model_idx = max(groups, key=lambda i: len(groups[i]))
        others = [i for i in groups if i != model_idx]
        if all(set(groups[i]) <= set(_NORM_NAMES) for i in others):
            for i in others:
                norm.update({_NORM_NAMES[k]: v for k, v in groups[i].items()})
            state = groups[model_idx]
            return split_prefixes(state)[0], norm
    return state, norm


def read_state_dict(path, where: str | None = None):
    """``read_file`` + ``unwrap`` + ``split_prefixes`` -> (state dict, normalisation dict)."""
    return split_prefixes(unwrap(read_file(path), where or str(path)))


def _few(xs: list[str], n: int = 8) -> str:
    return ", ".join(xs[:n]) + (f" ... (+{len(xs) - n} more)" if len(xs) > n else "")


def check_keys(expected: Mapping[str, torch.Size | tuple], state: Mapping[str, torch.Tensor], where: str,
               *, allow_missing: Iterable[str] = (), what: str = "the model") -> None:
    """ValueError listing missing / unexpected / mis-shaped keys of ``state`` vs ``expected``."""
    allow = set(allow_missing)
    missing = sorted(k for k in set(expected) - set(state) if k not in allow)
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
                    for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or shapes:
        parts = [f"missing keys: {_few(missing)}" if missing else "",
                 f"unexpected keys: {_few(unexpected)}" if unexpected else "",
                 f"shape mismatches: {_few(shapes)}" if shapes else ""]
        raise ValueError(f"{where} does not match {what} (checkpoint of another model?); "
                         + "; ".join(x for x in parts if x))


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, *,
              allow_missing: Iterable[str] = (), what: str = "the model") -> nn.Module:
    """Check the keys (see ``check_keys``) and copy ``state`` into ``model``.

    A model built on the meta device gets the file's tensors assigned (no random init first);
    keys in ``allow_missing`` that the file lacks keep the model's values."""
    own = model.state_dict()
    check_keys({k: v.shape for k, v in own.items()}, state, where, allow_missing=allow_missing, what=what)
    on_meta = any(v.is_meta for v in own.values())
    full = {k: (state[k] if k in state else own[k]) for k in own}
    if on_meta and any(own[k].is_meta and k not in state for k in own):
        absent = [k for k in own if own[k].is_meta and k not in state]
        raise ValueError(f"{where}: no values for {_few(absent)}")
    full = {k: v.to(own[k].dtype) if v.is_floating_point() and own[k].is_floating_point() else v
            for k, v in full.items()}
    model.load_state_dict(full, strict=True, assign=on_meta)
    return model
