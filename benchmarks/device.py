"""Benchmark device facts: vendor peak numbers, device / CPU names, Triton version, GPU telemetry
(clocks, power, temperature sampled by NVML around a case).

Timing and results are in :mod:`.timing`.
"""
from __future__ import annotations

import contextlib
import platform
import re

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
