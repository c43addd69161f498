"""Independent naive attention reference in numpy, for fastattn's Python tests.

Everything is written from the semantics in DESIGN.md / include/fastattn/ops.h, not from the
library's code. Two precisions of the same naive algorithm are provided:

* exact: float64 throughout (``rnd=None``) -- the reference the library is compared with;
* naive-in-dtype: float32 arithmetic with every intermediate rounded to the input dtype
  (``rnd=rounder(dtype)``), i.e. what a straightforward implementation in float16 / bfloat16
  (with float32 matmul accumulation, as on GPUs) computes. Its error sets the tolerance
  (FlashAttention's rule: ours may be at most 2x -- 3x for KV-cache -- as far from the float64
  result as the naive-in-dtype computation is, plus a small absolute slack).

Shapes follow fastattn: q (Sq, Hq, D), k / v (Sk, Hkv, D) per sequence; LSE (Hq, Sq) natural log;
probs (Hq, Sq, Sk). A row that sees no key has output 0, LSE -inf and probabilities 0.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

Rounder = Optional[Callable[[np.ndarray], np.ndarray]]


# ---- dtype helpers -------------------------------------------------------------------------


def round_bf16(x: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16 (round to nearest even), returned as float32."""
    f = np.ascontiguousarray(x, dtype=np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32).copy()
    nan = np.isnan(f)
    out[nan] = np.nan
    return out


def rounder(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    """Function rounding an array to `dtype` ("float32", "float16", "bfloat16"), as float32."""
    if dtype == "float32":
        return lambda x: np.asarray(x, dtype=np.float32)
    if dtype == "float16":
        return lambda x: np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return round_bf16
    raise ValueError(dtype)


def _r(x: np.ndarray, rnd: Rounder) -> np.ndarray:
    return x if rnd is None else rnd(x)


def _work(x: np.ndarray, rnd: Rounder) -> np.ndarray:
    return np.asarray(x, dtype=np.float64 if rnd is None else np.float32)


# ---- core: one sequence --------------------------------------------------------------------


def attention_rows(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    qpos: np.ndarray,
    kpos: np.ndarray,
    scale: float,
    softcap: float = 0.0,
    slopes: Optional[np.ndarray] = None,
    left: int = -1,
    right: int = -1,
    rnd: Rounder = None,
    sinks: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attention of q rows at positions qpos over keys at positions kpos.

    q (Sq, Hq, D), k / v (Sk, Hkv, D); slopes (Hq,) or None. Query i may see key j when
    qpos[i] - left <= kpos[j] <= qpos[i] + right (a side with -1 is unbounded). sinks (Hq,) or
    None: one more score per head, in every row's softmax, whose value row is zero.
    Returns out (Sq, Hq, D), lse (Hq, Sq), probs (Hq, Sq, Sk) (the keys' columns only).
    """
    q, k, v = _work(q, rnd), _work(k, rnd), _work(v, rnd)
    sq, hq, d = q.shape
    sk, hkv = k.shape[0], k.shape[1]
    assert hq % hkv == 0
    group = hq // hkv
    kk = np.repeat(k, group, axis=1)  # query head h reads kv head h // group
    vv = np.repeat(v, group, axis=1)
    s = _r(np.einsum("qhd,khd->hqk", q, kk), rnd)
    s = _r(s * s.dtype.type(scale), rnd)
    if softcap > 0:
        s = _r(softcap * np.tanh(s / softcap), rnd)
    dist = np.abs(qpos[:, None].astype(np.int64) - kpos[None, :].astype(np.int64))
    if slopes is not None:
        bias = np.asarray(slopes, dtype=np.float64)[:, None, None] * dist[None].astype(np.float64)
        s = _r(s - bias.astype(s.dtype), rnd)
    allowed = np.ones((sq, sk), dtype=bool)
    if left >= 0:
        allowed &= kpos[None, :] >= qpos[:, None] - left
    if right >= 0:
        allowed &= kpos[None, :] <= qpos[:, None] + right
    s = np.where(allowed[None], s, -np.inf)
    if sinks is not None:  # the sink as one more column, dropped from probs below
        sink_col = np.broadcast_to(np.asarray(sinks, np.float64)[:, None, None], (hq, sq, 1))
        s = np.concatenate([s, sink_col.astype(s.dtype)], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = s.max(axis=-1, keepdims=True) if s.shape[-1] > 0 else np.full((hq, sq, 1), -np.inf, s.dtype)
        m_safe = np.where(np.isfinite(m), m, 0)
        e = np.exp(s - m_safe)
        denom = e.sum(axis=-1, keepdims=True)
        e = e[..., :sk]
        lse = (m_safe + np.log(denom))[..., 0]
        p = np.where(denom > 0, e / np.where(denom > 0, denom, 1), 0)
    p = _r(p, rnd)
    out = _r(np.einsum("hqk,khd->qhd", p, vv), rnd)
    lse = np.where(np.isfinite(lse), lse, -np.inf)
    return out, lse.astype(np.float64), p


def bottom_right_positions(sq: int, sk: int) -> Tuple[np.ndarray, np.ndarray]:
    """Positions aligning the last query with the last key (flash_attn >= 2.1)."""
    return np.arange(sq) + sk - sq, np.arange(sk)


def window_bounds(causal: bool, window: Sequence[int]) -> Tuple[int, int]:
    left, right = window
    if causal:
        right = 0
    return int(left), int(right)


def slopes_for(alibi: Optional[np.ndarray], b: int) -> Optional[np.ndarray]:
    if alibi is None:
        return None
    return alibi if alibi.ndim == 1 else alibi[b]


def default_scale(d: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(d) if scale is None else scale


# ---- batched / varlen / paged --------------------------------------------------------------


def attention_batched(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0,
                      alibi=None, rnd: Rounder = None, sinks=None):
    """q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D), sinks (Hq,) or None. Returns out (B, Sq, Hq, D),
    lse (B, Hq, Sq), probs (B, Hq, Sq, Sk)."""
    b_, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = default_scale(d, scale)
    left, right = window_bounds(causal, window)
    qpos, kpos = bottom_right_positions(sq, sk)
    outs, lses, probs = [], [], []
    for b in range(b_):
        o, l, p = attention_rows(q[b], k[b], v[b], qpos, kpos, scale, softcap,
                                 slopes_for(alibi, b), left, right, rnd, sinks)
        outs.append(o), lses.append(l), probs.append(p)
    return np.stack(outs), np.stack(lses), np.stack(probs)


def gather_pages(pages: np.ndarray, page_ids: Sequence[int], length: int) -> np.ndarray:
    """Keys 0..length-1 of a sequence whose pages are page_ids: (length, H, D)."""
    ps = pages.shape[1]
    idx = np.arange(length)
    if length == 0:
        return pages[:0, 0]
    ids = np.asarray(page_ids)[idx // ps]
    return pages[ids, idx % ps]


def attention_varlen(q, cu_q, k, v, cu_k=None, scale=None, causal=False, window=(-1, -1),
                     softcap=0.0, alibi=None, rnd: Rounder = None, block_table=None,
                     seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, sinks=None):
    """q (total_q, Hq, D) with cu_q (B + 1). Keys packed (k / v (total_k, Hkv, D) with cu_k) or
    paged (k / v (pages, page_size, Hkv, D) with block_table (B, max_pages)); key lengths from
    seqused_k, else cu_k differences; sinks (Hq,) or None. Returns out (total_q, Hq, D), lse
    (Hq, total_q), probs (B, Hq, max_seqlen_q, max_seqlen_k) zero-padded. Rows past cu_q[B] see
    no key: out 0, lse -inf (sinks[h] with sinks)."""
    total_q, hq, d = q.shape
    bsz = len(cu_q) - 1
    scale = default_scale(d, scale)
    left, right = window_bounds(causal, window)
    out = np.zeros((total_q, hq, d))
    lse = np.full((hq, total_q), -np.inf)
    if sinks is not None:
        lse[:] = np.asarray(sinks, np.float64)[:, None]
    lens_q = [int(cu_q[b + 1] - cu_q[b]) for b in range(bsz)]
    lens_k = []
    for b in range(bsz):
        if seqused_k is not None:
            lens_k.append(int(seqused_k[b]))
        else:
            lens_k.append(int(cu_k[b + 1] - cu_k[b]))
    msq = max_seqlen_q if max_seqlen_q is not None else max(lens_q + [0])
    msk = max_seqlen_k if max_seqlen_k is not None else max(lens_k + [0])
    probs = np.zeros((bsz, hq, msq, msk))
    for b in range(bsz):
        q0, sq, sk = int(cu_q[b]), lens_q[b], lens_k[b]
        if block_table is None:
            k0 = int(cu_k[b])
            kb, vb = k[k0:k0 + sk], v[k0:k0 + sk]
        else:
            kb, vb = gather_pages(k, block_table[b], sk), gather_pages(v, block_table[b], sk)
        qpos, kpos = bottom_right_positions(sq, sk)
        o, l, p = attention_rows(q[q0:q0 + sq], kb, vb, qpos, kpos, scale, softcap,
                                 slopes_for(alibi, b), left, right, rnd, sinks)
        out[q0:q0 + sq] = o
        lse[:, q0:q0 + sq] = l
        probs[b, :, :sq, :sk] = p
    return out, lse, probs


# ---- rotary + KV cache ---------------------------------------------------------------------


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, pos: np.ndarray,
                 interleaved: bool, rnd: Rounder = None) -> np.ndarray:
    """Rotate x (S, H, D) with row i at position pos[i]; cos / sin (S_ro, rotary_dim / 2).
    interleaved: pairs (2i, 2i + 1); else GPT-NeoX pairs (i, i + rotary_dim / 2). Dimensions
    from rotary_dim on are unchanged."""
    x = _work(x, rnd).copy()
    half = cos.shape[1]
    c = _work(cos, rnd)[pos][:, None, :]  # (S, 1, half)
    s = _work(sin, rnd)[pos][:, None, :]
    if interleaved:
        x0, x1 = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
        x[..., 0:2 * half:2] = _r(x0 * c - x1 * s, rnd)
        x[..., 1:2 * half:2] = _r(x0 * s + x1 * c, rnd)
    else:
        x0, x1 = x[..., :half].copy(), x[..., half:2 * half].copy()
        x[..., :half] = _r(x0 * c - x1 * s, rnd)
        x[..., half:2 * half] = _r(x0 * s + x1 * c, rnd)
    return x


def kvcache_slot(block_table, row: int, slot: int, page_size: int):
    """(page, offset) of cache slot `slot` in block-table row `row`."""
    return int(block_table[row][slot // page_size]), slot % page_size


def attention_kvcache(q, k_cache, v_cache, k_new=None, v_new=None, cos=None, sin=None,
                      interleaved=True, cache_seqlens=None, cache_batch_idx=None,
                      cache_leftpad=None, block_table=None, scale=None, causal=False,
                      window=(-1, -1), softcap=0.0, alibi=None, rnd: Rounder = None,
                      store_rnd: Rounder = None):
    """flash_attn_with_kvcache per include/fastattn/ops.h.

    q (B, Sq, Hq, D); caches (B_cache, S_cache, Hkv, D) or paged (pages, page_size, Hkv, D) with
    block_table; k_new / v_new (B, Snew, Hkv, D); cache_seqlens (B,) ints.
    Returns out (B, Sq, Hq, D), lse (B, Hq, Sq), k_cache_after, v_cache_after, written (a bool
    mask of the cache's (row or page, slot) entries that the append writes). Appended keys
    are stored rounded with `store_rnd` (the cache dtype).
    """
    bsz, sq, hq, d = q.shape
    scale = default_scale(d, scale)
    left, right = window_bounds(causal, window)
    local = causal or tuple(window) != (-1, -1)
    snew = 0 if k_new is None else k_new.shape[1]
    kc, vc = np.array(k_cache, dtype=np.float64), np.array(v_cache, dtype=np.float64)
    written = np.zeros(kc.shape[:2], dtype=bool)
    out = np.zeros((bsz, sq, hq, d))
    lse = np.full((bsz, hq, sq), -np.inf)
    paged = block_table is not None
    page_size = kc.shape[1] if paged else None
    # Append first (all sequences), as the op does, then attend.
    keys_per_b = []
    for b in range(bsz):
        c = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
        lp = int(cache_leftpad[b]) if cache_leftpad is not None else 0
        sl = int(cache_seqlens[b])
        kn = vn = None
        if snew:
            kn, vn = _work(k_new[b], rnd), _work(v_new[b], rnd)
            if cos is not None:
                kn = apply_rotary(k_new[b], cos, sin, np.arange(snew) + sl - lp, interleaved, rnd)
            for t in range(snew):
                slot = sl + t
                loc = kvcache_slot(block_table, c, slot, page_size) if paged else (c, slot)
                kc[loc] = kn[t] if store_rnd is None else store_rnd(kn[t])
                vc[loc] = vn[t] if store_rnd is None else store_rnd(vn[t])
                written[loc] = True
        keys_per_b.append((c, lp, sl, kn, vn))
    for b in range(bsz):
        c, lp, sl, kn, vn = keys_per_b[b]
        total = sl + snew
        slots = np.arange(lp, total)
        if paged:
            locs = [kvcache_slot(block_table, c, s_, page_size) for s_ in slots]
            kb = np.stack([kc[l] for l in locs]) if len(locs) else kc[:0, 0]
            vb = np.stack([vc[l] for l in locs]) if len(locs) else vc[:0, 0]
        else:
            kb, vb = kc[c, lp:total].copy(), vc[c, lp:total].copy()
        if snew and kn is not None:
            # Attend over the appended keys as computed (unrounded for the float64 reference).
            kb[sl - lp:] = kn
            vb[sl - lp:] = vn
        kb, vb = _work(kb, rnd), _work(vb, rnd)
        sk = total - lp
        qb = q[b]
        if cos is not None and snew:
            if local:
                qpos_ro = np.arange(sq) + sl - lp
            else:
                qpos_ro = np.full(sq, sl - lp)
            qb = apply_rotary(qb, cos, sin, qpos_ro, interleaved, rnd)
        qpos, kpos = bottom_right_positions(sq, sk)
        o, l, _ = attention_rows(qb, kb, vb, qpos, kpos, scale, softcap, slopes_for(alibi, b),
                                 left, right, rnd)
        out[b], lse[b] = o, l
    return out, lse, kc, vc, written


# ---- cascade -------------------------------------------------------------------------------


def merge_state(v_a, s_a, v_b, s_b):
    """Merge two states (natural-log LSE) in float64. v (S, H, D), s (S, H)."""
    v_a, v_b = np.asarray(v_a, np.float64), np.asarray(v_b, np.float64)
    s_a, s_b = np.asarray(s_a, np.float64), np.asarray(s_b, np.float64)
    s = np.logaddexp(s_a, s_b)
    with np.errstate(invalid="ignore"):
        wa = np.where(np.isfinite(s), np.exp(s_a - np.where(np.isfinite(s), s, 0)), 0)
        wb = np.where(np.isfinite(s), np.exp(s_b - np.where(np.isfinite(s), s, 0)), 0)
    return v_a * wa[..., None] + v_b * wb[..., None], s


def merge_states(v, s):
    """v (S, N, H, D), s (S, N, H) -> (S, H, D), (S, H) in float64."""
    v, s = np.asarray(v, np.float64), np.asarray(s, np.float64)
    out_v, out_s = v[:, 0], s[:, 0]
    for i in range(1, v.shape[1]):
        out_v, out_s = merge_state(out_v, out_s, v[:, i], s[:, i])
    # A row whose states are all empty is the empty state: output 0 (even for one state).
    out_v = np.where(np.isneginf(out_s)[..., None], 0.0, out_v)
    return out_v, out_s


def csr_lengths(indptr, last_page_len, page_size):
    """FlashInfer's lengths: (pages_b - 1) * page_size + last_page_len[b]; 0 without pages."""
    lens = []
    for b in range(len(indptr) - 1):
        n = int(indptr[b + 1] - indptr[b])
        lens.append(0 if n == 0 else (n - 1) * page_size + int(last_page_len[b]))
    return lens


def shared_prefix_attention(q, k_shared, v_shared, k_pages, v_pages, indptr, indices,
                            last_page_len, qo_indptr=None, scale=None, causal=False,
                            rnd: Rounder = None):
    """Full attention of each request's queries over prefix (positions 0..P-1) + its suffix.
    Returns out (total_q, Hq, D), lse (Hq, total_q)."""
    total_q, hq, d = q.shape
    bsz = len(indptr) - 1
    if qo_indptr is None:
        qo_indptr = np.arange(bsz + 1)
    lens = csr_lengths(indptr, last_page_len, k_pages.shape[1])
    out = np.zeros((total_q, hq, d))
    lse = np.full((hq, total_q), -np.inf)
    scale = default_scale(d, scale)
    for b in range(bsz):
        pages = indices[int(indptr[b]):int(indptr[b + 1])]
        ks = np.concatenate([np.asarray(k_shared, np.float64),
                             gather_pages(np.asarray(k_pages, np.float64), pages, lens[b])])
        vs = np.concatenate([np.asarray(v_shared, np.float64),
                             gather_pages(np.asarray(v_pages, np.float64), pages, lens[b])])
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        qpos, kpos = bottom_right_positions(q1 - q0, ks.shape[0])
        o, l, _ = attention_rows(q[q0:q1], ks, vs, qpos, kpos, scale, 0.0, None,
                                 -1, 0 if causal else -1, rnd)
        out[q0:q1], lse[:, q0:q1] = o, l
    return out, lse
