"""Backend selection shared by every op: "reference" (pure PyTorch), "triton" or "auto"."""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

BACKENDS = ("auto", "reference", "triton")

# Set only by kernels/_aot.py (the ahead-of-time compile gate) while it records the launches the
# public ops make on CPU tensors: the launches are compiled for a GPU target, never run, so the
# ops' outputs are garbage and checks that read kernel outputs must be skipped.
_LAUNCH_ONLY = False


def interpreting() -> bool:
    """True when Triton runs on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_only() -> bool:
    """True while the AOT gate records launches (kernels are compiled, not executed)."""
    return _LAUNCH_ONLY


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an odd platform
        return False
    return True


def backend_for(backend: str, *tensors: torch.Tensor | None) -> str:
    """Resolve ``backend`` to "reference" or "triton" for these tensors.

    "auto" picks Triton when the tensors are on CUDA and Triton imports, else the reference
    (so CPU work stays fast even under TRITON_INTERPRET=1). "triton" on CPU tensors runs the
    interpreter when TRITON_INTERPRET=1 (how the kernels are tested without a GPU); elsewhere it
    is an error, never a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        if on_cuda and triton_available():
            return "triton"
        return "reference"
    if not triton_available():
        raise RuntimeError("backend='triton' requested but triton is not importable; use backend='reference'")
    if not on_cuda and not interpreting() and not _LAUNCH_ONLY:
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU)"
        )
    return "triton"


def check_embedding_pair(a, b, name_a: str, name_b: str) -> tuple[int, int]:
    """Shared argument checks of the contrastive ops: two 2-D float tensors alike in shape, dtype
    and device, at least one feature, and the temperature; returns (B, d)."""
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, d] embeddings, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} dtypes differ: {a.dtype} vs {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} are on different devices: {a.device} vs {b.device}")
    if a.shape[1] < 1:
        raise ValueError("embeddings must have at least one feature (d >= 1)")
    return int(a.shape[0]), int(a.shape[1])


def check_extra_rows(rows, like, d: int, name: str, like_name: str, hint: str = "") -> None:
    """Shared checks of an extra set of rows (the HNM bank, InfoNCE's negatives): a 2-D [M, d]
    tensor, M >= 1, with the embeddings' dtype and device."""
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dim() != 2 or rows.shape[1] != d:
        raise ValueError(f"{name} must be 2-D [M, d={d}], got shape {tuple(rows.shape)}")
    if rows.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one row{hint}")
    if rows.dtype != like.dtype:
        raise TypeError(f"{name} dtype {rows.dtype} differs from the {like_name}' dtype {like.dtype}")
    if rows.device != like.device:
        raise ValueError(f"{name} on {rows.device}, {like_name} on {like.device}")


def check_temperature(temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def cuda_device_of(t) -> contextlib.AbstractContextManager:
    """Make the GPU of ``t`` (a tensor or a device) the current one: Triton launches on the
    current device's stream, so a tensor on cuda:1 while cuda:0 is current would otherwise be
    launched on the wrong GPU."""
    dev = t.device if isinstance(t, torch.Tensor) else t
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return torch.cuda.device(dev)
    return contextlib.nullcontext()


def on_input_device(fn):
    """Decorator for the public ops: run with the first tensor argument's GPU current."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with cuda_device_of(first):
            return fn(first, *args, **kwargs)
    return wrapper
