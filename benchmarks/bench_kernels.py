"""Kernel benchmarks: ``hnm_fwd_bwd``, ``infonce_fwd_bwd`` and ``ddim_update``.

Cost models (what "achieved TFLOP/s" and "% of bound" mean; N = 2B rows of Z = [A; P]):

Minimal work, from benchmarks/cost_model.py (the one place these counts live; README there):

HNM forward + backward at the default (hard estimator, beta = 1), N = 2B rows of Z = [A; P]:
  forward S = Z Z^T (2 N^2 d FLOPs) and one exp per entry (beta = 1 derives the second scale);
  backward: S once more (2 N^2 d) and one matmul with (G + G^T) (2 N^2 d), one exp per entry and
  statistics side (2 N^2). Total 6 N^2 d FLOPs and 3 N^2 exps (lower-order row terms ignored).
  bound: max(FLOPs / matmul peak, exps / exp peak), matmul peak = bf16 tensor core for bf16
  inputs, fp32 FMA for fp32 inputs (the kernel's tl.dot is "ieee" for fp32); exp peak = 16
  MUFU.EX2 per clock per SM at the max SM clock (see device.SFU_EXP_PER_CLK_PER_SM). "% of bound"
  = bound / time. The same counts are used for the eager reference's achieved rate (it
  materialises N x N).

InfoNCE (B = N / 2 queries and keys): 8 B^2 d FLOPs (forward 2, backward recompute 2 + dq 2 +
dk 2) and 2 B^2 exps: the one-kernel backward's count. The deterministic two-kernel backward does
10 B^2 d FLOPs and 3 B^2 exps, which shows up as a lower % of bound.

DDIM update: bytes = (inputs read + outputs written) x numel x element size; inputs are x, eps and
the guidance gradient when guided; the noise is drawn inside the fused kernel (no read), so the
useful traffic does not count noise. "% of HBM" = achieved GB/s / data-sheet bandwidth.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import cost_model
from .device import matmul_peak_tflops
from .timing import (
    BenchTimeout,
    Ctx,
    bench_graph,
    bench_kernel,
    dtype_name,
    free_memory,
    is_oom,
    make_result,
    peak_extra_mb,
    rel_err,
)

HNM_MODULES = ("cdp_fast.kernels.hnm", "cdp_fast.kernels.hnm_ref")
INFONCE_MODULES = ("cdp_fast.kernels.infonce", "cdp_fast.kernels.infonce_ref")
DDIM_MODULES = ("cdp_fast.kernels.ddim",)


def fused_backend(ctx: Ctx) -> str:
    """GPU: the Triton kernels. quick (CPU smoke test): the Triton interpreter when
    TRITON_INTERPRET=1 (exercises the launchers), else "auto". cpu: "auto" (what a CPU user runs)."""
    from cdp_fast.kernels._backend import interpreting, triton_available

    if ctx.is_cuda:
        return "triton"
    if ctx.suite == "quick" and interpreting() and triton_available():
        return "triton"
    return "auto"


def _unit_rows(n: int, d: int, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return x.to(device=device, dtype=dtype).requires_grad_(True)


def _correlated_rows(a: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """Unit rows near those of ``a`` (positives that resemble their anchors)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = a.detach().float().cpu() + noise * torch.randn(a.shape, generator=g)
    return F.normalize(x, dim=1).to(device=a.device, dtype=a.dtype).requires_grad_(True)


# Correctness of hnm_fwd_bwd is checked at T = 0.1 with positives near their anchors: at the timed
# T = 10 on unit rows every ratio pos / (pos + Ng) is below the 1e-4 clamp once N >= 16384
# (s / T lies in [-0.1, 0.1], so Ng ~ N while pos <= e^0.1), the loss is constant (9.210341) and
# both gradients are exactly zero -- a comparison of zeros.
HNM_CHECK = {"temperature": 0.1, "positive_noise": 0.5}


def _grads_of(fn, leaves):
    for t in leaves:
        t.grad = None
    loss = fn()
    loss.backward()
    out = [loss.detach().float().clone()] + [t.grad.detach().clone() for t in leaves]
    for t in leaves:
        t.grad = None
    return out


def _rate_metrics(ctx: Ctx, flops: float, exps: float, ms: float | None, dtype, prefix: str) -> dict:
    if ms is None or ms <= 0:
        return {}
    out = {f"{prefix}_tflops": flops / (ms * 1e-3) / 1e12}
    peak, kind = matmul_peak_tflops(ctx.peaks, dtype)
    exp_peak = ctx.exp_peak()
    if peak:
        out[f"{prefix}_pct_matmul_peak"] = 100.0 * out[f"{prefix}_tflops"] / peak
    if peak and exp_peak:
        bound_ms = max(flops / (peak * 1e12), exps / exp_peak) * 1e3
        out[f"{prefix}_pct_of_bound"] = 100.0 * bound_ms / ms
    return out


def _bound_metrics(ctx: Ctx, flops: float, exps: float, dtype) -> dict:
    peak, kind = matmul_peak_tflops(ctx.peaks, dtype)
    exp_peak = ctx.exp_peak()
    out = {"flops": flops, "exps": exps, "matmul_peak_tflops": peak, "matmul_peak_kind": kind,
           "exp_peak_per_s": exp_peak}
    if peak and exp_peak:
        out["matmul_bound_ms"] = flops / (peak * 1e12) * 1e3
        out["exp_bound_ms"] = exps / exp_peak * 1e3
        out["bound_ms"] = max(out["matmul_bound_ms"], out["exp_bound_ms"])
    return out


def _contrastive_case(ctx: Ctx, *, name: str, N: int, d: int, dtype: torch.dtype,
                      with_compile: bool) -> dict:
    """Shared body of hnm_fwd_bwd / infonce_fwd_bwd: loss + gradient w.r.t. both inputs."""
    B = N // 2
    dev = ctx.device
    A = _unit_rows(B, d, dtype, dev, seed=1)
    P = _unit_rows(B, d, dtype, dev, seed=2)
    leaves = [A, P]
    fb = fused_backend(ctx)
    check_leaves = leaves
    if name == "hnm_fwd_bwd":
        from cdp_fast.kernels.hnm import hnm_loss
        from cdp_fast.kernels.hnm_ref import hnm_loss_reference

        def fused_loss():
            return hnm_loss(A, P, backend=fb)

        def ref_loss_of(a, p):
            return hnm_loss_reference(a, p, check=False)

        check_leaves = [A, _correlated_rows(A, HNM_CHECK["positive_noise"], seed=3)]

        def fused_check():
            return hnm_loss(*check_leaves, temperature=HNM_CHECK["temperature"], backend=fb)

        def ref_check():
            return hnm_loss_reference(*check_leaves, temperature=HNM_CHECK["temperature"], check=False)

        cost = cost_model.hnm_fwd(N, d, beta_one=True) + cost_model.hnm_bwd_rows(N, d, beta_one=True, recompute=False)
        flops, exps = cost.flops, cost.exps
        params = {"N": N, "B": B, "d": d, "temperature": 10.0, "tau_plus": 0.1, "beta": 1.0,
                  "estimator": "hard"}
    else:
        from cdp_fast.kernels.infonce import infonce_loss
        from cdp_fast.kernels.infonce_ref import infonce_loss_reference

        def fused_loss():
            return infonce_loss(A, P, backend=fb)

        def ref_loss_of(a, p):
            return infonce_loss_reference(a, p, check=False)

        cost = cost_model.infonce_fwd(B, d) + cost_model.infonce_bwd(B, d, one_kernel=True, recompute=False)
        flops, exps = cost.flops, cost.exps
        params = {"N": N, "B": B, "d": d, "temperature": 0.1}
        fused_check = fused_loss

        def ref_check():
            return ref_loss_of(A, P)

    def ref_loss():
        return ref_loss_of(A, P)

    def fused():
        fused_loss().backward()

    def ref():
        ref_loss().backward()

    metric: dict = {"fused_backend": fb, "cost_model": "see benchmarks/bench_kernels.py docstring"}
    metric.update(_bound_metrics(ctx, flops, exps, dtype))

    # Fused first: it must work at every size. Its very first call (Triton compile) is timed
    # apart by bench_kernel, so it runs before the correctness check.
    tf = bench_kernel(ctx, fused, grad_to_none=leaves)
    f_out = _grads_of(fused_check, check_leaves)
    metric["fused_first_call_ms"] = tf["first_call_ms"]
    metric["timer"] = tf["timer"]
    mem_f = peak_extra_mb(ctx, fused, grad_to_none=leaves)
    metric.update(_rate_metrics(ctx, flops, exps, tf["ms"], dtype, "fused"))

    # Eager reference (dense N x N): may run out of memory at large N; that is a result.
    ref_ms = mem_r = None
    try:
        tr = bench_kernel(ctx, ref, grad_to_none=leaves)
        r_out = _grads_of(ref_check, check_leaves)
        ref_grad_norm = max(float(g.float().norm()) for g in r_out[1:])
        metric["check_reference_grad_norm"] = ref_grad_norm
        if not ref_grad_norm > 0:
            raise RuntimeError(f"{name}: the reference gradient of the correctness check is exactly zero "
                               "(a clamp binds everywhere); the check would compare zeros")
        if check_leaves is not leaves:
            metric["check_params"] = dict(HNM_CHECK)
        metric["loss_fused"] = float(f_out[0])
        metric["loss_reference"] = float(r_out[0])
        metric["loss_rel_err"] = abs(float(f_out[0]) - float(r_out[0])) / max(abs(float(r_out[0])), 1e-30)
        metric["grad_rel_err"] = max(rel_err(f, r) for f, r in zip(f_out[1:], r_out[1:]))
        del r_out
        ref_ms = tr["ms"]
        metric["reference_first_call_ms"] = tr["first_call_ms"]
        mem_r = peak_extra_mb(ctx, ref, grad_to_none=leaves)
        metric.update(_rate_metrics(ctx, flops, exps, ref_ms, dtype, "reference"))
    except Exception as e:  # noqa: BLE001 - OOM is a result; anything else is re-raised
        if not is_oom(e):
            raise
        metric["reference_oom"] = True
        metric["note"] = f"eager reference ran out of memory at N={N}, d={d} ({type(e).__name__})"
        ref_ms = mem_r = None
    finally:
        for t in leaves + check_leaves:
            t.grad = None
        free_memory()

    if with_compile and ref_ms is not None:
        metric.update(_compiled_reference(ctx, ref_loss_of, leaves))

    return make_result(name, params, dtype_name(dtype), reference_ms=ref_ms, fused_ms=tf["ms"],
                       peak_mem_mb_reference=mem_r,
                       peak_mem_mb_fused=mem_f, metric=metric)


def _compiled_reference(ctx: Ctx, ref_loss_of, leaves) -> dict:
    """torch.compile(reference): compile time (first call) reported apart from the steady state."""
    out: dict = {}
    try:
        compiled = torch.compile(ref_loss_of, dynamic=False)

        def step():
            compiled(*leaves).backward()

        tc = bench_kernel(ctx, step, grad_to_none=leaves)
        out["compiled_reference_ms"] = tc["ms"]
        out["compile_s"] = tc["first_call_ms"] / 1e3
        out["compiled_reference_peak_mem_mb"] = peak_extra_mb(ctx, step, grad_to_none=leaves)
    except BenchTimeout:
        raise
    except Exception as e:  # noqa: BLE001 - a compile failure is recorded, the entry survives
        out["compiled_reference_error"] = f"{type(e).__name__}: {e}"[:500]
        if is_oom(e):
            out["compiled_reference_oom"] = True
    finally:
        for t in leaves:
            t.grad = None
        free_memory()
    return out


def hnm_case(ctx: Ctx, *, N: int, d: int, dtype: torch.dtype, with_compile: bool = False) -> dict:
    return _contrastive_case(ctx, name="hnm_fwd_bwd", N=N, d=d, dtype=dtype, with_compile=with_compile)


def infonce_case(ctx: Ctx, *, N: int, d: int, dtype: torch.dtype, with_compile: bool = False) -> dict:
    return _contrastive_case(ctx, name="infonce_fwd_bwd", N=N, d=d, dtype=dtype, with_compile=with_compile)


# ------------------------------------------------------------------------------------------------
# DDIM update
# ------------------------------------------------------------------------------------------------
def ddim_case(ctx: Ctx, *, shape: tuple, dtype: torch.dtype, eta: float, guided: bool) -> dict:
    from cdp_fast.kernels.ddim import ddim_update, make_rng_state

    dev = ctx.device
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(dev, dtype)
    e = torch.randn(shape, generator=g).to(dev, dtype)
    gr = torch.randn(shape, generator=g).to(dev, dtype) if guided else None
    a_t, a_next, scale = 0.5, 0.6, 1e-3
    fb = fused_backend(ctx)
    use_rng = eta > 0 and (ctx.is_cuda or fb == "triton")
    rng = make_rng_state(seed=0, device=dev) if use_rng else None

    # eager PyTorch expression (what a user / diffusers writes), in the input dtype
    sa, s1a, san = math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(a_next)
    c1 = eta * math.sqrt(max((1 - a_t / a_next) * (1 - a_next) / (1 - a_t), 0.0))
    c2 = math.sqrt(max(1 - a_next - c1 * c1, 0.0))

    def eager():
        ee = e + scale * gr if guided else e
        x0 = (x - s1a * ee) / sa
        out = san * x0 + c2 * ee
        if eta > 0:
            out = out + c1 * torch.randn_like(x)
        return out

    def fused():
        return ddim_update(x, e, a_t, a_next, eta=eta, grad=gr, scale=scale if guided else 0.0,
                           rng_state=rng, backend=fb)

    numel = x.numel()
    n_read = 2 + (1 if guided else 0)
    nbytes = (n_read + 1) * numel * x.element_size()
    metric: dict = {"fused_backend": fb, "bytes": nbytes, "bytes_model": f"{n_read} reads + 1 write"}
    with torch.no_grad():
        if eta == 0:  # deterministic: the two must agree
            metric["rel_err_vs_eager"] = rel_err(fused().float(), eager().float())
        tf = bench_kernel(ctx, fused)
        tr = bench_kernel(ctx, eager)
        mem_f = peak_extra_mb(ctx, fused)
        mem_r = peak_extra_mb(ctx, eager)
        if ctx.is_cuda:
            try:
                tg = bench_graph(ctx, fused)
                metric["fused_graph_ms"] = tg["ms"]
                metric["fused_graph_capture_ms"] = tg["capture_ms"]
                del tg["graph"]
            except BenchTimeout:
                raise
            except Exception as ex:  # noqa: BLE001 - recorded, not fatal
                metric["fused_graph_error"] = f"{type(ex).__name__}: {ex}"[:300]
    metric["fused_first_call_ms"] = tf["first_call_ms"]
    metric["timer"] = tf["timer"]
    for tag, ms in (("fused", tf["ms"]), ("reference", tr["ms"])):
        gbs = nbytes / (ms * 1e-3) / 1e9
        metric[f"{tag}_gb_s"] = gbs
        if ctx.peaks and ctx.peaks.get("hbm"):
            metric[f"{tag}_pct_hbm"] = 100.0 * gbs / ctx.peaks["hbm"]
    if ctx.peaks:
        metric["hbm_peak_gb_s"] = ctx.peaks.get("hbm")
    params = {"shape": list(shape), "numel": numel, "eta": eta, "guided": guided}
    return make_result("ddim_update", params, dtype_name(dtype), reference_ms=tr["ms"], fused_ms=tf["ms"],
                       peak_mem_mb_reference=mem_r, peak_mem_mb_fused=mem_f, metric=metric)
