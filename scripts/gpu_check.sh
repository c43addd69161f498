#!/usr/bin/env bash
# The GPU check, for the H200 machine (16 cores, nvcc 13, PyTorch with CUDA, nanobind,
# scikit-build-core, pytest; no network). From the repository root there:
#   scripts/gpu_check.sh
# Before, here: scripts/vendor_cutlass_for_device.sh, and carry '.cutlass' with the call.
# Steps: C++ build with all cores (CUDA backend for sm_80 + sm_90a) and ctest; pip install of the
# package (no build isolation, no deps: nothing can be fetched there); pytest tests/gpu; the
# benchmark (`python -m fastattn.bench --device cuda --quick`). Prints a compact table last and,
# when $OUT is set, writes the full log, pytest's JUnit XML, the build report and the benchmark's
# JSON + PNG there.
#
# Environment: FASTATTN_JOBS (default: all cores), FASTATTN_CUTLASS_DIR (default .cutlass/include),
#              GPU_CHECK_CTEST=0 to skip ctest, GPU_CHECK_BENCH=0 to skip the benchmark,
#              BENCH_ARGS (extra benchmark arguments, e.g. "--suite prefill").
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
JOBS="${FASTATTN_JOBS:-$(nproc)}"
OUTDIR="${OUT:-}"
if [ -n "$OUTDIR" ]; then
  mkdir -p "$OUTDIR"
  exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1
export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
export FASTATTN_CUTLASS_DIR="${FASTATTN_CUTLASS_DIR:-$ROOT/.cutlass/include}"
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
declare -a SUMMARY=()
FAILED=0
record() {  # name status seconds [note]
  SUMMARY+=("$(printf '%-22s %-5s %7ss  %s' "$1" "$2" "$3" "${4:-}")")
  [ "$2" = "FAIL" ] && FAILED=1
  return 0
}

echo "== [gpu] machine =="
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true
nvcc --version | tail -2 || true
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "CUDA", torch.version.cuda, "| GPUs", torch.cuda.device_count())' || true

if [ ! -f "$FASTATTN_CUTLASS_DIR/cute/tensor.hpp" ]; then
  echo "ERROR: no CUTLASS headers at $FASTATTN_CUTLASS_DIR: run scripts/vendor_cutlass_for_device.sh" \
       "on the development machine and carry '.cutlass' with the call"
  exit 2
fi

# ---- 1. C++ build + ctest ------------------------------------------------------------------------
BUILD="$ROOT/build-gpu"
mkdir -p "$BUILD"
t=$(now)
if cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTATTN_CUDA=ON \
     -DFASTATTN_BUILD_TESTS=ON -DFASTATTN_CUTLASS_DIR="$FASTATTN_CUTLASS_DIR" >"$BUILD/gpu_check_configure.log" 2>&1 \
   || { cat "$BUILD/gpu_check_configure.log"; false; }; then
  grep "fastattn:" "$BUILD/gpu_check_configure.log" || true
  tc=$(now)
  if cmake --build "$BUILD" --target fastattn_cuda -j "$JOBS"; then
    T_CUDA=$(since "$tc")
    if cmake --build "$BUILD" -j "$JOBS"; then
      record "C++ build (-j$JOBS)" ok "$(since "$t")" "CUDA part ${T_CUDA}s"
      "$PY" scripts/cuda_build_report.py "$BUILD" --wall "$T_CUDA" \
        ${OUTDIR:+--json "$OUTDIR/cuda_build_report.json"} || true
    else
      record "C++ build (-j$JOBS)" FAIL "$(since "$t")"
    fi
  else
    record "C++ build (-j$JOBS)" FAIL "$(since "$t")" "CUDA backend failed to compile"
  fi
else
  record "C++ configure" FAIL "$(since "$t")"
fi
if [ "${GPU_CHECK_CTEST:-1}" = "1" ] && [ -f "$BUILD/CTestTestfile.cmake" ]; then
  t=$(now)
  if ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS" >"$BUILD/ctest.log" 2>&1; then
    record "ctest" ok "$(since "$t")" "$(grep -E 'tests passed' "$BUILD/ctest.log" | tail -1)"
  else
    tail -40 "$BUILD/ctest.log"
    record "ctest" FAIL "$(since "$t")" "$(grep -E 'tests passed|tests failed' "$BUILD/ctest.log" | tail -1)"
  fi
fi

# ---- 2. the Python package -----------------------------------------------------------------------
t=$(now)
if "$PY" -m pip install --no-build-isolation --no-deps --disable-pip-version-check -q . ; then
  record "pip install ." ok "$(since "$t")"
  PKG_OK=1
else
  record "pip install ." FAIL "$(since "$t")"
  PKG_OK=0
fi

# ---- 3. tests/gpu ---------------------------------------------------------------------------------
if [ "$PKG_OK" = "1" ]; then
  t=$(now)
  FASTATTN_REQUIRE_GPU=1 "$PY" -m pytest tests/gpu -q -p no:cacheprovider ${OUTDIR:+--junitxml="$OUTDIR/pytest_gpu.xml"} \
    2>&1 | tee "$BUILD/gpu_check_pytest.log"
  rc=${PIPESTATUS[0]}
  line="$(grep -E '(passed|failed|skipped|error)' "$BUILD/gpu_check_pytest.log" | tail -1 | tr -d '=')"
  if [ "$rc" -eq 0 ]; then record "pytest tests/gpu" ok "$(since "$t")" "$line"
  else record "pytest tests/gpu" FAIL "$(since "$t")" "$line"; fi
fi

# ---- 4. benchmark ---------------------------------------------------------------------------------
BENCH_TABLE=""
if [ "$PKG_OK" = "1" ] && [ "${GPU_CHECK_BENCH:-1}" = "1" ]; then
  t=$(now)
  BENCH_OUT="${OUTDIR:+$OUTDIR/bench}"
  BENCH_OUT="${BENCH_OUT:-$ROOT/bench/results}"
  # shellcheck disable=SC2086
  if "$PY" -m fastattn.bench --device cuda --quick --out "$BENCH_OUT" --table-file "$BUILD/gpu_check_bench_table.txt" \
       ${BENCH_ARGS:-}; then
    record "benchmark (quick)" ok "$(since "$t")" "results in $BENCH_OUT"
    BENCH_TABLE="$BUILD/gpu_check_bench_table.txt"
  else
    record "benchmark (quick)" FAIL "$(since "$t")"
  fi
fi

# ---- compact table last ---------------------------------------------------------------------------
echo
if [ -n "$BENCH_TABLE" ] && [ -f "$BENCH_TABLE" ]; then cat "$BENCH_TABLE"; echo; fi
echo "==================== fastattn GPU check ===================="
for l in "${SUMMARY[@]}"; do echo "$l"; done
if [ "$FAILED" = "0" ]; then echo "GPU CHECK PASSED"; else echo "GPU CHECK FAILED"; fi
exit "$FAILED"
