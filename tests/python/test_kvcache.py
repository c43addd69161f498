"""flash_attn_with_kvcache against the float64 reference (3x tolerance, FlashAttention's rule for
KV-cache tests), plus KV-cache safety: after the call every cache entry outside the appended
slots is bit-for-bit unchanged, and the appended slots hold the (rotated) new keys / values."""

import numpy as np
import pytest

import fastattn
import reference as ref
from helpers import (DTYPES, alibi_slopes, assert_close, assert_lse, int32, max_abs, nan_like,
                     randn, to64, torch)


def clone(x):
    return x.clone() if torch is not None and isinstance(x, torch.Tensor) else x.copy()


def raw_bytes(x):
    """The cache's bytes as a uint8 numpy array of shape (..., itemsize) for exact comparison."""
    if torch is not None and isinstance(x, torch.Tensor):
        a = x.contiguous().view(torch.int16).numpy()
    else:
        a = np.ascontiguousarray(x)
    return a.view(np.uint8).reshape(tuple(x.shape) + (-1,))


# Each config: name -> dict of the scenario's knobs.
#   B batch, Sq query rows, Snew appended rows (0: no k / v), Hq / Hkv heads, D head_dim,
#   paged page size (None: contiguous cache), rotary None / "interleaved" / "neox",
#   rotary_fraction of head_dim rotated, batch_idx (cache rows permuted, more rows than batch),
#   leftpad, seqlens_int (cache_seqlens as a Python int), causal, window, alibi, softcap, splits,
#   sinks (attention sinks, one per query head).
BASE = dict(B=3, Sq=1, Snew=1, Hq=8, Hkv=2, D=64, paged=None, rotary=None, rotary_fraction=1.0,
            batch_idx=False, leftpad=False, seqlens_int=False, causal=False, window=False,
            alibi=False, softcap=False, splits=0, cache_len=96, sinks=False)

CONFIGS = {
    "decode": {},
    "decode_no_append": dict(Snew=0),
    "decode_mqa": dict(Hq=8, Hkv=1),
    "decode_mha": dict(Hq=4, Hkv=4),
    "prefill_chunk_causal": dict(Sq=5, Snew=5, causal=True),
    "q_longer_than_append": dict(Sq=4, Snew=2, causal=True),
    "noncausal_multi_q": dict(Sq=3, Snew=3),
    "window": dict(Sq=4, Snew=4, window=True),
    "alibi_softcap": dict(Sq=2, Snew=2, causal=True, alibi=True, softcap=True),
    "seqlens_int": dict(seqlens_int=True, Sq=2, Snew=2, causal=True),
    "batch_idx": dict(batch_idx=True),
    "leftpad": dict(leftpad=True, Sq=3, Snew=3, causal=True),
    "rotary_interleaved": dict(rotary="interleaved", Sq=3, Snew=3, causal=True),
    "rotary_neox": dict(rotary="neox", Sq=3, Snew=3, causal=True),
    "rotary_neox_noncausal": dict(rotary="neox", Sq=2, Snew=2),
    "rotary_partial_interleaved": dict(rotary="interleaved", rotary_fraction=0.5),
    "rotary_partial_neox_window": dict(rotary="neox", rotary_fraction=0.25, Sq=2, Snew=2,
                                       window=True),
    "rotary_leftpad_batch_idx": dict(rotary="interleaved", leftpad=True, batch_idx=True, Sq=2,
                                     Snew=2, causal=True),
    "splits1": dict(splits=1, cache_len=300),
    "splits3": dict(splits=3, cache_len=300),
    "splits3_prefill": dict(splits=3, Sq=4, Snew=4, causal=True, cache_len=300),
    "paged1": dict(paged=1),
    "paged5_rotary": dict(paged=5, rotary="neox", Sq=2, Snew=2, causal=True),
    "paged16_batch_idx": dict(paged=16, batch_idx=True),
    "paged16_leftpad_splits3": dict(paged=16, leftpad=True, splits=3, cache_len=200),
    "paged256": dict(paged=256, Sq=2, Snew=2, causal=True),
    "paged5_no_append_alibi": dict(paged=5, Snew=0, alibi=True),
    "everything": dict(paged=16, rotary="interleaved", rotary_fraction=0.5, batch_idx=True,
                       leftpad=True, causal=True, window=True, alibi=True, softcap=True,
                       splits=3, Sq=3, Snew=3, cache_len=160),
    "sinks": dict(sinks=True, Snew=0),
    "sinks_splits3_paged16": dict(sinks=True, paged=16, splits=3, Sq=2, Snew=2, causal=True,
                                  softcap=True, window=True, cache_len=200),
}


def build_case(rng, dtype, cfg):
    c = dict(BASE, **cfg)
    B, Sq, Snew, Hq, Hkv, D = c["B"], c["Sq"], c["Snew"], c["Hq"], c["Hkv"], c["D"]
    cache_len = c["cache_len"]
    b_cache = B + 2 if c["batch_idx"] else B
    # Tokens already cached per sequence (room left for Snew), including 0 and a full cache.
    seqlens = rng.integers(0, cache_len - Snew + 1, size=B)
    seqlens[0] = 0 if Snew > 0 else 1
    seqlens[-1] = cache_len - Snew
    if c["seqlens_int"]:
        seqlens[:] = seqlens[-1]
    leftpad = None
    if c["leftpad"]:
        leftpad = np.array([rng.integers(0, s + 1) for s in seqlens])
    batch_idx = rng.permutation(b_cache)[:B] if c["batch_idx"] else None
    q, q64 = randn(rng, (B, Sq, Hq, D), dtype)
    knew = vnew = k64n = v64n = None
    if Snew:
        knew, k64n = randn(rng, (B, Snew, Hkv, D), dtype)
        vnew, v64n = randn(rng, (B, Snew, Hkv, D), dtype)
    block_table = None
    if c["paged"]:
        ps = c["paged"]
        pages_per_row = -(-cache_len // ps)
        num_pages = pages_per_row * b_cache + 2
        perm = rng.permutation(num_pages)
        block_table = perm[: pages_per_row * b_cache].reshape(b_cache, pages_per_row)
        block_table = int32(block_table)
        kc, kc64 = randn(rng, (num_pages, ps, Hkv, D), dtype)
        vc, vc64 = randn(rng, (num_pages, ps, Hkv, D), dtype)
    else:
        kc, kc64 = randn(rng, (b_cache, cache_len, Hkv, D), dtype)
        vc, vc64 = randn(rng, (b_cache, cache_len, Hkv, D), dtype)
    cos = sin = cos64 = sin64 = None
    if c["rotary"]:
        rd = int(D * c["rotary_fraction"])
        rd -= rd % 2
        s_ro = cache_len + 4
        ang = rng.uniform(0, 2 * np.pi, size=(s_ro, rd // 2))
        cos_f, sin_f = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        if dtype == "bfloat16":
            cos = torch.from_numpy(cos_f).to(torch.bfloat16)
            sin = torch.from_numpy(sin_f).to(torch.bfloat16)
        else:
            cos, sin = cos_f.astype(dtype), sin_f.astype(dtype)
        cos64, sin64 = to64(cos), to64(sin)
    kw = dict(causal=c["causal"])
    if c["window"]:
        kw["window_size"] = (int(rng.integers(0, 20)), 0 if c["causal"] else int(rng.integers(0, 3)))
    if c["alibi"]:
        kw["alibi_slopes"] = alibi_slopes(rng, (B, Hq))
    if c["softcap"]:
        kw["softcap"] = float(rng.uniform(0.5, 3.0))
    if c["sinks"]:
        sinks = (rng.standard_normal(Hq) * 3).astype(np.float32)
        kw["sinks"] = torch.from_numpy(sinks) if dtype == "bfloat16" else sinks
    return dict(c=c, q=q, q64=q64, knew=knew, vnew=vnew, k64n=k64n, v64n=v64n, kc=kc, vc=vc,
                kc64=kc64, vc64=vc64, cos=cos, sin=sin, cos64=cos64, sin64=sin64,
                seqlens=seqlens, leftpad=leftpad, batch_idx=batch_idx, block_table=block_table,
                kw=kw)


def run_fastattn(t, return_lse=True):
    c = t["c"]
    seqlens = int(t["seqlens"][0]) if c["seqlens_int"] else int32(t["seqlens"])
    out = nan_like(t["q"])
    res = fastattn.flash_attn_with_kvcache(
        t["q"], t["kc"], t["vc"], t["knew"], t["vnew"], rotary_cos=t["cos"], rotary_sin=t["sin"],
        cache_seqlens=seqlens,
        cache_batch_idx=None if t["batch_idx"] is None else int32(t["batch_idx"]),
        cache_leftpad=None if t["leftpad"] is None else int32(t["leftpad"]),
        block_table=t["block_table"], rotary_interleaved=c["rotary"] != "neox",
        num_splits=c["splits"], return_softmax_lse=return_lse, out=out, **t["kw"])
    if return_lse:
        assert res[0] is out
    return res


def _r(x, rnd):
    return x if rnd is None else rnd(x).astype(np.float64)


def with_sinks(out, lse, sinks):
    """(out (B, Sq, Hq, D), lse (B, Hq, Sq)) of attention without sinks -> with them, by their
    definition in float64: one more logit sinks[h] per softmax with a zero value row, so
    lse' = log(exp(lse) + exp(sink)) and out' = out * exp(lse - lse') (0 where lse is -inf)."""
    s = to64(sinks)[None, :, None]
    merged = np.logaddexp(lse, s)
    with np.errstate(invalid="ignore"):
        weight = np.where(np.isneginf(lse), 0.0, np.exp(lse - merged))
    return out * weight.transpose(0, 2, 1)[..., None], merged


def run_reference(t, dtype, rnd):
    c = t["c"]
    kw = t["kw"]
    res = ref.attention_kvcache(
        t["q64"], t["kc64"], t["vc64"], t["k64n"], t["v64n"], t["cos64"], t["sin64"],
        interleaved=c["rotary"] != "neox", cache_seqlens=t["seqlens"],
        cache_batch_idx=t["batch_idx"], cache_leftpad=t["leftpad"],
        block_table=t["block_table"], causal=kw.get("causal", False),
        window=kw.get("window_size", (-1, -1)), softcap=kw.get("softcap", 0.0),
        alibi=kw.get("alibi_slopes"), rnd=rnd, store_rnd=ref.rounder(dtype))
    if "sinks" in kw:
        out, lse = with_sinks(res[0], res[1], kw["sinks"])
        # The naive in-dtype computation stores its output in the dtype, after the sink too.
        res = (_r(out, rnd), lse) + tuple(res[2:])
    return res


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_kvcache(rng, dtype, config):
    t = build_case(rng, dtype, CONFIGS[config])
    kc_before, vc_before = raw_bytes(t["kc"]), raw_bytes(t["vc"])
    out, lse = run_fastattn(t)
    o64, lse64, kexp, vexp, written = run_reference(t, dtype, None)
    onaive, lsenaive, knaive, vnaive, _ = run_reference(t, dtype, ref.rounder(dtype))
    assert_close("out", out, o64, onaive, dtype, factor=3.0)
    # Rotated q / k are rounded to the input dtype by the op (the cache holds that dtype), so
    # the LSE bound includes the naive-in-dtype error there.
    assert_lse("softmax_lse", lse, lse64, naive=lsenaive if t["cos"] is not None else None)

    # KV-cache safety: nothing outside the appended slots changed, bit for bit.
    kc_after, vc_after = raw_bytes(t["kc"]), raw_bytes(t["vc"])
    keep = ~written
    assert np.array_equal(kc_after[keep], kc_before[keep]), "k_cache changed outside the append"
    assert np.array_equal(vc_after[keep], vc_before[keep]), "v_cache changed outside the append"
    if written.any():
        kc_new, vc_new = to64(t["kc"])[written], to64(t["vc"])[written]
        # v is copied as is; k is copied or rotated (rounded once to the cache dtype).
        assert np.array_equal(vc_new, vexp[written]), "appended v differs from v"
        if t["cos"] is None:
            assert np.array_equal(kc_new, kexp[written]), "appended k differs from k"
        else:
            assert_close("appended rotated k", kc_new, kexp[written], knaive[written], dtype,
                         factor=3.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_seqlens_none_means_full_cache(rng, dtype):
    """flash_attn's convention: without cache_seqlens (and without k / v) the whole cache is
    attended."""
    B, S, H, D = 2, 40, 4, 32
    q, q64 = randn(rng, (B, 1, H, D), dtype)
    kc, kc64 = randn(rng, (B, S, H, D), dtype)
    vc, vc64 = randn(rng, (B, S, H, D), dtype)
    out = fastattn.flash_attn_with_kvcache(q, kc, vc)
    o64, _, _ = ref.attention_batched(q64, kc64, vc64)
    onaive, _, _ = ref.attention_batched(q64, kc64, vc64, rnd=ref.rounder(dtype))
    assert_close("out", out, o64, onaive, dtype, factor=3.0)


def test_num_splits_bitwise_reproducible_across_batches(rng):
    """A fixed num_splits gives bitwise identical results for a sequence whatever the batch."""
    t = build_case(rng, "float16", dict(B=4, Snew=0, splits=3, cache_len=500))
    seqlens = int32(t["seqlens"])
    full = fastattn.flash_attn_with_kvcache(t["q"], t["kc"], t["vc"], cache_seqlens=seqlens,
                                            num_splits=3)
    for b in range(4):
        one = fastattn.flash_attn_with_kvcache(t["q"][b:b + 1], t["kc"][b:b + 1],
                                               t["vc"][b:b + 1], cache_seqlens=seqlens[b:b + 1],
                                               num_splits=3)
        assert np.array_equal(one[0], full[b]), f"sequence {b} differs with a different batch"


@pytest.mark.parametrize("splits", [0, 1, 2, 3, 7, 1000])
def test_num_splits_agree(rng, splits):
    """All split counts compute the same attention (up to rounding)."""
    t = build_case(rng, "float32", dict(B=2, Snew=1, splits=splits, cache_len=400))
    out, lse = run_fastattn(t)
    o64, lse64, _, _, _ = run_reference(t, "float32", None)
    assert_close("out", out, o64, o64, "float32")
    assert_lse("softmax_lse", lse, lse64)


def test_repeated_decode_steps(rng):
    """Decode several steps, appending one token each: the cache grows like a real generation."""
    B, H, D, S = 2, 4, 32, 16
    kc = np.zeros((B, S, H, D), np.float32)
    vc = np.zeros((B, S, H, D), np.float32)
    ks, vs = [], []
    for step in range(6):
        q = rng.standard_normal((B, 1, H, D)).astype(np.float32)
        k = rng.standard_normal((B, 1, H, D)).astype(np.float32)
        v = rng.standard_normal((B, 1, H, D)).astype(np.float32)
        ks.append(k), vs.append(v)
        out = fastattn.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=step)
        kall, vall = np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)
        o64, _, _ = ref.attention_batched(q.astype(np.float64), kall.astype(np.float64),
                                          vall.astype(np.float64))
        assert max_abs(out, o64) <= 1e-5
    assert np.array_equal(kc[:, :6], np.concatenate(ks, axis=1))
    assert np.all(kc[:, 6:] == 0)


@pytest.mark.parametrize("sinks,error,message", [
    (np.zeros(5, np.float32), ValueError, r"sinks.*\(Hq\)"),
    (np.zeros((1, 4), np.float32), ValueError, r"sinks"),
    (np.zeros(4, np.float16), TypeError, r"sinks.*float32"),
])
def test_sinks_errors(rng, sinks, error, message):
    """Bad sinks are refused before anything is written: the output and the cache (with an
    append pending) stay as they were."""
    B, H, D, S = 2, 4, 32, 16
    q = rng.standard_normal((B, 1, H, D)).astype(np.float32)
    k = rng.standard_normal((B, 1, H, D)).astype(np.float32)
    kc = rng.standard_normal((B, S, H, D)).astype(np.float32)
    vc = rng.standard_normal((B, S, H, D)).astype(np.float32)
    before = kc.copy(), vc.copy()
    out = np.full_like(q, np.nan)
    with pytest.raises(error, match=message):
        fastattn.flash_attn_with_kvcache(q, kc, vc, k, k, cache_seqlens=3, out=out, sinks=sinks)
    assert np.isnan(out).all()
    assert np.array_equal(kc, before[0]) and np.array_equal(vc, before[1])


def test_sinks_as_s_aux(rng):
    """s_aux (vLLM's FlashAttention fork's name) is the same argument as sinks: bitwise the same
    result, appended cache included; both at once is refused before the append."""
    B, H, D, S = 2, 4, 32, 16
    q = rng.standard_normal((B, 1, H, D)).astype(np.float32)
    k = rng.standard_normal((B, 1, H, D)).astype(np.float32)
    sinks = (rng.standard_normal(H) * 2).astype(np.float32)
    caches = [rng.standard_normal((B, S, H, D)).astype(np.float32) for _ in range(2)]
    results = []
    for kw in (dict(sinks=sinks), dict(s_aux=sinks)):
        kc, vc = caches[0].copy(), caches[1].copy()
        out, lse = fastattn.flash_attn_with_kvcache(q, kc, vc, k, k, cache_seqlens=3,
                                                    return_softmax_lse=True, **kw)
        results.append((out, lse, kc, vc))
    for a, b in zip(*results):
        assert np.array_equal(a, b)
    kc, vc = caches[0].copy(), caches[1].copy()
    with pytest.raises(TypeError, match="sinks and s_aux"):
        fastattn.flash_attn_with_kvcache(q, kc, vc, k, k, cache_seqlens=3, sinks=sinks, s_aux=sinks)
    assert np.array_equal(kc, caches[0]) and np.array_equal(vc, caches[1])
