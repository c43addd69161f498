// Shared-memory mbarriers and TMA tensor loads, sm_90: thin wrappers over the PTX.
//
// A full/empty pipeline with them: the producer issues TMA loads that complete on a stage's
// "full" barrier (transaction bytes), consumers wait on it, read the stage and arrive on its
// "empty" barrier, which the producer waits on before reusing the stage. No CTA-wide barrier.
#pragma once

#include <cuda.h>  // CUtensorMap

#include <cstdint>

namespace fastattn::cuda_detail {

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

/// Initialises the barrier for `count` arrivals per phase (one thread; fence + sync before use).
__device__ __forceinline__ void mbar_init(std::uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
/// Makes barrier initialisation visible to the async proxy (the TMA loads' completion).
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint64_t* bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
/// Arrives and adds `bytes` to the transaction count the current phase waits for.
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint64_t* bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
/// Blocks until the phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, std::uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_LOOP:\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_LOOP;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
/// Orders this thread's earlier generic-proxy shared-memory accesses (reads and writes) before
/// later async-proxy (TMA) accesses of the same bytes.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
/// A warp hands a ring stage back to its TMA producer: one arrival on the stage's `empty` barrier
/// once every lane's reads (ldmatrix, ld.shared) and writes of the stage are done. The proxy
/// fence is what makes them done: the arrival's release semantics order only generic-proxy
/// accesses, and the refill is an async-proxy write. Without it ptxas issued the arrival while
/// the warp's last ldmatrix of the stage were still outstanding; a scratch build that queued
/// extra ldmatrix ahead of them gave wrong outputs on the H200, and right ones with this fence
/// (bench/NOTES.md, session 23).
__device__ __forceinline__ void warp_release_stage(std::uint64_t* empty, int lane) {
  fence_proxy_async_smem();
  __syncwarp();
  if (lane == 0) mbar_arrive(empty);
}
/// Loads the box at coordinates (c0, .., c4) (innermost first) of the 5-d tensor `map` describes
/// into shared memory on the TMA engine, counted on `bar` as transaction bytes (the whole box,
/// out-of-bounds elements zero-filled). `map` is a kernel parameter (__grid_constant__).
__device__ __forceinline__ void tma_load_5d(void* smem_dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            int c4, std::uint64_t* bar, std::uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3, %4, %5, %6}], [%7], %8;" ::"r"(smem_u32(smem_dst)),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
}
/// An L2 policy that evicts the lines it touches first (streamed data that is read once).
__device__ __forceinline__ std::uint64_t l2_policy_evict_first() {
  std::uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
  return policy;
}
/// Prefetches the line holding global-memory address `p` into L2 through the SM's load path
/// (which also translates the address); nothing is returned and nothing waits on it.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(__cvta_generic_to_global(p)) : "memory");
}
/// Barrier over `threads` threads (a multiple of 32) of the CTA, on named barrier `id` (1..15).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

#endif  // __CUDA_ARCH__ >= 900

}  // namespace fastattn::cuda_detail
