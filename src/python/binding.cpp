// fastattn._C: the Python binding. It only turns array objects (anything nanobind imports through
// DLPack or the buffer protocol: numpy, torch, cupy, jax) into fastattn::TensorView, calls the
// C++ op with the GIL released, and maps fastattn errors to Python exceptions:
//   TypeError -> TypeError, ValueError / DeviceError -> ValueError,
//   NotSupportedError -> NotImplementedError, any other fastattn::Error -> RuntimeError.
// There is no attention logic here: shapes, dtypes and values are validated by the C++ ops (the
// decode wrapper's run(), decode_runner.cpp, by fastattn::paged_decode_call_args).
// Output allocation and the flash_attn / FlashInfer calling conventions live in python/fastattn.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "arrays.h"
#include "fastattn/fastattn.h"
#include "framework_outputs.h"

namespace nb = nanobind;
using fastattn::TensorView;

namespace fastattn_binding {
void bind_decode_runner(nb::module_& m);  // decode_runner.cpp: _C.PagedDecodeRunner
void bind_single_decode(nb::module_& m);  // single_decode.cpp: _C.single_decode_forward
}  // namespace fastattn_binding

namespace {

using namespace fastattn_binding;

fastattn::AttentionOptions make_options(std::optional<float> softmax_scale, bool causal,
                                        std::int64_t window_left, std::int64_t window_right,
                                        float softcap, nb::handle alibi_slopes, Keep& keep) {
  fastattn::AttentionOptions o;
  o.softmax_scale = softmax_scale;
  o.causal = causal;
  o.window_left = window_left;
  o.window_right = window_right;
  o.softcap = softcap;
  o.alibi_slopes = opt_in(alibi_slopes, "alibi_slopes", keep);
  return o;
}

std::optional<fastattn::PagedKV> make_paged(nb::handle k_pages, nb::handle v_pages,
                                            nb::handle block_table, nb::handle page_indptr,
                                            nb::handle page_indices, nb::handle last_page_len,
                                            const char* k_name, const char* v_name, Keep& keep) {
  if (k_pages.is_none() && v_pages.is_none()) return std::nullopt;
  fastattn::PagedKV p;
  p.k_pages = in_view(k_pages, k_name, keep);
  p.v_pages = in_view(v_pages, v_name, keep);
  p.block_table = opt_in(block_table, "block_table", keep);
  p.page_indptr = opt_in(page_indptr, "page_indptr", keep);
  p.page_indices = opt_in(page_indices, "page_indices", keep);
  p.last_page_len = opt_in(last_page_len, "last_page_len", keep);
  return p;
}

// ---- ops ------------------------------------------------------------------------------------

/// fastattn::attention_forward over the arrays given. out: None to have q's framework allocate it
/// (q's shape and dtype) through its exchange table; lse likewise where return_lse (B, Hq, Sq)
/// float32, else as given. stream_from_q: the stream from q's exchange table instead of
/// cuda_stream. Returns out, or (out, lse) with return_lse: from torch 2.10 flash_attn_func is this
/// one call, with no Python allocation or stream query (bench/NOTES.md, session 98).
nb::object attention_forward(nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse,
                             nb::handle probs, nb::handle sinks, std::optional<float> softmax_scale,
                             bool causal, std::int64_t window_left, std::int64_t window_right,
                             float softcap, nb::handle alibi_slopes, std::uintptr_t cuda_stream,
                             int num_threads, bool return_lse, bool stream_from_q) {
  Keep keep;
  fastattn::AttentionArgs a;
  a.q = in_view(q, "q", keep);
  a.k = in_view(k, "k", keep);
  a.v = in_view(v, "v", keep);
  if (!out.is_none()) a.out = out_view(out, "out", keep);
  a.lse = opt_out(lse, "softmax_lse", keep);
  a.probs = opt_out(probs, "attn_probs", keep);
  a.sinks = opt_in(sinks, "sinks", keep);
  a.options = make_options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                           keep);
  a.exec = make_exec(cuda_stream, num_threads);
  const std::array<std::int64_t, 3> lse_shape = batched_lse_shape(a.q);
  nb::object result = allocate_attention_outputs(q, a.q, out, lse, return_lse, lse_shape.data(), 3, a.out, a.lse);
  if (stream_from_q) a.exec.cuda_stream = reinterpret_cast<void*>(current_stream_of(q, a.q));
  {
    nb::gil_scoped_release release;
    fastattn::attention_forward(a);
  }
  return result;
}

fastattn::VarlenAttentionArgs make_varlen_args(
    nb::handle q, nb::handle cu_seqlens_q, std::int64_t max_seqlen_q, nb::handle k, nb::handle v,
    nb::handle cu_seqlens_k, nb::handle k_pages, nb::handle v_pages, nb::handle block_table,
    nb::handle page_indptr, nb::handle page_indices, nb::handle last_page_len,
    nb::handle seqused_k, std::int64_t max_seqlen_k, nb::handle out, nb::handle lse,
    nb::handle probs, nb::handle sinks, std::optional<float> softmax_scale, bool causal,
    std::int64_t window_left, std::int64_t window_right, float softcap, nb::handle alibi_slopes,
    std::uintptr_t cuda_stream, int num_threads, Keep& keep) {
  fastattn::VarlenAttentionArgs a;
  a.q = in_view(q, "q", keep);
  a.cu_seqlens_q = in_view(cu_seqlens_q, "cu_seqlens_q", keep);
  a.max_seqlen_q = max_seqlen_q;
  a.k = opt_in(k, "k", keep);
  a.v = opt_in(v, "v", keep);
  a.cu_seqlens_k = opt_in(cu_seqlens_k, "cu_seqlens_k", keep);
  a.paged = make_paged(k_pages, v_pages, block_table, page_indptr, page_indices, last_page_len,
                       "k", "v", keep);
  a.seqused_k = opt_in(seqused_k, "seqused_k", keep);
  a.max_seqlen_k = max_seqlen_k;
  if (!out.is_none()) a.out = out_view(out, "out", keep);  // None: the caller sets a.out
  a.lse = opt_out(lse, "softmax_lse", keep);
  a.probs = opt_out(probs, "attn_probs", keep);
  a.sinks = opt_in(sinks, "sinks", keep);
  a.options = make_options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                           keep);
  a.exec = make_exec(cuda_stream, num_threads);
  return a;
}

/// fastattn::varlen_attention_forward over the arrays given. out: None to have q's framework
/// allocate it (q's shape and dtype) through its exchange table; lse likewise where return_lse
/// (Hq, total_q) float32, else as given. stream_from_q: the stream from q's exchange table instead
/// of cuda_stream. Returns out, or (out, lse) with return_lse: from torch 2.10
/// flash_attn_varlen_func is this one call, with no Python allocation or stream query
/// (bench/NOTES.md, session 98).
nb::object varlen_attention_forward(nb::handle q, nb::handle cu_seqlens_q, std::int64_t max_seqlen_q,
                                    nb::handle k, nb::handle v, nb::handle cu_seqlens_k,
                                    nb::handle k_pages, nb::handle v_pages, nb::handle block_table,
                                    nb::handle page_indptr, nb::handle page_indices,
                                    nb::handle last_page_len, nb::handle seqused_k,
                                    std::int64_t max_seqlen_k, nb::handle out, nb::handle lse,
                                    nb::handle probs, nb::handle sinks, nb::handle workspace,
                                    std::optional<float> softmax_scale, bool causal,
                                    std::int64_t window_left, std::int64_t window_right, float softcap,
                                    nb::handle alibi_slopes, std::uintptr_t cuda_stream,
                                    int num_threads, nb::handle workspace_alloc, bool workspace_from_q,
                                    bool return_lse, bool stream_from_q) {
  Keep keep;
  fastattn::VarlenAttentionArgs a = make_varlen_args(
      q, cu_seqlens_q, max_seqlen_q, k, v, cu_seqlens_k, k_pages, v_pages, block_table,
      page_indptr, page_indices, last_page_len, seqused_k, max_seqlen_k, out, lse, probs, sinks,
      softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, cuda_stream,
      num_threads, keep);
  // The LSE (Hq, total_q) from q (total_q, Hq, D); a q of another rank gets the op's error.
  const bool q3 = a.q.ndim == 3;
  const std::int64_t lse_shape[2] = {q3 ? a.q.shape[1] : 0, q3 ? a.q.shape[0] : 0};
  nb::object result = allocate_attention_outputs(q, a.q, out, lse, return_lse, lse_shape, 2, a.out, a.lse);
  if (stream_from_q) a.exec.cuda_stream = reinterpret_cast<void*>(current_stream_of(q, a.q));
  // The split-KV scratch of a decode-shaped call on CUDA, asked for by the op when it needs it
  // (OpWorkspace, as in kvcache_attention_forward).
  a.workspace = opt_out(workspace, "workspace", keep);
  OpWorkspace scratch{q, &a.q, workspace_from_q, workspace_alloc, &keep};
  if (!a.workspace) a.workspace_allocator = scratch.allocator();
  {
    nb::gil_scoped_release release;
    fastattn::varlen_attention_forward(a);
  }
  return result;
}

std::size_t varlen_workspace_bytes(nb::handle q, nb::handle cu_seqlens_q, std::int64_t max_seqlen_q,
                                   nb::handle k, nb::handle v, nb::handle cu_seqlens_k,
                                   nb::handle k_pages, nb::handle v_pages, nb::handle block_table,
                                   nb::handle page_indptr, nb::handle page_indices,
                                   nb::handle last_page_len, nb::handle seqused_k,
                                   std::int64_t max_seqlen_k, nb::handle out, nb::handle lse,
                                   nb::handle probs, nb::handle sinks, std::optional<float> softmax_scale,
                                   bool causal, std::int64_t window_left,
                                   std::int64_t window_right, float softcap,
                                   nb::handle alibi_slopes, std::uintptr_t cuda_stream,
                                   int num_threads) {
  Keep keep;
  fastattn::VarlenAttentionArgs a = make_varlen_args(
      q, cu_seqlens_q, max_seqlen_q, k, v, cu_seqlens_k, k_pages, v_pages, block_table,
      page_indptr, page_indices, last_page_len, seqused_k, max_seqlen_k, out, lse, probs, sinks,
      softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, cuda_stream,
      num_threads, keep);
  nb::gil_scoped_release release;
  return fastattn::varlen_workspace_bytes(a);
}

fastattn::KVCacheArgs make_kvcache_args(
    nb::handle q, nb::handle k_cache, nb::handle v_cache, nb::handle k, nb::handle v,
    nb::handle rotary_cos, nb::handle rotary_sin, bool rotary_interleaved,
    nb::handle cache_seqlens, std::int64_t cache_seqlen, nb::handle cache_batch_idx,
    nb::handle cache_leftpad, nb::handle block_table, nb::handle page_indptr,
    nb::handle page_indices, int num_splits, nb::handle split_plan, std::int64_t max_cache_seqlen,
    nb::handle out, nb::handle lse, nb::handle sinks, std::optional<float> softmax_scale, bool causal,
    std::int64_t window_left, std::int64_t window_right, float softcap, nb::handle alibi_slopes,
    std::uintptr_t cuda_stream, int num_threads, Keep& keep) {
  fastattn::KVCacheArgs a;
  a.q = in_view(q, "q", keep);
  // The caches are written in place (when k / v are given), so they must be writable.
  if (k.is_none() && v.is_none()) {
    a.k_cache = in_view(k_cache, "k_cache", keep);
    a.v_cache = in_view(v_cache, "v_cache", keep);
  } else {
    a.k_cache = out_view(k_cache, "k_cache", keep);
    a.v_cache = out_view(v_cache, "v_cache", keep);
  }
  a.k_new = opt_in(k, "k", keep);
  a.v_new = opt_in(v, "v", keep);
  a.rotary_cos = opt_in(rotary_cos, "rotary_cos", keep);
  a.rotary_sin = opt_in(rotary_sin, "rotary_sin", keep);
  a.rotary_interleaved = rotary_interleaved;
  a.cache_seqlens = opt_in(cache_seqlens, "cache_seqlens", keep);
  a.cache_seqlen = cache_seqlen;
  a.cache_batch_idx = opt_in(cache_batch_idx, "cache_batch_idx", keep);
  a.cache_leftpad = opt_in(cache_leftpad, "cache_leftpad", keep);
  a.block_table = opt_in(block_table, "block_table", keep);
  a.page_indptr = opt_in(page_indptr, "page_indptr", keep);
  a.page_indices = opt_in(page_indices, "page_indices", keep);
  a.num_splits = num_splits;
  a.split_plan = opt_in(split_plan, "split_plan", keep);
  a.max_cache_seqlen = max_cache_seqlen;
  if (!out.is_none()) a.out = out_view(out, "out", keep);  // None: the caller sets a.out
  a.lse = opt_out(lse, "softmax_lse", keep);
  a.sinks = opt_in(sinks, "sinks", keep);
  a.options = make_options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                           keep);
  a.exec = make_exec(cuda_stream, num_threads);
  return a;
}

/// fastattn::kvcache_attention_forward over the arrays given. out: None to have q's framework
/// allocate it (q's shape and dtype) through its exchange table; lse likewise where return_lse (B,
/// Hq, seqlen_q) float32, else as given. stream_from_q: the stream from q's exchange table instead
/// of cuda_stream. Returns out, or (out, lse) with return_lse: from torch 2.10 flash_attn_with_kvcache
/// is this one call, with no Python allocation or stream query (bench/NOTES.md, session 97).
nb::object kvcache_attention_forward(nb::handle q, nb::handle k_cache, nb::handle v_cache, nb::handle k,
                                     nb::handle v, nb::handle rotary_cos, nb::handle rotary_sin,
                                     bool rotary_interleaved, nb::handle cache_seqlens,
                                     std::int64_t cache_seqlen, nb::handle cache_batch_idx,
                                     nb::handle cache_leftpad, nb::handle block_table,
                                     nb::handle page_indptr, nb::handle page_indices, int num_splits,
                                     nb::handle split_plan, std::int64_t max_cache_seqlen,
                                     nb::handle out, nb::handle lse, nb::handle sinks, nb::handle workspace,
                                     std::optional<float> softmax_scale, bool causal,
                                     std::int64_t window_left, std::int64_t window_right, float softcap,
                                     nb::handle alibi_slopes, std::uintptr_t cuda_stream,
                                     int num_threads, nb::handle workspace_alloc, bool workspace_from_q,
                                     bool return_lse, bool stream_from_q) {
  Keep keep;
  fastattn::KVCacheArgs a = make_kvcache_args(
      q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved, cache_seqlens,
      cache_seqlen, cache_batch_idx, cache_leftpad, block_table, page_indptr, page_indices,
      num_splits, split_plan, max_cache_seqlen, out, lse, sinks, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, cuda_stream, num_threads, keep);
  const std::array<std::int64_t, 3> lse_shape = batched_lse_shape(a.q);
  nb::object result = allocate_attention_outputs(q, a.q, out, lse, return_lse, lse_shape.data(), 3, a.out, a.lse);
  if (stream_from_q) a.exec.cuda_stream = reinterpret_cast<void*>(current_stream_of(q, a.q));
  // Without a workspace, the op asks for one when the call needs it (OpWorkspace: from q's
  // framework through its DLPack exchange table with workspace_from_q, else by workspace_alloc,
  // e.g. torch.empty on the tensors' device): the arrays are imported and checked once.
  a.workspace = opt_out(workspace, "workspace", keep);
  OpWorkspace scratch{q, &a.q, workspace_from_q, workspace_alloc, &keep};
  if (!a.workspace) a.workspace_allocator = scratch.allocator();
  {
    nb::gil_scoped_release release;
    fastattn::kvcache_attention_forward(a);
  }
  return result;
}

std::size_t kvcache_workspace_bytes(nb::handle q, nb::handle k_cache, nb::handle v_cache,
                                    nb::handle k, nb::handle v, nb::handle rotary_cos,
                                    nb::handle rotary_sin, bool rotary_interleaved,
                                    nb::handle cache_seqlens, std::int64_t cache_seqlen,
                                    nb::handle cache_batch_idx, nb::handle cache_leftpad,
                                    nb::handle block_table, nb::handle page_indptr,
                                    nb::handle page_indices, int num_splits,
                                    nb::handle split_plan, std::int64_t max_cache_seqlen,
                                    nb::handle out, nb::handle lse, nb::handle sinks,
                                    std::optional<float> softmax_scale,
                                    bool causal, std::int64_t window_left,
                                    std::int64_t window_right, float softcap,
                                    nb::handle alibi_slopes, std::uintptr_t cuda_stream,
                                    int num_threads) {
  Keep keep;
  fastattn::KVCacheArgs a = make_kvcache_args(
      q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, rotary_interleaved, cache_seqlens,
      cache_seqlen, cache_batch_idx, cache_leftpad, block_table, page_indptr, page_indices,
      num_splits, split_plan, max_cache_seqlen, out, lse, sinks, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, cuda_stream, num_threads, keep);
  if (out.is_none()) throw fastattn::ValueError("argument 'out' is required, got None");
  nb::gil_scoped_release release;
  return fastattn::kvcache_workspace_bytes(a);
}

void shared_prefix_attention_forward(nb::handle q, nb::handle qo_indptr, nb::handle k_shared,
                                     nb::handle v_shared, nb::handle k_pages, nb::handle v_pages,
                                     nb::handle block_table, nb::handle page_indptr,
                                     nb::handle page_indices, nb::handle last_page_len,
                                     nb::handle out, nb::handle lse,
                                     std::optional<float> softmax_scale, bool causal,
                                     std::int64_t window_left, std::int64_t window_right,
                                     float softcap, nb::handle alibi_slopes,
                                     std::uintptr_t cuda_stream, int num_threads,
                                     std::int64_t max_seqlen_q, std::int64_t max_suffix_len,
                                     int num_splits, int suffix_num_splits, nb::handle workspace,
                                     nb::handle workspace_alloc) {
  Keep keep;
  fastattn::SharedPrefixAttentionArgs a;
  a.q = in_view(q, "q", keep);
  a.qo_indptr = opt_in(qo_indptr, "qo_indptr", keep);
  a.k_shared = in_view(k_shared, "k_shared", keep);
  a.v_shared = in_view(v_shared, "v_shared", keep);
  if (k_pages.is_none() || v_pages.is_none())
    throw fastattn::ValueError("arguments 'k_pages' and 'v_pages' (the suffix pages) are required");
  a.suffix = *make_paged(k_pages, v_pages, block_table, page_indptr, page_indices, last_page_len,
                         "k_pages", "v_pages", keep);
  a.out = out_view(out, "out", keep);
  a.lse = opt_out(lse, "softmax_lse", keep);
  a.options = make_options(softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
                           keep);
  a.exec = make_exec(cuda_stream, num_threads);
  a.max_seqlen_q = max_seqlen_q;
  a.max_suffix_len = max_suffix_len;
  a.num_splits = num_splits;
  a.suffix_num_splits = suffix_num_splits;
  // The workspace: `workspace` when given and large enough (a wrapper's workspace_buffer), else
  // workspace_alloc(nbytes) (the caller's allocator) when the call needs one; else `workspace` as
  // given (the op then reports what it needs).
  // Each array is imported once: a DLPack capsule can be consumed only once.
  a.workspace = opt_out(workspace, "workspace", keep);
  nb::object allocated;  // keeps an allocated workspace alive through the call
  if (!workspace_alloc.is_none()) {
    const std::size_t have =
        a.workspace ? static_cast<std::size_t>(a.workspace->numel()) * fastattn::dtype_size(a.workspace->dtype) : 0;
    const std::size_t nbytes = fastattn::shared_prefix_workspace_bytes(a);
    if (nbytes > have) {
      allocated = workspace_alloc(nbytes);
      a.workspace = out_view(allocated, "workspace", keep);
    }
  }
  nb::gil_scoped_release release;
  fastattn::shared_prefix_attention_forward(a);
}

/// The stream for a merge op whose first array is v: from v's exchange table with stream_from_v, else
/// cuda_stream.
fastattn::ExecConfig merge_exec(nb::handle v, const TensorView& tv, std::uintptr_t cuda_stream, int num_threads,
                                bool stream_from_v) {
  fastattn::ExecConfig exec = make_exec(cuda_stream, num_threads);
  if (stream_from_v) exec.cuda_stream = reinterpret_cast<void*>(current_stream_of(v, tv));
  return exec;
}

/// fastattn::merge_state. v_out / s_out None: allocated through v_a's DLPack exchange table, v_a's
/// shape and dtype and s_a's shape in float32. stream_from_v_a: the stream from that table instead
/// of cuda_stream. Returns (v_out, s_out): from torch 2.10 the public merge_state is this one call
/// (bench/NOTES.md, session 98).
nb::object merge_state(nb::handle v_a, nb::handle s_a, nb::handle v_b, nb::handle s_b, nb::handle v_out,
                       nb::handle s_out, std::uintptr_t cuda_stream, int num_threads, bool stream_from_v_a) {
  Keep keep;
  TensorView va = in_view(v_a, "v_a", keep), sa = in_view(s_a, "s_a", keep);
  TensorView vb = in_view(v_b, "v_b", keep), sb = in_view(s_b, "s_b", keep);
  // Outputs the table allocates are made once the inputs are imported; the op checks their shapes.
  auto [v_array, vo] = given_or_allocated(v_out, "v_out", v_a, va, va.shape.data(), va.ndim, va.dtype, keep);
  auto [s_array, so] =
      given_or_allocated(s_out, "s_out", v_a, va, sa.shape.data(), sa.ndim, fastattn::DType::kFloat32, keep);
  const fastattn::ExecConfig exec = merge_exec(v_a, va, cuda_stream, num_threads, stream_from_v_a);
  {
    nb::gil_scoped_release release;
    fastattn::merge_state(va, sa, vb, sb, vo, so, exec);
  }
  return nb::make_tuple(v_array, s_array);
}

void merge_state_in_place(nb::handle v, nb::handle s, nb::handle v_other, nb::handle s_other,
                          nb::handle mask, std::uintptr_t cuda_stream, int num_threads, bool stream_from_v) {
  Keep keep;
  TensorView tv = out_view(v, "v", keep), ts = out_view(s, "s", keep);
  TensorView vo = in_view(v_other, "v_other", keep), so = in_view(s_other, "s_other", keep);
  std::optional<TensorView> m = opt_in(mask, "mask", keep);
  const fastattn::ExecConfig exec = merge_exec(v, tv, cuda_stream, num_threads, stream_from_v);
  nb::gil_scoped_release release;
  fastattn::merge_state_in_place(tv, ts, vo, so, m, exec);
}

void merge_attention_sinks(nb::handle v, nb::handle s, nb::handle sinks, std::uintptr_t cuda_stream,
                           int num_threads, bool stream_from_v) {
  Keep keep;
  TensorView tv = out_view(v, "v", keep), ts = out_view(s, "s", keep);
  TensorView tk = in_view(sinks, "sinks", keep);
  const fastattn::ExecConfig exec = merge_exec(v, tv, cuda_stream, num_threads, stream_from_v);
  nb::gil_scoped_release release;
  fastattn::merge_attention_sinks(tv, ts, tk, exec);
}

/// fastattn::merge_states. v_out / s_out None: allocated through v's DLPack exchange table, (S, H, D)
/// in v's dtype and (S, H) float32 from v (S, N, H, D). stream_from_v: the stream from that table.
/// Returns (v_out, s_out).
nb::object merge_states(nb::handle v, nb::handle s, nb::handle v_out, nb::handle s_out, std::uintptr_t cuda_stream,
                        int num_threads, bool stream_from_v) {
  Keep keep;
  TensorView tv = in_view(v, "v", keep), ts = in_view(s, "s", keep);
  // (S, H, D) and (S, H) from v (S, N, H, D); a v of another rank gets the op's error.
  const bool v4 = tv.ndim == 4;
  const std::int64_t shape[3] = {v4 ? tv.shape[0] : 0, v4 ? tv.shape[2] : 0, v4 ? tv.shape[3] : 0};
  auto [v_array, vo] = given_or_allocated(v_out, "v_out", v, tv, shape, 3, tv.dtype, keep);
  auto [s_array, so] = given_or_allocated(s_out, "s_out", v, tv, shape, 2, fastattn::DType::kFloat32, keep);
  const fastattn::ExecConfig exec = merge_exec(v, tv, cuda_stream, num_threads, stream_from_v);
  {
    nb::gil_scoped_release release;
    fastattn::merge_states(tv, ts, vo, so, exec);
  }
  return nb::make_tuple(v_array, s_array);
}

void csr_to_block_table(nb::handle page_indptr, nb::handle page_indices, nb::handle block_table,
                        std::uintptr_t cuda_stream, int num_threads) {
  Keep keep;
  TensorView ip = in_view(page_indptr, "page_indptr", keep);
  TensorView ids = in_view(page_indices, "page_indices", keep);
  TensorView table = out_view(block_table, "block_table", keep);
  const fastattn::ExecConfig exec = make_exec(cuda_stream, num_threads);
  nb::gil_scoped_release release;
  fastattn::csr_to_block_table(ip, ids, table, exec);
}

void copy_host_to_device(nb::handle src, nb::handle dst, std::uintptr_t cuda_stream, int num_threads) {
  Keep keep;
  TensorView s = in_view(src, "src", keep);
  TensorView d = out_view(dst, "dst", keep);
  const fastattn::ExecConfig exec = make_exec(cuda_stream, num_threads);
  nb::gil_scoped_release release;
  fastattn::copy_host_to_device(s, d, exec);
}

// ---- decode split plans (host arrays only; include/fastattn/decode_plan.h) --------------------

using HostInt64s = nb::ndarray<const std::int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using HostInt32s = nb::ndarray<const std::int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using HostInt32Out = nb::ndarray<std::int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

/// A rule of the given constants; the rules that never pick a plan's chunk pass tail_weight as the
/// plan's tail weight (DecodeSplitRule's own default relation).
fastattn::DecodeSplitRule make_rule(double cta_cost_keys, double tail_weight, double balanced_ratio,
                                    int max_splits, double min_gain, double plan_tail_weight) {
  fastattn::DecodeSplitRule r;
  r.cta_cost_keys = cta_cost_keys;
  r.tail_weight = tail_weight;
  r.plan_tail_weight = plan_tail_weight;
  r.balanced_ratio = balanced_ratio;
  r.max_splits = max_splits;
  r.min_gain = min_gain;
  return r;
}

/// The C++ functions write through raw pointers: an output of the wrong size is refused here.
void check_size(const char* op, const char* name, std::size_t got, std::int64_t want) {
  if (static_cast<std::int64_t>(got) != want)
    throw fastattn::ValueError(std::string(op) + ": " + name + " must have " + std::to_string(want) +
                               " entries, got " + std::to_string(got));
}

int decode_num_splits_for_lengths(HostInt64s lengths, int num_kv_heads, int sm_count, double cta_cost_keys,
                                  double tail_weight, double balanced_ratio, int max_splits) {
  return fastattn::decode_num_splits_for_lengths(lengths.data(), std::int64_t(lengths.shape(0)), num_kv_heads,
                                                 sm_count, make_rule(cta_cost_keys, tail_weight, balanced_ratio,
                                                                     max_splits, 1.0, tail_weight));
}

bool decode_split_counts_for_lengths(HostInt64s lengths, int num_kv_heads, int sm_count, HostInt32Out counts,
                                     double cta_cost_keys, double tail_weight, double balanced_ratio,
                                     int max_splits, double min_gain, double plan_tail_weight) {
  const auto batch = std::int64_t(lengths.shape(0));
  check_size("decode_split_counts_for_lengths", "counts", counts.shape(0), batch);
  return fastattn::decode_split_counts_for_lengths(
      lengths.data(), batch, num_kv_heads, sm_count, counts.data(),
      make_rule(cta_cost_keys, tail_weight, balanced_ratio, max_splits, min_gain, plan_tail_weight));
}

void decode_graph_split_counts(HostInt64s lengths, int num_kv_heads, int sm_count, std::int64_t max_parts,
                               HostInt32Out counts, double cta_cost_keys, double tail_weight, int max_splits) {
  const auto batch = std::int64_t(lengths.shape(0));
  check_size("decode_graph_split_counts", "counts", counts.shape(0), batch);
  fastattn::DecodeSplitRule rule = make_rule(cta_cost_keys, tail_weight, 1.0, max_splits, 1.0, tail_weight);
  fastattn::decode_graph_split_counts(lengths.data(), batch, num_kv_heads, sm_count, max_parts, counts.data(),
                                      rule);
}

void decode_split_plan(HostInt32s counts, std::optional<HostInt64s> lengths, std::optional<std::int64_t> items,
                       HostInt32Out plan) {
  const auto batch = std::int64_t(counts.shape(0));
  if (lengths) check_size("decode_split_plan", "lengths", lengths->shape(0), batch);
  fastattn::decode_split_plan(counts.data(), batch, lengths ? lengths->data() : nullptr, items, plan.data(),
                              std::int64_t(plan.shape(0)));
}

/// A numpy array that owns `values` (moved into the capsule that frees them).
nb::ndarray<nb::numpy, std::int32_t, nb::ndim<1>> numpy_of(std::vector<std::int32_t>&& values) {
  auto* owned = new std::vector<std::int32_t>(std::move(values));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<std::int32_t>*>(p); });
  return nb::ndarray<nb::numpy, std::int32_t, nb::ndim<1>>(owned->data(), {owned->size()}, owner);
}

/// fastattn::plan_paged_decode -> (arrays, counts or None, num_splits, max_pages).
nb::tuple plan_paged_decode(HostInt64s indptr, HostInt64s last_page_len, std::int64_t num_ids, int page_size,
                            std::int64_t window_left, int num_kv_heads, int sm_count, bool split_kv,
                            bool choose_splits, std::int64_t graph_items, int head_dim,
                            std::int64_t fixed_split_size, int num_qo_heads, int q_len) {
  if (indptr.shape(0) < 1)
    throw fastattn::ValueError("plan_paged_decode: indptr must have batch_size + 1 >= 1 entries, got 0");
  const auto batch = std::int64_t(indptr.shape(0)) - 1;
  check_size("plan_paged_decode", "last_page_len", last_page_len.shape(0), batch);
  fastattn::PagedDecodePlanOptions o;
  o.page_size = page_size;
  o.window_left = window_left;
  o.num_kv_heads = num_kv_heads;
  o.num_qo_heads = num_qo_heads;
  o.q_len = q_len;
  o.sm_count = sm_count;
  o.split_kv = split_kv;
  o.choose_splits = choose_splits;
  o.graph_items = graph_items;
  o.fixed_split_size = fixed_split_size;
  o.rule = fastattn::decode_split_rule_for_head_dim(head_dim);
  fastattn::PagedDecodePlan p =
      fastattn::plan_paged_decode(indptr.data(), last_page_len.data(), batch, num_ids, o);
  nb::object counts = p.counts.empty() && graph_items == 0 ? nb::none() : nb::cast(numpy_of(std::move(p.counts)));
  return nb::make_tuple(numpy_of(std::move(p.arrays)), counts, p.num_splits, p.max_pages);
}

fastattn::Device parse_device(const std::string& device_type, int index) {
  fastattn::Device d;
  if (device_type == "cpu") {
    d.type = fastattn::DeviceType::kCPU;
  } else if (device_type == "cuda") {
    d.type = fastattn::DeviceType::kCUDA;
  } else {
    throw fastattn::ValueError("argument 'device_type': expected 'cpu' or 'cuda', got '" +
                               device_type + "'");
  }
  d.index = index;
  return d;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "fastattn C++ ops (thin binding; use the functions in the fastattn package)";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const fastattn::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const fastattn::NotSupportedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what());
    } catch (const fastattn::ValueError& e) {  // DeviceError derives from ValueError
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const fastattn::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  // Option and execution arguments every attention op takes, in this order.
#define FASTATTN_OPTION_ARGS                                                                    \
  nb::arg("softmax_scale").none() = nb::none(), nb::arg("causal") = false,                      \
  nb::arg("window_left") = -1, nb::arg("window_right") = -1, nb::arg("softcap") = 0.0f,         \
  nb::arg("alibi_slopes").none() = nb::none(), nb::arg("cuda_stream") = 0,                      \
  nb::arg("num_threads") = 0

  m.def("attention_forward", &attention_forward, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("out").none(), nb::arg("lse").none() = nb::none(), nb::arg("probs").none() = nb::none(),
        nb::arg("sinks").none() = nb::none(), FASTATTN_OPTION_ARGS, nb::arg("return_lse") = false,
        nb::arg("stream_from_q") = false,
        "fastattn::attention_forward (dense batched attention); returns out, or (out, lse) with "
        "return_lse. out (and lse) None: allocated by q's framework (DLPack exchange table).");

#define FASTATTN_VARLEN_ARGS                                                                     \
  nb::arg("q"), nb::arg("cu_seqlens_q"), nb::arg("max_seqlen_q"),                               \
      nb::arg("k").none() = nb::none(), nb::arg("v").none() = nb::none(),                       \
      nb::arg("cu_seqlens_k").none() = nb::none(), nb::arg("k_pages").none() = nb::none(),      \
      nb::arg("v_pages").none() = nb::none(), nb::arg("block_table").none() = nb::none(),       \
      nb::arg("page_indptr").none() = nb::none(), nb::arg("page_indices").none() = nb::none(),  \
      nb::arg("last_page_len").none() = nb::none(), nb::arg("seqused_k").none() = nb::none(),  \
      nb::arg("max_seqlen_k") = 0, nb::arg("out").none() = nb::none(),                          \
      nb::arg("lse").none() = nb::none(), nb::arg("probs").none() = nb::none(),                 \
      nb::arg("sinks").none() = nb::none()

  m.def("varlen_attention_forward", &varlen_attention_forward, FASTATTN_VARLEN_ARGS,
        nb::arg("workspace").none() = nb::none(), FASTATTN_OPTION_ARGS,
        nb::arg("workspace_alloc").none() = nb::none(), nb::arg("workspace_from_q") = false,
        nb::arg("return_lse") = false, nb::arg("stream_from_q") = false,
        "fastattn::varlen_attention_forward (packed sequences; packed or paged keys); returns out, or "
        "(out, lse) with return_lse. out (and lse) None: allocated by q's framework (DLPack exchange table).");
  m.def("varlen_workspace_bytes", &varlen_workspace_bytes, FASTATTN_VARLEN_ARGS,
        FASTATTN_OPTION_ARGS, "fastattn::varlen_workspace_bytes for the same arguments.");

#define FASTATTN_KVCACHE_ARGS                                                                    \
  nb::arg("q"), nb::arg("k_cache"), nb::arg("v_cache"), nb::arg("k").none() = nb::none(),       \
      nb::arg("v").none() = nb::none(), nb::arg("rotary_cos").none() = nb::none(),              \
      nb::arg("rotary_sin").none() = nb::none(), nb::arg("rotary_interleaved") = true,          \
      nb::arg("cache_seqlens").none() = nb::none(), nb::arg("cache_seqlen") = 0,                \
      nb::arg("cache_batch_idx").none() = nb::none(),                                           \
      nb::arg("cache_leftpad").none() = nb::none(), nb::arg("block_table").none() = nb::none(), \
      nb::arg("page_indptr").none() = nb::none(), nb::arg("page_indices").none() = nb::none(),  \
      nb::arg("num_splits") = 0, nb::arg("split_plan").none() = nb::none(),                     \
      nb::arg("max_cache_seqlen") = 0, nb::arg("out").none() = nb::none(),                      \
      nb::arg("lse").none() = nb::none(), nb::arg("sinks").none() = nb::none()

  m.def("kvcache_attention_forward", &kvcache_attention_forward, FASTATTN_KVCACHE_ARGS,
        nb::arg("workspace").none() = nb::none(), FASTATTN_OPTION_ARGS,
        nb::arg("workspace_alloc").none() = nb::none(), nb::arg("workspace_from_q") = false,
        nb::arg("return_lse") = false, nb::arg("stream_from_q") = false,
        "fastattn::kvcache_attention_forward (in-place KV append, then attention); returns out, or "
        "(out, lse) with return_lse. out (and lse) None: allocated by q's framework (DLPack exchange table).");
  m.def("kvcache_workspace_bytes", &kvcache_workspace_bytes, FASTATTN_KVCACHE_ARGS,
        FASTATTN_OPTION_ARGS, "fastattn::kvcache_workspace_bytes for the same arguments.");

  m.def("shared_prefix_attention_forward", &shared_prefix_attention_forward, nb::arg("q"),
        nb::arg("qo_indptr").none() = nb::none(), nb::arg("k_shared"), nb::arg("v_shared"),
        nb::arg("k_pages").none() = nb::none(), nb::arg("v_pages").none() = nb::none(),
        nb::arg("block_table").none() = nb::none(), nb::arg("page_indptr").none() = nb::none(),
        nb::arg("page_indices").none() = nb::none(), nb::arg("last_page_len").none() = nb::none(),
        nb::arg("out").none() = nb::none(), nb::arg("lse").none() = nb::none(),
        FASTATTN_OPTION_ARGS, nb::arg("max_seqlen_q") = 0, nb::arg("max_suffix_len") = 0,
        nb::arg("num_splits") = 0, nb::arg("suffix_num_splits") = 0,
        nb::arg("workspace").none() = nb::none(), nb::arg("workspace_alloc").none() = nb::none(),
        "fastattn::shared_prefix_attention_forward (cascade: shared prefix + paged suffix).");

  m.def("merge_state", &merge_state, nb::arg("v_a"), nb::arg("s_a"), nb::arg("v_b"),
        nb::arg("s_b"), nb::arg("v_out").none() = nb::none(), nb::arg("s_out").none() = nb::none(),
        nb::arg("cuda_stream") = 0, nb::arg("num_threads") = 0, nb::arg("stream_from_v_a") = false,
        "fastattn::merge_state (natural-log LSE); returns (v_out, s_out), allocated by v_a's framework "
        "(DLPack exchange table) where None.");
  m.def("merge_state_in_place", &merge_state_in_place, nb::arg("v"), nb::arg("s"),
        nb::arg("v_other"), nb::arg("s_other"), nb::arg("mask").none() = nb::none(),
        nb::arg("cuda_stream") = 0, nb::arg("num_threads") = 0, nb::arg("stream_from_v") = false,
        "fastattn::merge_state_in_place (natural-log LSE).");
  m.def("merge_attention_sinks", &merge_attention_sinks, nb::arg("v"), nb::arg("s"), nb::arg("sinks"),
        nb::arg("cuda_stream") = 0, nb::arg("num_threads") = 0, nb::arg("stream_from_v") = false,
        "fastattn::merge_attention_sinks (natural-log LSE, in place).");
  m.def("merge_states", &merge_states, nb::arg("v"), nb::arg("s"), nb::arg("v_out").none() = nb::none(),
        nb::arg("s_out").none() = nb::none(), nb::arg("cuda_stream") = 0, nb::arg("num_threads") = 0,
        nb::arg("stream_from_v") = false,
        "fastattn::merge_states (natural-log LSE); returns (v_out, s_out), allocated by v's framework "
        "(DLPack exchange table) where None.");

  m.def("csr_to_block_table", &csr_to_block_table, nb::arg("page_indptr"), nb::arg("page_indices"),
        nb::arg("block_table"), nb::arg("cuda_stream") = 0, nb::arg("num_threads") = 0,
        "fastattn::csr_to_block_table (block_table written in place).");

  m.def("copy_host_to_device", &copy_host_to_device, nb::arg("src"), nb::arg("dst"),
        nb::arg("cuda_stream") = 0, nb::arg("num_threads") = 0,
        "fastattn::copy_host_to_device (dst written in place; no wait for the stream).");

  {  // The split rules' defaults and a plan's bounds, so that Python holds no copy of them.
    const fastattn::DecodeSplitRule rule;
    nb::dict k;
    k["cta_cost_keys"] = rule.cta_cost_keys;
    k["tail_weight"] = rule.tail_weight;
    k["plan_tail_weight"] = rule.plan_tail_weight;
    k["balanced_ratio"] = rule.balanced_ratio;
    k["max_splits"] = rule.max_splits;
    k["min_gain"] = rule.min_gain;
    k["split_tolerance"] = fastattn::kSplitTolerance;
    k["max_plan_items"] = fastattn::kMaxPlanItems;
    k["max_plan_splits"] = fastattn::kMaxPlanSplits;
    k["split_unit"] = fastattn::kSplitUnit;
    k["plan_padding"] = fastattn::kPlanPadding;
    k["tile_keys"] = fastattn::kPlanTileKeys;
    k["graph_extra_waves"] = fastattn::kGraphExtraWaves;
    m.attr("decode_plan_constants") = k;
  }
  m.def("decode_num_splits_for_lengths", &decode_num_splits_for_lengths, nb::arg("lengths"),
        nb::arg("num_kv_heads"), nb::arg("sm_count"), nb::arg("cta_cost_keys"), nb::arg("tail_weight"),
        nb::arg("balanced_ratio"), nb::arg("max_splits"), "fastattn::decode_num_splits_for_lengths.");
  m.def("decode_split_counts_for_lengths", &decode_split_counts_for_lengths, nb::arg("lengths"),
        nb::arg("num_kv_heads"), nb::arg("sm_count"), nb::arg("counts"), nb::arg("cta_cost_keys"),
        nb::arg("tail_weight"), nb::arg("balanced_ratio"), nb::arg("max_splits"), nb::arg("min_gain"),
        nb::arg("plan_tail_weight"),
        "fastattn::decode_split_counts_for_lengths (counts written; False: one count serves).");
  m.def("decode_graph_split_counts", &decode_graph_split_counts, nb::arg("lengths"),
        nb::arg("num_kv_heads"), nb::arg("sm_count"), nb::arg("max_parts"), nb::arg("counts"),
        nb::arg("cta_cost_keys"), nb::arg("tail_weight"), nb::arg("max_splits"),
        "fastattn::decode_graph_split_counts (counts written).");
  m.def("decode_graph_plan_items", &fastattn::decode_graph_plan_items, nb::arg("batch"),
        nb::arg("num_kv_heads"), nb::arg("sm_count"), nb::arg("extra_waves"),
        "fastattn::decode_graph_plan_items.");
  m.def("decode_split_plan", &decode_split_plan, nb::arg("counts"), nb::arg("lengths").none(),
        nb::arg("items").none(), nb::arg("plan"), "fastattn::decode_split_plan (plan written).");

  m.def("plan_paged_decode", &plan_paged_decode, nb::arg("indptr"), nb::arg("last_page_len"),
        nb::arg("num_ids"), nb::arg("page_size"), nb::arg("window_left"), nb::arg("num_kv_heads"),
        nb::arg("sm_count"), nb::arg("split_kv"), nb::arg("choose_splits"), nb::arg("graph_items"),
        nb::arg("head_dim"), nb::arg("fixed_split_size") = 0, nb::arg("num_qo_heads") = 0,
        nb::arg("q_len") = 1,
        "fastattn::plan_paged_decode with decode_split_rule_for_head_dim(head_dim) -> (arrays: "
        "lengths then split plan, counts or None, num_splits, max_pages).");
  m.def(
      "decode_plan_tail_weight",
      [](int head_dim) { return fastattn::decode_split_rule_for_head_dim(head_dim).plan_tail_weight; },
      nb::arg("head_dim"), "decode_split_rule_for_head_dim(head_dim).plan_tail_weight.");

  fastattn_binding::bind_decode_runner(m);
  fastattn_binding::bind_single_decode(m);

  m.def("version", []() { return std::string(fastattn::version()); },
        "Library version, 'MAJOR.MINOR.PATCH'.");
  m.def(
      "backend_available",
      [](const std::string& type, int index) { return fastattn::backend_available(parse_device(type, index)); },
      nb::arg("device_type"), nb::arg("index") = 0,
      "True when the attention ops run on the device ('cpu' or 'cuda') in this build.");
  m.def(
      "device_code_available",
      [](const std::string& type, int index) {
        return fastattn::device_code_available(parse_device(type, index));
      },
      nb::arg("device_type"), nb::arg("index") = 0,
      "True when this build carries device code (CUDA backend compiled for its architecture).");

#undef FASTATTN_OPTION_ARGS
#undef FASTATTN_KVCACHE_ARGS
}
