#include "cpu/kvcache_append.h"

#include <cstring>

#include "cpu/convert.h"

namespace fastattn::cpu {
namespace {

/// Rotates the first `rotary_dim` entries of x (float) at row `pos` of cos/sin.
void apply_rotary(float* x, const KVCacheArgs& a, std::int64_t rotary_dim, std::int64_t pos) {
  const std::int64_t half = rotary_dim / 2;
  float cs[128], sn[128];
  const TensorView& cos = *a.rotary_cos;
  const TensorView& sin = *a.rotary_sin;
  load_row(cos.dtype, elem_ptr(cos.data, cos.dtype, pos * cos.stride(0)), half, 1.0f, cs);
  load_row(sin.dtype, elem_ptr(sin.data, sin.dtype, pos * sin.stride(0)), half, 1.0f, sn);
  for (std::int64_t i = 0; i < half; ++i) {
    const std::int64_t i0 = a.rotary_interleaved ? 2 * i : i;
    const std::int64_t i1 = a.rotary_interleaved ? 2 * i + 1 : i + half;
    const float x0 = x[i0], x1 = x[i1];
    x[i0] = x0 * cs[i] - x1 * sn[i];
    x[i1] = x0 * sn[i] + x1 * cs[i];
  }
}

/// Element offset of slot `slot` of a cache row (head 0).
std::int64_t slot_offset(const AppendParams& ap, const AppendSeq& s, const TensorView& cache,
                         std::int64_t row_off, std::int64_t slot) {
  if (ap.page_size == 0) return row_off + slot * cache.stride(1);
  return s.pages[slot / ap.page_size] * cache.stride(0) + (slot % ap.page_size) * cache.stride(1);
}

}  // namespace

void append_kv(const AppendParams& ap, const std::vector<AppendSeq>& seqs, int num_threads) {
  const KVCacheArgs& a = *ap.args;
  const TensorView& kn = *a.k_new;
  const TensorView& vn = *a.v_new;
  const std::int64_t heads = kn.size(2), d = kn.size(3);
  const DType dt = kn.dtype;
  const std::size_t row_bytes = static_cast<std::size_t>(d) * dtype_size(dt);
  const std::int64_t nseq = static_cast<std::int64_t>(seqs.size());
  // Parallel over tokens within a sequence only: sequences go in order (duplicates: last wins).
  for (std::int64_t b = 0; b < nseq; ++b) {
    const AppendSeq& s = seqs[static_cast<std::size_t>(b)];
#pragma omp parallel for num_threads(num_threads) if (ap.seqlen_new * heads > 64)
    for (std::int64_t t = 0; t < ap.seqlen_new; ++t) {
      float row[256];
      const std::int64_t ko = slot_offset(ap, s, a.k_cache, s.k_off, s.seqlen + t);
      const std::int64_t vo = slot_offset(ap, s, a.v_cache, s.v_off, s.seqlen + t);
      for (std::int64_t h = 0; h < heads; ++h) {
        const void* ksrc = elem_ptr(kn.data, dt, b * kn.stride(0) + t * kn.stride(1) + h * kn.stride(2));
        void* kdst = elem_ptr(a.k_cache.data, dt, ko + h * a.k_cache.stride(2));
        if (ap.rotary_dim > 0) {
          load_row(dt, ksrc, d, 1.0f, row);
          apply_rotary(row, a, ap.rotary_dim, s.pos0 + t);
          store_row(dt, row, d, 1.0f, kdst);
        } else {
          std::memcpy(kdst, ksrc, row_bytes);
        }
        std::memcpy(elem_ptr(a.v_cache.data, dt, vo + h * a.v_cache.stride(2)),
                    elem_ptr(vn.data, dt, b * vn.stride(0) + t * vn.stride(1) + h * vn.stride(2)),
                    row_bytes);
      }
    }
  }
}

void rotate_queries(const AppendParams& ap, const std::vector<AppendSeq>& seqs, void* q_rot,
                    int num_threads) {
  const KVCacheArgs& a = *ap.args;
  const TensorView& q = a.q;
  const std::int64_t sq = q.size(1), heads = q.size(2), d = q.size(3);
  const bool per_row = a.options.causal || a.options.window_left >= 0 || a.options.window_right >= 0;
  const std::int64_t nseq = static_cast<std::int64_t>(seqs.size());
#pragma omp parallel for collapse(2) num_threads(num_threads)
  for (std::int64_t b = 0; b < nseq; ++b)
    for (std::int64_t i = 0; i < sq; ++i) {
      float row[256];
      const std::int64_t pos = seqs[static_cast<std::size_t>(b)].pos0 + (per_row ? i : 0);
      for (std::int64_t h = 0; h < heads; ++h) {
        load_row(q.dtype, elem_ptr(q.data, q.dtype, b * q.stride(0) + i * q.stride(1) + h * q.stride(2)),
                 d, 1.0f, row);
        apply_rotary(row, a, ap.rotary_dim, pos);
        store_row(q.dtype, row, d, 1.0f, elem_ptr(q_rot, q.dtype, ((b * sq + i) * heads + h) * d));
      }
    }
}

}  // namespace fastattn::cpu
