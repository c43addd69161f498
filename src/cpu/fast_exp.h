// A branch-free expf the compiler can vectorise (std::exp is a libm call per element unless
// -ffast-math, which we avoid because masks rely on -inf). Relative error below 2e-7 on the
// range the softmax uses (x <= 0); inputs below -87 flush to 0.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastattn::cpu {

inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // exp(x) = 2^n * exp(r), n = round(x / ln2), |r| <= ln2 / 2.
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // Cody-Waite ln2
  // Degree-6 Taylor polynomial of exp(r), Horner form (error ~ r^7/5040 < 1.2e-7).
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return x <= -87.0f ? 0.0f : y;
}

}  // namespace fastattn::cpu
