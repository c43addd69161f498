"""Session 89 A/B: the cluster merge only where all of a grid's clusters are resident at once
(decode_clusters_resident) against the same build without that check (S89_RESIDENT=0, a temporary switch).
Pages of 16 through the decode wrapper, head_dim 128, 32 query heads, num_splits from the heuristic. Rows with
33-44 (sequence, KV head) items, where the heuristic takes 3 splits in clusters of 3 on one CTA per SM, and
controls with 32-36 items. Every output is checked against a float32 reference; each row prints both variants'
forms (splits, c = cluster merge, +k = the combine kernel) read off torch.profiler. Last, the form of
flash_attn_with_kvcache at head_dim 64 (GQA 8 batch 5, pages of 16), whose clustered CTAs fit two per SM.

    python resident_ab.py [--seed S]
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
import rule_ab as R  # noqa: E402
import fastattn  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

VARIANTS = {"check": {}, "no check": {"S89_RESIDENT": "0"}}


def rows():
    """(name, heads_kv, batch, length, N): items = batch x heads_kv (x2 for 17-32 rows below 4k)."""
    out = []
    out += [("GQA 32/8 b5 L%d N=1" % k, 8, 5, k, 1) for k in (1024, 2048, 4096, 8192)]
    out += [("GQA 32/4 b%d L%d N=1" % (b, k), 4, b, k, 1) for b, k in ((10, 2048), (10, 4096), (9, 4096))]
    out += [("GQA 32/2 b%d L%d N=1" % (b, k), 2, b, k, 1) for b, k in ((20, 2048), (19, 2048), (18, 2048))]
    out += [("GQA 32/8 b5 L%d N=4" % k, 8, 5, k, 4) for k in (2048, 4096)]
    out += [("GQA 32/8 b5 L4096 N=8", 8, 5, 4096, 8)]
    out += [("GQA 32/8 b4 L%d N=1" % k, 8, 4, k, 1) for k in (2048,)]
    return out


def head_dim_64_form():
    b, hkv, length, d = 5, 8, 2048, 64
    pages = length // 16
    kp = torch.randn(b * pages, 16, hkv, d, dtype=torch.bfloat16, device="cuda")
    vp = torch.randn_like(kp)
    table = torch.randperm(b * pages, device="cuda").view(b, pages).to(torch.int32)
    q = torch.randn(b, 1, 32, d, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    for variant, env in VARIANTS.items():
        fn = with_env(lambda: fastattn.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=length, block_table=table,
                                                               num_splits=0, out=out), env)
        print("head_dim 64 GQA 32/8 b5 L2048 paged 16, %s: %s" % (variant, R.form(fn)), flush=True)


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
    print("%s, seed %d" % (torch.cuda.get_device_name(0), args.seed))
    print("| row | check µs (form) | no check µs (form) | check / no check | max err |")
    print("|---|---|---|---|---|")
    for name, hkv, b, length, n in rows():
        lens = [length] * b
        kv_bytes = 2 * sum(lens) * hkv * Q.D * 2
        sets = G._n_sets(kv_bytes, l2)
        pools = [Q.Pool(rng, lens, 32, hkv) for _ in range(sets)]
        ref = Q.reference(pools[0], pools[0].q(n), n)
        fns, errs, forms = {}, {}, {}
        for variant, env in VARIANTS.items():
            calls = []
            for p in pools:
                w, _ = Q.plan_ours(p, ws, n)
                fn, out = Q.call_ours(w, p, p.q(n).clone())
                calls.append((with_env(fn, env), out))
            errs[variant] = Q.check(calls[0][0], calls[0][1], ref)
            assert errs[variant] <= Q.TOL, (name, variant, errs[variant])
            forms[variant] = R.form(calls[0][0])
            fns[variant] = L.rotating([fn for fn, _ in calls])
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        print("| %s | %.2f (%s) | %.2f (%s) | %.3f | %.1e |" % (
            name, st["check"]["s"] * 1e6, forms["check"], st["no check"]["s"] * 1e6, forms["no check"],
            st["check"]["s"] / st["no check"]["s"], max(errs.values())), flush=True)
        del pools, ref, fns
        torch.cuda.empty_cache()
    head_dim_64_form()


if __name__ == "__main__":
    main()
