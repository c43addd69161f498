"""Session 98, third run: host time of flash_attn_varlen_func, flash_attn_func and flash_attn_with_kvcache in three
builds, one process per build: before the varlen / dense outputs and stream moved into the binding (5ea7643, `prev`),
after (b9d33bb, `mid`), and with the Python fast path for torch tensors (b55b0de, `next`). Rows: the varlen decode
over a paged cache (pages of 16 in a random order, one query row per sequence: GQA 8 batch 1 / 1k, batch 32 / 8k,
MHA batch 8 / 8k), packed causal varlen prefill (4 sequences of 128, GQA 32/8), flash_attn_func (batch 1, 128
causal, GQA 32/8), and flash_attn_with_kvcache over the same kinds of pages (GQA 8 batch 1 / 1k, batch 32 / 8k, MHA
batch 8 / 8k). Variants: the op called directly with its out (and for the decode a workspace) given (`ws`, the
same code path in every build), the public call without out=, with the LSE, and with out=. 400 calls per sample
after 50 warm, 15 rounds interleaved (reversed every other round); medians, and each variant's paired difference
from `ws` within a round (median, range). The public calls' outputs are checked bitwise against `ws`."""
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


def same(a, b):
    torch.cuda.synchronize()
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


print(f"[{label}] fastattn from {fastattn.__file__}", flush=True)
varlen_op = fastattn._C.varlen_attention_forward
dense_op = fastattn._C.attention_forward
stream = torch.cuda.current_stream().cuda_stream
ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
torch.manual_seed(98)
varlen = fastattn.flash_attn_varlen_func

for name, b, n, hq, hkv in (("varlen decode GQA 8 b1 L1k", 1, 1024, 32, 8),
                            ("varlen decode GQA 8 b32 L8k", 32, 8192, 32, 8),
                            ("varlen decode MHA b8 L8k", 8, 8192, 32, 32)):
    page = 16
    per = n // page
    pages = b * per
    table = torch.randperm(pages, device="cuda").to(torch.int32).view(b, per)
    kv = torch.randn(pages, 2, page, hkv, D, device="cuda", dtype=torch.bfloat16)
    kc, vc = kv[:, 0], kv[:, 1]
    q = torch.randn(b, hq, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    used = torch.full((b,), n, device="cuda", dtype=torch.int32)
    direct = dict(q=q, cu_seqlens_q=cu_q, max_seqlen_q=1, k_pages=kc, v_pages=vc, block_table=table,
                  seqused_k=used, max_seqlen_k=n, out=out, cuda_stream=stream, workspace=ws)
    varlen_op(**direct)
    assert same(varlen(q, kc, vc, cu_q, None, 1, n, block_table=table, seqused_k=used), out), name
    assert same(varlen(q, kc, vc, cu_q, None, 1, n, block_table=table, seqused_k=used,
                       return_softmax_lse=True)[0], out), name
    o2 = torch.empty_like(q)
    variants = {
        "ws": lambda: varlen_op(**direct),
        "varlen": lambda: varlen(q, kc, vc, cu_q, None, 1, n, block_table=table, seqused_k=used),
        "varlen lse": lambda: varlen(q, kc, vc, cu_q, None, 1, n, block_table=table, seqused_k=used,
                                     return_softmax_lse=True),
        "varlen(out=)": lambda: varlen(q, kc, vc, cu_q, None, 1, n, block_table=table, seqused_k=used, out=o2),
    }
    report(name, measure(variants))

# packed causal prefill: 4 sequences of 128
lens = 4 * [128]
total = sum(lens)
cu = torch.tensor([0, 128, 256, 384, 512], device="cuda", dtype=torch.int32)
q = torch.randn(total, 32, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(total, 8, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn(total, 8, D, device="cuda", dtype=torch.bfloat16)
out, o2 = torch.empty_like(q), torch.empty_like(q)
direct = dict(q=q, cu_seqlens_q=cu, max_seqlen_q=128, k=k, v=v, cu_seqlens_k=cu, max_seqlen_k=128, out=out,
              causal=True, cuda_stream=stream)
varlen_op(**direct)
assert same(varlen(q, k, v, cu, cu, 128, 128, causal=True), out)
variants = {
    "ws": lambda: varlen_op(**direct),
    "varlen": lambda: varlen(q, k, v, cu, cu, 128, 128, causal=True),
    "varlen lse": lambda: varlen(q, k, v, cu, cu, 128, 128, causal=True, return_softmax_lse=True),
    "varlen(out=)": lambda: varlen(q, k, v, cu, cu, 128, 128, causal=True, out=o2),
}
report("varlen packed 4 x 128 causal GQA 32/8", measure(variants))

# flash_attn_func: batch 1, 128 causal
q = torch.randn(1, 128, 32, D, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, 128, 8, D, device="cuda", dtype=torch.bfloat16)
v = torch.randn(1, 128, 8, D, device="cuda", dtype=torch.bfloat16)
out, o2 = torch.empty_like(q), torch.empty_like(q)
dense_op(q, k, v, out, causal=True, cuda_stream=stream)
assert same(fastattn.flash_attn_func(q, k, v, causal=True), out)
variants = {
    "ws": lambda: dense_op(q, k, v, out, causal=True, cuda_stream=stream),
    "func": lambda: fastattn.flash_attn_func(q, k, v, causal=True),
    "func lse": lambda: fastattn.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True),
    "func(out=)": lambda: fastattn.flash_attn_func(q, k, v, causal=True, out=o2),
}
report("func b1 128 causal GQA 32/8", measure(variants))
kvc = fastattn.flash_attn_with_kvcache
kv_op = fastattn._C.kvcache_attention_forward
for name, b, n, hq, hkv in (("kvcache paged GQA 8 b1 L1k", 1, 1024, 32, 8),
                            ("kvcache paged GQA 8 b32 L8k", 32, 8192, 32, 8),
                            ("kvcache paged MHA b8 L8k", 8, 8192, 32, 32)):
    page = 16
    per = n // page
    pages = b * per
    table = torch.randperm(pages, device="cuda").to(torch.int32).view(b, per)
    kv = torch.randn(pages, 2, page, hkv, D, device="cuda", dtype=torch.bfloat16)
    kc, vc = kv[:, 0], kv[:, 1]
    q4 = torch.randn(b, 1, hq, D, device="cuda", dtype=torch.bfloat16)
    o4, o5 = torch.empty_like(q4), torch.empty_like(q4)
    lens = torch.full((b,), n, device="cuda", dtype=torch.int32)
    direct = dict(q=q4, k_cache=kc, v_cache=vc, out=o4, cache_seqlens=lens, block_table=table, cuda_stream=stream,
                  workspace=ws)
    kv_op(**direct)
    assert same(kvc(q4, kc, vc, cache_seqlens=lens, block_table=table), o4), name
    variants = {
        "ws": lambda: kv_op(**direct),
        "kvcache": lambda: kvc(q4, kc, vc, cache_seqlens=lens, block_table=table),
        "kvcache lse": lambda: kvc(q4, kc, vc, cache_seqlens=lens, block_table=table, return_softmax_lse=True),
        "kvcache(out=)": lambda: kvc(q4, kc, vc, cache_seqlens=lens, block_table=table, out=o5),
    }
    report(name, measure(variants))
print(f"[{label}] done", flush=True)
