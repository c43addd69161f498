// Host-side creation of TMA tensor maps (CUtensorMap) without linking the driver library: the
// encoder is looked up once through the runtime's driver entry point.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace fastattn::cuda_detail {

/// How far the L2 rounds up each request a box makes to DRAM (cuTensorMapEncodeTiled's
/// l2Promotion): to 128 or 256 bytes.
enum class TmaL2Promotion { k128B, k256B };

/// A 5-d map over 16-bit elements: dims[0..4] innermost first (dims[0] contiguous), element
/// strides strides[1..4] (multiples of 8; strides[0] is unused, and so is the stride of a dim of
/// size 1), read in boxes of box[0..4] elements with the 128-byte shared-memory swizzle
/// (box[0] * 2 = 128 bytes). A box lands in shared memory as a dense array with box[0]
/// innermost. Out-of-bounds elements read as zero. Strides need not grow with the dim: a dim may
/// step through a smaller span than the one before it. Throws on failure.
CUtensorMap make_tensor_map_5d_u16(const void* base, const std::int64_t (&dims)[5], const std::int64_t (&strides)[5],
                                   const int (&box)[5], TmaL2Promotion promotion);

}  // namespace fastattn::cuda_detail
