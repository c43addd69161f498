"""Session 87 A/B: the split heuristic's wide-math rule (decode_wide_split_rule) against the narrow math's
(FASTATTN_DECODE_WIDE_SPLITS=0), interleaved in one process, at more than 8 packed query rows a KV head:
GQA 32/8 at N = 4 (16 rows) and N = 8 (32: the row pair from 4096 slots), and GQA 32/2 at N = 1 (16 rows),
batch 1-8, 1k-32k. Pages of 16 through the decode wrapper (num_splits 0: the heuristic runs at each call) and a
contiguous cache through flash_attn_with_kvcache (num_splits=0, causal). Every output of both variants is checked
against a float32 reference on the first input set first; the input sets rotate call by call so that K and V
come from HBM.

    python wide_splits_ab.py [--seed S]
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
import fastattn  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

OLD = {"FASTATTN_DECODE_WIDE_SPLITS": "0"}


def rows():
    """(name, heads_kv, batch, length, N)."""
    out = []
    for b, ks in ((1, (1, 2, 4, 8, 16, 32)), (2, (4, 8, 32)), (4, (8,)), (8, (8,))):
        out += [("GQA 32/8 b%d L%dk N=4" % (b, k), 8, b, k * 1024, 4) for k in ks]
    for b, ks in ((1, (4, 8, 16, 32)), (2, (8,)), (4, (8,))):
        out += [("GQA 32/8 b%d L%dk N=8" % (b, k), 8, b, k * 1024, 8) for k in ks]
    out += [("GQA 32/2 b%d L8k N=1" % b, 2, b, 8192, 1) for b in (1, 4)]
    return out


def contiguous_reference(q, k, v, n):
    """float32 (B, N, Hq, D): row i of request b attends to keys 0 .. L - N + i."""
    b, _, hq, d = q.shape
    length, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.float().permute(0, 2, 1, 3)                                       # B, Hq, N, D
    kf = k.float().permute(0, 2, 1, 3).repeat_interleave(g, dim=1)          # B, Hq, L, D
    vf = v.float().permute(0, 2, 1, 3).repeat_interleave(g, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * Q.SCALE
    keys = torch.arange(length, device=q.device)
    allowed = keys[None, :] <= (length - n + torch.arange(n, device=q.device))[:, None]
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), vf).permute(0, 2, 1, 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    ws = torch.empty(Q.OURS_WORKSPACE, dtype=torch.uint8, device="cuda")
    print("%s, seed %d" % (torch.cuda.get_device_name(0), args.seed))
    print("| row | layout | wide rule µs | narrow rule µs | wide / narrow | max err wide, narrow |")
    print("|---|---|---|---|---|---|")
    for name, hkv, b, length, n in rows():
        lens = [length] * b
        kv_bytes = 2 * sum(lens) * hkv * Q.D * 2
        sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        # Pages of 16, through the wrapper.
        pools = [Q.Pool(rng, lens, 32, hkv) for _ in range(sets)]
        ref = Q.reference(pools[0], pools[0].q(n), n)
        fns, errs = {}, {}
        for variant, env in (("wide", {}), ("narrow", OLD)):
            calls = []
            for p in pools:
                w, _ = Q.plan_ours(p, ws, n)
                fn, out = Q.call_ours(w, p, p.q(n).clone())
                calls.append((with_env(fn, env), out))
            errs[variant] = Q.check(calls[0][0], calls[0][1], ref)
            assert errs[variant] <= Q.TOL, (name, variant, errs[variant])
            fns[variant] = L.rotating([fn for fn, _ in calls])
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        print("| %s | paged 16 | %.1f | %.1f | %.3f | %.1e, %.1e |" % (
            name, st["wide"]["s"] * 1e6, st["narrow"]["s"] * 1e6, st["wide"]["s"] / st["narrow"]["s"],
            errs["wide"], errs["narrow"]), flush=True)
        del pools, ref, fns
        # Contiguous, through flash_attn_with_kvcache.
        caches = [(torch.randn(b, length, hkv, Q.D, dtype=torch.bfloat16, device="cuda"),
                   torch.randn(b, length, hkv, Q.D, dtype=torch.bfloat16, device="cuda")) for _ in range(sets)]
        q = torch.randn(b, n, 32, Q.D, dtype=torch.bfloat16, device="cuda")
        ref = contiguous_reference(q, caches[0][0], caches[0][1], n)
        fns, errs = {}, {}
        for variant, env in (("wide", {}), ("narrow", OLD)):
            calls = []
            for kc, vc in caches:
                out = torch.empty_like(q)
                fn = (lambda kc=kc, vc=vc, out=out: fastattn.flash_attn_with_kvcache(
                    q, kc, vc, cache_seqlens=length, causal=True, num_splits=0, out=out))
                calls.append((with_env(fn, env), out))
            out0 = calls[0][1]
            out0.fill_(float("nan"))
            calls[0][0]()
            torch.cuda.synchronize()
            errs[variant] = float((out0.float() - ref).abs().max())
            assert errs[variant] <= Q.TOL, (name, "contiguous", variant, errs[variant])
            fns[variant] = L.rotating([fn for fn, _ in calls])
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        print("| %s | contiguous | %.1f | %.1f | %.3f | %.1e, %.1e |" % (
            name, st["wide"]["s"] * 1e6, st["narrow"]["s"] * 1e6, st["wide"]["s"] / st["narrow"]["s"],
            errs["wide"], errs["narrow"]), flush=True)
        del caches, ref, fns, q
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
