"""GPU: the op asks the caller's allocator for its split-KV scratch (fastattn::WorkspaceAllocator,
which the binding gives the kvcache and varlen ops when no workspace is passed). The op asks
once, for exactly what kvcache_workspace_bytes / varlen_workspace_bytes say, and only when the call
needs scratch; the answer is bitwise the one a given workspace gets, and the reference's. An
allocator that fails, or returns something a given workspace could not be, is an error naming the
workspace, and the call has then written nothing: not its output, not the cache it would append to.
Here the allocator is the binding's Python callback (workspace_alloc), which any torch reaches;
tests/gpu/test_dlpack_exchange_gpu.py covers the exchange table's allocator."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastattn import _C  # noqa: E402

import gpu_reference as R  # noqa: E402
from gpu_helpers import DEV, i32, nan_full, randn, stream_ptr  # noqa: E402


class Recorder:
    """A workspace_alloc callback that records each request's byte count and answers with
    `answer(nbytes)` (torch.empty on the GPU by default)."""

    def __init__(self, answer=None):
        self.requests = []
        self.answer = answer or (lambda n: torch.empty(n, dtype=torch.uint8, device=DEV))

    def __call__(self, nbytes):
        self.requests.append(nbytes)
        return self.answer(nbytes)


def paged_append_call(seed, num_splits, rotary=False):
    """A paged decode (3 sequences of up to 3000 keys, 16-key pages in a random order, GQA 4) that
    appends one key per sequence, with rotary when asked. Returns (run, inputs): run(out, k_cache,
    v_cache, **binding_kw) calls the op on those arrays."""
    g = torch.Generator(device="cpu").manual_seed(seed.randrange(1 << 62))
    b, hq, hkv, d, page = 3, 16, 4, 128, 16
    lens = [int(x) for x in torch.randint(1, 3000, (b,), generator=g)]
    per_seq = (max(lens) + 1 + page - 1) // page
    pages = b * per_seq + 5
    table = torch.randperm(pages, generator=g)[: b * per_seq].view(b, per_seq).to(torch.int32).to(DEV)
    inputs = dict(q=randn(b, 1, hq, d, dtype=torch.bfloat16),
                  k_cache=randn(pages, page, hkv, d, dtype=torch.bfloat16),
                  v_cache=randn(pages, page, hkv, d, dtype=torch.bfloat16),
                  k=randn(b, 1, hkv, d, dtype=torch.bfloat16), v=randn(b, 1, hkv, d, dtype=torch.bfloat16),
                  cache_seqlens=i32(lens), block_table=table)
    if rotary:
        cos_sin = torch.rand(4096, 32, device=DEV) * 6.28
        inputs.update(rotary_cos=cos_sin.cos().to(torch.bfloat16), rotary_sin=cos_sin.sin().to(torch.bfloat16))

    def run(out, k_cache, v_cache, **kw):
        args = dict(inputs, k_cache=k_cache, v_cache=v_cache)
        _C.kvcache_attention_forward(**args, num_splits=num_splits, out=out, cuda_stream=stream_ptr(), **kw)

    return run, inputs


def bytes_of(x):
    return x.contiguous().view(torch.uint8).clone()


@pytest.mark.parametrize("rotary", [False, True], ids=["splits", "splits+rotary"])
def test_kvcache_asks_once_for_exactly_its_bytes(seed, rotary):
    run, inputs = paged_append_call(seed, num_splits=4, rotary=rotary)
    q = inputs["q"]
    need = _C.kvcache_workspace_bytes(**inputs, num_splits=4,
                                      out=torch.empty_like(q), cuda_stream=stream_ptr())
    assert need > 0
    results = {}
    for mode in ("allocator", "given"):
        out = nan_full(q.shape, q.dtype)
        kc, vc = inputs["k_cache"].clone(), inputs["v_cache"].clone()
        if mode == "allocator":
            alloc = Recorder()
            run(out, kc, vc, workspace_alloc=alloc)
            torch.cuda.synchronize()
            assert alloc.requests == [need], f"requests {alloc.requests}, kvcache_workspace_bytes {need}"
        else:
            run(out, kc, vc, workspace=torch.empty(need, dtype=torch.uint8, device=DEV))
        torch.cuda.synchronize()
        results[mode] = (out, kc, vc)
    for name, a, b in zip(("out", "k_cache", "v_cache"), results["allocator"], results["given"]):
        R.assert_bitwise_equal(f"{name} (allocator against a given workspace)", a, b)
    ref = R.kvcache_ref(**{k: v for k, v in inputs.items() if k not in ("k", "v")},
                        k_new=inputs["k"], v_new=inputs["v"])
    R.assert_out_close("out", results["allocator"][0], ref.out, ref.out_naive, factor=3.0)


def test_a_call_without_scratch_asks_for_none(seed):
    """One split and no rotary: the kvcache call needs no scratch, and a prefill-shaped varlen call
    (two query rows in a sequence) never does; neither asks."""
    run, inputs = paged_append_call(seed, num_splits=1)
    alloc = Recorder()
    out = nan_full(inputs["q"].shape, inputs["q"].dtype)
    run(out, inputs["k_cache"].clone(), inputs["v_cache"].clone(), workspace_alloc=alloc)
    torch.cuda.synchronize()
    assert alloc.requests == []
    assert not torch.isnan(out).any()

    q = randn(3, 8, 64, dtype=torch.float16)
    k, v = randn(40, 8, 64, dtype=torch.float16), randn(40, 8, 64, dtype=torch.float16)
    out = nan_full(q.shape, q.dtype)
    _C.varlen_attention_forward(q=q, cu_seqlens_q=i32([0, 2, 3]), max_seqlen_q=2, k=k, v=v,
                                cu_seqlens_k=i32([0, 25, 40]), max_seqlen_k=25, out=out,
                                cuda_stream=stream_ptr(), workspace_alloc=alloc)
    torch.cuda.synchronize()
    assert alloc.requests == []
    ref, _, _ = R.varlen_ref(q, [0, 2, 3], [(k[:25], v[:25]), (k[25:], v[25:])])
    naive, _, _ = R.varlen_ref(q, [0, 2, 3], [(k[:25], v[:25]), (k[25:], v[25:])], naive=True)
    R.assert_out_close("out", out, ref, naive, factor=3.0)


def test_varlen_decode_splits_with_the_allocator(seed):
    """A decode-shaped varlen call (one long sequence, heuristic splits): with the allocator it asks
    once for varlen_workspace_bytes and gets a given workspace's bits; with neither it runs one split."""
    g = torch.Generator(device="cpu").manual_seed(seed.randrange(1 << 62))
    hq, hkv, d, page = 8, 2, 128, 16
    n = int(torch.randint(20000, 30000, (1,), generator=g))
    pages = (n + page - 1) // page
    table = torch.randperm(pages, generator=g).view(1, pages).to(torch.int32).to(DEV)
    q = randn(1, hq, d, dtype=torch.bfloat16)
    kp, vp = randn(pages, page, hkv, d, dtype=torch.bfloat16), randn(pages, page, hkv, d, dtype=torch.bfloat16)
    args = dict(q=q, cu_seqlens_q=i32([0, 1]), max_seqlen_q=1, k_pages=kp, v_pages=vp, block_table=table,
                seqused_k=i32([n]), max_seqlen_k=n, cuda_stream=stream_ptr())
    need = _C.varlen_workspace_bytes(**args, out=torch.empty_like(q))
    assert need > 0, "the call did not plan splits"
    alloc = Recorder()
    outs = {}
    for mode, kw in (("allocator", dict(workspace_alloc=alloc)),
                     ("given", dict(workspace=torch.empty(need, dtype=torch.uint8, device=DEV))),
                     ("none", {})):
        outs[mode] = nan_full(q.shape, q.dtype)
        _C.varlen_attention_forward(**args, out=outs[mode], **kw)
    torch.cuda.synchronize()
    assert alloc.requests == [need]
    R.assert_bitwise_equal("out (allocator against a given workspace)", outs["allocator"], outs["given"])
    kv = [(R.gather_pages(kp, table[0].tolist(), n), R.gather_pages(vp, table[0].tolist(), n))]
    ref, _, _ = R.varlen_ref(q, [0, 1], kv)
    naive, _, _ = R.varlen_ref(q, [0, 1], kv, naive=True)
    for mode in outs:
        R.assert_out_close(f"out ({mode})", outs[mode], ref, naive, factor=3.0)


def _raise(nbytes):
    raise MemoryError(f"the pool has no {nbytes} bytes")


BAD_ANSWERS = {
    "raises": (_raise, MemoryError, r"the pool has no \d+ bytes"),
    "float32": (lambda n: torch.empty(n, dtype=torch.float32, device=DEV), TypeError, r"workspace.*uint8"),
    "too small": (lambda n: torch.empty(n - 16, dtype=torch.uint8, device=DEV), ValueError,
                  r"workspace.*at least"),
    "host memory": (lambda n: np.empty(n, dtype=np.uint8), ValueError, r"workspace"),
    "strided": (lambda n: torch.empty(2 * n, dtype=torch.uint8, device=DEV)[::2], ValueError, r"workspace"),
    "None": (lambda n: None, ValueError, r"workspace"),
    "not an array": (lambda n: "scratch", TypeError, r"workspace"),
}


@pytest.mark.parametrize("bad", list(BAD_ANSWERS))
def test_a_failing_allocator_leaves_everything_as_it_was(seed, bad):
    answer, error, message = BAD_ANSWERS[bad]
    run, inputs = paged_append_call(seed, num_splits=4)
    q = inputs["q"]
    out = nan_full(q.shape, q.dtype)
    kc, vc = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    before = bytes_of(kc), bytes_of(vc)
    alloc = Recorder(answer)
    with pytest.raises(error, match=message):
        run(out, kc, vc, workspace_alloc=alloc)
    torch.cuda.synchronize()
    assert len(alloc.requests) == 1
    assert torch.isnan(out).all(), "a refused call wrote its output"
    assert torch.equal(bytes_of(kc), before[0]) and torch.equal(bytes_of(vc), before[1]), \
        "a refused call appended into the cache"
