// Host entry of the CUDA KV-cache path and its two small kernels:
//   append_rotary_kernel  writes the new keys (rotated) and values into the cache in place, and
//                         the rotated copy of q into the workspace;
//   combine_kernel        merges the split-KV partial states (the shared merge primitive,
//                         MergeAccumulator) into out and LSE, a CTA per row;
//   combine_rows_kernel   the same merge, a warp per row, for grids of more rows than the combine
//                         kernel keeps resident at once.
// The attention kernels (decode_kernel.cuh: cp.async, sm_80+; decode_kernel_sm90.cuh: bulk
// copies, sm_90, one KV head per CTA or a pair; decode_kernel_sm90_head_group.cuh: bulk copies
// over four, eight or 32 KV heads) are compiled per head_dim / dtype under src/cuda/instances/. All
// of it runs on the caller's stream with no host synchronisation.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common/softmax_state.h"
#include "cuda/common/cuda_check.h"
#include "cuda/common/host_checks.h"
#include "cuda/decode/decode_common.cuh"
#include "cuda/decode/decode_launch.h"
#include "cuda/decode/decode_params.h"
#include "fastattn/error.h"

namespace fastattn::cuda_decode {

template <int kHeadDim, Dtype kDtype>
void launch_decode(const DecodeParams& p, cudaStream_t stream);
template <int kHeadDim, Dtype kDtype, int kHeads, int kRowBlocks>
void launch_decode_sm90(const DecodeParams& p, cudaStream_t stream);
template <Dtype kDtype>
void launch_decode_sm90_head_group(const DecodeParams& p, cudaStream_t stream);

namespace {

/// Rotary embedding of element c (< rotary_dim) of a row `x` (element offsets from `base`) at
/// table row `pos`: interleaved pairs (2i, 2i + 1), GPT-NeoX pairs (i, i + rotary_dim / 2).
template <Dtype kDtype>
__device__ __forceinline__ float rotate(const DecodeParams& p, const void* base, std::int64_t row_off,
                                        int c, int pos) {
  using E = Elem<kDtype>;
  const int half = p.rotary_dim / 2;
  int i, c0, c1;
  if (p.rotary_interleaved) {
    i = c / 2;
    c0 = 2 * i;
    c1 = 2 * i + 1;
  } else {
    i = c < half ? c : c - half;
    c0 = i;
    c1 = i + half;
  }
  const float x0 = E::load(base, row_off + c0), x1 = E::load(base, row_off + c1);
  const std::int64_t ci = std::int64_t(pos) * p.cos_row_stride + i;
  const std::int64_t si = std::int64_t(pos) * p.sin_row_stride + i;
  const float cs = p.rotary_f32 ? static_cast<const float*>(p.rotary_cos)[ci] : E::load(p.rotary_cos, ci);
  const float sn = p.rotary_f32 ? static_cast<const float*>(p.rotary_sin)[si] : E::load(p.rotary_sin, si);
  return c == c0 ? x0 * cs - x1 * sn : x0 * sn + x1 * cs;
}

/// Block (t, b): new token t of sequence b into its cache slot seqlen + t (when it fits and its
/// page id is valid), and query row t rotated into q_rot (when rotary is on).
template <Dtype kDtype>
__global__ void append_rotary_kernel(const DecodeParams p) {
  using E = Elem<kDtype>;
  pdl_let_next_kernel_launch();  // the attention kernel waits for this one to finish
  const int t = blockIdx.x, b = blockIdx.y;
  const DecodeSeq seq = resolve_decode_seq(p, b);
  const int pos0 = seq.seqlen - seq.pad;  // position of the first new token
  const auto clamp_pos = [&](int pos) { return min(max(pos, 0), p.rotary_len - 1); };
  if (t < p.seqlen_new && seq.valid && seq.seqlen + t < seq.capacity) {
    const int slot = seq.seqlen + t;
    const std::int64_t ko = slot_offset(p, seq, slot, p.k_batch_stride, p.k_row_stride);
    const std::int64_t vo = slot_offset(p, seq, slot, p.v_batch_stride, p.v_row_stride);
    const int pos = p.rotary_dim > 0 ? clamp_pos(pos0 + t) : 0;
    for (int idx = threadIdx.x; idx < p.heads_kv * p.head_dim; idx += blockDim.x) {
      const int h = idx / p.head_dim, c = idx % p.head_dim;
      const std::int64_t kn = b * p.knew_batch_stride + std::int64_t(t) * p.knew_row_stride + h * p.knew_head_stride;
      const std::int64_t vn = b * p.vnew_batch_stride + std::int64_t(t) * p.vnew_row_stride + h * p.vnew_head_stride;
      if (ko >= 0) {
        const float k = c < p.rotary_dim ? rotate<kDtype>(p, p.k_new, kn, c, pos) : E::load(p.k_new, kn + c);
        E::store(p.k_cache, ko + h * p.k_head_stride + c, k);
      }
      if (vo >= 0) {
        // Copied as bits: values are not rounded twice.
        static_cast<std::uint16_t*>(p.v_cache)[vo + h * p.v_head_stride + c] =
            static_cast<const std::uint16_t*>(p.v_new)[vn + c];
      }
    }
  }
  if (p.q_rot && t < p.seqlen_q) {
    const int pos = clamp_pos(pos0 + (p.rotate_q_per_row ? t : 0));
    for (int idx = threadIdx.x; idx < p.heads_q * p.head_dim; idx += blockDim.x) {
      const int h = idx / p.head_dim, c = idx % p.head_dim;
      const std::int64_t qo = b * p.q_batch_stride + std::int64_t(t) * p.q_row_stride + h * p.q_head_stride;
      const float x = c < p.rotary_dim ? rotate<kDtype>(p, p.q, qo, c, pos) : E::load(p.q, qo + c);
      E::store(p.q_rot, ((std::int64_t(b) * p.seqlen_q + t) * p.heads_q + h) * p.head_dim + c, x);
    }
  }
}

/// Block (i, h, b): merges the num_splits partial states of query row i of head h, and its sink
/// if any, into out and LSE with MergeAccumulator (empty states, LSE -inf, merge exactly and never
/// give NaN). The first warp reduces the splits' LSEs in parallel (one accumulator per lane, then
/// merged) and leaves each split's weight in shared memory. Then the four warps take every fourth
/// split each, a lane four columns (one 16-byte load per split, all of a thread's loads in flight
/// together), and sum their shares through shared memory. (One thread per column walking all
/// splits paid one dependent round trip per 8 splits: ~6 us at 33 splits.) With kPreload > 0 each
/// thread issues its first kPreload state loads before the LSE pass, so that their round trip
/// overlaps the LSEs' (the sums are the same, in the same order): on the H200 up to 2.2 us faster
/// per call at batch 1-16 (bench/NOTES.md, session 49).
constexpr int kCombineWarps = 4;

/// combine_kernel's kPreload where it preloads (run_for_dtype says where).
constexpr int kCombinePreload = 8;

/// The split states of sequence b and, once locate(i, h) has run, of its query row i of head h:
/// state s (< num_splits) has its LSE at partial_lse[index(s)] and its values at
/// partial_o + index(s) * head_dim. Shared by both combine kernels. Uniform splits: rows b,
/// b + batch, ...; a split plan: split_plan[b] on (the plan is the caller's, so it may be read
/// before the wait). A sequence of one split wrote out itself, and a plan's entries out of range
/// merge nothing (DecodeParams::split_plan): merges_nothing().
struct CombineStates {
  int num_splits, first_row, row_step;
  std::int64_t state0, split_stride;
  __device__ __forceinline__ CombineStates(const DecodeParams& p, int b)
      : num_splits(p.num_splits), first_row(b), row_step(p.batch) {
    if (p.split_plan) {
      first_row = p.split_plan[b];
      num_splits = p.split_plan[b + 1] - first_row;
      row_step = 1;
    }
  }
  __device__ __forceinline__ bool merges_nothing(const DecodeParams& p) const {
    return p.split_plan &&
           (num_splits < 2 || num_splits > kMaxSplits || first_row < 0 || first_row > p.plan_items - num_splits);
  }
  /// Where row (i, h)'s states start and step (for a sequence that has some to merge).
  __device__ __forceinline__ void locate(const DecodeParams& p, int i, int h) {
    split_stride = std::int64_t(row_step) * p.heads_q * p.seqlen_q;
    state0 = (std::int64_t(first_row) * p.heads_q + h) * p.seqlen_q + i;
  }
  __device__ __forceinline__ std::int64_t index(int s) const { return state0 + s * split_stride; }
};

/// The merge accumulator of a row's states over one warp: lane l adds states l, l + 32, ..., then
/// the lanes' accumulators are merged by a butterfly, so every lane ends with the same one. A sink
/// is one more state, after the splits', of zero values: it counts in the weights and the LSE only.
/// Both combine kernels reduce through this, so their weights and LSE are the same bits.
__device__ __forceinline__ MergeAccumulator combine_lse_accumulator(const DecodeParams& p, const CombineStates& st,
                                                                    int h, int lane) {
  MergeAccumulator acc;
  acc.init();
  float rescale, weight;
  const int states = st.num_splits + (p.sinks ? 1 : 0);
  for (int s = lane; s < states; s += 32)
    acc.add(s < st.num_splits ? p.partial_lse[st.index(s)] : p.sinks[h * p.sinks_stride], &rescale, &weight);
  for (int offset = 16; offset > 0; offset /= 2) {
    MergeAccumulator other;
    other.m = __shfl_xor_sync(0xffffffffu, acc.m, offset);
    other.sum = __shfl_xor_sync(0xffffffffu, acc.sum, offset);
    acc.merge(other);
  }
  return acc;
}

/// Where a combine kernel stores value c of row (i, h, b) in out, and the row's LSE.
__device__ __forceinline__ std::int64_t combine_out_index(const DecodeParams& p, int i, int h, int b, int c) {
  return b * p.out_batch_stride + std::int64_t(i) * p.out_row_stride + std::int64_t(h) * p.out_head_stride + c;
}
__device__ __forceinline__ std::int64_t combine_lse_index(const DecodeParams& p, int i, int h, int b) {
  return b * p.lse_batch_stride + std::int64_t(h) * p.lse_head_stride + std::int64_t(i) * p.lse_row_stride;
}

template <Dtype kDtype, int kPreload>
__global__ void __launch_bounds__(kCombineWarps * 32) combine_kernel(const DecodeParams p) {
  // Sized for the largest split count, not num_splits: compute-sanitizer saw the compiled
  // column loop read a few floats past a dynamically sized array.
  __shared__ float split_weight[kMaxSplits];
  __shared__ float merged_lse;
  __shared__ float4 warp_sum[kCombineWarps][32];
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  CombineStates st(p, b);
  // Every CTA waits, even one with nothing to merge: this grid completes after the attention
  // kernel (and its writes of out for the one-split sequences), whatever the plan holds.
  pdl_wait_for_previous_kernel();  // the attention kernel's partial states
  if (st.merges_nothing(p)) return;
  const int num_splits = st.num_splits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  st.locate(p, i, h);
  const float* src = p.partial_o + st.state0 * p.head_dim;
  const std::int64_t step = st.split_stride * p.head_dim;
  // The first kPreload of the warp's splits (warp, warp + 4, ...) at the lane's first four columns.
  float4 first[kPreload > 0 ? kPreload : 1];
  if (kPreload > 0 && p.head_dim % 4 == 0 && lane * 4 < p.head_dim) {
#pragma unroll
    for (int k = 0; k < kPreload; ++k) {
      const int s = warp + k * kCombineWarps;
      if (s < num_splits) first[k] = *reinterpret_cast<const float4*>(src + s * step + lane * 4);
    }
  }
  if (warp == 0) {
    const MergeAccumulator acc = combine_lse_accumulator(p, st, h, lane);
    for (int s = lane; s < num_splits; s += 32) split_weight[s] = acc.weight_of(p.partial_lse[st.index(s)]);
    if (lane == 0) merged_lse = acc.lse();
  }
  __syncthreads();
  // No branch on the weight: an empty split stores a zero output, so its weight 0 adds exactly 0.
  const auto store = [&](int c, float o) { Elem<kDtype>::store(p.out, combine_out_index(p, i, h, b, c), o); };
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
            const float w = split_weight[s0];
            o.x += w * v.x, o.y += w * v.y, o.z += w * v.z, o.w += w * v.w;
            s0 += kCombineWarps;
          }
        }
#pragma unroll 8
        for (int s = s0; s < num_splits; s += kCombineWarps) {
          const float4 v = *reinterpret_cast<const float4*>(src + s * step + c);
          const float w = split_weight[s];
          o.x += w * v.x, o.y += w * v.y, o.z += w * v.z, o.w += w * v.w;
        }
      }
      warp_sum[warp][lane] = o;
      __syncthreads();
      if (warp == 0 && c < p.head_dim) {
        float4 t = warp_sum[0][lane];
        for (int w = 1; w < kCombineWarps; ++w) {
          const float4 u = warp_sum[w][lane];
          t.x += u.x, t.y += u.y, t.z += u.z, t.w += u.w;
        }
        store(c, t.x), store(c + 1, t.y), store(c + 2, t.z), store(c + 3, t.w);
      }
      __syncthreads();
    }
  } else {
    for (int c = threadIdx.x; c < p.head_dim; c += blockDim.x) {
      float o = 0.0f;
#pragma unroll 8
      for (int s = 0; s < num_splits; ++s) o += split_weight[s] * src[s * step + c];
      store(c, o);
    }
  }
  if (p.lse && threadIdx.x == 0) p.lse[combine_lse_index(p, i, h, b)] = merged_lse;
}

/// Rows of combine_rows_kernel's CTA, a warp each.
constexpr int kCombineRowsPerCta = 4;
/// Waves of the plain combine kernel (12 CTAs an SM on the H200, by its 40 registers) past which
/// the launch takes combine_rows_kernel instead (use_combine_rows_kernel). On the H200 the warp per
/// row ran 1.6-2.6% slower at 1536 rows (under one wave) and 2.8-3.4% faster at 2048 with 1k keys
/// and two splits; with 8k keys and eight splits 0.2-0.4% slower at 2048, level at 2560-3072 and
/// 0.7-0.8% faster from 3584 (bench/NOTES.md, session 91).
constexpr int kCombineRowsMinWaves = 1;

/// combine_kernel's merge for grids of more rows than it keeps resident at once: CTA x merges rows
/// 4x .. 4x + 3 of the (b, h, i) rows (i fastest), one warp each, with no shared memory or barrier.
/// The lanes reduce the LSEs as combine_kernel's first warp does; lane l keeps split l's weight (the
/// weights of later groups of 32 splits are worked out as the warp reaches them) and broadcasts it;
/// every lane sums its four columns over the splits. The sums keep combine_kernel's order (split s
/// into partial s % 4, its warp's, in increasing s; then partials 0 + 1 + 2 + 3), so both kernels
/// give the same bits and the choice between them, which depends on the batch, keeps a sequence's
/// results independent of it. At batch 128 / 8k with 16 packed rows (16384 rows, two splits) the
/// combine kernel's ten waves of dependent steps left ~29 us after the attention kernel where
/// the bytes need ~7 (bench/NOTES.md, session 91). Needs head_dim % 4 == 0.
template <Dtype kDtype>
__global__ void __launch_bounds__(kCombineRowsPerCta * 32) combine_rows_kernel(const DecodeParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t row = std::int64_t(blockIdx.x) * kCombineRowsPerCta + warp;
  // Every CTA waits (see combine_kernel): this grid completes after the attention kernel.
  pdl_wait_for_previous_kernel();
  if (row >= std::int64_t(p.batch) * p.heads_q * p.seqlen_q) return;
  const int i = int(row % p.seqlen_q), h = int(row / p.seqlen_q % p.heads_q), b = int(row / p.seqlen_q / p.heads_q);
  CombineStates st(p, b);
  if (st.merges_nothing(p)) return;
  const int num_splits = st.num_splits;
  st.locate(p, i, h);
  const float* src = p.partial_o + st.state0 * p.head_dim;
  const std::int64_t step = st.split_stride * p.head_dim;
  const auto split_lse = [&](int s) { return p.partial_lse[st.index(s)]; };
  const MergeAccumulator acc = combine_lse_accumulator(p, st, h, lane);
  const float first_weight = lane < num_splits ? acc.weight_of(split_lse(lane)) : 0.0f;
  for (int c0 = 0; c0 < p.head_dim; c0 += 128) {
    const int c = c0 + lane * 4;
    const bool mine = c < p.head_dim;
    float4 part[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) part[w] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s0 = 0; s0 < num_splits; s0 += 32) {  // s0 % 4 == 0: split s0 + k goes to part k % 4
      const float lane_weight =
          s0 == 0 ? first_weight : (s0 + lane < num_splits ? acc.weight_of(split_lse(s0 + lane)) : 0.0f);
      const int n = min(32, num_splits - s0);
#pragma unroll 2
      for (int k = 0; k < n; k += 4) {
#pragma unroll
        for (int w = 0; w < 4; ++w) {
          if (k + w >= n) break;  // the same for every lane
          const float wt = __shfl_sync(0xffffffffu, lane_weight, k + w);
          if (mine) {
            const float4 v = *reinterpret_cast<const float4*>(src + (s0 + k + w) * step + c);
            part[w].x += wt * v.x, part[w].y += wt * v.y, part[w].z += wt * v.z, part[w].w += wt * v.w;
          }
        }
      }
    }
    if (mine) {
      float4 t = part[0];
#pragma unroll
      for (int w = 1; w < 4; ++w) t.x += part[w].x, t.y += part[w].y, t.z += part[w].z, t.w += part[w].w;
      const std::int64_t o = combine_out_index(p, i, h, b, c);
      Elem<kDtype>::store(p.out, o, t.x), Elem<kDtype>::store(p.out, o + 1, t.y);
      Elem<kDtype>::store(p.out, o + 2, t.z), Elem<kDtype>::store(p.out, o + 3, t.w);
    }
  }
  if (p.lse && lane == 0) p.lse[combine_lse_index(p, i, h, b)] = acc.lse();
}

/// CTAs of combine kernel `kPreload` resident per SM of the current device, asked of the runtime
/// once per device. The preloading kernel's registers allow fewer than the plain kernel's: 7
/// against 12 on the H200 (72 and 40 registers; 16 at the plain kernel's 32 before the sinks,
/// session 83). It runs only where its whole grid is resident at once: at 1024 CTAs (batch 32 x 32
/// heads) it ran 0.05-1.2 us slower than the plain one, at up to 512 CTAs up to 2.2 us faster
/// (bench/NOTES.md, session 49).
template <Dtype kDtype, int kPreload>
int combine_ctas_per_sm() {
  constexpr int kCachedDevices = 64;  // devices past the 64th share the last entry
  static std::atomic<int> per_device[kCachedDevices];  // 0: not asked yet
  int device = 0;
  FASTATTN_CUDA_CHECK(cudaGetDevice(&device));
  device = std::min(device, kCachedDevices - 1);
  int n = per_device[device].load(std::memory_order_relaxed);
  if (n == 0) {
    FASTATTN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, &combine_kernel<kDtype, kPreload>, kCombineWarps * 32, 0));
    per_device[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

/// Whether p's split states of `rows` (b, h, i) rows merge in combine_rows_kernel: where the plain
/// combine kernel's grid, a CTA a row, is more than kCombineRowsMinWaves waves of what the device
/// keeps resident (its waves of dependent steps then outlast its bytes). FASTATTN_DECODE_COMBINE=rows
/// takes it for every split call and =cta never (A/B and tests); both give the same bits.
template <Dtype kDtype>
bool use_combine_rows_kernel(const DecodeParams& p, std::int64_t rows) {
  if (p.head_dim % 4 != 0) return false;
  const char* env = std::getenv("FASTATTN_DECODE_COMBINE");
  if (env && std::strcmp(env, "rows") == 0) return true;
  if (env && std::strcmp(env, "cta") == 0) return false;
  return rows > kCombineRowsMinWaves * std::int64_t(combine_ctas_per_sm<kDtype, 0>()) * p.sm_count;
}

template <Dtype kDtype>
void run_for_dtype(const DecodeParams& p, cudaStream_t stream) {
  const int append_blocks = std::max(p.seqlen_new, p.q_rot ? p.seqlen_q : 0);
  if (append_blocks > 0) {
    append_rotary_kernel<kDtype><<<dim3(append_blocks, p.batch), 128, 0, stream>>>(p);
    FASTATTN_CUDA_CHECK_LAUNCH();
  }
  if (p.seqlen_q == 0 || p.heads_q == 0) return;  // an append without queries
  DecodeParams attn = p;
  attn.after_append = append_blocks > 0;
  if (p.q_rot) {  // attend with the rotated copy (contiguous)
    attn.q = p.q_rot;
    attn.q_head_stride = p.head_dim;
    attn.q_row_stride = std::int64_t(p.heads_q) * p.head_dim;
    attn.q_batch_stride = std::int64_t(p.seqlen_q) * attn.q_row_stride;
  }
  if (p.head_group) {
    launch_decode_sm90_head_group<kDtype>(attn, stream);
  } else if (p.kv_heads_per_cta == kDecodeHeadQuad) {  // head_dim 64 (decode_head_quad_fits)
    launch_decode_sm90<kDecodeHeadQuadHeadDim, kDtype, kDecodeHeadQuad, 1>(attn, stream);
  } else if (p.kv_heads_per_cta == kDecodeHeadPair) {  // head_dim 64 or 128 (decode_head_pair_fits)
    if (p.head_dim == 64) launch_decode_sm90<64, kDtype, kDecodeHeadPair, 1>(attn, stream);
    else launch_decode_sm90<128, kDtype, kDecodeHeadPair, 1>(attn, stream);
  } else if (p.row_blocks_per_cta == kDecodeRowPair) {  // head_dim <= 128 (decode_row_pair_fits)
    if (p.head_dim <= 64) launch_decode_sm90<64, kDtype, 1, kDecodeRowPair>(attn, stream);
    else launch_decode_sm90<128, kDtype, 1, kDecodeRowPair>(attn, stream);
  } else if (p.sm90_kernel) {
    if (p.head_dim <= 64) launch_decode_sm90<64, kDtype, 1, 1>(attn, stream);
    else if (p.head_dim <= 128) launch_decode_sm90<128, kDtype, 1, 1>(attn, stream);
    else launch_decode_sm90<256, kDtype, 1, 1>(attn, stream);
  } else {
    if (p.head_dim <= 64) launch_decode<64, kDtype>(attn, stream);
    else if (p.head_dim <= 128) launch_decode<128, kDtype>(attn, stream);
    else launch_decode<256, kDtype>(attn, stream);
  }
  if (decode_writes_split_states(p) && !p.cluster_combine) {
    const std::int64_t rows = std::int64_t(p.seqlen_q) * p.heads_q * p.batch;
    if (use_combine_rows_kernel<kDtype>(p, rows)) {
      launch_kernel(&combine_rows_kernel<kDtype>, dim3(unsigned((rows + kCombineRowsPerCta - 1) / kCombineRowsPerCta)),
                    dim3(kCombineRowsPerCta * 32), 0, stream, p.dependent_launch, p);
      return;
    }
    const bool preload = rows <= std::int64_t(combine_ctas_per_sm<kDtype, kCombinePreload>()) * p.sm_count;
    const auto kernel = preload ? &combine_kernel<kDtype, kCombinePreload> : &combine_kernel<kDtype, 0>;
    launch_kernel(kernel, dim3(p.seqlen_q, p.heads_q, p.batch), dim3(kCombineWarps * 32), 0, stream,
                  p.dependent_launch, p);
  }
}

/// DecodeParams::quarter_min_slots for p (its num_splits set): FASTATTN_DECODE_QUARTERS when it is a
/// number >= 0, else kDecodeQuarterMinSlots where the rule at that constant takes the shape, else 0.
int decode_quarter_min_slots(const DecodeParams& p) {
  if (!p.sm90_kernel || p.page_size > 0) return 0;
  if (const char* env = std::getenv("FASTATTN_DECODE_QUARTERS"); env && *env) {
    char* rest = nullptr;
    const long v = std::strtol(env, &rest, 10);
    if (*rest == '\0' && v >= 0 && v <= INT32_MAX) return int(v);
  }
  const bool wide_rows = std::int64_t(p.heads_kv) * p.head_dim * 2 >= kDecodeQuarterMinRowBytes;
  const bool wide_box_rows = p.head_dim >= kDecodeQuarterMinHeadDim;  // a head's row in a box: >= 256 bytes
  const bool few_streams = std::int64_t(p.batch) * p.num_splits <= kDecodeQuarterMaxStreams;
  return !p.splits_fixed && wide_rows && wide_box_rows && few_streams ? kDecodeQuarterMinSlots : 0;
}

}  // namespace

bool use_sm90_decode_kernel(int cc_major, int cc_minor, int page_size) {
  const char* forced = std::getenv("FASTATTN_DECODE_KERNEL");
  if (forced && std::strcmp(forced, "sm80") == 0) return false;
  return cc_major == 9 && cc_minor == 0 && decode_tma_box_rows(page_size) > 0;
}

void run_decode(const DecodeParams& params, void* stream_ptr) {
  if (params.batch == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  // The kernels and launch mode the current device takes (device attributes are cached and are
  // not stream operations: fine during graph capture).
  int device = 0;
  FASTATTN_CUDA_CHECK(cudaGetDevice(&device));
  const cuda_detail::DeviceInfo info = cuda_detail::device_info(device);
  DecodeParams p = params;
  // The TMA kernel needs a non-empty cache to describe (an empty one has no keys to read).
  const bool cache_empty = p.cache_rows == 0 || (p.page_size > 0 ? p.num_pages == 0 : p.cache_len == 0);
  p.sm90_kernel = !cache_empty && use_sm90_decode_kernel(info.cc_major, info.cc_minor, p.page_size);
  if (!p.sm90_kernel) p.head_group = 0;
  if (!p.sm90_kernel) p.kv_heads_per_cta = 1;
  if (!p.sm90_kernel) p.row_blocks_per_cta = 1;
  p.dependent_launch = info.cc_major >= 9;  // sm_90: programmatic dependent launch
  p.sm_count = info.sm_count;
  // A few splits merge inside their cluster: no combine kernel (its launch and round trips were
  // ~3.7 us of a 10 us step at batch 1 / 1k: 10.1 -> 9.0 us). For grids of at most half the SMs,
  // and for 2 splits on at most one CTA per SM. Larger clusters on more CTAs do not all fit at
  // once: 128 CTAs in clusters of 4 ran 28-38% slower (MHA batch 1 / 8k-32k, session 12), 256 in
  // clusters of 4 at two per SM 4 us slower at batch 8 / 1k (session 5). Clusters of 2 on at most
  // one CTA per SM were faster on every shape measured (batch 8 / 2k-32k GQA 8, MHA batch 2 /
  // 2k-8k, batch 6 / 8k-32k): by 0.9-4.1 us at head_dim 128 and 1.6-2.5 us at 64 (session 12),
  // by 0.5-6.7 us at 256, whose pairs pass the state through the workspace (session 13;
  // bench/NOTES.md). Session 5 had seen such a grid 0.9 us slower, at batch 8 / 1k with the first
  // cluster merge, which that split count no longer takes. The per-head kernel also takes 3 in
  // clusters of 3 on one CTA per SM (decode_one_per_sm_cluster_splits). Only where every cluster
  // is resident at once (decode_clusters_resident: 40 clusters of 3 at one CTA per SM ran a second
  // wave, and the fallback took 0.62-0.74x their time, session 89). Not for a num_splits the caller fixed
  // (see DecodeParams::splits_fixed). FASTATTN_DECODE_CLUSTER=0 keeps the combine kernel.
  const std::int64_t ctas = p.num_splits * head_block_ctas(p, p.kv_heads_per_cta) *
                            decode_row_block_ctas(p.group, p.seqlen_q, p.row_blocks_per_cta);
  p.cluster_combine = !p.splits_fixed && !p.head_group &&
                      decode_cluster_merge_applies(p.sm90_kernel, p.num_splits, ctas, info.sm_count,
                                                   decode_one_per_sm_cluster_splits(p)) &&
                      decode_clusters_resident(p, device, p.num_splits, ctas);
  p.quarter_min_slots = decode_quarter_min_slots(p);
  if (p.dtype == Dtype::kFloat16) run_for_dtype<Dtype::kFloat16>(p, stream);
  else run_for_dtype<Dtype::kBFloat16>(p, stream);
}

}  // namespace fastattn::cuda_decode
