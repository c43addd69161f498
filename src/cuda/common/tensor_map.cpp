// TMA tensor maps, see tensor_map.h.
#include "cuda/common/tensor_map.h"

#include <cuda_runtime_api.h>

#include <string>

#include "cuda/common/cuda_check.h"
#include "fastattn/error.h"

namespace fastattn::cuda_detail {
namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiled encoder() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found);
    return e == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<EncodeTiled>(p) : nullptr;
  }();
  return fn;
}

}  // namespace

CUtensorMap make_tensor_map_4d_u16(const void* base, std::int64_t d0, std::int64_t d1, std::int64_t s1,
                                   std::int64_t d2, std::int64_t s2, std::int64_t d3, std::int64_t s3,
                                   int box0, int box1) {
  const EncodeTiled encode = encoder();
  if (!encode) throw Error("CUDA driver has no cuTensorMapEncodeTiled (needs a CUDA 12 driver)");
  // A size-1 dim's stride is never used; give it a legal value (a multiple of 16 bytes).
  auto legal = [](std::int64_t size, std::int64_t stride) { return size > 1 ? stride : std::int64_t(8); };
  const cuuint64_t dims[4] = {cuuint64_t(d0), cuuint64_t(d1), cuuint64_t(d2), cuuint64_t(d3)};
  const cuuint64_t strides[3] = {cuuint64_t(legal(d1, s1)) * 2, cuuint64_t(legal(d2, s2)) * 2,
                                 cuuint64_t(legal(d3, s3)) * 2};
  const cuuint32_t box[4] = {cuuint32_t(box0), cuuint32_t(box1), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  // L2 promotion to 128 bytes, not 256: a 256-byte promotion of one 128-byte box row fetched the
  // neighbouring column block early, and with evict-first reads it was often evicted before its
  // own box came (measured 4.04 against 4.49 TB/s, bench/NOTES.md).
  CUtensorMap map;
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw Error("cuTensorMapEncodeTiled failed (error " + std::to_string(int(r)) + ") for dims " +
                std::to_string(d0) + " x " + std::to_string(d1) + " x " + std::to_string(d2) + " x " +
                std::to_string(d3));
  return map;
}

}  // namespace fastattn::cuda_detail
