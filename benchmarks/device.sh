#!/usr/bin/env bash
# One command for a short GPU slot (issue 9):  bash benchmarks/device.sh [OUT_DIR]
#
#   1. installs this checkout offline (pip --no-deps --no-build-isolation -e .); if that fails
#      (old setuptools, no network), stages a copy on PYTHONPATH with setup.py's mapping
#      (cdp_fast/, kernels/ -> cdp_fast/kernels, benchmarks/ -> cdp_fast/benchmarks, tests/);
#   2. prints versions and the GPU;
#   3. runs the GPU-only tests (among them fp32 HNM parity with CDP_FAST_FP32_DOT=tf32x3, issue 14:
#      the default stays "ieee" until it passes), then the benchmark suite (python -m cdp_fast.benchmarks --suite gpu),
#      which writes OUT_DIR/<device>-<date>.json/.md at the start and after every case;
#   4. ends with a ten-line summary.
# Hard budget: everything under 8 minutes (CDP_DEVICE_BUDGET_S, default 470 s).
# CDP_FAST_FORCE_STAGE=1 skips the install (tests the staging path); PYTHON picks the interpreter;
# CDP_DEVICE_SUITE=quick runs the CPU smoke suite instead (to test this script without a GPU);
# CDP_DEVICE_ARGS adds arguments to the suite (e.g. "--only ddim_update").
set -u
T0=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${1:-$ROOT/benchmarks/results}" && cd "${1:-$ROOT/benchmarks/results}" && pwd)
PY=${PYTHON:-python}
BUDGET=${CDP_DEVICE_BUDGET_S:-470}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
say() { echo "[device] $*"; }
unset TRITON_INTERPRET            # the real GPU path
export CDP_FAST_QUIET=1 PYTHONDONTWRITEBYTECODE=1

# ---- 1. install, or stage -----------------------------------------------------------------
MODE=installed
RUNDIR=$ROOT
if [ "${CDP_FAST_FORCE_STAGE:-0}" != 1 ] \
   && timeout 90 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" >/tmp/cdp_device_pip.log 2>&1 \
   && (cd /tmp && timeout 60 "$PY" -c "import cdp_fast.kernels.hnm, cdp_fast.benchmarks.suite") >>/tmp/cdp_device_pip.log 2>&1; then
    say "installed $ROOT (editable, offline)"
else
    [ "${CDP_FAST_FORCE_STAGE:-0}" = 1 ] || { say "pip install failed (tail of the log below); staging a copy"; tail -n 5 /tmp/cdp_device_pip.log; }
    MODE=staged
    STAGE=$(mktemp -d /tmp/cdp_stage.XXXXXX)
    cp -r "$ROOT/cdp_fast" "$STAGE/cdp_fast"
    rm -rf "$STAGE/cdp_fast/kernels" "$STAGE/cdp_fast/benchmarks"
    cp -r "$ROOT/kernels" "$STAGE/cdp_fast/kernels"
    cp -r "$ROOT/benchmarks" "$STAGE/cdp_fast/benchmarks"
    cp -r "$ROOT/tests" "$STAGE/tests"
    cp "$ROOT/pyproject.toml" "$STAGE/"          # pytest markers / options
    export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
    export CDP_FAST_TESTS_DIR="$STAGE/tests"
    RUNDIR=$STAGE                                # no ./cdp_fast of the checkout to shadow the copy
    say "staged at $STAGE (PYTHONPATH)"
fi
cd "$RUNDIR" || exit 1

# ---- 2. versions and GPU --------------------------------------------------------------------
timeout 60 "$PY" - <<'EOF'
import sys, platform
import torch
try:
    import triton
    tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"not importable ({type(e).__name__})"
import cdp_fast, cdp_fast.kernels
print(f"[device] python {platform.python_version()} torch {torch.__version__} (CUDA {torch.version.cuda}) triton {tv}")
print(f"[device] cdp_fast from {cdp_fast.__file__}; kernels from {cdp_fast.kernels.__file__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"[device] GPU {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)")
else:
    print("[device] no CUDA device: the GPU tests and the gpu suite will be skipped")
EOF
say "mode=$MODE, $(( $(date +%s) - T0 )) s spent"

# ---- 3. GPU tests + benchmark suite (the suite runs the tests first and keeps a budget) ----
RC=0
SUITE=${CDP_DEVICE_SUITE:-gpu}
if [ "$SUITE" != gpu ] || "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    SUITE_BUDGET=$(( $(left) - 25 ))             # room for the summary and the kill margin
    say "benchmark suite $SUITE: budget ${SUITE_BUDGET} s -> $OUT"
    timeout --kill-after=10 $(( SUITE_BUDGET + 15 )) "$PY" -m cdp_fast.benchmarks --suite "$SUITE" \
        --out "$OUT" --budget-s "$SUITE_BUDGET" ${CDP_DEVICE_ARGS:-} || RC=$?
    [ $RC -eq 124 ] && say "the suite hit the hard time limit; the last checkpoint files remain"
else
    say "skipping the GPU tests and the gpu suite (no CUDA)"
    RC=3
fi

# ---- 4. ten-line summary ---------------------------------------------------------------------
echo "==================== summary ($(( $(date +%s) - T0 )) s, mode $MODE) ===================="
LATEST=$(ls -t "$OUT"/*.json 2>/dev/null | head -n 1)
if [ -n "$LATEST" ] && [ $RC -ne 3 ]; then
    timeout 30 "$PY" -m cdp_fast.benchmarks.report --summary "$LATEST" -n 10
    echo "files: $LATEST (+ .md)"
else
    echo "no GPU results (rc $RC); cdp_fast imported and ran in mode $MODE"
fi
exit $RC
