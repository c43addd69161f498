"""Session 94: host time of one single_decode_with_kv_cache call on the GPU, against the calls it maps to and
FlashInfer's. Each variant: 50 warm calls, then 5 rounds of 400 calls back to back (the GPU work, 10-40 us a call,
is shorter than the host's, so the loop's wall time per call is the host's), the median round; then cProfile over
400 calls of ours (top entries by own time)."""
import cProfile
import io
import pstats
import statistics
import time

import torch

import fastattn
import flashinfer as fi

D = 128


def per_call(fn, n=400, rounds=5):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    res = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        res.append((time.perf_counter() - t0) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(res)


for name, hq, hkv, n in (("GQA 32/8 L1k", 32, 8, 1024), ("GQA 32/8 L8k", 32, 8, 8192), ("MHA 32/32 L32k", 32, 32, 32768)):
    q = torch.randn(hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, D, device="cuda", dtype=torch.bfloat16)
    q4, k4, v4 = q[None, None], k[None], v[None]
    ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    o4 = torch.empty_like(q4)
    stream = torch.cuda.current_stream().cuda_stream
    small = torch.zeros(16, device="cuda")
    op = fastattn._C.kvcache_attention_forward
    alloc = lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    variants = {
        "single_decode": lambda: fastattn.single_decode_with_kv_cache(q, k, v),
        "kvcache views": lambda: fastattn.flash_attn_with_kvcache(q4, k4, v4),
        "op+ws": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, workspace=ws, cuda_stream=stream),
        "op+alloc": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, workspace_alloc=alloc,
                               cuda_stream=stream),
        "op 1 split": lambda: op(q=q4, k_cache=k4, v_cache=v4, out=o4, cache_seqlen=n, num_splits=1,
                                 cuda_stream=stream),
        "fi default": lambda: fi.single_decode_with_kv_cache(q, k, v),
        "fi tc": lambda: fi.single_decode_with_kv_cache(q, k, v, use_tensor_cores=True),
        "torch add_": lambda: small.add_(1),
    }
    print(name, "  ".join("%s %.1f us" % (k_, per_call(f)) for k_, f in variants.items()), flush=True)
    if name == "GQA 32/8 L8k":
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(400):
            fastattn.single_decode_with_kv_cache(q, k, v)
        torch.cuda.synchronize()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        print(s.getvalue(), flush=True)
