// Launch of one prefill kernel instantiation; each (head_dim, dtype) pair is compiled in its own
// file under src/cuda/instances so a 2-core build compiles them in parallel.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/common/cuda_check.h"
#include "cuda/prefill/prefill_kernel.cuh"

namespace fastattn::cuda_prefill {

template <int kHeadDim, Dtype kDtype>
void launch_prefill(const PrefillParams& p, cudaStream_t stream) {
  using Cfg = PrefillConfig<kHeadDim>;
  auto* kernel = prefill_kernel_for<&prefill_kernel<kHeadDim, kDtype, false>,
                                    &prefill_kernel<kHeadDim, kDtype, true>, Cfg::kSmemBytes>(p);
  const dim3 grid((p.max_seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM, p.heads_q,
                  p.batch * (p.key_splits > 1 ? p.key_splits : 1));
  if (grid.x == 0 || grid.z == 0) return;
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  FASTATTN_CUDA_CHECK_LAUNCH();
}

#define FASTATTN_INSTANTIATE_PREFILL(D, T) \
  template void launch_prefill<D, T>(const PrefillParams&, cudaStream_t);

}  // namespace fastattn::cuda_prefill
