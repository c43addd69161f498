#!/usr/bin/env python3
"""Report what the CUDA part of a fastattn build cost: compile time per translation unit (from the
Ninja log) and the kernel instantiations per architecture (from cuobjdump), with registers and
spills. Used by scripts/ci_cpp.sh and scripts/gpu_check.sh so CI keeps an instantiation budget.

    python3 scripts/cuda_build_report.py BUILD_DIR [--json FILE] [--wall SECONDS]
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys


def find_cuobjdump():
    """cuobjdump from PATH, the CUDA toolkit, or the copy Triton's wheel carries."""
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    for root in (os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"):
        cand = os.path.join(root, "bin", "cuobjdump") if root else ""
        if cand and os.access(cand, os.X_OK):
            return cand
    try:
        import triton  # noqa: F401  (only to locate its bundled binaries)

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(cand, os.X_OK):
            return cand
    except Exception:
        pass
    return None


def ninja_cuda_times(build_dir):
    """{object path: seconds} for the last build of each .cu object in .ninja_log."""
    log = os.path.join(build_dir, ".ninja_log")
    times = {}
    if not os.path.exists(log):
        return times
    with open(log) as f:
        for line in f:
            if line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 4 and parts[3].endswith(".cu.o"):
                times[parts[3]] = (int(parts[1]) - int(parts[0])) / 1000.0
    return times


def kernels_per_arch(cuobjdump, objects):
    """{arch: [(kernel, regs, local_bytes)]} from `cuobjdump -res-usage`."""
    result = {}
    for obj in objects:
        out = subprocess.run([cuobjdump, "-res-usage", obj], capture_output=True, text=True).stdout
        arch = None
        name = None
        for line in out.splitlines():
            m = re.match(r"\s*arch = (\S+)", line)
            if m:
                arch = m.group(1)
                continue
            m = re.match(r"\s*Function (\S+):", line)
            if m:
                name = m.group(1)
                continue
            m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
            if m and name and arch:
                result.setdefault(arch, []).append((name, int(m.group(1)), int(m.group(4))))
                name = None
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_dir")
    ap.add_argument("--json", help="write the report here too")
    ap.add_argument("--wall", type=float, help="measured wall time of the CUDA build step, seconds")
    args = ap.parse_args()

    objects = sorted(glob.glob(os.path.join(args.build_dir, "**", "fastattn_cuda.dir", "**", "*.cu.o"),
                               recursive=True))
    if not objects:
        print("cuda build report: no CUDA objects in %s (CUDA backend not built)" % args.build_dir)
        return 0
    times = ninja_cuda_times(args.build_dir)
    tu_times = sorted(((t, p) for p, t in times.items()), reverse=True)
    total = sum(t for t, _ in tu_times)

    cuobjdump = find_cuobjdump()
    per_arch = kernels_per_arch(cuobjdump, objects) if cuobjdump else {}

    print("== CUDA build report ==")
    if args.wall is not None:
        print("CUDA part wall time: %.1f s" % args.wall)
    print("CUDA translation units: %d, compile time summed over TUs: %.1f s" % (len(objects), total))
    for t, p in tu_times[:5]:
        print("  %7.1f s  %s" % (t, p.split("fastattn_cuda.dir/")[-1]))
    if per_arch:
        for arch in sorted(per_arch):
            ks = per_arch[arch]
            spills = [k for k in ks if k[2] > 0]
            print("kernels for %s: %d (max %d registers; %d with local memory)"
                  % (arch, len(ks), max(k[1] for k in ks), len(spills)))
        n_inst = sum(len(v) for v in per_arch.values())
        print("kernel instantiations (all archs): %d" % n_inst)
    else:
        print("kernel instantiations: n/a (no cuobjdump found)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_s": args.wall, "tu_seconds": {p: t for t, p in tu_times}, "sum_tu_s": total,
                       "kernels": {a: [{"name": k[0], "regs": k[1], "local_bytes": k[2]} for k in v]
                                   for a, v in per_arch.items()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
