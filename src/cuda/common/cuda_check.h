// Error checking for CUDA runtime calls inside the library: failures become fastattn::Error
// exceptions carrying the call, the CUDA error name and the location. Never exit(), never print.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "fastattn/error.h"

namespace fastattn::cuda_detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file,
                                          int line) {
  throw Error(std::string("fastattn CUDA error: ") + what + " failed with " +
              cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") at " + file + ":" +
              std::to_string(line));
}

}  // namespace fastattn::cuda_detail

/// Evaluates a cudaError_t expression and throws fastattn::Error unless it is cudaSuccess.
#define FASTATTN_CUDA_CHECK(expr)                                                          \
  do {                                                                                     \
    const cudaError_t fastattn_err_ = (expr);                                              \
    if (fastattn_err_ != cudaSuccess)                                                      \
      ::fastattn::cuda_detail::throw_cuda_error(fastattn_err_, #expr, __FILE__, __LINE__); \
  } while (0)

/// Checks the launch that just happened (configuration errors are reported here; errors raised
/// while the kernel runs surface at the next synchronising call, as usual in CUDA).
#define FASTATTN_CUDA_CHECK_LAUNCH() FASTATTN_CUDA_CHECK(cudaGetLastError())
