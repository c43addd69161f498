"""FlashInfer-style batch prefill over a paged cache (fastattn.BatchPrefillWithPagedKVCacheWrapper)
and over packed keys and values (fastattn.BatchPrefillWithRaggedKVCacheWrapper) on the CPU against
the float64 reference: ragged query runs (empty ones, runs longer than their
keys), a random page pool, both layouts, causal / window / softcap / scale / sinks / calibration
scales, NaN-poisoned out and lse, the cache's bytes unchanged; the decode route (every request N
rows) and the prefill route; graph mode's buffers; the deprecated forward(); the errors."""

import numpy as np
import pytest

import fastattn
import reference as ref
from helpers import DTYPES, assert_close, assert_lse, int32, nan_like, randn, to64, torch

from test_decode_wrapper import hnd_copy, make_pages

FACTOR = 3.0  # the KV-cache rule: the prefill wrapper reads a KV cache


def cumsum0(lens):
    return int32(np.concatenate([[0], np.cumsum(lens)]))


def reference(q64, kv64, indptr, indices, qo_lens, kv_lens, causal, rnd=None, window_left=-1,
              softcap=0.0, scale=None, sinks=None):
    """Request b's qo_lens[b] rows (packed in q64) at its last key positions, kv_lens[b] - qo_len
    + i, over its pages: out (rows, Hq, D), lse (rows, Hq). Rows past the last request see no key."""
    rows, hq, d = q64.shape
    out = np.zeros((rows, hq, d))
    lse = np.full((rows, hq), -np.inf if sinks is None else 0.0)
    if sinks is not None:
        lse[:] = np.asarray(sinks, np.float64)[None, :]
    r0 = 0
    for b, (nq, nk) in enumerate(zip(qo_lens, kv_lens)):
        ids = indices[indptr[b]:indptr[b + 1]]
        k = ref.gather_pages(kv64[:, 0], ids, nk)
        v = ref.gather_pages(kv64[:, 1], ids, nk)
        qpos = nk - nq + np.arange(nq)
        o, l, _ = ref.attention_rows(q64[r0:r0 + nq], k, v, qpos, np.arange(nk),
                                     ref.default_scale(d, scale), softcap, None, window_left,
                                     0 if causal else -1, rnd, sinks)
        out[r0:r0 + nq], lse[r0:r0 + nq] = o, l.T
        r0 += nq
    return out, lse


class Step:
    """One step's inputs: query runs qo_lens over requests of kv_lens keys in a random page pool."""

    def __init__(self, rng, dtype, qo_lens, kv_lens, page_size, hq, hkv, d, layout="NHD", extra_rows=0):
        self.qo_lens, self.kv_lens, self.ps = list(qo_lens), list(kv_lens), page_size
        self.hq, self.hkv, self.d, self.dtype = hq, hkv, d, dtype
        self.qo_indptr = cumsum0(qo_lens)
        self.indptr, self.indices, self.last, num_pages = make_pages(rng, kv_lens, page_size)
        self.q, self.q64 = randn(rng, (int(self.qo_indptr[-1]) + extra_rows, hq, d), dtype)
        self.kv, self.kv64 = randn(rng, (num_pages, 2, page_size, hkv, d), dtype)
        self.cache = hnd_copy(self.kv) if layout == "HND" else self.kv
        self.layout = layout

    def plan(self, w, **kw):
        w.plan(self.qo_indptr, self.indptr, self.indices, self.last, self.hq, self.hkv, self.d,
               self.ps, q_data_type=self.dtype, **kw)

    def check(self, w, causal, run_kw=None, **ref_kw):
        """run() into NaN-poisoned out / lse, against the reference; the cache unchanged; a second
        run() without out / lse gives the same bits."""
        run_kw = dict(run_kw or {})
        before = to64(self.cache).copy()
        out, lse = nan_like(self.q), np.full(tuple(self.q.shape[:2]), np.nan, np.float32)
        o, l = w.run(self.q, self.cache, out=out, lse=lse, return_lse=True, **run_kw)
        assert o is out and l is lse
        args = (self.q64, self.kv64, self.indptr, self.indices, self.qo_lens, self.kv_lens, causal)
        o64, lse64 = reference(*args, **ref_kw)
        naive, _ = reference(*args, rnd=ref.rounder(self.dtype), **ref_kw)
        assert_close("out", o, o64, naive, self.dtype, factor=FACTOR)
        assert_lse("lse", l, lse64)
        assert np.array_equal(to64(self.cache), before), "run() wrote into the cache"
        again = w.run(self.q, self.cache, **run_kw)
        assert np.array_equal(to64(again), to64(o)), "a second run() changed the output"
        return o, l


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("causal", [True, False])
def test_prefill_route(rng, dtype, page_size, layout, causal):
    """Ragged runs: an empty run, a run over no key, a run longer than its keys (its first rows
    see none where causal), GQA; 3 padding rows past the last run get out 0 and LSE -inf."""
    qo_lens = [5, 0, 17, 1, 40, 3]
    kv_lens = [30, 7, 17, 0, 100, 2]
    s = Step(rng, dtype, qo_lens, kv_lens, page_size, 8, 2, 32, layout, extra_rows=3)
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(np.empty(16, np.uint8), layout)
    s.plan(w, causal=causal)
    assert w._plan["route"] == "prefill"
    s.check(w, causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_decode_route(rng, dtype, rows, causal):
    """Every request has the same N rows at its last N keys (speculative decoding's verify
    step): the multi-row decode route, against the same reference."""
    kv_lens = [rows, 300, 37, 64 + rows] if rows > 1 else [0, 300, 37, 65]
    s = Step(rng, dtype, [rows] * len(kv_lens), kv_lens, 16, 8, 4, 64)
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    s.plan(w, causal=causal)
    assert w._plan["route"] == "decode" and w._plan["rows"] == rows
    s.check(w, causal)


def test_route_choice():
    """The decode route takes uniform runs of 1..16 rows with at least N keys each (N = 1: any)."""
    rule = fastattn.prefill.decode_route_rows
    lens = np.array
    assert rule(lens([4, 4, 4]), lens([4, 9, 100]), 0) == 4
    assert rule(lens([4, 4, 4]), lens([3, 9, 100]), 0) == 0  # a request with fewer keys than rows
    assert rule(lens([1, 1]), lens([0, 5]), 0) == 1
    assert rule(lens([16]), lens([16]), 0) == 16
    assert rule(lens([17]), lens([17]), 0) == 0
    assert rule(lens([2, 3]), lens([9, 9]), 0) == 0
    assert rule(lens([0, 0]), lens([9, 9]), 0) == 0
    assert rule(lens([], dtype=np.int64), lens([], dtype=np.int64), 0) == 0


@pytest.mark.parametrize("route_rows", [None, 3])
def test_options(rng, route_rows):
    """window_left, logits_soft_cap and sm_scale from plan(), window_left from run(), sinks and
    the calibration scales, on both routes."""
    if route_rows is None:
        qo_lens, kv_lens = [9, 2, 33], [50, 2, 200]
    else:
        qo_lens, kv_lens = [route_rows] * 3, [50, 3, 200]
    s = Step(rng, "float32", qo_lens, kv_lens, 16, 4, 2, 32)
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    s.plan(w, causal=True, window_left=20, logits_soft_cap=6.0, sm_scale=0.2)
    assert w._plan["route"] == ("prefill" if route_rows is None else "decode")
    s.check(w, True, window_left=20, softcap=6.0, scale=0.2)
    s.check(w, True, run_kw=dict(window_left=-1), softcap=6.0, scale=0.2)
    sinks = rng.uniform(-1, 3, size=4).astype(np.float32)
    s.check(w, True, run_kw=dict(sinks=sinks), window_left=20, softcap=6.0, scale=0.2, sinks=sinks)
    # q_scale * k_scale fold into the scale; v_scale multiplies the output after the kernels.
    o = w.run(s.q, s.cache, q_scale=2.0, k_scale=0.5, v_scale=0.25)
    base = w.run(s.q, s.cache)
    np.testing.assert_allclose(to64(o), to64(base) * 0.25, rtol=1e-6, atol=0)


def test_forward_and_replan(rng):
    """FlashInfer's deprecated begin_forward / forward / forward_return_lse: options given to
    forward() that differ from the plan's plan the step again."""
    s = Step(rng, "float32", [7, 1, 12], [20, 9, 12], 4, 4, 4, 16)
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(np.empty(16, np.uint8))
    w.begin_forward(s.qo_indptr, s.indptr, s.indices, s.last, 4, 4, 16, 4, q_data_type="float32")
    args = (s.q64, s.kv64, s.indptr, s.indices, s.qo_lens, s.kv_lens)
    got, lse = w.forward_return_lse(s.q, s.cache, causal=True, logits_soft_cap=3.0)
    want, lse64 = reference(*args, True, softcap=3.0)
    assert_close("forward causal", got, want, want, "float32")
    assert_lse("forward lse", lse, lse64)
    got = w.forward(s.q, s.cache)  # FlashInfer's defaults: not causal
    want, _ = reference(*args, False)
    assert_close("forward", got, want, want, "float32")
    got = w.run_return_lse(s.q, s.cache)[0]
    assert_close("run_return_lse", got, want, want, "float32")
    w.end_forward()
    with pytest.raises(RuntimeError, match=r"plan\(\) must be called"):
        w.run(s.q, s.cache)


def test_graph_mode_buffers(rng):
    """use_cuda_graph=True: each plan() writes its lists into the caller's buffers, which run()
    reads; the batch, the route and (on the prefill route) the longest run stay the first plan's."""
    batch, cap = 3, 64
    bufs = dict(qo_indptr_buf=np.zeros(batch + 1, np.int32),
                paged_kv_indptr_buf=np.zeros(batch + 1, np.int32),
                paged_kv_indices_buf=np.zeros(cap, np.int32),
                paged_kv_last_page_len_buf=np.zeros(batch, np.int32))
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(np.empty(16, np.uint8), use_cuda_graph=True, **bufs)
    assert w.is_cuda_graph_enabled
    for qo_lens, kv_lens in (([9, 3, 1], [40, 3, 70]), ([2, 9, 0], [9, 100, 5])):
        s = Step(rng, "float32", qo_lens, kv_lens, 8, 4, 2, 16)
        s.plan(w, causal=True)
        assert np.array_equal(bufs["qo_indptr_buf"], s.qo_indptr)
        s.check(w, True)
    s = Step(rng, "float32", [10, 1, 1], [40, 3, 70], 8, 4, 2, 16)
    with pytest.raises(ValueError, match=r"longest run must be at most the first plan's \(9\)"):
        s.plan(w, causal=True)
    s = Step(rng, "float32", [2, 2, 2], [40, 3, 70], 8, 4, 2, 16)
    with pytest.raises(ValueError, match="must keep the first plan's route"):
        s.plan(w, causal=True)
    # A wrapper whose first plan took the decode route writes every list into its buffers too.
    d = fastattn.BatchPrefillWithPagedKVCacheWrapper(np.empty(16, np.uint8), use_cuda_graph=True, **bufs)
    s.plan(d, causal=True)
    assert d._plan["route"] == "decode" and np.array_equal(bufs["qo_indptr_buf"], s.qo_indptr)
    assert np.array_equal(bufs["paged_kv_last_page_len_buf"], s.last)
    s.check(d, True)
    s = Step(rng, "float32", [2, 2], [40, 3], 8, 4, 2, 16)
    with pytest.raises(ValueError, match=r"qo_indptr must have batch_size \+ 1 = 4 entries"):
        s.plan(w)
    s = Step(rng, "float32", [1, 1, 1], [400, 300, 5], 1, 4, 2, 16)
    fresh = fastattn.BatchPrefillWithPagedKVCacheWrapper(np.empty(16, np.uint8), use_cuda_graph=True, **bufs)
    before = {k: v.copy() for k, v in bufs.items()}
    with pytest.raises(ValueError, match="paged_kv_indices hold 705 pages, more than"):
        fresh.plan(cumsum0([2, 1, 1]), s.indptr, s.indices, s.last, 4, 2, 16, 1, q_data_type="float32")
    assert all(np.array_equal(bufs[k], before[k]) for k in bufs), "a refused plan wrote the buffers"
    # The refused first plan fixed nothing: a first plan with longer runs is taken.
    s = Step(rng, "float32", [30, 3, 1], [40, 3, 70], 8, 4, 2, 16)
    s.plan(fresh, causal=True)
    s.check(fresh, True)


@pytest.mark.skipif(torch is None, reason="torch")
def test_torch_tensors_and_rope_parameters(rng):
    """torch CPU tensors in and out; rope_scale / rope_theta change nothing under "NONE"."""
    s = Step(rng, "bfloat16", [3, 8], [3, 50], 16, 4, 2, 32)
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(torch.empty(16, dtype=torch.uint8))
    s.plan(w, causal=True)
    o = w.run(s.q, s.cache)
    assert isinstance(o, torch.Tensor) and o.dtype == torch.bfloat16
    s.plan(w, causal=True, rope_scale=2.0, rope_theta=5e5)
    assert torch.equal(w.run(s.q, s.cache), o)


def test_errors(rng):
    s = Step(rng, "float32", [3, 2], [10, 4], 4, 4, 2, 16)
    ws = np.empty(16, np.uint8)
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(ws)

    def plan(**kw):
        args = dict(qo_indptr=s.qo_indptr, paged_kv_indptr=s.indptr, paged_kv_indices=s.indices,
                    paged_kv_last_page_len=s.last, num_qo_heads=4, num_kv_heads=2, head_dim_qk=16,
                    page_size=4, q_data_type="float32")
        args.update(kw)
        w.plan(**args)

    with pytest.raises(RuntimeError, match=r"plan\(\) must be called before run\(\)"):
        w.run(s.q, s.cache)
    with pytest.raises(ValueError, match="kv_layout must be"):
        fastattn.BatchPrefillWithPagedKVCacheWrapper(ws, "nhd")
    with pytest.raises(ValueError, match="qo_indptr_buf is required with use_cuda_graph"):
        fastattn.BatchPrefillWithPagedKVCacheWrapper(ws, use_cuda_graph=True)
    with pytest.raises(NotImplementedError, match="custom masks"):
        fastattn.BatchPrefillWithPagedKVCacheWrapper(ws, custom_mask_buf=np.zeros(4, np.uint8))
    with pytest.raises(NotImplementedError, match="custom masks"):
        plan(custom_mask=np.ones(50, bool))
    with pytest.raises(NotImplementedError, match="pos_encoding_mode must be 'NONE'"):
        plan(pos_encoding_mode="ROPE_LLAMA")
    with pytest.raises(NotImplementedError, match="head_dim_vo must be None or head_dim_qk"):
        plan(head_dim_vo=8)
    with pytest.raises(NotImplementedError, match="multi-item scoring"):
        plan(token_pos_in_items_len=4)
    with pytest.raises(NotImplementedError, match="seq_lens / seq_lens_q / block_tables"):
        plan(seq_lens=int32([10, 4]))
    with pytest.raises(TypeError, match=r"kv_data_type must equal q_data_type \(float32\)"):
        plan(kv_data_type="float16")
    with pytest.raises(ValueError, match=r"qo_indptr\[0\] must be 0"):
        plan(qo_indptr=int32([1, 3, 5]))
    with pytest.raises(ValueError, match=r"qo_indptr must be non-decreasing, got qo_indptr\[2\] < qo_indptr\[1\]"):
        plan(qo_indptr=int32([0, 3, 2]))
    with pytest.raises(ValueError, match="paged_kv_indptr must have batch_size \\+ 1 = len\\(qo_indptr\\) = 3"):
        plan(paged_kv_indptr=int32([0, 3]))
    with pytest.raises(ValueError, match="paged_kv_last_page_len must have batch_size"):
        plan(paged_kv_last_page_len=int32([2]))
    with pytest.raises(ValueError, match=r"paged_kv_last_page_len\[1\] must be in 1..page_size = 4, got 5"):
        plan(paged_kv_last_page_len=int32([2, 5]))
    with pytest.raises(ValueError, match="window_left must be >= -1"):
        plan(window_left=-2)
    with pytest.raises(ValueError, match="fixed_split_size must be a page count"):
        plan(fixed_split_size=0)
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        plan(page_size=0)
    plan(causal=True)
    assert w._plan["route"] == "prefill"
    with pytest.raises(ValueError, match=r"q must be \(rows >= qo_indptr\[-1\] = 5, num_qo_heads = 4, "
                                         r"head_dim = 16\) as planned, got \(4, 4, 16\)"):
        w.run(s.q[:4], s.cache)
    with pytest.raises(TypeError, match="q has dtype float16 but plan"):
        w.run(s.q.astype(np.float16), s.cache)
    with pytest.raises(ValueError, match=r"paged_kv_cache pages must be \(max_num_pages, page_size, "
                                         r"num_kv_heads, head_dim\) \(NHD\) with page_size 4"):
        w.run(s.q, np.ascontiguousarray(s.cache[:, :, :2]))
    with pytest.raises(ValueError, match="paged_kv_cache must have shape"):
        w.run(s.q, s.cache[:, 0])
    with pytest.raises(TypeError, match="run\\(\\) takes q and paged_kv_cache positionally"):
        w.run(s.q, s.cache, None)
    with pytest.raises(ValueError, match="v_scale must be finite"):
        w.run(s.q, s.cache, v_scale=float("inf"))
    with pytest.raises(ValueError, match=r"lse must be \(rows, num_qo_heads\) = \(5, 4\), got \(4, 5\)"):
        w.run(s.q, s.cache, lse=np.zeros((4, 5), np.float32))
    with pytest.raises(TypeError, match="lse must be float32, got float16"):
        w.run(s.q, s.cache, lse=np.zeros((5, 4), np.float16))
    out = nan_like(s.q)
    with pytest.raises(ValueError, match="out"):
        w.run(s.q, s.cache, out=out[:, :2])
    assert np.isnan(out).all(), "a refused call wrote into out"


# ---- BatchPrefillWithRaggedKVCacheWrapper -----------------------------------------------------------


def ragged_reference(q64, k64, v64, qo_lens, kv_lens, causal, rnd=None, window_left=-1, softcap=0.0,
                     scale=None):
    """Request b's rows over its packed keys k64[kv_indptr[b]:kv_indptr[b + 1]]: out, lse (rows, Hq)."""
    rows, hq, d = q64.shape
    out, lse = np.zeros((rows, hq, d)), np.full((rows, hq), -np.inf)
    r0 = k0 = 0
    for nq, nk in zip(qo_lens, kv_lens):
        qpos = nk - nq + np.arange(nq)
        o, l, _ = ref.attention_rows(q64[r0:r0 + nq], k64[k0:k0 + nk], v64[k0:k0 + nk], qpos,
                                     np.arange(nk), ref.default_scale(d, scale), softcap, None,
                                     window_left, 0 if causal else -1, rnd)
        out[r0:r0 + nq], lse[r0:r0 + nq] = o, l.T
        r0, k0 = r0 + nq, k0 + nk
    return out, lse


def head_major(x):
    """(rows, H, D) as FlashInfer's HND (H, rows, D), contiguous."""
    t = x.swapaxes(0, 1)
    return t.contiguous() if torch is not None and isinstance(t, torch.Tensor) else np.ascontiguousarray(t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("causal", [True, False])
def test_ragged(rng, dtype, layout, causal):
    """Packed runs over packed keys: an empty run, a request of no key, a run longer than its
    keys, GQA, two padding rows; NaN-poisoned out / lse; k and v unchanged; the options."""
    qo_lens, kv_lens = [6, 0, 20, 1, 33], [40, 5, 12, 0, 70]
    hq, hkv, d = 8, 2, 32
    q, q64 = randn(rng, (sum(qo_lens) + 2, hq, d), dtype)
    k, k64 = randn(rng, (sum(kv_lens), hkv, d), dtype)
    v, v64 = randn(rng, (sum(kv_lens), hkv, d), dtype)
    if layout == "HND":
        k, v = head_major(k), head_major(v)
    before = (to64(k).copy(), to64(v).copy())
    w = fastattn.BatchPrefillWithRaggedKVCacheWrapper(np.empty(16, np.uint8), layout)
    for opts, ref_kw in (({}, {}), (dict(window_left=9, logits_soft_cap=5.0, sm_scale=0.3),
                                    dict(window_left=9, softcap=5.0, scale=0.3))):
        w.plan(cumsum0(qo_lens), cumsum0(kv_lens), hq, hkv, d, causal=causal, q_data_type=dtype, **opts)
        out, lse = nan_like(q), np.full((q.shape[0], hq), np.nan, np.float32)
        o, l = w.run(q, k, v, out=out, lse=lse, return_lse=True)
        assert o is out and l is lse
        o64, lse64 = ragged_reference(q64, k64, v64, qo_lens, kv_lens, causal, **ref_kw)
        naive, _ = ragged_reference(q64, k64, v64, qo_lens, kv_lens, causal, rnd=ref.rounder(dtype), **ref_kw)
        assert_close("out", o, o64, naive, dtype)
        assert_lse("lse", l, lse64)
        assert np.array_equal(to64(w.run(q, k, v)), to64(o))
    assert np.array_equal(to64(k), before[0]) and np.array_equal(to64(v), before[1])


def test_ragged_forward_graph_mode_and_errors(rng):
    qo_lens, kv_lens = [3, 9], [10, 9]
    q, q64 = randn(rng, (12, 4, 16), "float32")
    k, k64 = randn(rng, (19, 2, 16), "float32")
    v, v64 = randn(rng, (19, 2, 16), "float32")
    ws = np.empty(16, np.uint8)
    w = fastattn.BatchPrefillWithRaggedKVCacheWrapper(ws)
    with pytest.raises(RuntimeError, match=r"plan\(\) must be called before run\(\)"):
        w.run(q, k, v)
    w.begin_forward(cumsum0(qo_lens), cumsum0(kv_lens), 4, 2, 16, q_data_type="float32")
    got, lse = w.forward_return_lse(q, k, v, causal=True)  # replans: the plan was not causal
    want, lse64 = ragged_reference(q64, k64, v64, qo_lens, kv_lens, True)
    assert_close("forward", got, want, want, "float32")
    assert_lse("forward lse", lse, lse64)
    got = w.run_return_lse(q, k, v)[0]
    assert_close("run_return_lse", got, want, want, "float32")
    with pytest.raises(ValueError, match=r"k must be \(rows, num_kv_heads, head_dim\) \(NHD\) with rows >= "
                                         r"kv_indptr\[-1\] = 19"):
        w.run(q, k[:18], v)
    with pytest.raises(TypeError, match="run\\(\\) takes q, k and v positionally"):
        w.run(q, k, v, None)
    with pytest.raises(ValueError, match=r"kv_indptr must have batch_size \+ 1 = len\(qo_indptr\) = 3"):
        w.plan(cumsum0(qo_lens), int32([0, 19]), 4, 2, 16, q_data_type="float32")
    with pytest.raises(ValueError, match=r"kv_indptr\[0\] must be 0"):
        w.plan(cumsum0(qo_lens), int32([2, 12, 21]), 4, 2, 16, q_data_type="float32")
    with pytest.raises(NotImplementedError, match="custom masks"):
        w.plan(cumsum0(qo_lens), cumsum0(kv_lens), 4, 2, 16, custom_mask=np.ones(4, bool))
    with pytest.raises(ValueError, match="kv_indptr_buf is required with use_cuda_graph"):
        fastattn.BatchPrefillWithRaggedKVCacheWrapper(ws, use_cuda_graph=True, qo_indptr_buf=int32([0, 0, 0]))
    bufs = dict(qo_indptr_buf=np.zeros(3, np.int32), kv_indptr_buf=np.zeros(3, np.int32))
    g = fastattn.BatchPrefillWithRaggedKVCacheWrapper(ws, use_cuda_graph=True, **bufs)
    g.plan(cumsum0(qo_lens), cumsum0(kv_lens), 4, 2, 16, causal=True, q_data_type="float32")
    assert np.array_equal(bufs["kv_indptr_buf"], cumsum0(kv_lens))
    assert_close("graph mode", g.run(q, k, v), want, want, "float32")
    with pytest.raises(ValueError, match=r"longest run must be at most the first plan's \(9\)"):
        g.plan(cumsum0([10, 2]), cumsum0(kv_lens), 4, 2, 16, q_data_type="float32")
