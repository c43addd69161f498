// Small pure functions that pick launch parameters. Each has a unit test in tests/cpp.
#pragma once

#include <cstdint>

namespace fastattn::core {

/// Key splits per sequence for split-KV (flash decoding) when the caller passes num_splits = 0.
/// Splitting pays when the (sequence, kv head, query block) work items cannot keep `workers`
/// busy: aim for about two items per worker, but give each split at least `min_keys_per_split`
/// keys (below that the combine costs more than it saves) and never more than `max_splits`.
///   work_items: items without splitting; max_seqlen_k: longest key range; workers: threads/SMs.
inline int choose_num_splits(std::int64_t work_items, std::int64_t max_seqlen_k, int workers,
                             std::int64_t min_keys_per_split = 256, int max_splits = 64) {
  if (work_items <= 0 || workers <= 1 || work_items >= workers) return 1;
  std::int64_t splits = (2 * static_cast<std::int64_t>(workers) + work_items - 1) / work_items;
  const std::int64_t by_len = max_seqlen_k / min_keys_per_split;
  if (splits > by_len) splits = by_len;
  if (splits > max_splits) splits = max_splits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

}  // namespace fastattn::core
