// csr_to_block_table on the GPU: one thread a table cell, the lists read on the device only (the
// host never synchronises), each row's span clamped as the decode kernels clamp CSR lists
// (decode_common.cuh resolve_decode_seq).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

#include "cuda/common/cuda_check.h"
#include "cuda/common/host_checks.h"
#include "cuda/cuda_backend.h"

namespace fastattn::cuda_decode {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;  // a grid-stride loop past that: one wave of many blocks suffices

struct PageTableParams {
  const std::int32_t* indptr;   // (rows + 1)
  const std::int32_t* indices;  // (nnz)
  std::int32_t* table;          // (rows, width), row stride `stride`
  std::int64_t rows, width, stride, nnz;
};

__global__ void __launch_bounds__(kThreads) csr_to_block_table_kernel(const PageTableParams p) {
  const std::int64_t cells = p.rows * p.width;
  const std::int64_t step = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < cells; i += step) {
    const std::int64_t b = i / p.width, j = i - b * p.width;
    const std::int64_t i0 = min(max(std::int64_t(p.indptr[b]), std::int64_t(0)), p.nnz);
    const std::int64_t i1 = min(max(std::int64_t(p.indptr[b + 1]), i0), p.nnz);
    p.table[b * p.stride + j] = j < i1 - i0 ? p.indices[i0 + j] : 0;
  }
}

}  // namespace

void csr_to_block_table(check::ArgChecker& c, const TensorView& page_indptr, const TensorView& page_indices,
                        const TensorView& block_table, const ExecConfig& exec) {
  cuda_detail::require_device(c);
  PageTableParams p;
  p.indptr = static_cast<const std::int32_t*>(page_indptr.data);
  p.indices = static_cast<const std::int32_t*>(page_indices.data);
  p.table = static_cast<std::int32_t*>(block_table.data);
  p.rows = block_table.size(0);
  p.width = block_table.size(1);
  p.stride = block_table.stride(0);
  p.nnz = page_indices.size(0);
  const std::int64_t cells = p.rows * p.width;
  if (cells == 0) return;
  const auto blocks = static_cast<unsigned>(std::min<std::int64_t>((cells + kThreads - 1) / kThreads, kMaxBlocks));
  cuda_detail::DeviceGuard guard(c.device().index);
  csr_to_block_table_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(exec.cuda_stream)>>>(p);
  FASTATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace fastattn::cuda_decode
