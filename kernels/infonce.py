"""Fused InfoNCE (authors' one-directional variant), METHOD.md §8.

Public: :func:`infonce_loss`. The pure-PyTorch oracle is ``infonce_ref.py``.

q, k (and negatives) are L2-normalised in fp32 inside the autograd Function (which also chains the
gradient through the normalisation in fp32); the kernels work on the normalised rows, cast back to
the input dtype for the tensor cores. The logits' columns C are k ("paired":
target = diagonal) or the negatives ("unpaired": the positive logit d_i = q_i . k_i / T is an
extra first column, target 0).

* ``_infonce_fwd_kernel``: one program per block of query rows streams C in column tiles with a
  running max / sum (initialised at the diagonal logit d_i, so no -inf), and stores LSE_i (fp32).
* Backward. L = (1/B) sum_i (LSE_i - d_i) with s_ic = q_i . c_c / T, so dL/ds_ic = (p_ic - t_ic)/B
  (p_ic = exp(s_ic - LSE_i), t = the one-hot target) and ds_ic/dq_i = c_c / T, ds_ic/dc_c = q_i / T.
  With g = grad_out:
      dq_i = (g/(BT)) sum_c p_ic c_c  [+ target term]
      dc_c = (g/(BT)) sum_i p_ic q_i  [+ target term]
  The target terms, O(B d), are added in PyTorch in fp32: paired (the kernels skip c = i):
  (g/BT)(p_ii - 1) k_i into dq_i and (g/BT)(p_jj - 1) q_j into dk_j; unpaired: (g/BT)(p_i0 - 1) k_i
  into dq_i and (g/BT)(p_i0 - 1) q_i into dk_i, with p_i0 = exp(d_i - LSE_i), p - 1 by expm1.
  Two backward paths, no B x B buffer in either:
  - default, ``_infonce_bwd_kernel``: row programs (x output-feature chunks of BLOCK_DO); per
    column tile one similarity tile and one exp per element, then p @ C into the program's own dq
    rows (plain store) and p^T @ Q[rows] into dc by fp32 atomics (``tl.atomic_add``, relaxed; on
    sm_90 REDG.E.ADD.F32x4). The atomics' summation order changes from run to run: dc (dk or
    dn) differs between runs at fp32 rounding level. DC is zeroed first (one memset). Its column
    tiles are narrower than the shared ones (``_fused_bwd_tiles``: 64 x 32). Half dtypes (and
    the interpreter) only: fp32 on a GPU takes the two-kernel path (``_one_kernel_backward``).
  - ``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``), and fp32 on GPU:
    ``_infonce_bwd_rows_kernel`` (dq) and ``_infonce_bwd_cols_kernel`` (dc, column programs),
    each recomputing the similarity tiles and their exps; bitwise reproducible.
  Cost, forward + backward, B query rows x N columns (N = B paired), d <= BLOCK_DO:
      one-kernel:  8 B N d FLOPs (fwd 2, bwd 6), 2 B N exps; plus N d (B / BLOCK_R) fp32 atomics
      two-kernel: 10 B N d FLOPs (fwd 2, bwd 4 + 4), 3 B N exps; no atomics
  (d > BLOCK_DO: each backward program recomputes S for its feature chunk, cdiv(d, BLOCK_DO)x.)
  For d <= BLOCK_DO (ONE_CHUNK) the row tile stays resident and one column tile
  feeds both S and p @ C. The atomics are the price: per 64 x 32 tile at d = 128 the one-kernel
  path reads 8 KB of bf16 operands (the C tile; 24 KB without ONE_CHUNK) and sends 16 KB of
  fp32 reductions to L2 (BLOCK_R = 64: each dc element gets B / 64 atomic adds);
  whether that beats two passes over S is for a GPU run to say (time fwd + bwd with
  deterministic=False and True; the two-kernel path is the fallback if the atomics lose).
  Compile gate, sm_90 bf16 d = 128: MUFU.EX2 per thread per S tile in the backward 8 per 64 x 32
  tile (one per element) vs 16 + 16 per 64 x 64 tile in the rows + columns kernels (two).
"""
from __future__ import annotations

import torch

from ._backend import backend_for, interpreting, on_input_device
from ._tiles import tile_config
from .infonce_ref import infonce_loss_reference, validate_infonce_inputs

try:  # the package and the reference backend must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

__all__ = ["infonce_loss"]

if triton is not None:
    from ._tiles import dot, sim_tile

    @triton.jit
    def _infonce_fwd_kernel(Q, C, DIAG, LSE, NQ, NC, D, scale, INIT_L: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                            IEEE: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rows < NQ
        # start from the diagonal logit: finite, and (unpaired) it is the extra first column
        m = tl.load(DIAG + rows, mask=rmask, other=0.0)
        l = tl.full((BLOCK_R,), INIT_L, tl.float32)
        for c0 in range(0, NC, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            cmask = cols < NC
            s = sim_tile(Q, rows, rmask, C, cols, cmask, D, scale, BLOCK_R, BLOCK_C, BLOCK_K, IEEE)
            valid = rmask[:, None] & cmask[None, :]
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
        l = tl.where(l > 0, l, 1.0)
        tl.store(LSE + rows, m + tl.log(l), mask=rmask)

    @triton.jit
    def _infonce_bwd_rows_kernel(Q, C, LSE, DQ, NQ, NC, D, scale, gscale,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                                 BLOCK_DO: tl.constexpr, IEEE: tl.constexpr, EXCL_DIAG: tl.constexpr):
        # DQ_i = gscale * sum_c p_ic C_c   (gscale = g / T); EXCL_DIAG: without column c = i
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rows < NQ
        do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        acc = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
        for c0 in range(0, NC, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            cmask = cols < NC
            s = sim_tile(Q, rows, rmask, C, cols, cmask, D, scale, BLOCK_R, BLOCK_C, BLOCK_K, IEEE)
            valid = rmask[:, None] & cmask[None, :]
            if EXCL_DIAG:
                valid = valid & (cols[None, :] != rows[:, None])
            pr = tl.exp(tl.where(valid, s - lse[:, None], float("-inf")))
            ct = tl.load(C + cols[:, None] * D + do[None, :], mask=cmask[:, None] & domask[None, :], other=0.0)
            acc = dot(pr.to(ct.dtype), ct, acc, IEEE)
        tl.store(DQ + rows[:, None] * D + do[None, :], acc * gscale, mask=rmask[:, None] & domask[None, :])

    @triton.jit
    def _infonce_bwd_cols_kernel(Q, C, LSE, DC, NQ, NC, D, scale, gscale,
                                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                                 BLOCK_DO: tl.constexpr, IEEE: tl.constexpr, EXCL_DIAG: tl.constexpr):
        # DC_c = gscale * sum_i p_ic Q_i: the program owns columns c and loops over all query rows
        cols = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cmask = cols < NC
        do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        acc = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
        for r0 in range(0, NQ, BLOCK_C):
            rows = (r0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            rmask = rows < NQ
            st = sim_tile(C, cols, cmask, Q, rows, rmask, D, scale, BLOCK_R, BLOCK_C, BLOCK_K, IEEE)
            lse = tl.load(LSE + rows, mask=rmask, other=0.0)
            valid = cmask[:, None] & rmask[None, :]
            if EXCL_DIAG:
                valid = valid & (rows[None, :] != cols[:, None])
            pt = tl.exp(tl.where(valid, st - lse[None, :], float("-inf")))
            qt = tl.load(Q + rows[:, None] * D + do[None, :], mask=rmask[:, None] & domask[None, :], other=0.0)
            acc = dot(pt.to(qt.dtype), qt, acc, IEEE)
        tl.store(DC + cols[:, None] * D + do[None, :], acc * gscale, mask=cmask[:, None] & domask[None, :])

    @triton.jit
    def _infonce_bwd_kernel(Q, C, LSE, DQ, DC, NQ, NC, D, scale,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_DO: tl.constexpr, IEEE: tl.constexpr, EXCL_DIAG: tl.constexpr,
                            ONE_CHUNK: tl.constexpr):
        # One pass over S: per column tile, p = exp(s - LSE) once (BLOCK_R x BLOCK_C exps), then
        #   DQ[rows] += p @ C[cols]        (this program's rows: plain store at the end)
        #   DC[cols] += p^T @ Q[rows]      (other programs own the same columns: fp32 atomics)
        # DC must be zeroed by the caller. The atomics' summation order varies between runs.
        # ONE_CHUNK (D <= BLOCK_DO): S comes from the resident row tile and the column
        # tile that also feeds p @ C, so each column tile is read once per row tile.
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        rmask = rows < NQ
        do = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
        domask = do < D
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        # the row tile's output-feature chunk stays resident for the p^T @ Q products
        qo = tl.load(Q + rows[:, None] * D + do[None, :], mask=rmask[:, None] & domask[None, :], other=0.0)
        acc = tl.zeros((BLOCK_R, BLOCK_DO), tl.float32)
        for c0 in range(0, NC, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            cmask = cols < NC
            ocmask = cmask[:, None] & domask[None, :]
            if ONE_CHUNK:
                ct = tl.load(C + cols[:, None] * D + do[None, :], mask=ocmask, other=0.0)
                s = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
                # a one-trip loop (D <= BLOCK_DO): as a plain dot, Triton recomputed S and its
                # exps in p^T's layout (sm_90: 32 MUFU.EX2 and 4 dots per tile instead of 16 and 3)
                for _ in tl.range(0, D, BLOCK_DO, num_stages=1):   # nothing to pipeline in it
                    s = dot(qo, tl.trans(ct), s, IEEE)
                s = s * scale
            else:
                s = sim_tile(Q, rows, rmask, C, cols, cmask, D, scale, BLOCK_R, BLOCK_C, BLOCK_K, IEEE)
                ct = tl.load(C + cols[:, None] * D + do[None, :], mask=ocmask, other=0.0)
            valid = rmask[:, None] & cmask[None, :]
            if EXCL_DIAG:
                valid = valid & (cols[None, :] != rows[:, None])
            pr = tl.exp(tl.where(valid, s - lse[:, None], float("-inf"))).to(qo.dtype)
            acc = dot(pr, ct, acc, IEEE)
            dct = dot(tl.trans(pr), qo, tl.zeros((BLOCK_C, BLOCK_DO), tl.float32), IEEE)
            tl.atomic_add(DC + cols[:, None] * D + do[None, :], dct, mask=ocmask, sem="relaxed")
        tl.store(DQ + rows[:, None] * D + do[None, :], acc, mask=rmask[:, None] & domask[None, :])


_NORM_EPS = 1e-12   # F.normalize's default


def _normalize32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 L2-normalised rows and their (eps-clamped) norms, as F.normalize computes them."""
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    return x / norm, norm


def _normalize_backward(g: torch.Tensor, x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """fp32 vector-Jacobian product of x -> x / max(|x|, eps): (g - n (n . g)) / |x|, and g / eps
    where the clamp binds (there the map is x / eps)."""
    n = x.float() / norm
    free = g - n * (n * g).sum(-1, keepdim=True)
    return torch.where(norm > _NORM_EPS, free, g) / norm


def _fused_bwd_tiles(bl: dict) -> dict:
    """Tiles of _infonce_bwd_kernel (half dtypes): the shared ones with 32-wide column tiles. It
    holds three accumulators (S, dq, the dc tile); with 64-wide column tiles ptxas spilled on
    sm_80 at d = 100 (255 registers). The AOT gate (kernels/_aot.py) passes these on sm_90 and
    sm_80 at d = 64 / 100 / 128 / 640 / 3072 and odd sizes (at most 254 registers, sm_80 d = 100)."""
    return dict(bl, BLOCK_C=min(bl["BLOCK_C"], 32))


def _one_kernel_backward(deterministic: bool, ieee: bool) -> bool:
    """The one-kernel (atomic) backward unless determinism is asked for or the dots are fp32 on a
    GPU (IEEE, FMA units): there ptxas spilled a few bytes of the fused kernel at some sizes with
    every tile tried (sm_90 d = 64 at 64 registers, sm_80 d = 128 at 128), so fp32 keeps the two
    proven kernels; fp32 FMA dots are compute-bound, where the fused kernel saves 1/5 of the FLOPs."""
    return not (deterministic or ieee)


class _InfoNCEFunction(torch.autograd.Function):
    """Raw (unnormalised) q, k and negatives in. The L2-normalisation and the whole backward run
    in fp32 here; only the kernels' operands are in the input dtype (tensor cores). Normalising
    and casting the gradient in fp16 outside the Function cost ~1e-2 relative gradient error.
    C = k (paired) or the negatives (unpaired)."""

    @staticmethod
    def forward(ctx, query, key, negatives, temperature, deterministic):
        dt = query.dtype
        q32, qnorm = _normalize32(query)
        k32, knorm = _normalize32(key)
        q = q32.to(dt).contiguous()
        k = k32.to(dt).contiguous()
        paired = negatives is None
        if paired:
            C, nnorm = k, None
        else:
            n32, nnorm = _normalize32(negatives)
            C = n32.to(dt).contiguous()
        NQ, D = q.shape
        scale = 1.0 / temperature
        ieee = dt == torch.float32 and not interpreting()
        bl = tile_config(D, dt)
        diag = (q.float() * k.float()).sum(-1) * scale
        lse = torch.empty(NQ, dtype=torch.float32, device=q.device)
        _infonce_fwd_kernel[(triton.cdiv(NQ, bl["BLOCK_R"]),)](
            q, C, diag, lse, NQ, C.shape[0], D, scale, INIT_L=0.0 if paired else 1.0,
            BLOCK_R=bl["BLOCK_R"], BLOCK_C=bl["BLOCK_C"], IEEE=ieee, num_warps=bl["num_warps"],
            # fp32 FMA dots: 32-wide feature chunks spilled 24 B on sm_80 (d = 100, odd sizes)
            BLOCK_K=min(bl["BLOCK_K"], 16) if ieee else bl["BLOCK_K"])
        loss = (lse - diag).mean()
        ctx.save_for_backward(query, key, negatives, qnorm, knorm, nnorm, q, k, C, lse, diag)
        ctx.paired, ctx.scale, ctx.ieee, ctx.deterministic = paired, scale, ieee, deterministic
        return loss if dt in (torch.float32, torch.float64) else loss.float()

    @staticmethod
    def backward(ctx, grad_out):
        query, key, negatives, qnorm, knorm, nnorm, q, k, C, lse, diag = ctx.saved_tensors
        NQ, D = q.shape
        NC = C.shape[0]
        bl = tile_config(D, q.dtype)
        gs = grad_out.to(torch.float32) * (ctx.scale / NQ)      # g / T as a device tensor
        # kernels get a unit gscale (graph-safe: no host read of grad_out); scale in PyTorch
        dq = torch.empty(NQ, D, dtype=torch.float32, device=q.device)
        grid_r = (triton.cdiv(NQ, bl["BLOCK_R"]), triton.cdiv(D, bl["BLOCK_DO"]))
        # paired: the kernels skip the diagonal, whose p_ii ~ 1 term would cancel against -k_i
        # (fp16 rounding of a near-1 probability times k, minus k): it is added below in fp32
        if not _one_kernel_backward(ctx.deterministic, ctx.ieee):   # two passes over S, fixed order
            dc = torch.empty(NC, D, dtype=torch.float32, device=q.device)
            grid_c = (triton.cdiv(NC, bl["BLOCK_R"]), triton.cdiv(D, bl["BLOCK_DO"]))
            _infonce_bwd_rows_kernel[grid_r](q, C, lse, dq, NQ, NC, D, ctx.scale, 1.0, IEEE=ctx.ieee,
                                             EXCL_DIAG=ctx.paired, **bl)
            _infonce_bwd_cols_kernel[grid_c](q, C, lse, dc, NQ, NC, D, ctx.scale, 1.0, IEEE=ctx.ieee,
                                             EXCL_DIAG=ctx.paired, **bl)
        else:                   # one pass over S, dc by fp32 atomics (the accumulation target)
            dc = torch.zeros(NC, D, dtype=torch.float32, device=q.device)
            bw = _fused_bwd_tiles(bl)
            _infonce_bwd_kernel[grid_r](q, C, lse, dq, dc, NQ, NC, D, ctx.scale, IEEE=ctx.ieee, EXCL_DIAG=ctx.paired,
                                        ONE_CHUNK=D <= bw["BLOCK_DO"], **bw)
        qf, kf = q.float(), k.float()
        pm1 = torch.expm1(diag - lse)[:, None]          # p_ii - 1 (paired) / p_i0 - 1, no cancellation
        # gradients w.r.t. the normalised rows (fp32) ...
        if ctx.paired:
            dq = gs * (dq + pm1 * kf)
            dk = gs * (dc + pm1 * qf)
            dn = None
        else:
            dq = gs * (dq + pm1 * kf)
            dk = gs * pm1 * qf
            dn = gs * dc
        # ... then through the normalisation, in fp32; one cast at the end
        dq = _normalize_backward(dq, query, qnorm).to(query.dtype)
        dk = _normalize_backward(dk, key, knorm).to(key.dtype)
        if dn is not None:
            dn = _normalize_backward(dn, negatives, nnorm).to(negatives.dtype)
        return dq, dk, dn, None, None


@on_input_device
def infonce_loss(query, key, *, temperature=0.1, negatives=None, backend="auto",
                 deterministic: bool | None = None):
    """InfoNCE of METHOD.md §8: L2-normalise q, k (and negatives); logits_ij = q_i . k_j / T;
    mean_i CE(logits_i, i). With negatives [M, d]: logits_i = [q_i . k_i, q_i . n_1..n_M] / T,
    target 0. backend: "reference" | "triton" | "auto". Returns a 0-d tensor (fp32 for half inputs).

    deterministic (Triton backward only): True runs the two-kernel backward, bitwise reproducible;
    False the one-kernel backward, whose key/negative gradient is summed by fp32 atomics in a
    run-dependent order (runs differ at fp32 rounding level; fine for a sampler); fp32 inputs on
    a GPU take the two-kernel backward either way.
    None (default) follows ``torch.are_deterministic_algorithms_enabled()``. The forward and
    the reference backend are deterministic either way.
    """
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be True, False or None, got {deterministic!r}")
    validate_infonce_inputs(query, key, temperature=temperature, negatives=negatives)
    resolved = backend_for(backend, query, key, negatives)
    if resolved == "reference" or (backend == "auto" and query.dtype == torch.float64):
        return infonce_loss_reference(query, key, temperature=temperature, negatives=negatives, check=False)
    if query.dtype == torch.float64:
        raise TypeError("the triton backend of infonce_loss takes fp32/fp16/bf16; use backend='reference' for fp64")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return _InfoNCEFunction.apply(query, key, negatives, float(temperature), deterministic)
