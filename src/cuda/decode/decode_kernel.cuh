// The decode attention kernel (sm_80 and newer): a few query rows per sequence against a long
// KV cache, split over CTAs (flash decoding), on mma.sync tensor cores.
//
// One CTA = (split, kv head x 16-row block, sequence). Its 16 rows are the query heads that share
// the kv head times the query positions (GQA packing: row pm -> head kvh * group + pm / Sq, query
// row pm % Sq), so every key and value byte of the split is read once for all of them. The split
// walks its key tiles (kBlockN = 64 keys) through a cp.async ring of kStages stages; each of the
// 4 warps takes 16 keys of every tile and keeps its own online-softmax state, so warps never wait
// on each other inside a tile. At the end the warps' states are merged through shared memory and
// written either as the final output (one split) or as a normalised partial state + LSE for the
// combine kernel (decode_kernels.cu).
//
// Keys live in slot space: the cache row's slots [pad, end) (key position = slot - pad); query
// row i sits at slot end - Sq + i (bottom-right alignment), which is what causal / window / ALiBi
// are measured against.
#pragma once

#include <cuda_runtime_api.h>

#include "cuda/common/cuda_check.h"
#include "cuda/decode/decode_common.cuh"
#include "cuda/decode/decode_launch.h"
#include "cuda/prefill/prefill_kernel.cuh"

namespace fastattn::cuda_decode {

using cuda_prefill::CopyMap;
using cuda_prefill::ElementTraits;
using cuda_prefill::KvRows;
using cuda_prefill::PagedRunCopy;

/// Tile shapes and the shared-memory rows of K / V / Q (the copy helpers of the prefill kernels
/// read kThreads, kChunks, kSwizzle, kSmemStride, smem_offset and kBlockN from here).
template <int kHeadDim_>
struct DecodeConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kThreads = 128;
  static constexpr int kWarps = 4;
  static constexpr int kRows = 16;  // packed query rows per CTA: one m16 MMA tile
  static constexpr int kBlockN = kDecodeBlockN;
  static constexpr int kWarpKeys = kBlockN / kWarps;  // 16: one k16 step of P V per warp
  static constexpr int kChunks = kHeadDim / 8;
  // XOR-swizzled rows where a thread's copy rows keep one swizzle phase (row step a multiple of
  // 8: head_dim <= 128 at 128 threads), 16-byte padded rows at 256.
  static constexpr bool kSwizzle = kHeadDim <= 128;
  static constexpr int kSmemStride = kSwizzle ? kHeadDim : kHeadDim + 8;
  static __device__ __forceinline__ int smem_offset(int row, int chunk) {
    const int phys = kSwizzle ? (chunk & ~7) | ((chunk ^ row) & 7) : chunk;
    return row * kSmemStride + phys * 8;
  }
  // Enough bytes in flight per SM to cover HBM latency with two CTAs per SM.
  static constexpr int kStages = kHeadDim <= 64 ? 4 : kHeadDim <= 128 ? 3 : 2;
  static constexpr int kTileElems = kBlockN * kSmemStride;  // one K (or V) stage
  static constexpr int kPipeBytes = 2 * kStages * kTileElems * 2;
  static constexpr int kMergeBytes = kWarps * kRows * (kHeadDim + 2) * 4;  // per-warp O, m, l
  static constexpr int kSmemBytes =
      kRows * kSmemStride * 2 + (kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes);
  static_assert(kHeadDim % 64 == 0, "decode head dims: 64, 128, 256");
};

/// Page ids staged per key tile: a 64-key tile spans at most 64 / run + 1 pages (runs of at
/// least 4 rows, so <= 17).
constexpr int kPageIdsPerTile = 32;

template <int kHeadDim, Dtype kDtype>
__global__ void __launch_bounds__(128, 2) decode_kernel(const __grid_constant__ DecodeParams p) {
  using Cfg = DecodeConfig<kHeadDim>;
  using Traits = ElementTraits<kDtype>;
  constexpr int BN = Cfg::kBlockN, DT = kHeadDim / 8, S = Cfg::kStages;
  constexpr float kLog2e = 1.4426950408889634f;

  const int split = blockIdx.x, b = blockIdx.z;
  const int rows_total = p.group * p.seqlen_q;
  const int m_blocks = (rows_total + Cfg::kRows - 1) / Cfg::kRows;
  const int kvh = blockIdx.y / m_blocks, mb = blockIdx.y % m_blocks;
  const DecodeSeq seq = resolve_decode_seq(p, b);
  const int pad = seq.pad, end = seq.end;

  // Slots any row of the sequence may see, then this split's share of the key tiles.
  int lo = pad, hi = end;
  if (p.window_left >= 0) lo = max(lo, end - p.seqlen_q - p.window_left);
  if (p.window_right >= 0) hi = min(hi, end - 1 + p.window_right + 1);
  const int t_first = lo / BN;
  const int total_tiles = hi > lo ? (hi + BN - 1) / BN - t_first : 0;
  const int per_split = (total_tiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = t_first + split * per_split;
  const int t_end = min(t_first + total_tiles, t_begin + per_split);
  // Everything above read only the caller's index tensors; the cache and the rotated q may come
  // from the append kernel just before (dependent launch): wait for it, then let the combine
  // kernel start launching.
  pdl_wait_for_previous_kernel();
  pdl_let_next_kernel_launch();

  extern __shared__ __align__(16) std::uint16_t smem[];
  std::uint16_t* sQ = smem;
  std::uint16_t* sK0 = sQ + Cfg::kRows * Cfg::kSmemStride;
  std::uint16_t* sV0 = sK0 + S * Cfg::kTileElems;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  // ---- Q: the CTA's 16 packed rows (zeros for rows past the group, chunks past head_dim) ----
  {
    const auto* gq = static_cast<const std::uint16_t*>(p.q);
    for (int idx = threadIdx.x; idx < Cfg::kRows * Cfg::kChunks; idx += Cfg::kThreads) {
      const int r = idx / Cfg::kChunks, ch = idx % Cfg::kChunks;
      const int pm = mb * Cfg::kRows + r;
      const bool ok = pm < rows_total && ch * 8 < p.head_dim;
      const std::int64_t off = ok ? b * p.q_batch_stride + std::int64_t(pm % p.seqlen_q) * p.q_row_stride +
                                        std::int64_t(kvh * p.group + pm / p.seqlen_q) * p.q_head_stride + ch * 8
                                  : 0;
      cuda_prefill::cp_async_16(sQ + Cfg::smem_offset(r, ch), gq + off, ok);
    }
  }

  // ---- key / value rows of this sequence and kv head (slot space) ----------------------------
  KvRows krows, vrows;
  krows.len = vrows.len = end;
  krows.pages = vrows.pages = seq.pages;
  krows.ptr = static_cast<const std::uint16_t*>(p.k_cache) + kvh * p.k_head_stride +
              (p.page_size == 0 ? std::int64_t(seq.row) * p.k_batch_stride : 0);
  vrows.ptr = static_cast<const std::uint16_t*>(p.v_cache) + kvh * p.v_head_stride +
              (p.page_size == 0 ? std::int64_t(seq.row) * p.v_batch_stride : 0);
  const CopyMap<Cfg> cmap(p.head_dim);
  // Paged caches whose pages hold whole per-thread runs (page_size a multiple of 4 / 8 / 16 rows
  // at head_dim 64 / 128 / 256): one page id per thread per tile. The ids of tile t's pages ride
  // in the cp.async group of tile t - (S - 1) into a shared ring (slot (t - t_begin) % S), so they
  // have landed, behind that group's wait and barrier, when tile t's copies are issued. A plain
  // load of the id queued behind the tile traffic instead, and the refill waited on it (ncu:
  // long-scoreboard stalls, paged 10% behind contiguous).
  const PagedRunCopy<Cfg> runs(p.head_dim);
  const bool paged_runs = PagedRunCopy<Cfg>::applies(p);
  __shared__ int page_ring[S][kPageIdsPerTile];
  const int page_count = p.page_size > 0 ? seq.capacity / p.page_size : 0;
  auto first_page = [&](int tile) {
    return p.page_shift >= 0 ? (tile * BN) >> p.page_shift : tile * BN / p.page_size;
  };
  auto stage_page_ids = [&](int tile) {  // into the current cp.async group
    if (tile >= t_end || threadIdx.x >= kPageIdsPerTile) return;
    const int pi = first_page(tile) + threadIdx.x;
    const bool ok = pi < page_count;  // past the row's pages: zero, only for masked rows
    cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<std::uint32_t>::copy(
        *reinterpret_cast<const std::uint32_t*>(ok ? seq.pages + pi : seq.pages),
        *reinterpret_cast<std::uint32_t*>(&page_ring[(tile - t_begin) % S][threadIdx.x]), ok);
  };
  auto page_of_run = [&](int tile, bool staged) {  // this thread's run's page id in `tile`
    const int j = tile * BN + runs.run_row0;
    if (!staged) return runs.fetch_page(p, krows, tile * BN);  // the prologue's first tiles
    const int pi = p.page_shift >= 0 ? j >> p.page_shift : j / p.page_size;
    return j < krows.len ? page_ring[(tile - t_begin) % S][pi - first_page(tile)] : -1;
  };
  auto load_tile = [&](int tile) {  // one cp.async group per call, empty past the split
    if (tile < t_end) {
      const int stage = (tile - t_begin) % S, n0 = tile * BN;
      std::uint16_t* sK = sK0 + stage * Cfg::kTileElems;
      std::uint16_t* sV = sV0 + stage * Cfg::kTileElems;
      if (paged_runs) {
        const int page = page_of_run(tile, tile >= t_begin + S - 1);
        runs.load(sK, p, krows, n0, page, p.k_row_stride, p.k_batch_stride);
        runs.load(sV, p, vrows, n0, page, p.v_row_stride, p.v_batch_stride);
        stage_page_ids(tile + S - 1);
      } else if (p.page_size == 0) {
        // Contiguous rows in the same per-thread run order as pages (measured as fast as the
        // strided order of load_kv_tile; one copy order for both caches).
        runs.load_dense(sK, krows, n0, p.k_row_stride);
        runs.load_dense(sV, vrows, n0, p.v_row_stride);
      } else {  // pages that split a run (page_size not a multiple of it): row by row
        cuda_prefill::load_kv_tile<Cfg>(sK, p, krows, n0, p.k_row_stride, p.k_batch_stride, cmap);
        cuda_prefill::load_kv_tile<Cfg>(sV, p, vrows, n0, p.v_row_stride, p.v_batch_stride, cmap);
      }
    }
    cute::cp_async_fence();
  };
  for (int i = 0; i < S - 1; ++i) load_tile(t_begin + i);  // group 0 also carries Q

  // Per-thread query rows g and g + 8 of the block: head, slot of the query, ALiBi slope.
  int q_slot[2], row_ok[2];
  float slope[2];
  for (int hr = 0; hr < 2; ++hr) {
    const int pm = mb * Cfg::kRows + g + hr * 8;
    row_ok[hr] = pm < rows_total;
    const int i = row_ok[hr] ? pm % p.seqlen_q : 0;
    const int h = kvh * p.group + (row_ok[hr] ? pm / p.seqlen_q : 0);
    q_slot[hr] = end - p.seqlen_q + i;
    slope[hr] = p.alibi ? p.alibi[b * p.alibi_batch_stride + h] : 0.0f;
  }

  float acc_o[DT][4];
  for (int dt = 0; dt < DT; ++dt)
    for (int e = 0; e < 4; ++e) acc_o[dt][e] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};

  for (int tile = t_begin; tile < t_end; ++tile) {
    cute::cp_async_wait<S - 2>();  // this tile's group (and Q) landed
    __syncthreads();               // ... for every thread; the previous stage is free
    load_tile(tile + S - 1);
    const int stage = (tile - t_begin) % S;
    const std::uint16_t* sK = sK0 + stage * Cfg::kTileElems;
    const std::uint16_t* sV = sV0 + stage * Cfg::kTileElems;
    const int key0 = warp * Cfg::kWarpKeys;  // this warp's 16 keys of the tile

    // S = Q K^T for the warp's keys (two n8 tiles).
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      std::uint32_t a[4], bk[4];
      cute::SM75_U32x4_LDSM_N::copy(
          *reinterpret_cast<const cute::uint128_t*>(sQ + Cfg::smem_offset((lane % 8) + ((lane / 8) % 2) * 8, ks * 2 + lane / 16)),
          a[0], a[1], a[2], a[3]);
      cute::SM75_U32x4_LDSM_N::copy(
          *reinterpret_cast<const cute::uint128_t*>(sK + Cfg::smem_offset(key0 + (lane % 8) + ((lane / 8) / 2) * 8, ks * 2 + (lane / 8) % 2)),
          bk[0], bk[1], bk[2], bk[3]);
      Traits::Mma::fma(s[0][0], s[0][1], s[0][2], s[0][3], a[0], a[1], a[2], a[3], bk[0], bk[1],
                       s[0][0], s[0][1], s[0][2], s[0][3]);
      Traits::Mma::fma(s[1][0], s[1][1], s[1][2], s[1][3], a[0], a[1], a[2], a[3], bk[2], bk[3],
                       s[1][0], s[1][1], s[1][2], s[1][3]);
    }

    // Mask, softcap, ALiBi, online softmax (log2 domain); every score takes the general path
    // (decode is bound by the cache bytes, not by these few instructions).
    const int slot_base = tile * BN + key0 + 2 * t;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int slot = slot_base + nt * 8 + e;
          float x = s[nt][hr * 2 + e] * p.scale;
          if (p.softcap > 0.0f) x = p.softcap * tanhf(x / p.softcap);
          x -= slope[hr] * fabsf(float(q_slot[hr] - slot));
          const bool visible = row_ok[hr] && slot >= pad && slot < end &&
                               (p.window_left < 0 || slot >= q_slot[hr] - p.window_left) &&
                               (p.window_right < 0 || slot <= q_slot[hr] + p.window_right);
          x = visible ? x * kLog2e : -INFINITY;
          s[nt][hr * 2 + e] = x;
          tile_max = fmaxf(tile_max, x);
        }
      tile_max = cuda_prefill::quad_max(tile_max);
      const float m_new = fmaxf(row_max[hr], tile_max);
      const float factor = m_new == -INFINITY ? 1.0f : cuda_prefill::fast_exp2(row_max[hr] - m_new);
      row_max[hr] = m_new;
      row_sum[hr] *= factor;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        acc_o[dt][hr * 2] *= factor;
        acc_o[dt][hr * 2 + 1] *= factor;
      }
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = cuda_prefill::fast_exp2(s[nt][hr * 2 + e] - m_use);
          s[nt][hr * 2 + e] = pv;
          row_sum[hr] += pv;
        }
    }

    // O += P V: the warp's 16 keys are one k16 step.
    const std::uint32_t pa[4] = {Traits::pack(s[0][0], s[0][1]), Traits::pack(s[0][2], s[0][3]),
                                 Traits::pack(s[1][0], s[1][1]), Traits::pack(s[1][2], s[1][3])};
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      std::uint32_t bv[4];
      cute::SM75_U16x8_LDSM_T::copy(
          *reinterpret_cast<const cute::uint128_t*>(sV + Cfg::smem_offset(key0 + (lane % 8) + ((lane / 8) % 2) * 8, dp * 2 + (lane / 8) / 2)),
          bv[0], bv[1], bv[2], bv[3]);
      float* o0 = acc_o[2 * dp];
      float* o1 = acc_o[2 * dp + 1];
      Traits::Mma::fma(o0[0], o0[1], o0[2], o0[3], pa[0], pa[1], pa[2], pa[3], bv[0], bv[1], o0[0], o0[1], o0[2], o0[3]);
      Traits::Mma::fma(o1[0], o1[1], o1[2], o1[3], pa[0], pa[1], pa[2], pa[3], bv[2], bv[3], o1[0], o1[1], o1[2], o1[3]);
    }
  }

  // ---- merge the four warps' states through shared memory -----------------------------------
  cute::cp_async_wait<0>();
  __syncthreads();  // the pipeline stages are free: reuse them
  float* mO = reinterpret_cast<float*>(sK0);                      // [warp][row][D]
  float* mM = mO + Cfg::kWarps * Cfg::kRows * kHeadDim;           // [warp][row] max (log2)
  float* mL = mM + Cfg::kWarps * Cfg::kRows;                      // [warp][row] sum
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = g + hr * 8;
    const float sum = cuda_prefill::quad_sum(row_sum[hr]);
    if (t == 0) {
      mM[warp * Cfg::kRows + r] = row_max[hr];
      mL[warp * Cfg::kRows + r] = sum;
    }
    float* orow = mO + (warp * Cfg::kRows + r) * kHeadDim;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      orow[dt * 8 + 2 * t] = acc_o[dt][hr * 2];
      orow[dt * 8 + 2 * t + 1] = acc_o[dt][hr * 2 + 1];
    }
  }
  __syncthreads();
  constexpr float kLn2 = 0.6931471805599453f;
  for (int idx = threadIdx.x; idx < Cfg::kRows * kHeadDim; idx += Cfg::kThreads) {
    const int r = idx / kHeadDim, c = idx % kHeadDim;
    const int pm = mb * Cfg::kRows + r;
    if (pm >= rows_total || c >= p.head_dim) continue;
    float m = -INFINITY;
    for (int w = 0; w < Cfg::kWarps; ++w) m = fmaxf(m, mM[w * Cfg::kRows + r]);
    float l = 0.0f, o = 0.0f;
    if (m != -INFINITY)
      for (int w = 0; w < Cfg::kWarps; ++w) {
        const float f = exp2f(mM[w * Cfg::kRows + r] - m);  // 0 for an empty warp
        l += mL[w * Cfg::kRows + r] * f;
        o += mO[(w * Cfg::kRows + r) * kHeadDim + c] * f;
      }
    const float val = l > 0.0f ? o / l : 0.0f;
    const float lse = l > 0.0f ? (m + __log2f(l)) * kLn2 : -INFINITY;
    const int i = pm % p.seqlen_q, h = kvh * p.group + pm / p.seqlen_q;
    if (p.num_splits == 1) {
      Elem<kDtype>::store(p.out, b * p.out_batch_stride + std::int64_t(i) * p.out_row_stride +
                                     std::int64_t(h) * p.out_head_stride + c, val);
      if (p.lse && c == 0)
        p.lse[b * p.lse_batch_stride + std::int64_t(h) * p.lse_head_stride + std::int64_t(i) * p.lse_row_stride] = lse;
    } else {
      const std::int64_t state = ((std::int64_t(split) * p.batch + b) * p.heads_q + h) * p.seqlen_q + i;
      p.partial_o[state * p.head_dim + c] = val;
      if (c == 0) p.partial_lse[state] = lse;
    }
  }
}

template <int kHeadDim, Dtype kDtype>
void launch_decode(const DecodeParams& p, cudaStream_t stream) {
  using Cfg = DecodeConfig<kHeadDim>;
  auto* kernel = &decode_kernel<kHeadDim, kDtype>;
  static const cudaError_t attr_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  FASTATTN_CUDA_CHECK(attr_status);
  const int m_blocks = (p.group * p.seqlen_q + Cfg::kRows - 1) / Cfg::kRows;
  const dim3 grid(p.num_splits, p.heads_kv * m_blocks, p.batch);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  launch_kernel(kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream,
                p.dependent_launch && p.after_append, p);
}

#define FASTATTN_INSTANTIATE_DECODE(D, T) \
  template void launch_decode<D, T>(const DecodeParams&, cudaStream_t);

}  // namespace fastattn::cuda_decode
