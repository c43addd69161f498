// copy_host_to_device with a host destination (the CPU build's path; the GPU's is tested from
// Python, tests/gpu/test_decode_wrapper_gpu.py): every dtype's bytes arrive as they were.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "fastattn/ops.h"
#include "test_util.h"

namespace {

using namespace fa_test;
using fa_ref::HostTensor;

TEST(CopyHostToDevice, HostDestinationGetsTheBytes) {
  FA_SEEDED_RNG(rng);
  for (DType dt : {DType::kInt32, DType::kInt64, DType::kFloat32, DType::kBFloat16, DType::kUInt8}) {
    const std::int64_t rows = rand_int(rng, 0, 5), cols = rand_int(rng, 1, 40);
    HostTensor src(dt, {rows, cols}), dst(dt, {rows, cols});
    const std::size_t n = static_cast<std::size_t>(src.numel()) * fastattn::dtype_size(dt);
    auto* from = static_cast<unsigned char*>(src.view().data);
    for (std::size_t i = 0; i < n; ++i) from[i] = static_cast<unsigned char>(rand_int(rng, 0, 255));
    dst.poison();
    fastattn::copy_host_to_device(src.view(), dst.view());
    const auto* to = static_cast<const unsigned char*>(dst.view().data);
    EXPECT_EQ(std::vector<unsigned char>(to, to + n), std::vector<unsigned char>(from, from + n))
        << "dtype " << fastattn::dtype_name(dt) << ", " << rows << " x " << cols;
    EXPECT_TRUE(dst.gaps_intact()) << "wrote past dst";
  }
}

}  // namespace
