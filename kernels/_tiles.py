"""Tile helpers shared by the flash-style contrastive kernels (HNM and InfoNCE)."""
from __future__ import annotations

import contextlib
import os

import torch

from ._backend import interpreting

try:  # the package and the reference backend must work without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def dot(a, b, acc, IEEE: tl.constexpr):
        # IEEE: True / "ieee": exact fp32 products on FMA units (tf32 would cost ~1e-3 relative
        # error); "tf32x3": three tf32 tensor-core products (fp32_dot_precision); False / "":
        # tl.dot's default (half inputs, and fp32 under the interpreter)
        if IEEE == "tf32x3":   # (a str constexpr cannot be an `if` condition itself: compare)
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
        elif IEEE == "ieee":
            acc = tl.dot(a, b, acc, input_precision="ieee")
        elif IEEE == True:  # noqa: E712 - the bool form (infonce.py)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def sim_tile(R_PTR, rows, rmask, C_PTR, cols, cmask, D, scale,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                 IEEE: tl.constexpr):
        # s[r, c] = <R[rows[r]], C[cols[c]]> * scale, fp32 accumulation over feature chunks
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < D
            a = tl.load(R_PTR + rows[:, None] * D + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(C_PTR + cols[None, :] * D + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = dot(a, b, acc, IEEE)
        return acc * scale

    @triton.jit
    def load_rows(PTR, rows, rmask, D, BLOCK_K: tl.constexpr):
        # rows[r] of a row-major [*, D] matrix, features 0..BLOCK_K (BLOCK_K >= D, zero padded)
        kk = tl.arange(0, BLOCK_K)
        return tl.load(PTR + rows[:, None] * D + kk[None, :], mask=rmask[:, None] & (kk < D)[None, :], other=0.0)


# Numerics mode of the AOT gate: the interpreter runs the GPU tiles (whose masking the 16-wide
# interpreter tiles never exercise). Set through gpu_tiles_in_interpreter(), tests only.
_GPU_TILES_IN_INTERPRETER = False


@contextlib.contextmanager
def gpu_tiles_in_interpreter():
    """Within this block tile_config returns the GPU tiles even under TRITON_INTERPRET=1."""
    global _GPU_TILES_IN_INTERPRETER
    old, _GPU_TILES_IN_INTERPRETER = _GPU_TILES_IN_INTERPRETER, True
    try:
        yield
    finally:
        _GPU_TILES_IN_INTERPRETER = old


FP32_DOT_MODES = ("ieee", "tf32x3")


def fp32_dot_precision() -> str:
    """Precision of fp32 dots on a GPU, from CDP_FAST_FP32_DOT (read at every launch): "ieee"
    (default, FMA units, matches the reference to ~1e-6) or "tf32x3" (tensor cores, three tf32
    products). tf32x3 becomes the default only after a GPU run shows the parity tests holding at
    ~1e-6 with it (benchmarks/device.sh runs them); the interpreter cannot tell."""
    mode = os.environ.get("CDP_FAST_FP32_DOT", "ieee").strip().lower() or "ieee"
    if mode not in FP32_DOT_MODES:
        raise ValueError(f"CDP_FAST_FP32_DOT must be one of {FP32_DOT_MODES}, got {mode!r}")
    return mode


# Above this feature dim the HNM kernels stream features in BLOCK_K chunks (pixel space);
# up to it (and for d a multiple of 16) the row tile stays resident (flash-attention-2 structure)
HNM_RESIDENT_MAX_D = 128
# The resident forward always pipelines 3 column tiles: with 2, ptxas capped it at 128 registers
# and spilled 4 B (d = 64; d = 128 on sm_80, easy estimator + bank). The backward keeps the
# config's num_stages: 3 spilled it on sm_80 at d = 128 (fused DDIM, labels + bank).
HNM_FWD_STAGES_RESIDENT = 3
# The fp32 HNM kernels' register limit (the launch option ``maxnreg``; see hnm_tile_config)
HNM_FP32_MAXNREG = 255


def hnm_tile_config(D: int, dtype: torch.dtype) -> dict:
    """Tiles, warps, stages and the loop structure of the HNM kernels (kernels/hnm.py).

    RESIDENT (bf16/fp16, D <= 128 and a multiple of 16, on GPU; D <= 32 under the interpreter):
    BLOCK_K = BLOCK_DO >= D, the row tile is loaded once, the column loop is the pipelined one
    and each column tile feeds both the similarity dot and the gradient dot. Otherwise (pixel
    space, odd d, fp32) features stream in BLOCK_K chunks and the backward runs one program per
    BLOCK_DO output chunk. GPU sizes: no spill and tensor cores for half dtypes on sm_90 and
    sm_80 (the same launch is compiled for both), proven by the AOT gate (kernels/_aot.py):
    * half, resident: 128 x 32 (one warpgroup per 64 rows; a 64-row tile splits across two
      warpgroups on sm_90 and computes every exp twice). 128 x 64 spilled on sm_80 (fused DDIM)
      and, with int64 label compares, on sm_90. At d = 100 (rows not 32-byte aligned) the column
      loads go through registers: 128 x 64 spilled on sm_90, 64 x 64 on sm_80; d = 256 (64 x 64)
      spilled on sm_80. Those keep the chunked tiles.
    * fp32 ("ieee" dots on FMA units): the K loop's 32-wide chunks; a resident 128-wide K spilled.
      ptxas may use up to ``HNM_FP32_MAXNREG`` registers (held at 128 by its own choice, they spilled).
    """
    p2 = max(16, triton.next_power_of_2(D))
    if interpreting() and not _GPU_TILES_IN_INTERPRETER:
        # both structures stay covered by the CPU tests: resident at D <= 32, chunked above
        kb = p2 if D <= 32 else 16
        return dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=kb, BLOCK_DO=kb, num_warps=4, num_stages=1,
                    RESIDENT=D <= 32)
    if dtype == torch.float32:  # 64-wide fp32 tiles spilled too
        # maxnreg: left to itself, ptxas held several variants at 128 registers (2 programs of 256
        # threads per SM) and spilled 4-36 B at d = 128 (the backward on sm_90: hard + labels, and
        # B, G not multiples of 16; the forward on sm_80: hard + bank). Allowed 255 it takes
        # 124-250, no spill (the AOT gate): 1 program per SM. Tiles, warps and stages (hence the
        # numerics) unchanged. 2 stages, or 4 warps, moved the spills to other variants.
        return dict(BLOCK_R=32, BLOCK_C=32, BLOCK_K=min(32, p2), BLOCK_DO=min(128, p2), num_warps=8,
                    num_stages=3, maxnreg=HNM_FP32_MAXNREG, RESIDENT=False)
    if D > HNM_RESIDENT_MAX_D or D % 16:
        return dict(BLOCK_R=64, BLOCK_C=64, BLOCK_K=min(32, p2), BLOCK_DO=min(128, p2), num_warps=8,
                    num_stages=3, RESIDENT=False)
    return dict(BLOCK_R=128, BLOCK_C=32, BLOCK_K=p2, BLOCK_DO=p2, num_warps=8,
                num_stages=3 if p2 <= 64 else 2,   # d = 64, 2 stages: ptxas capped the forward at 128 regs, 4 B spill
                RESIDENT=True)


def tile_config(D: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warps. Tiny tiles under the interpreter (fast tests, several tiles on small
    shapes). GPU: chosen so that ptxas reports no register spill on sm_90 and sm_80 (proven by the
    AOT gate, kernels/_aot.py); untuned for speed."""
    if interpreting() and not _GPU_TILES_IN_INTERPRETER:
        return dict(BLOCK_R=16, BLOCK_C=16, BLOCK_K=16, BLOCK_DO=16, num_warps=4)
    p2 = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:  # fp32 "ieee" dots run on FMA units: smaller tiles (64-wide spilled)
        return dict(BLOCK_R=32, BLOCK_C=32, BLOCK_K=min(32, p2), BLOCK_DO=min(128, p2), num_warps=8)
    return dict(BLOCK_R=64, BLOCK_C=64, BLOCK_K=min(32, p2), BLOCK_DO=min(128, p2), num_warps=8)
