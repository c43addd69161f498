// Lets the small numeric helpers in src/common compile for both the CPU backend and CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define FASTATTN_HD __host__ __device__ __forceinline__
#else
#define FASTATTN_HD inline
#endif
