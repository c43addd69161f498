// The preparation kernel of the CUDA shared-prefix attention (see shared_prefix.h for what it
// writes and why). One small launch per call, before the attention passes: block 0 resolves the
// per-request quantities (and, in gated mode, decides which prefix pass runs); every block then
// strides over the query rows no request owns (usually none) to empty their partial states.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cuda/cascade/shared_prefix.h"
#include "cuda/common/cuda_check.h"

namespace fastattn::cuda_cascade {
namespace {

constexpr int kPrepThreads = 256;
// Blocks that clear unowned rows: a handful; rows past qo_indptr[B] are rare (padding), and the
// per-request part runs in block 0 only.
constexpr int kPrepBlocksVarlen = 16;
// The most blocks that pack q (B x Hq x D values, 16 bytes a thread per step).
constexpr int kPrepBlocksPackMax = 128;

/// Request b's suffix keys, clamped like cuda_prefill::resolve_sequence clamps a paged sequence:
/// page ids from the clamped CSR row, length in [0, pages * page_size].
__device__ __forceinline__ std::int64_t suffix_keys(const CascadePrepParams& p, int b) {
  const std::int64_t i0 = min(max(std::int64_t(p.page_indptr[b]), std::int64_t(0)), p.num_page_indices);
  const std::int64_t i1 = min(max(std::int64_t(p.page_indptr[b + 1]), i0), p.num_page_indices);
  const std::int64_t pages = i1 - i0;
  std::int64_t len = pages > 0 ? (pages - 1) * p.page_size + p.last_page_len[b] : 0;
  len = max(len, std::int64_t(0));
  return min(len, pages * p.page_size);
}

__global__ void __launch_bounds__(kPrepThreads) cascade_prep_kernel(const CascadePrepParams p) {
  std::int64_t owned = p.total_q;  // rows some request owns: all of them for decode
  if (p.qo_indptr)
    owned = min(max(std::int64_t(p.qo_indptr[p.batch]), std::int64_t(0)), p.total_q);

  if (blockIdx.x == 0) {
    bool stackable = true;
    for (int b = threadIdx.x; b < p.batch; b += blockDim.x) {
      const std::int64_t len = suffix_keys(p, b);
      if (p.suffix_len) p.suffix_len[b] = int(min(len, std::int64_t(INT32_MAX)));
      if (p.gated) {
        const std::int64_t sq = std::int64_t(p.qo_indptr[b + 1]) - p.qo_indptr[b];
        if (sq > 0 && len - sq + p.window_right < -1) stackable = false;
      }
    }
    if (p.gated) stackable = __syncthreads_and(stackable) != 0;
    if (p.stacked_cu && threadIdx.x == 0) {
      p.stacked_cu[0] = 0;
      p.stacked_cu[1] = stackable ? int(owned) : 0;
    }
    if (p.req_cu)
      for (int b = threadIdx.x; b <= p.batch; b += blockDim.x) p.req_cu[b] = stackable ? 0 : p.qo_indptr[b];
  }

  // GQA packing: q_packed[h][b] = q[b][h], in 16-byte chunks (D is a multiple of 8, rows aligned).
  if (p.q_packed) {
    const int chunks = p.head_dim / 8;
    const std::int64_t n = std::int64_t(p.batch) * p.heads_q * chunks;
    const std::int64_t step = std::int64_t(gridDim.x) * blockDim.x;
    for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
      const std::int64_t c = i % chunks, bh = i / chunks;
      const std::int64_t b = bh % p.batch, h = bh / p.batch;  // packed order: (h, b, c)
      const uint4 v = *reinterpret_cast<const uint4*>(p.q + b * p.q_row_stride + h * p.q_head_stride + c * 8);
      *reinterpret_cast<uint4*>(p.q_packed + i * 8) = v;
    }
  }

  // Unowned rows: empty states in every slot (output 0, LSE -inf after the merge).
  if (p.part_s && owned < p.total_q) {
    const std::int64_t per_row_s = std::int64_t(p.slots) * p.heads_q;
    const std::int64_t per_row_v = per_row_s * p.head_dim;
    const std::int64_t n_s = (p.total_q - owned) * per_row_s;
    const std::int64_t n_v = (p.total_q - owned) * per_row_v;
    const std::int64_t step = std::int64_t(gridDim.x) * blockDim.x;
    const std::int64_t first = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    for (std::int64_t i = first; i < n_s; i += step) p.part_s[owned * per_row_s + i] = -INFINITY;
    for (std::int64_t i = first; i < n_v; i += step) p.part_v[owned * per_row_v + i] = 0;
  }
}

}  // namespace

void run_cascade_prep(const CascadePrepParams& p, void* stream) {
  const bool per_request = p.suffix_len || p.stacked_cu || p.req_cu;
  const bool unowned_rows = p.part_s && p.qo_indptr;  // only varlen calls can have them
  if (!per_request && !unowned_rows && !p.q_packed) return;
  int blocks = unowned_rows ? kPrepBlocksVarlen : 1;
  if (p.q_packed) {
    const std::int64_t chunks = std::int64_t(p.batch) * p.heads_q * (p.head_dim / 8);
    blocks = static_cast<int>(std::max<std::int64_t>(
        blocks, std::min<std::int64_t>(kPrepBlocksPackMax, (chunks + kPrepThreads - 1) / kPrepThreads)));
  }
  cascade_prep_kernel<<<blocks, kPrepThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  FASTATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace fastattn::cuda_cascade
