// The barrier words of the decode kernel's grid merge (DecodeParams::grid_merge_barriers).
//
// Each item's pair (arrivals, generation) is reset by its last arrival (decode_item_barrier), so
// the arrivals are zero between calls and no call zeroes them (a memset per call cost 2-9 us,
// bench/NOTES.md session 37); but they must be zero before their first call and never shared by
// two calls that can run at once. The caller's workspace is neither (it is fresh from a framework
// allocator at every call), so the library owns the counters:
// - outside stream capture, one block per (device, stream), grown when a call needs more: calls on
//   one stream run in order, and calls on different streams never share a counter;
// - inside stream capture, a new block per captured call, since two graphs captured on one stream
//   may later be replayed at once on two streams.
// Blocks are carved from zeroed 1 MB chunks of device memory that live as long as the process (a
// captured call keeps 256 bytes or more): the first call on a device allocates one, and a chunk
// runs out only after thousands of captured calls. Host code only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastattn::cuda_decode {

/// `count` zeroed counters for a call on `stream` of the current device `device`, or nullptr when
/// they could not be had (no device memory): the caller then merges in the combine kernel.
std::uint32_t* split_counters(int device, cudaStream_t stream, std::size_t count);

}  // namespace fastattn::cuda_decode
