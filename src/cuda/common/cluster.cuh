// Thread-block clusters, sm_90: the cluster-wide barrier and asynchronous stores into another
// CTA's shared memory (distributed shared memory), as thin wrappers over the PTX.
#pragma once

#include <cstdint>

#include "cuda/common/mbarrier.cuh"  // smem_u32

namespace fastattn::cuda_detail {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

/// This thread's arrival on the cluster barrier, with no memory ordering of its own (pair it with
/// fence.mbarrier_init, mbar_fence_init, to publish barrier initialisation). Every thread of the
/// warp calls it together.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
/// Waits until every (non-exited) thread of the cluster has arrived; acquire, so what another CTA
/// published before its arrival is visible after. Every thread of the warp calls it together.
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

/// The shared::cluster address of `local` (a shared-memory address of this CTA) in the shared
/// memory of the cluster's CTA `rank` (the same offset there).
__device__ __forceinline__ std::uint32_t cluster_map(const void* local, int rank) {
  std::uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(local)), "r"(rank));
  return remote;
}

/// Stores v (16-byte aligned) at `local`'s offset in CTA `rank`'s shared memory, its 16 bytes
/// counted as transaction bytes on the mbarrier at `bar`'s offset there. Fire and forget: the
/// receiver learns of the data through that barrier.
__device__ __forceinline__ void cluster_store_async(const float4* local, float4 v, int rank, const std::uint64_t* bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(
          cluster_map(local, rank)),
      "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(cluster_map(bar, rank))
      : "memory");
}
/// The same for one float (4 bytes).
__device__ __forceinline__ void cluster_store_async(const float* local, float v, int rank, const std::uint64_t* bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.f32 [%0], %1, [%2];" ::"r"(
                   cluster_map(local, rank)),
               "f"(v), "r"(cluster_map(bar, rank))
               : "memory");
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace fastattn::cuda_detail
