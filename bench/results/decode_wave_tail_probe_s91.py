"""Session 91: do the large multi-row calls lose their last partial wave? A probe, no change.

GQA 32/8, head_dim 128, pages of 16, bf16, through the decode wrapper (q_len_peers' pools and float32
reference). Per shape, the wrapper planned as usual ("plan") and with FlashInfer's fixed_split_size set to cut
every request into s equal parts (s = 1, 2, 3, 4, 5, 8, 9, 10, 12), timed interleaved (the suite's event timing).
Each variant's output is checked against the float32 reference (max abs error <= 2e-2) before it is timed.

    python wave_probe.py --seed S --json PATH
"""
import argparse
import json
import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "s85"))
import q_len_peers as Q  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

import fastattn  # noqa: E402

# (name, batch, length, N): the 16-row CTAs (two per SM) and the row pair (one per SM) at batch 128 / 8k,
# 1024 CTAs, 3.88 and 7.76 waves; batch 32 / 8k at 16 rows (256 CTAs, under one wave) as the control.
SHAPES = [("b128 L8k N=4", 128, 8192, 4), ("b128 L8k N=8", 128, 8192, 8), ("b32 L8k N=4", 32, 8192, 4)]
PARTS = (1, 2, 3, 4, 5, 8, 9, 10, 12)


def planned(pool, ws, n_rows, parts):
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    kw = {} if parts is None else {"fixed_split_size": -(-max(pool.lens) // Q.PS // parts)}
    w.plan(pool.indptr, pool.indices, pool.last, pool.hq, pool.hkv, Q.D, Q.PS, q_data_type=torch.bfloat16,
           kv_data_type=torch.bfloat16, sm_scale=Q.SCALE, q_len_per_req=n_rows, **kw)
    counts = w.split_counts
    desc = "num_splits %s" % w.num_splits if counts is None else "parts %d" % int(counts.sum())
    return w, desc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device=Q.DEV)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    out = {"gpu": torch.cuda.get_device_name(0), "seed": args.seed, "rows": []}
    for name, b, n, n_rows in SHAPES:
        lens = [n] * b
        kv_bytes = 2 * sum(lens) * 8 * Q.D * 2
        n_sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        pools = [Q.Pool(rng, lens, Q.HQ, 8) for _ in range(n_sets)]
        p0 = pools[0]
        ref = Q.reference(p0, p0.q(n_rows), n_rows)
        fns, descs, errs = {}, {}, {}
        for parts in (None,) + PARTS:
            key = "plan" if parts is None else "s=%d" % parts
            calls = []
            for p in pools:
                w, desc = planned(p, ws, n_rows, parts)
                calls.append(Q.call_ours(w, p, p.q(n_rows).clone()))
            descs[key] = desc
            errs[key] = Q.check(calls[0][0], calls[0][1], ref)
            assert errs[key] <= Q.TOL, (name, key, errs[key])
            fns[key] = L.rotating([fn for fn, _ in calls])
        del ref
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        us = {k: s["s"] * 1e6 for k, s in st.items()}
        rec = {"row": name, "sets": n_sets, "us": us, "plans": descs, "errs": errs,
               "tbps": {k: kv_bytes / (v * 1e-6) / 1e12 for k, v in us.items()}}
        out["rows"].append(rec)
        base = us["plan"]
        print("%s (%d sets): " % (name, n_sets) + "  ".join(
            "%s %.1f (%.3f; %s)" % (k, v, v / base, descs[k]) for k, v in us.items()), flush=True)
        del pools, fns
        torch.cuda.empty_cache()
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
