"""Session 88 probe: GQA 32/8 at N = 4 (16 rows a KV head), batch 4 / 2k and 4k, flash_attn_with_kvcache over a
contiguous cache and over pages of 16 (a block table, the pages in a random order), num_splits 0 (the heuristic) and
fixed 2, 3, 4, 6 and 8, interleaved. Each output checked against a float32 reference first. Which wins at batch 4:
clusters of 3 (the narrow rule's paged count) or the count itself?

    python b4_splits.py [--seed S]
"""
import argparse
import os
import random
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "s87"))
sys.path.insert(0, os.path.join(HERE, "..", "s85"))
import wide_splits_ab as W  # noqa: E402
import q_len_peers as Q  # noqa: E402
import fastattn  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

COUNTS = (0, 2, 3, 4, 6, 8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    print("%s, seed %d" % (torch.cuda.get_device_name(0), args.seed))
    print("| row | layout | " + " | ".join("splits %s µs" % (c or "0 (heuristic)") for c in COUNTS) + " |")
    print("|---|---|" + "---|" * len(COUNTS))
    b, hkv, n = 4, 8, 4
    for length in (2048, 4096):
        for layout in ("contiguous", "paged 16"):
            sets = 6
            data = []
            for _ in range(sets):
                kc = torch.randn(b, length, hkv, Q.D, dtype=torch.bfloat16, device="cuda")
                vc = torch.randn(b, length, hkv, Q.D, dtype=torch.bfloat16, device="cuda")
                q = torch.randn(b, n, 32, Q.D, dtype=torch.bfloat16, device="cuda")
                ref = W.contiguous_reference(q, kc, vc, n)
                if layout == "paged 16":
                    pages = length // 16
                    perm = torch.randperm(b * pages, device="cuda")
                    table = perm.view(b, pages).to(torch.int32)
                    kp = torch.empty(b * pages, 16, hkv, Q.D, dtype=torch.bfloat16, device="cuda")
                    vp = torch.empty_like(kp)
                    kp[perm] = kc.reshape(b * pages, 16, hkv, Q.D)
                    vp[perm] = vc.reshape(b * pages, 16, hkv, Q.D)
                    data.append((q, kp, vp, table, ref))
                else:
                    data.append((q, kc, vc, None, ref))
            fns = {}
            for c in COUNTS:
                calls = []
                for q, kc, vc, table, ref in data:
                    out = torch.full_like(q, float("nan"))
                    fn = (lambda q=q, kc=kc, vc=vc, table=table, out=out, c=c: fastattn.flash_attn_with_kvcache(
                        q, kc, vc, cache_seqlens=length, block_table=table, causal=True, num_splits=c, out=out))
                    fn()
                    torch.cuda.synchronize()
                    err = float((out.float() - ref).abs().max())
                    assert err <= Q.TOL, (length, layout, c, err)
                    calls.append(fn)
                fns[c] = L.rotating(calls)
            G.rewarm_gpu(torch)
            st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
            print("| GQA 32/8 b4 L%d N=4 | %s | " % (length, layout)
                  + " | ".join("%.1f" % (st[c]["s"] * 1e6) for c in COUNTS) + " |", flush=True)


if __name__ == "__main__":
    main()
