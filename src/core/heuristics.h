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

/// Key splits for the GPU decode kernel when the caller passes num_splits = 0: when the work items
/// do not fill one wave of `wave_ctas` resident CTAs, split every sequence into
/// floor(wave_ctas / items) parts (a whole wave, no straggling second one), each of at least
/// `min_keys_per_split` keys and at most `max_splits`.
inline int choose_num_splits_one_wave(std::int64_t work_items, std::int64_t max_seqlen_k,
                                      std::int64_t wave_ctas, std::int64_t min_keys_per_split,
                                      int max_splits) {
  if (work_items <= 0 || work_items >= wave_ctas) return 1;
  std::int64_t splits = wave_ctas / work_items;
  if (splits > max_seqlen_k / min_keys_per_split) splits = max_seqlen_k / min_keys_per_split;
  if (splits > max_splits) splits = max_splits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

/// choose_num_splits_one_wave, kept only when splitting pays: the partial states and their merge
/// cost about `split_cost_blocks` key blocks (of `block_keys` keys) of one CTA's streaming, so
/// unless the split takes more blocks than that off each CTA, one split.
inline int choose_num_splits_if_paying(std::int64_t work_items, std::int64_t max_seqlen_k, std::int64_t wave_ctas,
                                       std::int64_t min_keys_per_split, int max_splits, std::int64_t block_keys,
                                       std::int64_t split_cost_blocks) {
  const int splits = choose_num_splits_one_wave(work_items, max_seqlen_k, wave_ctas, min_keys_per_split, max_splits);
  if (splits <= 1) return 1;
  const std::int64_t blocks = (max_seqlen_k + block_keys - 1) / block_keys;
  const std::int64_t blocks_per_split = (blocks + splits - 1) / splits;
  return blocks - blocks_per_split > split_cost_blocks ? splits : 1;
}

}  // namespace fastattn::core
