#!/bin/bash
# Session 87: the wide-math trims. The GPU check on the tree (eebcdfa's), then session 86's build (306d070: src
# carried as .scratch/s87/variants/s86_src.tar) installed with --target beside it, then q_len_peers.py
# --no-flashinfer for old and new in rotation (new, old, old, new), seeds 0 and 1.
# Carry: .scratch/s87, .scratch/s85, .scratch/s84/cutlass.tar.xz.
set -u
cd "$(dirname "$0")/../.." || exit 2
T0=$(date +%s)
nvidia-smi --query-gpu=name,serial --format=csv,noheader
[ -f .cutlass/include/cute/tensor.hpp ] || tar -xJf .scratch/s84/cutlass.tar.xz
OUT=$OUT/check GPU_CHECK_BENCH=0 FASTATTN_JOBS=16 bash scripts/gpu_check.sh > /dev/null 2>&1
echo "gpu_check rc=$? $(( $(date +%s) - T0 ))s"
tail -6 $OUT/check/gpu_check.log
grep -E "^FAILED|^ERROR|Error:" $OUT/check/gpu_check.log | head -30
ROOT=$PWD
rm -rf /tmp/tree_old && mkdir -p /tmp/tree_old
cp -r $(ls -A | grep -v -E '^(\.git|\.scratch|\.cutlass|build.*)$') /tmp/tree_old/ 2>/dev/null
rm -rf /tmp/tree_old/src && tar -xf .scratch/s87/variants/s86_src.tar -C /tmp/tree_old
(cd /tmp/tree_old && FASTATTN_CUTLASS_DIR=$ROOT/.cutlass/include PATH=/usr/local/cuda/bin:$PATH CMAKE_BUILD_PARALLEL_LEVEL=16 \
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/pkg_old . > $OUT/install_old.log 2>&1)
echo "install old rc=$? $(( $(date +%s) - T0 ))s"
n=0
for s in 0 1; do
  for v in new old old new; do
    n=$((n + 1))
    pp=""; [ $v = old ] && pp=/tmp/pkg_old
    PYTHONPATH=$pp timeout 60 python3 .scratch/s85/q_len_peers.py --no-flashinfer --seed $s --json $OUT/q_${n}_${v}_seed$s.json > /dev/null 2>&1
    echo "== $n $v seed $s rc=$? $(( $(date +%s) - T0 ))s"
  done
done
python3 .scratch/s87/ab_table.py $OUT | tee $OUT/ab_table.md
echo "== done in $(( $(date +%s) - T0 ))s"
