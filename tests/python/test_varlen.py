"""flash_attn_varlen_func (packed keys, paged keys through a block table, seqused_k) and the
packed variants, against the float64 reference."""

import numpy as np
import pytest

import fastattn
import reference as ref
from helpers import (DTYPES, alibi_slopes, assert_close, assert_lse, assert_probs, draw_sinks,
                     int32, nan_like, naive_and_exact, randn, to64)

# Ragged length sets: (query lengths, key lengths); includes 0 and 1, Sq > Sk and Sq < Sk.
LENGTHS = {
    "ragged": ([17, 1, 0, 113, 40], [113, 1, 5, 17, 0]),
    "equal": ([31, 31, 31], [31, 31, 31]),
    "decode": ([1, 1, 1, 1], [0, 1, 77, 300]),
    "qlong": ([64, 9], [3, 9]),
}

OPTIONS = ["none", "causal", "window", "alibi_heads", "alibi_batch_heads", "softcap", "all"]


def make_options(rng, name, batch, heads):
    kw = {}
    if name in ("causal", "all"):
        kw["causal"] = True
    if name in ("window", "all"):
        kw["window_size"] = (int(rng.integers(0, 40)), int(rng.integers(0, 8)))
    if name == "alibi_heads":
        kw["alibi_slopes"] = alibi_slopes(rng, (heads,))
    if name in ("alibi_batch_heads", "all"):
        kw["alibi_slopes"] = alibi_slopes(rng, (batch, heads))
    if name in ("softcap", "all"):
        kw["softcap"] = float(rng.uniform(0.5, 3.0))
    if name == "all":
        kw["softmax_scale"] = float(rng.uniform(0.05, 0.5))
    return kw


def ref_kwargs(kw):
    return dict(scale=kw.get("softmax_scale"), causal=kw.get("causal", False),
                window=kw.get("window_size", (-1, -1)), softcap=kw.get("softcap", 0.0),
                alibi=kw.get("alibi_slopes"))


def cumsum0(lens):
    return int32(np.concatenate([[0], np.cumsum(lens)]))


def make_block_table(rng, lens, page_size, extra_pages=3):
    """Random page assignment: a block table (B, max_pages) over a pool with unused pages."""
    need = [(n + page_size - 1) // page_size for n in lens]
    max_pages = max(need + [1])
    num_pages = sum(need) + extra_pages
    perm = rng.permutation(num_pages)
    table = np.zeros((len(lens), max_pages), dtype=np.int32)
    pos = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[pos:pos + n]
        # Unused entries point at valid (random) pages: they must never be read.
        table[b, n:] = rng.integers(0, num_pages, size=max_pages - n)
        pos += n
    return table, num_pages


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", list(LENGTHS), ids=str)
@pytest.mark.parametrize("opt", OPTIONS)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=lambda h: f"h{h[0]}-{h[1]}")
def test_varlen_packed(rng, dtype, lengths, opt, heads):
    lq, lk = LENGTHS[lengths]
    hq, hkv = heads
    d = 64
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q, q64 = randn(rng, (int(cu_q[-1]), hq, d), dtype)
    k, k64 = randn(rng, (int(cu_k[-1]), hkv, d), dtype)
    v, v64 = randn(rng, (int(cu_k[-1]), hkv, d), dtype)
    kw = make_options(rng, opt, len(lq), hq)
    out, lse = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                               return_softmax_lse=True, out=nan_like(q), **kw)
    (o64, lse64, _), (onaive, _, _) = naive_and_exact(ref.attention_varlen, dtype, q64, cu_q,
                                                      k64, v64, cu_k, **ref_kwargs(kw))
    assert_close("out", out, o64, onaive, dtype)
    assert_lse("softmax_lse", lse, lse64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 5, 16, 256])
@pytest.mark.parametrize("opt", ["none", "causal", "all"])
@pytest.mark.parametrize("lengths_from", ["cu_seqlens_k", "seqused_k"])
def test_varlen_paged(rng, dtype, page_size, opt, lengths_from):
    lq, lk = LENGTHS["ragged"]
    hq, hkv, d = 8, 2, 64
    cu_q = cumsum0(lq)
    table, num_pages = make_block_table(rng, lk, page_size)
    q, q64 = randn(rng, (int(cu_q[-1]), hq, d), dtype)
    kp, kp64 = randn(rng, (num_pages, page_size, hkv, d), dtype)
    vp, vp64 = randn(rng, (num_pages, page_size, hkv, d), dtype)
    kw = make_options(rng, opt, len(lq), hq)
    if lengths_from == "seqused_k":
        cu_k, seqused = None, int32(lk)
    else:
        cu_k, seqused = cumsum0(lk), None
    out, lse = fastattn.flash_attn_varlen_func(
        q, kp, vp, cu_q, cu_k, max(lq), max(lk), block_table=table, seqused_k=seqused,
        return_softmax_lse=True, out=nan_like(q), **kw)
    (o64, lse64, _), (onaive, _, _) = naive_and_exact(
        ref.attention_varlen, dtype, q64, cu_q, kp64, vp64, cumsum0(lk), block_table=table,
        **ref_kwargs(kw))
    assert_close("out", out, o64, onaive, dtype)
    assert_lse("softmax_lse", lse, lse64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_seqused_k_with_packed_keys(rng, dtype):
    """seqused_k limits each sequence to its first keys even when cu_seqlens_k allows more."""
    lq, lk = [5, 9, 1], [20, 9, 33]
    used = [7, 0, 33]
    hq = hkv = 4
    d = 32
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q, q64 = randn(rng, (int(cu_q[-1]), hq, d), dtype)
    k, k64 = randn(rng, (int(cu_k[-1]), hkv, d), dtype)
    v, v64 = randn(rng, (int(cu_k[-1]), hkv, d), dtype)
    out = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                          seqused_k=int32(used), out=nan_like(q))
    # Reference: packed keys trimmed to seqused_k.
    (o64, _, _), (onaive, _, _) = naive_and_exact(ref.attention_varlen, dtype, q64, cu_q, k64,
                                                  v64, cu_k, seqused_k=used)
    assert_close("out", out, o64, onaive, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [False, True])
def test_varlen_attn_probs(rng, dtype, paged):
    lq, lk = [3, 0, 12], [7, 4, 9]
    hq, hkv, d = 4, 2, 16
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q, q64 = randn(rng, (int(cu_q[-1]), hq, d), dtype)
    msq, msk = 14, 11  # upper bounds larger than the lengths: probs are zero-padded
    if paged:
        table, num_pages = make_block_table(rng, lk, 4)
        k, k64 = randn(rng, (num_pages, 4, hkv, d), dtype)
        v, v64 = randn(rng, (num_pages, 4, hkv, d), dtype)
        extra = dict(block_table=table)
    else:
        k, k64 = randn(rng, (int(cu_k[-1]), hkv, d), dtype)
        v, v64 = randn(rng, (int(cu_k[-1]), hkv, d), dtype)
        extra = {}
    out, lse, probs = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, msq, msk, causal=True,
                                                      return_attn_probs=True, **extra)
    o64, lse64, p64 = ref.attention_varlen(q64, cu_q, k64, v64, cu_k, causal=True,
                                           max_seqlen_q=msq, max_seqlen_k=msk,
                                           block_table=extra.get("block_table"))
    onaive, _, _ = ref.attention_varlen(q64, cu_q, k64, v64, cu_k, causal=True,
                                        block_table=extra.get("block_table"),
                                        rnd=ref.rounder(dtype))
    assert tuple(probs.shape) == (3, hq, msq, msk)
    assert_close("out", out, o64, onaive, dtype)
    assert_lse("softmax_lse", lse, lse64)
    assert_probs("attn_probs", probs, p64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_qkvpacked(rng, dtype, causal):
    lens = [13, 1, 0, 40]
    h, d = 4, 32
    cu = cumsum0(lens)
    qkv, qkv64 = randn(rng, (int(cu[-1]), 3, h, d), dtype)
    out = fastattn.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=causal)
    (o64, _, _), (onaive, _, _) = naive_and_exact(ref.attention_varlen, dtype, qkv64[:, 0], cu,
                                                  qkv64[:, 1], qkv64[:, 2], cu, causal=causal)
    assert_close("out", out, o64, onaive, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_kvpacked(rng, dtype, causal):
    lq, lk = [5, 17, 1], [9, 3, 30]
    hq, hkv, d = 8, 2, 32
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q, q64 = randn(rng, (int(cu_q[-1]), hq, d), dtype)
    kv, kv64 = randn(rng, (int(cu_k[-1]), 2, hkv, d), dtype)
    out, lse = fastattn.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lq), max(lk),
                                                        causal=causal, return_softmax_lse=True)
    (o64, lse64, _), (onaive, _, _) = naive_and_exact(ref.attention_varlen, dtype, q64, cu_q,
                                                      kv64[:, 0], kv64[:, 1], cu_k,
                                                      causal=causal)
    assert_close("out", out, o64, onaive, dtype)
    assert_lse("softmax_lse", lse, lse64)


def test_varlen_matches_batched(rng):
    """Equal-length varlen equals the dense batched call (same kernel semantics)."""
    b, s, h, d = 3, 20, 4, 32
    q, _ = randn(rng, (b, s, h, d), "float32")
    k, _ = randn(rng, (b, s, h, d), "float32")
    v, _ = randn(rng, (b, s, h, d), "float32")
    dense = fastattn.flash_attn_func(q, k, v, causal=True)
    cu = cumsum0([s] * b)
    packed = fastattn.flash_attn_varlen_func(q.reshape(b * s, h, d), k.reshape(b * s, h, d),
                                             v.reshape(b * s, h, d), cu, cu, s, s, causal=True)
    assert np.max(np.abs(to64(packed).reshape(b, s, h, d) - to64(dense))) <= 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["none", "causal", "all"])
@pytest.mark.parametrize("page_size", [None, 16])
def test_varlen_long(rng, dtype, opt, page_size):
    """Longer ragged sequences (799 keys / queries) across many key tiles."""
    lq, lk = [799, 1, 113], [799, 799, 0]
    hq, hkv, d = 4, 2, 64
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q, q64 = randn(rng, (int(cu_q[-1]), hq, d), dtype)
    kw = make_options(rng, opt, len(lq), hq)
    if page_size is None:
        k, k64 = randn(rng, (int(cu_k[-1]), hkv, d), dtype)
        v, v64 = randn(rng, (int(cu_k[-1]), hkv, d), dtype)
        extra = {}
    else:
        table, num_pages = make_block_table(rng, lk, page_size)
        k, k64 = randn(rng, (num_pages, page_size, hkv, d), dtype)
        v, v64 = randn(rng, (num_pages, page_size, hkv, d), dtype)
        extra = dict(block_table=table)
    out, lse = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                               return_softmax_lse=True, out=nan_like(q),
                                               **extra, **kw)
    (o64, lse64, _), (onaive, _, _) = naive_and_exact(ref.attention_varlen, dtype, q64, cu_q,
                                                      k64, v64, cu_k, **extra, **ref_kwargs(kw))
    assert_close("out", out, o64, onaive, dtype)
    assert_lse("softmax_lse", lse, lse64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_padding_rows(rng, dtype):
    """Rows of q past cu_seqlens_q[-1] (padding, e.g. for CUDA graphs) get output 0, LSE -inf."""
    lq, lk = [3, 4], [5, 2]
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    q, q64 = randn(rng, (int(cu_q[-1]) + 3, 4, 16), dtype)
    k, k64 = randn(rng, (int(cu_k[-1]), 2, 16), dtype)
    v, v64 = randn(rng, (int(cu_k[-1]), 2, 16), dtype)
    out, lse = fastattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, causal=True,
                                               return_softmax_lse=True, out=nan_like(q))
    out, lse = to64(out), to64(lse)
    assert np.all(out[7:] == 0) and np.all(np.isneginf(lse[:, 7:]))
    (o64, lse64, _), (onaive, _, _) = naive_and_exact(ref.attention_varlen, dtype, q64[:7], cu_q,
                                                      k64, v64, cu_k, causal=True)
    assert_close("out", out[:7], o64, onaive, dtype)
    assert_lse("softmax_lse", lse[:, :7], lse64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [None, 1, 16])
@pytest.mark.parametrize("opt", ["none", "causal", "all"])
def test_varlen_sinks(rng, dtype, paged, opt):
    """sinks (and s_aux, the same) over packed and paged keys: ragged lengths with an empty
    sequence, a decode-shaped sequence, padding rows past cu_seqlens_q[-1] (lse sinks[h]: they
    see no key) and attn_probs."""
    lq, lk = [17, 1, 3, 40], [60, 1, 0, 33]
    heads_q, heads_kv, d, pad = 8, 2, 32, 2
    cu_q, cu_k = cumsum0(lq), cumsum0(lk)
    total_q = int(cu_q[-1]) + pad
    q, q64 = randn(rng, (total_q, heads_q, d), dtype)
    kw = make_options(rng, opt, len(lq), heads_q)
    sinks = draw_sinks(rng, heads_q, dtype)
    if paged is None:
        k, k64 = randn(rng, (int(cu_k[-1]), heads_kv, d), dtype)
        v, v64 = randn(rng, (int(cu_k[-1]), heads_kv, d), dtype)
        call, refkw = dict(cu_seqlens_k=cu_k), dict(cu_k=cu_k)
    else:
        table, num_pages = make_block_table(rng, lk, paged)
        k, k64 = randn(rng, (num_pages, paged, heads_kv, d), dtype)
        v, v64 = randn(rng, (num_pages, paged, heads_kv, d), dtype)
        call = dict(cu_seqlens_k=cu_k, block_table=table)
        refkw = dict(cu_k=cu_k, block_table=table)
    out = nan_like(q)
    o, lse, probs = fastattn.flash_attn_varlen_func(
        q, k, v, cu_q, call.pop("cu_seqlens_k"), max(lq), max(lk), return_attn_probs=True,
        out=out, s_aux=sinks, **call, **kw)
    assert o is out
    (o64, lse64, p64), (onaive, _, _) = naive_and_exact(
        ref.attention_varlen, dtype, q64, cu_q, k64, v64, sinks=to64(sinks),
        **refkw, **ref_kwargs(kw))
    assert_close("out", o, o64, onaive, dtype)
    assert_lse("softmax_lse", lse, lse64)
    assert_probs("attn_probs", probs, p64)
    assert np.array_equal(to64(lse)[:, -pad:], np.repeat(to64(sinks)[:, None], pad, axis=1))


def test_varlen_sinks_errors(rng):
    """Bad sinks are refused before the output is written; sinks and s_aux together too."""
    cu = cumsum0([3, 2])
    q = rng.standard_normal((5, 4, 16)).astype(np.float32)
    for kw, error, message in [(dict(sinks=np.zeros(2, np.float32)), ValueError, r"sinks.*\(Hq\)"),
                               (dict(sinks=np.zeros(4, np.int32)), TypeError, r"sinks"),
                               (dict(sinks=np.zeros(4, np.float32), s_aux=np.zeros(4, np.float32)),
                                TypeError, "sinks and s_aux")]:
        out = nan_like(q)
        with pytest.raises(error, match=message):
            fastattn.flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, out=out, **kw)
        assert np.isnan(out).all()
