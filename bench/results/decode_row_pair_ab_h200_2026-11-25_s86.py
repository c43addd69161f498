"""Session 86 A/B: the row pair (the default for more than 16 packed rows a KV head) against one CTA per
16-row block (FASTATTN_DECODE_ROW_PAIR=0), interleaved in one process, through the decode wrapper:
GQA 32/8 at N = 8 (32 rows a KV head) on q_len_peers.py's 11 uniform shapes, N = 16 (64 rows) at batch 1, 8
and 32 / 8k, and the ragged batch at N = 8 (its split plan is made at plan(), weighing the row pair's CTAs, for
both variants). Every output is checked against the float32 reference first.

    python row_pair_ab.py [--seed S]
"""
import argparse
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "s85"))
import q_len_peers as Q  # noqa: E402
from form_probe import with_env  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

PER_HEAD = {"FASTATTN_DECODE_ROW_PAIR": "0"}


def rows(rng):
    """(name, heads_q, heads_kv, lengths, N)."""
    out = []
    for b in (1, 8, 32, 128):
        for n in (1024, 8192, 32768):
            if b == 128 and n == 32768:
                continue
            out.append(("GQA 32/8 b%d L%dk N=8" % (b, n // 1024), 32, 8, [n] * b, 8))
    out += [("GQA 32/8 b%d L8k N=16" % b, 32, 8, [8192] * b, 16) for b in (1, 8, 32)]
    out.append(("GQA 32/8 b32 ragged 8-8k N=8", 32, 8, [rng.randint(8, 8192) for _ in range(32)], 8))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device="cuda")
    print("%s, seed %d" % (torch.cuda.get_device_name(0), args.seed))
    print("| row | row pair µs | per-head µs | pair / per-head | pair TB/s | max err pair, per-head |")
    print("|---|---|---|---|---|---|")
    for name, hq, hkv, lens, n in rows(rng):
        kv_bytes = 2 * sum(lens) * hkv * Q.D * 2
        sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        pools = [Q.Pool(rng, lens, hq, hkv) for _ in range(sets)]
        fns, errs = {}, {}
        for variant, env in (("pair", {}), ("per_head", PER_HEAD)):
            calls = []
            for i, p in enumerate(pools):
                w, _ = Q.plan_ours(p, ws, n)
                fn, out = Q.call_ours(w, p, p.q(n).clone())
                fn = with_env(fn, env) if env else fn
                if i == 0:
                    errs[variant] = Q.check(fn, out, Q.reference(p, p.q(n), n))
                    assert errs[variant] <= Q.TOL, (name, variant, errs[variant])
                calls.append(fn)
            fns[variant] = L.rotating(calls)
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        us = {k: v["s"] * 1e6 for k, v in st.items()}
        print("| %s | %.1f | %.1f | %.3f | %.2f | %.1e, %.1e |" % (
            name, us["pair"], us["per_head"], us["pair"] / us["per_head"], kv_bytes / (us["pair"] * 1e-6) / 1e12,
            errs["pair"], errs["per_head"]), flush=True)
        del pools, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
