"""Session 93: the row pair's bound at 1.2 waves and 1024 slots ("new": the tree's plan, FASTATTN_DECODE_ROW_PAIR
unset) against the 4096-slot bound below 4096 keys ("old": FASTATTN_DECODE_ROW_PAIR=0, the 16-row CTAs), over
the whole range the bound moves, on rows no earlier run timed.

Grid A (the rule's test): GQA 32/8, head_dim 128, pages of 16, N = 5 and 8 (20 and 32 rows), batch 24, 40, 80
and 160 (1.45, 2.4, 4.8 and 9.7 waves of pair CTAs) at 1024, 1792, 2560 and 3840 keys. B: head_dim 64, GQA 64/8
(N = 3 and 4), pages of 64, and ragged batches (lengths drawn uniformly, the longest at least 1024). C, not
moved: batch 16 / 2k (under a wave) and batch 128 / 1000 keys (under 1024).
One process, interleaved (the suite's event timing), bf16, through the decode wrapper (q_len_per_req = N).
Every output is checked against the float32 reference (max abs error <= 2e-2) before timing, and the kernel
each ran is read from the profiler.

    python pair_rule_range.py --seed S --json PATH [--part 0|1|all]
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


def row(group, hq, hkv, batch, keys, n, d=128, ps=16, ragged=None):
    """keys: the uniform length, or with ragged=(lo, hi) the longest (the others drawn from lo..hi)."""
    return dict(group=group, hq=hq, hkv=hkv, batch=batch, keys=keys, N=n, D=d, PS=ps, ragged=ragged)


ROWS = ([row("A", 32, 8, b, k, n) for n in (8, 5) for b in (24, 40, 80, 160) for k in (1024, 1792, 2560, 3840)] +
        [row("B", 32, 8, b, k, 8, d=64) for b in (40, 160) for k in (1536, 3584)] +
        [row("B", 64, 8, 30, 2048, 3), row("B", 64, 8, 100, 1280, 3), row("B", 64, 8, 30, 2048, 4),
         row("B", 64, 8, 100, 1280, 4)] +
        [row("B", 32, 8, 64, 1024, 8, ps=64), row("B", 32, 8, 64, 3072, 8, ps=64)] +
        [row("B", 32, 8, 64, 2048, 8, ragged=(64, 2048)), row("B", 32, 8, 128, 1100, 8, ragged=(32, 1100)),
         row("B", 32, 8, 48, 3500, 8, ragged=(512, 3500)), row("B", 32, 8, 128, 1500, 5, ragged=(100, 1500))] +
        [row("C", 32, 8, 16, 2048, 8), row("C", 32, 8, 128, 1000, 8)])
ENV = {"new": {}, "old": {"FASTATTN_DECODE_ROW_PAIR": "0"}}


def moved(r, sms):
    """Whether the 1.2-wave bound moves r to the row pair (the old bound, 4096 slots, never does here)."""
    slots = -(-r["keys"] // r["PS"]) * r["PS"]
    rows = r["hq"] // r["hkv"] * r["N"]
    return (16 < rows <= 32 and r["D"] <= 128 and slots >= 1024 and slots < 4096 and
            r["batch"] * r["hkv"] >= 1.2 * sms)


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


def lengths(rng, r):
    if r["ragged"] is None:
        return [r["keys"]] * r["batch"]
    lo, hi = r["ragged"]
    lens = [rng.randint(lo, hi) for _ in range(r["batch"])]
    lens[rng.randrange(r["batch"])] = hi  # the longest is the row's keys
    return lens


def name_of(r):
    shape = "GQA %d/%d D%d PS%d b%d" % (r["hq"], r["hkv"], r["D"], r["PS"], r["batch"])
    keys = "L%d" % r["keys"] if r["ragged"] is None else "L%d-%d" % tuple(r["ragged"])
    return "%s %s %s N=%d" % (r["group"], shape, keys, r["N"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--part", default="all", choices=("0", "1", "all"))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device=Q.DEV)
    props = torch.cuda.get_device_properties(0)
    l2, sms = props.L2_cache_size, props.multi_processor_count
    rows = ROWS if args.part == "all" else ROWS[int(args.part)::2]
    out = {"gpu": torch.cuda.get_device_name(0), "seed": args.seed, "sms": sms, "rows": []}
    for r in rows:
        Q.D, Q.PS, Q.SCALE = r["D"], r["PS"], 1.0 / math.sqrt(r["D"])
        name = name_of(r)
        lens = lengths(rng, r)
        n_rows = r["N"]
        torch.cuda.empty_cache()
        kv_bytes = 2 * sum(lens) * r["hkv"] * Q.D * 2
        n_sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        pools = [Q.Pool(rng, lens, r["hq"], r["hkv"]) for _ in range(n_sets)]
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
        rec = dict(r, row=name, moved=moved(r, sms), pair_ctas=r["batch"] * r["hkv"],
                   waves=r["batch"] * r["hkv"] / sms, lens_mean=sum(lens) / len(lens), plans=descs, us=us,
                   errs=errs, kernels=ran, row_pair_ran=pair_ran)
        out["rows"].append(rec)
        print("%-44s waves %5.2f moved %d  new %8.1f  old %8.1f  new/old %.4f  row pair: new %d old %d  (%s; %s)" % (
            name, rec["waves"], rec["moved"], us["new"], us["old"], us["new"] / us["old"], pair_ran["new"],
            pair_ran["old"], descs["new"], descs["old"]), flush=True)
        del ref, pools
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
