// The decode split rules (include/fastattn/decode_plan.h) against the rules written out here with
// plain loops over every option and every sequence, on fresh random ragged batches; the split
// plan's layout; and the errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "fastattn/decode_plan.h"
#include "fastattn/error.h"
#include "test_util.h"

namespace {

using namespace fa_test;
using Lens = std::vector<std::int64_t>;
using Counts = std::vector<std::int32_t>;

std::int64_t up(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

/// The header's estimate for counts per sequence, written out.
double estimate_of(const Lens& lens, const Counts& counts, int heads, int sms, const fastattn::DecodeSplitRule& r) {
  std::int64_t total = 0, parts = 0, longest_part = 0;
  for (std::size_t b = 0; b < lens.size(); ++b) {
    total += lens[b];
    parts += counts[b];
    longest_part = std::max(longest_part, up(up(lens[b], 64), counts[b]) * 64);
  }
  return heads * (double(total) + r.cta_cost_keys * double(parts)) / sms + r.tail_weight * (double(longest_part) + r.cta_cost_keys);
}

struct Choice {
  double est;
  std::int64_t parts;
  Counts counts;
};

/// The chunk options (and, with `uniform`, one count S for all) of at most cap parts; the fewest
/// parts within the tolerance of the best, ties to the lower estimate, then the earlier option.
Choice written_out_choice(const Lens& lens, int heads, int sms, const fastattn::DecodeSplitRule& r, bool uniform,
                          std::int64_t cap) {
  const std::int64_t longest = *std::max_element(lens.begin(), lens.end());
  std::vector<Choice> options;
  const auto add = [&](const Counts& c) {
    std::int64_t parts = 0;
    for (auto x : c) parts += x;
    if (parts <= cap) options.push_back({estimate_of(lens, c, heads, sms, r), parts, c});
  };
  for (int s = 1; s <= r.max_splits; ++s) {
    Counts c;
    for (auto n : lens) c.push_back(std::int32_t(std::clamp<std::int64_t>(up(n, up(longest, s)), 1, r.max_splits)));
    add(c);
  }
  if (uniform)
    for (int s = 1; s <= r.max_splits; ++s) add(Counts(lens.size(), s));
  double best = options[0].est;
  for (auto& o : options) best = std::min(best, o.est);
  const Choice* pick = nullptr;
  for (auto& o : options)
    if (o.est <= best * (1 + fastattn::kSplitTolerance) &&
        (!pick || o.parts < pick->parts || (o.parts == pick->parts && o.est < pick->est)))
      pick = &o;
  return *pick;
}

/// The estimate of one count S for every sequence: its longest part ceil(longest / S) keys.
double one_count_estimate(const Lens& lens, int s, int heads, int sms, const fastattn::DecodeSplitRule& r) {
  std::int64_t total = 0, longest = 0;
  for (auto n : lens) total += n, longest = std::max(longest, n);
  return heads * (double(total) + r.cta_cost_keys * double(std::int64_t(lens.size()) * s)) / sms +
         r.tail_weight * (double(up(longest, s)) + r.cta_cost_keys);
}

/// Whether the lengths are near-uniform: longest x batch <= balanced_ratio x their sum.
bool near_uniform(const Lens& lens, const fastattn::DecodeSplitRule& r) {
  std::int64_t total = 0, longest = 0;
  for (auto n : lens) total += n, longest = std::max(longest, n);
  return double(longest) * double(lens.size()) <= r.balanced_ratio * double(total);
}

/// One count for the batch, written out: 0 (the capacity heuristic) for near-uniform lengths, else
/// the fewest S within the tolerance of the best.
int written_out_uniform(const Lens& lens, int heads, int sms, const fastattn::DecodeSplitRule& r) {
  if (near_uniform(lens, r)) return 0;
  std::vector<double> est;
  for (int s = 1; s <= r.max_splits; ++s) est.push_back(one_count_estimate(lens, s, heads, sms, r));
  const double best = *std::min_element(est.begin(), est.end());
  for (int s = 1; s <= r.max_splits; ++s)
    if (est[s - 1] <= best * (1 + fastattn::kSplitTolerance)) return s;
  return -1;
}

/// 2-300 sequences of 0-4095 keys, one to three of them 8k-300k: a ragged batch, or now and then
/// (two or three sequences, all long) a near-uniform one.
Lens long_among_short(std::mt19937_64& rng) {
  Lens lens(static_cast<std::size_t>(rand_int(rng, 2, 300)));
  for (auto& n : lens) n = rand_int(rng, 0, 4095);
  for (int i = rand_int(rng, 1, 3); i > 0; --i)
    lens[static_cast<std::size_t>(rand_int(rng, 0, std::int64_t(lens.size()) - 1))] = rand_int(rng, 8192, 300000);
  return lens;
}

fastattn::DecodeSplitRule random_rule(std::mt19937_64& rng) {
  fastattn::DecodeSplitRule r;
  if (rand_int(rng, 0, 1)) {
    r.cta_cost_keys = double(rand_int(rng, 0, 100));
    r.tail_weight = rand_real(rng, 0.05, 1.0);
    r.plan_tail_weight = rand_real(rng, 0.02, 1.0);
    r.max_splits = int(rand_int(rng, 1, 100));
  }
  return r;
}

TEST(DecodePlan, OneCountIsTheWrittenOutBest) {
  FA_SEEDED_RNG(rng);
  for (int trial = 0; trial < 100; ++trial) {
    const Lens lens = long_among_short(rng);
    const int heads = int(pick(rng, std::vector<std::int64_t>{1, 2, 8, 32}));
    const auto r = random_rule(rng);
    ASSERT_EQ(fastattn::decode_num_splits_for_lengths(lens.data(), std::int64_t(lens.size()), heads, 132, r),
              written_out_uniform(lens, heads, 132, r));
  }
  const Lens uniform(32, 8192), empty_keys(3, 0);
  EXPECT_EQ(fastattn::decode_num_splits_for_lengths(uniform.data(), 32, 8, 132), 0);  // the capacity heuristic
  EXPECT_EQ(fastattn::decode_num_splits_for_lengths(empty_keys.data(), 3, 8, 132), 1);
  EXPECT_EQ(fastattn::decode_num_splits_for_lengths(nullptr, 0, 8, 132), 1);
}

TEST(DecodePlan, CountsPerSequenceAreTheWrittenOutChoice) {
  FA_SEEDED_RNG(rng);
  int planned = 0;
  for (int trial = 0; trial < 100; ++trial) {
    const Lens lens = long_among_short(rng);
    const int heads = int(pick(rng, std::vector<std::int64_t>{1, 2, 8, 32}));
    const auto r = random_rule(rng);
    Counts got(lens.size(), -7);
    const bool plan = fastattn::decode_split_counts_for_lengths(lens.data(), std::int64_t(lens.size()), heads, 132,
                                                                got.data(), r);
    if (near_uniform(lens, r)) {  // one count serves it: no plan
      ASSERT_FALSE(plan);
      ASSERT_EQ(got, Counts(lens.size(), -7));  // untouched
      continue;
    }
    // A plan or one count, both with tail_weight; the plan's chunk then with plan_tail_weight.
    const Choice against = written_out_choice(lens, heads, 132, r, false, fastattn::kMaxPlanItems);
    const double one_count = one_count_estimate(lens, written_out_uniform(lens, heads, 132, r), heads, 132, r);
    if (one_count < r.min_gain * against.est) {
      ASSERT_FALSE(plan);
      ASSERT_EQ(got, Counts(lens.size(), -7));  // untouched
      continue;
    }
    fastattn::DecodeSplitRule plan_rule = r;
    plan_rule.tail_weight = r.plan_tail_weight;
    ASSERT_TRUE(plan);
    ASSERT_EQ(got, written_out_choice(lens, heads, 132, plan_rule, false, fastattn::kMaxPlanItems).counts);
    ++planned;
  }
  EXPECT_GE(planned, 10);
  Lens near_uniform{8000, 8192, 7900, 8100}, none(3, 0);
  Counts c(4, -7);
  EXPECT_FALSE(fastattn::decode_split_counts_for_lengths(near_uniform.data(), 4, 8, 132, c.data()));
  EXPECT_TRUE(fastattn::decode_split_counts_for_lengths(none.data(), 3, 8, 132, c.data()));
  EXPECT_EQ(c, (Counts{1, 1, 1, -7}));
  // One 32k sequence among 31 of 1k at 8 KV heads (bench/NOTES.md, session 72): a plan, the short
  // ones in one part each, the long one in 31 parts by the default rule (head_dim 128's) and in 16
  // by head_dim 64's and 256's.
  Lens long1(32, 1024);
  long1[5] = 32768;
  for (int head_dim : {0, 64, 128, 256}) {
    const auto rule = head_dim ? fastattn::decode_split_rule_for_head_dim(head_dim) : fastattn::DecodeSplitRule{};
    Counts got(32, -7), want(32, 1);
    want[5] = head_dim == 64 || head_dim == 256 ? 16 : 31;
    ASSERT_TRUE(fastattn::decode_split_counts_for_lengths(long1.data(), 32, 8, 132, got.data(), rule));
    EXPECT_EQ(got, want) << "head_dim " << head_dim;
  }
}

TEST(DecodePlan, RuleForHeadDim) {
  const fastattn::DecodeSplitRule base;
  EXPECT_EQ(base.plan_tail_weight, base.tail_weight);  // the default: head_dim 128's choice unchanged
  for (int head_dim : {32, 64, 96, 128, 256, 512}) {
    const auto r = fastattn::decode_split_rule_for_head_dim(head_dim);
    EXPECT_EQ(r.cta_cost_keys, base.cta_cost_keys);
    EXPECT_EQ(r.tail_weight, base.tail_weight);
    EXPECT_EQ(r.balanced_ratio, base.balanced_ratio);
    EXPECT_EQ(r.max_splits, base.max_splits);
    EXPECT_EQ(r.min_gain, base.min_gain);
    EXPECT_EQ(r.plan_tail_weight, head_dim == 64 || head_dim == 256 ? 0.10 : base.plan_tail_weight) << head_dim;
    // The row pair (17-32 rows in one CTA) is built up to head_dim 128.
    EXPECT_EQ(r.row_pair_min_keys, head_dim <= 128 ? base.row_pair_min_keys : 0) << head_dim;
  }
  EXPECT_EQ(base.row_pair_min_keys, 4096);
  EXPECT_EQ(base.row_pair_wave_min_keys, 1024);
  EXPECT_EQ(base.row_pair_min_waves, 1.2);
}

TEST(DecodePlan, GraphCountsAreTheWrittenOutChoiceWithinTheItems) {
  FA_SEEDED_RNG(rng);
  for (int trial = 0; trial < 100; ++trial) {
    Lens lens = long_among_short(rng);
    if (rand_int(rng, 0, 4) == 0) lens.assign(lens.size(), lens[0] + 1);  // equal lengths
    const int heads = int(pick(rng, std::vector<std::int64_t>{1, 2, 8, 32}));
    const auto r = random_rule(rng);
    const std::int64_t items = fastattn::decode_graph_plan_items(std::int64_t(lens.size()), heads, 132);
    ASSERT_EQ(items, std::min<std::int64_t>(65535, std::int64_t(lens.size()) + up(2 * 132, heads)));
    Counts got(lens.size());
    fastattn::decode_graph_split_counts(lens.data(), std::int64_t(lens.size()), heads, 132, items, got.data(), r);
    ASSERT_EQ(got, written_out_choice(lens, heads, 132, r, true, items).counts);
  }
  Lens zero(2, 0);
  Counts c(2);
  fastattn::decode_graph_split_counts(zero.data(), 2, 8, 132, 2, c.data());
  EXPECT_EQ(c, (Counts{1, 1}));
}

TEST(DecodePlan, SplitPlanLayout) {
  // 100 keys (2 tiles, 1 part), 640 (10 tiles in parts of 4, 4, 2), 130 (3 tiles in parts of 2, 1).
  const Counts counts{1, 3, 2};
  const Lens lens{100, 640, 130};
  std::vector<std::int32_t> plan(4 + 8, 99);
  fastattn::decode_split_plan(counts.data(), 3, nullptr, std::nullopt, plan.data(), 10);
  EXPECT_EQ(std::vector<std::int32_t>(plan.begin(), plan.begin() + 10),
            (std::vector<std::int32_t>{0, 1, 4, 6, 0, 1, 65537, 131073, 2, 65538}));
  fastattn::decode_split_plan(counts.data(), 3, lens.data(), 8, plan.data(), 12);
  EXPECT_EQ(plan, (std::vector<std::int32_t>{0, 1, 4, 6, 1, 65537, 0, 131073, 2, 65538, -1, -1}));
}

TEST(DecodePlan, SplitPlanOfRandomCountsHoldsEveryPartOnceLongestFirst) {
  FA_SEEDED_RNG(rng);
  for (int trial = 0; trial < 50; ++trial) {
    const Lens lens = long_among_short(rng);
    Counts counts;
    for (auto n : lens) counts.push_back(std::int32_t(std::clamp<std::int64_t>(up(n, 2048), 1, 1024)));
    std::int64_t parts = 0;
    for (auto c : counts) parts += c;
    const std::int64_t items = parts + rand_int(rng, 0, 5), batch = std::int64_t(lens.size());
    std::vector<std::int32_t> plan(std::size_t(batch + 1 + items), 99);
    fastattn::decode_split_plan(counts.data(), batch, lens.data(), items, plan.data(), std::int64_t(plan.size()));
    // Every (sequence, split) once; part sizes non-increasing in launch order; padding last.
    std::vector<std::int32_t> want, got(plan.begin() + batch + 1, plan.begin() + batch + 1 + parts);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t split = 0; split < counts[std::size_t(b)]; ++split) want.push_back(std::int32_t(b + 65536 * split));
    std::sort(got.begin(), got.end());
    std::sort(want.begin(), want.end());
    ASSERT_EQ(got, want);
    std::vector<std::int64_t> sizes;
    for (std::int64_t i = 0; i < parts; ++i) {
      const std::int32_t item = plan[std::size_t(batch + 1 + i)];
      const std::int64_t b = item % 65536, split = item / 65536;
      const std::int64_t tiles = up(lens[std::size_t(b)], 64), per = up(tiles, counts[std::size_t(b)]);
      sizes.push_back(std::clamp<std::int64_t>(tiles - split * per, 0, per));
    }
    ASSERT_TRUE(std::is_sorted(sizes.rbegin(), sizes.rend()));
    for (std::int64_t i = parts; i < items; ++i) ASSERT_EQ(plan[std::size_t(batch + 1 + i)], -1);
    for (std::int64_t b = 0; b < batch; ++b) ASSERT_EQ(plan[std::size_t(b + 1)] - plan[std::size_t(b)], counts[std::size_t(b)]);
  }
}

/// Random CSR lists for plan_paged_decode: row pointers from an offset, empty rows, a few long
/// sequences among short ones; last_page_len garbage where a row has no page.
struct PagedLists {
  Lens indptr, last, keys;
  std::int64_t num_ids = 0;
};

/// Random CSR lists of a few long sequences among short ones (some empty), of at least
/// `min_keys` keys each when min_keys > 1.
PagedLists random_paged_lists(std::mt19937_64& rng, int page_size, std::int64_t min_keys = 0) {
  PagedLists l;
  const Lens lens = long_among_short(rng);
  l.indptr.push_back(rand_int(rng, 0, 5));
  for (std::int64_t n : lens) {
    std::int64_t keys = rand_int(rng, 0, 9) == 0 ? 0 : n;
    if (min_keys > 1) keys = std::max(keys, min_keys);
    const std::int64_t pages = up(keys, page_size);
    l.indptr.push_back(l.indptr.back() + pages);
    l.last.push_back(pages ? keys - (pages - 1) * page_size : rand_int(rng, -3, 1000));
    l.keys.push_back(keys);
  }
  l.num_ids = l.indptr.back() + rand_int(rng, 0, 5);
  return l;
}

TEST(DecodePlan, PagedPlanIsTheListsLengthsAndTheRulesChoice) {
  FA_SEEDED_RNG(rng);
  int with_counts = 0, one_count = 0;
  for (int trial = 0; trial < 120; ++trial) {
    fastattn::PagedDecodePlanOptions o;
    o.page_size = int(pick(rng, std::vector<std::int64_t>{1, 16, 64}));
    o.window_left = rand_int(rng, 0, 2) == 0 ? rand_int(rng, 0, 20000) : -1;
    o.num_kv_heads = int(pick(rng, std::vector<std::int64_t>{1, 2, 8, 32}));
    // Query rows: one (most plans), or a few per sequence (speculative decoding), over groups of
    // query heads up to 32 per KV head.
    o.q_len = int(pick(rng, std::vector<std::int64_t>{1, 1, 2, 4, 16}));
    const std::int64_t group = pick(rng, std::vector<std::int64_t>{1, 4, 8, 32});
    o.num_qo_heads = rand_int(rng, 0, 5) == 0 ? 0 : int(group * o.num_kv_heads);
    o.sm_count = int(rand_int(rng, 1, 170));
    o.split_kv = rand_int(rng, 0, 4) != 0;
    o.choose_splits = rand_int(rng, 0, 4) != 0;
    o.rule.row_pair_min_keys = pick(rng, std::vector<std::int64_t>{0, 4096, 1, 1 << 20});  // 0: no row pair
    o.rule.row_pair_wave_min_keys = pick(rng, std::vector<std::int64_t>{1024, 1, 1 << 20});
    o.rule.row_pair_min_waves = rand_int(rng, 0, 1) == 0 ? 1.2 : 0.5;
    const PagedLists l = random_paged_lists(rng, o.page_size, o.q_len);
    const auto batch = std::int64_t(l.keys.size());
    if (rand_int(rng, 0, 2) == 0) o.graph_items = fastattn::decode_graph_plan_items(batch, o.num_kv_heads, o.sm_count);
    const fastattn::PagedDecodePlan p = fastattn::plan_paged_decode(l.indptr.data(), l.last.data(), batch, l.num_ids, o);

    // The rules weigh the CTAs of each KV head's group x q_len rows as KV heads: one for 17-32 rows
    // where the longest list's pages hold row_pair_min_keys slots, or row_pair_wave_min_keys where
    // batch x num_kv_heads is row_pair_min_waves waves of sm_count (the row pair), else one per 16.
    std::int64_t most_pages = 0;
    for (std::size_t b = 0; b + 1 < l.indptr.size(); ++b) most_pages = std::max(most_pages, l.indptr[b + 1] - l.indptr[b]);
    const std::int64_t rows = (o.num_qo_heads ? group : 1) * o.q_len;
    const std::int64_t most_slots = most_pages * o.page_size;
    const bool waves = double(batch) * o.num_kv_heads >= o.rule.row_pair_min_waves * o.sm_count;
    const bool row_pair = o.rule.row_pair_min_keys > 0 && rows <= 32 &&
                          (most_slots >= o.rule.row_pair_min_keys || (waves && most_slots >= o.rule.row_pair_wave_min_keys));
    const int heads = int(o.num_kv_heads * (row_pair ? 1 : up(rows, 16)));
    Lens attended(l.keys);
    std::int64_t most = 0;
    for (std::size_t b = 0; b < attended.size(); ++b) {
      if (o.window_left >= 0) attended[b] = std::min(attended[b], o.window_left + o.q_len);
      most = std::max(most, l.indptr[b + 1] - l.indptr[b]);
    }
    ASSERT_EQ(p.max_pages, most);
    Counts counts;
    int splits = 0;
    if (o.graph_items > 0) {
      counts.assign(std::size_t(batch), 1);
      if (o.split_kv)
        fastattn::decode_graph_split_counts(attended.data(), batch, heads, o.sm_count, o.graph_items, counts.data());
    } else if (!o.split_kv) {
      splits = 1;
    } else if (o.choose_splits) {
      counts.assign(std::size_t(batch), 0);
      if (!fastattn::decode_split_counts_for_lengths(attended.data(), batch, heads, o.sm_count, counts.data())) {
        counts.clear();
        splits = fastattn::decode_num_splits_for_lengths(attended.data(), batch, heads, o.sm_count);
      }
    }
    ASSERT_EQ(p.counts, counts);
    ASSERT_EQ(p.num_splits, splits);
    std::vector<std::int32_t> arrays(l.keys.begin(), l.keys.end());
    if (!counts.empty()) {
      std::int64_t parts = 0;
      for (auto c : counts) parts += c;
      const std::int64_t items = o.graph_items > 0 ? o.graph_items : parts;
      arrays.resize(std::size_t(2 * batch + 1 + items));
      fastattn::decode_split_plan(counts.data(), batch, attended.data(), items, arrays.data() + batch,
                                  batch + 1 + items);
      ++with_counts;
    } else {
      ++one_count;
    }
    ASSERT_EQ(p.arrays, arrays);
  }
  EXPECT_GE(with_counts, 20);
  EXPECT_GE(one_count, 20);
}

/// FlashInfer's fixed_split_size: each sequence is cut into ceil(max(1, attended pages) / size)
/// parts, the same counts it gets in a batch of its own (the batch-invariance that fixed sizes are
/// for), in an eager and a CUDA-graph plan alike; too many parts for a sequence or for the plan
/// is an error naming fixed_split_size; split_kv = false wins.
TEST(DecodePlan, FixedSplitSizeCutsEachSequenceByItsOwnPages) {
  FA_SEEDED_RNG(rng);
  int planned = 0, refused = 0, graphs = 0;
  for (int trial = 0; trial < 150; ++trial) {
    fastattn::PagedDecodePlanOptions o;
    o.page_size = int(pick(rng, std::vector<std::int64_t>{1, 16, 64}));
    o.window_left = rand_int(rng, 0, 2) == 0 ? rand_int(rng, 0, 20000) : -1;
    o.num_kv_heads = int(pick(rng, std::vector<std::int64_t>{1, 8, 32}));
    o.sm_count = int(rand_int(rng, 1, 170));
    o.choose_splits = rand_int(rng, 0, 3) != 0;
    o.q_len = int(pick(rng, std::vector<std::int64_t>{1, 1, 3, 8}));
    const PagedLists l = random_paged_lists(rng, o.page_size, o.q_len);
    const auto batch = std::int64_t(l.keys.size());
    // Expected, from the lists: the attended keys' pages (the union of the q_len rows' windows),
    // then the counts and their limits.
    const auto attended_of = [&](std::int64_t n) {
      return o.window_left >= 0 ? std::min(n, o.window_left + o.q_len) : n;
    };
    Counts want;
    std::int64_t parts = 0, most_parts = 0, most_pages = 1;
    for (std::int64_t n : l.keys) most_pages = std::max(most_pages, up(attended_of(n), o.page_size));
    o.fixed_split_size = std::max<std::int64_t>(1, most_pages / rand_int(rng, 1, 1100));
    for (std::int64_t n : l.keys) {
      const std::int64_t attended = attended_of(n);
      const std::int64_t c = up(std::max<std::int64_t>(1, up(attended, o.page_size)), o.fixed_split_size);
      want.push_back(std::int32_t(std::min<std::int64_t>(c, INT32_MAX)));
      parts += c;
      most_parts = std::max(most_parts, c);
    }
    const bool graph = rand_int(rng, 0, 2) == 0;
    if (graph) o.graph_items = std::clamp<std::int64_t>(parts + rand_int(rng, -3, 40), 1, fastattn::kMaxPlanItems);
    const std::int64_t limit = graph ? o.graph_items : fastattn::kMaxPlanItems;
    if (most_parts > fastattn::kMaxPlanSplits || parts > limit) {
      try {
        fastattn::plan_paged_decode(l.indptr.data(), l.last.data(), batch, l.num_ids, o);
        FAIL() << "no error for " << parts << " parts, " << most_parts << " in one sequence";
      } catch (const fastattn::ValueError& e) {
        const std::string what = e.what();
        EXPECT_NE(what.find("fixed_split_size = " + std::to_string(o.fixed_split_size)), std::string::npos) << what;
        EXPECT_NE(what.find(most_parts > fastattn::kMaxPlanSplits ? "parts, more than 1024" : " parts in all, more than "),
                  std::string::npos)
            << what;
      }
      ++refused;
      continue;
    }
    const fastattn::PagedDecodePlan p = fastattn::plan_paged_decode(l.indptr.data(), l.last.data(), batch, l.num_ids, o);
    ASSERT_EQ(p.counts, want);
    ASSERT_EQ(p.num_splits, 0);
    ASSERT_EQ(std::int64_t(p.arrays.size()), 2 * batch + 1 + (graph ? o.graph_items : parts));
    // Each sequence alone: the same count.
    fastattn::PagedDecodePlanOptions alone = o;
    alone.graph_items = 0;
    for (std::int64_t b = 0; b < batch; b += 7) {
      const Lens indptr{l.indptr[std::size_t(b)], l.indptr[std::size_t(b + 1)]}, last{l.last[std::size_t(b)]};
      const auto one = fastattn::plan_paged_decode(indptr.data(), last.data(), 1, l.num_ids, alone);
      ASSERT_EQ(one.counts, Counts{want[std::size_t(b)]});
    }
    // split_kv = false wins: one split, or counts of 1 in a CUDA-graph plan.
    fastattn::PagedDecodePlanOptions off = o;
    off.split_kv = false;
    const auto unsplit = fastattn::plan_paged_decode(l.indptr.data(), l.last.data(), batch, l.num_ids, off);
    if (graph) {
      ASSERT_EQ(unsplit.counts, Counts(std::size_t(batch), 1));
    } else {
      ASSERT_TRUE(unsplit.counts.empty());
      ASSERT_EQ(unsplit.num_splits, 1);
    }
    ++planned;
    graphs += graph;
  }
  EXPECT_GE(planned, 40);
  EXPECT_GE(graphs, 10);
  EXPECT_GE(refused, 5);

  fastattn::PagedDecodePlanOptions o;
  o.page_size = 16;
  o.num_kv_heads = 8;
  o.sm_count = 132;
  o.fixed_split_size = -1;
  const Lens indptr{0, 3}, last{16};
  try {
    fastattn::plan_paged_decode(indptr.data(), last.data(), 1, 3, o);
    FAIL() << "no error for fixed_split_size -1";
  } catch (const fastattn::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("fixed_split_size must be a page count >= 1 (0: none), got -1"),
              std::string::npos)
        << e.what();
  }
}

TEST(DecodePlan, PagedPlanRefusesBadListsNamingThem) {
  fastattn::PagedDecodePlanOptions o;
  o.page_size = 4;
  o.num_kv_heads = 2;
  o.sm_count = 132;
  const Lens last{3, 4};
  auto message = [&](const Lens& indptr, const Lens& last_len, std::int64_t num_ids) -> std::string {
    try {
      fastattn::plan_paged_decode(indptr.data(), last_len.data(), std::int64_t(last_len.size()), num_ids, o);
    } catch (const fastattn::ValueError& e) {
      return e.what();
    }
    return "no error";
  };
  EXPECT_NE(message({0, 3, 2}, last, 3).find("indptr must be non-decreasing"), std::string::npos);
  EXPECT_NE(message({0, 2, 4}, last, 3).find("indptr must be non-decreasing from >= 0 up to len(indices) = 3, got indptr[2] = 4"),
            std::string::npos);
  EXPECT_NE(message({-1, 2, 3}, last, 3).find("got indptr[0] = -1"), std::string::npos);
  EXPECT_NE(message({0, 2, 3}, {3, 5}, 3).find("last_page_len[1] must be in 1..page_size = 4, got 5"), std::string::npos);
  EXPECT_NE(message({0, 2, 3}, {0, 4}, 3).find("last_page_len[0] must be in 1..page_size = 4, got 0"), std::string::npos);
  EXPECT_EQ(message({0, 0, 3}, {0, 4}, 3), "no error");  // a row without pages: its last_page_len is not read
  // Several query rows per sequence: each must be among its keys (FlashInfer's rule), so a
  // sequence of fewer keys, empty ones included, is refused; at one row an empty one is not.
  o.q_len = 4;
  EXPECT_EQ(message({0, 1, 2}, {4, 4}, 3), "no error");
  EXPECT_NE(message({0, 1, 2}, {4, 3}, 3).find("sequence 1 has 3 keys, fewer than its q_len = 4 query rows "
                                               "(q_len_per_req): its draft tokens must be in the cache"),
            std::string::npos);
  EXPECT_NE(message({0, 0, 2}, {4, 4}, 3).find("sequence 0 has 0 keys, fewer than its q_len = 4"), std::string::npos);
  o.q_len = 0;
  EXPECT_NE(message({0, 1, 2}, {4, 4}, 3).find("q_len (q_len_per_req) must be >= 1, got 0"), std::string::npos);
  o.q_len = 1;
  o.num_qo_heads = 5;
  EXPECT_NE(message({0, 1, 2}, {4, 4}, 3).find("num_qo_heads must be 0 or a multiple of num_kv_heads = 2, got 5"),
            std::string::npos);
  o.num_qo_heads = 0;
  o.page_size = 1 << 20;
  EXPECT_NE(message({0, 2049, 2049}, {1 << 20, 1}, 2049).find("more than 2^31 - 1"), std::string::npos);
  o.page_size = 0;
  EXPECT_NE(message({0, 1, 2}, last, 3).find("page_size must be >= 1"), std::string::npos);
}

TEST(DecodePlan, BadArgumentsAreRefusedBeforeAnyWrite) {
  const Lens ok{5, 6, 7}, negative{5, -1};
  Counts c(3, -7);
  std::vector<std::int32_t> plan(8, -7);
  const Counts counts{1, 2}, zero_count{2, 0};
  EXPECT_THROW(fastattn::decode_num_splits_for_lengths(negative.data(), 2, 8, 132), fastattn::ValueError);
  EXPECT_THROW(fastattn::decode_num_splits_for_lengths(ok.data(), 3, 0, 132), fastattn::ValueError);
  EXPECT_THROW(fastattn::decode_split_counts_for_lengths(ok.data(), 3, 8, 0, c.data()), fastattn::ValueError);
  EXPECT_THROW(fastattn::decode_graph_split_counts(ok.data(), 3, 8, 132, 2, c.data()), fastattn::ValueError);
  EXPECT_THROW(fastattn::decode_graph_plan_items(-1, 8, 132), fastattn::ValueError);
  EXPECT_THROW(fastattn::decode_graph_plan_items(65536, 8, 132), fastattn::ValueError);
  EXPECT_THROW(fastattn::decode_split_plan(zero_count.data(), 2, nullptr, std::nullopt, plan.data(), 5),
               fastattn::ValueError);
  EXPECT_THROW(fastattn::decode_split_plan(counts.data(), 2, nullptr, 2, plan.data(), 5), fastattn::ValueError);
  EXPECT_THROW(fastattn::decode_split_plan(counts.data(), 2, nullptr, std::nullopt, plan.data(), 8),
               fastattn::ValueError);  // plan of the wrong size
  EXPECT_EQ(c, Counts(3, -7));
  EXPECT_EQ(plan, std::vector<std::int32_t>(8, -7));
}

}  // namespace
