"""The benchmark suite's CPU smoke test: ``--suite quick`` runs every benchmark at tiny sizes and
writes a valid JSON document and a markdown table (no timing assertions)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from cdp_fast.benchmarks import report
from cdp_fast.benchmarks.__main__ import build_parser, main
from cdp_fast.benchmarks.device import device_peaks, sfu_exp_per_s, slugify
from cdp_fast.benchmarks.suite import BENCH_NAMES
from cdp_fast.benchmarks.timing import make_result


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    rc = main(["--suite", "quick", "--out", str(out)])
    assert torch.get_num_threads() == threads, "main() must restore the thread count"
    files = sorted(out.glob("*.json"))
    return rc, out, files


def test_quick_suite_writes_valid_json(quick_run):
    rc, out, files = quick_run
    assert rc == 0
    assert len(files) == 1, f"expected one JSON file in {out}, got {files}"
    assert files[0].name.endswith("-quick.json")
    doc = json.loads(files[0].read_text())  # strict JSON: json.loads rejects nothing, so check NaN below
    assert "NaN" not in files[0].read_text() and "Infinity" not in files[0].read_text()
    problems = report.validate(doc)
    assert not problems, "\n".join(problems)
    assert doc["suite"] == "quick"
    assert "partial" not in doc  # the per-case checkpoints were replaced by the final document
    assert isinstance(doc["torch"], str) and doc["torch"] == torch.__version__
    # every benchmark ran (none failed, none was skipped for the budget or a missing module)
    assert not doc["errors"], "benchmark errors:\n" + "\n".join(
        f"{e['name']} {e['params']}: {e['error']}\n{e.get('traceback', '')[-1500:]}" for e in doc["errors"])
    assert not doc["skipped"], f"skipped: {doc['skipped']}"
    names = {r["name"] for r in doc["results"]}
    assert names == set(BENCH_NAMES), f"missing: {set(BENCH_NAMES) - names}"
    for r in doc["results"]:
        assert r["reference_ms"] is not None and r["reference_ms"] > 0, r
        assert math.isclose(r["speedup"], r["reference_ms"] / r["fused_ms"], rel_tol=1e-9), r
        assert "telemetry" in r["metric"]


def test_quick_suite_numbers_are_consistent(quick_run):
    _, _, files = quick_run
    doc = json.loads(files[0].read_text())
    for r in doc["results"]:
        m = r["metric"]
        if r["name"] in ("hnm_fwd_bwd", "infonce_fwd_bwd"):
            # the fused path and the reference computed the same loss
            assert m["loss_rel_err"] < 1e-4, (r["name"], m["loss_fused"], m["loss_reference"])
            assert m["grad_rel_err"] < 1e-3, (r["name"], m["grad_rel_err"])
            assert m["flops"] > 0 and m["exps"] > 0
            # the correctness check compared non-zero gradients (issue 9: at T = 10 and N >= 16384
            # the ratio clamp binds everywhere and both gradients are exactly zero)
            assert m["check_reference_grad_norm"] > 0
            if r["name"] == "hnm_fwd_bwd":
                assert m["check_params"]["temperature"] == 0.1
        if r["name"] == "ddim_update" and r["params"]["eta"] == 0.0:
            assert m["rel_err_vs_eager"] < 1e-5, m["rel_err_vs_eager"]
        if r["name"].startswith("sample_"):
            assert m["images_per_s"] > 0 and m["gpu_days_100M"] > 0
            assert m["steps"] == 100
            assert m["guided_steps"] == (59 if r["name"] == "sample_guided" else 0)
        if r["name"] == "trades_step":
            assert m["images_per_s"] > 0


def test_quick_suite_markdown(quick_run):
    _, out, files = quick_run
    md = files[0].with_suffix(".md")
    assert md.is_file()
    text = md.read_text()
    assert text.startswith("# cdp-fast benchmarks")
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| benchmark")]
    doc = json.loads(files[0].read_text())
    assert len(rows) == len(doc["results"])
    for name in BENCH_NAMES:
        assert any(row.startswith(f"| {name} |") for row in rows), name


def test_only_and_bad_arguments(tmp_path):
    assert main(["--suite", "quick", "--out", str(tmp_path), "--only", "ddim_update"]) == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert {r["name"] for r in doc["results"]} == {"ddim_update"}
    with pytest.raises(SystemExit):
        main(["--suite", "nope"])
    if not torch.cuda.is_available():
        assert main(["--suite", "gpu", "--out", str(tmp_path)]) == 2


def test_list_prints_the_plan(capsys):
    assert main(["--suite", "gpu", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 20 and lines[0].startswith("P1")
    prios = [int(ln.split()[0][1:]) for ln in lines]
    assert prios == sorted(prios)
    names = {n for ln in lines for n in BENCH_NAMES if f" {n} " in ln}
    assert names == set(BENCH_NAMES)


def test_budget_skips_and_records(tmp_path):
    assert main(["--suite", "quick", "--out", str(tmp_path), "--budget-s", "0", "--only", "ddim_update"]) == 0
    doc = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert doc["results"] == [] and doc["skipped"]
    assert all(s["reason"].startswith("budget") for s in doc["skipped"])


def test_validate_catches_schema_errors():
    good = make_result("ddim_update", {"n": 1}, "fp32", reference_ms=2.0, fused_ms=1.0,
                       peak_mem_mb_reference=None, peak_mem_mb_fused=None, metric={})
    assert good["speedup"] == 2.0 and good["peak_mem_mb_fused"] == 0.0
    doc = {"device": "x", "torch": "t", "triton": "3", "timestamp": "now", "results": [good]}
    assert report.validate(doc) == []
    bad = dict(good, fused_ms=float("nan"))
    assert report.validate(dict(doc, results=[bad]))
    no_ref = make_result("x", {}, "fp32", reference_ms=None, fused_ms=1.0, peak_mem_mb_reference=None,
                         peak_mem_mb_fused=1.0, metric={})
    assert no_ref["speedup"] is None
    assert any("note" in p for p in report.validate(dict(doc, results=[no_ref])))
    assert report.validate({"device": 1})
    assert report.sanitize({"a": float("inf"), "b": (1, 2.5)}) == {"a": None, "b": [1, 2.5]}


def test_device_peak_table():
    h100 = device_peaks("NVIDIA H100 80GB HBM3")
    assert h100["label"] == "H100 SXM" and h100["hbm"] == 3350.0
    assert device_peaks("NVIDIA H100 PCIe")["label"] == "H100 PCIe"
    assert device_peaks("NVIDIA H200")["hbm"] == 4800.0
    assert device_peaks("NVIDIA A100-SXM4-80GB")["label"] == "A100 SXM 80GB"
    assert device_peaks("Some Other GPU") is None
    # 16 exp/clk/SM x 132 SMs x 1980 MHz
    assert math.isclose(sfu_exp_per_s(h100), 16 * 132 * 1980e6)
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_projection_uses_the_engines_guided_step_count():
    from cdp_fast.benchmarks.bench_sampling import STEPS, T_MIN, authors_guided_count
    from cdp_fast.guidance import ContrastiveGuidance
    from cdp_fast.sampler import DDIMSampler
    from cdp_fast.schedules import NoiseSchedule

    s = DDIMSampler(lambda x, t: x, NoiseSchedule.linear(1000), steps=STEPS,
                    guidance=ContrastiveGuidance("hnm", None, t_min=T_MIN))
    assert sum(s.guided_steps()) == authors_guided_count() == 59


def test_summary_is_ten_readable_lines(quick_run):
    _, _, files = quick_run
    doc = json.loads(files[0].read_text())
    lines = report.summary_lines(doc)
    assert 3 <= len(lines) <= 10
    assert lines[0].startswith(doc["device"])
    assert f"{len(doc['results'])} results" in "\n".join(lines)


@pytest.mark.slow
def test_device_script_staging_path(tmp_path):
    """benchmarks/device.sh without installing (the GPU machine's setuptools may be too old): the
    staged copy on PYTHONPATH imports, runs a suite and prints the summary."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CDP_FAST_FORCE_STAGE="1", CDP_DEVICE_SUITE="quick",
               CDP_DEVICE_ARGS="--only ddim_update", PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(root / "benchmarks" / "device.sh"), str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "mode=staged" in out and "/cdp_fast/kernels/__init__.py" in out
    assert "==================== summary" in out and "ddim_update" in out.split("summary")[-1]
    assert list(tmp_path.glob("*-quick.json")) and list(tmp_path.glob("*-quick.md"))


def test_bench_help_names_the_command_and_writes_under_the_current_folder(capsys):
    """`bench --help` said `python -m benchmarks` (not a command that exists once installed), and the
    default --out was inside the package's source checkout."""
    from cdp_fast.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: cdp-fast bench") and "python -m benchmarks" not in out
    args = build_parser().parse_args([])
    assert not Path(args.out).is_absolute() and Path(args.out) == Path("runs/bench")
