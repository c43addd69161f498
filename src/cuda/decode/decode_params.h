// Parameters of the CUDA KV-cache (decode) kernels: plain C++, filled on the host from
// KVCacheArgs and passed by value. Index-tensor contents (cache_seqlens, cache_batch_idx,
// cache_leftpad, page ids) stay on the device; the kernels clamp them (see DecodeParams) so a
// launch needs no host synchronisation and inconsistent indices never address outside a tensor.
#pragma once

#include <cstdint>

#include "cuda/prefill/prefill_params.h"  // Dtype

namespace fastattn::cuda_decode {

using cuda_prefill::Dtype;

/// Device-side clamping of index contents: a cache row (cache_batch_idx[b], or b) outside
/// [0, cache_rows) makes sequence b empty (no append, no keys: output 0, LSE -inf); seqlens < 0
/// read as 0; leftpad is clamped to [0, seqlen]; appended slots past the row's capacity
/// (S_cache, or its pages * page_size) are not written and not attended; page ids outside
/// [0, num_pages) are neither written nor read (their keys read as zeros); rotary positions are
/// clamped to the cos/sin table.
struct DecodeParams {
  Dtype dtype = Dtype::kFloat16;
  int batch = 0, heads_q = 0, heads_kv = 0, group = 1;  ///< group = heads_q / heads_kv
  int head_dim = 0;
  int seqlen_q = 0;    ///< query rows per sequence (1..16 for decode; any value works)
  int seqlen_new = 0;  ///< appended tokens per sequence

  // q, or its rotated copy, (B, Sq, Hq, D); out likewise; lse (B, Hq, Sq). Element strides.
  const void* q = nullptr;
  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  void* out = nullptr;
  std::int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  float* lse = nullptr;
  std::int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 0;

  // The caches. Contiguous: slot s of cache row r at r * batch_stride + s * row_stride; paged:
  // page = pages_r[s / page_size] at page * batch_stride + (s % page_size) * row_stride. Plus
  // kv_head * head_stride.
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  std::int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  std::int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int cache_rows = 0;  ///< contiguous: B_cache; paged: rows of block_table / page_indptr entries - 1
  int cache_len = 0;   ///< contiguous: slots per row
  int page_size = 0;   ///< 0: contiguous cache
  int page_shift = -1;
  int num_pages = 0;
  const std::int32_t* block_table = nullptr;
  std::int64_t block_table_stride = 0;
  int max_pages_per_seq = 0;
  const std::int32_t* page_indptr = nullptr;
  const std::int32_t* page_indices = nullptr;
  std::int64_t num_page_indices = 0;

  const std::int32_t* cache_seqlens = nullptr;  ///< (B); else cache_seqlen for every b
  int cache_seqlen = 0;
  const std::int32_t* cache_batch_idx = nullptr;
  const std::int32_t* cache_leftpad = nullptr;

  // New keys / values (B, Snew, Hkv, D).
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  std::int64_t knew_batch_stride = 0, knew_row_stride = 0, knew_head_stride = 0;
  std::int64_t vnew_batch_stride = 0, vnew_row_stride = 0, vnew_head_stride = 0;

  // Rotary (rotary_dim 0: off). cos/sin (rotary_len, rotary_dim / 2), q's dtype or float32.
  const void* rotary_cos = nullptr;
  const void* rotary_sin = nullptr;
  bool rotary_f32 = false;
  bool rotary_interleaved = true;
  bool rotate_q_per_row = false;  ///< causal / windowed: q row i at position pos0 + i
  int rotary_dim = 0, rotary_len = 0;
  std::int64_t cos_row_stride = 0, sin_row_stride = 0;
  void* q_rot = nullptr;  ///< workspace: rotated q, contiguous (B, Sq, Hq, D)

  float scale = 1.0f, softcap = 0.0f;
  int window_left = -1, window_right = -1;  ///< effective (causal folded in)
  const float* alibi = nullptr;
  std::int64_t alibi_batch_stride = 0;

  // Split-KV: num_splits > 1 writes per-split states to the workspace, then a combine kernel
  // merges them. partial_o (num_splits, B, Hq, Sq, D) normalised outputs, partial_lse
  // (num_splits, B, Hq, Sq) natural-log LSE.
  int num_splits = 1;
  /// The GPU has programmatic dependent launch (sm_90): the attention kernel after an append and
  /// the combine kernel start launching while their predecessor finishes.
  bool dependent_launch = false;
  bool after_append = false;  ///< set by run_decode: an append / rotary kernel precedes attention
  float* partial_o = nullptr;
  float* partial_lse = nullptr;
};

/// Appends (rotating k), rotates q into q_rot, attends with split-KV and combines, on `stream`.
void run_decode(const DecodeParams& p, void* stream);

/// Key tile of the decode kernel (keys per cp.async stage); the split heuristic counts in it.
constexpr int kDecodeBlockN = 64;

}  // namespace fastattn::cuda_decode
