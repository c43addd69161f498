"""Session 89 A/B: the wide math's split rule where its clustered grid has more than half the SMs (clusters of 2-3
on one CTA per SM). Variants (a temporary switch S89_RULE in the A/B build):
- "s87": session 87's rule (the 8-tile bound on every clustered grid of the wide math);
- "B": the 8-tile bound only on clustered grids of at most half the SMs, and the wide math's contiguous calls take
  clusters of 3 at head_dim 128 as paged calls do (paged, B is A);
- "A" (contiguous only): the bound alone;
- "narrow": the narrow math's rule (FASTATTN_DECODE_WIDE_SPLITS=0).
Pages of 16 through the decode wrapper; contiguous through flash_attn_with_kvcache (num_splits=0, causal). Every
variant's output is checked against a float32 reference; each row prints every variant's form (splits, c for a
cluster merge or +k for the combine kernel, read off torch.profiler).

    python rule_ab.py [--seed S] [--quick]
"""
import argparse
import json
import os
import random
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "s85"))
import q_len_peers as Q  # noqa: E402
import wide_ref  # noqa: E402
from form_probe import with_env  # noqa: E402
import fastattn  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

PAGED = {"s87": {"S89_RULE": "87"}, "B": {}, "narrow": {"FASTATTN_DECODE_WIDE_SPLITS": "0"}}
CONTIG = {"s87": {"S89_RULE": "87"}, "A": {"S89_RULE": "A"}, "B": {},
          "narrow": {"FASTATTN_DECODE_WIDE_SPLITS": "0"}}


def rows():
    """(name, heads_kv, batch, length, N)."""
    out = []
    for b, ks in ((3, (1024, 2048, 4096)), (4, (1024, 2048, 4096)), (5, (2048, 4096))):
        out += [("GQA 32/8 b%d L%d N=4" % (b, k), 8, b, k, 4) for k in ks]
    out += [("GQA 32/8 b%d L%d N=8" % (b, k), 8, b, k, 8) for b, k in ((4, 4096), (5, 4096), (4, 8192))]
    out += [("GQA 32/2 b%d L%d N=1" % (b, k), 2, b, k, 1) for b, k in ((16, 2048), (16, 4096), (12, 4096))]
    return out


def form(fn):
    """The call's form: '<grid x>c' (cluster merge) or '<grid x>+k' (the combine kernel)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    prof.export_chrome_trace(path)
    with open(path) as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    os.unlink(path)
    attn = [e for e in ev if "decode_kernel" in e["name"]]
    comb = any("combine_kernel" in e["name"] for e in ev)
    x = attn[0]["args"]["grid"][0] if attn else "?"
    return "%s%s" % (x, "+k" if comb else "c")


def time_row(fns, settings, sleeper):
    G.rewarm_gpu(torch)
    return G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)


def line(name, layout, st, forms, errs, names):
    base = st["s87"]["s"]
    cells = ["%.2f (%s)" % (st[v]["s"] * 1e6, forms[v]) for v in names]
    ratios = ["%.3f" % (st[v]["s"] / base) for v in names if v != "s87"]
    print("| %s | %s | %s | %s | %.1e |" % (name, layout, " | ".join(cells), " | ".join(ratios),
                                            max(errs.values())), flush=True)


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
    print("paged 16: | row | layout | s87 µs (form) | B | narrow | B / s87 | narrow / s87 | max err |")
    print("contiguous: | row | layout | s87 µs (form) | A | B | narrow | A / s87 | B / s87 | narrow / s87 | max err |")
    for name, hkv, b, length, n in rows():
        lens = [length] * b
        kv_bytes = 2 * sum(lens) * hkv * Q.D * 2
        sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > Q.BIG_SET else None)
        pools = [Q.Pool(rng, lens, 32, hkv) for _ in range(sets)]
        ref = Q.reference(pools[0], pools[0].q(n), n)
        fns, errs, forms = {}, {}, {}
        for variant, env in PAGED.items():
            calls = []
            for p in pools:
                w, _ = Q.plan_ours(p, ws, n)
                fn, out = Q.call_ours(w, p, p.q(n).clone())
                calls.append((with_env(fn, env), out))
            errs[variant] = Q.check(calls[0][0], calls[0][1], ref)
            assert errs[variant] <= Q.TOL, (name, variant, errs[variant])
            forms[variant] = form(calls[0][0])
            fns[variant] = L.rotating([fn for fn, _ in calls])
        st = time_row(fns, settings, sleeper)
        line(name, "paged 16", st, forms, errs, list(PAGED))
        del pools, ref, fns
        caches = [(torch.randn(b, length, hkv, Q.D, dtype=torch.bfloat16, device="cuda"),
                   torch.randn(b, length, hkv, Q.D, dtype=torch.bfloat16, device="cuda")) for _ in range(sets)]
        q = torch.randn(b, n, 32, Q.D, dtype=torch.bfloat16, device="cuda")
        ref = wide_ref.contiguous_reference(q, caches[0][0], caches[0][1], n)
        fns, errs, forms = {}, {}, {}
        for variant, env in CONTIG.items():
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
            forms[variant] = form(calls[0][0])
            fns[variant] = L.rotating([fn for fn, _ in calls])
        st = time_row(fns, settings, sleeper)
        line(name, "contiguous", st, forms, errs, list(CONTIG))
        del caches, ref, fns, q
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
