// Runtime device queries behind fastattn::backend_available (see cuda_backend.h).
#include <cuda_runtime_api.h>

#include "cuda/cuda_backend.h"

namespace fastattn {
namespace {

// The kernels need tensor-core MMA with bf16 (sm_80 and newer).
constexpr int kMinComputeMajor = 8;

// Never launched: asking the runtime for its attributes tells whether this binary carries code
// that runs on the current device (it fails with cudaErrorNoKernelImageForDevice /
// cudaErrorInvalidDeviceFunction when no embedded SASS/PTX matches the device's architecture).
__global__ void probe_kernel(int* p) {
  if (p != nullptr) *p = 0;
}

// Runtime errors from a failed query are not sticky, but they are recorded as the thread's last
// error; clear it so callers checking cudaGetLastError() after their own launch are not misled.
void clear_last_error() { (void)cudaGetLastError(); }

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {  // no driver, no device, driver too old
    clear_last_error();
    return 0;
  }
  return n;
}

bool cuda_backend_available(int device) {
  if (device < 0 || device >= cuda_device_count()) return false;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    clear_last_error();
    return false;
  }
  if (major < kMinComputeMajor) return false;

  // cudaFuncGetAttributes answers for the current device: switch to `device` and back.
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) {
    clear_last_error();
    return false;
  }
  bool ok = true;
  if (previous != device && cudaSetDevice(device) != cudaSuccess) ok = false;
  if (ok) {
    cudaFuncAttributes attr{};
    ok = cudaFuncGetAttributes(&attr, probe_kernel) == cudaSuccess;
  }
  if (previous != device) (void)cudaSetDevice(previous);
  clear_last_error();
  return ok;
}

}  // namespace fastattn
