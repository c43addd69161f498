"""Session 96, third run: (a) the one row that missed the corrected rule, varlen decode at paged GQA 8 batch 32 /
8k, with the varlen op called directly given a workspace (`ws`) and with workspace_from_q (`table`) beside the
public call; (b) where single_decode's gain comes from: the op on pre-made views with keywords (`ws`, given
workspace; `table`, workspace_from_q), the same with the five views made in the call (`views+kw`, session 95's
single_decode body), and in the new build `_C.single_decode_forward` with positional arguments (`positional op`)
and the public call. 400 calls per sample after 50 warm, 15 rounds, variants interleaved (reversed every other
round); medians, and each variant's paired difference from `ws` within a round."""
import statistics
import sys
import time

import torch

import fastattn

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


stream = torch.cuda.current_stream().cuda_stream
torch.manual_seed(961)
b, n, hq, hkv, page = 32, 8192, 32, 8, 16
per = n // page
table = torch.randperm(b * per, device="cuda").to(torch.int32).view(b, per)
kc = torch.randn(b * per, page, hkv, D, device="cuda", dtype=torch.bfloat16)
vc = torch.randn(b * per, page, hkv, D, device="cuda", dtype=torch.bfloat16)
q = torch.randn(b, hq, D, device="cuda", dtype=torch.bfloat16)
o = torch.empty_like(q)
cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
cu_k = torch.arange(b + 1, device="cuda", dtype=torch.int32) * n
ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
vop = fastattn._C.varlen_attention_forward
common = dict(q=q, cu_seqlens_q=cu_q, max_seqlen_q=1, k_pages=kc, v_pages=vc, block_table=table, cu_seqlens_k=cu_k,
              max_seqlen_k=n, out=o, cuda_stream=stream)
need = fastattn._C.varlen_workspace_bytes(**common)
report(f"varlen paged GQA 8 b32 L8k (workspace {need} bytes)", measure({
    "ws": lambda: vop(**common, workspace=ws),
    "table": lambda: vop(**common, workspace_from_q=True),
    "public varlen paged": lambda: fastattn.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 1, n, block_table=table),
}))

op = fastattn._C.kvcache_attention_forward
for name, n in (("single GQA 32/8 L1k", 1024), ("single GQA 32/8 L8k", 8192)):
    q = torch.randn(32, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, 8, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, 8, D, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(q)
    q4, k4, v4, o4 = q[None, None], k[None], v[None], o[None, None]
    scale = D ** -0.5
    variants = {
        "ws": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, softmax_scale=scale,
                         cuda_stream=stream, workspace=ws),
        "table": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, softmax_scale=scale,
                            cuda_stream=stream, workspace_from_q=True),
        "views+kw": lambda: op(q=q[None, None], k_cache=k[None], v_cache=v[None], out=o[None, None],
                               cache_seqlen=int(k.shape[0]), softmax_scale=scale, cuda_stream=stream,
                               workspace_from_q=True),
        "public single_decode": lambda: fastattn.single_decode_with_kv_cache(q, k, v),
    }
    if hasattr(fastattn._C, "single_decode_forward"):
        sd = fastattn._C.single_decode_forward
        variants["positional op"] = lambda: sd(q, k, v, o, None, False, scale, -1, 0.0, stream, 0, None, True)
    report(name, measure(variants))
print(f"[{label}] done", flush=True)
