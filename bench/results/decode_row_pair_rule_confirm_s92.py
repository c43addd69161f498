"""Session 92: the row pair's new rule ("new": the tree's plan, FASTATTN_DECODE_ROW_PAIR unset) against the old
one below 4096 keys ("old": FASTATTN_DECODE_ROW_PAIR=0, 16-row CTAs), on rows the rule sweep did not time.
One process, interleaved (the suite's event timing), pages of 16, bf16, head_dim 128, through the decode
wrapper (q_len_per_req = N): GQA 32/8 at N = 6 and 8, batch 17, 20, 48, 96 at 1k, 1.5k and 3k; below the rule's
bounds batch 16 / 1.5k and batch 128 / 768 at N = 8; GQA 32/4 at N = 4 (32 rows) batch 33 and 40. Every output
is checked against the float32 reference (max abs error <= 2e-2) before timing, and the kernel each ran is read
from the profiler.

    python pair_rule_confirm.py --seed S --json PATH
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

# (heads_kv, batch, keys, N)
ROWS = ([(8, b, n, N) for N in (8, 6) for b in (17, 20, 48, 96) for n in (1024, 1536, 3072)] +
        [(8, 16, 1536, 8), (8, 128, 768, 8), (4, 33, 1536, 4), (4, 40, 1024, 4), (4, 40, 2048, 4)])
# --rows third: the bound at 1.2 waves, on rows neither earlier run timed.
THIRD = [(8, 18, 1536, 8), (8, 18, 3072, 8), (8, 21, 1536, 8), (8, 21, 3072, 8), (8, 22, 1024, 6), (8, 22, 3072, 6),
         (8, 24, 2048, 7), (8, 64, 1024, 7), (4, 36, 1536, 4), (4, 36, 3072, 4), (4, 45, 1536, 4), (4, 45, 3072, 4)]
ENV = {"new": {}, "old": {"FASTATTN_DECODE_ROW_PAIR": "0"}}


def set_env(label):
    os.environ.pop("FASTATTN_DECODE_ROW_PAIR", None)
    os.environ.update(ENV[label])


def with_env(label, fn):
    def call():
        set_env(label)
        fn()
    return call


def kernels_of(fn):
    """The CUDA kernel names one call of fn launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rows", default="second", choices=("second", "third"))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device=Q.DEV)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    out = {"gpu": torch.cuda.get_device_name(0), "seed": args.seed, "rows": []}
    for hkv, b, n, n_rows in (THIRD if args.rows == "third" else ROWS):
        name = "GQA 32/%d b%d L%d N=%d" % (hkv, b, n, n_rows)
        lens = [n] * b
        torch.cuda.empty_cache()
        kv_bytes = 2 * sum(lens) * hkv * Q.D * 2
        n_sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        pools = [Q.Pool(rng, lens, Q.HQ, hkv) for _ in range(n_sets)]
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
        ran = {label: [k for k in kernels_of(fns[label]) if "decode_kernel" in k] for label in ENV}
        pair_ran = {label: any(", 1, 2>" in k for k in ks) for label, ks in ran.items()}
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        set_env("new")
        us = {k: s["s"] * 1e6 for k, s in st.items()}
        pair_ctas = b * hkv  # one pair CTA per (sequence, KV head) at one split
        rec = {"row": name, "heads_kv": hkv, "batch": b, "keys": n, "N": n_rows, "pair_ctas": pair_ctas,
               "plans": descs, "us": us, "errs": errs, "kernels": ran, "row_pair_ran": pair_ran}
        out["rows"].append(rec)
        print("%-24s pair CTAs %5d  new %8.1f  old %8.1f  new/old %.4f  row pair: new %d old %d  (%s; %s)" % (
            name, pair_ctas, us["new"], us["old"], us["new"] / us["old"], pair_ran["new"], pair_ran["old"],
            descs["new"], descs["old"]), flush=True)
        del ref, pools
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
