"""GPU: fastattn.BatchPrefillWithPagedKVCacheWrapper (FlashInfer's paged prefill interface) and
fastattn.BatchPrefillWithRaggedKVCacheWrapper (packed keys and values) against a float64 reference
computed on the GPU over the gathered pages or the packed rows.

Both routes: ragged query runs (empty ones, runs longer than their keys, padding rows past the
last run) on the prefill kernel, and uniform runs of N = 1..16 rows (speculative decoding's verify
step) on the multi-row decode kernels; page sizes 1 / 16 / 64, GQA 1 / 4 / 8, head_dim 64 / 128 /
256, both layouts, causal and not, window / softcap / scale, out= and lse= poisoned with NaN (lse
in FlashInfer's (rows, heads) form, which the op writes through its strides); with
use_cuda_graph=True, run() captured and replayed after each step's plan() of new lengths and
pages. The rule (FlashAttention's, for KV-cache calls): max|out - ref| <= 3 * max|naive - ref| +
1e-5 (2x for the ragged wrapper, which reads no cache); LSE within 1e-3 + 1e-3 * |ref|. The
cache's (or k's and v's) bytes are checked unchanged. The ragged wrapper: ragged runs at GQA 1 / 4
/ 8 and head_dim 64 / 128 / 256, both layouts, causal and not, and its run() in a CUDA graph.
"""


import pytest

torch = pytest.importorskip("torch")

import fastattn  # noqa: E402

import gpu_reference as R  # noqa: E402
from gpu_helpers import cumsum0, i32, nan_full, randn, warm_and_capture  # noqa: E402
import test_prefill as P  # noqa: E402  (its helpers; importing it runs no test)

DEV = "cuda"
DTYPES, DTYPE_IDS = P.DTYPES, P.DTYPE_IDS
FACTOR = 3.0  # the KV-cache rule


class Step:
    """One step: query runs qo_lens over requests of kv_lens keys, pages in a random order (`kv`,
    NHD, the reference's; `pages`, the same in `layout`), CSR lists on the GPU."""

    def __init__(self, rng, dtype, qo_lens, kv_lens, page_size, hq, hkv, d, layout="NHD", extra_rows=0):
        self.qo_lens, self.kv_lens, self.ps = list(qo_lens), list(kv_lens), page_size
        self.hq, self.hkv, self.d, self.dtype = hq, hkv, d, dtype
        self.cu_q = cumsum0(qo_lens)
        self.lists, indptr, indices, last, num_pages = P.make_csr(rng, kv_lens, page_size)
        self.qo_indptr, self.indptr, self.indices, self.last = i32(self.cu_q), i32(indptr), i32(indices), i32(last)
        self.kv = randn(num_pages, 2, page_size, hkv, d, dtype=dtype)
        self.pages = self.kv.transpose(2, 3).contiguous() if layout == "HND" else self.kv
        self.q = randn(self.cu_q[-1] + extra_rows, hq, d, dtype=dtype)

    def plan(self, w, **kw):
        w.plan(self.qo_indptr, self.indptr, self.indices, self.last, self.hq, self.hkv, self.d,
               self.ps, q_data_type=self.dtype, **kw)

    def reference(self, naive, causal, **kw):
        kp, vp = self.kv[:, 0], self.kv[:, 1]
        kv = [(R.gather_pages(kp, pages, n), R.gather_pages(vp, pages, n))
              for pages, n in zip(self.lists, self.kv_lens)]
        out, lse, _ = R.varlen_ref(self.q, self.cu_q, kv, causal=causal, naive=naive, **kw)
        return out, lse.T

    def check(self, w, causal, run_kw=None, outputs=None, **ref_kw):
        """run() (or the given outputs of a replayed graph) against the reference, the cache
        unchanged."""
        before = self.pages.clone()
        if outputs is None:
            out = nan_full(self.q.shape, self.q.dtype)
            lse = nan_full(self.q.shape[:2], torch.float32)
            o, l = w.run(self.q, self.pages, out=out, lse=lse, return_lse=True, **(run_kw or {}))
            assert o is out and l is lse
        else:
            out, lse = outputs
        torch.cuda.synchronize()
        ref, lse_ref = self.reference(False, causal, **ref_kw)
        naive, _ = self.reference(True, causal, **ref_kw)
        R.assert_out_close("out", out, ref, naive, factor=FACTOR)
        R.assert_lse_close("lse", lse, lse_ref)
        assert torch.equal(self.pages, before), "run() wrote into the cache"


def workspace():
    return torch.empty(64 << 20, dtype=torch.uint8, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_prefill_route(seed, dtype, page_size, causal, layout):
    """Ragged runs on the prefill kernel: an empty run, a request of no key, a run longer than
    its keys, a long prefill chunk; two padding rows past the last run."""
    rng = seed
    qo_lens = [rng.randint(1, 40), 0, 17, 1, rng.randint(200, 700), 3]
    kv_lens = [qo_lens[0] + rng.randint(0, 300), 9, 17, 0, qo_lens[4] + rng.randint(0, 2000), 2]
    s = Step(rng, dtype, qo_lens, kv_lens, page_size, 8, 2, 128, layout, extra_rows=2)
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(workspace(), layout)
    s.plan(w, causal=causal)
    assert w._plan["route"] == "prefill"
    s.check(w, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group,d", [(1, 128), (4, 64), (8, 128), (4, 256)])
def test_decode_route(seed, dtype, rows, causal, group, d):
    """Uniform runs of N rows at each request's last N keys: the multi-row decode kernels, one
    long request among short ones (split-KV)."""
    rng = seed
    batch = 6
    kv_lens = [rng.randint(rows, 600) for _ in range(batch)]
    kv_lens[rng.randrange(batch)] = rng.randint(8000, 20000)
    hkv = 2
    s = Step(rng, dtype, [rows] * batch, kv_lens, 16, hkv * group, hkv, d)
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(workspace())
    s.plan(w, causal=causal)
    assert w._plan["route"] == "decode" and w._plan["rows"] == rows
    s.check(w, causal)


@pytest.mark.parametrize("route", ["prefill", "decode"])
def test_options(seed, route):
    """window_left, logits_soft_cap, sm_scale, sinks and v_scale on both routes."""
    rng = seed
    qo_lens = [3, 3, 3] if route == "decode" else [3, 40, 1]
    s = Step(rng, torch.bfloat16, qo_lens, [700, 3, 5000], 16, 8, 2, 128)
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(workspace())
    s.plan(w, causal=True, window_left=100, logits_soft_cap=20.0, sm_scale=0.07)
    assert w._plan["route"] == route
    s.check(w, True, window_size=(100, 0), softcap=20.0, softmax_scale=0.07)
    sinks = torch.rand(8, device=DEV, dtype=torch.float32) * 3
    s.check(w, True, run_kw=dict(sinks=sinks), window_size=(100, 0), softcap=20.0,
            softmax_scale=0.07, sinks=sinks)
    base = w.run(s.q, s.pages)
    scaled = w.run(s.q, s.pages, v_scale=0.5)
    torch.testing.assert_close(scaled.float(), (base.float() * 0.5).to(base.dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("route", ["prefill", "decode"])
def test_graph_mode_replays(seed, route):
    """use_cuda_graph=True: run() captured once, replayed after each step's plan() of new lengths
    and pages (the same batch; on the prefill route no run longer than the first plan's)."""
    rng = seed
    batch, hq, hkv, d, ps = 4, 8, 2, 128, 16
    bufs = dict(qo_indptr_buf=torch.empty(batch + 1, dtype=torch.int32, device=DEV),
                paged_kv_indptr_buf=torch.empty(batch + 1, dtype=torch.int32, device=DEV),
                paged_kv_indices_buf=torch.empty(4096, dtype=torch.int32, device=DEV),
                paged_kv_last_page_len_buf=torch.empty(batch, dtype=torch.int32, device=DEV))
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(workspace(), use_cuda_graph=True, **bufs)

    def draw():
        if route == "decode":
            qo = [4] * batch
            kv = [rng.randint(4, 3000) for _ in range(batch)]
        else:
            qo = [rng.randint(0, 64) for _ in range(batch)]
            qo[0] = 64
            kv = [n + rng.randint(0, 3000) for n in qo]
        return Step(rng, torch.float16, qo, kv, ps, hq, hkv, d)

    first = draw()
    rows = first.q.shape[0] if route == "decode" else 4 * 64
    q = torch.zeros(rows, hq, d, dtype=torch.float16, device=DEV)
    pages = torch.zeros(4096, 2, ps, hkv, d, dtype=torch.float16, device=DEV)
    out = nan_full(q.shape, q.dtype)
    lse = nan_full(q.shape[:2], torch.float32)
    first.plan(w, causal=True)
    graph = warm_and_capture(lambda: w.run(q, pages, out=out, lse=lse))
    for step in [first] + [draw() for _ in range(3)]:
        step.plan(w, causal=True)
        n, used = step.q.shape[0], step.kv.shape[0]
        q.zero_()
        q[:n].copy_(step.q)
        pages[:used].copy_(step.kv)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        step.check(w, True, outputs=(out[:n], lse[:n]))
        if rows > n:  # rows past the step's runs: output 0, LSE -inf
            torch.cuda.synchronize()
            assert torch.all(out[n:] == 0) and torch.all(lse[n:] == float("-inf"))


def test_routes_agree(seed):
    """One wrapper, a uniform step (the decode route) then the same step with its last run one
    row shorter (the prefill kernel): both close to the reference (GQA 32/8, head_dim 128)."""
    rng = seed
    s = Step(rng, torch.bfloat16, [6] * 5, [6, 900, 40, 3000, 77], 16, 32, 8, 128)
    w = fastattn.BatchPrefillWithPagedKVCacheWrapper(workspace())
    s.plan(w, causal=True)
    assert w._plan["route"] == "decode"
    s.check(w, True)
    s2 = Step(rng, torch.bfloat16, [6, 6, 6, 6, 5], [6, 900, 40, 3000, 77], 16, 32, 8, 128)
    s2.plan(w, causal=True)
    assert w._plan["route"] == "prefill"
    s2.check(w, True)


# ---- BatchPrefillWithRaggedKVCacheWrapper -----------------------------------------------------------


def ragged_inputs(rng, dtype, qo_lens, kv_lens, hq, hkv, d):
    q = randn(sum(qo_lens), hq, d, dtype=dtype)
    k = randn(sum(kv_lens), hkv, d, dtype=dtype)
    v = randn(sum(kv_lens), hkv, d, dtype=dtype)
    cu_k = cumsum0(kv_lens)
    kv = [(k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]) for b in range(len(kv_lens))]
    return q, k, v, kv


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("group,d", [(1, 64), (4, 128), (8, 256)])
def test_ragged(seed, dtype, causal, layout, group, d):
    """Packed runs over packed keys (an empty run, a request of no key, a run longer than its
    keys, a long chunk), NaN-poisoned out / lse, k and v unchanged."""
    rng = seed
    qo_lens = [rng.randint(1, 64), 0, 30, 1, rng.randint(100, 600)]
    kv_lens = [qo_lens[0] + rng.randint(0, 500), 7, 11, 0, qo_lens[4] + rng.randint(0, 3000)]
    hkv = 2
    q, k, v, kv = ragged_inputs(rng, dtype, qo_lens, kv_lens, hkv * group, hkv, d)
    kk, vv = (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()) if layout == "HND" else (k, v)
    before = (kk.clone(), vv.clone())
    w = fastattn.BatchPrefillWithRaggedKVCacheWrapper(workspace(), layout)
    w.plan(i32(cumsum0(qo_lens)), i32(cumsum0(kv_lens)), hkv * group, hkv, d, causal=causal,
           q_data_type=dtype)
    out = nan_full(q.shape, q.dtype)
    lse = nan_full(q.shape[:2], torch.float32)
    w.run(q, kk, vv, out=out, lse=lse)
    torch.cuda.synchronize()
    ref, lse_ref, _ = R.varlen_ref(q, cumsum0(qo_lens), kv, causal=causal)
    naive, _, _ = R.varlen_ref(q, cumsum0(qo_lens), kv, causal=causal, naive=True)
    R.assert_out_close("out", out, ref, naive, factor=2.0)
    R.assert_lse_close("lse", lse, lse_ref.T)
    assert torch.equal(kk, before[0]) and torch.equal(vv, before[1]), "run() wrote into k or v"


def test_ragged_graph_mode_replays(seed):
    """use_cuda_graph=True: the ragged run() captured once, replayed after plans of new lengths."""
    rng = seed
    batch, hq, hkv, d = 3, 8, 2, 128
    bufs = dict(qo_indptr_buf=torch.empty(batch + 1, dtype=torch.int32, device=DEV),
                kv_indptr_buf=torch.empty(batch + 1, dtype=torch.int32, device=DEV))
    w = fastattn.BatchPrefillWithRaggedKVCacheWrapper(workspace(), use_cuda_graph=True, **bufs)
    q = torch.zeros(3 * 100, hq, d, dtype=torch.bfloat16, device=DEV)
    k = torch.zeros(3 * 2100, hkv, d, dtype=torch.bfloat16, device=DEV)
    v = torch.zeros_like(k)
    out = nan_full(q.shape, q.dtype)
    graph = None
    for step in range(4):
        qo_lens = [100] + [rng.randint(0, 100) for _ in range(batch - 1)]
        kv_lens = [n + rng.randint(0, 2000) for n in qo_lens]
        sq, sk, sv, kv = ragged_inputs(rng, torch.bfloat16, qo_lens, kv_lens, hq, hkv, d)
        w.plan(i32(cumsum0(qo_lens)), i32(cumsum0(kv_lens)), hq, hkv, d, causal=True,
               q_data_type=torch.bfloat16)
        q.zero_(), k.zero_(), v.zero_()
        q[:sq.shape[0]].copy_(sq), k[:sk.shape[0]].copy_(sk), v[:sv.shape[0]].copy_(sv)
        if graph is None:
            graph = warm_and_capture(lambda: w.run(q, k, v, out=out))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        n = sq.shape[0]
        ref, _, _ = R.varlen_ref(sq, cumsum0(qo_lens), kv, causal=True)
        naive, _, _ = R.varlen_ref(sq, cumsum0(qo_lens), kv, causal=True, naive=True)
        R.assert_out_close("out", out[:n], ref, naive, factor=2.0)
        assert torch.all(out[n:] == 0), "rows past the step's runs must be 0"
