"""Session 95: host time of the decode calls with torch tensors described through DLPack's C exchange table
(the binding's new import, `table`) against capsules made by torch.utils.dlpack.to_dlpack in call_op (the path
before, `capsule`), in one process: call_op's mode is switched per measurement. Each measurement: 400 calls back
to back (the GPU work is shorter than the host's), after 50 warm calls; 9 rounds, the variants and the two modes
interleaved in each round; the median round. Outputs of the two modes are checked bitwise equal first."""
import statistics
import sys
import time

import torch
import torch.utils.dlpack

import fastattn
from fastattn import _tensors

try:
    import flashinfer as fi
except Exception:  # noqa: BLE001
    fi = None

D = 128
assert "__dlpack_c_exchange_api__" in torch.Tensor.__dict__, "torch without the exchange table"


def set_mode(mode):
    _tensors._TORCH_DLPACK = (torch.Tensor, torch.utils.dlpack.to_dlpack, mode == "table")


def timed(fn, n=400):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return dt


def measure(variants, rounds=9):
    """variants: name -> (fn, moded). Returns name -> {mode: median us}."""
    res = {name: {} for name in variants}
    for name, (fn, moded) in variants.items():
        for mode in (("table", "capsule") if moded else ("-",)):
            set_mode(mode if moded else "table")
            for _ in range(50):
                fn()
    torch.cuda.synchronize()
    samples = {(name, mode): [] for name, (fn, moded) in variants.items()
               for mode in (("table", "capsule") if moded else ("-",))}
    for r in range(rounds):
        order = ("table", "capsule") if r % 2 == 0 else ("capsule", "table")
        for name, (fn, moded) in variants.items():
            for mode in (order if moded else ("-",)):
                set_mode(mode if moded else "table")
                samples[(name, mode)].append(timed(fn))
    set_mode("table")
    for (name, mode), xs in samples.items():
        res[name][mode] = statistics.median(xs)
    for name, (fn, moded) in variants.items():
        if moded:  # capsule - table within each round: the pair shares the host's state
            diffs = [c - t for c, t in zip(samples[(name, "capsule")], samples[(name, "table")])]
            res[name]["diff"] = (statistics.median(diffs), min(diffs), max(diffs))
    return res


def report(title, res):
    parts = []
    for name, by_mode in res.items():
        if "table" in by_mode:
            t, c = by_mode["table"], by_mode["capsule"]
            med, lo, hi = by_mode["diff"]
            parts.append(f"{name}: table {t:.1f} capsule {c:.1f} (paired capsule - table {med:.1f}, {lo:.1f} to {hi:.1f})")
        else:
            parts.append(f"{name}: {by_mode['-']:.1f}")
    print(title + " | " + " | ".join(parts), flush=True)


def same_bits(fn):
    set_mode("table")
    a = fn().clone()
    set_mode("capsule")
    b = fn().clone()
    set_mode("table")
    torch.cuda.synchronize()
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


# Single-request decode and flash_attn_with_kvcache on its views.
for name, hq, hkv, n in (("single GQA 32/8 L1k", 32, 8, 1024), ("single GQA 32/8 L8k", 32, 8, 8192)):
    q = torch.randn(hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(n, hkv, D, device="cuda", dtype=torch.bfloat16)
    q4, k4, v4 = q[None, None], k[None], v[None]
    assert same_bits(lambda: fastattn.single_decode_with_kv_cache(q, k, v)), name
    assert same_bits(lambda: fastattn.flash_attn_with_kvcache(q4, k4, v4)), name
    variants = {
        "single_decode": (lambda: fastattn.single_decode_with_kv_cache(q, k, v), True),
        "kvcache views": (lambda: fastattn.flash_attn_with_kvcache(q4, k4, v4), True),
    }
    if fi is not None:
        variants["FI single"] = (lambda: fi.single_decode_with_kv_cache(q, k, v), False)
    report(name, measure(variants))

# The decode wrapper and flash_attn_with_kvcache over a paged cache (pages of 16 in a random order).
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
    out = torch.empty_like(q)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(indptr, perm, last, hq, hkv, D, page, data_type=torch.bfloat16)
    table = perm.view(b, per)
    lens = torch.full((b,), n, device="cuda", dtype=torch.int32)
    kc, vc = kv[:, 0], kv[:, 1]
    assert same_bits(lambda: w.run(q, kv)), name
    assert same_bits(lambda: fastattn.flash_attn_with_kvcache(q[:, None], kc, vc, cache_seqlens=lens,
                                                              block_table=table)), name
    variants = {
        "run(out=)": (lambda: w.run(q, kv, out=out), True),
        "run()": (lambda: w.run(q, kv), True),
        "kvcache paged": (lambda: fastattn.flash_attn_with_kvcache(q[:, None], kc, vc, cache_seqlens=lens,
                                                                   block_table=table), True),
    }
    if fi is not None:
        fws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
        fw = fi.BatchDecodeWithPagedKVCacheWrapper(fws, "NHD")
        fw.plan(indptr, perm, last, hq, hkv, D, page, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        fo = torch.empty_like(q)
        variants["FI run(out=)"] = (lambda: fw.run(q, kv, out=fo), False)
        variants["FI run()"] = (lambda: fw.run(q, kv), False)
    report(name, measure(variants))
print("done", file=sys.stderr)
