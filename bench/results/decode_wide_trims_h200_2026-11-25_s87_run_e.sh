#!/bin/bash
# Session 87: the final form of the wide-math change (5accddf: Q in registers in the row pair only). The GPU
# check, memcheck and racecheck over the row-pair sanitizer cases, then 306d070's build beside it and
# q_len_peers.py --no-flashinfer in rotation (new old old new), seeds 0 and 1. The GPU check's summary is printed
# last. Carry: .scratch/s87, .scratch/s85, .scratch/s84/cutlass.tar.xz.
set -u
cd "$(dirname "$0")/../.." || exit 2
T0=$(date +%s)
nvidia-smi --query-gpu=name,serial --format=csv,noheader | tee $OUT/machine.txt
[ -f .cutlass/include/cute/tensor.hpp ] || tar -xJf .scratch/s84/cutlass.tar.xz
OUT=$OUT/check GPU_CHECK_BENCH=0 FASTATTN_JOBS=16 bash scripts/gpu_check.sh > /dev/null 2>&1
echo "gpu_check rc=$? $(( $(date +%s) - T0 ))s" | tee -a $OUT/machine.txt
cp $OUT/check/gpu_check.log $OUT/gpu_check.log; rm -rf $OUT/check
OUT=$OUT/sanitize SANITIZE_SCRIPTS=decode SANITIZE_ARGS="--only pair:" SANITIZE_TIMEOUT=150 bash scripts/gpu_sanitize.sh > $OUT/sanitize.txt 2>&1
echo "sanitize rc=$? $(( $(date +%s) - T0 ))s"
ROOT=$PWD
rm -rf /tmp/tree_old && mkdir -p /tmp/tree_old
cp -r $(ls -A | grep -v -E '^(\.git|\.scratch|\.cutlass|build.*)$') /tmp/tree_old/ 2>/dev/null
rm -rf /tmp/tree_old/src && tar -xf .scratch/s87/variants/s86_src.tar -C /tmp/tree_old
(cd /tmp/tree_old && FASTATTN_CUTLASS_DIR=$ROOT/.cutlass/include PATH=/usr/local/cuda/bin:$PATH CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/pkg_old . > /dev/null 2>&1)
echo "install old rc=$? $(( $(date +%s) - T0 ))s"
mkdir -p /tmp/qj && rm -f /tmp/qj/*
n=0
for s in 0 1; do
  for v in new old old new; do
    n=$((n + 1))
    pp=""; [ $v = old ] && pp=/tmp/pkg_old
    PYTHONPATH=$pp timeout 60 python3 .scratch/s85/q_len_peers.py --no-flashinfer --seed $s --json /tmp/qj/q_${n}_${v}_seed$s.json > /dev/null 2>&1
    echo "== $n $v seed $s rc=$? $(( $(date +%s) - T0 ))s"
  done
done
python3 .scratch/s87/ab_table.py /tmp/qj > $OUT/ab_table.md
tar -cf $OUT/q_jsons.tar -C /tmp/qj .
echo "### rows flagged, and the row pair's"
grep -E "slower|faster|N=8 \|" $OUT/ab_table.md | grep -v "its N=1"
echo "### sanitizer"; tail -5 $OUT/sanitize/sanitize.txt 2>/dev/null || tail -5 $OUT/sanitize.txt
echo "### gpu check"; tail -6 $OUT/gpu_check.log; grep -E "^FAILED|^ERROR" $OUT/gpu_check.log | head -20
echo "== done in $(( $(date +%s) - T0 ))s"
