"""Session 85 probe: how much of the multi-row decode's cost over one row is the kernel form.

Our wrapper at GQA 32/8, head_dim 128, pages of 16, bf16, uniform lengths (the capacity heuristic plans):
N = 1 as the heuristic picks its form; N = 1 with the head-group, four-head and pair forms switched off
(FASTATTN_DECODE_HEAD_GROUP=0, _QUAD=0, _PAIR=0: the per-head kernel, as N rows get); N = 2, 4, 8. Timed as
q_len_peers.py times (interleaved per-call events, input sets rotated).

    python form_probe.py [--seed S]
"""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import q_len_peers as Q  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

OFF = {"FASTATTN_DECODE_HEAD_GROUP": "0", "FASTATTN_DECODE_HEAD_QUAD": "0", "FASTATTN_DECODE_HEAD_PAIR": "0"}


def with_env(fn, env):
    """fn() run with `env` set (the decode host reads the switches at each call)."""
    def call():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in old.items():
                if v is None:
                    del os.environ[k]
                else:
                    os.environ[k] = v
    return call


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
    print("| row | N=1 µs | N=1 per-head µs | N=2 | N=4 | N=8 | N=4 / per-head N=1 |")
    print("|---|---|---|---|---|---|---|")
    for b, n in ((1, 8192), (8, 1024), (8, 8192), (32, 8192), (128, 1024)):
        lens = [n] * b
        kv_bytes = 2 * sum(lens) * 8 * Q.D * 2
        sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        pools = [Q.Pool(rng, lens, Q.HQ, 8) for _ in range(sets)]
        fns = {}
        for name, rows, env in (("N=1", 1, {}), ("N=1 per-head", 1, OFF), ("N=2", 2, {}), ("N=4", 4, {}),
                                ("N=8", 8, {})):
            calls = []
            for p in pools:
                w, _ = Q.plan_ours(p, ws, rows)
                fn, out = Q.call_ours(w, p, p.q(rows).clone())
                calls.append(with_env(fn, env) if env else fn)
            fns[name] = L.rotating(calls)
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        us = {k: v["s"] * 1e6 for k, v in st.items()}
        print("| GQA 32/8 b%d L%dk | %.1f | %.1f | %.1f | %.1f | %.1f | %.3f |" % (
            b, n // 1024, us["N=1"], us["N=1 per-head"], us["N=2"], us["N=4"], us["N=8"],
            us["N=4"] / us["N=1 per-head"]), flush=True)
        del pools, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
