"""Session 87: the split count of the wrapper's plan at 16 packed rows a KV head (GQA 32/8, N = 4, pages of 16),
swept against the plan's own choice, interleaved in one process. Each variant is the wrapper planned as usual,
then its num_splits replaced and the runner rebuilt (a scratch hook: _plan / _make_runner). Every variant's output
is checked against the float32 reference on the first set; the rest are timed as q_len_peers.py times ours.

    python split_sweep.py [--seed S] [--n N]
"""
import argparse
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "s85"))
import q_len_peers as Q  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=4)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device="cuda")
    n = args.n
    print("%s, seed %d, GQA 32/8, N = %d (%d rows a KV head)" % (torch.cuda.get_device_name(0), args.seed, n, 4 * n))
    for b, length in ((1, 1024), (1, 8192), (8, 1024), (32, 1024), (128, 1024), (1, 32768), (32, 8192)):
        lens = [length] * b
        kv_bytes = 2 * sum(lens) * 8 * Q.D * 2
        sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        pools = [Q.Pool(rng, lens, 32, 8) for _ in range(sets)]
        ref = Q.reference(pools[0], pools[0].q(n), n)
        fns, chosen = {}, None
        for s in (None,) + SPLITS:
            calls = []
            for p in pools:
                w, _ = Q.plan_ours(p, ws, n)
                if chosen is None:
                    chosen = w.num_splits
                if s is not None:
                    w._plan["num_splits"] = s
                    w._runner = w._make_runner(w._plan, ws)
                calls.append(Q.call_ours(w, p, p.q(n).clone()))
            err = Q.check(calls[0][0], calls[0][1], ref)
            assert err <= Q.TOL, (b, length, s, err)
            fns["plan" if s is None else "s%d" % s] = L.rotating([fn for fn, _ in calls])
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        base = st["plan"]["s"]
        cells = ["%s %.1f" % (k, v["s"] * 1e6) + ("" if k == "plan" else " (%.3f)" % (v["s"] / base)) for k, v in st.items()]
        best = min(st, key=lambda k: st[k]["s"])
        print("b%d L%dk: plan chose %s splits; best %s (%.3f of the plan's)" % (b, length // 1024, chosen, best,
                                                                                st[best]["s"] / base))
        print("   " + " | ".join(cells), flush=True)
        del pools, ref, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
