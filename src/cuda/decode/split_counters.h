// Arrival counters of the decode kernel's last-CTA split merge (DecodeParams::split_counters).
//
// The CTA of a split counts itself in on its item's counter after storing its partial state, and
// the one that arrives last merges every split and resets the counter to zero. So a counter is
// zero between calls and no call zeroes it (a memset per call cost 2-9 us, bench/NOTES.md session
// 37), but it must be zero before its first call and never shared by two calls that can run at
// once. The caller's workspace is neither (it is fresh from a framework allocator at every call),
// so the library owns the counters:
// - outside stream capture, one block per (device, stream), grown when a call needs more: calls on
//   one stream run in order, and calls on different streams never share a counter;
// - inside stream capture, a new block per captured call, since two graphs captured on one stream
//   may later be replayed at once on two streams.
// Blocks are carved from zeroed chunks of device memory that live as long as the process (a
// captured call keeps 256 bytes or more). Host code only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace fastattn::cuda_decode {

/// `count` zeroed counters for a call on `stream` of the current device `device`, or nullptr when
/// they could not be had (no device memory): the caller then merges in the combine kernel.
std::uint32_t* split_counters(int device, cudaStream_t stream, std::size_t count);

}  // namespace fastattn::cuda_decode
