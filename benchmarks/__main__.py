"""``cdp-fast bench`` / ``python -m cdp_fast.benchmarks``: the benchmark suites (see benchmarks/README.md).

    cdp-fast bench --suite gpu      # GPU-only tests, then every GPU benchmark (8-minute budget)
    cdp-fast bench --suite cpu      # moderate CPU sizes
    cdp-fast bench --suite quick    # seconds: every benchmark at tiny sizes (CI smoke test)

Writes ``<out>/<device-slug>-<YYYY-MM-DD>.json`` (``--out`` default ``runs/bench`` under the
current folder, never inside the installed package or the source checkout) (gpu; ``...-<suite>.json`` for the others) and a
markdown table beside it; exit status 0 when the file was written (failures of single benchmarks
are recorded in the file, not raised), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from . import report
from .device import Telemetry, device_name, device_peaks, device_slug, sfu_exp_per_s, triton_version
from .suite import BENCH_NAMES, cases_for, run_cases
from .timing import Budget, Ctx, Settings

PKG_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = Path("runs") / "bench"  # relative to the current folder
DEFAULT_BUDGET = {"gpu": 450.0, "cpu": 1200.0, "quick": None}  # seconds; gpu: fits 8 minutes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cdp-fast bench",
                                description="cdp-fast benchmarks: fused kernels, sampler, TRADES vs reference paths")
    p.add_argument("--suite", choices=("gpu", "cpu", "quick"), default="quick",
                   help="gpu: GPU tests + all GPU benchmarks; cpu: moderate CPU sizes; quick: tiny smoke run")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"output folder (default: {DEFAULT_OUT}, under the current folder)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=BENCH_NAMES,
                   help=f"run only these benchmarks ({', '.join(BENCH_NAMES)})")
    p.add_argument("--budget-s", type=float, default=None,
                   help="global wall-clock budget in seconds, tests included (default: gpu 450, cpu 1200, "
                        "quick none); cases that no longer fit are skipped and listed")
    p.add_argument("--no-tests", action="store_true", help="gpu suite: do not run the GPU-only tests first")
    p.add_argument("--device", default=None, help="override the device (default: cuda for gpu, else cpu)")
    p.add_argument("--list", action="store_true", help="print the suite's cases in run order and exit")
    p.add_argument("--tests-timeout-s", type=float, default=None,
                   help="limit for the GPU tests (default: min(150, 35%% of the budget))")
    return p


def _settings(suite: str, device: torch.device) -> Settings:
    s = Settings(suite=suite, device=device)
    if suite == "quick":
        s.cpu_min_time_s, s.cpu_min_reps, s.cpu_max_reps, s.long_reps = 0.0, 1, 2, 1
        s.warmup_ms, s.rep_ms, s.case_timeout_s = 5, 20, 60.0
    elif suite == "cpu":
        s.long_reps, s.case_timeout_s = 2, 300.0
    else:
        s.case_timeout_s = 150.0
    return s


def run_gpu_tests(timeout_s: float, log=print) -> dict:
    """``pytest -q -m gpu tests`` in a subprocess; counts from its JUnit XML."""
    # CDP_FAST_TESTS_DIR: benchmarks/device.sh's staged copy keeps the tests beside the package
    tests = Path(os.environ.get("CDP_FAST_TESTS_DIR") or PKG_DIR.parent / "tests").resolve()
    root = tests.parent
    if not tests.is_dir():
        return {"status": "not-run", "reason": f"no tests folder at {tests}"}
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the real GPU path
    env.setdefault("CDP_FAST_QUIET", "1")
    with tempfile.TemporaryDirectory() as td:
        xml = Path(td) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={xml}", str(tests)]
        log(f"[bench] GPU tests: {' '.join(cmd)} (timeout {timeout_s:.0f}s)")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"")
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            return {"status": "timeout", "timeout_s": timeout_s, "output_tail": out[-2000:]}
        res = {"status": "passed" if proc.returncode == 0 else
               ("no-tests" if proc.returncode == 5 else "failed"),
               "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
               "command": " ".join(cmd[1:])}
        if xml.is_file():
            try:
                suites = ET.parse(xml).getroot()
                s = suites if suites.tag == "testsuite" else suites.find("testsuite")
                total = int(s.get("tests", 0))
                failed, errors, skipped = int(s.get("failures", 0)), int(s.get("errors", 0)), int(s.get("skipped", 0))
                res.update(total=total, failed=failed, errors=errors, skipped=skipped,
                           passed=total - failed - errors - skipped)
                bad = [f"{tc.get('classname')}::{tc.get('name')}" for tc in s.iter("testcase")
                       if tc.find("failure") is not None or tc.find("error") is not None]
                res["failed_tests"] = bad[:30]
            except (ET.ParseError, ValueError, AttributeError) as e:
                res["junit_error"] = str(e)
        if proc.returncode not in (0, 5):
            res["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    suite = args.suite
    if args.list:
        cases = sorted(enumerate(cases_for(suite)), key=lambda ic: (ic[1].priority, ic[0]))
        for _, c in cases:
            if not args.only or c.name in args.only:
                print(f"P{c.priority}  ~{c.est_s:>5.0f}s  {c.name:16s} {c.params}")
        return 0
    if args.device:
        device = torch.device(args.device)
    elif suite == "gpu":
        if not torch.cuda.is_available():
            print("cdp-fast bench: --suite gpu needs a CUDA device (torch.cuda.is_available() is False)",
                  file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cdp-fast bench: CUDA requested but not available", file=sys.stderr)
        return 2

    budget_s = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET[suite]
    budget = Budget(budget_s)
    tel = Telemetry(device)
    static = tel.static()
    name = device_name(device)
    peaks = device_peaks(name) if device.type == "cuda" else None
    ctx = Ctx(settings=_settings(suite, device), telemetry=tel, peaks=peaks, budget=budget, static=static)
    now = _dt.datetime.now(_dt.timezone.utc)
    doc: dict = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version(),
        "timestamp": now.isoformat(timespec="seconds"),
        "suite": suite,
        "device_slug": device_slug(device),
        "device_peaks": peaks,
        "exp_peak_per_s": sfu_exp_per_s(peaks, static.get("max_sm_clock_mhz")),
        "telemetry": {**static, "start": tel.sample()},
        "budget_s": budget_s,
        "python": sys.version.split()[0],
        "cuda": torch.version.cuda,
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES") if os.environ.get(k)},
        # left at PyTorch's defaults (what a user gets); recorded because they change fp32 numbers
        "backend_flags": {"cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
                          "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                          "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)},
    }
    if device.type == "cuda":
        doc["device_properties"] = {"total_memory_mb": torch.cuda.get_device_properties(device).total_memory / 2 ** 20,
                                    "capability": list(torch.cuda.get_device_capability(device))}

    stem = f"{doc['device_slug']}-{now.date().isoformat()}" + ("" if suite == "gpu" else f"-{suite}")

    def checkpoint(partial: dict) -> None:
        report.write({**doc, **partial, "partial": True, "wall_s": budget.elapsed()}, Path(args.out), stem)

    # the JSON / markdown pair exists from the first seconds on (a run cut short still leaves one)
    checkpoint({"results": [], "errors": [], "skipped": []})
    if suite == "gpu" and not args.no_tests:
        t_lim = args.tests_timeout_s or min(150.0, 0.35 * (budget_s or 450.0))
        doc["tests"] = run_gpu_tests(t_lim)
        print(f"[bench] GPU tests: {doc['tests'].get('status')} "
              f"(passed {doc['tests'].get('passed')}, failed {doc['tests'].get('failed')})")
        checkpoint({"results": [], "errors": [], "skipped": []})
    elif suite == "gpu":
        doc["tests"] = {"status": "not-run", "reason": "--no-tests"}

    # quick is a smoke test on shared CI cores: one intra-op thread avoids the OpenMP pool's
    # collapse under oversubscription (measured: a tiny UNet forward 35 ms vs 1.5-3 s on a loaded
    # 2-core machine). Restored afterwards: main() may run in-process (tests, `cdp-fast bench`).
    threads = torch.get_num_threads()
    if suite == "quick" and device.type == "cpu":
        torch.set_num_threads(1)
    doc["cpu_threads"] = torch.get_num_threads()
    try:
        out = run_cases(ctx, cases_for(suite), only=set(args.only) if args.only else None,
                        checkpoint=checkpoint)
    finally:
        torch.set_num_threads(threads)
        from .bench_sampling import clear_cache, clear_models

        clear_cache()  # measurements and models are shared within one run only
        clear_models()
    doc.update(out)
    doc["telemetry"]["end"] = tel.sample()
    doc["wall_s"] = budget.elapsed()
    tel.close()

    problems = report.validate(report.sanitize(doc))
    if problems:  # a bug in a benchmark: record it, still write the file
        doc["schema_problems"] = problems
    jp, mp = report.write(doc, Path(args.out), stem)
    print(f"[bench] {len(doc['results'])} results, {len(doc['errors'])} errors, "
          f"{len(doc['skipped'])} skipped in {doc['wall_s']:.0f}s -> {jp} (+ {mp.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
