// Kernel launch with optional programmatic dependent launch (the predecessor on the stream is one
// of our own decode kernels, which the launched kernel waits for in griddepcontrol.wait).
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/common/cuda_check.h"

namespace fastattn::cuda_decode {

template <class Params>
void launch_kernel(void (*kernel)(Params), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                   bool dependent, const Params& p) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = dependent ? attr : nullptr;
  cfg.numAttrs = dependent ? 1 : 0;
  FASTATTN_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
}

}  // namespace fastattn::cuda_decode
