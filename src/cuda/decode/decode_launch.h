// Kernel launch with optional programmatic dependent launch (the predecessor on the stream is one
// of our own decode kernels, which the launched kernel waits for in griddepcontrol.wait) and
// optional clusters along x (sm_90); the per-head kernels' grid.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/common/cuda_check.h"
#include "cuda/decode/decode_params.h"

namespace fastattn::cuda_decode {

/// The per-head kernels' grid over `head_blocks` (KV heads, or head groups, x row blocks):
/// (num_splits, head_blocks, batch), or with a split plan (head_blocks, plan_items, 1), so that
/// the plan's order of work items is the launch order (resolve_decode_work reads it back).
inline dim3 decode_head_grid(const DecodeParams& p, int head_blocks) {
  if (p.split_plan) return dim3(unsigned(head_blocks), unsigned(p.plan_items), 1);
  return dim3(unsigned(p.num_splits), unsigned(head_blocks), unsigned(p.batch));
}

template <class Params>
void launch_kernel(void (*kernel)(Params), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                   bool dependent, const Params& p, unsigned cluster_x = 1) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (dependent) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster_x > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster_x;
    attr[n].val.clusterDim.y = 1;
    attr[n].val.clusterDim.z = 1;
    ++n;
  }
  cfg.attrs = n ? attr : nullptr;
  cfg.numAttrs = n;
  FASTATTN_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

}  // namespace fastattn::cuda_decode
