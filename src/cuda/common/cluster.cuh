// Thread-block clusters, sm_90: the cluster-wide barrier and stores into another CTA's shared
// memory (distributed shared memory), as thin wrappers over the PTX.
#pragma once

#include <cstdint>

#include "cuda/common/mbarrier.cuh"  // smem_u32

namespace fastattn::cuda_detail {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

/// This thread's arrival on the cluster barrier, with no memory ordering (e.g. "this CTA has
/// started"). Every thread of the warp calls it together.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
/// This thread's arrival on the cluster barrier; release, so its earlier shared-memory writes,
/// remote ones included, are visible to a thread whose cluster_wait the arrival completes. A
/// thread may arrive and exit without waiting. Every thread of the warp calls it together.
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
/// Waits until every (non-exited) thread of the cluster has arrived; acquire. Every thread of the
/// warp calls it together.
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

/// Stores v (16-byte aligned) at `local`'s offset in CTA `rank`'s shared memory.
__device__ __forceinline__ void cluster_store(const float4* local, float4 v, int rank) {
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(cluster_map(local, rank)), "f"(v.x),
               "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
}
/// The same for one float.
__device__ __forceinline__ void cluster_store(const float* local, float v, int rank) {
  asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(cluster_map(local, rank)), "f"(v) : "memory");
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace fastattn::cuda_detail
