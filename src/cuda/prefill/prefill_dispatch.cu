// Host entry of the CUDA prefill: picks the kernel (the sm_90a wgmma kernel on compute capability
// 9.0 for head_dim 64 / 128 / 256 and the sizes rounding up to them, else the sm80 mma.sync one),
// the compiled head_dim (the next of 32, 64, 96, 128, 192, 256) and dtype, launches the attention
// kernel, then the two small helper kernels: the softmax-matrix pass (return_attn_probs, a testing
// aid) and the clearing of varlen padding rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

#include "cuda/common/cuda_check.h"
#include "cuda/common/host_checks.h"
#include "cuda/prefill/prefill_kernel.cuh"
#include "cuda/prefill/prefill_params.h"
#include "fastattn/error.h"

namespace fastattn::cuda_prefill {

template <int kHeadDim, Dtype kDtype>
void launch_prefill(const PrefillParams& p, cudaStream_t stream);
template <int kHeadDim, Dtype kDtype>
void launch_prefill_sm90(const PrefillParams& p, cudaStream_t stream);

namespace {

__device__ __forceinline__ float load_elem(const void* base, std::int64_t i, Dtype dt) {
  return dt == Dtype::kFloat16 ? __half2float(static_cast<const __half*>(base)[i])
                               : __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
}

/// Block-wide reduction of one float per thread (max or sum) for probs_kernel's 128 threads.
template <class Op>
__device__ float probs_block_reduce(float x, Op op, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) x = op(x, __shfl_xor_sync(0xffffffffu, x, offset));
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();  // scratch may still be read by an earlier reduction
  if (threadIdx.x % 32 == 0) scratch[warp] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < warps; ++w) x = op(x, scratch[w]);
  return x;
}

/// probs[b, h, r, :] = the softmax of query row r's scores over its visible keys, 0 elsewhere
/// (hidden keys and padding). The scores are recomputed here in float32 and normalised over
/// themselves (exp(s - max) / sum), not with the attention kernel's LSE: that kernel sums each dot
/// product in another order, so mixing the two would round a lone key's probability below 1. The
/// CPU backend's write_probs normalises the same way. A row with no visible key is all zeros. A
/// sink joins the max and the sum as one more score, so the keys' share sums to less than 1.
/// One block of 128 threads per (row, head, batch), the scores kept in the row itself: simple and
/// slow on purpose, it is a testing aid.
__global__ void probs_kernel(const PrefillParams p) {
  __shared__ float scratch[32];
  const int r = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqInfo seq = resolve_sequence(p, b);
  const int q_start = seq.q_start, sq = seq.sq, sk = seq.sk;
  float* prow = p.probs + ((std::int64_t(b) * p.heads_q + h) * p.max_seqlen_q + r) * p.probs_cols;
  const int kvh = h / (p.heads_q / p.heads_kv);
  const std::int64_t q_off = b * p.q_batch_stride + std::int64_t(q_start + r) * p.q_row_stride +
                             h * p.q_head_stride;
  const int qpos = r + seq.q_pos0;
  const float slope = p.alibi ? p.alibi[b * p.alibi_batch_stride + h] : 0.0f;
  const KvRows krows = kv_rows<false>(p, seq, b, kvh);
  float m = -INFINITY;
  for (int j = threadIdx.x; j < p.probs_cols; j += blockDim.x) {  // the scores, -inf where hidden
    float s = -INFINITY;
    const bool visible = r < sq && j < sk && (p.window_left < 0 || j >= qpos - p.window_left) &&
                         (p.window_right < 0 || j <= qpos + p.window_right);
    if (visible) {
      const std::int64_t k_off = krows.offset(p, j, p.k_row_stride, p.k_page_stride);
      s = 0.0f;
      if (k_off >= 0)  // a page id outside the cache reads as zeros, as in the attention kernel
        for (int c = 0; c < p.head_dim; ++c)
          s += load_elem(p.q, q_off + c, p.dtype) * load_elem(krows.ptr, k_off + c, p.dtype);
      s *= p.scale;
      if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
      s -= slope * fabsf(float(qpos - j));
      m = fmaxf(m, s);
    }
    prow[j] = s;
  }
  m = probs_block_reduce(m, [](float a, float c) { return fmaxf(a, c); }, scratch);
  const float sink = p.sinks ? p.sinks[h * p.sinks_stride] : -INFINITY;
  m = fmaxf(m, sink);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < p.probs_cols; j += blockDim.x) {  // each thread its own columns
    const float e = m == -INFINITY ? 0.0f : expf(prow[j] - m);
    prow[j] = e;
    sum += e;
  }
  sum = probs_block_reduce(sum, [](float a, float c) { return a + c; }, scratch);
  if (m != -INFINITY) sum += expf(sink - m);  // once, after the block's sum
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  for (int j = threadIdx.x; j < p.probs_cols; j += blockDim.x) prow[j] *= inv;
}

/// Varlen output rows past cu_seqlens_q[B] belong to no sequence: output 0, LSE -inf (sinks[h]
/// with attention sinks, as any row that sees no key; the decode kernels store the same).
/// A small grid strides over them (usually there are none and every block returns at once).
__global__ void clear_padding_rows_kernel(const PrefillParams p) {
  const std::int64_t first = max(std::int64_t(p.cu_seqlens_q[p.batch]), std::int64_t(0));
  auto* out = static_cast<std::uint16_t*>(p.out);
  for (std::int64_t row = first + blockIdx.x; row < p.total_q; row += gridDim.x)
    for (int i = threadIdx.x; i < p.heads_q * p.head_dim; i += blockDim.x) {
      const int h = i / p.head_dim, c = i % p.head_dim;
      out[row * p.out_row_stride + h * p.out_head_stride + c] = 0;  // +0.0 in fp16 and bf16
      if (p.lse && c == 0)
        p.lse[h * p.lse_head_stride + row * p.lse_row_stride] =
            p.sinks ? p.sinks[h * p.sinks_stride] : -INFINITY;
    }
}

/// True when the current device runs the sm_90a cubins (compute capability exactly 9.0) and the
/// environment does not ask for the sm80 kernel (FASTATTN_PREFILL_KERNEL=sm80, for comparisons
/// and tests). Device attributes are not stream operations: fine during graph capture.
bool use_sm90_kernel() {
  const char* forced = std::getenv("FASTATTN_PREFILL_KERNEL");
  if (forced && std::strcmp(forced, "sm80") == 0) return false;
  int device = 0;
  FASTATTN_CUDA_CHECK(cudaGetDevice(&device));
  const cuda_detail::DeviceInfo d = cuda_detail::device_info(device);
  return d.cc_major == 9 && d.cc_minor == 0;
}

template <Dtype kDtype>
void launch_for_dtype(const PrefillParams& p, cudaStream_t s) {
  const int d = p.head_dim;
  if (use_sm90_kernel()) {
    if (d > 32 && d <= 64) return launch_prefill_sm90<64, kDtype>(p, s);
    if (d > 96 && d <= 128) return launch_prefill_sm90<128, kDtype>(p, s);
    if (d > 192) return launch_prefill_sm90<256, kDtype>(p, s);
  }
  if (d <= 32) return launch_prefill<32, kDtype>(p, s);
  if (d <= 64) return launch_prefill<64, kDtype>(p, s);
  if (d <= 96) return launch_prefill<96, kDtype>(p, s);
  if (d <= 128) return launch_prefill<128, kDtype>(p, s);
  if (d <= 192) return launch_prefill<192, kDtype>(p, s);
  return launch_prefill<256, kDtype>(p, s);
}

}  // namespace

void run_prefill(const PrefillParams& p, void* stream_ptr) {
  if (p.head_dim < 8 || p.head_dim > kMaxHeadDim)
    throw ValueError("CUDA prefill: head_dim " + std::to_string(p.head_dim) + " outside [8, 256]");
  if (p.sinks && p.key_splits > 1)  // a split's partial state must not carry the sink
    throw ValueError("CUDA prefill: attention sinks need key_splits == 1, got " +
                     std::to_string(p.key_splits));
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.dtype == Dtype::kFloat16) launch_for_dtype<Dtype::kFloat16>(p, stream);
  else launch_for_dtype<Dtype::kBFloat16>(p, stream);
  if (p.probs && p.batch > 0 && p.max_seqlen_q > 0) {
    probs_kernel<<<dim3(p.max_seqlen_q, p.heads_q, p.batch), 128, 0, stream>>>(p);
    FASTATTN_CUDA_CHECK_LAUNCH();
  }
  if (p.cu_seqlens_q && p.total_q > 0 && p.clear_padding_rows) {
    const unsigned blocks = static_cast<unsigned>(p.total_q < 128 ? p.total_q : 128);
    clear_padding_rows_kernel<<<blocks, 128, 0, stream>>>(p);
    FASTATTN_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace fastattn::cuda_prefill
