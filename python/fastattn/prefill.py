"""FlashInfer's ``BatchPrefillWithPagedKVCacheWrapper`` and ``BatchPrefillWithRaggedKVCacheWrapper``:
attention of packed query runs over a paged KV cache (prefill, append, and the verification step
of speculative decoding), or over packed keys and values (``kv_indptr``).

Request b's queries are rows ``qo_indptr[b] : qo_indptr[b + 1]`` of q; its keys and values are the
first kv_len_b slots of its pages ``paged_kv_indices[paged_kv_indptr[b] : paged_kv_indptr[b + 1]]``,
kv_len_b = (pages - 1) * page_size + last_page_len[b]. Its query rows are its last qo_len_b tokens:
row i sits at key kv_len_b - qo_len_b + i, which is where ``causal`` and ``window_left`` are
aligned (bottom-right, as in FlashInfer and flash_attn).

``plan()`` reads the row pointers and last page lengths on the host (as FlashInfer's does) and
picks one of two routes for the step:
- every request has the same number N <= 16 of query rows at the start of q, and none has fewer
  keys than rows (N = 1: any): the multi-row decode kernels, through a
  :class:`BatchDecodeWithPagedKVCacheWrapper` planned with ``q_len_per_req=N`` (split-KV over the
  SMs; speculative decoding's shape);
- otherwise the prefill kernel over the CSR page lists (``varlen_attention_forward``).
Both give the same attention; the first reads each KV byte once per request for its N rows.
The ragged wrapper is one ``varlen_attention_forward`` over the packed keys and values.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from . import _C
from ._tensors import (
    as_float,
    as_int,
    call_op,
    check_array,
    check_kv_layout,
    copy_on_device,
    device_int32_vector,
    dtype_name,
    empty,
    exec_kwargs,
    finalize,
    host_ints,
    is_cuda,
    on_device_of,
    optional_float,
    paged_kv_pages,
    prepare,
    transpose2d,
    write_ints,
)
from .decode import (
    BatchDecodeWithPagedKVCacheWrapper,
    _check_pos_encoding,
    _fixed_split_pages,
    _int32_vector,
    _output_scale,
    _scale_output,
    _scaled_softmax_scale,
)

__all__ = ["BatchPrefillWithPagedKVCacheWrapper", "BatchPrefillWithRaggedKVCacheWrapper"]

# The most query rows per request the decode route takes: the multi-row decode kernels' bound
# (seqlen_q 1..16 in flash_attn_with_kvcache).
MAX_DECODE_ROUTE_ROWS = 16


def decode_route_rows(qo_lens: np.ndarray, kv_lens: np.ndarray, first_row: int) -> int:
    """N when a step can run on the multi-row decode kernels (every request N rows, 1 <= N <= 16,
    the first at row 0 of q, none with fewer keys than rows unless N == 1), else 0."""
    if qo_lens.size == 0 or first_row != 0:
        return 0
    n = int(qo_lens[0])
    if n < 1 or n > MAX_DECODE_ROUTE_ROWS or np.any(qo_lens != n):
        return 0
    if n > 1 and int(kv_lens.min()) < n:
        return 0
    return n


def _indptr_lengths(host: np.ndarray, name: str) -> np.ndarray:
    """The run lengths of a row-pointer array read on the host, which must start at 0 and not
    decrease."""
    if host[0] != 0:
        raise ValueError(f"{name}[0] must be 0 (the rows start at row 0), got {int(host[0])}")
    lens = np.diff(host)
    if lens.size and lens.min() < 0:
        b = int(np.argmin(lens))
        raise ValueError(f"{name} must be non-decreasing, got {name}[{b + 1}] < {name}[{b}]")
    return lens


class _PrefillWrapperBase:
    """What the paged and ragged prefill wrappers share: the workspace and layout, plan()'s
    options and their refusals, graph mode's buffers and its bound on the longest query run, and
    run() on the prefill kernel (one varlen_attention_forward)."""

    _name = ""

    def __init__(self, float_workspace_buffer, kv_layout, jit_args, jit_kwargs, custom_mask_buf,
                 mask_indptr_buf):
        check_array(float_workspace_buffer, "float_workspace_buffer")
        self._kv_layout = check_kv_layout(kv_layout)
        if jit_args is not None or jit_kwargs is not None:
            raise NotImplementedError("jit_args / jit_kwargs (FlashInfer's JIT variants) are not "
                                      "supported")
        if custom_mask_buf is not None or mask_indptr_buf is not None:
            raise NotImplementedError("custom_mask_buf / mask_indptr_buf: custom masks are not "
                                      "supported (causal and window_left are)")
        self._workspace_buffer = float_workspace_buffer
        self._plan: Optional[dict] = None
        self._graph: Optional[dict] = None

    def _graph_buffers(self, buffers) -> dict:
        """Graph mode's buffers, checked: `buffers` is ((name, array, entries - batch_size or
        None), ...), the first fixing the batch (batch_size + 1 entries)."""
        ws = self._workspace_buffer
        for name, buf, _ in buffers:
            _int32_vector(buf, name, ws)
        first = buffers[0][0]
        batch = int(buffers[0][1].shape[0]) - 1
        if batch < 0:
            raise ValueError(f"{first} must have batch_size + 1 >= 1 entries, got 0")
        for name, buf, extra in buffers[1:]:
            if extra is not None and int(buf.shape[0]) != batch + extra:
                raise ValueError(f"{name} must have {batch + extra} entries (batch_size = "
                                 f"len({first}) - 1 = {batch}), got {int(buf.shape[0])}")
        graph = {name: buf for name, buf, _ in buffers}
        graph.update(batch=batch, route=None, max_qo_len=None)
        return graph

    @property
    def is_cuda_graph_enabled(self) -> bool:
        """Whether the wrapper was made with use_cuda_graph=True (FlashInfer's name)."""
        return self._graph is not None

    def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffer=None) -> None:
        """Replace the workspace buffer (the int buffer of FlashInfer's signature is unused)."""
        check_array(float_workspace_buffer, "float_workspace_buffer")
        self._workspace_buffer = float_workspace_buffer

    def end_forward(self) -> None:
        """Clear the plan (FlashInfer's deprecated name)."""
        self._plan = None

    @staticmethod
    def _plan_options(head_dim_qk, head_dim_vo, custom_mask, packed_custom_mask, causal,
                      pos_encoding_mode, sm_scale, window_left, logits_soft_cap, rope_scale,
                      rope_theta, q_data_type, kv_data_type, prefix_len_ptr, token_pos_in_items_ptr,
                      token_pos_in_items_len, max_item_len_ptr, fixed_split_size,
                      disable_split_kv) -> dict:
        """plan()'s options, checked, with the refusals both wrappers share."""
        _check_pos_encoding(pos_encoding_mode, rope_scale, rope_theta)
        if custom_mask is not None or packed_custom_mask is not None:
            raise NotImplementedError("custom_mask / packed_custom_mask: custom masks are not "
                                      "supported (causal and window_left are)")
        if (prefix_len_ptr is not None or token_pos_in_items_ptr is not None
                or max_item_len_ptr is not None or as_int(token_pos_in_items_len,
                                                          "token_pos_in_items_len") != 0):
            raise NotImplementedError("prefix_len_ptr / token_pos_in_items_ptr / "
                                      "token_pos_in_items_len / max_item_len_ptr (FlashInfer's "
                                      "multi-item scoring) are not supported")
        d = as_int(head_dim_qk, "head_dim_qk")
        if head_dim_vo is not None and as_int(head_dim_vo, "head_dim_vo") != d:
            raise NotImplementedError(f"head_dim_vo must be None or head_dim_qk ({d}): values have "
                                      f"the keys' head_dim, got {head_dim_vo}")
        q_dtype = dtype_name(q_data_type)
        kv_dtype = dtype_name(kv_data_type) if kv_data_type is not None else q_dtype
        if kv_dtype != q_dtype:
            raise TypeError(f"kv_data_type must equal q_data_type ({q_dtype}), got {kv_dtype}")
        left = as_int(window_left, "window_left")
        if left < -1:
            raise ValueError(f"window_left must be >= -1 (-1: no bound), got {left}")
        _fixed_split_pages(fixed_split_size)  # checked here; the decode route plans with it
        return {"head_dim": d, "data_type": q_dtype, "causal": bool(causal), "window_left": left,
                "softcap": as_float(logits_soft_cap or 0.0, "logits_soft_cap"),
                "sm_scale": optional_float(sm_scale, "sm_scale"),
                "split": not disable_split_kv and fixed_split_size in (None, -1)}

    def _check_batch(self, batch: int) -> None:
        g = self._graph
        if g is not None and batch != g["batch"]:
            raise ValueError(f"qo_indptr must have batch_size + 1 = {g['batch'] + 1} entries with "
                             f"use_cuda_graph=True (qo_indptr_buf fixes the batch), got {batch + 1}")

    def _bound_qo_rows(self, max_qo: int) -> int:
        """The longest query run run() passes: in graph mode the first plan's, which later plans
        may not exceed (the captured grid's rows). Changes nothing: _keep_graph_state does, once
        the plan has succeeded."""
        g = self._graph
        if g is None or g["max_qo_len"] is None:
            return max_qo
        if max_qo > g["max_qo_len"]:
            raise ValueError(f"qo_indptr's longest run must be at most the first plan's "
                             f"({g['max_qo_len']}) with use_cuda_graph=True (the captured grid's "
                             f"rows), got {max_qo}")
        return g["max_qo_len"]

    def _keep_graph_state(self, route: str, max_qo: Optional[int]) -> None:
        """In graph mode, what a successful first plan fixes for the later ones: the route and the
        bound on the longest query run (None: the decode route has none)."""
        g = self._graph
        if g is not None:
            g["route"] = route
            if g["max_qo_len"] is None:
                g["max_qo_len"] = max_qo

    def _run_varlen(self, q, kv_args, q_scale, k_scale, v_scale, out, lse, return_lse, window_left,
                    sinks):
        """run() on the prefill kernel: one varlen_attention_forward of q over `kv_args` (the
        keys and values and their row pointers or page lists, as the op takes them)."""
        plan = self._plan
        check_array(q, "q")
        shape = tuple(q.shape)
        want = (plan["num_qo_heads"], plan["head_dim"])
        if len(shape) != 3 or shape[1:] != want or shape[0] < plan["total_q"]:
            raise ValueError(f"q must be (rows >= qo_indptr[-1] = {plan['total_q']}, num_qo_heads = "
                             f"{want[0]}, head_dim = {want[1]}) as planned, got {shape}")
        if dtype_name(q.dtype) != plan["data_type"]:
            raise TypeError(f"q has dtype {dtype_name(q.dtype)} but plan() was given "
                            f"q_data_type={plan['data_type']}")
        sm_scale = plan["sm_scale"]
        if q_scale is not None or k_scale is not None:
            sm_scale = _scaled_softmax_scale(sm_scale, plan["head_dim"], q_scale, k_scale)
        out_scale = 1.0 if v_scale is None else _output_scale(v_scale, out)
        left = plan["window_left"] if window_left is None else as_int(window_left, "window_left")
        o = empty(q, shape) if out is None else out
        # FlashInfer's LSE is (rows, heads); the op writes (heads, rows) through any strides, so it
        # gets the transpose of that array.
        if lse is not None:
            check_array(lse, "lse")
            if tuple(lse.shape) != shape[:2]:
                raise ValueError(f"lse must be (rows, num_qo_heads) = {shape[:2]}, got {tuple(lse.shape)}")
            if dtype_name(lse.dtype) != "float32":
                raise TypeError(f"lse must be float32, got {dtype_name(lse.dtype)}")
        elif return_lse:
            lse = empty(q, shape[:2], "float32")
        if sinks is not None:
            check_array(sinks, "sinks")
        kw = exec_kwargs(q)
        if is_cuda(q) and plan["split"]:
            # One row per request over paged keys runs the split-KV decode kernels (a step the
            # paged wrapper's decode route does not take: a request without keys); their scratch
            # comes from the caller's allocator.
            kw["workspace_alloc"] = lambda nbytes: empty(q, (nbytes,), "uint8")
        call_op(_C.varlen_attention_forward, q=prepare(q), cu_seqlens_q=plan["qo_indptr"],
                max_seqlen_q=plan["max_seqlen_q"], max_seqlen_k=plan["max_seqlen_k"], **kv_args,
                out=prepare(o), lse=None if lse is None else transpose2d(prepare(lse)),
                sinks=prepare(sinks), softmax_scale=sm_scale, causal=plan["causal"],
                window_left=left, softcap=plan["softcap"], **kw)
        if out_scale != 1.0:
            _scale_output(o, out_scale)
        if return_lse:
            return finalize(q, o), finalize(q, lse)
        return finalize(q, o)

    def _forward(self, q, kv, causal, pos_encoding_mode, k_scale, v_scale, window_left,
                 logits_soft_cap, sm_scale, rope_scale, rope_theta, return_lse):
        """FlashInfer's deprecated forward(): its options replace the plan's (a step planned with
        other options is planned again, reading its lists on the host). kv: run()'s positional
        arguments after q."""
        _check_pos_encoding(pos_encoding_mode, rope_scale, rope_theta)
        plan = self._plan
        if plan is None:
            raise RuntimeError(f"{self._name}.plan() must be called before forward()")
        options = dict(causal=bool(causal), window_left=as_int(window_left, "window_left"),
                       logits_soft_cap=as_float(logits_soft_cap or 0.0, "logits_soft_cap"),
                       sm_scale=optional_float(sm_scale, "sm_scale"))
        planned = dict(causal=plan["causal"], window_left=plan["window_left"],
                       logits_soft_cap=plan["softcap"], sm_scale=plan["sm_scale"])
        if options != planned:
            self.plan(**plan["replan"], **options)
        scales = {} if k_scale is None and v_scale is None else {"k_scale": k_scale, "v_scale": v_scale}
        return self.run(q, *kv, return_lse=return_lse, **scales)


class BatchPrefillWithPagedKVCacheWrapper(_PrefillWrapperBase):
    """Batch prefill / append attention over a paged KV cache: FlashInfer's interface.

    ``kv_layout`` "NHD", pages (max_num_pages, 2, page_size, num_kv_heads, head_dim), or "HND",
    (max_num_pages, 2, num_kv_heads, page_size, head_dim); a tuple (k_pages, v_pages) drops the 2.
    Both are read in place.

    Supported: ``causal``, ``window_left``, ``logits_soft_cap``, ``sm_scale``, GQA / MQA,
    ``return_lse`` / ``lse`` (natural-log LSE, (rows, num_qo_heads) float32; FlashInfer's is
    base 2: :func:`fastattn.lse_base2_to_natural`), ``sinks`` and the calibration scales
    ``q_scale`` / ``k_scale`` / ``v_scale`` in ``run()`` (as in
    :class:`BatchDecodeWithPagedKVCacheWrapper`), ``disable_split_kv`` and ``fixed_split_size``
    (split counts that depend on a request's own pages only), ``rope_scale`` / ``rope_theta``
    (without effect under ``pos_encoding_mode`` "NONE", as in FlashInfer). Query rows past
    ``qo_indptr[-1]`` get output 0 and LSE -inf.

    With ``use_cuda_graph=True``, ``run()`` can be captured and replayed after each step's
    ``plan()``: ``qo_indptr_buf``, ``paged_kv_indptr_buf`` (batch_size + 1 int32 each, fixing the
    batch), ``paged_kv_indices_buf`` (the most pages a step may use) and
    ``paged_kv_last_page_len_buf`` are required, and ``plan()`` writes each step's lists into them.
    The first plan fixes the route (above), and on the prefill kernel's route the longest query
    run a later plan may have (the captured grid's rows).

    Not supported (a clear error): custom masks, fused RoPE / ALiBi modes, ``head_dim_vo`` other
    than ``head_dim_qk``, fp8 caches, multi-item scoring (``prefix_len_ptr``, ...) and the
    trtllm-gen / cuDNN inputs (``seq_lens``, ``seq_lens_q``, ``block_tables``).
    ``use_fp16_qk_reduction``, ``backend`` and ``enable_pdl`` are ignored.
    """

    _name = "BatchPrefillWithPagedKVCacheWrapper"

    def __init__(self, float_workspace_buffer, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf=None, paged_kv_indptr_buf=None, paged_kv_indices_buf=None,
                 paged_kv_last_page_len_buf=None, custom_mask_buf=None, mask_indptr_buf=None,
                 backend: str = "auto", jit_args=None, jit_kwargs=None):
        super().__init__(float_workspace_buffer, kv_layout, jit_args, jit_kwargs, custom_mask_buf,
                         mask_indptr_buf)
        self._decode: Optional[BatchDecodeWithPagedKVCacheWrapper] = None
        if use_cuda_graph:
            self._graph = self._graph_buffers((
                ("qo_indptr_buf", qo_indptr_buf, 1), ("paged_kv_indptr_buf", paged_kv_indptr_buf, 1),
                ("paged_kv_indices_buf", paged_kv_indices_buf, None),
                ("paged_kv_last_page_len_buf", paged_kv_last_page_len_buf, 0)))

    def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffer=None) -> None:
        """Replace the workspace buffer (the int buffer of FlashInfer's signature is unused)."""
        super().reset_workspace_buffer(float_workspace_buffer)
        if self._decode is not None:
            self._decode.reset_workspace_buffer(float_workspace_buffer)

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads: int, num_kv_heads: int, head_dim_qk: int, page_size: int,
             head_dim_vo: Optional[int] = None, custom_mask=None, packed_custom_mask=None,
             causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None,
             window_left: int = -1, logits_soft_cap: Optional[float] = None,
             rope_scale: Optional[float] = None, rope_theta: Optional[float] = None,
             q_data_type="float16", kv_data_type=None, non_blocking: bool = True,
             prefix_len_ptr=None, token_pos_in_items_ptr=None, token_pos_in_items_len: int = 0,
             max_item_len_ptr=None, seq_lens=None, seq_lens_q=None, block_tables=None,
             max_token_per_sequence: Optional[int] = None, max_sequence_kv: Optional[int] = None,
             fixed_split_size: Optional[int] = None, disable_split_kv: bool = False) -> None:
        """Plan a step from its query row pointers and page lists (FlashInfer 0.5.3's arguments, in
        its order).

        Arguments:
            qo_indptr: (batch_size + 1,) int32 query row pointers, qo_indptr[0] == 0,
                non-decreasing; request b's queries are rows qo_indptr[b] : qo_indptr[b + 1].
            paged_kv_indptr: (batch_size + 1,) int32 CSR row pointers into paged_kv_indices.
            paged_kv_indices: int32 page ids (not read on the host when on the GPU: an id outside
                the cache is the kernels' guard, its keys and values read as zeros).
            paged_kv_last_page_len: (batch_size,) int32 keys in each last page (1..page_size;
                ignored for a request without pages).
            num_qo_heads, num_kv_heads, head_dim_qk, page_size: sizes, checked again by run().
            causal: each query row sees the keys up to its own position (bottom-right aligned).
            window_left: keys more than window_left before a row's position are masked (-1: none).
            logits_soft_cap: None or 0 for none. sm_scale: None for 1 / sqrt(head_dim).
            q_data_type, kv_data_type: the dtype of q and the cache (kv must equal q).
            max_token_per_sequence, max_sequence_kv: accepted and not needed (the lengths are
                read on the host).
            fixed_split_size, disable_split_kv: as in BatchDecodeWithPagedKVCacheWrapper.plan();
                the prefill kernel's route never splits a request's keys.
        """
        if seq_lens is not None or seq_lens_q is not None or block_tables is not None:
            raise NotImplementedError("seq_lens / seq_lens_q / block_tables (FlashInfer's "
                                      "trtllm-gen and cuDNN inputs) are not supported: pass the "
                                      "CSR lists")
        opts = self._plan_options(head_dim_qk, head_dim_vo, custom_mask, packed_custom_mask, causal,
                                  pos_encoding_mode, sm_scale, window_left, logits_soft_cap,
                                  rope_scale, rope_theta, q_data_type, kv_data_type, prefix_len_ptr,
                                  token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr,
                                  fixed_split_size, disable_split_kv)
        d, q_dtype, left = opts["head_dim"], opts["data_type"], opts["window_left"]
        heads_q = as_int(num_qo_heads, "num_qo_heads")
        heads_kv = as_int(num_kv_heads, "num_kv_heads")
        ps = as_int(page_size, "page_size")
        if ps < 1:
            raise ValueError(f"page_size must be >= 1, got {ps}")
        for name, x in (("qo_indptr", qo_indptr), ("paged_kv_indptr", paged_kv_indptr),
                        ("paged_kv_indices", paged_kv_indices),
                        ("paged_kv_last_page_len", paged_kv_last_page_len)):
            check_array(x, name)
        qo, ip, last = (host_ints(x).reshape(-1) for x in (qo_indptr, paged_kv_indptr,
                                                           paged_kv_last_page_len))
        qo_lens, kv_lens = self._check_lists(qo, ip, last, ps)
        batch = qo.size - 1
        self._check_batch(batch)
        graph = self._graph
        n = decode_route_rows(qo_lens, kv_lens, int(qo[0]))
        route = "decode" if n else "prefill"
        if graph is not None and graph["route"] not in (None, route):
            raise ValueError(f"qo_indptr's runs must keep the first plan's route with use_cuda_graph="
                             f"True (the captured launch is the {graph['route']} kernels'): "
                             f"{self._route_rule()}")
        plan = {**opts, "batch": batch, "num_qo_heads": heads_q, "num_kv_heads": heads_kv,
                "page_size": ps, "route": route, "rows": n, "total_q": int(qo[-1]),
                "replan": dict(qo_indptr=qo_indptr, paged_kv_indptr=paged_kv_indptr,
                               paged_kv_indices=paged_kv_indices,
                               paged_kv_last_page_len=paged_kv_last_page_len,
                               num_qo_heads=heads_q, num_kv_heads=heads_kv, head_dim_qk=d,
                               page_size=ps, q_data_type=q_dtype, fixed_split_size=fixed_split_size,
                               disable_split_kv=disable_split_kv)}
        if route == "decode":
            # The rows of a request sit at its last N keys, causal among themselves or not.
            self._decode_wrapper().plan(
                paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, heads_q, heads_kv, d, ps,
                window_left=left, logits_soft_cap=logits_soft_cap, q_data_type=q_dtype,
                sm_scale=sm_scale, fixed_split_size=fixed_split_size,
                disable_split_kv=disable_split_kv, window_right=0 if causal else -1, q_len_per_req=n)
            if graph is not None:  # the page lists went to their buffers in that plan; rows here
                write_ints(graph["qo_indptr_buf"], qo.astype(np.int32))
        else:
            plan["max_seqlen_q"] = self._bound_qo_rows(int(qo_lens.max(initial=0)))
            plan["max_seqlen_k"] = int(kv_lens.max(initial=0))
            plan["qo_indptr"], plan["pages"] = self._device_lists(
                qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, qo, ip, last)
        self._keep_graph_state(route, plan.get("max_seqlen_q"))
        self._plan = plan

    begin_forward = plan

    @staticmethod
    def _route_rule() -> str:
        return (f"the decode kernels take steps whose requests all have the same N <= "
                f"{MAX_DECODE_ROUTE_ROWS} query rows (and at least N keys where N > 1), the prefill "
                f"kernel every other step")

    @staticmethod
    def _check_lists(qo, ip, last, page_size):
        """plan()'s checks of the host copies; returns (query rows, keys) per request."""
        if qo.size < 1:
            raise ValueError("qo_indptr must have batch_size + 1 >= 1 entries, got 0")
        batch = qo.size - 1
        if ip.size != batch + 1:
            raise ValueError(f"paged_kv_indptr must have batch_size + 1 = len(qo_indptr) = "
                             f"{batch + 1} entries, got {ip.size}")
        if last.size != batch:
            raise ValueError(f"paged_kv_last_page_len must have batch_size = len(qo_indptr) - 1 = "
                             f"{batch} entries, got {last.size}")
        qo_lens = _indptr_lengths(qo, "qo_indptr")
        if ip[0] < 0:  # the page lists may start anywhere in paged_kv_indices
            raise ValueError(f"paged_kv_indptr[0] must be >= 0, got {int(ip[0])}")
        pages = _indptr_lengths(ip - ip[0], "paged_kv_indptr")
        bad = (pages > 0) & ((last < 1) | (last > page_size))
        if np.any(bad):
            b = int(np.argmax(bad))
            raise ValueError(f"paged_kv_last_page_len[{b}] must be in 1..page_size = {page_size}, "
                             f"got {int(last[b])}")
        kv_lens = np.where(pages > 0, (pages - 1) * page_size + last, 0)
        return qo_lens, kv_lens

    def _decode_wrapper(self) -> BatchDecodeWithPagedKVCacheWrapper:
        """The decode route's wrapper, made at its first use; in graph mode it plans into the
        caller's page-list buffers."""
        if self._decode is None:
            g = self._graph
            if g is None:
                self._decode = BatchDecodeWithPagedKVCacheWrapper(self._workspace_buffer, self._kv_layout)
            else:
                self._decode = BatchDecodeWithPagedKVCacheWrapper(
                    self._workspace_buffer, self._kv_layout, use_cuda_graph=True,
                    paged_kv_indptr_buffer=g["paged_kv_indptr_buf"],
                    paged_kv_indices_buffer=g["paged_kv_indices_buf"],
                    paged_kv_last_page_len_buffer=g["paged_kv_last_page_len_buf"])
        return self._decode

    def _device_lists(self, qo_indptr, indptr, indices, last_page_len, qo, ip, last):
        """The prefill route's lists where its kernel reads them: (qo_indptr, the op's page
        arguments). The caller's arrays in place where all four are int32 vectors on the
        workspace's device (or on the CPU, whose backend checks them), else copies (host copies
        uploaded, page ids of the same GPU framework copied device to device, the page row
        pointers rebased to the copied ids); with use_cuda_graph=True, written into the caller's
        buffers."""
        ws, g = self._workspace_buffer, self._graph
        num_ids = int(ip[-1] - ip[0])
        given = (qo_indptr, indptr, indices, last_page_len)
        if g is None and (not is_cuda(ws) or all(device_int32_vector(x, ws) for x in given)):
            lists = given
        else:
            if g is not None and num_ids > int(g["paged_kv_indices_buf"].shape[0]):
                raise ValueError(f"paged_kv_indices hold {num_ids} pages, more than "
                                 f"paged_kv_indices_buf's {int(g['paged_kv_indices_buf'].shape[0])}")
            rebased = ip - ip[0]
            if g is not None:
                lists = (g["qo_indptr_buf"], g["paged_kv_indptr_buf"], g["paged_kv_indices_buf"],
                         g["paged_kv_last_page_len_buf"])
                for dst, host in ((lists[0], qo), (lists[1], rebased), (lists[3], last)):
                    write_ints(dst, host.astype(np.int32))
            else:
                lists = (on_device_of(ws, qo.astype(np.int32)), on_device_of(ws, rebased.astype(np.int32)),
                         empty(ws, (max(num_ids, 1),), "int32"), on_device_of(ws, last.astype(np.int32)))
            if not copy_on_device(lists[2], indices, int(ip[0]), num_ids):
                write_ints(lists[2], host_ints(indices).reshape(-1)[ip[0]:ip[-1]].astype(np.int32))
        return lists[0], {"page_indptr": lists[1], "page_indices": lists[2], "last_page_len": lists[3]}

    def run(self, q, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None, out=None,
            lse=None, return_lse: bool = False, enable_pdl=None, window_left=None, sinks=None):
        """Attention of q (qo_indptr[-1] or more rows, num_qo_heads, head_dim_qk) over the planned
        pages.

        paged_kv_cache: (max_num_pages, 2, page_size, num_kv_heads, head_dim) or a tuple
        (k_cache, v_cache) of (max_num_pages, page_size, num_kv_heads, head_dim); with kv_layout
        "HND" num_kv_heads and page_size swap places.
        out: optional output of q's shape; lse: optional (rows, num_qo_heads) float32, written
        where given. window_left overrides the plan's. sinks: optional (num_qo_heads,) float32
        attention sinks. q_scale, k_scale, v_scale: FlashInfer's calibration scales (see
        BatchDecodeWithPagedKVCacheWrapper.run). enable_pdl is ignored.
        Returns out, or (out, lse) with return_lse: natural-log LSE (FlashInfer's is base 2).
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError("BatchPrefillWithPagedKVCacheWrapper.plan() must be called before run()")
        if args:
            raise TypeError(f"run() takes q and paged_kv_cache positionally, got {len(args)} more")
        if plan["route"] == "decode":
            return self._decode.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale,
                                    v_scale=v_scale, out=out, lse=lse, return_lse=return_lse,
                                    window_left=window_left, sinks=sinks)
        k_pages, v_pages = self._pages(paged_kv_cache)
        return self._run_varlen(q, {"k_pages": k_pages, "v_pages": v_pages, **plan["pages"]}, q_scale,
                                k_scale, v_scale, out, lse, return_lse, window_left, sinks)

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def _pages(self, paged_kv_cache):
        """(k_pages, v_pages) as the op takes them, (max_num_pages, page_size, num_kv_heads,
        head_dim) views, checked against the plan."""
        plan = self._plan
        k_pages, v_pages = paged_kv_pages(paged_kv_cache, "paged_kv_cache", self._kv_layout)
        hnd = self._kv_layout == "HND"
        heads_dim, size_dim = (1, 2) if hnd else (2, 1)
        for x in (k_pages, v_pages):
            s = tuple(x.shape)
            if len(s) != 4 or s[heads_dim] != plan["num_kv_heads"] or s[size_dim] != plan["page_size"]:
                dims = "num_kv_heads, page_size" if hnd else "page_size, num_kv_heads"
                raise ValueError(f"paged_kv_cache pages must be (max_num_pages, {dims}, head_dim) "
                                 f"({self._kv_layout}) with page_size {plan['page_size']} and "
                                 f"num_kv_heads {plan['num_kv_heads']} as planned, got {s}")
        if hnd:
            k_pages, v_pages = k_pages.swapaxes(1, 2), v_pages.swapaxes(1, 2)
        return prepare(k_pages), prepare(v_pages)

    def forward(self, q, paged_kv_cache, causal: bool = False, pos_encoding_mode: str = "NONE",
                use_fp16_qk_reduction: bool = False, k_scale=None, v_scale=None,
                window_left: int = -1, logits_soft_cap: Optional[float] = None,
                sm_scale: Optional[float] = None, rope_scale=None, rope_theta=None):
        """FlashInfer's deprecated form of run(): its options replace the plan's (a step planned
        with other options is planned again, reading its lists on the host)."""
        return self._forward(q, (paged_kv_cache,), causal, pos_encoding_mode, k_scale, v_scale,
                             window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, False)

    def forward_return_lse(self, q, paged_kv_cache, causal: bool = False,
                           pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
                           k_scale=None, v_scale=None, window_left: int = -1,
                           logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                           rope_scale=None, rope_theta=None):
        """forward() that also returns the natural-log LSE (rows, num_qo_heads) float32."""
        return self._forward(q, (paged_kv_cache,), causal, pos_encoding_mode, k_scale, v_scale,
                             window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, True)


class BatchPrefillWithRaggedKVCacheWrapper(_PrefillWrapperBase):
    """Batch prefill / append attention over packed keys and values: FlashInfer's interface.

    Request b's queries are rows ``qo_indptr[b] : qo_indptr[b + 1]`` of q and its keys and values
    rows ``kv_indptr[b] : kv_indptr[b + 1]`` of k and v: "NHD" (total_kv, num_kv_heads, head_dim),
    or "HND" (num_kv_heads, total_kv, head_dim), read in place. The query rows are the request's
    last qo_len tokens (bottom-right alignment of ``causal`` and ``window_left``). One
    ``varlen_attention_forward`` per run().

    Supported as in :class:`BatchPrefillWithPagedKVCacheWrapper`'s prefill route: ``causal``,
    ``window_left``, ``logits_soft_cap``, ``sm_scale``, GQA / MQA, ``return_lse`` / ``lse``
    (natural log, (rows, num_qo_heads)), ``rope_scale`` / ``rope_theta`` without effect; rows of
    q past ``qo_indptr[-1]`` get output 0 and LSE -inf. With ``use_cuda_graph=True``,
    ``qo_indptr_buf`` and ``kv_indptr_buf`` (batch_size + 1 int32 each) are required, plan()
    writes each step's row pointers into them, and the first plan's longest query run bounds the
    later ones'. Not supported (a clear error): custom masks, fused RoPE / ALiBi modes,
    ``head_dim_vo`` other than ``head_dim_qk``, multi-item scoring. ``use_fp16_qk_reduction``,
    ``backend``, ``fixed_split_size``, ``disable_split_kv`` (the prefill kernel does not split
    a request's keys) and ``enable_pdl`` are ignored.
    """

    _name = "BatchPrefillWithRaggedKVCacheWrapper"

    def __init__(self, float_workspace_buffer, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 qo_indptr_buf=None, kv_indptr_buf=None, custom_mask_buf=None, mask_indptr_buf=None,
                 backend: str = "auto", jit_args=None, jit_kwargs=None):
        super().__init__(float_workspace_buffer, kv_layout, jit_args, jit_kwargs, custom_mask_buf,
                         mask_indptr_buf)
        if use_cuda_graph:
            self._graph = self._graph_buffers((("qo_indptr_buf", qo_indptr_buf, 1),
                                               ("kv_indptr_buf", kv_indptr_buf, 1)))

    def plan(self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             head_dim_vo: Optional[int] = None, custom_mask=None, packed_custom_mask=None,
             causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, window_left: int = -1,
             logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
             rope_scale: Optional[float] = None, rope_theta: Optional[float] = None,
             q_data_type="float16", kv_data_type=None, non_blocking: bool = True,
             prefix_len_ptr=None, token_pos_in_items_ptr=None, token_pos_in_items_len: int = 0,
             max_item_len_ptr=None, fixed_split_size: Optional[int] = None,
             disable_split_kv: bool = False) -> None:
        """Plan a step from its row pointers, read on the host (FlashInfer 0.5.3's arguments, in
        its order).

        Arguments:
            qo_indptr, kv_indptr: (batch_size + 1,) int32 row pointers into q and into k / v, each
                starting at 0 and non-decreasing.
            num_qo_heads, num_kv_heads, head_dim_qk: sizes, checked again by run().
            Options as BatchPrefillWithPagedKVCacheWrapper.plan().
        """
        opts = self._plan_options(head_dim_qk, head_dim_vo, custom_mask, packed_custom_mask, causal,
                                  pos_encoding_mode, sm_scale, window_left, logits_soft_cap,
                                  rope_scale, rope_theta, q_data_type, kv_data_type, prefix_len_ptr,
                                  token_pos_in_items_ptr, token_pos_in_items_len, max_item_len_ptr,
                                  fixed_split_size, disable_split_kv)
        heads_q = as_int(num_qo_heads, "num_qo_heads")
        heads_kv = as_int(num_kv_heads, "num_kv_heads")
        check_array(qo_indptr, "qo_indptr")
        check_array(kv_indptr, "kv_indptr")
        qo, kv = host_ints(qo_indptr).reshape(-1), host_ints(kv_indptr).reshape(-1)
        if qo.size < 1:
            raise ValueError("qo_indptr must have batch_size + 1 >= 1 entries, got 0")
        if kv.size != qo.size:
            raise ValueError(f"kv_indptr must have batch_size + 1 = len(qo_indptr) = {qo.size} "
                             f"entries, got {kv.size}")
        qo_lens = _indptr_lengths(qo, "qo_indptr")
        kv_lens = _indptr_lengths(kv, "kv_indptr")
        self._check_batch(qo.size - 1)
        plan = {**opts, "batch": qo.size - 1, "num_qo_heads": heads_q, "num_kv_heads": heads_kv,
                "total_q": int(qo[-1]), "total_kv": int(kv[-1]),
                "max_seqlen_q": self._bound_qo_rows(int(qo_lens.max(initial=0))),
                "max_seqlen_k": int(kv_lens.max(initial=0)),
                "replan": dict(qo_indptr=qo_indptr, kv_indptr=kv_indptr, num_qo_heads=heads_q,
                               num_kv_heads=heads_kv, head_dim_qk=opts["head_dim"],
                               q_data_type=opts["data_type"])}
        plan["qo_indptr"] = self._device_indptr(qo_indptr, qo, "qo_indptr_buf")
        plan["kv_indptr"] = self._device_indptr(kv_indptr, kv, "kv_indptr_buf")
        self._keep_graph_state("prefill", plan["max_seqlen_q"])
        self._plan = plan

    begin_forward = plan

    def _device_indptr(self, given, host, graph_key):
        """A row-pointer array where the kernel reads it: the caller's in place where it is an
        int32 vector on the workspace's device (or anything on the CPU, whose backend checks it),
        else uploaded; in graph mode written into the caller's buffer `graph_key`."""
        ws, g = self._workspace_buffer, self._graph
        if g is not None:
            write_ints(g[graph_key], host.astype(np.int32))
            return g[graph_key]
        if not is_cuda(ws) or device_int32_vector(given, ws):
            return given
        return on_device_of(ws, host.astype(np.int32))

    def run(self, q, k, v, *args, out=None, lse=None, return_lse: bool = False, enable_pdl=None):
        """Attention of q (qo_indptr[-1] or more rows, num_qo_heads, head_dim_qk) over k and v
        ((total_kv, num_kv_heads, head_dim) for "NHD"; (num_kv_heads, total_kv, head_dim) for
        "HND"). out: optional output of q's shape; lse: optional (rows, num_qo_heads) float32.
        Returns out, or (out, lse) with return_lse: natural-log LSE (FlashInfer's is base 2)."""
        plan = self._plan
        if plan is None:
            raise RuntimeError(f"{self._name}.plan() must be called before run()")
        if args:
            raise TypeError(f"run() takes q, k and v positionally, got {len(args)} more")
        kv = []
        for name, x in (("k", k), ("v", v)):
            check_array(x, name)
            shape = tuple(x.shape)
            rows_dim, heads_dim = (1, 0) if self._kv_layout == "HND" else (0, 1)
            if (len(shape) != 3 or shape[rows_dim] < plan["total_kv"]
                    or shape[heads_dim] != plan["num_kv_heads"] or shape[2] != plan["head_dim"]):
                dims = "num_kv_heads, rows, head_dim" if self._kv_layout == "HND" else "rows, num_kv_heads, head_dim"
                raise ValueError(f"{name} must be ({dims}) ({self._kv_layout}) with rows >= "
                                 f"kv_indptr[-1] = {plan['total_kv']}, num_kv_heads = "
                                 f"{plan['num_kv_heads']}, head_dim = {plan['head_dim']} as planned, "
                                 f"got {shape}")
            kv.append(prepare(x.swapaxes(0, 1) if self._kv_layout == "HND" else x))
        return self._run_varlen(q, {"k": kv[0], "v": kv[1], "cu_seqlens_k": plan["kv_indptr"]},
                                None, None, None, out, lse, return_lse, None, None)

    run_return_lse = functools.partialmethod(run, return_lse=True)

    def forward(self, q, k, v, causal: bool = False, pos_encoding_mode: str = "NONE",
                use_fp16_qk_reduction: bool = False, window_left: int = -1,
                logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                rope_scale=None, rope_theta=None):
        """FlashInfer's deprecated form of run(): its options replace the plan's (a step planned
        with other options is planned again)."""
        return self._forward(q, (k, v), causal, pos_encoding_mode, None, None, window_left,
                             logits_soft_cap, sm_scale, rope_scale, rope_theta, False)

    def forward_return_lse(self, q, k, v, causal: bool = False, pos_encoding_mode: str = "NONE",
                           use_fp16_qk_reduction: bool = False, window_left: int = -1,
                           logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                           rope_scale=None, rope_theta=None):
        """forward() that also returns the natural-log LSE (rows, num_qo_heads) float32."""
        return self._forward(q, (k, v), causal, pos_encoding_mode, None, None, window_left,
                             logits_soft_cap, sm_scale, rope_scale, rope_theta, True)
