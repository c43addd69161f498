"""Session 85 A/B: two narrow CTAs per KV head for 9-16 packed rows (the default) against one wide CTA
(FASTATTN_DECODE_NARROW_PAIRS=0), interleaved in one process, on the GQA 32/8 N = 4 shapes of q_len_peers.py,
MHA N = 16 at two shapes, and 64/4 heads at N = 1 (16 rows a KV head from the group alone).

    python narrow_ab.py [--seed S]
"""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import q_len_peers as Q  # noqa: E402
from form_probe import with_env  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

WIDE = {"FASTATTN_DECODE_NARROW_PAIRS": "0"}


def rows(rng):
    """(name, heads_q, heads_kv, lengths, N)."""
    out = []
    for b in (1, 8, 32, 128):
        for n in (1024, 8192, 32768):
            if b == 128 and n == 32768:
                continue
            out.append(("GQA 32/8 b%d L%dk N=4" % (b, n // 1024), 32, 8, [n] * b, 4))
    out.append(("GQA 32/8 b32 ragged 4-8k N=4", 32, 8, [rng.randint(4, 8192) for _ in range(32)], 4))
    out += [("MHA 32/32 b1 L8k N=16", 32, 32, [8192], 16), ("MHA 32/32 b8 L8k N=16", 32, 32, [8192] * 8, 16),
            ("64/4 b1 L8k N=1", 64, 4, [8192], 1), ("64/4 b8 L8k N=1", 64, 4, [8192] * 8, 1),
            ("64/4 b32 L8k N=1", 64, 4, [8192] * 32, 1)]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device="cuda")
    print("| row | pairs µs | wide µs | pairs / wide | max err pairs, wide |")
    print("|---|---|---|---|---|")
    for name, hq, hkv, lens, n in rows(rng):
        kv_bytes = 2 * sum(lens) * hkv * Q.D * 2
        sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        pools = [Q.Pool(rng, lens, hq, hkv) for _ in range(sets)]
        fns, errs = {}, {}
        for variant, env in (("pairs", {}), ("wide", WIDE)):
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
        print("| %s | %.1f | %.1f | %.3f | %.1e, %.1e |" % (name, us["pairs"], us["wide"], us["pairs"] / us["wide"],
                                                        errs["pairs"], errs["wide"]), flush=True)
        del pools, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
