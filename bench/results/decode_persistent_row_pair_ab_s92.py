"""Session 92: the persistent row pair (FASTATTN_SCRATCH_PERSIST=1) against the row pair as planned with
FASTATTN_DECODE_ROW_PAIR=1 ("pair") and the plan's own choice ("plan": per-head 16-row CTAs at 1k), with
FlashInfer's fa2 paged prefill where it imports; one process, interleaved (the suite's event timing).
GQA 32/8, head_dim 128, pages of 16, bf16, through the decode wrapper (q_len_per_req = N). Every output is
checked against the float32 reference (max abs error <= 2e-2) before timing, persist's against pair's bit
for bit where both ran one split.

    python persist_ab.py --seed S --json PATH
"""
import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "s85"))
import q_len_peers as Q  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

# (name, batch or lengths, N)
ROWS = [("b1 L1k N=8", [1024], 8), ("b8 L1k N=8", [1024] * 8, 8), ("b32 L1k N=8", [1024] * 32, 8),
        ("b128 L1k N=8", [1024] * 128, 8), ("b32 L1k N=6", [1024] * 32, 6), ("b128 L1k N=6", [1024] * 128, 6),
        ("b64 L2k N=8", [2048] * 64, 8), ("b128 ragged 512-1.5k N=8", "ragged", 8),
        ("b1 L8k N=8", [8192], 8), ("b8 L8k N=8", [8192] * 8, 8), ("b32 L8k N=8", [8192] * 32, 8),
        ("b128 L8k N=8", [8192] * 128, 8)]
ENV = {"plan": {}, "pair": {"FASTATTN_DECODE_ROW_PAIR": "1"},
       "persist": {"FASTATTN_DECODE_ROW_PAIR": "1", "FASTATTN_SCRATCH_PERSIST": "1"}}
KEYS = ("FASTATTN_DECODE_ROW_PAIR", "FASTATTN_SCRATCH_PERSIST")


def set_env(label):
    for k in KEYS:
        os.environ.pop(k, None)
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
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    try:
        import flashinfer as fi
    except Exception as e:  # noqa: BLE001
        print("no FlashInfer:", e)
        fi = None
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device=Q.DEV)
    ws_fi = torch.empty(Q.FI_WORKSPACE, dtype=torch.uint8, device=Q.DEV) if fi else None
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    out = {"gpu": torch.cuda.get_device_name(0), "seed": args.seed, "rows": []}
    for name, lens, n_rows in ROWS:
        if lens == "ragged":
            lens = [rng.randint(512, 1536) for _ in range(128)]
        torch.cuda.empty_cache()
        kv_bytes = 2 * sum(lens) * 8 * Q.D * 2
        n_sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        pools = [Q.Pool(rng, lens, Q.HQ, 8) for _ in range(n_sets)]
        ref = Q.reference(pools[0], pools[0].q(n_rows), n_rows)
        fns, errs, outs, descs = {}, {}, {}, {}
        for label in ENV:
            set_env(label)
            calls = []
            for p in pools:
                w, desc = Q.plan_ours(p, ws, n_rows)
                calls.append(Q.call_ours(w, p, p.q(n_rows).clone()))
            descs[label] = desc
            errs[label] = Q.check(with_env(label, calls[0][0]), calls[0][1], ref)
            assert errs[label] <= Q.TOL, (name, label, errs[label])
            outs[label] = calls[0][1].clone()
            fns[label] = with_env(label, L.rotating([fn for fn, _ in calls]))
        ran = {label: [k[:90] for k in kernels_of(fns[label])] for label in ENV}
        if not any("persistent" in k for k in ran["persist"]):
            print("NOTE %s: the persistent kernel did not run (%s)" % (name, descs["persist"]), flush=True)
        assert not any("persistent" in k for k in ran["pair"] + ran["plan"]), (name, ran)
        set_env("plan")
        if descs["pair"] == "num_splits 1":
            assert torch.equal(outs["persist"].view(torch.int16), outs["pair"].view(torch.int16)), name
        if fi is not None:
            calls = [Q.make_fi(fi, "fa2", p, ws_fi, n_rows, p.q(n_rows).clone()) for p in pools]
            errs["fa2"] = Q.check(calls[0][0], calls[0][1], ref)
            if errs["fa2"] <= Q.TOL:
                fns["fa2"] = L.rotating([c[0] for c in calls])
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        set_env("plan")
        us = {k: s["s"] * 1e6 for k, s in st.items()}
        rec = {"row": name, "N": n_rows, "plans": descs, "kernels": ran, "us": us, "errs": errs}
        out["rows"].append(rec)
        fa2 = us.get("fa2")
        print("%-26s plan %8.1f  pair %8.1f  persist %8.1f  persist/plan %.4f  persist/pair %.4f  fa2 %s  (%s)" % (
            name, us["plan"], us["pair"], us["persist"], us["persist"] / us["plan"], us["persist"] / us["pair"],
            "%.1f fa2/persist %.3f fa2/plan %.3f" % (fa2, fa2 / us["persist"], fa2 / us["plan"]) if fa2 else "-",
            descs["pair"]), flush=True)
        del ref, pools
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
