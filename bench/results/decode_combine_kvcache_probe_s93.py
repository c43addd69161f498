"""Session 93: flash_attn_with_kvcache calls at MHA that the heuristic splits with more than 1584 split rows, where
session 91's rule sends the merge to the warp-per-row combine: that kernel ("rows", FASTATTN_DECODE_COMBINE=rows)
against the CTA-per-row one ("cta") and the rule's choice ("rule", unset), interleaved in one process (the suite's
event timing). MHA 32/32, head_dim 128, bf16, one query row, a contiguous cache of `cap` slots (the heuristic's
bound); lengths all cap ("full") or one cap and the rest 0-300 ("ragged", as test_head_group_rows_form_is_taken).
Outputs are checked against the float32 reference (max abs error <= 2e-2), rows' against cta's bit for bit, and
the kernels the rule ran are read from the profiler.

    python combine_kvcache_probe.py --seed S --json PATH
"""
import argparse
import json
import math
import os
import random

import torch

import fastattn
from fastattn.bench import gpu_decode as G
from fastattn.bench import gpu_decode_layouts as L

ROWS = [(64, 16384, "full"), (64, 16384, "ragged"), (12, 16384, "full"), (16, 16384, "full"), (64, 32768, "full")]
SWITCH = "FASTATTN_DECODE_COMBINE"
H, D, TOL = 32, 128, 2e-2


def with_switch(value, fn):
    def call():
        if value is None:
            os.environ.pop(SWITCH, None)
        else:
            os.environ[SWITCH] = value
        fn()
    return call


def short_name(name):
    """A kernel's name without namespaces, template arguments or parameters: 'combine_rows_kernel'."""
    head = name.split("<")[0].split("(anonymous namespace)::")[-1]
    return head.split("::")[-1].replace("void ", "")


def kernels_of(fn):
    """The short names of the CUDA kernels one call of fn launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({short_name(e.name) for e in prof.events() if e.device_type.name == "CUDA"})


def reference(q, k, v, lens):
    """float32 (B, 1, H, D): each sequence's row over its first lens[b] keys (0 keys: 0)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        s = torch.einsum("hd,nhd->hn", q[b, 0].float(), k[b, :n].float()) / math.sqrt(D)
        out[b, 0] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v[b, :n].float())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    out = {"gpu": torch.cuda.get_device_name(0), "seed": args.seed, "rows": []}
    for b, cap, kind in ROWS:
        name = "MHA b%d cap%dk %s" % (b, cap // 1024, kind)
        torch.cuda.empty_cache()
        lens = [cap] * b if kind == "full" else [cap] + [rng.randint(0, 300) for _ in range(b - 1)]
        cache_bytes = 2 * b * cap * H * D * 2
        n_sets = G._n_sets(cache_bytes, l2, fit=3 if cache_bytes > (1 << 30) else None)
        n_sets = max(1, min(n_sets, int((torch.cuda.mem_get_info()[0] - (8 << 30)) // (cache_bytes * 1.01))))
        sets = []
        for _ in range(n_sets):
            k = torch.randn(b, cap, H, D, dtype=torch.bfloat16, device="cuda")
            v = torch.randn(b, cap, H, D, dtype=torch.bfloat16, device="cuda")
            q = torch.randn(b, 1, H, D, dtype=torch.bfloat16, device="cuda")
            seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
            o = torch.full_like(q, float("nan"))
            sets.append((q, k, v, seqlens, o))
        ref = reference(sets[0][0], sets[0][1], sets[0][2], lens)

        def call_of(s):
            q, k, v, seqlens, o = s
            return lambda: fastattn.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, out=o)

        calls = [call_of(s) for s in sets]
        fns, errs, outs = {}, {}, {}
        for value in (None, "cta", "rows"):
            label = value or "rule"
            sets[0][4].fill_(float("nan"))
            with_switch(value, calls[0])()
            torch.cuda.synchronize()
            errs[label] = float((sets[0][4].float() - ref).abs().max())
            assert errs[label] <= TOL, (name, label, errs[label])
            outs[label] = sets[0][4].clone()
            fns[label] = with_switch(value, L.rotating(calls))
        assert torch.equal(outs["rows"].view(torch.int16), outs["cta"].view(torch.int16)), name
        ran = {label: kernels_of(fn) for label, fn in fns.items()}
        G.rewarm_gpu(torch)
        st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        os.environ.pop(SWITCH, None)
        us = {k: s["s"] * 1e6 for k, s in st.items()}
        rec = {"row": name, "batch": b, "cap": cap, "lens": kind, "sets": n_sets, "us": us, "errs": errs,
               "kernels": ran}
        out["rows"].append(rec)
        print("%-24s rule %8.1f  cta %8.1f  rows %8.1f  rows/cta %.4f  rule/cta %.4f  rule ran %s" % (
            name, us["rule"], us["cta"], us["rows"], us["rows"] / us["cta"], us["rule"] / us["cta"],
            ",".join(ran["rule"])), flush=True)
        del ref, sets, calls, fns
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
