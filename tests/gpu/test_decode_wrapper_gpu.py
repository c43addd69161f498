"""GPU: fastattn.BatchDecodeWithPagedKVCacheWrapper (FlashInfer's batch decode interface, planned
from the host's page lists) against a float64 reference computed on the GPU over the gathered pages.

Ragged batches (empty requests, a few long ones among short ones, so that plan() picks a split
count per request, and near-uniform ones, which keep the capacity heuristic), every page size, GQA
1/4/8, head_dim 64/128/256, both cache forms, window / softcap / scale, out= and lse= poisoned with
NaN, the wrapper's workspace used or too small. The rule (FlashAttention's, for KV-cache calls):
max|out - ref| <= 3 * max|naive_in_dtype - ref| + 1e-5; LSE within 1e-3 + 1e-3 * |ref|. The cache
is read only: its bytes are checked unchanged.
"""

import pytest

torch = pytest.importorskip("torch")

import fastattn  # noqa: E402

import gpu_reference as R  # noqa: E402
from gpu_helpers import i32, nan_full, randn  # noqa: E402
import test_prefill as P  # noqa: E402  (its helpers; importing it runs no test)

DEV = "cuda"
DTYPES, DTYPE_IDS = P.DTYPES, P.DTYPE_IDS
FACTOR = 3.0  # the KV-cache rule


class Batch:
    """One decode step: q (B, Hq, D), pages (num_pages, 2, page_size, Hkv, D) in a random order,
    CSR page lists (indptr, indices, last_page_len) on the GPU."""

    def __init__(self, rng, dtype, lens, page_size, hq, hkv, d):
        self.lens, self.ps, self.hq, self.hkv, self.d, self.dtype = list(lens), page_size, hq, hkv, d, dtype
        self.lists, indptr, indices, last, num_pages = P.make_csr(rng, lens, page_size)
        self.indptr, self.indices, self.last = i32(indptr), i32(indices), i32(last)
        self.kv = randn(num_pages, 2, page_size, hkv, d, dtype=dtype)
        self.q = randn(len(lens), hq, d, dtype=dtype)

    def plan(self, wrapper, **kw):
        wrapper.plan(self.indptr, self.indices, self.last, self.hq, self.hkv, self.d, self.ps,
                     q_data_type=self.dtype, **kw)

    def reference(self, naive, **kw):
        """(out (B, Hq, D), lse (B, Hq)): each request's query after its last key."""
        kp, vp = self.kv[:, 0], self.kv[:, 1]
        kv = [(R.gather_pages(kp, pages, n), R.gather_pages(vp, pages, n))
              for pages, n in zip(self.lists, self.lens)]
        cu_q = list(range(len(self.lens) + 1))
        out, lse, _ = R.varlen_ref(self.q, cu_q, kv, naive=naive, **kw)
        return out, lse.T

    def check(self, wrapper, cache=None, window_left=None, **ref_kw):
        """Runs the wrapper twice into NaN-poisoned out / lse; both bitwise equal and close to
        the reference, the cache unchanged."""
        cache = self.kv if cache is None else cache
        before = self.kv.clone()
        runs = []
        for _ in range(2):
            out = nan_full(self.q.shape, self.q.dtype)
            lse = nan_full(self.q.shape[:2], torch.float32)
            o, l = wrapper.run(self.q, cache, out=out, lse=lse, return_lse=True, window_left=window_left)
            assert o is out and l is lse
            runs.append((out, lse))
        torch.cuda.synchronize()
        if window_left is not None and window_left >= 0:
            ref_kw["window_size"] = (window_left, -1)
        ref, lse_ref = self.reference(False, **ref_kw)
        naive, _ = self.reference(True, **ref_kw)
        R.assert_out_close("out", runs[0][0], ref, naive, factor=FACTOR)
        R.assert_lse_close("lse", runs[0][1], lse_ref)
        R.assert_bitwise_equal("out (second run)", runs[0][0], runs[1][0])
        R.assert_bitwise_equal("lse (second run)", runs[0][1], runs[1][1])
        assert torch.equal(self.kv, before), "run() wrote into the cache"


def long_among_short(rng, batch, long_len, n_long, short_len):
    lens = [short_len] * batch
    for i in rng.sample(range(batch), n_long):
        lens[i] = long_len
    return lens


def workspace():
    return torch.empty(64 << 20, dtype=torch.uint8, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("page_size", [1, 16, 64, 256])
def test_ragged_pages(seed, dtype, page_size):
    """Two long requests among short ones and empty ones, GQA 4, d128: plan() splits."""
    lens = long_among_short(seed, 24, 20000, 2, 300)
    lens[seed.randrange(24)] = 0
    lens[seed.randrange(24)] = 1
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
    b.check(w)
    lens = [seed.randrange(3000, 3100) for _ in range(16)]
    b = Batch(seed, dtype, lens, 16, hkv * group, hkv, d)
    b.plan(w)
    assert w.num_splits == 0
    b.check(w)


def test_options(seed):
    """window_left (from plan() and from run()), logits_soft_cap and sm_scale."""
    lens = long_among_short(seed, 16, 12000, 2, 700)
    b = Batch(seed, torch.bfloat16, lens, 16, 8, 2, 128)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    b.plan(w, window_left=500, logits_soft_cap=20.0, sm_scale=0.07)
    b.check(w, window_size=(500, -1), softcap=20.0, softmax_scale=0.07)
    b.check(w, window_left=3000, softcap=20.0, softmax_scale=0.07)
    b.check(w, window_left=-1, softcap=20.0, softmax_scale=0.07)


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


def test_cpu_workspace_with_gpu_q(seed):
    """plan() places its arrays on the workspace's device; q on another is a clear error."""
    b = Batch(seed, torch.bfloat16, [5, 9], 16, 4, 2, 64)
    w = fastattn.BatchDecodeWithPagedKVCacheWrapper(torch.empty(16, dtype=torch.uint8))
    b.plan(w)
    with pytest.raises(ValueError, match="q must be on the device of the workspace buffer"):
        w.run(b.q, b.kv)
