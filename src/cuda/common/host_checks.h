// Host-side checks and helpers shared by the CUDA entry points (prefill, decode): the dtype the
// kernels take, 16-byte row alignment for cp.async, int ranges of launch parameters, the GPU
// the build has kernels for, and a device guard.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>

#include "core/check.h"
#include "core/validate.h"
#include "cuda/common/cuda_check.h"
#include "cuda/cuda_backend.h"
#include "fastattn/error.h"

namespace fastattn::cuda_detail {

/// The kernels' element type for q's dtype (fp16 / bf16 only: tensor cores).
template <class KernelDtype>
KernelDtype kernel_dtype(const check::ArgChecker& c, DType dt) {
  if (dt == DType::kFloat16) return KernelDtype::kFloat16;
  if (dt == DType::kBFloat16) return KernelDtype::kBFloat16;
  throw NotSupportedError(std::string(c.op()) + ": q has dtype " + dtype_name(dt) +
                          "; the CUDA kernels take float16 or bfloat16 (tensor cores)");
}

/// cp.async moves 16-byte chunks: rows must start on 16-byte boundaries.
inline void rows_aligned(const check::ArgChecker& c, const TensorView& t, const char* arg) {
  bool ok = reinterpret_cast<std::uintptr_t>(t.data) % 16 == 0;
  for (int i = 0; i + 1 < t.ndim; ++i) ok = ok && (t.size(i) <= 1 || t.stride(i) % 8 == 0);
  if (!ok)
    c.fail_value(arg, "must have 16-byte aligned rows on CUDA (data pointer aligned to 16 bytes, "
                      "strides of all but the last dim multiples of 8 elements)");
}

/// log2(page_size) when the page size is a power of two (the kernels then shift and mask), else
/// -1 (they divide).
inline int page_shift_of(int page_size) {
  if (page_size <= 0 || (page_size & (page_size - 1)) != 0) return -1;
  int shift = 0;
  while ((1 << shift) < page_size) ++shift;
  return shift;
}

inline int as_int(const check::ArgChecker& c, std::int64_t v, const char* arg, std::int64_t max) {
  if (v > max)
    c.fail_value(arg, "is " + std::to_string(v) + ", above the CUDA limit of " + std::to_string(max));
  return static_cast<int>(v);
}

/// Runs on the tensors' device, restoring the caller's current device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FASTATTN_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) FASTATTN_CUDA_CHECK(cudaSetDevice(device));
    target_ = device;
  }
  ~DeviceGuard() {
    if (previous_ != target_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0, target_ = 0;
};

/// Fixed properties of a GPU the launch code needs, queried once per device (they never change,
/// and every call needs them).
struct DeviceInfo {
  int cc_major = 0, cc_minor = 0, sm_count = 0;
};
inline DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> known;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  DeviceInfo d;
  FASTATTN_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device));
  FASTATTN_CUDA_CHECK(cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, device));
  FASTATTN_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
  known.emplace(device, d);
  return d;
}

/// Copies resolved options into a kernel params struct (prefill or decode: same field names);
/// window sizes become int, -1 meaning unbounded.
template <class KernelParams>
void set_options(KernelParams& p, const core::ResolvedOptions& o) {
  const auto window = [](std::int64_t w) {
    return static_cast<int>(w < 0 ? -1 : std::min<std::int64_t>(w, INT32_MAX));
  };
  p.scale = o.scale;
  p.softcap = o.softcap;
  p.window_left = window(o.window_left);
  p.window_right = window(o.window_right);
  p.alibi = o.alibi;
  p.alibi_batch_stride = o.alibi_batch_stride;
}

/// Points a kernel params struct (prefill or decode: same field names) at the attention sinks,
/// (Hq) float32 at any stride, or leaves it without them.
template <class KernelParams>
void set_sinks(KernelParams& p, const std::optional<TensorView>& sinks) {
  if (!sinks) return;
  p.sinks = static_cast<const float*>(sinks->data);
  p.sinks_stride = sinks->stride(0);
}

inline void require_device(const check::ArgChecker& c) {
  if (!cuda_backend_available(c.device().index))
    throw NotSupportedError(std::string(c.op()) + ": " + device_name(c.device()) +
                            " is not a GPU this build has kernels for (sm_80 family or sm_90)");
}

}  // namespace fastattn::cuda_detail
