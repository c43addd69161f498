"""FlashInfer's single-request decode, ``flashinfer.decode.single_decode_with_kv_cache``: one query
row per head over one request's keys and values, held contiguously (not in pages).

It runs as a one-sequence :func:`fastattn.flash_attn_with_kvcache` call over views of the caller's
arrays (no copy, either layout): the same op and kernels, and the split-KV heuristic, which splits a
single sequence's keys over the SMs. The binding's single_decode_forward makes the views and calls the
op, not flash_attn_with_kvcache's argument mapping: a single request's decode runs 10-40 us on an
H200, so a call's host time is most of its cost (bench/NOTES.md, sessions 94-96).
"""

from __future__ import annotations

from typing import Optional

from . import _C
from ._tensors import (
    as_int,
    call_op,
    check_array,
    cuda_stream_of,
    dtype_name,
    empty,
    finalize,
    framework,
    is_cuda,
    optional_float,
    prepare,
)
from .decode import _calibration_scale, _refuse_fused_rope, _scaled_softmax_scale

__all__ = ["single_decode_with_kv_cache"]

_SINGLE_DECODE_LAYOUTS = {"NHD": "(kv_len, num_kv_heads, head_dim)", "HND": "(num_kv_heads, kv_len, head_dim)"}


def _check_inputs(q, k, v, kv_layout):
    """The shape, dtype and framework checks, each error naming the argument; returns
    (num_qo_heads, head_dim). Each array's framework, shape and dtype are read once (host time)."""
    if kv_layout not in _SINGLE_DECODE_LAYOUTS:
        raise ValueError(f"kv_layout must be 'NHD' (k and v {_SINGLE_DECODE_LAYOUTS['NHD']}) or 'HND' "
                         f"(k and v {_SINGLE_DECODE_LAYOUTS['HND']}), got {kv_layout!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if framework(x) is None:  # the views below need the array's own indexing
            check_array(x, name)  # not an array at all: its own message
            raise TypeError(f"{name} must be a numpy, torch, cupy or jax array, got {type(x).__name__}")
    q_shape, k_shape, v_shape = tuple(q.shape), tuple(k.shape), tuple(v.shape)
    if len(q_shape) != 2:
        raise ValueError(f"q must be (num_qo_heads, head_dim), got shape {q_shape}")
    heads_q, d = q_shape
    want = _SINGLE_DECODE_LAYOUTS[kv_layout]
    for name, x, shape in (("k", k, k_shape), ("v", v, v_shape)):
        if len(shape) != 3:
            raise ValueError(f"{name} must be {want} for kv_layout {kv_layout!r}, got shape {shape}")
        if x.dtype != q.dtype and dtype_name(x.dtype) != dtype_name(q.dtype):
            raise TypeError(f"{name} must have q's dtype ({dtype_name(q.dtype)}), got "
                            f"{dtype_name(x.dtype)}")
    if v_shape != k_shape:
        raise ValueError(f"v must have k's shape {k_shape}, got {v_shape}")
    heads_kv = k_shape[1] if kv_layout == "NHD" else k_shape[0]
    if k_shape[2] != d:
        raise ValueError(f"k's head_dim (last dimension) must be q's ({d}), got {k_shape[2]}")
    if heads_kv < 1 or heads_q % heads_kv:
        raise ValueError(f"num_qo_heads ({heads_q}) must be a multiple of num_kv_heads, got "
                         f"num_kv_heads {heads_kv} (k's shape {k_shape}, kv_layout {kv_layout!r})")
    return heads_q, d


def single_decode_with_kv_cache(q, k, v, kv_layout: str = "NHD", pos_encoding_mode: str = "NONE",
                                use_tensor_cores: bool = False, q_scale=None, k_scale=None,
                                v_scale=None, window_left: int = -1,
                                logits_soft_cap: Optional[float] = None,
                                sm_scale: Optional[float] = None, rope_scale=None, rope_theta=None,
                                return_lse: bool = False):
    """Decode attention of one request: its query, one row per head, after its last key.

    FlashInfer 0.5.3's arguments, in its order:
        q: (num_qo_heads, head_dim).
        k, v: (kv_len, num_kv_heads, head_dim) for kv_layout "NHD", (num_kv_heads, kv_len,
            head_dim) for "HND" (read in place as strided views); q's dtype; num_qo_heads a
            multiple of num_kv_heads (GQA / MQA). kv_len may be 0: out 0, LSE -inf.
        pos_encoding_mode: "NONE" only (no fused RoPE or ALiBi mode: rotate q and k before the
            call); rope_scale and rope_theta must be None.
        use_tensor_cores: chooses among FlashInfer's kernels; ignored.
        q_scale, k_scale, v_scale: calibration scales, None (1) or finite numbers on the host: the
            scores are (q . k) * sm_scale * q_scale * k_scale (before the soft cap, and the LSE is
            theirs), and out is multiplied by v_scale after the kernels have written it.
        window_left: keys before the query's own position it sees (-1: all).
        logits_soft_cap: None or 0 for none, else cap * tanh(score / cap).
        sm_scale: None for 1 / sqrt(head_dim).
    Returns out (num_qo_heads, head_dim) in q's dtype, or (out, lse) with return_lse: lse
    (num_qo_heads,) float32, natural log (FlashInfer's is base 2: :func:`lse_natural_to_base2`).
    """
    _refuse_fused_rope(pos_encoding_mode, rope_scale, rope_theta)
    heads_q, d = _check_inputs(q, k, v, kv_layout)
    left = as_int(window_left, "window_left")
    if left < -1:
        raise ValueError(f"window_left must be >= -1 (-1: no bound), got {left}")
    scale = _scaled_softmax_scale(optional_float(sm_scale, "sm_scale"), d, q_scale, k_scale)
    out_scale = _calibration_scale(v_scale, "v_scale")
    softcap = optional_float(logits_soft_cap, "logits_soft_cap") or 0.0

    q, k, v = prepare(q), prepare(k), prepare(v)
    # One sequence of one query row over its whole cache: flash_attn_with_kvcache(q[None, None],
    # k[None], v[None], softmax_scale=scale, window_size=(left, -1), softcap=softcap), with the
    # views (and HND's axis swap) made by the binding: a torch view costs about 1 us of host time.
    o = empty(q, (heads_q, d))
    lse = empty(q, (heads_q,), "float32") if return_lse else None
    kw = {}
    if is_cuda(q):
        kw["cuda_stream"] = cuda_stream_of(q)
        kw["workspace_from_q"] = True  # the split-KV scratch: through q's exchange table, else the callback
        kw["workspace_alloc"] = lambda nbytes: empty(q, (nbytes,), "uint8")
    call_op(_C.single_decode_forward, q, k, v, o, lse, kv_layout == "HND", scale, left, softcap, **kw)
    if out_scale != 1.0:
        o *= out_scale  # the output as written, scaled once more in place
    if return_lse:
        return finalize(q, o), finalize(q, lse)
    return finalize(q, o)
