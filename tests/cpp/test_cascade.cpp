// shared_prefix_attention_forward (cascade): equals full attention over prefix + own suffix.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "test_util.h"

namespace {

using namespace fa_test;
using fa_ref::HostTensor;
using fa_ref::Layout;

struct CascadeCase {
  DType dtype = DType::kFloat32;
  std::int64_t P = 64;                 ///< shared prefix length
  std::vector<std::int64_t> suffix;    ///< per-request suffix lengths
  std::vector<std::int64_t> lq;        ///< per-request query rows; empty = decode (no qo_indptr)
  std::int64_t Hq = 4, Hkv = 1, D = 64, page_size = 16;
  Opts opts;
  bool strided = false, lse = true, workspace = false;
  std::vector<std::int64_t> fixed_indptr;  ///< when set, the page counts per request

  std::string str() const {
    std::ostringstream s;
    s << fa_ref::dtype_str(dtype) << " P=" << P << " suffix=" << shape_str(suffix)
      << " lq=" << (lq.empty() ? std::string("decode") : shape_str(lq)) << " Hq=" << Hq << " Hkv=" << Hkv
      << " D=" << D << " page_size=" << page_size << " " << opts.str() << " strided=" << strided
      << " lse=" << lse << " workspace=" << workspace;
    return s.str();
  }
};

void run_cascade(CascadeCase c, std::mt19937_64& rng) {
  SCOPED_TRACE(c.str());
  auto layout = [&](int nd) { return c.strided ? Layout::random_strided(nd, rng) : Layout{}; };
  const auto B = static_cast<std::int64_t>(c.suffix.size());
  const bool decode = c.lq.empty();
  std::vector<std::int64_t> lq = decode ? std::vector<std::int64_t>(static_cast<std::size_t>(B), 1) : c.lq;
  const auto cu_q = cumsum0(lq);
  const std::int64_t total_q = cu_q.back();
  const std::int64_t ps = c.page_size;
  c.opts.make_alibi(B, c.Hq, rng);

  HostTensor q = fa_ref::random_tensor(c.dtype, {total_q, c.Hq, c.D}, rng, layout(3));
  HostTensor ks = fa_ref::random_tensor(c.dtype, {c.P, c.Hkv, c.D}, rng, layout(3));
  HostTensor vs = fa_ref::random_tensor(c.dtype, {c.P, c.Hkv, c.D}, rng, layout(3));
  // Suffix pages, CSR, lengths from last_page_len (a request with no page has length 0).
  std::vector<std::int64_t> npages;
  for (auto len : c.suffix) npages.push_back((len + ps - 1) / ps);
  std::int64_t used = std::accumulate(npages.begin(), npages.end(), std::int64_t{0});
  const std::int64_t num_pages = used + rand_int(rng, 1, 3);
  std::vector<std::int64_t> perm(static_cast<std::size_t>(num_pages));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<std::int64_t> indptr{0}, indices, last;
  std::vector<std::vector<std::int64_t>> pages(static_cast<std::size_t>(B));
  std::size_t next = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t p = 0; p < npages[static_cast<std::size_t>(b)]; ++p) {
      pages[static_cast<std::size_t>(b)].push_back(perm[next]);
      indices.push_back(perm[next++]);
    }
    indptr.push_back(static_cast<std::int64_t>(indices.size()));
    const std::int64_t len = c.suffix[static_cast<std::size_t>(b)];
    last.push_back(len == 0 ? 0 : len - (npages[static_cast<std::size_t>(b)] - 1) * ps);
  }
  HostTensor kp = fa_ref::random_tensor(c.dtype, {num_pages, ps, c.Hkv, c.D}, rng, layout(4));
  HostTensor vp = fa_ref::random_tensor(c.dtype, {num_pages, ps, c.Hkv, c.D}, rng, layout(4));
  HostTensor indptr_t = fa_ref::int_tensor(indptr), indices_t = fa_ref::int_tensor(indices), last_t = fa_ref::int_tensor(last);
  HostTensor qo_t = fa_ref::int_tensor(cu_q);
  HostTensor out(c.dtype, {total_q, c.Hq, c.D}, layout(3));
  HostTensor lse(DType::kFloat32, {c.Hq, total_q}, layout(2));
  out.poison();
  lse.poison();

  fastattn::SharedPrefixAttentionArgs a;
  a.q = q.view();
  if (!decode) a.qo_indptr = qo_t.view();
  a.k_shared = ks.view();
  a.v_shared = vs.view();
  a.suffix.k_pages = kp.view();
  a.suffix.v_pages = vp.view();
  a.suffix.page_indptr = indptr_t.view();
  a.suffix.page_indices = indices_t.view();
  a.suffix.last_page_len = last_t.view();
  a.out = out.view();
  if (c.lse) a.lse = lse.view();
  a.options = c.opts.lib();
  HostTensor ws;
  if (c.workspace) {
    const std::size_t bytes = fastattn::shared_prefix_workspace_bytes(a);
    ws = HostTensor(DType::kUInt8, {static_cast<std::int64_t>(bytes)});
    ws.poison();
    a.workspace = ws.view();
  }
  const auto before = std::vector<std::vector<unsigned char>>{q.bytes(), ks.bytes(), vs.bytes(), kp.bytes(), vp.bytes()};
  try {
    fastattn::shared_prefix_attention_forward(a);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "shared_prefix_attention_forward threw: " << e.what();
    return;
  }
  // Reference: attention of each request over the concatenated prefix and suffix.
  const auto ksv = ks.values(), vsv = vs.values(), kpv = kp.values(), vpv = vp.values();
  std::vector<std::vector<double>> keys, vals;
  std::int64_t max_k = 0, max_q = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t len = c.suffix[static_cast<std::size_t>(b)];
    std::vector<double> kb = ksv, vb = vsv;
    const auto sk = fa_ref::gather_paged(kpv, ps, c.Hkv, c.D, pages[static_cast<std::size_t>(b)], len);
    const auto sv = fa_ref::gather_paged(vpv, ps, c.Hkv, c.D, pages[static_cast<std::size_t>(b)], len);
    kb.insert(kb.end(), sk.begin(), sk.end());
    vb.insert(vb.end(), sv.begin(), sv.end());
    keys.push_back(kb);
    vals.push_back(vb);
    max_k = std::max(max_k, c.P + len);
    max_q = std::max(max_q, lq[static_cast<std::size_t>(b)]);
  }
  const auto ref = fa_ref::ref_varlen(q.values(), cu_q, keys, vals, c.Hq, c.Hkv, c.D, max_q, max_k, c.opts.ref());
  const auto naive = fa_ref::ref_varlen(q.values(), cu_q, keys, vals, c.Hq, c.Hkv, c.D, max_q, max_k, c.opts.ref(), c.dtype);
  EXPECT_TRUE(close_to_ref(out.values(), ref.out, naive.out, 2.0, c.dtype)) << "out";
  if (c.lse) {
    EXPECT_TRUE(close_to_ref(lse.values(), ref.lse, naive.lse, 2.0, c.dtype, true)) << "lse";
  }
  EXPECT_TRUE(out.gaps_intact());
  EXPECT_TRUE(lse.gaps_intact());
  if (c.workspace) {
    EXPECT_TRUE(ws.gaps_intact()) << "written past the end of the workspace";
  }
  const auto after = std::vector<std::vector<unsigned char>>{q.bytes(), ks.bytes(), vs.bytes(), kp.bytes(), vp.bytes()};
  for (std::size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(bytes_unchanged(before[i], after[i])) << "input " << i << " modified";
}

std::vector<std::int64_t> ragged(std::mt19937_64& rng, std::int64_t n, std::int64_t hi) {
  std::vector<std::int64_t> l;
  for (std::int64_t i = 0; i < n; ++i) l.push_back(ragged_len(rng, hi));
  return l;
}

class CascadeDtype : public ::testing::TestWithParam<DType> {};

TEST_P(CascadeDtype, DecodeAllPageSizes) {
  FA_SEEDED_RNG(rng);
  for (std::int64_t ps : {1, 5, 16, 256}) {
    CascadeCase c;
    c.dtype = GetParam();
    c.page_size = ps;
    c.P = rand_int(rng, 1, 300);
    c.suffix = ragged(rng, rand_int(rng, 1, 7), ps == 1 ? 40 : 200);
    c.Hkv = rand_int(rng, 1, 2);
    c.Hq = c.Hkv * pick(rng, std::vector<std::int64_t>{1, 4, 8});
    c.opts = random_opts(rng);
    run_cascade(c, rng);
  }
}

TEST_P(CascadeDtype, PrefillCausal) {
  FA_SEEDED_RNG(rng);
  for (int rep = 0; rep < 3; ++rep) {
    CascadeCase c;
    c.dtype = GetParam();
    c.P = rand_int(rng, 0, 150);
    const std::int64_t B = rand_int(rng, 1, 4);
    c.suffix = ragged(rng, B, 120);
    for (std::int64_t b = 0; b < B; ++b) c.lq.push_back(rand_int(rng, 0, c.suffix[static_cast<std::size_t>(b)]));
    c.Hq = 4;
    c.Hkv = 2;
    c.D = 32;
    c.opts.causal = true;
    c.page_size = pick(rng, std::vector<std::int64_t>{5, 16});
    run_cascade(c, rng);
  }
}

TEST_P(CascadeDtype, CombinedOptions) {
  FA_SEEDED_RNG(rng);
  for (std::int64_t ratio : {1, 4, 8}) {
    CascadeCase c;
    c.dtype = GetParam();
    c.P = rand_int(rng, 1, 200);
    const std::int64_t B = rand_int(rng, 1, 4);
    c.suffix = ragged(rng, B, 100);
    for (std::int64_t b = 0; b < B; ++b) c.lq.push_back(ragged_len(rng, 30));  // may exceed the suffix
    c.Hkv = 1;
    c.Hq = ratio;
    c.D = 48;
    c.opts.causal = true;
    c.opts.left = rand_int(rng, 0, 150);
    c.opts.softcap = rand_real(rng, 5, 30);
    c.opts.alibi = static_cast<int>(rand_int(rng, 1, 2));
    c.strided = true;
    c.workspace = rand_int(rng, 0, 1) == 1;
    run_cascade(c, rng);
  }
}

TEST_P(CascadeDtype, HeadDims) {
  FA_SEEDED_RNG(rng);
  for (std::int64_t D : {8, 136, 256}) {
    CascadeCase c;
    c.dtype = GetParam();
    c.D = D;
    c.P = rand_int(rng, 1, 100);
    c.suffix = ragged(rng, 3, 60);
    c.Hq = 2;
    c.Hkv = 1;
    c.opts = random_opts(rng);
    c.workspace = true;
    run_cascade(c, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CascadeDtype, ::testing::ValuesIn(float_dtypes()), dtype_param_name);

TEST(Cascade, FlashInferDocShapesScaledDown) {
  // The seed's BatchDecodeWithSharedPrefixPagedKVCacheWrapper example (7 requests, page_size 16,
  // last_page_len [1, 7, 14, 4, 3, 1, 16], page counts from indptr [0,17,29,44,48,66,100,128]),
  // with a 1024-token prefix and 8 query heads over 1 kv head instead of 8192 and 64/8.
  FA_SEEDED_RNG(rng);
  CascadeCase c;
  c.dtype = DType::kFloat16;
  c.P = 1024;
  const std::vector<std::int64_t> indptr{0, 17, 29, 44, 48, 66, 100, 128}, last{1, 7, 14, 4, 3, 1, 16};
  for (std::size_t b = 0; b < last.size(); ++b) c.suffix.push_back((indptr[b + 1] - indptr[b] - 1) * 16 + last[b]);
  c.Hq = 8;
  c.Hkv = 1;
  c.D = 128;
  c.workspace = true;
  run_cascade(c, rng);
}

TEST(Cascade, EmptyPrefixOrEmptySuffixes) {
  FA_SEEDED_RNG(rng);
  CascadeCase c;
  c.P = 0;
  c.suffix = {0, 3, 17};
  run_cascade(c, rng);  // request 0 sees nothing: out 0, lse -inf
  c.P = 9;
  c.suffix = {0, 0};
  run_cascade(c, rng);
  c.lq = {2, 0};
  c.opts.causal = true;
  run_cascade(c, rng);
}

}  // namespace
