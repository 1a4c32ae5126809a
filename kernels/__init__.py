"""Fused Triton kernels of cdp-fast, each beside its pure-PyTorch reference.

Installed as ``cdp_fast.kernels`` (see setup.py); never import it as a top-level ``kernels``.
Names resolve lazily so importing the package has no side effects (Triton is only imported when
a Triton backend is actually used).
"""
from importlib import import_module

__all__ = ["hnm_loss", "infonce_loss", "ddim_update", "hnm_guided_ddim_update", "hnm_guided_affine_update",
           "backend_for"]

_LAZY = {
    "hnm_loss": ".hnm",
    "hnm_guided_ddim_update": ".hnm",
    "hnm_guided_affine_update": ".hnm",
    "infonce_loss": ".infonce",
    "ddim_update": ".ddim",
    "backend_for": "._backend",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
