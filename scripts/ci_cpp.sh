#!/usr/bin/env bash
# C++ side of the test suite: configure + build (Ninja, Release, CUDA backend compiled when nvcc is
# found), run the GoogleTest suite through ctest, install to a temporary prefix, then build and run
# examples/cpp against that install through find_package(fastattn).
#
# Environment: FASTATTN_BUILD_DIR (default build-ci), FASTATTN_JOBS (default 2),
#              FASTATTN_CUDA (default ON), CMAKE_ARGS (extra configure arguments).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${FASTATTN_BUILD_DIR:-$ROOT/build-ci}"
JOBS="${FASTATTN_JOBS:-2}"
CUDA="${FASTATTN_CUDA:-ON}"
PREFIX="$(mktemp -d "${TMPDIR:-/tmp}/fastattn-install.XXXXXX")"
trap 'rm -rf "$PREFIX"' EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
GENERATOR=(-G Ninja)
command -v ninja >/dev/null 2>&1 || GENERATOR=()

echo "== [cpp] configure ($BUILD, CUDA=$CUDA) =="
t=$(now)
# shellcheck disable=SC2086
cmake -S "$ROOT" -B "$BUILD" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DFASTATTN_CUDA="$CUDA" -DFASTATTN_BUILD_TESTS=ON -DFASTATTN_BUILD_EXAMPLES=OFF ${CMAKE_ARGS:-}
T_CONFIGURE=$(since "$t")

T_CUDA="n/a"
if grep -qs "fastattn_cuda" "$BUILD/build.ninja" "$BUILD/CMakeFiles/Makefile2"; then
  echo "== [cpp] build the CUDA backend (-j$JOBS) =="
  t=$(now)
  cmake --build "$BUILD" --target fastattn_cuda -j "$JOBS"
  T_CUDA=$(since "$t")
fi

echo "== [cpp] build library, tests, benchmark (-j$JOBS) =="
t=$(now)
cmake --build "$BUILD" -j "$JOBS"
T_BUILD=$(since "$t")

echo "== [cpp] ctest =="
t=$(now)
CTEST_RC=0
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS" || CTEST_RC=$?
T_CTEST=$(since "$t")
# A test failure is reported at the end; the install and the example still run.

echo "== [cpp] install to $PREFIX, build examples/cpp against it =="
t=$(now)
cmake --install "$BUILD" --prefix "$PREFIX" >/dev/null
cmake -S "$ROOT/examples/cpp" -B "$BUILD/example-installed" "${GENERATOR[@]}" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX"
cmake --build "$BUILD/example-installed" -j "$JOBS"
"$BUILD/example-installed/attention_example"
T_EXAMPLE=$(since "$t")

if [ "$T_CUDA" != "n/a" ]; then
  python3 "$ROOT/scripts/cuda_build_report.py" "$BUILD" --wall "$T_CUDA" \
    --json "$BUILD/cuda_build_report.json" || true
fi
echo "== [cpp] times (s): configure $T_CONFIGURE, CUDA backend $T_CUDA, rest of build $T_BUILD, ctest $T_CTEST, install+example $T_EXAMPLE =="
if [ "$CTEST_RC" -ne 0 ]; then
  echo "== [cpp] ctest FAILED (exit code $CTEST_RC) =="
  exit "$CTEST_RC"
fi
