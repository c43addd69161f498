#!/usr/bin/env bash
# Installs what the benchmark needs and runs the main job:
#   ./scripts/bench.sh [benchmark arguments, e.g. --quick --suite prefill]
# = pip install -r requirements-test.txt (+ torch for the PyTorch column unless FASTATTN_BENCH_TORCH=0),
#   pip install . (CUDA backend compiled when nvcc is found; FASTATTN_CUDA=0 to skip it),
#   python -m fastattn.bench "$@" (table on stdout; JSON + PNG into bench/results/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export CMAKE_BUILD_PARALLEL_LEVEL="${FASTATTN_JOBS:-2}"
PYTHON="$PY" bash scripts/install_system_deps.sh
"$PY" -m pip install --disable-pip-version-check -q -r requirements-test.txt
if [ "${FASTATTN_BENCH_TORCH:-1}" = "1" ] && ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --disable-pip-version-check -q -r requirements-torch.txt
fi
"$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps .
exec "$PY" -m fastattn.bench "$@"
