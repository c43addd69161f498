#!/bin/bash
# Session 87: three builds of the row pair side by side: old (session 86: zeros in shared memory), pred (the mask
# under `edge` in one attend call: predicated masks on every tile), branch (the working tree: two attend calls).
# Each is installed with --target into /tmp/pkg_<v>; row_pair_ab.py then runs for each in rotation (the per-head
# column is the same kernel in all three: the in-process control). Carry: .scratch/s87, .scratch/s86, .scratch/s85,
# .scratch/s84/cutlass.tar.xz.
set -u
cd "$(dirname "$0")/../.." || exit 2
T0=$(date +%s)
nvidia-smi --query-gpu=name,serial --format=csv,noheader
[ -f .cutlass/include/cute/tensor.hpp ] || tar -xJf .scratch/s84/cutlass.tar.xz
ROOT=$PWD
for v in old pred branch; do
  rm -rf /tmp/tree_$v && mkdir -p /tmp/tree_$v
  cp -r $(ls -A | grep -v -E '^(\.git|\.scratch|\.cutlass|build.*)$') /tmp/tree_$v/ 2>/dev/null
  [ $v != branch ] && cp .scratch/s87/variants/$v/*.cuh /tmp/tree_$v/src/cuda/decode/
  (cd /tmp/tree_$v && FASTATTN_CUTLASS_DIR=$ROOT/.cutlass/include PATH=/usr/local/cuda/bin:$PATH CMAKE_BUILD_PARALLEL_LEVEL=16 \
    python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/pkg_$v . > $OUT/install_$v.log 2>&1)
  echo "install $v rc=$? $(( $(date +%s) - T0 ))s"
done
for s in 0 1 2; do
  for v in old pred branch; do
    PYTHONPATH=/tmp/pkg_$v timeout 60 python3 .scratch/s86/row_pair_ab.py --seed $s 2>&1 | grep -v -i warn > $OUT/ab_${v}_seed$s.log
    echo "== $v seed $s rc=$? $(( $(date +%s) - T0 ))s"
  done
done
python3 - <<'PY'
import os, re
out = os.environ["OUT"]
rows = {}
for f in sorted(os.listdir(out)):
    m = re.match(r"ab_(\w+)_seed(\d)\.log", f)
    if not m: continue
    for line in open(os.path.join(out, f)):
        c = [x.strip() for x in line.split("|")]
        if len(c) > 5 and c[1].startswith("GQA"):
            rows.setdefault(c[1], {}).setdefault(m.group(1), []).append((float(c[2]), float(c[4])))
print("| row | old pair µs (ratio) | pred | branch |")
for r, d in rows.items():
    print("| %s | %s |" % (r, " | ".join(" ".join("%.1f(%.3f)" % x for x in d.get(v, [])) for v in ("old", "pred", "branch"))))
PY
echo "== done in $(( $(date +%s) - T0 ))s"
