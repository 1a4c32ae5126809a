"""cdp-fast: a GPU engine for the Contrastive-guided Diffusion Process (Contrastive-DP).

Public names resolve lazily: importing ``cdp_fast`` loads nothing heavy and has no side effects.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "NoiseSchedule": ".schedules",
    "DDIMSampler": ".sampler",
    "DDIMScheduler": ".diffusers_compat",
    "DPMSolverMultistepScheduler": ".diffusers_compat",
    "EDMSampler": ".solvers",
    "EDMPipeline": ".edm_pipeline",
    "ContrastiveGuidance": ".guidance",
    "DDIMPipeline": ".ddim_pipeline",
    "load_diffusion": ".diffusion_train",
}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
