"""Fused hard-negative-mining (HNM) contrastive loss, METHOD.md §6 / §7, and the fused
"HNM gradient straight into the solver's update" for pixel-space guidance.

Public: :func:`hnm_loss`, :func:`hnm_guided_ddim_update` (the DDIM step) and
:func:`hnm_guided_affine_update` (out = c_x x + c_e (eps + scale grad) + c_h h: the Euler, Heun and
DPM-Solver++ steps). The pure-PyTorch oracle is ``hnm_ref.py``. Module order (no import cycle):
``_tiles`` / ``ddim`` -> ``_hnm_common`` (the jit helpers both kernel modules share) ->
``_hnm_epilogue``, ``_hnm_pixel`` -> this module (its kernels, the launchers, the public ops).

Layout of the Triton path (flash-attention-2 style, nothing of size 2B x 2B is ever stored):

* ``_hnm_fwd_kernel``: one program per block of rows of Z = [A; P] (rows of one group). It streams
  the group's column tiles and then the bank's, recomputing s = z_r . z_c / T in fp32, and keeps a
  running max m_r of s' = max(s, ln 1e-4) and running sums l1_r = sum exp((1+b)(s' - m)),
  l0_r = sum exp(b (s' - m)) (one sum for "easy") plus the negative count N_r. Masks (self,
  partner, other group, same label, bank label) are built per tile from indices and label ids.
* ``_hnm_epilogue_kernel`` (``_hnm_epilogue.py``): one small launch for the per-row epilogue
  (positive logit, loss rows and their mean, three gradient coefficients, the input checks'
  status word, the fused step's DDIM coefficients). With ``check=False`` one forward + backward
  makes no host sync; at N = 2B = 1024 it is 6 device launches (tests/test_launches.py).
* ``_hnm_bwd_kernel``: recomputes the tiles and accumulates dZ_r = (1/T) sum_c (G_rc + G_cr) z_c.
  G_cr only needs row c's saved statistics, so each program owns its output rows: no atomics,
  deterministic. With FUSED_DDIM it handles the anchor rows only and writes the guided step
  x_next = DDIM(x, eps + scale * dZ_r) (or, AFFINE, c_x x + c_e (eps + scale dZ_r) + c_h h;
  ``_hnm_common._guided_store``) instead of dZ.
* ``_hnm_bank_bwd_kernel``: one program per block of bank rows, looping over all 2B rows of Z.

Loop structure (``hnm_tile_config`` in _tiles.py picks it, the AOT gate proves the tiles):

* RESIDENT (bf16/fp16 embedding heads, d <= 128 and a multiple of 16): BLOCK_K = BLOCK_DO >= d.
  Each program loads its row tile once; the column loop is the only loop, so it is the one Triton software-pipelines (num_stages),
  and in the backward one loaded column tile feeds both the similarity dot and the gradient dot.
  GPU tiles: 128 rows (one warpgroup per 64 rows) x 32 columns.
* Chunked (pixel-space guidance, d = 3072 on CIFAR; odd d; fp32): the similarity accumulates over
  BLOCK_K feature chunks and a backward program owns a [rows, BLOCK_DO] output chunk, so the
  similarity tiles are recomputed once per output chunk.

b = 1 (the authors' default, estimator "hard") is a constexpr path (BETA_ONE): one exp per
element in the forward (l0 += e, l1 += e^2 with e = exp(s' - m)) and one per (row, column)
statistics pair in the backward (w1 = w0^2 exp(2 LSE0 - LSE1)); derivations beside the kernels.

Everything accumulates in fp32 (tl.dot with an fp32 accumulator). fp32 inputs on GPU use "ieee"
dots (matching the reference to ~1e-6) unless CDP_FAST_FP32_DOT=tf32x3 (tensor cores; becomes the
default only once a GPU run shows the same parity, see _tiles.fp32_dot_precision).
"""
from __future__ import annotations

import math

import torch

from . import _hnm_pixel
from ._backend import backend_for, interpreting, launch_only, on_input_device
from ._hnm_common import Fused, coef_scaled
from ._hnm_epilogue import BAD_VALUE, NO_NEGATIVES, epilogue_programs
from ._tiles import HNM_FWD_STAGES_RESIDENT, fp32_dot_precision, hnm_tile_config
from .hnm_ref import (
    LOG_NEG_CLAMP,
    _capturing,
    _check_finite,
    check_negative_counts,
    hnm_guided_affine_reference,
    hnm_guided_ddim_reference,
    hnm_loss_reference,
    validate_hnm_inputs,
)

try:  # the package and the reference backend must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

__all__ = ["hnm_loss", "hnm_guided_ddim_update", "hnm_guided_affine_update"]


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if triton is not None:
    from ._hnm_common import _bank_tile, _col_tile, _grad_terms, _guided_store, _local_to_row
    from ._hnm_epilogue import _hnm_epilogue_kernel
    from ._tiles import dot, load_rows

    @triton.jit
    def _online_update(s, valid, m, l1, l0, cnt, beta, LOG_EPS: tl.constexpr, HARD: tl.constexpr,
                       BETA_ONE: tl.constexpr):
        # running max / sums of exp((1+b) s') and exp(b s') with s' = max(s, ln 1e-4); m starts at
        # ln 1e-4 (the smallest possible s'), so no -inf ever enters the arithmetic
        sp = tl.where(valid, tl.maximum(s, LOG_EPS), LOG_EPS)
        m_new = tl.maximum(m, tl.max(sp, axis=1))
        if BETA_ONE:
            # b = 1: with e = exp(s' - m), exp(b (s' - m)) = e and exp((1+b)(s' - m)) = e^2, and
            # the rescale of l1 is the square of l0's: one exp per element instead of two
            alpha = tl.exp(m - m_new)
            e = tl.where(valid, tl.exp(sp - m_new[:, None]), 0.0)
            l1 = l1 * (alpha * alpha) + tl.sum(e * e, axis=1)
            l0 = l0 * alpha + tl.sum(e, axis=1)
        elif HARD:
            a = 1.0 + beta
            l1 = l1 * tl.exp(a * (m - m_new)) + tl.sum(tl.where(valid, tl.exp(a * (sp - m_new[:, None])), 0.0), axis=1)
            l0 = l0 * tl.exp(beta * (m - m_new)) + tl.sum(tl.where(valid, tl.exp(beta * (sp - m_new[:, None])), 0.0), axis=1)
        else:
            l1 = l1 * tl.exp(m - m_new) + tl.sum(tl.where(valid, tl.exp(sp - m_new[:, None]), 0.0), axis=1)
        cnt = cnt + tl.sum(valid.to(tl.float32), axis=1)
        return m_new, l1, l0, cnt

    @triton.jit
    def _hnm_fwd_kernel(Z, BANK, LAB, BLAB, LSE1, LSE0, CNT,
                        B, G, M, D, scale, beta,
                        HARD: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_BANK: tl.constexpr,
                        BANK_COND: tl.constexpr, LOG_EPS: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                        FP32_DOT: tl.constexpr, BETA_ONE: tl.constexpr = False, RESIDENT: tl.constexpr = False):
        pid = tl.program_id(0)
        nrb = tl.cdiv(2 * G, BLOCK_R)
        g = pid // nrb
        li = (pid % nrb) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = li < 2 * G
        rows = _local_to_row(li, g, B, G)
        lpartner = tl.where(li < G, li + G, li - G)
        if RESIDENT:
            zr = load_rows(Z, rows, rmask, D, BLOCK_K)   # the row tile, loaded once
        else:
            zr = rmask  # unused
        if HAS_LABELS or BANK_COND:
            lab_r = tl.load(LAB + rows, mask=rmask, other=0)
        else:
            lab_r = rmask  # unused
        m = tl.full((BLOCK_R,), LOG_EPS, tl.float32)
        l1 = tl.zeros((BLOCK_R,), tl.float32)
        l0 = tl.zeros((BLOCK_R,), tl.float32)
        cnt = tl.zeros((BLOCK_R,), tl.float32)
        for c0 in range(0, 2 * G, BLOCK_C):
            lj = c0 + tl.arange(0, BLOCK_C)
            cmask = lj < 2 * G
            cols = _local_to_row(lj, g, B, G)
            s, _zc = _col_tile(zr, Z, rows, rmask, Z, cols, cmask, D, scale, RESIDENT,
                               BLOCK_R, BLOCK_C, BLOCK_K, FP32_DOT)
            valid = rmask[:, None] & cmask[None, :] & (lj[None, :] != li[:, None]) & (lj[None, :] != lpartner[:, None])
            if HAS_LABELS:
                lab_c = tl.load(LAB + cols, mask=cmask, other=0)
                valid = valid & (lab_r[:, None] != lab_c[None, :])
            m, l1, l0, cnt = _online_update(s, valid, m, l1, l0, cnt, beta, LOG_EPS, HARD, BETA_ONE)
        if HAS_BANK:
            for c0 in range(0, M, BLOCK_C):
                cols, cmask, s, valid, _bc = _bank_tile(zr, Z, rows, rmask, lab_r, BANK, BLAB, c0, M, D, scale,
                                                        BANK_COND, RESIDENT, BLOCK_R, BLOCK_C, BLOCK_K, FP32_DOT)
                m, l1, l0, cnt = _online_update(s, valid, m, l1, l0, cnt, beta, LOG_EPS, HARD, BETA_ONE)
        # l1, l0 >= 1 for any row with a negative (the max term); guard padding rows from log(0)
        l1 = tl.where(l1 > 0, l1, 1.0)
        l0 = tl.where(l0 > 0, l0, 1.0)
        if HARD:
            tl.store(LSE1 + rows, (1.0 + beta) * m + tl.log(l1), mask=rmask)
            tl.store(LSE0 + rows, beta * m + tl.log(l0), mask=rmask)
        else:
            tl.store(LSE1 + rows, m + tl.log(l1), mask=rmask)
        tl.store(CNT + rows, cnt, mask=rmask)

    # Backward: the gradient terms G_rc and the derivation of dZ are beside _grad_terms
    # (_hnm_common.py).
    @triton.jit(do_not_specialize=("ks0", "ks1", "ks2"))   # -1 / 0 / 1: no specialisation each
    def _hnm_bwd_kernel(Z, BANK, LAB, BLAB, LSE1, LSE0, CA, CB, CP, DZ,
                        X, EPS, AUX, K0, K1, K2, K3, K4, EOUT,
                        B, G, M, D, scale, beta, gscale, clip, ks0, ks1, ks2, kv0, kv1, kv2, acc_scale,
                        HARD: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_BANK: tl.constexpr,
                        BANK_COND: tl.constexpr, LOG_EPS: tl.constexpr,
                        FUSED_DDIM: tl.constexpr, HAS_NOISE: tl.constexpr, CLIP: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_DO: tl.constexpr, FP32_DOT: tl.constexpr, BETA_ONE: tl.constexpr = False,
                        RESIDENT: tl.constexpr = False, AFFINE: tl.constexpr = False,
                        WRITE_EPS: tl.constexpr = False):
        # RESIDENT: BLOCK_DO = BLOCK_K >= D, one program per row block (grid axis 1 has size 1) and
        # each column tile feeds both dots; else one program per (row block, BLOCK_DO feature chunk).
        # FUSED_DDIM: the fused guided step (anchor rows only, _guided_store: DDIM, or AFFINE)
        pid = tl.program_id(0)
        if FUSED_DDIM:
            nloc = G  # only the anchor rows' gradient is needed
        else:
            nloc = 2 * G
        nrb = tl.cdiv(nloc, BLOCK_R)
        g = pid // nrb
        li = (pid % nrb) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = li < nloc
        rows = _local_to_row(li, g, B, G)
        lpartner = tl.where(li < G, li + G, li - G)
        do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        if RESIDENT:
            zr = load_rows(Z, rows, rmask, D, BLOCK_K)
        else:
            zr = rmask  # unused
        lse1_r = tl.load(LSE1 + rows, mask=rmask, other=0.0)
        lse0_r = tl.load(LSE0 + rows, mask=rmask, other=0.0)
        ca_r = tl.load(CA + rows, mask=rmask, other=0.0)
        cb_r = tl.load(CB + rows, mask=rmask, other=0.0)
        cp_r = tl.load(CP + rows, mask=rmask, other=0.0)
        if HAS_LABELS or BANK_COND:
            lab_r = tl.load(LAB + rows, mask=rmask, other=0)
        else:
            lab_r = rmask  # unused
        acc = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
        for c0 in range(0, 2 * G, BLOCK_C):
            lj = c0 + tl.arange(0, BLOCK_C)
            cmask = lj < 2 * G
            cols = _local_to_row(lj, g, B, G)
            s, zc = _col_tile(zr, Z, rows, rmask, Z, cols, cmask, D, scale, RESIDENT,
                              BLOCK_R, BLOCK_C, BLOCK_K, FP32_DOT)
            inb = rmask[:, None] & cmask[None, :]
            valid = inb & (lj[None, :] != li[:, None]) & (lj[None, :] != lpartner[:, None])
            if HAS_LABELS:
                lab_c = tl.load(LAB + cols, mask=cmask, other=0)
                valid = valid & (lab_r[:, None] != lab_c[None, :])
            act = valid & (s >= LOG_EPS)
            lse1_c = tl.load(LSE1 + cols, mask=cmask, other=0.0)
            lse0_c = tl.load(LSE0 + cols, mask=cmask, other=0.0)
            ca_c = tl.load(CA + cols, mask=cmask, other=0.0)
            cb_c = tl.load(CB + cols, mask=cmask, other=0.0)
            cp_c = tl.load(CP + cols, mask=cmask, other=0.0)
            gt = _grad_terms(s, act, lse1_r, lse0_r, ca_r, cb_r, beta, LOG_EPS, HARD, BETA_ONE, 0)
            gt += _grad_terms(s, act, lse1_c, lse0_c, ca_c, cb_c, beta, LOG_EPS, HARD, BETA_ONE, 1)
            is_partner = inb & (lj[None, :] == lpartner[:, None])
            gt = tl.where(is_partner, cp_r[:, None] + cp_c[None, :], gt)
            if not RESIDENT:
                zc = tl.load(Z + cols[:, None] * D + do[None, :], mask=cmask[:, None] & domask[None, :], other=0.0)
            acc = dot(gt.to(zc.dtype), zc, acc, FP32_DOT)
        if HAS_BANK:
            for c0 in range(0, M, BLOCK_C):
                cols, cmask, s, valid, bc = _bank_tile(zr, Z, rows, rmask, lab_r, BANK, BLAB, c0, M, D, scale,
                                                       BANK_COND, RESIDENT, BLOCK_R, BLOCK_C, BLOCK_K, FP32_DOT)
                act = valid & (s >= LOG_EPS)
                gt = _grad_terms(s, act, lse1_r, lse0_r, ca_r, cb_r, beta, LOG_EPS, HARD, BETA_ONE, 0)
                if not RESIDENT:
                    bc = tl.load(BANK + cols[:, None] * D + do[None, :], mask=cmask[:, None] & domask[None, :], other=0.0)
                acc = dot(gt.to(bc.dtype), bc, acc, FP32_DOT)
        acc = acc * acc_scale   # 1/T and the 1/n the coefficients were relieved of (coef_scaled)
        omask = rmask[:, None] & domask[None, :]
        offs = rows[:, None] * D + do[None, :]
        if FUSED_DDIM:   # rows are anchors (rows < B)
            _guided_store(acc, rows, rmask, offs, omask, X, EPS, AUX, K0, K1, K2, K3, K4, DZ, EOUT,
                          gscale, clip, ks0, ks1, ks2, kv0, kv1, kv2, AFFINE, HAS_NOISE, CLIP, WRITE_EPS)
        else:
            tl.store(DZ + offs, acc, mask=omask)

    @triton.jit
    def _hnm_bank_bwd_kernel(Z, BANK, LAB, BLAB, LSE1, LSE0, CA, CB, DBANK,
                             NROWS, M, D, scale, beta, acc_scale,
                             HARD: tl.constexpr, BANK_COND: tl.constexpr, LOG_EPS: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_DO: tl.constexpr, FP32_DOT: tl.constexpr, BETA_ONE: tl.constexpr = False,
                             RESIDENT: tl.constexpr = False):
        # d bank_m = (1/T) sum_r G_rm z_r: the program owns bank rows m (RESIDENT: their tile is
        # loaded once), loops over all rows r of Z
        mrows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        mmask = mrows < M
        do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        if RESIDENT:
            br = load_rows(BANK, mrows, mmask, D, BLOCK_K)
        else:
            br = mmask  # unused
        if BANK_COND:
            blab = tl.load(BLAB + mrows, mask=mmask, other=0)
        acc = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
        for r0 in range(0, NROWS, BLOCK_C):
            zr = (r0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            zmask = zr < NROWS
            s, zt = _col_tile(br, BANK, mrows, mmask, Z, zr, zmask, D, scale, RESIDENT,
                              BLOCK_R, BLOCK_C, BLOCK_K, FP32_DOT)
            valid = mmask[:, None] & zmask[None, :]
            if BANK_COND:
                lab = tl.load(LAB + zr, mask=zmask, other=0)
                valid = valid & (blab[:, None] != lab[None, :])
            act = valid & (s >= LOG_EPS)
            lse1 = tl.load(LSE1 + zr, mask=zmask, other=0.0)
            lse0 = tl.load(LSE0 + zr, mask=zmask, other=0.0)
            ca = tl.load(CA + zr, mask=zmask, other=0.0)
            cb = tl.load(CB + zr, mask=zmask, other=0.0)
            gt = _grad_terms(s, act, lse1, lse0, ca, cb, beta, LOG_EPS, HARD, BETA_ONE, 1)
            if not RESIDENT:
                zt = tl.load(Z + zr[:, None] * D + do[None, :], mask=zmask[:, None] & domask[None, :], other=0.0)
            acc = dot(gt.to(zt.dtype), zt, acc, FP32_DOT)
        tl.store(DBANK + mrows[:, None] * D + do[None, :], acc * acc_scale, mask=mmask[:, None] & domask[None, :])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


class _Prepared:
    """Contiguous inputs, int64 label ids and constexpr flags shared by the launchers."""

    def __init__(self, anchor, positive, bank, labels, bank_labels, G, temperature, beta, estimator):
        self.B, self.D = anchor.shape
        self.G = G
        self.Z = _stacked(anchor, positive)
        self.bank = None if bank is None else bank.contiguous()
        self.M = 0 if bank is None else bank.shape[0]
        self.lab = None if labels is None else torch.cat([labels, labels]).to(torch.int64).contiguous()
        self.blab = None if bank_labels is None else bank_labels.to(torch.int64).contiguous()
        self.scale = 1.0 / float(temperature)
        self.beta = float(beta)
        self.hard = estimator == "hard"
        self.fp32_dot = fp32_dot_precision() if self.Z.dtype == torch.float32 and not interpreting() else ""
        self.blocks = hnm_tile_config(self.D, self.Z.dtype)

    def flags(self):
        return dict(HARD=self.hard, HAS_LABELS=self.lab is not None, HAS_BANK=self.bank is not None,
                    BANK_COND=self.blab is not None, LOG_EPS=LOG_NEG_CLAMP, FP32_DOT=self.fp32_dot,
                    BETA_ONE=self.hard and self.beta == 1.0)

    def ptrs(self):
        dummy = self.Z
        return (self.Z, dummy if self.bank is None else self.bank,
                dummy if self.lab is None else self.lab, dummy if self.blab is None else self.blab)


def _stacked(anchor, positive):
    """Z = [A; P] as one contiguous [2B, d] tensor. When P already follows A in one buffer (e.g.
    both are row slices of one embedding batch) Z is a view of it, saving the copy (one launch)."""
    B, D = anchor.shape
    if (anchor.is_contiguous() and positive.is_contiguous() and B * D > 0
            and anchor.untyped_storage().data_ptr() == positive.untyped_storage().data_ptr()
            and positive.data_ptr() == anchor.data_ptr() + B * D * anchor.element_size()):
        return anchor.as_strided((2 * B, D), (D, 1))
    return torch.cat([anchor, positive], dim=0)


def _forward_stats(p: _Prepared):
    n = 2 * p.B
    dev = p.Z.device
    lse1 = torch.empty(n, dtype=torch.float32, device=dev)
    lse0 = torch.empty(n, dtype=torch.float32, device=dev)   # unused (never read) by "easy"
    cnt = torch.empty(n, dtype=torch.float32, device=dev)
    bl = p.blocks
    grid = ((p.B // p.G) * triton.cdiv(2 * p.G, bl["BLOCK_R"]),)
    _hnm_fwd_kernel[grid](*p.ptrs(), lse1, lse0, cnt, p.B, p.G, p.M, p.D, p.scale, p.beta,
                          BLOCK_R=bl["BLOCK_R"], BLOCK_C=bl["BLOCK_C"], BLOCK_K=bl["BLOCK_K"],
                          num_warps=bl["num_warps"], RESIDENT=bl["RESIDENT"], maxnreg=bl.get("maxnreg"),
                          num_stages=HNM_FWD_STAGES_RESIDENT if bl["RESIDENT"] else bl["num_stages"],
                          **p.flags())
    return lse1, lse0, cnt


def _alpha_arg(a, B: int, device):
    """(mode, float value, tensor) of a DDIM alpha for the epilogue: 0 = a host float, 1 = a
    one-element tensor, 2 = per sample [B] (as ddim.py's kernel takes them; never read on the host)."""
    if not isinstance(a, torch.Tensor):
        return 0, float(a), None
    a = a.detach().to(device)
    if a.numel() == 1:
        return 1, 0.0, a.reshape(1)
    if a.shape != (B,):
        raise ValueError(f"a_t / a_next must be a float or a per-sample tensor [B]=[{B}], got shape {tuple(a.shape)}")
    return 2, 0.0, a.contiguous()


def _row_epilogue(p: _Prepared, lse1, lse0, cnt, tau_plus, temperature, *, check, alphas=None):
    """One launch of ``_hnm_epilogue_kernel``: the loss (0-d fp32), the backward coefficients
    COEF [3, 2B] = (CA, CB, CP) of the mean loss times n (see _hnm_common.coef_scaled), the status word
    (``check``, else None) and, with ``alphas`` = (a_t, a_next, eta), the DDIM coefficients [5, B].

    Formulas (METHOD.md §6, the reference's): loss_r = min(softplus(log Ng_r - s_pos), -ln 1e-4);
    u = dmean/dNg is 0 where the Ng clamp or the ratio clamp binds, so the clamps carry zero gradient.
    """
    n, dev = 2 * p.B, p.Z.device
    check_bank = bool(check and p.bank is not None)
    progs, per_prog = epilogue_programs(p.B, p.M, check_bank)
    coef = torch.empty(3, n, dtype=torch.float32, device=dev)
    part = torch.empty(progs, dtype=torch.float32, device=dev)
    # zero-filled (one memset launch, check=True only): a status word no kernel wrote (a tool that
    # records launches without running them, e.g. the AOT gates) then reads as clean, not garbage
    status = torch.zeros(progs, dtype=torch.int32, device=dev) if check else part
    if alphas is not None:
        (at_mode, at_val, at_t), (an_mode, an_val, an_t) = (_alpha_arg(a, p.B, dev) for a in alphas[:2])
        ddim = torch.empty(5, p.B, dtype=torch.float32, device=dev)
        eta = float(alphas[2])
    else:
        at_mode = an_mode = 0
        at_val = an_val = eta = 0.0
        at_t = an_t = ddim = None
    block_d = min(64, max(16, triton.next_power_of_2(p.D)))   # 32 x 64 fp32 loads: no spill (AOT gate)
    _hnm_epilogue_kernel[(progs,)](
        p.Z, p.Z if p.bank is None else p.bank, lse1, lse0, cnt, coef, part, status,
        coef if ddim is None else ddim, coef if at_t is None else at_t, coef if an_t is None else an_t,
        at_val, an_val, eta,
        p.B, p.D, p.M, p.scale, float(tau_plus), p.beta, math.exp(-1.0 / float(temperature)), 1.0 / n,
        HARD=p.hard, BETA_ONE=bool(p.flags().get("BETA_ONE", False)), CHECK=bool(check),
        CHECK_BANK=check_bank, DDIM_COEF=ddim is not None,
        AT_MODE=at_mode, AN_MODE=an_mode, ROWS_PER_PROG=per_prog, BLOCK_P=32, BLOCK_D=block_d, BLOCK_E=1024,
        num_warps=4, num_stages=1)   # a memory-light loop: pipelining only costs registers
    loss = part.reshape(()) if progs == 1 else part.sum()
    return loss, coef, (status if check else None), ddim


def _raise_on_status(p: _Prepared, status, cnt, **tensors) -> None:
    """The checks of ``check=True``: one host read of the epilogue's status word; only when it is
    set are the inputs examined again for a message naming the tensor or the row."""
    if status is None or _capturing() or launch_only():
        return
    code = int(status.reshape(()) if status.numel() == 1 else status.max())   # the one host sync
    if code & BAD_VALUE:
        _check_finite(**tensors)
    if code & NO_NEGATIVES:
        check_negative_counts(cnt, p.lab)
    if code:
        raise ValueError(f"hnm_loss: the input checks failed (status {code}) but the values could not be "
                         "pinned down again; are the inputs being modified concurrently?")


def _backward_rows(p: _Prepared, lse1, lse0, ca, cb, cp, out, *, fused=None):
    """Launch _hnm_bwd_kernel: dZ (into ``out`` [2B, D]) or, with ``fused`` (a ``Fused``
    record), the guided step's output [B, D]."""
    bl = p.blocks
    ca, cb, cp, acc_scale = coef_scaled(p, ca, cb, cp)
    nloc = p.G if fused is not None else 2 * p.G
    grid = ((p.B // p.G) * triton.cdiv(nloc, bl["BLOCK_R"]), triton.cdiv(p.D, bl["BLOCK_DO"]))
    if fused is None:
        fused = Fused(ptrs=(lse1,) * 9, scalars=(0.0, 0.0, -1, -1, -1, 0.0, 0.0, 0.0),
                      flags=dict(HAS_NOISE=False, CLIP=False))
        is_fused = False
    else:
        is_fused = True
    _hnm_bwd_kernel[grid](*p.ptrs(), lse1, lse0, ca, cb, cp, out, *fused.ptrs,
                          p.B, p.G, p.M, p.D, p.scale, p.beta, *fused.scalars, acc_scale,
                          FUSED_DDIM=is_fused, **fused.flags, **bl, **p.flags())
    return out


def _backward_bank(p: _Prepared, lse1, lse0, ca, cb):
    bl = p.blocks
    ca, cb, acc_scale = coef_scaled(p, ca, cb)
    dbank = torch.empty_like(p.bank)
    grid = (triton.cdiv(p.M, bl["BLOCK_R"]), triton.cdiv(p.D, bl["BLOCK_DO"]))
    fl = p.flags()
    _hnm_bank_bwd_kernel[grid](*p.ptrs(), lse1, lse0, ca, cb, dbank, 2 * p.B, p.M, p.D, p.scale,
                               p.beta, acc_scale,
                               HARD=fl["HARD"], BANK_COND=fl["BANK_COND"], LOG_EPS=fl["LOG_EPS"],
                               FP32_DOT=fl["FP32_DOT"], BETA_ONE=fl["BETA_ONE"], **bl)
    return dbank


class _HNMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, positive, bank, labels, bank_labels, G, temperature, tau_plus, beta, estimator,
                check):
        p = _Prepared(anchor, positive, bank, labels, bank_labels, G, temperature, beta, estimator)
        lse1, lse0, cnt = _forward_stats(p)
        loss, coef, status, _ = _row_epilogue(p, lse1, lse0, cnt, tau_plus, temperature, check=check)
        _raise_on_status(p, status, cnt, anchor=anchor, positive=positive, bank=bank)
        ctx.p = p
        ctx.save_for_backward(lse1, lse0, coef)
        ctx.has_bank = bank is not None
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        lse1, lse0, coef = ctx.saved_tensors
        p = ctx.p
        coef = coef * grad_out.to(torch.float32)   # the one op grad_out costs (no host read)
        da = dp = dbank = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dz = torch.empty_like(p.Z)
            _backward_rows(p, lse1, lse0, *coef, dz)
            da, dp = dz[: p.B], dz[p.B:]
        if ctx.has_bank and ctx.needs_input_grad[2]:
            dbank = _backward_bank(p, lse1, lse0, coef[0], coef[1])
        return da, dp, dbank, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
@on_input_device
def hnm_loss(anchor, positive, *, temperature=10.0, tau_plus=0.1, beta=1.0, estimator="hard",
             labels=None, bank=None, bank_labels=None, group_size=None, backend="auto", check=True):
    """Hard-negative-mining contrastive loss of METHOD.md §6 (mean over the 2B rows of [A; P]).

    anchor, positive: [B, d] embeddings, used as given (normalise them yourself).
    labels [B] (int): conditional negatives (different class only). bank [M, d] (+ bank_labels
    [M]): extra negatives for every row. group_size G: B/G independent groups. backend:
    "reference" | "triton" | "auto" (auto: Triton for CUDA fp32/fp16/bf16 tensors, the reference
    otherwise, fp64 included). Differentiable w.r.t. anchor, positive and bank. Returns a 0-d
    tensor (fp32 for half-precision inputs, else the inputs' dtype).

    ``check`` (default True): raise a ValueError on NaN/inf inputs or on a row without negatives
    (possible with conditional negatives). The Triton path computes both checks inside its kernels
    and reads one status word: one host sync per call (skipped during CUDA-graph capture).
    ``check=False`` makes no host sync at all (the sampler's guidance checks its inputs once per
    run instead); bad input then gives NaN or meaningless values, not an error.
    """
    G = validate_hnm_inputs(anchor, positive, temperature=temperature, tau_plus=tau_plus, beta=beta,
                            estimator=estimator, labels=labels, bank=bank, bank_labels=bank_labels,
                            group_size=group_size, check_values=False)
    kw = dict(temperature=temperature, tau_plus=tau_plus, beta=beta, estimator=estimator,
              labels=labels, bank=bank, bank_labels=bank_labels, group_size=group_size)
    resolved = backend_for(backend, anchor, positive, bank)
    if resolved == "reference" or (backend == "auto" and anchor.dtype == torch.float64):
        if check and not _capturing():
            _check_finite(anchor=anchor, positive=positive, bank=bank)
        return hnm_loss_reference(anchor, positive, check=False, check_counts=bool(check), **kw)
    if anchor.dtype == torch.float64:
        raise TypeError("the triton backend of hnm_loss takes fp32/fp16/bf16 embeddings; use backend='reference' for fp64")
    return _HNMFunction.apply(anchor, positive, bank, labels, bank_labels, G, float(temperature),
                              float(tau_plus), float(beta), estimator, bool(check))


def _check_guided_tensors(x, eps, positive, scale, **optional) -> None:
    """Argument checks shared by the two fused guided steps (raise before anything launches)."""
    if not isinstance(x, torch.Tensor) or not isinstance(eps, torch.Tensor) or not isinstance(positive, torch.Tensor):
        raise TypeError("x, eps and positive must be torch.Tensors")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch [B, ...] with at least 2 dims, got shape {tuple(x.shape)}")
    if eps.shape != x.shape or positive.shape != x.shape:
        raise ValueError(f"x, eps and positive must share a shape: {tuple(x.shape)}, {tuple(eps.shape)}, {tuple(positive.shape)}")
    if not x.is_floating_point() or eps.dtype != x.dtype or positive.dtype != x.dtype:
        raise TypeError(f"x, eps and positive must share a floating dtype, got {x.dtype}, {eps.dtype}, {positive.dtype}")
    for name, t in optional.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != x.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} differs from x's {tuple(x.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def _guided_step(x, positive, hnm_kw, *, check, alphas, fused_of):
    """The Triton path shared by the fused guided steps: forward statistics, the row epilogue
    (with ``alphas`` = (a_t, a_next, eta): also the DDIM coefficients), the status check, then
    the backward of the anchor rows with the step's store in its epilogue (the pixel-space
    GEMM path at d >= PIXEL_MIN_D). ``fused_of(dcoef)`` -> (Fused, out): the store's record and
    the output tensor it writes."""
    anchor2 = x.detach().flatten(1)
    pos2 = positive.detach().flatten(1)
    bank = hnm_kw["bank"]
    bank_d = None if bank is None else bank.detach()
    p = _Prepared(anchor2, pos2, bank_d, hnm_kw["labels"], hnm_kw["bank_labels"], hnm_kw["G"],
                  hnm_kw["temperature"], hnm_kw["beta"], hnm_kw["estimator"])
    lse1, lse0, cnt = _forward_stats(p)
    _, coef, status, dcoef = _row_epilogue(p, lse1, lse0, cnt, float(hnm_kw["tau_plus"]), hnm_kw["temperature"],
                                           check=check, alphas=alphas)
    _raise_on_status(p, status, cnt, anchor=anchor2, positive=pos2, bank=bank_d)
    fused, out = fused_of(lse1 if dcoef is None else dcoef)
    if p.D >= _hnm_pixel.PIXEL_MIN_D:   # pixel space: H = G + G^T once per group, then a GEMM
        _hnm_pixel.guided_rows(p, lse1, lse0, *coef, out, fused)
    else:
        _backward_rows(p, lse1, lse0, *coef, out, fused=fused)


@on_input_device
def hnm_guided_ddim_update(x, eps, a_t, a_next, positive, *, scale, temperature=10.0, tau_plus=0.1,
                           beta=1.0, estimator="hard", labels=None, bank=None, bank_labels=None,
                           group_size=None, eta=0.0, noise=None, clip_x0=None, backend="auto", check=True):
    """One Contrastive-DP DDIM step in pixel space (features = identity), METHOD.md §3 + §7.

    anchors = x.flatten(1), positives = positive.flatten(1) (detached); g = d hnm_loss / d anchor
    (shaped like x); e = eps + scale * g; x0 = (x - sqrt(1-a_t) e) / sqrt(a_t) (clamped to
    +-clip_x0 if given); x_next = sqrt(a_next) x0 + c1 z + c2 e with c1, c2 of METHOD.md §3 and
    z = noise (or torch.randn_like(x) when eta > 0 and noise is None). a_t, a_next: floats or
    per-sample [B] tensors. No autograd. The Triton path writes x_next from the kernel that
    produces the anchor gradient (no gradient tensor is materialised); its DDIM coefficients are
    computed in fp32 inside the epilogue kernel (as ``ddim_update``'s), never read on the host.
    ``check``: as in :func:`hnm_loss` (``check=False``: no host sync).
    """
    _check_guided_tensors(x, eps, positive, scale, noise=noise)
    if not isinstance(eta, (int, float)) or eta < 0:
        raise ValueError(f"eta must be a number >= 0, got {eta!r}")
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be > 0 or None, got {clip_x0!r}")
    anchor2 = x.detach().flatten(1)
    pos2 = positive.detach().flatten(1)
    G = validate_hnm_inputs(anchor2, pos2, temperature=temperature, tau_plus=tau_plus, beta=beta,
                            estimator=estimator, labels=labels, bank=bank, bank_labels=bank_labels,
                            group_size=group_size, check_values=False)
    if eta > 0 and noise is None:
        noise = torch.randn_like(x)
    if eta == 0:
        noise = None  # c1 = 0
    kw = dict(temperature=temperature, tau_plus=tau_plus, beta=beta, estimator=estimator,
              labels=labels, bank=bank, bank_labels=bank_labels, group_size=group_size)
    if backend_for(backend, x, eps, positive, bank) == "reference" or x.dtype == torch.float64:
        if check and not _capturing():
            _check_finite(anchor=anchor2, positive=pos2, bank=bank)
        return hnm_guided_ddim_reference(x, eps, a_t, a_next, positive, scale=scale, eta=eta,
                                         noise=noise, clip_x0=clip_x0, check=bool(check), **kw)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)

    def fused_of(dcoef):
        xc = x.detach().contiguous()
        nc = dcoef if noise is None else noise.detach().to(x.dtype).contiguous()
        ptrs = (xc, eps.detach().contiguous(), nc) + tuple(dcoef) + (xc,)
        scalars = (float(scale), 0.0 if clip_x0 is None else float(clip_x0), -1, -1, -1, 0.0, 0.0, 0.0)
        return Fused(ptrs, scalars, dict(HAS_NOISE=noise is not None, CLIP=clip_x0 is not None)), out

    with torch.no_grad():
        _guided_step(x, positive, dict(kw, G=G), check=check, alphas=(a_t, a_next, float(eta)), fused_of=fused_of)
    return out


def _affine_coef_arg(c, name: str, B: int, device):
    """(value, tensor, stride) of one coefficient of the affine step for ``_guided_store``: a host
    float (stride -1, no tensor), or fp32 device values, 0-d / one element (stride 0) or per
    sample [B] (stride 1), never read on the host."""
    if not isinstance(c, torch.Tensor):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
            raise ValueError(f"{name} must be a finite number or a tensor (0-d or [B]), got {c!r}")
        return float(c), None, -1
    if not c.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {c.dtype}")
    if c.numel() == 1:
        return 1.0, c.detach().to(device=device, dtype=torch.float32).reshape(1), 0
    if c.shape != (B,):
        raise ValueError(f"{name} must be a number, a 0-d tensor or a per-sample tensor [B]=[{B}], "
                         f"got shape {tuple(c.shape)}")
    return 1.0, c.detach().to(device=device, dtype=torch.float32).contiguous(), 1


@on_input_device
def hnm_guided_affine_update(x, eps, positive, *, c_x, c_e, h=None, c_h=0.0, scale, temperature=10.0,
                             tau_plus=0.1, beta=1.0, estimator="hard", labels=None, bank=None,
                             bank_labels=None, group_size=None, write_eps=False, backend="auto", check=True):
    """One guided step of an affine solver in pixel space (features = identity), METHOD.md §7:

        g = d hnm_loss(x.flatten(1), positive.flatten(1)) / d x   (the anchors are x, detached)
        e = eps + scale * g                                       (the guided noise prediction)
        out = c_x * x + c_e * e + c_h * h                          (the h term only when h is given)

    Every step of the continuous-sigma samplers is of this form (Euler, Heun's second stage with
    h = the first stage's part, DPM-Solver++(2M) with h = the previous data prediction);
    ``hnm_guided_ddim_update`` is the case c_x = sqrt(a_n / a_t), c_e = c2 - sqrt(a_n (1 - a_t) / a_t),
    c_h = c1, h = z (without x0 clipping). c_x, c_e, c_h: Python numbers or fp32-able tensors,
    0-d / one element or per sample [B] (device tensors are never read on the host, so a CUDA
    graph can capture the step and update them in place). h: like x (same shape and dtype).
    Returns out (x's shape and dtype, contiguous), or (out, e) with ``write_eps`` (e in x's dtype;
    e.g. for a solver that keeps its data prediction). No autograd. The Triton path writes both
    from the kernel that produces the anchor gradient (no gradient tensor is materialised).
    ``check``: as in :func:`hnm_loss` (``check=False``: no host sync). Other arguments: as in
    :func:`hnm_loss`.
    """
    _check_guided_tensors(x, eps, positive, scale, h=h)
    if h is not None and h.dtype != x.dtype:
        raise TypeError(f"h must have x's dtype {x.dtype}, got {h.dtype}")
    if h is None and not (isinstance(c_h, (int, float)) and not isinstance(c_h, bool) and c_h == 0):
        raise ValueError("c_h is given but h is None: pass the history tensor h (or c_h=0.0)")
    B = x.shape[0]
    coefs = [_affine_coef_arg(c, n, B, x.device) for c, n in ((c_x, "c_x"), (c_e, "c_e"), (c_h, "c_h"))]
    anchor2 = x.detach().flatten(1)
    pos2 = positive.detach().flatten(1)
    G = validate_hnm_inputs(anchor2, pos2, temperature=temperature, tau_plus=tau_plus, beta=beta,
                            estimator=estimator, labels=labels, bank=bank, bank_labels=bank_labels,
                            group_size=group_size, check_values=False)
    kw = dict(temperature=temperature, tau_plus=tau_plus, beta=beta, estimator=estimator,
              labels=labels, bank=bank, bank_labels=bank_labels, group_size=group_size)
    if backend_for(backend, x, eps, positive, bank, h) == "reference" or x.dtype == torch.float64:
        if check and not _capturing():
            _check_finite(anchor=anchor2, positive=pos2, bank=bank)
        return hnm_guided_affine_reference(x, eps, positive, c_x=c_x, c_e=c_e, h=h, c_h=c_h, scale=scale,
                                           write_eps=bool(write_eps), check=bool(check), **kw)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    e_out = torch.empty_like(x, memory_format=torch.contiguous_format) if write_eps else None

    def fused_of(dummy):
        xc = x.detach().contiguous()
        ptrs = ((xc, eps.detach().contiguous(), xc if h is None else h.detach().contiguous())
                + tuple(dummy if t is None else t for _, t, _ in coefs) + (dummy, dummy)
                + (xc if e_out is None else e_out,))
        scalars = (float(scale), 0.0) + tuple(s for _, _, s in coefs) + tuple(v for v, _, _ in coefs)
        flags = dict(AFFINE=True, HAS_NOISE=h is not None, CLIP=False, WRITE_EPS=bool(write_eps))
        return Fused(ptrs, scalars, flags), out

    with torch.no_grad():
        _guided_step(x, positive, dict(kw, G=G), check=check, alphas=None, fused_of=fused_of)
    return (out, e_out) if write_eps else out
