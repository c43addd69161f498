"""Session 93: the calls the heuristic splits with more than 1584 split rows at MHA, where session 91's rule sends
the merge to the warp-per-row combine (combine_rows_kernel): that kernel ("rows", FASTATTN_DECODE_COMBINE=rows)
against the CTA-per-row one ("cta", =cta) and the rule's choice ("rule", unset), interleaved in one process (the
suite's event timing). MHA 32/32, head_dim 128, pages of 16, bf16, one query row, through the decode wrapper's
plain plan. Each variant's output is checked against the float32 reference (max abs error <= 2e-2), rows' against
cta's bit for bit, and the kernels each ran are read from the profiler.

    python combine_mha_probe.py --seed S --json PATH
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

ROWS = [(48, 16384), (64, 16384), (96, 16384), (64, 8192), (64, 32768)]  # (batch, keys), MHA 32/32
SWITCH = "FASTATTN_DECODE_COMBINE"


def with_switch(value, fn):
    def call():
        if value is None:
            os.environ.pop(SWITCH, None)
        else:
            os.environ[SWITCH] = value
        fn()
    return call


def short_name(name):
    """A kernel's name without namespaces, template arguments or parameters: 'combine_rows_kernel'."""
    head = name.split("<")[0].split("(anonymous namespace)::")[-1]
    return head.split("::")[-1].replace("void ", "")


def kernels_of(fn):
    """The short names of the CUDA kernels one call of fn launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({short_name(e.name) for e in prof.events() if e.device_type.name == "CUDA"})


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
    for b, n in ROWS:
        name = "MHA 32/32 b%d L%dk" % (b, n // 1024)
        torch.cuda.empty_cache()
        kv_bytes = 2 * b * n * 32 * Q.D * 2
        n_sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        free = torch.cuda.mem_get_info()[0]
        n_sets = max(1, min(n_sets, int((free - Q.FREE_MARGIN) // (kv_bytes * 1.01))))
        pools = [Q.Pool(rng, [n] * b, Q.HQ, 32) for _ in range(n_sets)]
        ref = Q.reference(pools[0], pools[0].q(1), 1)
        calls = []
        for p in pools:
            w, desc = Q.plan_ours(p, ws, 1)
            calls.append(Q.call_ours(w, p, p.q(1).clone()))
        fns, errs, outs = {}, {}, {}
        for value in (None, "cta", "rows"):
            label = value or "rule"
            errs[label] = Q.check(with_switch(value, calls[0][0]), calls[0][1], ref)
            assert errs[label] <= Q.TOL, (name, label, errs[label])
            outs[label] = calls[0][1].clone()
            fns[label] = with_switch(value, L.rotating([fn for fn, _ in calls]))
        assert torch.equal(outs["rows"].view(torch.int16), outs["cta"].view(torch.int16)), name
        ran = {label: kernels_of(fn) for label, fn in fns.items()}
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        os.environ.pop(SWITCH, None)
        us = {k: s["s"] * 1e6 for k, s in st.items()}
        rec = {"row": name, "batch": b, "keys": n, "sets": n_sets, "plan": desc, "us": us, "errs": errs,
               "kernels": ran}
        out["rows"].append(rec)
        rule_kernels = ran["rule"]
        print("%-20s %s  rule %8.1f  cta %8.1f  rows %8.1f  rows/cta %.4f  rule/cta %.4f  rule ran %s" % (
            name, desc, us["rule"], us["cta"], us["rows"], us["rows"] / us["cta"], us["rule"] / us["cta"],
            ",".join(rule_kernels)), flush=True)
        del ref, pools, calls, fns
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
