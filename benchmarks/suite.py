"""Which cases each suite runs, in priority order, and the loop that runs them within a budget.

GPU grid trimming (what the 8-minute budget keeps, in this order; the rest is skipped and listed
under ``skipped`` with the reason "budget"):
  1. the headline points: HNM at N = 1024 (fp32, bf16), 16384 and 65536 (bf16), d = 128; DDIM at
     4096x3x32x32 guided fp32; guided sampling at batch 512 (all flags vs eager fp32, against the
     authors' loop); TRADES WRN-28-10 bf16.
  2. the rest of d = 128 at N = 256, 4096, 262144, InfoNCE, DDIM in bf16 / with noise / larger,
     unguided sampling at 512, the other sampler variants at 512, TRADES small-cnn,
     torch.compile(reference) at N = 1024 fp32.
  3. d = 64 and 640 (N = 1024, 16384), fp32 at N = 4096 / 65536, DDIM at batch 512,
     torch.compile(reference) at N = 4096 bf16, batch 2048 sampling, TRADES with torch.compile.
  4. the remaining (N, d, dtype) grid points, batch 4096.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .device import telemetry_delta
from .timing import BenchTimeout, Ctx, error_entry, free_memory, import_status, is_oom, time_limit

BENCH_NAMES = ("hnm_fwd_bwd", "infonce_fwd_bwd", "ddim_update", "sample_guided", "sample_unguided",
               "trades_step", "solver_nfe")


@dataclass
class Case:
    name: str                       # the result name (one of BENCH_NAMES)
    params: dict
    priority: int
    fn: Callable[[Ctx], dict]
    requires: tuple = ()
    est_s: float = 1.0              # rough cost on the suite's device; cases that cannot fit are skipped
    extra: dict = field(default_factory=dict)


def _hnm(N, d, dt, prio, compile_=False, est=3.0):
    from .bench_kernels import HNM_MODULES, hnm_case

    name = "hnm_fwd_bwd"
    p = {"N": N, "d": d, "dtype": str(dt).replace("torch.", ""), "compile_reference": compile_}
    return Case(name, p, prio, lambda ctx: hnm_case(ctx, N=N, d=d, dtype=dt, with_compile=compile_),
                HNM_MODULES, est)


def _infonce(N, d, dt, prio, est=3.0):
    from .bench_kernels import INFONCE_MODULES, infonce_case

    p = {"N": N, "d": d, "dtype": str(dt).replace("torch.", "")}
    return Case("infonce_fwd_bwd", p, prio, lambda ctx: infonce_case(ctx, N=N, d=d, dtype=dt),
                INFONCE_MODULES, est)


def _ddim(shape, dt, eta, guided, prio, est=2.0):
    from .bench_kernels import DDIM_MODULES, ddim_case

    p = {"shape": list(shape), "dtype": str(dt).replace("torch.", ""), "eta": eta, "guided": guided}
    return Case("ddim_update", p, prio,
                lambda ctx: ddim_case(ctx, shape=shape, dtype=dt, eta=eta, guided=guided), DDIM_MODULES, est)


def _sample(batch, variant, guided, prio, est=5.0):
    from .bench_sampling import SAMPLING_MODULES, sampling_case

    name = "sample_guided" if guided else "sample_unguided"
    p = {"batch": batch, "variant": variant}
    return Case(name, p, prio, lambda ctx: sampling_case(ctx, batch=batch, variant=variant, guided=guided),
                SAMPLING_MODULES, est)


def _solver(batch, sampler, steps, guided, prio, est=10.0):
    from .bench_sampling import SOLVER_MODULES, solver_case

    p = {"batch": batch, "sampler": sampler, "steps": steps, "guided": guided}
    return Case("solver_nfe", p, prio,
                lambda ctx: solver_case(ctx, batch=batch, sampler=sampler, steps=steps, guided=guided),
                SOLVER_MODULES, est)


def _trades(model, variant, prio, est):
    from .bench_trades import TRADES_MODULES, trades_case

    p = {"model": model, "variant": variant}
    return Case("trades_step", p, prio, lambda ctx: trades_case(ctx, model=model, variant=variant),
                TRADES_MODULES, est)


def gpu_cases() -> list[Case]:
    f32, b16 = torch.float32, torch.bfloat16
    cifar = lambda b: (b, 3, 32, 32)  # noqa: E731
    c: list[Case] = [
        # --- 1: headline numbers -------------------------------------------------------------
        _hnm(1024, 128, b16, 1), _hnm(1024, 128, f32, 1), _hnm(16384, 128, b16, 1),
        _hnm(65536, 128, b16, 1, est=8),
        _ddim(cifar(4096), f32, 0.0, True, 1),
        _sample(512, "bf16-cl-graphs-fused", True, 1, est=40),
        _sample(512, "eager-fp32", True, 1, est=20),
        _trades("wrn-28-10", "bf16-cl", 1, est=30),
        # --- 2 ---------------------------------------------------------------------------------
        _hnm(256, 128, b16, 2), _hnm(4096, 128, b16, 2), _hnm(262144, 128, b16, 2, est=10),
        _hnm(16384, 128, f32, 2),
        _infonce(1024, 128, b16, 2), _infonce(16384, 128, b16, 2), _infonce(16384, 128, f32, 2),
        _ddim(cifar(4096), b16, 0.0, True, 2), _ddim(cifar(4096), f32, 1.0, False, 2),
        _ddim(cifar(16384), f32, 0.0, True, 2),
        _sample(512, "bf16-cl-graphs-fused", False, 2, est=15), _sample(512, "eager-fp32", False, 2, est=10),
        _sample(512, "bf16-cl", True, 2, est=10), _sample(512, "bf16-cl-graphs", True, 2, est=10),
        _trades("small-cnn", "bf16-cl", 2, est=15),
        _hnm(1024, 128, f32, 2, compile_=True, est=40),
        # --- 3 ---------------------------------------------------------------------------------
        _hnm(1024, 64, b16, 3), _hnm(16384, 64, b16, 3), _hnm(1024, 640, b16, 3), _hnm(16384, 640, b16, 3),
        _hnm(4096, 128, f32, 3), _hnm(65536, 128, f32, 3, est=8),
        _ddim(cifar(512), f32, 0.0, True, 3), _ddim(cifar(512), b16, 0.0, True, 3),
        _hnm(4096, 128, b16, 3, compile_=True, est=40),
        _sample(2048, "bf16-cl-graphs-fused", True, 3, est=40), _sample(2048, "eager-fp32", True, 3, est=40),
        _sample(2048, "bf16-cl-graphs-fused", False, 3, est=15), _sample(2048, "eager-fp32", False, 3, est=15),
        _trades("wrn-28-10", "bf16-cl-compile", 3, est=120),
        _sample(512, "bf16-cl", False, 3, est=8), _sample(512, "bf16-cl-graphs", False, 3, est=8),
    ]
    # --- 4: the rest of the grid ----------------------------------------------------------------
    done = {(x.params["N"], x.params["d"], x.params["dtype"]) for x in c if x.name == "hnm_fwd_bwd"}
    for d in (64, 128, 640):
        for N in (256, 1024, 4096, 16384, 65536, 262144):
            for dt in (b16, f32):
                if (N, d, str(dt).replace("torch.", "")) not in done:
                    c.append(_hnm(N, d, dt, 4, est=3 + N / 20000))
    c += [_sample(2048, v, g, 4, est=30) for v in ("bf16-cl", "bf16-cl-graphs") for g in (True, False)]
    c += [_sample(4096, "bf16-cl-graphs-fused", g, 4, est=60) for g in (True, False)]
    c += [_infonce(65536, 128, b16, 4), _infonce(1024, 128, f32, 4), _trades("small-cnn", "bf16-cl-compile", 4, est=60)]
    # issue 20: NFE/img and images/s per sampler at batch 512 (heun 18 guided first)
    from .bench_sampling import SOLVER_POINTS
    c += [_solver(512, s, k, g, 2 if (s, k) == ("heun", 18) else 3, est=20)
          for s, k in SOLVER_POINTS for g in (True, False)]
    return c


def cpu_cases() -> list[Case]:
    f32 = torch.float32
    c = [_hnm(N, d, f32, 1) for N in (256, 1024, 2048) for d in (64, 128)]
    c += [_infonce(1024, 128, f32, 1), _ddim((64, 3, 32, 32), f32, 0.0, True, 1),
          _ddim((64, 3, 32, 32), f32, 1.0, False, 1)]
    c += [_sample(2, v, g, 2, est=60) for g in (True, False) for v in ("eager-fp32", "fused")]
    c += [_trades("wrn-28-10", "bf16-cl", 2, est=60), _trades("small-cnn", "bf16-cl", 2, est=30)]
    c += [_hnm(1024, 128, f32, 3, compile_=True, est=120)]
    c += [_solver(2, "heun", 18, False, 2, est=60), _solver(2, "dpm-solver++", 20, False, 2, est=40)]
    return c


def quick_cases() -> list[Case]:
    f32 = torch.float32
    return [
        _hnm(32, 16, f32, 1), _infonce(32, 16, f32, 1),
        _ddim((2, 3, 8, 8), f32, 0.0, True, 1), _ddim((2, 3, 8, 8), f32, 1.0, False, 1),
        _sample(8, "eager-fp32", True, 1), _sample(8, "fused", True, 1),
        _sample(8, "eager-fp32", False, 1), _sample(8, "fused", False, 1),
        _trades("wrn-28-10", "bf16-cl", 1, est=5), _trades("small-cnn", "bf16-cl", 1, est=5),
        _solver(8, "heun", 3, True, 1), _solver(8, "dpm-solver++", 4, False, 1),
    ]


def cases_for(suite: str) -> list[Case]:
    return {"gpu": gpu_cases, "cpu": cpu_cases, "quick": quick_cases}[suite]()


def run_cases(ctx: Ctx, cases: list[Case], *, only=None, log=print, checkpoint=None) -> dict:
    """Run cases in (priority, listed) order; returns {"results", "errors", "skipped"}.

    ``checkpoint(partial)`` is called after every case, so a hard crash (a segfault, a sticky CUDA
    error followed by a kill) still leaves the results so far on disk."""
    order = sorted(range(len(cases)), key=lambda i: (cases[i].priority, i))
    results, errors, skipped = [], [], []
    if only:
        cases = [c if c.name in only else None for c in cases]
    for i in order:
        case = cases[i]
        if case is None:
            continue
        label = f"{case.name} {case.params}"
        try:
            ok, why = import_status(case.requires) if case.requires else (True, None)
        except Exception as e:  # noqa: BLE001 - a module that exists but fails to import is a bug
            errors.append({**error_entry(case.name, case.params, e), "kind": "import"})
            log(f"[bench] error {label}: import failed: {type(e).__name__}: {e}")
            continue
        if not ok:
            skipped.append({"name": case.name, "params": case.params, "reason": why})
            log(f"[bench] skip {label}: {why}")
            continue
        remaining = ctx.budget.remaining()
        if remaining < max(case.est_s, 2.0):
            skipped.append({"name": case.name, "params": case.params,
                            "reason": f"budget ({remaining:.0f}s left, needs ~{case.est_s:.0f}s)"})
            log(f"[bench] skip {label}: budget")
            continue
        limit = min(ctx.settings.case_timeout_s, remaining) if remaining != float("inf") \
            else ctx.settings.case_timeout_s
        before = ctx.telemetry.sample()
        t0 = time.perf_counter()
        log(f"[bench] run  {label}")
        try:
            with time_limit(limit), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res = case.fn(ctx)
            tel = telemetry_delta(before, ctx.telemetry.sample(), time.perf_counter() - t0)
            res["metric"]["telemetry"] = tel
            # e.g. "CUDA graph capture of the 'guided' step failed ... running that step eagerly":
            # a variant that silently fell back must say so next to its number.
            msgs = list(dict.fromkeys(f"{w.category.__name__}: {w.message}"[:300] for w in caught
                                      if not issubclass(w.category, DeprecationWarning)))
            if msgs:
                res["metric"]["warnings"] = msgs[:8]
            res["metric"]["priority"] = case.priority
            results.append(res)
            ref = "-" if res["reference_ms"] is None else "%.3f ms" % res["reference_ms"]
            spd = "-" if res["speedup"] is None else "%.2fx" % res["speedup"]
            log(f"[bench]      fused {res['fused_ms']:.3f} ms, reference {ref}, speedup {spd} "
                f"({time.perf_counter() - t0:.1f}s)")
        except BenchTimeout as e:
            errors.append({**error_entry(case.name, case.params, e), "kind": "timeout"})
            log(f"[bench]      TIMEOUT {e}")
        except Exception as e:  # noqa: BLE001 - one failure must not stop the suite
            entry = error_entry(case.name, case.params, e)
            if is_oom(e):
                entry["kind"] = "oom"
            errors.append(entry)
            log(f"[bench]      ERROR {type(e).__name__}: {str(e)[:300]}")
        finally:
            free_memory()
        if checkpoint is not None:
            try:
                checkpoint({"results": results, "errors": errors, "skipped": skipped})
            except Exception as e:  # noqa: BLE001 - never lose the run over a checkpoint
                log(f"[bench] checkpoint failed: {type(e).__name__}: {e}")
    return {"results": results, "errors": errors, "skipped": skipped}
