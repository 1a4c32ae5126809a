"""Pure-PyTorch reference of the DDIM update (METHOD.md §3): the oracle for the Triton kernel.

    e      = eps + scale * grad                           (grad optional)
    x0     = (x - sqrt(1 - a_t) e) / sqrt(a_t)            (clamped to [-clip_x0, clip_x0] if given)
    c1     = eta * sqrt((1 - a_t / a_next) (1 - a_next) / (1 - a_t))
    c2     = sqrt(max(1 - a_next - c1^2, 0))
    x_next = sqrt(a_next) x0 + c1 z + c2 e_dir

``e_dir`` is ``e`` itself (diffusers' DDIMScheduler default, ``use_clipped_model_output=False``,
and the authors' DDIM); with ``eps_from_clipped_x0=True`` it is re-derived from the clipped x0,
e_dir = (x - sqrt(a_t) x0) / sqrt(1 - a_t) (diffusers' ``use_clipped_model_output=True``, GLIDE).
Without clipping both are the same. a_next = 1 gives c1 = c2 = 0: the step returns x0.

Math is fp32 (fp64 when any input is fp64, so gradcheck works); the output has x's dtype.
Everything here is plain differentiable torch, so autograd comes for free.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

Alpha = Union[float, torch.Tensor]

_TINY = 1e-30  # guards 0/0 when a_t = 1 (then the numerators are 0 too)


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _alpha(a: Alpha, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float / 0-d / [1] / [B] alpha as a tensor broadcastable against x (per-sample on dim 0)."""
    if not isinstance(a, torch.Tensor):
        return torch.tensor(float(a), dtype=dtype, device=x.device)
    a = a.to(device=x.device, dtype=dtype)
    if a.numel() == 1:
        return a.reshape(())
    return a.reshape(-1, *([1] * (x.ndim - 1)))


def ddim_coefficients(a_t: Alpha, a_next: Alpha, eta: float):
    """(sqrt a_t, sqrt(1 - a_t), sqrt a_next, c1, c2) of METHOD.md §3 (Song et al. Eq. 12 / 16).

    The one host-side formula of the coefficients. a_t, a_next: tensors (any broadcastable shape;
    the result has their dtype and device) or Python numbers (computed as float64 CPU tensors,
    never touching a device, so callers inside CUDA-graph capture can use it).
    """
    if not isinstance(a_t, torch.Tensor):
        a_t = torch.tensor(float(a_t), dtype=torch.float64)
    if not isinstance(a_next, torch.Tensor):
        a_next = torch.tensor(float(a_next), dtype=torch.float64, device=a_t.device)
    one_m_at = 1.0 - a_t
    ratio = (1.0 - a_t / a_next).clamp_min(0.0) * (1.0 - a_next) / one_m_at.clamp_min(_TINY)
    c1 = eta * ratio.clamp_min(0.0).sqrt()
    c2 = (1.0 - a_next - c1 * c1).clamp_min(0.0).sqrt()
    return a_t.sqrt(), one_m_at.clamp_min(0.0).sqrt(), a_next.sqrt(), c1, c2


def ddim_step_ref(x: torch.Tensor, e: torch.Tensor, coefficients, *, x0: Optional[torch.Tensor] = None,
                  clip_x0: Optional[float] = None, eps_from_clipped_x0: bool = False,
                  noise: Optional[torch.Tensor] = None):
    """The DDIM update of METHOD.md §3 given its coefficients; returns (x_next, x0).

    ``coefficients`` = (sqrt a_t, sqrt(1 - a_t), sqrt a_next, c1, c2) broadcastable against x (see
    :func:`ddim_coefficients`); e is the (guided) noise, already in the compute dtype. ``x0``: the
    predicted x0 when the model gives it directly (diffusers' "sample" / "v_prediction"); None
    predicts it from e. ``noise`` None adds no c1 z term. Every eager DDIM step in the package
    (the reference op, the sampler's eager path, hnm_guided_ddim_reference, the diffusers
    scheduler) is this function; the Triton twin is ``kernels.ddim._ddim_step_jit``.
    """
    sa, sb, sn, c1, c2 = coefficients
    if x0 is None:
        x0 = (x - sb * e) / sa
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        if eps_from_clipped_x0:
            e = (x - sa * x0) / sb.clamp_min(math.sqrt(_TINY))
    out = sn * x0 + c2 * e
    if noise is not None:
        out = out + c1 * noise
    return out, x0


# ---------------------------------------------------------------- the in-kernel noise, in torch
_M32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)


def _mul32(a: torch.Tensor, b: int):
    """(hi, lo) 32-bit halves of a * b for uint32 values held in int64 (b split in 16-bit halves:
    no int64 product overflows)."""
    p_hi, p_lo = a * (b >> 16), a * (b & 0xFFFF)
    return (p_hi + (p_lo >> 16)) >> 16, (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32


def philox4x32_ref(seed, c0: torch.Tensor, c1: torch.Tensor, c2=None, c3=None, rounds: int = 10):
    """Philox4x32-10 (Salmon et al. 2011; Triton's ``tl.philox``) of counters (c0, c1, c2, c3), c2 and
    c3 zero by default, with the 64-bit key ``seed`` (k0 = low, k1 = high 32 bits); uint32 values
    held in int64 tensors (``seed`` may be a Python int)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c2 = torch.zeros_like(c0) if c2 is None else c2
    c3 = torch.zeros_like(c0) if c3 is None else c3
    for _ in range(rounds):
        hi_b, lo_b = _mul32(c2, _PHILOX_ROUND[1])
        hi_a, lo_a = _mul32(c0, _PHILOX_ROUND[0])
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _M32, (k1 + _PHILOX_KEY[1]) & _M32
    return c0, c1, c2, c3


def _box_muller_ref(ra: torch.Tensor, rb: torch.Tensor, dtype: torch.dtype):
    """The twin of ``kernels.ddim._box_muller``: the same fp32 uniforms (u1 rounded as the kernel
    rounds it: -2 ln u1 is sensitive near u1 = 1), then log / sin / cos in float64."""
    u1 = (((ra >> 1).to(torch.float32) + 0.5) * 2.0 ** -31).double()
    u2 = (rb >> 8).double() * 2.0 ** -24
    r = (-2.0 * u1.log()).sqrt()
    th = 2.0 * math.pi * u2
    return (r * th.cos()).to(dtype), (r * th.sin()).to(dtype)


def philox_normal_ref(rng_state: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n normals a Triton ``ddim_update`` of n elements draws from ``rng_state`` = [seed, offset]
    (int64): element e is lane e % 4 of Philox4x32-10(seed, counter ceil(offset / 4) + e // 4).
    Device ops only (no host read of the state); does not advance it."""
    seed, offset = rng_state[0], rng_state[1]
    ctr = (offset + 3) // 4 + torch.arange((n + 3) // 4, dtype=torch.int64, device=rng_state.device)
    r = philox4x32_ref(seed, ctr & _M32, (ctr >> 32) & _M32)
    n0, n1 = _box_muller_ref(r[0], r[1], dtype)
    n2, n3 = _box_muller_ref(r[2], r[3], dtype)
    return torch.stack([n0, n1, n2, n3], dim=1).reshape(-1)[:n]


def ddim_update_ref(x: torch.Tensor, eps: torch.Tensor, a_t: Alpha, a_next: Alpha, *,
                    eta: float = 0.0, noise: Optional[torch.Tensor] = None,
                    grad: Optional[torch.Tensor] = None, scale: float = 0.0,
                    clip_x0: Optional[float] = None, eps_from_clipped_x0: bool = False,
                    return_x0: bool = False, generator: Optional[torch.Generator] = None):
    """Reference DDIM step; arguments as in :func:`cdp_fast.kernels.ddim_update` (unchecked here).

    ``noise=None`` with eta > 0 draws z with ``torch.randn`` (from ``generator`` if given).
    """
    dt = compute_dtype(x, eps, grad, noise)
    xf = x.to(dt)
    e = eps.to(dt)
    if grad is not None and scale != 0.0:
        e = e + scale * grad.to(dt)
    coefficients = ddim_coefficients(_alpha(a_t, x, dt), _alpha(a_next, x, dt), float(eta))
    z = None
    if eta > 0.0:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=dt,
                                device=generator.device if generator is not None else x.device
                                ).to(x.device)
        z = noise.to(dt)
    out, x0 = ddim_step_ref(xf, e, coefficients, clip_x0=clip_x0,
                            eps_from_clipped_x0=eps_from_clipped_x0, noise=z)
    out = out.to(x.dtype)
    if return_x0:
        return out, x0.to(x.dtype)
    return out
