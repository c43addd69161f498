"""Session 97: host time of flash_attn_with_kvcache and the decode wrapper's run() in the build before their
outputs and stream moved into the binding (ee96a22, `prev`) and after (`new`), one process per build. Rows:
flash_attn_with_kvcache on the single decode's views (GQA 32/8, 1k and 8k keys), and over a paged cache (pages of 16
in a random order: GQA 8 batch 1 / 1k, batch 32 / 8k, MHA batch 8 / 8k) beside the wrapper's run() on the same pages
and FlashInfer's. Variants: the op called directly with its out and a workspace given (`ws`, the same code path in
both builds), the public calls with and without the LSE, run(out=), run() and run(return_lse=True). 400 calls per
sample after 50 warm, 15 rounds interleaved (reversed every other round); medians, and each variant's paired
difference from `ws` within a round (median, range). The public calls' outputs are checked bitwise against `ws`."""
import statistics
import sys
import time

import torch

import fastattn

try:
    import flashinfer as fi
except Exception:  # noqa: BLE001
    fi = None

label = sys.argv[1]
D = 128


def timed(fn, n=400):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return dt


def measure(variants, rounds=15):
    for fn in variants.values():
        for _ in range(50):
            fn()
    torch.cuda.synchronize()
    names = list(variants)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            samples[n].append(timed(variants[n]))
    return samples


def report(title, samples):
    parts = []
    for n, xs in samples.items():
        s = f"{n} {statistics.median(xs):.2f}"
        if n != "ws":
            d = [a - b for a, b in zip(xs, samples["ws"])]
            s += f" (- ws {statistics.median(d):.2f}, {min(d):.2f} to {max(d):.2f})"
        parts.append(s)
    print(f"[{label}] {title} | " + " | ".join(parts), flush=True)


def same(a, b):
    torch.cuda.synchronize()
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


print(f"[{label}] fastattn from {fastattn.__file__}", flush=True)
op = fastattn._C.kvcache_attention_forward
stream = torch.cuda.current_stream().cuda_stream
ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
torch.manual_seed(97)
kvc = fastattn.flash_attn_with_kvcache

for name, n in (("views GQA 32/8 L1k", 1024), ("views GQA 32/8 L8k", 8192)):
    q4 = torch.randn(1, 1, 32, D, device="cuda", dtype=torch.bfloat16)
    k4 = torch.randn(1, n, 8, D, device="cuda", dtype=torch.bfloat16)
    v4 = torch.randn(1, n, 8, D, device="cuda", dtype=torch.bfloat16)
    o4 = torch.empty_like(q4)
    op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream, workspace=ws)
    assert same(kvc(q4, k4, v4), o4) and same(kvc(q4, k4, v4, return_softmax_lse=True)[0], o4), name
    variants = {
        "ws": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream, workspace=ws),
        "kvcache": lambda: kvc(q4, k4, v4),
        "kvcache lse": lambda: kvc(q4, k4, v4, return_softmax_lse=True),
    }
    report(name, measure(variants))

for name, b, n, hq, hkv in (("paged GQA 8 b1 L1k", 1, 1024, 32, 8), ("paged GQA 8 b32 L8k", 32, 8192, 32, 8),
                            ("paged MHA b8 L8k", 8, 8192, 32, 32)):
    page = 16
    per = n // page
    pages = b * per
    perm = torch.randperm(pages, device="cuda").to(torch.int32)
    indptr = torch.arange(0, pages + 1, per, device="cuda", dtype=torch.int32)
    last = torch.full((b,), page, device="cuda", dtype=torch.int32)
    kv = torch.randn(pages, 2, page, hkv, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(b, hq, D, device="cuda", dtype=torch.bfloat16)
    q4 = q[:, None]
    out = torch.empty_like(q)
    o4 = out[:, None]
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"), "NHD")
    w.plan(indptr, perm, last, hq, hkv, D, page, data_type=torch.bfloat16)
    table = perm.view(b, per)
    lens = torch.full((b,), n, device="cuda", dtype=torch.int32)
    kc, vc = kv[:, 0], kv[:, 1]
    direct = dict(q=q4, k_cache=kc, v_cache=vc, out=o4, cache_seqlens=lens, block_table=table, cuda_stream=stream,
                  workspace=ws)
    op(**direct)
    assert same(kvc(q4, kc, vc, cache_seqlens=lens, block_table=table), o4), name
    assert same(w.run(q, kv), out) and same(w.run(q, kv, return_lse=True)[0], out), name
    variants = {
        "ws": lambda: op(**direct),
        "kvcache": lambda: kvc(q4, kc, vc, cache_seqlens=lens, block_table=table),
        "kvcache lse": lambda: kvc(q4, kc, vc, cache_seqlens=lens, block_table=table, return_softmax_lse=True),
        "run(out=)": lambda: w.run(q, kv, out=out),
        "run()": lambda: w.run(q, kv),
        "run() lse": lambda: w.run(q, kv, return_lse=True),
    }
    if fi is not None:
        fw = fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"), "NHD")
        fw.plan(indptr, perm, last, hq, hkv, D, page, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        fo = torch.empty_like(q)
        variants["FI run(out=)"] = lambda: fw.run(q, kv, out=fo)
        variants["FI run()"] = lambda: fw.run(q, kv)
        variants["FI run() lse"] = lambda: fw.run(q, kv, return_lse=True)
    report(name, measure(variants))
print(f"[{label}] done", flush=True)
