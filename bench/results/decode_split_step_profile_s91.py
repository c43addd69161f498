"""Session 91: where the first split's cost goes (a probe, no change). Per call, the attention kernel's and
the combine kernel's device time (torch.profiler, 30 calls after a warm-up, three input sets in rotation).

GQA 32/8, head_dim 128, pages of 16, bf16, through the decode wrapper with fixed_split_size cutting each
request into s parts (None: the plan's own count). Each variant's output is checked against the float32
reference first (max abs error <= 2e-2).

    python split_step_profile.py --seed S --json PATH
"""
import argparse
import collections
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "s85"))
import q_len_peers as Q  # noqa: E402
from wave_probe import planned  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402

# (name, batch, length, N, parts to profile)
SHAPES = [("b128 L8k N=4", 128, 8192, 4, (None, 1, 2, 4)), ("b32 L8k N=4", 32, 8192, 4, (None, 1, 2)),
          ("b128 L8k N=1", 128, 8192, 1, (None, 1, 2)), ("b1 L32k N=1", 1, 32768, 1, (None,)),
          ("b1 L32k N=4", 1, 32768, 4, (None,))]
CALLS = 30


def kernel_times(fn):
    """Mean device µs per call of each kernel name over CALLS calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    acc = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    return {k: v / CALLS for k, v in acc.items()}


def short(name):
    """The kernel's name and template arguments, without its namespace and parameter list."""
    name = name.replace("void ", "").replace("fastattn::cuda_decode::", "").replace("fastattn::cuda_prefill::", "")
    return name.split("(fastattn")[0].split("(DecodeParams")[0][:70]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device=Q.DEV)
    out = {"gpu": torch.cuda.get_device_name(0), "seed": args.seed, "rows": []}
    for name, b, n, n_rows, parts_list in SHAPES:
        lens = [n] * b
        pools = [Q.Pool(rng, lens, Q.HQ, 8) for _ in range(3)]
        ref = Q.reference(pools[0], pools[0].q(n_rows), n_rows)
        for parts in parts_list:
            calls, desc = [], None
            for p in pools:
                w, desc = planned(p, ws, n_rows, parts)
                calls.append(Q.call_ours(w, p, p.q(n_rows).clone()))
            err = Q.check(calls[0][0], calls[0][1], ref)
            assert err <= Q.TOL, (name, parts, err)
            state = {"i": 0}

            def fn():
                calls[state["i"] % 3][0]()
                state["i"] += 1
            G.rewarm_gpu(torch)
            kt = kernel_times(fn)
            rows = {short(k): round(v, 2) for k, v in kt.items()}
            rec = {"row": name, "parts": parts, "plan": desc, "kernels_us": rows, "err": err}
            out["rows"].append(rec)
            print("%-14s s=%-4s %-16s %s" % (name, parts, desc, "  ".join("%s %.1f" % kv for kv in rows.items())),
                  flush=True)
        del pools, ref
        torch.cuda.empty_cache()
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
