"""Proven for the GPU before it meets one (issue 9).

* The ahead-of-time compile gate (kernels/_aot.py, CI share): every kernel the public ops launch,
  with the launchers' own GPU tiles and flags, compiled for sm_90 / sm_80 by Triton's bundled
  ptxas; no compile error, no spill, shared memory within the per-block limit, half-precision dots
  on tensor cores. Runs in a subprocess without TRITON_INTERPRET (the kernels must be imported as
  compilable JIT functions). ``python -m cdp_fast.kernels._aot --full`` is the long version.
* Numerics mode: the GPU tiles (32/64-wide, whose masking the suite's 16-wide interpreter tiles
  never exercise) run through the interpreter in fp32 at odd sizes against the references.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cdp_fast.kernels import hnm_guided_ddim_update, hnm_loss, infonce_loss
from cdp_fast.kernels._backend import interpreting, triton_available
from cdp_fast.kernels.hnm_ref import hnm_guided_ddim_reference, hnm_loss_reference
from cdp_fast.kernels.infonce_ref import infonce_loss_reference

KERNELS = {"_hnm_fwd_kernel", "_hnm_bwd_kernel", "_hnm_bank_bwd_kernel", "_infonce_fwd_kernel",
           "_infonce_bwd_kernel", "_ddim_fwd_kernel",
           "_hnm_pixel_coef_kernel", "_hnm_pixel_gemm_kernel",   # the guided step at d = 3072 (_hnm_pixel.py)
           "_hnm_epilogue_kernel"}   # the HNM per-row epilogue (_hnm_epilogue.py, issue 14 item 6)
SMEM_LIMIT = {90: 232448, 80: 166912}

needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")


def _nvidia_tools() -> bool:
    if not triton_available():
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file()


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    if not _nvidia_tools():
        pytest.skip("this triton wheel bundles no CUDA tools (ptxas / cuobjdump)")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-m", "cdp_fast.kernels._aot", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    doc = json.loads(out.read_text()) if out.is_file() else None
    return proc, doc


@needs_triton
def test_aot_gate_compiles_every_kernel_without_spills(gate):
    proc, doc = gate
    assert doc is not None, f"the gate wrote no JSON:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert not doc["record_errors"], doc["record_errors"]
    units = doc["units"]
    assert {u["kernel"] for u in units} == KERNELS, "a kernel the public ops launch was not compiled"
    assert {u["arch"] for u in units} == {90, 80}
    assert {u["dtype"] for u in units} == {"fp32", "bf16", "fp16"}
    # every variant class the launchers produce in this share is present
    assert any(u["flags"].get("FUSED_DDIM") for u in units), "the fused DDIM epilogue was not compiled"
    for kern in ("_hnm_bwd_kernel", "_hnm_pixel_gemm_kernel"):   # the fused affine solver step, both paths
        assert any(u["flags"].get("AFFINE") for u in units if u["kernel"] == kern), kern
    assert any(u["flags"].get("WRITE_EPS") for u in units)
    assert any(u["flags"].get("BANK_COND") for u in units)
    assert {u["flags"].get("EXCL_DIAG") for u in units if u["kernel"] == "_infonce_bwd_kernel"} == {True, False}
    for u in units:
        name = f"{u['kernel']} sm_{u['arch']} {u['dtype']} {u['flags']}"
        assert not u.get("error"), f"{name}: {u['error']}"
        assert u["spill_stores"] == 0 and u["spill_loads"] == 0 and u["local"] == 0, f"{name} spills: {u}"
        assert u["smem"] <= SMEM_LIMIT[u["arch"]], f"{name}: shared memory {u['smem']}"
        assert u["regs"] * 32 * u["num_warps"] <= 65536, name
        if u["dtype"] != "fp32" and u["dots"]:
            assert u["fma_dots"] == 0 and u["tc_dots"] > 0, f"{name}: a half-precision dot is not on tensor cores"
            assert u["HGMMA" if u["arch"] == 90 else "HMMA"] > 0, f"{name}: no tensor-core instruction in SASS"
        if u["dtype"] == "fp32" and u["kernel"] not in ("_ddim_fwd_kernel", "_hnm_epilogue_kernel"):
            # the launchers' fp32 tiles (not the interpreter's 16-wide ones) were compiled
            assert u["tiles"]["BLOCK_R"] >= 32 and u["tiles"]["BLOCK_C"] >= 32, u["tiles"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "AOT GATE: PASS" in proc.stdout


@needs_triton
def test_aot_gate_counts_sass_instructions(gate):
    """The SASS counters are parsed from the real dumps: every kernel has instructions, the HNM
    forward issues its exps on the SFU (MUFU.EX2) inside its column loop, at least one per
    similarity entry, and the half-precision kernels' tensor-core instructions sit in loops."""
    proc, doc = gate
    assert doc is not None, proc.stderr[-3000:]
    for u in doc["units"]:
        name = f"{u['kernel']} sm_{u['arch']} {u['dtype']} {u['flags']}"
        assert u["insts"] > 100 and u["STG"] > 0, f"{name}: SASS counts not parsed: {u['insts']} insts"
        if u["kernel"] in KERNELS - {"_ddim_fwd_kernel", "_hnm_pixel_gemm_kernel"}:   # loops of exps (the
            # pixel path's GEMM only multiplies the coefficients its companion kernel wrote)
            assert u["loops"] >= 1 and u["loop_list"][0]["insts"] > 0, f"{name}: no loop found"
            assert u["MUFU_EX2"] > 0, f"{name}: no MUFU.EX2 in a kernel made of exps"
        if u["dtype"] != "fp32" and u["dots"] and u["arch"] == 90:
            assert any(lp["HGMMA"] for lp in u["loop_list"]), f"{name}: no HGMMA inside a loop"
    fwd = [u for u in doc["units"] if u["kernel"] == "_hnm_fwd_kernel"]
    assert fwd
    for u in fwd:
        # one exp per (row, column) entry at least, whatever the tiles: the count is per entry (if a
        # new loop structure moves exps out of the first outermost loop, sass_stats' rule must follow)
        assert u["EX2_per_elem"] is not None and u["EX2_per_elem"] >= 1.0, (u["tiles"], u["loop_list"])
    assert "MUFU.EX2" in proc.stdout and "EX2/elem" in proc.stdout   # in summary_table


def test_sass_stats_synthetic():
    """Loops are backward branches (nested ones each count; predicated ones too; the trailing
    self-branch is not a loop), NOPs are not counted, EX2 per entry uses the first outermost loop
    with exps."""
    from cdp_fast.kernels._aot import sass_stats

    sass = """
        Function : k
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   MUFU.RCP R5, R5 ;                      /* 0x0000000500057308 */
        /*0020*/                   FFMA.FTZ R2, R3, R4, R2 ;              /* 0x0 */
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;  /* 0x0 */
        /*0040*/                   LDG.E.128 R8, desc[UR6][R2.64] ;       /* 0x0 */
        /*0050*/              @!P2 BRA 0x30 ;                             /* 0x0 */
        /*0060*/                   MUFU.EX2 R27, R24 ;                    /* 0x0 */
        /*0070*/                   MUFU.EX2 R28, R25 ;                    /* 0x0 */
        /*0080*/                   FFMA R2, R3, R4, R2 ;                  /* 0x0 */
        /*0090*/               @P1 BRA 0x20 ;                             /* 0x0 */
        /*00a0*/                   MUFU.LG2 R9, R9 ;                      /* 0x0 */
        /*00b0*/                   MUFU.EX2 R9, R9 ;                      /* 0x0 */
        /*00c0*/                   STG.E desc[UR4][R2.64], R9 ;           /* 0x0 */
        /*00d0*/                   EXIT ;                                 /* 0x0 */
        /*00e0*/                   BRA 0xe0;                              /* 0x0 */
        /*00f0*/                   NOP;                                   /* 0x0 */
    """
    st = sass_stats(sass, threads=64, tile_elems=32)
    assert st["insts"] == 15                      # 16 lines minus the NOP
    assert st["MUFU"] == 5 and st["MUFU_EX2"] == 3 and st["MUFU_LG2"] == 1 and st["MUFU_RCP"] == 1
    assert st["FFMA"] == 2 and st["LDG"] == 1 and st["STG"] == 1 and st["ops"]["HGMMA"] == 1
    assert st["loops"] == 2
    outer, inner = st["loop_list"]
    assert (outer["start"], outer["end"], outer["depth"]) == ("0x20", "0x90", 0)
    assert (inner["start"], inner["end"], inner["depth"]) == ("0x30", "0x50", 1)
    assert outer["MUFU_EX2"] == 2 and outer["HGMMA"] == 1 and outer["FFMA"] == 2 and outer["insts"] == 8
    assert st["EX2_per_elem"] == 2 * 64 / 32      # 2 EX2 per iteration x 64 threads / 32 entries
    assert sass_stats(sass)["EX2_per_elem"] is None
    flat = sass_stats(sass.replace("@P1 BRA 0x20", "@P1 BRA 0xa0").replace("@!P2 BRA 0x30", "@!P2 BRA 0x60"))
    assert flat["loops"] == 0 and flat["EX2_per_elem"] is None   # forward branches are not loops


@needs_triton
def test_aot_kernels_filter_rejects_a_regex_matching_nothing():
    if not _nvidia_tools():
        pytest.skip("this triton wheel bundles no CUDA tools (ptxas / cuobjdump)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # records the CI share's launches (no compile) and names what it could have compiled
    proc = subprocess.run([sys.executable, "-m", "cdp_fast.kernels._aot", "--kernels", "^no_such_kernel$"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "matches none of the recorded kernels" in proc.stderr and "_hnm_fwd_kernel" in proc.stderr
    assert "[aot]" not in proc.stdout   # nothing was compiled


# ----------------------------------------------------------------------------------------------
# --full is complete: every flag combination a launcher can produce is recorded
# ----------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("pixel", [False, True], ids=["d<PIXEL_MIN_D", "d>=PIXEL_MIN_D"])
def test_full_plan_records_every_reachable_flag_combination(pixel, monkeypatch):
    """The FULL plans call the ops with the product of all their options; recorded (not run, not
    compiled) at one small dim, each kernel's option flags are exactly ``reachable_flags``: the
    product of the flags in the kernel's signature less the documented UNREACHABLE rules. A new
    constexpr flag, or an option the plans do not vary, fails here until --full covers it. The
    dims x dtypes x targets product of FULL does the rest (asserted below)."""
    from cdp_fast.kernels import _aot, _hnm_pixel, _tiles

    d = 32
    assert min(_aot.FULL[0].dims) < _hnm_pixel.PIXEL_MIN_D <= max(_aot.FULL[0].dims)   # both paths
    if pixel:   # the pixel-space path at a cheap d
        monkeypatch.setattr(_hnm_pixel, "PIXEL_MIN_D", d)
    for plan in _aot.FULL:   # every FULL plan varies every option
        assert {k: getattr(plan, k) for k in _aot._ALL_OPTIONS} == _aot._ALL_OPTIONS
        assert set(plan.dtypes) == set(_aot.DTYPES) and set(plan.targets) == {90, 80}
        assert plan.hnm == _aot.HNM_VARIANTS and set(plan.estimators) == {"hard", "easy"}
    assert _aot.FULL[0].ddim == "full" and set(_aot.FULL[0].infonce_modes) == {None, True}
    # pixel: the kernels of the pixel path only, whose flags do not depend on the DDIM / InfoNCE
    # ops, the alphas' forms or check (those are the other case's)
    plan = dataclasses.replace(_aot.FULL[0], dims=(d,), dtypes=("fp32",),
                               **(dict(ddim="none", infonce=False, guided_alphas=(("float", "float"),),
                                       checks=(True,)) if pixel else {}))
    with _tiles.gpu_tiles_in_interpreter():
        launches, errors = _aot.record(plan)
    assert not errors, errors[:3]
    recorded, kernels = collections.defaultdict(set), {}
    for launch in launches:
        name = _aot._python_fn(launch.kernel).__name__
        kernels[name] = launch.kernel
        recorded[name].add(_aot.launch_flags(launch))
    want = {"_hnm_fwd_kernel", "_hnm_bwd_kernel", "_hnm_bank_bwd_kernel", "_hnm_epilogue_kernel"}
    want |= {"_hnm_pixel_coef_kernel", "_hnm_pixel_gemm_kernel"} if pixel else {"_ddim_fwd_kernel"}
    assert want <= set(kernels), sorted(kernels)
    for name, kernel in sorted(kernels.items()):
        if pixel and name not in ("_hnm_pixel_coef_kernel", "_hnm_pixel_gemm_kernel", "_hnm_bwd_kernel"):
            continue
        reachable = _aot.reachable_flags(kernel, d)
        missing, extra = reachable - recorded[name], recorded[name] - reachable
        assert not missing, f"{name}: --full never launches {len(missing)} combinations, e.g. {sorted(missing)[:2]}"
        assert not extra, f"{name}: launched combinations a rule calls unreachable: {sorted(extra)[:2]}"
    assert len(reachable_of := _aot.reachable_flags(kernels["_hnm_fwd_kernel"], d)) == 15, reachable_of
    # 3 estimator paths x 5 negative sets: (easy | hard, b != 1 | hard, b = 1) x
    # (none | labels | bank | labels + bank | labels + bank + bank labels)


# ----------------------------------------------------------------------------------------------
# numerics mode: GPU tiles through the interpreter, odd sizes, fp32
# ----------------------------------------------------------------------------------------------
needs_interpreter = pytest.mark.skipif(not (interpreting() and triton_available()),
                                       reason="runs the GPU tiles in the Triton interpreter (TRITON_INTERPRET=1)")


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.fixture
def gpu_tiles():
    from cdp_fast.kernels import _tiles

    with _tiles.gpu_tiles_in_interpreter():
        cfg = _tiles.tile_config(100, torch.float32)
        assert cfg["BLOCK_C"] > 16 and cfg["BLOCK_DO"] == 128, cfg   # the GPU tiles are in force
        yield


@needs_interpreter
@pytest.mark.parametrize("d", [100, 200])   # 100: partial K and DO tiles; 200: two DO chunks
def test_gpu_tiles_hnm_numerics(d, gpu_tiles):
    g = torch.Generator().manual_seed(d)
    B, G, M = 36, 12, 37                      # 2G = 24 rows per group < BLOCK_R; M not a tile multiple
    a = F.normalize(torch.randn(B, d, generator=g), dim=1)
    p = F.normalize(a + 0.3 * torch.randn(B, d, generator=g), dim=1)
    bank = F.normalize(torch.randn(M, d, generator=g), dim=1)
    kw = dict(group_size=G, labels=torch.arange(B) % 3, bank_labels=torch.arange(M) % 2 + 1, temperature=0.5)
    for est in ("hard", "easy"):
        lt = [t.clone().requires_grad_(True) for t in (a, p, bank)]
        lr = [t.clone().requires_grad_(True) for t in (a, p, bank)]
        yt = hnm_loss(lt[0], lt[1], bank=lt[2], estimator=est, backend="triton", **kw)
        yr = hnm_loss_reference(lr[0], lr[1], bank=lr[2], estimator=est, **kw)
        assert _rel(yt, yr) < 1e-5, est
        for x, y in zip(torch.autograd.grad(yt, lt), torch.autograd.grad(yr, lr), strict=True):
            assert _rel(x, y) < 1e-4, est
    # pixel-space step: unnormalised x (|x| ~ 14 at d = 200); T = 1 (at T = 0.5 both the reference
    # and the kernels overflow exp(lse1 - lse0) in fp32 for some rows: NaN, see the issue notes)
    x, e = torch.randn(B, d, generator=g), torch.randn(B, d, generator=g)
    gk = dict(kw, temperature=1.0, bank=bank, scale=3.0, eta=0.5, noise=torch.randn(B, d, generator=g),
              clip_x0=1.0)
    xt = hnm_guided_ddim_update(x, e, 0.5, 0.6, p, backend="triton", **gk)
    xr = hnm_guided_ddim_reference(x, e, 0.5, 0.6, p, **gk)
    assert bool(torch.isfinite(xr).all())
    assert _rel(xt, xr) < 1e-5


@needs_interpreter
@pytest.mark.parametrize("M", [None, 37])
def test_gpu_tiles_infonce_numerics(M, gpu_tiles):
    g = torch.Generator().manual_seed(7)
    B, d = 45, 100
    q = torch.randn(B, d, generator=g)
    k = q + 0.5 * torch.randn(B, d, generator=g)
    n = None if M is None else torch.randn(M, d, generator=g)
    leaves = [q, k] + ([n] if n is not None else [])
    lt = [t.clone().requires_grad_(True) for t in leaves]
    lr = [t.double().requires_grad_(True) for t in leaves]   # fp64: the fp32 reference cancels at p_ii ~ 1
    yt = infonce_loss(lt[0], lt[1], negatives=lt[2] if M else None, backend="triton")
    yr = infonce_loss_reference(lr[0], lr[1], negatives=lr[2] if M else None)
    assert _rel(yt, yr) < 1e-4   # fp32 log-sum-exp in a different order
    for x, y in zip(torch.autograd.grad(yt, lt), torch.autograd.grad(yr, lr), strict=True):
        # fp32: the chain through the normalisation cancels (the gradient is nearly along q ~ k)
        assert _rel(x, y) < 3e-4


# ----------------------------------------------------------------------------------------------
# before/after comparison (benchmarks/sass_compare.py) on synthetic gate JSONs
# ----------------------------------------------------------------------------------------------
def _unit(kernel, cases, *, arch=90, dtype="bf16", ex2=36, per=2.25, insts=1000, hgmma=4, regs=128, spill=0):
    return dict(kernel=kernel, arch=arch, dtype=dtype, cases=cases, tiles={"BLOCK_R": 64, "BLOCK_C": 64},
                flags={}, regs=regs, smem=25600, spill_stores=spill, spill_loads=0, local=0, MUFU_EX2=ex2,
                EX2_per_elem=per, insts=insts, HGMMA=hgmma, HMMA=0, problems=[])


def _docs():
    hl, ic = "hnm_loss bf16 d=128 pow2 hard plain", "infonce_loss bf16 d=128 pow2 negatives=None"
    before = {"triton": "3.9.0", "targets": [90], "units": [
        _unit("_hnm_fwd_kernel", [hl]), _unit("_hnm_bwd_kernel", [hl], ex2=72, per=4.5, insts=2000),
        _unit("_infonce_fwd_kernel", [ic], ex2=16, per=1.0, insts=800),
        _unit("_infonce_bwd_rows_kernel", [ic, ic], ex2=16, per=1.0, insts=900),   # dq and dk: 2 launches
        _unit("_infonce_bwd_cols_kernel", [ic], ex2=16, per=1.0, insts=950),
    ]}
    after = {"triton": "3.9.0", "targets": [90], "units": [
        _unit("_hnm_fwd_kernel", [hl], ex2=18, per=1.125, insts=900, hgmma=8),
        _unit("_hnm_bwd_kernel", [hl], ex2=36, per=2.25, insts=1800, spill=8),
        _unit("_infonce_fwd_kernel", [ic], ex2=16, per=1.0, insts=800),
        _unit("_infonce_bwd_kernel", [ic], ex2=16, per=1.0, insts=1500),     # one backward kernel
        dict(kernel="_broken", arch=90, dtype="bf16", cases=[hl], error="CompilationError: x", problems=["x"]),
    ]}
    return before, after


def test_sass_compare_rows_and_op_sums():
    from cdp_fast.benchmarks.sass_compare import compare_rows, op_rows, render_table

    before, after = _docs()
    rows = {r["kernel"]: r for r in compare_rows(before, after)}
    fwd = rows["_hnm_fwd_kernel"]
    assert fwd["before"]["MUFU.EX2"] == 36 and fwd["after"]["MUFU.EX2"] == 18 and fwd["only"] is None
    assert fwd["before"]["EX2/elem"] == 2.25 and fwd["after"]["EX2/elem"] == 1.125
    assert rows["_hnm_bwd_kernel"]["after"]["spill B"] == 8
    assert rows["_infonce_bwd_cols_kernel"]["only"] == "before" and rows["_infonce_bwd_kernel"]["only"] == "after"
    assert rows["_infonce_bwd_rows_kernel #2"]["only"] == "before"      # the second launch of one op call
    assert "_broken" not in rows                                          # compile errors have no counts
    ops = {r["case"]: r for r in op_rows(before, after)}
    ic = ops["infonce_loss bf16 d=128 negatives=None"]
    assert ic["before"]["MUFU.EX2"] == 16 * 4 and ic["after"]["MUFU.EX2"] == 16 * 2
    assert ic["before"]["insts"] == 800 + 900 * 2 + 950 and ic["after"]["insts"] == 800 + 1500
    assert len(ic["kernels"]["before"]) == 4 and len(ic["kernels"]["after"]) == 2
    text = render_table(before, after)
    assert "36 → 18 (0.50x)" in text and "2.25 → 1.125 (0.50x)" in text and "(before only)" in text
    assert "triton 3.9.0" in text


def test_sass_compare_cli_writes_table_and_figure(tmp_path, capsys):
    from cdp_fast.benchmarks.sass_compare import main

    before, after = _docs()
    (tmp_path / "b.json").write_text(json.dumps(before))
    (tmp_path / "a.json").write_text(json.dumps(after))
    png, md = tmp_path / "fig" / "cmp.png", tmp_path / "cmp.md"
    assert main([str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--png", str(png), "--md", str(md)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "MUFU.EX2" in md.read_text() and "36 → 18" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps({"units": "nope"}))
    assert main([str(tmp_path / "bad.json"), str(tmp_path / "a.json")]) == 2
    assert "not a compile-gate JSON" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.json"), str(tmp_path / "a.json")]) == 2
    assert main([str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--kernels", "^_infonce_fwd"]) == 0
    out = capsys.readouterr().out
    assert "_infonce_fwd_kernel" in out and "_hnm_fwd_kernel" not in out
    assert main([str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--kernels", "^nothing$"]) == 2


# ----------------------------------------------------------------------------------------------
# cost model (benchmarks/cost_model.py, the README's table): issue 14's planned savings
# ----------------------------------------------------------------------------------------------
def test_cost_model_counts_and_planned_changes():
    from cdp_fast.benchmarks import cost_model as cm

    for N in (1024, 16384):
        d, B = 128, N // 2
        fwd, bwd = cm.hnm_fwd(N, d), cm.hnm_bwd_rows(N, d)
        assert fwd.flops + bwd.flops == 6 * N * N * d          # S, recomputed S, (G + G^T) Z
        assert fwd.exps + bwd.exps == 6 * N * N                 # two scales; both statistics in the backward
        b1 = cm.hnm_fwd(N, d, beta_one=True).exps + cm.hnm_bwd_rows(N, d, beta_one=True).exps
        assert b1 == 3 * N * N                                  # beta = 1 halves the exps
        inf_now = cm.infonce_fwd(B, d) + cm.infonce_bwd(B, d)
        inf_new = cm.infonce_fwd(B, d) + cm.infonce_bwd(B, d, one_kernel=True)
        assert (inf_now.flops, inf_now.exps) == (10 * B * B * d, 3 * B * B)
        assert (inf_new.flops, inf_new.exps) == (8 * B * B * d, 2 * B * B)
        # groups and a bank: entries N * (2G + M)
        assert cm.hnm_fwd(N, d, G=64, M=256).flops == 2 * d * N * (128 + 256)
    # the H100 bound at N = 16384, d = 128, bf16: exp-bound today, matmul-bound with beta = 1
    N, d = 16384, 128
    now = cm.bound(cm.hnm_fwd(N, d) + cm.hnm_bwd_rows(N, d), device="h100")
    new = cm.bound(cm.hnm_fwd(N, d, beta_one=True) + cm.hnm_bwd_rows(N, d, beta_one=True), device="h100")
    exp_peak = 16 * 132 * 1980e6
    assert now["limit"] == "exp" and abs(now["bound_us"] - 6 * N * N / exp_peak * 1e6) < 1e-6
    assert new["limit"] == "matmul" and abs(new["bound_us"] - 6 * N * N * d / 989.4e12 * 1e6) < 1e-6
    # pixel space: today's backward recomputes S and its exps once per 128-wide chunk (24x at 3072)
    px_now, px_new = cm.hnm_bwd_rows(1024, 3072, dtype="fp16"), cm.hnm_bwd_rows(1024, 3072, dtype="fp16", recompute=False)
    assert px_now.exps == 24 * px_new.exps and px_now.flops == (24 + 1) / 2 * px_new.flops
    # the fused step: backward for the anchors only, columns over all rows; x, eps, noise in, x_next out
    fz = cm.hnm_fused_ddim(N, d)
    assert fz.flops == cm.hnm_bwd_rows(N, d).flops / 2 and fz.bytes > cm.hnm_bwd_rows(N, d).bytes
    # DDIM: HBM bytes, and the issue bound once instructions per element are known
    st = cm.ddim_step(1000, insts_per_elem=236.0)
    assert st.bytes == 6000 and cm.bound(st, device="h100")["limit"] == "issue"
    assert cm.bound(cm.ddim_step(1000), device="h100")["limit"] == "hbm"
    with pytest.raises(ValueError, match="unknown device"):
        cm.bound(st, device="tpu")


def test_cost_model_reads_the_committed_baseline(capsys):
    from cdp_fast.benchmarks import cost_model as cm

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "sass_before.json"
    doc = json.loads(path.read_text())
    assert doc["triton"] and doc["targets"] == [80, 90] and "e823699" in doc["kernels_commit"]
    per = cm.ddim_insts_per_elem(doc, "bf16", 90)
    assert per is not None and per > 20                 # Philox + Box-Muller: far above the ~10 of the step
    assert cm.main(["--sass", str(path), "--N", "1024"]) == 0
    out = capsys.readouterr().out
    assert "(issue)" in out and "H100 SXM" in out and "| 1024 | HNM fwd |" in out
    # the after run (issue 14's kernels): 32-bit-counter Philox, fewer instructions per element
    after = json.loads(path.with_name("sass_after.json").read_text())
    per_after = cm.ddim_insts_per_elem(after, "bf16", 90)
    assert per_after is not None and per_after < per
    assert cm.main(["--sass", str(path), "--sass-after", str(path.with_name("sass_after.json")), "--N", "1024"]) == 0
    assert "DDIM step after" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cm.main(["--N", "1023"])
