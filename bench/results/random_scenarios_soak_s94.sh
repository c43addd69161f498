#!/bin/bash
# Session 94: the decode wrapper's random scenarios (new), and a soak of every random-scenario test.
# Carry: .scratch/s94, .scratch/s84/cutlass.tar.xz.
set -u
cd "$(dirname "$0")/../.." || exit 2
T0=$(date +%s); mkdir -p /tmp/logs
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
[ -f .cutlass/include/cute/tensor.hpp ] || tar -xJf .scratch/s84/cutlass.tar.xz
FASTATTN_CUTLASS_DIR=$PWD/.cutlass/include PATH=/usr/local/cuda/bin:$PATH CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip install -q --no-deps --no-build-isolation . > /tmp/logs/install.log 2>&1
echo "install rc=$? $(( $(date +%s) - T0 ))s"
cd tests/gpu
run() {  # name timeout scenarios pytest-args...
  local name=$1 lim=$2 n=$3; shift 3
  local t=$(date +%s) left=$(( 570 - $(date +%s) + T0 ))
  [ $left -lt 25 ] && { echo "$name skipped (time)"; return; }
  [ $lim -gt $left ] && lim=$left
  FASTATTN_RANDOM_SCENARIOS=$n timeout $lim python3 -m pytest -q -p no:cacheprovider -rA "$@" > /tmp/logs/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - t ))s: $(tail -1 /tmp/logs/$name.log)"
  grep -E "^FAILED|random scenario|FASTATTN_TEST_SEED" /tmp/logs/$name.log | head -6
}
run wrapper_default 120 24 test_decode_wrapper_gpu.py -k random --durations=3
run wrapper_module 150 24 test_decode_wrapper_gpu.py
for i in 1 2; do run wrapper_soak$i 90 150 test_decode_wrapper_gpu.py -k random; done
run kvcache_soak 60 150 test_kvcache_gpu.py -k random_scenarios
run varlen_soak 40 150 test_varlen_decode_gpu.py -k random_scenarios
run prefill_soak 40 150 test_prefill.py -k random_scenarios
for i in 3 4; do run wrapper_soak$i 90 150 test_decode_wrapper_gpu.py -k random; done
tar -czf $OUT/logs.tgz -C /tmp logs
echo "total $(( $(date +%s) - T0 ))s"
