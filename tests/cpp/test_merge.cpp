// merge_state, merge_state_in_place, merge_states: against the exact merge, the algebra
// (identity, associativity, empty states) and "merge of partitions == full attention".
//
// Tolerance of a merged value (per element): the exact merge of the stored inputs, rounded once
// to the output dtype, plus float32 arithmetic noise:
//   |ours - exact| <= 0.5 ulp_dtype(exact) + 1e-6 * sum_n |v_n| + 1e-7
// and for the merged LSE (float32): |ours - exact| <= 2e-6 * (1 + |exact|).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "common/softmax_state.h"
#include "test_util.h"

namespace {

using namespace fa_test;
using fa_ref::HostTensor;
using fa_ref::Layout;

constexpr double kInf = std::numeric_limits<double>::infinity();

/// Random states v (shape) and s (shape without D): s in [-6, 6], with probability ~1/5 -inf
/// (then v is junk: an empty state's v must not matter), and rows where every state is empty
/// have v = 0.
struct States {
  HostTensor v, s;
};

::testing::AssertionResult merged_close(const std::vector<double>& ours_v, const std::vector<double>& ours_s,
                                        const std::vector<double>& ref_v, const std::vector<double>& ref_s,
                                        const std::vector<double>& vsum_abs, DType dtype) {
  for (std::size_t i = 0; i < ours_s.size(); ++i) {
    const double o = ours_s[i], r = ref_s[i];
    if (std::isnan(o)) return ::testing::AssertionFailure() << "lse NaN at " << i;
    if (std::isinf(r) || std::isinf(o)) {
      if (o != r) return ::testing::AssertionFailure() << "lse at " << i << ": ours " << o << " exact " << r;
      continue;
    }
    if (std::fabs(o - r) > 2e-6 * (1 + std::fabs(r)))
      return ::testing::AssertionFailure() << "lse at " << i << ": ours " << o << " exact " << r;
  }
  for (std::size_t i = 0; i < ours_v.size(); ++i) {
    const double o = ours_v[i], r = ref_v[i];
    if (std::isnan(o)) return ::testing::AssertionFailure() << "v NaN at " << i;
    const double tol = 0.5 * fa_ref::ulp_of(dtype, r) + 1e-6 * vsum_abs[i] + 1e-7;
    if (!(std::fabs(o - r) <= tol))
      return ::testing::AssertionFailure() << "v at " << i << ": ours " << o << " exact " << r << " tol " << tol;
  }
  return ::testing::AssertionSuccess();
}

/// Fills a (S, H) float32 tensor of LSEs, -inf with probability p_empty.
void fill_lse(HostTensor& s, std::mt19937_64& rng, double p_empty) {
  for (std::int64_t i = 0; i < s.numel(); ++i)
    s.set(i, rand_real(rng, 0, 1) < p_empty ? -kInf : rand_real(rng, -6, 6));
}

class MergeDtype : public ::testing::TestWithParam<DType> {};

TEST_P(MergeDtype, MergeStateMatchesExactMerge) {
  FA_SEEDED_RNG(rng);
  const DType dt = GetParam();
  for (int rep = 0; rep < 3; ++rep) {
    const std::int64_t S = rand_int(rng, 0, 40), H = rand_int(rng, 1, 6), D = 8 * rand_int(rng, 1, 20);
    SCOPED_TRACE("S=" + std::to_string(S) + " H=" + std::to_string(H) + " D=" + std::to_string(D));
    const bool strided = rep == 2;
    auto lay = [&](int nd) { return strided ? Layout::random_strided(nd, rng) : Layout{}; };
    HostTensor va = fa_ref::random_tensor(dt, {S, H, D}, rng, lay(3)), vb = fa_ref::random_tensor(dt, {S, H, D}, rng, lay(3));
    HostTensor sa(DType::kFloat32, {S, H}, lay(2)), sb(DType::kFloat32, {S, H}, lay(2));
    fill_lse(sa, rng, 0.2);
    fill_lse(sb, rng, 0.2);
    for (std::int64_t r = 0; r < S * H; ++r)  // both empty: v = 0
      if (std::isinf(sa.get(r)) && std::isinf(sb.get(r)))
        for (std::int64_t d = 0; d < D; ++d) va.set(r * D + d, 0), vb.set(r * D + d, 0);
    HostTensor vo(dt, {S, H, D}, lay(3)), so(DType::kFloat32, {S, H}, lay(2));
    vo.poison();
    so.poison();
    ASSERT_NO_THROW(fastattn::merge_state(va.view(), sa.view(), vb.view(), sb.view(), vo.view(), so.view()));
    std::vector<double> rv, rs;
    fa_ref::ref_merge_state(va.values(), sa.values(), vb.values(), sb.values(), S, H, D, rv, rs);
    std::vector<double> vabs(rv.size());
    const auto a = va.values(), b = vb.values();
    for (std::size_t i = 0; i < vabs.size(); ++i) vabs[i] = std::fabs(a[i]) + std::fabs(b[i]);
    EXPECT_TRUE(merged_close(vo.values(), so.values(), rv, rs, vabs, dt));
    // Identity: a row where one side is empty equals the other side bitwise.
    for (std::int64_t r = 0; r < S * H; ++r) {
      const bool ea = std::isinf(sa.get(r)), eb = std::isinf(sb.get(r));
      if (ea == eb) continue;
      const HostTensor& other_v = ea ? vb : va;
      const HostTensor& other_s = ea ? sb : sa;
      ASSERT_EQ(so.get(r), other_s.get(r)) << "row " << r;
      for (std::int64_t d = 0; d < D; ++d) ASSERT_EQ(vo.get(r * D + d), other_v.get(r * D + d)) << "row " << r << " d " << d;
    }
    EXPECT_TRUE(vo.gaps_intact());
    EXPECT_TRUE(so.gaps_intact());
  }
}

TEST_P(MergeDtype, MergeStateOutputsMayAliasInputs) {
  FA_SEEDED_RNG(rng);
  const DType dt = GetParam();
  const std::int64_t S = 17, H = 3, D = 64;
  HostTensor va = fa_ref::random_tensor(dt, {S, H, D}, rng), vb = fa_ref::random_tensor(dt, {S, H, D}, rng);
  HostTensor sa(DType::kFloat32, {S, H}), sb(DType::kFloat32, {S, H});
  fill_lse(sa, rng, 0.1);
  fill_lse(sb, rng, 0.1);
  HostTensor vo(dt, {S, H, D}), so(DType::kFloat32, {S, H});
  ASSERT_NO_THROW(fastattn::merge_state(va.view(), sa.view(), vb.view(), sb.view(), vo.view(), so.view()));
  // Now write the result into a's own buffers.
  ASSERT_NO_THROW(fastattn::merge_state(va.view(), sa.view(), vb.view(), sb.view(), va.view(), sa.view()));
  EXPECT_TRUE(bytes_unchanged(vo.bytes(), va.bytes()));
  EXPECT_TRUE(bytes_unchanged(so.bytes(), sa.bytes()));
}

TEST_P(MergeDtype, MergeStateInPlaceWithMask) {
  FA_SEEDED_RNG(rng);
  const DType dt = GetParam();
  for (int mask_kind = 0; mask_kind < 3; ++mask_kind) {  // none, bool, uint8
    SCOPED_TRACE("mask kind " + std::to_string(mask_kind));
    const std::int64_t S = rand_int(rng, 1, 30), H = rand_int(rng, 1, 4), D = 32;
    HostTensor v = fa_ref::random_tensor(dt, {S, H, D}, rng), vo = fa_ref::random_tensor(dt, {S, H, D}, rng);
    HostTensor s(DType::kFloat32, {S, H}), so(DType::kFloat32, {S, H});
    fill_lse(s, rng, 0.15);
    fill_lse(so, rng, 0.15);
    for (std::int64_t r = 0; r < S * H; ++r)
      if (std::isinf(s.get(r)) && std::isinf(so.get(r)))
        for (std::int64_t d = 0; d < D; ++d) v.set(r * D + d, 0), vo.set(r * D + d, 0);
    HostTensor mask(mask_kind == 1 ? DType::kBool : DType::kUInt8, {S});
    std::vector<bool> on(static_cast<std::size_t>(S), true);
    if (mask_kind)
      for (std::int64_t r = 0; r < S; ++r) {
        on[static_cast<std::size_t>(r)] = rand_int(rng, 0, 1) == 1;
        mask.set(r, on[static_cast<std::size_t>(r)] ? (mask_kind == 2 ? rand_int(rng, 1, 255) : 1) : 0);
      }
    const auto v0 = v.values(), s0 = s.values();
    std::optional<fastattn::TensorView> m;
    if (mask_kind) m = mask.view();
    ASSERT_NO_THROW(fastattn::merge_state_in_place(v.view(), s.view(), vo.view(), so.view(), m));
    std::vector<double> rv, rs;
    fa_ref::ref_merge_state(v0, s0, vo.values(), so.values(), S, H, D, rv, rs);
    const auto vn = v.values(), sn = s.values();
    for (std::int64_t r = 0; r < S; ++r) {
      for (std::int64_t i = r * H * D; i < (r + 1) * H * D; ++i) {
        if (!on[static_cast<std::size_t>(r)]) {
          ASSERT_EQ(vn[static_cast<std::size_t>(i)], v0[static_cast<std::size_t>(i)]) << "masked row " << r << " changed";
        } else {
          const double tol = 0.5 * fa_ref::ulp_of(dt, rv[static_cast<std::size_t>(i)]) +
                             1e-6 * (std::fabs(v0[static_cast<std::size_t>(i)]) + std::fabs(vo.get(i))) + 1e-7;
          ASSERT_LE(std::fabs(vn[static_cast<std::size_t>(i)] - rv[static_cast<std::size_t>(i)]), tol) << "row " << r;
        }
      }
      for (std::int64_t h = 0; h < H; ++h) {
        const std::size_t i = static_cast<std::size_t>(r * H + h);
        if (!on[static_cast<std::size_t>(r)]) {
          ASSERT_EQ(sn[i], s0[i]);
        } else if (std::isinf(rs[i])) {
          ASSERT_EQ(sn[i], rs[i]);
        } else {
          ASSERT_LE(std::fabs(sn[i] - rs[i]), 2e-6 * (1 + std::fabs(rs[i])));
        }
      }
    }
  }
}

TEST_P(MergeDtype, MergeAttentionSinksAddOneZeroValueLogit) {
  // merge_attention_sinks against the definition in double: s' = log(exp(s) + exp(sink[h])),
  // v' = v exp(s - s'); empty rows (s = -inf, v = 0) get s' = sink[h] and stay 0. Strided v and
  // s, a strided sinks vector, D not a multiple of 8.
  FA_SEEDED_RNG(rng);
  const DType dt = GetParam();
  for (int trial = 0; trial < 6; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    const std::int64_t S = rand_int(rng, 1, 20), H = rand_int(rng, 1, 6), D = pick(rng, std::vector<std::int64_t>{8, 13, 64});
    HostTensor v = fa_ref::random_tensor(dt, {S, H, D}, rng, Layout::random_strided(3, rng));
    HostTensor s(DType::kFloat32, {S, H}, Layout::random_strided(2, rng));
    fill_lse(s, rng, 0.2);
    for (std::int64_t r = 0; r < S * H; ++r)
      if (std::isinf(s.get(r)))
        for (std::int64_t d = 0; d < D; ++d) v.set(r * D + d, 0);
    HostTensor sinks_wide(DType::kFloat32, {H, 2});  // sinks[h] = sinks_wide[h, 0]: stride 2
    for (std::int64_t i = 0; i < 2 * H; ++i) sinks_wide.set(i, rand_real(rng, -8, 8));
    fastattn::TensorView sinks = sinks_wide.view();
    sinks.ndim = 1;
    const auto v0 = v.values(), s0 = s.values();
    ASSERT_NO_THROW(fastattn::merge_attention_sinks(v.view(), s.view(), sinks));
    EXPECT_TRUE(v.gaps_intact() && s.gaps_intact()) << "wrote outside the views";
    std::vector<double> rv(v0.size()), rs(s0.size()), vsum(v0.size());
    for (std::int64_t r = 0; r < S; ++r)
      for (std::int64_t h = 0; h < H; ++h) {
        const std::size_t i = static_cast<std::size_t>(r * H + h);
        const double sink = sinks_wide.get(2 * h), lse = s0[i];
        const double merged = std::isinf(lse) ? sink : std::max(lse, sink) + std::log1p(std::exp(-std::fabs(lse - sink)));
        rs[i] = merged;
        for (std::int64_t d = 0; d < D; ++d) {
          const std::size_t j = i * static_cast<std::size_t>(D) + static_cast<std::size_t>(d);
          rv[j] = std::isinf(lse) ? 0.0 : v0[j] * std::exp(lse - merged);
          vsum[j] = std::fabs(v0[j]);
        }
      }
    EXPECT_TRUE(merged_close(v.values(), s.values(), rv, rs, vsum, dt));
  }
}

TEST(MergeErrors, AttentionSinksNameTheirShape) {
  FA_SEEDED_RNG(rng);
  HostTensor v = fa_ref::random_tensor(DType::kFloat16, {3, 4, 8}, rng);
  HostTensor s(DType::kFloat32, {3, 4}), sinks(DType::kFloat32, {5}), sinks16(DType::kFloat16, {4});
  try {
    fastattn::merge_attention_sinks(v.view(), s.view(), sinks.view());
    ADD_FAILURE() << "no error";
  } catch (const fastattn::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("sinks"), std::string::npos) << e.what();
  }
  EXPECT_THROW(fastattn::merge_attention_sinks(v.view(), s.view(), sinks16.view()), fastattn::TypeError);
}

TEST_P(MergeDtype, MergeStatesMatchesExactMerge) {
  FA_SEEDED_RNG(rng);
  const DType dt = GetParam();
  for (std::int64_t N : {1, 2, 5, 9}) {
    const std::int64_t S = rand_int(rng, 0, 20), H = rand_int(rng, 1, 4), D = 8 * rand_int(rng, 1, 32);
    SCOPED_TRACE("N=" + std::to_string(N) + " S=" + std::to_string(S) + " H=" + std::to_string(H) + " D=" + std::to_string(D));
    const bool strided = N == 5;
    auto lay = [&](int nd) { return strided ? Layout::random_strided(nd, rng) : Layout{}; };
    HostTensor v = fa_ref::random_tensor(dt, {S, N, H, D}, rng, lay(4));
    HostTensor s(DType::kFloat32, {S, N, H}, lay(3));
    fill_lse(s, rng, N == 1 ? 0.2 : 0.3);
    // Make some rows entirely empty, with v = 0.
    for (std::int64_t r = 0; r < S; ++r)
      if (rand_int(rng, 0, 4) == 0)
        for (std::int64_t n = 0; n < N; ++n)
          for (std::int64_t h = 0; h < H; ++h) {
            s.set((r * N + n) * H + h, -kInf);
            for (std::int64_t d = 0; d < D; ++d) v.set(((r * N + n) * H + h) * D + d, 0);
          }
    for (std::int64_t r = 0; r < S; ++r)
      for (std::int64_t h = 0; h < H; ++h) {
        bool all_empty = true;
        for (std::int64_t n = 0; n < N; ++n) all_empty &= std::isinf(s.get((r * N + n) * H + h));
        if (all_empty)
          for (std::int64_t n = 0; n < N; ++n)
            for (std::int64_t d = 0; d < D; ++d) v.set(((r * N + n) * H + h) * D + d, 0);
      }
    HostTensor vo(dt, {S, H, D}, lay(3)), so(DType::kFloat32, {S, H}, lay(2));
    vo.poison();
    so.poison();
    ASSERT_NO_THROW(fastattn::merge_states(v.view(), s.view(), vo.view(), so.view()));
    std::vector<double> rv, rs;
    fa_ref::ref_merge_states(v.values(), s.values(), S, N, H, D, rv, rs);
    std::vector<double> vabs(rv.size(), 0.0);
    const auto vv = v.values();
    for (std::int64_t r = 0; r < S; ++r)
      for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t h = 0; h < H; ++h)
          for (std::int64_t d = 0; d < D; ++d)
            vabs[static_cast<std::size_t>((r * H + h) * D + d)] += std::fabs(vv[static_cast<std::size_t>(((r * N + n) * H + h) * D + d)]);
    EXPECT_TRUE(merged_close(vo.values(), so.values(), rv, rs, vabs, dt));
    EXPECT_TRUE(vo.gaps_intact());
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MergeDtype, ::testing::ValuesIn(float_dtypes()), dtype_param_name);

TEST(Merge, AssociativeAndCommutative) {
  // float32 states: merge(merge(a, b), c) == merge(a, merge(b, c)) == merge_states([a, b, c])
  // == merge(b, a) merged with c, to float32 noise.
  FA_SEEDED_RNG(rng);
  const std::int64_t S = 23, H = 2, D = 40;
  std::vector<HostTensor> v, s;
  for (int i = 0; i < 3; ++i) {
    v.push_back(fa_ref::random_tensor(DType::kFloat32, {S, H, D}, rng));
    s.push_back(HostTensor(DType::kFloat32, {S, H}));
    fill_lse(s.back(), rng, 0.2);
  }
  auto merge = [&](const HostTensor& va, const HostTensor& sa, const HostTensor& vb, const HostTensor& sb) {
    std::pair<HostTensor, HostTensor> r{HostTensor(DType::kFloat32, {S, H, D}), HostTensor(DType::kFloat32, {S, H})};
    fastattn::merge_state(va.view(), sa.view(), vb.view(), sb.view(), r.first.view(), r.second.view());
    return r;
  };
  auto ab = merge(v[0], s[0], v[1], s[1]);
  auto ba = merge(v[1], s[1], v[0], s[0]);
  auto ab_c = merge(ab.first, ab.second, v[2], s[2]);
  auto bc = merge(v[1], s[1], v[2], s[2]);
  auto a_bc = merge(v[0], s[0], bc.first, bc.second);
  HostTensor all_v(DType::kFloat32, {S, 3, H, D}), all_s(DType::kFloat32, {S, 3, H});
  for (std::int64_t r = 0; r < S; ++r)
    for (std::int64_t n = 0; n < 3; ++n)
      for (std::int64_t h = 0; h < H; ++h) {
        all_s.set((r * 3 + n) * H + h, s[static_cast<std::size_t>(n)].get(r * H + h));
        for (std::int64_t d = 0; d < D; ++d)
          all_v.set(((r * 3 + n) * H + h) * D + d, v[static_cast<std::size_t>(n)].get((r * H + h) * D + d));
      }
  HostTensor mv(DType::kFloat32, {S, H, D}), ms(DType::kFloat32, {S, H});
  fastattn::merge_states(all_v.view(), all_s.view(), mv.view(), ms.view());
  EXPECT_LE(fa_ref::max_abs_diff(ab.first.values(), ba.first.values()), 1e-6);
  EXPECT_LE(fa_ref::max_abs_diff(ab.second.values(), ba.second.values()), 1e-6);
  EXPECT_LE(fa_ref::max_abs_diff(ab_c.first.values(), a_bc.first.values()), 2e-6);
  EXPECT_LE(fa_ref::max_abs_diff(ab_c.second.values(), a_bc.second.values()), 2e-5);
  EXPECT_LE(fa_ref::max_abs_diff(ab_c.first.values(), mv.values()), 2e-6);
  EXPECT_LE(fa_ref::max_abs_diff(ab_c.second.values(), ms.values()), 2e-5);
  EXPECT_FALSE(fa_ref::any_nan(mv.values()));
}

TEST(Merge, EmptyStatesNeverNaN) {
  // All combinations of empty / non-empty, including both empty with junk v (must not be NaN),
  // and extreme but finite LSEs (no overflow).
  const std::int64_t S = 6, H = 1, D = 8;
  HostTensor va(DType::kFloat32, {S, H, D}), vb(DType::kFloat32, {S, H, D});
  for (std::int64_t i = 0; i < S * D; ++i) va.set(i, 1.0 + static_cast<double>(i % 5)), vb.set(i, -2.0);
  const double sa[S] = {-kInf, -kInf, 3.0, 1e4, -1e4, 80.0};
  const double sb[S] = {-kInf, 2.0, -kInf, 1e4 + 1, -1e4, -80.0};
  HostTensor ta(DType::kFloat32, {S, H}), tb(DType::kFloat32, {S, H});
  for (std::int64_t r = 0; r < S; ++r) ta.set(r, sa[r]), tb.set(r, sb[r]);
  HostTensor vo(DType::kFloat32, {S, H, D}), so(DType::kFloat32, {S, H});
  vo.poison();
  so.poison();
  ASSERT_NO_THROW(fastattn::merge_state(va.view(), ta.view(), vb.view(), tb.view(), vo.view(), so.view()));
  EXPECT_FALSE(fa_ref::any_nan(vo.values()));
  EXPECT_FALSE(fa_ref::any_nan(so.values()));
  EXPECT_EQ(so.get(0), -kInf);
  EXPECT_EQ(so.get(1), 2.0);
  EXPECT_EQ(so.get(2), 3.0);
  for (std::int64_t d = 0; d < D; ++d) {
    EXPECT_TRUE(std::isfinite(vo.get(d)));
    EXPECT_EQ(vo.get(1 * D + d), -2.0);
    EXPECT_EQ(vo.get(2 * D + d), va.get(2 * D + d));
  }
  std::vector<double> rv, rs;
  fa_ref::ref_merge_state(va.values(), ta.values(), vb.values(), tb.values(), S, H, D, rv, rs);
  for (std::int64_t r = 3; r < S; ++r) {
    EXPECT_NEAR(so.get(r), rs[static_cast<std::size_t>(r)], 2e-6 * (1 + std::fabs(rs[static_cast<std::size_t>(r)]))) << r;
    for (std::int64_t d = 0; d < D; ++d) EXPECT_NEAR(vo.get(r * D + d), rv[static_cast<std::size_t>(r * D + d)], 1e-5) << r;
  }
  // merge_states with N = 3 all-empty rows: -inf and finite v.
  HostTensor v3(DType::kFloat32, {2, 3, 1, D}), s3(DType::kFloat32, {2, 3, 1});
  for (std::int64_t i = 0; i < 2 * 3; ++i) s3.set(i, -kInf);
  s3.set(3 + 1, 0.5);
  HostTensor v3o(DType::kFloat32, {2, 1, D}), s3o(DType::kFloat32, {2, 1});
  v3o.poison();
  ASSERT_NO_THROW(fastattn::merge_states(v3.view(), s3.view(), v3o.view(), s3o.view()));
  EXPECT_EQ(s3o.get(0), -kInf);
  EXPECT_EQ(s3o.get(1), 0.5);
  EXPECT_FALSE(fa_ref::any_nan(v3o.values()));
}

/// attention_forward over N key partitions (some empty), LSEs merged by merge_states and by a
/// chain of merge_state_in_place, equals full attention.
void check_partition_merge(DType dt, std::mt19937_64& rng) {
  SCOPED_TRACE(fa_ref::dtype_str(dt));
  const std::int64_t Sq = rand_int(rng, 1, 30), Hq = 4, Hkv = 2, D = 64;
  const std::int64_t N = rand_int(rng, 2, 5);
  std::vector<std::int64_t> cuts{0};
  for (std::int64_t n = 0; n < N; ++n) cuts.push_back(cuts.back() + (rand_int(rng, 0, 5) == 0 ? 0 : rand_int(rng, 1, 80)));
  const std::int64_t Sk = cuts.back();
  HostTensor q = fa_ref::random_tensor(dt, {1, Sq, Hq, D}, rng);
  HostTensor k = fa_ref::random_tensor(dt, {1, Sk, Hkv, D}, rng);
  HostTensor v = fa_ref::random_tensor(dt, {1, Sk, Hkv, D}, rng);
  Opts o;
  if (rand_int(rng, 0, 1)) o.softcap = 10;
  if (rand_int(rng, 0, 1)) o.scale = 0.2;
  // Partial outputs are kept in float32 (as a cascade implementation would) for the merge.
  HostTensor pv(DType::kFloat32, {Sq, N, Hq, D}), ps(DType::kFloat32, {Sq, N, Hq});
  HostTensor acc_v(dt, {Sq, Hq, D}), acc_s(DType::kFloat32, {Sq, Hq});
  for (std::int64_t i = 0; i < acc_s.numel(); ++i) acc_s.set(i, -kInf);
  for (std::int64_t n = 0; n < N; ++n) {
    const std::int64_t a = cuts[static_cast<std::size_t>(n)], len = cuts[static_cast<std::size_t>(n + 1)] - a;
    // Views into the key range [a, a + len).
    fastattn::AttentionArgs args;
    args.q = q.view();
    args.k = k.view();
    args.v = v.view();
    const std::size_t off = static_cast<std::size_t>(a * Hkv * D) * fa_ref::elem_size(dt);
    args.k.data = static_cast<unsigned char*>(args.k.data) + off;
    args.v.data = static_cast<unsigned char*>(args.v.data) + off;
    args.k.shape[1] = args.v.shape[1] = len;
    HostTensor out(dt, {1, Sq, Hq, D}), lse(DType::kFloat32, {1, Hq, Sq});
    out.poison();
    lse.poison();
    args.out = out.view();
    args.lse = lse.view();
    args.options = o.lib();
    ASSERT_NO_THROW(fastattn::attention_forward(args));
    for (std::int64_t i = 0; i < Sq; ++i)
      for (std::int64_t h = 0; h < Hq; ++h) {
        ps.set((i * N + n) * Hq + h, lse.get(h * Sq + i));
        for (std::int64_t d = 0; d < D; ++d) pv.set(((i * N + n) * Hq + h) * D + d, out.get((i * Hq + h) * D + d));
      }
    // Running merge in place, in the input dtype.
    HostTensor part_v(dt, {Sq, Hq, D}), part_s(DType::kFloat32, {Sq, Hq});
    for (std::int64_t i = 0; i < Sq * Hq * D; ++i) part_v.set(i, out.get(i));
    for (std::int64_t i = 0; i < Sq; ++i)
      for (std::int64_t h = 0; h < Hq; ++h) part_s.set(i * Hq + h, lse.get(h * Sq + i));
    ASSERT_NO_THROW(fastattn::merge_state_in_place(acc_v.view(), acc_s.view(), part_v.view(), part_s.view()));
  }
  HostTensor mv(DType::kFloat32, {Sq, Hq, D}), ms(DType::kFloat32, {Sq, Hq});
  mv.poison();
  ms.poison();
  ASSERT_NO_THROW(fastattn::merge_states(pv.view(), ps.view(), mv.view(), ms.view()));
  const auto ref = fa_ref::ref_attention(q.values(), k.values(), v.values(), 1, Sq, Sk, Hq, Hkv, D, o.ref());
  const auto naive = fa_ref::ref_attention(q.values(), k.values(), v.values(), 1, Sq, Sk, Hq, Hkv, D, o.ref(), dt);
  // lse (1, Hq, Sq) -> (Sq, Hq)
  auto tr = [&](const std::vector<double>& l) {
    std::vector<double> t(l.size());
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < Sq; ++i) t[static_cast<std::size_t>(i * Hq + h)] = l[static_cast<std::size_t>(h * Sq + i)];
    return t;
  };
  // The partials were rounded to the dtype before merging: allow 3x.
  EXPECT_TRUE(close_to_ref(mv.values(), ref.out, naive.out, 3.0, dt)) << "merge_states";
  EXPECT_TRUE(close_to_ref(ms.values(), tr(ref.lse), tr(naive.lse), 3.0, dt, true)) << "merge_states lse";
  EXPECT_TRUE(close_to_ref(acc_v.values(), ref.out, naive.out, 4.0, dt)) << "merge_state_in_place chain";
  EXPECT_TRUE(close_to_ref(acc_s.values(), tr(ref.lse), tr(naive.lse), 3.0, dt, true)) << "merge_state_in_place lse";
}

TEST(Merge, PartitionsOfKeysEqualFullAttention) {
  FA_SEEDED_RNG(rng);
  for (DType dt : float_dtypes())
    for (int rep = 0; rep < 2; ++rep) check_partition_merge(dt, rng);
}

}  // namespace

// The parallel form of the N-way merge (MergeAccumulator::merge / weight_of, used by the CUDA
// split combine): reducing subsets then merging them gives the LSE and weights of the direct
// formula, computed here in double from the LSEs; empty states weigh 0 and never make NaN.
TEST(MergeAccumulator, ParallelReductionMatchesDirectFormula) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> u(-30.0f, 30.0f);
  for (int n : {1, 2, 5, 33, 100}) {
    std::vector<float> lse(static_cast<std::size_t>(n));
    for (auto& x : lse) x = u(rng);
    lse[0] = -INFINITY;  // an empty split
    // Lane-style reduction: 4 partial accumulators over strided subsets, then merged.
    fastattn::MergeAccumulator part[4];
    for (auto& a : part) a.init();
    for (int s = 0; s < n; ++s) {
      float rescale, weight;
      part[s % 4].add(lse[static_cast<std::size_t>(s)], &rescale, &weight);
    }
    for (int k = 1; k < 4; ++k) part[0].merge(part[k]);
    double m = -INFINITY;
    for (float x : lse) m = std::max(m, static_cast<double>(x));
    double sum = 0.0;
    for (float x : lse) sum += std::exp(static_cast<double>(x) - m);
    if (n == 1) {
      EXPECT_EQ(part[0].lse(), -INFINITY);
      EXPECT_EQ(part[0].weight_of(lse[0]), 0.0f);
      continue;
    }
    EXPECT_NEAR(part[0].lse(), m + std::log(sum), 1e-4);
    for (int s = 0; s < n; ++s) {
      const double expect = std::isinf(lse[static_cast<std::size_t>(s)]) ? 0.0 : std::exp(lse[static_cast<std::size_t>(s)] - m) / sum;
      EXPECT_NEAR(part[0].weight_of(lse[static_cast<std::size_t>(s)]), expect, 1e-5 * std::max(1.0, expect));
    }
  }
}
