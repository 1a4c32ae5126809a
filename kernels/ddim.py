"""Fused DDIM update (METHOD.md §3): one elementwise pass, in-kernel Philox noise.

Public entry: :func:`ddim_update`. The pure-PyTorch oracle is :mod:`.ddim_ref`.

Noise and graph safety
----------------------
With ``eta > 0`` and ``noise=None`` the Triton kernel draws z in-kernel from the int64 device tensor
``rng_state = [seed, offset]`` (``offset`` counts normals). The stream: element e (flat, of this
call) is lane ``e % 4`` of Philox4x32-10 (Triton's ``tl.philox``, Salmon et al. 2011) with the 64-bit
key ``seed`` and the 64-bit counter ``ceil(offset / 4) + e // 4`` (as the two low counter words);
each 4 uint32 become 4 normals by two Box-Muller transforms (``_box_muller``). One Philox call per
4 normals, all per-element index math in 32 bits: the counter is ``lo + i`` with a carry into
``hi`` (i = e // 4 < 2^32, so one call draws at most 2^34 elements; a clear error beyond), so
there is no 2^32 wrap: a seed has 2^64 counters. After the launch :func:`ddim_update` advances the
state *in place, as a device op*: ``rng_state[1] += rng_advance(x.numel())`` (x.numel() rounded
up to a multiple of 4, as :func:`advance_rng` does). So a caller creates the state once
(:func:`make_rng_state`), passes the same tensor every step, and each step — including every replay
of a captured CUDA graph, which replays the launch and the in-place add — draws fresh,
non-overlapping noise. Same state -> same noise. With ``rng_state=None`` a fresh state is seeded
from torch's default (CPU) generator, so ``torch.manual_seed`` makes runs reproducible (not
graph-capturable: it builds a tensor).

The reference backend draws the same stream with torch ops (``ddim_ref.philox_normal_ref``: the same
Philox words and uniforms, log / sin / cos in float64, so equal to ~1e-6; device ops only) and
advances the state the same way; without ``rng_state`` it uses ``generator`` or torch's default
generator.

Cost (sm_90, SASS of ``_ddim_fwd_kernel`` from the compile gate's cubins; 1024-element programs,
4 warps: 8 elements per thread in straight-line code, so instructions / element ~ SASS / 8).
Bytes / element: 3 x itemsize (x, eps in, x_next out; + itemsize for each of ``noise``, ``grad``,
x0 when given), 6 B in bf16, 12 B in fp32; the in-kernel noise reads nothing. Instructions /
element, bf16 (fp32): no noise 18 (16), given noise 22 (19), in-kernel Philox 70 (68), of which
~20 Philox (10 rounds for 4 lanes) and ~25 Box-Muller (log, sqrt, polynomial sincos for 2 lanes).
Before (``tl.randn(seed, offset + i)``: a whole Philox call per element, a libdevice cosf with its
slow path): 236 (234), 48 (58) registers against 32 (40) now. At an H200's ~3.3e13 thread
instructions/s and 4.8 TB/s (estimates, not measured): ~4.7e11 elem/s issue vs 8e11 elem/s
memory in bf16, still issue-bound (~1.7x, was ~6x), about balanced in fp32.

Alphas: ``a_t`` / ``a_next`` are Python floats (kernel arguments), 0-d/[1] tensors (read by the
kernel through a pointer: e.g. ``table[step_counter]`` on the device, no host sync) or per-sample
[B] tensors (broadcast over the remaining dims). Host-side values are validated; device values are
never read on the host.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from ._backend import backend_for, on_input_device
from .ddim_ref import _TINY, _alpha, compute_dtype, ddim_coefficients, ddim_update_ref, philox_normal_ref

try:  # Triton is optional: the reference backend works without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["ddim_update", "make_rng_state", "advance_rng", "rng_advance"]

Alpha = Union[float, torch.Tensor]
_BLOCK = 1024
_MAX_PHILOX_ELEMS = 4 * 2 ** 32  # the per-launch counter index e // 4 is a uint32
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# RNG state helpers
# --------------------------------------------------------------------------------------------
def make_rng_state(seed: Optional[int] = None, device=None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """An int64 tensor [seed, offset=0] on ``device``; seed drawn from torch's RNG when None."""
    if seed is None:
        dev = generator.device if generator is not None else "cpu"  # default: CPU generator, no device sync
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=dev).item())
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return torch.tensor([seed, 0], dtype=torch.int64, device=device)


def rng_advance(n: int) -> int:
    """How far a draw of n normals moves the offset: n rounded up to whole Philox calls (4 normals)."""
    return 4 * ((int(n) + 3) // 4)


def advance_rng(rng_state: torch.Tensor, n: int) -> torch.Tensor:
    """Advance the state as a ``ddim_update`` of n elements does: rng_state[1] += rng_advance(n), in
    place (a device op: graph-safe). Returns rng_state."""
    rng_state[1:].add_(rng_advance(n))
    return rng_state


def _check_rng_state(rng_state: torch.Tensor) -> None:
    if not isinstance(rng_state, torch.Tensor) or rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,):
        got = (rng_state.dtype, tuple(rng_state.shape)) if isinstance(rng_state, torch.Tensor) else type(rng_state)
        raise ValueError(f"rng_state must be an int64 tensor of shape [2] = [seed, offset], got {got}")


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
# Gradient (a_t, a_next, eta, scale are constants; m = 1 where the x0 clamp does not bind, else 0;
# sa = sqrt a_t, sb = sqrt(1 - a_t), sn = sqrt a_next; gy, gx0 = incoming grads of x_next, x0):
#   x0 = clip((x - sb e) / sa),  e = eps + scale * grad
#   default:  x_next = sn x0 + c1 z + c2 e
#       G0 = sn gy + gx0;   dx = m G0 / sa;   de = c2 gy - m G0 sb / sa
#   eps_from_clipped_x0 (e_dir = (x - sa x0) / sb):  x_next = (sn - c2 sa / sb) x0 + (c2 / sb) x + c1 z
#       G0 = (sn - c2 sa / sb) gy + gx0;   dx = (c2 / sb) gy + m G0 / sa;   de = -m G0 sb / sa
#   deps = de;  dgrad = scale de;  dnoise = c1 gy.
# Backward is done with PyTorch elementwise ops (it is off the sampling hot path).
if triton is not None:

    @triton.jit
    def _load_alpha(MODE: tl.constexpr, val, ptr, offs, inner, mask):
        # MODE 0: a host float; 1: a 0-d device tensor (no host sync); 2: per sample [B]
        if MODE == 0:
            a = val
        elif MODE == 1:
            a = tl.load(ptr).to(tl.float32)
        else:
            a = tl.load(ptr + offs // inner, mask=mask, other=1.0).to(tl.float32)
        return a

    @triton.jit
    def _ddim_coefficients_jit(a_t, a_n, eta):
        # METHOD.md §3 inside a program (alphas may be device values): the twin of
        # ddim_ref.ddim_coefficients, same guards
        one_m_at = 1.0 - a_t
        sa = tl.sqrt(a_t)
        sb = tl.sqrt(tl.maximum(one_m_at, 0.0))
        ratio = tl.maximum(1.0 - a_t / a_n, 0.0) * (1.0 - a_n) / tl.maximum(one_m_at, 1e-30)
        c1 = eta * tl.sqrt(tl.maximum(ratio, 0.0))
        c2 = tl.sqrt(tl.maximum(1.0 - a_n - c1 * c1, 0.0))
        return sa, sb, tl.sqrt(a_n), c1, c2

    @triton.jit
    def _ddim_step_jit(x, e, sa, sb, sn, c1, c2, z, clip, CLIP: tl.constexpr,
                       EPS_FROM_CLIPPED_X0: tl.constexpr, HAS_NOISE: tl.constexpr):
        # the DDIM update of METHOD.md §3 given its coefficients (fp32): the twin of
        # ddim_ref.ddim_step_ref, shared by _ddim_fwd_kernel and the fused HNM epilogue (hnm.py)
        x0 = (x - sb * e) / sa
        if CLIP:
            x0 = tl.minimum(tl.maximum(x0, -clip), clip)
            if EPS_FROM_CLIPPED_X0:
                e = (x - sa * x0) / tl.maximum(sb, 1e-15)
        out = sn * x0 + c2 * e
        if HAS_NOISE:
            out += c1 * z
        return out, x0

    @triton.jit
    def _sincos_2pi(u):
        # (cos 2 pi u, sin 2 pi u) for u in [0, 1): quadrant q = round(4u), x = (4u - q) pi/2 in
        # [-pi/4, pi/4], Taylor to x^9 / x^8 (error < 3e-8), then rotate by q quarter turns. Portable
        # (HIP's libdevice has no sinpi) and short: tl.cos/tl.sin carry a Payne-Hanek slow path.
        t = u * 4.0
        q = tl.floor(t + 0.5)
        x = (t - q) * 1.5707963267948966
        x2 = x * x
        s = x * (1.0 + x2 * (-1.6666666666666666e-01 + x2 * (8.3333333333333332e-03 + x2 * (
            -1.9841269841269841e-04 + x2 * 2.7557319223985893e-06))))
        c = 1.0 + x2 * (-0.5 + x2 * (4.1666666666666664e-02 + x2 * (
            -1.3888888888888889e-03 + x2 * 2.4801587301587302e-05)))
        qi = q.to(tl.int32) & 3
        odd = (qi & 1) != 0
        cos_ = tl.where(odd, s, c)
        sin_ = tl.where(odd, c, s)
        cos_ = tl.where((qi == 1) | (qi == 2), -cos_, cos_)
        sin_ = tl.where(qi >= 2, -sin_, sin_)
        return cos_, sin_

    @triton.jit
    def _box_muller(ra, rb):
        # two uint32 -> two N(0, 1): u1 in (0, 1] from the top 31 bits of ra (+1/2: log never sees 0,
        # |z| <= 6.7), u2 in [0, 1) from the top 24 bits of rb (exact in fp32); the twin of
        # ddim_ref._box_muller_ref
        u1 = ((ra >> 1).to(tl.int32).to(tl.float32) + 0.5) * 4.656612873077393e-10
        u2 = (rb >> 8).to(tl.int32).to(tl.float32) * 5.960464477539063e-08
        r = tl.sqrt(-2.0 * tl.log(u1))
        cs, sn = _sincos_2pi(u2)
        return r * cs, r * sn

    @triton.jit
    def _philox_normals(rng_ptr, pid, BLOCK: tl.constexpr, RUN: tl.constexpr):
        # BLOCK normals for the launch's elements e = pid * BLOCK + [0, BLOCK): element e is lane e % 4
        # of Philox4x32-10(key = seed, counter = (C + e // 4) as (lo, hi, 0, 0)), C = ceil(offset / 4)
        # (see the module doc). One Philox call per 4 normals; all per-element math is 32-bit: the
        # 64-bit counter C + i is lo + i with a carry into hi (no 2^32 wrap: period 2^64 counters).
        # RUN (4 or 8: the elements of one 16-byte access) only places the work: position j of the
        # [BLOCK/4] vectors computes counter R (j % NT) + j // NT, so that (with Triton's default
        # layout, thread t holding positions t, t + NT, ...) a thread's R counters give its RUN
        # adjacent elements and the result needs no shared-memory shuffle; the stream is the same.
        R: tl.constexpr = RUN // 4
        NT: tl.constexpr = BLOCK // RUN
        seed = tl.load(rng_ptr)
        base = (tl.load(rng_ptr + 1) + 3) >> 2            # once per program, int64 scalar
        lo = (base & 0xFFFFFFFF).to(tl.uint32)
        hi = (base >> 32).to(tl.uint32)
        j = tl.arange(0, BLOCK // 4)
        if R == 1:
            k = j
        else:
            k = R * (j % NT) + j // NT
        i = pid.to(tl.uint32) * (BLOCK // 4) + k.to(tl.uint32)
        c0 = lo + i
        c1 = hi + (c0 < i).to(tl.uint32)
        zero = c0 * 0
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
        n0, n1 = _box_muller(r0, r1)
        n2, n3 = _box_muller(r2, r3)
        z = tl.join(tl.join(n0, n2), tl.join(n1, n3))  # [BLOCK/4, 2, 2]: lanes n0 n1 n2 n3 in order
        if R != 1:  # [j // NT, j % NT, lane] -> [j % NT, j // NT, lane]: counter order
            z = tl.permute(tl.reshape(z, [R, NT, 4]), (1, 0, 2))
        return tl.reshape(z, [BLOCK])

    @triton.jit
    def _ddim_fwd_kernel(x_ptr, eps_ptr, grad_ptr, noise_ptr, out_ptr, x0_ptr,
                         at_ptr, an_ptr, rng_ptr,
                         at_val, an_val, scale, eta, clip, n_elem, inner,
                         AT_MODE: tl.constexpr, AN_MODE: tl.constexpr, HAS_GRAD: tl.constexpr,
                         NOISE_MODE: tl.constexpr, CLIP: tl.constexpr,
                         EPS_FROM_CLIPPED_X0: tl.constexpr, WRITE_X0: tl.constexpr,
                         BLOCK: tl.constexpr, RUN: tl.constexpr):
        # AT_MODE/AN_MODE: 0 = scalar argument, 1 = 0-d tensor (pointer), 2 = per-sample [B].
        # NOISE_MODE: 0 = none, 1 = given tensor, 2 = in-kernel Philox from rng_ptr = [seed, offset].
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n_elem
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GRAD:
            e += scale * tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a_t = _load_alpha(AT_MODE, at_val, at_ptr, offs, inner, mask)
        a_n = _load_alpha(AN_MODE, an_val, an_ptr, offs, inner, mask)
        sa, sb, sn, c1, c2 = _ddim_coefficients_jit(a_t, a_n, eta)
        if NOISE_MODE == 1:
            z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        elif NOISE_MODE == 2:
            z = _philox_normals(rng_ptr, tl.program_id(0), BLOCK, RUN)
        else:
            z = x  # unused (HAS_NOISE is False)
        out, x0 = _ddim_step_jit(x, e, sa, sb, sn, c1, c2, z, clip, CLIP, EPS_FROM_CLIPPED_X0,
                                 NOISE_MODE != 0)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_X0:
            tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def _dense(t: torch.Tensor) -> bool:
    if t.is_contiguous():
        return True
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.ndim == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)


def _like_x(t: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    """t with exactly x's strides (x is dense), copying only when the layouts differ."""
    if t is None or t.stride() == x.stride():
        return t
    return torch.empty_like(x, dtype=t.dtype).copy_(t)


def _alpha_arg(a: Alpha):
    """(mode, value, tensor) for the kernel: 0 = float arg, 1 = 0-d pointer, 2 = per-sample pointer."""
    if not isinstance(a, torch.Tensor):
        return 0, float(a), None
    if a.numel() == 1:
        return 1, 0.0, a.reshape(1)
    return 2, 0.0, a.contiguous().reshape(-1)


def _launch(x, eps, grad, noise, a_t, a_next, *, eta, scale, clip_x0, eps_from_clipped_x0, write_x0,
            rng_state):
    n = x.numel()
    out = torch.empty_like(x)
    x0 = torch.empty_like(x) if write_x0 else out
    if n == 0:
        return out, (x0 if write_x0 else None)
    inner = n // x.shape[0] if x.ndim > 0 and x.shape[0] > 0 else 1
    at_mode, at_val, at_t = _alpha_arg(a_t)
    an_mode, an_val, an_t = _alpha_arg(a_next)
    if eta > 0.0 and noise is not None:
        noise_mode = 1
    elif eta > 0.0 and rng_state is not None:
        noise_mode = 2
    else:
        noise_mode = 0
    if noise_mode == 2 and n > _MAX_PHILOX_ELEMS:
        raise ValueError(f"in-kernel noise draws at most {_MAX_PHILOX_ELEMS} elements per call (32-bit "
                         f"Philox counter index), got {n}: split x or pass noise=")
    grid = (triton.cdiv(n, _BLOCK),)
    _ddim_fwd_kernel[grid](
        x, eps, grad if grad is not None else x, noise if noise_mode == 1 else x, out, x0,
        at_t if at_t is not None else x, an_t if an_t is not None else x,
        rng_state if noise_mode == 2 else x,
        at_val, an_val, float(scale), float(eta), float(clip_x0 if clip_x0 is not None else 0.0), n, inner,
        AT_MODE=at_mode, AN_MODE=an_mode, HAS_GRAD=grad is not None, NOISE_MODE=noise_mode,
        CLIP=clip_x0 is not None,
        EPS_FROM_CLIPPED_X0=bool(eps_from_clipped_x0 and clip_x0 is not None),
        WRITE_X0=bool(write_x0), BLOCK=_BLOCK, RUN=8 if x.element_size() == 2 else 4, num_warps=4,
    )
    return out, (x0 if write_x0 else None)


class _DDIMUpdateFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, grad, noise, a_t, a_next, opts):
        out, x0 = _launch(x, eps, grad, noise, a_t, a_next, **opts)
        ctx.opts = opts
        ctx.a = (a_t, a_next)
        ctx.save_for_backward(x, eps, grad, noise)
        ctx.set_materialize_grads(False)
        if x0 is None:
            return out
        return out, x0

    @staticmethod
    def backward(ctx, g_out, g_x0=None):
        x, eps, grad, noise = ctx.saved_tensors
        o = ctx.opts
        a_t, a_next = ctx.a
        ref = g_out if g_out is not None else g_x0
        if ref is None:
            return (None,) * 7
        dt = torch.float32
        at, an = _alpha(a_t, x, dt), _alpha(a_next, x, dt)
        sa, sb, sn, c1, c2 = ddim_coefficients(at, an, float(o["eta"]))
        gy = g_out.to(dt) if g_out is not None else torch.zeros((), dtype=dt, device=x.device)
        gx0 = g_x0.to(dt) if g_x0 is not None else torch.zeros((), dtype=dt, device=x.device)
        clip = o["clip_x0"]
        if clip is not None:
            e = eps.to(dt) if grad is None else eps.to(dt) + o["scale"] * grad.to(dt)
            raw = (x.to(dt) - sb * e) / sa
            m = ((raw >= -clip) & (raw <= clip)).to(dt)
        else:
            m = 1.0
        if clip is not None and o["eps_from_clipped_x0"]:
            sbp = sb.clamp_min(math.sqrt(_TINY))
            g0 = (sn - c2 * sa / sbp) * gy + gx0
            dx = (c2 / sbp) * gy + m * g0 / sa
            de = -m * g0 * sb / sa
        else:
            g0 = sn * gy + gx0
            dx = m * g0 / sa
            de = c2 * gy - m * g0 * sb / sa
        dx = dx.expand(x.shape)
        de = de.expand(x.shape)
        need = ctx.needs_input_grad
        d_x = dx.to(x.dtype) if need[0] else None
        d_eps = de.to(eps.dtype) if need[1] else None
        d_grad = (o["scale"] * de).to(grad.dtype) if grad is not None and need[2] else None
        d_noise = None
        if noise is not None and need[3]:
            d_noise = (c1 * gy).expand(x.shape).to(noise.dtype) if o["eta"] > 0.0 else torch.zeros_like(noise)
        return d_x, d_eps, d_grad, d_noise, None, None, None


# --------------------------------------------------------------------------------------------
# validation and the public function
# --------------------------------------------------------------------------------------------
def _check_alpha(name: str, a: Alpha, batch: int) -> None:
    if isinstance(a, torch.Tensor):
        if not (a.is_floating_point()):
            raise TypeError(f"{name} must be a float or a floating tensor, got dtype {a.dtype}")
        if a.numel() != 1 and not (a.numel() == batch and a.ndim >= 1 and a.shape[0] == batch
                                   and all(s == 1 for s in a.shape[1:])):
            raise ValueError(f"{name} must be a float, a 0-d tensor or a per-sample tensor of length "
                             f"B={batch}; got shape {tuple(a.shape)}")
        if a.device.type != "cpu":  # never read device values on the host (no sync)
            return
        bad = ~torch.isfinite(a) | (a <= 0) | (a > 1)
        if bool(bad.any()):
            raise ValueError(f"{name} must be finite and in (0, 1]; got {a.flatten()[bad.flatten()][:4].tolist()}")
        return
    if isinstance(a, bool) or not isinstance(a, numbers.Real):
        raise TypeError(f"{name} must be a float or a tensor, got {type(a).__name__}")
    a = float(a)
    if not math.isfinite(a) or not (0.0 < a <= 1.0):
        raise ValueError(f"{name} must be finite and in (0, 1], got {a}")


def _check_inputs(x, eps, grad, noise, a_t, a_next, eta, scale, clip_x0):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension (the batch)")
    for name, t in (("eps", eps), ("grad", grad), ("noise", noise)):
        if t is None:
            if name == "eps":
                raise TypeError("eps must be a tensor")
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if t.shape != x.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match x shape {tuple(x.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name, v in (("eta", eta), ("scale", scale)):
        if isinstance(v, (torch.Tensor, bool)) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"{name} must be a finite Python number, got {v!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if clip_x0 is not None and (isinstance(clip_x0, torch.Tensor) or not float(clip_x0) > 0
                                or not math.isfinite(float(clip_x0))):
        raise ValueError(f"clip_x0 must be None or a positive finite float, got {clip_x0!r}")
    _check_alpha("a_t", a_t, x.shape[0])
    _check_alpha("a_next", a_next, x.shape[0])
    for name, a in (("a_t", a_t), ("a_next", a_next)):
        if isinstance(a, torch.Tensor) and a.device != x.device and a.device.type != "cpu":
            raise ValueError(f"{name} is on {a.device} but x is on {x.device}")


def _reference_noise(x, rng_state):
    """The Triton kernel's noise stream in torch (see the module doc), shaped like x."""
    z = philox_normal_ref(rng_state.to(x.device), x.numel(), compute_dtype(x))
    return z.reshape(x.shape)


@on_input_device
def ddim_update(x: torch.Tensor, eps: torch.Tensor, a_t: Alpha, a_next: Alpha, *,
                eta: float = 0.0, noise: Optional[torch.Tensor] = None,
                grad: Optional[torch.Tensor] = None, scale: float = 0.0,
                clip_x0: Optional[float] = None, rng_state: Optional[torch.Tensor] = None,
                return_x0: bool = False, eps_from_clipped_x0: bool = False,
                generator: Optional[torch.Generator] = None, backend: str = "auto"):
    """One DDIM step x_t -> x_next (METHOD.md §3); returns x_next, or (x_next, x0) if ``return_x0``.

    e = eps + scale * grad; x0 = (x - sqrt(1-a_t) e) / sqrt(a_t), clamped to [-clip_x0, clip_x0]
    if given; x_next = sqrt(a_next) x0 + c1 z + c2 e with c1, c2 of METHOD.md §3. The direction term
    uses the unclipped e, as diffusers' DDIMScheduler does by default; ``eps_from_clipped_x0=True``
    re-derives it from the clipped x0 (diffusers' ``use_clipped_model_output=True``).

    ``noise`` given -> z (used only when eta > 0). ``noise=None`` with eta > 0 -> z from
    ``rng_state`` (int64 [seed, offset] on x's device, advanced in place by
    ``rng_advance(x.numel())``; see the module doc), Philox inside the Triton kernel, the same
    stream in torch on the reference backend. fp32 math whatever the input dtypes; output has
    x's dtype. Differentiable w.r.t. x, eps, grad and noise (a_t, a_next are constants on the
    Triton path). backend: "auto" | "reference" | "triton".
    """
    _check_inputs(x, eps, grad, noise, a_t, a_next, eta, scale, clip_x0)
    if rng_state is not None:
        _check_rng_state(rng_state)
    eta, scale = float(eta), float(scale)
    clip_x0 = float(clip_x0) if clip_x0 is not None else None
    if grad is not None and scale == 0.0:
        grad = None  # scale 0: grad does not enter (and needs no gradient)
    if eta == 0.0:
        noise_used = None
    else:
        noise_used = noise
    draws = eta > 0.0 and noise is None

    which = backend_for(backend, x, eps, grad, noise)
    alpha_needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in (a_t, a_next))
    if which == "triton":
        # x's dtype is the output dtype; the other inputs may be any float dtype (loaded as fp32)
        bad = [x.dtype] if x.dtype not in _TRITON_DTYPES else []
        if bad or alpha_needs_grad:
            if backend == "triton":
                if bad:
                    raise TypeError(f"backend='triton' supports float32/float16/bfloat16 x, got {bad[0]}")
                raise ValueError("backend='triton' treats a_t/a_next as constants; they require grad "
                                 "(use backend='reference')")
            which = "reference"

    if which == "reference":
        if draws and rng_state is not None:
            noise_used = _reference_noise(x, rng_state)
        out = ddim_update_ref(x, eps, a_t, a_next, eta=eta, noise=noise_used, grad=grad, scale=scale,
                              clip_x0=clip_x0, eps_from_clipped_x0=eps_from_clipped_x0,
                              return_x0=return_x0, generator=generator)
        if draws and rng_state is not None:
            advance_rng(rng_state, x.numel())
        return out

    # Triton path
    if draws and rng_state is None:
        rng_state = make_rng_state(device=x.device, generator=generator)
    if draws and rng_state.device != x.device:
        raise ValueError(f"rng_state is on {rng_state.device} but x is on {x.device}")
    xd = x if _dense(x) else x.contiguous()
    a_t = a_t.to(xd.device) if isinstance(a_t, torch.Tensor) else a_t
    a_next = a_next.to(xd.device) if isinstance(a_next, torch.Tensor) else a_next
    opts = dict(eta=eta, scale=scale, clip_x0=clip_x0, eps_from_clipped_x0=bool(eps_from_clipped_x0),
                write_x0=bool(return_x0), rng_state=rng_state if draws else None)
    res = _DDIMUpdateFn.apply(xd, _like_x(eps, xd), _like_x(grad, xd), _like_x(noise_used, xd),
                              a_t, a_next, opts)
    if draws:
        advance_rng(rng_state, x.numel())
    return res
