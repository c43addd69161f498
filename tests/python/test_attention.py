"""flash_attn_func and the packed variants against the float64 reference."""

import numpy as np
import pytest

import fastattn
import reference as ref
from helpers import (DTYPES, alibi_slopes, assert_close, assert_lse, assert_probs, draw_sinks,
                     nan_like, naive_and_exact, randn, to64, torch)

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim)
SHAPES = [
    (2, 1, 1, 4, 4, 64),       # single token
    (2, 17, 113, 8, 2, 64),    # seqlen_q < seqlen_k, GQA 4
    (1, 113, 17, 8, 1, 128),   # seqlen_q > seqlen_k (causal rows with no key), MQA 8
    (3, 64, 64, 4, 4, 32),
    (1, 33, 47, 2, 2, 8),      # smallest head_dim
    (1, 9, 70, 2, 1, 256),     # largest head_dim
    (2, 5, 31, 3, 3, 40),      # head_dim not a power of two
]

OPTIONS = ["none", "causal", "window", "causal_window", "alibi_heads", "alibi_batch_heads",
           "softcap", "scale", "all"]


def make_options(rng, name, batch, heads, seqlen_k):
    """flash_attn keyword arguments for option set `name` (random values each run)."""
    kw = {}
    if name in ("causal", "causal_window", "all"):
        kw["causal"] = True
    if name in ("window", "causal_window", "all"):
        kw["window_size"] = (int(rng.integers(0, max(seqlen_k, 1) + 3)),
                             int(rng.integers(-1, 6)) if name == "window" else -1)
    if name == "alibi_heads":
        kw["alibi_slopes"] = alibi_slopes(rng, (heads,))
    if name in ("alibi_batch_heads", "all"):
        kw["alibi_slopes"] = alibi_slopes(rng, (batch, heads))
    if name in ("softcap", "all"):
        kw["softcap"] = float(rng.uniform(0.5, 3.0))
    if name in ("scale", "all"):
        kw["softmax_scale"] = float(rng.uniform(0.05, 0.5))
    return kw


def ref_kwargs(kw):
    return dict(scale=kw.get("softmax_scale"), causal=kw.get("causal", False),
                window=kw.get("window_size", (-1, -1)), softcap=kw.get("softcap", 0.0),
                alibi=kw.get("alibi_slopes"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opt", OPTIONS)
def test_flash_attn_func(rng, dtype, shape, opt):
    b, sq, sk, hq, hkv, d = shape
    q, q64 = randn(rng, (b, sq, hq, d), dtype)
    k, k64 = randn(rng, (b, sk, hkv, d), dtype)
    v, v64 = randn(rng, (b, sk, hkv, d), dtype)
    kw = make_options(rng, opt, b, hq, sk)
    out = nan_like(q)
    res = fastattn.flash_attn_func(q, k, v, return_softmax_lse=True, out=out, **kw)
    o, lse = res
    assert o is out
    (o64, lse64, _), (onaive, _, _) = naive_and_exact(ref.attention_batched, dtype, q64, k64,
                                                      v64, **ref_kwargs(kw))
    assert_close("out", o, o64, onaive, dtype)
    assert_lse("softmax_lse", lse, lse64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["none", "causal", "all"])
def test_return_attn_probs(rng, dtype, opt):
    b, sq, sk, hq, hkv, d = 2, 13, 29, 4, 2, 64
    q, q64 = randn(rng, (b, sq, hq, d), dtype)
    k, k64 = randn(rng, (b, sk, hkv, d), dtype)
    v, v64 = randn(rng, (b, sk, hkv, d), dtype)
    kw = make_options(rng, opt, b, hq, sk)
    out, lse, probs = fastattn.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    (o64, lse64, p64), (onaive, _, _) = naive_and_exact(ref.attention_batched, dtype, q64, k64,
                                                        v64, **ref_kwargs(kw))
    assert tuple(probs.shape) == (b, hq, sq, sk)
    assert_close("out", out, o64, onaive, dtype)
    assert_lse("softmax_lse", lse, lse64)
    assert_probs("attn_probs", probs, p64)
    # The output returned alone (no tuple) by default.
    alone = fastattn.flash_attn_func(q, k, v, **kw)
    assert tuple(alone.shape) == tuple(q.shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attn_probs_lone_key_is_exactly_one(rng, dtype):
    """window_size=(0, 0) leaves each row one visible key (the diagonal), its score pushed far from
    0 by a large softmax_scale (ALiBi on, adding 0 on the diagonal): its probability is exactly 1
    and every other entry exactly 0 (normalising with the kernel's LSE once gave 0.9999962)."""
    b, s, hq, hkv, d = 2, 23, 4, 2, 32
    q, _ = randn(rng, (b, s, hq, d), dtype)
    k, _ = randn(rng, (b, s, hkv, d), dtype)
    v, _ = randn(rng, (b, s, hkv, d), dtype)
    slopes = np.full((b, hq), 8.0, dtype=np.float32)
    _, _, probs = fastattn.flash_attn_func(q, k, v, window_size=(0, 0), alibi_slopes=slopes,
                                           softmax_scale=3.0, return_attn_probs=True)
    eye = np.broadcast_to(np.eye(s, dtype=np.float32), (b, hq, s, s))
    assert np.array_equal(to64(probs), eye), float(np.abs(to64(probs) - eye).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_keys(rng, dtype):
    """seqlen_k == 0: every row sees no key -> output 0, LSE -inf."""
    q, _ = randn(rng, (2, 5, 4, 32), dtype)
    k, _ = randn(rng, (2, 0, 4, 32), dtype)
    v, _ = randn(rng, (2, 0, 4, 32), dtype)
    out, lse = fastattn.flash_attn_func(q, k, v, return_softmax_lse=True, out=nan_like(q))
    assert np.all(to64(out) == 0)
    assert np.all(np.isneginf(to64(lse)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows(rng, dtype):
    """Causal with seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see nothing."""
    b, sq, sk, h, d = 1, 12, 4, 2, 16
    q, _ = randn(rng, (b, sq, h, d), dtype)
    k, _ = randn(rng, (b, sk, h, d), dtype)
    v, _ = randn(rng, (b, sk, h, d), dtype)
    out, lse = fastattn.flash_attn_func(q, k, v, causal=True, return_softmax_lse=True,
                                        out=nan_like(q))
    out, lse = to64(out), to64(lse)
    assert np.all(out[:, : sq - sk] == 0)
    assert np.all(np.isneginf(lse[:, :, : sq - sk]))
    assert np.all(np.isfinite(lse[:, :, sq - sk:]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["none", "causal", "window", "all"])
def test_qkvpacked(rng, dtype, opt):
    b, s, h, d = 2, 37, 4, 64
    qkv, qkv64 = randn(rng, (b, s, 3, h, d), dtype)
    kw = make_options(rng, opt, b, h, s)
    out, lse = fastattn.flash_attn_qkvpacked_func(qkv, return_softmax_lse=True, **kw)
    (o64, lse64, _), (onaive, _, _) = naive_and_exact(
        ref.attention_batched, dtype, qkv64[:, :, 0], qkv64[:, :, 1], qkv64[:, :, 2],
        **ref_kwargs(kw))
    assert_close("out", out, o64, onaive, dtype)
    assert_lse("softmax_lse", lse, lse64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", ["none", "causal", "alibi_batch_heads", "all"])
def test_kvpacked(rng, dtype, opt):
    b, sq, sk, hq, hkv, d = 2, 21, 50, 8, 2, 32
    q, q64 = randn(rng, (b, sq, hq, d), dtype)
    kv, kv64 = randn(rng, (b, sk, 2, hkv, d), dtype)
    kw = make_options(rng, opt, b, hq, sk)
    out = fastattn.flash_attn_kvpacked_func(q, kv, out=nan_like(q), **kw)
    (o64, _, _), (onaive, _, _) = naive_and_exact(ref.attention_batched, dtype, q64,
                                                  kv64[:, :, 0], kv64[:, :, 1], **ref_kwargs(kw))
    assert_close("out", out, o64, onaive, dtype)


def test_deterministic_flag_and_positional_order(rng):
    """flash_attn's positional order: (q, k, v, dropout_p, softmax_scale, causal, window_size,
    softcap, alibi_slopes, deterministic, return_attn_probs)."""
    q, q64 = randn(rng, (1, 8, 2, 16), "float32")
    k, k64 = randn(rng, (1, 8, 2, 16), "float32")
    v, v64 = randn(rng, (1, 8, 2, 16), "float32")
    slopes = alibi_slopes(rng, (2,))
    res = fastattn.flash_attn_func(q, k, v, 0.0, 0.3, True, (3, 0), 2.0, slopes, True, True)
    assert isinstance(res, tuple) and len(res) == 3
    o64, _, _ = ref.attention_batched(q64, k64, v64, scale=0.3, causal=True, window=(3, 0),
                                      softcap=2.0, alibi=slopes)
    assert_close("out", res[0], o64, o64, "float32")
    # deterministic=True and False give the same bits (the forward is always deterministic).
    a = fastattn.flash_attn_func(q, k, v, deterministic=False)
    b = fastattn.flash_attn_func(q, k, v, deterministic=True)
    assert np.array_equal(a, b)


def test_float_output_types(rng):
    q, _ = randn(rng, (1, 4, 2, 16), "float16")
    out, lse, probs = fastattn.flash_attn_func(q, q, q, return_attn_probs=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16
    assert lse.dtype == np.float32 and probs.dtype == np.float32
    assert lse.shape == (1, 2, 4) and probs.shape == (1, 2, 4, 4)


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_torch_bfloat16_types(rng):
    q, _ = randn(rng, (1, 4, 2, 16), "bfloat16")
    out, lse = fastattn.flash_attn_func(q, q, q, return_softmax_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_head_dim(rng, dtype):
    """Every supported head_dim (8..256 in steps of 8), GQA, causal with seqlen_q < seqlen_k."""
    for d in range(8, 257, 8):
        q, q64 = randn(rng, (1, 3, 4, d), dtype)
        k, k64 = randn(rng, (1, 70, 2, d), dtype)
        v, v64 = randn(rng, (1, 70, 2, d), dtype)
        out = fastattn.flash_attn_func(q, k, v, causal=True, out=nan_like(q))
        (o64, _, _), (onaive, _, _) = naive_and_exact(ref.attention_batched, dtype, q64, k64,
                                                      v64, causal=True)
        assert_close(f"out (head_dim {d})", out, o64, onaive, dtype)


def test_zero_sized_batches(rng):
    """batch 0 and seqlen_q 0 are valid, empty problems."""
    q, _ = randn(rng, (2, 0, 4, 32), "float32")
    k, _ = randn(rng, (2, 5, 4, 32), "float32")
    assert fastattn.flash_attn_func(q, k, k, causal=True).shape == (2, 0, 4, 32)
    q, _ = randn(rng, (0, 3, 4, 32), "float32")
    assert fastattn.flash_attn_func(q, q, q).shape == (0, 3, 4, 32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opt", ["none", "causal", "window", "all"])
def test_sinks(rng, dtype, shape, opt):
    """sinks: one more logit per head with a zero value row, in out, softmax_lse and attn_probs
    (rows of a causal call with seqlen_q > seqlen_k see no key: out 0 and lse sinks[h])."""
    b, sq, sk, hq, hkv, d = shape
    q, q64 = randn(rng, (b, sq, hq, d), dtype)
    k, k64 = randn(rng, (b, sk, hkv, d), dtype)
    v, v64 = randn(rng, (b, sk, hkv, d), dtype)
    kw = make_options(rng, opt, b, hq, sk)
    sinks = draw_sinks(rng, hq, dtype)
    out = nan_like(q)
    o, lse, probs = fastattn.flash_attn_func(q, k, v, return_attn_probs=True, out=out,
                                             sinks=sinks, **kw)
    assert o is out
    (o64, lse64, p64), (onaive, _, _) = naive_and_exact(
        ref.attention_batched, dtype, q64, k64, v64, sinks=to64(sinks), **ref_kwargs(kw))
    assert_close("out", o, o64, onaive, dtype)
    assert_lse("softmax_lse", lse, lse64)
    assert_probs("attn_probs", probs, p64)


def test_sinks_s_aux_and_packed_forms(rng):
    """s_aux (vLLM's FlashAttention fork's name) is the same tensor as sinks; the packed forms
    pass either on; both at once is an error that writes nothing."""
    b, s, h, d = 2, 9, 4, 32
    qkv = rng.standard_normal((b, s, 3, h, d)).astype(np.float32)
    sinks = rng.standard_normal(h).astype(np.float32)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    want = fastattn.flash_attn_func(q, k, v, causal=True, sinks=sinks)
    o64, _, _ = ref.attention_batched(to64(q), to64(k), to64(v), causal=True, sinks=to64(sinks))
    assert np.abs(to64(want) - o64).max() <= 1e-5
    assert np.array_equal(fastattn.flash_attn_func(q, k, v, causal=True, s_aux=sinks), want)
    assert np.array_equal(fastattn.flash_attn_qkvpacked_func(qkv, causal=True, s_aux=sinks), want)
    assert np.array_equal(
        fastattn.flash_attn_kvpacked_func(q, qkv[:, :, 1:], causal=True, sinks=sinks), want)
    out = nan_like(q)
    with pytest.raises(TypeError, match="sinks and s_aux"):
        fastattn.flash_attn_func(q, k, v, out=out, sinks=sinks, s_aux=sinks)
    assert np.isnan(out).all()


@pytest.mark.parametrize("sinks,error,message", [
    (np.zeros(5, np.float32), ValueError, r"sinks.*\(Hq\)"),
    (np.zeros((4, 1), np.float32), ValueError, r"sinks"),
    (np.zeros(4, np.float64), TypeError, r"sinks.*float32"),
])
def test_sinks_errors(rng, sinks, error, message):
    """Bad sinks are refused, naming the argument, before the output is written."""
    q = rng.standard_normal((2, 5, 4, 32)).astype(np.float32)
    out = nan_like(q)
    with pytest.raises(error, match=message):
        fastattn.flash_attn_func(q, q, q, out=out, sinks=sinks)
    assert np.isnan(out).all()
