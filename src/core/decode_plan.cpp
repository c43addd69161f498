// Split-KV plans for decode batches with host-side lengths (include/fastattn/decode_plan.h).
//
// The per-sequence rule weighs up to max_splits chunk options, each a count per sequence. Rather
// than a (options, batch) matrix of ceiling divisions, an option is evaluated on the sorted
// lengths: a chunk c gives count k to the lengths in ((k - 1) c, k c], so each count that some
// length takes is one binary search, and the group's largest part is that of its longest length
// (parts grow with length).
// The choices are the same integer arithmetic and the same double-precision estimate as the
// formulas in the header, in the same order of options, so ties resolve the same way.
#include "fastattn/decode_plan.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "fastattn/error.h"

namespace fastattn {
namespace {

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

[[noreturn]] void fail(const char* op, const std::string& msg) {
  throw ValueError(std::string(op) + ": " + msg);
}

/// The lengths' facts every rule needs, checked: heads and SMs >= 1, every length >= 0.
struct Lengths {
  std::vector<std::int64_t> sorted;  ///< ascending
  std::int64_t batch = 0, total = 0, longest = 0;
};

Lengths read_lengths(const char* op, const std::int64_t* lengths, std::int64_t batch, int num_kv_heads,
                     int sm_count) {
  if (num_kv_heads < 1 || sm_count < 1)
    fail(op, "num_kv_heads and sm_count must be >= 1, got " + std::to_string(num_kv_heads) + " and " +
                 std::to_string(sm_count));
  if (batch < 0) fail(op, "batch must be >= 0, got " + std::to_string(batch));
  if (batch > 0 && lengths == nullptr) fail(op, "lengths must not be null for batch " + std::to_string(batch));
  Lengths l;
  l.batch = batch;
  l.sorted.assign(lengths, lengths + batch);
  for (std::int64_t n : l.sorted)
    if (n < 0) fail(op, "lengths must be >= 0, got " + std::to_string(n));
  std::sort(l.sorted.begin(), l.sorted.end());
  l.total = std::accumulate(l.sorted.begin(), l.sorted.end(), std::int64_t{0});
  l.longest = batch ? l.sorted.back() : 0;
  return l;
}

/// The estimate of the header, in keys streamed by one SM.
double estimate(int heads, std::int64_t total, int sms, std::int64_t ctas_per_head, std::int64_t longest_part,
                const DecodeSplitRule& rule) {
  return heads * (static_cast<double>(total) + rule.cta_cost_keys * static_cast<double>(ctas_per_head)) / sms +
         rule.tail_weight * (static_cast<double>(longest_part) + rule.cta_cost_keys);
}

int max_splits_of(const DecodeSplitRule& rule) { return std::max(1, rule.max_splits); }

/// One option of the per-sequence rules: the chunk ceil(longest / s) (uniform false) or the
/// count s for every sequence (uniform true), with its parts and estimate.
struct Option {
  bool uniform = false;
  std::int64_t s = 0;
  std::int64_t parts = 0;
  double est = 0;
};

/// The chunk option of s: parts and longest part (whole tiles) from the sorted lengths.
Option chunk_option(const Lengths& l, std::int64_t s, int heads, int sms, const DecodeSplitRule& rule) {
  const std::int64_t chunk = ceil_div(l.longest, s);
  std::int64_t parts = 0, longest_tiles = 0;
  // Counts run 1..s: k x chunk >= longest once k reaches s (so max_splits never binds). Each group
  // starts at the count of its shortest length, so only the counts some length takes are visited.
  for (auto from = l.sorted.begin(); from != l.sorted.end();) {
    const std::int64_t k = std::max<std::int64_t>(1, ceil_div(*from, chunk));
    const auto to = std::upper_bound(from, l.sorted.end(), k * chunk);
    parts += k * (to - from);
    longest_tiles = std::max(longest_tiles, ceil_div(ceil_div(*(to - 1), kPlanTileKeys), k));
    from = to;
  }
  return {false, s, parts, estimate(heads, l.total, sms, parts, longest_tiles * kPlanTileKeys, rule)};
}

/// The count s for every sequence.
Option uniform_option(const Lengths& l, std::int64_t s, int heads, int sms, const DecodeSplitRule& rule) {
  const std::int64_t longest_part = ceil_div(ceil_div(l.longest, kPlanTileKeys), s) * kPlanTileKeys;
  return {true, s, l.batch * s, estimate(heads, l.total, sms, l.batch * s, longest_part, rule)};
}

/// The chunk options of at most max_parts parts, s = 1..max_splits in order, up to the first s no
/// later option can matter for: parts never fall as s grows (the chunk shrinks), so once an
/// option's estimate with no tail part is past the tolerance of the best so far, or its parts past
/// max_parts, so is every later option's. Only options fewest_parts_near_best would never pick
/// are left out.
std::vector<Option> chunk_options(const Lengths& l, std::int64_t max_parts, int heads, int sms,
                                  const DecodeSplitRule& rule) {
  std::vector<Option> options;
  double best = 0;
  for (std::int64_t s = 1; s <= max_splits_of(rule); ++s) {
    Option o = chunk_option(l, s, heads, sms, rule);
    if (o.parts > max_parts) break;
    if (!options.empty() && estimate(heads, l.total, sms, o.parts, 0, rule) > best * (1 + kSplitTolerance)) break;
    best = options.empty() ? o.est : std::min(best, o.est);
    options.push_back(o);
  }
  return options;
}

/// Of the options within kSplitTolerance of the best estimate, the fewest parts; ties go to the
/// lower estimate, then the earlier option.
Option fewest_parts_near_best(const std::vector<Option>& options) {
  double best = options.front().est;
  for (const Option& o : options) best = std::min(best, o.est);
  const double bound = best * (1 + kSplitTolerance);
  const Option* pick = nullptr;
  for (const Option& o : options) {
    if (!(o.est <= bound)) continue;
    if (!pick || o.parts < pick->parts || (o.parts == pick->parts && o.est < pick->est)) pick = &o;
  }
  return *pick;
}

void write_counts(const Option& o, const std::int64_t* lengths, std::int64_t batch, std::int64_t longest,
                  std::int32_t* counts) {
  const std::int64_t chunk = o.uniform ? 0 : ceil_div(longest, o.s);
  for (std::int64_t b = 0; b < batch; ++b)
    counts[b] = static_cast<std::int32_t>(o.uniform ? o.s : std::max<std::int64_t>(1, ceil_div(lengths[b], chunk)));
}

bool balanced(const Lengths& l, const DecodeSplitRule& rule) {
  return static_cast<double>(l.longest * l.batch) <= rule.balanced_ratio * static_cast<double>(l.total);
}

int uniform_count(const Lengths& l, int heads, int sms, const DecodeSplitRule& rule) {
  if (l.longest == 0) return 1;
  if (balanced(l, rule)) return 0;
  std::vector<double> est;
  for (std::int64_t s = 1; s <= max_splits_of(rule); ++s)
    est.push_back(estimate(heads, l.total, sms, l.batch * s, ceil_div(l.longest, s), rule));
  const double bound = *std::min_element(est.begin(), est.end()) * (1 + kSplitTolerance);
  for (std::size_t i = 0; i < est.size(); ++i)
    if (est[i] <= bound) return static_cast<int>(i + 1);
  return 1;  // unreachable: the best is within its own bound
}

/// decode_split_counts_for_lengths on lengths already read (`l`, from `lengths`).
bool split_counts(const char* op, const Lengths& l, const std::int64_t* lengths, int heads, int sms,
                  std::int32_t* counts, const DecodeSplitRule& rule) {
  const std::int64_t batch = l.batch;
  if (batch > 0 && counts == nullptr) fail(op, "counts must not be null for batch " + std::to_string(batch));
  if (batch > kMaxPlanItems)
    fail(op, "a split plan takes at most " + std::to_string(kMaxPlanItems) + " sequences, got " +
                 std::to_string(batch));
  if (l.longest == 0) {
    std::fill(counts, counts + batch, 1);
    return true;
  }
  if (balanced(l, rule)) return false;
  // A plan or one count: both weighed with tail_weight.
  const Option chosen = fewest_parts_near_best(chunk_options(l, kMaxPlanItems, heads, sms, rule));
  const int s = uniform_count(l, heads, sms, rule);
  const double uniform_est = estimate(heads, l.total, sms, batch * s, ceil_div(l.longest, s), rule);
  if (uniform_est < rule.min_gain * chosen.est) return false;
  // A plan: its chunk with the plan's own tail weight.
  if (rule.plan_tail_weight == rule.tail_weight) {
    write_counts(chosen, lengths, batch, l.longest, counts);
    return true;
  }
  DecodeSplitRule plan_rule = rule;
  plan_rule.tail_weight = rule.plan_tail_weight;
  write_counts(fewest_parts_near_best(chunk_options(l, kMaxPlanItems, heads, sms, plan_rule)), lengths, batch,
               l.longest, counts);
  return true;
}

}  // namespace

DecodeSplitRule decode_split_rule_for_head_dim(int head_dim) {
  DecodeSplitRule rule;
  if (head_dim > 128) rule.row_pair_min_keys = 0;  // no row pair there (kDecodeRowPairMaxHeadDim)
  if (head_dim == 64 || head_dim == 256) rule.plan_tail_weight = 0.10;
  return rule;
}

int decode_num_splits_for_lengths(const std::int64_t* lengths, std::int64_t batch, int num_kv_heads,
                                  int sm_count, const DecodeSplitRule& rule) {
  const Lengths l = read_lengths("decode_num_splits_for_lengths", lengths, batch, num_kv_heads, sm_count);
  return uniform_count(l, num_kv_heads, sm_count, rule);
}

bool decode_split_counts_for_lengths(const std::int64_t* lengths, std::int64_t batch, int num_kv_heads,
                                     int sm_count, std::int32_t* counts, const DecodeSplitRule& rule) {
  const char* op = "decode_split_counts_for_lengths";
  return split_counts(op, read_lengths(op, lengths, batch, num_kv_heads, sm_count), lengths, num_kv_heads,
                      sm_count, counts, rule);
}

std::int64_t decode_graph_plan_items(std::int64_t batch, int num_kv_heads, int sm_count, double extra_waves) {
  if (batch < 0 || num_kv_heads < 1 || sm_count < 1)
    fail("decode_graph_plan_items", "batch must be >= 0 and num_kv_heads, sm_count >= 1, got " +
                                        std::to_string(batch) + ", " + std::to_string(num_kv_heads) + ", " +
                                        std::to_string(sm_count));
  if (batch > kMaxPlanItems)
    fail("decode_graph_plan_items", "a split plan takes at most " + std::to_string(kMaxPlanItems) +
                                        " sequences, got " + std::to_string(batch));
  const auto extra = static_cast<std::int64_t>(std::ceil(extra_waves * sm_count / num_kv_heads));
  return std::min(kMaxPlanItems, batch + extra);
}

void decode_graph_split_counts(const std::int64_t* lengths, std::int64_t batch, int num_kv_heads,
                               int sm_count, std::int64_t max_parts, std::int32_t* counts,
                               const DecodeSplitRule& rule) {
  const char* op = "decode_graph_split_counts";
  const Lengths l = read_lengths(op, lengths, batch, num_kv_heads, sm_count);
  if (batch > 0 && counts == nullptr) fail(op, "counts must not be null for batch " + std::to_string(batch));
  if (max_parts < batch)
    fail(op, "max_parts must be at least the batch (" + std::to_string(batch) + "), got " +
                 std::to_string(max_parts));
  if (batch == 0 || l.longest == 0) {
    std::fill(counts, counts + batch, 1);
    return;
  }
  std::vector<Option> options = chunk_options(l, max_parts, num_kv_heads, sm_count, rule);
  const std::int64_t most = std::min<std::int64_t>(max_splits_of(rule), max_parts / batch);
  for (std::int64_t s = 1; s <= most; ++s) options.push_back(uniform_option(l, s, num_kv_heads, sm_count, rule));
  write_counts(fewest_parts_near_best(options), lengths, batch, l.longest, counts);
}

void decode_split_plan(const std::int32_t* counts, std::int64_t batch, const std::int64_t* lengths,
                       std::optional<std::int64_t> items, std::int32_t* plan, std::int64_t plan_size) {
  const char* op = "decode_split_plan";
  if (batch < 0) fail(op, "batch must be >= 0, got " + std::to_string(batch));
  if (plan == nullptr || (batch > 0 && counts == nullptr)) fail(op, "counts and plan must not be null");
  std::int64_t parts = 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    if (counts[b] < 1 || counts[b] > kMaxPlanSplits)
      fail(op, "counts must be in 1.." + std::to_string(kMaxPlanSplits) + ", got " + std::to_string(counts[b]));
    parts += counts[b];
  }
  const std::int64_t size = items ? *items : parts;
  if (size < parts)
    fail(op, "items must be at least the splits' sum " + std::to_string(parts) + ", got " + std::to_string(size));
  if (batch > kMaxPlanItems || size > kMaxPlanItems)
    fail(op, "a split plan takes at most " + std::to_string(kMaxPlanItems) + " sequences and work items, got " +
                 std::to_string(batch) + " sequences and " + std::to_string(size) + " items");
  if (plan_size != batch + 1 + size)
    fail(op, "plan must have batch + 1 + items = " + std::to_string(batch + 1 + size) + " entries, got " +
                 std::to_string(plan_size));
  // Work items in sequence order, then (with lengths) stably sorted by their tiles, longest first.
  std::vector<std::int32_t> work;
  std::vector<std::int64_t> part_tiles;
  work.reserve(parts);
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t tiles = lengths ? ceil_div(std::max<std::int64_t>(lengths[b], 0), kPlanTileKeys) : 0;
    const std::int64_t per = ceil_div(tiles, counts[b]);
    for (std::int64_t split = 0; split < counts[b]; ++split) {
      work.push_back(static_cast<std::int32_t>(b + kSplitUnit * split));
      part_tiles.push_back(std::clamp<std::int64_t>(tiles - split * per, 0, per));
    }
  }
  std::vector<std::int64_t> order(work.size());
  std::iota(order.begin(), order.end(), 0);
  if (lengths)
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int64_t a, std::int64_t b) { return part_tiles[a] > part_tiles[b]; });
  plan[0] = 0;
  for (std::int64_t b = 0; b < batch; ++b) plan[b + 1] = plan[b] + counts[b];
  std::int32_t* item = plan + batch + 1;
  for (std::int64_t i : order) *item++ = work[i];
  std::fill(item, plan + batch + 1 + size, kPlanPadding);
}

namespace {

/// fixed_split_size's counts (PagedDecodePlanOptions::fixed_split_size): ceil(max(1, pages) /
/// size) for a sequence of attended[b] keys, at most kMaxPlanSplits each and `max_items` in all
/// (`items_name` says whose work items those are).
std::vector<std::int32_t> fixed_split_counts(const char* op, const std::vector<std::int64_t>& attended, int page_size,
                                             std::int64_t size, std::int64_t max_items, const char* items_name) {
  std::vector<std::int32_t> counts(attended.size());
  std::int64_t parts = 0;
  for (std::size_t b = 0; b < attended.size(); ++b) {
    const std::int64_t pages = std::max<std::int64_t>(1, ceil_div(attended[b], page_size));
    const std::int64_t n = ceil_div(pages, size);
    if (n > kMaxPlanSplits)
      fail(op, "fixed_split_size = " + std::to_string(size) + " cuts sequence " + std::to_string(b) + " (" +
                   std::to_string(pages) + " attended pages) into " + std::to_string(n) + " parts, more than " +
                   std::to_string(kMaxPlanSplits) + ": take a larger fixed_split_size");
    counts[b] = static_cast<std::int32_t>(n);
    parts += n;
  }
  if (parts > max_items)
    fail(op, "fixed_split_size = " + std::to_string(size) + " gives " + std::to_string(parts) +
                 " parts in all, more than " + items_name + " " + std::to_string(max_items) +
                 " work items: take a larger fixed_split_size");
  return counts;
}

/// Query rows of one decode CTA's row block.
constexpr std::int64_t kRowsPerBlock = 16;

/// Checks the plan's query rows: q_len >= 1, num_qo_heads 0 or a multiple of num_kv_heads.
void check_query_rows(const char* op, const PagedDecodePlanOptions& o) {
  if (o.q_len < 1) fail(op, "q_len (q_len_per_req) must be >= 1, got " + std::to_string(o.q_len));
  if (o.num_qo_heads < 0 || (o.num_qo_heads > 0 && o.num_kv_heads > 0 && o.num_qo_heads % o.num_kv_heads != 0))
    fail(op, "num_qo_heads must be 0 or a multiple of num_kv_heads = " + std::to_string(o.num_kv_heads) + ", got " +
                 std::to_string(o.num_qo_heads));
}

/// The KV heads the split rules weigh for a plan of `batch` sequences whose longest has `max_pages`
/// pages: each KV head's group x q_len query rows take one CTA up to 16, one up to 32 where the pages
/// hold at least rule.row_pair_min_keys slots, or rule.row_pair_wave_min_keys where batch x
/// num_kv_heads CTAs are rule.row_pair_min_waves waves (the row pair), else one per 16; each streams
/// the head's keys.
int weighed_kv_heads(const PagedDecodePlanOptions& o, std::int64_t batch, std::int64_t max_pages) {
  const std::int64_t group = o.num_qo_heads > 0 && o.num_kv_heads > 0 ? o.num_qo_heads / o.num_kv_heads : 1;
  const std::int64_t rows = group * o.q_len;
  const std::int64_t slots = max_pages * o.page_size;
  const bool waves = o.sm_count > 0 && double(batch) * o.num_kv_heads >= o.rule.row_pair_min_waves * o.sm_count;
  const bool row_pair = o.rule.row_pair_min_keys > 0 && rows <= 2 * kRowsPerBlock &&
                        (slots >= o.rule.row_pair_min_keys || (waves && slots >= o.rule.row_pair_wave_min_keys));
  const std::int64_t heads = std::int64_t(o.num_kv_heads) * (row_pair ? 1 : ceil_div(rows, kRowsPerBlock));
  return heads > INT_MAX ? INT_MAX : static_cast<int>(heads);
}

}  // namespace

PagedDecodePlan plan_paged_decode(const std::int64_t* indptr, const std::int64_t* last_page_len, std::int64_t batch,
                                  std::int64_t num_ids, const PagedDecodePlanOptions& o) {
  const char* op = "plan_paged_decode";
  if (batch < 0) fail(op, "batch must be >= 0, got " + std::to_string(batch));
  if (indptr == nullptr || (batch > 0 && last_page_len == nullptr))
    fail(op, "indptr and last_page_len must not be null");
  if (o.page_size < 1) fail(op, "page_size must be >= 1, got " + std::to_string(o.page_size));
  if (o.fixed_split_size < 0)
    fail(op, "fixed_split_size must be a page count >= 1 (0: none), got " + std::to_string(o.fixed_split_size));
  check_query_rows(op, o);
  // The row pointers first, all of them (a bad one makes every later length meaningless).
  const std::string bounds = "indptr must be non-decreasing from >= 0 up to len(indices) = " + std::to_string(num_ids);
  if (indptr[0] < 0) fail(op, bounds + ", got indptr[0] = " + std::to_string(indptr[0]));
  PagedDecodePlan p;
  for (std::int64_t b = 0; b < batch; ++b) {
    if (indptr[b + 1] < indptr[b])
      fail(op, bounds + ", got indptr[" + std::to_string(b + 1) + "] = " + std::to_string(indptr[b + 1]) +
                   " after " + std::to_string(indptr[b]));
    p.max_pages = std::max(p.max_pages, indptr[b + 1] - indptr[b]);
  }
  if (indptr[batch] > num_ids) fail(op, bounds + ", got indptr[" + std::to_string(batch) + "] = " + std::to_string(indptr[batch]));
  const int heads = weighed_kv_heads(o, batch, p.max_pages);
  std::vector<std::int64_t> attended(static_cast<std::size_t>(batch));
  p.arrays.resize(static_cast<std::size_t>(batch));
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t pages = indptr[b + 1] - indptr[b];
    std::int64_t keys = 0;
    if (pages > 0) {
      const std::int64_t last = last_page_len[b];
      if (last < 1 || last > o.page_size)
        fail(op, "last_page_len[" + std::to_string(b) + "] must be in 1..page_size = " + std::to_string(o.page_size) +
                     ", got " + std::to_string(last));
      keys = (pages - 1) * o.page_size + last;
      if (keys > INT32_MAX)
        fail(op, "sequence " + std::to_string(b) + " has " + std::to_string(keys) + " keys, more than 2^31 - 1");
    }
    if (o.q_len > 1 && keys < o.q_len)
      fail(op, "sequence " + std::to_string(b) + " has " + std::to_string(keys) + " keys, fewer than its q_len = " +
                   std::to_string(o.q_len) + " query rows (q_len_per_req): its draft tokens must be in the cache");
    p.arrays[b] = static_cast<std::int32_t>(keys);
    // The union of its rows' windows: the first row's window_left + 1 keys and the q_len - 1 after.
    attended[b] = o.window_left < 0 ? keys : std::min(keys, o.window_left + o.q_len);
  }
  std::optional<std::int64_t> items;
  if (o.graph_items > 0) items = o.graph_items;
  if (o.split_kv && o.fixed_split_size > 0) {
    p.counts = fixed_split_counts(op, attended, o.page_size, o.fixed_split_size, items.value_or(kMaxPlanItems),
                                  items ? "the CUDA-graph plan's" : "a split plan's");
  } else if (items) {
    p.counts.assign(static_cast<std::size_t>(batch), 1);
    if (o.split_kv)
      decode_graph_split_counts(attended.data(), batch, heads, o.sm_count, *items, p.counts.data(), o.rule);
  } else if (!o.split_kv) {
    p.num_splits = 1;
  } else if (o.choose_splits) {
    // Both rules on one sorted copy of the lengths.
    const char* rules = "decode_split_counts_for_lengths";
    const Lengths l = read_lengths(rules, attended.data(), batch, heads, o.sm_count);
    p.counts.resize(static_cast<std::size_t>(batch));
    if (!split_counts(rules, l, attended.data(), heads, o.sm_count, p.counts.data(), o.rule)) {
      p.counts.clear();
      p.num_splits = uniform_count(l, heads, o.sm_count, o.rule);
    }
  }
  if (!p.counts.empty() || items) {
    const std::int64_t parts = std::accumulate(p.counts.begin(), p.counts.end(), std::int64_t{0});
    const std::int64_t size = batch + 1 + (items ? *items : parts);
    p.arrays.resize(static_cast<std::size_t>(batch + size));
    decode_split_plan(p.counts.data(), batch, attended.data(), items, p.arrays.data() + batch, size);
  }
  return p;
}

}  // namespace fastattn
