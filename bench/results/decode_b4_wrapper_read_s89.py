"""Session 89 probe: what runs at GQA 32/8, N = 4 (16 packed rows a KV head), batch 4 / 2k and 4k keys, pages of
16, under session 87's wide split rule and under the narrow one (FASTATTN_DECODE_WIDE_SPLITS=0), on three paths:
- "wrapper": the decode wrapper on its (pages, 2, 16, Hkv, D) pool (session 88 run 3's call);
- "pool": flash_attn_with_kvcache on k = pool[:, 0], v = pool[:, 1] of the same pool, the same page table, lengths
  as a device tensor;
- "two pools": flash_attn_with_kvcache on separate K and V pools (contiguous copies of those views), same table
  (session 88's b4_splits.py call);
each with num_splits 0 under both rules and fixed 3 and 4 (the two flash_attn_with_kvcache paths). Each variant's
output is checked against a float32 reference, then all are timed interleaved (median of the rounds), then each
is run under torch.profiler and its kernels are listed with grid, block and mean duration.

    python b4_read.py [--seed S] [--trace-dir DIR]
"""
import argparse
import json
import os
import random
import sys
from collections import OrderedDict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "s85"))
import q_len_peers as Q  # noqa: E402
from form_probe import with_env  # noqa: E402
import fastattn  # noqa: E402
from fastattn.bench import gpu_decode as G  # noqa: E402
from fastattn.bench import gpu_decode_layouts as L  # noqa: E402

NARROW = {"FASTATTN_DECODE_WIDE_SPLITS": "0"}
B, HQ, HKV, N = 4, 32, 8, 4


def variants(pool, ws):
    """{name: (call, out)} on one pool: out (B x N, Hq, D) for every call."""
    v = OrderedDict()
    w, _ = Q.plan_ours(pool, ws, N)
    q = pool.q(N).clone()
    fn, out = Q.call_ours(w, pool, q)
    v["wrapper wide"] = (fn, out)
    v["wrapper narrow"] = (with_env(fn, NARROW), out)
    table = torch.tensor(pool.lists, dtype=torch.int32, device="cuda")
    lens = torch.tensor(pool.lens, dtype=torch.int32, device="cuda")
    k_view, v_view = pool.kv[:, 0], pool.kv[:, 1]
    k_two, v_two = k_view.contiguous(), v_view.contiguous()
    for path, kc, vc in (("pool", k_view, v_view), ("two pools", k_two, v_two)):
        for label, splits, env in (("0 wide", 0, {}), ("0 narrow", 0, NARROW), ("3", 3, {}), ("4", 4, {})):
            qv = pool.q(N).clone().view(B, N, HQ, Q.D)
            o = torch.empty_like(qv)
            call = (lambda qv=qv, kc=kc, vc=vc, o=o, s=splits: fastattn.flash_attn_with_kvcache(
                qv, kc, vc, cache_seqlens=lens, block_table=table, causal=True, num_splits=s, out=o))
            v["%s %s" % (path, label)] = (with_env(call, env), o.view(B * N, HQ, Q.D))
    return v


def kernels(trace_path):
    """[(name, grid, block, smem, regs, count, mean µs)] of the trace's kernels, in first-launch order."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    rows = OrderedDict()
    for e in events:
        if e.get("cat") != "kernel":
            continue
        a = e.get("args", {})
        key = (e["name"], tuple(a.get("grid", ())), tuple(a.get("block", ())), a.get("shared memory"),
               a.get("registers per thread"))
        r = rows.setdefault(key, [0, 0.0])
        r[0] += 1
        r[1] += float(e.get("dur", 0))
    return [(k[0], k[1], k[2], k[3], k[4], c, d / c) for k, (c, d) in rows.items()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trace-dir", default="/tmp")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print("%s, seed %d" % (torch.cuda.get_device_name(0), args.seed))
    for length in (2048, 4096):
        lens = [length] * B
        kv_bytes = 2 * sum(lens) * HKV * Q.D * 2
        sets = G._n_sets(kv_bytes, l2)
        pools = [Q.Pool(rng, lens, HQ, HKV) for _ in range(sets)]
        per_set = []
        for i, p in enumerate(pools):
            ws = torch.empty(Q.OURS_WORKSPACE // 8, dtype=torch.uint8, device="cuda")
            per_set.append((variants(p, ws), ws))
        ref = Q.reference(pools[0], pools[0].q(N), N)
        names = list(per_set[0][0].keys())
        errs = {}
        for name in names:
            fn, out = per_set[0][0][name]
            errs[name] = Q.check(fn, out, ref)
            assert errs[name] <= Q.TOL, (length, name, errs[name])
        fns = {name: L.rotating([vs[name][0] for vs, _ in per_set]) for name in names}
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        print("\n## GQA 32/8 batch 4 / %d, N = 4, pages of 16 (%d input sets)\n" % (length, sets))
        print("| variant | µs (median) | round medians µs | max err |")
        print("|---|---|---|---|")
        for name in names:
            rm = st[name].get("round_medians_s") or st[name].get("rounds_s") or []
            print("| %s | %.2f | %s | %.1e |" % (name, st[name]["s"] * 1e6,
                                                 ", ".join("%.2f" % (x * 1e6) for x in rm), errs[name]))
        print("\nKernels (torch.profiler, 6 calls each, rotating sets):\n")
        for name in names:
            fn = fns[name]
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(6):
                    fn()
                torch.cuda.synchronize()
            path = os.path.join(args.trace_dir, "trace_L%d_%s_seed%d.json" % (length, name.replace(" ", "_"),
                                                                            args.seed))
            prof.export_chrome_trace(path)
            print("- %s:" % name)
            for kname, grid, block, smem, regs, count, mean in kernels(path):
                print("    %dx %.2f µs grid %s block %s smem %s regs %s  %s" % (
                    count, mean, list(grid), list(block), smem, regs, kname[:220]))
        sys.stdout.flush()
        del pools, per_set, fns, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
