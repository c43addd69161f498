#!/bin/bash
# Session 87: which of the wide-math trims costs the small 16-row rows. Three builds, each installed with --target:
# old (306d070's src), skip (eebcdfa with Q re-loaded every tile: the rescale skip alone), pairq (eebcdfa with Q
# in registers in the row pair only). q_len_peers.py --no-flashinfer in rotation, seeds 0 and 1.
# Carry: .scratch/s87, .scratch/s85, .scratch/s84/cutlass.tar.xz.
set -u
cd "$(dirname "$0")/../.." || exit 2
T0=$(date +%s)
nvidia-smi --query-gpu=name,serial --format=csv,noheader
[ -f .cutlass/include/cute/tensor.hpp ] || tar -xJf .scratch/s84/cutlass.tar.xz
ROOT=$PWD
for v in old skip pairq; do
  tarball=.scratch/s87/variants/${v}_src.tar; [ $v = old ] && tarball=.scratch/s87/variants/s86_src.tar
  rm -rf /tmp/tree_$v && mkdir -p /tmp/tree_$v
  cp -r $(ls -A | grep -v -E '^(\.git|\.scratch|\.cutlass|build.*)$') /tmp/tree_$v/ 2>/dev/null
  rm -rf /tmp/tree_$v/src && tar -xf $tarball -C /tmp/tree_$v
  (cd /tmp/tree_$v && FASTATTN_CUTLASS_DIR=$ROOT/.cutlass/include PATH=/usr/local/cuda/bin:$PATH CMAKE_BUILD_PARALLEL_LEVEL=16 \
    python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/pkg_$v . > $OUT/install_$v.log 2>&1)
  echo "install $v rc=$? $(( $(date +%s) - T0 ))s"
done
n=0
for s in 0 1; do
  for v in skip pairq old old pairq skip; do
    n=$((n + 1))
    PYTHONPATH=/tmp/pkg_$v timeout 60 python3 .scratch/s85/q_len_peers.py --no-flashinfer --seed $s --json $OUT/q_${n}_${v}_seed$s.json > /dev/null 2>&1
    echo "== $n $v seed $s rc=$? $(( $(date +%s) - T0 ))s"
  done
done
for v in skip pairq; do
  mkdir -p $OUT/pair_$v
  for f in $OUT/q_*_old_seed*.json $OUT/q_*_${v}_seed*.json; do
    cp $f $OUT/pair_$v/$(basename $f | sed "s/_${v}_/_new_/")
  done
  echo "### old against $v"
  python3 .scratch/s87/ab_table.py $OUT/pair_$v | grep -E "slower|faster|N=4 \||N=8 \|" | grep -v "its N=1" 
done
tar -cf $OUT/q_jsons.tar -C $OUT $(cd $OUT && ls q_*.json) && rm -f $OUT/q_*.json && rm -rf $OUT/pair_*
echo "== done in $(( $(date +%s) - T0 ))s"
