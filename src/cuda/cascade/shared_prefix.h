// Shared-prefix (cascade) attention on CUDA: the small preparation kernel the host planner
// (shared_prefix_host.cpp) launches before the two attention passes. Plain C++ (no CUDA types).
//
// The planner never reads index tensors on the host, so whatever depends on their contents is
// computed here, on the device, into the caller's workspace:
//   suffix_len[b]  = request b's suffix keys, (pages_b - 1) * page_size + last_page_len[b] (0 with
//                    no page), clamped as the prefill kernel's resolve_sequence clamps it: the
//                    decode suffix pass reads it as cache_seqlens, the per-request prefix pass as
//                    its query-position offset (queries sit after prefix + suffix);
//   stacked_cu[2]  = {0, rows} for the stacked prefix pass (every request's query rows against the
//                    prefix at once); rows = qo_indptr[B] clamped to [0, total_q], or 0 when the
//                    per-request pass runs instead (gated mode);
//   req_cu[B + 1]  = qo_indptr, or all zeros (no rows) when the stacked pass runs (gated mode);
//   the partial states of query rows no request owns (rows qo_indptr[B] .. total_q - 1): LSE -inf
//                    and values 0 in every slot, so they merge to output 0, LSE -inf;
//   q_packed       = q (B, Hq, D) copied head-major, (Hq, B, D), for the GQA-packed stacked decode
//                    prefix pass (shared_prefix_host.cpp says why).
// Gated mode (qo_indptr with causal or a right window, and neither a left window nor ALiBi): the
// prefix pass may stack the requests exactly when every request's first query already sees the
// last prefix key, suffix_len_b - qo_len_b + window_right >= -1 for every request with queries.
// Only the device knows, so the planner launches both prefix passes and this kernel empties the
// one that must not run (its CTAs find no query rows and exit).
#pragma once

#include <cstdint>

namespace fastattn::cuda_cascade {

struct CascadePrepParams {
  int batch = 0;
  std::int64_t total_q = 0;
  // Suffix page lists (CSR) and lengths.
  const std::int32_t* page_indptr = nullptr;  ///< (B + 1)
  std::int64_t num_page_indices = 0;
  const std::int32_t* last_page_len = nullptr;  ///< (B)
  int page_size = 0;
  const std::int32_t* qo_indptr = nullptr;  ///< (B + 1), null for decode (one row per request)
  // Outputs (each null when not needed).
  std::int32_t* suffix_len = nullptr;  ///< (B)
  std::int32_t* stacked_cu = nullptr;  ///< (2)
  std::int32_t* req_cu = nullptr;      ///< (B + 1): gated mode only
  bool gated = false;
  int window_right = -1;  ///< gated mode: the effective right window (causal: 0)
  // Partial states (total_q, slots, Hq, D) values of 2 bytes and (total_q, slots, Hq) float32 LSE,
  // contiguous; null when the call has none (no prefix: the suffix pass writes out directly).
  std::uint16_t* part_v = nullptr;
  float* part_s = nullptr;
  int slots = 0, heads_q = 0, head_dim = 0;
  // GQA packing (decode only; null otherwise): q (B, Hq, D) of 2-byte values, rows 16-byte
  // aligned, and where its head-major copy goes.
  const std::uint16_t* q = nullptr;
  std::int64_t q_row_stride = 0, q_head_stride = 0;
  std::uint16_t* q_packed = nullptr;
};

/// Launches the preparation kernel on `stream` (a cudaStream_t); nothing when it has no work.
void run_cascade_prep(const CascadePrepParams& p, void* stream);

}  // namespace fastattn::cuda_cascade
