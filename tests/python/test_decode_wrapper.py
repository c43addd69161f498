"""FlashInfer-style batch decode over a paged cache (fastattn.BatchDecodeWithPagedKVCacheWrapper)
on the CPU against the float64 reference, its errors, and the split rule it plans with
(fastattn.decode_num_splits_for_lengths)."""

import math

import numpy as np
import pytest

import fastattn
import reference as ref
from helpers import DTYPES, assert_close, assert_lse, int32, nan_like, randn, to64, torch

FACTOR = 3.0  # FlashAttention's KV-cache rule


def make_pages(rng, lens, page_size, spare=3):
    """CSR page lists of sequences with `lens` keys over a pool with `spare` unused pages, in a
    random order: (indptr, indices, last_page_len, num_pages)."""
    counts = [-(-n // page_size) for n in lens]
    num_pages = sum(counts) + spare
    order = rng.permutation(num_pages)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    indices = order[:sum(counts)].astype(np.int32)
    last = np.array([n - (c - 1) * page_size if c else 0 for n, c in zip(lens, counts)], np.int32)
    return indptr, indices, last, num_pages


def reference_rows(q64, k64, v64, indptr, indices, lens, q_len, rnd=None, window_left=-1,
                   window_right=0, softcap=0.0, scale=None, sinks=None):
    """Each request's q_len query rows over its pages: request b's rows are q64[b * q_len:
    (b + 1) * q_len], row i at key position lens[b] - q_len + i, seeing key j where
    pos - window_left <= j <= pos + window_right (-1: that side unbounded); sinks (Hq,) or None.
    out (B * q_len, Hq, D) and lse (B * q_len, Hq)."""
    d = q64.shape[2]
    outs, lses = [], []
    for b, n in enumerate(lens):
        ids = indices[indptr[b]:indptr[b + 1]]
        k = ref.gather_pages(k64, ids, n)
        v = ref.gather_pages(v64, ids, n)
        qpos = n - q_len + np.arange(q_len)
        o, lse, _ = ref.attention_rows(q64[b * q_len:(b + 1) * q_len], k, v, qpos, np.arange(n),
                                       ref.default_scale(d, scale), softcap, None, window_left,
                                       window_right, rnd, sinks)
        outs.append(o), lses.append(lse.T)
    return np.concatenate(outs), np.concatenate(lses)


def reference(q64, k64, v64, indptr, indices, lens, rnd=None, window_left=-1, softcap=0.0,
              scale=None):
    """Each request's single query (after its last key) over its pages: out (B, Hq, D) and
    lse (B, Hq)."""
    return reference_rows(q64, k64, v64, indptr, indices, lens, 1, rnd, window_left, -1, softcap, scale)


def hnd_copy(kv):
    """FlashInfer's HND layout of an NHD pool (P, 2, page_size, Hkv, D): a contiguous
    (P, 2, Hkv, page_size, D) copy of the same pages."""
    t = kv.swapaxes(2, 3)
    return t.contiguous() if torch is not None and isinstance(t, torch.Tensor) else np.ascontiguousarray(t)


def paged_inputs(rng, lens, rows, hq, hkv, d, page_size, dtype, layout="NHD"):
    """A random page pool for `lens` and q of `rows` rows: (indptr, indices, last, q, q64, kv, kv64,
    before). kv is in `layout` (HND a copy); kv64, the reference's, stays NHD; before is kv's bytes
    as float64, to check that run() leaves the cache unchanged."""
    indptr, indices, last, num_pages = make_pages(rng, lens, page_size)
    q, q64 = randn(rng, (rows, hq, d), dtype)
    kv, kv64 = randn(rng, (num_pages, 2, page_size, hkv, d), dtype)
    if layout == "HND":
        kv = hnd_copy(kv)
    return indptr, indices, last, q, q64, kv, kv64, to64(kv).copy()


def run_poisoned(w, q, cache, rows, hq):
    """w.run into NaN-poisoned out / lse of `rows` rows: (out, lse), checked to be the arrays given."""
    out = nan_like(q)
    lse = np.full((rows, hq), np.nan, np.float32)
    o, l = w.run(q, cache, out=out, lse=lse, return_lse=True)
    assert o is out and l is lse
    return o, l


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_wrapper_cpu(rng, dtype, page_size, packed, layout):
    """Ragged lengths (an empty request included), a random page pool, GQA, both cache forms and
    both of FlashInfer's layouts, NaN-poisoned out / lse, against the float64 reference; the cache
    is left unchanged."""
    hq, hkv, d = 8, 2, 64
    lens = list(rng.permutation([0, 1, 17, 40, 129, int(rng.integers(200, 400))]))
    indptr, indices, last, q, q64, kv, kv64, before = paged_inputs(rng, lens, len(lens), hq, hkv, d, page_size,
                                                                   dtype, layout)
    data_type = torch.bfloat16 if dtype == "bfloat16" else dtype
    wrapper = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(1 << 20, np.uint8), layout)
    wrapper.plan(indptr, indices, last, hq, hkv, d, page_size, q_data_type=data_type)
    cache = kv if packed else (kv[:, 0], kv[:, 1])
    o, l = run_poisoned(wrapper, q, cache, len(lens), hq)
    o64, lse64 = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens)
    naive, _ = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, rnd=ref.rounder(dtype))
    assert_close("out", o, o64, naive, dtype, factor=FACTOR)
    assert_lse("lse", l, lse64)
    assert np.array_equal(to64(kv), before), "run() wrote into the cache"
    assert np.array_equal(to64(wrapper.run(q, cache)), to64(o))


def test_decode_wrapper_options_and_forward(rng):
    """window_left, logits_soft_cap and sm_scale from plan(); FlashInfer's deprecated
    begin_forward / forward / forward_return_lse, whose arguments replace the plan's."""
    hq, hkv, d, page_size = 4, 4, 32, 16
    lens = [300, 5, 64, 0, 77]
    indptr, indices, last, num_pages = make_pages(rng, lens, page_size)
    q, q64 = randn(rng, (len(lens), hq, d), "float32")
    kv, kv64 = randn(rng, (num_pages, 2, page_size, hkv, d), "float32")
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    w.plan(indptr, indices, last, hq, hkv, d, page_size, window_left=50, logits_soft_cap=8.0,
           q_data_type="float32", sm_scale=0.3)
    got = w.run(q, kv)
    want, _ = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, window_left=50,
                        softcap=8.0, scale=0.3)
    assert_close("windowed", got, want, want, "float32")
    # window_left given to run() replaces the plan's.
    got = w.run(q, kv, window_left=-1)
    want, _ = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, softcap=8.0, scale=0.3)
    assert_close("unwindowed", got, want, want, "float32")

    w.begin_forward(indptr, indices, last, hq, hkv, d, page_size, data_type="float32")
    got, lse = w.forward_return_lse(q, kv, logits_soft_cap=5.0)
    want, lse64 = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, softcap=5.0)
    assert_close("forward", got, want, want, "float32")
    assert_lse("forward lse", lse, lse64)
    got = w.forward(q, kv)  # the plan's options again (no softcap)
    want, _ = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens)
    assert_close("forward", got, want, want, "float32")
    # rope_scale / rope_theta parametrise FlashInfer's fused RoPE only: with pos_encoding_mode
    # "NONE" they change nothing, in plan() and in forward().
    assert np.array_equal(w.forward(q, kv, rope_scale=8.0, rope_theta=5e5), got)
    w.plan(indptr, indices, last, hq, hkv, d, page_size, q_data_type="float32", rope_scale=8.0,
           rope_theta=5e5)
    assert np.array_equal(w.run(q, kv), got)
    w.end_forward()
    with pytest.raises(RuntimeError, match=r"plan\(\) must be called"):
        w.run(q, kv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sm_scale", [None, 0.3])
def test_decode_wrapper_calibration_scales(rng, dtype, sm_scale):
    """run(q_scale=, k_scale=, v_scale=), FlashInfer's calibration scales: the scores are
    (q . k) * sm_scale * q_scale * k_scale before the soft cap (the LSE is theirs), and out is the
    attention times v_scale; forward() passes them on; 1.0 (what vLLM passes for 16-bit caches)
    changes no bit; against the float64 reference, out / lse poisoned, the cache unchanged."""
    hq, hkv, d, ps, softcap = 8, 2, 64, 16, 6.0
    lens = list(rng.permutation([0, 1, 33, int(rng.integers(100, 500))]))
    indptr, indices, last, q, q64, kv, kv64, before = paged_inputs(rng, lens, len(lens), hq, hkv, d, ps, dtype)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(1 << 20, np.uint8))
    w.plan(indptr, indices, last, hq, hkv, d, ps, logits_soft_cap=softcap, sm_scale=sm_scale,
           q_data_type=torch.bfloat16 if dtype == "bfloat16" else dtype)
    qs, ks, vs = (float(x) for x in rng.uniform(0.3, 2.5, size=3))
    scores_scale = ref.default_scale(d, sm_scale) * qs * ks
    rnd = ref.rounder(dtype)
    o64, lse64 = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, softcap=softcap,
                           scale=scores_scale)
    naive, _ = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, rnd=rnd, softcap=softcap,
                         scale=scores_scale)
    out = nan_like(q)
    lse = np.full((len(lens), hq), np.nan, np.float32)
    o, l = w.run(q, kv, out=out, lse=lse, return_lse=True, q_scale=qs, k_scale=ks, v_scale=vs)
    assert o is out and l is lse
    # An in-dtype computation stores its output in the dtype, then scales that by v_scale.
    assert_close("out", o, o64 * vs, rnd(rnd(naive) * vs), dtype, factor=FACTOR)
    assert_lse("lse", l, lse64)
    assert np.array_equal(to64(kv), before), "run() wrote into the cache"
    # The scales passed through forward_return_lse(), as numpy scalars.
    fo, fl = w.forward_return_lse(q, kv, q_scale=np.float32(qs), k_scale=np.float64(ks), v_scale=vs)
    assert_close("forward out", fo, o64 * vs, rnd(rnd(naive) * vs), dtype, factor=FACTOR)
    assert_lse("forward lse", fl, lse64)
    # vLLM's call with a 16-bit cache: k_scale = v_scale = 1.0, the same bits as no scales.
    plain, plain_lse = w.run(q, kv, return_lse=True)
    ones, ones_lse = w.run(q, kv, return_lse=True, q_scale=None, k_scale=1.0, v_scale=1.0)
    assert np.array_equal(to64(ones), to64(plain)) and np.array_equal(ones_lse, plain_lse)


def test_decode_wrapper_calibration_scale_errors(rng):
    """Bad q_scale / k_scale / v_scale: the argument named, out / lse left poisoned."""
    hq, hkv, d, ps = 4, 2, 16, 4
    lens = [9, 3]
    indptr, indices, last, q, q64, kv, kv64, _ = paged_inputs(rng, lens, 2, hq, hkv, d, ps, "float32")
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32")

    class OtherArray:
        """An array of a framework fastattn does not scale in place (DLPack only)."""

        def __init__(self, a):
            self.a, self.shape, self.dtype = a, a.shape, a.dtype

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    out, lse = nan_like(q), np.full((2, hq), np.nan, np.float32)
    bad = [
        (TypeError, "k_scale must be a number, got str", dict(k_scale="2")),
        (TypeError, "q_scale must be a number, got list", dict(q_scale=[1.0])),
        (ValueError, "v_scale must be finite, got nan", dict(v_scale=float("nan"))),
        (ValueError, "q_scale must be finite, got inf", dict(q_scale=float("inf"))),
        (ValueError, r"sm_scale \* q_scale \* k_scale must be finite, got inf",
         dict(q_scale=1e200, k_scale=1e200)),
        (TypeError, "out must be a numpy, torch or cupy array where v_scale != 1 .*, got OtherArray",
         dict(v_scale=2.0, out=OtherArray(out))),
    ]
    for error, message, kw in bad:
        kw.setdefault("out", out)
        with pytest.raises(error, match=message):
            w.run(q, kv, lse=lse, **kw)
        assert np.isnan(out).all() and np.isnan(lse).all(), "a refused run() wrote its outputs"
    want, _ = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens)
    assert_close("v_scale 0", w.run(q, kv, v_scale=0.0), 0.0 * want, 0.0 * want, "float32")


def fixed_counts(lens, page_size, size, window_left=-1, q_len=1):
    """FlashInfer's fixed_split_size counts, written out: ceil(max(1, attended pages) / size),
    a request's attended keys the union of its q_len rows' windows, min(n, window_left + q_len)."""
    attended = [n if window_left < 0 else min(n, window_left + q_len) for n in lens]
    return [-(-max(1, -(-n // page_size)) // size) for n in attended]


@pytest.mark.parametrize("window_left", [-1, 700])
def test_decode_wrapper_fixed_split_size(rng, window_left):
    """fixed_split_size: each request's count is ceil(max(1, its attended pages) / size), the
    count it gets in a batch of its own; None and -1 keep the rules (no counts on the CPU); on the
    CPU backend, which plans its own threads, the results match the float64 reference; with
    disable_split_kv one split wins."""
    hq, hkv, d, ps = 4, 2, 16, 16
    lens = [int(x) for x in rng.integers(0, 3000, size=9)]
    lens[2], lens[5] = 0, 5000
    indptr, indices, last, num_pages = make_pages(rng, lens, ps)
    q, q64 = randn(rng, (len(lens), hq, d), "float32")
    kv, kv64 = randn(rng, (num_pages, 2, ps, hkv, d), "float32")
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(1 << 20, np.uint8))
    for none in (None, -1):
        w.plan(indptr, indices, last, hq, hkv, d, ps, window_left=window_left,
               q_data_type="float32", fixed_split_size=none)
        assert w.split_counts is None and w.num_splits == 0
    for size in (1, 7, 64, 10**12):
        w.plan(indptr, indices, last, hq, hkv, d, ps, window_left=window_left,
               q_data_type="float32", fixed_split_size=size)
        counts = fixed_counts(lens, ps, size, window_left)
        assert w.split_counts.tolist() == counts and w.num_splits is None, size
        for b in (0, 2, 5):  # alone: the same count
            alone = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(1 << 20, np.uint8))
            ip = indptr[b:b + 2]
            alone.plan(ip, indices, last[b:b + 1], hq, hkv, d, ps, window_left=window_left,
                       q_data_type="float32", fixed_split_size=size)
            assert alone.split_counts.tolist() == [counts[b]]
        out = nan_like(q)
        lse = np.full((len(lens), hq), np.nan, np.float32)
        w.run(q, kv, out=out, lse=lse, return_lse=True)
        want, lse64 = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens,
                                window_left=window_left)
        assert_close(f"fixed_split_size {size}", out, want, want, "float32")
        assert_lse(f"fixed_split_size {size} lse", lse, lse64)
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32", fixed_split_size=4,
           disable_split_kv=True)
    assert w.split_counts is None and w.num_splits == 1
    # More than 1024 parts for one request.
    with pytest.raises(ValueError, match="fixed_split_size = 1 cuts sequence 0 \\(1200 attended pages\\) "
                                         "into 1200 parts, more than 1024: take a larger fixed_split_size"):
        w.plan(int32([0, 1200]), np.arange(1200, dtype=np.int32), int32([1]), hq, hkv, d, 1,
               q_data_type="float32", fixed_split_size=1)
    assert w.split_counts is None and w.num_splits == 1, "a refused plan() replaced the last plan"


def test_decode_wrapper_plan_offset_indptr(rng):
    """indptr need not start at 0: request b owns indices[indptr[b]:indptr[b + 1]]."""
    hq, hkv, d, page_size = 2, 1, 16, 4
    lens = [9, 4]
    indptr = int32([3, 6, 7])
    indices = int32([9, 9, 9, 2, 0, 5, 1, 9])
    last = int32([1, 4])
    q, q64 = randn(rng, (2, hq, d), "float32")
    kv, kv64 = randn(rng, (10, 2, page_size, hkv, d), "float32")
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    w.plan(indptr, indices, last, hq, hkv, d, page_size, q_data_type="float32")
    want, _ = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens)
    assert_close("out", w.run(q, kv), want, want, "float32")


def test_decode_wrapper_errors(rng):
    hq, hkv, d, ps = 4, 2, 16, 4
    indptr, indices, last = int32([0, 2, 3]), int32([0, 1, 2]), int32([3, 4])
    q, _ = randn(rng, (2, hq, d), "float32")
    kv, _ = randn(rng, (3, 2, ps, hkv, d), "float32")
    ws = np.empty(16, np.uint8)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(ws)

    def plan(**kw):
        args = dict(indptr=indptr, indices=indices, last_page_len=last, num_qo_heads=hq,
                    num_kv_heads=hkv, head_dim=d, page_size=ps, q_data_type="float32")
        args.update(kw)
        w.plan(**args)

    with pytest.raises(ValueError, match="kv_layout must be 'NHD' .* or 'HND' .*, got 'nhd'"):
        fastattn.BatchDecodeWithPagedKVCacheWrapper(ws, "nhd")
    with pytest.raises(ValueError, match="paged_kv_indptr_buffer is required with use_cuda_graph"):
        fastattn.BatchDecodeWithPagedKVCacheWrapper(ws, use_cuda_graph=True)
    with pytest.raises(NotImplementedError, match="pos_encoding_mode"):
        plan(pos_encoding_mode="ROPE_LLAMA")
    with pytest.raises(ValueError, match=r"last_page_len\[1\] must be in 1..page_size = 4, got 5"):
        plan(last_page_len=int32([3, 5]))
    with pytest.raises(ValueError, match="last_page_len must have batch_size"):
        plan(last_page_len=int32([3]))
    with pytest.raises(ValueError, match="indptr must be non-decreasing"):
        plan(indptr=int32([0, 3, 2]))
    with pytest.raises(ValueError, match="indptr must be non-decreasing"):
        plan(indptr=int32([0, 2, 4]))  # past len(indices)
    with pytest.raises(ValueError, match="indices must be page ids >= 0, got -1"):
        plan(indices=int32([0, -1, 2]))
    with pytest.raises(TypeError, match="kv_data_type must equal q_data_type"):
        plan(kv_data_type="float16")
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"fixed_split_size must be a page count >= 1, or None / "
                                             f"-1 for none, got {bad}"):
            plan(fixed_split_size=bad)
    with pytest.raises(TypeError, match="fixed_split_size must be an int, got float"):
        plan(fixed_split_size=2.0)
    plan()
    with pytest.raises(ValueError, match=r"q must have shape \(batch_size, num_qo_heads, head_dim\)"):
        w.run(q[:1], kv)
    with pytest.raises(TypeError, match="q has dtype float16 but plan"):
        w.run(q.astype(np.float16), kv)
    with pytest.raises(ValueError, match="page_size, num_kv_heads, head_dim"):
        w.run(q, kv[:, :, :2])
    with pytest.raises(ValueError, match="plan\\(\\) was given page id 2, but paged_kv_cache holds 2 pages"):
        w.run(q, kv[:2])
    with pytest.raises(ValueError, match="out must have shape"):
        w.run(q, kv, out=np.empty((2, hq, d + 1), np.float32))
    with pytest.raises(ValueError, match="lse must have shape"):
        w.run(q, kv, lse=np.empty((2, hq + 1), np.float32))
    with pytest.raises(ValueError, match=r"q_len_per_req given to run\(\) must be the one plan\(\) was "
                                         r"given \(1\), got 2: pass it to plan\(\)"):
        w.run(q, kv, q_len_per_req=2)
    with pytest.raises(TypeError, match="q and paged_kv_cache positionally"):
        w.run(q, kv, None)



def test_decode_wrapper_run_arguments(rng):
    """run()'s arrays as the plan's runner takes them: the cache as one array or a tuple (a list
    too), k and v pages of separate strides, out / lse given or made, the workspace replaced; bad
    arrays refused with the argument named and the outputs left as they were."""
    hq, hkv, d, ps = 6, 2, 16, 4
    lens = [13, 0, 7]
    indptr, indices, last, num_pages = make_pages(rng, lens, ps)
    q, q64 = randn(rng, (3, hq, d), "float32")
    kv, kv64 = randn(rng, (num_pages, 2, ps, hkv, d), "float32")
    k_sep = np.ascontiguousarray(kv[:, 0])
    v_sep = np.zeros((num_pages, ps, hkv, d + 8), np.float32)[..., :d]  # rows of d + 8 apart
    v_sep[...] = kv[:, 1]
    want, lse64 = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32")
    for cache in (kv, (k_sep, v_sep), [kv[:, 0], kv[:, 1]]):
        out, lse = nan_like(q), np.full((3, hq), np.nan, np.float32)
        assert w.run(q, cache, out=out, lse=lse) is out
        assert_close("out", out, want, want, "float32")
        assert_lse("lse", lse, lse64)
    got, got_lse = w.run(q, kv, return_lse=True)
    assert_close("made out", got, want, want, "float32")
    assert_lse("made lse", got_lse, lse64)
    w.reset_workspace_buffer(np.empty(32, np.uint8))
    assert_close("new workspace", w.run(q, kv), want, want, "float32")

    out, lse = nan_like(q), np.full((3, hq), np.nan, np.float32)
    bad = [
        (ValueError, r"paged_kv_cache given as a tuple must be \(k_pages, v_pages\), got 3 items",
         dict(paged_kv_cache=(kv[:, 0], kv[:, 1], kv[:, 1]))),
        (ValueError, r"paged_kv_cache must have shape \(max_num_pages, 2, page_size, num_kv_heads, "
         r"head_dim\) \(NHD\), got \(" + str(num_pages) + r", 3, 4, 2, 16\)",
         dict(paged_kv_cache=np.concatenate([kv, kv[:, :1]], axis=1))),
        (ValueError, "paged_kv_cache's v pages must have shape",
         dict(paged_kv_cache=(k_sep, v_sep[:, :, :1]))),
        (TypeError, r"paged_kv_cache has dtype float16 but plan\(\) was given float32",
         dict(paged_kv_cache=(k_sep, v_sep.astype(np.float16)))),
        (TypeError, r"argument 'paged_kv_cache\[1\]': expected an array", dict(paged_kv_cache=(k_sep, "v"))),
        (TypeError, "q must be an array", dict(q=[[1.0]])),
        (ValueError, "argument 'out': the array is read-only", dict(out=np.broadcast_to(q, q.shape))),
        (TypeError, "argument 'lse': expected a writable array", dict(lse="lse")),
        (ValueError, r"q must have shape .* as planned, got \(3, 6, 16, 1\)", dict(q=q[..., None])),
    ]
    for error, message, change in bad:
        args = dict(q=q, paged_kv_cache=kv, out=out, lse=lse)
        args.update(change)
        with pytest.raises(error, match=message):
            w.run(args.pop("q"), args.pop("paged_kv_cache"), **args)
        assert np.isnan(out).all() and np.isnan(lse).all(), "a refused run() wrote its outputs"
    assert_close("after the errors", w.run(q, kv), want, want, "float32")
    with pytest.raises(ValueError, match="last_page_len"):  # a refused plan() keeps the last one
        w.plan(indptr, indices, last + ps, hq, hkv, d, ps, q_data_type="float32")
    assert_close("the plan before", w.run(q, kv), want, want, "float32")

def reference_with_sinks(q64, k64, v64, indptr, indices, lens, sinks, window_left=-1,
                         softcap=0.0):
    """Each request's query over its keys plus one more logit per head, sinks[h], whose value
    row is zero, written out from the definition in float64: out (B, Hq, D), lse (B, Hq)."""
    b_, hq, d = q64.shape
    group = hq // k64.shape[2]
    out, lse = np.zeros((b_, hq, d)), np.zeros((b_, hq))
    for b, n in enumerate(lens):
        ids = indices[indptr[b]:indptr[b + 1]]
        k, v = ref.gather_pages(k64, ids, n), ref.gather_pages(v64, ids, n)
        keep = np.arange(n) >= (n - 1 - window_left if window_left >= 0 else 0)
        for h in range(hq):
            sc = k[keep, h // group] @ q64[b, h] / math.sqrt(d)
            if softcap:
                sc = softcap * np.tanh(sc / softcap)
            logits = np.concatenate([sc, [float(sinks[h])]])
            m = logits.max()
            p = np.exp(logits - m)
            out[b, h] = (p[:-1] @ v[keep, h // group]) / p.sum() if n else 0.0
            lse[b, h] = m + math.log(p.sum())
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", ["plain", "window_softcap"])
def test_decode_wrapper_sinks_cpu(rng, dtype, options):
    """run(sinks=): one more logit per query head with a zero value row (gpt-oss), against the
    definition in float64; an empty request gets out 0 and LSE sinks[h]; out / lse poisoned
    first; without return_lse the LSE the merge needs is the wrapper's own."""
    hq, hkv, d, ps = 8, 2, 32, 16
    lens = list(rng.permutation([0, 1, 20, 77, int(rng.integers(150, 300))]))
    indptr, indices, last, num_pages = make_pages(rng, lens, ps)
    q, q64 = randn(rng, (len(lens), hq, d), dtype)
    kv, kv64 = randn(rng, (num_pages, 2, ps, hkv, d), dtype)
    sinks = (rng.standard_normal(hq) * 3).astype(np.float32)
    sinks_t = torch.from_numpy(sinks) if dtype == "bfloat16" else sinks
    left, cap = (30, 6.0) if options == "window_softcap" else (-1, 0.0)
    data_type = torch.bfloat16 if dtype == "bfloat16" else dtype
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=data_type, window_left=left,
           logits_soft_cap=cap or None)
    out, lse = nan_like(q), np.full((len(lens), hq), np.nan, np.float32)
    o, l = w.run(q, kv, out=out, lse=lse, return_lse=True, sinks=sinks_t)
    assert o is out and l is lse
    want, want_lse = reference_with_sinks(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens,
                                          sinks, left, cap)
    # The naive in-dtype reference: the same attention with its roundings, then the sink's
    # weight applied in float64 (the sink only rescales each row) and the output stored in the
    # dtype, as an in-dtype implementation stores it.
    rnd = ref.rounder(dtype)
    naive, naive_lse = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens,
                                 rnd=rnd, window_left=left, softcap=cap)
    naive = naive * np.exp(naive_lse - np.logaddexp(naive_lse, sinks[None]))[..., None]
    naive[np.isneginf(naive_lse)] = 0.0
    naive = rnd(naive).astype(np.float64)
    assert_close("out", o, want, naive, dtype, factor=FACTOR)
    assert_lse("lse", l, want_lse)
    empty = lens.index(0)
    assert not to64(o)[empty].any() and np.allclose(l[empty], sinks)
    plain = w.run(q, kv, sinks=sinks_t)  # no lse asked for: the wrapper makes its own
    assert np.array_equal(to64(plain), to64(o))


def test_decode_wrapper_sinks_errors(rng):
    hq, hkv, d, ps = 4, 2, 16, 4
    indptr, indices, last, num_pages = make_pages(rng, [9, 3], ps)
    q, _ = randn(rng, (2, hq, d), "float32")
    kv, _ = randn(rng, (num_pages, 2, ps, hkv, d), "float32")
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32")
    out = nan_like(q)
    for sinks, error, message in [
        (np.zeros(hq + 1, np.float32), ValueError,
         r"sinks must have shape \(num_qo_heads,\) = \(4,\) as planned, got \(5,\)"),
        (np.zeros((1, hq), np.float32), ValueError, r"sinks must have shape"),
        (np.zeros(hq, np.float16), TypeError, r"sinks must be float32, got float16"),
        ("sinks", TypeError, r"sinks"),
    ]:
        with pytest.raises(error, match=message):
            w.run(q, kv, out=out, sinks=sinks)
        assert np.isnan(out).all(), "a refused run() wrote its output"


def test_decode_wrapper_hnd_errors(rng):
    """With kv_layout "HND" run() names the HND shapes; NHD pages are refused, not misread."""
    hq, hkv, d, ps = 4, 2, 16, 4
    lens = [9, 3]
    indptr, indices, last, num_pages = make_pages(rng, lens, ps)
    q, q64 = randn(rng, (2, hq, d), "float32")
    kv, kv64 = randn(rng, (num_pages, 2, ps, hkv, d), "float32")
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(16, np.uint8), "HND")
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32")
    out = nan_like(q)
    with pytest.raises(ValueError, match=r"paged_kv_cache's k pages must have shape \(max_num_pages, "
                       r"num_kv_heads, page_size, head_dim\) = \(\*, 2, 4, 16\) as planned \(HND\), "
                       r"got \(" + str(num_pages) + r", 4, 2, 16\)"):
        w.run(q, kv, out=out)
    with pytest.raises(ValueError, match=r"paged_kv_cache must have shape \(max_num_pages, 2, "
                       r"num_kv_heads, page_size, head_dim\) \(HND\)"):
        w.run(q, kv[:, :1], out=out)
    assert np.isnan(out).all(), "a refused run() wrote its output"
    want, _ = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens)
    assert_close("HND", w.run(q, hnd_copy(kv)), want, want, "float32")

# ---- the split rule ------------------------------------------------------------------------


def estimate(lens, heads, sms, s, cost, tail):
    """The rule's documented estimate, written out again: T(S) in keys streamed by one SM."""
    return heads * (sum(lens) + cost * len(lens) * s) / sms + tail * (math.ceil(max(lens) / s) + cost)


def test_split_rule_balanced_and_empty():
    rule = fastattn.decode_num_splits_for_lengths
    assert rule([8192] * 32, 8, 132) == 0  # a full batch keeps the capacity heuristic
    assert rule([8000, 8192, 7900, 8100], 8, 132) == 0  # within BALANCED_RATIO of uniform
    assert rule([0, 0, 0], 8, 132) == 1  # nothing to read
    assert rule([], 8, 132) == 1
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        rule([5, -1], 8, 132)
    with pytest.raises(ValueError, match="num_kv_heads and sm_count must be >= 1"):
        rule([5], 0, 132)


def long_among_random(rng):
    """(heads_kv, lengths): 2-159 sequences of 0-4095 keys, one of them 8k-200k."""
    batch = int(rng.integers(2, 160))
    heads = int(rng.choice([1, 2, 8, 32]))
    lens = [int(x) for x in rng.integers(0, 4096, size=batch)]
    lens[int(rng.integers(batch))] = int(rng.integers(8192, 200000))
    return heads, lens


def test_split_rule_minimises_its_estimate(rng):
    """On random ragged batches the count is the fewest whose estimate is within the tolerance
    of the best over 1..MAX_SPLITS; a longer outlier never gets fewer splits."""
    from fastattn import decode as dec
    for _ in range(50):
        heads, lens = long_among_random(rng)
        got = fastattn.decode_num_splits_for_lengths(lens, heads, 132)
        est = {s: estimate(lens, heads, 132, s, dec.CTA_COST_KEYS, dec.TAIL_WEIGHT)
               for s in range(1, dec.MAX_SPLITS + 1)}
        best = min(est.values())
        want = min(s for s, t in est.items() if t <= best * (1 + dec.SPLIT_TOLERANCE))
        assert got == want, (len(lens), heads, got, want)
    # One long sequence among 31 short ones: the longer it is, the more splits.
    counts = [fastattn.decode_num_splits_for_lengths([n] + [1024] * 31, 8, 132)
              for n in (8192, 32768, 131072)]
    assert counts == sorted(counts) and counts[0] >= 2 and counts[-1] > counts[0]


# ---- a split count per sequence (decode_split_counts_for_lengths, decode_split_plan) -------------


def plan_estimate(lens, counts, heads, sms, cost, tail):
    """The per-sequence rule's documented estimate, written out again with plain loops."""
    longest_part = max(math.ceil(math.ceil(n / 64) / c) * 64 for n, c in zip(lens, counts))
    return heads * (sum(lens) + cost * sum(counts)) / sms + tail * (longest_part + cost)


def written_out_choice(lens, heads, sms, uniform=False, cap=math.inf, tail=None):
    """The split-count rules' documented choice, written out with plain loops: (estimate, parts,
    counts) of the chunk rule's counts (and with `uniform` one count S for every sequence) of at
    most cap parts, the fewest parts within the tolerance of the best estimate (with the tail
    weight `tail`, default TAIL_WEIGHT)."""
    from fastattn import decode as dec
    tail = dec.TAIL_WEIGHT if tail is None else tail
    options = []
    for s in range(1, dec.MAX_SPLITS + 1):
        chunk = math.ceil(max(lens) / s)
        candidates = [[min(dec.MAX_SPLITS, max(1, math.ceil(n / chunk))) for n in lens]]
        if uniform:
            candidates.append([s] * len(lens))
        for counts in candidates:
            if sum(counts) <= cap:
                options.append((plan_estimate(lens, counts, heads, sms, dec.CTA_COST_KEYS, tail),
                                sum(counts), counts))
    best = min(o[0] for o in options)
    return min((o for o in options if o[0] <= best * (1 + dec.SPLIT_TOLERANCE)), key=lambda o: (o[1], o[0]))


def test_split_counts_balanced_and_empty():
    rule = fastattn.decode_split_counts_for_lengths
    assert rule([8192] * 32, 8, 132) is None  # near-uniform: the capacity heuristic
    assert rule([8000, 8192, 7900, 8100], 8, 132) is None
    assert rule([0, 0, 0], 8, 132).tolist() == [1, 1, 1]  # nothing to read: one (empty) part each
    assert rule([], 8, 132).tolist() == []
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        rule([5, -1], 8, 132)
    with pytest.raises(ValueError, match="num_kv_heads and sm_count must be >= 1"):
        rule([5], 8, 0)


def test_split_counts_minimise_their_estimate(rng):
    """On random ragged batches the counts are ceil(len / chunk) for the chunk ceil(longest / S)
    of fewest parts whose estimate (with the head dim's plan tail weight) is within the tolerance
    of the best over S = 1..MAX_SPLITS; every count in 1..MAX_SPLITS, the longest sequence's the
    largest; None where the uniform count's estimate is less than PLAN_MIN_GAIN times the plan's,
    both with TAIL_WEIGHT."""
    from fastattn import decode as dec
    planned = 0
    for _ in range(40):
        heads, lens = long_among_random(rng)
        head_dim = int(rng.choice([64, 128, 256]))
        plan_tail = 0.10 if head_dim in (64, 256) else dec.TAIL_WEIGHT  # bench/NOTES.md, session 72
        got = fastattn.decode_split_counts_for_lengths(lens, heads, 132, head_dim=head_dim)
        against = written_out_choice(lens, heads, 132)
        s = fastattn.decode_num_splits_for_lengths(lens, heads, 132)
        uniform = estimate(lens, heads, 132, s, dec.CTA_COST_KEYS, dec.TAIL_WEIGHT)
        if uniform < dec.PLAN_MIN_GAIN * against[0]:
            assert got is None, (len(lens), heads, uniform / against[0])
            continue
        want = written_out_choice(lens, heads, 132, tail=plan_tail)
        planned += 1
        assert got.dtype == np.int32 and got.tolist() == want[2], (len(lens), heads)
        assert got.min() >= 1 and got.max() <= dec.MAX_SPLITS
        assert got[int(np.argmax(lens))] == got.max()
    assert planned >= 10  # most such batches take a plan
    # One long sequence among 31 short ones: the long one is cut, most short ones are not.
    counts = fastattn.decode_split_counts_for_lengths([32768] + [1024] * 31, 8, 132)
    assert counts[0] >= 4 and (counts[1:] <= 2).all(), counts
    assert counts[0] == 31  # the default: head_dim 128's plan tail weight (bench/NOTES.md, session 72)
    for head_dim, parts in ((64, 16), (128, 31), (256, 16)):
        counts = fastattn.decode_split_counts_for_lengths([32768] + [1024] * 31, 8, 132, head_dim=head_dim)
        assert counts[0] == parts, (head_dim, counts)
    assert fastattn.decode_split_counts_for_lengths([32768] + [1024] * 31, 8, 132, plan_tail_weight=0.1,
                                                    head_dim=128)[0] == 16  # an explicit weight wins
    # Lengths drawn uniformly: the plan's estimated gain is small, one count serves the batch.
    lens = [int(x) for x in rng.integers(64, 8192, size=32)]
    assert fastattn.decode_split_counts_for_lengths(lens, 8, 132) is None
    assert fastattn.decode_split_counts_for_lengths(lens, 8, 132, min_gain=1.0) is not None


def test_split_plan_layout(rng):
    """split_indptr, then every (sequence, split) once as b + 65536 * split: by sequence without
    lengths, longest parts first with them (ties by sequence, then split)."""
    plan = fastattn.decode_split_plan([1, 3, 2])
    assert plan.dtype == np.int32
    assert plan.tolist() == [0, 1, 4, 6, 0, 1, 65537, 131073, 2, 65538]
    # lengths 100 (2 tiles), 640 (10 tiles in parts of 4, 4, 2), 130 (3 tiles in parts of 2, 1)
    plan = fastattn.decode_split_plan([1, 3, 2], [100, 640, 130])
    assert plan.tolist() == [0, 1, 4, 6, 1, 65537, 0, 131073, 2, 65538]
    for _ in range(20):
        counts = rng.integers(1, 9, size=int(rng.integers(1, 40)))
        lens = rng.integers(0, 5000, size=counts.size)
        plan = fastattn.decode_split_plan(counts, lens)
        b = counts.size
        assert plan[:b + 1].tolist() == [0] + np.cumsum(counts).tolist()
        items = plan[b + 1:]
        pairs = sorted((int(i) % 65536, int(i) // 65536) for i in items)
        assert pairs == [(s, k) for s in range(b) for k in range(int(counts[s]))]
        tiles = -(-lens // 64)
        per = -(-tiles // counts)
        sizes = [min(per[i % 65536], max(0, tiles[i % 65536] - (i // 65536) * per[i % 65536])) for i in items]
        assert sizes == sorted(sizes, reverse=True)


def test_split_plan_padded():
    """items > sum(counts): the splits as without, then padding items (-1) to the plan's size."""
    plan = fastattn.decode_split_plan([1, 3, 2], [100, 640, 130], items=9)
    assert plan.tolist() == [0, 1, 4, 6, 1, 65537, 0, 131073, 2, 65538, -1, -1, -1]
    assert fastattn.decode_split_plan([1, 2], items=3).tolist() == [0, 1, 3, 0, 1, 65537]
    with pytest.raises(ValueError, match="items must be at least the splits' sum 3, got 2"):
        fastattn.decode_split_plan([1, 2], items=2)
    with pytest.raises(ValueError, match="at most 65535"):
        fastattn.decode_split_plan([1, 2], items=65536)


def test_split_plan_errors():
    with pytest.raises(ValueError, match="counts must be in 1..1024, got 0"):
        fastattn.decode_split_plan([2, 0])
    with pytest.raises(ValueError, match="counts must be in 1..1024, got 1025"):
        fastattn.decode_split_plan([1025])
    with pytest.raises(ValueError, match="lengths must have one entry per count"):
        fastattn.decode_split_plan([1, 2], [5])
    with pytest.raises(ValueError, match="at most 65535"):
        fastattn.decode_split_plan([1024] * 64)


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_split_plan_cpu(rng, paged):
    """flash_attn_with_kvcache(split_plan=) on the CPU: the plan is checked and the result is the
    reference's (the CPU backend ignores the split)."""
    lens = [700, 0, 33, 4000]
    b, hq, hkv, d, ps = 4, 8, 2, 64, 16
    q, q64 = randn(rng, (b, 1, hq, d), np.float32)
    if paged:
        width = max(-(-n // ps) for n in lens)
        pool = rng.permutation(b * width).astype(np.int32)
        table = pool.reshape(b, width)
        kc, k64 = randn(rng, (b * width, ps, hkv, d), np.float32)
        vc, v64 = randn(rng, (b * width, ps, hkv, d), np.float32)
        k_of = lambda i: k64[table[i]].reshape(-1, hkv, d)[:lens[i]]  # noqa: E731
        v_of = lambda i: v64[table[i]].reshape(-1, hkv, d)[:lens[i]]  # noqa: E731
    else:
        table = None
        kc, k64 = randn(rng, (b, 4000, hkv, d), np.float32)
        vc, v64 = randn(rng, (b, 4000, hkv, d), np.float32)
        k_of = lambda i: k64[i, :lens[i]]  # noqa: E731
        v_of = lambda i: v64[i, :lens[i]]  # noqa: E731
    plan = fastattn.decode_split_plan([2, 1, 1, 7], lens)
    out = fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=int32(lens), block_table=table,
                                           split_plan=plan, out=nan_like(q))
    padded = fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=int32(lens), block_table=table,
                                              split_plan=fastattn.decode_split_plan([2, 1, 1, 7], lens,
                                                                                    items=15))
    assert np.array_equal(to64(padded), to64(out))
    for i, n in enumerate(lens):
        k, v = k_of(i), v_of(i)
        s = np.einsum("hd,khd->hk", q64[i, 0], np.repeat(k, hq // hkv, axis=1)) / math.sqrt(d)
        if n == 0:
            want = np.zeros((hq, d))
        else:
            p = np.exp(s - s.max(axis=1, keepdims=True))
            want = np.einsum("hk,khd->hd", p / p.sum(axis=1, keepdims=True), np.repeat(v, hq // hkv, axis=1))
        np.testing.assert_allclose(to64(out[i, 0]), want, rtol=0, atol=2e-5, err_msg=f"sequence {i}")
    with pytest.raises(ValueError, match="num_splits must be 0 with a split_plan"):
        fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=int32(lens), block_table=table,
                                         split_plan=plan, num_splits=2)
    bad = plan.copy()
    bad[5] = 9  # a work item of sequence 9 in a batch of 4
    with pytest.raises(ValueError, match="split_plan work item 0"):
        fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=int32(lens), block_table=table,
                                         split_plan=bad)
    with pytest.raises(TypeError, match="split_plan must have dtype int32"):
        fastattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=int32(lens), block_table=table,
                                         split_plan=plan.astype(np.int64))


def test_decode_wrapper_plans_no_counts_on_the_cpu(rng):
    """On a CPU workspace plan() keeps num_splits 0 (the CPU backend plans its threads) and makes
    no split plan."""
    lens = [5000, 10, 20, 30]
    indptr, indices, last, num_pages = make_pages(rng, lens, 16)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(1 << 20, np.uint8))
    w.plan(indptr, indices, last, 8, 2, 64, 16, q_data_type="float32")
    assert w.num_splits == 0 and w.split_counts is None


# ---- CUDA-graph mode (use_cuda_graph=True): fixed buffers and a plan of fixed size -----------


def test_graph_plan_items_and_counts(rng):
    """The plan's fixed size is batch + ceil(GRAPH_EXTRA_WAVES x SMs / heads); the counts are the
    estimate's best of at most that many parts, for ragged and equal lengths alike (never None)."""
    from fastattn import decode as dec
    assert fastattn.decode_graph_plan_items(32, 8, 132) == 32 + math.ceil(dec.GRAPH_EXTRA_WAVES * 132 / 8)
    assert fastattn.decode_graph_plan_items(65530, 1, 132) == 65535
    assert fastattn.decode_graph_plan_items(0, 8, 132, extra_waves=1) == 17
    for _ in range(40):
        batch = int(rng.integers(1, 200))
        heads = int(rng.choice([1, 2, 8, 32]))
        lens = [int(x) for x in rng.integers(0, 4096, size=batch)]
        if rng.random() < 0.5:
            lens[int(rng.integers(batch))] = int(rng.integers(8192, 200000))
        if rng.random() < 0.2:
            lens = [lens[0]] * batch
        if max(lens) == 0:
            continue
        cap = fastattn.decode_graph_plan_items(batch, heads, 132)
        got = fastattn.decode_graph_split_counts(lens, heads, 132, cap)
        want = written_out_choice(lens, heads, 132, uniform=True, cap=cap)
        assert got.dtype == np.int32 and got.tolist() == want[2], (batch, heads)
        assert got.sum() <= cap and got.min() >= 1
    assert fastattn.decode_graph_split_counts([0, 0], 8, 132, 2).tolist() == [1, 1]
    # Equal lengths: one count for every sequence (the capacity heuristic is not an option).
    got = fastattn.decode_graph_split_counts([32768] * 2, 8, 132, 2 + 33)
    assert len(set(got.tolist())) == 1 and got[0] > 1
    with pytest.raises(ValueError, match="max_parts must be at least the batch \\(3\\), got 2"):
        fastattn.decode_graph_split_counts([5, 6, 7], 8, 132, 2)
    with pytest.raises(ValueError, match="num_kv_heads, sm_count >= 1"):
        fastattn.decode_graph_plan_items(4, 0, 132)


def graph_wrapper(batch, capacity, workspace=1 << 20):
    """A use_cuda_graph wrapper over sentinel-filled numpy buffers."""
    bufs = (np.full(batch + 1, -7, np.int32), np.full(capacity, -7, np.int32),
            np.full(batch, -7, np.int32))
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(
        np.empty(workspace, np.uint8), "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=bufs[0],
        paged_kv_indices_buffer=bufs[1], paged_kv_last_page_len_buffer=bufs[2])
    return w, bufs


def test_decode_wrapper_graph_mode_cpu(rng):
    """use_cuda_graph=True over numpy buffers, several steps of new ragged lengths on one wrapper:
    plan() writes each step's lists into the caller's buffers (indptr from 0, the indices' first
    entries only, last_page_len) and a padded plan of fixed size; run() reads them and matches the
    float64 reference with poisoned outputs; the cache is unchanged."""
    hq, hkv, d, ps, batch, capacity = 8, 2, 32, 16, 5, 100
    w, (ip_buf, idx_buf, last_buf) = graph_wrapper(batch, capacity)
    assert w.is_cuda_graph_enabled
    kv, kv64 = randn(rng, (capacity + 4, 2, ps, hkv, d), "float32")
    before = kv.copy()
    size = None
    for step in range(4):
        lens = [int(x) for x in rng.integers(0, 160, size=batch)]
        lens[int(rng.integers(batch))] = 0 if step == 1 else int(rng.integers(300, 700))
        indptr, indices, last, _ = make_pages(rng, lens, ps, spare=0)
        indices = rng.permutation(capacity + 4)[:indices.size].astype(np.int32)
        offset = int(rng.integers(0, 3))  # indptr from an offset into a longer indices array
        indptr_in = indptr + offset
        indices_in = np.concatenate([np.full(offset, 99, np.int32), indices])
        tail = idx_buf[indices.size:].copy()
        w.plan(indptr_in, indices_in, last, hq, hkv, d, ps, q_data_type="float32")
        assert ip_buf.tolist() == indptr.tolist()
        assert idx_buf[:indices.size].tolist() == indices.tolist()
        assert np.array_equal(idx_buf[indices.size:], tail), "plan() wrote past the step's pages"
        assert last_buf.tolist() == last.tolist()
        plan = w._graph.split_plan
        size = plan.size if size is None else size
        assert plan.size == size == batch + 1 + fastattn.decode_graph_plan_items(batch, hkv, 1)
        counts = w.split_counts
        assert plan[:batch + 1].tolist() == [0] + np.cumsum(counts).tolist()
        assert (plan[batch + 1 + counts.sum():] == -1).all()
        q, q64 = randn(rng, (batch, hq, d), "float32")
        out = nan_like(q)
        lse = np.full((batch, hq), np.nan, np.float32)
        o, l = w.run(q, kv, out=out, lse=lse, return_lse=True)
        want, lse64 = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens)
        assert_close(f"step {step}", o, want, want, "float32")
        assert_lse(f"step {step} lse", l, lse64)
    assert np.array_equal(kv, before), "run() wrote into the cache"


def test_decode_wrapper_graph_mode_errors(rng):
    ws = np.empty(1 << 16, np.uint8)
    good = dict(paged_kv_indptr_buffer=np.zeros(3, np.int32), paged_kv_indices_buffer=np.zeros(4, np.int32),
                paged_kv_last_page_len_buffer=np.zeros(2, np.int32))

    def make(**kw):
        args = dict(good)
        args.update(kw)
        return fastattn.BatchDecodeWithPagedKVCacheWrapper(ws, use_cuda_graph=True, **args)

    with pytest.raises(ValueError, match="paged_kv_indices_buffer is required"):
        make(paged_kv_indices_buffer=None)
    with pytest.raises(ValueError, match="paged_kv_indptr_buffer must be a 1-D int32 array, got shape "
                                         "\\(3,\\) and dtype int64"):
        make(paged_kv_indptr_buffer=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="paged_kv_indices_buffer must be a 1-D int32 array, got shape \\(2, 2\\)"):
        make(paged_kv_indices_buffer=np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="paged_kv_indices_buffer must be contiguous"):
        make(paged_kv_indices_buffer=np.zeros(8, np.int32)[::2])
    with pytest.raises(ValueError, match="paged_kv_last_page_len_buffer must have batch_size = "
                                         "len\\(paged_kv_indptr_buffer\\) - 1 = 2 entries, got 3"):
        make(paged_kv_last_page_len_buffer=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="paged_kv_indptr_buffer must have batch_size \\+ 1 >= 1"):
        make(paged_kv_indptr_buffer=np.zeros(0, np.int32), paged_kv_last_page_len_buffer=np.zeros(0, np.int32))
    with pytest.raises(TypeError, match="paged_kv_indptr_buffer must be an array"):
        make(paged_kv_indptr_buffer=[0, 1, 2])

    w = make()
    hq, hkv, d, ps = 4, 2, 16, 4
    q, _ = randn(rng, (2, hq, d), "float32")
    kv, _ = randn(rng, (6, 2, ps, hkv, d), "float32")
    indptr, indices, last = int32([0, 2, 3]), int32([0, 1, 2]), int32([3, 4])
    with pytest.raises(ValueError, match="indptr must have batch_size \\+ 1 = 3 entries with "
                                         "use_cuda_graph=True .*got 4"):
        w.plan(int32([0, 1, 2, 3]), indices, int32([1, 1, 1]), hq, hkv, d, ps, q_data_type="float32")
    with pytest.raises(ValueError, match="indices hold 5 pages, more than paged_kv_indices_buffer's 4"):
        w.plan(int32([0, 2, 5]), int32([0, 1, 2, 3, 4]), last, hq, hkv, d, ps, q_data_type="float32")
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32")
    w.run(q, kv)
    with pytest.raises(ValueError, match="num_kv_heads must stay 2 with use_cuda_graph=True"):
        w.plan(indptr, indices, last, hq, 1, d, ps, q_data_type="float32")
    # A failed plan() leaves the last good one in place.
    assert w._plan["num_kv_heads"] == 2 and w.run(q, kv).shape == (2, hq, d)


def test_decode_wrapper_graph_mode_fixed_split_size(rng):
    """use_cuda_graph=True with fixed_split_size: the fixed counts, padded to the plan's fixed size,
    and results that match the float64 reference; counts that do not fit the plan's size are a
    ValueError naming fixed_split_size, and the last plan stays."""
    hq, hkv, d, ps, batch, capacity = 8, 2, 32, 16, 5, 400
    w, _ = graph_wrapper(batch, capacity)
    kv, kv64 = randn(rng, (capacity, 2, ps, hkv, d), "float32")
    # On the CPU the plan's size is one wave of one SM past the batch: room for one more part.
    lens = [int(x) for x in rng.integers(1, ps + 1, size=batch)]
    lens[1], lens[3] = 0, int(rng.integers(ps + 1, 2 * ps + 1))
    indptr, indices, last, _ = make_pages(rng, lens, ps, spare=0)
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32", fixed_split_size=1)
    items = fastattn.decode_graph_plan_items(batch, hkv, 1)
    counts = fixed_counts(lens, ps, 1)
    assert w.split_counts.tolist() == counts == [1, 1, 1, 2, 1] and items == 6
    plan = w._graph.split_plan
    assert plan.size == batch + 1 + items
    assert (plan[batch + 1 + sum(counts):] == -1).all()
    q, q64 = randn(rng, (batch, hq, d), "float32")
    want, _ = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens)
    assert_close("graph, fixed_split_size 1", w.run(q, kv), want, want, "float32")
    # A long request cut finely: more parts than the plan's fixed size.
    long_lens = [6000] + [10] * (batch - 1)
    indptr2, indices2, last2, _ = make_pages(rng, long_lens, ps, spare=0)
    need = sum(fixed_counts(long_lens, ps, 1))
    assert need > items
    with pytest.raises(ValueError, match=f"fixed_split_size = 1 gives {need} parts in all, more than the "
                                         f"CUDA-graph plan's {items} work items"):
        w.plan(indptr2, indices2, last2, hq, hkv, d, ps, q_data_type="float32", fixed_split_size=1)
    assert w.split_counts.tolist() == counts, "a refused plan() replaced the last plan"


# ---- several query rows per request (plan(q_len_per_req=N): speculative decoding) -------------


def ragged_lens(rng, q_len):
    """Ragged lengths of at least q_len keys (one of exactly q_len, one of q_len + 1), shuffled."""
    lens = [q_len, q_len + 1, q_len + int(rng.integers(2, 40)), 129 + q_len,
            int(rng.integers(200, 400))]
    return [int(n) for n in rng.permutation(lens)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("q_len, heads", [(2, (8, 2)), (3, (4, 4)), (8, (8, 2)), (16, (4, 4))])
def test_decode_wrapper_q_len_cpu(rng, dtype, page_size, layout, q_len, heads):
    """plan(q_len_per_req=N): q (B * N, Hq, D), row i of a request of L keys at key L - N + i,
    causal within the request's rows; ragged lengths (one of exactly N keys), a random page pool,
    GQA and MHA, both layouts, the cache packed (a tuple of k / v pages at N = 3), NaN-poisoned
    out / lse given, against the float64 reference; the cache is left unchanged."""
    hq, hkv = heads
    d = 64
    lens = ragged_lens(rng, q_len)
    rows = len(lens) * q_len
    indptr, indices, last, q, q64, kv, kv64, before = paged_inputs(rng, lens, rows, hq, hkv, d, page_size, dtype,
                                                                   layout)
    data_type = torch.bfloat16 if dtype == "bfloat16" else dtype
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(1 << 20, np.uint8), layout)
    w.plan(indptr, indices, last, hq, hkv, d, page_size, q_data_type=data_type,
           q_len_per_req=q_len)
    assert w.num_splits == 0 and w.split_counts is None  # the CPU backend plans its threads
    cache = (kv[:, 0], kv[:, 1]) if q_len == 3 else kv
    o, l = run_poisoned(w, q, cache, rows, hq)
    o64, lse64 = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len)
    naive, _ = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len,
                              rnd=ref.rounder(dtype))
    assert_close("out", o, o64, naive, dtype, factor=FACTOR)
    assert_lse("lse", l, lse64)
    assert np.array_equal(to64(kv), before), "run() wrote into the cache"
    # Made outputs, and run(q_len_per_req=) equal to the plan's: the same bits.
    made, made_lse = w.run(q, cache, return_lse=True, q_len_per_req=q_len)
    assert tuple(made.shape) == (rows, hq, d) and tuple(made_lse.shape) == (rows, hq)
    assert np.array_equal(to64(made), to64(o)) and np.array_equal(to64(made_lse), to64(l))


@pytest.mark.parametrize("window_left", [-1, 0, 5, 40])
@pytest.mark.parametrize("window_right", [0, 2, -1])
def test_decode_wrapper_q_len_windows_cpu(rng, window_left, window_right):
    """window_left and window_right with N = 4 rows a request (row i at L - 4 + i sees keys j,
    pos - window_left <= j <= pos + window_right, -1 unbounded), with logits_soft_cap and
    sm_scale, against the float64 reference; run(window_left=) replaces the plan's; float16,
    page size 16, GQA."""
    hq, hkv, d, ps, q_len, dtype = 8, 2, 32, 16, 4, "float16"
    lens = ragged_lens(rng, q_len)
    indptr, indices, last, num_pages = make_pages(rng, lens, ps)
    rows = len(lens) * q_len
    q, q64 = randn(rng, (rows, hq, d), dtype)
    kv, kv64 = randn(rng, (num_pages, 2, ps, hkv, d), dtype)
    before = kv.copy()
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(1 << 20, np.uint8))
    w.plan(indptr, indices, last, hq, hkv, d, ps, window_left=window_left, logits_soft_cap=6.0,
           q_data_type=dtype, sm_scale=0.2, window_right=window_right, q_len_per_req=q_len)
    out, lse = nan_like(q), np.full((rows, hq), np.nan, np.float32)
    w.run(q, kv, out=out, lse=lse, return_lse=True)
    opts = dict(window_left=window_left, window_right=window_right, softcap=6.0, scale=0.2)
    want, lse64 = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len, **opts)
    naive, _ = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len,
                              rnd=ref.rounder(dtype), **opts)
    assert_close("windows", out, want, naive, dtype, factor=FACTOR)
    assert_lse("windows lse", lse, lse64)
    # window_left given to run() replaces the plan's (window_right stays the plan's).
    other = 7 if window_left == -1 else -1
    out = nan_like(q)
    w.run(q, kv, out=out, window_left=other)
    opts["window_left"] = other
    want, _ = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len, **opts)
    naive, _ = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len,
                              rnd=ref.rounder(dtype), **opts)
    assert_close(f"run(window_left={other})", out, want, naive, dtype, factor=FACTOR)
    assert np.array_equal(kv, before), "run() wrote into the cache"


def test_decode_wrapper_q_len_one_window_right(rng):
    """window_right does nothing at N = 1 (the one row sits at the last key), whatever its value;
    q_len_per_req=1 given explicitly is the default plan."""
    hq, hkv, d, ps = 4, 2, 32, 16
    lens = [0, 1, 33, int(rng.integers(100, 300))]
    indptr, indices, last, num_pages = make_pages(rng, lens, ps)
    q, q64 = randn(rng, (len(lens), hq, d), "float32")
    kv, kv64 = randn(rng, (num_pages, 2, ps, hkv, d), "float32")
    want, lse64 = reference(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, window_left=20)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(1 << 20, np.uint8))
    for right in (0, 2, -1):
        w.plan(indptr, indices, last, hq, hkv, d, ps, window_left=20, q_data_type="float32",
               window_right=right, q_len_per_req=1)
        out, lse = nan_like(q), np.full((len(lens), hq), np.nan, np.float32)
        w.run(q, kv, out=out, lse=lse, q_len_per_req=1)
        assert_close(f"window_right {right}", out, want, want, "float32")
        assert_lse(f"window_right {right} lse", lse, lse64)
    with pytest.raises(TypeError, match="q_len_per_req must be an int, got bool"):
        w.run(q, kv, q_len_per_req=True)  # equal to 1, but not a count


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", ["plain", "window_softcap"])
def test_decode_wrapper_q_len_sinks_cpu(rng, dtype, options):
    """run(sinks=) with N = 3 rows a request: every row's softmax gets sinks[h] as one more
    logit with a zero value row, against the float64 reference; out / lse poisoned first."""
    hq, hkv, d, ps, q_len = 8, 2, 32, 16, 3
    lens = ragged_lens(rng, q_len)
    indptr, indices, last, num_pages = make_pages(rng, lens, ps)
    rows = len(lens) * q_len
    q, q64 = randn(rng, (rows, hq, d), dtype)
    kv, kv64 = randn(rng, (num_pages, 2, ps, hkv, d), dtype)
    sinks = (rng.standard_normal(hq) * 3).astype(np.float32)
    sinks_t = torch.from_numpy(sinks) if dtype == "bfloat16" else sinks
    left, right, cap = (30, 1, 6.0) if options == "window_softcap" else (-1, 0, 0.0)
    data_type = torch.bfloat16 if dtype == "bfloat16" else dtype
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=data_type, window_left=left,
           logits_soft_cap=cap or None, window_right=right, q_len_per_req=q_len)
    out, lse = nan_like(q), np.full((rows, hq), np.nan, np.float32)
    o, l = w.run(q, kv, out=out, lse=lse, return_lse=True, sinks=sinks_t)
    assert o is out and l is lse
    opts = dict(window_left=left, window_right=right, softcap=cap)
    want, want_lse = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len,
                                    sinks=sinks, **opts)
    # The naive in-dtype reference as in test_decode_wrapper_sinks_cpu: the attention with its
    # roundings, the sink's weight applied in float64, the output stored in the dtype.
    rnd = ref.rounder(dtype)
    naive, naive_lse = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len,
                                      rnd=rnd, **opts)
    naive = naive * np.exp(naive_lse - np.logaddexp(naive_lse, sinks[None]))[..., None]
    naive = rnd(naive).astype(np.float64)
    assert_close("out", o, want, naive, dtype, factor=FACTOR)
    assert_lse("lse", l, want_lse)
    plain = w.run(q, kv, sinks=sinks_t)  # no lse asked for: the wrapper makes its own
    assert np.array_equal(to64(plain), to64(o))


@pytest.mark.parametrize("window_left", [-1, 31, 700])
def test_decode_wrapper_q_len_fixed_split_size(rng, window_left):
    """fixed_split_size with N = 4 rows a request: each request's count is ceil(max(1, its
    attended pages) / size), its attended keys min(L, window_left + N) (the union of its rows'
    windows: window_left 31 at pages of 16 takes 3 pages where one row would take 2), the count
    it gets in a batch of its own; results match the float64 reference; None keeps the rules (no
    counts on the CPU); disable_split_kv wins."""
    hq, hkv, d, ps, q_len = 8, 2, 16, 16, 4
    lens = [int(x) for x in rng.integers(q_len, 3000, size=8)]
    lens[2], lens[5] = q_len, 5000
    indptr, indices, last, num_pages = make_pages(rng, lens, ps)
    rows = len(lens) * q_len
    q, q64 = randn(rng, (rows, hq, d), "float32")
    kv, kv64 = randn(rng, (num_pages, 2, ps, hkv, d), "float32")
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(1 << 20, np.uint8))
    for none in (None, -1):
        w.plan(indptr, indices, last, hq, hkv, d, ps, window_left=window_left,
               q_data_type="float32", fixed_split_size=none, q_len_per_req=q_len)
        assert w.split_counts is None and w.num_splits == 0
    want, lse64 = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len,
                                 window_left=window_left)
    if window_left == 31:
        assert fixed_counts([5000], ps, 1, 31, q_len) == [3] and fixed_counts([5000], ps, 1, 31) == [2]
    for size in (1, 2, 7, 64, 10**12):
        w.plan(indptr, indices, last, hq, hkv, d, ps, window_left=window_left,
               q_data_type="float32", fixed_split_size=size, q_len_per_req=q_len)
        counts = fixed_counts(lens, ps, size, window_left, q_len)
        assert w.split_counts.tolist() == counts and w.num_splits is None, size
        for b in (0, 2, 5):  # alone: the same count
            alone = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(1 << 20, np.uint8))
            alone.plan(indptr[b:b + 2], indices, last[b:b + 1], hq, hkv, d, ps,
                       window_left=window_left, q_data_type="float32", fixed_split_size=size,
                       q_len_per_req=q_len)
            assert alone.split_counts.tolist() == [counts[b]]
        out = nan_like(q)
        lse = np.full((rows, hq), np.nan, np.float32)
        w.run(q, kv, out=out, lse=lse, return_lse=True)
        assert_close(f"fixed_split_size {size}", out, want, want, "float32")
        assert_lse(f"fixed_split_size {size} lse", lse, lse64)
    w.plan(indptr, indices, last, hq, hkv, d, ps, window_left=window_left, q_data_type="float32",
           fixed_split_size=4, disable_split_kv=True, q_len_per_req=q_len)
    assert w.split_counts is None and w.num_splits == 1
    out = nan_like(q)
    w.run(q, kv, out=out)
    assert_close("disable_split_kv", out, want, want, "float32")


def test_decode_wrapper_q_len_graph_mode_cpu(rng):
    """use_cuda_graph=True with N = 3 rows a request over several steps of new ragged lengths:
    plan() writes each step's lists and a padded plan of fixed size, run() matches the float64
    reference with poisoned outputs; a plan of another N is refused (the captured q's rows) and
    the last plan stays; a wrapper whose first plan() was refused takes the N of its first
    successful one."""
    hq, hkv, d, ps, batch, capacity, q_len = 8, 2, 32, 16, 5, 100, 3
    w, (ip_buf, idx_buf, last_buf) = graph_wrapper(batch, capacity)
    kv, kv64 = randn(rng, (capacity + 4, 2, ps, hkv, d), "float32")
    before = kv.copy()
    rows = batch * q_len
    size = None
    for step in range(4):
        lens = [int(x) for x in rng.integers(q_len, 160, size=batch)]
        lens[int(rng.integers(batch))] = q_len if step == 1 else int(rng.integers(300, 700))
        if step == 3:  # fixed_split_size 1: one part more than the batch, the plan's room on the CPU
            lens = [int(x) for x in rng.integers(q_len, ps + 1, size=batch)]
            lens[int(rng.integers(batch))] = int(rng.integers(ps + 1, 2 * ps + 1))
        indptr, indices, last, _ = make_pages(rng, lens, ps, spare=0)
        indices = rng.permutation(capacity + 4)[:indices.size].astype(np.int32)
        w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32", q_len_per_req=q_len,
               fixed_split_size=1 if step == 3 else None)
        assert ip_buf.tolist() == indptr.tolist()
        assert idx_buf[:indices.size].tolist() == indices.tolist()
        assert last_buf.tolist() == last.tolist()
        plan = w._graph.split_plan
        size = plan.size if size is None else size
        assert plan.size == size == batch + 1 + fastattn.decode_graph_plan_items(batch, hkv, 1)
        counts = w.split_counts
        if step == 3:
            assert counts.tolist() == fixed_counts(lens, ps, 1, q_len=q_len)
            assert sorted(counts.tolist()) == [1] * (batch - 1) + [2]
        assert plan[:batch + 1].tolist() == [0] + np.cumsum(counts).tolist()
        assert (plan[batch + 1 + counts.sum():] == -1).all()
        q, q64 = randn(rng, (rows, hq, d), "float32")
        out = nan_like(q)
        lse = np.full((rows, hq), np.nan, np.float32)
        o, l = w.run(q, kv, out=out, lse=lse, return_lse=True)
        want, lse64 = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len)
        assert_close(f"step {step}", o, want, want, "float32")
        assert_lse(f"step {step} lse", l, lse64)
    assert np.array_equal(kv, before), "run() wrote into the cache"
    for other in (1, 2):
        with pytest.raises(ValueError, match=f"q_len_per_req must stay {q_len} with use_cuda_graph="
                                             f"True .*got {other}"):
            w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32",
                   q_len_per_req=other)
    with pytest.raises(ValueError, match="q_len_per_req must stay 3 with use_cuda_graph=True"):
        w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32")  # the default, 1
    out = nan_like(q)
    w.run(q, kv, out=out)
    assert_close("after the refused plans", out, want, want, "float32")

    # A first plan() refused (a request of fewer keys than N) fixes no N.
    w2, _ = graph_wrapper(batch, capacity)
    lens = [int(x) for x in rng.integers(4, 60, size=batch)]
    lens[1] = 2
    indptr, indices, last, _ = make_pages(rng, lens, ps, spare=0)
    with pytest.raises(ValueError, match="sequence 1 has 2 keys, fewer than its q_len = 4"):
        w2.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32", q_len_per_req=4)
    w2.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32", q_len_per_req=2)
    q, q64 = randn(rng, (batch * 2, hq, d), "float32")
    want, _ = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, 2)
    out = nan_like(q)
    w2.run(q, kv, out=out)
    assert_close("N of the first successful plan", out, want, want, "float32")
    with pytest.raises(ValueError, match="q_len_per_req must stay 2 with use_cuda_graph=True"):
        w2.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type="float32", q_len_per_req=4)


def test_decode_wrapper_q_len_errors(rng):
    """plan()'s checks of q_len_per_req, window_right, the lengths against N, the heads and
    o_data_type, each refused plan() keeping the last plan (run() still gives its results); run()'s
    checks of q_len_per_req and of q / out / lse of the wrong rows, the outputs left as they
    were."""
    hq, hkv, d, ps, q_len = 4, 2, 16, 4, 3
    lens = [9, 3, 5]
    indptr, indices, last, num_pages = make_pages(rng, lens, ps)
    rows = len(lens) * q_len
    q, q64 = randn(rng, (rows, hq, d), "float32")
    kv, kv64 = randn(rng, (num_pages, 2, ps, hkv, d), "float32")
    want, lse64 = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(16, np.uint8))

    def plan(**kw):
        args = dict(indptr=indptr, indices=indices, last_page_len=last, num_qo_heads=hq,
                    num_kv_heads=hkv, head_dim=d, page_size=ps, q_data_type="float32",
                    q_len_per_req=q_len)
        args.update(kw)
        w.plan(**args)

    def still_the_plan(what):
        out, lse = nan_like(q), np.full((rows, hq), np.nan, np.float32)
        w.run(q, kv, out=out, lse=lse)
        assert_close(f"the plan after {what}", out, want, want, "float32")
        assert_lse(f"the plan's lse after {what}", lse, lse64)

    plan()
    still_the_plan("plan()")
    short_lens = [9, 2, 5]
    si, sx, sl, _ = make_pages(rng, short_lens, ps)
    bad_plans = [
        (ValueError, "q_len_per_req must be >= 1, got 0", dict(q_len_per_req=0)),
        (ValueError, "q_len_per_req must be >= 1, got -2", dict(q_len_per_req=-2)),
        (TypeError, "q_len_per_req must be an int, got float", dict(q_len_per_req=2.0)),
        (TypeError, "q_len_per_req must be an int, got NoneType", dict(q_len_per_req=None)),
        (ValueError, r"window_right must be >= -1 \(-1: no bound\), got -2", dict(window_right=-2)),
        (TypeError, "window_right must be an int, got float", dict(window_right=1.5)),
        (ValueError, r"sequence 1 has 2 keys, fewer than its q_len = 3 query rows \(q_len_per_req\)",
         dict(indptr=si, indices=sx, last_page_len=sl)),
        (ValueError, r"sequence 1 has 0 keys, fewer than its q_len = 3 query rows \(q_len_per_req\)",
         dict(indptr=int32([0, 3, 3, 5]), indices=int32([0, 1, 2, 3, 4]), last_page_len=int32([1, 1, 1]))),
        (ValueError, "num_qo_heads must be 0 or a multiple of num_kv_heads", dict(num_qo_heads=5)),
        (ValueError, "num_qo_heads must be 0 or a multiple of num_kv_heads",
         dict(num_qo_heads=3, q_len_per_req=1)),
        (TypeError, r"o_data_type must be None or q_data_type \(float32\)", dict(o_data_type="float16")),
        (TypeError, r"o_data_type must be None or q_data_type \(float16\)",
         dict(q_data_type="float16", o_data_type=np.dtype("float32"))),
    ]
    for error, message, change in bad_plans:
        with pytest.raises(error, match=message):
            plan(**change)
        still_the_plan(f"plan({change}) was refused")
    # A request of exactly N keys is fine; at N = 1 one of none is too (its output is 0).
    plan(indptr=si, indices=sx, last_page_len=sl, q_len_per_req=2)
    q2, q2_64 = randn(rng, (6, hq, d), "float32")
    w2_want, _ = reference_rows(q2_64, kv64[:, 0], kv64[:, 1], si, sx, short_lens, 2)
    assert_close("N = 2 with a request of 2 keys", w.run(q2, kv), w2_want, w2_want, "float32")
    plan()

    out, lse = nan_like(q), np.full((rows, hq), np.nan, np.float32)
    bad_runs = [
        (ValueError, r"q_len_per_req given to run\(\) must be the one plan\(\) was given \(3\), got 1: "
         r"pass it to plan\(\)", dict(q_len_per_req=1)),
        (ValueError, r"q_len_per_req given to run\(\) must be the one plan\(\) was given \(3\), got 4",
         dict(q_len_per_req=4)),
        (TypeError, "q_len_per_req must be an int, got float", dict(q_len_per_req=3.5)),
        (ValueError, r"q must have shape \(batch_size \* q_len_per_req, num_qo_heads, head_dim\) = "
         r"\(9, 4, 16\) as planned \(q_len_per_req = 3\), got \(3, 4, 16\)", dict(q=q[:3])),
        (ValueError, r"q must have shape \(batch_size \* q_len_per_req, num_qo_heads, head_dim\) = "
         r"\(9, 4, 16\) as planned \(q_len_per_req = 3\), got \(3, 3, 4, 16\)",
         dict(q=q.reshape(3, 3, hq, d))),
        (ValueError, r"out must have shape \(9, 4, 16\), got \(3, 4, 16\)",
         dict(out=np.full((3, hq, d), np.nan, np.float32))),
        (ValueError, r"lse must have shape \(9, 4\), got \(3, 4\)",
         dict(lse=np.full((3, hq), np.nan, np.float32))),
        (ValueError, r"sinks must have shape \(num_qo_heads,\) = \(4,\) as planned, got \(9,\)",
         dict(sinks=np.zeros(rows, np.float32))),
    ]
    for error, message, change in bad_runs:
        args = dict(q=q, paged_kv_cache=kv, out=out, lse=lse)
        args.update(change)
        with pytest.raises(error, match=message):
            w.run(args.pop("q"), args.pop("paged_kv_cache"), **args)
        assert np.isnan(out).all() and np.isnan(lse).all(), "a refused run() wrote its outputs"
    # At N = 1 the message keeps FlashInfer's name for q's rows.
    plan(q_len_per_req=1)
    with pytest.raises(ValueError, match=r"q must have shape \(batch_size, num_qo_heads, head_dim\) = "
                                         r"\(3, 4, 16\) as planned, got \(9, 4, 16\)"):
        w.run(q, kv, out=out)
    assert np.isnan(out).all(), "a refused run() wrote its output"


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_wrapper_o_data_type(rng, dtype):
    """plan(o_data_type=) takes None or q's dtype, as a string, a numpy dtype or a torch dtype
    (the output has q's dtype); another dtype is a TypeError naming both."""
    hq, hkv, d, ps, q_len = 4, 2, 16, 4, 2
    lens = [7, 2, 12]
    indptr, indices, last, num_pages = make_pages(rng, lens, ps)
    q, q64 = randn(rng, (len(lens) * q_len, hq, d), dtype)
    kv, kv64 = randn(rng, (num_pages, 2, ps, hkv, d), dtype)
    want, _ = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len)
    naive, _ = reference_rows(q64, kv64[:, 0], kv64[:, 1], indptr, indices, lens, q_len,
                              rnd=ref.rounder(dtype))
    data_type = torch.bfloat16 if dtype == "bfloat16" else dtype
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    same = [None, dtype]
    if dtype != "bfloat16":
        same += [np.dtype(dtype), getattr(np, dtype)]  # a numpy dtype and a numpy scalar type
    if torch is not None:
        same.append(getattr(torch, dtype))
    for o_type in same:
        w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=data_type, o_data_type=o_type,
               q_len_per_req=q_len)
        out = nan_like(q)
        assert w.run(q, kv, out=out) is out
        assert_close(f"o_data_type {o_type!r}", out, want, naive, dtype, factor=FACTOR)
        made = w.run(q, kv)
        assert str(made.dtype).endswith(dtype), made.dtype
    other = "float16" if dtype != "float16" else "float32"
    for o_type in (other, np.dtype(other), getattr(np, other), "int8"):
        with pytest.raises(TypeError, match=fr"o_data_type must be None or q_data_type \({dtype}\): "
                                            fr"the output has q's dtype, got {np.dtype(o_type).name}"):
            w.plan(indptr, indices, last, hq, hkv, d, ps, q_data_type=data_type, o_data_type=o_type,
                   q_len_per_req=q_len)
