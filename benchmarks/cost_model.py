"""Cost model of the fused kernels: bytes, FLOPs and exps per kernel launch, and the bound they set
on a device (benchmarks/README.md, "Cost model"). The formulas live here once; the README's table
is this module's output:

    python -m cdp_fast.benchmarks.cost_model                       # N = 1024, 16384; d = 128; H100 SXM
    python -m cdp_fast.benchmarks.cost_model --N 65536 --d 3072 --device h200 --dtype fp16

Notation: N = 2B rows of Z = [anchors; positives]; G = anchors per group (columns per row 2G; no
groups: G = B, 2G = N); M = bank rows; d = features; s = bytes per element; c = ceil(d / 128), the
feature chunks of dZ the backward kernels split over programs (each recomputes S and its exps).
Counts are per launch: a multiply-add is 2 FLOPs; an exp is one MUFU.EX2; bytes are the compulsory
HBM traffic (every input read once, every output written once; tile re-reads are assumed to hit
L2, true while a group's 2G x d block fits in it). Lower-order per-row terms (row rescales of the
online softmax, the row epilogue) are left out.

"before" is the kernels as on main e823699; "after" is issue 14's kernels (built): beta = 1 as a
constexpr path (forward e = exp(s' - m) once, l1 += e^2; backward w1 = w0^2 exp(2 LSE0 - LSE1)),
one InfoNCE backward kernel (S and P once for dq and dk; the deterministic two-kernel backward is
the "before" row), and the pixel-space path (d >= 640: H = G + G^T per group materialised once,
dZ = H Z, so no recomputation per chunk).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from .device import DEVICE_PEAKS, SFU_EXP_PER_CLK_PER_SM, sfu_exp_per_s

__all__ = ["Cost", "bound", "ddim_insts_per_elem", "hnm_bank_bwd", "hnm_bwd_rows", "hnm_fused_ddim", "hnm_fwd", "infonce_bwd",
           "infonce_fwd", "ddim_step", "kernel_costs", "main", "markdown"]

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BLOCK_DO = 128   # the backward kernels' feature chunk (kernels/_tiles.py: BLOCK_DO = min(128, 2^k >= d))


# instruction issue: 4 schedulers per SM, one warp instruction (32 lanes) each per clock
ISSUE_PER_CLK_PER_SM = 128


@dataclasses.dataclass(frozen=True)
class Cost:
    """One launch: compulsory HBM bytes, FLOPs (2 per multiply-add), exps (MUFU.EX2) and, where
    known from the compile gate's SASS, thread-instructions (0: not modelled)."""
    bytes: float
    flops: float
    exps: float
    insts: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops, self.exps + other.exps,
                    self.insts + other.insts)


def _chunks(d: int, recompute: bool) -> int:
    return math.ceil(d / BLOCK_DO) if recompute else 1


def _exps_per_entry(hard: bool, beta_one: bool) -> int:
    """exps per (row, column) entry and statistics side: hard = two scales (beta, 1 + beta) unless
    beta = 1 derives one from the other; easy = one."""
    return 2 if hard and not beta_one else 1


def hnm_fwd(N, d, *, G=None, M=0, dtype="bf16", hard=True, beta_one=False) -> Cost:
    """Forward statistics (LSE1, LSE0, counts) of every row: S over its 2G group columns + M bank."""
    s, cols = BYTES[dtype], 2 * (G if G else N // 2)
    E = N * (cols + M)
    return Cost(bytes=s * d * (N + M) + 12 * N, flops=2 * d * E, exps=_exps_per_entry(hard, beta_one) * E)


def hnm_bwd_rows(N, d, *, G=None, M=0, dtype="bf16", hard=True, beta_one=False, rows=None,
                 recompute=True) -> Cost:
    """dZ (or the fused step's anchor rows: rows = N/2): per entry the row-side and the column-side
    gradient terms (both statistics), one matmul with (G + G^T); bank columns: row side only.
    recompute=False: the pixel-space path (S and its exps once, not once per feature chunk)."""
    s, cols = BYTES[dtype], 2 * (G if G else N // 2)
    rows = N if rows is None else rows
    c = _chunks(d, recompute)
    k = _exps_per_entry(hard, beta_one)
    Ez, Eb = rows * cols, rows * M
    return Cost(bytes=s * d * (N + M) + 20 * N + s * d * rows,
                flops=c * 2 * d * (Ez + Eb) + 2 * d * (Ez + Eb),
                exps=c * (2 * k * Ez + k * Eb))


def hnm_bank_bwd(N, d, *, M, dtype="bf16", hard=True, beta_one=False, recompute=True) -> Cost:
    """d bank: programs own bank rows, loop over all N rows of Z (row statistics only)."""
    s, c, E = BYTES[dtype], _chunks(d, recompute), N * M
    return Cost(bytes=s * d * (N + M) + 16 * N + s * d * M,
                flops=c * 2 * d * E + 2 * d * E, exps=c * _exps_per_entry(hard, beta_one) * E)


def hnm_fused_ddim(N, d, *, G=None, M=0, dtype="bf16", hard=True, beta_one=False, recompute=True) -> Cost:
    """The guided DDIM step's backward launch: the anchor rows' gradient (rows = N/2) with x_next
    written from the epilogue (reads x, eps, noise; writes x_next). Needs hnm_fwd first (every row's
    statistics: the column-side terms)."""
    s, B = BYTES[dtype], N // 2
    g = hnm_bwd_rows(N, d, G=G, M=M, dtype=dtype, hard=hard, beta_one=beta_one, rows=B, recompute=recompute)
    return Cost(g.bytes + 3 * s * d * B, g.flops, g.exps)   # dZ-sized write already counted as x_next


def infonce_fwd(B, d, *, C=None, dtype="bf16") -> Cost:
    """LSE of B query rows over C columns (C = B keys paired, or M negatives)."""
    s, C = BYTES[dtype], B if C is None else C
    return Cost(bytes=s * d * (B + C) + 8 * B, flops=2 * d * B * C, exps=B * C)


def infonce_bwd(B, d, *, C=None, dtype="bf16", one_kernel=False, recompute=True) -> Cost:
    """two kernels (deterministic=True): a rows kernel (dq) and a columns kernel (dc), each
    recomputing S and P per feature chunk; one_kernel (the default on GPU for half dtypes): S and
    P once, dq and dc (atomics) from the same tile."""
    s, C = BYTES[dtype], B if C is None else C
    E = B * C
    io = s * d * (B + C) + 4 * B + 4 * d * (B + C)   # q, C in; lse in; dq, dc out (fp32)
    c = _chunks(d, recompute)
    if one_kernel:
        return Cost(bytes=io, flops=c * 2 * d * E + 2 * 2 * d * E, exps=c * E)
    side = c * 2 * d * E + 2 * d * E
    return Cost(bytes=io, flops=2 * side, exps=2 * c * E)


def ddim_step(n, *, dtype="bf16", guided=False, noise="philox", x0=False, insts_per_elem=0.0) -> Cost:
    """One elementwise DDIM update of n elements: reads x, eps (+ the fp32 guidance gradient, + the
    noise tensor when given), writes x_next (+ x0). In-kernel Philox noise moves no bytes but costs
    instructions: insts_per_elem from the gate's SASS (ddim_insts_per_elem) adds the issue bound."""
    s = BYTES[dtype]
    b = 3 * s * n + (4 * n if guided else 0) + (s * n if noise == "given" else 0) + (s * n if x0 else 0)
    return Cost(bytes=b, flops=10 * n, exps=0, insts=insts_per_elem * n)


def ddim_insts_per_elem(gate_doc: dict, dtype="bf16", arch=90) -> float | None:
    """SASS instructions per element of the plain in-kernel-noise DDIM step in a compile-gate JSON:
    the kernel is straight-line code over BLOCK elements per program (its only loops are libdevice
    slow paths, counted though rarely taken), so static instructions x threads / BLOCK."""
    for u in gate_doc.get("units", []):
        f = u.get("flags", {})
        if (u.get("kernel") == "_ddim_fwd_kernel" and u.get("dtype") == dtype and u.get("arch") == arch
                and f.get("NOISE_MODE") == 2 and not f.get("HAS_GRAD") and "insts" in u):
            return u["insts"] * 32 * u["num_warps"] / u["tiles"]["BLOCK"]
    return None


def _peaks(device: str) -> dict:
    for pat, p in DEVICE_PEAKS:
        if pat == device:
            return p
    raise ValueError(f"unknown device {device!r}: one of {', '.join(p for p, _ in DEVICE_PEAKS)}")


def bound(cost: Cost, *, device="h100", dtype="bf16") -> dict:
    """Lower bound on the time (us) of one launch: the largest of matmul (bf16/fp16: dense tensor
    core; fp32: FMA, the kernels' input_precision="ieee"), exp (MUFU), HBM and instruction-issue
    time (the last only where Cost.insts is known)."""
    p = _peaks(device)
    mm = p["bf16"] if dtype in ("bf16", "fp16") else p["fp32"]
    t = {"matmul": cost.flops / (mm * 1e12), "exp": cost.exps / sfu_exp_per_s(p), "hbm": cost.bytes / (p["hbm"] * 1e9),
         "issue": cost.insts / (ISSUE_PER_CLK_PER_SM * p["sms"] * p["boost_mhz"] * 1e6)}
    limit = max(t, key=t.get)
    return {**{k: v * 1e6 for k, v in t.items()}, "bound_us": t[limit] * 1e6, "limit": limit}


def kernel_costs(N, d, *, M=0, G=None, dtype="bf16", ddim_insts=0.0,
                 ddim_insts_after=0.0) -> list[tuple[str, Cost, Cost]]:
    """(kernel, before, after) for issue 14's kernels at one size (hard estimator, beta = 1).
    ddim_insts / ddim_insts_after: SASS instructions per DDIM element before / after (from the
    compile gate's JSONs; 0 leaves the issue bound out)."""
    B = N // 2
    px = d >= 640   # the guided step's pixel-space GEMM path (kernels/_hnm_pixel.py); hnm_loss's
    # backward keeps the chunked kernel at any d
    kw = dict(G=G, M=M, dtype=dtype)
    out = [("HNM fwd", hnm_fwd(N, d, **kw), hnm_fwd(N, d, beta_one=True, **kw)),
           ("HNM bwd rows", hnm_bwd_rows(N, d, **kw), hnm_bwd_rows(N, d, beta_one=True, **kw))]
    if M:
        out.append(("HNM bank bwd", hnm_bank_bwd(N, d, M=M, dtype=dtype),
                    hnm_bank_bwd(N, d, M=M, dtype=dtype, beta_one=True)))
    out.append(("HNM fused DDIM bwd", hnm_fused_ddim(N, d, **kw),
                hnm_fused_ddim(N, d, beta_one=True, recompute=not px, **kw)))
    out.append(("= hnm_fwd_bwd (fwd + bwd rows)", out[0][1] + out[1][1], out[0][2] + out[1][2]))
    inf = [("InfoNCE fwd (B = N/2)", infonce_fwd(B, d, dtype=dtype), infonce_fwd(B, d, dtype=dtype)),
           ("InfoNCE bwd", infonce_bwd(B, d, dtype=dtype), infonce_bwd(B, d, dtype=dtype, one_kernel=True))]
    inf.append(("= infonce_fwd_bwd", inf[0][1] + inf[1][1], inf[0][2] + inf[1][2]))
    return out + inf + [("DDIM step (N x d elements, Philox)", ddim_step(N * d, dtype=dtype, insts_per_elem=ddim_insts),
                         ddim_step(N * d, dtype=dtype, insts_per_elem=ddim_insts_after))]


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def markdown(sizes=(1024, 16384), d=128, *, M=0, dtype="bf16", device="h100", ddim_insts=0.0,
             ddim_insts_after=0.0) -> str:
    p = _peaks(device)
    mm = p["bf16"] if dtype in ("bf16", "fp16") else p["fp32"]
    lines = [f"{p['label']}: {mm} TFLOP/s ({'dense tensor core' if dtype != 'fp32' else 'fp32 FMA'}), "
             f"{SFU_EXP_PER_CLK_PER_SM} exp/clk/SM x {p['sms']} SMs x {p['boost_mhz']} MHz = "
             f"{sfu_exp_per_s(p) / 1e12:.2f} Texp/s, HBM {p['hbm'] / 1000:.2f} TB/s; {dtype}, d = {d}, M = {M}.", "",
             "| N | kernel | MB | GFLOP before | Mexp before | bound before, us | GFLOP after | Mexp after "
             "| bound after, us | after / before |", "|" + "---|" * 10]
    for N in sizes:
        for name, now, new in kernel_costs(N, d, M=M, dtype=dtype, ddim_insts=ddim_insts,
                                           ddim_insts_after=ddim_insts_after):
            bn, bp = bound(now, device=device, dtype=dtype), bound(new, device=device, dtype=dtype)
            lines.append(f"| {N} | {name} | {_fmt(now.bytes / 1e6)} | {_fmt(now.flops / 1e9)} | {_fmt(now.exps / 1e6)} "
                         f"| {_fmt(bn['bound_us'])} ({bn['limit']}) | {_fmt(new.flops / 1e9)} | {_fmt(new.exps / 1e6)} "
                         f"| {_fmt(bp['bound_us'])} ({bp['limit']}) | {bp['bound_us'] / bn['bound_us']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cdp_fast.benchmarks.cost_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--N", nargs="+", type=int, default=[1024, 16384], help="rows of Z (2B)")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--M", type=int, default=0, help="bank rows")
    ap.add_argument("--dtype", choices=tuple(BYTES), default="bf16")
    ap.add_argument("--device", default="h100", help=f"a DEVICE_PEAKS key: {', '.join(p for p, _ in DEVICE_PEAKS)}")
    ap.add_argument("--sass", default=None, metavar="GATE_JSON",
                    help="a compile-gate JSON (e.g. benchmarks/results/sass_before.json): the DDIM step's "
                         "SASS instructions per element add an instruction-issue bound to the 'before' DDIM row")
    ap.add_argument("--sass-after", default=None, metavar="GATE_JSON",
                    help="the same for the 'after' DDIM row (e.g. benchmarks/results/sass_after.json)")
    args = ap.parse_args(argv)
    if any(n < 2 or n % 2 for n in args.N) or args.d < 1 or args.M < 0:
        ap.error("N must be even and >= 2, d >= 1, M >= 0")
    ddim_insts = {}
    for key, path in (("before", args.sass), ("after", args.sass_after)):
        if not path:
            continue
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"{path}: not a readable JSON file ({e})")
        per = ddim_insts_per_elem(doc, args.dtype, 90 if args.device.startswith("h") else 80)
        if per is None:
            ap.error(f"{path}: no plain in-kernel-noise _ddim_fwd_kernel unit in {args.dtype}")
        ddim_insts[key] = per
        print(f"DDIM step {key}: {per:.0f} SASS instructions per element ({path})")
    if ddim_insts:
        print()
    try:
        print(markdown(tuple(args.N), args.d, M=args.M, dtype=args.dtype, device=args.device,
                       ddim_insts=ddim_insts.get("before", 0.0), ddim_insts_after=ddim_insts.get("after", 0.0)))
    except ValueError as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
