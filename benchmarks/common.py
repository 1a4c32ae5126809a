"""Shared machinery of the benchmark suite: environment, device peaks, telemetry, timing, memory.

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
import platform
import re
import signal
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# --------------------------------------------------------------------------------------------
# Device peak numbers (dense, no sparsity), from the vendors' data sheets. Matched against
# torch.cuda.get_device_name() by the first pattern that occurs in it (lower case), so put the
# more specific names first. Unknown devices get nulls and no "% of peak" numbers.
#   bf16 / tf32: tensor-core TFLOP/s; fp32: non-tensor (CUDA-core FMA) TFLOP/s; hbm: GB/s;
#   sms / boost_mhz: for the SFU (exp) peak, see sfu_exp_per_s().
# --------------------------------------------------------------------------------------------
DEVICE_PEAKS: list[tuple[str, dict]] = [
    ("h200 nvl", dict(label="H200 NVL", bf16=835.0, tf32=418.0, fp32=60.0, hbm=4800.0, sms=132, boost_mhz=1785)),
    ("h200", dict(label="H200 SXM", bf16=989.4, tf32=494.7, fp32=66.9, hbm=4800.0, sms=132, boost_mhz=1980)),
    ("h100 nvl", dict(label="H100 NVL", bf16=835.0, tf32=418.0, fp32=60.0, hbm=3900.0, sms=132, boost_mhz=1785)),
    ("h100 pcie", dict(label="H100 PCIe", bf16=756.5, tf32=378.0, fp32=51.2, hbm=2000.0, sms=114, boost_mhz=1755)),
    ("h100", dict(label="H100 SXM", bf16=989.4, tf32=494.7, fp32=66.9, hbm=3350.0, sms=132, boost_mhz=1980)),
    ("a100 80gb pcie", dict(label="A100 80GB PCIe", bf16=312.0, tf32=156.0, fp32=19.5, hbm=1935.0, sms=108, boost_mhz=1410)),
    ("a100-pcie", dict(label="A100 40GB PCIe", bf16=312.0, tf32=156.0, fp32=19.5, hbm=1555.0, sms=108, boost_mhz=1410)),
    ("a100-sxm4-80gb", dict(label="A100 SXM 80GB", bf16=312.0, tf32=156.0, fp32=19.5, hbm=2039.0, sms=108, boost_mhz=1410)),
    ("a100", dict(label="A100 SXM 40GB", bf16=312.0, tf32=156.0, fp32=19.5, hbm=1555.0, sms=108, boost_mhz=1410)),
]

# SFU throughput for exp2 (MUFU.EX2), results per clock per SM: 16 on compute capability 8.x and
# 9.0 (CUDA C Programming Guide, "Arithmetic Instructions" throughput table). exp(x) is one FMUL
# (x * log2 e, on the FMA pipe, not the bottleneck) plus one MUFU.EX2, so the exp peak is
# 16 * SMs * SM clock. This is the assumption behind every "exp bound" number.
SFU_EXP_PER_CLK_PER_SM = 16


def device_peaks(name: str | None) -> dict | None:
    if not name:
        return None
    low = name.lower()
    for pat, peaks in DEVICE_PEAKS:
        if pat in low:
            return dict(peaks)
    return None


def sfu_exp_per_s(peaks: dict | None, sm_clock_mhz: float | None = None) -> float | None:
    """exp/s peak: 16 per clock per SM (see SFU_EXP_PER_CLK_PER_SM) at the max SM clock."""
    if not peaks:
        return None
    mhz = sm_clock_mhz or peaks.get("boost_mhz")
    return SFU_EXP_PER_CLK_PER_SM * peaks["sms"] * mhz * 1e6


def matmul_peak_tflops(peaks: dict | None, dtype: torch.dtype) -> tuple[float | None, str]:
    """Matmul peak for inputs of ``dtype``: bf16/fp16 -> the dense bf16 tensor-core peak; fp32 ->
    the fp32 (FMA, non-tensor-core) peak: the HNM kernel uses tl.dot(input_precision="ieee") for
    fp32 inputs and PyTorch's default (allow_tf32=False) keeps the reference's fp32 matmuls off
    TF32 too. The TF32 peak stays in the table for reference."""
    if not peaks:
        return None, "unknown"
    if dtype in (torch.bfloat16, torch.float16):
        return peaks["bf16"], "bf16-tensor"
    return peaks["fp32"], "fp32-fma"


# --------------------------------------------------------------------------------------------
# Environment and telemetry
# --------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def slugify(s: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)|cpu @.*$", "", s.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s[:48].strip("-") or "device"


def device_slug(device: torch.device) -> str:
    name = device_name(device)
    return slugify(name) if device.type == "cuda" else "cpu-" + slugify(name)


def triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except Exception:  # ImportError or a broken install
        return "unavailable"


class Telemetry:
    """nvidia-ml-py (pynvml) readings for one GPU; every method degrades to {} without it."""

    def __init__(self, device: torch.device):
        self.handle = None
        self.nvml = None
        self.error = None
        if device.type != "cuda":
            self.error = "not a CUDA device"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            idx = device.index if device.index is not None else torch.cuda.current_device()
            # Respect CUDA_VISIBLE_DEVICES: map the torch index to the physical one by UUID if we can.
            handle = None
            try:
                uuid = str(torch.cuda.get_device_properties(idx).uuid)
                for i in range(pynvml.nvmlDeviceGetCount()):
                    h = pynvml.nvmlDeviceGetHandleByIndex(i)
                    u = pynvml.nvmlDeviceGetUUID(h)
                    u = u.decode() if isinstance(u, bytes) else u
                    if u.replace("GPU-", "") == uuid.replace("GPU-", ""):
                        handle = h
                        break
            except Exception:
                handle = None
            self.handle = handle or pynvml.nvmlDeviceGetHandleByIndex(idx)
            self.nvml = pynvml
        except Exception as e:  # not installed, no driver, no permission
            self.error = f"{type(e).__name__}: {e}"

    def _try(self, fn, *args):
        try:
            return fn(self.handle, *args)
        except Exception:
            return None

    def static(self) -> dict:
        if self.nvml is None:
            return {"nvml": False, "nvml_error": self.error}
        n = self.nvml
        name = self._try(n.nvmlDeviceGetName)
        out = {
            "nvml": True,
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": _decode(_safe(n.nvmlSystemGetDriverVersion)),
            "max_sm_clock_mhz": self._try(n.nvmlDeviceGetMaxClockInfo, n.NVML_CLOCK_SM),
            "max_mem_clock_mhz": self._try(n.nvmlDeviceGetMaxClockInfo, n.NVML_CLOCK_MEM),
            "power_limit_w": _div(self._try(n.nvmlDeviceGetEnforcedPowerLimit), 1000.0),
        }
        mem = self._try(n.nvmlDeviceGetMemoryInfo)
        if mem is not None:
            out["memory_total_mb"] = mem.total / 2 ** 20
        return out

    def sample(self) -> dict:
        if self.nvml is None:
            return {}
        n = self.nvml
        mem = self._try(n.nvmlDeviceGetMemoryInfo)
        return {
            "sm_clock_mhz": self._try(n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_SM),
            "mem_clock_mhz": self._try(n.nvmlDeviceGetClockInfo, n.NVML_CLOCK_MEM),
            "power_w": _div(self._try(n.nvmlDeviceGetPowerUsage), 1000.0),
            "temperature_c": self._try(n.nvmlDeviceGetTemperature, n.NVML_TEMPERATURE_GPU),
            "memory_used_mb": mem.used / 2 ** 20 if mem is not None else None,
            "energy_mj": self._try(n.nvmlDeviceGetTotalEnergyConsumption),  # Volta+; else None
        }

    def close(self) -> None:
        if self.nvml is not None:
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()
            self.nvml = None


def _safe(fn, *a):
    try:
        return fn(*a)
    except Exception:
        return None


def _decode(v):
    return v.decode() if isinstance(v, bytes) else v


def _div(v, d):
    return None if v is None else v / d


def telemetry_delta(before: dict, after: dict, wall_s: float) -> dict:
    """Energy (J) and mean power (W) over one benchmark from the NVML energy counter."""
    out = {"wall_s": round(wall_s, 3)}
    e0, e1 = before.get("energy_mj"), after.get("energy_mj")
    if e0 is not None and e1 is not None and e1 >= e0:
        out["energy_j"] = (e1 - e0) / 1000.0
        if wall_s > 0:
            out["mean_power_w"] = out["energy_j"] / wall_s
    for k in ("sm_clock_mhz", "power_w", "temperature_c"):
        if after.get(k) is not None:
            out[f"{k}_end"] = after[k]
    return out


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
