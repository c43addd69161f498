"""GPU: fastattn.single_decode_with_kv_cache (FlashInfer's single-request decode) against the
float64 reference, with FlashAttention's KV-cache rule (3x the naive in-dtype error) and LSE within
1e-3: fp16 / bf16, both layouts (HND read in place as a strided view), GQA 1 / 4 / 8 and MQA,
head_dim 64 / 128 / 256, cache lengths 0 to 131072 (one sequence: the split-KV heuristic cuts it
over the SMs), window_left, soft cap, sm_scale and the calibration scales; k and v unchanged; two
calls bitwise equal."""

import pytest

torch = pytest.importorskip("torch")

import fastattn  # noqa: E402
import fastattn.single_decode as single_decode_module  # noqa: E402

import gpu_reference as R  # noqa: E402
from gpu_helpers import randn  # noqa: E402
import test_prefill as P  # noqa: E402  (its helpers; importing it runs no test)

DTYPES, DTYPE_IDS = P.DTYPES, P.DTYPE_IDS
FACTOR = 3.0  # the KV-cache rule


def check_single(dtype, kv_len, hq, hkv, d, layout, window_left=-1, softcap=None, sm_scale=None,
                 scales=None):
    """One call (and a second, bitwise the same) against the reference; k and v unchanged."""
    q = randn(hq, d, dtype=dtype)
    k = randn(kv_len, hkv, d, dtype=dtype)
    v = randn(kv_len, hkv, d, dtype=dtype)
    k_in, v_in = (k, v) if layout == "NHD" else (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
    k_before, v_before = k_in.clone(), v_in.clone()
    qs, ks, vs = scales or (None, None, None)
    kw = dict(kv_layout=layout, window_left=window_left, logits_soft_cap=softcap, sm_scale=sm_scale,
              q_scale=qs, k_scale=ks, v_scale=vs)
    out, lse = fastattn.single_decode_with_kv_cache(q, k_in, v_in, return_lse=True, **kw)
    again = fastattn.single_decode_with_kv_cache(q, k_in, v_in, **kw)
    torch.cuda.synchronize()
    scale = (d ** -0.5 if sm_scale is None else sm_scale) * (qs or 1.0) * (ks or 1.0)
    ref_kw = dict(softmax_scale=scale, window_size=(window_left, 0), softcap=softcap or 0.0)
    ref, lse_ref, _ = R.attention_ref(q[None, None], k[None], v[None], **ref_kw)
    naive, _, _ = R.attention_ref(q[None, None], k[None], v[None], naive=True, **ref_kw)
    vs = vs or 1.0
    naive = (naive.to(dtype) * vs).to(dtype).to(torch.float64)  # stored in the dtype, then scaled
    assert out.shape == (hq, d) and out.dtype == dtype and lse.shape == (hq,)
    R.assert_out_close("out", out, ref[0, 0] * vs, naive[0, 0], factor=FACTOR)
    R.assert_lse_close("lse", lse, lse_ref[0, :, 0].float())
    R.assert_bitwise_equal("out (second call)", out, again)
    assert torch.equal(k_in, k_before) and torch.equal(v_in, v_before), "the call wrote k or v"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (16, 16, 64), (8, 1, 256), (64, 8, 128)],
                         ids=["gqa4-d128", "mha-d64", "mqa-d256", "gqa8-d128"])
@pytest.mark.parametrize("kv_len", [1, 777, 8192, 32768])
def test_single_decode(seed, dtype, layout, hq, hkv, d, kv_len):
    """Plain, at each layout, group, head_dim and cache length."""
    check_single(dtype, kv_len, hq, hkv, d, layout)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_single_decode_options(seed, layout):
    """window_left (inside the cache, 0: the last key only), soft cap, sm_scale and the calibration
    scales, on a split cache."""
    for window in (seed.randrange(1, 5000), 0):
        check_single(torch.bfloat16, 9000, 32, 8, 128, layout, window_left=window,
                     softcap=seed.uniform(5, 30), sm_scale=seed.uniform(0.05, 0.2),
                     scales=tuple(seed.uniform(0.3, 2.5) for _ in range(3)))


def test_single_decode_long_and_empty(seed):
    """131072 keys (the most the issue names), and an empty cache: out 0, LSE -inf."""
    check_single(torch.float16, 131072, 32, 8, 128, "NHD")
    q = randn(8, 64, dtype=torch.bfloat16)
    kv = torch.empty(0, 2, 64, dtype=torch.bfloat16, device="cuda")
    out, lse = fastattn.single_decode_with_kv_cache(q, kv, kv, return_lse=True)
    torch.cuda.synchronize()
    assert not out.float().any() and torch.isneginf(lse).all()


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_single_decode_both_paths_agree(seed, layout, monkeypatch):
    """From torch 2.10 the binding allocates out and lse and reads the current stream through
    torch's exchange table; the other path (outputs allocated in Python, the stream from
    torch.cuda) gives the same bits, on a side stream. The outputs are torch tensors on q's
    device."""
    q, k, v = randn(32, 128, dtype=torch.bfloat16), randn(8, 5000, 128, dtype=torch.bfloat16), \
        randn(8, 5000, 128, dtype=torch.bfloat16)
    if layout == "NHD":
        k, v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, lse = fastattn.single_decode_with_kv_cache(q, k, v, kv_layout=layout, return_lse=True)
        monkeypatch.setattr(single_decode_module, "through_exchange_table", lambda x: False)
        py_out, py_lse = fastattn.single_decode_with_kv_cache(q, k, v, kv_layout=layout, return_lse=True)
    side.synchronize()
    assert type(out) is torch.Tensor and type(lse) is torch.Tensor
    assert out.device == q.device and out.shape == (32, 128) and out.dtype == torch.bfloat16
    assert lse.device == q.device and lse.shape == (32,) and lse.dtype == torch.float32
    R.assert_bitwise_equal("out (Python's outputs against the table's)", out, py_out)
    R.assert_bitwise_equal("lse (Python's outputs against the table's)", lse, py_lse)
    k_nhd, v_nhd = (k, v) if layout == "NHD" else (k.transpose(0, 1), v.transpose(0, 1))
    ref, lse_ref, _ = R.attention_ref(q[None, None], k_nhd[None], v_nhd[None])
    naive, _, _ = R.attention_ref(q[None, None], k_nhd[None], v_nhd[None], naive=True)
    R.assert_out_close("out", out, ref[0, 0], naive[0, 0], factor=FACTOR)
    R.assert_lse_close("lse", lse, lse_ref[0, :, 0].float())


def test_single_decode_in_a_cuda_graph(seed):
    """Captured in a CUDA graph (the outputs and the split-KV scratch from torch's allocator, on
    the capturing stream) and replayed with a new q: the new q's answer."""
    q, k, v = randn(32, 128, dtype=torch.float16), randn(9000, 8, 128, dtype=torch.float16), \
        randn(9000, 8, 128, dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm: torch's caching allocator, outside the capture
        for _ in range(2):
            fastattn.single_decode_with_kv_cache(q, k, v, return_lse=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = fastattn.single_decode_with_kv_cache(q, k, v, return_lse=True)
    q.copy_(randn(32, 128, dtype=torch.float16))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref, lse_ref, _ = R.attention_ref(q[None, None], k[None], v[None])
    naive, _, _ = R.attention_ref(q[None, None], k[None], v[None], naive=True)
    R.assert_out_close("out", out, ref[0, 0], naive[0, 0], factor=FACTOR)
    R.assert_lse_close("lse", lse, lse_ref[0, :, 0].float())


def test_single_decode_names_k_and_v_on_another_device():
    """k or v on the host beside a q on the GPU: the error names them as the caller did (not the
    op's k_cache / v_cache), and the output given is left as it was."""
    q = randn(8, 64, dtype=torch.float16)
    k = randn(100, 2, 64, dtype=torch.float16)
    out = torch.full_like(q, 7.0)
    with pytest.raises(ValueError, match=r"^k must be on q's device \(cuda:0\), got cpu$"):
        fastattn._C.single_decode_forward(q, k.cpu(), k, out)
    with pytest.raises(ValueError, match=r"^v must be on q's device \(cuda:0\), got cpu$"):
        fastattn.single_decode_with_kv_cache(q, k, k.cpu())
    torch.cuda.synchronize()
    assert bool((out == 7.0).all()), "a refused call wrote its output"
