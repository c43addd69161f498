"""flash_attn-compatible functions (names, argument order and defaults of FlashAttention 2).

Every function here only maps arguments and allocates outputs; the attention itself (and every
check of shapes, dtypes and values) is done by the C++ library through ``fastattn._C``.

Differences from flash_attn, all deliberate for an inference library:

* ``dropout_p`` must be 0.0 (a ValueError otherwise); ``deterministic`` is accepted and ignored
  (the forward pass is always deterministic).
* ``return_attn_probs=True`` returns ``(out, softmax_lse, attn_probs)`` where ``attn_probs`` is the
  float32 softmax matrix ``(batch, heads, seqlen_q, seqlen_k)`` (varlen: ``max_seqlen_q``,
  ``max_seqlen_k``, zero-padded); it is a testing aid and costs O(seqlen_q * seqlen_k) memory.
* ``softmax_lse`` is float32 natural-log log-sum-exp of the scores: ``(batch, heads, seqlen_q)``,
  varlen ``(heads, total_q)``. Rows that see no key give output 0 and LSE ``-inf``.
* Every function accepts numpy arrays as well as torch tensors (and cupy / jax arrays) and
  returns arrays of the same kind. CPU tensors run on the CPU backend.
* Every function takes attention sinks (gpt-oss) as the keyword ``sinks`` (FlashInfer's name) or
  ``s_aux`` (the name in vLLM's FlashAttention fork): ``(nheads,)`` float32, one more logit per head
  with a zero value row.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from . import _C
from ._tensors import (
    as_float,
    as_int,
    call_op,
    check_array,
    empty,
    cuda_stream_of,
    finalize,
    framework,
    is_cuda,
    optional_float,
    plain_torch_tensor_type,
    prepare,
    shape_or_zero,
    through_exchange_table,
    window_pair,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
]


def _check_dropout(dropout_p: Any) -> None:
    p = as_float(dropout_p, "dropout_p")
    if p != 0.0:
        raise ValueError(
            f"dropout_p must be 0.0: fastattn is an inference library and has no dropout "
            f"(got dropout_p={p})"
        )


def _option_kwargs(like, softmax_scale, causal, window_size, softcap, alibi_slopes,
                   stream: bool = True) -> dict:
    """The options and (with `stream`) the stream, checked, as keyword arguments of the binding:
    only those that differ from its defaults (nanobind parses each argument given, ~0.1-0.5 us
    apiece). The defaults (a (-1, -1) tuple, a float softcap) skip their checks."""
    if type(window_size) is tuple and window_size == (-1, -1):
        left = right = -1
    else:
        left, right = window_pair(window_size)
    kw = {}
    if softmax_scale is not None:
        kw["softmax_scale"] = optional_float(softmax_scale, "softmax_scale")
    if causal:
        kw["causal"] = True
    if left != -1:
        kw["window_left"] = left
    if right != -1:
        kw["window_right"] = right
    cap = softcap if type(softcap) is float else as_float(softcap, "softcap")
    if cap != 0.0:
        kw["softcap"] = cap
    if alibi_slopes is not None:
        check_array(alibi_slopes, "alibi_slopes")
        kw["alibi_slopes"] = prepare(alibi_slopes)
    if stream:
        cuda_stream = cuda_stream_of(like)
        if cuda_stream:
            kw["cuda_stream"] = cuda_stream
    return kw


def _sinks(sinks, s_aux):
    """The attention sinks given as `sinks` or as `s_aux` (vLLM's FlashAttention fork's name for
    the same tensor), at most one of the two."""
    if s_aux is None:
        return sinks
    if sinks is not None:
        raise TypeError("sinks and s_aux name the same attention sinks: pass one of them, got both")
    return s_aux


def _check_arrays(**arrays) -> None:
    for name, x in arrays.items():
        if x is not None:
            check_array(x, name)


def _given_arrays(required, **arrays) -> dict:
    """The arrays given (not None), each checked and prepared, as keyword arguments of the
    binding, in order (the first bad one is the error); those named in `required` must be given.
    A torch.Tensor is known to be an array and only needs a detach where it requires grad: that
    test inline took about 1 us off a decode call's five arrays (bench/NOTES.md, session 98)."""
    plain = plain_torch_tensor_type()
    given = {}
    for name, x in arrays.items():
        if x is None:
            if name in required:
                raise ValueError(f"argument '{name}' is required, got None")
        elif type(x) is plain:
            given[name] = x.detach() if x.requires_grad else x
        else:
            check_array(x, name)
            given[name] = prepare(x)
    return given


def _check_packed(x, name: str, ndim: int, dim: int, count: int, layout: str) -> None:
    """Packed tensors (qkv, kv) exist only in the Python API, so their packing is checked here."""
    check_array(x, name)
    shape = tuple(x.shape)
    if len(shape) != ndim or shape[dim] != count:
        raise ValueError(f"{name} must have shape {layout}, got {shape}")


def _result(like, out, lse, probs, return_attn_probs, return_softmax_lse):
    out = finalize(like, out)
    if return_attn_probs:
        return out, finalize(like, lse), finalize(like, probs)
    if return_softmax_lse:
        return out, finalize(like, lse)
    return out


# ---- dense batched -------------------------------------------------------------------------


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    return_softmax_lse=False,
    out=None,
    sinks=None,
    s_aux=None,
):
    """Attention over dense batches.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim)
        k, v: (batch_size, seqlen_k, nheads_k, headdim); nheads % nheads_k == 0 (GQA / MQA:
            query head h reads kv head h // (nheads // nheads_k)).
        dropout_p: must be 0.0.
        softmax_scale: scale of q @ k^T, default 1 / sqrt(headdim).
        causal: causal mask aligned to the bottom-right corner of the attention matrix.
        window_size: (left, right); query i sees keys j with
            i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right (-1: unbounded).
        softcap: > 0 applies softcap * tanh(scores / softcap).
        alibi_slopes: (nheads,) or (batch_size, nheads) float32; adds
            -slope * |i + seqlen_k - seqlen_q - j| to the scores.
        deterministic: ignored (the forward pass is always deterministic).
        return_attn_probs: also return softmax_lse and the softmax matrix (testing aid).
        return_softmax_lse: also return softmax_lse (batch_size, nheads, seqlen_q) float32.
        out: optional preallocated output, (batch_size, seqlen_q, nheads, headdim).
        sinks: (keyword only) optional (nheads,) float32 attention sinks (gpt-oss, StreamingLLM):
            sinks[h] joins every softmax of head h as one more logit (in the units of the scaled,
            soft-capped scores) with a zero value row. softmax_lse includes it, a row with no keys
            gets out 0 and softmax_lse sinks[h], and attn_probs holds the keys' share of each
            softmax (a row sums to less than 1).
        s_aux: the same as sinks, by the name vLLM's FlashAttention fork gives it (pass one).
    Return:
        out, or (out, softmax_lse), or (out, softmax_lse, attn_probs).
    """
    _check_dropout(dropout_p)
    sinks = _sinks(sinks, s_aux)
    _check_arrays(q=q, k=k, v=v, out=out, sinks=sinks)
    # From torch 2.10 the binding allocates out and the LSE and reads the current stream through
    # q's DLPack exchange table, as for flash_attn_with_kvcache (bench/NOTES.md, session 98). The
    # attention matrix (a testing aid) keeps Python's allocation.
    table = not return_attn_probs and through_exchange_table(q)
    kw = _option_kwargs(q, softmax_scale, causal, window_size, softcap, alibi_slopes, stream=not table)
    if sinks is not None:
        kw["sinks"] = prepare(sinks)
    if table:
        if return_softmax_lse:
            kw["return_lse"] = True
        return call_op(_C.attention_forward, prepare(q), prepare(k), prepare(v),
                       None if out is None else prepare(out), stream_from_q=True, **kw)
    batch, seqlen_q, nheads = (shape_or_zero(q, 4, i) for i in range(3))
    seqlen_k = shape_or_zero(k, 4, 1)
    o = out if out is not None else empty(q, q.shape)
    lse = empty(q, (batch, nheads, seqlen_q), "float32") if (return_attn_probs or return_softmax_lse) else None
    probs = empty(q, (batch, nheads, seqlen_q, seqlen_k), "float32") if return_attn_probs else None
    call_op(_C.attention_forward, prepare(q), prepare(k), prepare(v), prepare(o), lse, probs, **kw)
    return _result(q, o, lse, probs, return_attn_probs, return_softmax_lse)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    return_softmax_lse=False,
    out=None,
    sinks=None,
    s_aux=None,
):
    """flash_attn_func with q, k, v stacked: qkv (batch_size, seqlen, 3, nheads, headdim).
    The three are read as strided views (no copy)."""
    _check_packed(qkv, "qkv", 5, 2, 3, "(batch_size, seqlen, 3, nheads, headdim)")
    return flash_attn_func(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs,
        return_softmax_lse=return_softmax_lse, out=out, sinks=sinks, s_aux=s_aux,
    )


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    return_softmax_lse=False,
    out=None,
    sinks=None,
    s_aux=None,
):
    """flash_attn_func with k, v stacked: kv (batch_size, seqlen_k, 2, nheads_k, headdim)."""
    _check_packed(kv, "kv", 5, 2, 2, "(batch_size, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(
        q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
        alibi_slopes, deterministic, return_attn_probs,
        return_softmax_lse=return_softmax_lse, out=out, sinks=sinks, s_aux=s_aux,
    )


# ---- variable length -----------------------------------------------------------------------


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    *,
    seqused_k=None,
    return_softmax_lse=False,
    out=None,
    sinks=None,
    s_aux=None,
):
    """Attention over packed sequences of different lengths.

    Arguments:
        q: (total_q, nheads, headdim); sequence b is rows cu_seqlens_q[b] : cu_seqlens_q[b + 1].
            Rows past cu_seqlens_q[-1] (padding) get output 0 and LSE -inf.
        k, v: (total_k, nheads_k, headdim) packed like q through cu_seqlens_k, or, with
            block_table, paged caches (num_blocks, page_block_size, nheads_k, headdim) (any page
            size >= 1).
        cu_seqlens_q, cu_seqlens_k: (batch_size + 1,) int32 cumulative lengths starting at 0.
            With block_table, key lengths are cu_seqlens_k differences (or seqused_k);
            cu_seqlens_k may then be None when seqused_k is given.
        max_seqlen_q, max_seqlen_k: upper bounds of the query / key lengths.
        block_table: (batch_size, max_num_blocks_per_seq) int32 page ids. On a GPU, decoding
            (max_seqlen_q == 1 and one query row per sequence, no attn_probs) runs the split-KV
            decode kernels, with scratch from q's framework allocator.
        seqused_k: (batch_size,) int32: number of keys each sequence uses.
        Other arguments as flash_attn_func. softmax_lse is (nheads, total_q) float32;
        attn_probs is (batch_size, nheads, max_seqlen_q, max_seqlen_k), zero-padded.
    Return:
        out (total_q, nheads, headdim), or (out, softmax_lse), or (out, softmax_lse, attn_probs).
    """
    _check_dropout(dropout_p)
    args = _given_arrays(("q", "cu_seqlens_q"), q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                         cu_seqlens_k=cu_seqlens_k, block_table=block_table, seqused_k=seqused_k,
                         out=out, sinks=_sinks(sinks, s_aux))
    if block_table is not None:  # k and v are the paged caches
        for name in ("k", "v"):
            if name in args:
                args[name + "_pages"] = args.pop(name)
    # From torch 2.10 the binding allocates out and the LSE and reads the current stream through
    # q's DLPack exchange table, as for flash_attn_with_kvcache (bench/NOTES.md, session 98). The
    # attention matrix (a testing aid) keeps Python's allocation.
    table = not return_attn_probs and through_exchange_table(args["q"])
    kw = _option_kwargs(q, softmax_scale, causal, window_size, softcap, alibi_slopes, stream=not table)
    args["max_seqlen_q"] = max_seqlen_q = as_int(max_seqlen_q, "max_seqlen_q")
    args["max_seqlen_k"] = max_seqlen_k = as_int(max_seqlen_k, "max_seqlen_k")
    if table:
        # out (None: q's shape and dtype), softmax_lse (nheads, total_q) and the decode kernels'
        # split-KV scratch from torch's allocator.
        args["stream_from_q"] = True
        args["workspace_from_q"] = True
        if return_softmax_lse:
            args["return_lse"] = True
        return call_op(_C.varlen_attention_forward, **args, **kw)
    total_q, nheads = shape_or_zero(q, 3, 0), shape_or_zero(q, 3, 1)
    if out is None:
        args["out"] = o = empty(q, q.shape)
    else:
        o = args["out"]
    lse = probs = None
    if return_attn_probs or return_softmax_lse:
        args["lse"] = lse = empty(q, (nheads, total_q), "float32")
    if return_attn_probs:
        batch = max(shape_or_zero(cu_seqlens_q, 1, 0) - 1, 0)
        args["probs"] = probs = empty(
            q, (batch, nheads, max(max_seqlen_q, 0), max(max_seqlen_k, 0)), "float32")
    # Decode-shaped calls on a GPU (block_table, max_seqlen_q == 1, one query row per sequence)
    # run the split-KV decode kernels; their scratch comes from the caller's allocator as in
    # flash_attn_with_kvcache, asked for by the binding only when the call needs it.
    if is_cuda(q):
        args["workspace_from_q"] = True
        args["workspace_alloc"] = lambda nbytes: empty(q, (nbytes,), "uint8")
    call_op(_C.varlen_attention_forward, **args, **kw)
    return _result(q, o, lse, probs, return_attn_probs, return_softmax_lse)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    return_softmax_lse=False,
    out=None,
    sinks=None,
    s_aux=None,
):
    """flash_attn_varlen_func with q, k, v stacked: qkv (total, 3, nheads, headdim)."""
    _check_packed(qkv, "qkv", 4, 1, 3, "(total, 3, nheads, headdim)")
    return flash_attn_varlen_func(
        qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, return_softmax_lse=return_softmax_lse, out=out,
        sinks=sinks, s_aux=s_aux,
    )


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    *,
    return_softmax_lse=False,
    out=None,
    sinks=None,
    s_aux=None,
):
    """flash_attn_varlen_func with k, v stacked: kv (total_k, 2, nheads_k, headdim)."""
    _check_packed(kv, "kv", 4, 1, 2, "(total_k, 2, nheads_k, headdim)")
    return flash_attn_varlen_func(
        q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, return_softmax_lse=return_softmax_lse, out=out,
        sinks=sinks, s_aux=s_aux,
    )


# ---- KV cache ------------------------------------------------------------------------------


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, Any]] = None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
    *,
    out=None,
    split_plan=None,
    sinks=None,
    s_aux=None,
):
    """Attention over a KV cache, appending new keys/values in place first (decoding).

    If k and v are given, they are written into k_cache / v_cache *in place* at slots
    cache_seqlens[b], cache_seqlens[b] + 1, ... (rotary applied to k when rotary_cos / rotary_sin
    are given); nothing else in the caches is written. Then q attends over slots
    [cache_leftpad[b], cache_seqlens[b] + seqlen_new) of its cache row.

    Arguments:
        q: (batch_size, seqlen_q, nheads, headdim), any seqlen_q >= 1.
        k_cache, v_cache: (batch_size_cache, seqlen_cache, nheads_k, headdim), or with
            block_table paged: (num_blocks, page_block_size, nheads_k, headdim), any page size.
        k, v: optional (batch_size, seqlen_new, nheads_k, headdim) to append.
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2), same dtype as q. k row t is
            rotated at position cache_seqlens[b] - cache_leftpad[b] + t; q likewise when causal
            or windowed, else all q rows at position cache_seqlens[b] - cache_leftpad[b].
        rotary_interleaved: True rotates dims (0, 1), (2, 3), ...; False (GPT-NeoX) rotates
            (i, i + rotary_dim / 2).
        cache_seqlens: int, or (batch_size,) int32: tokens already in the cache. None means the
            whole cache is valid (seqlen_cache, or max_num_blocks_per_seq * page_block_size),
            which is only allowed without k / v.
        cache_batch_idx: (batch_size,) int32 cache row (block-table row) of each sequence.
        cache_leftpad: (batch_size,) int32 first valid cache slot; positions count from it.
        block_table: (batch_size, max_num_blocks_per_seq) int32: paged cache.
        num_splits: split-KV count per sequence; 0 chooses by heuristic.
        return_softmax_lse: also return softmax_lse (batch_size, nheads, seqlen_q) float32.
        split_plan: (fastattn's, keyword only) a count per sequence for a ragged batch, from
            :func:`fastattn.decode_split_plan` on q's device (num_splits must then be 0): built
            on the host from the key lengths, so the call itself still reads none. The CPU backend
            checks it and ignores it.
        sinks: (fastattn's, keyword only) optional (nheads,) float32 attention sinks (gpt-oss,
            StreamingLLM): sinks[h] joins every softmax of head h as one more logit (in the units
            of the scaled, soft-capped scores) with a zero value row; softmax_lse includes it, and
            a row with no keys gets out 0 and softmax_lse sinks[h]. s_aux: the same, by the name
            vLLM's FlashAttention fork gives it (pass one of the two).
        Other arguments as flash_attn_func.
    Return:
        out (batch_size, seqlen_q, nheads, headdim), or (out, softmax_lse).
    """
    args = _given_arrays(("q", "k_cache", "v_cache"), q=q, k_cache=k_cache, v_cache=v_cache, k=k,
                         v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                         cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                         block_table=block_table, out=out, split_plan=split_plan,
                         sinks=_sinks(sinks, s_aux))
    appending = k is not None or v is not None
    if appending:
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if framework(cache) == "jax":
                raise TypeError(
                    f"{name}: jax arrays are immutable, but flash_attn_with_kvcache appends k / v "
                    "into the cache in place; pass numpy / torch / cupy caches or k=v=None"
                )
    # From torch 2.10 the binding allocates out and the LSE and reads the current stream through
    # q's DLPack exchange table: no Python allocation or stream query (bench/NOTES.md, session 97).
    table = through_exchange_table(args["q"])
    kw = _option_kwargs(q, softmax_scale, causal, window_size, softcap, alibi_slopes, stream=not table)

    seqlens = {}
    if cache_seqlens is None:
        if appending:
            raise ValueError(
                "cache_seqlens must be given when k and v are appended (it says where they go)"
            )
        # flash_attn's convention: without cache_seqlens the whole cache is valid.
        if block_table is None:
            full = shape_or_zero(k_cache, 4, 1)
        else:
            full = shape_or_zero(block_table, 2, 1) * shape_or_zero(k_cache, 4, 1)
        seqlens["cache_seqlen"] = full
    elif isinstance(cache_seqlens, bool):
        raise TypeError("cache_seqlens must be an int or an int32 array, got bool")
    elif hasattr(cache_seqlens, "shape") and len(tuple(cache_seqlens.shape)) > 0:
        seqlens["cache_seqlens"] = prepare(cache_seqlens)
    else:
        try:
            seqlens["cache_seqlen"] = as_int(cache_seqlens, "cache_seqlens")
        except TypeError:
            raise TypeError(
                f"cache_seqlens must be an int or a (batch_size,) int32 array, got "
                f"{type(cache_seqlens).__name__}"
            ) from None

    splits = as_int(num_splits, "num_splits")
    if splits:
        args["num_splits"] = splits
    if not rotary_interleaved:
        args["rotary_interleaved"] = False
    args.update(seqlens)
    args.update(kw)
    if table:
        # out (None: q's shape and dtype) and softmax_lse (batch_size, nheads, seqlen_q) from
        # torch's allocator; the split-KV scratch likewise, when the op asks for it.
        args["stream_from_q"] = True
        args["workspace_from_q"] = True
        if return_softmax_lse:
            args["return_lse"] = True
        return call_op(_C.kvcache_attention_forward, **args)
    if out is None:
        args["out"] = o = empty(q, q.shape)
    else:
        o = args["out"]
    lse = None
    if return_softmax_lse:
        batch, seqlen_q, nheads = (shape_or_zero(q, 4, i) for i in range(3))
        args["lse"] = lse = empty(q, (batch, nheads, seqlen_q), "float32")
    # The CPU backend allocates its own scratch; on a GPU it comes from the caller's allocator
    # (torch / cupy caching allocators: stream-ordered, so calls stay graph-capturable), asked
    # for by the binding only when the call needs it: through q's DLPack exchange table where its
    # type has one, else through this callback.
    if is_cuda(q):
        args["workspace_from_q"] = True
        args["workspace_alloc"] = lambda nbytes: empty(q, (nbytes,), "uint8")
    call_op(_C.kvcache_attention_forward, **args)
    out_final = finalize(q, o)
    if return_softmax_lse:
        return out_final, finalize(q, lse)
    return out_final
