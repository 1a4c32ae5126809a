"""Tile helpers shared by the flash-style contrastive kernels (HNM and InfoNCE)."""
from __future__ import annotations

import contextlib

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
        # fp32 inputs on GPU: full-precision products (tf32 would cost ~1e-3 relative error)
        if IEEE:
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
