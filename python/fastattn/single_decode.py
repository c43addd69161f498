"""FlashInfer's single-request decode, ``flashinfer.decode.single_decode_with_kv_cache``: one query
row per head over one request's keys and values, held contiguously (not in pages).

It runs as a one-sequence :func:`fastattn.flash_attn_with_kvcache` call over views of the caller's
arrays (no copy, either layout): the same op and kernels, and the split-KV heuristic, which splits a
single sequence's keys over the SMs. One binding call, `_C.single_decode_forward`, checks the arrays,
makes the views and calls the op, and for torch >= 2.10 tensors also allocates the outputs and reads
the current stream through torch's DLPack exchange table: a single request's decode runs 10-40 us on
an H200, so a call's host time is most of its cost (bench/NOTES.md, sessions 94-96).
"""

from __future__ import annotations

from typing import Optional

from . import _C
from ._tensors import (
    as_int,
    call_op,
    check_array,
    cuda_stream_of,
    empty,
    finalize,
    framework,
    is_cuda,
    optional_float,
    prepare,
    through_exchange_table,
)
from .decode import _calibration_scale, _check_pos_encoding

__all__ = ["single_decode_with_kv_cache"]

_SINGLE_DECODE_LAYOUTS = {"NHD": "(kv_len, num_kv_heads, head_dim)", "HND": "(num_kv_heads, kv_len, head_dim)"}


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
            call). rope_scale and rope_theta parametrise the fused RoPE only: None or numbers,
            without effect (as in FlashInfer with "NONE").
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
    _check_pos_encoding(pos_encoding_mode, rope_scale, rope_theta)
    if kv_layout not in _SINGLE_DECODE_LAYOUTS:
        raise ValueError(f"kv_layout must be 'NHD' (k and v {_SINGLE_DECODE_LAYOUTS['NHD']}) or 'HND' "
                         f"(k and v {_SINGLE_DECODE_LAYOUTS['HND']}), got {kv_layout!r}")
    left = as_int(window_left, "window_left")
    if left < -1:
        raise ValueError(f"window_left must be >= -1 (-1: no bound), got {left}")
    # The binding folds them as FlashInfer does: (sm_scale or 1 / sqrt(head_dim)) * q_scale * k_scale.
    sm = optional_float(sm_scale, "sm_scale")
    factor = _calibration_scale(q_scale, "q_scale") * _calibration_scale(k_scale, "k_scale")
    out_scale = _calibration_scale(v_scale, "v_scale")
    softcap = optional_float(logits_soft_cap, "logits_soft_cap") or 0.0
    hnd = kv_layout == "HND"

    # One sequence of one query row over its whole cache: flash_attn_with_kvcache(q[None, None],
    # k[None], v[None], softmax_scale=scale, window_size=(left, -1), softcap=softcap), with the
    # checks, the views (and HND's axis swap) made by the binding.
    q, k, v = prepare(q), prepare(k), prepare(v)
    if through_exchange_table(q):
        # torch >= 2.10: the binding also allocates out and lse and reads the current stream through
        # torch's exchange table.
        res = _C.single_decode_forward(q, k, v, None, None, hnd, return_lse, sm, factor, left, softcap,
                                       stream_from_q=True, workspace_from_q=True)
        o = res[0] if return_lse else res
    else:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if framework(x) is None:  # outputs are allocated in x's framework below
                check_array(x, name)  # not an array at all: its own message
                raise TypeError(f"{name} must be a numpy, torch, cupy or jax array, got {type(x).__name__}")
        o = empty(q, tuple(q.shape))  # (num_qo_heads, head_dim) once the binding has checked q
        lse = empty(q, tuple(q.shape)[:1], "float32") if return_lse else None
        kw = {}
        if is_cuda(q):
            kw["cuda_stream"] = cuda_stream_of(q)
            kw["workspace_from_q"] = True  # the split-KV scratch: through q's exchange table, else the callback
            kw["workspace_alloc"] = lambda nbytes: empty(q, (nbytes,), "uint8")
        call_op(_C.single_decode_forward, q, k, v, o, lse, hnd, return_lse, sm, factor, left, softcap, **kw)
        res = (o, lse) if return_lse else o
    if out_scale != 1.0:
        o *= out_scale  # the output as written, scaled once more in place
    if return_lse:
        return finalize(q, res[0]), finalize(q, res[1])
    return finalize(q, res)
