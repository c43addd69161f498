#!/usr/bin/env bash
# Installs what the tests need and runs every test fastattn has on this machine:
#   1. system packages when missing (scripts/install_system_deps.sh), Python packages from requirements-test.txt (+ requirements-torch.txt unless FASTATTN_TEST_TORCH=0)
#   2. C++: build (CUDA backend compiled when nvcc is found), ctest, install, examples/cpp against
#      the install (scripts/ci_cpp.sh)
#   3. pip install . (the Python package, built by the same CMake)
#   4. pytest tests/python tests/gpu (tests/gpu skips without a GPU)
# and prints a summary with the time of each step.
#
# Environment: PYTHON (default python3), FASTATTN_JOBS (default 2), FASTATTN_TEST_TORCH (default 1),
#              FASTATTN_SKIP_PIP=1 to use the packages already installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python3}"
export FASTATTN_JOBS="${FASTATTN_JOBS:-2}"
export CMAKE_BUILD_PARALLEL_LEVEL="$FASTATTN_JOBS"  # also bounds the build inside `pip install .`
T0=$(date +%s)

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
declare -a SUMMARY=()
FAILED=0
step_done() {  # name status seconds
  SUMMARY+=("$(printf '%-36s %-5s %8ss' "$1" "$2" "$3")")
  [ "$2" = "FAIL" ] && FAILED=1
  return 0
}
finish() {
  local rc=$?
  [ "$FAILED" = "1" ] && [ "$rc" -eq 0 ] && rc=1
  echo
  echo "==================== fastattn test summary ===================="
  local line
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  echo "total: $(( $(date +%s) - T0 )) s"
  if [ "$rc" -eq 0 ]; then echo "ALL TESTS PASSED"; else echo "FAILED (exit code $rc)"; fi
  exit "$rc"
}
trap finish EXIT
# Stopped by a signal (a CI timeout, Ctrl-C): a failure, whatever the last step's status was (the
# summary said ALL TESTS PASSED after an interrupted build before this).
interrupted() {
  step_done "interrupted by SIG$1" FAIL 0
  exit "$2"
}
trap 'interrupted INT 130' INT
trap 'interrupted TERM 143' TERM
trap 'interrupted HUP 129' HUP

# ---- 1. Python packages (a failure here stops everything) -----------------------------------------
t=$(now)
if [ "${FASTATTN_SKIP_PIP:-0}" != "1" ]; then
  PYTHON="$PY" bash scripts/install_system_deps.sh
  echo "== [deps] pip install -r requirements-test.txt =="
  "$PY" -m pip install --disable-pip-version-check -q -r requirements-test.txt
  if [ "${FASTATTN_TEST_TORCH:-1}" = "1" ]; then
    if "$PY" -c "import torch" >/dev/null 2>&1; then
      echo "== [deps] torch $("$PY" -c 'import torch; print(torch.__version__)') already installed =="
    else
      echo "== [deps] pip install -r requirements-torch.txt (CPU use; ~3 GB) =="
      "$PY" -m pip install --disable-pip-version-check -q -r requirements-torch.txt
    fi
  fi
fi
step_done "python dependencies" ok "$(since "$t")"

# From here on every step runs; failures are collected and reported in the summary.
# ---- 2. C++ build, tests, install, example ------------------------------------------------------
t=$(now)
if FASTATTN_CUDA="${FASTATTN_CUDA:-ON}" PYTHON="$PY" bash scripts/ci_cpp.sh; then
  step_done "C++ build + ctest + install/example" ok "$(since "$t")"
else
  step_done "C++ build + ctest + install/example" FAIL "$(since "$t")"
fi

# ---- 3. the Python package ---------------------------------------------------------------------
t=$(now)
echo "== [python] pip install . =="
# The build requirements are installed in step 1, so no isolated build environment is needed;
# scikit-build-core keeps its build tree (pyproject build-dir), so a second run only relinks.
if "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps .; then
  step_done "pip install ." ok "$(since "$t")"
else
  step_done "pip install ." FAIL "$(since "$t")"
  exit 1
fi

# ---- 4. pytest -----------------------------------------------------------------------------------
t=$(now)
echo "== [python] pytest tests/python tests/gpu =="
set +e
(cd "$ROOT" && "$PY" -m pytest tests/python tests/gpu -q)
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  # pytest's "no tests collected": not an error of the code under test, but say so loudly.
  echo "WARNING: pytest collected no tests (exit code 5)"
  step_done "pytest (no tests collected)" ok "$(since "$t")"
elif [ "$rc" -ne 0 ]; then
  step_done "pytest" FAIL "$(since "$t")"
else
  step_done "pytest" ok "$(since "$t")"
fi
