// 64-bit index arithmetic (DESIGN.md): page x page stride and batch x batch stride beyond 2^31
// elements. The tensors live in sparse anonymous mappings (MAP_NORESERVE): a few GiB of address
// space of which only the handful of touched pages become memory.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "test_util.h"

namespace {

using namespace fa_test;
using fastattn::TensorView;

/// A sparse, zero-filled mapping of `bytes` bytes.
class SparseBuffer {
 public:
  explicit SparseBuffer(std::size_t bytes) : bytes_(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    data_ = p == MAP_FAILED ? nullptr : p;
  }
  ~SparseBuffer() {
    if (data_) munmap(data_, bytes_);
  }
  SparseBuffer(const SparseBuffer&) = delete;
  SparseBuffer& operator=(const SparseBuffer&) = delete;
  void* data() const { return data_; }

 private:
  std::size_t bytes_;
  void* data_ = nullptr;
};

/// A bfloat16 view over a sparse buffer with the given shape/strides (elements), plus element
/// access by multi-index.
struct BigView {
  std::unique_ptr<SparseBuffer> buf;
  TensorView v;
  BigView(std::vector<std::int64_t> shape, std::vector<std::int64_t> strides) {
    std::int64_t max_off = 0;
    for (std::size_t d = 0; d < shape.size(); ++d) max_off += (shape[d] - 1) * strides[d];
    buf = std::make_unique<SparseBuffer>(static_cast<std::size_t>(max_off + 1) * 2);
    v.data = buf->data();
    v.dtype = DType::kBFloat16;
    v.ndim = static_cast<int>(shape.size());
    for (std::size_t d = 0; d < shape.size(); ++d) v.shape[d] = shape[d], v.strides[d] = strides[d];
  }
  bool ok() const { return buf->data() != nullptr; }
  std::uint16_t* at(std::initializer_list<std::int64_t> idx) const {
    std::int64_t off = 0;
    std::size_t d = 0;
    for (auto i : idx) off += i * v.strides[d++];
    return static_cast<std::uint16_t*>(v.data) + off;
  }
  double get(std::initializer_list<std::int64_t> idx) const { return fa_ref::bf16_bits_to_double(*at(idx)); }
  void set(std::initializer_list<std::int64_t> idx, double x) const { *at(idx) = fa_ref::double_to_bf16_bits(x); }
};

constexpr std::int64_t kBig = (std::int64_t{1} << 30) + 64;  // elements; x2 > 2^31

TEST(LargeIndex, DenseBatchStrideBeyond2To31) {
  FA_SEEDED_RNG(rng);
  const std::int64_t B = 3, Sq = 2, Sk = 5, H = 2, D = 8;
  BigView q({B, Sq, H, D}, {kBig, H * D, D, 1}), k({B, Sk, H, D}, {kBig, H * D, D, 1}),
      v({B, Sk, H, D}, {kBig, H * D, D, 1}), out({B, Sq, H, D}, {kBig, H * D, D, 1});
  if (!q.ok() || !k.ok() || !v.ok() || !out.ok()) GTEST_SKIP() << "could not map sparse address space";
  std::normal_distribution<double> nd;
  std::vector<double> qv, kv, vv;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t s = 0; s < Sk; ++s)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d) {
          if (s < Sq) {
            q.set({b, s, h, d}, nd(rng));
            out.set({b, s, h, d}, std::nan(""));
          }
          k.set({b, s, h, d}, nd(rng));
          v.set({b, s, h, d}, nd(rng));
        }
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t s = 0; s < Sk; ++s)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d) {
          if (s < Sq) qv.push_back(q.get({b, s, h, d}));
          kv.push_back(k.get({b, s, h, d}));
          vv.push_back(v.get({b, s, h, d}));
        }
  fastattn::AttentionArgs a;
  a.q = q.v;
  a.k = k.v;
  a.v = v.v;
  a.out = out.v;
  a.options.causal = true;
  ASSERT_NO_THROW(fastattn::attention_forward(a));
  fa_ref::RefOptions o;
  o.causal = true;
  const auto ref = fa_ref::ref_attention(qv, kv, vv, B, Sq, Sk, H, H, D, o);
  const auto naive = fa_ref::ref_attention(qv, kv, vv, B, Sq, Sk, H, H, D, o, DType::kBFloat16);
  std::vector<double> ov;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t s = 0; s < Sq; ++s)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t d = 0; d < D; ++d) ov.push_back(out.get({b, s, h, d}));
  EXPECT_TRUE(close_to_ref(ov, ref.out, naive.out, 2.0, DType::kBFloat16));
}

TEST(LargeIndex, KVCacheAppendPageAndBatchStridesBeyond2To31) {
  FA_SEEDED_RNG(rng);
  std::normal_distribution<double> nd;
  const std::int64_t B = 2, H = 1, D = 8, ps = 2;
  for (bool paged : {false, true}) {
    SCOPED_TRACE(paged ? "paged" : "contiguous");
    // paged: 4 pages of (2, 1, 8), page stride kBig; seq 0 -> page [3], seq 1 -> pages [2, 1].
    // contiguous: 3 cache rows of (4, 1, 8), row stride kBig; seq b -> row 2 - b.
    const std::int64_t N0 = paged ? 4 : 3, N1 = paged ? ps : 4;
    BigView kc({N0, N1, H, D}, {kBig, H * D, D, 1}), vc({N0, N1, H, D}, {kBig, H * D, D, 1});
    if (!kc.ok() || !vc.ok()) GTEST_SKIP() << "could not map sparse address space";
    for (std::int64_t n = 0; n < N0; ++n)
      for (std::int64_t s = 0; s < N1; ++s)
        for (std::int64_t d = 0; d < D; ++d) kc.set({n, s, 0, d}, nd(rng)), vc.set({n, s, 0, d}, nd(rng));
    HostTensor q = fa_ref::random_tensor(DType::kBFloat16, {B, 1, H, D}, rng);
    HostTensor kn = fa_ref::random_tensor(DType::kBFloat16, {B, 1, H, D}, rng);
    HostTensor vn = fa_ref::random_tensor(DType::kBFloat16, {B, 1, H, D}, rng);
    HostTensor out(DType::kBFloat16, {B, 1, H, D});
    out.poison();
    HostTensor seqlens = fa_ref::int_tensor({1, 2});
    HostTensor table = fa_ref::int_tensor_shaped({3, 3, 2, 1}, {2, 2});  // row 0: [3, (unused 3)]
    HostTensor bidx = fa_ref::int_tensor({2, 1});

    fa_ref::KVCacheRefIn ri;
    ri.B = B;
    ri.Sq = 1;
    ri.Hq = H;
    ri.Hkv = H;
    ri.D = D;
    ri.Snew = 1;
    ri.q = q.values();
    ri.k_new = kn.values();
    ri.v_new = vn.values();
    ri.N0 = N0;
    ri.N1 = N1;
    ri.paged = paged;
    ri.row_pages = {{3}, {2, 1}};
    ri.cache_seqlens = {1, 2};
    if (!paged) ri.cache_batch_idx = {2, 1};
    for (std::int64_t n = 0; n < N0; ++n)
      for (std::int64_t s = 0; s < N1; ++s)
        for (std::int64_t d = 0; d < D; ++d) ri.k_cache.push_back(kc.get({n, s, 0, d})), ri.v_cache.push_back(vc.get({n, s, 0, d}));

    fastattn::KVCacheArgs a;
    a.q = q.view();
    a.k_cache = kc.v;
    a.v_cache = vc.v;
    a.k_new = kn.view();
    a.v_new = vn.view();
    a.cache_seqlens = seqlens.view();
    if (paged) a.block_table = table.view();
    else a.cache_batch_idx = bidx.view();
    a.out = out.view();
    ASSERT_NO_THROW(fastattn::kvcache_attention_forward(a));
    const auto ref = fa_ref::ref_kvcache(ri, fa_ref::RefOptions{});
    const auto naive = fa_ref::ref_kvcache(ri, fa_ref::RefOptions{}, DType::kBFloat16);
    EXPECT_TRUE(close_to_ref(out.values(), ref.attn.out, naive.attn.out, 3.0, DType::kBFloat16));
    // The appended rows landed at the far addresses.
    for (std::int64_t idx : ref.written) {
      const std::int64_t n = idx / (N1 * D), s = (idx / D) % N1, d = idx % D;
      EXPECT_EQ(kc.get({n, s, 0, d}), ref.k_cache[static_cast<std::size_t>(idx)]) << idx;
      EXPECT_EQ(vc.get({n, s, 0, d}), ref.v_cache[static_cast<std::size_t>(idx)]) << idx;
    }
  }
}

}  // namespace
