"""Result files: the JSON document (schema of issue 6), its validation, and the markdown table."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

TOP_KEYS = {"device": str, "torch": str, "triton": str, "timestamp": str, "results": list}
RESULT_KEYS = ("name", "params", "dtype", "reference_ms", "fused_ms", "speedup",
               "peak_mem_mb_reference", "peak_mem_mb_fused", "metric")


def sanitize(obj):
    """JSON-safe copy: NaN/inf -> None, tuples -> lists, torch/numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return sanitize(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate(doc: dict) -> list[str]:
    """Problems with ``doc`` against the schema (empty list = valid)."""
    errs = []
    if not isinstance(doc, dict):
        return ["document is not an object"]
    for k, tp in TOP_KEYS.items():
        if not isinstance(doc.get(k), tp):
            errs.append(f"top-level {k!r} missing or not {tp.__name__}")
    for i, r in enumerate(doc.get("results") or []):
        where = f"results[{i}] ({r.get('name') if isinstance(r, dict) else '?'})"
        if not isinstance(r, dict):
            errs.append(f"{where}: not an object")
            continue
        missing = [k for k in RESULT_KEYS if k not in r]
        if missing:
            errs.append(f"{where}: missing {missing}")
            continue
        if not isinstance(r["name"], str) or not isinstance(r["dtype"], str):
            errs.append(f"{where}: name/dtype must be strings")
        if not isinstance(r["params"], dict) or not isinstance(r["metric"], dict):
            errs.append(f"{where}: params/metric must be objects")
        if not _is_num(r["fused_ms"]) or r["fused_ms"] <= 0:
            errs.append(f"{where}: fused_ms must be a positive number, got {r['fused_ms']!r}")
        if not _is_num(r["peak_mem_mb_fused"]):
            errs.append(f"{where}: peak_mem_mb_fused must be a number")
        for k in ("reference_ms", "speedup", "peak_mem_mb_reference"):
            if r[k] is not None and not _is_num(r[k]):
                errs.append(f"{where}: {k} must be a number or null, got {r[k]!r}")
        if r["reference_ms"] is None and r["speedup"] is not None:
            errs.append(f"{where}: speedup without reference_ms")
        if r["reference_ms"] is not None and r["speedup"] is None:
            errs.append(f"{where}: reference_ms without speedup")
        if r["reference_ms"] is None and not any(k in r["metric"] for k in ("note", "reference_oom", "authors_oom")):
            errs.append(f"{where}: reference_ms is null without a note in metric")
    return errs


# ------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------
def _f(v, fmt="{:.3g}"):
    if v is None:
        return "—"
    if isinstance(v, float):
        return fmt.format(v)
    return str(v)


def _params(name: str, p: dict) -> str:
    if name in ("hnm_fwd_bwd", "infonce_fwd_bwd"):
        return f"N={p.get('N')} d={p.get('d')}"
    if name == "ddim_update":
        return f"{'x'.join(map(str, p.get('shape', [])))} eta={p.get('eta')} {'guided' if p.get('guided') else ''}".strip()
    if name.startswith("sample_"):
        return f"batch={p.get('batch')} {p.get('variant')} ({p.get('unet')})"
    if name == "trades_step":
        arch = p.get("arch") or p.get("model")
        return f"{arch} batch={p.get('batch')} K={p.get('attack_steps')} {p.get('variant')}"
    return ", ".join(f"{k}={v}" for k, v in p.items())


def _key_metric(r: dict, days: str = "GPU-days") -> str:
    m, n = r.get("metric", {}), r["name"]
    parts = []
    if n in ("hnm_fwd_bwd", "infonce_fwd_bwd"):
        if m.get("fused_tflops") is not None:
            parts.append(f"{m['fused_tflops']:.1f} TFLOP/s")
        if m.get("fused_pct_of_bound") is not None:
            parts.append(f"{m['fused_pct_of_bound']:.0f}% of bound")
        if m.get("compiled_reference_ms") is not None:
            parts.append(f"compiled ref {m['compiled_reference_ms']:.3g} ms (compile {m.get('compile_s', 0):.0f}s)")
        if m.get("reference_oom"):
            parts.append("reference OOM")
    elif n == "ddim_update":
        if m.get("fused_gb_s") is not None:
            parts.append(f"{m['fused_gb_s']:.0f} GB/s")
        if m.get("fused_pct_hbm") is not None:
            parts.append(f"{m['fused_pct_hbm']:.0f}% of HBM")
        if m.get("fused_graph_ms") is not None:
            parts.append(f"graph {m['fused_graph_ms']:.3g} ms")
    elif n.startswith("sample_"):
        if m.get("images_per_s") is not None:
            parts.append(f"{m['images_per_s']:.4g} img/s")
        if m.get("gpu_days_100M") is not None:
            parts.append(f"{m['gpu_days_100M']:.4g} {days}/100M")
        if m.get("reference_gpu_days_100M") is not None:
            parts.append(f"ref {m['reference_gpu_days_100M']:.4g} {days} ({m.get('reference_kind')})")
    elif n == "trades_step":
        if m.get("images_per_s") is not None:
            parts.append(f"{m['images_per_s']:.4g} img/s")
        if m.get("speedup_vs_original_trades") is not None:
            parts.append(f"{m['speedup_vs_original_trades']:.2f}x vs original TRADES code")
    if m.get("note") and not parts:
        parts.append(str(m["note"]))
    if m.get("warnings"):
        parts.append(f"{len(m['warnings'])} warning(s), see JSON")
    return "; ".join(parts)


def to_markdown(doc: dict) -> str:
    lines = [f"# cdp-fast benchmarks — {doc.get('device')}", "",
             f"- suite: `{doc.get('suite')}`, timestamp {doc.get('timestamp')}",
             f"- torch {doc.get('torch')}, triton {doc.get('triton')}"]
    tel = doc.get("telemetry") or {}
    if tel.get("nvml"):
        lines.append(f"- GPU: {tel.get('name')}, driver {tel.get('driver')}, max SM clock "
                     f"{tel.get('max_sm_clock_mhz')} MHz, power limit {_f(tel.get('power_limit_w'))} W")
    peaks = doc.get("device_peaks")
    if peaks:
        lines.append(f"- peaks used ({peaks.get('label')}): bf16 {peaks.get('bf16')} / tf32 {peaks.get('tf32')} "
                     f"TFLOP/s, HBM {peaks.get('hbm')} GB/s, exp {_f(doc.get('exp_peak_per_s'))}/s")
    tests = doc.get("tests")
    if isinstance(tests, dict):
        lines.append(f"- GPU tests (`pytest -m gpu`): {tests.get('status')}, passed {tests.get('passed')}, "
                     f"failed {tests.get('failed')}, errors {tests.get('errors')}, skipped {tests.get('skipped')}")
    lines.append(f"- wall time {_f(doc.get('wall_s'), '{:.0f}')} s (budget {_f(doc.get('budget_s'), '{:.0f}')} s)")
    days = "GPU-days" if doc.get("device_properties") else "device-days"
    lines += ["", "| benchmark | params | dtype | reference ms | ours ms | speedup | ref peak MB | our peak MB | key metrics |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in doc.get("results", []):
        spd = "—" if r.get("speedup") is None else f"{r['speedup']:.2f}×"
        lines.append("| " + " | ".join([
            r["name"], _params(r["name"], r.get("params", {})), r.get("dtype", ""),
            _f(r.get("reference_ms"), "{:.4g}"), _f(r.get("fused_ms"), "{:.4g}"), spd,
            _f(r.get("peak_mem_mb_reference"), "{:.1f}"), _f(r.get("peak_mem_mb_fused"), "{:.1f}"),
            _key_metric(r, days).replace("|", "/")]) + " |")
    if doc.get("errors"):
        lines += ["", "## Errors", ""]
        for e in doc["errors"]:
            lines.append(f"- `{e.get('name')}` {e.get('params')}: {str(e.get('error'))[:300]}")
    if doc.get("skipped"):
        lines += ["", "## Skipped", ""]
        for s in doc["skipped"]:
            lines.append(f"- `{s.get('name')}` {s.get('params')}: {s.get('reason')}")
    lines += ["", "Cost models, timing and projection rules: `benchmarks/README.md`.", ""]
    return "\n".join(lines)


def write(doc: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    from cdp_fast.utils import atomic_write_bytes, write_json

    out_dir = Path(out_dir)
    jp = write_json(out_dir / f"{stem}.json", sanitize(doc))
    mp = atomic_write_bytes(out_dir / f"{stem}.md", to_markdown(sanitize(doc)).encode())
    return jp, mp


def summary_lines(doc: dict, n: int = 10) -> list[str]:
    """At most ``n`` lines a person can read in a reply: device and versions, GPU tests, counts,
    one line per result (the best speedup first when they do not all fit), the first error."""
    res, errs, skipped = doc.get("results", []), doc.get("errors", []), doc.get("skipped", [])
    lines = [f"{doc.get('device')} | torch {doc.get('torch')} triton {doc.get('triton')} | suite "
             f"{doc.get('suite')} | {_f(doc.get('wall_s'), '{:.0f}')} s" + (" | PARTIAL (run cut short)"
                                                                          if doc.get("partial") else "")]
    t = doc.get("tests")
    if isinstance(t, dict):
        bad = ", ".join(t.get("failed_tests", [])[:3])
        lines.append(f"GPU tests: {t.get('status')} (passed {t.get('passed')}, failed {t.get('failed')}, "
                     f"errors {t.get('errors')}, skipped {t.get('skipped')})" + (f": {bad}" if bad else ""))
    lines.append(f"{len(res)} results, {len(errs)} errors, {len(skipped)} skipped")
    room = n - len(lines) - (1 if errs else 0)
    shown = res if len(res) <= room else sorted(res, key=lambda r: -(r.get("speedup") or 0))[:max(room - 1, 0)]
    for r in shown:
        spd = "" if r.get("speedup") is None else f" {r['speedup']:.2f}x vs ref"
        lines.append(f"{r['name']} {_params(r['name'], r.get('params', {}))} {r.get('dtype', '')}: "
                     f"{_f(r.get('fused_ms'), '{:.4g}')} ms{spd}; {_key_metric(r)}"[:200])
    if len(shown) < len(res):
        lines.append(f"... {len(res) - len(shown)} more results in the markdown table")
    if errs:
        e = errs[0]
        lines.append(f"first error: {e.get('name')} {e.get('params')}: {str(e.get('error'))[:150]}")
    return lines[:n]


def main(argv=None) -> int:
    """``python -m cdp_fast.benchmarks.report --summary RESULT.json``: the ten-line summary."""
    ap = argparse.ArgumentParser(prog="python -m cdp_fast.benchmarks.report")
    ap.add_argument("--summary", required=True, help="a results JSON written by the benchmark suite")
    ap.add_argument("-n", type=int, default=10, help="lines (default 10)")
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.summary).read_text())
    print("\n".join(summary_lines(doc, args.n)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
