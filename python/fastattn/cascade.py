"""FlashInfer-compatible cascade attention: merging attention states and shared-prefix attention.

An attention *state* of a set of queries over a set of keys is the pair (v, s): the attention
output ``v`` and the log-sum-exp ``s`` of the scores. fastattn's LSE is the **natural** logarithm
everywhere (``softmax_lse`` of the flash_attn functions included), so those states merge directly.

FlashInfer's kernels produce base-2 LSE (``log2(sum(exp2(scores * log2(e))))``). To merge
FlashInfer states with fastattn, convert explicitly::

    s_natural = lse_base2_to_natural(s_base2)     # s * ln(2)
    s_base2   = lse_natural_to_base2(s_natural)   # s / ln(2)

``-inf`` (a state over no key) stays ``-inf`` and merging with it is exact (never NaN).

Shared-prefix attention computes, for a batch of requests that share one dense prefix K/V and
each own a paged suffix, the attention of each request's queries over prefix + suffix: two passes
(all queries against the prefix, each request against its suffix) merged with the same merge
operation. All math is done by the C++ library; this module only maps arguments.

On a GPU (torch / cupy CUDA tensors) the call neither synchronises nor allocates outside the
caller's allocator once it knows two sizes that live in device arrays: the longest query run
(``max_seqlen_q``) and the longest suffix (``max_suffix_len``). The wrappers read them from host
copies in ``begin_forward`` (FlashInfer's planning step), so their ``forward`` can be captured in
a CUDA graph; ``shared_prefix_attention`` reads them from the index arrays itself when they are
not given (a device-to-host copy: it synchronises) -- pass them, or 0 ("unknown": always correct,
slower for prefill), to avoid that. Scratch memory comes from the wrapper's ``workspace_buffer``
when it is a large enough uint8 buffer on the device, else from the caller's allocator
(``torch.empty``, stream-ordered and graph-capturable).
"""

from __future__ import annotations

from typing import Optional

from . import _C
import numpy as np

from ._tensors import (
    LN2,
    as_float,
    as_int,
    call_op,
    check_array,
    check_kv_layout,
    device_sm_count,
    dtype_name,
    empty,
    exec_kwargs,
    finalize,
    framework,
    host_ints,
    is_cuda,
    optional_float,
    paged_kv_pages,
    prepare,
    shape_or_zero,
    through_exchange_table,
    transpose2d,
    usable_workspace,
    window_pair,
)
from .decode import _check_rope_parameters, decode_num_splits_for_lengths

__all__ = [
    "merge_state",
    "merge_state_in_place",
    "merge_attention_sinks",
    "merge_states",
    "lse_base2_to_natural",
    "lse_natural_to_base2",
    "shared_prefix_attention",
    "BatchDecodeWithSharedPrefixPagedKVCacheWrapper",
    "BatchPrefillWithSharedPrefixPagedKVCacheWrapper",
]


# ---- merging states ------------------------------------------------------------------------


def _stream_kwargs(v) -> dict:
    """How the merge ops that write v in place get their stream: from v's DLPack exchange table in
    the binding for torch >= 2.10, else the caller's current stream found here (exec_kwargs)."""
    return {"stream_from_v": True} if through_exchange_table(v) else exec_kwargs(v)


def merge_state(v_a, s_a, v_b, s_b):
    """Merge the attention states of the same queries over two disjoint key sets.

    Arguments:
        v_a, v_b: (seq_len, num_heads, head_dim) float32 / float16 / bfloat16 (one dtype).
        s_a, s_b: (seq_len, num_heads) float32 natural-log LSE.
    Return:
        (v, s): v (seq_len, num_heads, head_dim) in v_a's dtype, s (seq_len, num_heads) float32,
        with s = log(exp(s_a) + exp(s_b)), v = v_a * exp(s_a - s) + v_b * exp(s_b - s).
    """
    for name, x in (("v_a", v_a), ("s_a", s_a), ("v_b", v_b), ("s_b", s_b)):
        check_array(x, name)
    if through_exchange_table(v_a):
        # torch >= 2.10: the binding allocates both outputs and reads the current stream through
        # v_a's DLPack exchange table (bench/NOTES.md, session 98).
        return call_op(_C.merge_state, prepare(v_a), prepare(s_a), prepare(v_b), prepare(s_b),
                       stream_from_v_a=True)
    v_out = empty(v_a, v_a.shape)
    s_out = empty(v_a, s_a.shape, "float32")
    call_op(_C.merge_state, prepare(v_a), prepare(s_a), prepare(v_b), prepare(s_b), v_out, s_out,
            **exec_kwargs(v_a))
    return finalize(v_a, v_out), finalize(v_a, s_out)


def merge_state_in_place(v, s, v_other, s_other, mask=None):
    """Merge (v_other, s_other) into (v, s) in place.

    Arguments:
        v: (seq_len, num_heads, head_dim), updated in place.
        s: (seq_len, num_heads) float32 natural-log LSE, updated in place.
        v_other, s_other: the other state, same shapes.
        mask: optional (seq_len,) bool / uint8; rows where it is false are left untouched.
    """
    for name, x in (("v", v), ("s", s), ("v_other", v_other), ("s_other", s_other),
                    ("mask", mask)):
        if x is not None:
            check_array(x, name)
    for name, x in (("v", v), ("s", s)):
        if framework(x) == "jax":
            raise TypeError(f"{name}: jax arrays are immutable; use merge_state, which returns "
                            "the merged state")
    call_op(_C.merge_state_in_place, prepare(v), prepare(s), prepare(v_other), prepare(s_other),
            prepare(mask), **_stream_kwargs(v))


def merge_attention_sinks(v, s, sinks):
    """Attention sinks (gpt-oss, StreamingLLM), merged into a state in place.

    Merges into (v, s) the state of one extra logit per head, sinks[h], whose value row is zero:
    as if each query's softmax had one more key with score sinks[h] (in the units of the scaled,
    soft-capped scores) and a zero value. s becomes log(exp(s) + exp(sinks[h])) and v is scaled
    by exp(s_old - s_new); a row with no keys (s = -inf) keeps v = 0 and gets s = sinks[h].

    Arguments:
        v: (seq_len, num_heads, head_dim), updated in place.
        s: (seq_len, num_heads) float32 natural-log LSE, updated in place.
        sinks: (num_heads,) float32.
    """
    for name, x in (("v", v), ("s", s), ("sinks", sinks)):
        check_array(x, name)
    for name, x in (("v", v), ("s", s)):
        if framework(x) == "jax":
            raise TypeError(f"{name}: jax arrays are immutable; merge_attention_sinks works in "
                            "place")
    call_op(_C.merge_attention_sinks, prepare(v), prepare(s), prepare(sinks), **_stream_kwargs(v))


def merge_states(v, s):
    """Merge several attention states of the same queries over disjoint key sets.

    Arguments:
        v: (seq_len, num_states, num_heads, head_dim).
        s: (seq_len, num_states, num_heads) float32 natural-log LSE.
    Return:
        (v, s): v (seq_len, num_heads, head_dim), s (seq_len, num_heads) float32.
    """
    check_array(v, "v")
    check_array(s, "s")
    if through_exchange_table(v):  # as merge_state
        return call_op(_C.merge_states, prepare(v), prepare(s), stream_from_v=True)
    seq_len, num_heads, head_dim = (shape_or_zero(v, 4, i) for i in (0, 2, 3))
    v_out = empty(v, (seq_len, num_heads, head_dim))
    s_out = empty(v, (seq_len, num_heads), "float32")
    call_op(_C.merge_states, prepare(v), prepare(s), v_out, s_out, **exec_kwargs(v))
    return finalize(v, v_out), finalize(v, s_out)


def lse_base2_to_natural(s):
    """FlashInfer's base-2 LSE -> fastattn's natural-log LSE: ``s * ln(2)`` (-inf stays -inf)."""
    return s * LN2


def lse_natural_to_base2(s):
    """fastattn's natural-log LSE -> FlashInfer's base-2 LSE: ``s / ln(2)`` (-inf stays -inf)."""
    return s * (1.0 / LN2)


# ---- shared-prefix attention ---------------------------------------------------------------


def shared_prefix_attention(
    q,
    k_shared,
    v_shared,
    k_pages,
    v_pages,
    page_indptr=None,
    page_indices=None,
    last_page_len=None,
    *,
    qo_indptr=None,
    causal=False,
    softmax_scale=None,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    return_lse=False,
    out=None,
    max_seqlen_q=None,
    max_suffix_len=None,
    num_splits=0,
    suffix_num_splits=0,
    workspace=None,
):
    """Attention of each request's queries over a shared prefix followed by its paged suffix.

    Arguments:
        q: (total_q, num_qo_heads, head_dim); decode: one row per request (qo_indptr None).
        k_shared, v_shared: (shared_prefix_len, num_kv_heads, head_dim), keys at positions
            0 .. shared_prefix_len - 1.
        k_pages, v_pages: (max_num_pages, page_size, num_kv_heads, head_dim) suffix pages
            (strided views are fine, e.g. ``kv_data[:, 0]`` of FlashInfer's NHD layout).
        page_indptr, page_indices: CSR page lists: request b owns pages
            page_indices[page_indptr[b] : page_indptr[b + 1]] (int32).
        last_page_len: (batch_size,) int32: keys in each request's last page (1..page_size).
        qo_indptr: (batch_size + 1,) int32 query rows per request; None: one query per request.
        causal: request b's queries are the last rows of its suffix (bottom-right aligned over
            prefix + suffix).
        return_lse: also return the natural-log LSE, shape (total_q, num_qo_heads) float32
            (FlashInfer's layout, ready for merge_state; returned as a transposed view).
        max_seqlen_q, max_suffix_len: GPU planning sizes: the most query rows of any request
            (an upper bound: rows past it are not computed) and the most suffix keys of any
            request. None: read from qo_indptr / page_indptr / last_page_len (on a GPU a
            device-to-host copy, which synchronises: not inside CUDA-graph capture); 0: unknown
            (no copy; correct, but the prefill passes launch for total_q rows per request).
            Ignored on the CPU.
        num_splits: GPU: key splits of the prefix pass (0: heuristic). Ignored on the CPU.
        suffix_num_splits: GPU, decode: key splits of every request's suffix (0: heuristic from
            max_suffix_len; with host lengths, fastattn.decode_num_splits_for_lengths balances a
            ragged batch). Ignored for prefill and on the CPU.
        workspace: GPU: a uint8 scratch buffer on the device, used when large enough (else
            scratch comes from the caller's allocator).
    Return:
        out (total_q, num_qo_heads, head_dim), or (out, lse).
    """
    for name, x in (("q", q), ("k_shared", k_shared), ("v_shared", v_shared),
                    ("k_pages", k_pages), ("v_pages", v_pages), ("page_indptr", page_indptr),
                    ("page_indices", page_indices), ("last_page_len", last_page_len),
                    ("qo_indptr", qo_indptr), ("out", out)):
        if x is not None:
            check_array(x, name)
    left, right = window_pair(window_size)
    if alibi_slopes is not None:
        check_array(alibi_slopes, "alibi_slopes")
    total_q, num_heads = shape_or_zero(q, 3, 0), shape_or_zero(q, 3, 1)
    on_gpu = is_cuda(q)
    if on_gpu:
        if max_seqlen_q is None:
            max_seqlen_q = max_run(qo_indptr) if qo_indptr is not None else 1
        if max_suffix_len is None:
            max_suffix_len = max_suffix_length(page_indptr, last_page_len, shape_or_zero(k_pages, 4, 1))
    o = out if out is not None else empty(q, q.shape)
    lse = empty(q, (num_heads, total_q), "float32") if return_lse else None
    if on_gpu and workspace is not None and not usable_workspace(workspace, q):
        workspace = None
    call_op(
        _C.shared_prefix_attention_forward,
        q=prepare(q),
        qo_indptr=prepare(qo_indptr),
        k_shared=prepare(k_shared),
        v_shared=prepare(v_shared),
        k_pages=prepare(k_pages),
        v_pages=prepare(v_pages),
        block_table=None,  # suffix lengths come from last_page_len: CSR page lists only
        page_indptr=prepare(page_indptr),
        page_indices=prepare(page_indices),
        last_page_len=prepare(last_page_len),
        out=prepare(o),
        lse=lse,
        softmax_scale=optional_float(softmax_scale, "softmax_scale"),
        causal=bool(causal),
        window_left=left,
        window_right=right,
        softcap=as_float(softcap, "softcap"),
        alibi_slopes=prepare(alibi_slopes),
        max_seqlen_q=as_int(max_seqlen_q or 0, "max_seqlen_q"),
        max_suffix_len=as_int(max_suffix_len or 0, "max_suffix_len"),
        num_splits=as_int(num_splits, "num_splits"),
        suffix_num_splits=as_int(suffix_num_splits, "suffix_num_splits"),
        workspace=workspace if on_gpu else None,
        # On a GPU the scratch comes from the caller's allocator (torch / cupy: stream-ordered,
        # graph-capturable) unless `workspace` is large enough; the CPU backend allocates its own.
        workspace_alloc=(lambda nbytes: empty(q, (nbytes,), "uint8")) if on_gpu else None,
        **exec_kwargs(q),
    )
    if return_lse:
        return finalize(q, o), finalize(q, transpose2d(lse))
    return finalize(q, o)


def max_run(indptr) -> int:
    """The largest indptr[b + 1] - indptr[b] (0 for no entry); reads indptr on the host."""
    h = host_ints(indptr).reshape(-1)
    return int(np.max(np.diff(h))) if h.size > 1 else 0


def suffix_lengths(page_indptr, last_page_len, page_size: int) -> np.ndarray:
    """Each request's suffix keys, (pages - 1) * page_size + last_page_len (0 without a page), as
    an int64 numpy array, from host copies of the CSR row pointers and last_page_len (the first
    min(len(page_indptr) - 1, len(last_page_len)) requests: the op checks the sizes)."""
    ip = host_ints(page_indptr).reshape(-1)
    last = host_ints(last_page_len).reshape(-1)
    n = max(0, min(ip.size - 1, last.size))
    pages = np.diff(ip)[:n]
    return np.where(pages > 0, (pages - 1) * int(page_size) + last[:n], 0)


def max_suffix_length(page_indptr, last_page_len, page_size: int) -> int:
    """The most suffix keys of any request (0 without a request), read on the host."""
    return int(suffix_lengths(page_indptr, last_page_len, page_size).max(initial=0))


class _SharedPrefixWrapperBase:
    _kind = ""

    def __init__(self, workspace_buffer, kv_layout: str = "NHD"):
        self._kv_layout = check_kv_layout(kv_layout)
        # The CPU backend needs no workspace; it is kept (like FlashInfer) for the GPU backend.
        self._workspace_buffer = workspace_buffer
        self._plan: Optional[dict] = None

    def reset_workspace_buffer(self, new_workspace_buffer) -> None:
        """Replace the workspace buffer."""
        self._workspace_buffer = new_workspace_buffer

    def end_forward(self) -> None:
        """Clear the state created by begin_forward()."""
        self._plan = None

    def _check_forward(self, q, unique_kv_data, rope_scale, rope_theta):
        # FlashInfer's shared-prefix wrappers run with pos_encoding_mode "NONE", where these two
        # (its fused RoPE's parameters) have no effect; fastattn checks their type only.
        _check_rope_parameters(rope_scale, rope_theta)
        if self._plan is None:
            raise RuntimeError(f"{type(self).__name__}.begin_forward() must be called before "
                               "forward()")
        check_array(q, "q")
        k_pages, v_pages = paged_kv_pages(unique_kv_data, "unique_kv_data", self._kv_layout)
        plan = self._plan
        q_shape = tuple(q.shape)
        if len(q_shape) == 3:
            if q_shape[1] != plan["num_qo_heads"]:
                raise ValueError(f"q has {q_shape[1]} heads but begin_forward was given "
                                 f"num_qo_heads={plan['num_qo_heads']}")
            if q_shape[2] != plan["head_dim"]:
                raise ValueError(f"q has head_dim {q_shape[2]} but begin_forward was given "
                                 f"head_dim={plan['head_dim']}")
        hnd = self._kv_layout == "HND"
        heads_dim, size_dim = (1, 2) if hnd else (2, 1)
        k_shape = tuple(k_pages.shape)
        if len(k_shape) == 4:
            if k_shape[heads_dim] != plan["num_kv_heads"]:
                raise ValueError(f"unique_kv_data has {k_shape[heads_dim]} kv heads "
                                 f"({self._kv_layout}) but begin_forward was given "
                                 f"num_kv_heads={plan['num_kv_heads']}")
            if plan.get("page_size") is not None and k_shape[size_dim] != plan["page_size"]:
                raise ValueError(f"unique_kv_data has page_size {k_shape[size_dim]} "
                                 f"({self._kv_layout}) but begin_forward was given "
                                 f"page_size={plan['page_size']}")
        if hnd:  # the ops take pages (max_num_pages, page_size, num_kv_heads, head_dim)
            # swapaxes: a strided view in numpy, torch and cupy (a copy in jax, always row-major)
            k_pages, v_pages = (x.swapaxes(1, 2) if len(x.shape) == 4 else x
                                for x in (k_pages, v_pages))
        return k_pages, v_pages

    def _shared_kv(self, k_shared, v_shared):
        """k_shared, v_shared as the op takes them, (shared_prefix_len, num_kv_heads, head_dim):
        HND's (num_kv_heads, shared_prefix_len, head_dim) as views with the first two axes
        swapped."""
        if self._kv_layout != "HND":
            return k_shared, v_shared
        out = []
        for name, x in (("k_shared", k_shared), ("v_shared", v_shared)):
            check_array(x, name)
            shape = tuple(x.shape)
            if len(shape) != 3 or shape[0] != self._plan["num_kv_heads"]:
                raise ValueError(f"{name} must have shape (num_kv_heads, shared_prefix_len, "
                                 f"head_dim) with kv_layout 'HND' (num_kv_heads="
                                 f"{self._plan['num_kv_heads']} from begin_forward), got {shape}")
            out.append(x.swapaxes(0, 1))
        return tuple(out)

    def _run(self, q, k_shared, v_shared, unique_kv_data, causal, sm_scale, rope_scale,
             rope_theta, return_lse):
        k_pages, v_pages = self._check_forward(q, unique_kv_data, rope_scale, rope_theta)
        k_shared, v_shared = self._shared_kv(k_shared, v_shared)
        plan = self._plan
        # The sizes begin_forward read on the host: no device read here (graph-capturable).
        return shared_prefix_attention(
            q, k_shared, v_shared, k_pages, v_pages,
            plan["indptr"], plan["indices"], plan["last_page_len"],
            qo_indptr=plan.get("qo_indptr"), causal=causal, softmax_scale=sm_scale,
            return_lse=return_lse, max_seqlen_q=plan["max_seqlen_q"],
            max_suffix_len=plan["max_suffix_len"], suffix_num_splits=plan.get("suffix_num_splits", 0),
            workspace=self._workspace_buffer,
        )


class BatchDecodeWithSharedPrefixPagedKVCacheWrapper(_SharedPrefixWrapperBase):
    """Batch decode (one query per request) over a shared prefix plus paged per-request suffixes.

    FlashInfer's interface (``flashinfer.cascade``), ``kv_layout`` "NHD" or "HND" (pages and the
    shared prefix head-major; read in place as strided views). ``allow_fp16_qk_reduction``
    is accepted and ignored: fastattn always accumulates q.k in float32. ``rope_scale`` /
    ``rope_theta`` are accepted and have no effect, as in FlashInfer, whose shared-prefix wrappers
    run without fused RoPE. ``forward_return_lse``
    returns natural-log LSE (see the module docstring for FlashInfer's base-2 convention).
    """

    def begin_forward(self, unique_kv_indptr, unique_kv_indices, unique_kv_last_page_len,
                      num_qo_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                      data_type="float16") -> None:
        """Record the suffix page table (CSR) and the problem sizes for later forward calls.

        Arguments:
            unique_kv_indptr: (batch_size + 1,) int32 CSR row pointers into unique_kv_indices.
            unique_kv_indices: int32 page ids of each request's suffix.
            unique_kv_last_page_len: (batch_size,) int32 keys in each last page (1..page_size).
            num_qo_heads, num_kv_heads, head_dim, page_size: sizes (checked against forward).
            data_type: dtype of q and the caches (str, numpy or torch dtype).

        With the workspace buffer on a GPU, the suffix pass's split count is chosen here from the
        suffix lengths (fastattn.decode_num_splits_for_lengths, as BatchDecodeWithPagedKVCacheWrapper
        does), so a long suffix among short ones is not left to a few CTAs.
        """
        for name, x in (("unique_kv_indptr", unique_kv_indptr),
                        ("unique_kv_indices", unique_kv_indices),
                        ("unique_kv_last_page_len", unique_kv_last_page_len)):
            check_array(x, name)
        page_size = as_int(page_size, "page_size")
        lens = suffix_lengths(unique_kv_indptr, unique_kv_last_page_len, page_size)
        ws = self._workspace_buffer
        suffix_splits = 0
        if is_cuda(ws) and framework(ws) in ("torch", "cupy"):
            suffix_splits = decode_num_splits_for_lengths(
                lens, as_int(num_kv_heads, "num_kv_heads"), device_sm_count(ws))
        self._plan = {
            "indptr": unique_kv_indptr,
            "indices": unique_kv_indices,
            "last_page_len": unique_kv_last_page_len,
            "num_qo_heads": as_int(num_qo_heads, "num_qo_heads"),
            "num_kv_heads": as_int(num_kv_heads, "num_kv_heads"),
            "head_dim": as_int(head_dim, "head_dim"),
            "page_size": page_size,
            "data_type": dtype_name(data_type),
            # Planning sizes for the GPU, read here from host copies (FlashInfer's plan step may
            # synchronise; forward does not).
            "max_seqlen_q": 1,
            "max_suffix_len": int(lens.max(initial=0)),
            "suffix_num_splits": suffix_splits,
        }

    def _check_dtype(self, q):
        want = self._plan["data_type"] if self._plan else None
        got = dtype_name(q.dtype)
        if want is not None and got != want:
            raise TypeError(f"q has dtype {got} but begin_forward was given data_type={want}")

    def forward(self, q, k_shared, v_shared, unique_kv_data, allow_fp16_qk_reduction=False,
                sm_scale=None, rope_scale=None, rope_theta=None):
        """Attention of q (batch_size, num_qo_heads, head_dim) over prefix + suffix.

        k_shared, v_shared: (shared_prefix_len, num_kv_heads, head_dim); HND: (num_kv_heads,
            shared_prefix_len, head_dim).
        unique_kv_data: (max_num_pages, 2, page_size, num_kv_heads, head_dim) or (k_pages, v_pages);
            HND: num_kv_heads and page_size swap places.
        Returns out (batch_size, num_qo_heads, head_dim).
        """
        if self._plan is not None and hasattr(q, "dtype"):
            self._check_dtype(q)
        return self._run(q, k_shared, v_shared, unique_kv_data, False, sm_scale, rope_scale,
                         rope_theta, False)

    def forward_return_lse(self, q, k_shared, v_shared, unique_kv_data,
                           allow_fp16_qk_reduction=False, sm_scale=None, rope_scale=None,
                           rope_theta=None):
        """forward() that also returns the natural-log LSE (batch_size, num_qo_heads) float32."""
        if self._plan is not None and hasattr(q, "dtype"):
            self._check_dtype(q)
        return self._run(q, k_shared, v_shared, unique_kv_data, False, sm_scale, rope_scale,
                         rope_theta, True)


class BatchPrefillWithSharedPrefixPagedKVCacheWrapper(_SharedPrefixWrapperBase):
    """Batch prefill / append over a shared prefix plus paged per-request suffixes.

    FlashInfer's interface (``flashinfer.cascade``), ``kv_layout`` "NHD" or "HND" as the decode
    wrapper above (k_shared / v_shared and the pages). With ``causal=True`` each
    request's queries are the last qo_len tokens of its suffix (so qo_len <= suffix length).
    ``allow_fp16_qk_reduction`` is accepted and ignored (float32 accumulation always), and
    ``rope_scale`` / ``rope_theta`` have no effect, as in FlashInfer.
    """

    def begin_forward(self, qo_indptr, paged_kv_indptr, paged_kv_indices,
                      paged_kv_last_page_len, num_qo_heads: int, num_kv_heads: int,
                      head_dim: int) -> None:
        """Record the query row pointers, the suffix page table (CSR) and the problem sizes.

        Arguments:
            qo_indptr: (batch_size + 1,) int32 query rows of each request.
            paged_kv_indptr: (batch_size + 1,) int32 CSR row pointers into paged_kv_indices.
            paged_kv_indices: int32 page ids of each request's suffix.
            paged_kv_last_page_len: (batch_size,) int32 keys in each last page (1..page_size).
            num_qo_heads, num_kv_heads, head_dim: sizes (checked against forward).
        """
        for name, x in (("qo_indptr", qo_indptr), ("paged_kv_indptr", paged_kv_indptr),
                        ("paged_kv_indices", paged_kv_indices),
                        ("paged_kv_last_page_len", paged_kv_last_page_len)):
            check_array(x, name)
        self._plan = {
            "qo_indptr": qo_indptr,
            "indptr": paged_kv_indptr,
            "indices": paged_kv_indices,
            "last_page_len": paged_kv_last_page_len,
            "num_qo_heads": as_int(num_qo_heads, "num_qo_heads"),
            "num_kv_heads": as_int(num_kv_heads, "num_kv_heads"),
            "head_dim": as_int(head_dim, "head_dim"),
            "page_size": None,
            # Planning sizes for the GPU from host copies (see the decode wrapper). The page size
            # is only known at forward, so the suffix bound is taken in pages: max_suffix_len is a
            # split heuristic's input, and the prefill suffix pass reads lengths on the device.
            "max_seqlen_q": max_run(qo_indptr),
            "max_suffix_len": 0,
        }

    def forward(self, q, k_shared, v_shared, unique_kv_data, causal=True,
                allow_fp16_qk_reduction=False, sm_scale=None, rope_scale=None, rope_theta=None):
        """Attention of q (qo_indptr[-1], num_qo_heads, head_dim) over prefix + suffix.
        Returns out (qo_indptr[-1], num_qo_heads, head_dim)."""
        return self._run(q, k_shared, v_shared, unique_kv_data, causal, sm_scale, rope_scale,
                         rope_theta, False)

    def forward_return_lse(self, q, k_shared, v_shared, unique_kv_data, causal=True,
                           allow_fp16_qk_reduction=False, sm_scale=None, rope_scale=None,
                           rope_theta=None):
        """forward() that also returns the natural-log LSE (qo_indptr[-1], num_qo_heads)."""
        return self._run(q, k_shared, v_shared, unique_kv_data, causal, sm_scale, rope_scale,
                         rope_theta, True)
