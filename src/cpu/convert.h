// Row loads and stores between the storage dtypes and the float32 the CPU kernels compute in.
#pragma once

#include <cstdint>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "common/numeric.h"
#include "fastattn/tensor.h"

namespace fastattn::cpu {

/// dst[i] = float(src[i]) * scale for i < n; src is `n` contiguous elements of `dtype`.
inline void load_row(DType dtype, const void* src, std::int64_t n, float scale, float* dst) {
  switch (dtype) {
    case DType::kFloat32: {
      const auto* s = static_cast<const float*>(src);
      for (std::int64_t i = 0; i < n; ++i) dst[i] = s[i] * scale;
      break;
    }
    case DType::kFloat16: {
      const auto* s = static_cast<const std::uint16_t*>(src);
      std::int64_t i = 0;
#if defined(__F16C__)
      // Hardware half->float (vcvtph2ps): the bit-level fallback does not vectorise well.
      const __m256 vs = _mm256_set1_ps(scale);
      for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(h), vs));
      }
#endif
      for (; i < n; ++i) dst[i] = fp16_to_float(s[i]) * scale;
      break;
    }
    case DType::kBFloat16: {
      const auto* s = static_cast<const std::uint16_t*>(src);
      for (std::int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]) * scale;
      break;
    }
    default: break;  // validated away before any kernel runs
  }
}

/// dst[i] = convert(src[i] * scale) for i < n, rounding to nearest even for 16-bit types.
inline void store_row(DType dtype, const float* src, std::int64_t n, float scale, void* dst) {
  switch (dtype) {
    case DType::kFloat32: {
      auto* d = static_cast<float*>(dst);
      for (std::int64_t i = 0; i < n; ++i) d[i] = src[i] * scale;
      break;
    }
    case DType::kFloat16: {
      auto* d = static_cast<std::uint16_t*>(dst);
      for (std::int64_t i = 0; i < n; ++i) d[i] = float_to_fp16(src[i] * scale);
      break;
    }
    case DType::kBFloat16: {
      auto* d = static_cast<std::uint16_t*>(dst);
      for (std::int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i] * scale);
      break;
    }
    default: break;
  }
}

/// Address of element `offset` (in elements) of a `dtype` array at `base`.
inline const void* elem_ptr(const void* base, DType dtype, std::int64_t offset) {
  return static_cast<const char*>(base) + offset * static_cast<std::int64_t>(dtype_size(dtype));
}
inline void* elem_ptr(void* base, DType dtype, std::int64_t offset) {
  return static_cast<char*>(base) + offset * static_cast<std::int64_t>(dtype_size(dtype));
}

}  // namespace fastattn::cpu
