"""Cascade: merge_state / merge_state_in_place / merge_states (algebra, empty states, merge of
partial results == full attention) and shared-prefix attention (functional form and FlashInfer's
wrapper classes) against the float64 reference."""

import math

import numpy as np
import pytest

import fastattn
import reference as ref
from helpers import (DTYPES, assert_close, assert_lse, int32, max_abs, nan_like, randn, to64,
                     torch)


def rand_state(rng, dtype, s=7, h=4, d=32, empty_rows=()):
    """A random attention state (v in dtype, s float32) with some rows empty (-inf)."""
    v, v64 = randn(rng, (s, h, d), dtype)
    lse = rng.uniform(-3.0, 6.0, size=(s, h)).astype(np.float32)
    for r in empty_rows:
        lse[r] = -np.inf
    return v, v64, lse


def merge_tol(ref64, dtype):
    """Merging is a couple of float32 operations then one rounding to the output dtype."""
    rnd = ref.rounder(dtype)
    base = max_abs(rnd(ref64), ref64)
    return 2 * base + 1e-5 * max(1.0, float(np.abs(ref64).max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_state(rng, dtype):
    va, va64, sa = rand_state(rng, dtype, empty_rows=[1])
    vb, vb64, sb = rand_state(rng, dtype, empty_rows=[2])
    v, s = fastattn.merge_state(va, sa, vb, sb)
    v64, s64 = ref.merge_state(va64, sa, vb64, sb)
    assert max_abs(to64(v), v64) <= merge_tol(v64, dtype)
    assert_lse("s", s, s64, rel=1e-6)
    assert tuple(v.shape) == tuple(va.shape) and str(s.dtype).endswith("float32")


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_with_empty_state_is_exact(rng, dtype):
    va, va64, sa = rand_state(rng, dtype)
    vb, _, sb = rand_state(rng, dtype)
    sb[:] = -np.inf  # the empty state; its v is arbitrary (finite) and must not leak
    v, s = fastattn.merge_state(va, sa, vb, sb)
    assert np.array_equal(to64(v), va64), "merging with an empty state must be the identity"
    assert np.array_equal(to64(s), sa)
    # Both empty: no NaN, output 0 and LSE -inf.
    v, s = fastattn.merge_state(vb, sb, vb, sb)
    assert not np.isnan(to64(v)).any() and not np.isnan(to64(s)).any()
    assert np.all(np.isneginf(to64(s)))
    assert np.all(to64(v) == 0)


def test_merge_associative_and_commutative(rng):
    a = rand_state(rng, "float32", empty_rows=[0])
    b = rand_state(rng, "float32", empty_rows=[0, 3])
    c = rand_state(rng, "float32")
    ab = fastattn.merge_state(a[0], a[2], b[0], b[2])
    ab_c = fastattn.merge_state(ab[0], ab[1], c[0], c[2])
    bc = fastattn.merge_state(b[0], b[2], c[0], c[2])
    a_bc = fastattn.merge_state(a[0], a[2], bc[0], bc[1])
    assert max_abs(ab_c[0], a_bc[0]) <= 1e-5
    assert max_abs(ab_c[1], a_bc[1]) <= 1e-5
    ba = fastattn.merge_state(b[0], b[2], a[0], a[2])
    assert max_abs(ab[0], ba[0]) <= 1e-6 and max_abs(ab[1], ba[1]) <= 1e-6
    many = fastattn.merge_states(np.stack([a[0], b[0], c[0]], axis=1),
                                 np.stack([a[2], b[2], c[2]], axis=1))
    assert max_abs(many[0], ab_c[0]) <= 1e-5 and max_abs(many[1], ab_c[1]) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", [None, "bool", "uint8"])
def test_merge_state_in_place(rng, dtype, mask_kind):
    v, v64, s = rand_state(rng, dtype, s=9, empty_rows=[4])
    vo, vo64, so = rand_state(rng, dtype, s=9, empty_rows=[5])
    mask = None
    if mask_kind is not None:
        m = rng.random(9) < 0.6
        m[4] = m[5] = True
        mask = m if mask_kind == "bool" else m.astype(np.uint8)
    v_before = to64(v).copy()
    s_before = s.copy()
    fastattn.merge_state_in_place(v, s, vo, so, mask)
    exp_v, exp_s = ref.merge_state(v64, s_before, vo64, so)
    rows = np.ones(9, bool) if mask is None else np.asarray(mask, bool)
    assert max_abs(to64(v)[rows], exp_v[rows]) <= merge_tol(exp_v[rows], dtype)
    assert_lse("s", s[rows], exp_s[rows], rel=1e-6)
    # Rows with mask false are untouched, bit for bit.
    assert np.array_equal(to64(v)[~rows], v_before[~rows])
    assert np.array_equal(s[~rows], s_before[~rows])


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_attention_sinks(rng, dtype):
    """merge_attention_sinks equals attention over the keys plus one more logit per head with a
    zero value row: the float64 softmax over [scores, sink] of random keys, from scratch; an
    empty state (no keys) becomes (0, sink)."""
    seq, heads, d, n = 5, 3, 16, 11
    q = rng.standard_normal((seq, heads, d))
    k, vals = rng.standard_normal((seq, n, heads, d)), rng.standard_normal((seq, n, heads, d))
    sinks = (rng.standard_normal(heads) * 2).astype(np.float32)
    sc = np.einsum("shd,snhd->shn", q, k) / math.sqrt(d)
    sc[0, 1] = -np.inf  # row 0, head 1: no keys
    m = sc.max(-1, keepdims=True)
    m[np.isneginf(m)] = 0.0
    p = np.exp(sc - m)
    with np.errstate(divide="ignore"):  # the empty row's LSE is -inf
        lse0 = m[..., 0] + np.log(p.sum(-1))
    o0 = np.einsum("shn,snhd->shd", p, vals) / np.where(p.sum(-1) > 0, p.sum(-1), 1)[..., None]
    full = np.concatenate([sc, np.broadcast_to(sinks[None, :, None], (seq, heads, 1))], -1)
    pf = np.exp(full - full.max(-1, keepdims=True))
    want = np.einsum("shn,snhd->shd", pf[..., :-1], vals) / pf.sum(-1)[..., None]
    want_lse = full.max(-1) + np.log(pf.sum(-1))
    v_np = o0.astype(np.float32 if dtype == "bfloat16" else dtype)
    v = torch.from_numpy(v_np.astype(np.float32)).to(torch.bfloat16) if dtype == "bfloat16" else v_np
    # The naive in-dtype merge: the rounded input scaled in float64, then stored in the dtype.
    naive = to64(v) * np.exp(lse0 - np.logaddexp(lse0, sinks[None]))[..., None]
    naive = ref.rounder(dtype)(naive).astype(np.float64)
    s = lse0.astype(np.float32)
    if dtype == "bfloat16":
        s = torch.from_numpy(s)
    fastattn.merge_attention_sinks(v, s, torch.from_numpy(sinks) if dtype == "bfloat16" else sinks)
    assert_close("v", v, want, naive, dtype)
    assert_lse("s", s, want_lse)
    assert to64(v)[0, 1].max() == 0 and float(to64(s)[0, 1]) == pytest.approx(float(sinks[1]))
    with pytest.raises(ValueError, match="sinks"):
        fastattn.merge_attention_sinks(v, s, np.zeros(heads + 1, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 5])
def test_merge_states(rng, dtype, n):
    seq, h, d = 6, 4, 16
    v, v64 = randn(rng, (seq, n, h, d), dtype)
    s = rng.uniform(-2, 5, size=(seq, n, h)).astype(np.float32)
    s[0, :] = -np.inf        # a row with every state empty
    s[1, 0] = -np.inf        # a row with one empty state
    vo, so = fastattn.merge_states(v, s)
    exp_v, exp_s = ref.merge_states(v64, s)
    assert tuple(vo.shape) == (seq, h, d) and tuple(so.shape) == (seq, h)
    assert not np.isnan(to64(vo)).any()
    assert max_abs(to64(vo), exp_v) <= merge_tol(exp_v, dtype)
    assert_lse("s", so, exp_s, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_of_partials_equals_full_attention(rng, dtype):
    """Attention over key chunks (flash_attn_func's outputs and LSE) merged == attention over
    all keys (non-causal: a chunk's mask does not depend on where the chunk sits)."""
    b, sq, sk, hq, hkv, d = 1, 6, 50, 4, 2, 32
    q, q64 = randn(rng, (b, sq, hq, d), dtype)
    k, k64 = randn(rng, (b, sk, hkv, d), dtype)
    v, v64 = randn(rng, (b, sk, hkv, d), dtype)
    cuts = [0, 13, 14, 14, 37, sk]  # includes an empty chunk
    vs, ss = [], []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        o, lse = fastattn.flash_attn_func(q, k[:, lo:hi], v[:, lo:hi], return_softmax_lse=True)
        vs.append(to64(o)[0].astype(np.float32))  # partial outputs kept in float32
        ss.append(np.ascontiguousarray(to64(lse)[0].T, dtype=np.float32))  # (sq, hq)
    v_states = np.stack(vs, axis=1)   # (sq, n, hq, d)
    s_states = np.stack(ss, axis=1)   # (sq, n, hq)
    vo, so = fastattn.merge_states(v_states, s_states)
    o64, lse64, _ = ref.attention_batched(q64, k64, v64)
    onaive, _, _ = ref.attention_batched(q64, k64, v64, rnd=ref.rounder(dtype))
    assert_close("merged", vo, o64[0], onaive[0], dtype)
    assert_lse("merged lse", so, lse64[0].T)
    # The same with pairwise merge_state.
    acc_v, acc_s = v_states[:, 0], s_states[:, 0]
    for i in range(1, v_states.shape[1]):
        acc_v, acc_s = fastattn.merge_state(acc_v, acc_s, v_states[:, i], s_states[:, i])
    assert_close("merged pairwise", acc_v, o64[0], onaive[0], dtype)


def test_lse_base_conversion(rng):
    s_nat = rng.uniform(-5, 5, size=(4, 3)).astype(np.float32)
    s_nat[0, 0] = -np.inf
    s2 = fastattn.lse_natural_to_base2(s_nat)
    assert np.allclose(s2[1:], s_nat[1:] / math.log(2), rtol=1e-6)
    back = fastattn.lse_base2_to_natural(s2)
    assert np.allclose(back, s_nat, rtol=1e-6) and np.isneginf(back[0, 0])
    # A FlashInfer-style (base 2) state merges correctly after conversion.
    va, _, sa = rand_state(rng, "float32")
    vb, _, sb = rand_state(rng, "float32")
    v_nat, s_nat2 = fastattn.merge_state(va, sa, vb, sb)
    v_b2, s_b2 = fastattn.merge_state(va, fastattn.lse_base2_to_natural(
        fastattn.lse_natural_to_base2(sa)), vb, fastattn.lse_base2_to_natural(
        fastattn.lse_natural_to_base2(sb)))
    assert max_abs(v_nat, v_b2) <= 1e-5 and max_abs(s_nat2, s_b2) <= 1e-5


# ---- shared prefix -------------------------------------------------------------------------


def make_suffix(rng, dtype, suffix_lens, page_size, hkv, d, spare_pages=3):
    """CSR page lists for suffix lengths, and a (pages, 2, page_size, hkv, d) kv_data array."""
    counts = [-(-n // page_size) for n in suffix_lens]
    num_pages = sum(counts) + spare_pages
    perm = rng.permutation(num_pages)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = perm[: sum(counts)].astype(np.int32)
    last = np.array([(n - 1) % page_size + 1 if n else 1 for n in suffix_lens], np.int32)
    kv, kv64 = randn(rng, (num_pages, 2, page_size, hkv, d), dtype)
    return indptr, indices, last, kv, kv64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=lambda h: f"h{h[0]}-{h[1]}")
def test_shared_prefix_decode(rng, dtype, page_size, heads):
    hq, hkv = heads
    d, prefix = 64, 57
    suffix_lens = [0, 1, 23, 40]
    indptr, indices, last, kv, kv64 = make_suffix(rng, dtype, suffix_lens, page_size, hkv, d)
    q, q64 = randn(rng, (len(suffix_lens), hq, d), dtype)
    ks, ks64 = randn(rng, (prefix, hkv, d), dtype)
    vs, vs64 = randn(rng, (prefix, hkv, d), dtype)
    out, lse = fastattn.shared_prefix_attention(q, ks, vs, kv[:, 0], kv[:, 1], indptr, indices,
                                                last, return_lse=True, out=nan_like(q))
    args = (q64, ks64, vs64, kv64[:, 0], kv64[:, 1], indptr, indices, last)
    o64, lse64 = ref.shared_prefix_attention(*args)
    onaive, _ = ref.shared_prefix_attention(*args, rnd=ref.rounder(dtype))
    assert_close("out", out, o64, onaive, dtype)
    assert tuple(lse.shape) == (len(suffix_lens), hq)  # FlashInfer's (seq, heads) layout
    assert_lse("lse", lse, lse64.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_shared_prefix_prefill(rng, dtype, page_size, causal):
    hq, hkv, d, prefix = 8, 2, 32, 45
    suffix_lens = [12, 1, 30, 7, 3]
    # The last request has more queries than suffix keys: its first rows then see only part of
    # the prefix (bottom-right alignment against prefix + suffix), as in full attention.
    qo_lens = [12, 1, 5, 0, 9]
    indptr, indices, last, kv, kv64 = make_suffix(rng, dtype, suffix_lens, page_size, hkv, d)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    q, q64 = randn(rng, (int(qo_indptr[-1]), hq, d), dtype)
    ks, ks64 = randn(rng, (prefix, hkv, d), dtype)
    vs, vs64 = randn(rng, (prefix, hkv, d), dtype)
    out = fastattn.shared_prefix_attention(q, ks, vs, kv[:, 0], kv[:, 1], indptr, indices, last,
                                           qo_indptr=qo_indptr, causal=causal)
    args = (q64, ks64, vs64, kv64[:, 0], kv64[:, 1], indptr, indices, last)
    o64, _ = ref.shared_prefix_attention(*args, qo_indptr=qo_indptr, causal=causal)
    onaive, _ = ref.shared_prefix_attention(*args, qo_indptr=qo_indptr, causal=causal,
                                            rnd=ref.rounder(dtype))
    assert_close("out", out, o64, onaive, dtype)


def contiguous_swap(x, a, b):
    """x with axes a and b swapped, copied contiguous (numpy or torch): FlashInfer's HND forms of
    NHD test data."""
    t = x.swapaxes(a, b)
    return t.contiguous() if torch is not None and isinstance(t, torch.Tensor) else np.ascontiguousarray(t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_wrapper(rng, dtype, layout):
    """FlashInfer's BatchDecodeWithSharedPrefixPagedKVCacheWrapper example, scaled down, in both
    of its layouts (HND: the shared prefix (Hkv, L, D) and the pages (P, 2, Hkv, page_size, D))."""
    num_layers, hq, hkv, d, page_size, prefix = 3, 8, 2, 64, 16, 100
    suffix_lens = [1, 100, 30, 16, 3]
    indptr, indices, last, _, _ = make_suffix(rng, dtype, suffix_lens, page_size, hkv, d)
    num_pages = int(indptr[-1]) + 3
    workspace = np.empty(1 << 20, np.uint8)
    wrapper = fastattn.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(workspace, layout)
    data_type = torch.bfloat16 if dtype == "bfloat16" else dtype
    wrapper.begin_forward(indptr, indices, last, hq, hkv, d, page_size, data_type=data_type)
    for _ in range(num_layers):
        q, q64 = randn(rng, (len(suffix_lens), hq, d), dtype)
        ks, ks64 = randn(rng, (prefix, hkv, d), dtype)
        vs, vs64 = randn(rng, (prefix, hkv, d), dtype)
        kv, kv64 = randn(rng, (num_pages, 2, page_size, hkv, d), dtype)
        if layout == "HND":  # the float64 copies stay NHD, the reference's layout
            ks, vs, kv = contiguous_swap(ks, 0, 1), contiguous_swap(vs, 0, 1), contiguous_swap(kv, 2, 3)
        before = to64(kv).copy()
        o = wrapper.forward(q, ks, vs, kv)
        o2, lse = wrapper.forward_return_lse(q, ks, vs, kv, allow_fp16_qk_reduction=True)
        args = (q64, ks64, vs64, kv64[:, 0], kv64[:, 1], indptr, indices, last)
        o64, lse64 = ref.shared_prefix_attention(*args)
        onaive, _ = ref.shared_prefix_attention(*args, rnd=ref.rounder(dtype))
        assert tuple(o.shape) == (len(suffix_lens), hq, d)
        assert_close("out", o, o64, onaive, dtype)
        assert np.array_equal(to64(o), to64(o2))
        assert_lse("lse", lse, lse64.T)
        # FlashInfer's wrapper runs without fused RoPE, so its RoPE parameters change nothing.
        o3 = wrapper.forward(q, ks, vs, kv, rope_scale=2.0, rope_theta=5e5)
        assert np.array_equal(to64(o3), to64(o))
        assert np.array_equal(to64(kv), before), "forward() wrote into the pages"
    wrapper.end_forward()
    wrapper.reset_workspace_buffer(np.empty(1 << 10, np.uint8))


def test_wrapper_hnd_errors(rng):
    """With kv_layout "HND" the cascade wrappers name the HND shapes they expected."""
    hq, hkv, d, page_size = 4, 2, 16, 4
    indptr, indices, last, kv, _ = make_suffix(rng, "float32", [5, 9], page_size, hkv, d)
    w = fastattn.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(np.empty(16, np.uint8), "HND")
    w.begin_forward(indptr, indices, last, hq, hkv, d, page_size, data_type="float32")
    q, _ = randn(rng, (2, hq, d), "float32")
    ks, _ = randn(rng, (7, hkv, d), "float32")  # NHD's (L, Hkv, D)
    kv_hnd = contiguous_swap(kv, 2, 3)
    with pytest.raises(ValueError, match=r"k_shared must have shape \(num_kv_heads, shared_prefix_len, "
                       r"head_dim\) with kv_layout 'HND' \(num_kv_heads=2 from begin_forward\), "
                       r"got \(7, 2, 16\)"):
        w.forward(q, ks, ks, kv_hnd)
    ks_hnd = contiguous_swap(ks, 0, 1)
    with pytest.raises(ValueError, match=r"unique_kv_data has 4 kv heads \(HND\)"):
        w.forward(q, ks_hnd, ks_hnd, kv)  # NHD pages: dim 1 is the page size
    with pytest.raises(ValueError, match=r"unique_kv_data must have shape \(max_num_pages, 2, "
                       r"num_kv_heads, page_size, head_dim\) \(HND\)"):
        w.forward(q, ks_hnd, ks_hnd, kv_hnd[:, :1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_prefill_wrapper(rng, dtype, causal, layout):
    """FlashInfer's BatchPrefillWithSharedPrefixPagedKVCacheWrapper example, scaled down, in both
    layouts."""
    hq, hkv, d, page_size, prefix = 8, 4, 32, 16, 70
    suffix_lens = [33, 11, 11, 1, 20]
    qo_lens = [33, 11, 4, 1, 0]
    indptr, indices, last, kv, kv64 = make_suffix(rng, dtype, suffix_lens, page_size, hkv, d)
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    wrapper = fastattn.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(np.empty(16, np.uint8),
                                                                       layout)
    wrapper.begin_forward(qo_indptr, indptr, indices, last, hq, hkv, d)
    q, q64 = randn(rng, (int(qo_indptr[-1]), hq, d), dtype)
    ks, ks64 = randn(rng, (prefix, hkv, d), dtype)
    vs, vs64 = randn(rng, (prefix, hkv, d), dtype)
    if layout == "HND":
        ks, vs, kv = contiguous_swap(ks, 0, 1), contiguous_swap(vs, 0, 1), contiguous_swap(kv, 2, 3)
    o, lse = wrapper.forward_return_lse(q, ks, vs, kv, causal=causal)
    args = (q64, ks64, vs64, kv64[:, 0], kv64[:, 1], indptr, indices, last)
    o64, lse64 = ref.shared_prefix_attention(*args, qo_indptr=qo_indptr, causal=causal)
    onaive, _ = ref.shared_prefix_attention(*args, qo_indptr=qo_indptr, causal=causal,
                                            rnd=ref.rounder(dtype))
    assert_close("out", o, o64, onaive, dtype)
    assert_lse("lse", lse, lse64.T)
    # Default causal=True, as in FlashInfer.
    if causal:
        assert np.array_equal(to64(wrapper.forward(q, ks, vs, kv)), to64(o))
    # No fused RoPE in FlashInfer's wrapper either: rope_scale / rope_theta change nothing.
    o2 = wrapper.forward(q, ks, vs, kv, causal=causal, rope_scale=4.0, rope_theta=1e6)
    assert np.array_equal(to64(o2), to64(o))
    wrapper.end_forward()


def test_cascade_composes_with_merge(rng):
    """The cascade's natural-log LSE merges with other states: prefix-only attention via
    flash_attn_varlen_func merged with the suffix-only part equals shared_prefix_attention."""
    hq = hkv = 4
    d, prefix, page_size = 32, 20, 4
    suffix_lens = [5, 9]
    indptr, indices, last, kv, kv64 = make_suffix(rng, "float32", suffix_lens, page_size, hkv, d)
    q, _ = randn(rng, (2, hq, d), "float32")
    ks, _ = randn(rng, (prefix, hkv, d), "float32")
    vs, _ = randn(rng, (prefix, hkv, d), "float32")
    full, full_lse = fastattn.shared_prefix_attention(q, ks, vs, kv[:, 0], kv[:, 1], indptr,
                                                      indices, last, return_lse=True)
    cu1 = int32([0, 1, 2])
    cu_pre = int32([0, prefix, 2 * prefix])
    pre, pre_lse = fastattn.flash_attn_varlen_func(
        q, np.concatenate([ks, ks]), np.concatenate([vs, vs]), cu1, cu_pre, 1, prefix,
        return_softmax_lse=True)
    table = np.zeros((2, 3), np.int32)
    for b in range(2):
        pages = indices[indptr[b]:indptr[b + 1]]
        table[b, :len(pages)] = pages
    suf, suf_lse = fastattn.flash_attn_varlen_func(
        q, kv[:, 0], kv[:, 1], cu1, None, 1, max(suffix_lens), block_table=table,
        seqused_k=int32(suffix_lens), return_softmax_lse=True)
    v, s = fastattn.merge_state(pre, np.ascontiguousarray(pre_lse.T), suf,
                                np.ascontiguousarray(suf_lse.T))
    assert max_abs(v, full) <= 1e-5
    assert max_abs(s, full_lse) <= 1e-5
