// fastattn: split-KV plans for a decode batch whose key lengths the caller has on the host.
//
// kvcache_attention_forward with num_splits = 0 plans its splits from the cache's capacity (it
// never reads cache_seqlens on the host, so a call stays graph-capturable). In a ragged batch,
// a few long sequences among short ones, that leaves a long sequence to a few CTAs. A caller that
// knows the lengths (an engine's scheduler, FlashInfer's plan()) balances the batch with these
// host-only functions: one count for the batch (KVCacheArgs::num_splits) or a count per sequence
// (KVCacheArgs::split_plan). They neither allocate device memory nor touch a GPU.
//
// The estimate behind every choice, in keys streamed by one SM (one resident CTA per SM):
//   T = num_kv_heads * (sum(lengths) + cta_cost_keys * W) / sm_count
//       + tail_weight * (longest part + cta_cost_keys)
// with W the CTAs per KV head (batch x S for one count S) and the longest part the grid's tail.
// Of the options within kSplitTolerance of the best estimate the one of fewest parts is taken.
// A count per sequence, once chosen over one count, takes its chunk with plan_tail_weight in
// place of tail_weight.
// The constants (DecodeSplitRule) were fitted on an H200 at bf16, head_dim 128, pages of 16, and the
// plan's tail weight also at head_dim 64 and 256 (decode_split_rule_for_head_dim); other GPUs use
// them unfitted.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace fastattn {

/// The split rules' constants, fitted to a sweep of fixed split counts on an H200 at bf16,
/// head_dim 128, pages of 16 (bench/NOTES.md, sessions 65-66, for how they were set and checked).
struct DecodeSplitRule {
  /// A CTA's fixed cost (start, the partial state it writes, its share of the combine), in keys
  /// streamed: one 64-key tile is ~1 us at one SM's share of HBM.
  double cta_cost_keys = 32.0;
  /// The weight of the longest CTA: the grid's tail, where the last CTAs read with the SMs partly
  /// idle. What sets the count is tail_weight / cta_cost_keys (the fitted valley was ~1/100 to
  /// ~1/75).
  double tail_weight = 0.35;
  /// The tail's weight when a count per sequence picks its chunk (decode_split_counts_for_lengths,
  /// after the plan has been chosen over one count with tail_weight). The default, tail_weight,
  /// is head_dim 128's; decode_split_rule_for_head_dim gives the other head dims theirs.
  double plan_tail_weight = 0.35;
  /// Lengths this close to uniform (longest x batch <= balanced_ratio x the sum) keep the
  /// capacity heuristic (num_splits 0): its head-pair / quad / group forms stream faster per byte
  /// than the per-head form a fixed split count runs, and on equal lengths they are balanced.
  double balanced_ratio = 1.1;
  /// The most splits a sequence gets (values below 1 count as 1).
  int max_splits = 64;
  /// The CTAs of the decode kernels a KV head's packed query rows (group x q_len) take, each
  /// streaming the head's keys, which the rules weigh as that many KV heads: one for up to 16
  /// rows; one for 17-32 where the longest sequence's pages hold at least row_pair_min_keys slots,
  /// or row_pair_wave_min_keys below (the sm_90 kernel's row pair, its heuristic's bounds); else one
  /// per 16 rows. 0: never the row pair (decode_split_rule_for_head_dim above head_dim 128, where it
  /// is not built).
  std::int64_t row_pair_min_keys = 4096;
  /// Also the row pair for 17-32 rows where the pages hold at least row_pair_wave_min_keys slots
  /// and batch x num_kv_heads >= row_pair_min_waves x sm_count (its one-split grid, one CTA an SM;
  /// the kernels' heuristic, kDecodeRowPairWaveMinKeys). Only where row_pair_min_keys > 0.
  std::int64_t row_pair_wave_min_keys = 1024;
  double row_pair_min_waves = 1.2;
  /// A count per sequence is chosen only where one count's estimate is at least min_gain times
  /// the plan's. The estimate does not see the waves: parts of equal size leave the grid's last
  /// wave to whole parts while most SMs idle, where one count's parts vary with the lengths and
  /// the short ones fill in. On an H200 (session 66) batches of lengths drawn uniformly had
  /// estimated gains of 1.003-1.024 and ran from 1.3% slower to 2% faster with a plan; a few long
  /// sequences among short ones had 1.105-1.286 and ran level to 14% faster.
  double min_gain = 1.05;
};

/// The rule for a head dim's decode kernels: the defaults, with no row pair (row_pair_min_keys 0)
/// above head_dim 128, and the plan's tail weight 0.10 at head_dim 64 and 256. At those two, a few
/// long sequences among short ones ran 2-13% (64) and up to 5% (256) faster with the fewer, longer
/// parts that weight gives (one 32k sequence among 31 of 1k in 16 parts instead of 31), while at
/// head_dim 128 two such batches ran 1.3-2.6% slower with them (bench/NOTES.md, session 72). Other
/// head dims get the default tail weight. (CUDA-graph plans,
/// decode_graph_split_counts, weigh every option with tail_weight.)
DecodeSplitRule decode_split_rule_for_head_dim(int head_dim);

/// Options whose estimate is within this fraction of the best count as equal; the fewest parts
/// among them wins (fewer partial states to write and merge).
inline constexpr double kSplitTolerance = 0.02;
/// A split plan's bounds (KVCacheArgs::split_plan): sequences and work items, and the splits of
/// one sequence; a work item is b + kSplitUnit * split, a padding item (no work) kPlanPadding.
inline constexpr std::int64_t kMaxPlanItems = 65535;
inline constexpr std::int64_t kMaxPlanSplits = 1024;
inline constexpr std::int64_t kSplitUnit = 65536;
inline constexpr std::int32_t kPlanPadding = -1;
/// Keys per tile of the decode kernels: a part's keys are whole tiles of its sequence.
inline constexpr std::int64_t kPlanTileKeys = 64;
/// A CUDA-graph plan's work items beyond one a sequence, in waves of the GPU per KV head (one CTA
/// per SM): room for the splits of the steps' longest sequences, and a bound on the padding CTAs
/// of the steps that need none (bench/NOTES.md, session 67).
inline constexpr double kGraphExtraWaves = 2.0;

/// One split count for the batch: 0 (the capacity heuristic) when the lengths are near-uniform,
/// 1 when there is nothing to read, else the fewest S in 1..max_splits whose estimate (W = batch
/// x S, longest part ceil(max / S)) is within kSplitTolerance of the best.
///   lengths: (batch) key lengths >= 0.
int decode_num_splits_for_lengths(const std::int64_t* lengths, std::int64_t batch, int num_kv_heads,
                                  int sm_count, const DecodeSplitRule& rule = {});

/// A split count per sequence, for decode_split_plan: each sequence cut into parts of about one
/// chunk c, counts[b] = max(1, ceil(lengths[b] / c)), c among ceil(longest / S), S =
/// 1..max_splits, by the estimate (W = sum(counts), longest part = the largest part in whole
/// tiles). Returns true and fills counts (batch) when that plan is worth it: when one count's
/// estimate is at least min_gain times the plan's, both with tail_weight; the plan's chunk is then
/// chosen again with plan_tail_weight. All ones when there is nothing to read. Returns false,
/// counts untouched, where one count serves the batch better (near-uniform lengths, or a gain
/// under min_gain): use decode_num_splits_for_lengths.
///   lengths: (batch) key lengths >= 0, batch <= kMaxPlanItems; counts: (batch) written.
bool decode_split_counts_for_lengths(const std::int64_t* lengths, std::int64_t batch, int num_kv_heads,
                                     int sm_count, std::int32_t* counts, const DecodeSplitRule& rule = {});

/// The work items W of a CUDA-graph plan (its captured grid's fixed size): one per sequence and
/// ceil(extra_waves x sm_count / num_kv_heads) more, at most kMaxPlanItems.
std::int64_t decode_graph_plan_items(std::int64_t batch, int num_kv_heads, int sm_count,
                                     double extra_waves = kGraphExtraWaves);

/// A split count per sequence of at most max_parts parts in all (a plan of fixed size): always
/// counts, never the capacity heuristic (a captured launch cannot switch forms). The options are
/// decode_split_counts_for_lengths' chunks and one count S for every sequence, those of at most
/// max_parts parts; the estimate picks among them as above.
///   lengths: (batch) >= 0; max_parts >= batch; counts: (batch) written.
void decode_graph_split_counts(const std::int64_t* lengths, std::int64_t batch, int num_kv_heads,
                               int sm_count, std::int64_t max_parts, std::int32_t* counts,
                               const DecodeSplitRule& rule = {});

/// The split plan of KVCacheArgs::split_plan for counts per sequence, written into `plan`
/// (batch + 1 + items entries; items = sum(counts) when absent): split_indptr (the cumulative
/// counts from 0), then every (sequence, split) as b + kSplitUnit x split in launch order (with
/// `lengths`, the longest parts first, ties by sequence then split; without, by sequence), then
/// items - sum(counts) padding items (kPlanPadding), last.
///   counts: (batch) in 1..kMaxPlanSplits; lengths: null or (batch) key lengths (negative counts
///   as 0), only to order the items; batch and items <= kMaxPlanItems; plan_size, the entries
///   of `plan`, must be batch + 1 + items.
void decode_split_plan(const std::int32_t* counts, std::int64_t batch, const std::int64_t* lengths,
                       std::optional<std::int64_t> items, std::int32_t* plan, std::int64_t plan_size);

/// What plan_paged_decode plans.
struct PagedDecodePlanOptions {
  int page_size = 0;
  /// Keys more than window_left before a query row are masked (< 0: none); the splits are chosen
  /// for the min(length, window_left + q_len) keys the sequence's rows attend to.
  std::int64_t window_left = -1;
  int num_kv_heads = 0;
  /// Query heads (0: num_kv_heads), a multiple of num_kv_heads.
  int num_qo_heads = 0;
  /// Query rows per sequence (FlashInfer's q_len_per_req: speculative decoding's draft tokens,
  /// already in the cache, causal within the sequence's last q_len keys). Above 1, a sequence of
  /// fewer keys is a ValueError (at 1 a sequence may have none: its output is 0). Its rows attend
  /// to min(length, window_left + q_len) keys, which set its splits. With num_qo_heads, q_len sets
  /// the CTAs each KV head's rows take (rule.row_pair_min_keys and row_pair_wave_min_keys say how
  /// many), which the split rules weigh as that many KV heads (one for group x q_len <= 16).
  int q_len = 1;
  int sm_count = 0;
  /// false: one split per sequence (num_splits 1; in a CUDA-graph plan, counts of 1).
  bool split_kv = true;
  /// false: no choice made here (num_splits 0, the capacity heuristic; the CPU backend plans its
  /// threads itself). Ignored by a CUDA-graph plan.
  bool choose_splits = true;
  /// > 0: a CUDA-graph plan of this many work items (decode_graph_plan_items), always counts per
  /// sequence (decode_graph_split_counts).
  std::int64_t graph_items = 0;
  /// > 0: FlashInfer's fixed_split_size, in pages. Every sequence gets ceil(max(1, P) /
  /// fixed_split_size) parts, P = ceil(attended keys / page_size), in place of the rules' choice
  /// (with or without choose_splits, in a CUDA-graph plan too), so that its results depend on its
  /// own keys only, bitwise, whatever the rest of the batch (a split plan's parts are equal shares
  /// of the sequence's tiles, not fixed_split_size pages each). split_kv = false wins over it, as
  /// in FlashInfer. A sequence of more than kMaxPlanSplits parts, or more parts in all than the
  /// plan's work items (graph_items, else kMaxPlanItems), is a ValueError naming it. 0: none.
  std::int64_t fixed_split_size = 0;
  /// The split rules' constants: decode_split_rule_for_head_dim(head_dim) for the call's kernels.
  DecodeSplitRule rule{};
};

/// plan_paged_decode's result: what a decode call over the batch is given.
struct PagedDecodePlan {
  /// The key lengths (batch), then, when `counts` is not empty, the split plan (decode_split_plan,
  /// batch + 1 + items entries): one upload gives a call both.
  std::vector<std::int32_t> arrays;
  /// (batch) split counts, or empty when one count serves the batch (num_splits).
  std::vector<std::int32_t> counts;
  /// The batch's split count when `counts` is empty (0: the capacity heuristic).
  int num_splits = 0;
  /// The most pages of one sequence (a block table's width).
  std::int64_t max_pages = 0;
};

/// The host half of a paged decode plan from CSR page lists, as FlashInfer's
/// BatchDecodeWithPagedKVCacheWrapper.plan() makes it: the lists checked, each sequence's key
/// lengths, (pages - 1) x page_size + last_page_len (0 without pages; at least q_len where
/// q_len > 1), and its splits (fixed_split_size's counts where it is set, else
/// decode_split_counts_for_lengths, else decode_num_splits_for_lengths; a CUDA-graph plan:
/// decode_graph_split_counts) with the split plan ordered by the attended keys.
///   indptr: (batch + 1), non-decreasing from >= 0 up to num_ids (the page ids' count);
///   last_page_len: (batch), in 1..page_size where a sequence has pages (not read where it has
///   none). A bad value is a ValueError naming it; so is a length above 2^31 - 1.
PagedDecodePlan plan_paged_decode(const std::int64_t* indptr, const std::int64_t* last_page_len, std::int64_t batch,
                                  std::int64_t num_ids, const PagedDecodePlanOptions& options);

}  // namespace fastattn
