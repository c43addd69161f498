"""Session 94: fastattn.single_decode_with_kv_cache against FlashInfer's single_decode_with_kv_cache.

One request, its query (Hq, 128) bf16 after its last key, keys and values contiguous (L, Hkv, 128)
("NHD") or (Hkv, L, 128) ("HND"). FlashInfer 0.5.3 with use_tensor_cores False (its default: the
CUDA-core decode kernel) and True (its prefill kernel). Correctness first, on the first input set:
each output against a float32 reference, max abs error <= 2e-2 (ours failing raises; a peer failing is
recorded and not timed). Timing: the decode suite's interleaved per-call event timing
(gpu_decode.time_interleaved: rounds queued behind a GPU sleep, so the figure is device time), input
sets rotated call by call (gpu_decode._n_sets) so that K/V come from HBM; the host time of one call
(the Python call and two event records) is recorded beside it.

KV bytes = L x Hkv x 128 x 2 (K and V) x 2 bytes; TB/s = KV bytes / median time.

    python single_decode_peers.py [--seed S] [--json PATH]
"""
import argparse
import json
import math
import random
import sys

import torch

import fastattn
from fastattn.bench import gpu_decode as G
from fastattn.bench import gpu_decode_layouts as L

D = 128
DEV = "cuda"
TOL = 2e-2
ROWS = [  # (name, Hq, Hkv, L)
    ("GQA 32/8 L1k", 32, 8, 1024), ("GQA 32/8 L8k", 32, 8, 8192), ("GQA 32/8 L32k", 32, 8, 32768),
    ("GQA 32/8 L128k", 32, 8, 131072), ("GQA 64/8 L8k", 64, 8, 8192), ("GQA 64/8 L32k", 64, 8, 32768),
    ("MHA 32/32 L1k", 32, 32, 1024), ("MHA 32/32 L8k", 32, 32, 8192), ("MHA 32/32 L32k", 32, 32, 32768),
]


def reference(q, k, v):
    """float32 attention of q (Hq, D) over k / v (L, Hkv, D): (Hq, D)."""
    g = q.shape[0] // k.shape[1]
    kk = k.float().repeat_interleave(g, dim=1)
    vv = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("hd,khd->hk", q.float(), kk) / math.sqrt(D)
    return torch.einsum("hk,khd->hd", torch.softmax(s, dim=-1), vv)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    import flashinfer as fi
    settings = G.Settings(rounds=5)
    sleeper = G.make_sleeper(torch)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copy = G.measure_copy(torch, settings, sleeper)
    print("%s, torch %s, flashinfer %s, copy %.2f TB/s, seed %d" % (
        torch.cuda.get_device_name(0), torch.__version__, fi.__version__, copy["tbps"], args.seed), flush=True)
    records = []
    for layout in ("NHD", "HND"):
        for name, hq, hkv, n in ROWS:
            kv_bytes = 2 * n * hkv * D * 2
            sets = G._n_sets(kv_bytes, l2)
            data = []
            for _ in range(sets):
                q = torch.randn(hq, D, device=DEV, dtype=torch.bfloat16)
                k = torch.randn(n, hkv, D, device=DEV, dtype=torch.bfloat16)
                v = torch.randn(n, hkv, D, device=DEV, dtype=torch.bfloat16)
                if layout == "HND":
                    k, v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
                data.append((q, k, v))
            impls = {
                "ours": lambda q, k, v: fastattn.single_decode_with_kv_cache(q, k, v, kv_layout=layout),
                "fi": lambda q, k, v: fi.single_decode_with_kv_cache(q, k, v, kv_layout=layout),
                "fi tc": lambda q, k, v: fi.single_decode_with_kv_cache(q, k, v, kv_layout=layout,
                                                                         use_tensor_cores=True),
            }
            q0, k0, v0 = data[0]
            kn, vn = (k0, v0) if layout == "NHD" else (k0.transpose(0, 1), v0.transpose(0, 1))
            ref = reference(q0, kn, vn)
            rec = {"row": "%s %s" % (name, layout), "layout": layout, "heads_q": hq, "heads_kv": hkv,
                   "keys": n, "kv_bytes": kv_bytes, "sets": sets, "us": {}, "tbps": {}, "host_us": {},
                   "errs": {}, "errors": {}}
            fns = {}
            for impl, fn in impls.items():
                try:
                    err = float((fn(q0, k0, v0).float() - ref).abs().max())
                except Exception as e:
                    if impl == "ours":
                        raise
                    rec["errors"][impl] = "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:200])
                    continue
                rec["errs"][impl] = err
                if not err <= TOL:
                    if impl == "ours":
                        raise AssertionError("%s: ours max abs error %.3g" % (rec["row"], err))
                    rec["errors"][impl] = "wrong output: max abs error %.3g" % err
                    continue
                fns[impl] = L.rotating([(lambda f=fn, d=d: f(*d)) for d in data])
            G.rewarm_gpu(torch)
            st = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
            for impl, s in st.items():
                rec["us"][impl] = s["s"] * 1e6
                rec["tbps"][impl] = kv_bytes / s["s"] / 1e12
                rec["host_us"][impl] = s["host_s"] * 1e6
            line = "%-22s" % rec["row"]
            for impl in impls:
                if impl in rec["us"]:
                    line += "  %-5s %8.1f us %5.2f TB/s (host %5.1f)" % (impl, rec["us"][impl], rec["tbps"][impl],
                                                                         rec["host_us"][impl])
                    if impl != "ours":
                        line += " x%.3f" % (rec["us"][impl] / rec["us"]["ours"])
                else:
                    line += "  %-5s n/a (%s)" % (impl, rec["errors"].get(impl))
            print(line, flush=True)
            records.append(rec)
            del data
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "flashinfer": fi.__version__,
                       "copy_tbps": copy["tbps"], "seed": args.seed, "records": records}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
