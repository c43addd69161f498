"""GPU prefill: flash_attn_func (+ packed variants) and flash_attn_varlen_func (packed keys, paged
keys through a block table, CSR page lists through fastattn._C, seqused_k) on torch CUDA tensors,
against a float64 reference computed on the GPU (tests/gpu/gpu_reference.py).

The rule (DESIGN.md, FlashAttention's): max|ours - ref| <= 2 * max|naive_in_dtype - ref| + 1e-5;
LSE within 1e-3 + 1e-3 * |ref| and -inf exactly where no key is visible (the output exactly 0
there); probabilities within 1e-4 (3e-3 with softcap: a kernel may use the hardware tanh). Every
call is made twice into NaN-poisoned out= buffers: both must be fully written and bitwise equal
(test_*_lse_probs_fully_written and the CSR tests also poison lse / probs, through fastattn._C).
Inputs are fresh each run (seed printed on failure, FASTATTN_TEST_SEED=<seed> replays).

Sizes are moderate so that the whole module runs in well under 3 minutes on an H200; the
> 2^31-element cache tests allocate about 9 GB each. The CUDA graph tests xfail, with the
diagnosis as reason, when the capture fails because torch's __dlpack__() (called by nanobind
without a stream) cannot run inside a capture; any other capture failure fails them.
"""

import inspect
import math
import sys

import pytest

torch = pytest.importorskip("torch")

import fastattn  # noqa: E402
from fastattn import _C  # noqa: E402
from fastattn import (  # noqa: E402
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

import gpu_reference as R  # noqa: E402
from gpu_helpers import (RANDOM_SCENARIOS, capture_or_xfail, cumsum0, i32, make_options, nan_full,  # noqa: E402
                         randn, run_random_scenarios, stream_ptr, strided_sinks)

DEV = "cuda"
DTYPES = [torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp16", "bf16"]


# ---- helpers -----------------------------------------------------------------------------------


ALL = "causal+window+alibi_bh+softcap+scale"


def run_twice(call, make_out):
    """call(out_buffer) -> out or a tuple (out, lse[, probs]). Runs it twice, each time into a fresh
    NaN-poisoned buffer, checks that out= was honoured and that both runs are bitwise equal, and
    returns the first run's results as a tuple."""
    results = []
    for _ in range(2):
        buf = make_out()
        res = call(buf)
        res = res if isinstance(res, tuple) else (res,)
        assert res[0] is buf or res[0].data_ptr() == buf.data_ptr(), "out= was not used for the output"
        results.append(res)
    torch.cuda.synchronize()
    for name, a, b in zip(("out", "softmax_lse", "attn_probs"), results[0], results[1]):
        R.assert_bitwise_equal(name, a, b)
    return results[0]


def check_dense(res, q, k, v, kw, probs_atol=None, sinks=None):
    out, lse = res[0], res[1]
    ref_o, ref_lse, ref_p = R.attention_ref(q, k, v, sinks=sinks, **kw)
    naive_o, _, _ = R.attention_ref(q, k, v, naive=True, sinks=sinks, **kw)
    R.assert_out_close("out", out, ref_o, naive_o)
    R.assert_empty_rows_zero("out", out, ref_lse)
    R.assert_lse_close("softmax_lse", lse, ref_lse)
    if sinks is not None:
        R.assert_sink_rows("out", out, lse, ref_o, sinks)
    if probs_atol is not None:
        R.assert_probs_close("attn_probs", res[2], ref_p, probs_atol)


def check_varlen(res, q, cu_q, kv, kw, max_seqlen_q=None, max_seqlen_k=None, probs_atol=None,
                 sinks=None, factor=2.0):
    out, lse = res[0], res[1]
    ref_o, ref_lse, ref_p = R.varlen_ref(q, cu_q, kv, max_seqlen_q=max_seqlen_q,
                                         max_seqlen_k=max_seqlen_k, sinks=sinks, **kw)
    naive_o, _, _ = R.varlen_ref(q, cu_q, kv, naive=True, sinks=sinks, **kw)
    R.assert_out_close("out", out, ref_o, naive_o, factor=factor)
    R.assert_empty_rows_zero("out", out, ref_lse)
    R.assert_lse_close("softmax_lse", lse, ref_lse)
    if sinks is not None:
        R.assert_sink_rows("out", out, lse, ref_o, sinks)
    if probs_atol is not None:
        R.assert_probs_close("attn_probs", res[2], ref_p, probs_atol)


# The probabilities are recomputed in float32 and normalised over themselves (not with the
# attention kernel's LSE, whose softcap may use the hardware tanh approximation), so softcap or not
# they are float32-exact: one tolerance for every probs check.
PROBS_ATOL = 1e-4


def dense_call(q, k, v, kw, **extra):
    return lambda o: flash_attn_func(q, k, v, return_softmax_lse=True, out=o, **kw, **extra)


# ---- dense batched -----------------------------------------------------------------------------

HEAD_DIMS = [8, 16, 32, 40, 64, 72, 96, 128, 160, 192, 200, 256]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_head_dims(seed, dtype, d, causal):
    b, hq, hkv = 2, 4, 2
    sq, sk = (129, 257) if causal else (257, 129)
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    kw = {"causal": causal}
    res = run_twice(dense_call(q, k, v, kw), lambda: nan_full(q.shape, dtype))
    check_dense(res, q, k, v, kw)


DENSE_OPTIONS = ["none", "scale", "causal", "wleft", "wright", "window", "wzero", "causal+wleft",
                 "softcap", "alibi", "alibi_bh", ALL]
# (batch, seqlen_q, seqlen_k, head_dim): square, Sq < Sk, Sq > Sk, a single query, a single key.
DENSE_SHAPES = [(2, 128, 128, 64), (2, 113, 799, 128), (2, 799, 113, 64), (3, 1, 500, 128),
                (2, 300, 1, 96)]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "b%d-q%d-k%d-d%d" % s)
@pytest.mark.parametrize("opt", DENSE_OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_options(seed, dtype, opt, shape):
    b, sq, sk, d = shape
    hq, hkv = 8, 2
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    kw = make_options(seed, opt, b, hq)
    res = run_twice(dense_call(q, k, v, kw), lambda: nan_full(q.shape, dtype))
    check_dense(res, q, k, v, kw)


@pytest.mark.parametrize("opt", ["causal", "alibi+softcap"])
@pytest.mark.parametrize("heads", [(6, 6), (8, 2), (12, 3), (12, 2), (8, 1), (16, 2)],
                         ids=lambda h: "h%d-%d" % h)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gqa(seed, dtype, heads, opt):
    """GQA ratios 1, 4, 6, 8 (MQA: 8/1): query head h reads kv head h // (Hq / Hkv)."""
    hq, hkv = heads
    b, sq, sk, d = 2, 200, 333, 128
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    kw = make_options(seed, opt, b, hq)
    res = run_twice(dense_call(q, k, v, kw), lambda: nan_full(q.shape, dtype))
    check_dense(res, q, k, v, kw)


# (batch, seqlen_q, seqlen_k, option name)
EDGE_CASES = {
    "sk0": (2, 7, 0, "none"),  # no key at all: output 0, LSE -inf
    "sk0_causal": (2, 7, 0, "causal"),
    "sq0": (2, 0, 9, "causal"),
    "b0": (0, 5, 5, "none"),
    "q1k1": (3, 1, 1, "none"),
    "causal_sq_gt_sk": (2, 50, 7, "causal"),  # the first 43 rows see no key
    "wzero_sq_gt_sk": (2, 40, 9, "wzero"),
    "window_sq_gt_sk": (2, 300, 30, "window+alibi"),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_edge_cases(seed, dtype, case):
    b, sq, sk, opt = EDGE_CASES[case]
    hq, hkv, d = 4, 2, 64
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    kw = make_options(seed, opt, b, hq)
    res = run_twice(dense_call(q, k, v, kw), lambda: nan_full(q.shape, dtype))
    assert tuple(res[0].shape) == (b, sq, hq, d) and tuple(res[1].shape) == (b, hq, sq)
    check_dense(res, q, k, v, kw)
    if sk == 0 and q.numel():
        assert bool((res[0] == 0).all()) and bool(torch.isneginf(res[1]).all())


@pytest.mark.parametrize("shape", [(2, 77, 130, 64), (1, 130, 77, 128)], ids=lambda s: "b%d-q%d-k%d-d%d" % s)
@pytest.mark.parametrize("opt", ["none", "causal+window+alibi_bh", "softcap+scale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_attn_probs(seed, dtype, opt, shape):
    """return_attn_probs: (out, lse, softmax matrix (B, Hq, Sq, Sk) float32)."""
    b, sq, sk, d = shape
    hq, hkv = 4, 2
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    kw = make_options(seed, opt, b, hq)
    res = run_twice(lambda o: flash_attn_func(q, k, v, return_attn_probs=True, out=o, **kw),
                    lambda: nan_full(q.shape, dtype))
    assert len(res) == 3 and tuple(res[2].shape) == (b, hq, sq, sk)
    check_dense(res, q, k, v, kw, probs_atol=PROBS_ATOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attn_probs_lone_key_is_exactly_one(seed, dtype):
    """window_size=(0, 0) leaves each row one visible key (the diagonal), its score pushed far from
    0 by a large softmax_scale (ALiBi on, adding 0 on the diagonal): its probability is exactly 1
    and every other entry exactly 0. (Normalising with the attention kernel's LSE, whose scores
    round differently, gives values like 0.9999962.)"""
    b, s, hq, hkv, d = 2, 37, 4, 2, 64
    q, k, v = randn(b, s, hq, d, dtype=dtype), randn(b, s, hkv, d, dtype=dtype), randn(b, s, hkv, d, dtype=dtype)
    slopes = torch.full((b, hq), 8.0, dtype=torch.float32, device=DEV)
    _, _, probs = flash_attn_func(q, k, v, window_size=(0, 0), alibi_slopes=slopes, softmax_scale=3.0,
                                  return_attn_probs=True)
    eye = torch.eye(s, dtype=torch.float32, device=DEV).expand(b, hq, s, s)
    assert bool((probs == eye).all()), f"max |probs - I| = {float((probs - eye).abs().max()):.3g}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["qkvpacked", "kvpacked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_packed(seed, dtype, kind, causal):
    """The packed variants read q / k / v as strided views of one tensor."""
    kw = make_options(seed, "causal+alibi" if causal else "alibi", 2, 8)
    if kind == "qkvpacked":
        qkv = randn(2, 157, 3, 8, 64, dtype=dtype)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        call = lambda o: flash_attn_qkvpacked_func(qkv, return_softmax_lse=True, out=o, **kw)  # noqa: E731
    else:
        q = randn(2, 100, 8, 128, dtype=dtype)
        kv = randn(2, 157, 2, 2, 128, dtype=dtype)
        k, v = kv[:, :, 0], kv[:, :, 1]
        call = lambda o: flash_attn_kvpacked_func(q, kv, return_softmax_lse=True, out=o, **kw)  # noqa: E731
    res = run_twice(call, lambda: nan_full(q.shape, dtype))
    check_dense(res, q, k, v, kw)


def strided(layout, b, s, h, d, dtype, fill=None):
    """A (b, s, h, d) view with the last dim contiguous and other strides non-standard."""
    def base(*shape):
        if fill is None:
            return randn(*shape, dtype=dtype)
        return torch.full(shape, fill, device=DEV, dtype=dtype)
    if layout == "bhsd":  # (B, H, S, D) storage
        return base(b, h, s, d).transpose(1, 2)
    if layout == "sbhd":  # (S, B, H, D) storage: batch stride < seq stride
        return base(s, b, h, d).transpose(0, 1)
    if layout == "head_slice":  # every other head, with an offset
        return base(b, s, 2 * h, d)[:, :, 1::2]
    if layout == "padded_head":  # head stride d + 8
        return base(b, s, h, d + 8)[..., :d]
    if layout == "batch_slice":  # every other batch entry, with an offset
        return base(2 * b, s, h, d)[1::2]
    raise ValueError(layout)


STRIDED_LAYOUTS = ["bhsd", "sbhd", "head_slice", "padded_head", "batch_slice"]


@pytest.mark.parametrize("opt", ["none", "causal+alibi"])
@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_strides(seed, dtype, layout, opt):
    """Non-contiguous q, k, v and out (same layout for all four)."""
    b, sq, sk, hq, hkv, d = 2, 100, 200, 8, 2, 64
    q = strided(layout, b, sq, hq, d, dtype)
    k = strided(layout, b, sk, hkv, d, dtype)
    v = strided(layout, b, sk, hkv, d, dtype)
    assert not q.is_contiguous() and q.stride(-1) == 1
    kw = make_options(seed, opt, b, hq)
    res = run_twice(dense_call(q, k, v, kw),
                    lambda: strided(layout, b, sq, hq, d, dtype, fill=float("nan")))
    check_dense(res, q, k, v, kw)


@pytest.mark.parametrize("dtype,causal", [(torch.float16, True), (torch.bfloat16, False)],
                         ids=["fp16-causal", "bf16-full"])
def test_dense_large_grid(seed, dtype, causal):
    """Many tiles and blocks (B 4, S 2048, 16/4 heads, D 128): correct and deterministic."""
    b, s, hq, hkv, d = 4, 2048, 16, 4, 128
    q, k, v = randn(b, s, hq, d, dtype=dtype), randn(b, s, hkv, d, dtype=dtype), randn(b, s, hkv, d, dtype=dtype)
    kw = {"causal": causal}
    res = run_twice(dense_call(q, k, v, kw), lambda: nan_full(q.shape, dtype))
    check_dense(res, q, k, v, kw)


@pytest.mark.parametrize("opt", ["causal+window", "softcap+alibi"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_lse_probs_fully_written(seed, dtype, opt):
    """Through fastattn._C with NaN-poisoned lse and probs buffers: every entry is written
    (the Python API allocates those with torch.empty, so poisoning needs the binding)."""
    b, sq, sk, hq, hkv, d = 2, 70, 150, 4, 2, 64
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    kw = make_options(seed, opt, b, hq)
    left, right = kw.get("window_size", (-1, -1))

    def call(o):
        lse = nan_full((b, hq, sq), torch.float32)
        probs = nan_full((b, hq, sq, sk), torch.float32)
        _C.attention_forward(q, k, v, o, lse, probs, softmax_scale=kw.get("softmax_scale"),
                             causal=kw.get("causal", False), window_left=left, window_right=right,
                             softcap=kw.get("softcap", 0.0), alibi_slopes=kw.get("alibi_slopes"),
                             cuda_stream=stream_ptr())
        return o, lse, probs

    res = run_twice(call, lambda: nan_full(q.shape, dtype))
    check_dense(res, q, k, v, kw, probs_atol=PROBS_ATOL)


# ---- varlen, packed keys -----------------------------------------------------------------------

# (query lengths, key lengths): ragged with 0 and 1, Sq > Sk and Sq < Sk, long (799) sequences.
LENGTHS = {
    "ragged": ([17, 1, 0, 113, 40, 799], [113, 1, 5, 17, 0, 799]),
    "equal": ([128, 128, 128], [128, 128, 128]),
    "decode": ([1, 1, 1, 1, 1], [0, 1, 17, 113, 799]),
    "qlong": ([799, 64, 9], [113, 3, 9]),
}
VARLEN_HEAD_DIM = {"ragged": 128, "equal": 64, "decode": 256, "qlong": 96}
VARLEN_OPTIONS = ["none", "causal", "window", "alibi_bh", "softcap", ALL]


def packed_kv(k, v, cu_k, lens):
    return [(k[cu_k[i]:cu_k[i] + n], v[cu_k[i]:cu_k[i] + n]) for i, n in enumerate(lens)]


@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (8, 1)], ids=lambda h: "h%d-%d" % h)
@pytest.mark.parametrize("opt", VARLEN_OPTIONS)
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_packed(seed, dtype, lengths, opt, heads):
    lq, lk = LENGTHS[lengths]
    hq, hkv = heads
    d = VARLEN_HEAD_DIM[lengths]
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q = randn(cu_q[-1], hq, d, dtype=dtype)
    k, v = randn(cu_k[-1], hkv, d, dtype=dtype), randn(cu_k[-1], hkv, d, dtype=dtype)
    kw = make_options(seed, opt, len(lq), hq)
    cq, ck = i32(cu_q), i32(cu_k)
    res = run_twice(lambda o: flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk),
                                                     return_softmax_lse=True, out=o, **kw),
                    lambda: nan_full(q.shape, dtype))
    check_varlen(res, q, cu_q, packed_kv(k, v, cu_k, lk), kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_seqused_k_packed(seed, dtype):
    """seqused_k limits each sequence to its first keys even when cu_seqlens_k allows more."""
    lq, lk, used = [5, 9, 1, 30], [20, 9, 33, 0], [7, 0, 33, 0]
    hq, hkv, d = 8, 2, 64
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q = randn(cu_q[-1], hq, d, dtype=dtype)
    k, v = randn(cu_k[-1], hkv, d, dtype=dtype), randn(cu_k[-1], hkv, d, dtype=dtype)
    kw = {"causal": True}
    cq, ck, su = i32(cu_q), i32(cu_k), i32(used)
    res = run_twice(lambda o: flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), seqused_k=su,
                                                     return_softmax_lse=True, out=o, **kw),
                    lambda: nan_full(q.shape, dtype))
    check_varlen(res, q, cu_q, packed_kv(k, v, cu_k, used), kw)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["qkvpacked", "kvpacked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_packed_variants(seed, dtype, kind, causal):
    kw = {"causal": causal}
    if kind == "qkvpacked":
        lens = [13, 1, 0, 40, 200]
        h, d = 4, 64
        cu = cumsum0(lens)
        qkv = randn(cu[-1], 3, h, d, dtype=dtype)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        c = i32(cu)
        call = lambda o: flash_attn_varlen_qkvpacked_func(qkv, c, max(lens), return_softmax_lse=True,  # noqa: E731
                                                          out=o, **kw)
        cu_q, kv = cu, packed_kv(k, v, cu, lens)
    else:
        lq, lk = [5, 17, 1, 0], [9, 3, 30, 4]
        hq, hkv, d = 8, 2, 128
        cu_q, cu_k = cumsum0(lq), cumsum0(lk)
        q = randn(cu_q[-1], hq, d, dtype=dtype)
        kvt = randn(cu_k[-1], 2, hkv, d, dtype=dtype)
        cq, ck = i32(cu_q), i32(cu_k)
        call = lambda o: flash_attn_varlen_kvpacked_func(q, kvt, cq, ck, max(lq), max(lk),  # noqa: E731
                                                         return_softmax_lse=True, out=o, **kw)
        kv = packed_kv(kvt[:, 0], kvt[:, 1], cu_k, lk)
    res = run_twice(call, lambda: nan_full(q.shape, dtype))
    check_varlen(res, q, cu_q, kv, kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_padding_rows(seed, dtype):
    """Rows of q past cu_seqlens_q[-1] (padding, e.g. for CUDA graphs) get output 0, LSE -inf."""
    lq, lk = [3, 4, 0], [5, 2, 6]
    hq, hkv, d = 4, 2, 64
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q = randn(cu_q[-1] + 5, hq, d, dtype=dtype)
    k, v = randn(cu_k[-1], hkv, d, dtype=dtype), randn(cu_k[-1], hkv, d, dtype=dtype)
    kw = {"causal": True}
    cq, ck = i32(cu_q), i32(cu_k)
    res = run_twice(lambda o: flash_attn_varlen_func(q, k, v, cq, ck, 4, 6, return_softmax_lse=True,
                                                     out=o, **kw),
                    lambda: nan_full(q.shape, dtype))
    out, lse = res
    assert bool((out[cu_q[-1]:] == 0).all()) and bool(torch.isneginf(lse[:, cu_q[-1]:]).all())
    check_varlen(res, q, cu_q, packed_kv(k, v, cu_k, lk), kw)


# ---- varlen, paged keys ------------------------------------------------------------------------


def make_block_table(rng, lens, page_size, extra_pages=3):
    """Random page assignment over a pool with unused pages: (table rows, num_pages). The table
    has one more column than needed; entries past a sequence's pages point at random valid pages
    (they must never be read)."""
    need = [(n + page_size - 1) // page_size for n in lens]
    max_pages = max(need + [0]) + 1
    num_pages = sum(need) + extra_pages
    perm = list(range(num_pages))
    rng.shuffle(perm)
    table, pos = [], 0
    for n in need:
        row = perm[pos:pos + n] + [rng.randrange(num_pages) for _ in range(max_pages - n)]
        table.append(row)
        pos += n
    return table, num_pages


def make_csr(rng, lens, page_size, spare=False, extra_pages=3):
    """CSR page lists (lists, indptr, indices, last_page_len, num_pages). With spare, some lists
    carry one more (valid) page than their length needs: it must not be read."""
    need = [(n + page_size - 1) // page_size for n in lens]
    num_pages = sum(need) + extra_pages
    perm = list(range(num_pages))
    rng.shuffle(perm)
    lists, pos = [], 0
    for n in need:
        pages = perm[pos:pos + n]
        if spare and rng.random() < 0.5:
            pages = pages + [rng.randrange(num_pages)]
        lists.append(pages)
        pos += n
    indptr = cumsum0([len(p) for p in lists])
    indices = [p for pages in lists for p in pages]
    last = [n - (m - 1) * page_size if m > 0 else 0 for n, m in zip(lens, need)]
    return lists, indptr, indices, last, num_pages


def paged_kv(kp, vp, page_lists, lens):
    return [(R.gather_pages(kp, pages, n), R.gather_pages(vp, pages, n))
            for pages, n in zip(page_lists, lens)]


def csr_call(q, cq, msq, kp, vp, indptr, indices, msk, kw, last_page_len=None, seqused_k=None,
             cu_seqlens_k=None, probs_shape=None):
    """fastattn._C.varlen_attention_forward with CSR pages; lse (and probs) NaN-poisoned."""
    left, right = kw.get("window_size", (-1, -1))

    def call(o):
        lse = nan_full((q.shape[1], q.shape[0]), torch.float32)
        probs = nan_full(probs_shape, torch.float32) if probs_shape is not None else None
        _C.varlen_attention_forward(
            q=q, cu_seqlens_q=cq, max_seqlen_q=msq, k_pages=kp, v_pages=vp, page_indptr=indptr,
            page_indices=indices, last_page_len=last_page_len, seqused_k=seqused_k,
            cu_seqlens_k=cu_seqlens_k, max_seqlen_k=msk, out=o, lse=lse, probs=probs,
            softmax_scale=kw.get("softmax_scale"), causal=kw.get("causal", False),
            window_left=left, window_right=right, softcap=kw.get("softcap", 0.0),
            alibi_slopes=kw.get("alibi_slopes"), cuda_stream=stream_ptr())
        return (o, lse) if probs is None else (o, lse, probs)

    return call


PAGE_SIZES = [1, 5, 16, 64, 256]


@pytest.mark.parametrize("lengths_from", ["cu_seqlens_k", "seqused_k", "both"])
@pytest.mark.parametrize("opt", ["none", "causal", ALL])
@pytest.mark.parametrize("page_size", PAGE_SIZES, ids=lambda p: f"page{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_paged_block_table(seed, dtype, page_size, opt, lengths_from):
    """flash_attn_varlen_func with block_table. Key lengths from cu_seqlens_k, from seqused_k, or
    from seqused_k taking precedence over (larger) cu_seqlens_k differences."""
    lq, lk = LENGTHS["ragged"]
    hq, hkv, d = 8, 2, 128
    cu_q = cumsum0(lq)
    table, num_pages = make_block_table(seed, lk, page_size)
    q = randn(cu_q[-1], hq, d, dtype=dtype)
    kp = randn(num_pages, page_size, hkv, d, dtype=dtype)
    vp = randn(num_pages, page_size, hkv, d, dtype=dtype)
    kw = make_options(seed, opt, len(lq), hq)
    ck, su = None, None
    if lengths_from in ("cu_seqlens_k", "both"):
        lens_cu = lk if lengths_from == "cu_seqlens_k" else [n + seed.randint(0, page_size) for n in lk]
        ck = i32(cumsum0(lens_cu))
    if lengths_from in ("seqused_k", "both"):
        su = i32(lk)
    cq, bt = i32(cu_q), torch.tensor(table, dtype=torch.int32, device=DEV)
    res = run_twice(lambda o: flash_attn_varlen_func(q, kp, vp, cq, ck, max(lq), max(lk), block_table=bt,
                                                     seqused_k=su, return_softmax_lse=True, out=o, **kw),
                    lambda: nan_full(q.shape, dtype))
    check_varlen(res, q, cu_q, paged_kv(kp, vp, table, lk), kw)


@pytest.mark.parametrize("opt", ["causal", ALL])
@pytest.mark.parametrize("lengths_from", ["seqused_k", "cu_seqlens_k", "last_page_len"])
@pytest.mark.parametrize("page_size", PAGE_SIZES, ids=lambda p: f"page{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_paged_csr(seed, dtype, page_size, lengths_from, opt):
    """CSR page lists (page_indptr / page_indices) through fastattn._C.varlen_attention_forward,
    key lengths from seqused_k, cu_seqlens_k or last_page_len (FlashInfer's convention)."""
    lq, lk = LENGTHS["ragged"]
    hq, hkv, d = 8, 2, 128
    cu_q = cumsum0(lq)
    lists, indptr, indices, last, num_pages = make_csr(
        seed, lk, page_size, spare=(lengths_from != "last_page_len"))
    q = randn(cu_q[-1], hq, d, dtype=dtype)
    kp = randn(num_pages, page_size, hkv, d, dtype=dtype)
    vp = randn(num_pages, page_size, hkv, d, dtype=dtype)
    kw = make_options(seed, opt, len(lq), hq)
    lengths = {"seqused_k": dict(seqused_k=i32(lk)),
               "cu_seqlens_k": dict(cu_seqlens_k=i32(cumsum0(lk))),
               "last_page_len": dict(last_page_len=i32(last))}[lengths_from]
    call = csr_call(q, i32(cu_q), max(lq), kp, vp, i32(indptr), i32(indices), max(lk), kw, **lengths)
    res = run_twice(call, lambda: nan_full(q.shape, dtype))
    check_varlen(res, q, cu_q, paged_kv(kp, vp, lists, lk), kw)


@pytest.mark.parametrize("page_size", [5, 16], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("addressing", ["block_table", "csr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_paged_strided(seed, dtype, addressing, page_size):
    """FlashInfer's NHD layout (num_pages, 2, page_size, Hkv, D): k / v pages are strided views;
    q is every other head of a wider tensor; out has head stride D + 8."""
    lq, lk = [33, 1, 0, 250], [100, 64, 7, 250]
    hq, hkv, d = 8, 2, 64
    cu_q = cumsum0(lq)
    if addressing == "block_table":
        lists, num_pages = make_block_table(seed, lk, page_size)
    else:
        lists, indptr, indices, last, num_pages = make_csr(seed, lk, page_size)
    kv_data = randn(num_pages, 2, page_size, hkv, d, dtype=dtype)
    kp, vp = kv_data[:, 0], kv_data[:, 1]
    q = randn(cu_q[-1], 2 * hq, d, dtype=dtype)[:, 1::2]
    kw = make_options(seed, "causal+alibi", len(lq), hq)
    cq = i32(cu_q)

    def make_out():
        return torch.full((cu_q[-1], hq, d + 8), float("nan"), device=DEV, dtype=dtype)[..., :d]

    if addressing == "block_table":
        bt = torch.tensor(lists, dtype=torch.int32, device=DEV)
        ck = i32(cumsum0(lk))
        call = lambda o: flash_attn_varlen_func(q, kp, vp, cq, ck, max(lq), max(lk), block_table=bt,  # noqa: E731
                                                return_softmax_lse=True, out=o, **kw)
    else:
        call = csr_call(q, cq, max(lq), kp, vp, i32(indptr), i32(indices), max(lk), kw,
                        last_page_len=i32(last))
    res = run_twice(call, make_out)
    check_varlen(res, q, cu_q, paged_kv(kp, vp, lists, lk), kw)


@pytest.mark.parametrize("keys", ["packed", "block_table", "csr"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_attn_probs(seed, dtype, keys):
    """Varlen probabilities (B, Hq, max_seqlen_q, max_seqlen_k), zero-padded past each
    sequence's lengths (bounds larger than every length)."""
    lq, lk = [3, 0, 12, 1], [7, 4, 9, 0]
    hq, hkv, d, ps = 4, 2, 64, 4
    msq, msk = 14, 11
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q = randn(cu_q[-1], hq, d, dtype=dtype)
    kw = make_options(seed, "causal+alibi", len(lq), hq)
    cq = i32(cu_q)
    if keys == "packed":
        k, v = randn(cu_k[-1], hkv, d, dtype=dtype), randn(cu_k[-1], hkv, d, dtype=dtype)
        ck = i32(cu_k)
        call = lambda o: flash_attn_varlen_func(q, k, v, cq, ck, msq, msk, return_attn_probs=True,  # noqa: E731
                                                out=o, **kw)
        kv = packed_kv(k, v, cu_k, lk)
    elif keys == "block_table":
        table, num_pages = make_block_table(seed, lk, ps)
        kp, vp = randn(num_pages, ps, hkv, d, dtype=dtype), randn(num_pages, ps, hkv, d, dtype=dtype)
        bt, ck = torch.tensor(table, dtype=torch.int32, device=DEV), i32(cu_k)
        call = lambda o: flash_attn_varlen_func(q, kp, vp, cq, ck, msq, msk, block_table=bt,  # noqa: E731
                                                return_attn_probs=True, out=o, **kw)
        kv = paged_kv(kp, vp, table, lk)
    else:
        lists, indptr, indices, last, num_pages = make_csr(seed, lk, ps)
        kp, vp = randn(num_pages, ps, hkv, d, dtype=dtype), randn(num_pages, ps, hkv, d, dtype=dtype)
        call = csr_call(q, cq, msq, kp, vp, i32(indptr), i32(indices), msk, kw, seqused_k=i32(lk),
                        probs_shape=(len(lq), hq, msq, msk))
        kv = paged_kv(kp, vp, lists, lk)
    res = run_twice(call, lambda: nan_full(q.shape, dtype))
    assert len(res) == 3 and tuple(res[2].shape) == (len(lq), hq, msq, msk)
    check_varlen(res, q, cu_q, kv, kw, max_seqlen_q=msq, max_seqlen_k=msk, probs_atol=PROBS_ATOL)


# ---- the seed worknote's examples (shared/seeds/000_*.txt) ----------------------------------------
# Verbatim but for the import line (fastattn instead of flash_attn) and device="cuda"; the same as
# tests/python/test_seed_examples.py. einops (used by generate_block_kvcache) may be missing on the
# GPU machine: then a stand-in for the one pattern it uses takes its place.

try:
    from einops import rearrange
except ImportError:  # pragma: no cover

    def rearrange(tensor, pattern, **axes):
        assert pattern == "(b nblocks) -> b nblocks", pattern
        return tensor.reshape(axes["b"], -1)


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestReturnNotNoneWarning")


def test_flash_attn_varlen_func_without_kvcache(
    device="cuda", seed=42, batch_size=10, num_heads=16, head_dim=16
):
    """Test variable length FlashAttention implementation.
    Args:
    device: Device to run the test on
    seed: Random seed for reproducibility
    batch_size: Number of sequences in batch
    num_heads: Number of attention heads
    head_dim: Dimension of each attention head
    The flash_attn_varlen_func is for prefilling phase.
    """
    # Set seed for reproducibility
    torch.manual_seed(seed)
    # Calculate total hidden dimension
    hidden_dim = num_heads * head_dim
    # Generate random sequence lengths between 10 and 100
    seq_len = torch.randint(10, 100, (batch_size, 1), device=device)
    max_seq_len = torch.max(seq_len).item()
    total_seq_len = torch.sum(seq_len).item()
    # All of the q,k,v packs all the sequence into one tensor
    # Create query, key, value tensors (total_seq_len, num_heads, head_dim)
    q = torch.randn(total_seq_len, num_heads, head_dim, device=device, dtype=torch.float16)
    k = torch.randn(total_seq_len, num_heads, head_dim, device=device, dtype=torch.float16)
    v = torch.randn(total_seq_len, num_heads, head_dim, device=device, dtype=torch.float16)
    # Remove the extra dimension from seq_len
    seq_len = seq_len.squeeze(1)
    # Create cumulative sequence lengths with leading 0
    # This creates offsets: [0, len1, len1+len2, len1+len2+len3, ...]
    cu_seqlens_q = torch.cumsum(seq_len, dim=0, dtype=torch.int32)
    cu_seqlens_q = torch.cat([torch.zeros(1, dtype=torch.int32, device=device), cu_seqlens_q])
    cu_seqlens_k = cu_seqlens_q.clone()  # Keys have same lengths as queries
    # Run flash attention with variable length sequences
    res = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seq_len,
        max_seqlen_k=max_seq_len,
        dropout_p=0.0,
        return_attn_probs=True,
    )
    output = res[0]
    attn_probs = res[1]
    S_mask = res[2]
    # Basic validation - check output shape matches input shape
    assert (
        output.shape == q.shape
    ), f"Output shape {output.shape} doesn't match input shape {q.shape}"
    # Verify output is not all zeros or NaNs
    assert not torch.isnan(output).any(), "Output contains NaN values"
    assert torch.any(output != 0), "Output is all zeros"
    print("output", output)
    print("attn_probs", attn_probs)
    print("S_mask", S_mask)
    return output


def generate_block_kvcache(
    max_seqlen_k: int,
    paged_kv_block_size: int,
    max_batch_size: int,
    nheads_k: int,
    d: int,
    device: torch.device,
    dtype: torch.dtype,
):
    """Generate a block-based KV cache for efficient memory management in attention.
    This function creates a paged key-value cache organized in memory blocks, along with
    a block table that maps logical sequence positions to physical memory blocks.
    This block-based approach allows efficient memory management for variable-length
    sequences in transformer decoding.
    Args:
    max_seqlen_k: Maximum sequence length for keys
    paged_kv_block_size: Size of each block in the paged cache
    max_batch_size: Maximum batch size
    nheads_k: Number of attention heads
    d: Dimension of each attention head
    device: Device to create tensors on
    dtype: Data type for the cache tensors
    Returns:
    Tuple containing:
    - k_cache_paged: Paged key cache tensor [num_blocks, block_size, nheads_k, d]
    - v_cache_paged: Paged value cache tensor [num_blocks, block_size, nheads_k, d]
    - block_table: Mapping from logical to physical blocks [batch_size, num_blocks_per_seq]
    """
    # Calculate total number of blocks needed
    num_blocks = math.ceil(max_seqlen_k / paged_kv_block_size) * max_batch_size
    # Create randomized paged cache storage for keys and values
    k_cache_paged = torch.randn(
        num_blocks, paged_kv_block_size, nheads_k, d, device=device, dtype=dtype
    )
    v_cache_paged = torch.randn(
        num_blocks, paged_kv_block_size, nheads_k, d, device=device, dtype=dtype
    )
    # Create block table - a mapping from logical sequence positions to physical memory blocks
    # Using a random permutation to simulate realistic block allocation
    block_table = rearrange(
        torch.randperm(num_blocks, dtype=torch.int32, device=device),
        "(b nblocks) -> b nblocks",
        b=max_batch_size,
    )
    return k_cache_paged, v_cache_paged, block_table


def create_culens(seq_lens: torch.Tensor, device: torch.device):
    cu_seqlens = torch.cumsum(seq_lens, dim=0, dtype=torch.int32)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32, device=device), cu_seqlens])
    return cu_seqlens


def test_flash_attn_varlen_func_with_kvcache(
    device="cuda", seed=42, batch_size=10, num_heads=16, head_dim=16
):
    """Test flash attention with variable length and KV caching.
    Tests the functionality of flash_attn_varlen_func when using paged key-value cache.
    Args:
    device: Device to run the test on (default: "cuda")
    seed: Random seed for reproducibility (default: 42)
    batch_size: Number of sequences in batch (default: 10)
    num_heads: Number of attention heads (default: 16)
    head_dim: Dimension of each attention head (default: 16)
    """
    # Set seed for reproducibility
    torch.manual_seed(seed)
    # Generate random sequence lengths between 10 and 100
    seq_lens = torch.randint(10, 100, (batch_size, 1), device=device)
    max_seq_len = torch.max(seq_lens).item()
    total_seq_len = torch.sum(seq_lens).item()
    # KV cache parameters
    paged_kv_block_size = 256
    max_k_seq_len = 100
    k_seq_lens = torch.randint(0, max_k_seq_len, (batch_size, 1), device=device)
    # Create query tensor packed with all sequences (total_seq_len, num_heads, head_dim)
    q = torch.randn(total_seq_len, num_heads, head_dim, device=device, dtype=torch.float16)
    # Generate paged KV cache with extra room for new tokens
    k_cache_paged, v_cache_paged, block_table = generate_block_kvcache(
        max_k_seq_len + 100,  # room for new tokens
        paged_kv_block_size,
        batch_size,
        num_heads,
        head_dim,
        device,
        dtype=torch.float16,
    )
    # Prepare sequence length information
    seq_lens = seq_lens.squeeze(1)
    k_seq_lens = k_seq_lens.squeeze(1)
    # Create cumulative sequence lengths for batched attention
    cu_seqlens_q = create_culens(seq_lens, device)
    cu_seqlens_k = create_culens(k_seq_lens, device)
    # Run flash attention with variable length sequences
    output, attn_probs, S_mask = flash_attn_varlen_func(
        q,
        k=k_cache_paged,
        v=v_cache_paged,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seq_len,
        max_seqlen_k=max_k_seq_len,
        block_table=block_table,
        dropout_p=0.0,
        return_attn_probs=True,
    )
    # Verify outputs
    assert output.shape == q.shape, f"Output shape {output.shape} doesn't match query shape {q.shape}"
    assert not torch.isnan(output).any(), "Output contains NaN values"
    assert torch.any(output != 0), "Output is all zeros"
    assert attn_probs is not None, "Attention probabilities not returned"
    assert S_mask is not None, "Attention mask not returned"
    # Return results for potential further testing
    return output, attn_probs, S_mask


def test_seed_examples_match_reference(monkeypatch):
    """The two seed examples only check shapes and NaNs; here their flash_attn_varlen_func calls
    are recorded and every result (out, LSE, probabilities) is checked against the reference."""
    calls = []

    def recording(*args, **kwargs):
        result = fastattn.flash_attn_varlen_func(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    monkeypatch.setattr(sys.modules[__name__], "flash_attn_varlen_func", recording)
    test_flash_attn_varlen_func_without_kvcache()
    test_flash_attn_varlen_func_with_kvcache()
    assert len(calls) == 2
    sig = inspect.signature(fastattn.flash_attn_varlen_func)
    for args, kwargs, result in calls:
        a = sig.bind(*args, **kwargs).arguments
        q, k, v = a["q"], a["k"], a["v"]
        cu_q = [int(x) for x in a["cu_seqlens_q"].tolist()]
        cu_k = [int(x) for x in a["cu_seqlens_k"].tolist()]
        lens_k = [cu_k[i + 1] - cu_k[i] for i in range(len(cu_k) - 1)]
        table = a.get("block_table")
        if table is None:
            kv = packed_kv(k, v, cu_k, lens_k)
        else:
            kv = paged_kv(k, v, table.tolist(), lens_k)
        check_varlen(result, q, cu_q, kv, {}, max_seqlen_q=a["max_seqlen_q"],
                     max_seqlen_k=a["max_seqlen_k"], probs_atol=PROBS_ATOL)


# ---- caches larger than 2^31 elements (64-bit offsets) -----------------------------------------

BIG = 2 ** 31


def need_memory(gib):
    total = torch.cuda.get_device_properties(0).total_memory
    if total < gib * 2 ** 30:
        pytest.skip(f"needs about {gib} GiB of GPU memory, the GPU has {total / 2 ** 30:.0f}")


@pytest.mark.parametrize("page_size", [16, 256], ids=lambda p: f"page{p}")
@pytest.mark.parametrize("addressing", ["block_table", "csr"])
def test_large_paged_cache(seed, addressing, page_size):
    """Paged k / v caches of > 2^31 elements each (fp16, ~4.3 GB each); sequences whose pages sit
    past the 2^31-element offset, straddle it, or mix low and high pages (the last page of the
    pool included). Checked against the reference on the gathered small K / V."""
    need_memory(24)
    dtype, hq, hkv, d = torch.float16, 16, 8, 128
    per_page = page_size * hkv * d
    boundary = BIG // per_page  # the first page that starts at or past element 2^31
    num_pages = boundary + 4096 // page_size + 8
    assert num_pages * per_page > BIG
    kp = torch.randn(num_pages, page_size, hkv, d, device=DEV, dtype=dtype)
    vp = torch.randn(num_pages, page_size, hkv, d, device=DEV, dtype=dtype)
    lq, lk = [64, 1, 300], [1000, 700, 300]
    need = [(n + page_size - 1) // page_size for n in lk]
    high = list(range(boundary, num_pages))
    seed.shuffle(high)
    pages0 = high[:need[0] - 1] + [num_pages - 1]  # all past 2^31, ending with the pool's last
    pages1 = [high[need[0] + i] if i % 2 else seed.randrange(boundary) for i in range(need[1])]
    pages2 = ([boundary - 1, boundary] + high[-(need[2] - 2):])[:need[2]] if need[2] >= 2 else [boundary]
    lists = [pages0, pages1, pages2]
    assert [len(p) for p in lists] == need
    cu_q = cumsum0(lq)
    q = randn(cu_q[-1], hq, d, dtype=dtype)
    kw = make_options(seed, "causal+alibi", len(lq), hq)
    cq = i32(cu_q)
    if addressing == "block_table":
        width = max(need)
        bt = torch.tensor([p + [0] * (width - len(p)) for p in lists], dtype=torch.int32, device=DEV)
        call = lambda o: flash_attn_varlen_func(q, kp, vp, cq, i32(cumsum0(lk)), max(lq), max(lk),  # noqa: E731
                                                block_table=bt, return_softmax_lse=True, out=o, **kw)
    else:
        indptr = cumsum0(need)
        indices = [p for pages in lists for p in pages]
        call = csr_call(q, cq, max(lq), kp, vp, i32(indptr), i32(indices), max(lk), kw,
                        seqused_k=i32(lk))
    res = run_twice(call, lambda: nan_full(q.shape, dtype))
    check_varlen(res, q, cu_q, paged_kv(kp, vp, lists, lk), kw)
    del kp, vp
    torch.cuda.empty_cache()


def test_large_batch_stride(seed):
    """Dense k / v whose batch stride exceeds 2^31 elements (batch 1 starts past element 2^31)."""
    need_memory(24)
    dtype, b, sq, sk, hq, hkv, d = torch.float16, 2, 64, 300, 16, 8, 128
    row = hkv * d
    stride_b = BIG + 8 * row
    k_store = torch.randn(stride_b + sk * row, device=DEV, dtype=dtype)
    v_store = torch.randn(stride_b + sk * row, device=DEV, dtype=dtype)
    k = k_store.as_strided((b, sk, hkv, d), (stride_b, row, d, 1))
    v = v_store.as_strided((b, sk, hkv, d), (stride_b, row, d, 1))
    q = randn(b, sq, hq, d, dtype=dtype)
    kw = make_options(seed, "causal+alibi_bh", b, hq)
    res = run_twice(dense_call(q, k, v, kw), lambda: nan_full(q.shape, dtype))
    check_dense(res, q, k, v, kw)
    del k, v, k_store, v_store
    torch.cuda.empty_cache()


def test_large_varlen_row_stride(seed):
    """Packed varlen k / v with a row stride of 2^21 elements: rows >= 1024 sit past element 2^31
    (sequence 2 starts there, sequence 1 crosses it)."""
    need_memory(24)
    dtype, hq, hkv, d = torch.float16, 16, 8, 128
    rows, row_stride = 1030, BIG // 1024  # 2^21
    k = torch.randn(rows * row_stride, device=DEV, dtype=dtype).view(rows, row_stride)[:, :hkv * d]
    v = torch.randn(rows * row_stride, device=DEV, dtype=dtype).view(rows, row_stride)[:, :hkv * d]
    k, v = k.view(rows, hkv, d), v.view(rows, hkv, d)
    assert k.stride(0) == row_stride
    lq, lk = [10, 33, 5], [200, 825, 5]
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    assert cu_k[-1] == rows and cu_k[2] * row_stride > BIG
    q = randn(cu_q[-1], hq, d, dtype=dtype)
    kw = {"causal": True}
    cq, ck = i32(cu_q), i32(cu_k)
    res = run_twice(lambda o: flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk),
                                                     return_softmax_lse=True, out=o, **kw),
                    lambda: nan_full(q.shape, dtype))
    check_varlen(res, q, cu_q, packed_kv(k, v, cu_k, lk), kw)
    del k, v
    torch.cuda.empty_cache()


# ---- streams and CUDA graphs ---------------------------------------------------------------------


def test_runs_on_current_stream(seed):
    """The kernels run on torch's current stream. On a side stream: a ~25 ms spin, q overwritten,
    the call, then a snapshot of out / lse. A kernel launched on another stream would read the old
    q or still be running when the (much shorter) snapshot copy runs, leaving NaN in it."""
    dtype, b, s, hq, hkv, d = torch.float16, 1, 4096, 8, 8, 128  # ~70 GFLOP: far longer than the copy
    k, v = randn(b, s, hkv, d, dtype=dtype), randn(b, s, hkv, d, dtype=dtype)
    q_new = randn(b, s, hq, d, dtype=dtype)
    q = randn(b, s, hq, d, dtype=dtype)
    out = nan_full(q.shape, dtype)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(50_000_000)  # ~25 ms of GPU clock cycles
        else:  # about as long in matrix products
            x = torch.randn(8192, 8192, device=DEV, dtype=torch.float16)
            for _ in range(20):
                x = (x @ x).clamp_(-1, 1)
        q.copy_(q_new)
        lse = flash_attn_func(q, k, v, return_softmax_lse=True, out=out)[1]
        out_snapshot, lse_snapshot = out.clone(), lse.clone()
    side.synchronize()
    torch.cuda.synchronize()
    check_dense((out_snapshot, lse_snapshot), q_new, k, v, {})


def test_cuda_graph_dense(seed):
    """No host synchronisation or allocation on the hot path: the call captures into a CUDA graph,
    and replays with new inputs give the new results."""
    dtype, b, sq, sk, hq, hkv, d = torch.bfloat16, 2, 128, 300, 8, 2, 128
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    out = nan_full(q.shape, dtype)
    kw = make_options(seed, "causal+alibi", b, hq)
    graph = capture_or_xfail(lambda: flash_attn_func(q, k, v, out=out, **kw))
    for _ in range(2):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_o, ref_lse, _ = R.attention_ref(q, k, v, **kw)
        naive_o, _, _ = R.attention_ref(q, k, v, naive=True, **kw)
        R.assert_out_close("out", out, ref_o, naive_o)
        R.assert_empty_rows_zero("out", out, ref_lse)


def test_cuda_graph_varlen_paged(seed):
    """A captured paged varlen call (block table, seqused_k) follows new lengths, page tables and
    queries written into its static inputs between replays (index tensors are read on the GPU)."""
    dtype, hq, hkv, d, ps = torch.float16, 8, 2, 128, 16
    lq = [17, 1, 40, 0]
    msk, pages_per_seq = 300, 300 // ps + 1
    num_pages = len(lq) * pages_per_seq + 5
    cu_q = cumsum0(lq)
    q = randn(cu_q[-1], hq, d, dtype=dtype)
    kp = randn(num_pages, ps, hkv, d, dtype=dtype)
    vp = randn(num_pages, ps, hkv, d, dtype=dtype)
    cq = i32(cu_q)
    seqused = i32([msk] * len(lq))
    bt = torch.randperm(num_pages, device=DEV)[:len(lq) * pages_per_seq].to(torch.int32).view(len(lq), -1).contiguous()
    out = nan_full(q.shape, dtype)
    kw = {"causal": True}
    graph = capture_or_xfail(lambda: flash_attn_varlen_func(q, kp, vp, cq, None, max(lq), msk, block_table=bt,
                                                    seqused_k=seqused, out=out, **kw))
    for _ in range(2):
        lk = [seed.randint(0, msk) for _ in lq]
        lk[seed.randrange(len(lk))] = msk
        seqused.copy_(i32(lk))
        bt.copy_(torch.randperm(num_pages, device=DEV)[:bt.numel()].to(torch.int32).view_as(bt))
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        kv = paged_kv(kp, vp, bt.tolist(), lk)
        ref_o, ref_lse, _ = R.varlen_ref(q, cu_q, kv, **kw)
        naive_o, _, _ = R.varlen_ref(q, cu_q, kv, naive=True, **kw)
        R.assert_out_close("out", out, ref_o, naive_o)
        R.assert_empty_rows_zero("out", out, ref_lse)


def test_inconsistent_index_tensors_stay_in_bounds():
    """cu_seqlens past the packed tensors, decreasing offsets, page ids outside the cache and
    seqused_k beyond the block table: nothing is validated on the host (no sync), the kernels
    clamp, so the call completes and every written value is finite (memcheck runs the same case
    in scripts/gpu_sanitize.sh)."""
    import sanitize_prefill
    for out in sanitize_prefill.inconsistent_indices(None, False, torch.float16):
        assert torch.isfinite(out).all()



# ---- the sm80 mma.sync kernel where the sm_90a kernel would run -------------------------------
# On an H200 head_dim 64 / 128 / 256 (and the sizes rounding up to them) go to the wgmma kernel;
# FASTATTN_PREFILL_KERNEL=sm80 forces the mma.sync kernel that sm_80 GPUs run for them, so both
# stay covered on one machine.
@pytest.mark.parametrize("d", [64, 128, 256], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sm80_kernel_forced(monkeypatch, seed, dtype, d):
    monkeypatch.setenv("FASTATTN_PREFILL_KERNEL", "sm80")
    test_head_dims(seed, dtype, d, True)
    test_head_dims(seed, dtype, d, False)


@pytest.mark.parametrize("page_size", [5, 16, 256], ids=lambda p: f"page{p}")
def test_sm80_kernel_forced_paged(monkeypatch, seed, page_size):
    monkeypatch.setenv("FASTATTN_PREFILL_KERNEL", "sm80")
    test_varlen_paged_block_table(seed, torch.bfloat16, page_size, ALL, "seqused_k")


# ---- attention sinks ----------------------------------------------------------------------------
# sinks= (or s_aux=) folded into each finished row by both prefill kernels (prefill_kernel.cuh's
# finish_row), into the softmax-matrix pass and, for varlen, into the padding rows past
# cu_seqlens_q[B], which see no key (LSE sinks[h]). Checked against the float64 reference with the
# sink as one more column of each softmax; rows that see no key exactly 0 with LSE sinks[h].

SINK_SHAPES = [(2, 113, 799, 128), (2, 799, 113, 64), (3, 1, 500, 256), (1, 70, 130, 96),
               (2, 200, 33, 40)]


@pytest.mark.parametrize("kernel", ["auto", "sm80"])
@pytest.mark.parametrize("shape", SINK_SHAPES, ids=lambda s: "b%d-q%d-k%d-d%d" % s)
@pytest.mark.parametrize("opt", ["none", "causal", ALL])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_sinks(monkeypatch, seed, dtype, opt, shape, kernel):
    """flash_attn_func(sinks=) on the kernel the GPU picks (the wgmma kernel on an H200 for
    head_dim 64 / 128 / 256) and on the mma.sync kernel, with attn_probs."""
    if kernel == "sm80":
        monkeypatch.setenv("FASTATTN_PREFILL_KERNEL", "sm80")
    b, sq, sk, d = shape
    hq, hkv = 8, 2
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    kw = make_options(seed, opt, b, hq)
    sinks = strided_sinks(hq)
    res = run_twice(lambda o: flash_attn_func(q, k, v, return_attn_probs=True, out=o, sinks=sinks, **kw),
                    lambda: nan_full(q.shape, dtype))
    check_dense(res, q, k, v, kw, probs_atol=PROBS_ATOL, sinks=sinks)


@pytest.mark.parametrize("kernel", ["auto", "sm80"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sinks_outweigh_far_keys(monkeypatch, seed, dtype, kernel):
    """Rows whose keys ALiBi puts so far below the sink that they weigh 0 even in float64 (the
    reference's output exactly 0) are the sink's state alone, like rows that see no key: out exactly
    0 and LSE exactly sinks[h] (check_dense's assert_sink_rows). One key, 1000 query rows, not
    causal, slopes of 2: row i's score carries -2 (999 - i), so rows before ~600 lose their key.
    (A random scenario found the LSE an ulp off there: the fold took the keys' path. sink x log2(e)
    x ln2 rounds back to the sink for some sinks, hence 32 heads.)"""
    if kernel == "sm80":
        monkeypatch.setenv("FASTATTN_PREFILL_KERNEL", "sm80")
    b, sq, sk, hq, hkv, d = 2, 1000, 1, 32, 8, 128
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    kw = dict(alibi_slopes=torch.full((hq,), 2.0, device=DEV))
    sinks = strided_sinks(hq)
    res = run_twice(lambda o: flash_attn_func(q, k, v, return_softmax_lse=True, out=o, sinks=sinks, **kw),
                    lambda: nan_full(q.shape, dtype))
    ref_o = R.attention_ref(q, k, v, sinks=sinks, **kw)[0]
    assert bool((ref_o == 0).all(dim=-1).any()), "no row lost its key: the test would check nothing"
    check_dense(res, q, k, v, kw, sinks=sinks)


@pytest.mark.parametrize("kernel", ["auto", "sm80"])
@pytest.mark.parametrize("keys", ["packed", "page1", "page16"])
@pytest.mark.parametrize("heads", [(8, 2, 128), (64, 8, 64)], ids=["h8-2-d128", "gptoss-h64-8-d64"])
@pytest.mark.parametrize("opt", ["causal", ALL])
def test_varlen_sinks(monkeypatch, seed, opt, heads, keys, kernel):
    """flash_attn_varlen_func(s_aux=) (vLLM's name) over packed and paged keys, ragged lengths with
    empty sequences, three padding rows past cu_seqlens_q[B] and attn_probs; gpt-oss's head shape
    among them."""
    if kernel == "sm80":
        monkeypatch.setenv("FASTATTN_PREFILL_KERNEL", "sm80")
    dtype = torch.bfloat16
    lq, lk = LENGTHS["ragged"]
    hq, hkv, d = heads
    pad = 3
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q = randn(cu_q[-1] + pad, hq, d, dtype=dtype)
    kw = make_options(seed, opt, len(lq), hq)
    sinks = strided_sinks(hq)
    cq, ck = i32(cu_q), i32(cu_k)
    if keys == "packed":
        k, v = randn(cu_k[-1], hkv, d, dtype=dtype), randn(cu_k[-1], hkv, d, dtype=dtype)
        extra, kv = {}, packed_kv(k, v, cu_k, lk)
    else:
        page_size = int(keys[4:])
        table, num_pages = make_block_table(seed, lk, page_size)
        k = randn(num_pages, page_size, hkv, d, dtype=dtype)
        v = randn(num_pages, page_size, hkv, d, dtype=dtype)
        extra = dict(block_table=torch.tensor(table, dtype=torch.int32, device=DEV))
        kv = paged_kv(k, v, table, lk)
    res = run_twice(lambda o: flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), return_attn_probs=True,
                                                     out=o, s_aux=sinks, **extra, **kw),
                    lambda: nan_full(q.shape, dtype))
    check_varlen(res, q, cu_q, kv, kw, probs_atol=PROBS_ATOL, sinks=sinks)
    assert torch.equal(res[1][:, cu_q[-1]:], sinks[:, None].expand(hq, pad))


# ---- random scenarios ------------------------------------------------------------------------------
# Calls drawn from the whole option space at once, so that knobs meet in combinations no table
# above lists: the API (dense, varlen over packed or paged keys), head dim, GQA ratio, lengths,
# every mask and score option, sinks, attn_probs, padding rows and the kernel.

PREFILL_SCENARIO_WORK = 4e7  # at most batch x Hq x Sq x Sk score elements, so the reference stays cheap


def draw_prefill_options(rng):
    """A '+'-joined option name for make_options: causal half the time; a window of one of four
    forms, ALiBi slopes ((Hq) or (B, Hq)), softcap and a scale a quarter of the time each."""
    opts = [o for o, p in (("causal", 0.5), (rng.choice(["window", "wleft", "wright", "wzero"]), 0.25),
                           (rng.choice(["alibi", "alibi_bh"]), 0.25), ("softcap", 0.25), ("scale", 0.25))
            if rng.random() < p]
    return "+".join(opts) or "none"


def draw_prefill_scenario(rng):
    """(dtype, knobs) of one prefill call: api dense / packed / paged; b, hq, hkv, d; per-sequence
    query and key lengths (0 among them for varlen); page size; padding rows past cu_seqlens_q[B];
    options; sinks; attn_probs; the mma.sync kernel forced a quarter of the time."""
    api = rng.choice(["dense", "packed", "paged"])
    hkv = rng.choice([1, 2, 4, 8])
    hq = hkv * rng.choice([r for r in (1, 2, 4, 8) if hkv * r <= 64])
    b = rng.randint(1, 4)

    def length():
        return rng.choice([1, rng.randint(1, 64), rng.randint(1, 300), rng.randint(300, 1500)])

    if api == "dense":
        lq, lk = [length()] * b, [length()] * b
    else:
        lq = [0 if rng.random() < 0.1 else length() for _ in range(b)]
        lk = [0 if rng.random() < 0.1 else length() for _ in range(b)]
        if max(lq) == 0:  # max_seqlen_q >= 1
            lq[rng.randrange(b)] = 1
    while b * hq * max(lq) * max(lk) > PREFILL_SCENARIO_WORK:
        lq, lk = [(n + 1) // 2 for n in lq], [(n + 1) // 2 for n in lk]
    cfg = dict(api=api, b=b, hq=hq, hkv=hkv, d=rng.choice(HEAD_DIMS), lq=lq, lk=lk,
               opt=draw_prefill_options(rng), sinks=rng.random() < 0.3,
               probs=rng.random() < 0.15 and b * hq * max(lq) * max(lk) <= 4e6,
               sm80=rng.random() < 0.25)
    if api == "paged":
        cfg["page"] = rng.choice([1, 5, 16, 16, 64, 256])
    if api != "dense":
        cfg["pad"] = rng.choice([0, 0, 0, 3])
    return rng.choice(DTYPES), cfg


def run_prefill_scenario(rng, dtype, cfg, monkeypatch):
    """One drawn call into two NaN-poisoned out= buffers (bitwise equal), against the float64
    reference: out by the 2x rule, LSE, attn_probs, empty rows and rows with only a sink."""
    if cfg["sm80"]:
        monkeypatch.setenv("FASTATTN_PREFILL_KERNEL", "sm80")
    else:
        monkeypatch.delenv("FASTATTN_PREFILL_KERNEL", raising=False)
    b, hq, hkv, d, lq, lk = cfg["b"], cfg["hq"], cfg["hkv"], cfg["d"], cfg["lq"], cfg["lk"]
    kw = make_options(rng, cfg["opt"], b, hq)
    sinks = strided_sinks(hq) if cfg["sinks"] else None
    extra = dict(sinks=sinks, return_attn_probs=cfg["probs"], return_softmax_lse=not cfg["probs"])
    probs_atol = PROBS_ATOL if cfg["probs"] else None
    if cfg["api"] == "dense":
        q = randn(b, lq[0], hq, d, dtype=dtype)
        k, v = randn(b, lk[0], hkv, d, dtype=dtype), randn(b, lk[0], hkv, d, dtype=dtype)
        res = run_twice(lambda o: flash_attn_func(q, k, v, out=o, **extra, **kw), lambda: nan_full(q.shape, dtype))
        check_dense(res, q, k, v, kw, probs_atol=probs_atol, sinks=sinks)
        return
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q = randn(cu_q[-1] + cfg["pad"], hq, d, dtype=dtype)
    if cfg["api"] == "packed":
        k, v = randn(cu_k[-1], hkv, d, dtype=dtype), randn(cu_k[-1], hkv, d, dtype=dtype)
        kv, keys = packed_kv(k, v, cu_k, lk), {}
    else:
        table, num_pages = make_block_table(rng, lk, cfg["page"])
        k = randn(num_pages, cfg["page"], hkv, d, dtype=dtype)
        v = randn(num_pages, cfg["page"], hkv, d, dtype=dtype)
        kv, keys = paged_kv(k, v, table, lk), dict(block_table=torch.tensor(table, dtype=torch.int32, device=DEV))
    cq, ck = i32(cu_q), i32(cu_k)
    k_before, v_before = k.clone(), v.clone()
    res = run_twice(lambda o: flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), out=o, **keys,
                                                     **extra, **kw),
                    lambda: nan_full(q.shape, dtype))
    assert torch.equal(k, k_before) and torch.equal(v, v_before), "the call wrote its keys or values"
    check_varlen(res, q, cu_q, kv, kw, probs_atol=probs_atol, sinks=sinks)


def test_prefill_random_scenarios(seed, monkeypatch):
    """RANDOM_SCENARIOS prefill calls drawn fresh (draw_prefill_scenario), each through
    run_prefill_scenario. A failure names the scenario's knobs; FASTATTN_TEST_SEED replays the
    whole draw."""
    run_random_scenarios(seed, RANDOM_SCENARIOS, draw_prefill_scenario,
                         lambda dtype, cfg: run_prefill_scenario(seed, dtype, cfg, monkeypatch))
