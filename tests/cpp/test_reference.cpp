// Tests of the test reference itself: number conversions and small attention facts known by hand.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "reference.h"
#include "test_util.h"

namespace {

using namespace fa_ref;
using fastattn::DType;

TEST(Reference, HalfRoundTripsEveryBitPattern) {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const double x = half_bits_to_double(static_cast<std::uint16_t>(h));
    if (std::isnan(x)) continue;
    ASSERT_EQ(double_to_half_bits(x), h) << "bits " << h << " value " << x;
  }
}

TEST(Reference, HalfRoundsToNearestEven) {
  EXPECT_EQ(half_bits_to_double(double_to_half_bits(1.0 + std::ldexp(1.0, -11))), 1.0);  // tie -> even
  EXPECT_EQ(half_bits_to_double(double_to_half_bits(1.0 + 3 * std::ldexp(1.0, -11))),
            1.0 + std::ldexp(1.0, -9));  // tie -> even (up)
  EXPECT_EQ(half_bits_to_double(double_to_half_bits(1.0 + std::ldexp(1.0, -11) + 1e-9)),
            1.0 + std::ldexp(1.0, -10));
  EXPECT_EQ(half_bits_to_double(double_to_half_bits(65519.0)), 65504.0);
  EXPECT_TRUE(std::isinf(half_bits_to_double(double_to_half_bits(65520.0))));
  EXPECT_EQ(half_bits_to_double(double_to_half_bits(std::ldexp(1.0, -25))), 0.0);  // tie -> 0
  EXPECT_EQ(half_bits_to_double(double_to_half_bits(3 * std::ldexp(1.0, -26))), std::ldexp(1.0, -24));
  EXPECT_EQ(half_bits_to_double(double_to_half_bits(3 * std::ldexp(1.0, -25))), std::ldexp(1.0, -23));
  EXPECT_EQ(double_to_half_bits(1.0), 0x3c00);
  EXPECT_EQ(double_to_half_bits(-2.0), 0xc000);
  EXPECT_EQ(double_to_half_bits(std::ldexp(1.0, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(double_to_half_bits(-0.0), 0x8000);
  EXPECT_TRUE(std::isnan(half_bits_to_double(double_to_half_bits(std::nan("")))));
}

TEST(Reference, Bf16RoundTripsAndRoundsToNearestEven) {
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const double x = bf16_bits_to_double(static_cast<std::uint16_t>(b));
    if (std::isnan(x)) continue;
    ASSERT_EQ(double_to_bf16_bits(x), b) << "bits " << b;
  }
  EXPECT_EQ(bf16_bits_to_double(double_to_bf16_bits(1.0 + std::ldexp(1.0, -8))), 1.0);
  EXPECT_EQ(bf16_bits_to_double(double_to_bf16_bits(1.0 + 3 * std::ldexp(1.0, -8))), 1.0 + std::ldexp(1.0, -6));
  EXPECT_EQ(double_to_bf16_bits(1.0), 0x3f80);
  EXPECT_TRUE(std::isinf(bf16_bits_to_double(double_to_bf16_bits(3.4e38))));
  EXPECT_EQ(bf16_bits_to_double(double_to_bf16_bits(3.3895e38)), std::ldexp(255.0, 120));  // largest finite
  EXPECT_EQ(bf16_bits_to_double(double_to_bf16_bits(3.38e38)), std::ldexp(254.0, 120));
}

TEST(Reference, HostTensorStridesAndGaps) {
  std::mt19937_64 rng(7);
  Layout l = Layout::random_strided(4, rng);
  HostTensor t(DType::kFloat16, {2, 3, 4, 8}, l);
  EXPECT_EQ(t.strides()[3], 1);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, static_cast<double>(i));
  for (std::int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(t.get(i), static_cast<double>(i));
  EXPECT_TRUE(t.gaps_intact());
  // Every element has its own storage slot.
  std::vector<std::int64_t> offs;
  for (std::int64_t i = 0; i < t.numel(); ++i) offs.push_back(t.storage_offset(i));
  std::sort(offs.begin(), offs.end());
  EXPECT_EQ(std::unique(offs.begin(), offs.end()), offs.end());
}

TEST(Reference, UniformScoresAverageValues) {
  // q = 0: every visible key has score 0, so out = mean of v and lse = log(Sk).
  const std::int64_t Sk = 5, D = 8;
  SeqIn in;
  in.Sq = 1;
  in.Sk = Sk;
  in.q.assign(D, 0.0);
  for (std::int64_t j = 0; j < Sk * D; ++j) {
    in.k.push_back(std::sin(static_cast<double>(j)));
    in.v.push_back(static_cast<double>(j / D));
  }
  SeqOut o = attend_sequence(in, 0, 1, 1, D, RefOptions{});
  for (std::int64_t d = 0; d < D; ++d) EXPECT_NEAR(o.out[static_cast<std::size_t>(d)], 2.0, 1e-12);
  EXPECT_NEAR(o.lse[0], std::log(5.0), 1e-12);
}

TEST(Reference, CausalMaskIsBottomRightAligned) {
  // flash_attn's documented masks: Sq=2, Sk=5 -> 11110 / 11111; Sq=5, Sk=2 -> 00,00,00,10,11.
  auto mask = [](std::int64_t Sq, std::int64_t Sk) {
    SeqIn in;
    in.Sq = Sq;
    in.Sk = Sk;
    in.q.assign(static_cast<std::size_t>(Sq * 8), 0.0);
    in.k.assign(static_cast<std::size_t>(Sk * 8), 0.0);
    in.v.assign(static_cast<std::size_t>(Sk * 8), 1.0);
    RefOptions o;
    o.causal = true;
    SeqOut r = attend_sequence(in, 0, 1, 1, 8, o);
    std::string s;
    for (std::int64_t i = 0; i < Sq; ++i) {
      for (std::int64_t j = 0; j < Sk; ++j) s += r.probs[static_cast<std::size_t>(i * Sk + j)] > 0 ? '1' : '0';
      s += '/';
    }
    return s;
  };
  EXPECT_EQ(mask(2, 5), "11110/11111/");
  EXPECT_EQ(mask(5, 2), "00/00/00/10/11/");
}

TEST(Reference, EmptyRowsGiveZeroAndMinusInf) {
  SeqIn in;
  in.Sq = 3;
  in.Sk = 0;
  in.q.assign(3 * 8, 1.0);
  SeqOut o = attend_sequence(in, 0, 1, 1, 8, RefOptions{});
  for (double x : o.out) EXPECT_EQ(x, 0.0);
  for (double x : o.lse) EXPECT_EQ(x, -std::numeric_limits<double>::infinity());
}

TEST(Reference, MergeOfKeyHalvesEqualsFullAttention) {
  std::mt19937_64 rng(3);
  std::normal_distribution<double> nd;
  const std::int64_t Sq = 4, Sk = 9, H = 2, D = 8;
  SeqIn full;
  full.Sq = Sq;
  full.Sk = Sk;
  for (std::int64_t i = 0; i < Sq * H * D; ++i) full.q.push_back(nd(rng));
  for (std::int64_t i = 0; i < Sk * H * D; ++i) full.k.push_back(nd(rng)), full.v.push_back(nd(rng));
  SeqIn a = full, b = full;
  a.Sk = 4;
  b.Sk = 5;
  a.k.assign(full.k.begin(), full.k.begin() + 4 * H * D);
  a.v.assign(full.v.begin(), full.v.begin() + 4 * H * D);
  b.k.assign(full.k.begin() + 4 * H * D, full.k.end());
  b.v.assign(full.v.begin() + 4 * H * D, full.v.end());
  SeqOut of = attend_sequence(full, 0, H, H, D, RefOptions{});
  SeqOut oa = attend_sequence(a, 0, H, H, D, RefOptions{});
  SeqOut ob = attend_sequence(b, 0, H, H, D, RefOptions{});
  // lse is (H, Sq); merge wants (S, H).
  auto tr = [&](const std::vector<double>& l) {
    std::vector<double> t(l.size());
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < Sq; ++i) t[static_cast<std::size_t>(i * H + h)] = l[static_cast<std::size_t>(h * Sq + i)];
    return t;
  };
  std::vector<double> vo, so;
  ref_merge_state(oa.out, tr(oa.lse), ob.out, tr(ob.lse), Sq, H, D, vo, so);
  EXPECT_LT(max_abs_diff(vo, of.out), 1e-12);
  EXPECT_LT(max_abs_diff(so, tr(of.lse)), 1e-12);
}

TEST(Reference, RotaryRotatesPairs) {
  // Interleaved pairs (0,1), NeoX pairs (0,2) for rotary_dim 4; dims >= rotary_dim untouched.
  std::vector<double> cos{1.0, 1.0, 0.0, 0.5}, sin{0.0, 0.0, 1.0, 0.25};  // (S_rot=2, 2)
  double x[6] = {1, 2, 3, 4, 5, 6};
  apply_rotary(x, 6, 4, true, cos, sin, 1);
  EXPECT_EQ(x[0], -2.0);
  EXPECT_EQ(x[1], 1.0);
  EXPECT_EQ(x[2], 3 * 0.5 - 4 * 0.25);
  EXPECT_EQ(x[3], 3 * 0.25 + 4 * 0.5);
  EXPECT_EQ(x[4], 5.0);
  double y[4] = {1, 2, 3, 4};
  apply_rotary(y, 4, 4, false, cos, sin, 1);
  EXPECT_EQ(y[0], -3.0);  // (y0, y2) rotated by 90 degrees
  EXPECT_EQ(y[2], 1.0);
  EXPECT_EQ(y[1], 2 * 0.5 - 4 * 0.25);
  EXPECT_EQ(y[3], 2 * 0.25 + 4 * 0.5);
}

}  // namespace
