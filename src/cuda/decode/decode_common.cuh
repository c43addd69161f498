// Device helpers shared by the decode kernels: a batch entry resolved from the index tensors
// (clamped, see DecodeParams) and element conversion.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/decode/decode_params.h"

namespace fastattn::cuda_decode {

/// Batch entry b in slot space: the cache row's slots [pad, end) are its keys (key position =
/// slot - pad), new tokens go to slots [seqlen, seqlen + Snew) clipped to the capacity.
struct DecodeSeq {
  bool valid;     ///< cache row in range (else: no append, no keys)
  int row;        ///< cache row / page-table row
  int seqlen;     ///< tokens already cached (clamped to the capacity)
  int pad;        ///< first valid slot
  int end;        ///< one past the last attended slot
  int capacity;   ///< slots the row can hold
  const std::int32_t* pages;  ///< paged: the row's page ids
};

/// Varlen decode: the sequence that owns query row `r` (< B = p.batch), or -1 for a row that no
/// sequence owns (padding past cu_seqlens_q[B]). One query per sequence (cu_seqlens_q[r] == r,
/// cu_seqlens_q[r + 1] == r + 1) costs two loads; otherwise a binary search for the last s in
/// [0, B] with cu_seqlens_q[s] <= r (any contents give an s in range: nothing is indexed past
/// the tensor).
__device__ __forceinline__ int varlen_decode_owner(const DecodeParams& p, int r) {
  const std::int32_t* cu = p.cu_seqlens_q;
  if (cu[r] == r && cu[r + 1] == r + 1) return r;
  if (cu[0] > r) return -1;
  int lo = 0, hi = p.batch;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (cu[mid] <= r) lo = mid;
    else hi = mid - 1;
  }
  return lo < p.batch && cu[lo + 1] > r ? lo : -1;
}

__device__ __forceinline__ DecodeSeq resolve_decode_seq(const DecodeParams& p, int b) {
  DecodeSeq s{false, 0, 0, 0, 0, 0, nullptr};
  int seq = b;  // the sequence whose lengths and page row entry b uses
  if (p.cu_seqlens_q) {
    seq = varlen_decode_owner(p, b);
    if (seq < 0) return s;
  }
  const int row = p.cache_batch_idx ? p.cache_batch_idx[seq] : seq;
  if (row < 0 || row >= p.cache_rows) return s;
  s.valid = true;
  s.row = row;
  std::int64_t count = 0;  // pages of the row (paged)
  if (p.page_size > 0) {
    if (p.block_table) {
      s.pages = p.block_table + std::int64_t(row) * p.block_table_stride;
      count = p.max_pages_per_seq;
    } else {
      const std::int64_t i0 = min(max(std::int64_t(p.page_indptr[row]), std::int64_t(0)), p.num_page_indices);
      const std::int64_t i1 = min(max(std::int64_t(p.page_indptr[row + 1]), i0), p.num_page_indices);
      s.pages = p.page_indices + i0;
      count = i1 - i0;
    }
    s.capacity = int(min(count * p.page_size, std::int64_t(INT32_MAX)));
  } else {
    s.capacity = p.cache_len;
  }
  std::int64_t seqlen = p.cache_seqlen;
  if (p.cache_seqlens) {
    seqlen = p.cache_seqlens[seq];
  } else if (p.cu_seqlens_k) {
    seqlen = std::int64_t(p.cu_seqlens_k[seq + 1]) - p.cu_seqlens_k[seq];
  } else if (p.last_page_len) {
    seqlen = count > 0 ? (count - 1) * p.page_size + p.last_page_len[seq] : 0;
  }
  s.seqlen = int(min(max(seqlen, std::int64_t(0)), std::int64_t(s.capacity)));
  s.pad = p.cache_leftpad ? min(max(p.cache_leftpad[seq], 0), s.seqlen) : 0;
  s.end = int(min(std::int64_t(s.seqlen) + p.seqlen_new, std::int64_t(s.capacity)));
  return s;
}

/// What one attention CTA of the per-head kernels computes: split `split` of the `splits` of
/// batch entry b, for the (KV head x row block) `head_block`, its partial state (when splits > 1)
/// at row `state_row` of the partial states. `valid` is false only for a split plan's entry out
/// of range: the CTA then does nothing.
struct DecodeWork {
  int b, split, splits, state_row, head_block;
  bool valid;
};

/// The CTA's work. Uniform splits: grid (num_splits, heads_kv x row blocks, batch), state row
/// split x batch + b. A split plan (DecodeParams::split_plan): grid (heads_kv x row blocks,
/// plan_items), work item blockIdx.y, state row split_indptr[b] + split. The plan's entries are
/// checked here (a work item's b and split, the sequence's count and rows), not on the host.
__device__ __forceinline__ DecodeWork resolve_decode_work(const DecodeParams& p) {
  if (!p.split_plan)
    return {int(blockIdx.z), int(blockIdx.x), p.num_splits, int(blockIdx.x) * p.batch + int(blockIdx.z),
            int(blockIdx.y), true};
  const int item = p.split_plan[p.batch + 1 + blockIdx.y];
  DecodeWork w{item % kSplitPlanSplitUnit, item / kSplitPlanSplitUnit, 0, 0, int(blockIdx.x), false};
  if (item < 0 || w.b >= p.batch) return w;
  const int first = p.split_plan[w.b];
  w.splits = p.split_plan[w.b + 1] - first;
  w.state_row = first + w.split;
  w.valid = first >= 0 && w.splits >= 1 && w.splits <= kMaxSplits && w.split < w.splits &&
            first <= p.plan_items - w.splits;
  return w;
}

/// Paged caches: the index of slot `slot`'s page in its sequence's page list, and the slot's place
/// in that page (a shift and a mask for power-of-two page sizes, page_shift >= 0; else a division).
__device__ __forceinline__ int page_index_of(int page_size, int page_shift, int slot) {
  return page_shift >= 0 ? slot >> page_shift : slot / page_size;
}
__device__ __forceinline__ int slot_in_page(int page_size, int page_shift, int slot) {
  return page_shift >= 0 ? slot & (page_size - 1) : slot % page_size;
}
__device__ __forceinline__ int page_index_of(const DecodeParams& p, int slot) {
  return page_index_of(p.page_size, p.page_shift, slot);
}
__device__ __forceinline__ int slot_in_page(const DecodeParams& p, int slot) {
  return slot_in_page(p.page_size, p.page_shift, slot);
}

/// Element offset of slot `slot` (< capacity) of the sequence's cache row, kv head 0, or -1
/// when its page id is outside the cache.
__device__ __forceinline__ std::int64_t slot_offset(const DecodeParams& p, const DecodeSeq& s, int slot,
                                                    std::int64_t batch_stride, std::int64_t row_stride) {
  if (p.page_size == 0) return std::int64_t(s.row) * batch_stride + std::int64_t(slot) * row_stride;
  const int in_page = slot_in_page(p, slot);
  const int page = s.pages[page_index_of(p, slot)];
  if (page < 0 || page >= p.num_pages) return -1;
  return std::int64_t(page) * batch_stride + std::int64_t(in_page) * row_stride;
}

/// Programmatic dependent launch (sm_90): a kernel launched with the programmatic-serialization
/// attribute may start while its predecessor on the stream still runs; griddepcontrol.wait then
/// blocks until the predecessor has finished and its writes are visible, and launch_dependents
/// lets the successor start launching early. Both are no-ops for a plain launch and before sm_90.
__device__ __forceinline__ void pdl_wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_let_next_kernel_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/// Four consecutive 16-bit outputs from two packed pairs: one 8-byte store where dst is 8-byte
/// aligned (out starting on 8 bytes, with strides of multiples of 4 elements), else four 2-byte
/// stores.
template <class T2, class T>
__device__ __forceinline__ void store4_packed(T* dst, T2 lo, T2 hi) {
  if ((reinterpret_cast<std::uintptr_t>(dst) & 7) == 0) {
    uint2 bits;
    bits.x = *reinterpret_cast<const std::uint32_t*>(&lo);
    bits.y = *reinterpret_cast<const std::uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(dst) = bits;
  } else {
    dst[0] = lo.x, dst[1] = lo.y, dst[2] = hi.x, dst[3] = hi.y;
  }
}

template <Dtype kDtype>
struct Elem;
template <>
struct Elem<Dtype::kFloat16> {
  using T = __half;
  static __device__ __forceinline__ float load(const void* base, std::int64_t i) {
    return __half2float(static_cast<const __half*>(base)[i]);
  }
  static __device__ __forceinline__ void store(void* base, std::int64_t i, float x) {
    static_cast<__half*>(base)[i] = __float2half_rn(x);
  }
  static __device__ __forceinline__ void store4(__half* dst, float4 v) {
    store4_packed(dst, __floats2half2_rn(v.x, v.y), __floats2half2_rn(v.z, v.w));
  }
};
template <>
struct Elem<Dtype::kBFloat16> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ float load(const void* base, std::int64_t i) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  }
  static __device__ __forceinline__ void store(void* base, std::int64_t i, float x) {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ void store4(__nv_bfloat16* dst, float4 v) {
    store4_packed(dst, __floats2bfloat162_rn(v.x, v.y), __floats2bfloat162_rn(v.z, v.w));
  }
};

}  // namespace fastattn::cuda_decode
