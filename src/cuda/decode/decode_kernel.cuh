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
#include "cuda/decode/decode_tile.cuh"
#include "cuda/prefill/prefill_kernel.cuh"

namespace fastattn::cuda_decode {

using cuda_prefill::CopyMap;
using cuda_prefill::KvRows;
using cuda_prefill::PagedRunCopy;

/// Tile shapes and the shared-memory rows of K / V / Q (the copy helpers of the prefill kernels
/// read kThreads, kChunks, kSwizzle, kSmemStride, smem_offset and kBlockN from here).
template <int kHeadDim_>
struct DecodeConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kThreads = 128;
  static constexpr int kWarps = kDecodeWarps;
  static constexpr int kRows = kDecodeRows;
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
  // The tile math (decode_tile.cuh) addresses Q and the K / V stages alike.
  static __device__ __forceinline__ int q_offset(int row, int chunk) { return smem_offset(row, chunk); }
  struct KvLayout {  // every stage alike
    __device__ __forceinline__ int offset(int row, int chunk) const { return smem_offset(row, chunk); }
  };
  // Enough bytes in flight per SM to cover HBM latency with two CTAs per SM.
  static constexpr int kStages = kHeadDim <= 64 ? 4 : kHeadDim <= 128 ? 3 : 2;
  static constexpr int kTileElems = kBlockN * kSmemStride;  // one K (or V) stage
  static constexpr int kPipeBytes = 2 * kStages * kTileElems * 2;
  static constexpr int kMergeBytes = decode_merge_bytes<kHeadDim>();
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
  constexpr int BN = Cfg::kBlockN, S = Cfg::kStages;

  const DecodeWork work = resolve_decode_work(p);
  const int b = work.valid ? work.b : 0;  // the sequence's loads need not wait for the check
  const int rows_total = p.group * p.seqlen_q;
  const int m_blocks = decode_row_blocks(p.group, p.seqlen_q);
  const int kvh = work.head_block / m_blocks, mb = work.head_block % m_blocks;
  const DecodeSeq seq = resolve_decode_seq(p, b);
  if (!work.valid) {  // a split plan's entry out of range (every thread alike)
    pdl_wait_for_previous_kernel();  // still complete after the append kernel
    return;
  }
  const int pad = seq.pad, end = seq.end;

  const DecodeSplitRange range(p, pad, end, work.split, work.splits, BN);
  const int t_begin = range.t_begin, t_end = range.t_end;
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
  const int g = lane / 4;

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

  DecodeWarpState<kHeadDim> st;
  st.init(p, b, kvh, mb, pad, end, g);

  for (int tile = t_begin; tile < t_end; ++tile) {
    cute::cp_async_wait<S - 2>();  // this tile's group (and Q) landed
    __syncthreads();               // ... for every thread; the previous stage is free
    load_tile(tile + S - 1);
    const int stage = (tile - t_begin) % S;
    st.template attend<Cfg, kDtype>(p, sQ, sK0 + stage * Cfg::kTileElems, sV0 + stage * Cfg::kTileElems,
                                    typename Cfg::KvLayout{}, tile * BN, warp * Cfg::kWarpKeys, pad, end, lane);
  }

  // ---- merge the four warps' states through shared memory -----------------------------------
  cute::cp_async_wait<0>();
  __syncthreads();  // the pipeline stages are free: reuse them
  decode_merge_warps<kHeadDim>(
      p, st, reinterpret_cast<float*>(sK0), mb, threadIdx.x, [] { __syncthreads(); },
      [&](int r, int c, float4 val, float lse) {
        decode_store_value4<kDtype>(p, work, kvh, mb * kDecodeRows + r, c, val, lse);
      });
}

template <int kHeadDim, Dtype kDtype>
void launch_decode(const DecodeParams& p, cudaStream_t stream) {
  using Cfg = DecodeConfig<kHeadDim>;
  auto* kernel = &decode_kernel<kHeadDim, kDtype>;
  static const cudaError_t attr_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  FASTATTN_CUDA_CHECK(attr_status);
  const int m_blocks = decode_row_blocks(p.group, p.seqlen_q);
  const dim3 grid = decode_head_grid(p, p.heads_kv * m_blocks);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  launch_kernel(kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream,
                p.dependent_launch && p.after_append, p);
}

#define FASTATTN_INSTANTIATE_DECODE(D, T) \
  template void launch_decode<D, T>(const DecodeParams&, cudaStream_t);

}  // namespace fastattn::cuda_decode
