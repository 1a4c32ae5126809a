"""The per-row epilogue of the fused HNM loss as one small Triton kernel (issue 14, item 6).

After ``_hnm_fwd_kernel`` has written the row statistics (LSE1, LSE0, negative count N), one
launch of ``_hnm_epilogue_kernel`` computes, for the 2B rows of Z = [A; P]:

* the positive logit s_pos = a_j . p_j / T (j = r mod B, read from Z, fp32 accumulation),
* the loss rows and their mean (or per-program partial sums when B is large),
* the backward coefficients CA, CB, CP of the mean loss (METHOD.md §6; the formulas of
  ``hnm.py``'s reference epilogue, ``_row_epilogue``), already multiplied by n = 2B (see
  ``_hnm_common.coef_scaled``: the backward kernel's fp32 accumulator applies (1/T) / n); with BETA_ONE
  (the kernels' beta = 1 path, when ``_Prepared.flags()`` has it) CA' = CA exp(2 LSE0 - LSE1),
* optionally a status word (bit 0: a non-finite value in A, P or the bank; bit 1: a row without
  negatives) that the host reads once when it wants the checks, instead of syncing per check,
* optionally (the fused guided DDIM step) the per-sample DDIM coefficients from a_t, a_next
  given as floats, 0-d device tensors or per-sample tensors (the ``ddim.py`` twins).

At the sampler's size (2B = 1024) a single program does it all, so the loss mean needs no second
launch; larger B splits rows over programs (ROWS_PER_PROG pairs each) and the host sums partials.
"""
from __future__ import annotations

import math

from .hnm_ref import RATIO_CLAMP

try:  # the package and the reference backend must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

__all__ = ["BAD_VALUE", "NO_NEGATIVES", "ROWS_PER_PROG", "epilogue_programs"]

ROWS_PER_PROG = 4096     # pairs per program: one program up to B = 4096 (the sampler's sizes)
BAD_VALUE = 1            # status bits
NO_NEGATIVES = 2

if triton is not None:
    from .ddim import _ddim_coefficients_jit, _load_alpha

    _CAP = tl.constexpr(-math.log(RATIO_CLAMP))   # -log max(ratio, 1e-4) <= -ln 1e-4
    _BAD_VALUE = tl.constexpr(BAD_VALUE)
    _NO_NEGATIVES = tl.constexpr(NO_NEGATIVES)

    @triton.jit
    def _log1p(y):
        # log(1 + y) for y >= 0 without losing small y (exp(-|x|) below fp32 epsilon)
        return tl.where(y < 1e-4, y - 0.5 * y * y, tl.log(1.0 + y))

    @triton.jit
    def _row_terms(lse1, lse0, cnt, pl, pos, tau, beta, floor_c, CAP: tl.constexpr, HARD: tl.constexpr,
                   BETA_ONE: tl.constexpr):
        # one row of Z: its loss and its coefficients times n (ca, cb, cp), as hnm._row_epilogue.
        # d(-log ratio)/d s_pos through pos is -sigmoid(x), x = log Ng - s_pos; u = d(...)/dNg
        # = 1/(pos + Ng), zero where the Ng floor or the ratio clamp binds.
        if HARD:
            reweight = cnt * tl.exp(lse1 - lse0)
            ng_raw = (-tau * cnt * pos + reweight) / (1.0 - tau)
            floor = cnt * floor_c
            ng = tl.maximum(ng_raw, floor)
            active = (ng_raw >= floor).to(tl.float32)
        else:
            ng = tl.exp(lse1)
        x = tl.log(ng) - pl
        nll = tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))     # softplus(x)
        loss = tl.minimum(nll, CAP)
        gr = (nll <= CAP).to(tl.float32)                           # n * d mean / d(-log ratio)
        inv = 1.0 / (pos + ng)
        cp = -gr / (1.0 + tl.exp(-x))
        if HARD:
            u = gr * inv * active
            k = u * reweight / (1.0 - tau)
            ca = k * (1.0 + beta)
            if BETA_ONE:   # the kernels' b = 1 path weighs w0^2 = w1 exp(LSE1 - 2 LSE0) by CA' = CA exp(2 LSE0 - LSE1)
                ca = ca * tl.exp(2.0 * lse0 - lse1)
            cb = -k * beta
            cp = cp - u * tau * cnt * pos / (1.0 - tau)
        else:
            ca = gr * inv * ng
            cb = ca * 0.0
        return loss, ca, cb, cp

    @triton.jit
    def _bad(v):
        # 1 where v is NaN or +-inf
        return ((v != v) | (tl.abs(v) == float("inf"))).to(tl.int32)

    @triton.jit
    def _hnm_epilogue_kernel(Z, BANK, LSE1, LSE0, CNT, COEF, PART, STATUS,
                             DDIM, AT, AN, at_val, an_val, eta,
                             B, D, M, scale, tau, beta, floor_c, inv_n,
                             HARD: tl.constexpr, BETA_ONE: tl.constexpr, CHECK: tl.constexpr,
                             CHECK_BANK: tl.constexpr,
                             DDIM_COEF: tl.constexpr, AT_MODE: tl.constexpr, AN_MODE: tl.constexpr,
                             ROWS_PER_PROG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_E: tl.constexpr):
        # COEF [3, 2B]: CA, CB, CP times n. PART [programs]: this program's share of the mean loss.
        # STATUS [programs] (CHECK): bits BAD_VALUE | NO_NEGATIVES. DDIM [5, B] (DDIM_COEF).
        pid = tl.program_id(0)
        n = 2 * B
        total = tl.zeros((BLOCK_P,), tl.float32)
        bad = tl.zeros((BLOCK_P,), tl.int32)
        p_lo = pid * ROWS_PER_PROG
        p_hi = tl.minimum(p_lo + ROWS_PER_PROG, B)
        for j0 in range(p_lo, p_hi, BLOCK_P):
            j = (j0 + tl.arange(0, BLOCK_P)).to(tl.int64)
            jm = j < p_hi
            dot = tl.zeros((BLOCK_P,), tl.float32)
            for k0 in range(0, D, BLOCK_D):
                k = k0 + tl.arange(0, BLOCK_D)
                m2 = jm[:, None] & (k < D)[None, :]
                a = tl.load(Z + j[:, None] * D + k[None, :], mask=m2, other=0.0).to(tl.float32)
                p = tl.load(Z + (j + B)[:, None] * D + k[None, :], mask=m2, other=0.0).to(tl.float32)
                dot += tl.sum(a * p, axis=1)
                if CHECK:
                    bad |= tl.max(_bad(a) | _bad(p), axis=1) * _BAD_VALUE
            pl = dot * scale
            pos = tl.exp(pl)
            for half in tl.static_range(2):          # row j (anchor) and row B + j (its positive)
                r = j + half * B
                lse1 = tl.load(LSE1 + r, mask=jm, other=0.0)
                lse0 = lse1
                if HARD:
                    lse0 = tl.load(LSE0 + r, mask=jm, other=0.0)
                cnt = tl.load(CNT + r, mask=jm, other=1.0)
                loss, ca, cb, cp = _row_terms(lse1, lse0, cnt, pl, pos, tau, beta, floor_c, _CAP, HARD, BETA_ONE)
                total += tl.where(jm, loss, 0.0)
                tl.store(COEF + r, ca, mask=jm)
                tl.store(COEF + n + r, cb, mask=jm)
                tl.store(COEF + 2 * n + r, cp, mask=jm)
                if CHECK:
                    bad |= (jm & (cnt == 0)).to(tl.int32) * _NO_NEGATIVES
            if DDIM_COEF:
                a_t = _load_alpha(AT_MODE, at_val, AT, j, 1, jm)
                a_n = _load_alpha(AN_MODE, an_val, AN, j, 1, jm)
                sa, sb, sn, c1, c2 = _ddim_coefficients_jit(a_t + 0.0 * pl, a_n + 0.0 * pl, eta)
                tl.store(DDIM + j, sa, mask=jm)
                tl.store(DDIM + B + j, sb, mask=jm)
                tl.store(DDIM + 2 * B + j, sn, mask=jm)
                tl.store(DDIM + 3 * B + j, c1, mask=jm)
                tl.store(DDIM + 4 * B + j, c2, mask=jm)
        if CHECK_BANK:   # the bank's rows, split over the programs like the pairs; flat (few registers)
            e_lo = (pid * ROWS_PER_PROG).to(tl.int64) * D
            e_hi = tl.minimum(pid * ROWS_PER_PROG + ROWS_PER_PROG, M).to(tl.int64) * D
            bad_b = tl.zeros((BLOCK_E,), tl.int32)
            for e0 in range(e_lo, e_hi, BLOCK_E):
                e = e0 + tl.arange(0, BLOCK_E)
                bad_b |= _bad(tl.load(BANK + e, mask=e < e_hi, other=0.0))
            bad |= tl.max(bad_b, axis=0) * _BAD_VALUE
        tl.store(PART + pid, tl.sum(total, axis=0) * inv_n)
        if CHECK:
            tl.store(STATUS + pid, tl.max(bad, axis=0))


def epilogue_programs(B: int, M: int, check_bank: bool) -> tuple[int, int]:
    """(programs, pairs per program) of one epilogue launch: one program up to ROWS_PER_PROG pairs
    (and bank rows, when they are checked)."""
    rows = max(B, M if check_bank else 0)
    return max(1, -(-rows // ROWS_PER_PROG)), ROWS_PER_PROG


