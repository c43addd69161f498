// The merge of split-KV partial states, in one formula for both places that run it: the combine
// kernel (decode_kernels.cu) and the last-CTA merge of the sm_90 kernel (decode_merge_splits_in_cta
// below). Both read the same states and do the same float operations in the same order, so the
// bits of a merged row do not depend on which merge ran, nor on which CTA finished last: a fixed
// num_splits stays bitwise the same whatever the rest of the batch.
//
// The formula for one query row over S splits with states (lse_s, o_s):
// - the LSEs are reduced by one warp (merge_split_lses_warp): lane l adds splits l, l + 32, ...
//   into a MergeAccumulator, the lanes merge in a butterfly, and split s's weight is lane
//   (s % 32)'s weight_of(lse_s); the row's LSE is lane 0's;
// - each output column is ((c_0 + c_1) + c_2) + c_3, where class sum c_k runs over the splits
//   s = k, k + 4, ... in increasing order as fmaf(weight_s, o_s, c_k) from 0.
//
// Partial states live in the workspace (DecodeParams): partial_lse (S, B, Hq, Sq), partial_o (S, B,
// Hq, Sq, head_dim), float32; the reads bypass L1 (__ldcg, cp.async.cg), since in the last-CTA
// merge they were written by other SMs during the same kernel.
#pragma once

#include <cstdint>

#include "common/softmax_state.h"
#include "cuda/decode/decode_common.cuh"
#include "cuda/decode/decode_params.h"
#include "cuda/decode/decode_tile.cuh"
#include "cuda/prefill/prefill_kernel.cuh"  // cp_async_16

namespace fastattn::cuda_decode {

/// Class sums per column (see the file comment).
constexpr int kSplitClasses = 4;

/// One warp: reduces the `num_splits` LSEs lse_of(s) (see the file comment), writes split s's
/// weight into weights[s] and returns the merged LSE (lane 0's) in every lane. Empty states (LSE
/// -inf) merge exactly and weigh 0; all empty gives -inf and weights 0. weights may be where lse_of
/// reads (each lane reads split s's LSE before it writes s's weight, and no lane reads s again).
template <class LseOf>
__device__ __forceinline__ float merge_split_lses_warp(LseOf lse_of, int num_splits, int lane, float* weights) {
  MergeAccumulator acc;
  acc.init();
  float rescale, weight;
  for (int s = lane; s < num_splits; s += 32) acc.add(lse_of(s), &rescale, &weight);
  for (int offset = 16; offset > 0; offset /= 2) {
    MergeAccumulator other;
    other.m = __shfl_xor_sync(0xffffffffu, acc.m, offset);
    other.sum = __shfl_xor_sync(0xffffffffu, acc.sum, offset);
    acc.merge(other);
  }
  for (int s = lane; s < num_splits; s += 32) weights[s] = acc.weight_of(lse_of(s));
  return __shfl_sync(0xffffffffu, acc.lse(), 0);
}

/// c += w * v, column by column, each as one fused multiply-add.
__device__ __forceinline__ void add_weighted4(float4& c, float w, float4 v) {
  c.x = fmaf(w, v.x, c.x), c.y = fmaf(w, v.y, c.y), c.z = fmaf(w, v.z, c.z), c.w = fmaf(w, v.w, c.w);
}

/// ((c[0] + c[1]) + c[2]) + c[3], where class k's sum sits at c[k * stride].
__device__ __forceinline__ float4 sum_split_classes(const float4* c, int stride) {
  float4 t = c[0];
  for (int k = 1; k < kSplitClasses; ++k) {
    const float4 u = c[k * stride];
    t.x += u.x, t.y += u.y, t.z += u.z, t.w += u.w;
  }
  return t;
}

/// Threads of the last-CTA merge: the kDecodeWarps consumer warps of a one-head CTA. Warp k sums
/// class k (kSplitClasses == kDecodeWarps), a lane at most kLastCtaValuesPerLane float4 columns.
constexpr int kLastCtaThreads = kDecodeWarps * 32;
constexpr int kLastCtaValuesPerLane = kDecodeLastCtaMaxValues / 4 / 32;
static_assert(kSplitClasses == kDecodeWarps, "one warp per class sum");
/// Floats before the last-CTA merge's chunk buffer: the rows' merged LSEs, the arrival flag, then
/// the rows' split LSEs, which the LSE pass turns into their weights in place ([row][split], at most
/// kDecodeRowsPerCta x kDecodeLastCtaMaxSplits).
constexpr int kLastCtaLseFloats = kDecodeRowsPerCta;
constexpr int kLastCtaFlagFloat = kLastCtaLseFloats;
constexpr int kLastCtaWeightsFloat = 2 * kDecodeRowsPerCta;
constexpr int kLastCtaHeaderFloats = kLastCtaWeightsFloat + kDecodeRowsPerCta * kDecodeLastCtaMaxSplits;
/// A merging thread's share of the split LSEs (all of them read in one round trip).
constexpr int kLastCtaLsesPerThread = kDecodeRowsPerCta * kDecodeLastCtaMaxSplits / kLastCtaThreads;

/// atomicAdd with acquire and release semantics at GPU scope (one instruction, no separate fence).
__device__ __forceinline__ unsigned atomic_add_acq_rel_gpu(std::uint32_t* p, unsigned v) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

/// After each of the CTA's kLastCtaThreads merging threads (thread index `tid`, barrier `sync`)
/// has stored its part of this split's state: counts the CTA in on `counter` and returns whether it
/// is the item's last of num_splits; that one resets the counter to zero for the next call. One
/// thread counts after the CTA's barrier with an acquire-release atomic (CUTLASS's semaphore does
/// the same with a release reduction): its release orders every thread's state stores before the
/// count, and in the last CTA its acquire orders the count before the reads of the other splits'
/// states. `smem` is the merge's shared memory (its flag float is written here).
template <class Sync>
__device__ __forceinline__ bool decode_arrive_last(std::uint32_t* counter, int num_splits, int tid, float* smem,
                                                   Sync sync) {
  sync();
  if (tid == 0) {
    const bool last = atomic_add_acq_rel_gpu(counter, 1u) == unsigned(num_splits - 1);
    if (last) *counter = 0u;  // every split has counted: nobody else touches it this call
    smem[kLastCtaFlagFloat] = last ? 1.0f : 0.0f;
  }
  sync();
  return smem[kLastCtaFlagFloat] != 0.0f;
}

/// The last-CTA merge of one CTA's `rows` packed rows of (b, KV head kvh, row block mb) over all
/// num_splits splits into out and LSE, in the formula of the file comment. Run by the
/// kLastCtaThreads threads `tid` (barrier `sync`) of the CTA that decode_arrive_last found last.
/// The rows' states are consecutive (row pm of the item is state (b * Hq + kvh * group) * Sq + pm),
/// so a split's part is one block of rows x head_dim floats: the splits are copied in chunks of as
/// many as fit into `smem` (`smem_floats` free floats, 16-byte aligned, after the header) with
/// cp.async, all of a chunk's copies in flight at once. Requires num_splits <=
/// kDecodeLastCtaMaxSplits and rows x head_dim <= kDecodeLastCtaMaxValues (the host's
/// decode_last_cta_merge_fits), and smem_floats >= kLastCtaHeaderFloats + rows x head_dim.
template <Dtype kDtype, class Sync>
__device__ __forceinline__ void decode_merge_splits_in_cta(const DecodeParams& p, int b, int kvh, int mb, int rows,
                                                           float* smem, int smem_floats, int tid, Sync sync) {
  const int warp = tid / 32, lane = tid % 32;
  const int ns = p.num_splits, d = p.head_dim;
  const std::int64_t split_stride = std::int64_t(p.batch) * p.heads_q * p.seqlen_q;
  const std::int64_t state0 = (std::int64_t(b) * p.heads_q + std::int64_t(kvh) * p.group) * p.seqlen_q +
                              std::int64_t(mb) * kDecodeRowsPerCta;
  float* lses = smem;
  float* weights = smem + kLastCtaWeightsFloat;  // [row][split]: the split LSEs, then their weights
  float* chunk = smem + kLastCtaHeaderFloats;     // [split in chunk][row][column]
  const int split_floats = rows * d;
  const int chunk_splits = (smem_floats - kLastCtaHeaderFloats) / split_floats;
  // Copies splits s0 .. s0 + n - 1 of the states into the chunk buffer (cp.async, L2 only).
  const auto copy_chunk = [&](int s0, int n) {
    for (int idx = tid; idx < n * (split_floats / 4); idx += kLastCtaThreads) {
      const int sl = idx / (split_floats / 4), e = idx % (split_floats / 4) * 4;
      cuda_prefill::cp_async_16(chunk + sl * split_floats + e,
                                p.partial_o + ((s0 + sl) * split_stride + state0) * d + e, true);
    }
    cute::cp_async_fence();
  };
  // The first chunk's copies and every split LSE's load in flight together (one round trip), then
  // each row's LSE pass from shared memory, a warp per row.
  copy_chunk(0, min(chunk_splits, ns));
  {
    float v[kLastCtaLsesPerThread];
#pragma unroll
    for (int k = 0; k < kLastCtaLsesPerThread; ++k) {
      const int idx = tid + k * kLastCtaThreads;
      v[k] = idx < rows * ns ? __ldcg(p.partial_lse + (idx % ns) * split_stride + state0 + idx / ns) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < kLastCtaLsesPerThread; ++k)
      if (tid + k * kLastCtaThreads < rows * ns) weights[tid + k * kLastCtaThreads] = v[k];
  }
  sync();
  for (int r = warp; r < rows; r += kDecodeWarps) {
    float* row = weights + r * ns;
    const float lse = merge_split_lses_warp([&](int s) { return row[s]; }, ns, lane, row);
    if (lane == 0) lses[r] = lse;
  }
  // Warp `warp` sums class `warp` of the lane's columns o = lane + 32 j (row o / (d / 4)).
  const int values = rows * (d / 4);
  float4 sums[kLastCtaValuesPerLane];
#pragma unroll
  for (int j = 0; j < kLastCtaValuesPerLane; ++j) sums[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int s0 = 0; s0 < ns; s0 += chunk_splits) {
    const int n = min(chunk_splits, ns - s0);
    if (s0 > 0) copy_chunk(s0, n);
    cute::cp_async_wait<0>();
    sync();  // the chunk, and (first time) the weights
#pragma unroll
    for (int j = 0; j < kLastCtaValuesPerLane; ++j) {
      const int o = lane + 32 * j;
      if (o < values) {
        const int r = o / (d / 4), c = o % (d / 4) * 4;
        for (int s = s0 + ((warp - s0) & (kSplitClasses - 1)); s < s0 + n; s += kSplitClasses)
          add_weighted4(sums[j], weights[r * ns + s],
                        *reinterpret_cast<const float4*>(chunk + (s - s0) * split_floats + r * d + c));
      }
    }
    sync();  // before the next chunk (or the class sums) overwrite it
  }
  // The class sums side by side ([column][class]), then each column's in class order.
  auto* classes = reinterpret_cast<float4*>(chunk);
#pragma unroll
  for (int j = 0; j < kLastCtaValuesPerLane; ++j)
    if (lane + 32 * j < values) classes[(lane + 32 * j) * kSplitClasses + warp] = sums[j];
  sync();
  for (int o = tid; o < values; o += kLastCtaThreads) {
    const int r = o / (d / 4), c = o % (d / 4) * 4;
    decode_store_output4<kDtype>(p, b, kvh, mb * kDecodeRowsPerCta + r, c, sum_split_classes(classes + o * kSplitClasses, 1),
                                 lses[r]);
  }
}

}  // namespace fastattn::cuda_decode
