"""Session 91: the warp-per-row combine (combine_rows_kernel) against the CTA-per-row one (combine_kernel),
both in one process through FASTATTN_DECODE_COMBINE, interleaved (the suite's event timing), plus the rule's
choice (the switch unset). GQA 32/8, head_dim 128, pages of 16, bf16, through the decode wrapper with
fixed_split_size cutting each request into s parts. Each variant's output is checked against the float32
reference (max abs error <= 2e-2), and rows' against cta's bit for bit, before timing.

    python combine_ab.py --seed S --json PATH [--sweep]
"""
import argparse
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
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

# (name, batch, length, N, parts): rows = batch x 32 x N.
ROWS = [("b128 L8k N=4", 128, 8192, 4, 2), ("b128 L8k N=4", 128, 8192, 4, 4), ("b128 L8k N=4", 128, 8192, 4, 8),
        ("b32 L8k N=4", 32, 8192, 4, 2), ("b32 L8k N=4", 32, 8192, 4, 8),
        ("b128 L8k N=1", 128, 8192, 1, 2), ("b128 L8k N=1", 128, 8192, 1, 8),
        ("b128 L1k N=1", 128, 1024, 1, 2), ("b128 L1k N=1", 128, 1024, 1, 8),
        ("b16 L8k N=4", 16, 8192, 4, 8)]
# --sweep: the bound between the two, rows 1536-4096 (batch 12-32 at N = 4) at 8k with 8 parts and 1k with 2.
SWEEP = [("b%d L%dk N=4" % (b, n // 1024), b, n, 4, s) for n, s in ((8192, 8), (1024, 2)) for b in (12, 16, 20, 24, 28, 32)]
SWITCH = "FASTATTN_DECODE_COMBINE"


def with_switch(value, fn):
    def call():
        if value is None:
            os.environ.pop(SWITCH, None)
        else:
            os.environ[SWITCH] = value
        fn()
    return call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device=Q.DEV)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    out = {"gpu": torch.cuda.get_device_name(0), "seed": args.seed, "rows": []}
    pools_by_shape = {}
    for name, b, n, n_rows, parts in (SWEEP if args.sweep else ROWS):
        key = (b, n)
        if key not in pools_by_shape:
            pools_by_shape.clear()
            torch.cuda.empty_cache()
            kv_bytes = 2 * b * n * 8 * Q.D * 2
            n_sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
            pools_by_shape[key] = [Q.Pool(rng, [n] * b, Q.HQ, 8) for _ in range(n_sets)]
        pools = pools_by_shape[key]
        ref = Q.reference(pools[0], pools[0].q(n_rows), n_rows)
        fns, errs, outs = {}, {}, {}
        calls = []
        for p in pools:
            w, desc = planned(p, ws, n_rows, parts)
            calls.append(Q.call_ours(w, p, p.q(n_rows).clone()))
        for value in (None, "cta", "rows"):
            label = value or "rule"
            errs[label] = Q.check(with_switch(value, calls[0][0]), calls[0][1], ref)
            assert errs[label] <= Q.TOL, (name, parts, label, errs[label])
            outs[label] = calls[0][1].clone()
            fns[label] = with_switch(value, L.rotating([fn for fn, _ in calls]))
        assert torch.equal(outs["rows"].view(torch.int16), outs["cta"].view(torch.int16)), (name, parts)
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        os.environ.pop(SWITCH, None)
        us = {k: s["s"] * 1e6 for k, s in st.items()}
        rows = b * Q.HQ * n_rows
        rec = {"row": "%s s=%d" % (name, parts), "rows": rows, "plan": desc, "us": us, "errs": errs}
        out["rows"].append(rec)
        print("%-20s rows %6d  rule %8.1f  cta %8.1f  rows %8.1f  rows/cta %.4f  rule/cta %.4f" % (
            rec["row"], rows, us["rule"], us["cta"], us["rows"], us["rows"] / us["cta"], us["rule"] / us["cta"]),
            flush=True)
        del ref
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
