// Parameters of the CUDA merge kernels (merge_state, merge_state_in_place, merge_states): plain
// C++, filled on the host by merge_host.cpp and passed to the kernels by value. Strides count
// elements and are 64-bit; only the last (head_dim) dimension of a value tensor is contiguous.
#pragma once

#include <cstdint>

#include "fastattn/tensor.h"  // DType

namespace fastattn::cuda_cascade {

/// How the head_dim values of one (row, head) are spread over threads. Every thread owns
/// 16-byte chunks (chunk_elems = 8 fp16/bf16 or 4 fp32 values) of one (row, head); the `group`
/// lanes of a (row, head) are consecutive lanes of one warp (group is a power of two <= 32), and
/// each lane handles chunks lane, lane + group, ... (`iters` of them) when a row has more than 32.
struct MergeLayout {
  std::int64_t rows = 0;  ///< S
  int heads = 0;          ///< H
  int head_dim = 0;       ///< D (any value >= 0)
  int chunk_elems = 8;    ///< values per 16-byte chunk of the dtype
  int chunks = 0;         ///< ceil(D / chunk_elems)
  int group = 1;          ///< lanes per (row, head): the power of two >= min(ceil(chunks / 4), 32)
  int group_shift = 0;    ///< log2(group)
  int iters = 0;          ///< ceil(chunks / group): chunks per lane
  /// Every chunk is a whole, 16-byte aligned vector (D % chunk_elems == 0, data pointers 16-byte
  /// aligned, row / head / state strides multiples of chunk_elems): one 16-byte load or store
  /// per chunk. Otherwise each chunk is moved one element at a time (same thread layout).
  bool vec = false;
  /// merge_states only, with vec: one chunk per lane (group >= chunks) and kDeepStatesAhead states
  /// loaded at a time, for grids under one wave, where each lane's chain of round trips over the
  /// states is the time (merge_host.cpp).
  bool deep = false;
};

/// merge_state / merge_state_in_place: (v_out, s_out) = merge((v_a, s_a), (v_b, s_b)) for the
/// rows whose mask byte is non-zero (all rows without a mask). v_*: (S, H, D), s_*: (S, H)
/// float32. Outputs may alias inputs element for element. v_b null: state b's values are zero
/// (merge_attention_sinks: one extra logit per head with a zero value row).
struct MergeStateParams {
  DType dtype = DType::kFloat16;
  MergeLayout layout;
  const void* v_a = nullptr;
  std::int64_t v_a_row = 0, v_a_head = 0;
  const void* v_b = nullptr;
  std::int64_t v_b_row = 0, v_b_head = 0;
  void* v_out = nullptr;
  std::int64_t v_out_row = 0, v_out_head = 0;
  const float* s_a = nullptr;
  std::int64_t s_a_row = 0, s_a_head = 0;
  const float* s_b = nullptr;
  std::int64_t s_b_row = 0, s_b_head = 0;
  float* s_out = nullptr;
  std::int64_t s_out_row = 0, s_out_head = 0;
  const std::uint8_t* mask = nullptr;  ///< (S) bool / uint8 bytes, or null (every row merged)
  std::int64_t mask_stride = 0;
};

/// merge_states: v (S, N, H, D), s (S, N, H) float32 -> v_out (S, H, D), s_out (S, H).
struct MergeStatesParams {
  DType dtype = DType::kFloat16;
  MergeLayout layout;
  int num_states = 0;  ///< N
  const void* v = nullptr;
  std::int64_t v_row = 0, v_state = 0, v_head = 0;
  const float* s = nullptr;
  std::int64_t s_row = 0, s_state = 0, s_head = 0;
  void* v_out = nullptr;
  std::int64_t v_out_row = 0, v_out_head = 0;
  float* s_out = nullptr;
  std::int64_t s_out_row = 0, s_out_head = 0;
};

/// Threads per CTA of both kernels (no shared memory; 4 warps).
constexpr int kMergeThreads = 128;

/// Launch on `stream` (a cudaStream_t; null = the legacy default stream). Nothing is launched
/// when S * H == 0. Defined in merge_kernels.cu.
void run_merge_state(const MergeStateParams& p, void* stream);
void run_merge_states(const MergeStatesParams& p, void* stream);

}  // namespace fastattn::cuda_cascade
