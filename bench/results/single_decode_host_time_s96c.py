"""Session 96, fourth run: single_decode_with_kv_cache's host time in the build before its checks, outputs and
stream moved into the binding (e8c1755, `prev`) and after (`new`), one process per build. Rows: GQA 32/8, head_dim
128, bf16, 1k and 8k keys (NHD), and 8k in HND. Variants: the op called directly on pre-made views with a given
workspace (`ws`, the same code path in both builds), the public call with and without the LSE, and FlashInfer's.
400 calls per sample after 50 warm, 15 rounds interleaved (reversed every other round); medians, and each
variant's paired difference from `ws` within a round (median, range)."""
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


print(f"[{label}] fastattn from {fastattn.__file__}", flush=True)
op = fastattn._C.kvcache_attention_forward
stream = torch.cuda.current_stream().cuda_stream
ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
torch.manual_seed(962)
for name, n, layout in (("single GQA 32/8 L1k", 1024, "NHD"), ("single GQA 32/8 L8k", 8192, "NHD"),
                        ("single GQA 32/8 L8k HND", 8192, "HND")):
    q = torch.randn(32, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, 8, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, 8, D, device="cuda", dtype=torch.bfloat16)
    if layout == "HND":
        k_in, v_in = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
        k4, v4 = k_in.transpose(0, 1)[None], v_in.transpose(0, 1)[None]
    else:
        k_in, v_in, k4, v4 = k, v, k[None], v[None]
    o = torch.empty_like(q)
    q4, o4 = q[None, None], o[None, None]
    op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream, workspace=ws)
    public, lse = fastattn.single_decode_with_kv_cache(q, k_in, v_in, kv_layout=layout, return_lse=True)
    assert torch.equal(public.view(torch.int16), o.view(torch.int16)), name
    variants = {
        "ws": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, cuda_stream=stream, workspace=ws),
        "public single_decode": lambda: fastattn.single_decode_with_kv_cache(q, k_in, v_in, kv_layout=layout),
        "public single_decode lse": lambda: fastattn.single_decode_with_kv_cache(q, k_in, v_in, kv_layout=layout,
                                                                                 return_lse=True),
    }
    if fi is not None:
        variants["FI single"] = lambda: fi.single_decode_with_kv_cache(q, k_in, v_in, kv_layout=layout)
    report(name, measure(variants))
print(f"[{label}] done", flush=True)
