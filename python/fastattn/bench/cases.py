"""Benchmark cases: shapes, inputs, and the calls being timed.

A case builds its inputs once and exposes callables: ``fastattn`` (the public Python API only),
``naive`` (float64 numpy reference on the same shape, CPU only) and ``peers`` (PyTorch's attention
on the same data: SDPA on the CPU; the flash and cuDNN SDPA backends on the GPU). FLOPs count the
two matrix products (4 * D per visible query/key pair, causal pairs counted exactly); bytes are the
fewest a kernel must move (inputs read once, output written once).
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

import fastattn


@dataclass
class Case:
    suite: str                      # prefill / decode / cascade
    name: str                       # short label for the table and plot
    shape: str                      # human-readable shape
    flops: float                    # useful FLOPs of one call
    bytes: float                    # minimal device-memory bytes of one call
    metric: str                     # "flops" (compute-bound) or "bytes" (memory-bound)
    fastattn: Callable[[], Any]
    naive: Optional[Callable[[], Any]] = None
    peers: Dict[str, Callable[[], Any]] = field(default_factory=dict)
    # Compares the fastattn output with the naive one: returns max |error| (float).
    check: Optional[Callable[[Any, Any], float]] = None
    # GPU: no naive reference; `check` then compares with this peer's output instead.
    check_against: Optional[str] = None
    note: str = ""


def _visible_pairs(sq, sk, causal):
    """Query/key pairs a bottom-right aligned causal mask lets through (all when not causal)."""
    if not causal:
        return sq * sk
    off = sk - sq
    return sum(max(0, min(sk, i + off + 1)) for i in range(sq))


def _max_err(a, ref):
    a = np.asarray(a, dtype=np.float64)
    return float(np.max(np.abs(a - ref))) if a.size else 0.0


def _try_import_torch():
    try:
        import torch  # noqa: F401
        return torch
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# CPU cases: numpy float32 inputs, naive float64 numpy reference, torch SDPA (float32) as the peer
# ---------------------------------------------------------------------------------------------


def _torch_sdpa_cpu(torch, q_bhsd, k_bhsd, v_bhsd, mask=None, causal=False):
    """torch.nn.functional.scaled_dot_product_attention with GQA handled (enable_gqa, else repeat)."""
    F = torch.nn.functional
    hq, hkv = q_bhsd.shape[1], k_bhsd.shape[1]
    kw = {}
    if hq != hkv:
        try:
            F.scaled_dot_product_attention(q_bhsd[:1, :, :1], k_bhsd[:1, :, :1], v_bhsd[:1, :, :1],
                                           enable_gqa=True)
            kw["enable_gqa"] = True
        except TypeError:  # torch < 2.5
            k_bhsd = k_bhsd.repeat_interleave(hq // hkv, dim=1)
            v_bhsd = v_bhsd.repeat_interleave(hq // hkv, dim=1)
    if mask is not None:
        return lambda: F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, attn_mask=mask, **kw)
    return lambda: F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, is_causal=causal, **kw)


def cpu_prefill(rng, torch, b, s, hq, hkv, d, causal):
    from . import reference
    q = rng.standard_normal((b, s, hq, d), dtype=np.float32)
    k = rng.standard_normal((b, s, hkv, d), dtype=np.float32)
    v = rng.standard_normal((b, s, hkv, d), dtype=np.float32)
    pairs = _visible_pairs(s, s, causal) * b * hq
    elem = 4
    case = Case(
        suite="prefill",
        name="prefill%s d%d s%d%s" % (" causal" if causal else "", d, s,
                                      " gqa%d/%d" % (hq, hkv) if hq != hkv else ""),
        shape="B=%d S=%d H=%d/%d D=%d fp32%s" % (b, s, hq, hkv, d, " causal" if causal else ""),
        flops=4.0 * d * pairs,
        bytes=float(elem * (2 * q.size + k.size + v.size)),
        metric="flops",
        fastattn=lambda: fastattn.flash_attn_func(q, k, v, causal=causal),
        naive=lambda: reference.batched_attention(q, k, v, causal),
        check=_max_err,
    )
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        case.peers["torch"] = _torch_sdpa_cpu(torch, tq, tk, tv, causal=causal)
    return case


def _paged_cache(rng, lengths, hkv, d, page_size, dtype=np.float32):
    """Random pages in shuffled order: (k_pages, v_pages, block_table int32)."""
    n_pages = [(int(L) + page_size - 1) // page_size for L in lengths]
    total = sum(n_pages) + 3  # a few pages nobody uses
    perm = rng.permutation(total).astype(np.int32)
    table = np.zeros((len(lengths), max(max(n_pages), 1)), dtype=np.int32)
    pos = 0
    for i, n in enumerate(n_pages):
        table[i, :n] = perm[pos:pos + n]
        pos += n
    k_pages = rng.standard_normal((total, page_size, hkv, d), dtype=np.float32).astype(dtype)
    v_pages = rng.standard_normal((total, page_size, hkv, d), dtype=np.float32).astype(dtype)
    return k_pages, v_pages, table


def _padded_from_pages(torch, pages, table, lengths):
    """(B, Hkv, Lmax, D) torch tensor of each sequence's keys, zero-padded, for torch SDPA."""
    from .reference import gather_pages
    lmax = int(max(lengths))
    b = len(lengths)
    out = np.zeros((b, lmax) + pages.shape[2:], dtype=pages.dtype)
    for i, L in enumerate(lengths):
        out[i, :L] = gather_pages(pages, table[i], int(L))
    return torch.from_numpy(out).transpose(1, 2).contiguous()


def _length_mask(torch, lengths, sq=1):
    lmax = int(max(lengths))
    m = np.arange(lmax)[None, :] < np.asarray(lengths)[:, None]
    return torch.from_numpy(np.ascontiguousarray(m[:, None, None, :].repeat(sq, axis=2)))


def cpu_decode(rng, torch, b, hq, hkv, d, mean_len, page_size=16):
    from . import reference
    lengths = rng.integers(mean_len // 2, mean_len * 3 // 2 + 1, size=b).astype(np.int32)
    k_pages, v_pages, table = _paged_cache(rng, lengths, hkv, d, page_size)
    q = rng.standard_normal((b, 1, hq, d), dtype=np.float32)
    total = int(lengths.sum())
    case = Case(
        suite="decode",
        name="decode paged p%d b%d L~%d" % (page_size, b, mean_len),
        shape="B=%d Sq=1 H=%d/%d D=%d page=%d lens %d..%d fp32" % (
            b, hq, hkv, d, page_size, lengths.min(), lengths.max()),
        flops=4.0 * d * hq * total,
        bytes=4.0 * (2 * total * hkv * d + 2 * q.size),
        metric="bytes",
        fastattn=lambda: fastattn.flash_attn_with_kvcache(
            q, k_pages, v_pages, cache_seqlens=lengths, block_table=table, causal=True),
        naive=lambda: reference.paged_decode(q, k_pages, v_pages, table, lengths),
        check=_max_err,
        note="torch: SDPA on padded contiguous K/V with a length mask (gather not timed)",
    )
    if torch is not None:
        tk = _padded_from_pages(torch, k_pages, table, lengths)
        tv = _padded_from_pages(torch, v_pages, table, lengths)
        tq = torch.from_numpy(q).transpose(1, 2).contiguous()
        case.peers["torch"] = _torch_sdpa_cpu(torch, tq, tk, tv, mask=_length_mask(torch, lengths))
    return case


def _cascade_inputs(rng, b, hkv, d, prefix, mean_suffix, page_size):
    lengths = rng.integers(max(1, mean_suffix // 2), mean_suffix * 3 // 2 + 1, size=b).astype(np.int32)
    n_pages = [(int(L) + page_size - 1) // page_size for L in lengths]
    total_pages = sum(n_pages) + 2
    indices = rng.permutation(total_pages)[:sum(n_pages)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last = np.array([L - (n - 1) * page_size for L, n in zip(lengths, n_pages)], dtype=np.int32)
    kv_data = rng.standard_normal((total_pages, 2, page_size, hkv, d), dtype=np.float32)
    k_shared = rng.standard_normal((prefix, hkv, d), dtype=np.float32)
    v_shared = rng.standard_normal((prefix, hkv, d), dtype=np.float32)
    return lengths, indptr, indices, last, kv_data, k_shared, v_shared


def cpu_cascade_decode(rng, torch, b, hq, hkv, d, prefix, mean_suffix, page_size=16):
    from . import reference
    lengths, indptr, indices, last, kv_data, k_shared, v_shared = _cascade_inputs(
        rng, b, hkv, d, prefix, mean_suffix, page_size)
    q = rng.standard_normal((b, hq, d), dtype=np.float32)
    wrapper = fastattn.BatchDecodeWithSharedPrefixPagedKVCacheWrapper(
        np.empty(1 << 20, dtype=np.uint8), "NHD")
    wrapper.begin_forward(indptr, indices, last, hq, hkv, d, page_size, data_type="float32")
    suffix_total = int(lengths.sum())
    shape = "B=%d H=%d/%d D=%d prefix=%d suffix %d..%d page=%d fp32" % (
        b, hq, hkv, d, prefix, lengths.min(), lengths.max(), page_size)
    naive = lambda: reference.shared_prefix(q, None, k_shared, v_shared, kv_data, indptr, indices,
                                            last, causal=False)
    flops = 4.0 * d * hq * (b * prefix + suffix_total)
    case = Case(
        suite="cascade", name="cascade decode P%d b%d" % (prefix, b), shape=shape,
        flops=flops,
        bytes=4.0 * (2 * (prefix + suffix_total) * hkv * d + 2 * q.size),  # prefix read once
        metric="bytes",
        fastattn=lambda: wrapper.forward(q, k_shared, v_shared, kv_data),
        naive=naive, check=_max_err,
        note="BatchDecodeWithSharedPrefixPagedKVCacheWrapper; torch: SDPA on padded prefix+suffix",
    )
    # The same attention without cascade: every request's block table lists the prefix pages
    # (stored once, referenced by all) followed by its own suffix pages: a plain paged decode.
    n_prefix_pages = (prefix + page_size - 1) // page_size
    if prefix % page_size == 0:
        pk = kv_data[:, 0]
        pv = kv_data[:, 1]
        prefix_k = k_shared.reshape(n_prefix_pages, page_size, hkv, d)
        prefix_v = v_shared.reshape(n_prefix_pages, page_size, hkv, d)
        k_pages = np.concatenate([prefix_k, pk], axis=0)
        v_pages = np.concatenate([prefix_v, pv], axis=0)
        max_pages = n_prefix_pages + int(np.diff(indptr).max())
        table = np.zeros((b, max_pages), dtype=np.int32)
        for i in range(b):
            own = indices[indptr[i]:indptr[i + 1]] + n_prefix_pages
            table[i, :n_prefix_pages + len(own)] = np.concatenate(
                [np.arange(n_prefix_pages, dtype=np.int32), own])
        seqlens = (lengths + prefix).astype(np.int32)
        q4 = q[:, None]
        plain = Case(
            suite="cascade", name="same, paged decode P%d b%d" % (prefix, b), shape=shape,
            flops=flops, bytes=case.bytes, metric="bytes",
            fastattn=lambda: fastattn.flash_attn_with_kvcache(
                q4, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)[:, 0],
            naive=None, check=_max_err,
            note="no cascade: prefix pages shared through the block table (rate over cascade's bytes)",
        )
    else:
        plain = None
    if torch is not None:
        full_k = [np.concatenate([k_shared, reference.gather_pages(
            kv_data[:, 0], indices[indptr[i]:indptr[i + 1]], int(lengths[i]))]) for i in range(b)]
        full_v = [np.concatenate([v_shared, reference.gather_pages(
            kv_data[:, 1], indices[indptr[i]:indptr[i + 1]], int(lengths[i]))]) for i in range(b)]
        lmax = prefix + int(lengths.max())
        pk = np.zeros((b, lmax, hkv, d), np.float32)
        pv = np.zeros((b, lmax, hkv, d), np.float32)
        for i in range(b):
            pk[i, :len(full_k[i])] = full_k[i]
            pv[i, :len(full_v[i])] = full_v[i]
        tk = torch.from_numpy(pk).transpose(1, 2).contiguous()
        tv = torch.from_numpy(pv).transpose(1, 2).contiguous()
        tq = torch.from_numpy(q[:, :, None, :]).contiguous()  # (B, H, 1, D)
        case.peers["torch"] = _torch_sdpa_cpu(torch, tq, tk, tv,
                                              mask=_length_mask(torch, lengths + prefix))
        if plain is not None:
            plain.peers["torch"] = case.peers["torch"]
    return [c for c in (case, plain) if c is not None]


def cpu_cascade_prefill(rng, torch, b, hq, hkv, d, prefix, qo_len, page_size=16):
    from . import reference
    lengths, indptr, indices, last, kv_data, k_shared, v_shared = _cascade_inputs(
        rng, b, hkv, d, prefix, 2 * qo_len, page_size)
    lengths = np.maximum(lengths, qo_len)  # causal: queries are the last qo_len suffix tokens
    n_pages = [(int(L) + page_size - 1) // page_size for L in lengths]
    total_pages = sum(n_pages) + 2
    indices = rng.permutation(total_pages)[:sum(n_pages)].astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(n_pages)]).astype(np.int32)
    last = np.array([L - (n - 1) * page_size for L, n in zip(lengths, n_pages)], dtype=np.int32)
    kv_data = rng.standard_normal((total_pages, 2, page_size, hkv, d), dtype=np.float32)
    qo_indptr = (np.arange(b + 1) * qo_len).astype(np.int32)
    q = rng.standard_normal((b * qo_len, hq, d), dtype=np.float32)
    wrapper = fastattn.BatchPrefillWithSharedPrefixPagedKVCacheWrapper(
        np.empty(1 << 20, dtype=np.uint8), "NHD")
    wrapper.begin_forward(qo_indptr, indptr, indices, last, hq, hkv, d)
    pairs = sum(_visible_pairs(qo_len, prefix + int(L), True) for L in lengths) * hq
    case = Case(
        suite="cascade", name="cascade prefill P%d b%d q%d" % (prefix, b, qo_len),
        shape="B=%d q=%d/req H=%d/%d D=%d prefix=%d suffix %d..%d causal fp32" % (
            b, qo_len, hq, hkv, d, prefix, lengths.min(), lengths.max()),
        flops=4.0 * d * pairs,
        bytes=4.0 * (2 * (prefix + int(lengths.sum())) * hkv * d + 2 * q.size),
        metric="flops",
        fastattn=lambda: wrapper.forward(q, k_shared, v_shared, kv_data, causal=True),
        naive=lambda: reference.shared_prefix(q, qo_indptr, k_shared, v_shared, kv_data, indptr,
                                              indices, last, causal=True),
        check=_max_err,
        note="BatchPrefillWithSharedPrefixPagedKVCacheWrapper; torch: SDPA on padded K/V with mask",
    )
    if torch is not None:
        lk = prefix + int(lengths.max())
        pk = np.zeros((b, lk, hkv, d), np.float32)
        pv = np.zeros((b, lk, hkv, d), np.float32)
        mask = np.zeros((b, 1, qo_len, lk), dtype=bool)
        for i in range(b):
            L = int(lengths[i])
            ids = indices[indptr[i]:indptr[i + 1]]
            pk[i, :prefix + L] = np.concatenate([k_shared, reference.gather_pages(kv_data[:, 0], ids, L)])
            pv[i, :prefix + L] = np.concatenate([v_shared, reference.gather_pages(kv_data[:, 1], ids, L)])
            sk = prefix + L
            mask[i, 0] = np.arange(lk)[None, :] <= np.arange(qo_len)[:, None] + (sk - qo_len)
        tq = torch.from_numpy(q.reshape(b, qo_len, hq, d)).transpose(1, 2).contiguous()
        tk = torch.from_numpy(pk).transpose(1, 2).contiguous()
        tv = torch.from_numpy(pv).transpose(1, 2).contiguous()
        case.peers["torch"] = _torch_sdpa_cpu(torch, tq, tk, tv, mask=torch.from_numpy(mask))
    return case


def cpu_cases(suites: List[str], quick: bool, seed: int = 0) -> List[Case]:
    """Shapes sized so that the whole CPU run (naive reference and torch included) stays within
    about two minutes on 2 cores; --quick is a smoke run of a few seconds."""
    rng = np.random.default_rng(seed)
    torch = _try_import_torch()
    cases: List[Case] = []
    if "prefill" in suites:
        if quick:
            shapes = [(1, 256, 8, 8, 64, False), (1, 256, 8, 8, 128, True)]
        else:
            shapes = [(2, 512, 8, 8, 64, False), (2, 512, 8, 8, 64, True),
                      (1, 1024, 8, 8, 128, False), (1, 1024, 8, 8, 128, True),
                      (1, 2048, 4, 4, 128, True), (1, 2048, 8, 2, 128, True)]
        for b, s, hq, hkv, d, causal in shapes:
            cases.append(cpu_prefill(rng, torch, b, s, hq, hkv, d, causal))
    if "decode" in suites:
        shapes = [(4, 32, 8, 128, 256)] if quick else [(8, 32, 8, 128, 1024), (32, 32, 8, 128, 512),
                                                        (4, 32, 8, 128, 4096)]
        for b, hq, hkv, d, L in shapes:
            cases.append(cpu_decode(rng, torch, b, hq, hkv, d, L))
    if "cascade" in suites:
        if quick:
            cases += cpu_cascade_decode(rng, torch, 4, 32, 8, 128, 512, 32)
        else:
            cases += cpu_cascade_decode(rng, torch, 16, 32, 8, 128, 4096, 128)
            cases.append(cpu_cascade_prefill(rng, torch, 4, 32, 8, 128, 2048, 64))
    return cases


# ---------------------------------------------------------------------------------------------
# GPU cases (torch tensors on cuda): peers are PyTorch SDPA's flash and cuDNN backends
# ---------------------------------------------------------------------------------------------


def _sdpa_backend_call(torch, backend_name, q, k, v, causal=False, mask=None):
    """A callable running SDPA restricted to one backend, or None when it refuses the inputs.
    GQA: enable_gqa first; if the backend refuses it, K/V expanded to every query head."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]

    def make(kk, vv, kw):
        def run():
            with sdpa_kernel([backend]):
                if mask is not None:
                    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, **kw)
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, **kw)
        return run

    attempts = [(k, v, {})]
    if q.shape[1] != k.shape[1]:
        g = q.shape[1] // k.shape[1]
        attempts = [(k, v, {"enable_gqa": True}),
                    (k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), {})]
    for kk, vv, kw in attempts:
        run = make(kk, vv, kw)
        try:
            run()
            torch.cuda.synchronize()
            return run
        except Exception:
            continue
    return None


def gpu_decode(torch, b, hq, hkv, d, mean_len, dtype, page_size=16, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(mean_len // 2, mean_len * 3 // 2 + 1, size=b).astype(np.int32)
    n_pages = [(int(L) + page_size - 1) // page_size for L in lengths]
    total = sum(n_pages)
    perm = torch.from_numpy(rng.permutation(total).astype(np.int32))
    table = torch.zeros((b, max(n_pages)), dtype=torch.int32)
    pos = 0
    for i, n in enumerate(n_pages):
        table[i, :n] = perm[pos:pos + n]
        pos += n
    dev = torch.device("cuda")
    k_pages = torch.randn(total, page_size, hkv, d, device=dev, dtype=dtype)
    v_pages = torch.randn(total, page_size, hkv, d, device=dev, dtype=dtype)
    q = torch.randn(b, 1, hq, d, device=dev, dtype=dtype)
    table = table.to(dev)
    seqlens = torch.from_numpy(lengths).to(dev)
    tot = int(lengths.sum())
    case = Case(
        suite="decode", name="decode paged p%d b%d L~%d" % (page_size, b, mean_len),
        shape="B=%d H=%d/%d D=%d page=%d" % (b, hq, hkv, d, page_size),
        flops=4.0 * d * hq * tot, bytes=float(q.element_size() * 2 * tot * hkv * d), metric="bytes",
        fastattn=lambda: fastattn.flash_attn_with_kvcache(
            q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table, causal=True),
        note="sdpa: padded contiguous K/V with a length mask (gather not timed)",
    )
    lmax = int(lengths.max())
    flat = torch.arange(lmax, device=dev)
    idx = table.long()[:, (flat // page_size)] * page_size + (flat % page_size)[None, :]
    kp = k_pages.reshape(-1, hkv, d)[idx.clamp(max=total * page_size - 1)].transpose(1, 2)
    vp = v_pages.reshape(-1, hkv, d)[idx.clamp(max=total * page_size - 1)].transpose(1, 2)
    mask = (flat[None, :] < seqlens[:, None].long())[:, None, None, :]
    tq = q.transpose(1, 2)
    for name in ("efficient", "cudnn"):
        fn = _sdpa_backend_call(torch, name, tq, kp, vp, mask=mask)
        if fn is not None:
            case.peers["sdpa-" + name] = fn
    return case


def gpu_cases(suites: List[str], quick: bool):
    """Yields the cases one at a time, so each one's tensors are freed before the next is built."""
    import torch
    # GPU prefill (dense, varlen and paged against SDPA flash and cuDNN) is gpu_prefill.py.
    if "decode" in suites:
        shapes = [(64, 32, 8, 128, 2048)] if quick else [(64, 32, 8, 128, 2048), (256, 32, 8, 128, 1024),
                                                          (16, 32, 8, 128, 16384)]
        for b, hq, hkv, d, L in shapes:
            yield gpu_decode(torch, b, hq, hkv, d, L, torch.float16)
    # GPU cascade rows come with the CUDA cascade kernels.
