// varlen_attention_forward: packed keys (cu_seqlens_k, seqused_k) and paged keys (block table or
// CSR page lists; lengths from seqused_k, cu_seqlens_k or last_page_len).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "test_util.h"

namespace {

using namespace fa_test;
using fa_ref::HostTensor;
using fa_ref::Layout;

enum class KeySource { kPacked, kBlockTable, kCsr };
/// kSequsedOverCu: paged, seqused_k gives the lengths and a cu_seqlens_k with other (smaller)
/// lengths is passed too; seqused_k takes precedence (ops.h).
enum class LenSource { kCuSeqlensK, kSequsedK, kLastPageLen, kSequsedOverCu };

const char* key_source_name(KeySource s) {
  return s == KeySource::kPacked ? "packed" : s == KeySource::kBlockTable ? "block_table" : "csr";
}
const char* len_source_name(LenSource s) {
  switch (s) {
    case LenSource::kCuSeqlensK: return "cu_seqlens_k";
    case LenSource::kSequsedK: return "seqused_k";
    case LenSource::kLastPageLen: return "last_page_len";
    case LenSource::kSequsedOverCu: return "seqused_k over cu_seqlens_k";
  }
  return "?";
}

struct VarCase {
  DType dtype = DType::kFloat32;
  std::vector<std::int64_t> lq, lk;  ///< per-sequence query / key lengths
  std::int64_t Hq = 2, Hkv = 1, D = 32;
  Opts opts;
  KeySource keys = KeySource::kPacked;
  LenSource lens = LenSource::kCuSeqlensK;
  std::int64_t page_size = 16;
  bool strided = false;
  bool lse = true;
  bool probs = false;
  std::int64_t extra_max_q = 0, extra_max_k = 0;  ///< slack in the max_seqlen bounds
  std::int64_t pad_rows = 0;  ///< q/out rows past cu_seqlens_q[B] (must get out 0, LSE -inf)

  std::string str() const {
    std::ostringstream s;
    s << fa_ref::dtype_str(dtype) << " lq=" << shape_str(lq) << " lk=" << shape_str(lk) << " Hq=" << Hq
      << " Hkv=" << Hkv << " D=" << D << " " << opts.str() << " keys=" << key_source_name(keys)
      << " lens=" << len_source_name(lens) << " page_size=" << page_size << " strided=" << strided
      << " lse=" << lse << " probs=" << probs;
    return s.str();
  }
};

std::vector<double> ref_rows(const HostTensor& t, std::int64_t row0, std::int64_t rows) {
  const std::int64_t w = t.numel() / std::max<std::int64_t>(t.size(0), 1);
  std::vector<double> out(static_cast<std::size_t>(rows * w));
  for (std::int64_t i = 0; i < rows * w; ++i) out[static_cast<std::size_t>(i)] = t.get(row0 * w + i);
  return out;
}

void run_varlen(VarCase c, std::mt19937_64& rng) {
  SCOPED_TRACE(c.str());
  const auto B = static_cast<std::int64_t>(c.lq.size());
  auto layout = [&](int nd) { return c.strided ? Layout::random_strided(nd, rng) : Layout{}; };
  const auto cu_q = cumsum0(c.lq);
  const std::int64_t total_q = cu_q.back() + c.pad_rows;
  const std::int64_t max_q = (B ? *std::max_element(c.lq.begin(), c.lq.end()) : 0) + c.extra_max_q;
  const std::int64_t max_k = (B ? *std::max_element(c.lk.begin(), c.lk.end()) : 0) + c.extra_max_k;
  c.opts.make_alibi(B, c.Hq, rng);
  c.opts.make_sinks(c.Hq, rng);

  HostTensor q = fa_ref::random_tensor(c.dtype, {total_q, c.Hq, c.D}, rng, layout(3));
  HostTensor out(c.dtype, {total_q, c.Hq, c.D}, layout(3));
  HostTensor lse(DType::kFloat32, {c.Hq, total_q}, layout(2));
  HostTensor probs(DType::kFloat32, {B, c.Hq, max_q, max_k});
  out.poison();
  lse.poison();
  probs.poison();
  HostTensor cu_q_t = fa_ref::int_tensor(cu_q);

  fastattn::VarlenAttentionArgs a;
  a.q = q.view();
  a.cu_seqlens_q = cu_q_t.view();
  a.max_seqlen_q = max_q;
  a.max_seqlen_k = max_k;
  a.out = out.view();
  if (c.lse) a.lse = lse.view();
  if (c.probs) a.probs = probs.view();
  a.sinks = c.opts.sinks_view();
  a.options = c.opts.lib();

  std::vector<std::vector<double>> keys(static_cast<std::size_t>(B)), vals(static_cast<std::size_t>(B));
  HostTensor k, v, cu_k_t, seqused_t, table_t, indptr_t, indices_t, last_t;
  std::vector<unsigned char> kb, vb;

  if (c.keys == KeySource::kPacked) {
    // Segments may be longer than the keys used when seqused_k gives the lengths.
    std::vector<std::int64_t> seg(c.lk);
    if (c.lens == LenSource::kSequsedK)
      for (auto& s : seg) s += rand_int(rng, 0, 3);
    const auto cu_k = cumsum0(seg);
    k = fa_ref::random_tensor(c.dtype, {cu_k.back(), c.Hkv, c.D}, rng, layout(3));
    v = fa_ref::random_tensor(c.dtype, {cu_k.back(), c.Hkv, c.D}, rng, layout(3));
    cu_k_t = fa_ref::int_tensor(cu_k);
    a.k = k.view();
    a.v = v.view();
    a.cu_seqlens_k = cu_k_t.view();
    if (c.lens == LenSource::kSequsedK) {
      seqused_t = fa_ref::int_tensor(c.lk);
      a.seqused_k = seqused_t.view();
    }
    for (std::int64_t b = 0; b < B; ++b) {
      keys[static_cast<std::size_t>(b)] = ref_rows(k, cu_k[static_cast<std::size_t>(b)], c.lk[static_cast<std::size_t>(b)]);
      vals[static_cast<std::size_t>(b)] = ref_rows(v, cu_k[static_cast<std::size_t>(b)], c.lk[static_cast<std::size_t>(b)]);
    }
  } else {
    const std::int64_t ps = c.page_size;
    // Pages per sequence: enough for its keys; sometimes a spare one when lengths are explicit.
    std::vector<std::int64_t> npages(static_cast<std::size_t>(B));
    for (std::int64_t b = 0; b < B; ++b) {
      const std::int64_t len = c.lk[static_cast<std::size_t>(b)];
      npages[static_cast<std::size_t>(b)] = (len + ps - 1) / ps;
      if (c.lens != LenSource::kLastPageLen && rand_int(rng, 0, 2) == 0) npages[static_cast<std::size_t>(b)] += 1;
    }
    std::int64_t used = 0;
    for (auto n : npages) used += n;
    const std::int64_t num_pages = used + rand_int(rng, 1, 3);  // unused pages hold garbage
    std::vector<std::int64_t> perm(static_cast<std::size_t>(num_pages));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<std::vector<std::int64_t>> pages(static_cast<std::size_t>(B));
    std::size_t next = 0;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t p = 0; p < npages[static_cast<std::size_t>(b)]; ++p) pages[static_cast<std::size_t>(b)].push_back(perm[next++]);

    k = fa_ref::random_tensor(c.dtype, {num_pages, ps, c.Hkv, c.D}, rng, layout(4));
    v = fa_ref::random_tensor(c.dtype, {num_pages, ps, c.Hkv, c.D}, rng, layout(4));
    fastattn::PagedKV pk;
    pk.k_pages = k.view();
    pk.v_pages = v.view();
    if (c.keys == KeySource::kBlockTable) {
      std::int64_t max_pages = 1;
      for (auto n : npages) max_pages = std::max(max_pages, n);
      max_pages += rand_int(rng, 0, 1);
      std::vector<std::int64_t> table;
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t p = 0; p < max_pages; ++p)
          table.push_back(p < npages[static_cast<std::size_t>(b)] ? pages[static_cast<std::size_t>(b)][static_cast<std::size_t>(p)]
                                                                   : rand_int(rng, 0, num_pages - 1));  // unused: any valid page
      table_t = fa_ref::int_tensor_shaped(table, {B, max_pages});
      pk.block_table = table_t.view();
    } else {
      std::vector<std::int64_t> indptr{0}, indices;
      for (std::int64_t b = 0; b < B; ++b) {
        for (auto p : pages[static_cast<std::size_t>(b)]) indices.push_back(p);
        indptr.push_back(static_cast<std::int64_t>(indices.size()));
      }
      indptr_t = fa_ref::int_tensor(indptr);
      indices_t = fa_ref::int_tensor(indices);
      pk.page_indptr = indptr_t.view();
      pk.page_indices = indices_t.view();
    }
    switch (c.lens) {
      case LenSource::kCuSeqlensK:
        cu_k_t = fa_ref::int_tensor(cumsum0(c.lk));
        a.cu_seqlens_k = cu_k_t.view();
        break;
      case LenSource::kSequsedK:
        seqused_t = fa_ref::int_tensor(c.lk);
        a.seqused_k = seqused_t.view();
        break;
      case LenSource::kSequsedOverCu: {
        seqused_t = fa_ref::int_tensor(c.lk);
        a.seqused_k = seqused_t.view();
        std::vector<std::int64_t> other;
        for (auto l : c.lk) other.push_back(rand_int(rng, 0, l));
        cu_k_t = fa_ref::int_tensor(cumsum0(other));
        a.cu_seqlens_k = cu_k_t.view();
        break;
      }
      case LenSource::kLastPageLen: {
        std::vector<std::int64_t> last;
        for (std::int64_t b = 0; b < B; ++b) {
          const std::int64_t len = c.lk[static_cast<std::size_t>(b)];
          last.push_back(len == 0 ? 0 : len - (npages[static_cast<std::size_t>(b)] - 1) * ps);
        }
        last_t = fa_ref::int_tensor(last);
        pk.last_page_len = last_t.view();
        break;
      }
    }
    a.paged = pk;
    const auto kv = k.values(), vv = v.values();
    for (std::int64_t b = 0; b < B; ++b) {
      keys[static_cast<std::size_t>(b)] = fa_ref::gather_paged(kv, ps, c.Hkv, c.D, pages[static_cast<std::size_t>(b)], c.lk[static_cast<std::size_t>(b)]);
      vals[static_cast<std::size_t>(b)] = fa_ref::gather_paged(vv, ps, c.Hkv, c.D, pages[static_cast<std::size_t>(b)], c.lk[static_cast<std::size_t>(b)]);
    }
  }
  kb = k.bytes();
  vb = v.bytes();
  const auto qb = q.bytes();

  try {
    fastattn::varlen_attention_forward(a);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "varlen_attention_forward threw: " << e.what();
    return;
  }
  auto ref = fa_ref::ref_varlen(q.values(), cu_q, keys, vals, c.Hq, c.Hkv, c.D, max_q, max_k, c.opts.ref());
  auto naive = fa_ref::ref_varlen(q.values(), cu_q, keys, vals, c.Hq, c.Hkv, c.D, max_q, max_k, c.opts.ref(), c.dtype);
  if (c.pad_rows > 0) {  // padding rows see no key: out 0, LSE -inf (sinks[h] with sinks)
    const std::int64_t used = cu_q.back();
    for (auto* r : {&ref, &naive}) {
      r->out.resize(static_cast<std::size_t>(total_q * c.Hq * c.D), 0.0);
      std::vector<double> l(static_cast<std::size_t>(c.Hq * total_q), -std::numeric_limits<double>::infinity());
      for (std::int64_t h = 0; h < c.Hq; ++h) {
        if (c.opts.sinks)
          std::fill_n(l.begin() + h * total_q, total_q, c.opts.sink_values[static_cast<std::size_t>(h)]);
        for (std::int64_t i = 0; i < used; ++i) l[static_cast<std::size_t>(h * total_q + i)] = r->lse[static_cast<std::size_t>(h * used + i)];
      }
      r->lse = l;
    }
  }
  EXPECT_TRUE(close_to_ref(out.values(), ref.out, naive.out, 2.0, c.dtype)) << "out";
  if (c.lse) {
    EXPECT_TRUE(close_to_ref(lse.values(), ref.lse, naive.lse, 2.0, c.dtype, true)) << "lse";
  }
  if (c.probs) {
    EXPECT_TRUE(close_to_ref(probs.values(), ref.probs, naive.probs, 2.0, c.dtype)) << "probs";
  }
  EXPECT_TRUE(out.gaps_intact());
  EXPECT_TRUE(lse.gaps_intact());
  EXPECT_TRUE(bytes_unchanged(qb, q.bytes())) << "q modified";
  EXPECT_TRUE(bytes_unchanged(kb, k.bytes())) << "k modified";
  EXPECT_TRUE(bytes_unchanged(vb, v.bytes())) << "v modified";
}

std::vector<std::int64_t> ragged(std::mt19937_64& rng, std::int64_t n, std::int64_t hi) {
  std::vector<std::int64_t> l;
  for (std::int64_t i = 0; i < n; ++i) l.push_back(ragged_len(rng, hi));
  return l;
}

class VarlenDtype : public ::testing::TestWithParam<DType> {};

TEST_P(VarlenDtype, PackedRaggedLengths) {
  FA_SEEDED_RNG(rng);
  VarCase c;
  c.dtype = GetParam();
  c.lq = {0, 1, 17, 5, 40};
  c.lk = {3, 1, 17, 0, 113};
  std::shuffle(c.lk.begin(), c.lk.end(), rng);
  run_varlen(c, rng);
  c.opts.causal = true;  // Sq > Sk and Sq < Sk rows
  run_varlen(c, rng);
}

TEST_P(VarlenDtype, PackedCombinedOptions) {
  FA_SEEDED_RNG(rng);
  for (std::int64_t ratio : {1, 4, 8}) {
    VarCase c;
    c.dtype = GetParam();
    c.lq = ragged(rng, rand_int(rng, 1, 4), 90);
    c.lk = ragged(rng, static_cast<std::int64_t>(c.lq.size()), 150);
    c.Hkv = rand_int(rng, 1, 2);
    c.Hq = c.Hkv * ratio;
    c.D = pick(rng, std::vector<std::int64_t>{16, 64, 128});
    c.opts.causal = true;
    c.opts.left = rand_int(rng, 0, 40);
    c.opts.softcap = rand_real(rng, 5, 30);
    c.opts.alibi = static_cast<int>(rand_int(rng, 1, 2));
    c.probs = true;
    c.extra_max_q = rand_int(rng, 0, 3);
    c.extra_max_k = rand_int(rng, 0, 3);
    run_varlen(c, rng);
  }
}

TEST_P(VarlenDtype, PackedSequsedK) {
  FA_SEEDED_RNG(rng);
  VarCase c;
  c.dtype = GetParam();
  c.lq = ragged(rng, 4, 50);
  c.lk = ragged(rng, 4, 80);
  c.lens = LenSource::kSequsedK;
  c.opts = random_opts(rng);
  run_varlen(c, rng);
}

TEST_P(VarlenDtype, PagedBlockTableAllPageSizes) {
  FA_SEEDED_RNG(rng);
  for (std::int64_t ps : {1, 5, 16, 256}) {
    VarCase c;
    c.dtype = GetParam();
    c.keys = KeySource::kBlockTable;
    c.page_size = ps;
    c.lens = pick(rng, std::vector<LenSource>{LenSource::kSequsedK, LenSource::kCuSeqlensK, LenSource::kSequsedOverCu});
    c.lq = ragged(rng, rand_int(rng, 1, 4), 40);
    c.lk = ragged(rng, static_cast<std::int64_t>(c.lq.size()), ps == 1 ? 60 : 300);
    c.Hkv = 2;
    c.Hq = 2 * pick(rng, std::vector<std::int64_t>{1, 4});
    c.opts = random_opts(rng);
    c.strided = rand_int(rng, 0, 1) == 1;
    run_varlen(c, rng);
  }
}

TEST_P(VarlenDtype, PagedCsrAllPageSizes) {
  FA_SEEDED_RNG(rng);
  for (std::int64_t ps : {1, 5, 16, 256}) {
    for (LenSource ls : {LenSource::kLastPageLen, LenSource::kSequsedK, LenSource::kCuSeqlensK, LenSource::kSequsedOverCu}) {
      VarCase c;
      c.dtype = GetParam();
      c.keys = KeySource::kCsr;
      c.page_size = ps;
      c.lens = ls;
      c.lq = ragged(rng, rand_int(rng, 1, 3), 30);
      c.lk = ragged(rng, static_cast<std::int64_t>(c.lq.size()), ps == 1 ? 50 : 260);
      c.Hkv = 1;
      c.Hq = pick(rng, std::vector<std::int64_t>{1, 4, 8});
      c.D = 16;
      c.opts = random_opts(rng);
      c.probs = rand_int(rng, 0, 2) == 0;
      run_varlen(c, rng);
    }
  }
}

TEST_P(VarlenDtype, Sinks) {
  // Attention sinks over every key source, with empty sequences, padding rows and probs.
  FA_SEEDED_RNG(rng);
  for (KeySource ks : {KeySource::kPacked, KeySource::kBlockTable, KeySource::kCsr}) {
    VarCase c;
    c.dtype = GetParam();
    c.keys = ks;
    c.lens = ks == KeySource::kCsr ? LenSource::kLastPageLen : LenSource::kCuSeqlensK;
    c.page_size = pick(rng, std::vector<std::int64_t>{1, 16});
    c.lq = ragged(rng, rand_int(rng, 1, 4), 40);
    c.lk = ragged(rng, static_cast<std::int64_t>(c.lq.size()), 120);
    c.lq.push_back(rand_int(rng, 1, 5));  // a sequence with no keys: its rows get LSE sinks[h]
    c.lk.push_back(0);
    c.Hkv = rand_int(rng, 1, 2);
    c.Hq = c.Hkv * pick(rng, std::vector<std::int64_t>{1, 8});
    c.opts = random_opts(rng);
    c.opts.sinks = true;
    c.probs = rand_int(rng, 0, 1) == 1;
    c.pad_rows = rand_int(rng, 0, 3);
    c.strided = rand_int(rng, 0, 1) == 1;
    run_varlen(c, rng);
  }
}

TEST_P(VarlenDtype, NonContiguousStrides) {
  FA_SEEDED_RNG(rng);
  for (KeySource ks : {KeySource::kPacked, KeySource::kBlockTable, KeySource::kCsr}) {
    VarCase c;
    c.dtype = GetParam();
    c.keys = ks;
    c.page_size = 16;
    c.lens = ks == KeySource::kCsr ? LenSource::kLastPageLen : LenSource::kCuSeqlensK;
    c.lq = ragged(rng, 3, 40);
    c.lk = ragged(rng, 3, 70);
    c.Hkv = 2;
    c.Hq = 4;
    c.D = 40;
    c.opts = random_opts(rng);
    c.strided = true;
    run_varlen(c, rng);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, VarlenDtype, ::testing::ValuesIn(float_dtypes()), dtype_param_name);

TEST(Varlen, SeedWorknoteShapes) {
  // The seed worknote's flash_attn_varlen_func example: 10 sequences of 10..99 queries, keys of
  // 0..99 tokens in a paged cache with 256-token pages, 16 heads of dim 16, float16.
  FA_SEEDED_RNG(rng);
  VarCase c;
  c.dtype = DType::kFloat16;
  for (int b = 0; b < 10; ++b) {
    c.lq.push_back(rand_int(rng, 10, 99));
    c.lk.push_back(rand_int(rng, 0, 99));
  }
  c.Hq = c.Hkv = 16;
  c.D = 16;
  c.keys = KeySource::kBlockTable;
  c.page_size = 256;
  c.lens = LenSource::kCuSeqlensK;
  c.probs = true;
  run_varlen(c, rng);
}

TEST(Varlen, PaddingRowsPastLastSequence) {
  // q may have more rows than cu_seqlens_q[B] (padded batches); those rows see no key.
  FA_SEEDED_RNG(rng);
  for (KeySource ks : {KeySource::kPacked, KeySource::kCsr}) {
    VarCase c;
    c.keys = ks;
    c.lens = ks == KeySource::kCsr ? LenSource::kLastPageLen : LenSource::kCuSeqlensK;
    c.lq = {3, 0, 5};
    c.lk = {4, 2, 9};
    c.pad_rows = 4;
    c.opts = random_opts(rng);
    run_varlen(c, rng);
  }
}

TEST(Varlen, EmptyBatchAndAllEmptySequences) {
  FA_SEEDED_RNG(rng);
  VarCase c;
  c.lq = {};
  c.lk = {};
  run_varlen(c, rng);
  c.lq = {0, 0, 3};
  c.lk = {0, 5, 0};
  c.probs = true;
  run_varlen(c, rng);
  c.keys = KeySource::kCsr;
  c.lens = LenSource::kLastPageLen;
  run_varlen(c, rng);
}

TEST(Varlen, MatchesDenseAttentionPerSequence) {
  // Packed varlen and dense batched attention on the same equal-length sequences agree bitwise
  // is not promised; both must agree with the reference, and here with each other closely.
  FA_SEEDED_RNG(rng);
  const std::int64_t B = 3, S = 29, H = 2, D = 32;
  HostTensor q = fa_ref::random_tensor(DType::kFloat32, {B, S, H, D}, rng);
  HostTensor k = fa_ref::random_tensor(DType::kFloat32, {B, S, H, D}, rng);
  HostTensor v = fa_ref::random_tensor(DType::kFloat32, {B, S, H, D}, rng);
  HostTensor o1(DType::kFloat32, {B, S, H, D}), o2(DType::kFloat32, {B * S, H, D});
  o1.poison();
  o2.poison();
  fastattn::AttentionArgs a;
  a.q = q.view();
  a.k = k.view();
  a.v = v.view();
  a.out = o1.view();
  a.options.causal = true;
  ASSERT_NO_THROW(fastattn::attention_forward(a));
  HostTensor cu = fa_ref::int_tensor({0, S, 2 * S, 3 * S});
  fastattn::VarlenAttentionArgs va;
  va.q = fastattn::make_view(q.view().data, DType::kFloat32, {B * S, H, D});
  va.k = fastattn::make_view(k.view().data, DType::kFloat32, {B * S, H, D});
  va.v = fastattn::make_view(v.view().data, DType::kFloat32, {B * S, H, D});
  va.cu_seqlens_q = cu.view();
  va.cu_seqlens_k = cu.view();
  va.max_seqlen_q = va.max_seqlen_k = S;
  va.out = o2.view();
  va.options.causal = true;
  ASSERT_NO_THROW(fastattn::varlen_attention_forward(va));
  EXPECT_LE(fa_ref::max_abs_diff(o1.values(), o2.values()), 2e-6);
}

}  // namespace
