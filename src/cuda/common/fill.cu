// Vectorised 32-bit fill of device memory, written with CuTe: the first CuTe kernel of the
// backend, so that every CI build compiles CUTLASS/CuTe headers for sm_80 and sm_90a. It is used to
// initialise split-KV workspaces (LSE partials to -inf) without a host round trip.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cute/tensor.hpp>

#include "cuda/common/cuda_check.h"
#include "cuda/cuda_backend.h"
#include "fastattn/error.h"

namespace fastattn {
namespace {

// 256 threads x 4 vectors of 16 bytes = 16 KiB written per block per tile: enough independent
// 16-byte stores in flight per thread to approach store bandwidth, small enough that a few MiB
// still spreads over every SM.
constexpr int kFillThreads = 256;
constexpr int kFillVecPerThread = 4;
// Upper bound on blocks; the grid-stride loop covers larger buffers. 8 x 132 SMs x 4 blocks/SM
// comfortably saturates an H100/H200 and avoids a device query on the hot path.
constexpr int kFillMaxBlocks = 4096;

/// dst[0, head) and the tail are written as scalars; dst[head, head + 4 * n_vec) as 16-byte vectors.
template <int kThreads, int kVecPerThread>
__global__ void __launch_bounds__(kThreads)
    fill_u32_kernel(std::uint32_t* __restrict__ dst, std::int64_t head, std::int64_t n_vec,
                    std::int64_t n, std::uint32_t value) {
  using namespace cute;
  const std::uint64_t w = std::uint64_t(value) | (std::uint64_t(value) << 32);
  const cute::uint128_t vec(w, w);

  // The 16-byte aligned body as a 1-D tensor of 128-bit words, and its coordinates for predication.
  Tensor body = make_tensor(make_gmem_ptr(reinterpret_cast<cute::uint128_t*>(dst + head)),
                            make_shape(n_vec));
  Tensor coords = make_identity_tensor(shape(body));
  constexpr int kTile = kThreads * kVecPerThread;
  auto thr_layout = make_layout(Int<kThreads>{});

  for (std::int64_t tile = blockIdx.x; tile * kTile < n_vec; tile += gridDim.x) {
    // Thread t stores elements t, t + kThreads, ...: each warp-wide store is 512 contiguous bytes.
    Tensor t_body = local_partition(local_tile(body, make_shape(Int<kTile>{}), make_coord(tile)),
                                    thr_layout, threadIdx.x);
    Tensor t_coord = local_partition(local_tile(coords, make_shape(Int<kTile>{}), make_coord(tile)),
                                     thr_layout, threadIdx.x);
    CUTE_UNROLL
    for (int i = 0; i < size(t_body); ++i) {
      if (get<0>(t_coord(i)) < n_vec) t_body(i) = vec;
    }
  }

  if (blockIdx.x == 0) {
    const std::int64_t tail_start = head + 4 * n_vec;
    if (threadIdx.x < head) dst[threadIdx.x] = value;
    if (tail_start + threadIdx.x < n) dst[tail_start + threadIdx.x] = value;
  }
}

}  // namespace

void cuda_fill_u32(void* dst, std::size_t count, std::uint32_t value, void* stream) {
  if (count == 0) return;
  const auto addr = reinterpret_cast<std::uintptr_t>(dst);
  if (dst == nullptr || addr % 4 != 0)
    throw ValueError("cuda_fill_u32: dst must be a non-null, 4-byte aligned device pointer");
  const auto n = static_cast<std::int64_t>(count);
  // Words before the first 16-byte boundary (0..3), then whole vectors, then 0..3 words.
  std::int64_t head = static_cast<std::int64_t>(((16 - addr % 16) % 16) / 4);
  if (head > n) head = n;
  const std::int64_t n_vec = (n - head) / 4;
  constexpr std::int64_t kTile = std::int64_t(kFillThreads) * kFillVecPerThread;
  std::int64_t blocks = (n_vec + kTile - 1) / kTile;
  if (blocks < 1) blocks = 1;
  if (blocks > kFillMaxBlocks) blocks = kFillMaxBlocks;
  fill_u32_kernel<kFillThreads, kFillVecPerThread>
      <<<static_cast<unsigned>(blocks), kFillThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<std::uint32_t*>(dst), head, n_vec, n, value);
  FASTATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace fastattn
