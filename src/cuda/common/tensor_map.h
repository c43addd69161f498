// Host-side creation of TMA tensor maps (CUtensorMap) without linking the driver library: the
// encoder is looked up once through the runtime's driver entry point.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace fastattn::cuda_detail {

/// A 4-d map over 16-bit elements: dims (innermost first) d0 (contiguous) x d1 x d2 x d3 with
/// element strides s1, s2, s3 (multiples of 8), read in boxes of box0 x box1 x 1 x 1 with the
/// 128-byte shared-memory swizzle (box0 * 2 = 128 bytes). Out-of-bounds elements read as zero.
/// Strides of dims of size 1 are never used and may be anything. Throws on failure.
CUtensorMap make_tensor_map_4d_u16(const void* base, std::int64_t d0, std::int64_t d1, std::int64_t s1,
                                   std::int64_t d2, std::int64_t s2, std::int64_t d3, std::int64_t s3,
                                   int box0, int box1);

}  // namespace fastattn::cuda_detail
