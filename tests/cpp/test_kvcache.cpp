// kvcache_attention_forward: in-place append (contiguous or paged cache, block table or CSR),
// rotary (interleaved / GPT-NeoX, rotary_dim < D), cache_batch_idx, cache_leftpad, num_splits;
// cache safety (nothing outside the appended slots changes) and split determinism.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/heuristics.h"
#include "test_util.h"

namespace {

using namespace fa_test;
using fa_ref::HostTensor;
using fa_ref::Layout;

enum class CacheKind { kContiguous, kBlockTable, kCsr };
const char* cache_kind_name(CacheKind k) {
  return k == CacheKind::kContiguous ? "contiguous" : k == CacheKind::kBlockTable ? "block_table" : "csr";
}

struct KVCase {
  DType dtype = DType::kFloat32;
  std::int64_t B = 2, Sq = 1, Hq = 2, Hkv = 1, D = 32;
  std::int64_t Snew = 1;  ///< 0: no k/v to append
  CacheKind kind = CacheKind::kContiguous;
  std::int64_t page_size = 16;
  int rotary = 0;  ///< 0 none, 1 interleaved, 2 GPT-NeoX
  std::int64_t rotary_dim = 0;  ///< 0: D
  bool rotary_f32 = false;  ///< cos/sin in float32 instead of q's dtype
  bool seqlens_tensor = true;  ///< false: the scalar cache_seqlen for every b
  bool batch_idx = false;
  bool leftpad = false;
  int num_splits = 0;
  Opts opts;
  bool strided = false;
  bool lse = true;
  bool workspace = false;
  bool allocator = false;  ///< a workspace_allocator the CPU backend must not call
  std::int64_t max_cached = 100;  ///< upper bound of the drawn cache_seqlens
  std::vector<std::int64_t> seqlens;  ///< when non-empty, used instead of drawing
  std::int64_t extra_rows = 0;  ///< cache / block-table rows beyond those the batch uses

  std::string str() const {
    std::ostringstream s;
    s << fa_ref::dtype_str(dtype) << " B=" << B << " Sq=" << Sq << " Hq=" << Hq << " Hkv=" << Hkv
      << " D=" << D << " Snew=" << Snew << " cache=" << cache_kind_name(kind) << " page_size=" << page_size
      << " rotary=" << rotary << " rotary_dim=" << rotary_dim << " rotary_f32=" << rotary_f32
      << " seqlens_tensor=" << seqlens_tensor << " batch_idx=" << batch_idx << " leftpad=" << leftpad
      << " num_splits=" << num_splits << " " << opts.str() << " strided=" << strided << " lse=" << lse
      << " workspace=" << workspace << " allocator=" << allocator;
    return s.str();
  }
};

/// Everything one kv-cache call needs, owned.
struct KVSetup {
  KVCase c;
  HostTensor q, k_cache, v_cache, k_new, v_new, cos, sin, seqlens_t, batch_idx_t, leftpad_t;
  HostTensor table_t, indptr_t, indices_t, out, lse, workspace;
  fa_ref::KVCacheRefIn ref_in;
  fastattn::KVCacheArgs args;
};

/// A KVCacheArgs::workspace_allocator for the CPU backend, which allocates its own scratch and
/// must never ask.
std::optional<fastattn::TensorView> allocation_not_expected(void*, std::size_t nbytes) {
  ADD_FAILURE() << "the CPU backend asked workspace_allocator for " << nbytes << " bytes";
  return std::nullopt;
}

KVSetup build(const KVCase& c0, std::mt19937_64& rng) {
  KVSetup s;
  s.c = c0;
  KVCase& c = s.c;
  if (c.rotary && c.rotary_dim == 0) c.rotary_dim = c.D;
  auto layout = [&](int nd) { return c.strided ? Layout::random_strided(nd, rng) : Layout{}; };
  const std::int64_t B = c.B;

  // Lengths.
  std::vector<std::int64_t> L = c.seqlens;
  if (L.empty()) {
    const std::int64_t common = rand_int(rng, 0, c.max_cached);
    for (std::int64_t b = 0; b < B; ++b) L.push_back(c.seqlens_tensor ? ragged_len(rng, c.max_cached) : common);
  }
  std::vector<std::int64_t> lp(static_cast<std::size_t>(B), 0);
  if (c.leftpad)
    for (std::int64_t b = 0; b < B; ++b) lp[static_cast<std::size_t>(b)] = rand_int(rng, 0, L[static_cast<std::size_t>(b)]);
  // Cache rows: B (or more with cache_batch_idx, mapped by a random injection).
  const std::int64_t rows = B + c.extra_rows +
                            (c.batch_idx ? rand_int(rng, 0, 2) : (c.kind == CacheKind::kContiguous ? rand_int(rng, 0, 1) : 0));
  std::vector<std::int64_t> row_of(static_cast<std::size_t>(B));
  std::iota(row_of.begin(), row_of.end(), 0);
  if (c.batch_idx) {
    std::vector<std::int64_t> perm(static_cast<std::size_t>(rows));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (std::int64_t b = 0; b < B; ++b) row_of[static_cast<std::size_t>(b)] = perm[static_cast<std::size_t>(b)];
  }
  // Capacity needed by each cache row.
  std::vector<std::int64_t> need(static_cast<std::size_t>(rows), 0);
  for (std::int64_t b = 0; b < B; ++b)
    need[static_cast<std::size_t>(row_of[static_cast<std::size_t>(b)])] = L[static_cast<std::size_t>(b)] + c.Snew;

  auto& ri = s.ref_in;
  ri.B = B;
  ri.Sq = c.Sq;
  ri.Hq = c.Hq;
  ri.Hkv = c.Hkv;
  ri.D = c.D;
  ri.Snew = c.Snew;
  ri.cache_seqlens = L;
  if (c.batch_idx) ri.cache_batch_idx = row_of;
  if (c.leftpad) ri.cache_leftpad = lp;

  if (c.kind == CacheKind::kContiguous) {
    std::int64_t S_cache = 1;
    for (auto n : need) S_cache = std::max(S_cache, n);
    S_cache += rand_int(rng, 0, 5);
    s.k_cache = fa_ref::random_tensor(c.dtype, {rows, S_cache, c.Hkv, c.D}, rng, layout(4));
    s.v_cache = fa_ref::random_tensor(c.dtype, {rows, S_cache, c.Hkv, c.D}, rng, layout(4));
    ri.N0 = rows;
    ri.N1 = S_cache;
  } else {
    const std::int64_t ps = c.page_size;
    std::vector<std::int64_t> npages(static_cast<std::size_t>(rows));
    std::int64_t total = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
      npages[static_cast<std::size_t>(r)] = (need[static_cast<std::size_t>(r)] + ps - 1) / ps + rand_int(rng, 0, 1);
      total += npages[static_cast<std::size_t>(r)];
    }
    const std::int64_t num_pages = total + rand_int(rng, 1, 3);
    std::vector<std::int64_t> perm(static_cast<std::size_t>(num_pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    ri.paged = true;
    ri.row_pages.assign(static_cast<std::size_t>(rows), {});
    std::size_t next = 0;
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t p = 0; p < npages[static_cast<std::size_t>(r)]; ++p) ri.row_pages[static_cast<std::size_t>(r)].push_back(perm[next++]);
    s.k_cache = fa_ref::random_tensor(c.dtype, {num_pages, ps, c.Hkv, c.D}, rng, layout(4));
    s.v_cache = fa_ref::random_tensor(c.dtype, {num_pages, ps, c.Hkv, c.D}, rng, layout(4));
    ri.N0 = num_pages;
    ri.N1 = ps;
    if (c.kind == CacheKind::kBlockTable) {
      std::int64_t max_pages = 1;
      for (auto n : npages) max_pages = std::max(max_pages, n);
      std::vector<std::int64_t> table;
      for (std::int64_t r = 0; r < rows; ++r)
        for (std::int64_t p = 0; p < max_pages; ++p)
          table.push_back(p < npages[static_cast<std::size_t>(r)] ? ri.row_pages[static_cast<std::size_t>(r)][static_cast<std::size_t>(p)]
                                                                  : rand_int(rng, 0, num_pages - 1));
      s.table_t = fa_ref::int_tensor_shaped(table, {rows, max_pages});
    } else {
      std::vector<std::int64_t> indptr{0}, indices;
      for (std::int64_t r = 0; r < rows; ++r) {
        for (auto p : ri.row_pages[static_cast<std::size_t>(r)]) indices.push_back(p);
        indptr.push_back(static_cast<std::int64_t>(indices.size()));
      }
      s.indptr_t = fa_ref::int_tensor(indptr);
      s.indices_t = fa_ref::int_tensor(indices);
    }
  }
  ri.k_cache = s.k_cache.values();
  ri.v_cache = s.v_cache.values();

  s.q = fa_ref::random_tensor(c.dtype, {B, c.Sq, c.Hq, c.D}, rng, layout(4));
  ri.q = s.q.values();
  if (c.Snew > 0) {
    s.k_new = fa_ref::random_tensor(c.dtype, {B, c.Snew, c.Hkv, c.D}, rng, layout(4));
    s.v_new = fa_ref::random_tensor(c.dtype, {B, c.Snew, c.Hkv, c.D}, rng, layout(4));
    ri.k_new = s.k_new.values();
    ri.v_new = s.v_new.values();
  }
  if (c.rotary) {
    std::int64_t max_pos = 0;
    for (std::int64_t b = 0; b < B; ++b)
      max_pos = std::max(max_pos, L[static_cast<std::size_t>(b)] - lp[static_cast<std::size_t>(b)] + std::max(c.Sq, c.Snew));
    const std::int64_t S_rot = max_pos + rand_int(rng, 0, 4);
    const std::int64_t half = c.rotary_dim / 2;
    const DType rdt = c.rotary_f32 ? DType::kFloat32 : c.dtype;
    s.cos = HostTensor(rdt, {S_rot, half}, layout(2));
    s.sin = HostTensor(rdt, {S_rot, half}, layout(2));
    for (std::int64_t p = 0; p < S_rot; ++p)
      for (std::int64_t i = 0; i < half; ++i) {
        const double theta = std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(c.rotary_dim));
        s.cos.set(p * half + i, std::cos(static_cast<double>(p) * theta));
        s.sin.set(p * half + i, std::sin(static_cast<double>(p) * theta));
      }
    ri.rotary_cos = s.cos.values();
    ri.rotary_sin = s.sin.values();
    ri.rotary_dim = c.rotary_dim;
    ri.rotary_interleaved = c.rotary == 1;
  }
  s.out = HostTensor(c.dtype, {B, c.Sq, c.Hq, c.D}, layout(4));
  s.lse = HostTensor(DType::kFloat32, {B, c.Hq, c.Sq}, layout(3));
  s.out.poison();
  s.lse.poison();
  c.opts.make_alibi(B, c.Hq, rng);
  c.opts.make_sinks(c.Hq, rng);

  auto& a = s.args;
  a.q = s.q.view();
  a.k_cache = s.k_cache.view();
  a.v_cache = s.v_cache.view();
  if (c.Snew > 0) {
    a.k_new = s.k_new.view();
    a.v_new = s.v_new.view();
  }
  if (c.rotary) {
    a.rotary_cos = s.cos.view();
    a.rotary_sin = s.sin.view();
    a.rotary_interleaved = c.rotary == 1;
  }
  if (c.seqlens_tensor) {
    s.seqlens_t = fa_ref::int_tensor(L);
    a.cache_seqlens = s.seqlens_t.view();
  } else {
    a.cache_seqlen = L.empty() ? 0 : L[0];
  }
  if (c.batch_idx) {
    s.batch_idx_t = fa_ref::int_tensor(row_of);
    a.cache_batch_idx = s.batch_idx_t.view();
  }
  if (c.leftpad) {
    s.leftpad_t = fa_ref::int_tensor(lp);
    a.cache_leftpad = s.leftpad_t.view();
  }
  if (c.kind == CacheKind::kBlockTable) a.block_table = s.table_t.view();
  if (c.kind == CacheKind::kCsr) {
    a.page_indptr = s.indptr_t.view();
    a.page_indices = s.indices_t.view();
  }
  a.num_splits = c.num_splits;
  a.out = s.out.view();
  if (c.lse) a.lse = s.lse.view();
  a.sinks = c.opts.sinks_view();
  a.options = c.opts.lib();
  if (c.allocator) a.workspace_allocator = {&allocation_not_expected, nullptr};
  if (c.workspace) {
    const std::size_t bytes = fastattn::kvcache_workspace_bytes(a);
    s.workspace = HostTensor(DType::kUInt8, {static_cast<std::int64_t>(bytes)});
    s.workspace.poison();
    a.workspace = s.workspace.view();
  }
  return s;
}

/// Runs the case and checks output, LSE and the cache. Returns the output values (empty on
/// failure to run).
std::vector<double> run_kvcache(const KVCase& c0, std::mt19937_64& rng) {
  KVSetup s = build(c0, rng);
  const KVCase& c = s.c;
  SCOPED_TRACE(c.str());
  const auto kb = s.k_cache.bytes(), vb = s.v_cache.bytes(), qb = s.q.bytes();
  try {
    fastattn::kvcache_attention_forward(s.args);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "kvcache_attention_forward threw: " << e.what();
    return {};
  }
  // Expected cache contents (exact rotation, unrounded) for the cache checks below.
  const auto ref = fa_ref::ref_kvcache(s.ref_in, c.opts.ref());
  // For the attention check the appended keys are what the library stored (checked below to be
  // the rotated keys rounded to the dtype): rotated keys have to be rounded to live in the cache.
  fa_ref::KVCacheRefIn stored_in = s.ref_in;
  if (c.rotary) {
    stored_in.k_stored.assign(s.ref_in.k_new.size(), 0.0);
    std::size_t w = 0;
    for (std::int64_t b = 0; b < c.B; ++b)
      for (std::int64_t t = 0; t < c.Snew; ++t)
        for (std::int64_t h = 0; h < c.Hkv; ++h)
          for (std::int64_t d = 0; d < c.D; ++d, ++w)
            stored_in.k_stored[static_cast<std::size_t>(((b * c.Snew + t) * c.Hkv + h) * c.D + d)] = s.k_cache.get(ref.written[w]);
  }
  const auto ref_attn = c.rotary ? fa_ref::ref_kvcache(stored_in, c.opts.ref()) : ref;
  const auto naive = fa_ref::ref_kvcache(stored_in, c.opts.ref(), c.dtype);
  // Rotating q in the input dtype (FlashAttention does) is allowed: its effect alone, measured
  // on the exact computation, is added to the tolerance. (On tiny outputs, e.g. one LSE value,
  // the naive error alone is too noisy to absorb it.)
  double allow_out = 0.0, allow_lse = 0.0;
  if (c.rotary && c.dtype != DType::kFloat32) {
    fa_ref::KVCacheRefIn qr = stored_in;
    qr.round_rotated_q = c.dtype;
    const auto ref_qr = fa_ref::ref_kvcache(qr, c.opts.ref());
    allow_out = fa_ref::max_abs_diff(ref_qr.attn.out, ref_attn.attn.out);
    allow_lse = fa_ref::max_abs_diff(ref_qr.attn.lse, ref_attn.attn.lse);
  }
  const auto out = s.out.values();
  EXPECT_TRUE(close_to_ref(out, ref_attn.attn.out, naive.attn.out, 3.0, c.dtype, false, allow_out)) << "out";
  if (c.lse) {
    EXPECT_TRUE(close_to_ref(s.lse.values(), ref_attn.attn.lse, naive.attn.lse, 3.0, c.dtype, true, allow_lse)) << "lse";
  }
  EXPECT_TRUE(s.out.gaps_intact());
  EXPECT_TRUE(s.lse.gaps_intact());
  if (c.workspace) {
    EXPECT_TRUE(s.workspace.gaps_intact()) << "written past the end of the workspace";
  }
  EXPECT_TRUE(bytes_unchanged(qb, s.q.bytes())) << "q modified";

  // Cache safety: only the appended slots' bytes may change.
  std::vector<bool> allowed(kb.size(), false);
  const std::size_t es = fa_ref::elem_size(c.dtype);
  for (auto idx : ref.written) {
    const auto off = static_cast<std::size_t>(s.k_cache.storage_offset(idx)) * es;
    for (std::size_t i = 0; i < es; ++i) allowed[off + i] = true;
  }
  EXPECT_TRUE(bytes_unchanged(kb, s.k_cache.bytes(), &allowed)) << "k_cache written outside the appended slots";
  std::vector<bool> allowed_v(vb.size(), false);
  for (auto idx : ref.written) {
    const auto off = static_cast<std::size_t>(s.v_cache.storage_offset(idx)) * es;
    for (std::size_t i = 0; i < es; ++i) allowed_v[off + i] = true;
  }
  EXPECT_TRUE(bytes_unchanged(vb, s.v_cache.bytes(), &allowed_v)) << "v_cache written outside the appended slots";
  // The appended slots hold the new values: v bitwise, k bitwise without rotary and within
  // rounding of the rotated value with rotary.
  std::int64_t bad_k = 0, bad_v = 0, first_bad = -1;
  for (auto idx : ref.written) {
    const double got_k = s.k_cache.get(idx), want_k = ref.k_cache[static_cast<std::size_t>(idx)];
    const double tol = c.rotary ? 2 * fa_ref::ulp_of(c.dtype, want_k) + 1e-6 : 0.0;
    if (!(std::fabs(got_k - want_k) <= tol)) {
      if (first_bad < 0) first_bad = idx;
      ++bad_k;
    }
    if (s.v_cache.get(idx) != ref.v_cache[static_cast<std::size_t>(idx)]) ++bad_v;
  }
  EXPECT_EQ(bad_k, 0) << "appended k slots with wrong values, first at cache element " << first_bad
                      << (first_bad >= 0 ? " got " + std::to_string(s.k_cache.get(first_bad)) + " want " +
                                               std::to_string(ref.k_cache[static_cast<std::size_t>(first_bad)])
                                         : "");
  EXPECT_EQ(bad_v, 0) << "appended v slots with wrong values";
  return out;
}

class KVCacheDtype : public ::testing::TestWithParam<DType> {};

TEST_P(KVCacheDtype, DecodeContiguous) {
  FA_SEEDED_RNG(rng);
  KVCase c;
  c.dtype = GetParam();
  c.B = 4;
  c.Hq = 8;
  c.Hkv = 2;
  c.D = 64;
  run_kvcache(c, rng);
  c.Snew = 0;  // attend only
  run_kvcache(c, rng);
}

TEST_P(KVCacheDtype, PagedAllPageSizes) {
  FA_SEEDED_RNG(rng);
  for (CacheKind kind : {CacheKind::kBlockTable, CacheKind::kCsr}) {
    for (std::int64_t ps : {1, 5, 16, 256}) {
      KVCase c;
      c.dtype = GetParam();
      c.kind = kind;
      c.page_size = ps;
      c.B = rand_int(rng, 1, 4);
      c.Snew = rand_int(rng, 0, 3);
      c.Sq = rand_int(rng, 1, 3);
      c.Hkv = 2;
      c.Hq = 2 * pick(rng, std::vector<std::int64_t>{1, 4});
      c.max_cached = ps == 1 ? 40 : 300;
      c.opts = random_opts(rng);
      run_kvcache(c, rng);
    }
  }
}

TEST_P(KVCacheDtype, RotaryBothStyles) {
  FA_SEEDED_RNG(rng);
  for (int style : {1, 2}) {
    for (int variant = 0; variant < 5; ++variant) {
      KVCase c;
      c.dtype = GetParam();
      c.rotary = style;
      c.D = 64;
      // rotary_dim = D and < D, including rotary_dim / 2 odd (6) and the smallest (2)
      c.rotary_dim = std::vector<std::int64_t>{64, 32, 16, 6, 2}[static_cast<std::size_t>(variant)];
      c.B = 3;
      c.Sq = rand_int(rng, 1, 4);
      c.Snew = c.Sq;
      c.Hq = 4;
      c.Hkv = 2;
      // non-causal: q rotated at cache_seqlens; causal or local: at cache_seqlens + i.
      if (variant == 1) c.opts.causal = true;
      if (variant == 2) c.opts.left = rand_int(rng, 0, 30);
      if (variant == 3) c.opts.right = rand_int(rng, 0, 3);  // local through the right side only
      c.kind = static_cast<CacheKind>(rand_int(rng, 0, 2));
      c.rotary_f32 = rand_int(rng, 0, 3) == 0;
      run_kvcache(c, rng);
    }
  }
}

TEST_P(KVCacheDtype, CacheBatchIdxAndLeftpad) {
  FA_SEEDED_RNG(rng);
  for (CacheKind kind : {CacheKind::kContiguous, CacheKind::kBlockTable, CacheKind::kCsr}) {
    for (int which = 0; which < 3; ++which) {
      KVCase c;
      c.dtype = GetParam();
      c.kind = kind;
      c.batch_idx = which != 1;
      c.leftpad = which != 0;
      c.B = rand_int(rng, 1, 4);
      c.Sq = rand_int(rng, 1, 5);
      c.Snew = rand_int(rng, 0, 2) ? c.Sq : 0;
      c.Hq = 4;
      c.Hkv = 4;
      c.D = 32;
      c.opts = random_opts(rng);
      if (c.Snew > 0 && rand_int(rng, 0, 1)) c.rotary = static_cast<int>(rand_int(rng, 1, 2)), c.rotary_dim = 16;
      run_kvcache(c, rng);
    }
  }
}

TEST_P(KVCacheDtype, NumSplits) {
  FA_SEEDED_RNG(rng);
  for (int splits : {1, 3, 0, 64}) {
    for (CacheKind kind : {CacheKind::kContiguous, CacheKind::kBlockTable, CacheKind::kCsr}) {
      KVCase c;
      c.dtype = GetParam();
      c.num_splits = splits;
      c.kind = kind;
      c.page_size = pick(rng, std::vector<std::int64_t>{1, 5, 16, 256});
      c.B = 3;
      c.Hq = 8;
      c.Hkv = 1;
      c.D = 128;
      c.max_cached = c.page_size == 1 ? 200 : 700;
      c.Sq = rand_int(rng, 1, 2);
      c.Snew = rand_int(rng, 0, 2);
      c.opts = random_opts(rng);
      c.workspace = rand_int(rng, 0, 1) == 1;
      c.allocator = rand_int(rng, 0, 1) == 1;
      run_kvcache(c, rng);
    }
  }
}

TEST_P(KVCacheDtype, Sinks) {
  // Attention sinks (one more logit per head, zero values) with one split, several (the combine
  // folds them in) and the heuristic's, each cache form, an empty row among ragged ones (out 0,
  // lse = the sink), random options, a strided sinks view; against the reference's softmax with
  // the sink as one more term.
  FA_SEEDED_RNG(rng);
  for (int splits : {1, 3, 0}) {
    for (CacheKind kind : {CacheKind::kContiguous, CacheKind::kBlockTable, CacheKind::kCsr}) {
      KVCase c;
      c.dtype = GetParam();
      c.num_splits = splits;
      c.kind = kind;
      c.page_size = pick(rng, std::vector<std::int64_t>{1, 16, 64});
      c.B = 3;
      c.Hkv = rand_int(rng, 1, 2);
      c.Hq = c.Hkv * pick(rng, std::vector<std::int64_t>{1, 4});
      c.D = pick(rng, std::vector<std::int64_t>{64, 128});
      c.seqlens = {rand_int(rng, 1, 300), 0, rand_int(rng, 1, 300)};
      c.max_cached = 300;
      c.Sq = rand_int(rng, 1, 2);
      c.Snew = 0;
      c.opts = random_opts(rng);
      c.opts.sinks = true;
      c.lse = rand_int(rng, 0, 1) == 1;
      c.workspace = rand_int(rng, 0, 1) == 1;
      run_kvcache(c, rng);
    }
  }
}

TEST_P(KVCacheDtype, CombinedEverything) {
  FA_SEEDED_RNG(rng);
  for (std::int64_t ratio : {1, 4, 8}) {
    KVCase c;
    c.dtype = GetParam();
    c.B = rand_int(rng, 1, 4);
    c.Hkv = rand_int(rng, 1, 2);
    c.Hq = c.Hkv * ratio;
    c.D = pick(rng, std::vector<std::int64_t>{32, 64, 80});
    c.Sq = rand_int(rng, 1, 6);
    c.Snew = rand_int(rng, 0, 1) ? c.Sq : rand_int(rng, 1, 6);
    c.kind = static_cast<CacheKind>(rand_int(rng, 0, 2));
    c.page_size = pick(rng, std::vector<std::int64_t>{1, 5, 16, 256});
    c.rotary = static_cast<int>(rand_int(rng, 1, 2));
    c.rotary_dim = 16;
    c.batch_idx = true;
    c.leftpad = true;
    c.num_splits = pick(rng, std::vector<int>{0, 1, 3});
    c.opts.causal = true;
    c.opts.left = rand_int(rng, 0, 60);
    c.opts.softcap = rand_real(rng, 5, 30);
    c.opts.alibi = static_cast<int>(rand_int(rng, 1, 2));
    c.strided = true;
    c.workspace = rand_int(rng, 0, 1) == 1;
    run_kvcache(c, rng);
  }
}

TEST_P(KVCacheDtype, PrefillIntoCacheSqGreaterAndSmaller) {
  // Sq > Snew and Sq < Snew, causal and not, with long cached prefixes.
  FA_SEEDED_RNG(rng);
  for (int rep = 0; rep < 4; ++rep) {
    KVCase c;
    c.dtype = GetParam();
    c.B = 2;
    c.Sq = rand_int(rng, 1, 40);
    c.Snew = rand_int(rng, 0, 40);
    c.Hq = 2;
    c.Hkv = 1;
    c.D = 32;
    c.max_cached = 120;
    c.opts.causal = rep % 2 == 0;
    c.kind = static_cast<CacheKind>(rep % 3);
    run_kvcache(c, rng);
  }
}

TEST_P(KVCacheDtype, ScalarCacheSeqlenAndStrided) {
  FA_SEEDED_RNG(rng);
  KVCase c;
  c.dtype = GetParam();
  c.B = 3;
  c.seqlens_tensor = false;
  c.Sq = 2;
  c.Snew = 2;
  c.strided = true;
  c.opts = random_opts(rng);
  run_kvcache(c, rng);
}

TEST_P(KVCacheDtype, HeadDims) {
  FA_SEEDED_RNG(rng);
  for (std::int64_t D : {8, 24, 136, 256}) {
    KVCase c;
    c.dtype = GetParam();
    c.D = D;
    c.B = 2;
    c.Hq = 2;
    c.Hkv = 1;
    c.Sq = rand_int(rng, 1, 3);
    c.Snew = c.Sq;
    c.rotary = static_cast<int>(rand_int(rng, 1, 2));
    c.rotary_dim = D;
    c.kind = static_cast<CacheKind>(rand_int(rng, 0, 2));
    c.num_splits = pick(rng, std::vector<int>{0, 1, 3});
    c.opts = random_opts(rng);
    run_kvcache(c, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, KVCacheDtype, ::testing::ValuesIn(float_dtypes()), dtype_param_name);

TEST(KVCache, SeedWorknoteDecode) {
  // The seed worknote's flash_attn_with_kvcache example: 10 sequences, one new token each, cache
  // lengths 10..99 in 256-token pages, 16 heads of dim 16, float16.
  FA_SEEDED_RNG(rng);
  KVCase c;
  c.dtype = DType::kFloat16;
  c.B = 10;
  c.Hq = c.Hkv = 16;
  c.D = 16;
  c.kind = CacheKind::kBlockTable;
  c.page_size = 256;
  for (int b = 0; b < 10; ++b) c.seqlens.push_back(rand_int(rng, 10, 98));
  run_kvcache(c, rng);
}

TEST(KVCache, EmptyAttentionRows) {
  // cache_seqlens = 0 with no append, or leftpad == cache_seqlens: no keys -> out 0, lse -inf.
  FA_SEEDED_RNG(rng);
  KVCase c;
  c.B = 3;
  c.Snew = 0;
  c.seqlens = {0, 5, 7};
  run_kvcache(c, rng);
  c.leftpad = true;  // leftpad drawn in [0, L]; covered by the random draws too
  run_kvcache(c, rng);
}

TEST(KVCache, AppendFillsCacheExactly) {
  // Cache rows exactly full after the append (cache_seqlens + Snew == capacity).
  FA_SEEDED_RNG(rng);
  for (CacheKind kind : {CacheKind::kContiguous, CacheKind::kBlockTable, CacheKind::kCsr}) {
    KVCase c;
    c.kind = kind;
    c.page_size = 5;
    c.B = 2;
    c.Snew = 3;
    c.Sq = 3;
    c.seqlens = {7, 12};
    c.opts.causal = true;
    run_kvcache(c, rng);
  }
}

TEST(KVCache, PagedTableWithMoreRowsThanBatch) {
  // ops.h: block_table is (B_table, max_pages) and page_indptr (B_table + 1); without
  // cache_batch_idx sequence b uses row b, so extra rows (as a contiguous cache may have) are fine.
  FA_SEEDED_RNG(rng);
  for (CacheKind kind : {CacheKind::kBlockTable, CacheKind::kCsr}) {
    KVCase c;
    c.kind = kind;
    c.page_size = 4;
    c.B = 2;
    c.extra_rows = 2;
    run_kvcache(c, rng);
  }
}

/// Split determinism: with a fixed num_splits, sequence 0's output and LSE are bitwise the same
/// whatever the other batch entries are (their number and lengths).
void check_split_determinism(CacheKind kind, int num_splits, DType dtype, std::mt19937_64& rng) {
  SCOPED_TRACE(std::string("kind=") + cache_kind_name(kind) + " num_splits=" + std::to_string(num_splits) +
               " dtype=" + fa_ref::dtype_str(dtype));
  KVCase c;
  c.dtype = dtype;
  c.kind = kind;
  c.page_size = 16;
  c.B = 5;
  c.Sq = 1;
  c.Snew = 1;
  c.Hq = 8;
  c.Hkv = 2;
  c.D = 64;
  c.num_splits = num_splits;
  c.seqlens = {static_cast<std::int64_t>(rand_int(rng, 200, 600))};
  for (int b = 1; b < 5; ++b) c.seqlens.push_back(rand_int(rng, 0, 900));
  c.batch_idx = true;  // lets a smaller batch address the same cache rows
  KVSetup s = build(c, rng);
  ASSERT_NO_THROW(fastattn::kvcache_attention_forward(s.args));
  const std::int64_t row = c.Sq * c.Hq * c.D;
  std::vector<double> out0, lse0;
  for (std::int64_t i = 0; i < row; ++i) out0.push_back(s.out.get(i));
  for (std::int64_t i = 0; i < c.Hq * c.Sq; ++i) lse0.push_back(s.lse.get(i));

  // The same call with only the first 1, 2 or 3 sequences, and with the others' lengths changed.
  for (std::int64_t B2 : {1, 2, 3}) {
    fastattn::KVCacheArgs a = s.args;
    auto shrink = [&](fastattn::TensorView t) {
      t.shape[0] = B2;
      return t;
    };
    a.q = shrink(a.q);
    a.k_new = shrink(*a.k_new);
    a.v_new = shrink(*a.v_new);
    a.out = shrink(a.out);
    a.lse = shrink(*a.lse);
    a.cache_batch_idx = shrink(*a.cache_batch_idx);
    std::vector<std::int64_t> L2;
    for (std::int64_t b = 0; b < B2; ++b) L2.push_back(b == 0 ? c.seqlens[0] : rand_int(rng, 0, c.seqlens[static_cast<std::size_t>(b)]));
    HostTensor l2 = fa_ref::int_tensor(L2);
    a.cache_seqlens = l2.view();
    if (a.workspace) a.workspace.reset();
    s.out.poison();
    s.lse.poison();
    ASSERT_NO_THROW(fastattn::kvcache_attention_forward(a));
    for (std::int64_t i = 0; i < row; ++i) ASSERT_EQ(s.out.get(i), out0[static_cast<std::size_t>(i)]) << "B=" << B2 << " element " << i;
    for (std::int64_t i = 0; i < c.Hq * c.Sq; ++i) ASSERT_EQ(s.lse.get(i), lse0[static_cast<std::size_t>(i)]) << "B=" << B2 << " lse " << i;
  }
}

TEST(KVCache, SplitDeterminismWhateverTheBatch) {
  FA_SEEDED_RNG(rng);
  for (CacheKind kind : {CacheKind::kContiguous, CacheKind::kBlockTable, CacheKind::kCsr})
    for (int splits : {1, 3})
      for (DType dt : {DType::kFloat32, DType::kBFloat16}) check_split_determinism(kind, splits, dt, rng);
}

TEST(KVCache, FixedSplitsBitwiseIdenticalAcrossThreadCounts) {
  // The same call with 1 and 2 threads: the split partition and combine order are fixed by
  // num_splits, so the result must not depend on the thread count.
  FA_SEEDED_RNG(rng);
  for (int splits : {1, 3}) {
    KVCase c;
    c.num_splits = splits;
    c.B = 3;
    c.Snew = 0;
    c.Hq = 8;
    c.Hkv = 2;
    c.D = 64;
    c.max_cached = 900;
    c.kind = CacheKind::kBlockTable;
    KVSetup s = build(c, rng);
    std::vector<std::vector<double>> outs;
    for (int threads : {1, 2, 0}) {
      s.args.exec.num_threads = threads;
      s.out.poison();
      ASSERT_NO_THROW(fastattn::kvcache_attention_forward(s.args));
      outs.push_back(s.out.values());
    }
    for (std::size_t i = 0; i < outs[0].size(); ++i) {
      ASSERT_EQ(outs[0][i], outs[1][i]) << "splits " << splits << " element " << i;
      ASSERT_EQ(outs[0][i], outs[2][i]) << "splits " << splits << " element " << i;
    }
  }
}

TEST(KVCache, SplitsAgreeWithEachOther) {
  // num_splits only changes the order of float32 sums: 1, 3 and 7 splits agree to float32 noise.
  FA_SEEDED_RNG(rng);
  const std::uint64_t seed = rng();
  std::vector<std::vector<double>> outs;
  for (int splits : {1, 3, 7}) {
    std::mt19937_64 r(seed);
    KVCase c;
    c.num_splits = splits;
    c.B = 2;
    c.Snew = 0;
    c.Hq = 4;
    c.Hkv = 4;
    c.D = 32;
    c.seqlens = {500, 333};
    outs.push_back(run_kvcache(c, r));
  }
  EXPECT_LE(fa_ref::max_abs_diff(outs[0], outs[1]), 1e-5);
  EXPECT_LE(fa_ref::max_abs_diff(outs[0], outs[2]), 1e-5);
}

}  // namespace

// The split-KV pickers of core/heuristics.h (CPU threads; GPU decode's one wave of CTAs).
TEST(SplitHeuristics, ChooseNumSplits) {
  EXPECT_EQ(fastattn::core::choose_num_splits(64, 100000, 32), 1);      // items fill the workers
  EXPECT_EQ(fastattn::core::choose_num_splits(4, 100000, 32), 16);      // ~2 items per worker
  EXPECT_EQ(fastattn::core::choose_num_splits(4, 1000, 32), 3);         // >= 256 keys per split
  EXPECT_EQ(fastattn::core::choose_num_splits(1, 1 << 30, 1000), 64);   // capped
  EXPECT_EQ(fastattn::core::choose_num_splits(1, 10, 32), 1);           // too short to split
}

TEST(SplitHeuristics, ChooseNumSplitsOneWave) {
  using fastattn::core::choose_num_splits_one_wave;
  EXPECT_EQ(choose_num_splits_one_wave(264, 32768, 264, 128, 128), 1);  // a full wave already
  EXPECT_EQ(choose_num_splits_one_wave(64, 8192, 264, 128, 128), 4);    // floor: no second wave
  EXPECT_EQ(choose_num_splits_one_wave(8, 32768, 264, 128, 128), 33);
  EXPECT_EQ(choose_num_splits_one_wave(8, 1024, 264, 128, 128), 8);     // >= 128 keys per split
  EXPECT_EQ(choose_num_splits_one_wave(1, 1 << 30, 264, 128, 128), 128);  // capped
  EXPECT_EQ(choose_num_splits_one_wave(8, 0, 264, 128, 128), 1);        // empty cache
}

TEST(SplitHeuristics, ChooseNumSplitsIfPaying) {
  using fastattn::core::choose_num_splits_if_paying;
  // 16 blocks of 64 keys: 2 splits save 8 blocks per CTA, not more than the cost of 8: unsplit.
  EXPECT_EQ(choose_num_splits_if_paying(64, 1024, 132, 128, 128, 64, 8), 1);
  EXPECT_EQ(choose_num_splits_if_paying(8, 1024, 132, 128, 128, 64, 8), 8);     // 16 -> 2 blocks
  EXPECT_EQ(choose_num_splits_if_paying(8, 8192, 132, 128, 128, 64, 8), 16);    // 128 -> 8 blocks
  EXPECT_EQ(choose_num_splits_if_paying(64, 8192, 132, 128, 128, 64, 8), 2);    // 128 -> 64 blocks
  EXPECT_EQ(choose_num_splits_if_paying(264, 32768, 132, 128, 128, 64, 8), 1);  // a full wave already
  EXPECT_EQ(choose_num_splits_if_paying(64, 1024, 132, 128, 128, 64, 0), 2);    // no cost: as one_wave
}
