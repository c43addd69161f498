#!/bin/bash
# Session 88: the calibration scales. Installs the tree, runs the decode wrapper's GPU tests, installs
# FlashInfer 0.5.3 and times scales_peers.py. Carry: .scratch/s88, .scratch/s84/cutlass.tar.xz, .whl.
set -u
cd "$(dirname "$0")/../.." || exit 2
T0=$(date +%s)
nvidia-smi --query-gpu=name,serial --format=csv,noheader
SERIAL=$(nvidia-smi --query-gpu=serial --format=csv,noheader | head -1 | tr -dc '0-9A-Za-z')
[ -f .cutlass/include/cute/tensor.hpp ] || tar -xJf .scratch/s84/cutlass.tar.xz
FASTATTN_CUTLASS_DIR=$PWD/.cutlass/include PATH=/usr/local/cuda/bin:$PATH CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip install -q --no-deps --no-build-isolation . > $OUT/install.log 2>&1
echo "fastattn install rc=$? $(( $(date +%s) - T0 ))s"
(cd tests/gpu && timeout 200 python3 -m pytest -q -p no:cacheprovider test_decode_wrapper_gpu.py > $OUT/wrapper_tests.log 2>&1)
echo "wrapper tests rc=$? $(( $(date +%s) - T0 ))s"; tail -3 $OUT/wrapper_tests.log
(cd tests/gpu && timeout 60 python3 -m pytest -q -p no:cacheprovider test_decode_wrapper_gpu.py -k calibration -v 2>&1 | grep -E "PASS|FAIL" | head)
python3 -m pip install --no-deps -q .whl/*.whl > $OUT/fi_install.log 2>&1
echo "flashinfer install rc=$?"
export MAX_JOBS=16
left=$(( 585 - ($(date +%s) - T0) ))
timeout $left python3 .scratch/s88/scales_peers.py ${PEERS_ARGS:-} --json $OUT/scales_peers_${SERIAL}${PEERS_TAG:-}.json 2>&1 | grep -v -i warn > $OUT/scales_peers_${SERIAL}${PEERS_TAG:-}.log
echo "scales_peers rc=$? $(( $(date +%s) - T0 ))s"
cat $OUT/scales_peers_${SERIAL}${PEERS_TAG:-}.log | tail -20
