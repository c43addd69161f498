#!/usr/bin/env bash
# Installs the system packages the build needs when they are missing (Debian/Ubuntu, as root):
# a C++ compiler, CMake >= 3.24, Ninja, GoogleTest, Python's pip. Does nothing when all are present.
# The CUDA toolkit is optional: without nvcc the build is CPU-only.
set -euo pipefail
need_apt=()
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v ninja >/dev/null 2>&1 || need_apt+=(ninja-build)
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
"${PYTHON:-python3}" -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "missing: ${need_apt[*]} (no apt-get here: install them with your package manager)" >&2
    exit 1
  fi
  echo "== [deps] apt-get install ${need_apt[*]} =="
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi
cmake --version | head -1
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "nvcc found: the CUDA backend will be compiled"
else
  echo "nvcc not found: CPU-only build"
fi
