#!/bin/bash
# Session 89: the decode wrapper beside FlashInfer at the shapes the residency check moved. Installs the tree and
# FlashInfer 0.5.3 and times residency_peers.py. Carry: .scratch/s89, .scratch/s84/cutlass.tar.xz, .whl.
set -u
cd "$(dirname "$0")/../.." || exit 2
T0=$(date +%s)
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/gpu.txt
SERIAL=$(nvidia-smi --query-gpu=serial --format=csv,noheader | head -1 | tr -dc '0-9A-Za-z')
[ -f .cutlass/include/cute/tensor.hpp ] || tar -xJf .scratch/s84/cutlass.tar.xz
python3 -c "import fastattn, flashinfer" 2>/dev/null && [ "${REINSTALL:-1}" = 0 ] || \
FASTATTN_CUTLASS_DIR=$PWD/.cutlass/include PATH=/usr/local/cuda/bin:$PATH CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip install -q --no-deps --no-build-isolation . > $OUT/install.log 2>&1
echo "fastattn install rc=$? $(( $(date +%s) - T0 ))s"
python3 -m pip install --no-deps -q .whl/*.whl > $OUT/fi_install.log 2>&1
echo "flashinfer install rc=$?"
export MAX_JOBS=16
left=$(( 585 - ($(date +%s) - T0) ))
timeout $left python3 .scratch/s89/residency_peers.py ${PEERS_ARGS:-} --json $OUT/residency_peers_${SERIAL}${PEERS_TAG:-}.json 2>&1 | grep -v -i warn > $OUT/residency_peers_${SERIAL}${PEERS_TAG:-}.log
echo "residency_peers rc=$? $(( $(date +%s) - T0 ))s"
cat $OUT/residency_peers_${SERIAL}${PEERS_TAG:-}.log | tail -20
