"""Naive float64 attention in plain numpy: the benchmark's reference for speed and correctness.

Written for clarity, not speed: scores for one (batch, head) at a time (so memory stays at one
Sq x Sk matrix), a dense mask, an explicit softmax. It is run on exactly the shapes that fastattn
is timed on (fewer repeats), never on a subset and extrapolated.
"""
import numpy as np


def attention(q, k, v, causal=False, scale=None):
    """q (Sq, Hq, D), k/v (Sk, Hkv, D) of one sequence -> out (Sq, Hq, D) float64.

    Causal is aligned to the bottom-right corner: row i sees keys j <= i + Sk - Sq.
    GQA: query head h reads kv head h // (Hq // Hkv). A row that sees no key gives 0.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    sq, hq, d = q.shape
    sk, hkv, _ = k.shape
    group = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((sq, hq, d), dtype=np.float64)
    visible = None
    if causal:
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        visible = j <= i + (sk - sq)
    for h in range(hq):
        kh = k[:, h // group, :]
        s = (q[:, h, :] @ kh.T) * scale
        if visible is not None:
            s = np.where(visible, s, -np.inf)
        m = s.max(axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        p = np.exp(s - m)
        den = p.sum(axis=1, keepdims=True)
        p = np.divide(p, den, out=np.zeros_like(p), where=den > 0)
        out[:, h, :] = p @ v[:, h // group, :]
    return out


def batched_attention(q, k, v, causal=False):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, D) float64."""
    return np.stack([attention(q[b], k[b], v[b], causal) for b in range(q.shape[0])])


def gather_pages(pages, page_ids, length):
    """Keys 0..length-1 of a sequence whose pages (in order) are page_ids: (length, Hkv, D)."""
    page_size = pages.shape[1]
    n = (length + page_size - 1) // page_size
    if n == 0:
        return pages[:0].reshape((0,) + pages.shape[2:])
    return np.concatenate([pages[int(p)] for p in page_ids[:n]], axis=0)[:length]


def paged_decode(q, k_pages, v_pages, block_table, seqlens):
    """q (B, Sq, Hq, D) over a paged cache (block table rows, lengths) -> (B, Sq, Hq, D)."""
    outs = []
    for b in range(q.shape[0]):
        L = int(seqlens[b])
        kb = gather_pages(k_pages, block_table[b], L)
        vb = gather_pages(v_pages, block_table[b], L)
        outs.append(attention(q[b], kb, vb, causal=True))
    return np.stack(outs)


def shared_prefix(q, qo_indptr, k_shared, v_shared, kv_data, indptr, indices, last_page_len,
                  causal):
    """FlashInfer's cascade layout: q (total_q, Hq, D); kv_data (pages, 2, page, Hkv, D) NHD."""
    page_size = kv_data.shape[2]
    outs = []
    for b in range(len(indptr) - 1):
        ids = indices[indptr[b]:indptr[b + 1]]
        n_pages = len(ids)
        L = 0 if n_pages == 0 else (n_pages - 1) * page_size + int(last_page_len[b])
        ks = np.concatenate([k_shared, gather_pages(kv_data[:, 0], ids, L)], axis=0)
        vs = np.concatenate([v_shared, gather_pages(kv_data[:, 1], ids, L)], axis=0)
        rows = slice(qo_indptr[b], qo_indptr[b + 1]) if qo_indptr is not None else slice(b, b + 1)
        outs.append(attention(q[rows], ks, vs, causal=causal))
    return np.concatenate(outs, axis=0)
