// Thread-block clusters, sm_90: the cluster-wide barrier and loads from another CTA's shared
// memory (distributed shared memory), as thin wrappers over the PTX.
#pragma once

#include <cstdint>

#include "cuda/common/mbarrier.cuh"  // smem_u32

namespace fastattn::cuda_detail {

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

/// Barrier over every thread of every CTA of the cluster (all threads of a warp call it
/// together). Release / acquire: shared-memory writes before it are visible to the cluster's
/// remote reads after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

/// The float at `local` (a shared-memory address of this CTA) in the shared memory of the
/// cluster's CTA `rank` (the same offset there).
__device__ __forceinline__ float cluster_load_f32(const float* local, int rank) {
  std::uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(local)), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace fastattn::cuda_detail
