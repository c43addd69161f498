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

CUtensorMap make_tensor_map_5d_u16(const void* base, const std::int64_t (&dims)[5], const std::int64_t (&strides)[5],
                                   const int (&box)[5], TmaL2Promotion promotion) {
  const EncodeTiled encode = encoder();
  if (!encode) throw Error("CUDA driver has no cuTensorMapEncodeTiled (needs a CUDA 12 driver)");
  cuuint64_t global_dims[5], global_strides[4];
  cuuint32_t box_dims[5];
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  for (int i = 0; i < 5; ++i) {
    global_dims[i] = cuuint64_t(dims[i]);
    box_dims[i] = cuuint32_t(box[i]);
    // A size-1 dim's stride is never used; give it a legal value (a multiple of 16 bytes).
    if (i > 0) global_strides[i - 1] = cuuint64_t(dims[i] > 1 ? strides[i] : 8) * 2;
  }
  const CUtensorMapL2promotion l2 =
      promotion == TmaL2Promotion::k256B ? CU_TENSOR_MAP_L2_PROMOTION_L2_256B : CU_TENSOR_MAP_L2_PROMOTION_L2_128B;
  CUtensorMap map;
  const CUresult r = encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 5, const_cast<void*>(base), global_dims,
                            global_strides, box_dims, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, l2, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::string shape;
    for (int i = 0; i < 5; ++i) shape += (i ? " x " : "") + std::to_string(dims[i]);
    throw Error("cuTensorMapEncodeTiled failed (error " + std::to_string(int(r)) + ") for dims " + shape);
  }
  return map;
}

}  // namespace fastattn::cuda_detail
