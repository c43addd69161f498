"""The decode wrapper in FlashInfer's two page layouts, NHD and HND, beside FlashInfer's wrappers.

    python -m fastattn.bench.gpu_decode_layouts [--flashinfer] [--rounds N] [--out DIR]

``BatchDecodeWithPagedKVCacheWrapper`` takes pages (P, 2, page_size, Hkv, D) ("NHD") or
(P, 2, Hkv, page_size, D) ("HND"); it hands the kernels HND pages as strided views. Each shape
(bf16, head_dim 128, pages of 16, rows of the decode suite) gets input sets of q, CSR page lists
over a random pool and the pool in both layouts (the HND pool a copy of the NHD one: the same
pages, the same ids). Timed, interleaved in rounds behind a GPU sleep as the decode suite times
(``gpu_decode.time_interleaved``), the input sets rotated call by call: ``run(q, pages, out=)``
of fastattn's wrapper planned for each layout, and with ``--flashinfer`` FlashInfer's CUDA-core
and tensor-core decode wrappers planned for each layout on the same pools. Every output is checked
against a float32 reference first. Reported: time, KV bytes/s, HND / NHD for each wrapper and
FlashInfer's time over fastattn's in each layout.
"""
import argparse
import datetime
import json
import math
import os
import sys

from . import gpu_decode as G

PAGE = 16
HEAD_DIM = 128
# (heads_q, heads_kv, batch, cache_len): rows of the decode suite, small and large.
SHAPES = ((32, 8, 1, 1024), (32, 8, 32, 8192), (32, 8, 8, 32768), (32, 8, 128, 8192),
          (32, 32, 1, 1024), (32, 32, 8, 8192), (32, 32, 128, 1024))
LAYOUTS = ("NHD", "HND")
TOLERANCE = 2e-2  # bf16 output against the float32 reference (max abs, unit-variance inputs)


class InputSet:
    """q (B, Hq, D); a pool of the batch's pages in a random order, NHD (P, 2, 16, Hkv, D) and the
    same pages HND (P, 2, Hkv, 16, D); CSR lists (indptr, indices, last_page_len) int32."""

    def __init__(self, torch, hq, hkv, batch, cache_len, gen, device="cuda", head_dim=HEAD_DIM):
        dev = torch.device(device)
        pages_per_seq = cache_len // PAGE
        num_pages = batch * pages_per_seq
        self.nhd = torch.randn(num_pages, 2, PAGE, hkv, head_dim, generator=gen, device=dev,
                               dtype=torch.bfloat16)
        self.hnd = self.nhd.transpose(2, 3).contiguous()
        self.q = torch.randn(batch, hq, head_dim, generator=gen, device=dev, dtype=torch.bfloat16)
        self.indices = torch.randperm(num_pages, generator=gen, device=dev).to(torch.int32)
        self.indptr = torch.arange(0, num_pages + 1, pages_per_seq, device=dev, dtype=torch.int32)
        self.last = torch.full((batch,), PAGE, device=dev, dtype=torch.int32)

    def pages(self, layout):
        return self.nhd if layout == "NHD" else self.hnd

    def reference(self, torch):
        """float32 attention of each request's query over its keys: (B, Hq, D)."""
        b, hq, d = self.q.shape
        ids = self.indices.view(b, -1).long()
        k = self.nhd[ids, 0].flatten(1, 2).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.nhd[ids, 1].flatten(1, 2).transpose(1, 2)
        return G.reference_f32(torch, self.q[:, None], k, v)[:, 0]


def fastattn_wrapper(fastattn, workspace, s, layout, hq, hkv):
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace, layout)
    w.plan(s.indptr, s.indices, s.last, hq, hkv, s.q.shape[2], PAGE, q_data_type=s.q.dtype)
    return w


def flashinfer_wrapper(fi, workspace, s, layout, hq, hkv, tensor_cores):
    w = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, layout, use_tensor_cores=tensor_cores)
    w.plan(s.indptr, s.indices, s.last, hq, hkv, HEAD_DIM, PAGE, q_data_type=s.q.dtype,
           kv_data_type=s.q.dtype, sm_scale=1.0 / math.sqrt(HEAD_DIM))
    return w


def rotating(calls):
    """One callable that makes the next of `calls` each time (input sets call by call)."""
    state = {"i": 0}

    def call():
        fn = calls[state["i"] % len(calls)]
        state["i"] += 1
        return fn()
    return call


def measure_shape(torch, fastattn, fi, shape, settings, sleeper, gen, log):
    hq, hkv, batch, cache_len = shape
    kv_bytes = G.kv_cache_bytes(batch, cache_len, hkv, HEAD_DIM)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    # The suite's rotation (gpu_decode._n_sets); three sets where one is over 1 GiB (each set
    # holds its pages twice, NHD and HND).
    n_sets = G._n_sets(kv_bytes, l2, fit=3 if kv_bytes > (1 << 30) else None)
    sets = [InputSet(torch, hq, hkv, batch, cache_len, gen) for _ in range(n_sets)]
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fi_workspace = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda") if fi else None
    impls = {}
    for layout in LAYOUTS:
        impls["fastattn-" + layout] = [
            (fastattn_wrapper(fastattn, workspace, s, layout, hq, hkv), s) for s in sets]
        if fi is not None:
            for name, tc in (("flashinfer-decode-", False), ("flashinfer-tc-", True)):
                impls[name + layout] = [
                    (flashinfer_wrapper(fi, fi_workspace, s, layout, hq, hkv, tc), s) for s in sets]
    refs = [s.reference(torch) for s in sets]  # one per set, shared by every implementation
    errors, fns = {}, {}
    for key, pairs in impls.items():
        layout = key.rsplit("-", 1)[1]
        outs = [torch.full_like(s.q, float("nan")) for _, s in pairs]
        for (w, s), out in zip(pairs, outs):
            w.run(s.q, s.pages(layout), out=out)
        torch.cuda.synchronize()
        errors[key] = max(float((o.float() - ref).abs().max()) for o, ref in zip(outs, refs))
        if not errors[key] <= TOLERANCE:
            raise AssertionError("%s at %s: max error %.3g against the float32 reference"
                                 % (key, shape, errors[key]))
        fns[key] = rotating([(lambda w=w, s=s, o=o, p=s.pages(layout): w.run(s.q, p, out=o))
                             for (w, s), o in zip(pairs, outs)])
    G.rewarm_gpu(torch)
    stats = G.time_interleaved(torch, fns, settings, settings.budget_s, sleeper)
    rec = {"heads_q": hq, "heads_kv": hkv, "batch": batch, "cache_len": cache_len, "page_size": PAGE,
           "head_dim": HEAD_DIM, "kv_bytes": kv_bytes, "input_sets": len(sets), "impls": {}}
    for key, st in stats.items():
        rec["impls"][key] = dict(s=st["s"], tbps=kv_bytes / st["s"] / 1e12, max_err=errors[key],
                                 round_medians_s=st.get("round_medians_s"),
                                 host_bound_rounds=st.get("host_bound_rounds"))
    log(brief(rec))
    del sets, refs
    torch.cuda.empty_cache()
    return rec


def brief(rec):
    im = rec["impls"]
    parts = ["%s/%s b%d L%d" % (rec["heads_q"], rec["heads_kv"], rec["batch"], rec["cache_len"])]
    for key in im:
        parts.append("%s %.1f us" % (key, im[key]["s"] * 1e6))
    return "  ".join(parts)


def format_table(records):
    keys = [k for k in records[0]["impls"]]
    head = "| shape | " + " | ".join("%s µs (TB/s)" % k for k in keys) + " | fastattn HND / NHD |"
    for fam in ("flashinfer-decode", "flashinfer-tc"):
        if fam + "-NHD" in keys:
            head += " %s / fastattn, NHD | %s / fastattn, HND |" % (fam, fam)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        im = r["impls"]
        cells = ["%d/%d b%d L%d" % (r["heads_q"], r["heads_kv"], r["batch"], r["cache_len"])]
        cells += ["%.1f (%.2f)" % (im[k]["s"] * 1e6, im[k]["tbps"]) for k in keys]
        cells.append("%.3f" % (im["fastattn-HND"]["s"] / im["fastattn-NHD"]["s"]))
        for fam in ("flashinfer-decode", "flashinfer-tc"):
            if fam + "-NHD" in im:
                cells += ["%.3f" % (im[fam + "-" + lay]["s"] / im["fastattn-" + lay]["s"])
                          for lay in LAYOUTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flashinfer", action="store_true", help="also time FlashInfer's wrappers")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="directory for the JSON (none: no file)")
    args = ap.parse_args(argv)
    import torch
    import fastattn
    fi = None
    if args.flashinfer:
        from . import gpu_decode_flashinfer
        fi = gpu_decode_flashinfer.load()
    settings = G.Settings(rounds=args.rounds)
    sleeper = G.make_sleeper(torch)
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    copy = G.measure_copy(torch, settings, sleeper)
    print("copy %.2f TB/s" % copy["tbps"], flush=True)
    records = [measure_shape(torch, fastattn, fi, shape, settings, sleeper, gen,
                             lambda m: print(m, flush=True)) for shape in SHAPES]
    table = format_table(records)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join(args.out, "bench_cuda_%s_decode_layouts.json" % stamp)
        with open(path, "w") as f:
            json.dump({"argv": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(0),
                       "gpu_uuid": str(getattr(torch.cuda.get_device_properties(0), "uuid", "")),
                       "copy_tbps": copy["tbps"], "flashinfer": getattr(fi, "__version__", None),
                       "seed": args.seed, "records": records, "table": table}, f, indent=1)
        print("wrote", path)


if __name__ == "__main__":
    main()
