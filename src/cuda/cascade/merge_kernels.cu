// CUDA kernels of the merge ops (FlashInfer's merge_state / merge_state_in_place / merge_states)
// built on the shared merge primitive MergeAccumulator (common/softmax_state.h), the one the
// split-KV decode combine uses.
//
// Both kernels are memory-bound streams: no shared memory, one thread per 16-byte chunk of one
// (row, head) (8 fp16 / bf16 or 4 fp32 values), so a warp reads and writes whole 512-byte runs
// with 16-byte vector instructions. The lanes of one (row, head) are `group` consecutive lanes of
// a warp (MergeLayout); each reads the row's LSEs itself (the same address across the group: one
// broadcast transaction) and computes the merge weights redundantly, which costs a few
// instructions and no extra traffic. A grid-stride loop covers rows * heads * group threads with
// 64-bit indices.
//
// Exactness: an empty state (LSE -inf) gets weight 0 and its values are never used (a select,
// not a multiply, so garbage or NaN behind an empty state cannot leak out); merging with an empty
// state gives weight exactly 1 to the other side (exp(0) / 1), so its values and LSE come back
// unchanged (value for value; a -0.0 may come back as +0.0, as on the CPU). Both sides empty:
// output 0 and LSE -inf, as the CPU backend.
//
// Aliasing: outputs may alias inputs element for element. Values are read and written by the
// same thread. An output LSE is written by the group's first lane after a __syncwarp, so every
// lane of the group (all in one warp) has read the input LSEs it may overwrite.
//
// Instantiations: one kernel per op and value dtype (float32, float16, bfloat16): 6 in all. The
// vector / scalar choice and the head_dim are runtime parameters (a uniform branch).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <cstring>

#include "common/softmax_state.h"
#include "cuda/cascade/merge_params.h"
#include "cuda/common/cuda_check.h"

namespace fastattn::cuda_cascade {
namespace {

/// A 16-byte chunk of values of type T: kN values, moved as one uint4 when vectorised.
/// Loads return the raw bits so that a thread can issue all of its loads before it converts any
/// (the conversion waits for the data; a load issued after it would cost another round trip).
template <class T>
struct Chunk;

template <>
struct Chunk<float> {
  static constexpr int kN = 4;
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
  static __device__ __forceinline__ void unpack(const uint4& r, float (&x)[kN]) {
    x[0] = __uint_as_float(r.x), x[1] = __uint_as_float(r.y);
    x[2] = __uint_as_float(r.z), x[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const float (&x)[kN]) {
    return make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]),
                      __float_as_uint(x[3]));
  }
};

/// 16-bit types: the uint4 holds 4 packed pairs (T2), converted pairwise with round to nearest
/// even on the way out (as the CPU backend's store_row).
template <class T, class T2>
struct Chunk16 {
  static constexpr int kN = 8;
  static __device__ __forceinline__ float2 pair_to_float2(T2 v);
  static __device__ __forceinline__ T2 float2_to_pair(float a, float b);
  static __device__ __forceinline__ float2 word_to_float2(unsigned w) {
    T2 pair;
    static_assert(sizeof(T2) == 4, "packed pair");
    memcpy(&pair, &w, 4);
    return pair_to_float2(pair);
  }
  static __device__ __forceinline__ unsigned float2_to_word(float a, float b) {
    const T2 pair = float2_to_pair(a, b);
    unsigned w;
    memcpy(&w, &pair, 4);
    return w;
  }
  static __device__ __forceinline__ void unpack(const uint4& r, float (&x)[kN]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = word_to_float2(w[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  static __device__ __forceinline__ uint4 pack(const float (&x)[kN]) {
    return make_uint4(float2_to_word(x[0], x[1]), float2_to_word(x[2], x[3]),
                      float2_to_word(x[4], x[5]), float2_to_word(x[6], x[7]));
  }
};

template <>
struct Chunk<__half> : Chunk16<__half, __half2> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <>
__device__ __forceinline__ float2 Chunk16<__half, __half2>::pair_to_float2(__half2 v) {
  return __half22float2(v);
}
template <>
__device__ __forceinline__ __half2 Chunk16<__half, __half2>::float2_to_pair(float a, float b) {
  return __floats2half2_rn(a, b);
}

template <>
struct Chunk<__nv_bfloat16> : Chunk16<__nv_bfloat16, __nv_bfloat162> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
__device__ __forceinline__ float2 Chunk16<__nv_bfloat16, __nv_bfloat162>::pair_to_float2(__nv_bfloat162 v) {
  return __bfloat1622float2(v);
}
template <>
__device__ __forceinline__ __nv_bfloat162 Chunk16<__nv_bfloat16, __nv_bfloat162>::float2_to_pair(float a,
                                                                                              float b) {
  return __floats2bfloat162_rn(a, b);
}

/// One 16-byte load of a whole, aligned chunk starting at element c0 of a row (raw bits); a lane
/// without a chunk (`has` false) loads nothing (a predicated load: no branch, so the loads of a
/// thread still go out together) and gets zeros. The load asks L2 to fetch the whole 256-byte
/// block around it: a lane group reads 64 bytes of a 128-byte line per instruction (the next
/// instruction reads the rest), so without the hint a line is requested from DRAM in halves
/// (merge_state fp16 S4096: 30.4 -> 29.9 us, bench/NOTES.md). An L2 evict-first policy on these
/// loads was ~18% slower: the second half of a line was evicted before it was read.
template <class T>
__device__ __forceinline__ uint4 load_vec(const T* row, int c0, bool has) {
  uint4 r = make_uint4(0, 0, 0, 0);
  if (has)
    asm("ld.global.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(row + c0));
  return r;
}
/// The scalar fallback's load: the chunk's values one by one, those past the row's end (n
/// values) read as 0.
template <class T>
__device__ __forceinline__ void load_scalar(const T* row, int c0, int n, float (&x)[Chunk<T>::kN]) {
#pragma unroll
  for (int i = 0; i < Chunk<T>::kN; ++i) x[i] = c0 + i < n ? Chunk<T>::to_float(row[c0 + i]) : 0.0f;
}

template <class T, bool kVec>
__device__ __forceinline__ void store_chunk(T* row, int c0, int n, const float (&x)[Chunk<T>::kN]) {
  if constexpr (kVec) {
    *reinterpret_cast<uint4*>(row + c0) = Chunk<T>::pack(x);
  } else {
#pragma unroll
    for (int i = 0; i < Chunk<T>::kN; ++i)
      if (c0 + i < n) row[c0 + i] = Chunk<T>::from_float(x[i]);
  }
}

/// The (row, head) of thread index t (< rows * heads * group) and its lane in the group.
struct Slot {
  std::int64_t row;
  int head;
  int lane;  ///< lane within the (row, head)'s group
};
__device__ __forceinline__ Slot slot_of(const MergeLayout& L, std::int64_t t) {
  Slot s;
  s.lane = static_cast<int>(t & (L.group - 1));
  const std::int64_t rh = t >> L.group_shift;
  if (rh <= UINT_MAX) {  // 32-bit division where it fits (always, in practice)
    const unsigned r = static_cast<unsigned>(rh) / static_cast<unsigned>(L.heads);
    s.row = r;
    s.head = static_cast<int>(static_cast<unsigned>(rh) - r * static_cast<unsigned>(L.heads));
  } else {
    s.row = rh / L.heads;
    s.head = static_cast<int>(rh - s.row * L.heads);
  }
  return s;
}

/// Grid-stride loop bounds over rows * heads * group threads. The loop runs while the first
/// thread of the warp is in range, so whole warps run each iteration (the __syncwarp in the
/// kernels needs all 32 lanes); lanes past the end run it inactive.
struct ThreadRange {
  std::int64_t total, step, first;
  int warp_lane;
  __device__ __forceinline__ explicit ThreadRange(const MergeLayout& L)
      : total(L.rows * L.heads * std::int64_t(L.group)),
        step(std::int64_t(gridDim.x) * blockDim.x),
        first(std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x),
        warp_lane(static_cast<int>(threadIdx.x & 31)) {}
  __device__ __forceinline__ bool warp_in_range(std::int64_t t) const { return t - warp_lane < total; }
};

/// The two-way merge of one (row, head) through MergeAccumulator: weights exp(lse - max) / sum,
/// exactly 1 for the non-empty side of a merge with an empty state and 0 for an empty side, whose
/// values are then not used at all (a select, not a multiply: no NaN from behind an empty state).
struct TwoWay {
  float w_a, w_b, lse;
  __device__ __forceinline__ TwoWay(float lse_a, float lse_b) {
    MergeAccumulator acc;
    acc.init();
    float rescale, weight;
    acc.add(lse_a, &rescale, &weight);
    acc.add(lse_b, &rescale, &weight);
    w_a = acc.weight_of(lse_a);
    w_b = acc.weight_of(lse_b);
    lse = acc.lse();
  }
  __device__ __forceinline__ float operator()(float a, float b) const {
    return (w_a != 0.0f ? w_a * a : 0.0f) + (w_b != 0.0f ? w_b * b : 0.0f);
  }
};

/// Chunks a lane moves per batch on the vector path (the host sizes `group` so that a lane has up
/// to this many): 2 x 4 x 16 bytes in flight per thread for merge_state. With one chunk per lane,
/// 1536 threads per SM kept ~48 KB in flight, short of what HBM latency needs: 52-74% of the copy
/// bandwidth (bench/NOTES.md).
constexpr int kLaneChunks = 4;

/// merge_state over every (row, head): all loads of a chunk (mask byte, both LSEs, both value
/// chunks) are issued before any is used, so a thread waits for one round trip per chunk. Lanes
/// past the end and lanes without a chunk load nothing. Rows left out by the mask are loaded too
/// (the mask byte arrives with the rest) but nothing of them is written.
template <class T, bool kVec>
__device__ __forceinline__ void merge_state_rows(const MergeStateParams& p) {
  constexpr int kN = Chunk<T>::kN;
  const MergeLayout& L = p.layout;
  const ThreadRange range(L);
  for (std::int64_t t = range.first; range.warp_in_range(t); t += range.step) {
    const bool active = t < range.total;
    Slot sl{0, 0, 0};
    bool selected = false;
    float lse = -INFINITY;
    if (active) {
      sl = slot_of(L, t);
      const float* sa = p.s_a + (sl.row * p.s_a_row + sl.head * p.s_a_head);
      const float* sb = p.s_b + (sl.row * p.s_b_row + sl.head * p.s_b_head);
      const T* a = static_cast<const T*>(p.v_a) + (sl.row * p.v_a_row + sl.head * p.v_a_head);
      const T* b = static_cast<const T*>(p.v_b) + (sl.row * p.v_b_row + sl.head * p.v_b_head);
      T* o = static_cast<T*>(p.v_out) + (sl.row * p.v_out_row + sl.head * p.v_out_head);
      selected = !p.mask || p.mask[sl.row * p.mask_stride] != 0;
      if (L.iters == 0) lse = TwoWay(*sa, *sb).lse;  // head_dim 0: only the LSE
      if constexpr (kVec) {
        // Up to kLaneChunks chunks per lane: all their 16-byte loads go out with the LSE loads,
        // so a thread keeps 2 x kLaneChunks x 16 bytes in flight; converted once the weights are
        // known.
        for (int j0 = 0; j0 < L.iters; j0 += kLaneChunks) {
          uint4 raw_a[kLaneChunks], raw_b[kLaneChunks];
#pragma unroll
          for (int u = 0; u < kLaneChunks; ++u) {
            const int c = sl.lane + (j0 + u) * L.group;
            const bool has = j0 + u < L.iters && c < L.chunks;
            raw_a[u] = load_vec(a, has ? c * kN : 0, has);
            raw_b[u] = load_vec(b, has ? c * kN : 0, has && p.v_b != nullptr);  // null: zeros
          }
          const TwoWay w(*sa, *sb);
          lse = w.lse;
#pragma unroll
          for (int u = 0; u < kLaneChunks; ++u) {
            const int c = sl.lane + (j0 + u) * L.group;
            const bool has = j0 + u < L.iters && c < L.chunks;
            float x[kN], y[kN];
            Chunk<T>::unpack(raw_a[u], x);
            Chunk<T>::unpack(raw_b[u], y);
#pragma unroll
            for (int i = 0; i < kN; ++i) x[i] = w(x[i], y[i]);
            if (has && selected) store_chunk<T, kVec>(o, c * kN, L.head_dim, x);
          }
        }
      } else {
        // The scalar fallback: each chunk's values one by one, in two halves whose loads all go
        // out before the half is stored (an in-place store could alias a later load, so the
        // compiler would not batch them itself).
        for (int j = 0; j < L.iters; ++j) {
          const int c = sl.lane + j * L.group;
          const bool has = c < L.chunks;
          const int c0 = has ? c * kN : 0;
          const int end = has ? L.head_dim : 0;
          const TwoWay w(*sa, *sb);
          lse = w.lse;
          constexpr int kHalf = kN / 2;
#pragma unroll 1
          for (int h0 = c0; h0 < c0 + kN; h0 += kHalf) {
            float x[kHalf], y[kHalf];
#pragma unroll
            for (int i = 0; i < kHalf; ++i) {
              x[i] = h0 + i < end ? Chunk<T>::to_float(a[h0 + i]) : 0.0f;
              y[i] = h0 + i < end && p.v_b ? Chunk<T>::to_float(b[h0 + i]) : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < kHalf; ++i)
              if (h0 + i < end && selected) o[h0 + i] = Chunk<T>::from_float(w(x[i], y[i]));
          }
        }
      }
    }
    __syncwarp();  // the group's LSE reads happen before its write (s_out may alias s_a / s_b)
    if (active && selected && sl.lane == 0) p.s_out[sl.row * p.s_out_row + sl.head * p.s_out_head] = lse;
  }
}

/// States loaded per batch in merge_states (vector path): the loads of kStatesAhead states x
/// kLaneChunks chunks are issued together before the first of them is merged.
constexpr int kStatesAhead = 2;
/// The deep layout (MergeLayout::deep: a grid under one wave, one chunk per lane): 8 states a
/// batch, so a (row, head) of N states waits ceil(N / 8) round trips instead of ceil(N / 2).
constexpr int kDeepStatesAhead = 8;

/// merge_states over every (row, head): the CPU backend's running form
///   acc.add(lse_k) -> (rescale, weight);  out = out * rescale + weight * v_k  (weight != 0)
/// then out * acc.inv_sum(). States are loaded kStatesAhead at a time (predicated loads, so
/// they go out together; the ones past N load nothing and are not merged).
template <class T, bool kVec, int kAhead, int kChunks>
__device__ __forceinline__ void merge_states_rows(const MergeStatesParams& p) {
  constexpr int kN = Chunk<T>::kN;
  const MergeLayout& L = p.layout;
  const ThreadRange range(L);
  const int n = p.num_states;
  for (std::int64_t t = range.first; range.warp_in_range(t); t += range.step) {
    const bool active = t < range.total;
    Slot sl{0, 0, 0};
    MergeAccumulator acc;
    acc.init();
    if (active) {
      sl = slot_of(L, t);
      const float* s = p.s + (sl.row * p.s_row + sl.head * p.s_head);
      const T* v = static_cast<const T*>(p.v) + (sl.row * p.v_row + sl.head * p.v_head);
      T* o = static_cast<T*>(p.v_out) + (sl.row * p.v_out_row + sl.head * p.v_out_head);
      float rescale, weight;
      if (L.iters == 0)  // head_dim 0: only the LSE
        for (int k = 0; k < n; ++k) acc.add(s[k * p.s_state], &rescale, &weight);
      if constexpr (kVec) {
        // Up to kChunks chunks per lane merged together, kAhead states at a time: the
        // loads of a batch (kAhead x kChunks x 16 bytes) go out together.
        for (int j0 = 0; j0 < L.iters; j0 += kChunks) {
          acc.init();
          float out[kChunks][kN];
#pragma unroll
          for (int u = 0; u < kChunks; ++u)
#pragma unroll
            for (int i = 0; i < kN; ++i) out[u][i] = 0.0f;
          for (int k0 = 0; k0 < n; k0 += kAhead) {
            uint4 raw[kAhead][kChunks];
            float lse[kAhead];
#pragma unroll
            for (int st = 0; st < kAhead; ++st) {
              const int k = k0 + st;
              lse[st] = k < n ? s[k * p.s_state] : -INFINITY;
#pragma unroll
              for (int u = 0; u < kChunks; ++u) {
                const int c = sl.lane + (j0 + u) * L.group;
                const bool has = k < n && j0 + u < L.iters && c < L.chunks;
                raw[st][u] = load_vec(v + std::int64_t(k) * p.v_state, has ? c * kN : 0, has);
              }
            }
#pragma unroll
            for (int st = 0; st < kAhead; ++st) {
              if (k0 + st >= n) break;
              acc.add(lse[st], &rescale, &weight);
#pragma unroll
              for (int u = 0; u < kChunks; ++u) {
                float x[kN];
                Chunk<T>::unpack(raw[st][u], x);
#pragma unroll
                for (int i = 0; i < kN; ++i)
                  out[u][i] = weight != 0.0f ? out[u][i] * rescale + weight * x[i] : out[u][i];
              }
            }
          }
          const float inv = acc.inv_sum();
#pragma unroll
          for (int u = 0; u < kChunks; ++u) {
            const int c = sl.lane + (j0 + u) * L.group;
#pragma unroll
            for (int i = 0; i < kN; ++i) out[u][i] *= inv;
            if (j0 + u < L.iters && c < L.chunks) store_chunk<T, kVec>(o, c * kN, L.head_dim, out[u]);
          }
        }
      } else {  // the scalar fallback: one chunk and one state at a time
        for (int j = 0; j < L.iters; ++j) {
          const int c = sl.lane + j * L.group;
          const bool has = c < L.chunks;
          const int c0 = has ? c * kN : 0;
          acc.init();
          float out[kN];
#pragma unroll
          for (int i = 0; i < kN; ++i) out[i] = 0.0f;
          for (int k = 0; k < n; ++k) {
            float x[kN];
            load_scalar(v + k * p.v_state, c0, has ? L.head_dim : 0, x);
            acc.add(s[k * p.s_state], &rescale, &weight);
#pragma unroll
            for (int i = 0; i < kN; ++i) out[i] = weight != 0.0f ? out[i] * rescale + weight * x[i] : out[i];
          }
          const float inv = acc.inv_sum();
#pragma unroll
          for (int i = 0; i < kN; ++i) out[i] *= inv;
          if (has) store_chunk<T, kVec>(o, c0, L.head_dim, out);
        }
      }
    }
    __syncwarp();  // the group's LSE reads happen before its write (s_out may alias s)
    if (active && sl.lane == 0) p.s_out[sl.row * p.s_out_row + sl.head * p.s_out_head] = acc.lse();
  }
}

// Occupancy: a thread keeps up to 2 x kChunks x 16 bytes in flight (merge_state) or
// kAhead x kChunks x 16 (merge_states). merge_state: 8 CTAs of 128 threads per SM
// (128 KB in flight, 64 registers; -Xptxas -v: 16 bytes spilled at fp32). Each thread makes one
// pass at ~100 MB (S4096), so the grid's last, partly filled wave is a tail: CTAs of 128 threads
// make it half as coarse as 256 (28.0 -> 27.4 us kernel; 512 and 1024 were slower).
// merge_states: 4 CTAs (64 KB, up to 128 registers, no spill; at 3 CTAs of 256 it spilled 76
// bytes in the merge loop at fp16 / bf16 and ran at 60-78% of the copy bandwidth).
template <class T>
__global__ void __launch_bounds__(kMergeThreads, 8) merge_state_kernel(const MergeStateParams p) {
  if (p.layout.vec) merge_state_rows<T, true>(p);
  else merge_state_rows<T, false>(p);
}

template <class T>
__global__ void __launch_bounds__(kMergeThreads, 4) merge_states_kernel(const MergeStatesParams p) {
  if (p.layout.vec && p.layout.deep) merge_states_rows<T, true, kDeepStatesAhead, 1>(p);
  else if (p.layout.vec) merge_states_rows<T, true, kStatesAhead, kLaneChunks>(p);
  else merge_states_rows<T, false, kStatesAhead, kLaneChunks>(p);
}

/// Blocks for `threads` threads, capped (the kernels loop past the grid).
unsigned grid_for(std::int64_t threads) {
  const std::int64_t blocks = (threads + kMergeThreads - 1) / kMergeThreads;
  constexpr std::int64_t kMaxBlocks = INT_MAX;  // gridDim.x limit
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

std::int64_t threads_of(const MergeLayout& L) { return L.rows * L.heads * std::int64_t(L.group); }

template <class T>
void launch_state(const MergeStateParams& p, cudaStream_t stream) {
  merge_state_kernel<T><<<grid_for(threads_of(p.layout)), kMergeThreads, 0, stream>>>(p);
  FASTATTN_CUDA_CHECK_LAUNCH();
}
template <class T>
void launch_states(const MergeStatesParams& p, cudaStream_t stream) {
  merge_states_kernel<T><<<grid_for(threads_of(p.layout)), kMergeThreads, 0, stream>>>(p);
  FASTATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace

void run_merge_state(const MergeStateParams& p, void* stream_ptr) {
  if (threads_of(p.layout) == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (p.dtype) {
    case DType::kFloat32: return launch_state<float>(p, stream);
    case DType::kFloat16: return launch_state<__half>(p, stream);
    default: return launch_state<__nv_bfloat16>(p, stream);
  }
}

void run_merge_states(const MergeStatesParams& p, void* stream_ptr) {
  if (threads_of(p.layout) == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  switch (p.dtype) {
    case DType::kFloat32: return launch_states<float>(p, stream);
    case DType::kFloat16: return launch_states<__half>(p, stream);
    default: return launch_states<__nv_bfloat16>(p, stream);
  }
}

}  // namespace fastattn::cuda_cascade
