"""Benchmark timing: suite settings and context, budgets and timeouts, timing rules, memory, results.

Device facts and telemetry are in :mod:`.device`.

Timing rules (the same for every benchmark):
- GPU: the first call (Triton compile / autotune / cuDNN planning / graph capture) is timed on its
  own with a host clock around a synchronise and reported as ``first_call_ms`` (or ``capture_ms``);
  the timed part is ``triton.testing.do_bench`` (median of CUDA-event timings, L2 flushed before
  each run) or, for a warm replay loop, a captured CUDA graph timed with ``do_bench`` on
  ``graph.replay``. Long end-to-end work (sampling, training steps) is timed with CUDA events
  around ``reps`` calls after one warm-up call (median).
- CPU: one warm-up call timed separately, then repeated ``time.perf_counter`` runs until
  ``min_time_s`` (at least ``min_reps``, at most ``max_reps``); the median is reported, like
  pytest-benchmark's median column.
Peak extra memory: ``torch.cuda.max_memory_allocated`` during one call minus the memory allocated
before it (inputs excluded); not measured on the CPU (reported as 0.0 with ``mem_measured: false``).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import math
import signal
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .device import Telemetry, sfu_exp_per_s


# --------------------------------------------------------------------------------------------
# Suite settings and context
# --------------------------------------------------------------------------------------------
@dataclass
class Settings:
    suite: str                      # "gpu" | "cpu" | "quick"
    device: torch.device
    warmup_ms: int = 25             # do_bench warm-up
    rep_ms: int = 100               # do_bench repetition time
    long_reps: int = 3              # timed calls of long end-to-end work (after one warm-up)
    cpu_min_time_s: float = 0.2
    cpu_min_reps: int = 3
    cpu_max_reps: int = 20
    case_timeout_s: float = 120.0   # soft per-case limit (SIGALRM); the global budget also caps it


@dataclass
class Ctx:
    settings: Settings
    telemetry: Telemetry
    peaks: dict | None
    budget: "Budget"
    static: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.settings.device

    @property
    def suite(self) -> str:
        return self.settings.suite

    @property
    def is_cuda(self) -> bool:
        return self.settings.device.type == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def exp_peak(self) -> float | None:
        return sfu_exp_per_s(self.peaks, self.static.get("max_sm_clock_mhz"))


class Budget:
    """A global wall-clock budget: cases check ``remaining()`` before they start."""

    def __init__(self, seconds: float | None):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()


# --------------------------------------------------------------------------------------------
# Errors: OOM detection and a soft per-case timeout
# --------------------------------------------------------------------------------------------
class BenchTimeout(Exception):
    pass


def is_oom(e: BaseException) -> bool:
    oom_cls = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(e, oom_cls):
        return True
    msg = str(e).lower()
    return isinstance(e, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg or isinstance(e, MemoryError))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise BenchTimeout in the main thread after ``seconds`` (POSIX SIGALRM); no-op elsewhere.

    Soft: it fires between Python bytecodes, so a single long CUDA call finishes first."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise BenchTimeout(f"case exceeded its time limit of {seconds:.0f}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_entry(name: str, params: dict, e: BaseException) -> dict:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"name": name, "params": params, "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": "".join(tb)[-3000:]}


def import_status(modules) -> tuple[bool, str | None]:
    """(True, None) when every module imports; (False, reason) when one is simply not there yet
    (ModuleNotFoundError for that very module). Any other import failure propagates: it is a bug."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            missing = e.name or ""
            if mod == missing or mod.startswith(missing + ".") or missing.startswith("cdp_fast"):
                return False, f"module {missing or mod} not available"
            raise
    return True, None


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def _do_bench(fn, *, warmup, rep, grad_to_none=None) -> float:
    import triton.testing as tt

    try:
        return float(tt.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                 return_mode="median"))
    except TypeError:  # older Triton: no return_mode; quantiles=[0.5] gives the median
        return float(tt.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                 quantiles=[0.5])[0])


def _reset_grads(grad_to_none):
    for t in grad_to_none or ():
        t.grad = None


def first_call_ms(ctx: Ctx, fn: Callable[[], Any], grad_to_none=None) -> float:
    """Wall time of one call including its compilation / planning (synchronised)."""
    _reset_grads(grad_to_none)
    ctx.sync()
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    return (time.perf_counter() - t0) * 1e3


def bench_kernel(ctx: Ctx, fn: Callable[[], Any], grad_to_none=None) -> dict:
    """{"ms": median, "first_call_ms": ..., "timer": ...} for a short op (kernel-sized)."""
    first = first_call_ms(ctx, fn, grad_to_none)
    s = ctx.settings
    if ctx.is_cuda:
        ms = _do_bench(fn, warmup=s.warmup_ms, rep=s.rep_ms, grad_to_none=grad_to_none)
        return {"ms": ms, "first_call_ms": first, "timer": "triton.testing.do_bench(median)"}
    return {"ms": _cpu_median_ms(ctx, fn, grad_to_none), "first_call_ms": first,
            "timer": "perf_counter(median)"}


def bench_graph(ctx: Ctx, fn: Callable[[], Any], warm_iters: int = 3) -> dict:
    """Capture ``fn`` in a CUDA graph (capture timed separately) and time its replay with do_bench."""
    if not ctx.is_cuda:
        raise RuntimeError("CUDA graphs need a CUDA device")
    s = torch.cuda.Stream(device=ctx.device)
    s.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs recommends
        for _ in range(warm_iters):
            fn()
    torch.cuda.current_stream(ctx.device).wait_stream(s)
    ctx.sync()
    g = torch.cuda.CUDAGraph()
    t0 = time.perf_counter()
    with torch.cuda.graph(g):
        fn()
    ctx.sync()
    capture_ms = (time.perf_counter() - t0) * 1e3
    ms = _do_bench(g.replay, warmup=ctx.settings.warmup_ms, rep=ctx.settings.rep_ms)
    return {"ms": ms, "capture_ms": capture_ms, "timer": "do_bench(CUDAGraph.replay, median)", "graph": g}


def bench_long(ctx: Ctx, fn: Callable[[], Any], reps: int | None = None) -> dict:
    """Median of ``reps`` calls after one warm-up call (reported as first_call_ms)."""
    first = first_call_ms(ctx, fn)
    reps = reps or ctx.settings.long_reps
    times = []
    for _ in range(max(1, reps)):
        if ctx.is_cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "first_call_ms": first, "reps": len(times),
            "timer": "cuda events(median)" if ctx.is_cuda else "perf_counter(median)"}


def _cpu_median_ms(ctx: Ctx, fn, grad_to_none=None) -> float:
    s = ctx.settings
    times: list[float] = []
    t_start = time.perf_counter()
    while True:
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        n = len(times)
        if n >= s.cpu_max_reps or (n >= s.cpu_min_reps and time.perf_counter() - t_start >= s.cpu_min_time_s):
            break
    return statistics.median(times)


def peak_extra_mb(ctx: Ctx, fn: Callable[[], Any], grad_to_none=None) -> float | None:
    """Peak memory allocated during one call beyond what was allocated before it (MB); CUDA only."""
    if not ctx.is_cuda:
        return None
    _reset_grads(grad_to_none)
    ctx.sync()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device)
    fn()
    ctx.sync()
    peak = torch.cuda.max_memory_allocated(ctx.device)
    _reset_grads(grad_to_none)
    return max(0.0, (peak - base) / 2 ** 20)


# --------------------------------------------------------------------------------------------
# Result entries
# --------------------------------------------------------------------------------------------
def dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float64: "fp64"}.get(dt, str(dt).replace("torch.", ""))


def make_result(name: str, params: dict, dtype: str, *, reference_ms: float | None,
                fused_ms: float, peak_mem_mb_reference: float | None,
                peak_mem_mb_fused: float | None, metric: dict) -> dict:
    metric = dict(metric)
    if peak_mem_mb_fused is None:
        metric.setdefault("mem_measured", False)
    speedup = (reference_ms / fused_ms) if (reference_ms and fused_ms and fused_ms > 0) else None
    return {
        "name": name,
        "params": params,
        "dtype": dtype,
        "reference_ms": None if reference_ms is None else float(reference_ms),
        "fused_ms": float(fused_ms),
        "speedup": speedup,
        "peak_mem_mb_reference": None if peak_mem_mb_reference is None else float(peak_mem_mb_reference),
        "peak_mem_mb_fused": float(peak_mem_mb_fused) if peak_mem_mb_fused is not None else 0.0,
        "metric": metric,
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
