#!/usr/bin/env bash
# Copies the CUTLASS/CuTe headers of the pinned nvidia-cutlass pip package into .cutlass/include
# (git-ignored), so a machine without network (the GPU check machine) can build the CUDA backend:
#   scripts/vendor_cutlass_for_device.sh          # here, once
#   carry .cutlass; there: FASTATTN_CUTLASS_DIR=$PWD/.cutlass/include (scripts/gpu_check.sh sets it)
# Installs nvidia-cutlass==4.2.0.0 first if the Python here lacks it. ~27 MB of headers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
PIN="4.2.0.0"

src="$("$PY" -c 'import os, cutlass_library; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null || true)"
ver="$("$PY" -c 'import importlib.metadata as m; print(m.version("nvidia-cutlass"))' 2>/dev/null || true)"
if [ -z "$src" ] || [ ! -f "$src/cute/tensor.hpp" ] || [ "$ver" != "$PIN" ]; then
  "$PY" -m pip install -q "nvidia-cutlass==$PIN"
  src="$("$PY" -c 'import os, cutlass_library; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))')"
fi

dst=.cutlass/include
rm -rf .cutlass
mkdir -p "$dst"
cp -r "$src/cute" "$src/cutlass" "$dst/"
echo "nvidia-cutlass==$PIN" > .cutlass/VERSION
git check-ignore -q .cutlass || echo "WARNING: .cutlass is not git-ignored; add /.cutlass/ to .gitignore"
echo "CUTLASS $PIN headers copied to $dst ($(du -sh .cutlass | cut -f1)); carry '.cutlass' to the device"
