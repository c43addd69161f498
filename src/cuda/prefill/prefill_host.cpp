// Lowering of the public prefill args (batched and varlen, packed or paged keys) to the CUDA
// kernel's PrefillParams, with the checks only the CUDA path needs (dtype, 16-byte alignment).
// Index-tensor contents stay on the device: lengths and page ids are read by the kernel, which
// treats page ids outside the cache as zero keys rather than reading out of bounds.
#include <cuda_runtime_api.h>

#include <string>

#include "cuda/common/cuda_check.h"
#include "cuda/common/host_checks.h"
#include "cuda/cuda_backend.h"
#include "cuda/prefill/prefill_params.h"

namespace fastattn::cuda_prefill {
namespace {

using cuda_detail::as_int;
using cuda_detail::DeviceGuard;
using cuda_detail::require_device;
using cuda_detail::rows_aligned;
using cuda_detail::set_options;
using cuda_detail::set_sinks;

Dtype kernel_dtype(const check::ArgChecker& c, DType dt) { return cuda_detail::kernel_dtype<Dtype>(c, dt); }

}  // namespace

void attention_forward(check::ArgChecker& c, const AttentionArgs& a, const core::AttentionDims& d) {
  require_device(c);
  PrefillParams p;
  p.dtype = kernel_dtype(c, a.q.dtype);
  for (auto [t, n] : {std::pair{&a.q, "q"}, {&a.k, "k"}, {&a.v, "v"}, {&a.out, "out"}})
    rows_aligned(c, *t, n);
  p.batch = as_int(c, d.batch, "q batch (dim 0)", 65535);
  p.heads_q = as_int(c, d.heads_q, "q heads (dim 2)", 65535);
  p.heads_kv = static_cast<int>(d.heads_kv);
  p.head_dim = static_cast<int>(d.head_dim);
  p.max_seqlen_q = as_int(c, d.seqlen_q, "q seqlen (dim 1)", INT32_MAX);
  p.seqlen_k = as_int(c, d.seqlen_k, "k seqlen (dim 1)", INT32_MAX);
  p.q = a.q.data;
  p.q_batch_stride = a.q.stride(0);
  p.q_row_stride = a.q.stride(1);
  p.q_head_stride = a.q.stride(2);
  p.out = a.out.data;
  p.out_batch_stride = a.out.stride(0);
  p.out_row_stride = a.out.stride(1);
  p.out_head_stride = a.out.stride(2);
  p.k = a.k.data;
  p.k_batch_stride = a.k.stride(0);
  p.k_row_stride = a.k.stride(1);
  p.k_head_stride = a.k.stride(2);
  p.v = a.v.data;
  p.v_batch_stride = a.v.stride(0);
  p.v_row_stride = a.v.stride(1);
  p.v_head_stride = a.v.stride(2);
  if (a.lse) {
    p.lse = static_cast<float*>(a.lse->data);
    p.lse_batch_stride = a.lse->stride(0);
    p.lse_head_stride = a.lse->stride(1);
    p.lse_row_stride = a.lse->stride(2);
  }
  if (a.probs) {
    p.probs = static_cast<float*>(a.probs->data);
    p.probs_cols = d.seqlen_k;
  }
  set_sinks(p, a.sinks);
  set_options(p, core::validate_options(c, a.options, d.batch, d.heads_q, d.head_dim));
  DeviceGuard guard(c.device().index);
  run_prefill(p, a.exec.cuda_stream);
}

void varlen_attention_forward(check::ArgChecker& c, const VarlenAttentionArgs& a,
                              const core::VarlenDims& d) {
  // One query per sequence over a paged cache: the split-KV decode kernels (varlen_decode_host.cpp).
  if (cuda_decode::try_varlen_decode(c, a, d)) return;
  require_device(c);
  PrefillParams p;
  p.dtype = kernel_dtype(c, a.q.dtype);
  rows_aligned(c, a.q, "q");
  rows_aligned(c, a.out, "out");
  p.batch = as_int(c, d.a.batch, "cu_seqlens_q entries - 1", 65535);
  p.heads_q = as_int(c, d.a.heads_q, "q heads (dim 1)", 65535);
  p.heads_kv = static_cast<int>(d.a.heads_kv);
  p.head_dim = static_cast<int>(d.a.head_dim);
  p.max_seqlen_q = as_int(c, a.max_seqlen_q, "max_seqlen_q", INT32_MAX);
  p.total_q = d.total_q;
  p.cu_seqlens_q = static_cast<const std::int32_t*>(a.cu_seqlens_q.data);
  p.q = a.q.data;
  p.q_row_stride = a.q.stride(0);
  p.q_head_stride = a.q.stride(1);
  p.out = a.out.data;
  p.out_row_stride = a.out.stride(0);
  p.out_head_stride = a.out.stride(1);
  if (a.paged) {
    const PagedKV& pk = *a.paged;
    rows_aligned(c, pk.k_pages, "k_pages");
    rows_aligned(c, pk.v_pages, "v_pages");
    p.k = pk.k_pages.data;
    p.v = pk.v_pages.data;
    p.k_page_stride = pk.k_pages.stride(0);
    p.v_page_stride = pk.v_pages.stride(0);
    p.k_row_stride = pk.k_pages.stride(1);
    p.v_row_stride = pk.v_pages.stride(1);
    p.k_head_stride = pk.k_pages.stride(2);
    p.v_head_stride = pk.v_pages.stride(2);
    p.page_size = as_int(c, d.paged.page_size, "page_size", INT32_MAX);
    p.page_shift = cuda_detail::page_shift_of(p.page_size);
    p.num_pages = as_int(c, d.paged.num_pages, "num_pages", INT32_MAX);
    if (pk.last_page_len) p.last_page_len = static_cast<const std::int32_t*>(pk.last_page_len->data);
    p.max_pages_per_seq = static_cast<int>(d.paged.max_pages_per_seq);
    if (pk.block_table) {
      p.block_table = static_cast<const std::int32_t*>(pk.block_table->data);
      p.block_table_stride = pk.block_table->stride(0);
    } else {
      p.page_indptr = static_cast<const std::int32_t*>(pk.page_indptr->data);
      p.page_indices = static_cast<const std::int32_t*>(pk.page_indices->data);
      p.num_page_indices = pk.page_indices->size(0);
    }
  } else {
    rows_aligned(c, *a.k, "k");
    rows_aligned(c, *a.v, "v");
    p.k = a.k->data;
    p.v = a.v->data;
    p.total_k = d.total_k;
    p.k_row_stride = a.k->stride(0);
    p.k_head_stride = a.k->stride(1);
    p.v_row_stride = a.v->stride(0);
    p.v_head_stride = a.v->stride(1);
  }
  p.cu_seqlens_k = a.cu_seqlens_k ? static_cast<const std::int32_t*>(a.cu_seqlens_k->data) : nullptr;
  p.seqused_k = a.seqused_k ? static_cast<const std::int32_t*>(a.seqused_k->data) : nullptr;
  if (a.lse) {
    p.lse = static_cast<float*>(a.lse->data);
    p.lse_head_stride = a.lse->stride(0);
    p.lse_row_stride = a.lse->stride(1);
  }
  if (a.probs) {
    p.probs = static_cast<float*>(a.probs->data);
    p.probs_cols = a.max_seqlen_k;
  }
  set_sinks(p, a.sinks);
  set_options(p, core::validate_options(c, a.options, d.a.batch, d.a.heads_q, d.a.head_dim));
  DeviceGuard guard(c.device().index);
  run_prefill(p, a.exec.cuda_stream);
}

}  // namespace fastattn::cuda_prefill
