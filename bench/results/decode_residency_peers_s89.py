"""Session 89: the decode wrapper beside FlashInfer 0.5.3's decode wrapper (tensor cores and CUDA cores) at
the shapes whose heuristic splits no longer merge in clusters that do not all fit (38-44 (sequence, KV head)
items at one query row), and at two controls. Session 88's scales_peers.py with the plain call only.

Per shape (bf16, head_dim 128, pages of 16, NHD), the suite's input sets rotated call by call, interleaved rounds
behind a GPU sleep (gpu_decode.time_interleaved). Each output checked first against a float32 reference, max abs
error <= 2e-2.

    python residency_peers.py [--json PATH] [--rounds N]
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

SHAPES = ((32, 8, 5, 1024), (32, 8, 5, 2048), (32, 8, 5, 4096), (32, 8, 5, 8192), (32, 4, 10, 2048), (32, 4, 10, 4096),
          (32, 2, 20, 2048), (32, 8, 4, 2048), (32, 4, 9, 4096))
CALLS = {"plain": {}}


def reference(s):
    b, hq, d = s.q.shape
    ids = s.indices.view(b, -1).long()
    k = s.nhd[ids, 0].flatten(1, 2).transpose(1, 2)
    v = s.nhd[ids, 1].flatten(1, 2).transpose(1, 2)
    return G.reference_f32(torch, s.q.float()[:, None], k, v)[:, 0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    fi = gpu_decode_flashinfer.load()
    settings = G.Settings(rounds=args.rounds)
    sleeper = G.make_sleeper(torch)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(89)
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
        fws2 = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")
        theirs = [L.flashinfer_wrapper(fi, fws, s, "NHD", hq, hkv, True) for s in sets]
        try:  # FlashInfer's CUDA-core decode takes groups up to 8
            theirs_cc = [L.flashinfer_wrapper(fi, fws2, s, "NHD", hq, hkv, False) for s in sets]
        except RuntimeError as e:
            print("%d/%d b%d L%d: FlashInfer's CUDA-core decode refused (%s)" % (
                hq, hkv, batch, n, str(e).strip().splitlines()[-1][-60:]), flush=True)
            theirs_cc = []
        refs = [reference(s) for s in sets]
        fns, errs = {}, {}
        for impl, ws_list in (("ours", ours), ("fi", theirs), ("ficc", theirs_cc)):
            if not ws_list:
                continue
            for call, kw in CALLS.items():
                outs = [torch.full_like(s.q, float("nan")) for s in sets]
                for w, s, o in zip(ws_list, sets, outs):
                    w.run(s.q, s.nhd, out=o, **kw)
                torch.cuda.synchronize()
                err = max(float((o.float() - r).abs().max()) for o, r in zip(outs, refs))
                key = "%s-%s" % (impl, call)
                errs[key] = err
                if not err <= 2e-2:
                    raise AssertionError("%s at %s: max error %.3g" % (key, (hq, hkv, batch, n), err))
                fns[key] = L.rotating([(lambda w=w, s=s, o=o, kw=kw: w.run(s.q, s.nhd, out=o, **kw))
                                       for w, s, o in zip(ws_list, sets, outs)])
        G.rewarm_gpu(torch)
        stats = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
        rec = dict(heads_q=hq, heads_kv=hkv, batch=batch, cache_len=n, kv_bytes=kv_bytes,
                   impls={k: dict(s=v["s"], tbps=kv_bytes / v["s"] / 1e12, max_err=errs[k])
                          for k, v in stats.items()})
        records.append(rec)
        us = {k: stats[k]["s"] * 1e6 for k in sorted(stats, key=lambda k: (k[0] != "o", k))}
        print("%d/%d b%d L%d  " % (hq, hkv, batch, n) + "  ".join("%s %.2f" % kv for kv in us.items())
              + "  | fi tensor cores / ours %.3f, fi CUDA cores / ours %s" % (
                  us["fi-plain"] / us["ours-plain"],
                  "%.3f" % (us["ficc-plain"] / us["ours-plain"]) if "ficc-plain" in us else "n/a"), flush=True)
        del sets, ours, theirs, theirs_cc, refs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=torch.cuda.get_device_name(), records=records), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
