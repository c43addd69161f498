// Whether the clusters of a decode launch that merges its splits in clusters are all resident at
// once (decode_clusters_resident, decode_params.h). A cluster's first CTA waits for every split of
// its cluster; clusters that do not fit run in a second wave, after the first has ended.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "cuda/common/cuda_check.h"
#include "cuda/common/host_checks.h"
#include "cuda/decode/decode_kernel_sm90.cuh"
#include "cuda/decode/decode_params.h"

namespace fastattn::cuda_decode {
namespace {

// Never launched. cudaOccupancyMaxActiveClusters answers for a launch of its threads and dynamic
// shared memory, and those are what bound the sm_90 decode kernels' CTAs per SM (their registers
// would allow more).
__global__ void cluster_residency_probe() {}

/// The most clusters of `size` CTAs, each of `threads` threads and `smem` bytes of dynamic shared
/// memory, resident at once on `device`. The GPC layout decides: on an H200 at one CTA per SM,
/// 38 clusters of 3 ran at once and 40 did not, where 132 SMs would hold 44 (bench/NOTES.md,
/// session 89). Asked once per device and launch shape.
int clusters_at_once(int device, int size, int threads, int smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int, int>, int> known;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, size, threads, smem);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  cuda_detail::DeviceGuard guard(device);
  FASTATTN_CUDA_CHECK(
      cudaFuncSetAttribute(cluster_residency_probe, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = unsigned(size);
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(size), 1, 1);
  cfg.blockDim = dim3(unsigned(threads), 1, 1);
  cfg.dynamicSmemBytes = std::size_t(smem);
  cfg.attrs = &cluster;
  cfg.numAttrs = 1;
  int n = 0;
  FASTATTN_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&n, cluster_residency_probe, &cfg));
  known.emplace(key, n);
  return n;
}

/// (threads, dynamic shared memory) of one CTA of the sm_90 kernel of form Cfg whose splits merge
/// in clusters of `splits` (launch_decode_sm90).
template <class Cfg>
std::pair<int, int> cluster_cta(int splits) {
  return {Cfg::kThreads, Cfg::launch_smem_bytes(splits)};
}

/// cluster_cta of the form p's launch takes (run_for_dtype's choice; the head-group kernel never
/// merges in clusters).
std::pair<int, int> sm90_cluster_cta(const DecodeParams& p, int splits) {
  if (p.kv_heads_per_cta == kDecodeHeadQuad)
    return cluster_cta<DecodeSm90Config<kDecodeHeadQuadHeadDim, kDecodeHeadQuad>>(splits);
  if (p.kv_heads_per_cta == kDecodeHeadPair)
    return p.head_dim == 64 ? cluster_cta<DecodeSm90Config<64, kDecodeHeadPair>>(splits)
                            : cluster_cta<DecodeSm90Config<128, kDecodeHeadPair>>(splits);
  if (p.row_blocks_per_cta == kDecodeRowPair)
    return p.head_dim <= 64 ? cluster_cta<DecodeSm90Config<64, 1, kDecodeRowPair>>(splits)
                            : cluster_cta<DecodeSm90Config<128, 1, kDecodeRowPair>>(splits);
  if (p.head_dim <= 64) return cluster_cta<DecodeSm90Config<64>>(splits);
  if (p.head_dim <= 128) return cluster_cta<DecodeSm90Config<128>>(splits);
  return cluster_cta<DecodeSm90Config<256>>(splits);
}

}  // namespace

bool decode_clusters_resident(const DecodeParams& p, int device, int num_splits, std::int64_t ctas) {
  const auto [threads, smem] = sm90_cluster_cta(p, num_splits);
  return ctas <= std::int64_t(num_splits) * clusters_at_once(device, num_splits, threads, smem);
}

}  // namespace fastattn::cuda_decode
