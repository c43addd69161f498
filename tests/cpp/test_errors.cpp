// Bad inputs: every op validates all arguments before any work and throws the right error type
// (ValueError / TypeError / DeviceError / NotSupportedError) with a message naming the argument.
// Each case also checks that outputs and caches were not touched and that nothing crashed
// (out-of-range page indices and cache overflows must be errors, not memory accesses).
#include <gtest/gtest.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <functional>
#include <limits>
#include <typeinfo>

#include "test_util.h"

namespace {

using namespace fa_test;
using fa_ref::HostTensor;
using fastattn::DeviceError;
using fastattn::NotSupportedError;
using fastattn::TypeError;
using fastattn::ValueError;

/// Owns the tensors of one call; `watch` lists the ones that must be left untouched by a
/// rejected call (outputs, caches).
struct Owner {
  std::deque<HostTensor> keep;
  std::vector<HostTensor*> watch;
  HostTensor& add(HostTensor t, bool watched = false) {
    keep.push_back(std::move(t));
    if (watched) watch.push_back(&keep.back());
    return keep.back();
  }
};

/// True when `name` occurs in `msg` as a whole identifier-ish token (so "k" does not match the
/// "k" of "kvcache"); dots and brackets count as separators ("suffix.page_indices" names
/// "page_indices").
bool names_argument(const std::string& msg, const std::string& name) {
  auto ident = [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) || ch == '_'; };
  for (std::size_t pos = msg.find(name); pos != std::string::npos; pos = msg.find(name, pos + 1)) {
    const bool left_ok = pos == 0 || !ident(msg[pos - 1]);
    const bool right_ok = pos + name.size() >= msg.size() || !ident(msg[pos + name.size()]);
    if (left_ok && right_ok) return true;
  }
  return false;
}

int g_cases = 0;  // distinct bad inputs exercised (reported by the last test)

template <class E>
void expect_bad(Owner& o, const std::function<void()>& call, std::vector<std::string> names,
                const std::string& label) {
  SCOPED_TRACE("bad input: " + label);
  ++g_cases;
  std::vector<std::vector<unsigned char>> before;
  for (HostTensor* t : o.watch) before.push_back(t->bytes());
  try {
    call();
    ADD_FAILURE() << "no exception for: " << label;
  } catch (const E& e) {
    const std::string msg = e.what();
    if (std::getenv("FASTATTN_TEST_VERBOSE")) std::printf("[bad input] %s -> %s\n", label.c_str(), msg.c_str());
    bool named = false;
    for (const auto& n : names) named = named || names_argument(msg, n);
    EXPECT_TRUE(named) << "message does not name the argument (one of " << ::testing::PrintToString(names)
                       << "): " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type " << typeid(e).name() << " (wanted " << typeid(E).name()
                  << "): " << e.what();
  } catch (...) {
    ADD_FAILURE() << "non-std exception";
  }
  for (std::size_t i = 0; i < o.watch.size(); ++i)
    EXPECT_TRUE(bytes_unchanged(before[i], o.watch[i]->bytes())) << "watched tensor " << i << " modified by a rejected call";
}

// ---- dense attention ------------------------------------------------------------------------

struct DenseFix : Owner {
  fastattn::AttentionArgs a;
  std::mt19937_64 rng{1};
  DenseFix() {
    const DType dt = DType::kFloat16;
    a.q = add(fa_ref::random_tensor(dt, {2, 5, 4, 32}, rng)).view();
    a.k = add(fa_ref::random_tensor(dt, {2, 7, 2, 32}, rng)).view();
    a.v = add(fa_ref::random_tensor(dt, {2, 7, 2, 32}, rng)).view();
    HostTensor out(dt, {2, 5, 4, 32}), lse(DType::kFloat32, {2, 4, 5}), probs(DType::kFloat32, {2, 4, 5, 7});
    out.poison();
    lse.poison();
    probs.poison();
    a.out = add(std::move(out), true).view();
    a.lse = add(std::move(lse), true).view();
    a.probs = add(std::move(probs), true).view();
  }
  void run() const { fastattn::attention_forward(a); }
  fastattn::TensorView tensor(DType dt, std::vector<std::int64_t> shape) {
    return add(fa_ref::random_tensor(dt, shape, rng)).view();
  }
};

TEST(Errors, ValidDenseBaselineRuns) {
  DenseFix f;
  ASSERT_NO_THROW(f.run());
}

#define DENSE_CASE(E, names, label, mutate) \
  do {                                      \
    DenseFix f;                             \
    mutate;                                 \
    expect_bad<E>(f, [&] { f.run(); }, names, label); \
  } while (0)

using N = std::vector<std::string>;

TEST(Errors, DenseAttention) {
  DENSE_CASE(TypeError, (N{"q"}), "q int32", f.a.q = f.tensor(DType::kInt32, {2, 5, 4, 32}));
  DENSE_CASE(TypeError, (N{"k"}), "k float32 with q float16", f.a.k = f.tensor(DType::kFloat32, {2, 7, 2, 32}));
  DENSE_CASE(TypeError, (N{"v"}), "v bfloat16 with q float16", f.a.v = f.tensor(DType::kBFloat16, {2, 7, 2, 32}));
  DENSE_CASE(TypeError, (N{"out"}), "out float32 with q float16", f.a.out = f.tensor(DType::kFloat32, {2, 5, 4, 32}));
  DENSE_CASE(ValueError, (N{"q"}), "q 3-d", f.a.q = f.tensor(DType::kFloat16, {5, 4, 32}));
  DENSE_CASE(ValueError, (N{"k"}), "k batch 3 vs q batch 2", f.a.k = f.tensor(DType::kFloat16, {3, 7, 2, 32}));
  DENSE_CASE(ValueError, (N{"v"}), "v seqlen differs from k", f.a.v = f.tensor(DType::kFloat16, {2, 6, 2, 32}));
  DENSE_CASE(ValueError, (N{"out"}), "out shape", f.a.out = f.tensor(DType::kFloat16, {2, 5, 4, 16}));
  DENSE_CASE(ValueError, (N{"k", "heads", "heads_kv"}), "Hq 4 not divisible by Hkv 3",
             (f.a.k = f.tensor(DType::kFloat16, {2, 7, 3, 32}), f.a.v = f.tensor(DType::kFloat16, {2, 7, 3, 32})));
  DENSE_CASE(ValueError, (N{"q", "head_dim"}), "head_dim 36 not a multiple of 8",
             (f.a.q = f.tensor(DType::kFloat16, {2, 5, 4, 36}), f.a.k = f.tensor(DType::kFloat16, {2, 7, 2, 36}),
              f.a.v = f.tensor(DType::kFloat16, {2, 7, 2, 36}), f.a.out = f.tensor(DType::kFloat16, {2, 5, 4, 36})));
  DENSE_CASE(ValueError, (N{"q", "head_dim"}), "head_dim 264 > 256",
             (f.a.q = f.tensor(DType::kFloat16, {1, 1, 1, 264}), f.a.k = f.tensor(DType::kFloat16, {1, 1, 1, 264}),
              f.a.v = f.tensor(DType::kFloat16, {1, 1, 1, 264}), f.a.out = f.tensor(DType::kFloat16, {1, 1, 1, 264}),
              f.a.lse.reset(), f.a.probs.reset()));
  DENSE_CASE(DeviceError, (N{"k"}), "k on cuda:0, q on cpu", f.a.k.device = (fastattn::Device{fastattn::DeviceType::kCUDA, 0}));
  DENSE_CASE(DeviceError, (N{"out"}), "out on cuda:1", f.a.out.device = (fastattn::Device{fastattn::DeviceType::kCUDA, 1}));
  DENSE_CASE(ValueError, (N{"q"}), "q last dim not contiguous (stride 2)",
             (f.a.q = f.tensor(DType::kFloat16, {2, 5, 4, 64}), f.a.q.shape[3] = 32, f.a.q.strides[3] = 2));
  DENSE_CASE(ValueError, (N{"lse"}), "lse shape (B, Sq, Hq)", f.a.lse = f.tensor(DType::kFloat32, {2, 5, 4}));
  DENSE_CASE(TypeError, (N{"lse"}), "lse float16", f.a.lse = f.tensor(DType::kFloat16, {2, 4, 5}));
  DENSE_CASE(ValueError, (N{"probs"}), "probs shape", f.a.probs = f.tensor(DType::kFloat32, {2, 4, 5, 8}));
  DENSE_CASE(TypeError, (N{"probs"}), "probs float16", f.a.probs = f.tensor(DType::kFloat16, {2, 4, 5, 7}));
  DENSE_CASE(ValueError, (N{"sinks"}), "sinks of 5 heads vs q's 4", f.a.sinks = f.tensor(DType::kFloat32, {5}));
  DENSE_CASE(TypeError, (N{"sinks"}), "sinks float16", f.a.sinks = f.tensor(DType::kFloat16, {4}));
  DENSE_CASE(DeviceError, (N{"sinks"}), "sinks on cuda:0",
             (f.a.sinks = f.tensor(DType::kFloat32, {4}),
              f.a.sinks->device = (fastattn::Device{fastattn::DeviceType::kCUDA, 0})));
  DENSE_CASE(ValueError, (N{"window_size", "window_left", "window"}), "window_left -2", f.a.options.window_left = -2);
  DENSE_CASE(ValueError, (N{"window_size", "window_right", "window"}), "window_right -7", f.a.options.window_right = -7);
  DENSE_CASE(ValueError, (N{"softcap"}), "softcap -1", f.a.options.softcap = -1.0f);
  DENSE_CASE(ValueError, (N{"softcap"}), "softcap NaN", f.a.options.softcap = std::numeric_limits<float>::quiet_NaN());
  DENSE_CASE(ValueError, (N{"softmax_scale"}), "softmax_scale inf", f.a.options.softmax_scale = std::numeric_limits<float>::infinity());
  DENSE_CASE(ValueError, (N{"alibi_slopes"}), "alibi_slopes (Hq + 1)", f.a.options.alibi_slopes = f.tensor(DType::kFloat32, {5}));
  DENSE_CASE(ValueError, (N{"alibi_slopes"}), "alibi_slopes (B + 1, Hq)", f.a.options.alibi_slopes = f.tensor(DType::kFloat32, {3, 4}));
  DENSE_CASE(ValueError, (N{"alibi_slopes"}), "alibi_slopes 3-d", f.a.options.alibi_slopes = f.tensor(DType::kFloat32, {1, 2, 4}));
  DENSE_CASE(TypeError, (N{"alibi_slopes"}), "alibi_slopes float16", f.a.options.alibi_slopes = f.tensor(DType::kFloat16, {4}));
  DENSE_CASE(ValueError, (N{"q"}), "q null data", f.a.q.data = nullptr);
  DENSE_CASE(ValueError, (N{"k"}), "k negative size", (f.a.k.shape[1] = -1, f.a.v.shape[1] = -1));
  DENSE_CASE(ValueError, (N{"q"}), "q 7 dims claimed", f.a.q.ndim = 7);
}

TEST(Errors, CudaTensorsWithoutCudaBackend) {
  if (fastattn::backend_available(fastattn::Device{fastattn::DeviceType::kCUDA, 0}))
    GTEST_SKIP() << "this build has a CUDA backend: host pointers must not be passed as CUDA tensors";
  DenseFix f;
  const fastattn::Device cuda{fastattn::DeviceType::kCUDA, 0};
  for (auto* t : {&f.a.q, &f.a.k, &f.a.v, &f.a.out, &*f.a.lse, &*f.a.probs}) t->device = cuda;
  expect_bad<NotSupportedError>(f, [&] { f.run(); }, N{"q", "cuda", "cuda:0", "CUDA"}, "all tensors on cuda:0, CPU-only build");
}

// ---- varlen ---------------------------------------------------------------------------------

/// 3 sequences: q lens {2, 0, 3}, k lens {4, 1, 2}; packed by default, paged on request.
struct VarFix : Owner {
  fastattn::VarlenAttentionArgs a;
  std::mt19937_64 rng{2};
  HostTensor* k_pages = nullptr;
  explicit VarFix(int paged = 0 /* 0 packed, 1 block table, 2 CSR */) {
    const DType dt = DType::kBFloat16;
    a.q = add(fa_ref::random_tensor(dt, {5, 4, 16}, rng)).view();
    a.cu_seqlens_q = add(fa_ref::int_tensor({0, 2, 2, 5})).view();
    a.max_seqlen_q = 3;
    a.max_seqlen_k = 4;
    HostTensor out(dt, {5, 4, 16}), lse(DType::kFloat32, {4, 5});
    out.poison();
    lse.poison();
    a.out = add(std::move(out), true).view();
    a.lse = add(std::move(lse), true).view();
    if (paged == 0) {
      a.k = add(fa_ref::random_tensor(dt, {7, 2, 16}, rng)).view();
      a.v = add(fa_ref::random_tensor(dt, {7, 2, 16}, rng)).view();
      a.cu_seqlens_k = add(fa_ref::int_tensor({0, 4, 5, 7})).view();
    } else {
      // page_size 2, 6 pages; seq 0 -> pages {4, 1}, seq 1 -> {0}, seq 2 -> {5}
      fastattn::PagedKV p;
      k_pages = &add(fa_ref::random_tensor(dt, {6, 2, 2, 16}, rng));
      p.k_pages = k_pages->view();
      p.v_pages = add(fa_ref::random_tensor(dt, {6, 2, 2, 16}, rng)).view();
      if (paged == 1) {
        p.block_table = add(fa_ref::int_tensor_shaped({4, 1, 0, 3, 5, 2}, {3, 2})).view();
      } else {
        p.page_indptr = add(fa_ref::int_tensor({0, 2, 3, 4})).view();
        p.page_indices = add(fa_ref::int_tensor({4, 1, 0, 5})).view();
      }
      a.paged = p;
      a.seqused_k = add(fa_ref::int_tensor({4, 1, 2})).view();
    }
  }
  void run() const { fastattn::varlen_attention_forward(a); }
  fastattn::TensorView tensor_like_pages() {
    return add(fa_ref::random_tensor(DType::kBFloat16, {6, 2, 2, 16}, rng)).view();
  }
  fastattn::TensorView ints(const std::vector<std::int64_t>& v) { return add(fa_ref::int_tensor(v)).view(); }
};

#define VAR_CASE(paged, E, names, label, mutate)          \
  do {                                                  \
    VarFix f(paged);                                    \
    mutate;                                             \
    expect_bad<E>(f, [&] { f.run(); }, names, label);   \
  } while (0)

TEST(Errors, ValidVarlenBaselinesRun) {
  for (int p = 0; p < 3; ++p) {
    VarFix f(p);
    ASSERT_NO_THROW(f.run()) << p;
  }
  // CSR with last_page_len: seq 0 = 2 pages, last 2 -> 4 keys, etc.
  VarFix f(2);
  f.a.seqused_k.reset();
  f.a.paged->last_page_len = f.ints({2, 1, 2});
  ASSERT_NO_THROW(f.run());
}

TEST(Errors, VarlenPacked) {
  VAR_CASE(0, ValueError, (N{"cu_seqlens_q"}), "cu_seqlens_q not monotone", f.a.cu_seqlens_q = f.ints({0, 3, 2, 5}));
  VAR_CASE(0, ValueError, (N{"cu_seqlens_q"}), "cu_seqlens_q[0] != 0", f.a.cu_seqlens_q = f.ints({1, 2, 2, 5}));
  VAR_CASE(0, ValueError, (N{"cu_seqlens_q", "q"}), "cu_seqlens_q[B] > total_q", (f.a.cu_seqlens_q = f.ints({0, 2, 2, 6}), f.a.max_seqlen_q = 4));
  VAR_CASE(0, TypeError, (N{"cu_seqlens_q"}), "cu_seqlens_q float32", f.a.cu_seqlens_q = f.add(fa_ref::float_tensor({0, 2, 2, 5}, {4})).view());
  VAR_CASE(0, TypeError, (N{"cu_seqlens_k"}), "cu_seqlens_k int64",
           (f.a.cu_seqlens_k = f.add([] { HostTensor t(DType::kInt64, {4}); t.assign({0, 4, 5, 7}); return t; }()).view()));
  VAR_CASE(0, ValueError, (N{"cu_seqlens_k"}), "cu_seqlens_k wrong length", f.a.cu_seqlens_k = f.ints({0, 4, 7}));
  VAR_CASE(0, ValueError, (N{"cu_seqlens_k"}), "cu_seqlens_k missing with packed k", f.a.cu_seqlens_k.reset());
  VAR_CASE(0, ValueError, (N{"cu_seqlens_k", "k"}), "cu_seqlens_k[B] > total_k", f.a.cu_seqlens_k = f.ints({0, 4, 5, 8}));
  VAR_CASE(0, ValueError, (N{"max_seqlen_q"}), "max_seqlen_q below a query length", f.a.max_seqlen_q = 2);
  VAR_CASE(0, ValueError, (N{"max_seqlen_k"}), "max_seqlen_k below a key length", f.a.max_seqlen_k = 3);
  VAR_CASE(0, ValueError, (N{"max_seqlen_q"}), "max_seqlen_q negative", f.a.max_seqlen_q = -1);
  VAR_CASE(0, ValueError, (N{"seqused_k"}), "seqused_k beyond its packed segment", f.a.seqused_k = f.ints({4, 2, 2}));
  VAR_CASE(0, ValueError, (N{"seqused_k"}), "seqused_k negative", f.a.seqused_k = f.ints({4, -1, 2}));
  VAR_CASE(0, ValueError, (N{"v"}), "k without v", f.a.v.reset());
  VAR_CASE(0, ValueError, (N{"k", "paged"}), "packed k and a paged cache both",
           (f.a.paged = fastattn::PagedKV{}, f.a.paged->k_pages = f.tensor_like_pages(),
            f.a.paged->v_pages = f.a.paged->k_pages, f.a.paged->block_table = f.ints({0, 0, 0})));
  VAR_CASE(0, ValueError, (N{"lse"}), "lse (total_q, Hq) instead of (Hq, total_q)",
           f.a.lse = f.add(HostTensor(DType::kFloat32, {5, 4})).view());
  VAR_CASE(0, ValueError, (N{"probs"}), "probs shape not (B, Hq, max_q, max_k)",
           f.a.probs = f.add(HostTensor(DType::kFloat32, {3, 4, 3, 3})).view());
  VAR_CASE(0, ValueError, (N{"sinks"}), "sinks (Hq, 1) instead of (Hq)",
           f.a.sinks = f.add(HostTensor(DType::kFloat32, {4, 1})).view());
  VAR_CASE(0, TypeError, (N{"sinks"}), "sinks bfloat16", f.a.sinks = f.add(HostTensor(DType::kBFloat16, {4})).view());
}

TEST(Errors, VarlenPaged) {
  VAR_CASE(1, ValueError, (N{"block_table"}), "block_table page index == num_pages",
           f.a.paged->block_table = f.add(fa_ref::int_tensor_shaped({4, 6, 0, 3, 5, 2}, {3, 2})).view());
  VAR_CASE(1, ValueError, (N{"block_table"}), "block_table negative page index",
           f.a.paged->block_table = f.add(fa_ref::int_tensor_shaped({4, 1, -1, 3, 5, 2}, {3, 2})).view());
  VAR_CASE(1, TypeError, (N{"block_table"}), "block_table float32",
           f.a.paged->block_table = f.add(fa_ref::float_tensor({4, 1, 0, 3, 5, 2}, {3, 2})).view());
  VAR_CASE(1, ValueError, (N{"block_table"}), "block_table rows != B",
           f.a.paged->block_table = f.add(fa_ref::int_tensor_shaped({4, 1, 0, 3}, {2, 2})).view());
  VAR_CASE(1, ValueError, (N{"seqused_k", "block_table"}), "key length beyond the block table's pages",
           (f.a.seqused_k = f.ints({5, 1, 2}), f.a.max_seqlen_k = 5));
  VAR_CASE(1, ValueError, (N{"block_table", "page_indptr", "page_indices"}), "block_table and CSR both",
           (f.a.paged->page_indptr = f.ints({0, 2, 3, 4}), f.a.paged->page_indices = f.ints({4, 1, 0, 5})));
  VAR_CASE(1, ValueError, (N{"seqused_k", "cu_seqlens_k", "last_page_len"}), "paged with no key lengths",
           f.a.seqused_k.reset());
  VAR_CASE(1, ValueError, (N{"v_pages"}), "v_pages shape differs from k_pages",
           f.a.paged->v_pages = f.add(fa_ref::random_tensor(DType::kBFloat16, {6, 2, 1, 16}, f.rng)).view());
  VAR_CASE(1, TypeError, (N{"k_pages"}), "k_pages float32 with q bfloat16",
           f.a.paged->k_pages = f.add(fa_ref::random_tensor(DType::kFloat32, {6, 2, 2, 16}, f.rng)).view());
  VAR_CASE(1, ValueError, (N{"block_table", "page_indptr", "page_indices"}), "paged without any page addressing",
           f.a.paged->block_table.reset());
  VAR_CASE(2, ValueError, (N{"page_indices"}), "CSR page index out of range", f.a.paged->page_indices = f.ints({4, 1, 0, 9}));
  VAR_CASE(2, ValueError, (N{"page_indices"}), "CSR page_indices missing", f.a.paged->page_indices.reset());
  VAR_CASE(2, ValueError, (N{"page_indptr"}), "page_indptr not monotone", f.a.paged->page_indptr = f.ints({0, 2, 1, 4}));
  VAR_CASE(2, ValueError, (N{"page_indptr", "page_indices"}), "page_indptr[B] > len(page_indices)",
           f.a.paged->page_indptr = f.ints({0, 2, 3, 5}));
  VAR_CASE(2, ValueError, (N{"last_page_len"}), "last_page_len > page_size",
           (f.a.seqused_k.reset(), f.a.paged->last_page_len = f.ints({3, 1, 2})));
  VAR_CASE(2, ValueError, (N{"last_page_len"}), "last_page_len 0 for a sequence with pages",
           (f.a.seqused_k.reset(), f.a.paged->last_page_len = f.ints({2, 0, 2})));
  VAR_CASE(2, ValueError, (N{"seqused_k", "page_indptr", "page_indices"}), "CSR key length beyond its pages",
           f.a.seqused_k = f.ints({4, 3, 2}));
}

// ---- kv cache -------------------------------------------------------------------------------

/// B = 2, Sq = 1, Hq = 4, Hkv = 2, D = 16, cache (3, 8, 2, 16) with lengths {3, 6}, append 1.
/// paged: page_size 4, 6 pages; row 0 -> {5, 2}, row 1 -> {0, 3} (pages 1 and 4 unused).
struct KVFix : Owner {
  fastattn::KVCacheArgs a;
  std::mt19937_64 rng{3};
  explicit KVFix(int paged = 0) {
    const DType dt = DType::kFloat32;
    a.q = add(fa_ref::random_tensor(dt, {2, 1, 4, 16}, rng)).view();
    const std::vector<std::int64_t> cshape = paged ? std::vector<std::int64_t>{6, 4, 2, 16} : std::vector<std::int64_t>{3, 8, 2, 16};
    a.k_cache = add(fa_ref::random_tensor(dt, cshape, rng), true).view();
    a.v_cache = add(fa_ref::random_tensor(dt, cshape, rng), true).view();
    a.k_new = add(fa_ref::random_tensor(dt, {2, 1, 2, 16}, rng)).view();
    a.v_new = add(fa_ref::random_tensor(dt, {2, 1, 2, 16}, rng)).view();
    a.cache_seqlens = ints({3, 6});
    HostTensor out(dt, {2, 1, 4, 16}), lse(DType::kFloat32, {2, 4, 1});
    out.poison();
    lse.poison();
    a.out = add(std::move(out), true).view();
    a.lse = add(std::move(lse), true).view();
    if (paged == 1) a.block_table = add(fa_ref::int_tensor_shaped({5, 2, 0, 3}, {2, 2})).view();
    if (paged == 2) {
      a.page_indptr = ints({0, 2, 4});
      a.page_indices = ints({5, 2, 0, 3});
    }
  }
  void add_rotary(std::int64_t rows, std::int64_t half) {
    a.rotary_cos = add(fa_ref::random_tensor(DType::kFloat32, {rows, half}, rng)).view();
    a.rotary_sin = add(fa_ref::random_tensor(DType::kFloat32, {rows, half}, rng)).view();
  }
  void run() const { fastattn::kvcache_attention_forward(a); }
  fastattn::TensorView ints(const std::vector<std::int64_t>& v) { return add(fa_ref::int_tensor(v)).view(); }
};

#define KV_CASE(paged, E, names, label, mutate)          \
  do {                                                 \
    KVFix f(paged);                                    \
    mutate;                                            \
    expect_bad<E>(f, [&] { f.run(); }, names, label);  \
  } while (0)

TEST(Errors, ValidKVCacheBaselinesRun) {
  for (int p = 0; p < 3; ++p) {
    KVFix f(p);
    f.add_rotary(16, 8);
    ASSERT_NO_THROW(f.run()) << p;
    KVFix planned(p);
    planned.a.split_plan = planned.ints({0, 1, 3, 65536 + 1, 0, 1});  // counts 1, 2; any item order
    ASSERT_NO_THROW(planned.run()) << p << " with a split plan";
    KVFix padded(p);  // the same plan padded to W = 5 (a CUDA graph's fixed grid)
    padded.a.split_plan = padded.ints({0, 1, 3, -1, 65536 + 1, 0, -1, 1});
    ASSERT_NO_THROW(padded.run()) << p << " with a padded split plan";
  }
}

TEST(Errors, KVCache) {
  KV_CASE(0, ValueError, (N{"cache_seqlens", "k_cache", "k"}), "append overflows the cache (8 + 1 > 8)", f.a.cache_seqlens = f.ints({3, 8}));
  KV_CASE(0, ValueError, (N{"cache_seqlens", "k_cache"}), "attend beyond the cache without append",
          (f.a.k_new.reset(), f.a.v_new.reset(), f.a.cache_seqlens = f.ints({9, 1})));
  KV_CASE(0, ValueError, (N{"cache_seqlens"}), "negative cache_seqlens", f.a.cache_seqlens = f.ints({-1, 2}));
  KV_CASE(0, ValueError, (N{"cache_seqlens", "cache_seqlen"}), "negative scalar cache_seqlen",
          (f.a.cache_seqlens.reset(), f.a.cache_seqlen = -3));
  KV_CASE(0, ValueError, (N{"cache_seqlens"}), "cache_seqlens wrong length", f.a.cache_seqlens = f.ints({3, 6, 1}));
  KV_CASE(0, TypeError, (N{"cache_seqlens"}), "cache_seqlens float32", f.a.cache_seqlens = f.add(fa_ref::float_tensor({3, 6}, {2})).view());
  KV_CASE(0, ValueError, (N{"cache_leftpad"}), "cache_leftpad > cache_seqlens", f.a.cache_leftpad = f.ints({0, 7}));
  KV_CASE(0, ValueError, (N{"cache_leftpad"}), "negative cache_leftpad", f.a.cache_leftpad = f.ints({-1, 0}));
  KV_CASE(0, ValueError, (N{"rotary_cos", "rotary_sin", "k"}), "rotary without new keys",
          (f.add_rotary(16, 8), f.a.k_new.reset(), f.a.v_new.reset()));
  KV_CASE(0, ValueError, (N{"rotary_cos", "rotary_dim"}), "rotary_dim 24 > head_dim 16", f.add_rotary(16, 12));
  KV_CASE(0, ValueError, (N{"rotary_sin", "rotary_cos"}), "rotary_sin shape differs from rotary_cos",
          (f.add_rotary(16, 8), f.a.rotary_sin = f.add(fa_ref::random_tensor(DType::kFloat32, {16, 4}, f.rng)).view()));
  KV_CASE(0, ValueError, (N{"rotary_sin"}), "rotary_cos without rotary_sin", (f.add_rotary(16, 8), f.a.rotary_sin.reset()));
  KV_CASE(0, ValueError, (N{"rotary_cos", "rotary_sin", "cache_seqlens"}), "rotary table shorter than the positions",
          f.add_rotary(5, 8));
  KV_CASE(0, TypeError, (N{"rotary_cos"}), "rotary_cos int32",
          (f.add_rotary(16, 8), f.a.rotary_cos = f.add(fa_ref::int_tensor_shaped(std::vector<std::int64_t>(128, 1), {16, 8})).view()));
  KV_CASE(0, ValueError, (N{"v"}), "k without v", f.a.v_new.reset());
  KV_CASE(0, ValueError, (N{"k"}), "k with 3 kv heads vs cache 2",
          (f.a.k_new = f.add(fa_ref::random_tensor(DType::kFloat32, {2, 1, 3, 16}, f.rng)).view()));
  KV_CASE(0, TypeError, (N{"k"}), "k float16 with q float32",
          (f.a.k_new = f.add(fa_ref::random_tensor(DType::kFloat16, {2, 1, 2, 16}, f.rng)).view()));
  KV_CASE(0, ValueError, (N{"cache_batch_idx"}), "cache_batch_idx out of range", f.a.cache_batch_idx = f.ints({0, 3}));
  KV_CASE(0, ValueError, (N{"cache_batch_idx"}), "cache_batch_idx negative", f.a.cache_batch_idx = f.ints({-1, 0}));
  KV_CASE(0, TypeError, (N{"cache_batch_idx"}), "cache_batch_idx int64",
          (f.a.cache_batch_idx = f.add([] { HostTensor t(DType::kInt64, {2}); t.assign({0, 1}); return t; }()).view()));
  KV_CASE(0, ValueError, (N{"v_cache"}), "v_cache shape differs from k_cache",
          (f.a.v_cache = f.add(fa_ref::random_tensor(DType::kFloat32, {3, 7, 2, 16}, f.rng)).view()));
  KV_CASE(0, TypeError, (N{"k_cache"}), "k_cache bfloat16 with q float32",
          (f.a.k_cache = f.add(fa_ref::random_tensor(DType::kBFloat16, {3, 8, 2, 16}, f.rng)).view()));
  KV_CASE(0, ValueError, (N{"k_cache"}), "cache rows < B without cache_batch_idx",
          (f.a.k_cache.shape[0] = 1, f.a.v_cache.shape[0] = 1));
  KV_CASE(0, ValueError, (N{"num_splits"}), "num_splits negative", f.a.num_splits = -1);
  KV_CASE(0, ValueError, (N{"max_cache_seqlen"}), "max_cache_seqlen negative", f.a.max_cache_seqlen = -1);
  {
    KVFix f(0);
    f.a.num_splits = 3;
    const std::size_t need = fastattn::kvcache_workspace_bytes(f.a);
    if (need > 0) {
      f.a.workspace = f.add(HostTensor(DType::kUInt8, {static_cast<std::int64_t>(need) - 1})).view();
      expect_bad<ValueError>(f, [&] { f.run(); }, N{"workspace"}, "workspace one byte too small");
    } else {
      std::printf("note: kvcache_workspace_bytes is 0 for num_splits=3; workspace-too-small case not applicable\n");
    }
  }
  // split_plan (B = 2): a valid plan is {0, 1, 3,  0, 1, 1 + 65536} (counts 1 and 2).
  KV_CASE(0, ValueError, (N{"num_splits", "split_plan"}), "num_splits with a split_plan",
          (f.a.split_plan = f.ints({0, 1, 3, 0, 1, 65537}), f.a.num_splits = 3));
  KV_CASE(0, TypeError, (N{"split_plan"}), "split_plan float32",
          f.a.split_plan = f.add(fa_ref::float_tensor({0, 1, 3, 0, 1, 2}, {6})).view());
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan 2-D",
          f.a.split_plan = f.add(fa_ref::int_tensor_shaped({0, 1, 2, 0, 1, 0}, {2, 3})).view());
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan with fewer work items than sequences",
          f.a.split_plan = f.ints({0, 1, 1, 0}));
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan's indptr not from 0",
          f.a.split_plan = f.ints({1, 1, 3, 0, 1, 65537}));
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan gives a sequence no split",
          f.a.split_plan = f.ints({0, 0, 3, 1, 65537, 1}));
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan's indptr ends short of its items",
          f.a.split_plan = f.ints({0, 1, 2, 0, 1, 65537}));
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan item's split past its count",
          f.a.split_plan = f.ints({0, 1, 3, 0, 1, 131073}));
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan item listed twice",
          f.a.split_plan = f.ints({0, 1, 3, 0, 1, 1}));
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan's indptr past its items",
          f.a.split_plan = f.ints({0, 2, 4, 0, 1, 65536}));
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan padding in place of a split",
          f.a.split_plan = f.ints({0, 1, 3, 0, 1, -1}));
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan item negative but not -1",
          f.a.split_plan = f.ints({0, 1, 3, 0, 1, 65537, -2}));
  KV_CASE(0, ValueError, (N{"split_plan"}), "split_plan item's sequence past B",
          f.a.split_plan = f.ints({0, 1, 3, 0, 2, 65537}));
  KV_CASE(0, TypeError, (N{"workspace"}), "workspace float32", f.a.workspace = f.add(HostTensor(DType::kFloat32, {1 << 16})).view());
  KV_CASE(0, DeviceError, (N{"k_cache"}), "k_cache on cuda:0",
          f.a.k_cache.device = (fastattn::Device{fastattn::DeviceType::kCUDA, 0}));
  KV_CASE(0, ValueError, (N{"lse"}), "lse shape", f.a.lse = f.add(HostTensor(DType::kFloat32, {2, 1, 4})).view());
  KV_CASE(0, ValueError, (N{"sinks"}), "sinks of 3 heads vs q's 4", f.a.sinks = f.add(HostTensor(DType::kFloat32, {3})).view());
  KV_CASE(0, TypeError, (N{"sinks"}), "sinks float16", f.a.sinks = f.add(HostTensor(DType::kFloat16, {4})).view());
  KV_CASE(0, DeviceError, (N{"sinks"}), "sinks on cuda:0",
          (f.a.sinks = f.add(HostTensor(DType::kFloat32, {4})).view(),
           f.a.sinks->device = (fastattn::Device{fastattn::DeviceType::kCUDA, 0})));
  KV_CASE(1, ValueError, (N{"block_table"}), "kvcache block_table page index out of range",
          f.a.block_table = f.add(fa_ref::int_tensor_shaped({5, 2, 0, 6}, {2, 2})).view());
  KV_CASE(1, ValueError, (N{"cache_seqlens", "block_table", "k_cache"}), "paged append beyond the row's pages (8 + 1 > 2 * 4)",
          f.a.cache_seqlens = f.ints({3, 8}));
  KV_CASE(1, ValueError, (N{"block_table", "page_indptr", "page_indices"}), "kvcache block_table and CSR both",
          (f.a.page_indptr = f.ints({0, 2, 4}), f.a.page_indices = f.ints({5, 2, 0, 3})));
  KV_CASE(2, ValueError, (N{"page_indices"}), "kvcache CSR page index out of range",
          f.a.page_indices = f.ints({5, 2, 0, 40}));
  KV_CASE(2, ValueError, (N{"cache_seqlens", "page_indptr", "page_indices", "k_cache"}), "CSR append beyond the row's pages",
          (f.a.page_indptr = f.ints({0, 2, 3}), f.a.cache_seqlens = f.ints({3, 4})));
  KV_CASE(2, ValueError, (N{"page_indptr"}), "kvcache page_indptr with fewer rows than B", f.a.page_indptr = f.ints({0, 4}));
  KV_CASE(1, ValueError, (N{"block_table"}), "kvcache block_table with fewer rows than B",
          f.a.block_table = f.add(fa_ref::int_tensor_shaped({5, 2}, {1, 2})).view());
}

// ---- cascade --------------------------------------------------------------------------------

/// 2 requests (prefill: q rows {1, 2}); prefix P = 5; suffix page_size 3, pages {2} and {0, 1}.
struct CascadeFix : Owner {
  fastattn::SharedPrefixAttentionArgs a;
  std::mt19937_64 rng{4};
  CascadeFix() {
    const DType dt = DType::kFloat16;
    a.q = add(fa_ref::random_tensor(dt, {3, 4, 8}, rng)).view();
    a.qo_indptr = ints({0, 1, 3});
    a.k_shared = add(fa_ref::random_tensor(dt, {5, 2, 8}, rng)).view();
    a.v_shared = add(fa_ref::random_tensor(dt, {5, 2, 8}, rng)).view();
    a.suffix.k_pages = add(fa_ref::random_tensor(dt, {3, 3, 2, 8}, rng)).view();
    a.suffix.v_pages = add(fa_ref::random_tensor(dt, {3, 3, 2, 8}, rng)).view();
    a.suffix.page_indptr = ints({0, 1, 3});
    a.suffix.page_indices = ints({2, 0, 1});
    a.suffix.last_page_len = ints({2, 3});
    HostTensor out(dt, {3, 4, 8}), lse(DType::kFloat32, {4, 3});
    out.poison();
    lse.poison();
    a.out = add(std::move(out), true).view();
    a.lse = add(std::move(lse), true).view();
  }
  void run() const { fastattn::shared_prefix_attention_forward(a); }
  fastattn::TensorView ints(const std::vector<std::int64_t>& v) { return add(fa_ref::int_tensor(v)).view(); }
};

#define CASCADE_CASE(E, names, label, mutate)            \
  do {                                                 \
    CascadeFix f;                                      \
    mutate;                                            \
    expect_bad<E>(f, [&] { f.run(); }, names, label);  \
  } while (0)

TEST(Errors, Cascade) {
  {
    CascadeFix f;
    ASSERT_NO_THROW(f.run());
  }
  CASCADE_CASE(ValueError, (N{"last_page_len"}), "suffix without last_page_len", f.a.suffix.last_page_len.reset());
  CASCADE_CASE(ValueError, (N{"qo_indptr"}), "qo_indptr not monotone", f.a.qo_indptr = f.ints({0, 2, 1}));
  CASCADE_CASE(ValueError, (N{"qo_indptr", "q"}), "qo_indptr[B] != total_q", f.a.qo_indptr = f.ints({0, 1, 4}));
  CASCADE_CASE(ValueError, (N{"page_indices"}), "suffix page index out of range", f.a.suffix.page_indices = f.ints({2, 0, 3}));
  CASCADE_CASE(ValueError, (N{"k_shared", "k_pages"}), "suffix pages with other kv heads than the prefix",
               (f.a.suffix.k_pages = f.add(fa_ref::random_tensor(DType::kFloat16, {3, 3, 1, 8}, f.rng)).view(),
                f.a.suffix.v_pages = f.add(fa_ref::random_tensor(DType::kFloat16, {3, 3, 1, 8}, f.rng)).view()));
  CASCADE_CASE(TypeError, (N{"k_shared"}), "k_shared float32 with q float16",
               f.a.k_shared = f.add(fa_ref::random_tensor(DType::kFloat32, {5, 2, 8}, f.rng)).view());
  CASCADE_CASE(ValueError, (N{"v_shared"}), "v_shared length differs from k_shared",
               f.a.v_shared = f.add(fa_ref::random_tensor(DType::kFloat16, {4, 2, 8}, f.rng)).view());
  CASCADE_CASE(ValueError, (N{"last_page_len"}), "last_page_len wrong length", f.a.suffix.last_page_len = f.ints({2, 3, 1}));
  CASCADE_CASE(ValueError, (N{"out"}), "out shape", f.a.out = f.add(HostTensor(DType::kFloat16, {3, 4, 16})).view());
  CASCADE_CASE(ValueError, (N{"num_splits"}), "num_splits past 1024", f.a.num_splits = 1025);
  CASCADE_CASE(ValueError, (N{"suffix_num_splits"}), "suffix_num_splits negative", f.a.suffix_num_splits = -1);
  CASCADE_CASE(ValueError, (N{"suffix_num_splits"}), "suffix_num_splits past 1024", f.a.suffix_num_splits = 1025);
}

// ---- merge ----------------------------------------------------------------------------------

struct MergeFix : Owner {
  std::mt19937_64 rng{5};
  fastattn::TensorView va, sa, vb, sb, vo, so, mask;
  fastattn::TensorView vn, sn;  // merge_states inputs (S, N, H, D), (S, N, H)
  MergeFix() {
    va = add(fa_ref::random_tensor(DType::kFloat16, {3, 2, 8}, rng)).view();
    vb = add(fa_ref::random_tensor(DType::kFloat16, {3, 2, 8}, rng)).view();
    sa = add(fa_ref::random_tensor(DType::kFloat32, {3, 2}, rng)).view();
    sb = add(fa_ref::random_tensor(DType::kFloat32, {3, 2}, rng)).view();
    HostTensor o(DType::kFloat16, {3, 2, 8}), os(DType::kFloat32, {3, 2});
    o.poison();
    os.poison();
    vo = add(std::move(o), true).view();
    so = add(std::move(os), true).view();
    mask = add(HostTensor(DType::kBool, {3})).view();
    vn = add(fa_ref::random_tensor(DType::kFloat16, {3, 4, 2, 8}, rng)).view();
    sn = add(fa_ref::random_tensor(DType::kFloat32, {3, 4, 2}, rng)).view();
  }
  fastattn::TensorView t(DType dt, std::vector<std::int64_t> shape) { return add(fa_ref::random_tensor(dt, shape, rng)).view(); }
};

TEST(Errors, Merge) {
  auto ms = [](MergeFix& f) { fastattn::merge_state(f.va, f.sa, f.vb, f.sb, f.vo, f.so); };
  auto inplace = [](MergeFix& f) { fastattn::merge_state_in_place(f.vo, f.so, f.vb, f.sb, f.mask); };
  auto many = [](MergeFix& f) { fastattn::merge_states(f.vn, f.sn, f.vo, f.so); };
  {
    MergeFix f;
    ASSERT_NO_THROW(ms(f));
    ASSERT_NO_THROW(many(f));
  }
#define MERGE_CASE(E, fn, names, label, mutate)            \
  do {                                                   \
    MergeFix f;                                          \
    mutate;                                              \
    expect_bad<E>(f, [&] { fn(f); }, names, label);      \
  } while (0)
  MERGE_CASE(TypeError, ms, (N{"v_b"}), "v_b bfloat16 with v_a float16", f.vb = f.t(DType::kBFloat16, {3, 2, 8}));
  MERGE_CASE(TypeError, ms, (N{"s_a"}), "s_a float16", f.sa = f.t(DType::kFloat16, {3, 2}));
  MERGE_CASE(TypeError, ms, (N{"v_a"}), "v_a int32", (f.va = f.add(fa_ref::int_tensor_shaped(std::vector<std::int64_t>(48, 1), {3, 2, 8})).view()));
  MERGE_CASE(ValueError, ms, (N{"v_b"}), "v_b shape", f.vb = f.t(DType::kFloat16, {3, 2, 16}));
  MERGE_CASE(ValueError, ms, (N{"s_b"}), "s_b shape", f.sb = f.t(DType::kFloat32, {2, 3}));
  MERGE_CASE(ValueError, ms, (N{"v_out"}), "v_out shape", f.vo = f.t(DType::kFloat16, {3, 1, 8}));
  MERGE_CASE(ValueError, ms, (N{"v_a"}), "v_a last dim not contiguous (stride 2)",
             (f.va = f.t(DType::kFloat16, {3, 2, 16}), f.va.shape[2] = 8, f.va.strides[2] = 2));
  MERGE_CASE(DeviceError, ms, (N{"s_b"}), "s_b on cuda:0", f.sb.device = (fastattn::Device{fastattn::DeviceType::kCUDA, 0}));
  MERGE_CASE(TypeError, inplace, (N{"mask"}), "mask float32", f.mask = f.t(DType::kFloat32, {3}));
  MERGE_CASE(ValueError, inplace, (N{"mask"}), "mask wrong length", f.mask = f.add(HostTensor(DType::kUInt8, {4})).view());
  MERGE_CASE(ValueError, inplace, (N{"v_other"}), "v_other shape", f.vb = f.t(DType::kFloat16, {2, 2, 8}));
  MERGE_CASE(ValueError, many, (N{"s"}), "merge_states s shape", f.sn = f.t(DType::kFloat32, {3, 3, 2}));
  MERGE_CASE(ValueError, many, (N{"v_out"}), "merge_states v_out shape", f.vo = f.t(DType::kFloat16, {3, 2, 4}));
  MERGE_CASE(ValueError, many, (N{"v"}), "merge_states v 3-d", f.vn = f.t(DType::kFloat16, {3, 2, 8}));
  MERGE_CASE(TypeError, many, (N{"s"}), "merge_states s int32",
             (f.sn = f.add(fa_ref::int_tensor_shaped(std::vector<std::int64_t>(24, 0), {3, 4, 2})).view()));
#undef MERGE_CASE
}

// ---- csr_to_block_table --------------------------------------------------------------------

/// Two rows of 2 and 1 pages into a (2, 3) table (watched: a rejected call writes nothing).
struct PageTableFix : Owner {
  fastattn::TensorView indptr, indices, table;
  PageTableFix() {
    indptr = add(fa_ref::int_tensor({0, 2, 3})).view();
    indices = add(fa_ref::int_tensor({7, 4, 9})).view();
    HostTensor t(DType::kInt32, {2, 3});
    t.poison();
    table = add(std::move(t), true).view();
  }
};

TEST(Errors, CsrToBlockTable) {
  auto call = [](PageTableFix& f) { fastattn::csr_to_block_table(f.indptr, f.indices, f.table); };
  {
    PageTableFix f;
    ASSERT_NO_THROW(call(f));
  }
#define PT_CASE(E, names, label, mutate)            \
  do {                                             \
    PageTableFix f;                                \
    mutate;                                        \
    expect_bad<E>(f, [&] { call(f); }, names, label); \
  } while (0)
  PT_CASE(ValueError, (N{"page_indptr"}), "page_indptr decreasing", f.indptr = f.add(fa_ref::int_tensor({0, 2, 1})).view());
  PT_CASE(ValueError, (N{"page_indptr"}), "page_indptr past len(page_indices)",
          f.indptr = f.add(fa_ref::int_tensor({0, 2, 4})).view());
  PT_CASE(ValueError, (N{"page_indptr"}), "page_indptr from -1", f.indptr = f.add(fa_ref::int_tensor({-1, 2, 3})).view());
  PT_CASE(ValueError, (N{"block_table"}), "a row longer than the table",
          f.table = f.add(HostTensor(DType::kInt32, {2, 1}), true).view());
  PT_CASE(ValueError, (N{"block_table"}), "block_table rows != B",
          f.table = f.add(HostTensor(DType::kInt32, {3, 3}), true).view());
  PT_CASE(ValueError, (N{"page_indptr"}), "page_indptr empty", f.indptr = f.add(fa_ref::int_tensor({})).view());
  PT_CASE(TypeError, (N{"page_indices"}), "page_indices float32",
          f.indices = f.add(fa_ref::float_tensor({7, 4, 9}, {3})).view());
  PT_CASE(TypeError, (N{"block_table"}), "block_table int64",
          f.table = f.add(HostTensor(DType::kInt64, {2, 3}), true).view());
  PT_CASE(DeviceError, (N{"block_table"}), "block_table on cuda:0",
          f.table.device = (fastattn::Device{fastattn::DeviceType::kCUDA, 0}));
#undef PT_CASE
}

// ---- copy_host_to_device --------------------------------------------------------------------

/// Six int32 values into a (2, 3) array (watched: a rejected call writes nothing).
struct CopyFix : Owner {
  fastattn::TensorView src, dst;
  CopyFix() {
    src = add(fa_ref::int_tensor_shaped({1, 2, 3, 4, 5, 6}, {2, 3})).view();
    HostTensor t(DType::kInt32, {2, 3});
    t.poison();
    dst = add(std::move(t), true).view();
  }
};

TEST(Errors, CopyHostToDevice) {
  auto call = [](CopyFix& f) { fastattn::copy_host_to_device(f.src, f.dst); };
  {
    CopyFix f;
    ASSERT_NO_THROW(call(f));
  }
#define CP_CASE(E, names, label, mutate)            \
  do {                                             \
    CopyFix f;                                     \
    mutate;                                        \
    expect_bad<E>(f, [&] { call(f); }, names, label); \
  } while (0)
  CP_CASE(DeviceError, (N{"src"}), "src on cuda:0", f.src.device = (fastattn::Device{fastattn::DeviceType::kCUDA, 0}));
  CP_CASE(TypeError, (N{"dst"}), "dst int64", f.dst = f.add(HostTensor(DType::kInt64, {2, 3}), true).view());
  CP_CASE(ValueError, (N{"dst"}), "dst of another shape", f.dst = f.add(HostTensor(DType::kInt32, {3, 2}), true).view());
  CP_CASE(ValueError, (N{"dst"}), "dst with padded rows",
          (f.dst = f.add(HostTensor(DType::kInt32, {2, 4}), true).view(), f.dst.shape[1] = 3));
  CP_CASE(ValueError, (N{"src"}), "src column-major", (f.src.strides[0] = 1, f.src.strides[1] = 2));
#undef CP_CASE
}

TEST(Errors, ZZCountOfDistinctBadInputs) {
  // Runs last in this file (alphabetical within the suite when run together); informational.
  if (g_cases > 0) {
    RecordProperty("bad_inputs", g_cases);
    EXPECT_GE(g_cases, 30);
  }
}

}  // namespace
