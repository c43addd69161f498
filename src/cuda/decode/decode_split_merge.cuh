// The merge of one query row's split-KV partial states, shared by the combine kernel
// (decode_kernels.cu) and the per-head sm_90 kernel's grid merge (decode_kernel_sm90.cuh), so that
// both give the same bits; and the barrier in global memory on which the grid merge waits for an
// item's splits.
#pragma once

#include <cstdint>

#include "common/softmax_state.h"
#include "cuda/decode/decode_common.cuh"
#include "cuda/decode/decode_params.h"

namespace fastattn::cuda_decode {

/// Warps that merge a row: the combine kernel's CTA, the per-head kernel's consumer warps.
constexpr int kSplitMergeWarps = 4;

/// merge_split_row's kPreload where the merge's grid is resident at once (the combine kernel's
/// where combine_preload_ctas_per_sm allows it; the grid merge's always).
constexpr int kSplitMergePreload = 8;

/// Scratch of merge_split_row, in shared memory (6.2 KB).
struct SplitMergeScratch {
  float split_weight[kMaxSplits];
  float4 warp_sum[kSplitMergeWarps][32];
  float merged_lse;
};

/// Merges the num_splits partial states of query row i of query head h of sequence b, and its sink
/// if any, into out and LSE with MergeAccumulator (empty states, LSE -inf, merge exactly and never
/// give NaN). The states are rows first_row, first_row + row_step, ... of (rows, Hq, Sq) partial_lse
/// and (rows, Hq, Sq, D) partial_o. Run by kSplitMergeWarps warps (thread `tid`); `sync` is a
/// barrier over them.
///
/// The first warp reduces the splits' LSEs in parallel (one accumulator per lane, then merged) and
/// leaves each split's weight in shared memory. Then the four warps take every fourth split each, a
/// lane four columns (one 16-byte load per split, all of a thread's loads in flight together), and
/// sum their shares through shared memory. (One thread per column walking all splits paid one
/// dependent round trip per 8 splits: ~6 us at 33 splits.) With kPreload > 0 each thread issues its
/// first kPreload state loads before the LSE pass, so that their round trip overlaps the LSEs' (the
/// sums are the same, in the same order): on the H200 up to 2.2 us faster per call at batch 1-16
/// (bench/NOTES.md, session 49). The states are read through L2 (ld.global.cg): in the grid merge
/// they were written by other CTAs of the same grid.
template <Dtype kDtype, int kPreload, class Sync>
__device__ __forceinline__ void merge_split_row(const DecodeParams& p, int i, int h, int b, int first_row,
                                                int num_splits, int row_step, SplitMergeScratch& scratch, int tid,
                                                Sync sync) {
  const int warp = tid / 32, lane = tid % 32;
  const std::int64_t split_stride = std::int64_t(row_step) * p.heads_q * p.seqlen_q;
  const std::int64_t state0 = (std::int64_t(first_row) * p.heads_q + h) * p.seqlen_q + i;
  const float* src = p.partial_o + state0 * p.head_dim;
  const std::int64_t step = split_stride * p.head_dim;
  // The first kPreload of the warp's splits (warp, warp + 4, ...) at the lane's first four columns.
  float4 first[kPreload > 0 ? kPreload : 1];
  if (kPreload > 0 && p.head_dim % 4 == 0 && lane * 4 < p.head_dim) {
#pragma unroll
    for (int k = 0; k < kPreload; ++k) {
      const int s = warp + k * kSplitMergeWarps;
      if (s < num_splits) first[k] = __ldcg(reinterpret_cast<const float4*>(src + s * step + lane * 4));
    }
  }
  if (warp == 0) {
    MergeAccumulator acc;
    acc.init();
    float rescale, weight;
    // A sink is one more state, after the splits', of zero values: it counts in the weights and
    // the LSE only.
    const int states = num_splits + (p.sinks ? 1 : 0);
    for (int s = lane; s < states; s += 32)
      acc.add(s < num_splits ? __ldcg(p.partial_lse + state0 + s * split_stride) : p.sinks[h * p.sinks_stride],
              &rescale, &weight);
    for (int offset = 16; offset > 0; offset /= 2) {
      MergeAccumulator other;
      other.m = __shfl_xor_sync(0xffffffffu, acc.m, offset);
      other.sum = __shfl_xor_sync(0xffffffffu, acc.sum, offset);
      acc.merge(other);
    }
    for (int s = lane; s < num_splits; s += 32)
      scratch.split_weight[s] = acc.weight_of(__ldcg(p.partial_lse + state0 + s * split_stride));
    if (lane == 0) scratch.merged_lse = acc.lse();
  }
  sync();
  // No branch on the weight: an empty split stores a zero output, so its weight 0 adds exactly 0.
  const auto store = [&](int c, float o) {
    Elem<kDtype>::store(p.out, b * p.out_batch_stride + std::int64_t(i) * p.out_row_stride +
                                   std::int64_t(h) * p.out_head_stride + c, o);
  };
  if (p.head_dim % 4 == 0) {  // rows of partial_o are 16-byte aligned (the workspace is)
    for (int c0 = 0; c0 < p.head_dim; c0 += 128) {
      const int c = c0 + lane * 4;
      float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (c < p.head_dim) {
        int s0 = warp;
        if (c0 == 0) {
#pragma unroll
          for (int k = 0; k < kPreload; ++k) {
            if (s0 >= num_splits) break;
            const float4 v = first[k];
            const float w = scratch.split_weight[s0];
            o.x += w * v.x, o.y += w * v.y, o.z += w * v.z, o.w += w * v.w;
            s0 += kSplitMergeWarps;
          }
        }
#pragma unroll 8
        for (int s = s0; s < num_splits; s += kSplitMergeWarps) {
          const float4 v = __ldcg(reinterpret_cast<const float4*>(src + s * step + c));
          const float w = scratch.split_weight[s];
          o.x += w * v.x, o.y += w * v.y, o.z += w * v.z, o.w += w * v.w;
        }
      }
      scratch.warp_sum[warp][lane] = o;
      sync();
      if (warp == 0 && c < p.head_dim) {
        float4 t = scratch.warp_sum[0][lane];
        for (int w = 1; w < kSplitMergeWarps; ++w) {
          const float4 u = scratch.warp_sum[w][lane];
          t.x += u.x, t.y += u.y, t.z += u.z, t.w += u.w;
        }
        store(c, t.x), store(c + 1, t.y), store(c + 2, t.z), store(c + 3, t.w);
      }
      sync();
    }
  } else {
    for (int c = tid; c < p.head_dim; c += kSplitMergeWarps * 32) {
      float o = 0.0f;
#pragma unroll 8
      for (int s = 0; s < num_splits; ++s) o += scratch.split_weight[s] * __ldcg(src + s * step + c);
      store(c, o);
    }
  }
  if (p.lse && tid == 0)
    p.lse[b * p.lse_batch_stride + std::int64_t(h) * p.lse_head_stride + std::int64_t(i) * p.lse_row_stride] =
        scratch.merged_lse;
  sync();  // the scratch may be reused for the next row
}

/// Waits, in one thread of each of an item's `count` CTAs, until all of them have called it; the
/// calling CTA's other threads wait on their own barrier after it. Every CTA of the item must be
/// resident at once (the grid merge's launch is cooperative) and must call it once. `words` is the
/// item's pair (arrivals, generation) of library-owned counters, arrivals zero between calls: the
/// last to arrive resets it and moves the generation on, which the others wait to see. The arrival
/// is a release at GPU scope of everything the CTA did before (its threads synchronised with this
/// one first), the wait an acquire of every arrival's. The generation is read before the arrival,
/// so it cannot have moved yet: that needs this CTA's arrival.
__device__ __forceinline__ void decode_item_barrier(std::uint32_t* words, int count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  std::uint32_t* arrivals = words;
  std::uint32_t* generation = words + 1;
  std::uint32_t gen, old, now;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(gen) : "l"(generation) : "memory");
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(arrivals) : "memory");
  if (old == std::uint32_t(count - 1)) {
    asm volatile("st.relaxed.gpu.global.u32 [%0], 0;" ::"l"(arrivals) : "memory");
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(generation), "r"(gen + 1) : "memory");
    return;
  }
  do {
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(now) : "l"(generation) : "memory");
  } while (now == gen);
#endif
}

}  // namespace fastattn::cuda_decode
