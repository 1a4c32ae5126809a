"""Pixel-space path of the fused HNM-guided steps (``hnm_guided_ddim_update`` and
``hnm_guided_affine_update`` at d >= 640; d = 3072 on CIFAR): the gradient coefficients once per
group, then a GEMM with the step's update fused in its epilogue. Private: ``hnm``'s two guided ops
dispatch here.

Why: ``hnm._hnm_bwd_kernel`` owns a [rows, BLOCK_DO] output tile, so at d = 3072 each of its
d / 128 = 24 feature chunks recomputes the similarity tiles (a full-d GEMM) and their exps. Here:

* ``_hnm_pixel_coef_kernel``, one program per (block of a group's anchor rows, column tile of the
  group's 2G columns then the bank's M): s = z_r . z_c / T once over the full d, then
  H_rc = G_rc + G_cr for negatives c (G from the forward's LSEs and the row epilogue's CA/CB,
  ``_hnm_common._grad_terms``) and H_r,partner = CP_r + CP_partner, stored in fp32; bank columns store
  G_rm (row statistics only). Same masks, statistics and coefficients as ``_hnm_bwd_kernel``.
* ``_hnm_pixel_gemm_kernel``, one program per (anchor row block, feature chunk):
  dZ_r = (1/T) (sum_c H_rc z_c + sum_m G_rm bank_m), fp32 accumulation (tensor cores for half
  inputs: H is cast to the input dtype, scaled by n = 2B as in ``_hnm_common.coef_scaled``), and
  the guided step's update (``_hnm_common._guided_store``: DDIM, METHOD.md §3, or the solvers'
  affine step) in the epilogue: writes x_next (and, on request, the guided eps) only.

Memory: H is [groups in a chunk x G, 2G] fp32 plus [.. x G, M] fp32 with a bank, i.e.
4 * B * (2G + M) bytes for the whole batch (B = G = 512, no bank: 2 MiB; M = 10^4: +20 MB).
Groups are processed in chunks so that the buffer stays under ``_H_BUDGET_BYTES`` (256 MiB); one
launch pair per chunk (a single pair at the sampler's sizes).

Cost model of the backward + DDIM step (anchor rows only; the forward statistics kernel,
2G x 2G x d x 2 FLOPs and 2 exps per entry per group, is shared and unchanged), per group with
M = 0, hard estimator (4 exps per H entry: w1, w0 for the row's and the column's statistics):
    old  _hnm_bwd_kernel:  (d / BLOCK_DO) x G x 2G x 2d  (S, once per chunk)  +  G x 2G x 2d (dZ)
                           exps (d / BLOCK_DO) x 4 x G x 2G
    new  coef + GEMM:      G x 2G x 2d (S once)  +  G x 2G x 2d (dZ),  exps 4 x G x 2G;
                           H (4 x G x 2G bytes) written once, read once per GEMM feature chunk
    B = G = 512, d = 3072, BLOCK_DO = 128: old 77.3 + 3.2 = 80.5 GFLOP, 50.3 M exps;
                                           new  3.2 + 3.2 =  6.4 GFLOP,  2.1 M exps,
                                           H: 2 MiB written, 24 x 2 MiB read (L2-resident)
    (with the shared forward, 6.4 GFLOP / 2.1 M exps: the whole step 87.0 -> 12.9 GFLOP, 52.4 -> 4.2 M exps).
    A bank adds G x M x 2d x (d / BLOCK_DO) (old) vs G x M x 2d (new) similarity FLOPs, plus G x M x 2d (dZ).
"""
from __future__ import annotations

import torch

from . import _tiles
from ._backend import interpreting
from ._hnm_common import coef_scaled

try:  # the package and the reference backend must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

# hnm_guided_ddim_update takes this path for d >= PIXEL_MIN_D. By FLOPs it wins from d / BLOCK_DO > 2
# chunks (d > 256); 640 (5 chunks, the threshold) leaves room for H's traffic and the extra
# launch at small d. Untuned: a GPU run should move it.
PIXEL_MIN_D = 640
_H_BUDGET_BYTES = 256 * 2 ** 20   # H + G_bank buffer per chunk of groups (read at call time)

if triton is not None:
    from ._hnm_common import _bank_tile, _grad_terms, _guided_store, _local_to_row
    from ._tiles import dot, sim_tile

    @triton.jit
    def _hnm_pixel_coef_kernel(Z, BANK, LAB, BLAB, LSE1, LSE0, CA, CB, CP, H, HB,
                               B, G, M, D, g0, scale, beta,
                               HARD: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_BANK: tl.constexpr,
                               BANK_COND: tl.constexpr, LOG_EPS: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                               FP32_DOT: tl.constexpr, BETA_ONE: tl.constexpr):
        # grid: (groups of this chunk x anchor row blocks, column tiles of [2G group | M bank])
        pid = tl.program_id(0)
        nrb = tl.cdiv(G, BLOCK_R)
        gl = pid // nrb                      # group within the chunk (row block of H)
        g = g0 + gl
        li = (pid % nrb) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = li < G                       # anchors only: the DDIM step needs no positive's grad
        rows = (g * G + li).to(tl.int64)
        hrows = (gl * G + li).to(tl.int64)
        lse1_r = tl.load(LSE1 + rows, mask=rmask, other=0.0)
        lse0_r = tl.load(LSE0 + rows, mask=rmask, other=0.0)
        ca_r = tl.load(CA + rows, mask=rmask, other=0.0)
        cb_r = tl.load(CB + rows, mask=rmask, other=0.0)
        ct = tl.program_id(1)
        nzt = tl.cdiv(2 * G, BLOCK_C)
        if ct < nzt:
            lj = ct * BLOCK_C + tl.arange(0, BLOCK_C)
            cmask = lj < 2 * G
            cols = _local_to_row(lj, g, B, G)
            s = sim_tile(Z, rows, rmask, Z, cols, cmask, D, scale, BLOCK_R, BLOCK_C, BLOCK_K, FP32_DOT)
            inb = rmask[:, None] & cmask[None, :]
            lpartner = li + G
            valid = inb & (lj[None, :] != li[:, None]) & (lj[None, :] != lpartner[:, None])
            if HAS_LABELS:
                lab_r = tl.load(LAB + rows, mask=rmask, other=0)
                lab_c = tl.load(LAB + cols, mask=cmask, other=0)
                valid = valid & (lab_r[:, None] != lab_c[None, :])
            act = valid & (s >= LOG_EPS)
            lse1_c = tl.load(LSE1 + cols, mask=cmask, other=0.0)
            lse0_c = tl.load(LSE0 + cols, mask=cmask, other=0.0)
            ca_c = tl.load(CA + cols, mask=cmask, other=0.0)
            cb_c = tl.load(CB + cols, mask=cmask, other=0.0)
            # H = G + G^T on the negatives (s is symmetric; G_cr uses column c's statistics)
            h = _grad_terms(s, act, lse1_r, lse0_r, ca_r, cb_r, beta, LOG_EPS, HARD, BETA_ONE, 0)
            h += _grad_terms(s, act, lse1_c, lse0_c, ca_c, cb_c, beta, LOG_EPS, HARD, BETA_ONE, 1)
            cp_r = tl.load(CP + rows, mask=rmask, other=0.0)
            cp_c = tl.load(CP + cols, mask=cmask, other=0.0)
            is_partner = inb & (lj[None, :] == lpartner[:, None])
            h = tl.where(is_partner, cp_r[:, None] + cp_c[None, :], h)
            tl.store(H + hrows[:, None] * (2 * G) + lj[None, :], h, mask=inb)
        else:
            if HAS_BANK:
                if BANK_COND:
                    lab_b = tl.load(LAB + rows, mask=rmask, other=0)
                else:
                    lab_b = rows  # unused
                cols, cmask, s, valid, _ = _bank_tile(Z, Z, rows, rmask, lab_b, BANK, BLAB, (ct - nzt) * BLOCK_C, M,
                                                      D, scale, BANK_COND, False, BLOCK_R, BLOCK_C, BLOCK_K, FP32_DOT)
                act = valid & (s >= LOG_EPS)
                gb = _grad_terms(s, act, lse1_r, lse0_r, ca_r, cb_r, beta, LOG_EPS, HARD, BETA_ONE, 0)
                tl.store(HB + hrows[:, None] * M + cols[None, :], gb, mask=rmask[:, None] & cmask[None, :])

    @triton.jit(do_not_specialize=("ks0", "ks1", "ks2"))   # -1 / 0 / 1: no specialisation each
    def _hnm_pixel_gemm_kernel(Z, BANK, H, HB, OUT, X, EPS, AUX, K0, K1, K2, K3, K4, EOUT,
                               B, G, M, D, g0, gscale, clip, ks0, ks1, ks2, kv0, kv1, kv2, acc_scale,
                               HAS_BANK: tl.constexpr, HAS_NOISE: tl.constexpr, CLIP: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DO: tl.constexpr,
                               FP32_DOT: tl.constexpr, AFFINE: tl.constexpr = False,
                               WRITE_EPS: tl.constexpr = False):
        # grid: (groups of this chunk x anchor row blocks, feature chunks); BLOCK_C: the
        # contraction step over the group's 2G columns (then the bank's M rows)
        pid = tl.program_id(0)
        nrb = tl.cdiv(G, BLOCK_R)
        gl = pid // nrb
        g = g0 + gl
        li = (pid % nrb) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = li < G
        rows = (g * G + li).to(tl.int64)
        hrows = (gl * G + li).to(tl.int64)
        do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        acc = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
        for c0 in range(0, 2 * G, BLOCK_C):
            lj = c0 + tl.arange(0, BLOCK_C)
            cmask = lj < 2 * G
            cols = _local_to_row(lj, g, B, G)
            h = tl.load(H + hrows[:, None] * (2 * G) + lj[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            zc = tl.load(Z + cols[:, None] * D + do[None, :], mask=cmask[:, None] & domask[None, :], other=0.0)
            acc = dot(h.to(zc.dtype), zc, acc, FP32_DOT)
        if HAS_BANK:
            for c0 in range(0, M, BLOCK_C):
                mc = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
                mmask = mc < M
                hb = tl.load(HB + hrows[:, None] * M + mc[None, :], mask=rmask[:, None] & mmask[None, :], other=0.0)
                bc = tl.load(BANK + mc[:, None] * D + do[None, :], mask=mmask[:, None] & domask[None, :], other=0.0)
                acc = dot(hb.to(bc.dtype), bc, acc, FP32_DOT)
        acc = acc * acc_scale   # 1/T and the 1/n the coefficients were relieved of (coef_scaled)
        omask = rmask[:, None] & domask[None, :]
        _guided_store(acc, rows, rmask, rows[:, None] * D + do[None, :], omask, X, EPS, AUX,
                      K0, K1, K2, K3, K4, OUT, EOUT, gscale, clip, ks0, ks1, ks2, kv0, kv1, kv2,
                      AFFINE, HAS_NOISE, CLIP, WRITE_EPS)


def pixel_tiles(dtype: torch.dtype) -> dict:
    """Tiles of the two kernels: "coef" (R x C similarity tiles, K the feature step) and "gemm"
    (R x DO output tiles, C the contraction step). Interpreter (unless
    ``_tiles.gpu_tiles_in_interpreter()``): 16 rows / columns (several tiles at test sizes),
    64 / 128 features (d >= 640 gives >= 5 feature tiles anyway; 16 would cost seconds per
    test). GPU: 64-wide half tiles on tensor cores (the GEMM's grid at B = G = 512, d = 3072:
    8 x 24 = 192 programs); fp32 "ieee" dots run on FMA units, so 32-wide. Chosen so that ptxas reports no spill on sm_90 / sm_80 (the AOT gate); untuned."""
    if interpreting() and not _tiles._GPU_TILES_IN_INTERPRETER:
        t = dict(BLOCK_R=16, BLOCK_C=16, num_warps=4)
        return dict(coef=dict(t, BLOCK_K=64), gemm=dict(t, BLOCK_DO=128))
    if dtype == torch.float32:
        return dict(coef=dict(BLOCK_R=32, BLOCK_C=32, BLOCK_K=32, num_warps=8),
                    gemm=dict(BLOCK_R=32, BLOCK_C=32, BLOCK_DO=64, num_warps=4))
    return dict(coef=dict(BLOCK_R=64, BLOCK_C=64, BLOCK_K=64, num_warps=8),
                gemm=dict(BLOCK_R=64, BLOCK_C=64, BLOCK_DO=128, num_warps=8))


def guided_rows(p, lse1, lse0, ca, cb, cp, out, fused, *, budget_bytes=None):
    """x_next [B, D] into ``out`` for the prepared inputs ``p`` (``hnm._Prepared``), the forward's
    statistics and the row epilogue's coefficients; ``fused`` is the ``hnm._Fused`` record
    ``hnm._backward_rows`` takes (the store's pointers, scalars and flags).

    Groups are processed in chunks whose H (+ G_bank) buffer fits ``budget_bytes`` (default
    ``_H_BUDGET_BYTES``): two launches per chunk."""
    ca, cb, cp, acc_scale = coef_scaled(p, ca, cb, cp)
    budget = _H_BUDGET_BYTES if budget_bytes is None else int(budget_bytes)
    B, G, M, D = p.B, p.G, p.M, p.D
    ngroups = B // G
    per_group = 4 * G * (2 * G + M)
    chunk = max(1, min(ngroups, budget // per_group))
    dev = p.Z.device
    h = torch.empty(chunk * G, 2 * G, dtype=torch.float32, device=dev)
    hb = torch.empty(chunk * G, M, dtype=torch.float32, device=dev) if M else h
    fl = p.flags()
    tiles = pixel_tiles(p.Z.dtype)
    tc, tg = tiles["coef"], tiles["gemm"]
    ncol = triton.cdiv(2 * G, tc["BLOCK_C"]) + (triton.cdiv(M, tc["BLOCK_C"]) if M else 0)
    for g0 in range(0, ngroups, chunk):
        ng = min(chunk, ngroups - g0)
        _hnm_pixel_coef_kernel[(ng * triton.cdiv(G, tc["BLOCK_R"]), ncol)](
            *p.ptrs(), lse1, lse0, ca, cb, cp, h, hb, B, G, M, D, g0, p.scale, p.beta,
            HARD=fl["HARD"], HAS_LABELS=fl["HAS_LABELS"], HAS_BANK=fl["HAS_BANK"], BANK_COND=fl["BANK_COND"],
            LOG_EPS=fl["LOG_EPS"], FP32_DOT=fl["FP32_DOT"], BETA_ONE=fl["BETA_ONE"], **tc)
        _hnm_pixel_gemm_kernel[(ng * triton.cdiv(G, tg["BLOCK_R"]), triton.cdiv(D, tg["BLOCK_DO"]))](
            p.Z, p.ptrs()[1], h, hb, out, *fused.ptrs, B, G, M, D, g0, *fused.scalars, acc_scale,
            HAS_BANK=fl["HAS_BANK"], FP32_DOT=fl["FP32_DOT"], **fused.flags, **tg)
    return out
