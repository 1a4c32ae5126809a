"""Triton helpers shared by the HNM kernels of ``hnm.py`` (forward, backward, fused guided step)
and ``_hnm_pixel.py`` (the pixel-space guided step): similarity tiles, the row <-> group index
map, the gradient terms of METHOD.md §6 and the fused guided step's store (METHOD.md §3 / §7).

Both kernel modules import this one and nothing of each other, so each reads top-down:
``_tiles`` / ``ddim`` (generic jit helpers) -> here (HNM helpers) -> ``_hnm_pixel`` (its kernels)
-> ``hnm`` (its kernels, the launchers and the public ops, which dispatch to ``_hnm_pixel``).
"""
from __future__ import annotations

import dataclasses

try:  # the package and the reference backend must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

__all__ = ["Fused", "coef_scaled"]


@dataclasses.dataclass(frozen=True)
class Fused:
    """What the fused guided step's store (``_guided_store``) takes, in kernel-argument order:
    ``ptrs`` = (X, EPS, AUX, K0, K1, K2, K3, K4, EOUT), ``scalars`` = (gscale, clip, ks0, ks1,
    ks2, kv0, kv1, kv2) and the constexpr ``flags`` (AFFINE, HAS_NOISE, CLIP, WRITE_EPS)."""
    ptrs: tuple
    scalars: tuple
    flags: dict


def coef_scaled(p, *coefs):
    """The backward coefficients as the epilogue stores them (times n = 2B) and the accumulator
    scale (1/T) / n that undoes it. They carry the mean's 1/n; G = CA w1 + CB w0 is cast to the
    input dtype before the second dot, and in fp16 1/n-sized G is subnormal (at T = 0.5, all of it
    from N = 1024 on; flushed to zero at N = 16384). Scaled by n, G stays O(1/N) and the 1/n is
    applied in fp32. (The scaling itself is done by _hnm_epilogue_kernel: no launch here.)
    ``p``: ``hnm._Prepared``."""
    return tuple(coefs) + (p.scale / (2 * p.B),)


if triton is not None:
    from ._tiles import dot, load_rows, sim_tile
    from .ddim import _ddim_step_jit  # the DDIM update of METHOD.md §3, shared with ddim.py

    @triton.jit
    def _col_tile(zr, R_PTR, rows, rmask, C_PTR, cols, cmask, D, scale, RESIDENT: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr):
        # s = R[rows] . C[cols]^T * scale. RESIDENT: zr is the row tile (loaded once per program);
        # the column tile is loaded once and returned, so the backward's gradient dot reuses it.
        # Otherwise (d > BLOCK_K, pixel space) features stream in BLOCK_K chunks.
        if RESIDENT:
            zc = load_rows(C_PTR, cols, cmask, D, BLOCK_K)
            s = dot(zr, tl.trans(zc), tl.zeros((BLOCK_R, BLOCK_C), tl.float32), FP32_DOT) * scale
        else:
            s = sim_tile(R_PTR, rows, rmask, C_PTR, cols, cmask, D, scale, BLOCK_R, BLOCK_C, BLOCK_K, FP32_DOT)
            zc = zr  # unused
        return s, zc

    @triton.jit
    def _bank_tile(zr, Z, rows, rmask, lab_r, BANK, BLAB, c0, M, D, scale, BANK_COND: tl.constexpr,
                   RESIDENT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr):
        # one tile of bank columns: similarities, which of them are negatives of each row, and
        # (RESIDENT) the bank tile itself. lab_r: the rows' labels (loaded once, BANK_COND)
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        cmask = cols < M
        s, bc = _col_tile(zr, Z, rows, rmask, BANK, cols, cmask, D, scale, RESIDENT,
                          BLOCK_R, BLOCK_C, BLOCK_K, FP32_DOT)
        valid = rmask[:, None] & cmask[None, :]
        if BANK_COND:
            blab = tl.load(BLAB + cols, mask=cmask, other=0)
            valid = valid & (lab_r[:, None] != blab[None, :])
        return cols, cmask, s, valid, bc

    @triton.jit
    def _local_to_row(li, g, B, G):
        # local index in [0, 2G) of group g -> row of Z: anchors g*G.., then their positives B+g*G..
        return tl.where(li < G, g * G + li, B + g * G + li - G).to(tl.int64)

    # Backward. With w1_rc = exp((1+b) s'_rc - LSE1_r), w0_rc = exp(b s'_rc - LSE0_r), the
    # gradient of the mean loss w.r.t. s_rc (c a negative of r, zero where s_rc < ln 1e-4) is
    #   hard: G_rc = CA_r w1_rc + CB_r w0_rc,  CA = u R (1+b)/(1-tau), CB = -u R b/(1-tau)
    #   easy: G_rc = CA_r w1_rc,               CA = u Ng
    # (R = reweight, u = dmean/dNg, zero where a clamp binds), and w.r.t. the positive logit
    # s_{r,partner}: CP_r (computed by _row_epilogue). s is symmetric, so
    #   dZ_r = (1/T) [ sum_c (G_rc + G_cr) z_c + (CP_r + CP_partner) z_partner + sum_m G_rm bank_m ]
    # where G_cr uses row c's statistics: each program owns its rows, no atomics.
    # b = 1 (BETA_ONE): w1 = exp(2 s' - LSE1) = w0^2 exp(2 LSE0 - LSE1), so
    #   G = w0 (CA' w0 + CB),  CA' = CA exp(2 LSE0 - LSE1)
    # with exp(2 LSE0 - LSE1) = (sum e)^2 / sum e^2 in [1, N]: one exp per element instead of two.
    # CA' is a per-row quantity, computed once by _row_epilogue (the CA tensor the b = 1 kernels
    # get holds CA'): per column tile in here it would cost BLOCK_C more exps per thread and tile.
    @triton.jit
    def _grad_terms(s, act, lse1, lse0, ca, cb, beta, LOG_EPS: tl.constexpr, HARD: tl.constexpr,
                    BETA_ONE: tl.constexpr, ROW_AXIS: tl.constexpr):
        # ROW_AXIS = 0: statistics belong to the tile's rows; 1: to its columns. BETA_ONE: ca is
        # CA' (lse1 unused)
        sp = tl.maximum(s, LOG_EPS)
        if ROW_AXIS == 0:
            lse1 = lse1[:, None]
            lse0 = lse0[:, None]
            ca = ca[:, None]
            cb = cb[:, None]
        else:
            lse1 = lse1[None, :]
            lse0 = lse0[None, :]
            ca = ca[None, :]
            cb = cb[None, :]
        if BETA_ONE:
            w0 = tl.exp(tl.where(act, sp - lse0, float("-inf")))
            t = w0 * (ca * w0 + cb)
        elif HARD:
            w1 = tl.exp(tl.where(act, (1.0 + beta) * sp - lse1, float("-inf")))
            w0 = tl.exp(tl.where(act, beta * sp - lse0, float("-inf")))
            t = ca * w1 + cb * w0
        else:
            t = ca * tl.exp(tl.where(act, sp - lse1, float("-inf")))
        return tl.where(act, t, 0.0)

    @triton.jit
    def _coef_rows(val, PTR, stride, rows, rmask):
        # one coefficient of the affine step per row: a host float (stride < 0: PTR unused, never
        # read) or fp32 device values, 0-d (stride 0) or per sample [B] (stride 1)
        sv = rows * 0 + stride   # as a tensor: a mask must be one (the interpreter insists)
        c = tl.load(PTR + rows * tl.maximum(sv, 0), mask=rmask & (sv >= 0), other=1.0)
        return (val * c)[:, None]

    @triton.jit
    def _guided_store(acc, rows, rmask, offs, omask, X, EPS, AUX, K0, K1, K2, K3, K4, OUT, EOUT,
                      gscale, clip, ks0, ks1, ks2, kv0, kv1, kv2,
                      AFFINE: tl.constexpr, HAS_NOISE: tl.constexpr, CLIP: tl.constexpr,
                      WRITE_EPS: tl.constexpr):
        # the fused guided step's epilogue: acc = the anchor rows' gradient tile of the HNM loss,
        # e = eps + gscale * acc (METHOD.md §7), then one of
        #   DDIM (METHOD.md §3): x_next = sqrt(a_n) x0 + c1 z + c2 e, x0 = (x - sqrt(1-a_t) e) / sqrt(a_t)
        #     K0..K4: the [B] rows sqrt a_t, sqrt(1-a_t), sqrt a_n, c1, c2; AUX = z (HAS_NOISE)
        #   AFFINE (the continuous-sigma solvers' steps): out = c_x x + c_e e + c_h h
        #     c_x, c_e, c_h: _coef_rows(kv0/kv1/kv2, K0/K1/K2, ks0/ks1/ks2); AUX = h (HAS_NOISE)
        # written to OUT (and e to EOUT with WRITE_EPS)
        x = tl.load(X + offs, mask=omask, other=0.0).to(tl.float32)
        e = tl.load(EPS + offs, mask=omask, other=0.0).to(tl.float32) + gscale * acc
        if WRITE_EPS:
            tl.store(EOUT + offs, e.to(EOUT.dtype.element_ty), mask=omask)
        if AFFINE:
            out = _coef_rows(kv0, K0, ks0, rows, rmask) * x + _coef_rows(kv1, K1, ks1, rows, rmask) * e
            if HAS_NOISE:
                h = tl.load(AUX + offs, mask=omask, other=0.0).to(tl.float32)
                out += _coef_rows(kv2, K2, ks2, rows, rmask) * h
        else:
            sa = tl.load(K0 + rows, mask=rmask, other=1.0)[:, None]
            sb = tl.load(K1 + rows, mask=rmask, other=0.0)[:, None]
            sn = tl.load(K2 + rows, mask=rmask, other=0.0)[:, None]
            cc2 = tl.load(K4 + rows, mask=rmask, other=0.0)[:, None]
            if HAS_NOISE:
                cc1 = tl.load(K3 + rows, mask=rmask, other=0.0)[:, None]
                z = tl.load(AUX + offs, mask=omask, other=0.0).to(tl.float32)
            else:  # unused without noise
                cc1 = cc2
                z = x
            out, _ = _ddim_step_jit(x, e, sa, sb, sn, cc1, cc2, z, clip, CLIP, False, HAS_NOISE)
        tl.store(OUT + offs, out, mask=omask)
