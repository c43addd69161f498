// Scalar conversions between float32 and the 16-bit storage types, written on bit patterns so the
// CPU backend needs no compiler extension. Round-to-nearest-even, NaN and Inf preserved.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace fastattn {

FASTATTN_HD std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
FASTATTN_HD float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

FASTATTN_HD float bf16_to_float(std::uint16_t h) { return bits_float(std::uint32_t(h) << 16); }

FASTATTN_HD std::uint16_t float_to_bf16(float f) {
  std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return std::uint16_t(u >> 16);
}

FASTATTN_HD float fp16_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (man << 13));  // Inf / NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Zero or subnormal: value = man * 2^-24, exact in float.
  const float mag = float(man) * 5.9604644775390625e-8f;
  return sign ? -mag : mag;
}

FASTATTN_HD std::uint16_t float_to_fp16(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // rounds to >= 65536: Inf
  if (abs >= 0x38800000u) {  // normal half range (>= 2^-14)
    std::uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
    r += 0xfffu + ((r >> 13) & 1u);       // round to nearest even at bit 13
    return std::uint16_t(sign | (r >> 13));
  }
  // Subnormal half: scale so the half's unit (2^-24) becomes an integer and round to even.
  const float mag = bits_float(abs) * 16777216.0f;  // exact: a power-of-two scale
  std::uint32_t q = std::uint32_t(mag);
  const float rem = mag - float(q);
  if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
  return std::uint16_t(sign | q);
}

}  // namespace fastattn
