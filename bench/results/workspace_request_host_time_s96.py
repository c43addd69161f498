"""Session 96: host time of the GPU kvcache / varlen / single-decode calls, run by the same script in the build
before (b70a051, the binding sizes the workspace itself) and after (the op asks the binding's allocator; the
single decode's views made by the binding), one process per build, in the order given on the command line. Each
process: 400 calls back to back after 50 warm calls, 9 rounds with the variants interleaved (order reversed
every other round), the median round, and each variant's paired difference from `ws` within a round (median, range). Rows: session 95's shapes, plus one varlen decode. `ws` and `table` are
the op called directly with a given workspace and with workspace_from_q (the allocator); their paired
difference is what the call pays for not being given its workspace."""
import statistics
import sys
import time

import torch

import fastattn

try:
    import flashinfer as fi
except Exception:  # noqa: BLE001
    fi = None

D = 128
label = sys.argv[1]


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


def report(title, samples):
    parts = []
    for n, xs in samples.items():
        s = f"{n} {statistics.median(xs):.2f}"
        if n != "ws" and "ws" in samples:  # paired within each round against the given-workspace op call
            d = [a - b for a, b in zip(xs, samples["ws"])]
            s += f" (- ws {statistics.median(d):.2f}, {min(d):.2f} to {max(d):.2f})"
        parts.append(s)
    print(f"[{label}] {title} | " + " | ".join(parts), flush=True)


print(f"[{label}] fastattn from {fastattn.__file__}, single_decode_forward: {hasattr(fastattn._C, 'single_decode_forward')}",
      flush=True)
op = fastattn._C.kvcache_attention_forward
stream = torch.cuda.current_stream().cuda_stream
torch.manual_seed(96)
for name, hq, hkv, n in (("single GQA 32/8 L1k", 32, 8, 1024), ("single GQA 32/8 L8k", 32, 8, 8192)):
    q = torch.randn(hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, D, device="cuda", dtype=torch.bfloat16)
    q4, k4, v4 = q[None, None], k[None], v[None]
    o4 = torch.empty_like(q4)
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    outs = [fastattn.single_decode_with_kv_cache(q, k, v)[None, None]]
    for kw in (dict(workspace=ws), dict(workspace_from_q=True)):
        op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream, **kw)
        outs.append(o4.clone())
    hnd = fastattn.single_decode_with_kv_cache(q, k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous(),
                                               kv_layout="HND")
    outs.append(hnd[None, None])
    assert all(torch.equal(outs[0].view(torch.int16), o.view(torch.int16)) for o in outs), name
    variants = {
        "table": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream,
                            workspace_from_q=True),
        "ws": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream, workspace=ws),
        "public single_decode": lambda: fastattn.single_decode_with_kv_cache(q, k, v),
        "public single_decode lse": lambda: fastattn.single_decode_with_kv_cache(q, k, v, return_lse=True),
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
    common = dict(q=q, k_cache=kc, v_cache=vc, out=o, cache_seqlens=lens, block_table=table, cuda_stream=stream)
    qv = q[:, 0]
    cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    cu_k = torch.arange(b + 1, device="cuda", dtype=torch.int32) * n
    variants = {
        "table": lambda: op(**common, workspace_from_q=True),
        "ws": lambda: op(**common, workspace=ws),
        "public kvcache paged": lambda: fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens,
                                                                         block_table=table),
        "public varlen paged": lambda: fastattn.flash_attn_varlen_func(qv, kc, vc, cu_q, cu_k, 1, n, block_table=table),
    }
    need = fastattn._C.kvcache_workspace_bytes(**common)
    report(f"{name} (workspace {need} bytes)", measure(variants))
print(f"[{label}] done", flush=True)
