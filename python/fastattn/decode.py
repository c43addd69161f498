"""FlashInfer-compatible batch decode over a paged KV cache, planned from the host's page lists.

``flash_attn_with_kvcache`` with ``num_splits=0`` plans its split-KV from the cache's capacity:
reading ``cache_seqlens`` would be a host sync, and the call must stay graph-capturable. In a
ragged batch (a few long sequences among short ones) that plan leaves a long sequence to a few
CTAs. FlashInfer's callers already hand the page lists to ``plan()`` on the host once per step, so
:class:`BatchDecodeWithPagedKVCacheWrapper` reads the lengths there and plans the splits from them:
a count per request where a few long requests sit among short ones
(:func:`decode_split_counts_for_lengths`, as a split plan, :func:`decode_split_plan`), else one
count for the batch (:func:`decode_num_splits_for_lengths`), or, with FlashInfer's
``fixed_split_size``, a count per request from its own pages only (batch-invariant results);
``run()`` then launches without a host read. With ``use_cuda_graph=True`` every launch parameter is fixed across steps (a split plan
of fixed size, padded: :func:`decode_graph_plan_items`, :func:`decode_graph_split_counts`) and
``plan()`` writes each step's arrays in place, so that a captured ``run()`` can be replayed.

All math is done by the C++ library (``flash_attn_with_kvcache``'s kernels over a block table
built on the device from the page lists, or over the CSR lists themselves with
``use_cuda_graph=True``), and so are the split rules (``include/fastattn/decode_plan.h``); this
module reads the page lists and maps arguments.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from . import _C
from ._tensors import (
    as_float,
    as_int,
    call_op,
    cuda_stream_of,
    check_array,
    check_kv_layout,
    device_sm_count,
    dtype_name,
    empty,
    can_copy_on_device,
    copy_on_device,
    device_int32_vector,
    exec_kwargs,
    finalize,
    framework,
    host_ints,
    is_cuda,
    on_device_of,
    optional_float,
    prepare,
    through_exchange_table,
    write_ints,
)

__all__ = ["BatchDecodeWithPagedKVCacheWrapper", "decode_graph_plan_items",
           "decode_graph_split_counts", "decode_num_splits_for_lengths",
           "decode_split_counts_for_lengths", "decode_split_plan"]

# The split rules' constants and a split plan's bounds, from the C++ library: DecodeSplitRule and
# the constants of include/fastattn/decode_plan.h, which say what each one is and how it was
# fitted (an H200 at bf16, pages of 16; other GPUs use them unfitted).
_K = _C.decode_plan_constants
CTA_COST_KEYS = _K["cta_cost_keys"]      # a CTA's fixed cost, in keys streamed
TAIL_WEIGHT = _K["tail_weight"]          # the weight of the longest CTA (the grid's tail)
PLAN_TAIL_WEIGHT = _K["plan_tail_weight"]  # the same when a count per sequence picks its chunk
BALANCED_RATIO = _K["balanced_ratio"]    # near-uniform lengths keep the capacity heuristic
SPLIT_TOLERANCE = _K["split_tolerance"]  # estimates this close to the best count as equal
MAX_SPLITS = _K["max_splits"]            # the most splits the rules give a sequence
PLAN_MIN_GAIN = _K["min_gain"]           # a count per sequence only for at least this gain
# A split plan (KVCacheArgs::split_plan in include/fastattn/ops.h): at most MAX_PLAN_ITEMS
# sequences and work items, MAX_PLAN_SPLITS splits a sequence; a CUDA-graph plan has
# GRAPH_EXTRA_WAVES waves of items per KV head beyond one a sequence.
MAX_PLAN_ITEMS = _K["max_plan_items"]
MAX_PLAN_SPLITS = _K["max_plan_splits"]
GRAPH_EXTRA_WAVES = _K["graph_extra_waves"]


def _lengths(lengths) -> np.ndarray:
    """The split rules' lengths as a contiguous int64 host array."""
    return np.ascontiguousarray(np.asarray(lengths, dtype=np.int64).reshape(-1))


def decode_num_splits_for_lengths(lengths: Sequence[int], num_kv_heads: int, sm_count: int,
                                  *, cta_cost_keys: float = CTA_COST_KEYS,
                                  tail_weight: float = TAIL_WEIGHT,
                                  balanced_ratio: float = BALANCED_RATIO,
                                  max_splits: int = MAX_SPLITS) -> int:
    """Split-KV count for a decode batch whose key lengths are known on the host.

    Returns 0 (flash_attn_with_kvcache's capacity heuristic) when the lengths are near-uniform
    (longest x batch <= balanced_ratio x sum), 1 when there is nothing to read; else the fixed
    count S (1..max_splits) of the per-head kernel that minimises the estimated time, in keys
    streamed by one SM (one resident CTA per SM, as the sm_90 kernel):

        T(S) = num_kv_heads * (sum(lengths) + cta_cost_keys * batch * S) / sm_count
               + tail_weight * (ceil(max(lengths) / S) + cta_cost_keys)

    the batch's keys spread over the SMs, each of the batch x heads x S CTAs paying a fixed cost,
    plus the grid's tail, a share of the longest CTA (the longest sequence's part). Of the counts
    within SPLIT_TOLERANCE of the best estimate, the fewest is taken. Computed by the C++ library
    (``fastattn::decode_num_splits_for_lengths``, include/fastattn/decode_plan.h).

    Arguments:
        lengths: (batch,) key lengths, ints >= 0.
        num_kv_heads: KV heads (the per-head kernel runs one CTA per KV head and split).
        sm_count: the GPU's SMs.
    """
    return int(_C.decode_num_splits_for_lengths(
        _lengths(lengths), as_int(num_kv_heads, "num_kv_heads"), as_int(sm_count, "sm_count"),
        cta_cost_keys=float(cta_cost_keys), tail_weight=float(tail_weight),
        balanced_ratio=float(balanced_ratio), max_splits=as_int(max_splits, "max_splits")))


def decode_split_counts_for_lengths(lengths: Sequence[int], num_kv_heads: int, sm_count: int,
                                    *, cta_cost_keys: float = CTA_COST_KEYS,
                                    tail_weight: float = TAIL_WEIGHT,
                                    balanced_ratio: float = BALANCED_RATIO,
                                    max_splits: int = MAX_SPLITS,
                                    min_gain: float = PLAN_MIN_GAIN,
                                    plan_tail_weight: Optional[float] = None,
                                    head_dim: Optional[int] = None) -> Optional[np.ndarray]:
    """A split count per sequence for a decode batch whose key lengths are known on the host, or
    None where one count for the batch serves it better (:func:`decode_num_splits_for_lengths`).

    Every sequence is cut into parts of about one chunk c of keys, counts[b] = ceil(lengths[b] /
    c) (1..max_splits), with c taken among ceil(longest / S), S = 1..max_splits, to minimise the
    estimate of :func:`decode_num_splits_for_lengths` with the W = sum(counts) CTAs per KV head in
    place of batch x S, and the longest part in place of ceil(longest / S):

        T(c) = num_kv_heads * (sum(lengths) + cta_cost_keys * W) / sm_count
               + tail_weight * (longest part + cta_cost_keys)

    Of the chunks within SPLIT_TOLERANCE of the best estimate, the one of fewest parts is taken.
    Returns (batch,) int32 counts for :func:`decode_split_plan` when the uniform count's estimate
    is at least min_gain times that plan's (PLAN_MIN_GAIN says why the margin), ones when there is
    nothing to read, else None: near-uniform lengths (the capacity heuristic) and batches where
    the plan would gain less. Where it plans, the chunk is then chosen again with
    plan_tail_weight in place of tail_weight; None takes the fitted weight of `head_dim`'s kernels
    (0.10 at head_dim 64 and 256, PLAN_TAIL_WEIGHT at 128, as the decode wrapper's ``plan()``), or
    tail_weight without a head_dim. Computed by the C++ library
    (``fastattn::decode_split_counts_for_lengths``).
    """
    lens = _lengths(lengths)
    if plan_tail_weight is None:
        plan_tail_weight = (tail_weight if head_dim is None
                            else _C.decode_plan_tail_weight(as_int(head_dim, "head_dim")))
    counts = np.empty(lens.size, dtype=np.int32)
    planned = _C.decode_split_counts_for_lengths(
        lens, as_int(num_kv_heads, "num_kv_heads"), as_int(sm_count, "sm_count"), counts,
        cta_cost_keys=float(cta_cost_keys), tail_weight=float(tail_weight),
        balanced_ratio=float(balanced_ratio), max_splits=as_int(max_splits, "max_splits"),
        min_gain=float(min_gain), plan_tail_weight=float(plan_tail_weight))
    return counts if planned else None


def decode_split_plan(counts: Sequence[int], lengths: Optional[Sequence[int]] = None, *,
                      items: Optional[int] = None) -> np.ndarray:
    """The split plan of ``flash_attn_with_kvcache(..., split_plan=)`` for split counts per
    sequence: a (batch + 1 + W) int32 host array (copy it to q's device), W = sum(counts), or
    ``items`` when given.

    Entries 0..batch are split_indptr (the cumulative counts from 0); then the work items,
    b + 65536 x split, in launch order: with ``lengths`` (the key lengths) the longest parts
    first, so that the grid's tail holds the short ones; else by sequence. Then items - sum(counts)
    padding items (-1, no work), last. Computed by the C++ library (``fastattn::decode_split_plan``).

    Arguments:
        counts: (batch,) ints in 1..1024 (:func:`decode_split_counts_for_lengths`).
        lengths: optional (batch,) key lengths >= 0, only to order the work items.
        items: the plan's size W >= sum(counts) (a CUDA graph's fixed grid:
            :func:`decode_graph_plan_items`); None: sum(counts).
    """
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    c32 = np.ascontiguousarray(c, dtype=np.int32)
    if not np.array_equal(c32, c):  # beyond int32: out of range before the C++ check sees it
        raise ValueError(f"counts must be in 1..{MAX_PLAN_SPLITS}, got {int(c[c32 != c][0])}")
    lens = None
    if lengths is not None:
        lens = _lengths(lengths)
        if lens.size != c.size:
            raise ValueError(f"lengths must have one entry per count ({c.size}), got {lens.size}")
    size = int(c.sum()) if items is None else as_int(items, "items")
    # A size out of bounds is refused by the C++ check before the plan's size is looked at.
    plan = np.empty(c.size + 1 + size if 0 <= size <= MAX_PLAN_ITEMS else 0, dtype=np.int32)
    _C.decode_split_plan(c32, lens, None if items is None else size, plan)
    return plan


def decode_graph_plan_items(batch: int, num_kv_heads: int, sm_count: int, *,
                            extra_waves: Optional[float] = None) -> int:
    """The work items W of a CUDA-graph decode plan (the captured grid's fixed size): one per
    sequence and ceil(extra_waves x sm_count / num_kv_heads) more (extra_waves None:
    GRAPH_EXTRA_WAVES), at most MAX_PLAN_ITEMS. The plan of each step uses up to W parts
    (:func:`decode_graph_split_counts`) and pads the rest (a padding CTA ends at once; at most
    extra_waves waves of them)."""
    return int(_C.decode_graph_plan_items(
        as_int(batch, "batch"), as_int(num_kv_heads, "num_kv_heads"), as_int(sm_count, "sm_count"),
        float(GRAPH_EXTRA_WAVES if extra_waves is None else extra_waves)))


def decode_graph_split_counts(lengths: Sequence[int], num_kv_heads: int, sm_count: int,
                              max_parts: int, *, cta_cost_keys: float = CTA_COST_KEYS,
                              tail_weight: float = TAIL_WEIGHT,
                              max_splits: int = MAX_SPLITS) -> np.ndarray:
    """A split count per sequence, at most max_parts parts in all, for a plan of fixed size (a
    CUDA graph's: :func:`decode_graph_plan_items`). Unlike
    :func:`decode_split_counts_for_lengths` it always gives counts: a captured launch cannot switch
    to the capacity heuristic's forms on the steps where one count would serve.

    The options are the chunk rule's counts and one count S = 1..max_splits for every sequence,
    those of at most max_parts parts; the estimate of :func:`decode_split_counts_for_lengths`
    picks among them, the fewest parts within SPLIT_TOLERANCE of the best. Returns (batch,) int32.
    Computed by the C++ library (``fastattn::decode_graph_split_counts``).
    """
    lens = _lengths(lengths)
    counts = np.empty(lens.size, dtype=np.int32)
    _C.decode_graph_split_counts(
        lens, as_int(num_kv_heads, "num_kv_heads"), as_int(sm_count, "sm_count"),
        as_int(max_parts, "max_parts"), counts, cta_cost_keys=float(cta_cost_keys),
        tail_weight=float(tail_weight), max_splits=as_int(max_splits, "max_splits"))
    return counts


def _int32_vector(x, name: str, ws) -> None:
    """Check a CUDA-graph buffer: a 1-D contiguous int32 array on the workspace's device kind."""
    if x is None:
        raise ValueError(f"{name} is required with use_cuda_graph=True (the captured launch reads "
                         f"the page lists from it in place)")
    check_array(x, name)
    if len(x.shape) != 1 or dtype_name(x.dtype) != "int32":
        raise ValueError(f"{name} must be a 1-D int32 array, got shape {tuple(x.shape)} and dtype "
                         f"{dtype_name(x.dtype)}")
    if framework(x) not in ("torch", "cupy", "numpy"):
        raise TypeError(f"{name} must be a torch, cupy or numpy array (written in place by plan()), "
                        f"got {type(x).__name__}")
    contiguous = x.is_contiguous() if framework(x) == "torch" else x.flags.c_contiguous
    if not contiguous:
        raise ValueError(f"{name} must be contiguous")
    if is_cuda(x) != is_cuda(ws):
        where = "a CUDA device" if is_cuda(ws) else "the host"
        raise ValueError(f"{name} must be on the device of float_workspace_buffer ({where})")


class _GraphBuffers:
    """The device arrays a captured run() reads in place (use_cuda_graph=True): the caller's page
    lists (indptr (B + 1), indices (capacity), last_page_len (B)), and the wrapper's key lengths
    (B) and split plan (B + 1 + W), two views of one array (one copy a step) allocated by the
    first plan(), whose KV heads fix W."""

    def __init__(self, ws, indptr, indices, last_page_len):
        _int32_vector(indptr, "paged_kv_indptr_buffer", ws)
        _int32_vector(indices, "paged_kv_indices_buffer", ws)
        _int32_vector(last_page_len, "paged_kv_last_page_len_buffer", ws)
        self.batch = int(indptr.shape[0]) - 1
        if self.batch < 0:
            raise ValueError("paged_kv_indptr_buffer must have batch_size + 1 >= 1 entries, got 0")
        if int(last_page_len.shape[0]) != self.batch:
            raise ValueError(f"paged_kv_last_page_len_buffer must have batch_size = "
                             f"len(paged_kv_indptr_buffer) - 1 = {self.batch} entries, got "
                             f"{int(last_page_len.shape[0])}")
        self.indptr, self.indices, self.last_page_len = indptr, indices, last_page_len
        self.arrays = None  # (B + B + 1 + W): the key lengths, then the split plan
        self.num_kv_heads = None
        self.q_len = None  # the query rows per request of the first plan: the captured q's shape

    def plan_arrays(self, num_kv_heads: int, items: int):
        """The array of the key lengths and the split plan; its size is fixed by the first plan's
        KV heads."""
        if self.arrays is None:
            self.arrays = empty(self.indptr, (2 * self.batch + 1 + items,), "int32")
            self.num_kv_heads = num_kv_heads
        elif num_kv_heads != self.num_kv_heads:
            raise ValueError(f"num_kv_heads must stay {self.num_kv_heads} with use_cuda_graph=True "
                             f"(the captured grid holds the first plan's size), got {num_kv_heads}")
        return self.arrays

    @property
    def seqlens(self):
        return self.arrays[:self.batch]

    @property
    def split_plan(self):
        return self.arrays[self.batch:]


def _check_rare_run_arguments(args, q_len_per_req, planned) -> None:
    """run()'s error for extra positional arguments, and its check of a q_len_per_req given to it
    (which must be the plan's), kept off its common path."""
    if args:
        raise TypeError(f"run() takes q and paged_kv_cache positionally, got {len(args)} more")
    if q_len_per_req is not None:
        got = as_int(q_len_per_req, "q_len_per_req")
        if got != planned:
            raise ValueError(f"q_len_per_req given to run() must be the one plan() was given "
                             f"({planned}), got {got}: pass it to plan()")


def _calibration_scale(value, name: str) -> float:
    """One of run()'s q_scale / k_scale / v_scale: None -> 1.0, else a finite number on the host
    (reading a GPU array would synchronise, and a captured call must not)."""
    if value is None:
        return 1.0
    if is_cuda(value):
        raise TypeError(f"{name} must be a number on the host (a Python or numpy scalar), got an "
                        f"array on a GPU")
    x = as_float(value, name)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _scaled_softmax_scale(sm_scale, head_dim: int, q_scale, k_scale) -> float:
    """sm_scale (None: 1 / sqrt(head_dim)) times q_scale * k_scale, as FlashInfer folds them: the
    scores are (q . k) * sm_scale * q_scale * k_scale before the soft cap."""
    base = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    scale = base * _calibration_scale(q_scale, "q_scale") * _calibration_scale(k_scale, "k_scale")
    if not math.isfinite(scale):
        raise ValueError(f"sm_scale * q_scale * k_scale must be finite, got {scale}")
    return scale


def _output_scale(v_scale, out) -> float:
    """run()'s v_scale as the factor the output is multiplied by after the kernels (None: 1.0).
    A factor other than 1 scales the output in place, so a given out must allow that."""
    scale = _calibration_scale(v_scale, "v_scale")
    if scale != 1.0 and out is not None and framework(out) not in ("numpy", "torch", "cupy"):
        raise TypeError(f"out must be a numpy, torch or cupy array where v_scale != 1 (the "
                        f"output is scaled in place), got {type(out).__name__}")
    return scale


def _scale_output(o, scale: float) -> None:
    """FlashInfer's v_scale: the rounded output scaled once more, in place (one elementwise op; a
    torch out that requires grad is scaled through its detached view)."""
    scaled = prepare(o)
    scaled *= scale


def _check_rope_parameters(rope_scale, rope_theta) -> None:
    """rope_scale / rope_theta: None or real numbers. They parametrise FlashInfer's fused RoPE only,
    so where the position encoding is "NONE" (always, in fastattn) they have no effect, as in
    FlashInfer; they are still checked, so a wrong type is an error and not ignored."""
    for name, value in (("rope_scale", rope_scale), ("rope_theta", rope_theta)):
        if value is not None:
            as_float(value, name)


def _check_pos_encoding(pos_encoding_mode, rope_scale, rope_theta) -> None:
    """FlashInfer's fused RoPE (and its ALiBi mode) are not in fastattn: NotImplementedError unless
    pos_encoding_mode is "NONE". rope_scale / rope_theta are then inert (_check_rope_parameters)."""
    if pos_encoding_mode != "NONE":
        raise NotImplementedError(
            f"pos_encoding_mode must be 'NONE' (fastattn has no fused RoPE or FlashInfer ALiBi "
            f"mode: rotate q and k before the call), got {pos_encoding_mode!r}"
        )
    _check_rope_parameters(rope_scale, rope_theta)


def _q_len_per_req(q_len_per_req) -> int:
    """plan()'s q_len_per_req, checked: an int >= 1."""
    n = as_int(q_len_per_req, "q_len_per_req")
    if n < 1:
        raise ValueError(f"q_len_per_req must be >= 1, got {n}")
    return n


def _fixed_split_pages(fixed_split_size) -> int:
    """plan()'s fixed_split_size as plan_paged_decode takes it: None or -1 (FlashInfer's value for
    none) -> 0, else a page count >= 1."""
    if fixed_split_size is None:
        return 0
    pages = as_int(fixed_split_size, "fixed_split_size")
    if pages == -1:
        return 0
    if pages < 1:
        raise ValueError(f"fixed_split_size must be a page count >= 1, or None / -1 for none, "
                         f"got {pages}")
    return min(pages, 1 << 31)  # more pages than any sequence has: one part each, as given


class BatchDecodeWithPagedKVCacheWrapper:
    """Batch decode (one query per request, or N with ``q_len_per_req``) over a paged KV cache:
    FlashInfer's interface.

    ``plan()`` reads the page lists' row pointers and last page lengths on the host (given on the
    GPU, it synchronises, as FlashInfer's does; given on the host, it never waits for the GPU: its
    uploads are staged in the library's pinned memory, ``fastattn::copy_host_to_device``). One C++
    call (``fastattn::plan_paged_decode``) checks them, computes the key lengths and plans the
    splits: a count per request (:func:`decode_split_counts_for_lengths`, a split plan on the
    device) or one count for the batch (:func:`decode_num_splits_for_lengths`). A block table is
    built from the page lists on the workspace's device (``csr_to_block_table``). Page ids
    given on the GPU (torch or cupy, as the workspace) are copied there and not read on the host,
    as FlashInfer's ``plan()`` does not read them: an id outside the cache is then the kernels'
    guard (its keys and values read as zeros), not an error. ``run()`` neither synchronises nor
    allocates outside the caller's allocator.

    With ``use_cuda_graph=True`` ``run()`` can be captured in a CUDA graph and replayed after each
    step's ``plan()``: the batch size is fixed by ``paged_kv_indptr_buffer`` (batch_size + 1
    int32 entries), the page ids go to ``paged_kv_indices_buffer`` (its length is the most pages
    a step may use) and the last pages' lengths to ``paged_kv_last_page_len_buffer``. ``plan()``
    copies each step's lists into them (on the caller's current stream) with the key lengths and
    a split plan of fixed size (:func:`decode_graph_plan_items`, padded) into the wrapper's own
    device arrays, so that the captured launch reads them in place; the float workspace must
    hold the call's partial states (``run()`` says how much when it does not).

    ``kv_layout`` is FlashInfer's: "NHD", pages (max_num_pages, 2, page_size, num_kv_heads,
    head_dim), or "HND", pages (max_num_pages, 2, num_kv_heads, page_size, head_dim) (each head's
    keys of a page one contiguous run); a tuple (k_pages, v_pages) drops the 2. Both are read in
    place: the kernels take HND pages as strided views.

    Supported: both layouts; ``pos_encoding_mode`` "NONE" (``rope_scale`` / ``rope_theta``
    accepted and without effect, as in FlashInfer with "NONE"); ``window_left``; ``logits_soft_cap``;
    ``sm_scale``; GQA / MQA; ``return_lse`` (natural-log LSE, unlike FlashInfer's base 2: see
    :func:`fastattn.lse_base2_to_natural`); ``sinks`` in ``run()``; ``fixed_split_size`` (split
    counts that depend on each request's own pages only: batch-invariant results);
    ``q_len_per_req`` in ``plan()`` (several query rows per request, causal within them:
    speculative decoding), with ``window_right``; ``o_data_type`` equal to q's dtype; ``q_scale``,
    ``k_scale`` and ``v_scale`` in ``run()`` (FlashInfer's calibration scales, on caches of q's
    dtype). Not supported (a clear error): fused RoPE, ALiBi mode, fp8 caches and other output
    dtypes.
    """

    def __init__(self, float_workspace_buffer, kv_layout: str = "NHD", use_cuda_graph: bool = False,
                 use_tensor_cores: bool = False, paged_kv_indptr_buffer=None,
                 paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None,
                 backend: str = "auto", jit_args=None):
        check_array(float_workspace_buffer, "float_workspace_buffer")
        check_kv_layout(kv_layout)
        if jit_args is not None:
            raise NotImplementedError("jit_args (FlashInfer's JIT variants) are not supported")
        # use_tensor_cores and backend choose among FlashInfer's kernels; fastattn has one path.
        self._kv_layout = kv_layout
        self._workspace_buffer = float_workspace_buffer
        self._plan: Optional[dict] = None
        self._runner = None  # _C.PagedDecodeRunner of the plan: run()'s checks, views and op call
        self._graph: Optional[_GraphBuffers] = None
        if use_cuda_graph:
            self._graph = _GraphBuffers(float_workspace_buffer, paged_kv_indptr_buffer,
                                        paged_kv_indices_buffer, paged_kv_last_page_len_buffer)

    @property
    def is_cuda_graph_enabled(self) -> bool:
        """Whether the wrapper was made with use_cuda_graph=True (FlashInfer's name)."""
        return self._graph is not None

    def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffer=None) -> None:
        """Replace the workspace buffer (the int buffer of FlashInfer's signature is unused)."""
        check_array(float_workspace_buffer, "float_workspace_buffer")
        runner = None if self._plan is None else self._make_runner(self._plan, float_workspace_buffer)
        self._workspace_buffer, self._runner = float_workspace_buffer, runner

    def plan(self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int,
             head_dim: int, page_size: int, pos_encoding_mode: str = "NONE",
             window_left: int = -1, logits_soft_cap: Optional[float] = None,
             q_data_type="float16", kv_data_type=None, data_type=None,
             sm_scale: Optional[float] = None, rope_scale: Optional[float] = None,
             rope_theta: Optional[float] = None, non_blocking: bool = True, block_tables=None,
             seq_lens=None, fixed_split_size: Optional[int] = None,
             disable_split_kv: bool = False, *, o_data_type=None, window_right: int = 0,
             q_len_per_req: int = 1) -> None:
        """Plan the decode of a batch from its page lists (read on the host).

        The arguments up to disable_split_kv are FlashInfer 0.5.3's, in its order; o_data_type,
        window_right and q_len_per_req, which later FlashInfer releases added, are keyword-only.

        Arguments:
            indptr: (batch_size + 1,) int32 CSR row pointers into indices (non-decreasing).
            indices: int32 page ids; request b owns indices[indptr[b] : indptr[b + 1]].
            last_page_len: (batch_size,) int32 keys in each request's last page (1..page_size;
                ignored for a request without pages, which attends to nothing: output 0).
            num_qo_heads, num_kv_heads, head_dim, page_size: sizes, checked again by run().
            window_left: keys more than window_left before the query are masked (-1: none).
            logits_soft_cap: softcap of the scores (None or 0: none).
            q_data_type, kv_data_type, data_type: dtype of q and the cache (kv must equal q).
            sm_scale: softmax scale (None: 1 / sqrt(head_dim)).
            fixed_split_size: FlashInfer's batch-invariant splits, in pages: every request is cut
                into ceil(max(1, its attended pages) / fixed_split_size) parts whatever the rest
                of the batch, so its results are bitwise the same in any batch (the parts are
                equal shares of its tiles, not fixed_split_size pages each). None or -1
                (FlashInfer's "none"): the host's split rules. With use_cuda_graph=True the parts
                must fit the plan's fixed size (:func:`decode_graph_plan_items`).
            disable_split_kv: one split per sequence (no partial states, no combine kernel); it
                wins over fixed_split_size, as in FlashInfer.
            o_data_type: dtype of the output: None or q's (the kernels write q's dtype).
            q_len_per_req: query rows per request (speculative decoding's draft tokens, N): run()'s
                q is then (batch_size * N, num_qo_heads, head_dim), request b's rows
                b * N .. b * N + N - 1, and row i of a request of L keys sits at key L - N + i
                (the rows' keys and values must be in the cache already: a request of fewer than
                N keys is a ValueError). With use_cuda_graph=True every plan must keep the first
                plan's N.
            window_right: keys past its own position a row attends to, where N > 1: 0 (causal
                within the request's rows, FlashInfer's mask) or more, -1 for all of them.
        """
        _check_pos_encoding(pos_encoding_mode, rope_scale, rope_theta)
        fixed = _fixed_split_pages(fixed_split_size)
        q_len = _q_len_per_req(q_len_per_req)
        right = as_int(window_right, "window_right")
        if right < -1:
            raise ValueError(f"window_right must be >= -1 (-1: no bound), got {right}")
        if block_tables is not None or seq_lens is not None:
            raise NotImplementedError("block_tables / seq_lens (FlashInfer's trtllm-gen inputs) are "
                                      "not supported: pass the CSR page lists")
        for name, x in (("indptr", indptr), ("indices", indices), ("last_page_len", last_page_len)):
            check_array(x, name)
        q_dtype = dtype_name(data_type if data_type is not None else q_data_type)
        kv_dtype = dtype_name(kv_data_type) if kv_data_type is not None else q_dtype
        if kv_dtype != q_dtype:
            raise TypeError(f"kv_data_type must equal q_data_type ({q_dtype}), got {kv_dtype}")
        if o_data_type is not None and dtype_name(o_data_type) != q_dtype:
            raise TypeError(f"o_data_type must be None or q_data_type ({q_dtype}): the output has "
                            f"q's dtype, got {dtype_name(o_data_type)}")
        heads_q = as_int(num_qo_heads, "num_qo_heads")
        heads_kv = as_int(num_kv_heads, "num_kv_heads")
        ps = as_int(page_size, "page_size")
        if ps < 1:
            raise ValueError(f"page_size must be >= 1, got {ps}")

        ip = host_ints(indptr).reshape(-1)
        last = host_ints(last_page_len).reshape(-1)
        # Page ids on the GPU are copied device to device, never read here (as FlashInfer's
        # plan()): the kernels' guard handles ids outside the cache.
        ws = self._workspace_buffer
        ids_on_device = can_copy_on_device(self._graph.indices if self._graph is not None else ws,
                                           indices)
        ids = None if ids_on_device else host_ints(indices).reshape(-1)
        num_ids = math.prod(indices.shape) if ids is None else ids.size
        if ip.size < 1:
            raise ValueError("indptr must have batch_size + 1 >= 1 entries, got 0")
        batch = ip.size - 1
        if last.size != batch:
            raise ValueError(f"last_page_len must have batch_size = len(indptr) - 1 = {batch} "
                             f"entries, got {last.size}")
        graph = self._graph
        if graph is not None and batch != graph.batch:
            raise ValueError(f"indptr must have batch_size + 1 = {graph.batch + 1} entries with "
                             f"use_cuda_graph=True (paged_kv_indptr_buffer fixes the batch), got "
                             f"{ip.size}")
        if graph is not None and graph.q_len not in (None, q_len):
            raise ValueError(f"q_len_per_req must stay {graph.q_len} with use_cuda_graph=True (the "
                             f"captured q holds batch_size * {graph.q_len} rows), got {q_len}")
        left = as_int(window_left, "window_left")
        on_gpu = is_cuda(ws)
        sms = device_sm_count(ws) if on_gpu else 1  # on the CPU the backend plans its threads
        items = decode_graph_plan_items(batch, heads_kv, sms) if graph is not None else 0
        d = as_int(head_dim, "head_dim")
        # The checks of the lists, the key lengths, the splits and [lengths | split plan], in C++.
        arrays, counts, splits, max_pages = _C.plan_paged_decode(
            ip, last, num_ids, ps, left, heads_kv, sms, split_kv=not disable_split_kv,
            choose_splits=on_gpu, graph_items=items, head_dim=d, fixed_split_size=fixed,
            num_qo_heads=heads_q, q_len=q_len)
        used = None if ids is None else ids[ip[0]:ip[-1]]  # the batch's page ids, read on the host
        if used is not None and used.size and used.min() < 0:
            raise ValueError(f"indices must be page ids >= 0, got {int(used.min())}")
        if graph is not None:
            seqlens, page_args = self._plan_graph(ip, indices, used, last, arrays, heads_kv, items)
        else:
            seqlens, page_args = self._plan_arrays(ws, indptr, ip, indices, used, arrays, max_pages)
        plan = {
            "batch": batch,
            "num_qo_heads": heads_q,
            "num_kv_heads": heads_kv,
            "head_dim": d,
            "page_size": ps,
            "data_type": q_dtype,
            "window_left": left,
            "window_right": right,
            "q_len": q_len,
            "softcap": as_float(logits_soft_cap or 0.0, "logits_soft_cap"),
            "sm_scale": optional_float(sm_scale, "sm_scale"),
            # None: the ids were not read (graph mode, on the GPU): no check against the cache
            "max_page_id": None if used is None else (int(used.max()) if used.size else -1),
            "num_splits": splits,
            "split_counts": counts,
            "on_gpu": on_gpu,  # where the plan's arrays are
            "seqlens": seqlens,
            "page_args": page_args,  # the page arguments run() passes
            "out_shape": (batch * q_len, heads_q, d),
        }
        # The runner is made before either is replaced: if that raises, the last plan stays whole.
        runner = self._make_runner(plan, ws)
        self._plan, self._runner = plan, runner
        if graph is not None:
            graph.q_len = q_len

    def _plan_arrays(self, ws, indptr, ip, indices, used, arrays, max_pages):
        """plan()'s device arrays, new ones each step: a block table (built on the device from
        the CSR lists: the kernels read a table's page ids without a row pointer first), the key
        lengths and the split plan (`arrays`, from plan_paged_decode). The table is built from the
        caller's lists in place where they are int32 arrays on the workspace's device, else from
        copies: the ids device to device when `used`, their host copy, is None, else uploaded with
        the row pointers and `arrays` in one copy. Returns (key lengths, run()'s page arguments)."""
        batch = ip.size - 1
        n = arrays.size
        # Its width, the most pages of a request, is the capacity heuristic's bound on the keys.
        table = empty(ws, (batch, max(1, max_pages)), "int32")
        if device_int32_vector(indptr, ws) and device_int32_vector(indices, ws):
            page_indptr, page_indices = indptr, indices
            dev = on_device_of(ws, arrays)
        else:
            rebased = (ip - ip[0]).astype(np.int32)
            if used is None:
                dev = on_device_of(ws, np.concatenate([arrays, rebased]))
                num_pages = int(ip[-1] - ip[0])
                page_indices = empty(ws, (num_pages,), "int32")
                copy_on_device(page_indices, indices, int(ip[0]), num_pages)
            else:
                dev = on_device_of(ws, np.concatenate([arrays, rebased, used.astype(np.int32)]))
                page_indices = dev[n + batch + 1:]
            page_indptr = dev[n:n + batch + 1]
        call_op(_C.csr_to_block_table, page_indptr=page_indptr, page_indices=page_indices,
                block_table=table, **exec_kwargs(ws))
        page_args = {"block_table": table}
        if n > batch:
            page_args["split_plan"] = dev[batch:n]
        return dev[:batch], page_args

    def _plan_graph(self, ip, indices, used, last, arrays, heads_kv, items):
        """plan()'s device arrays with use_cuda_graph=True: this step's page lists, and the key
        lengths and split plan of the fixed size (`arrays`), written into the arrays the captured
        run() reads. The page ids go device to device when `used` (their host copy) is None.
        Returns (key lengths, run()'s page arguments)."""
        g = self._graph
        num_pages = int(ip[-1] - ip[0])
        if num_pages > int(g.indices.shape[0]):
            raise ValueError(f"indices hold {num_pages} pages, more than "
                             f"paged_kv_indices_buffer's {int(g.indices.shape[0])}")
        write_ints(g.indptr, (ip - ip[0]).astype(np.int32))
        if used is not None:
            write_ints(g.indices, used.astype(np.int32))
        else:
            copy_on_device(g.indices, indices, int(ip[0]), num_pages)
        write_ints(g.last_page_len, last.astype(np.int32))
        write_ints(g.plan_arrays(heads_kv, items), arrays)
        return g.seqlens, {"page_indptr": g.indptr, "page_indices": g.indices,
                           "split_plan": g.split_plan}

    begin_forward = plan

    def end_forward(self) -> None:
        """Clear the plan and release its arrays (FlashInfer's deprecated name)."""
        self._plan = None
        self._runner = None

    @property
    def num_splits(self) -> Optional[int]:
        """The uniform split count plan() chose (0: the capacity heuristic; 1: split_kv
        disabled), or None before plan() and when it chose a count per sequence
        (:attr:`split_counts`)."""
        if self._plan is None or self._plan["split_counts"] is not None:
            return None
        return self._plan["num_splits"]

    @property
    def split_counts(self) -> Optional[np.ndarray]:
        """(batch_size,) the split count plan() chose for each request (a ragged batch on a GPU:
        :func:`decode_split_counts_for_lengths`), or None (a uniform count: :attr:`num_splits`)."""
        return None if self._plan is None else self._plan["split_counts"]

    def _make_runner(self, plan, workspace):
        """The plan's _C.PagedDecodeRunner: the plan's arrays and the workspace imported once,
        so that each run() hands over only q, the pages, out and lse."""
        pa = plan["page_args"]
        return call_op(_C.PagedDecodeRunner, plan["seqlens"], pa.get("block_table"),
                       pa.get("page_indptr"), pa.get("page_indices"), pa.get("split_plan"),
                       plan["num_splits"], plan["batch"], plan["num_qo_heads"],
                       plan["num_kv_heads"], plan["head_dim"], plan["page_size"],
                       plan["data_type"], plan["max_page_id"], plan["on_gpu"], workspace,
                       self._graph is not None, self._kv_layout, plan["q_len"],
                       plan["window_right"])

    def run(self, q, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None, out=None,
            lse=None, return_lse: bool = False, enable_pdl=None, window_left=None, sinks=None,
            q_len_per_req: Optional[int] = None):
        """Attention of q (batch_size * N, num_qo_heads, head_dim), N = plan()'s q_len_per_req
        query rows per request (one by default), over its planned pages; a request's last row
        sits at its last key.

        paged_kv_cache: (max_num_pages, 2, page_size, num_kv_heads, head_dim) or a tuple
        (k_cache, v_cache) of (max_num_pages, page_size, num_kv_heads, head_dim); with
        kv_layout "HND" num_kv_heads and page_size swap places.
        out: optional (batch_size * N, num_qo_heads, head_dim) output; lse: optional
        (batch_size * N, num_qo_heads) float32. window_left overrides the plan's. q_len_per_req:
        None, or plan()'s (FlashInfer's newer releases take it in plan(); a different value is a
        ValueError).
        sinks: optional (num_qo_heads,) float32 attention sinks (gpt-oss): sinks[h] joins each
        query's softmax as one more logit (in the units of the scaled, soft-capped scores) with a
        zero value row; folded into each output row as it is written (no extra kernel), and the
        LSE then includes it.
        q_scale, k_scale, v_scale: FlashInfer's calibration scales, None (1) or finite numbers on
        the host: the scores are (q . k) * sm_scale * q_scale * k_scale (before the soft cap, and
        the LSE is theirs), and out is multiplied by v_scale after the kernels have written it, in
        place (one elementwise op; none where v_scale is 1, as vLLM passes it for 16-bit caches).
        The cache keeps q's dtype: there are no fp8 caches for the scales to dequantise.
        Returns out, or (out, lse) with return_lse: natural-log LSE (FlashInfer's is base 2).
        """
        runner = self._runner
        if runner is None:
            raise RuntimeError("BatchDecodeWithPagedKVCacheWrapper.plan() must be called before run()")
        plan = self._plan
        if args or q_len_per_req is not None:
            _check_rare_run_arguments(args, q_len_per_req, plan["q_len"])
        sm_scale, out_scale = plan["sm_scale"], 1.0
        if q_scale is not None or k_scale is not None:
            sm_scale = _scaled_softmax_scale(plan["sm_scale"], plan["head_dim"], q_scale, k_scale)
        if v_scale is not None:
            out_scale = _output_scale(v_scale, out)
        check_array(q, "q")
        if isinstance(paged_kv_cache, (tuple, list)):
            if len(paged_kv_cache) != 2:
                raise ValueError(f"paged_kv_cache given as a tuple must be (k_pages, v_pages), got "
                                 f"{len(paged_kv_cache)} items")
            pages, v_pages = prepare(paged_kv_cache[0]), prepare(paged_kv_cache[1])
        else:
            pages, v_pages = prepare(paged_kv_cache), None
        if sinks is not None:
            check_array(sinks, "sinks")
        left = plan["window_left"] if window_left is None else as_int(window_left, "window_left")
        alloc = None if self._graph is not None else (
            lambda nbytes: empty(q, (nbytes,), "uint8"))  # the caller's allocator, when needed
        # The runner checks every array against the plan (shapes, dtypes, device) before the op.
        if through_exchange_table(q):
            # torch >= 2.10: out and lse, where not given, from torch's allocator and the current
            # stream, both through torch's DLPack exchange table in the runner (no Python for them:
            # bench/NOTES.md, session 97).
            res = call_op(runner.run, prepare(q), pages, v_pages, out, lse, left, sm_scale,
                          plan["softcap"], 0, alloc, prepare(sinks), return_lse, True)
            o, lse = res if return_lse else (res, lse)
        else:
            o = out if out is not None else empty(q, plan["out_shape"])
            if lse is None and return_lse:
                lse = empty(q, plan["out_shape"][:2], "float32")
            call_op(runner.run, prepare(q), pages, v_pages, o, lse, left, sm_scale,
                    plan["softcap"], cuda_stream_of(q), alloc, prepare(sinks))
        if out_scale != 1.0:
            _scale_output(o, out_scale)
        if return_lse:
            return finalize(q, o), finalize(q, lse)
        return finalize(q, o)

    def forward(self, q, paged_kv_cache, pos_encoding_mode: str = "NONE", q_scale=None,
                k_scale=None, v_scale=None, window_left: int = -1,
                logits_soft_cap: Optional[float] = None, sm_scale: Optional[float] = None,
                rope_scale=None, rope_theta=None):
        """FlashInfer's deprecated run(): the plan's options, except that window_left,
        logits_soft_cap and sm_scale given here replace the plan's."""
        return self._forward(q, paged_kv_cache, pos_encoding_mode, q_scale, k_scale, v_scale,
                             window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, False)

    def forward_return_lse(self, q, paged_kv_cache, pos_encoding_mode: str = "NONE", q_scale=None,
                           k_scale=None, v_scale=None, window_left: int = -1,
                           logits_soft_cap: Optional[float] = None,
                           sm_scale: Optional[float] = None, rope_scale=None, rope_theta=None):
        """forward() that also returns the natural-log LSE (batch_size, num_qo_heads) float32."""
        return self._forward(q, paged_kv_cache, pos_encoding_mode, q_scale, k_scale, v_scale,
                             window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, True)

    def _forward(self, q, paged_kv_cache, pos_encoding_mode, q_scale, k_scale, v_scale,
                 window_left, logits_soft_cap, sm_scale, rope_scale, rope_theta, return_lse):
        _check_pos_encoding(pos_encoding_mode, rope_scale, rope_theta)
        if self._plan is None:
            raise RuntimeError("BatchDecodeWithPagedKVCacheWrapper.plan() must be called before "
                               "forward()")
        plan = self._plan
        saved = (plan["softcap"], plan["sm_scale"])
        if logits_soft_cap is not None:
            plan["softcap"] = as_float(logits_soft_cap, "logits_soft_cap")
        if sm_scale is not None:
            plan["sm_scale"] = as_float(sm_scale, "sm_scale")
        try:
            return self.run(q, paged_kv_cache, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale,
                            window_left=window_left, return_lse=return_lse)
        finally:
            plan["softcap"], plan["sm_scale"] = saved
