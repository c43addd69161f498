"""Session 88: run(q_scale=, k_scale=, v_scale=) of the decode wrapper, timed beside FlashInfer 0.5.3.

FlashInfer folds q_scale * k_scale into sm_scale and multiplies out by v_scale after its kernel
(`out *= v_scale`, whenever v_scale is not None); vLLM's FlashInfer backend passes k_scale = v_scale
= 1.0 for 16-bit caches. fastattn's wrapper folds the same way and skips the multiply at 1.0.

Per shape (bf16, head_dim 128, pages of 16, NHD, rows of the decode suite), the suite's input sets
rotated call by call, interleaved rounds behind a GPU sleep (gpu_decode.time_interleaved):
  ours-plain   run(q, pages, out=o)
  ours-vllm    run(..., k_scale=1.0, v_scale=1.0)
  ours-scaled  run(..., q_scale=1.0, k_scale=0.7, v_scale=1.3)
and the same three for FlashInfer's tensor-core decode wrapper (fi-*). Each output checked first
against a float32 reference (scaled: q * 0.7 and out * 1.3), max abs error <= 2e-2.

    python scales_peers.py [--json PATH] [--rounds N] [--reverse]
"""
import argparse
import json
import math
import sys

import torch

import fastattn
from fastattn.bench import gpu_decode as G
from fastattn.bench import gpu_decode_flashinfer
from fastattn.bench import gpu_decode_layouts as L

SHAPES = ((32, 8, 1, 1024), (32, 8, 8, 8192), (32, 8, 32, 8192), (32, 8, 128, 1024), (32, 32, 8, 8192))
KS, VS = 0.7, 1.3
CALLS = {"plain": {}, "vllm": dict(k_scale=1.0, v_scale=1.0),
         "scaled": dict(q_scale=1.0, k_scale=KS, v_scale=VS)}


def reference(s, scaled):
    b, hq, d = s.q.shape
    ids = s.indices.view(b, -1).long()
    k = s.nhd[ids, 0].flatten(1, 2).transpose(1, 2)
    v = s.nhd[ids, 1].flatten(1, 2).transpose(1, 2)
    q = s.q.float() * (KS if scaled else 1.0)
    return G.reference_f32(torch, q[:, None], k, v)[:, 0] * (VS if scaled else 1.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reverse", action="store_true", help="time the six calls in the reverse order")
    args = ap.parse_args()
    fi = gpu_decode_flashinfer.load()
    settings = G.Settings(rounds=args.rounds)
    sleeper = G.make_sleeper(torch)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(88)
    print(torch.cuda.get_device_name(), "flashinfer", getattr(fi, "__version__", None), flush=True)
    records = []
    for hq, hkv, batch, n in SHAPES:
        kv_bytes = G.kv_cache_bytes(batch, n, hkv, L.HEAD_DIM)
        n_sets = G._n_sets(kv_bytes, torch.cuda.get_device_properties(0).L2_cache_size,
                           fit=3 if kv_bytes > (1 << 30) else None)
        sets = [L.InputSet(torch, hq, hkv, batch, n, gen) for _ in range(n_sets)]
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        fws = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
        ours = [L.fastattn_wrapper(fastattn, ws, s, "NHD", hq, hkv) for s in sets]
        theirs = [L.flashinfer_wrapper(fi, fws, s, "NHD", hq, hkv, True) for s in sets]
        refs = {c: [reference(s, c == "scaled") for s in sets] for c in ("plain", "scaled")}
        fns, errs = {}, {}
        for impl, ws_list in (("ours", ours), ("fi", theirs)):
            for call, kw in CALLS.items():
                outs = [torch.full_like(s.q, float("nan")) for s in sets]
                for w, s, o in zip(ws_list, sets, outs):
                    w.run(s.q, s.nhd, out=o, **kw)
                torch.cuda.synchronize()
                want = refs["scaled" if call == "scaled" else "plain"]
                err = max(float((o.float() - r).abs().max()) for o, r in zip(outs, want))
                key = "%s-%s" % (impl, call)
                errs[key] = err
                if not err <= 2e-2:
                    raise AssertionError("%s at %s: max error %.3g" % (key, (hq, hkv, batch, n), err))
                fns[key] = L.rotating([(lambda w=w, s=s, o=o, kw=kw: w.run(s.q, s.nhd, out=o, **kw))
                                       for w, s, o in zip(ws_list, sets, outs)])
        if args.reverse:
            fns = dict(reversed(list(fns.items())))
        G.rewarm_gpu(torch)
        stats = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        rec = dict(heads_q=hq, heads_kv=hkv, batch=batch, cache_len=n, kv_bytes=kv_bytes,
                   impls={k: dict(s=v["s"], tbps=kv_bytes / v["s"] / 1e12, max_err=errs[k])
                          for k, v in stats.items()})
        records.append(rec)
        us = {k: stats[k]["s"] * 1e6 for k in sorted(stats, key=lambda k: (k[0] != "o", k))}
        print("%d/%d b%d L%d  " % (hq, hkv, batch, n) + "  ".join("%s %.2f" % kv for kv in us.items())
              + "  | fi/ours plain %.3f vllm %.3f scaled %.3f" % tuple(
                  us["fi-" + c] / us["ours-" + c] for c in CALLS), flush=True)
        del sets, ours, theirs, refs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), records=records), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
