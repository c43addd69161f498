// In-place KV-cache append with rotary embedding, and the rotated copy of q (CPU backend).
#pragma once

#include <cstdint>
#include <vector>

#include "fastattn/ops.h"

namespace fastattn::cpu {

/// One sequence's append target, resolved and checked by the planner.
struct AppendSeq {
  std::int64_t row;      ///< cache row (cache_batch_idx[b] or b)
  std::int64_t seqlen;   ///< first slot written (cache_seqlens[b])
  std::int64_t pos0;     ///< token position of the first appended key (seqlen - leftpad)
  const std::int32_t* pages;  ///< paged cache: the row's page ids; nullptr when contiguous
  std::int64_t k_off, v_off;  ///< contiguous cache: element offset of the row's slot 0
};

struct AppendParams {
  const KVCacheArgs* args = nullptr;
  std::int64_t seqlen_new = 0;
  std::int64_t rotary_dim = 0;  ///< 0: no rotary
  std::int64_t page_size = 0;   ///< 0: contiguous cache
};

/// Writes k_new / v_new (k rotated when rotary is on) into slots seqlen .. seqlen + Snew - 1.
/// Sequences are written in batch order, so with duplicate cache_batch_idx the last one wins.
void append_kv(const AppendParams& ap, const std::vector<AppendSeq>& seqs, int num_threads);

/// Writes q rotated at its positions into `q_rot`, contiguous (B, Sq, Hq, D) in q's dtype.
/// Positions: pos0 + i for causal or windowed calls, else pos0 for every row.
void rotate_queries(const AppendParams& ap, const std::vector<AppendSeq>& seqs, void* q_rot,
                    int num_threads);

}  // namespace fastattn::cpu
