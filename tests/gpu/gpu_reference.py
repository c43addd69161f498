"""Naive attention references in torch, computed on the tensors' own device (the GPU in tests/gpu),
and the comparison rules of DESIGN.md (FlashAttention's), for the GPU tests.

Written from the semantics in DESIGN.md / include/fastattn/ops.h, sharing nothing with the library.
Two precisions of the same naive algorithm, as in FlashAttention's ``attention_ref``:

* reference (``naive=False``): the inputs upcast to float64 and everything computed in float64;
* naive in the input dtype (``naive=True``): q @ k^T in float16 / bfloat16 (rounded to the dtype),
  scale and softcap rounded to the dtype, ALiBi bias, mask and softmax in float32, the
  probabilities cast to the dtype and P @ V in the dtype. Its error against the reference sets the
  tolerance: max|ours - ref| <= 2 * max|naive - ref| + 1e-5.

Shapes: batched q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq),
probs (B, Hq, Sq, Sk). Varlen q (total_q, Hq, D) -> out (total_q, Hq, D), lse (Hq, total_q),
probs (B, Hq, max_seqlen_q, max_seqlen_k) zero-padded. Query head h reads kv head
h // (Hq // Hkv). Masks are aligned bottom-right: query i (position i + Sk - Sq) sees key j when
i + Sk - Sq - left <= j <= i + Sk - Sq + right (-1: unbounded; causal: right = 0). A row that sees
no key has output 0, LSE -inf and probabilities 0. Attention sinks (Hq,) add one more score per
head to every row's softmax, with a zero value row: probs are the keys' share, and a row that sees
no key has output 0 and LSE sinks[h].
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

REF_DTYPE = torch.float64


# ---- masks -----------------------------------------------------------------------------------


def window_bounds(causal: bool, window_size: Sequence[int]) -> Tuple[int, int]:
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return left, right


def visible(sq: int, sk: int, causal: bool, window_size, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(allowed (Sq, Sk) bool, |qpos - kpos| (Sq, Sk) int64) with bottom-right alignment."""
    left, right = window_bounds(causal, window_size)
    qpos = torch.arange(sq, device=device, dtype=torch.int64)[:, None] + (sk - sq)
    kpos = torch.arange(sk, device=device, dtype=torch.int64)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= kpos >= qpos - left
    if right >= 0:
        allowed &= kpos <= qpos + right
    return allowed, (qpos - kpos).abs()


# ---- batched ---------------------------------------------------------------------------------


def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, naive=False, sinks=None):
    """Dense attention. q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D) in float16 / bfloat16 (any
    strides); alibi_slopes (Hq,) or (B, Hq); sinks (Hq,) float32 or None. Returns (out, lse, probs):
    reference (naive=False): out float64 (B, Sq, Hq, D), lse float64 (B, Hq, Sq), probs float64;
    naive: out in q's dtype, lse / probs float32."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    assert hq % hkv == 0, (hq, hkv)
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    dt = q.dtype if naive else REF_DTYPE
    work = torch.float32 if naive else REF_DTYPE
    qq = q.to(dt)
    kk = k.to(dt).repeat_interleave(group, dim=2)  # query head h reads kv head h // group
    vv = v.to(dt).repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qq, kk)  # naive: matmul in the input dtype
    if naive:
        s = (s.float() * scale).to(dt)
        if softcap > 0:
            s = (softcap * torch.tanh(s.float() / softcap)).to(dt)
        s = s.float()
    else:
        s.mul_(scale)
        if softcap > 0:
            s.div_(softcap).tanh_().mul_(softcap)
    allowed, dist = visible(sq, sk, causal, window_size, q.device)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(device=q.device, dtype=work)
        slopes = slopes.reshape(-1, hq, 1, 1)  # (1 or B, Hq, 1, 1)
        s.sub_(slopes * dist.to(work))
    s.masked_fill_(~allowed, float("-inf"))
    if sinks is not None:  # one more column per row, dropped from the probabilities below
        sink_col = sinks.to(device=q.device, dtype=work).reshape(1, hq, 1, 1).expand(b, hq, sq, 1)
        s = torch.cat([s, sink_col], dim=-1)
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows that see no key (and for Sk == 0)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = s.sub_(lse_safe[..., None]).exp_()[..., :sk]  # masked entries and empty rows: exactly 0
    if naive:
        out = torch.einsum("bhqk,bkhd->bqhd", p.to(dt), vv)  # P @ V in the input dtype
    else:
        out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    return out, lse, p


# ---- varlen / paged ----------------------------------------------------------------------------


def gather_pages(pages: torch.Tensor, page_ids, length: int) -> torch.Tensor:
    """Keys 0..length-1 of a sequence whose pages are `page_ids`: (length, Hkv, D).
    Key j lives in page page_ids[j // page_size], slot j % page_size."""
    ps = pages.shape[1]
    ids = torch.as_tensor(page_ids, dtype=torch.int64, device=pages.device).reshape(-1)
    j = torch.arange(length, device=pages.device, dtype=torch.int64)
    return pages[ids[j // ps], j % ps]


def varlen_ref(q, cu_seqlens_q: Sequence[int], kv: List[Tuple[torch.Tensor, torch.Tensor]],
               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
               alibi_slopes=None, max_seqlen_q=None, max_seqlen_k=None, naive=False, sinks=None):
    """Attention of packed queries. q (total_q, Hq, D); cu_seqlens_q host ints (B + 1);
    kv[b] = (k_b, v_b), each (Sk_b, Hkv, D): the keys of sequence b however they are stored.
    Rows of q past cu_seqlens_q[B] see no key: output 0, LSE -inf (sinks[h] with sinks).
    Returns out (total_q, Hq, D), lse (Hq, total_q), probs (B, Hq, max_seqlen_q, max_seqlen_k)."""
    total_q, hq, d = q.shape
    bsz = len(cu_seqlens_q) - 1
    assert len(kv) == bsz
    lens_q = [int(cu_seqlens_q[i + 1]) - int(cu_seqlens_q[i]) for i in range(bsz)]
    lens_k = [int(kb.shape[0]) for kb, _ in kv]
    msq = max(lens_q + [0]) if max_seqlen_q is None else int(max_seqlen_q)
    msk = max(lens_k + [0]) if max_seqlen_k is None else int(max_seqlen_k)
    out_dtype = q.dtype if naive else REF_DTYPE
    work = torch.float32 if naive else REF_DTYPE
    out = torch.zeros(total_q, hq, d, dtype=out_dtype, device=q.device)
    lse = torch.full((hq, total_q), float("-inf"), dtype=work, device=q.device)
    if sinks is not None:
        lse[:] = sinks.to(device=q.device, dtype=work)[:, None]
    probs = torch.zeros(bsz, hq, msq, msk, dtype=work, device=q.device)
    for b in range(bsz):
        q0, sq, sk = int(cu_seqlens_q[b]), lens_q[b], lens_k[b]
        if sq == 0:
            continue
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        kb, vb = kv[b]
        o, l, p = attention_ref(q[q0:q0 + sq][None], kb[None], vb[None], softmax_scale, causal,
                                window_size, softcap, slopes, naive, sinks)
        out[q0:q0 + sq] = o[0]
        lse[:, q0:q0 + sq] = l[0]
        probs[b, :, :sq, :sk] = p[0]
    return out, lse, probs


# ---- comparisons -------------------------------------------------------------------------------


def _first_index(mask: torch.Tensor):
    return tuple(int(i) for i in torch.nonzero(mask)[0].tolist())


def assert_no_nan(name: str, ours: torch.Tensor):
    nan = torch.isnan(ours)
    if bool(nan.any()):
        raise AssertionError(
            f"{name}: {int(nan.sum())} of {ours.numel()} values are NaN (an output poisoned with "
            f"NaN before the call was not fully written?) first at {_first_index(nan)}")


def assert_out_close(name: str, ours: torch.Tensor, ref: torch.Tensor, naive: torch.Tensor,
                     factor: float = 2.0, slack: float = 1e-5):
    """FlashAttention's rule: max|ours - ref| <= factor * max|naive - ref| + slack."""
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert_no_nan(name, ours)
    if ours.numel() == 0:
        return
    diff = (ours.to(REF_DTYPE) - ref).abs()
    err = float(diff.max())
    base = float((naive.to(REF_DTYPE) - ref).abs().max())
    tol = factor * base + slack
    if not err <= tol:
        worst = tuple(int(i) for i in torch.unravel_index(torch.argmax(diff), diff.shape))
        raise AssertionError(
            f"{name}: max|ours - ref| = {err:.4g} > {factor} * max|naive - ref| ({base:.4g}) + "
            f"{slack:g} = {tol:.4g}; worst at {worst}: ours {float(ours[worst]):.6g}, "
            f"ref {float(ref[worst]):.6g}, naive {float(naive[worst]):.6g}")


def assert_lse_close(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-3,
                     rtol: float = 1e-3):
    """LSE (float32, natural log) against the float64 reference: -inf exactly where the reference
    is -inf (no visible key), elsewhere |ours - ref| <= atol + rtol * |ref|."""
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == torch.float32, f"{name}: dtype {ours.dtype}, expected float32"
    assert_no_nan(name, ours)
    if ours.numel() == 0:
        return
    ninf_ref, ninf = torch.isneginf(ref), torch.isneginf(ours)
    if not torch.equal(ninf_ref, ninf):
        bad = _first_index(ninf_ref != ninf)
        raise AssertionError(f"{name}: -inf pattern differs (first at {bad}: ours "
                             f"{float(ours[bad])!r}, ref {float(ref[bad])!r}); "
                             f"{int((ninf_ref != ninf).sum())} entries differ")
    pinf = torch.isposinf(ours)
    if bool(pinf.any()):
        raise AssertionError(f"{name}: +inf at {_first_index(pinf)}")
    fin = ~ninf_ref
    if bool(fin.any()):
        o, r = ours.to(REF_DTYPE)[fin], ref[fin]
        err = (o - r).abs()
        bad = err > atol + rtol * r.abs()
        if bool(bad.any()):
            i = int(torch.argmax(err))
            raise AssertionError(
                f"{name}: {int(bad.sum())} LSE values off by more than {atol:g} + {rtol:g} * |ref| "
                f"(max error {float(err.max()):.4g}; e.g. ours {float(o[i]):.7g} vs ref "
                f"{float(r[i]):.7g})")


def assert_probs_close(name: str, ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4):
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == torch.float32, f"{name}: dtype {ours.dtype}, expected float32"
    assert_no_nan(name, ours)
    if ours.numel() == 0:
        return
    diff = (ours.to(REF_DTYPE) - ref).abs()
    err = float(diff.max())
    if not err <= atol:
        worst = tuple(int(i) for i in torch.unravel_index(torch.argmax(diff), diff.shape))
        raise AssertionError(f"{name}: max|probs - ref| = {err:.4g} > {atol:g} at {worst}: ours "
                             f"{float(ours[worst]):.6g}, ref {float(ref[worst]):.6g}")


def assert_empty_rows_zero(name: str, out: torch.Tensor, lse_ref: torch.Tensor):
    """Rows that see no key (reference LSE -inf) must be exactly 0.
    Batched: out (B, Sq, Hq, D), lse_ref (B, Hq, Sq); varlen: out (T, Hq, D), lse_ref (Hq, T)."""
    empty = torch.isneginf(lse_ref)
    empty = empty.transpose(1, 2) if out.dim() == 4 else empty.transpose(0, 1)
    if not bool(empty.any()):
        return
    rows = out[empty]  # (n, D)
    bad = rows != 0
    if bool(bad.any()):
        raise AssertionError(f"{name}: {int(bad.any(dim=-1).sum())} rows that see no key are not "
                             f"exactly 0 (first at {_first_index(empty)})")


def fold_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """(out (..., Hq, D), lse (..., Hq)) of attention without sinks -> with them, in float64 by
    their definition: one more logit sinks[h] per softmax with a zero value row, so
    lse' = log(exp(lse) + exp(sinks[h])) and out' = out * exp(lse - lse') (0 where lse is -inf)."""
    lse64 = lse.to(torch.float64)
    merged = torch.logaddexp(lse64, sinks.to(torch.float64))
    weight = torch.where(torch.isneginf(lse64), torch.zeros_like(lse64), torch.exp(lse64 - merged))
    return out.to(torch.float64) * weight[..., None], merged


def assert_sink_rows(name: str, out: torch.Tensor, lse: torch.Tensor, ref_out: torch.Tensor,
                     sinks: torch.Tensor):
    """With attention sinks, rows that see no key (the reference output exactly 0: its keys'
    probabilities are all 0) must be exactly 0 with LSE exactly sinks[h] (the sink's state alone).
    Batched: out (B, Sq, Hq, D), lse (B, Hq, Sq); varlen: out (T, Hq, D), lse (Hq, T)."""
    empty = (ref_out == 0).all(dim=-1)  # (B, Sq, Hq) or (T, Hq)
    if not bool(empty.any()):
        return
    if bool((out[empty] != 0).any()):
        raise AssertionError(f"{name}: rows that see no key are not exactly 0 (first at "
                             f"{_first_index(empty)})")
    lse_rows = lse.transpose(1, 2) if out.dim() == 4 else lse.transpose(0, 1)  # like `empty`
    want = sinks.to(lse.dtype).expand_as(lse_rows)
    bad = empty & (lse_rows != want)
    if bool(bad.any()):
        i = _first_index(bad)
        raise AssertionError(f"{name}: LSE of a row that sees no key is {float(lse_rows[i])!r}, "
                             f"not its sink {float(want[i])!r} (at {i})")


_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


def assert_bitwise_equal(name: str, a: torch.Tensor, b: torch.Tensor):
    """Two runs of the same call must give bit-identical results."""
    assert a.dtype == b.dtype and a.shape == b.shape, name
    ia, ib = a.view(_INT_VIEW[a.dtype]), b.view(_INT_VIEW[b.dtype])
    if not torch.equal(ia, ib):
        neq = ia != ib
        raise AssertionError(f"{name}: two runs of the same call differ in {int(neq.sum())} of "
                             f"{a.numel()} values (first at {_first_index(neq)}): not deterministic")


# ---- KV cache (flash_attn_with_kvcache) ----------------------------------------------------------
# Semantics (DESIGN.md, include/fastattn/ops.h KVCacheArgs): for sequence b with cache row
# r = cache_batch_idx[b] (or b), seqlen = cache_seqlens[b], pad = cache_leftpad[b] (or 0):
#  1. new k / v rows t = 0..Snew-1 go to slots seqlen + t of row r (paged: page
#     block_table[r][slot // page_size], offset slot % page_size); k rotated at position
#     seqlen - pad + t when rotary tables are given;
#  2. q attends over slots [pad, seqlen + Snew) of row r, aligned bottom-right, positions counted
#     from pad; q is rotated at position seqlen - pad + i (causal or windowed) or seqlen - pad
#     (every row, otherwise).
# The reference builds the cache contents after the append itself: the slots read from the cache
# as it was before the call, the appended slots from the new k (rotated in float32, rounded to the
# cache dtype, as the cache stores it) and v. Rotated q: float64 (unrounded) for the reference,
# float32 rotation rounded to the input dtype for the naive computation (an op rotates q in float32
# and may keep or round it; the difference is then within the naive error).


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               interleaved: bool, work: torch.dtype) -> torch.Tensor:
    """x (S, H, D) rotated at positions (S,) int64: returns x in `work` dtype with its first
    rotary_dim = 2 * cos.shape[1] dims rotated by the angles of row positions[s] of cos / sin
    (interleaved: pairs (2i, 2i + 1); GPT-NeoX: pairs (i, i + rotary_dim / 2)); other dims as x."""
    rd = 2 * cos.shape[1]
    out = x.to(work).clone()
    c = cos.to(work)[positions][:, None, :]  # (S, 1, rd / 2)
    s = sin.to(work)[positions][:, None, :]
    if interleaved:
        x0, x1 = out[..., 0:rd:2].clone(), out[..., 1:rd:2].clone()
        out[..., 0:rd:2] = x0 * c - x1 * s
        out[..., 1:rd:2] = x0 * s + x1 * c
    else:
        h = rd // 2
        x0, x1 = out[..., :h].clone(), out[..., h:rd].clone()
        out[..., :h] = x0 * c - x1 * s
        out[..., h:rd] = x0 * s + x1 * c
    return out


def kvcache_index(row: int, slots: torch.Tensor, page_ids: Optional[torch.Tensor] = None,
                  page_size: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(index into dim 0, index into dim 1) of the cache entries holding `slots` (int64) of cache
    row `row`: contiguous (row, slot); paged (page_ids[slot // page_size], slot % page_size)."""
    if page_ids is None:
        return torch.full_like(slots, int(row)), slots
    return page_ids[slots // page_size], slots % page_size


class KVCacheRef:
    """What kvcache_ref computes. out (B, Sq, Hq, D) float64 / lse (B, Hq, Sq) float64: the
    reference; out_naive (input dtype) / lse_naive (float32): the naive computation in the input
    dtype; k_app / v_app (B, Snew, Hkv, D) in the cache dtype: the expected contents of the
    appended slots; app_index: (dim-0 index, dim-1 index) of those slots, (B * Snew,) each, in the
    order of k_app.reshape(-1, Hkv, D); rotary_dim: 0 without rotary."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def kvcache_ref(q, k_cache, v_cache, k_new=None, v_new=None, cache_seqlens=None, *,
                rotary_cos=None, rotary_sin=None, rotary_interleaved=True, cache_batch_idx=None,
                cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                window_size=(-1, -1), softcap=0.0, alibi_slopes=None) -> KVCacheRef:
    """flash_attn_with_kvcache, naively. q (B, Sq, Hq, D); k_cache / v_cache: the caches *before*
    the call, (B_cache, S_cache, Hkv, D) or paged (num_pages, page_size, Hkv, D) with block_table
    (rows of page ids: host lists or an int tensor); k_new / v_new (B, Snew, Hkv, D) or None;
    cache_seqlens: an int or B ints; cache_batch_idx / cache_leftpad: B ints or None;
    rotary_cos / rotary_sin (S_rotary, rotary_dim / 2); alibi_slopes (Hq,) or (B, Hq).
    Only the slots attended are read, so a huge cache costs nothing beyond its sequences."""
    bsz, sq, hq, d = q.shape
    dev = q.device
    snew = 0 if k_new is None else int(k_new.shape[1])
    hkv = k_cache.shape[2]
    if isinstance(cache_seqlens, int):
        cache_seqlens = [cache_seqlens] * bsz
    seqlens = [int(x) for x in cache_seqlens]
    rows = [int(x) for x in cache_batch_idx] if cache_batch_idx is not None else list(range(bsz))
    pads = [int(x) for x in cache_leftpad] if cache_leftpad is not None else [0] * bsz
    paged = block_table is not None
    page_size = int(k_cache.shape[1]) if paged else 0
    if paged:
        table = torch.as_tensor(block_table.tolist() if torch.is_tensor(block_table) else block_table,
                                dtype=torch.int64, device=dev)
    rotary = rotary_cos is not None
    rd = 2 * int(rotary_cos.shape[1]) if rotary else 0
    left, right = int(window_size[0]), int(window_size[1])
    per_row = causal or left >= 0 or right >= 0  # q rotated per row (FlashAttention's rule)
    out = torch.zeros(bsz, sq, hq, d, dtype=REF_DTYPE, device=dev)
    lse = torch.full((bsz, hq, sq), float("-inf"), dtype=REF_DTYPE, device=dev)
    out_naive = torch.zeros(bsz, sq, hq, d, dtype=q.dtype, device=dev)
    lse_naive = torch.full((bsz, hq, sq), float("-inf"), dtype=torch.float32, device=dev)
    k_app = torch.empty(bsz, snew, hkv, d, dtype=k_cache.dtype, device=dev)
    v_app = torch.empty(bsz, snew, hkv, d, dtype=v_cache.dtype, device=dev)
    app0, app1 = [], []
    for b in range(bsz):
        row, sl, pad = rows[b], seqlens[b], pads[b]
        assert 0 <= pad <= sl, (b, pad, sl)
        pos0 = sl - pad  # position of the first appended token
        page_ids = table[row] if paged else None
        if snew:
            kb = k_new[b]
            if rotary:
                pos = torch.arange(snew, device=dev, dtype=torch.int64) + pos0
                kb = rotary_ref(kb, rotary_cos, rotary_sin, pos, rotary_interleaved, torch.float32)
            k_app[b] = kb.to(k_cache.dtype)
            v_app[b] = v_new[b].to(v_cache.dtype)
            i0, i1 = kvcache_index(row, torch.arange(sl, sl + snew, device=dev, dtype=torch.int64),
                                   page_ids, page_size)
            app0.append(i0)
            app1.append(i1)
        # The cache after the append, slots [pad, seqlen + Snew) of row `row`.
        i0, i1 = kvcache_index(row, torch.arange(pad, sl + snew, device=dev, dtype=torch.int64),
                               page_ids, page_size)
        keys, values = k_cache[i0, i1], v_cache[i0, i1]  # (Sk, Hkv, D) copies
        if snew:
            keys[sl - pad:] = k_app[b]
            values[sl - pad:] = v_app[b]
        qb, qb_naive = q[b], q[b]
        if rotary:
            qpos = torch.arange(sq, device=dev, dtype=torch.int64) if per_row else \
                torch.zeros(sq, device=dev, dtype=torch.int64)
            qpos = qpos + pos0
            qb = rotary_ref(q[b], rotary_cos, rotary_sin, qpos, rotary_interleaved, REF_DTYPE)
            qb_naive = rotary_ref(q[b], rotary_cos, rotary_sin, qpos, rotary_interleaved,
                                  torch.float32).to(q.dtype)
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        kw = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                  softcap=softcap, alibi_slopes=slopes)
        o, l, _ = attention_ref(qb[None], keys[None], values[None], **kw)
        on, ln, _ = attention_ref(qb_naive[None], keys[None], values[None], naive=True, **kw)
        out[b], lse[b], out_naive[b], lse_naive[b] = o[0], l[0], on[0], ln[0]
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    app_index = (torch.cat(app0) if app0 else empty, torch.cat(app1) if app1 else empty)
    return KVCacheRef(out=out, lse=lse, out_naive=out_naive, lse_naive=lse_naive, k_app=k_app,
                      v_app=v_app, app_index=app_index, rotary_dim=rd)


def max_finite_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| over the entries where ref is finite (0.0 when there are none)."""
    fin = torch.isfinite(ref)
    if not bool(fin.any()):
        return 0.0
    return float((ours.to(REF_DTYPE)[fin] - ref.to(REF_DTYPE)[fin]).abs().max())


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 bit patterns mapped to integers that order like the values (-0 == +0),
    so that the difference of two is their distance in units in the last place."""
    i = x.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i >= 0, i, -32768 - i)


def assert_within_ulps(name: str, ours: torch.Tensor, expected: torch.Tensor, ulps: int = 1,
                       atol: float = 0.0):
    """float16 / bfloat16 values at most `ulps` units in the last place from `expected` (or within
    atol of it: results of float32 arithmetic near cancellation, rounded to the dtype)."""
    assert ours.dtype == expected.dtype and ours.dtype in (torch.float16, torch.bfloat16), name
    assert tuple(ours.shape) == tuple(expected.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    assert_no_nan(name, ours)
    if ours.numel() == 0:
        return
    dist = (_ordered_bits(ours) - _ordered_bits(expected)).abs()
    close = (ours.float() - expected.float()).abs() <= atol
    bad = (dist > ulps) & ~close
    if bool(bad.any()):
        i = _first_index(bad)
        raise AssertionError(f"{name}: {int(bad.sum())} of {ours.numel()} values more than {ulps} "
                             f"ulp (and {atol:g}) from the expected values; first at {i}: ours "
                             f"{float(ours[i]):.6g}, expected {float(expected[i]):.6g} "
                             f"({int(dist[i])} ulp)")
