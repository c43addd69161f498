"""FlashInfer's single-request decode (fastattn.single_decode_with_kv_cache) on the CPU against the
float64 reference: both layouts, GQA / MQA / MHA, every option, the calibration scales, empty and
one-key caches; the inputs unchanged; and its errors, each naming the argument."""

import numpy as np
import pytest

import fastattn
import reference as ref
from helpers import DTYPES, assert_close, assert_lse, randn, to64, torch

FACTOR = 3.0  # FlashAttention's KV-cache rule


def single_inputs(rng, kv_len, hq, hkv, d, dtype, layout):
    """q (Hq, D), k and v in `layout` ((L, Hkv, D) "NHD" or (Hkv, L, D) "HND") in the dtype, and
    their float64 values, k64 / v64 as (L, Hkv, D)."""
    q, q64 = randn(rng, (hq, d), dtype)
    k, k64 = randn(rng, (kv_len, hkv, d), dtype)
    v, v64 = randn(rng, (kv_len, hkv, d), dtype)
    if layout == "HND":
        k, v = (x.transpose(0, 1).contiguous() if torch is not None and isinstance(x, torch.Tensor)
                else np.ascontiguousarray(x.swapaxes(0, 1)) for x in (k, v))
    return q, q64, k, k64, v, v64


def reference(q64, k64, v64, rnd=None, window_left=-1, softcap=0.0, scale=None):
    """The query after the request's last key: out (Hq, D) and lse (Hq,)."""
    n = k64.shape[0]
    out, lse, _ = ref.attention_rows(q64[None], k64, v64, np.array([n - 1]), np.arange(n),
                                     ref.default_scale(q64.shape[1], scale), softcap, None,
                                     window_left, -1, rnd)
    return out[0], lse[:, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (4, 4, 32), (6, 1, 40)])
def test_single_decode(rng, dtype, layout, hq, hkv, d):
    """A random cache length, plain and with window_left, logits_soft_cap and sm_scale: out and
    the natural-log LSE against the float64 reference; k and v unchanged; return_lse=False, and
    rope_scale / rope_theta (without effect under "NONE"), give the same bits."""
    kv_len = int(rng.integers(2, 700))
    q, q64, k, k64, v, v64 = single_inputs(rng, kv_len, hq, hkv, d, dtype, layout)
    k_before, v_before = to64(k), to64(v)
    rnd = ref.rounder(dtype)
    window = int(rng.integers(0, kv_len))
    for opts in ({}, dict(window_left=window, logits_soft_cap=float(rng.uniform(1, 8)),
                          sm_scale=float(rng.uniform(0.05, 0.4)))):
        ref_kw = dict(window_left=opts.get("window_left", -1), softcap=opts.get("logits_soft_cap", 0.0),
                      scale=opts.get("sm_scale"))
        o64, lse64 = reference(q64, k64, v64, **ref_kw)
        naive, _ = reference(q64, k64, v64, rnd=rnd, **ref_kw)
        out, lse = fastattn.single_decode_with_kv_cache(q, k, v, kv_layout=layout, return_lse=True, **opts)
        assert tuple(out.shape) == (hq, d) and tuple(lse.shape) == (hq,)
        assert_close(f"out {opts}", out, o64, naive, dtype, factor=FACTOR)
        assert_lse(f"lse {opts}", lse, lse64)
        alone = fastattn.single_decode_with_kv_cache(q, k, v, kv_layout=layout, **opts)
        assert np.array_equal(to64(alone), to64(out)), "return_lse=False changed the output"
        # rope_scale / rope_theta parametrise FlashInfer's fused RoPE only: inert with "NONE".
        roped = fastattn.single_decode_with_kv_cache(q, k, v, kv_layout=layout, rope_scale=2.0,
                                                     rope_theta=5e5, **opts)
        assert np.array_equal(to64(roped), to64(out)), "rope_scale / rope_theta changed the output"
    assert np.array_equal(to64(k), k_before) and np.array_equal(to64(v), v_before), "the call wrote k or v"


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_decode_calibration_scales(rng, dtype):
    """q_scale, k_scale, v_scale: the scores scaled by sm_scale * q_scale * k_scale before the soft
    cap (the LSE is theirs), out by v_scale; 1.0 changes no bit."""
    hq, hkv, d = 8, 2, 64
    q, q64, k, k64, v, v64 = single_inputs(rng, int(rng.integers(50, 400)), hq, hkv, d, dtype, "NHD")
    qs, ks, vs = (float(x) for x in rng.uniform(0.3, 2.5, size=3))
    scale = ref.default_scale(d, None) * qs * ks
    rnd = ref.rounder(dtype)
    o64, lse64 = reference(q64, k64, v64, softcap=5.0, scale=scale)
    naive, _ = reference(q64, k64, v64, rnd=rnd, softcap=5.0, scale=scale)
    out, lse = fastattn.single_decode_with_kv_cache(q, k, v, q_scale=qs, k_scale=ks, v_scale=vs,
                                                    logits_soft_cap=5.0, return_lse=True)
    assert_close("out", out, o64 * vs, rnd(rnd(naive) * vs), dtype, factor=FACTOR)
    assert_lse("lse", lse, lse64)
    plain = fastattn.single_decode_with_kv_cache(q, k, v)
    ones = fastattn.single_decode_with_kv_cache(q, k, v, q_scale=1.0, k_scale=1.0, v_scale=1.0)
    assert np.array_equal(to64(ones), to64(plain))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_single_decode_empty_and_one_key(rng, layout):
    """kv_len 0: out 0 and LSE -inf; kv_len 1: out is that key's value row, LSE its scaled score."""
    hq, hkv, d = 4, 2, 16
    q, _, k, _, v, _ = single_inputs(rng, 0, hq, hkv, d, "float32", layout)
    out, lse = fastattn.single_decode_with_kv_cache(q, k, v, kv_layout=layout, return_lse=True)
    assert np.array_equal(out, np.zeros((hq, d), np.float32)) and np.isneginf(lse).all()
    q, q64, k, k64, v, v64 = single_inputs(rng, 1, hq, hkv, d, "float32", layout)
    out, lse = fastattn.single_decode_with_kv_cache(q, k, v, kv_layout=layout, return_lse=True)
    group = hq // hkv
    want = v64[0, np.arange(hq) // group]
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    scores = (q64 * k64[0, np.arange(hq) // group]).sum(-1) / np.sqrt(d)
    np.testing.assert_allclose(lse, scores, rtol=1e-5, atol=1e-5)


def test_single_decode_errors(rng):
    """Each bad argument raises an error naming it, before anything runs."""
    hq, hkv, d = 4, 2, 16
    q, _, k, _, v, _ = single_inputs(rng, 10, hq, hkv, d, "float32", "NHD")
    call = fastattn.single_decode_with_kv_cache
    with pytest.raises(ValueError, match=r"q must be \(num_qo_heads, head_dim\), got shape \(1, 4, 16\)"):
        call(q[None], k, v)
    with pytest.raises(ValueError, match=r"k must be \(kv_len, num_kv_heads, head_dim\) for kv_layout 'NHD'"):
        call(q, k[0], v)
    with pytest.raises(ValueError, match=r"v must be \(num_kv_heads, kv_len, head_dim\) for kv_layout 'HND'"):
        call(q, k, v[None], kv_layout="HND")
    with pytest.raises(ValueError, match=r"v must have k's shape \(10, 2, 16\), got \(9, 2, 16\)"):
        call(q, k, v[:9])
    with pytest.raises(TypeError, match=r"v must have q's dtype \(float32\), got float16"):
        call(q, k, v.astype(np.float16))
    with pytest.raises(ValueError, match=r"k's head_dim \(last dimension\) must be q's \(16\), got 8"):
        call(q, k[..., :8], v[..., :8])
    with pytest.raises(ValueError, match=r"num_qo_heads \(4\) must be a multiple of num_kv_heads, got num_kv_heads 3"):
        call(q, np.zeros((10, 3, d), np.float32), np.zeros((10, 3, d), np.float32))
    with pytest.raises(ValueError, match=r"kv_layout must be 'NHD' .* or 'HND' .*, got 'NDH'"):
        call(q, k, v, kv_layout="NDH")
    with pytest.raises(NotImplementedError, match="pos_encoding_mode must be 'NONE'.*got 'ROPE_LLAMA'"):
        call(q, k, v, pos_encoding_mode="ROPE_LLAMA")
    with pytest.raises(TypeError, match="rope_theta must be a number, got str"):
        call(q, k, v, rope_theta="1e4")
    with pytest.raises(ValueError, match=r"window_left must be >= -1 \(-1: no bound\), got -2"):
        call(q, k, v, window_left=-2)
    with pytest.raises(ValueError, match="v_scale must be finite, got nan"):
        call(q, k, v, v_scale=float("nan"))
    with pytest.raises(TypeError, match="k must be an array .*, got list"):
        call(q, k.tolist(), v)
    strided = np.zeros((10, hkv, 2 * d), np.float32)[..., ::2]  # k's shape, every other element
    with pytest.raises(ValueError, match=r"^k must be contiguous in its last dimension \(stride 1\), got stride 2$"):
        call(q, strided, v)
    with pytest.raises(ValueError, match=r"^v must be contiguous in its last dimension \(stride 1\), got stride 2$"):
        call(q, k.transpose(1, 0, 2).copy(), strided.transpose(1, 0, 2), kv_layout="HND")


def test_single_decode_binding_checks_its_outputs(rng):
    """The binding's single_decode_forward (the one call single_decode_with_kv_cache makes) names
    an output of the wrong rank, and one it was to allocate where q's type has no DLPack exchange
    table (numpy); a refused call writes nothing. (The allocation through torch's table is tested
    on the GPU: tests/gpu/test_single_decode_gpu.py.)"""
    hq, hkv, d = 4, 2, 16
    q, _, k, _, v, _ = single_inputs(rng, 10, hq, hkv, d, "float32", "NHD")
    out = np.full((hq, d), np.nan, np.float32)
    lse = np.full((hq,), np.nan, np.float32)
    op = fastattn._C.single_decode_forward
    with pytest.raises(ValueError, match=r"argument 'out' must be \(num_qo_heads, head_dim\), got shape \(1, 4, 16\)"):
        op(q, k, v, out[None], lse, return_lse=True)
    with pytest.raises(ValueError, match=r"argument 'lse' must be \(num_qo_heads,\), got shape \(4, 1\)"):
        op(q, k, v, out, lse[:, None], return_lse=True)
    with pytest.raises(ValueError, match=r"argument 'out' is required: ndarray has no DLPack exchange table to allocate it through"):
        op(q, k, v)
    with pytest.raises(ValueError, match=r"argument 'lse' is required: ndarray has no DLPack exchange table to allocate it through"):
        op(q, k, v, out, None, return_lse=True)
    with pytest.raises(ValueError, match=r"sm_scale \* q_scale \* k_scale must be finite, got inf"):
        op(q, k, v, out, sm_scale=1e300, scale_factor=1e300)
    assert np.isnan(out).all() and np.isnan(lse).all()
    got_out, got_lse = op(q, k, v, out, lse, return_lse=True)  # right ranks: both written, and returned
    assert got_out is out and got_lse is lse
    assert not np.isnan(out).any() and not np.isnan(lse).any()
