// CPU backend: merging attention states (FlashInfer's merge_state / merge_states), built on the
// shared merge primitive in common/softmax_state.h.
#include <omp.h>

#include <vector>

#include "common/softmax_state.h"
#include "cpu/convert.h"
#include "cpu/cpu_backend.h"

namespace fastattn::cpu {
namespace {
int threads(int n) { return n > 0 ? n : omp_get_max_threads(); }

const void* row_ptr(const TensorView& v, std::int64_t s, std::int64_t h) {
  return elem_ptr(v.data, v.dtype, s * v.stride(0) + h * v.stride(1));
}
float& lse_at(const TensorView& t, std::int64_t s, std::int64_t h) {
  return static_cast<float*>(t.data)[s * t.stride(0) + h * t.stride(1)];
}
}  // namespace

void merge_state(const MergeTwo& m, int num_threads) {
  const std::int64_t seq = m.v_a->size(0), heads = m.v_a->size(1), d = m.v_a->size(2);
  const DType dt = m.v_a->dtype;
  const bool* mask_bool = nullptr;
  if (m.mask) mask_bool = static_cast<const bool*>(m.mask->data);  // bool and uint8: 1 byte
#pragma omp parallel for num_threads(threads(num_threads))
  for (std::int64_t s = 0; s < seq; ++s) {
    if (mask_bool && !reinterpret_cast<const std::uint8_t*>(mask_bool)[s * m.mask->stride(0)]) continue;
    std::vector<float> a(static_cast<std::size_t>(d)), b(static_cast<std::size_t>(d));
    for (std::int64_t h = 0; h < heads; ++h) {
      const float la = lse_at(*m.s_a, s, h), lb = lse_at(*m.s_b, s, h);
      load_row(dt, row_ptr(*m.v_a, s, h), d, 1.0f, a.data());
      if (m.v_b->data) load_row(dt, row_ptr(*m.v_b, s, h), d, 1.0f, b.data());  // null: zeros
      const MergeWeights w = merge_weights(la, lb);
      for (std::int64_t c = 0; c < d; ++c) a[c] = w.w_a * a[c] + w.w_b * b[c];
      store_row(dt, a.data(), d, 1.0f, const_cast<void*>(row_ptr(*m.v_out, s, h)));
      lse_at(*m.s_out, s, h) = w.lse;
    }
  }
}

void merge_states(const TensorView& v, const TensorView& s, const TensorView& v_out,
                  const TensorView& s_out, int num_threads) {
  const std::int64_t seq = v.size(0), n = v.size(1), heads = v.size(2), d = v.size(3);
  const DType dt = v.dtype;
  const float* sp = static_cast<const float*>(s.data);
#pragma omp parallel for num_threads(threads(num_threads))
  for (std::int64_t i = 0; i < seq; ++i) {
    std::vector<float> acc(static_cast<std::size_t>(d)), x(static_cast<std::size_t>(d));
    for (std::int64_t h = 0; h < heads; ++h) {
      MergeAccumulator m;
      m.init();
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::int64_t k = 0; k < n; ++k) {
        float rescale, weight;
        m.add(sp[i * s.stride(0) + k * s.stride(1) + h * s.stride(2)], &rescale, &weight);
        if (weight == 0.0f) continue;
        load_row(dt, elem_ptr(v.data, dt, i * v.stride(0) + k * v.stride(1) + h * v.stride(2)), d,
                 1.0f, x.data());
        for (std::int64_t c = 0; c < d; ++c) acc[c] = acc[c] * rescale + weight * x[c];
      }
      store_row(v_out.dtype, acc.data(), d, m.inv_sum(),
                elem_ptr(v_out.data, v_out.dtype, i * v_out.stride(0) + h * v_out.stride(1)));
      lse_at(s_out, i, h) = m.lse();
    }
  }
}

}  // namespace fastattn::cpu
