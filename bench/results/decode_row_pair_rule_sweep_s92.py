"""Session 92: the row pair (FASTATTN_DECODE_ROW_PAIR=1, "pair") against the plan's choice ("plan": 16-row CTAs
below 4096 keys) at short caches, for the row pair's rule. One process, interleaved (the suite's event timing).
GQA 32/8, pages of 16, bf16, through the decode wrapper (q_len_per_req = N): head_dim 128 at N = 5 and 8 (20 and
32 rows), batch 8, 16, 24, 32, 128, lengths 256-3072; head_dim 64 at N = 8, batch 16, 32, 128, 1k and 2k. Every
output is checked against the float32 reference (max abs error <= 2e-2) before timing.

    python pair_rule_sweep.py --seed S --json PATH
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

ROWS = ([(128, b, n, N) for N in (8, 5) for b in (8, 16, 24, 32, 128) for n in (256, 512, 1024, 2048, 3072)] +
        [(64, b, n, 8) for b in (16, 32, 128) for n in (1024, 2048)])
ENV = {"plan": {}, "pair": {"FASTATTN_DECODE_ROW_PAIR": "1"}}


def set_env(label):
    os.environ.pop("FASTATTN_DECODE_ROW_PAIR", None)
    os.environ.update(ENV[label])


def with_env(label, fn):
    def call():
        set_env(label)
        fn()
    return call


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
    for d, b, n, n_rows in ROWS:
        Q.D, Q.SCALE = d, 1.0 / math.sqrt(d)
        name = "D%d b%d L%d N=%d" % (d, b, n, n_rows)
        lens = [n] * b
        torch.cuda.empty_cache()
        kv_bytes = 2 * sum(lens) * 8 * d * 2
        n_sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        pools = [Q.Pool(rng, lens, Q.HQ, 8) for _ in range(n_sets)]
        ref = Q.reference(pools[0], pools[0].q(n_rows), n_rows)
        fns, errs, descs = {}, {}, {}
        for label in ENV:
            set_env(label)
            calls = []
            for p in pools:
                w, desc = Q.plan_ours(p, ws, n_rows)
                calls.append(Q.call_ours(w, p, p.q(n_rows).clone()))
            descs[label] = desc
            errs[label] = Q.check(with_env(label, calls[0][0]), calls[0][1], ref)
            assert errs[label] <= Q.TOL, (name, label, errs[label])
            fns[label] = with_env(label, L.rotating([fn for fn, _ in calls]))
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        set_env("plan")
        us = {k: s["s"] * 1e6 for k, s in st.items()}
        pair_ctas = b * 8  # one pair CTA per (sequence, KV head) at one split
        rec = {"row": name, "head_dim": d, "batch": b, "keys": n, "N": n_rows, "pair_ctas": pair_ctas,
               "plans": descs, "us": us, "errs": errs}
        out["rows"].append(rec)
        print("%-22s pair CTAs %5d  plan %8.1f  pair %8.1f  pair/plan %.4f  (%s; %s)" % (
            name, pair_ctas, us["plan"], us["pair"], us["pair"] / us["plan"], descs["plan"], descs["pair"]),
            flush=True)
        del ref, pools
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
