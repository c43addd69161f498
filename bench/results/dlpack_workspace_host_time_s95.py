"""Session 95: host time of the kvcache op's split-KV workspace three ways, the op called directly with torch tensors
(imported through the exchange table): given (`ws`), from a Python callback returning torch.empty (`callback`),
and allocated by the binding through torch's exchange table (`table`, workspace_from_q=True). Then the public calls
that now take the table's allocator, beside FlashInfer's. 400 calls back to back after 50 warm calls, 9 rounds with
the variants interleaved (order reversed every other round), the median round; paired differences against `table`."""
import statistics
import time

import torch

import fastattn

try:
    import flashinfer as fi
except Exception:  # noqa: BLE001
    fi = None

D = 128


def timed(fn, n=400):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return dt


def measure(variants, rounds=9):
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


def report(title, samples, base="table"):
    parts = []
    for n, xs in samples.items():
        s = f"{n} {statistics.median(xs):.1f}"
        if n != base and base in samples and not n.startswith("FI") and not n.startswith("public"):
            d = [a - b for a, b in zip(xs, samples[base])]
            s += f" (paired - {base} {statistics.median(d):.1f}, {min(d):.1f} to {max(d):.1f})"
        parts.append(s)
    print(title + " | " + " | ".join(parts), flush=True)


op = fastattn._C.kvcache_attention_forward
alloc = lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, device="cuda")  # noqa: E731
for name, hq, hkv, n in (("single GQA 32/8 L1k", 32, 8, 1024), ("single GQA 32/8 L8k", 32, 8, 8192)):
    q = torch.randn(hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, D, device="cuda", dtype=torch.bfloat16)
    q4, k4, v4 = q[None, None], k[None], v[None]
    o4 = torch.empty_like(q4)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    outs = []
    for kw in (dict(workspace=ws), dict(workspace_alloc=alloc), dict(workspace_from_q=True)):
        op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream, **kw)
        outs.append(o4.clone())
    assert all(torch.equal(outs[0].view(torch.int16), o.view(torch.int16)) for o in outs), name
    variants = {
        "table": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream,
                            workspace_from_q=True),
        "callback": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream,
                               workspace_alloc=alloc),
        "ws": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream, workspace=ws),
        "public single_decode": lambda: fastattn.single_decode_with_kv_cache(q, k, v),
        "public kvcache views": lambda: fastattn.flash_attn_with_kvcache(q4, k4, v4),
    }
    if fi is not None:
        variants["FI single"] = lambda: fi.single_decode_with_kv_cache(q, k, v)
    need = fastattn._C.kvcache_workspace_bytes(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream)
    report(f"{name} (workspace {need} bytes)", measure(variants))

for name, b, n, hq, hkv in (("paged GQA 8 b1 L1k", 1, 1024, 32, 8), ("paged GQA 8 b32 L8k", 32, 8192, 32, 8),
                            ("paged MHA b8 L8k", 8, 8192, 32, 32)):
    page = 16
    per = n // page
    pages = b * per
    table = torch.randperm(pages, device="cuda").to(torch.int32).view(b, per)
    kc = torch.randn(pages, page, hkv, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(pages, page, hkv, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(b, 1, hq, D, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(q)
    lens = torch.full((b,), n, device="cuda", dtype=torch.int32)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    common = dict(q=q, k_cache=kc, v_cache=vc, out=o, cache_seqlens=lens, block_table=table, cuda_stream=stream)
    variants = {
        "table": lambda: op(**common, workspace_from_q=True),
        "callback": lambda: op(**common, workspace_alloc=alloc),
        "ws": lambda: op(**common, workspace=ws),
        "public kvcache paged": lambda: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens,
                                                                         block_table=table),
    }
    need = fastattn._C.kvcache_workspace_bytes(**common)
    report(f"{name} (workspace {need} bytes)", measure(variants))
print("done", flush=True)
