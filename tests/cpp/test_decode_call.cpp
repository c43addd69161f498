// The calls of a batch decode wrapper's plan (include/fastattn/decode_call.h): the arguments
// paged_decode_call_args builds, run on the CPU backend, against the double-precision reference
// on fresh random ragged batches over a random NHD page pool, the same pages in the HND layout,
// and its errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "fastattn/decode_call.h"
#include "fastattn/error.h"
#include "fastattn/ops.h"
#include "reference.h"
#include "test_util.h"

namespace {

using namespace fa_test;
using fa_ref::HostTensor;
using fastattn::PagedKVLayout;
using fastattn::TensorView;

/// A ragged batch over a random pool of pages in FlashInfer's NHD layout (P, 2, ps, Hkv, D), with
/// the plan a wrapper makes for it (key lengths, a block table), for N query rows per request
/// (each request then has at least N keys; with one row some have none).
struct Batch {
  std::int64_t B, Hq, Hkv, D, ps, P, width, N;
  std::vector<std::int64_t> lens;
  std::vector<std::vector<std::int64_t>> pages;  ///< each request's page ids
  HostTensor pool, seqlens, table;

  Batch(std::mt19937_64& rng, DType dtype, std::int64_t q_len = 1) : N(q_len) {
    B = rand_int(rng, 1, 6);
    Hkv = pick(rng, std::vector<std::int64_t>{1, 2});
    Hq = Hkv * pick(rng, std::vector<std::int64_t>{1, 3, 4});
    D = pick(rng, std::vector<std::int64_t>{16, 32});
    ps = pick(rng, std::vector<std::int64_t>{1, 4, 16});
    std::int64_t total = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      if (N > 1)
        lens.push_back(rand_int(rng, 0, 3) == 0 ? N : rand_int(rng, N, 150));
      else
        lens.push_back(rand_int(rng, 0, 3) == 0 ? 0 : rand_int(rng, 1, 150));
      total += (lens.back() + ps - 1) / ps;
    }
    P = total + rand_int(rng, 0, 4);  // spare pages no request owns
    std::vector<std::int64_t> order(static_cast<std::size_t>(P));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    width = 1;
    std::size_t next = 0;
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t n = (lens[std::size_t(b)] + ps - 1) / ps;
      pages.emplace_back(order.begin() + std::ptrdiff_t(next), order.begin() + std::ptrdiff_t(next + std::size_t(n)));
      next += std::size_t(n);
      width = std::max(width, n);
    }
    pool = fa_ref::random_tensor(dtype, {P, 2, ps, Hkv, D}, rng);
    seqlens = fa_ref::int_tensor(lens);
    std::vector<std::int64_t> rows;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < width; ++i)
        rows.push_back(i < std::int64_t(pages[std::size_t(b)].size()) ? pages[std::size_t(b)][std::size_t(i)] : 0);
    table = fa_ref::int_tensor_shaped(rows, {B, width});
  }

  fastattn::PagedDecodeCallPlan plan(DType dtype) const {
    fastattn::PagedDecodeCallPlan p;
    p.seqlens = seqlens.view();
    p.block_table = table.view();
    p.batch = B;
    p.q_len = N;
    p.num_qo_heads = Hq;
    p.num_kv_heads = Hkv;
    p.head_dim = D;
    p.page_size = ps;
    p.data_type = fastattn::dtype_name(dtype);
    p.max_page_id = P - 1;
    return p;
  }

  /// (P, ps, Hkv, D) values of the pool's k (which 0) or v (1) half.
  std::vector<double> half(int which) const {
    const auto all = pool.values();
    const std::int64_t page = ps * Hkv * D;
    std::vector<double> out;
    for (std::int64_t p = 0; p < P; ++p) {
      const auto from = all.begin() + std::ptrdiff_t((2 * p + which) * page);
      out.insert(out.end(), from, from + std::ptrdiff_t(page));
    }
    return out;
  }
};

class DecodeCall : public ::testing::TestWithParam<DType> {};

TEST_P(DecodeCall, RunsAgainstTheReference) {
  // One query row per request, or N (speculative decoding: q (B x N, Hq, D), causal within each
  // request's last N keys, as the wrapper's runner sets window_right 0).
  const DType dtype = GetParam();
  FA_SEEDED_RNG(rng);
  for (int trial = 0; trial < 12; ++trial) {
    const std::int64_t N = trial % 3 == 0 ? 1 : pick(rng, std::vector<std::int64_t>{2, 3, 5});
    SCOPED_TRACE("trial " + std::to_string(trial) + ", q_len " + std::to_string(N));
    Batch b(rng, dtype, N);
    const std::int64_t rows = b.B * N;
    HostTensor q = fa_ref::random_tensor(dtype, {rows, b.Hq, b.D}, rng);
    HostTensor out(dtype, {rows, b.Hq, b.D}), lse(DType::kFloat32, {rows, b.Hq});
    out.poison();
    lse.poison();
    const auto pool_before = b.pool.bytes();
    const auto [k_pages, v_pages] =
        fastattn::split_paged_kv_cache(b.pool.view(), PagedKVLayout::kNHD, "paged_kv_cache");
    fastattn::KVCacheArgs a =
        fastattn::paged_decode_call_args(b.plan(dtype), q.view(), k_pages, v_pages, out.view(), lse.view());
    if (N > 1) a.options.window_right = 0;
    fastattn::kvcache_attention_forward(a);

    // The reference: each request's N rows (the last at its last key) over its keys, gathered
    // from its pages.
    std::vector<std::vector<double>> keys, values;
    const auto k64 = b.half(0), v64 = b.half(1);
    for (std::int64_t r = 0; r < b.B; ++r) {
      keys.push_back(fa_ref::gather_paged(k64, b.ps, b.Hkv, b.D, b.pages[std::size_t(r)], b.lens[std::size_t(r)]));
      values.push_back(fa_ref::gather_paged(v64, b.ps, b.Hkv, b.D, b.pages[std::size_t(r)], b.lens[std::size_t(r)]));
    }
    std::vector<std::int64_t> cu_q(std::size_t(b.B + 1));
    for (std::int64_t r = 0; r <= b.B; ++r) cu_q[std::size_t(r)] = r * N;
    fa_ref::RefOptions opt;
    opt.causal = N > 1;
    const std::int64_t max_k = *std::max_element(b.lens.begin(), b.lens.end());
    const auto ref = fa_ref::ref_varlen(q.values(), cu_q, keys, values, b.Hq, b.Hkv, b.D, N, max_k, opt);
    const auto naive = fa_ref::ref_varlen(q.values(), cu_q, keys, values, b.Hq, b.Hkv, b.D, N, max_k, opt, dtype);
    EXPECT_TRUE(close_to_ref(out.values(), ref.out, naive.out, 3.0, dtype));
    // ref_varlen's LSE is (Hq, total_q); the call's (B x N, Hq).
    std::vector<double> lse_t(std::size_t(rows * b.Hq)), naive_t(lse_t.size()), got = lse.values();
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t h = 0; h < b.Hq; ++h) {
        lse_t[std::size_t(r * b.Hq + h)] = ref.lse[std::size_t(h * rows + r)];
        naive_t[std::size_t(r * b.Hq + h)] = naive.lse[std::size_t(h * rows + r)];
      }
    EXPECT_TRUE(close_to_ref(got, lse_t, naive_t, 3.0, dtype, /*is_lse=*/true));
    EXPECT_TRUE(bytes_unchanged(pool_before, b.pool.bytes()));
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, DecodeCall, ::testing::ValuesIn(float_dtypes()), dtype_param_name);

/// `fn` throws E with a message containing `text`.
template <typename E, typename F>
void expect_error(F fn, const std::string& text) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one containing: " << text;
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
  }
}

TEST(DecodeCallErrors, NameTheArrayAndWhatThePlanExpects) {
  FA_SEEDED_RNG(rng);
  Batch b(rng, DType::kFloat32);
  const auto plan = b.plan(DType::kFloat32);
  const auto [k, v] = fastattn::split_paged_kv_cache(b.pool.view(), PagedKVLayout::kNHD, "paged_kv_cache");
  HostTensor q = fa_ref::random_tensor(DType::kFloat32, {b.B, b.Hq, b.D}, rng);
  HostTensor q16 = fa_ref::random_tensor(DType::kFloat16, {b.B, b.Hq, b.D}, rng);
  HostTensor out(DType::kFloat32, {b.B, b.Hq, b.D}), lse(DType::kFloat32, {b.B, b.Hq});
  HostTensor bad_out(DType::kFloat32, {b.B, b.Hq, b.D + 1}), bad_lse(DType::kFloat32, {b.B, b.Hq + 1});
  const std::string shape = "(" + std::to_string(b.B) + ", " + std::to_string(b.Hq) + ", " + std::to_string(b.D) + ")";
  auto call = [&](const TensorView& tq, const TensorView& tk, const TensorView& tv, const TensorView& to,
                  const std::optional<TensorView>& tl) { fastattn::paged_decode_call_args(plan, tq, tk, tv, to, tl); };

  TensorView q_short = q.view();
  q_short.shape[0] = b.B + 1;
  expect_error<fastattn::ValueError>([&] { call(q_short, k, v, out.view(), std::nullopt); },
                                     "q must have shape (batch_size, num_qo_heads, head_dim) = " + shape + " as planned");
  expect_error<fastattn::TypeError>([&] { call(q16.view(), k, v, out.view(), std::nullopt); },
                                    "q has dtype float16 but plan() was given float32");
  TensorView v_narrow = v;
  v_narrow.shape[3] = b.D / 2;
  expect_error<fastattn::ValueError>([&] { call(q.view(), k, v_narrow, out.view(), std::nullopt); },
                                     "paged_kv_cache's v pages must have shape (max_num_pages, page_size, "
                                     "num_kv_heads, head_dim)");
  TensorView k_few = k;
  k_few.shape[0] = b.P - 1;
  expect_error<fastattn::ValueError>([&] { call(q.view(), k_few, v, out.view(), std::nullopt); },
                                     "plan() was given page id " + std::to_string(b.P - 1) + ", but paged_kv_cache holds " +
                                         std::to_string(b.P - 1) + " pages");
  TensorView q_gpu = q.view();
  q_gpu.device = fastattn::Device{fastattn::DeviceType::kCUDA, 0};
  expect_error<fastattn::ValueError>([&] { call(q_gpu, k, v, out.view(), std::nullopt); },
                                     "q must be on the device of the workspace buffer plan() used (the host)");
  expect_error<fastattn::ValueError>([&] { call(q.view(), k, v, bad_out.view(), std::nullopt); },
                                     "out must have shape " + shape);
  expect_error<fastattn::ValueError>([&] { call(q.view(), k, v, out.view(), bad_lse.view()); }, "lse must have shape");
  // N query rows per request: q, out and lse hold B x N rows, and the error says so.
  auto plan3 = plan;
  plan3.q_len = 3;
  const std::string shape3 =
      "(" + std::to_string(3 * b.B) + ", " + std::to_string(b.Hq) + ", " + std::to_string(b.D) + ")";
  expect_error<fastattn::ValueError>(
      [&] { fastattn::paged_decode_call_args(plan3, q.view(), k, v, out.view(), std::nullopt); },
      "q must have shape (batch_size * q_len_per_req, num_qo_heads, head_dim) = " + shape3 +
          " as planned (q_len_per_req = 3), got " + q.view().shape_string());
  HostTensor q3 = fa_ref::random_tensor(DType::kFloat32, {3 * b.B, b.Hq, b.D}, rng);
  expect_error<fastattn::ValueError>(
      [&] { fastattn::paged_decode_call_args(plan3, q3.view(), k, v, out.view(), std::nullopt); },
      "out must have shape " + shape3);
  plan3.q_len = 0;
  expect_error<fastattn::ValueError>(
      [&] { fastattn::paged_decode_call_args(plan3, q3.view(), k, v, out.view(), std::nullopt); },
      "q_len_per_req must be >= 1, got 0");
  HostTensor not_nhd = fa_ref::random_tensor(DType::kFloat32, {b.P, 3, b.ps, b.Hkv, b.D}, rng);
  expect_error<fastattn::ValueError>(
      [&] { fastattn::split_paged_kv_cache(not_nhd.view(), PagedKVLayout::kNHD, "paged_kv_cache"); },
      "paged_kv_cache must have shape (max_num_pages, 2, page_size, num_kv_heads, head_dim) (NHD)");
  expect_error<fastattn::ValueError>(
      [&] { fastattn::split_paged_kv_cache(not_nhd.view(), PagedKVLayout::kHND, "paged_kv_cache"); },
      "paged_kv_cache must have shape (max_num_pages, 2, num_kv_heads, page_size, head_dim) (HND)");
  // Attention sinks: (num_qo_heads) float32 on q's device.
  HostTensor sinks(DType::kFloat32, {b.Hq}), sinks_long(DType::kFloat32, {b.Hq + 1});
  HostTensor sinks16(DType::kFloat16, {b.Hq});
  EXPECT_NO_THROW(fastattn::check_decode_sinks(plan, q.view(), sinks.view()));
  expect_error<fastattn::ValueError>([&] { fastattn::check_decode_sinks(plan, q.view(), sinks_long.view()); },
                                     "sinks must have shape (num_qo_heads,) = (" + std::to_string(b.Hq) +
                                         ",) as planned, got (" + std::to_string(b.Hq + 1) + ",)");
  expect_error<fastattn::TypeError>([&] { fastattn::check_decode_sinks(plan, q.view(), sinks16.view()); },
                                    "sinks must be float32, got float16");
  TensorView sinks_gpu = sinks.view();
  sinks_gpu.device = fastattn::Device{fastattn::DeviceType::kCUDA, 0};
  expect_error<fastattn::ValueError>([&] { fastattn::check_decode_sinks(plan, q.view(), sinks_gpu); },
                                     "sinks must be on q's device (cpu), got cuda:0");
  expect_error<fastattn::ValueError>([&] { fastattn::paged_kv_layout_from_name("NDH"); },
                                     "kv_layout must be 'NHD' or 'HND', got 'NDH'");
  // An HND plan names the HND shape.
  auto hnd_plan = plan;
  hnd_plan.layout = PagedKVLayout::kHND;
  TensorView k_narrow = k;
  k_narrow.shape[3] = b.D / 2;
  expect_error<fastattn::ValueError>(
      [&] { fastattn::paged_decode_call_args(hnd_plan, q.view(), k_narrow, v, out.view(), std::nullopt); },
      "paged_kv_cache's k pages must have shape (max_num_pages, num_kv_heads, page_size, head_dim) = (*, " +
          std::to_string(b.Hkv) + ", " + std::to_string(b.ps) + ", " + std::to_string(b.D) + ") as planned (HND)");
}

/// The pool copied into FlashInfer's HND layout, (P, 2, Hkv, ps, D): the same pages head-major.
HostTensor hnd_copy(const Batch& b) {
  const auto all = b.pool.values();
  std::vector<double> hnd(all.size());
  for (std::int64_t p = 0; p < b.P; ++p)
    for (std::int64_t w = 0; w < 2; ++w)
      for (std::int64_t s = 0; s < b.ps; ++s)
        for (std::int64_t h = 0; h < b.Hkv; ++h)
          for (std::int64_t d = 0; d < b.D; ++d)
            hnd[std::size_t((((p * 2 + w) * b.Hkv + h) * b.ps + s) * b.D + d)] =
                all[std::size_t((((p * 2 + w) * b.ps + s) * b.Hkv + h) * b.D + d)];
  HostTensor t(b.pool.dtype(), {b.P, 2, b.Hkv, b.ps, b.D});
  t.assign(hnd);  // the values are the pool's, already in its dtype: exact
  return t;
}

TEST_P(DecodeCall, HndPagesGiveTheNhdResult) {
  // The same pages in both layouts give the same bits (the op reads HND through swapped
  // strides); the NHD result is the one checked against the reference above.
  const DType dtype = GetParam();
  FA_SEEDED_RNG(rng);
  for (int trial = 0; trial < 4; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    Batch b(rng, dtype);
    HostTensor q = fa_ref::random_tensor(dtype, {b.B, b.Hq, b.D}, rng);
    HostTensor out(dtype, {b.B, b.Hq, b.D}), out_hnd(dtype, {b.B, b.Hq, b.D});
    HostTensor lse(DType::kFloat32, {b.B, b.Hq}), lse_hnd(DType::kFloat32, {b.B, b.Hq});
    out_hnd.poison();
    lse_hnd.poison();
    HostTensor hnd = hnd_copy(b);
    const auto hnd_before = hnd.bytes();
    const auto [k, v] = fastattn::split_paged_kv_cache(b.pool.view(), PagedKVLayout::kNHD, "paged_kv_cache");
    fastattn::kvcache_attention_forward(
        fastattn::paged_decode_call_args(b.plan(dtype), q.view(), k, v, out.view(), lse.view()));
    auto plan = b.plan(dtype);
    plan.layout = PagedKVLayout::kHND;
    const auto [kh, vh] = fastattn::split_paged_kv_cache(hnd.view(), PagedKVLayout::kHND, "paged_kv_cache");
    EXPECT_EQ(kh.shape[1], b.Hkv);
    EXPECT_EQ(kh.shape[2], b.ps);
    fastattn::kvcache_attention_forward(
        fastattn::paged_decode_call_args(plan, q.view(), kh, vh, out_hnd.view(), lse_hnd.view()));
    EXPECT_TRUE(bytes_unchanged(out.bytes(), out_hnd.bytes()));
    EXPECT_TRUE(bytes_unchanged(lse.bytes(), lse_hnd.bytes()));
    EXPECT_TRUE(bytes_unchanged(hnd_before, hnd.bytes()));
  }
}

}  // namespace
