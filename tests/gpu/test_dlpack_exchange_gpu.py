"""GPU: torch's own DLPack C exchange table (`torch.Tensor.__dlpack_c_exchange_api__`, torch
2.10 and later), through which the binding now describes every plain torch tensor (the rest of
tests/gpu runs on it too). Here: the three ways a torch tensor can reach the binding (the table, a
capsule from torch.utils.dlpack.to_dlpack as before torch 2.10, and `__dlpack__` for a subclass)
give the same bits and the float64 reference's answer, for a decode that appends into a paged
cache in place and for a sliced view at a storage offset; torch's refusals name the argument. And
the outputs and the stream the binding takes through the table (flash_attn_with_kvcache and the
decode wrapper's run() with no out=): the same bits as Python's allocation and stream query, on a
side stream and replayed from a CUDA graph."""

import pytest

torch = pytest.importorskip("torch")
if "__dlpack_c_exchange_api__" not in torch.Tensor.__dict__:
    pytest.skip("torch.Tensor has no DLPack C exchange table before torch 2.10", allow_module_level=True)

import fastattn  # noqa: E402
import torch.utils.dlpack  # noqa: E402
from fastattn import _C  # noqa: E402

import gpu_reference as R  # noqa: E402
from gpu_helpers import randn, warm_and_capture  # noqa: E402


class Sub(torch.Tensor):
    """A subclass: no table of its own, so the binding imports it through `__dlpack__`."""


def draw_inputs():
    """A paged decode's inputs (torch's generator, seeded by the fixture): q (3, 1, 8, 128) a view
    at a storage offset, pages of 16 in a random order, 2 KV heads, one new key per sequence."""
    b, hq, hkv, d, page, pages = 3, 8, 2, 128, 16, 40
    lens = torch.tensor([5, 130, 0], dtype=torch.int32, device="cuda")
    table = torch.randperm(pages, device="cuda")[: b * 12].view(b, 12).to(torch.int32)
    k_cache, v_cache = randn(pages, page, hkv, d, dtype=torch.bfloat16), randn(pages, page, hkv, d, dtype=torch.bfloat16)
    q = randn(b, 1, 2 * hq, d, dtype=torch.bfloat16)[:, :, hq:]
    k_new, v_new = randn(b, 1, hkv, d, dtype=torch.bfloat16), randn(b, 1, hkv, d, dtype=torch.bfloat16)
    return q, k_cache, v_cache, k_new, v_new, lens, table


def paged_decode(route, inputs):
    """One decode that appends a key per sequence into a copy of the paged cache, with its arrays
    handed to the binding by `route`: "public" (fastattn.flash_attn_with_kvcache), or the op
    called directly with the tensors as they are ("table"), as capsules from
    torch.utils.dlpack.to_dlpack ("capsule", call_op's path before torch 2.10) or as a Sub each
    ("subclass"). Returns (out, lse, k_cache, v_cache)."""
    q, k_cache, v_cache, k_new, v_new, lens, table = inputs
    b, _, hq, _ = q.shape
    arrays = dict(q=q, k_cache=k_cache.clone(), v_cache=v_cache.clone(), k=k_new, v=v_new,
                  cache_seqlens=lens, block_table=table)
    written = (arrays["k_cache"], arrays["v_cache"])
    if route == "public":
        out, lse = fastattn.flash_attn_with_kvcache(**arrays, return_softmax_lse=True)
    else:
        out = torch.full_like(q, float("nan"))
        lse = torch.full((b, hq, 1), float("nan"), device="cuda")
        arrays.update(out=out, lse=lse)
        if route == "capsule":
            arrays = {k: torch.utils.dlpack.to_dlpack(v) for k, v in arrays.items()}
        elif route == "subclass":
            arrays = {k: v.as_subclass(Sub) for k, v in arrays.items()}
        _C.kvcache_attention_forward(**arrays, cuda_stream=torch.cuda.current_stream().cuda_stream,
                                     workspace_alloc=lambda n: torch.empty(n, dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    return (out, lse) + written


def test_every_route_gives_the_same_bits_and_the_reference(seed):
    inputs = draw_inputs()
    q, k_cache, v_cache, k_new, v_new, lens, table = inputs
    results = {route: paged_decode(route, inputs) for route in ("table", "public", "capsule", "subclass")}
    out, lse, k_after, v_after = results["table"]
    for route in ("public", "capsule", "subclass"):
        for name, a, b in zip(("out", "lse", "k_cache", "v_cache"), results["table"], results[route]):
            R.assert_bitwise_equal(f"{name} ({route} against the table)", a.as_subclass(torch.Tensor),
                                   b.as_subclass(torch.Tensor))
    # The append writes one slot per sequence (its position lens[i]) and nothing else.
    page = k_cache.shape[1]
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    for i in range(q.shape[0]):
        n = int(lens[i])
        k_expect[table[i, n // page], n % page] = k_new[i, 0]
        v_expect[table[i, n // page], n % page] = v_new[i, 0]
    assert torch.equal(k_after, k_expect) and torch.equal(v_after, v_expect), "the cache is not as appended"
    for i in range(q.shape[0]):
        n = int(lens[i]) + 1
        rows = table[i, : (n + page - 1) // page].long()
        keys = k_expect[rows].reshape(-1, *k_cache.shape[2:])[None, :n]
        values = v_expect[rows].reshape(-1, *v_cache.shape[2:])[None, :n]
        ref, lse_ref, _ = R.attention_ref(q[i : i + 1], keys, values)
        naive, _, _ = R.attention_ref(q[i : i + 1], keys, values, naive=True)
        R.assert_out_close(f"out[{i}]", out[i : i + 1], ref, naive, factor=3.0)
        R.assert_lse_close(f"lse[{i}]", lse[i : i + 1], lse_ref.float())


def test_torch_refusals_name_the_argument():
    q = randn(1, 1, 4, 64, dtype=torch.float16)
    cache = randn(1, 32, 4, 64, dtype=torch.float16)
    out = torch.full_like(q, 7.0)
    sparse = cache.to_sparse()
    with pytest.raises(TypeError, match=r"argument 'v_cache': torch\.Tensor could not be described through DLPack: \S"):
        _C.kvcache_attention_forward(q, cache, sparse, cache_seqlen=32, out=out)
    with pytest.raises(ValueError, match=r"argument 'k_cache': the tensor is a lazy negation view"):
        _C.kvcache_attention_forward(q, torch._neg_view(cache), cache, cache_seqlen=32, out=out)
    torch.cuda.synchronize()
    assert bool((out == 7.0).all()), "a refused call wrote its output"


def test_the_workspace_comes_from_torchs_allocator_through_the_table(seed):
    """workspace_from_q: a call that splits (num_splits=4, 8192 keys) allocates its split-KV
    scratch through torch's exchange table, once, with no callback; the same bits as with a
    callback's workspace and a given one, and the reference's answer. Without either it is an
    error naming the workspace."""
    q = randn(1, 1, 16, 128, dtype=torch.bfloat16)
    k, v = randn(1, 8192, 4, 128, dtype=torch.bfloat16), randn(1, 8192, 4, 128, dtype=torch.bfloat16)
    stream = torch.cuda.current_stream().cuda_stream
    need = _C.kvcache_workspace_bytes(q, k, v, cache_seqlen=8192, num_splits=4, out=torch.empty_like(q),
                                      cuda_stream=stream)
    assert need > 0

    def run(**kw):
        out = torch.full_like(q, float("nan"))
        _C.kvcache_attention_forward(q, k, v, cache_seqlen=8192, num_splits=4, out=out, cuda_stream=stream, **kw)
        return out

    run(workspace_from_q=True)  # warm: the caching allocator holds a block after this
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    from_table = run(workspace_from_q=True)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] - before == 2  # out, then the workspace
    from_callback = run(workspace_alloc=lambda n: torch.empty(n, dtype=torch.uint8, device="cuda"))
    given = run(workspace=torch.empty(need, dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    R.assert_bitwise_equal("out (callback against the table)", from_table, from_callback)
    R.assert_bitwise_equal("out (given against the table)", from_table, given)
    ref, _, _ = R.attention_ref(q, k, v)
    naive, _, _ = R.attention_ref(q, k, v, naive=True)
    R.assert_out_close("out", from_table, ref, naive, factor=3.0)
    with pytest.raises(ValueError, match=r"workspace"):
        run()


# ---- the outputs and the stream through the table: flash_attn_with_kvcache and run() -------------


def kvcache_append_call(q, k_cache, v_cache, k_new, v_new, lens):
    """flash_attn_with_kvcache appending one key per sequence, with the LSE."""
    return fastattn.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                            return_softmax_lse=True)


def test_kvcache_outputs_and_stream_from_the_table_match_pythons(seed, monkeypatch):
    """From torch 2.10 flash_attn_with_kvcache's out and LSE come from torch's allocator and its
    stream from torch's table, in the binding. On a side stream, appending into a contiguous cache
    of 9000 slots (the long row splits): torch tensors on q's device, the same bits as the path
    that allocates in Python and asks torch.cuda for the stream, the same cache bytes, and the
    reference's answer."""
    import fastattn.interface as interface_module

    b, hq, hkv, d, cap = 2, 16, 4, 128, 9000
    q = randn(b, 1, hq, d, dtype=torch.bfloat16)
    k_cache, v_cache = randn(b, cap, hkv, d, dtype=torch.bfloat16), randn(b, cap, hkv, d, dtype=torch.bfloat16)
    k_new, v_new = randn(b, 1, hkv, d, dtype=torch.bfloat16), randn(b, 1, hkv, d, dtype=torch.bfloat16)
    lens = torch.tensor([int(torch.randint(7000, cap - 1, ())), int(torch.randint(0, 40, ()))],
                        dtype=torch.int32, device="cuda")
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, lse = kvcache_append_call(q, *caches[0], k_new, v_new, lens)
        monkeypatch.setattr(interface_module, "through_exchange_table", lambda x: False)
        py_out, py_lse = kvcache_append_call(q, *caches[1], k_new, v_new, lens)
    side.synchronize()
    assert type(out) is torch.Tensor and type(lse) is torch.Tensor
    assert out.device == q.device and out.shape == q.shape and out.dtype == q.dtype
    assert lse.device == q.device and lse.shape == (b, hq, 1) and lse.dtype == torch.float32
    R.assert_bitwise_equal("out (the table's against Python's)", out, py_out)
    R.assert_bitwise_equal("lse (the table's against Python's)", lse, py_lse)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    for i in range(b):
        n = int(lens[i]) + 1
        keys, values = caches[0][0][i : i + 1, :n], caches[0][1][i : i + 1, :n]
        ref, lse_ref, _ = R.attention_ref(q[i : i + 1], keys, values)
        naive, _, _ = R.attention_ref(q[i : i + 1], keys, values, naive=True)
        R.assert_out_close(f"out[{i}]", out[i : i + 1], ref, naive, factor=3.0)
        R.assert_lse_close(f"lse[{i}]", lse[i : i + 1], lse_ref.float())


def test_kvcache_outputs_from_the_table_in_a_cuda_graph(seed):
    """flash_attn_with_kvcache with no out= captured in a CUDA graph: its out, LSE and split-KV
    scratch come from torch's allocator (the graph's pool) on the capturing stream, which capture
    requires of every launch. Replayed with a new q into the poisoned outputs: the new answer."""
    q = randn(1, 1, 32, 128, dtype=torch.float16)
    k, v = randn(1, 9000, 8, 128, dtype=torch.float16), randn(1, 9000, 8, 128, dtype=torch.float16)
    held = {}

    def call():
        held["out"], held["lse"] = fastattn.flash_attn_with_kvcache(q, k, v, return_softmax_lse=True)

    graph = warm_and_capture(call)
    q.copy_(randn(1, 1, 32, 128, dtype=torch.float16))
    held["out"].fill_(float("nan"))
    held["lse"].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref, lse_ref, _ = R.attention_ref(q, k, v)
    naive, _, _ = R.attention_ref(q, k, v, naive=True)
    R.assert_out_close("out", held["out"], ref, naive, factor=3.0)
    R.assert_lse_close("lse", held["lse"], lse_ref.float())


def test_decode_run_outputs_and_stream_from_the_table_match_pythons(seed, monkeypatch):
    """The decode wrapper's run() with no out= or lse=: from torch 2.10 the runner allocates them
    through torch's table and takes its stream. Eager on a side stream, the same bits as the path
    that allocates in Python; captured with use_cuda_graph=True and replayed after a new q, the
    eager answer bitwise; both the reference's."""
    import fastattn.decode as decode_module
    from test_decode_wrapper_gpu import Batch, graph_wrapper, long_among_short, workspace

    batch, hq, hkv, d, ps = 6, 32, 8, 128, 16
    b = Batch(seed, torch.bfloat16, long_among_short(seed, batch, 20000, 1, seed.randrange(1, 900)), ps, hq, hkv, d)
    eager = fastattn.BatchDecodeWithPagedKVCacheWrapper(workspace())
    b.plan(eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, lse = eager.run(b.q, b.kv, return_lse=True)
        with monkeypatch.context() as m:
            m.setattr(decode_module, "through_exchange_table", lambda x: False)
            py_out, py_lse = eager.run(b.q, b.kv, return_lse=True)
    side.synchronize()
    assert type(out) is torch.Tensor and out.shape == b.q.shape and out.dtype == b.q.dtype
    assert type(lse) is torch.Tensor and lse.shape == (batch, hq) and lse.dtype == torch.float32
    R.assert_bitwise_equal("out (the table's against Python's)", out, py_out)
    R.assert_bitwise_equal("lse (the table's against Python's)", lse, py_lse)
    ref, lse_ref = b.reference(False)
    naive, _ = b.reference(True)
    R.assert_out_close("out", out, ref, naive, factor=3.0)
    R.assert_lse_close("lse", lse, lse_ref)

    captured = graph_wrapper(b)
    b.plan(captured)
    held = {}

    def call():
        held["out"], held["lse"] = captured.run(b.q, b.kv, return_lse=True)

    graph = warm_and_capture(call)
    b.q.copy_(randn(*b.q.shape, dtype=b.q.dtype))
    held["out"].fill_(float("nan"))
    held["lse"].fill_(float("nan"))
    graph.replay()
    new_out, new_lse = captured.run(b.q, b.kv, return_lse=True)  # its plan's splits, eagerly
    torch.cuda.synchronize()
    R.assert_bitwise_equal("out (replay against eager)", held["out"], new_out)
    R.assert_bitwise_equal("lse (replay against eager)", held["lse"], new_lse)
    ref, lse_ref = b.reference(False)
    naive, _ = b.reference(True)
    R.assert_out_close("out (replay)", held["out"], ref, naive, factor=3.0)
    R.assert_lse_close("lse (replay)", held["lse"], lse_ref)


# ---- the same for flash_attn_varlen_func and flash_attn_func ---------------------------------------


def prefill_call(kind):
    """Fresh inputs and a call with no out= that returns (out, lse), for one of the three shapes
    flash_attn_varlen_func and flash_attn_func take the table's outputs in:
    - "varlen_decode": a paged cache (pages of 16 in a random order), one query row per sequence,
      one sequence of 9000 keys among short ones (the split-KV decode kernels; the long one splits);
    - "varlen_packed": packed ragged sequences, causal (the prefill kernel);
    - "dense": a batch of equal lengths with a window.
    Also returns (out, lse) of the float64 reference and of the naive one."""
    hq, hkv, d = 16, 4, 128
    dt = torch.bfloat16
    if kind == "varlen_decode":
        page, lens_k = 16, [int(torch.randint(7000, 9000, ())), 0] + [int(x) for x in torch.randint(1, 300, (3,))]
        b = len(lens_k)
        per_seq = (max(lens_k) + page - 1) // page
        pool = b * per_seq + 7
        table = torch.randperm(pool, device="cuda")[: b * per_seq].view(b, per_seq).to(torch.int32)
        k_pages, v_pages = randn(pool, page, hkv, d, dtype=dt), randn(pool, page, hkv, d, dtype=dt)
        q = randn(b, hq, d, dtype=dt)
        cu_q = torch.arange(b + 1, dtype=torch.int32, device="cuda")
        used = torch.tensor(lens_k, dtype=torch.int32, device="cuda")
        kv = [(R.gather_pages(k_pages, table[i], n), R.gather_pages(v_pages, table[i], n)) for i, n in enumerate(lens_k)]

        def call():
            return fastattn.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, None, 1, max(lens_k),
                                                   block_table=table, seqused_k=used, return_softmax_lse=True)
        refs = [R.varlen_ref(q, list(range(b + 1)), kv, naive=naive)[:2] for naive in (False, True)]
    elif kind == "varlen_packed":
        lens = [int(x) for x in torch.randint(1, 200, (4,))]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        q, k, v = randn(cu[-1], hq, d, dtype=dt), randn(cu[-1], hkv, d, dtype=dt), randn(cu[-1], hkv, d, dtype=dt)
        cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
        kv = [(k[cu[i]:cu[i + 1]], v[cu[i]:cu[i + 1]]) for i in range(len(lens))]

        def call():
            return fastattn.flash_attn_varlen_func(q, k, v, cu_t, cu_t, max(lens), max(lens), causal=True,
                                                   return_softmax_lse=True)
        refs = [R.varlen_ref(q, cu, kv, causal=True, naive=naive)[:2] for naive in (False, True)]
    else:
        q, k, v = randn(2, 70, hq, d, dtype=dt), randn(2, 300, hkv, d, dtype=dt), randn(2, 300, hkv, d, dtype=dt)

        def call():
            return fastattn.flash_attn_func(q, k, v, window_size=(90, 5), return_softmax_lse=True)
        refs = [R.attention_ref(q, k, v, window_size=(90, 5), naive=naive)[:2] for naive in (False, True)]
    return q, call, refs[0], refs[1]


@pytest.mark.parametrize("kind", ["varlen_decode", "varlen_packed", "dense"])
def test_prefill_outputs_and_stream_from_the_table_match_pythons(seed, monkeypatch, kind):
    """From torch 2.10 flash_attn_varlen_func and flash_attn_func take out, the LSE (and the
    decode kernels' scratch) from torch's allocator and the stream from torch's table, in the
    binding. On a side stream: torch tensors on q's device, the same bits as the path that
    allocates in Python and asks torch.cuda for the stream, and the reference's answer."""
    import fastattn.interface as interface_module

    q, call, (ref, lse_ref), (naive, _) = prefill_call(kind)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, lse = call()
        monkeypatch.setattr(interface_module, "through_exchange_table", lambda x: False)
        py_out, py_lse = call()
    side.synchronize()
    lse_shape = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[0], q.shape[2], q.shape[1])
    assert type(out) is torch.Tensor and type(lse) is torch.Tensor
    assert out.device == q.device and out.shape == q.shape and out.dtype == q.dtype
    assert lse.device == q.device and lse.shape == lse_shape and lse.dtype == torch.float32
    R.assert_bitwise_equal("out (the table's against Python's)", out, py_out)
    R.assert_bitwise_equal("lse (the table's against Python's)", lse, py_lse)
    R.assert_out_close("out", out, ref, naive, factor=3.0)
    R.assert_lse_close("lse", lse, lse_ref.float())


def test_varlen_decode_outputs_from_the_table_in_a_cuda_graph(seed):
    """flash_attn_varlen_func's decode with no out= captured in a CUDA graph: out, the LSE and the
    split-KV scratch from the graph's pool on the capturing stream. Replayed after a new q into the
    poisoned outputs: the eager call's bits for the new q."""
    q, call, _, _ = prefill_call("varlen_decode")
    held = {}

    def run():
        held["out"], held["lse"] = call()

    graph = warm_and_capture(run)
    q.copy_(randn(*q.shape, dtype=q.dtype))
    held["out"].fill_(float("nan"))
    held["lse"].fill_(float("nan"))
    graph.replay()
    eager_out, eager_lse = call()
    torch.cuda.synchronize()
    R.assert_bitwise_equal("out (replay against eager)", held["out"], eager_out)
    R.assert_bitwise_equal("lse (replay against eager)", held["lse"], eager_lse)
