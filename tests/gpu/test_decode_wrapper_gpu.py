"""GPU: fastattn.BatchDecodeWithPagedKVCacheWrapper (FlashInfer's batch decode interface, planned
from the host's page lists) against a float64 reference computed on the GPU over the gathered pages.

Ragged batches (empty requests, a few long ones among short ones, so that plan() picks a split
count per request, and near-uniform ones, which keep the capacity heuristic), every page size, GQA
1/4/8, head_dim 64/128/256, both cache forms and both of FlashInfer's layouts (NHD, HND), window /
softcap / scale, out= and lse= poisoned with NaN, the wrapper's workspace used or too small; with
use_cuda_graph=True, run() captured in a CUDA graph and replayed after each step's plan() of new
lengths and pages. Several query rows per request (q_len_per_req, speculative decoding: rows
causal within the request, or window_right): ragged and near-uniform batches at each page size,
group, head_dim and layout, windows / softcap / scale, sinks, fixed_split_size and graph mode.
Random scenarios (test_wrapper_random_scenarios) draw every knob of plan() and run() at once.
The rule (FlashAttention's, for KV-cache calls):
max|out - ref| <= 3 * max|naive_in_dtype - ref| + 1e-5; LSE within 1e-3 + 1e-3 * |ref|. The cache
is read only: its bytes are checked unchanged.
"""

import pytest

torch = pytest.importorskip("torch")

import fastattn  # noqa: E402

import gpu_reference as R  # noqa: E402
from gpu_helpers import (RANDOM_SCENARIOS, cumsum0, i32, nan_full, randn,  # noqa: E402
                         run_random_scenarios, strided_sinks, warm_and_capture)
import test_prefill as P  # noqa: E402  (its helpers; importing it runs no test)

DEV = "cuda"
DTYPES, DTYPE_IDS = P.DTYPES, P.DTYPE_IDS
FACTOR = 3.0  # the KV-cache rule


def hnd_copy(kv):
    """FlashInfer's HND layout of an NHD pool (P, 2, page_size, Hkv, D): the same pages as a
    contiguous (P, 2, Hkv, page_size, D) tensor."""
    return kv.transpose(2, 3).contiguous()


class Batch:
    """One decode step: q (B x N, Hq, D), N = q_len query rows per request (request b's rows
    b x N .. b x N + N - 1), pages (num_pages, 2, page_size, Hkv, D) in a random order (`kv`, the
    reference's), the same pages in `layout` (`pages`, what the wrapper reads), CSR page lists
    (indptr, indices, last_page_len) on the GPU."""

    def __init__(self, rng, dtype, lens, page_size, hq, hkv, d, layout="NHD", q_len=1):
        self.lens, self.ps, self.hq, self.hkv, self.d, self.dtype = list(lens), page_size, hq, hkv, d, dtype
        self.q_len = q_len
        self.lists, indptr, indices, last, num_pages = P.make_csr(rng, lens, page_size)
        self.indptr, self.indices, self.last = i32(indptr), i32(indices), i32(last)
        self.kv = randn(num_pages, 2, page_size, hkv, d, dtype=dtype)
        self.layout = layout
        self.pages = hnd_copy(self.kv) if layout == "HND" else self.kv
        self.q = randn(len(lens) * q_len, hq, d, dtype=dtype)

    def plan(self, wrapper, **kw):
        """wrapper.plan() of these lists (q_len_per_req = q_len where q_len > 1, unless given)."""
        if self.q_len != 1:
            kw.setdefault("q_len_per_req", self.q_len)
        wrapper.plan(self.indptr, self.indices, self.last, self.hq, self.hkv, self.d, self.ps,
                     q_data_type=self.dtype, **kw)

    def reference(self, naive, **kw):
        """(out (B x N, Hq, D), lse (B x N, Hq)): each request's N query rows at its last N keys
        (varlen_ref aligns a request's rows bottom-right: row i at key L - N + i; the rows' mask is
        kw's causal / window_size)."""
        kp, vp = self.kv[:, 0], self.kv[:, 1]
        kv = [(R.gather_pages(kp, pages, n), R.gather_pages(vp, pages, n))
              for pages, n in zip(self.lists, self.lens)]
        cu_q = [b * self.q_len for b in range(len(self.lens) + 1)]
        out, lse, _ = R.varlen_ref(self.q, cu_q, kv, naive=naive, **kw)
        return out, lse.T

    def check(self, wrapper, cache=None, window_left=None, window_right=0, **ref_kw):
        """Runs the wrapper twice into NaN-poisoned out / lse; both bitwise equal and close to
        the reference, the cache unchanged. Where q_len > 1 the reference's rows see window_right
        keys past their own (plan()'s window_right: 0, causal, by default), and the second run
        passes run(q_len_per_req=q_len)."""
        cache = self.pages if cache is None else cache
        before = self.pages.clone()
        runs = []
        for i in range(2):
            out = nan_full(self.q.shape, self.q.dtype)
            lse = nan_full(self.q.shape[:2], torch.float32)
            more = {"q_len_per_req": self.q_len} if self.q_len > 1 and i == 1 else {}
            o, l = wrapper.run(self.q, cache, out=out, lse=lse, return_lse=True, window_left=window_left,
                               **more)
            assert o is out and l is lse
            runs.append((out, lse))
        torch.cuda.synchronize()
        if window_left is not None and window_left >= 0:
            ref_kw["window_size"] = (window_left, -1)
        if self.q_len > 1:  # the rows' right bound within the request
            ref_kw["window_size"] = (ref_kw.get("window_size", (-1, -1))[0], window_right)
        ref, lse_ref = self.reference(False, **ref_kw)
        naive, _ = self.reference(True, **ref_kw)
        R.assert_out_close("out", runs[0][0], ref, naive, factor=FACTOR)
        R.assert_lse_close("lse", runs[0][1], lse_ref)
        R.assert_bitwise_equal("out (second run)", runs[0][0], runs[1][0])
        R.assert_bitwise_equal("lse (second run)", runs[0][1], runs[1][1])
        assert torch.equal(self.pages, before), "run() wrote into the cache"


def long_among_short(rng, batch, long_len, n_long, short_len):
    lens = [short_len] * batch
    for i in rng.sample(range(batch), n_long):
        lens[i] = long_len
    return lens


def workspace():
    return torch.empty(64 << 20, dtype=torch.uint8, device=DEV)


def graph_wrapper(b):
    """A use_cuda_graph=True wrapper whose buffers fit batch b's page lists (8 spare page ids)."""
    batch, pages = len(b.lens), sum(-(-n // b.ps) for n in b.lens)
    return fastattn.BatchDecodeWithPagedKVCacheWrapper(
        workspace(), use_cuda_graph=True,
        paged_kv_indptr_buffer=torch.empty(batch + 1, dtype=torch.int32, device=DEV),
        paged_kv_indices_buffer=torch.empty(pages + 8, dtype=torch.int32, device=DEV),
        paged_kv_last_page_len_buffer=torch.empty(batch, dtype=torch.int32, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("page_size", [1, 16, 64, 256])
def test_ragged_pages(seed, dtype, page_size):
    """Two long requests among short ones and empty ones, GQA 4, d128: plan() splits."""
    lens = long_among_short(seed, 24, 20000, 2, 300)
    empty, one = seed.sample([i for i, n in enumerate(lens) if n == 300], 2)  # the long ones stay
    lens[empty], lens[one] = 0, 1
    b = Batch(seed, dtype, lens, page_size, 16, 4, 128)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    b.plan(w)
    counts = w.split_counts
    assert w.num_splits is None and counts is not None and counts.max() > 1, \
        f"a long-among-short batch planned {counts}"
    b.check(w)
    b.check(w, cache=(b.kv[:, 0], b.kv[:, 1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group,d", [(1, 64), (4, 128), (8, 128), (8, 256)])
def test_heads_and_dims(seed, dtype, group, d):
    """A ragged batch (plan() picks a split count per request) and a near-uniform one (the
    capacity heuristic, num_splits 0) at each GQA group and head_dim."""
    hkv = 2
    lens = long_among_short(seed, 40, 9000, 1, 100)
    b = Batch(seed, dtype, lens, 16, hkv * group, hkv, d)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    b.plan(w)
    assert w.split_counts is not None and w.split_counts.min() >= 1
    # plan() takes the head dim's rule (the plan's tail weight differs at 64 and 256)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    want = fastattn.decode_split_counts_for_lengths(lens, hkv, sms, head_dim=d)
    assert w.split_counts.tolist() == want.tolist()
    b.check(w)
    lens = [seed.randrange(3000, 3100) for _ in range(16)]
    b = Batch(seed, dtype, lens, 16, hkv * group, hkv, d)
    b.plan(w)
    assert w.num_splits == 0
    b.check(w)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("group,d", [(1, 64), (4, 128), (8, 128), (8, 256)])
def test_hnd_layout(seed, dtype, page_size, group, d):
    """kv_layout "HND" (pages (P, 2, Hkv, page_size, D), read in place as strided views): a
    ragged batch (a split count per request) and a near-uniform one (the capacity heuristic's
    head-pair / quad / group forms) at each GQA group and head_dim, both cache forms."""
    hkv = 2 if group > 1 else 16
    lens = long_among_short(seed, 24, 9000, 1, 200)
    lens[seed.choice([i for i, n in enumerate(lens) if n == 200])] = 0  # the long one stays
    b = Batch(seed, dtype, lens, page_size, hkv * group, hkv, d, layout="HND")
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace(), "HND")
    b.plan(w)
    assert w.split_counts is not None and w.split_counts.max() > 1
    b.check(w)
    b.check(w, cache=(b.pages[:, 0], b.pages[:, 1]))
    lens = [seed.randrange(3000, 3100) for _ in range(8 if group > 1 else 4)]
    b = Batch(seed, dtype, lens, page_size, hkv * group, hkv, d, layout="HND")
    b.plan(w)
    assert w.num_splits == 0
    b.check(w)


def check_sinks_run(w, b, sinks, **ref_kw):
    """Batch b's planned run(sinks=) on wrapper w into NaN-poisoned out / lse, and once without
    lse (bitwise the same out), against the reference (ref_kw: its mask) with one more logit per
    head and a zero value row; the cache unchanged. Returns (out, lse)."""
    out = nan_full(b.q.shape, b.q.dtype)
    lse = nan_full(b.q.shape[:2], torch.float32)
    before = b.kv.clone()
    w.run(b.q, b.kv, out=out, lse=lse, sinks=sinks)
    plain = w.run(b.q, b.kv, sinks=sinks)
    torch.cuda.synchronize()
    ref, ref_lse = b.reference(False, **ref_kw)
    naive, naive_lse = b.reference(True, **ref_kw)
    ref, ref_lse = R.fold_sinks(ref, ref_lse, sinks)
    naive, _ = R.fold_sinks(naive, naive_lse, sinks)
    naive = naive.to(b.q.dtype).to(torch.float64)  # an in-dtype computation stores its output in the dtype
    R.assert_out_close("out", out, ref, naive, factor=FACTOR)
    R.assert_lse_close("lse", lse, ref_lse.float())
    R.assert_bitwise_equal("out without lse", plain, out)
    assert torch.equal(b.kv, before), "run() wrote into the cache"
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("group,d", [(1, 64), (4, 128), (8, 256)])
def test_sinks(seed, dtype, group, d):
    """run(sinks=) (gpt-oss's attention sinks): a ragged batch with an empty request (a split
    count per request) and a near-uniform one (the capacity heuristic's forms), against the
    reference with one more logit per head and a zero value row; out / lse poisoned; without
    return_lse too (the wrapper's own LSE)."""
    hkv = 2 if group > 1 else 16
    hq = hkv * group
    sinks = torch.randn(hq, device=DEV) * 3
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    for lens in (long_among_short(seed, 24, 9000, 1, 200), [seed.randrange(3000, 3100) for _ in range(8)]):
        lens[seed.randrange(len(lens))] = 0
        b = Batch(seed, dtype, lens, 16, hq, hkv, d)
        b.plan(w)
        out, lse = check_sinks_run(w, b, sinks)
        empty = lens.index(0)
        assert not out[empty].float().any() and torch.allclose(lse[empty], sinks)


def test_sinks_in_a_cuda_graph(seed):
    """run(sinks=) captured with use_cuda_graph=True: each replay after a new plan() and new
    sinks written in place equals the eager call bitwise."""
    batch, hq, hkv, d, ps = 8, 32, 8, 128, 16
    lens = long_among_short(seed, batch, 20000, 1, 500)
    b = Batch(seed, torch.bfloat16, lens, ps, hq, hkv, d)
    w = graph_wrapper(b)
    b.plan(w)
    sinks = torch.randn(hq, device=DEV)
    out = torch.empty_like(b.q)
    lse = torch.empty(batch, hq, dtype=torch.float32, device=DEV)
    graph = warm_and_capture(lambda: w.run(b.q, b.kv, out=out, lse=lse, sinks=sinks))
    for _ in range(2):
        sinks.copy_(torch.randn(hq, device=DEV) * 4)
        out.fill_(float("nan"))
        graph.replay()
        eager_out, eager_lse = w.run(b.q, b.kv, return_lse=True, sinks=sinks.clone())
        torch.cuda.synchronize()
        R.assert_bitwise_equal("replay vs eager out", out, eager_out)
        R.assert_bitwise_equal("replay vs eager lse", lse, eager_lse)
        ref, ref_lse = R.fold_sinks(*b.reference(False), sinks)
        R.assert_lse_close("replay lse", lse, ref_lse.float())


def test_options(seed):
    """window_left (from plan() and from run()), logits_soft_cap and sm_scale."""
    lens = long_among_short(seed, 16, 12000, 2, 700)
    b = Batch(seed, torch.bfloat16, lens, 16, 8, 2, 128)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    b.plan(w, window_left=500, logits_soft_cap=20.0, sm_scale=0.07)
    b.check(w, window_size=(500, -1), softcap=20.0, softmax_scale=0.07)
    b.check(w, window_left=3000, softcap=20.0, softmax_scale=0.07)
    b.check(w, window_left=-1, softcap=20.0, softmax_scale=0.07)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_calibration_scales(seed, dtype):
    """run(q_scale=, k_scale=, v_scale=): the scores scaled by sm_scale * q_scale * k_scale before
    the soft cap, out by v_scale; on a ragged batch (a split count per request) into poisoned out /
    lse; k_scale = v_scale = 1.0 (vLLM's call) the same bits as none; captured with
    use_cuda_graph=True (the v_scale multiply inside the graph), each replay equal to the eager
    call bitwise; a scale given as a GPU tensor refused before anything is written."""
    hq, hkv, d, ps, softcap = 32, 8, 128, 16, 30.0
    lens = long_among_short(seed, 12, 20000, 2, 300)
    lens[seed.randrange(len(lens))] = 0
    b = Batch(seed, dtype, lens, ps, hq, hkv, d)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    b.plan(w, logits_soft_cap=softcap)
    qs, ks, vs = (seed.uniform(0.3, 2.5) for _ in range(3))
    out = nan_full(b.q.shape, b.q.dtype)
    lse = nan_full(b.q.shape[:2], torch.float32)
    before = b.pages.clone()
    w.run(b.q, b.pages, out=out, lse=lse, q_scale=qs, k_scale=ks, v_scale=vs)
    torch.cuda.synchronize()
    ref_kw = dict(softcap=softcap, softmax_scale=d ** -0.5 * qs * ks)

    def scaled_reference():
        """(out * v_scale, its naive in-dtype form, lse) of b's current q."""
        ref, lse_ref = b.reference(False, **ref_kw)
        naive, _ = b.reference(True, **ref_kw)
        naive = (naive.to(dtype) * vs).to(dtype).to(torch.float64)  # stored in the dtype, then scaled
        return ref * vs, naive, lse_ref

    ref, naive, lse_ref = scaled_reference()
    R.assert_out_close("out", out, ref, naive, factor=FACTOR)
    R.assert_lse_close("lse", lse, lse_ref)
    assert torch.equal(b.pages, before), "run() wrote into the cache"
    plain = w.run(b.q, b.pages)
    R.assert_bitwise_equal("k_scale = v_scale = 1.0", w.run(b.q, b.pages, k_scale=1.0, v_scale=1.0), plain)
    out.fill_(float("nan"))
    with pytest.raises(TypeError, match="k_scale must be a number on the host .*, got an array on a GPU"):
        w.run(b.q, b.pages, out=out, k_scale=torch.ones((), device=DEV))
    assert out.isnan().all(), "a refused run() wrote its output"

    g = graph_wrapper(b)
    b.plan(g, logits_soft_cap=softcap)
    graph_out = torch.empty_like(b.q)
    graph = warm_and_capture(lambda: g.run(b.q, b.pages, out=graph_out, q_scale=qs, k_scale=ks, v_scale=vs))
    for _ in range(2):
        b.q.copy_(randn(*b.q.shape, dtype=dtype))
        graph_out.fill_(float("nan"))
        graph.replay()
        eager = g.run(b.q, b.pages, q_scale=qs, k_scale=ks, v_scale=vs)  # the same plan, not captured
        torch.cuda.synchronize()
        R.assert_bitwise_equal("replay vs eager", graph_out, eager)
        ref, naive, _ = scaled_reference()
        R.assert_out_close("replay", graph_out, ref, naive, factor=FACTOR)


def test_small_workspace_and_disable_split(seed):
    """A workspace too small for the split states: scratch comes from torch's allocator, the
    result is the same. disable_split_kv plans one split."""
    lens = long_among_short(seed, 8, 30000, 1, 64)
    b = Batch(seed, torch.float16, lens, 16, 32, 8, 128)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256, dtype=torch.uint8, device=DEV))
    b.plan(w)
    assert w.split_counts.max() > 1
    b.check(w)
    b.plan(w, disable_split_kv=True)
    assert w.num_splits == 1 and w.split_counts is None
    b.check(w)


def fixed_counts(lens, page_size, size, window_left=-1, q_len=1):
    """FlashInfer's fixed_split_size counts, written out: ceil(max(1, pages) / size), the pages
    of a request's attended keys, min(length, window_left + q_len) with a window."""
    attended = [n if window_left < 0 else min(n, window_left + q_len) for n in lens]
    return [-(-max(1, -(-n // page_size)) // size) for n in attended]


@pytest.mark.parametrize("page_size,hq,hkv,d,dtype", [(16, 32, 8, 128, torch.bfloat16),
                                                      (1, 8, 8, 64, torch.float16)])
def test_fixed_split_size_is_batch_invariant(seed, page_size, hq, hkv, d, dtype):
    """fixed_split_size (FlashInfer's batch-invariant splits): four requests (a long one, a short
    one, one key, none) give bitwise the same out and LSE decoded alone, in a batch of 9 and in
    one of 40 (whose combine grid is past the preloading kernel's) at shuffled places, and match
    the float64 reference; each is cut into ceil(max(1, pages) / fixed_split_size) parts."""
    check_fixed_split_batch_invariance(seed, page_size, hq, hkv, d, dtype, q_len=1, window_left=-1)


def check_fixed_split_batch_invariance(rng, page_size, hq, hkv, d, dtype, q_len, window_left):
    """The batch-invariance tests of fixed_split_size (64 pages), at q_len rows per request: four
    requests (20000 keys, 3000, and the two shortest a request may have: 1 and 0 keys for one row,
    q_len and q_len + 1 for more) among 36 random ones, decoded alone, in a batch of 9 and in one
    of 40 at shuffled places: bitwise the same rows, the counts ceil(max(1, attended pages) / 64)
    (attended keys min(length, window_left + q_len) with a window), the batch of 40 against the
    float64 reference (rows causal within a request), the cache unchanged."""
    fixed, n = 64, q_len
    targets = [20000, 3000, 1, 0] if n == 1 else [20000, 3000, n, n + 1]
    lens = targets + [rng.randrange(0 if n == 1 else n, 12000) for _ in range(36)]
    lists, _, _, _, num_pages = P.make_csr(rng, lens, page_size)
    kv = randn(num_pages, 2, page_size, hkv, d, dtype=dtype)
    before = kv.clone()
    q = randn(len(lens), n, hq, d, dtype=dtype)  # request b's n rows

    def decode(order):
        """out (B, n, Hq, D) and LSE (B, n, Hq) of the requests `order` (indices into lens), in that
        order."""
        sub = [lists[i] for i in order]
        last = [lens[i] - (len(pages) - 1) * page_size if pages else 0 for i, pages in zip(order, sub)]
        w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
        w.plan(i32(cumsum0([len(pages) for pages in sub])), i32([x for pages in sub for x in pages]),
               i32(last), hq, hkv, d, page_size, q_data_type=dtype, window_left=window_left,
               fixed_split_size=fixed, q_len_per_req=n)
        assert w.split_counts.tolist() == fixed_counts([lens[i] for i in order], page_size, fixed,
                                                       window_left, n)
        out = nan_full((len(order) * n, hq, d), dtype)
        lse = nan_full((len(order) * n, hq), torch.float32)
        w.run(q[list(order)].reshape(-1, hq, d), kv, out=out, lse=lse, return_lse=True)
        return out.view(len(order), n, hq, d), lse.view(len(order), n, hq)

    batch9 = list(range(4)) + rng.sample(range(4, len(lens)), 5)
    rng.shuffle(batch9)
    batch40 = list(range(len(lens)))
    rng.shuffle(batch40)
    out40, lse40 = decode(batch40)
    out9, lse9 = decode(batch9)
    for t in range(4):
        out1, lse1 = decode([t])
        for name, (o, l, at) in {"9": (out9, lse9, batch9.index(t)),
                                 "40": (out40, lse40, batch40.index(t))}.items():
            R.assert_bitwise_equal(f"request {t} ({lens[t]} keys) out, alone vs batch of {name}", out1[0], o[at])
            R.assert_bitwise_equal(f"request {t} ({lens[t]} keys) lse, alone vs batch of {name}", lse1[0], l[at])
    torch.cuda.synchronize()
    ref_kv = [(R.gather_pages(kv[:, 0], lists[i], lens[i]), R.gather_pages(kv[:, 1], lists[i], lens[i]))
              for i in batch40]
    cu = [b * n for b in range(len(lens) + 1)]
    q40 = q[batch40].reshape(-1, hq, d)
    mask = (window_left, 0)  # causal rows (one row: its request's keys), and the window
    ref, lse_ref, _ = R.varlen_ref(q40, cu, ref_kv, window_size=mask)
    naive, _, _ = R.varlen_ref(q40, cu, ref_kv, window_size=mask, naive=True)
    R.assert_out_close("batch of 40, out", out40.reshape(-1, hq, d), ref, naive, factor=FACTOR)
    R.assert_lse_close("batch of 40, lse", lse40.reshape(-1, hq), lse_ref.T)
    assert max(fixed_counts(lens, page_size, fixed, window_left, n)) > 1
    assert torch.equal(kv, before), "run() wrote into the cache"


def test_unusable_workspaces(seed):
    """A workspace the kernels cannot use as scratch (not uint8, or not contiguous), however
    large: eager, scratch comes from torch's allocator and the result is the same; with
    use_cuda_graph=True, an error naming its dtype and size."""
    lens = long_among_short(seed, 8, 30000, 1, 64)
    b = Batch(seed, torch.bfloat16, lens, 16, 32, 8, 128)
    for ws in (torch.empty(1 << 22, dtype=torch.float32, device=DEV),
               torch.empty(1 << 22, dtype=torch.float64, device=DEV),
               torch.empty((1 << 22, 2), dtype=torch.uint8, device=DEV)[:, 0]):
        w = fastattn.BatchDecodeWithPagedKVCacheWrapper(ws)
        b.plan(w)
        assert w.split_counts.max() > 1
        b.check(w)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(1 << 20, dtype=torch.float32, device=DEV), use_cuda_graph=True,
        paged_kv_indptr_buffer=torch.zeros(9, dtype=torch.int32, device=DEV),
        paged_kv_indices_buffer=torch.zeros(4096, dtype=torch.int32, device=DEV),
        paged_kv_last_page_len_buffer=torch.zeros(8, dtype=torch.int32, device=DEV))
    b.plan(w)
    with pytest.raises(ValueError, match="at least [0-9]+ bytes with use_cuda_graph=True, got float32 "
                                         "of 4194304 bytes"):
        w.run(b.q, b.kv)

def test_page_lists_in_any_form(seed):
    """plan() reads int32 lists on the workspace's GPU in place, and copies any other form: the
    lists inside larger arrays (indptr from an offset, ids around them that are no page), int64
    lists on the GPU, and lists on the host. Every form gives the reference's answer and the same
    bits as the plain lists; the caller's arrays are left as they were."""
    lens = long_among_short(seed, 12, 15000, 1, 400)
    lens[seed.choice([i for i, n in enumerate(lens) if n == 400])] = 0  # the long one stays
    b = Batch(seed, torch.bfloat16, lens, 16, 16, 4, 128)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    b.plan(w)
    assert w.split_counts is not None
    b.check(w)
    want = w.run(b.q, b.kv)
    before, after = seed.randrange(1, 9), seed.randrange(1, 9)
    junk = lambda n: [-(10 ** 6) - i for i in range(n)]  # noqa: E731  (ids no list may read)
    offset_ids = i32(junk(before) + b.indices.tolist() + junk(after))
    offset_ptr = i32([before + x for x in b.indptr.tolist()])
    forms = {
        "offset": (offset_ptr, offset_ids, b.last),
        "int64": (b.indptr.long(), b.indices.long(), b.last.long()),
        "host": (b.indptr.cpu(), b.indices.cpu(), b.last.cpu()),
        "offset int64": (offset_ptr.long(), offset_ids.long(), b.last),
    }
    for name, (indptr, indices, last) in forms.items():
        kept = [x.clone() for x in (indptr, indices, last)]
        w.plan(indptr, indices, last, b.hq, b.hkv, b.d, b.ps, q_data_type=b.dtype)
        got = w.run(b.q, b.kv)
        R.assert_bitwise_equal(f"out ({name} lists)", got, want)
        for x, y in zip((indptr, indices, last), kept):
            assert torch.equal(x, y), f"plan() wrote into the caller's {name} lists"


def test_plan_reads_lists_written_by_queued_work(seed):
    """plan() reads indptr and last_page_len on the host only after the work queued before it on
    the stream: here they get this step's values from copies queued behind a GPU sleep, and the
    plan must be made from those values, not from the zeros the copies overwrite."""
    lens = long_among_short(seed, 10, 12000, 1, 300)
    b = Batch(seed, torch.bfloat16, lens, 16, 8, 2, 128)
    indptr = torch.zeros_like(b.indptr)  # 0 pages each: plan() over these would plan no keys
    last = torch.ones_like(b.last)
    torch.cuda._sleep(50_000_000)  # tens of ms on the stream before the copies land
    indptr.copy_(b.indptr)
    last.copy_(b.last)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    w.plan(indptr, b.indices, last, b.hq, b.hkv, b.d, b.ps, q_data_type=b.dtype)
    assert w.split_counts is not None and w.split_counts.max() > 1, w.split_counts
    b.check(w)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_plan_with_host_lists_does_not_wait_for_the_gpu(seed, graph):
    """With the page lists on the host (numpy, as engines keep them), plan() queues its uploads and
    returns while the GPU still runs the work queued before it: here a GPU sleep of ~0.1 s is still
    running when plan() returns. The host arrays are overwritten at once, before the uploads have
    run (they read the library's pinned copies), and run() still gives the reference's answer."""
    lens = long_among_short(seed, 10, 12000, 1, 300)
    b = Batch(seed, torch.bfloat16, lens, 16, 8, 2, 128)
    host = [x.cpu().numpy().copy() for x in (b.indptr, b.indices, b.last)]
    if graph:
        w = fastattn.BatchDecodeWithPagedKVCacheWrapper(
            workspace(), use_cuda_graph=True, paged_kv_indptr_buffer=torch.empty_like(b.indptr),
            paged_kv_indices_buffer=torch.empty_like(b.indices),
            paged_kv_last_page_len_buffer=torch.empty_like(b.last))
    else:
        w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    w.plan(*host, b.hq, b.hkv, b.d, b.ps, q_data_type=b.dtype)
    still_running = not torch.cuda.current_stream().query()
    for x in host:
        x.fill(-7)
    assert still_running, "plan() waited for the work queued on the stream"
    assert w.split_counts is not None and w.split_counts.max() > 1, w.split_counts
    b.check(w)


def test_host_copies_past_the_staging_pool(seed):
    """fastattn::copy_host_to_device behind a GPU sleep: more copies than the pinned pool keeps
    (64) before any has run, of 0 to 3 MB, each from a host array overwritten right
    after the call. Every destination gets its own bytes; the pool waits for a block past its
    size instead of reusing one a copy still reads."""
    from fastattn import _C
    from fastattn._tensors import exec_kwargs
    sizes = [seed.choice([0, 1, 7, 1000, 5000, 70000]) for _ in range(80)] + [(3 << 20) // 4]
    want = [torch.randint(-(2 ** 31), 2 ** 31 - 1, (n,), dtype=torch.int32) for n in sizes]
    dsts = [torch.full((n,), 99, dtype=torch.int32, device=DEV) for n in sizes]
    torch.cuda.synchronize()
    torch.cuda._sleep(20_000_000)
    for x, dst in zip(want, dsts):
        host = x.numpy().copy()
        _C.copy_host_to_device(host, dst, **exec_kwargs(dst))
        host.fill(-7)
    torch.cuda.synchronize()
    for i, (x, dst) in enumerate(zip(want, dsts)):
        assert torch.equal(dst.cpu(), x), f"copy {i} of {sizes[i]} values"


def test_host_copy_refused_in_a_capture():
    """A copy of host bytes cannot be captured (each replay would read a staging block reused
    since): inside a capture it is an error naming the stream, and the capture goes on."""
    from fastattn import _C
    from fastattn._tensors import exec_kwargs
    src = torch.arange(8, dtype=torch.int32).numpy()
    dst = torch.zeros(8, dtype=torch.int32, device=DEV)
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(g):
            with pytest.raises(ValueError, match="exec.cuda_stream is being captured into a CUDA graph"):
                _C.copy_host_to_device(src, dst, **exec_kwargs(dst))
            dst.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    g.replay()
    torch.cuda.synchronize()
    assert dst.tolist() == [1] * 8
    _C.copy_host_to_device(src, dst, **exec_kwargs(dst))
    torch.cuda.synchronize()
    assert dst.tolist() == list(range(8))


def test_calls_go_on_the_current_stream():
    """exec_kwargs (every op's cuda_stream) is torch's current stream, the default one and a side
    stream alike."""
    from fastattn._tensors import exec_kwargs
    x = torch.empty(4, device=DEV)
    assert exec_kwargs(x)["cuda_stream"] == torch.cuda.current_stream().cuda_stream
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert exec_kwargs(x)["cuda_stream"] == side.cuda_stream
    assert exec_kwargs(x)["cuda_stream"] == torch.cuda.current_stream().cuda_stream


def test_cpu_workspace_with_gpu_q(seed):
    """plan() places its arrays on the workspace's device; q on another is a clear error."""
    b = Batch(seed, torch.bfloat16, [5, 9], 16, 4, 2, 64)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(torch.empty(16, dtype=torch.uint8))
    b.plan(w)
    with pytest.raises(ValueError, match="q must be on the device of the workspace buffer"):
        w.run(b.q, b.kv)


# ---- use_cuda_graph=True: one captured run() replayed over steps of new lengths and pages -------


def graph_step_lengths(rng, kind, batch):
    """A step's key lengths: ragged with long requests, near-uniform, or with empty requests."""
    if kind == "long_among_short":
        lens = long_among_short(rng, batch, rng.randrange(12000, 30000), 2, rng.randrange(50, 900))
    elif kind == "uniform":
        base = rng.randrange(1000, 5000)
        lens = [base + rng.randrange(0, 64) for _ in range(batch)]
    elif kind == "empty":
        lens = [0] * batch
    else:  # "ragged": any lengths, an empty and a one-key request among them
        lens = [rng.randrange(0, 6000) for _ in range(batch)]
        lens[rng.randrange(batch)], lens[rng.randrange(batch)] = 0, 1
    return lens


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("page_size,hq,hkv,d", [(16, 32, 8, 128), (1, 8, 8, 64), (64, 16, 2, 256)])
def test_graph_mode_replays(seed, dtype, page_size, hq, hkv, d):
    """run() captured once after the first plan(); every later step writes new lengths, new
    pages (a fresh random placement in the pool) and a new q, plans, and replays the graph into
    NaN-poisoned out / lse. Each replay matches the step's reference and equals an eager run() of
    the same plan bitwise; the indices buffer past the most pages a step used and the cache are
    unchanged. The page lists are CUDA tensors (the ids copied device to device)."""
    graph_steps(seed, dtype, page_size, hq, hkv, d, lists_on=DEV)


def test_graph_mode_host_page_lists(seed):
    """The same with the page lists as CPU tensors (vLLM's way): the ids go through the host."""
    graph_steps(seed, torch.bfloat16, 16, 32, 8, 128, lists_on="cpu")


@pytest.mark.parametrize("page_size,hq,hkv,d", [(16, 32, 8, 128), (1, 8, 8, 64)])
def test_graph_mode_hnd_layout(seed, page_size, hq, hkv, d):
    """The same replays over pages in the HND layout."""
    graph_steps(seed, torch.bfloat16, page_size, hq, hkv, d, lists_on=DEV, layout="HND")


def test_graph_mode_fixed_split_size(seed):
    """The same replays with fixed_split_size: each step's counts are FlashInfer's fixed ones."""
    graph_steps(seed, torch.bfloat16, 16, 32, 8, 128, lists_on=DEV, fixed_split_size=256)


def graph_steps(seed, dtype, page_size, hq, hkv, d, lists_on, layout="NHD", fixed_split_size=None,
                q_len=1):
    """The steps of the graph-mode tests. q_len > 1: q_len_per_req query rows per request (q, out
    and lse of batch x q_len rows, causal within each request), every step's lengths at least
    q_len (no empty step), and a plan of another q_len refused after the steps."""
    batch = 12
    max_pages = sum(-(-n // page_size) for n in [30000] * 2 + [6000] * (batch - 2))
    pool = max_pages + 7
    kv = randn(pool, 2, page_size, hkv, d, dtype=dtype)  # the reference's NHD pages
    pages = hnd_copy(kv) if layout == "HND" else kv  # what the wrapper reads
    kv_before = pages.clone()
    sentinel = -12345
    ip_buf = torch.full((batch + 1,), sentinel, dtype=torch.int32, device=DEV)
    idx_buf = torch.full((max_pages + 5,), sentinel, dtype=torch.int32, device=DEV)
    last_buf = torch.full((batch,), sentinel, dtype=torch.int32, device=DEV)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(
        workspace(), layout, use_cuda_graph=True, paged_kv_indptr_buffer=ip_buf,
        paged_kv_indices_buffer=idx_buf, paged_kv_last_page_len_buffer=last_buf)
    rows = batch * q_len
    q = torch.empty(rows, hq, d, dtype=dtype, device=DEV)
    out = torch.empty(rows, hq, d, dtype=dtype, device=DEV)
    lse = torch.empty(rows, hq, dtype=torch.float32, device=DEV)
    graph = None
    kinds = ["long_among_short", "uniform", "ragged", "empty", "long_among_short", "ragged"]
    multi = {}
    if q_len > 1:  # every request holds its rows' keys: no empty step
        kinds = [k for k in kinds if k != "empty"]
        multi = {"q_len_per_req": q_len}
    split_seen, written = False, 0
    for step, kind in enumerate(kinds):
        lens = graph_step_lengths(seed, kind, batch)
        if q_len > 1:
            lens = [max(n, q_len) for n in lens]  # the ragged steps' 0 and 1 become exactly q_len
        used = sum(-(-n // page_size) for n in lens)  # a fresh placement over the whole pool
        lists, indptr, indices, last, _ = P.make_csr(seed, lens, page_size, extra_pages=pool - used)
        w.plan(*(i32(x).to(lists_on) for x in (indptr, indices, last)), hq, hkv, d, page_size,
               q_data_type=dtype, fixed_split_size=fixed_split_size, **multi)
        counts = w.split_counts
        if fixed_split_size is not None:
            assert counts.tolist() == fixed_counts(lens, page_size, fixed_split_size)
        assert counts is not None and counts.sum() <= fastattn.decode_graph_plan_items(
            batch, hkv, torch.cuda.get_device_properties(0).multi_processor_count)
        split_seen |= bool(counts.max() > 1)
        q.copy_(torch.randn_like(q))
        if graph is None:
            graph = warm_and_capture(lambda: w.run(q, pages, out=out, lse=lse, return_lse=True))
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        written = max(written, len(indices))
        assert idx_buf[written:].eq(sentinel).all(), "plan() wrote past the steps' pages"
        eager_out, eager_lse = w.run(q.clone(), pages, return_lse=True)
        torch.cuda.synchronize()
        ref_kv = [(R.gather_pages(kv[:, 0], pages, n), R.gather_pages(kv[:, 1], pages, n))
                  for pages, n in zip(lists, lens)]
        cu = [b * q_len for b in range(batch + 1)]
        mask = {"window_size": (-1, 0)} if q_len > 1 else {}  # causal within a request's rows
        ref, lse_ref, _ = R.varlen_ref(q, cu, ref_kv, **mask)
        naive, _, _ = R.varlen_ref(q, cu, ref_kv, naive=True, **mask)
        R.assert_out_close(f"step {step} ({kind}) out", out, ref, naive, factor=FACTOR)
        R.assert_lse_close(f"step {step} ({kind}) lse", lse, lse_ref.T)
        R.assert_bitwise_equal(f"step {step} replay vs eager out", out, eager_out)
        R.assert_bitwise_equal(f"step {step} replay vs eager lse", lse, eager_lse)
    assert split_seen, "no step split a sequence"
    assert torch.equal(pages, kv_before), "a replay wrote into the cache"
    if q_len > 1:  # the captured q holds batch x q_len rows: the N of the first plan stays
        with pytest.raises(ValueError, match="q_len_per_req must stay"):
            w.plan(*(i32(x).to(lists_on) for x in (indptr, indices, last)), hq, hkv, d, page_size,
                   q_data_type=dtype, fixed_split_size=fixed_split_size, q_len_per_req=q_len + 1)


def test_graph_mode_workspace_too_small(seed):
    """A captured call must not allocate: with use_cuda_graph=True a workspace too small for the
    plan's partial states is an error naming it, before any launch."""
    b = Batch(seed, torch.bfloat16, long_among_short(seed, 8, 20000, 1, 100), 16, 32, 8, 128)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(1024, dtype=torch.uint8, device=DEV), use_cuda_graph=True,
        paged_kv_indptr_buffer=torch.zeros(9, dtype=torch.int32, device=DEV),
        paged_kv_indices_buffer=torch.zeros(4096, dtype=torch.int32, device=DEV),
        paged_kv_last_page_len_buffer=torch.zeros(8, dtype=torch.int32, device=DEV))
    b.plan(w)
    with pytest.raises(ValueError, match="float_workspace_buffer must be a contiguous uint8 array on "
                                         "q's device of at least [0-9]+ bytes with use_cuda_graph=True, "
                                         "got uint8 of 1024 bytes"):
        w.run(b.q, b.kv)


def test_padded_plan_equals_unpadded(seed):
    """flash_attn_with_kvcache with a split plan padded by -1 items (a CUDA graph's fixed size)
    gives bitwise the unpadded plan's results: the padding CTAs do nothing."""
    lens = long_among_short(seed, 10, 25000, 2, 300)
    lens[3] = 0
    b = Batch(seed, torch.bfloat16, lens, 16, 32, 8, 128)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    b.plan(w)
    counts = w.split_counts
    width = max(len(pages) for pages in b.lists)
    table = torch.tensor([pages + [0] * (width - len(pages)) for pages in b.lists],
                         dtype=torch.int32, device=DEV)
    results = []
    for items in (None, int(counts.sum()) + 1, int(counts.sum()) + 300):
        plan = torch.from_numpy(fastattn.decode_split_plan(counts, lens, items=items)).to(DEV)
        out = nan_full(b.q.shape, b.q.dtype)
        fastattn.flash_attn_with_kvcache(b.q[:, None], b.kv[:, 0], b.kv[:, 1],
                                         cache_seqlens=i32(lens), block_table=table,
                                         split_plan=plan, out=out[:, None])
        results.append(out)
    torch.cuda.synchronize()
    ref, _ = b.reference(False)
    naive, _ = b.reference(True)
    R.assert_out_close("unpadded", results[0], ref, naive, factor=FACTOR)
    for r in results[1:]:
        R.assert_bitwise_equal("padded vs unpadded", r, results[0])


def table_of_lists(indptr, indices, rows, width):
    """The documented csr_to_block_table on a GPU, written out: row b's span clamped into
    [0, nnz], cut at width columns, then zeros."""
    nnz, table = len(indices), []
    for b in range(rows):
        i0 = min(max(indptr[b], 0), nnz)
        i1 = min(max(indptr[b + 1], i0), nnz)
        n = min(i1 - i0, width)
        table.append(list(indices[i0:i0 + n]) + [0] * (width - n))
    return table


def test_csr_to_block_table_on_the_gpu(seed):
    """fastattn._C.csr_to_block_table on CUDA tensors: random lists (empty rows, indptr from an
    offset) into a NaN-like poisoned table whose rows are padded (the padding untouched), and lists
    out of range (decreasing, past nnz, longer than the table), clamped as documented."""
    for trial in range(30):
        rows = seed.randint(1, 40)
        counts = [0 if seed.random() < 0.2 else seed.randint(1, 300) for _ in range(rows)]
        indptr = [seed.randint(0, 5)]
        for n in counts:
            indptr.append(indptr[-1] + n)
        indices = [seed.randrange(1 << 30) for _ in range(indptr[-1] + seed.randint(0, 3))]
        width = max(counts) + seed.randint(0, 3)
        if trial >= 20:  # out of range: the kernel's clamps
            width = max(1, width // 2)
            for _ in range(3):
                indptr[seed.randrange(rows + 1)] = seed.randint(-5, len(indices) + 50)
        wide = torch.full((rows, width + 3), -7, dtype=torch.int32, device=DEV)
        table = wide[:, :width]
        fastattn._C.csr_to_block_table(page_indptr=i32(indptr), page_indices=i32(indices),
                                       block_table=table,
                                       cuda_stream=torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert table.tolist() == table_of_lists(indptr, indices, rows, width), f"trial {trial}"
        assert (wide[:, width:] == -7).all(), "wrote into the table's row padding"


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_page_id_outside_the_cache(seed, graph):
    """With the page ids on the GPU, plan() does not read them (eager, or with use_cuda_graph=True
    and a replay): an id outside the cache is no error there, and the run reads that page's keys
    and values as zeros (flash_attn_with_kvcache's guard), the other requests unaffected."""
    ps, hq, hkv, d = 16, 8, 2, 128
    lens = [40, 100, 0, 70]
    lists, indptr, _, last, pool = P.make_csr(seed, lens, ps, extra_pages=2)
    kv = randn(pool, 2, ps, hkv, d, dtype=torch.bfloat16)
    bad = pool + 3
    lists[1][2] = bad  # the third page of request 1
    q = randn(len(lens), hq, d, dtype=torch.bfloat16)
    out = nan_full(q.shape, q.dtype)
    buffers = {}
    if graph:
        buffers = dict(
            use_cuda_graph=True,
            paged_kv_indptr_buffer=torch.empty(len(lens) + 1, dtype=torch.int32, device=DEV),
            paged_kv_indices_buffer=torch.empty(indptr[-1], dtype=torch.int32, device=DEV),
            paged_kv_last_page_len_buffer=torch.empty(len(lens), dtype=torch.int32, device=DEV))
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace(), **buffers)
    w.plan(i32(indptr), i32([p for pages in lists for p in pages]), i32(last), hq, hkv, d, ps,
           q_data_type=torch.bfloat16)
    if graph:
        captured = warm_and_capture(lambda: w.run(q, kv, out=out))
        out.fill_(float("nan"))
        captured.replay()
    else:
        w.run(q, kv, out=out)
    torch.cuda.synchronize()
    zeros = torch.zeros(1, 2, ps, hkv, d, dtype=kv.dtype, device=DEV)
    kv_ext = torch.cat([kv, zeros])  # page `pool` of kv_ext is the zero page
    mapped = [[pool if p == bad else p for p in pages] for pages in lists]
    ref_kv = [(R.gather_pages(kv_ext[:, 0], pages, n), R.gather_pages(kv_ext[:, 1], pages, n))
              for pages, n in zip(mapped, lens)]
    cu = list(range(len(lens) + 1))
    ref, _, _ = R.varlen_ref(q, cu, ref_kv)
    naive, _, _ = R.varlen_ref(q, cu, ref_kv, naive=True)
    R.assert_out_close("out", out, ref, naive, factor=FACTOR)


# ---- q_len_per_req > 1: several query rows per request (speculative decoding) ------------------
# q is (B x N, Hq, D), request b's rows b x N .. b x N + N - 1; row i of a request of L keys sits at
# key L - N + i and sees keys j with pos - window_left <= j <= pos + window_right (window_right 0 by
# default: causal within the request's rows; -1 no bound). The references are varlen_ref's with N
# query rows per request, which it aligns bottom-right the same way.


def multi_row_lengths(rng, batch, q_len, long_len, n_long, short_max=600):
    """A ragged batch for q_len rows per request: n_long requests of about long_len keys among
    short ones of q_len..short_max keys, one of exactly q_len keys (its first row sees one key)."""
    lens = [rng.randrange(q_len, short_max) for _ in range(batch)]
    longs = rng.sample(range(batch), n_long)
    for i in longs:
        lens[i] = long_len + rng.randrange(64)
    lens[rng.choice([i for i in range(batch) if i not in longs])] = q_len
    return lens


def weighed_kv_heads(hq, hkv, q_len, d, longest_slots, batch, sms):
    """The KV heads plan()'s split rules weigh (include/fastattn/decode_plan.h): each KV head's
    group x q_len query rows take one CTA of the decode kernels up to 16 rows, one for 17-32 where
    the longest request's pages hold >= 4096 slots at head_dim <= 128, or >= 1024 where batch x hkv
    CTAs are 1.2 waves of the SMs (the row pair, DecodeSplitRule::row_pair_min_keys,
    row_pair_wave_min_keys and row_pair_min_waves), else one per 16 rows."""
    rows = (hq // hkv) * q_len
    waves = batch * hkv >= 1.2 * sms
    if rows <= 32 and d <= 128 and (longest_slots >= 4096 or (waves and longest_slots >= 1024)):
        return hkv
    return hkv * -(-rows // 16)


MULTI_ROW_CONFIGS = [  # page_size, hq, hkv, d, layout
    (16, 32, 8, 128, "NHD"),  # GQA 4: 4 x N rows a KV head, one CTA up to N = 4
    (1, 8, 8, 64, "HND"),  # MHA: N rows a KV head
    (64, 16, 2, 256, "NHD"),  # GQA 8: 8 x N rows a KV head, several CTAs from N = 4
    (16, 8, 1, 256, "HND"),  # MQA of 8 query heads
]
MULTI_ROW_IDS = ["ps16-32x8-d128-nhd", "ps1-8x8-d64-hnd", "ps64-16x2-d256-nhd", "ps16-8x1-d256-hnd"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("q_len", [2, 4, 7, 16])
@pytest.mark.parametrize("page_size,hq,hkv,d,layout", MULTI_ROW_CONFIGS, ids=MULTI_ROW_IDS)
def test_multi_row_ragged(seed, dtype, q_len, page_size, hq, hkv, d, layout):
    """q_len_per_req = N: two long requests among short ones and one of exactly N keys (plan()
    picks a split count per request, from the KV heads weighed by the CTAs of their N rows), then
    a near-uniform batch (the capacity heuristic), at each GQA group, head_dim, page size and
    layout; out (B x N, Hq, D) and lse (B x N, Hq) poisoned, both cache forms at N = 4. A request
    of fewer than N keys is refused by plan()."""
    lens = multi_row_lengths(seed, 24, q_len, 20000, 2)
    b = Batch(seed, dtype, lens, page_size, hq, hkv, d, layout=layout, q_len=q_len)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace(), layout)
    b.plan(w, o_data_type=dtype)
    counts = w.split_counts
    assert w.num_splits is None and counts is not None and counts.max() > 1, \
        f"a long-among-short batch at q_len_per_req={q_len} planned {counts}"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    longest_slots = -(-max(lens) // page_size) * page_size
    heads = weighed_kv_heads(hq, hkv, q_len, d, longest_slots, len(lens), sms)
    want = fastattn.decode_split_counts_for_lengths(lens, heads, sms, head_dim=d)
    assert want is not None and counts.tolist() == want.tolist()
    b.check(w)
    if q_len == 4:
        b.check(w, cache=(b.pages[:, 0], b.pages[:, 1]))
    lens = [seed.randrange(3000, 3100) for _ in range(8)]
    u = Batch(seed, dtype, lens, page_size, hq, hkv, d, layout=layout, q_len=q_len)
    u.plan(w)
    assert w.num_splits == 0
    u.check(w)
    short = list(b.lens)
    short[short.index(q_len)] = q_len - 1
    _, indptr, indices, last, _ = P.make_csr(seed, short, page_size)
    with pytest.raises(ValueError, match=f"has {q_len - 1} keys, fewer than its q_len = {q_len}"):
        fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace(), layout).plan(
            i32(indptr), i32(indices), i32(last), hq, hkv, d, page_size, q_data_type=dtype,
            q_len_per_req=q_len)


MULTI_OPTION_CASES = [(3, 8, 2, 128, torch.bfloat16), (16, 16, 2, 64, torch.float16)]


@pytest.mark.parametrize("window_right", [0, 3, -1], ids=["right0", "right3", "right_all"])
@pytest.mark.parametrize("q_len,hq,hkv,d,dtype", MULTI_OPTION_CASES,
                         ids=["n3-8x2-d128-bf16", "n16-16x2-d64-fp16"])
def test_multi_row_options(seed, window_right, q_len, hq, hkv, d, dtype):
    """q_len_per_req > 1 with plan()'s window_right (0: causal within the rows; 3; -1: no bound),
    window_left from plan() and from run() (3000, 0: a row's own key and window_right after it,
    5, -1), logits_soft_cap and sm_scale; then a plan of window_left 5 (below N = 16: the
    attended keys min(length, window_left + N) set the splits)."""
    lens = multi_row_lengths(seed, 16, q_len, 12000, 2, short_max=900)
    b = Batch(seed, dtype, lens, 16, hq, hkv, d, q_len=q_len)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    opts = dict(softcap=20.0, softmax_scale=0.07)
    b.plan(w, window_left=500, logits_soft_cap=20.0, sm_scale=0.07, window_right=window_right)
    b.check(w, window_right=window_right, window_size=(500, -1), **opts)
    for left in (3000, 0, 5, -1):
        b.check(w, window_left=left, window_right=window_right, **opts)
    b.plan(w, window_left=5, window_right=window_right)
    b.check(w, window_right=window_right, window_size=(5, -1))


def test_multi_row_sinks(seed):
    """run(sinks=) with q_len_per_req = 4 at GQA 8 (32 rows a KV head: the row pair on the ragged
    batch's 9000-slot pages, two 16-row CTAs on the near-uniform one's ~3100): a ragged batch
    (a split count per request) and a near-uniform one (the capacity heuristic), against the
    reference with one more logit per head and a zero value row; out / lse poisoned; without
    return_lse too."""
    q_len, hq, hkv, d, dtype = 4, 16, 2, 128, torch.bfloat16
    sinks = torch.randn(hq, device=DEV) * 3
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    for lens in (multi_row_lengths(seed, 24, q_len, 9000, 1), [seed.randrange(3000, 3100) for _ in range(8)]):
        b = Batch(seed, dtype, lens, 16, hq, hkv, d, q_len=q_len)
        b.plan(w)
        check_sinks_run(w, b, sinks, window_size=(-1, 0))  # causal rows


@pytest.mark.parametrize("page_size,hq,hkv,d,dtype,window_left",
                         [(16, 32, 8, 128, torch.bfloat16, -1), (1, 16, 2, 64, torch.float16, 2000)],
                         ids=["ps16-32x8-d128-bf16", "ps1-16x2-d64-fp16-window"])
def test_multi_row_fixed_split_size_is_batch_invariant(seed, page_size, hq, hkv, d, dtype, window_left):
    """fixed_split_size with q_len_per_req = 4: four requests (a long one, a short one, one of
    exactly 4 keys, one of 5) give bitwise the same out and LSE rows decoded alone, in a batch of 9
    and in one of 40 at shuffled places, and match the float64 reference; each is cut into
    ceil(max(1, attended pages) / fixed_split_size) parts, its attended keys min(length,
    window_left + 4) with a window."""
    check_fixed_split_batch_invariance(seed, page_size, hq, hkv, d, dtype, q_len=4, window_left=window_left)


@pytest.mark.parametrize("dtype,page_size,hq,hkv,d,layout,lists_on",
                         [(torch.bfloat16, 16, 32, 8, 128, "NHD", DEV),
                          (torch.float16, 64, 16, 2, 256, "HND", DEV),
                          (torch.bfloat16, 1, 8, 8, 64, "NHD", "cpu")],
                         ids=["bf16-ps16-32x8-d128-nhd", "fp16-ps64-16x2-d256-hnd", "bf16-ps1-8x8-d64-host-lists"])
def test_graph_mode_multi_row_replays(seed, dtype, page_size, hq, hkv, d, layout, lists_on):
    """use_cuda_graph=True with q_len_per_req = 3: run() captured once (q, out, lse of batch x 3
    rows), replayed after each step's plan() of new lengths (ragged steps with requests of exactly
    3 keys) and pages; each replay matches the step's causal reference and an eager run bitwise,
    and a plan of another q_len_per_req is refused (graph_steps)."""
    graph_steps(seed, dtype, page_size, hq, hkv, d, lists_on=lists_on, layout=layout, q_len=3)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_one_row_plan_is_the_default(seed, layout):
    """plan(q_len_per_req=1) (with window_right and o_data_type, which one row ignores) plans the
    default's splits, and its run (with run(q_len_per_req=1) too) gives bitwise the default plan's
    out and lse: a ragged batch with an empty request (a split count per request) and a
    near-uniform one (the capacity heuristic)."""
    dtype = torch.bfloat16
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace(), layout)
    ragged = long_among_short(seed, 16, 15000, 2, 300)
    ragged[seed.choice([i for i, n in enumerate(ragged) if n == 300])] = 0  # the long ones stay
    for lens in (ragged, [seed.randrange(3000, 3100) for _ in range(8)]):
        b = Batch(seed, dtype, lens, 16, 32, 8, 128, layout=layout)
        b.plan(w)
        planned = (w.num_splits, None if w.split_counts is None else w.split_counts.tolist())
        want_out, want_lse = w.run(b.q, b.pages, return_lse=True)
        b.check(w)
        for kw in ({"q_len_per_req": 1}, {"q_len_per_req": 1, "window_right": -1, "o_data_type": dtype},
                   {"window_right": 3}):
            b.plan(w, **kw)
            assert (w.num_splits, None if w.split_counts is None else w.split_counts.tolist()) == planned, kw
            for run_kw in ({}, {"q_len_per_req": 1}):
                out = nan_full(b.q.shape, dtype)
                lse = nan_full(b.q.shape[:2], torch.float32)
                w.run(b.q, b.pages, out=out, lse=lse, return_lse=True, **run_kw)
                R.assert_bitwise_equal(f"out, plan {kw}, run {run_kw}", out, want_out)
                R.assert_bitwise_equal(f"lse, plan {kw}, run {run_kw}", lse, want_lse)


# ---- random scenarios ------------------------------------------------------------------------------


def draw_scenario_lengths(rng, kind, batch, q_len, cap):
    """Key lengths of `batch` requests of at least q_len keys (0 allowed at one row) and at most cap:
    'ragged' (one or two at cap among short ones, an empty one at one row: plan() splits per
    request), 'uniform' (within 2% of cap: the capacity heuristic and its forms), 'short' (all under
    300)."""
    low = 0 if q_len == 1 else q_len
    if kind == "uniform":
        return [rng.randint(max(low, cap - cap // 50), cap) for _ in range(batch)]
    lens = [rng.randint(low, max(low, min(cap, 300))) for _ in range(batch)]
    if kind == "ragged":
        for i in rng.sample(range(batch), min(batch, rng.choice([1, 2]))):
            lens[i] = cap
        if q_len == 1 and batch > 2:
            lens[rng.choice([i for i, n in enumerate(lens) if n != cap] or [0])] = 0
    return lens


def draw_wrapper_scenario(rng, sms):
    """(dtype, knobs) of one plan() and run(), drawn over the wrapper's whole option space: a
    quarter of the draws on large grids (GQA 32/8, head_dim 64 or 128, 1-8 rows a request, batch x
    KV heads 0.7-2 waves of the SMs at 1-2k keys: the row pair, the 16-row CTAs and the one-row
    forms), the rest of any GQA group, head_dim (a multiple of 8 up to 256), q_len_per_req 1-16,
    page size and length mix; window_left (from plan() or run()), window_right, soft cap,
    sm_scale, calibration scales, sinks, the split choice (plan(), fixed_split_size,
    disable_split_kv), both layouts and cache forms, page lists on the GPU or the host, a workspace
    too small, and the three ways to get the LSE."""
    cfg = {}
    if rng.random() < 0.25:
        hkv, d = 8, rng.choice([64, 128])
        cfg.update(hq=32, hkv=hkv, d=d, q_len=rng.choice([1, 4, 5, 6, 8]), kind="uniform",
                   batch=rng.randint(sms // 12, 2 * sms // hkv),
                   cap=rng.choice([1024, 1500, 2048]))
    else:
        hkv = rng.choice([1, 2, 4, 8])
        cfg.update(hkv=hkv, hq=hkv * rng.choice([g for g in (1, 2, 3, 4, 6, 8, 16) if hkv * g <= 64]),
                   d=rng.choice([40, 64, 96, 128, 128, 192, 256]),
                   q_len=rng.choice([1, 1, 1, 2, 3, 4, 8, 16]), batch=rng.randint(1, 20),
                   kind=rng.choice(["ragged", "ragged", "uniform", "short"]),
                   cap=rng.choice([17, 300, 1000, 3000, 9000, 20000]))
        # keep the float64 reference's probabilities (batch, Hq, q_len, keys) under ~1.6 GB
        while cfg["cap"] > 300 and cfg["batch"] * cfg["hq"] * cfg["q_len"] * cfg["cap"] > 2e8:
            cfg["cap"] //= 3
    cfg["cap"] = max(cfg["cap"], cfg["q_len"])
    cfg["lens"] = draw_scenario_lengths(rng, cfg["kind"], cfg["batch"], cfg["q_len"], cfg["cap"])
    cfg["page_size"] = rng.choice([1, 2, 5, 16, 16, 32, 64, 256])
    cfg["layout"] = rng.choice(["NHD", "HND"])
    cfg["tuple_cache"] = rng.random() < 0.3
    cfg["lists_on_host"] = rng.random() < 0.2
    cfg["window_left"] = -1 if rng.random() < 0.6 else rng.randint(0, cfg["cap"] + 8)
    cfg["window_at"] = rng.choice(["plan", "run"])
    cfg["window_right"] = rng.choice([0, 0, rng.randint(1, cfg["q_len"] + 2), -1]) if cfg["q_len"] > 1 else 0
    cfg["softcap"] = rng.uniform(1.0, 30.0) if rng.random() < 0.25 else None
    cfg["sm_scale"] = rng.uniform(0.02, 0.2) if rng.random() < 0.25 else None
    cfg["scales"] = [rng.uniform(0.3, 2.5) for _ in range(3)] if rng.random() < 0.2 else None
    cfg["sinks"] = rng.random() < 0.25
    cfg["split"] = rng.choice(["plan", "plan", "plan", "fixed", "disable"])
    if cfg["split"] == "fixed":  # pages a part; at most 128 parts a request
        most_pages = -(-max(cfg["lens"]) // cfg["page_size"])
        cfg["fixed_split_size"] = max(rng.choice([1, 2, 7, 64, 200]), -(-most_pages // 128))
    cfg["small_workspace"] = rng.random() < 0.1
    cfg["lse"] = rng.choice(["given", "returned", "none"])
    return rng.choice(DTYPES), cfg


def run_wrapper_scenario(rng, dtype, cfg):
    """plan() and two run()s of a drawn scenario into NaN-poisoned out / lse: both bitwise equal,
    out within the KV-cache rule of the float64 reference (its scores scaled by sm_scale x q_scale
    x k_scale, then soft-capped; out times v_scale; sinks as one more logit), LSE within 1e-3, rows
    that see no key 0 (with their sink's LSE exactly), the cache unchanged."""
    b = Batch(rng, dtype, cfg["lens"], cfg["page_size"], cfg["hq"], cfg["hkv"], cfg["d"],
              layout=cfg["layout"], q_len=cfg["q_len"])
    ws = torch.empty(256, dtype=torch.uint8, device=DEV) if cfg["small_workspace"] else workspace()
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(ws, cfg["layout"])
    plan_kw = dict(logits_soft_cap=cfg["softcap"], sm_scale=cfg["sm_scale"], window_right=cfg["window_right"])
    run_kw = {}
    left = cfg["window_left"]
    (plan_kw if cfg["window_at"] == "plan" else run_kw)["window_left"] = left
    if cfg["split"] == "fixed":
        plan_kw["fixed_split_size"] = cfg["fixed_split_size"]
    elif cfg["split"] == "disable":
        plan_kw["disable_split_kv"] = True
    if cfg["lists_on_host"]:
        b.indptr, b.indices, b.last = b.indptr.cpu(), b.indices.cpu(), b.last.cpu()
    b.plan(w, **plan_kw)
    qs, ks, vs = cfg["scales"] or (1.0, 1.0, 1.0)
    if cfg["scales"]:
        run_kw.update(q_scale=qs, k_scale=ks, v_scale=vs)
    sinks = strided_sinks(b.hq) if cfg["sinks"] else None
    if sinks is not None:
        run_kw["sinks"] = sinks
    cache = (b.pages[:, 0], b.pages[:, 1]) if cfg["tuple_cache"] else b.pages
    before = b.pages.clone()
    runs = []
    for _ in range(2):
        out = nan_full(b.q.shape, dtype)
        lse = nan_full(b.q.shape[:2], torch.float32)
        if cfg["lse"] == "given":
            o = w.run(b.q, cache, out=out, lse=lse, **run_kw)
            assert o is out
        elif cfg["lse"] == "returned":
            o, lse = w.run(b.q, cache, out=out, return_lse=True, **run_kw)
            assert o is out
        else:
            o, lse = w.run(b.q, cache, **run_kw), None
        runs.append((o, lse))
    torch.cuda.synchronize()
    ref_kw = dict(softmax_scale=(cfg["sm_scale"] or b.d ** -0.5) * qs * ks,
                  softcap=cfg["softcap"] or 0.0, sinks=sinks,
                  window_size=(left, cfg["window_right"] if b.q_len > 1 else -1))
    ref, lse_ref = b.reference(False, **ref_kw)
    naive, _ = b.reference(True, **ref_kw)
    naive = (naive.to(dtype) * vs).to(dtype).to(torch.float64)  # stored in the dtype, then scaled
    (out, lse), (out2, lse2) = runs
    R.assert_out_close("out", out, ref * vs, naive, factor=FACTOR)
    R.assert_bitwise_equal("out (second run)", out, out2)
    if sinks is None:
        R.assert_empty_rows_zero("out", out, lse_ref.T)
    if lse is not None:
        R.assert_lse_close("lse", lse, lse_ref.float())
        R.assert_bitwise_equal("lse (second run)", lse, lse2)
        if sinks is not None:
            R.assert_sink_rows("out", out, lse.T, ref, sinks)
    assert torch.equal(b.pages, before), "run() wrote into the cache"


def test_wrapper_random_scenarios(seed):
    """RANDOM_SCENARIOS scenarios drawn fresh (draw_wrapper_scenario), each through
    run_wrapper_scenario. A failure names the scenario's knobs; FASTATTN_TEST_SEED replays the
    whole draw."""
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    run_random_scenarios(seed, RANDOM_SCENARIOS, lambda rng: draw_wrapper_scenario(rng, sms),
                         lambda dtype, cfg: run_wrapper_scenario(seed, dtype, cfg))
