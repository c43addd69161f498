"""A small representative set of CUDA prefill calls for compute-sanitizer (scripts/gpu_sanitize.sh):
dense (head dims 8..256, every option, GQA, strided views, empty sequences, probabilities), varlen
with packed keys (ragged lengths incl. 0 and 1, Sq > Sk), paged keys through a block table (page
sizes 1, 5, 16, 64, 256) and CSR lists (lengths from seqused_k, cu_seqlens_k, last_page_len),
varlen padding rows, and attention sinks (dense with probabilities, varlen with padding rows).
Each call runs twice into NaN-poisoned buffers and, unless --no-check, is compared with the
float64 reference (as tests/gpu/test_prefill.py does).

Not collected by pytest (no test_ prefix). Usage:
    python tests/gpu/sanitize_prefill.py [--no-check] [--only SUBSTRING] [--seed N]
Exit status 0 when every case ran (and matched the reference).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fastattn  # noqa: E402

import test_prefill as T  # noqa: E402  (its helpers; importing it runs no test)
from sanitize_runner import run_cases  # noqa: E402

F16, B16 = torch.float16, torch.bfloat16


def dense(rng, check, dtype, b, sq, sk, hq, hkv, d, opt, layout=None, probs=False, sinks=False):
    if layout is None:
        q = T.randn(b, sq, hq, d, dtype=dtype)
        k, v = T.randn(b, sk, hkv, d, dtype=dtype), T.randn(b, sk, hkv, d, dtype=dtype)
        make_out = lambda: T.nan_full(q.shape, dtype)  # noqa: E731
    else:
        q = T.strided(layout, b, sq, hq, d, dtype)
        k, v = T.strided(layout, b, sk, hkv, d, dtype), T.strided(layout, b, sk, hkv, d, dtype)
        make_out = lambda: T.strided(layout, b, sq, hq, d, dtype, fill=float("nan"))  # noqa: E731
    kw = T.make_options(rng, opt, b, hq)
    extra = dict(sinks=T.strided_sinks(hq)) if sinks else {}
    if probs:
        call = lambda o: T.flash_attn_func(q, k, v, return_attn_probs=True, out=o, **kw, **extra)  # noqa: E731
    else:
        call = T.dense_call(q, k, v, kw, **extra)
    res = T.run_twice(call, make_out)
    if check:
        T.check_dense(res, q, k, v, kw, probs_atol=T.PROBS_ATOL if probs else None, sinks=extra.get("sinks"))


def varlen_packed(rng, check, dtype, lq, lk, hq, hkv, d, opt, pad_rows=0, sinks=False):
    cu_q, cu_k = T.cumsum0(lq), T.cumsum0(lk)
    q = T.randn(cu_q[-1] + pad_rows, hq, d, dtype=dtype)
    k, v = T.randn(cu_k[-1], hkv, d, dtype=dtype), T.randn(cu_k[-1], hkv, d, dtype=dtype)
    kw = T.make_options(rng, opt, len(lq), hq)
    extra = dict(sinks=T.strided_sinks(hq)) if sinks else {}
    cq, ck = T.i32(cu_q), T.i32(cu_k)
    res = T.run_twice(lambda o: T.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk),
                                                         return_softmax_lse=True, out=o, **kw, **extra),
                      lambda: T.nan_full(q.shape, dtype))
    if check:
        T.check_varlen(res, q, cu_q, T.packed_kv(k, v, cu_k, lk), kw, sinks=extra.get("sinks"))


def varlen_block_table(rng, check, dtype, lq, lk, hq, hkv, d, ps, opt, probs=False):
    cu_q = T.cumsum0(lq)
    table, num_pages = T.make_block_table(rng, lk, ps)
    q = T.randn(cu_q[-1], hq, d, dtype=dtype)
    kp, vp = T.randn(num_pages, ps, hkv, d, dtype=dtype), T.randn(num_pages, ps, hkv, d, dtype=dtype)
    kw = T.make_options(rng, opt, len(lq), hq)
    cq, su = T.i32(cu_q), T.i32(lk)
    bt = torch.tensor(table, dtype=torch.int32, device=T.DEV)
    msq, msk = max(lq) + 2, max(lk) + 3  # bounds above the lengths (probs are zero-padded)
    extra = dict(return_attn_probs=True) if probs else dict(return_softmax_lse=True)
    res = T.run_twice(lambda o: T.flash_attn_varlen_func(q, kp, vp, cq, None, msq, msk, block_table=bt,
                                                         seqused_k=su, out=o, **extra, **kw),
                      lambda: T.nan_full(q.shape, dtype))
    if check:
        T.check_varlen(res, q, cu_q, T.paged_kv(kp, vp, table, lk), kw, max_seqlen_q=msq,
                       max_seqlen_k=msk, probs_atol=T.PROBS_ATOL if probs else None)


def varlen_csr(rng, check, dtype, lq, lk, hq, hkv, d, ps, opt, lengths_from):
    cu_q = T.cumsum0(lq)
    lists, indptr, indices, last, num_pages = T.make_csr(rng, lk, ps,
                                                         spare=lengths_from != "last_page_len")
    q = T.randn(cu_q[-1], hq, d, dtype=dtype)
    kp, vp = T.randn(num_pages, ps, hkv, d, dtype=dtype), T.randn(num_pages, ps, hkv, d, dtype=dtype)
    kw = T.make_options(rng, opt, len(lq), hq)
    lengths = {"seqused_k": dict(seqused_k=T.i32(lk)),
               "cu_seqlens_k": dict(cu_seqlens_k=T.i32(T.cumsum0(lk))),
               "last_page_len": dict(last_page_len=T.i32(last))}[lengths_from]
    call = T.csr_call(q, T.i32(cu_q), max(lq), kp, vp, T.i32(indptr), T.i32(indices), max(lk), kw,
                      **lengths)
    res = T.run_twice(call, lambda: T.nan_full(q.shape, dtype))
    if check:
        T.check_varlen(res, q, cu_q, T.paged_kv(kp, vp, lists, lk), kw)


RAGGED_Q, RAGGED_K = [17, 1, 0, 113], [113, 1, 5, 300]


def inconsistent_indices(rng, check, dtype):
    """Index tensors that disagree with the tensors they index: the kernels clamp (ops.h / the
    PrefillParams comment), so this must run clean under memcheck; the values are not checked."""
    del rng, check
    dev = "cuda"
    q = torch.randn(10, 4, 64, device=dev, dtype=dtype)
    k = torch.randn(12, 2, 64, device=dev, dtype=dtype)
    cu_q = torch.tensor([0, 6, 40], dtype=torch.int32, device=dev)    # past total_q = 10
    cu_k = torch.tensor([0, 30, 12], dtype=torch.int32, device=dev)   # past total_k, decreasing
    out1 = torch.full_like(q, float("nan"))
    fastattn.flash_attn_varlen_func(q, k, k, cu_q, cu_k, 40, 40, causal=True, out=out1)
    pages = torch.randn(3, 16, 2, 64, device=dev, dtype=dtype)
    table = torch.tensor([[0, 7, -3], [2, 1, 99]], dtype=torch.int32, device=dev)  # bad page ids
    used = torch.tensor([200, 40], dtype=torch.int32, device=dev)   # more than 3 pages hold
    cu2 = torch.tensor([0, 5, 10], dtype=torch.int32, device=dev)
    out2 = torch.full_like(q, float("nan"))
    fastattn.flash_attn_varlen_func(q, pages, pages, cu2, cu2, 5, 200, block_table=table,
                                    seqused_k=used, out=out2)
    torch.cuda.synchronize()
    return out1, out2


def cases():
    """(name, function, arguments after (rng, check))."""
    yield "dense fp16 d64 all options gqa4", dense, (F16, 2, 70, 130, 8, 2, 64, T.ALL)
    yield "dense bf16 d128 Sq>Sk probs", dense, (B16, 2, 130, 70, 8, 8, 128, "none"), {"probs": True}
    for d in (8, 40, 96, 200, 256):
        yield f"dense fp16 d{d} causal mqa", dense, (F16, 1, 65, 97, 4, 1, d, "causal")
    yield "dense bf16 d192 left window alibi", dense, (B16, 1, 33, 300, 4, 2, 192, "wleft+alibi")
    yield "dense fp16 bhsd strides", dense, (F16, 2, 50, 90, 8, 2, 64, "causal"), {"layout": "bhsd"}
    yield "dense bf16 padded head stride", dense, (B16, 2, 50, 90, 8, 2, 64, "softcap"), {"layout": "padded_head"}
    # Many key tiles: the sm_90a kernel's three-stage ring wraps around several times.
    yield "dense fp16 d128 long keys causal", dense, (F16, 1, 200, 1100, 4, 2, 128, "causal")
    yield "dense bf16 d64 long keys window", dense, (B16, 1, 150, 900, 4, 4, 64, "window")
    yield "dense fp16 no keys", dense, (F16, 2, 9, 0, 4, 2, 64, "none")
    yield "dense fp16 no queries", dense, (F16, 2, 0, 9, 4, 2, 64, "causal")
    yield "varlen packed bf16 d96 ragged all options", varlen_packed, (B16, RAGGED_Q, RAGGED_K, 8, 2, 96, T.ALL)
    yield "varlen packed fp16 d128 Sq>Sk causal mqa", varlen_packed, (F16, [300, 64, 9], [113, 3, 9], 8, 1, 128, "causal")
    yield "varlen packed fp16 padding rows", varlen_packed, (F16, [3, 4, 0], [5, 2, 6], 4, 2, 64, "causal"), {"pad_rows": 5}
    for ps in (1, 5, 16, 64, 256):
        yield f"varlen block table page {ps}", varlen_block_table, (F16, RAGGED_Q, RAGGED_K, 8, 2, 128, ps, "causal+alibi_bh")
    yield "varlen block table probs", varlen_block_table, (B16, [3, 0, 12], [7, 4, 9], 4, 2, 64, 4, "causal"), {"probs": True}
    yield "varlen csr page 5 last_page_len", varlen_csr, (B16, RAGGED_Q, RAGGED_K, 8, 2, 64, 5, "causal", "last_page_len")
    yield "varlen csr page 16 cu_seqlens_k d256", varlen_csr, (F16, RAGGED_Q, RAGGED_K, 8, 2, 256, 16, T.ALL, "cu_seqlens_k")
    yield "varlen csr page 256 seqused_k", varlen_csr, (F16, RAGGED_Q, RAGGED_K, 8, 8, 128, 256, "window", "seqused_k")
    yield "dense bf16 d128 sinks probs Sq>Sk causal", dense, (B16, 2, 130, 70, 8, 2, 128, "causal"), {"probs": True, "sinks": True}
    yield "dense fp16 d96 sinks all options", dense, (F16, 1, 65, 97, 8, 2, 96, T.ALL), {"sinks": True}
    yield "varlen packed bf16 d64 sinks padding rows", varlen_packed, (B16, [3, 4, 0], [5, 2, 6], 8, 2, 64, "causal"), {"pad_rows": 5, "sinks": True}
    yield "inconsistent index tensors are clamped", inconsistent_indices, (F16,)


if __name__ == "__main__":
    sys.exit(run_cases("sanitize_prefill", __doc__, cases()))
