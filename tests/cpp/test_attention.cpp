// attention_forward (dense batched) against the double-precision reference.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "test_util.h"

namespace {

using namespace fa_test;
using fa_ref::HostTensor;
using fa_ref::Layout;

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

struct AttnCase {
  DType dtype = DType::kFloat32;
  std::int64_t B = 1, Sq = 1, Sk = 1, Hq = 1, Hkv = 1, D = 64;
  Opts opts;
  bool strided = false;
  bool lse = true;
  bool probs = false;
  int threads = 0;
  double extra_abs = 0.0;  ///< added to the tolerance (only where a test explains why)

  std::string str() const {
    std::ostringstream s;
    s << fa_ref::dtype_str(dtype) << " B=" << B << " Sq=" << Sq << " Sk=" << Sk << " Hq=" << Hq
      << " Hkv=" << Hkv << " D=" << D << " " << opts.str() << " strided=" << strided
      << " lse=" << lse << " probs=" << probs << " threads=" << threads;
    return s.str();
  }
};

struct AttnResult {
  std::vector<double> out, lse, probs;
};

/// Runs one case through attention_forward and checks out / lse / probs against the reference,
/// that every output element was written, that nothing outside the views was written and that
/// the inputs are unchanged.
AttnResult run_attention(AttnCase c, std::mt19937_64& rng) {
  SCOPED_TRACE(c.str());
  AttnResult res;
  auto layout = [&](int nd) { return c.strided ? Layout::random_strided(nd, rng) : Layout{}; };
  HostTensor q = fa_ref::random_tensor(c.dtype, {c.B, c.Sq, c.Hq, c.D}, rng, layout(4));
  HostTensor k = fa_ref::random_tensor(c.dtype, {c.B, c.Sk, c.Hkv, c.D}, rng, layout(4));
  HostTensor v = fa_ref::random_tensor(c.dtype, {c.B, c.Sk, c.Hkv, c.D}, rng, layout(4));
  HostTensor out(c.dtype, {c.B, c.Sq, c.Hq, c.D}, layout(4));
  HostTensor lse(DType::kFloat32, {c.B, c.Hq, c.Sq}, layout(3));
  HostTensor probs(DType::kFloat32, {c.B, c.Hq, c.Sq, c.Sk});  // the API asks for contiguous probs
  out.poison();
  lse.poison();
  probs.poison();
  c.opts.make_alibi(c.B, c.Hq, rng);
  c.opts.make_sinks(c.Hq, rng);

  fastattn::AttentionArgs a;
  a.q = q.view();
  a.k = k.view();
  a.v = v.view();
  a.out = out.view();
  if (c.lse) a.lse = lse.view();
  if (c.probs) a.probs = probs.view();
  a.sinks = c.opts.sinks_view();
  a.options = c.opts.lib();
  a.exec.num_threads = c.threads;
  const auto qb = q.bytes(), kb = k.bytes(), vb = v.bytes();
  try {
    fastattn::attention_forward(a);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "attention_forward threw: " << e.what();
    return res;
  }
  const auto ref = fa_ref::ref_attention(q.values(), k.values(), v.values(), c.B, c.Sq, c.Sk, c.Hq,
                                         c.Hkv, c.D, c.opts.ref());
  const auto naive = fa_ref::ref_attention(q.values(), k.values(), v.values(), c.B, c.Sq, c.Sk,
                                           c.Hq, c.Hkv, c.D, c.opts.ref(), c.dtype);
  res.out = out.values();
  EXPECT_TRUE(close_to_ref(res.out, ref.out, naive.out, 2.0, c.dtype, false, c.extra_abs)) << "out";
  if (c.lse) {
    res.lse = lse.values();
    EXPECT_TRUE(close_to_ref(res.lse, ref.lse, naive.lse, 2.0, c.dtype, true, c.extra_abs)) << "lse";
  }
  if (c.probs) {
    res.probs = probs.values();
    EXPECT_TRUE(close_to_ref(res.probs, ref.probs, naive.probs, 2.0, c.dtype)) << "probs";
  }
  EXPECT_TRUE(out.gaps_intact()) << "out written outside its view";
  EXPECT_TRUE(lse.gaps_intact()) << "lse written outside its view";
  EXPECT_TRUE(bytes_unchanged(qb, q.bytes())) << "q modified";
  EXPECT_TRUE(bytes_unchanged(kb, k.bytes())) << "k modified";
  EXPECT_TRUE(bytes_unchanged(vb, v.bytes())) << "v modified";
  return res;
}

class AttentionDtype : public ::testing::TestWithParam<DType> {};

TEST_P(AttentionDtype, Plain) {
  FA_SEEDED_RNG(rng);
  AttnCase c;
  c.dtype = GetParam();
  c.B = 2;
  c.Sq = c.Sk = rand_int(rng, 1, 80);
  c.Hq = c.Hkv = 3;
  c.D = 64;
  run_attention(c, rng);
}

TEST_P(AttentionDtype, EachOptionAlone) {
  FA_SEEDED_RNG(rng);
  for (int which = 0; which < 10; ++which) {
    AttnCase c;
    c.dtype = GetParam();
    c.B = 2;
    c.Sq = rand_int(rng, 1, 70);
    c.Sk = rand_int(rng, 1, 90);
    c.Hq = 4;
    c.Hkv = 2;
    c.D = 32;
    switch (which) {
      case 0: c.opts.scale = rand_real(rng, 0.01, 0.5); break;
      case 1: c.opts.causal = true; break;
      case 2: c.opts.left = rand_int(rng, 0, 20); break;
      case 3: c.opts.right = rand_int(rng, 0, 20); break;
      case 4: c.opts.left = rand_int(rng, 0, 20), c.opts.right = rand_int(rng, 0, 20); break;
      case 5: c.opts.softcap = rand_real(rng, 0.5, 20); c.opts.scale = 1.0; break;  // scores > cap
      case 6: c.opts.alibi = 1; break;
      case 7: c.opts.alibi = 2; break;
      case 8: c.opts.scale = 0.0; break;    // uniform attention
      case 9: c.opts.scale = -0.15; break;  // a negative scale is just a number
    }
    run_attention(c, rng);
  }
}

TEST_P(AttentionDtype, CombinedOptionsGqa) {
  FA_SEEDED_RNG(rng);
  for (std::int64_t ratio : {1, 4, 8}) {
    for (int shape = 0; shape < 3; ++shape) {
      AttnCase c;
      c.dtype = GetParam();
      c.B = rand_int(rng, 1, 3);
      c.Hkv = rand_int(rng, 1, 2);
      c.Hq = c.Hkv * ratio;
      c.D = pick(rng, std::vector<std::int64_t>{16, 64, 96});
      const std::int64_t a = rand_int(rng, 1, 40), b = rand_int(rng, 41, 140);
      if (shape == 0) c.Sq = b, c.Sk = a;  // Sq > Sk: top rows fully masked under causal
      if (shape == 1) c.Sq = a, c.Sk = b;
      if (shape == 2) c.Sq = c.Sk = b;
      c.opts.causal = true;
      c.opts.left = rand_int(rng, 0, 50);
      c.opts.softcap = rand_real(rng, 5, 30);
      c.opts.alibi = static_cast<int>(rand_int(rng, 1, 2));
      c.probs = rand_int(rng, 0, 1) == 1;
      run_attention(c, rng);
    }
  }
}

TEST_P(AttentionDtype, HeadDims) {
  FA_SEEDED_RNG(rng);
  for (std::int64_t D : {8, 24, 40, 64, 80, 128, 136, 200, 248, 256}) {
    AttnCase c;
    c.dtype = GetParam();
    c.B = 1;
    c.Sq = rand_int(rng, 1, 40);
    c.Sk = rand_int(rng, 1, 150);
    c.Hq = 2;
    c.Hkv = 1;
    c.D = D;
    c.opts = random_opts(rng);
    run_attention(c, rng);
  }
}

TEST_P(AttentionDtype, NonContiguousStrides) {
  FA_SEEDED_RNG(rng);
  for (int rep = 0; rep < 3; ++rep) {
    AttnCase c;
    c.dtype = GetParam();
    c.B = rand_int(rng, 1, 3);
    c.Sq = rand_int(rng, 1, 60);
    c.Sk = rand_int(rng, 1, 100);
    c.Hkv = rand_int(rng, 1, 2);
    c.Hq = c.Hkv * rand_int(rng, 1, 3);
    c.D = 48;
    c.opts = random_opts(rng);
    c.strided = true;
    run_attention(c, rng);
  }
}

TEST_P(AttentionDtype, Randomized) {
  FA_SEEDED_RNG(rng);
  for (int rep = 0; rep < 8; ++rep) {
    AttnCase c;
    c.dtype = GetParam();
    c.B = rand_int(rng, 1, 3);
    c.Sq = ragged_len(rng, 130);
    c.Sk = ragged_len(rng, 200);
    c.Hkv = rand_int(rng, 1, 2);
    c.Hq = c.Hkv * pick(rng, std::vector<std::int64_t>{1, 2, 3, 4, 6, 8});
    c.D = 8 * rand_int(rng, 1, 16);
    c.opts = random_opts(rng);
    c.strided = rand_int(rng, 0, 1) == 1;
    c.lse = rand_int(rng, 0, 3) != 0;
    c.probs = rand_int(rng, 0, 3) == 0;
    c.threads = static_cast<int>(rand_int(rng, 0, 2));
    run_attention(c, rng);
  }
}

TEST_P(AttentionDtype, Sinks) {
  // Attention sinks: one more logit per head with a zero value row, in out, LSE and probs. Rows
  // that see no key (causal with Sq > Sk, a window) get out 0 and LSE sinks[h].
  FA_SEEDED_RNG(rng);
  for (int which = 0; which < 6; ++which) {
    AttnCase c;
    c.dtype = GetParam();
    c.B = rand_int(rng, 1, 3);
    c.Sq = rand_int(rng, 1, 70);
    c.Sk = rand_int(rng, 1, 90);
    c.Hkv = rand_int(rng, 1, 2);
    c.Hq = c.Hkv * pick(rng, std::vector<std::int64_t>{1, 4});
    c.D = pick(rng, std::vector<std::int64_t>{16, 64, 128});
    c.opts.sinks = true;
    c.probs = rand_int(rng, 0, 1) == 1;
    switch (which) {
      case 0: break;
      case 1: c.opts.causal = true, c.Sq = c.Sk + rand_int(rng, 1, 20); break;  // leading rows empty
      case 2: c.opts.left = rand_int(rng, 0, 10), c.opts.right = 0; break;
      case 3: c.opts.softcap = rand_real(rng, 2, 20); c.opts.scale = 1.0; break;
      case 4: c.opts.alibi = 2; c.strided = true; break;
      case 5: c.opts = random_opts(rng), c.opts.sinks = true; break;
    }
    run_attention(c, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, AttentionDtype, ::testing::ValuesIn(float_dtypes()), dtype_param_name);

TEST(Attention, LongSequenceHeadDim128) {
  // One larger problem so the kernel's tiling runs over many key/query blocks.
  FA_SEEDED_RNG(rng);
  AttnCase c;
  c.dtype = DType::kBFloat16;
  c.B = 1;
  c.Sq = 333;
  c.Sk = 799;
  c.Hq = 4;
  c.Hkv = 2;
  c.D = 128;
  c.opts.causal = true;
  run_attention(c, rng);
}

TEST(Attention, NoKeysGivesZeroAndMinusInf) {
  FA_SEEDED_RNG(rng);
  for (DType dt : float_dtypes()) {
    AttnCase c;
    c.dtype = dt;
    c.B = 2;
    c.Sq = 5;
    c.Sk = 0;
    c.Hq = 2;
    c.Hkv = 1;
    c.D = 16;
    c.opts = random_opts(rng);
    c.probs = true;
    AttnResult r = run_attention(c, rng);
    for (double x : r.out) ASSERT_EQ(x, 0.0);
    for (double x : r.lse) ASSERT_EQ(x, kNegInf);
  }
}

TEST(Attention, ZeroSizeProbs) {
  // probs of shape (B, Hq, Sq, 0) or (B, Hq, 0, Sk) has no elements; whatever its strides it is
  // contiguous (torch and numpy say so) and must be accepted.
  FA_SEEDED_RNG(rng);
  for (auto [sq, sk] : {std::pair<std::int64_t, std::int64_t>{5, 0}, {0, 7}}) {
    AttnCase c;
    c.B = 2;
    c.Sq = sq;
    c.Sk = sk;
    c.Hq = 2;
    c.Hkv = 1;
    c.D = 16;
    c.probs = true;
    run_attention(c, rng);
  }
}

TEST(Attention, NoQueriesOrNoBatch) {
  FA_SEEDED_RNG(rng);
  AttnCase c;
  c.Sq = 0;
  c.Sk = 7;
  c.Hq = 2;
  c.Hkv = 2;
  c.D = 8;
  c.B = 2;
  run_attention(c, rng);
  c.B = 0;
  c.Sq = 3;
  run_attention(c, rng);
}

TEST(Attention, FullyMaskedRowsAreExactlyZero) {
  // causal with Sq = 5 > Sk = 2: rows 0..2 see nothing (flash_attn's documented example).
  FA_SEEDED_RNG(rng);
  for (DType dt : float_dtypes()) {
    AttnCase c;
    c.dtype = dt;
    c.Sq = 5;
    c.Sk = 2;
    c.Hq = 1;
    c.Hkv = 1;
    c.D = 8;
    c.opts.causal = true;
    c.probs = true;
    AttnResult r = run_attention(c, rng);
    ASSERT_EQ(r.out.size(), 40u);
    for (int i = 0; i < 3 * 8; ++i) EXPECT_EQ(r.out[static_cast<std::size_t>(i)], 0.0) << i;
    for (int i = 0; i < 3; ++i) EXPECT_EQ(r.lse[static_cast<std::size_t>(i)], kNegInf);
    EXPECT_NE(r.lse[3], kNegInf);
    // Row 3 sees only key 0.
    EXPECT_NEAR(r.probs[3 * 2 + 0], 1.0, 1e-6);
    EXPECT_EQ(r.probs[3 * 2 + 1], 0.0);
  }
}

TEST(Attention, WindowOnlyDiagonal) {
  // window (0, 0): every row sees exactly its aligned key, so out row = v row and probs = 1.
  FA_SEEDED_RNG(rng);
  AttnCase c;
  c.dtype = DType::kFloat16;
  c.Sq = 9;
  c.Sk = 9;
  c.Hq = 2;
  c.Hkv = 2;
  c.D = 16;
  c.opts.left = 0;
  c.opts.right = 0;
  c.opts.alibi = 1;
  c.opts.softcap = 3;
  run_attention(c, rng);
}

TEST(Attention, LargeScoresDoNotOverflow) {
  // Scores of several hundred: exp must be taken relative to the running max.
  FA_SEEDED_RNG(rng);
  for (DType dt : float_dtypes()) {
    AttnCase c;
    c.dtype = dt;
    c.Sq = 17;
    c.Sk = 113;
    c.Hq = 2;
    c.Hkv = 2;
    c.D = 64;
    c.opts.scale = 20.0;
    // Scores of magnitude ~500: one float32 rounding of a score (e.g. folding scale * log2(e)
    // into q, as FlashAttention does) moves exp(s - max) by ~500 * 6e-8 = 3e-5 relative, an
    // error the naive float32 computation need not make. This test is about overflow, so it
    // allows that much on top of the usual bound for float32.
    if (dt == DType::kFloat32) c.extra_abs = 1e-4;
    run_attention(c, rng);
  }
}

TEST(Attention, RepeatedCallsAreBitwiseIdentical) {
  FA_SEEDED_RNG(rng);
  const std::uint64_t seed = rng();
  AttnCase c;
  c.dtype = DType::kFloat32;
  c.B = 2;
  c.Sq = 37;
  c.Sk = 91;
  c.Hq = 4;
  c.Hkv = 1;
  c.D = 32;
  c.opts.causal = true;
  std::mt19937_64 r1(seed), r2(seed);
  AttnResult a = run_attention(c, r1);
  AttnResult b = run_attention(c, r2);
  ASSERT_EQ(a.out.size(), b.out.size());
  for (std::size_t i = 0; i < a.out.size(); ++i) ASSERT_EQ(a.out[i], b.out[i]) << i;
}

TEST(Attention, ProbsMatchSoftmaxRows) {
  // The testing-aid probs: each visible row sums to 1, masked entries are 0.
  FA_SEEDED_RNG(rng);
  AttnCase c;
  c.dtype = DType::kFloat32;
  c.B = 2;
  c.Sq = 21;
  c.Sk = 13;
  c.Hq = 2;
  c.Hkv = 1;
  c.D = 8;
  c.opts.causal = true;
  c.opts.left = 4;
  c.probs = true;
  AttnResult r = run_attention(c, rng);
  ASSERT_EQ(r.probs.size(), static_cast<std::size_t>(2 * 2 * 21 * 13));
  for (std::int64_t row = 0; row < 2 * 2 * 21; ++row) {
    const std::int64_t i = row % 21;
    double sum = 0;
    for (std::int64_t j = 0; j < 13; ++j) {
      const double p = r.probs[static_cast<std::size_t>(row * 13 + j)];
      const std::int64_t qpos = i + 13 - 21;
      if (j > qpos || j < qpos - 4) {
        EXPECT_EQ(p, 0.0) << row << "," << j;
      }
      sum += p;
    }
    const std::int64_t qpos = i + 13 - 21;
    if (qpos >= 0) {
      EXPECT_NEAR(sum, 1.0, 1e-5) << row;
    }
    else EXPECT_EQ(sum, 0.0) << row;
  }
}

}  // namespace
