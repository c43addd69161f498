// The CUDA prefill kernel (sm_80 and newer): FlashAttention-2's algorithm on tensor cores.
//
// One CTA computes kBlockM query rows of one (sequence, query head). Warps split the rows
// (kWarpRows each) and all walk the same key tiles of kBlockN keys:
//   S = Q K^T       mma.sync m16n8k16 (fp16/bf16 in, fp32 accumulate); Q and K from shared
//                   memory through ldmatrix
//   mask, softcap, ALiBi, online softmax in registers (fp32, log2 domain)
//   O += P V        P re-packed from the S accumulators into A fragments without leaving
//                   registers; V through ldmatrix.trans
// Tiles arrive by cp.async (16-byte chunks, zero-filled past the ends) into shared memory rows
// that are XOR-swizzled or padded (PrefillConfig::kSwizzle), so ldmatrix phases hit no bank
// conflicts. K and V are double-buffered: the next tile streams in during the whole current one.
//
// Fragment layout of m16n8k16 (g = lane / 4, t = lane % 4), used throughout:
//   A (16x16): a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B (16x8):  b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C (16x8):  c0,c1 (g, 2t..2t+1)  c2,c3 (g+8, 2t..2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

#include "cuda/common/cuda_check.h"
#include "cuda/prefill/prefill_params.h"

namespace fastattn::cuda_prefill {

template <Dtype kDtype>
struct ElementTraits;

template <>
struct ElementTraits<Dtype::kFloat16> {
  using Mma = cute::SM80_16x8x16_F32F16F16F32_TN;
  static __device__ __forceinline__ std::uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<std::uint32_t*>(&h);
  }
};

template <>
struct ElementTraits<Dtype::kBFloat16> {
  using Mma = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  static __device__ __forceinline__ std::uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<std::uint32_t*>(&h);
  }
};

/// Tile shapes per head_dim: 128 query rows in 8 warps of 16 rows (O accumulator kHeadDim / 2
/// floats per thread), 128-key tiles up to head_dim 64 and 64-key tiles above; two CTAs per SM up
/// to head_dim 128 (measured best on the H200, bench/NOTES.md).
template <int kHeadDim_>
struct PrefillConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = 8;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kBlockM = 128;
  // Up to head_dim 64 a 64-key tile is little tensor work per barrier / softmax step: use 128.
  static constexpr int kBlockN = kHeadDim <= 64 ? 128 : 64;
  static constexpr int kWarpRows = kBlockM / kNWarps;
  static constexpr int kMTiles = kWarpRows / 16;  // m16 tiles per warp
  static constexpr int kNTiles = kBlockN / 8;     // n8 tiles of S per warp
  static constexpr int kDTiles = kHeadDim / 8;    // n8 tiles of O per warp
  static constexpr int kKSteps = kHeadDim / 16;   // k16 steps of Q K^T
  static constexpr int kChunks = kHeadDim / 8;    // 16-byte chunks per row
  // Shared-memory rows: unpadded with the 16-byte chunks XOR-swizzled by the row's low 3 bits
  // inside each 128-byte segment (cp.async row stores and 8-row ldmatrix phases both
  // conflict-free), or padded by 16 bytes (ldmatrix conflict-free, row stores not). Measured on
  // the H200 (bench/NOTES.md): swizzle +5% at d64 and d256, but -5% at d128, where the swizzle
  // arithmetic pushed the 128-register kernel into more spills; 32 and 96 cannot swizzle whole
  // 128-byte segments.
  static constexpr bool kSwizzle = kHeadDim % 64 == 0 && kHeadDim != 128;
  static constexpr int kSmemStride = kSwizzle ? kHeadDim : kHeadDim + 8;  // halves per row
  /// Element offset of 16-byte chunk `chunk` of row `row`.
  static __device__ __forceinline__ int smem_offset(int row, int chunk) {
    const int phys = kSwizzle ? (chunk & ~7) | ((chunk ^ row) & 7) : chunk;
    return row * kSmemStride + phys * 8;
  }
  // ldmatrix.x4 loads issued back to back before their MMAs: 4 when it divides both the key
  // and the head_dim fragment counts (kBlockN / 16, kHeadDim / 16), else 2 (head_dim 32, 96).
  static constexpr int kFragGroup = (kHeadDim / 16) % 4 == 0 && (kBlockN / 16) % 4 == 0 ? 4 : 2;
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * kSmemStride * 2;  // Q + 2 x (K, V)
  // Two CTAs per SM (128 registers per thread) while the O accumulator is small enough.
  static constexpr int kMinBlocks = kHeadDim <= 128 ? 2 : 1;
  static_assert(kHeadDim % 16 == 0 && kWarpRows % 16 == 0, "tile shapes");
};

/// Key or value rows of the CTA's sequence and kv head. `ptr` already includes the batch /
/// cu_seqlens_k offset (dense) and the kv head, so row j is at ptr + j * row_stride (dense) or
/// ptr + page * page_stride + (j % page_size) * row_stride (paged). Row offsets are -1 for j
/// past the keys or a page id outside the cache (read as zeros).
struct KvRows {
  const std::uint16_t* ptr;
  const std::int32_t* pages;
  int len;

  /// `p` is any params struct with page_size, page_shift and num_pages (prefill or decode).
  template <class Paging>
  __device__ __forceinline__ std::int64_t offset(const Paging& p, int j, std::int64_t row_stride,
                                                 std::int64_t page_stride) const {
    if (j >= len) return -1;
    if (p.page_size == 0) return std::int64_t(j) * row_stride;
    // Power-of-two pages (the common 16, 32, 64) avoid an integer division per row.
    const int pi = p.page_shift >= 0 ? j >> p.page_shift : j / p.page_size;
    const int slot = p.page_shift >= 0 ? j & (p.page_size - 1) : j % p.page_size;
    const int page = pages[pi];
    if (page < 0 || page >= p.num_pages) return -1;
    return std::int64_t(page) * page_stride + std::int64_t(slot) * row_stride;
  }
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(gmem), *reinterpret_cast<cute::uint128_t*>(smem),
      pred);
}

/// Which 16-byte chunk column and rows of a tile this thread copies. Threads tile a row of
/// kChunksP2 (a power of two >= kChunks) chunks, so each keeps one chunk column and steps down
/// the rows; columns >= kChunks (head_dim 96, 192) idle, columns past head_dim zero-fill.
template <class Cfg>
struct CopyMap {
  static constexpr int kChunksP2 = Cfg::kChunks <= 4 ? 4 : Cfg::kChunks <= 8 ? 8 : Cfg::kChunks <= 16 ? 16 : 32;
  static constexpr int kRowStep = Cfg::kThreads / kChunksP2;
  int row0, ch;
  bool active, in_dim;
  __device__ __forceinline__ explicit CopyMap(int head_dim)
      : row0(threadIdx.x / kChunksP2), ch(threadIdx.x % kChunksP2) {
    active = ch < Cfg::kChunks;
    in_dim = ch * 8 < head_dim;
  }
};

/// Copies a tile whose row r starts at element `base + r * row_stride` of gmem; rows from
/// rows_valid on (and chunks past head_dim) are zero-filled.
template <class Cfg, int kRows>
__device__ __forceinline__ void load_tile_strided(std::uint16_t* smem, const std::uint16_t* gmem,
                                                  std::int64_t base, std::int64_t row_stride,
                                                  int rows_valid, const CopyMap<Cfg>& m) {
  constexpr int kStep = CopyMap<Cfg>::kRowStep;
  static_assert(kRows % kStep == 0, "tile rows must be a multiple of the copy row step");
  if (!m.active) return;
  const std::uint16_t* src = gmem + base + m.row0 * row_stride + m.ch * 8;
  // kStep is a multiple of 8, so every row this thread copies has the same swizzle.
  static_assert(!Cfg::kSwizzle || kStep % 8 == 0, "swizzle phase must not change along a thread's rows");
  std::uint16_t* dst = smem + Cfg::smem_offset(m.row0, m.ch);
  const std::int64_t src_step = kStep * row_stride;
#pragma unroll
  for (int i = 0; i < kRows / kStep; ++i) {
    const bool pred = m.in_dim && m.row0 + i * kStep < rows_valid;
    cp_async_16(dst + i * kStep * Cfg::kSmemStride, pred ? src + i * src_step : gmem, pred);
  }
}

/// Copies a tile of paged keys row by row (pages smaller than, or not a multiple of, the tile).
template <class Cfg, int kRows, class Paging>
__device__ __forceinline__ void load_tile_rowwise(std::uint16_t* smem, const Paging& p,
                                                  const KvRows& kr, int n0,
                                                  std::int64_t row_stride, std::int64_t page_stride,
                                                  const CopyMap<Cfg>& m) {
  constexpr int kStep = CopyMap<Cfg>::kRowStep;
  if (!m.active) return;
#pragma unroll
  for (int i = 0; i < kRows / kStep; ++i) {
    const int r = m.row0 + i * kStep;
    const std::int64_t off = kr.offset(p, n0 + r, row_stride, page_stride);
    const bool pred = m.in_dim && off >= 0;
    cp_async_16(smem + Cfg::smem_offset(r, m.ch), pred ? kr.ptr + off + m.ch * 8 : kr.ptr, pred);
  }
}

/// Key or value tile [n0, n0 + kBlockN): dense and page-aligned tiles (page_size a multiple of
/// the tile: the whole tile sits in one page) take the strided path, other paged tiles go row
/// by row.
template <class Cfg, class Paging>
__device__ __forceinline__ void load_kv_tile(std::uint16_t* smem, const Paging& p,
                                             const KvRows& kr, int n0,
                                             std::int64_t row_stride, std::int64_t page_stride,
                                             const CopyMap<Cfg>& m) {
  constexpr int BN = Cfg::kBlockN;
  const int rows_valid = min(BN, kr.len - n0);
  if (p.page_size == 0) {
    load_tile_strided<Cfg, BN>(smem, kr.ptr, std::int64_t(n0) * row_stride, row_stride, rows_valid, m);
  } else if (p.page_size % BN == 0) {
    const int page = kr.pages[n0 / p.page_size];
    const bool ok = page >= 0 && page < p.num_pages;
    load_tile_strided<Cfg, BN>(
        smem, kr.ptr, ok ? std::int64_t(page) * page_stride + std::int64_t(n0 % p.page_size) * row_stride : 0,
        row_stride, ok ? rows_valid : 0, m);
  } else {
    load_tile_rowwise<Cfg, BN>(smem, p, kr, n0, row_stride, page_stride, m);
  }
}

/// Paged key/value tiles whose pages hold whole runs of kRowsPerThread rows (page_size a multiple
/// of it: 16, 64, 256, ...). Thread (run, chunk) copies one 16-byte chunk column of the
/// consecutive rows [run * kRowsPerThread, + kRowsPerThread) of a tile, which all lie in one page,
/// so it needs one page id per tile; the kernel fetches that id a cp.async group ahead, keeping
/// the lookup latency off the copy path (a row-by-row lookup costs more than the copy issue).
template <class Tile>
struct PagedRunCopy {
  static constexpr int kChunksP2 = CopyMap<Tile>::kChunksP2;
  static constexpr int kRuns = Tile::kThreads / kChunksP2;
  static constexpr int kRowsPerThread = Tile::kBlockN / kRuns;
  static_assert(Tile::kBlockN % kRuns == 0, "runs tile the key block");
  int run_row0, ch;
  bool active, in_dim;
  __device__ __forceinline__ explicit PagedRunCopy(int head_dim)
      : run_row0(int(threadIdx.x) / kChunksP2 * kRowsPerThread), ch(int(threadIdx.x) % kChunksP2) {
    active = ch < Tile::kChunks;
    in_dim = ch * 8 < head_dim;
  }
  template <class Paging>
  static __device__ __forceinline__ bool applies(const Paging& p) {
    return p.page_size > 0 && p.page_size % kRowsPerThread == 0;
  }
  /// Page id of this thread's run in the tile at n0 (-1 past the keys).
  template <class Paging>
  __device__ __forceinline__ int fetch_page(const Paging& p, const KvRows& kr, int n0) const {
    const int j = n0 + run_row0;
    if (j >= kr.len) return -1;
    return kr.pages[p.page_shift >= 0 ? j >> p.page_shift : j / p.page_size];
  }
  /// Copies this thread's run of the tile at n0 from page `page` (zeros past the keys, for a page
  /// id outside the cache and past head_dim).
  template <class Paging>
  __device__ __forceinline__ void load(std::uint16_t* smem, const Paging& p, const KvRows& kr,
                                       int n0, int page, std::int64_t row_stride,
                                       std::int64_t page_stride) const {
    if (!active) return;
    const int j0 = n0 + run_row0;
    const bool page_ok = page >= 0 && page < p.num_pages && in_dim;
    const int slot0 = p.page_shift >= 0 ? j0 & (p.page_size - 1) : j0 % p.page_size;
    const std::uint16_t* src = kr.ptr + (page_ok ? std::int64_t(page) * page_stride + std::int64_t(slot0) * row_stride + ch * 8 : 0);
    #pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const bool pred = page_ok && j0 + k < kr.len;
      cp_async_16(smem + Tile::smem_offset(run_row0 + k, ch), pred ? src + k * row_stride : kr.ptr, pred);
    }
  }
  /// Copies this thread's run of the tile at n0 from dense rows (row j at kr.ptr + j * row_stride;
  /// zeros past the keys and past head_dim).
  __device__ __forceinline__ void load_dense(std::uint16_t* smem, const KvRows& kr, int n0,
                                             std::int64_t row_stride) const {
    if (!active) return;
    const int j0 = n0 + run_row0;
    const std::uint16_t* src = kr.ptr + std::int64_t(j0) * row_stride + ch * 8;
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const bool pred = in_dim && j0 + k < kr.len;
      cp_async_16(smem + Tile::smem_offset(run_row0 + k, ch), pred ? src + k * row_stride : kr.ptr, pred);
    }
  }
};

/// Batch entry b as the kernels see it, clamped to the tensors the index tensors point into.
struct SeqInfo {
  int q_start;            ///< first packed query row (0 when batched)
  int sq, sk;             ///< query rows and keys
  std::int64_t k_start;   ///< first packed key row (varlen with packed keys)
  const std::int32_t* pages;  ///< paged: this sequence's page ids
  int q_pos0;             ///< position of query row 0: sk - sq (bottom-right) + q_pos_offset[b]
};

__device__ __forceinline__ SeqInfo resolve_sequence(const PrefillParams& p, int b) {
  SeqInfo s{0, p.max_seqlen_q, p.seqlen_k, 0, nullptr, 0};
  if (p.cu_seqlens_q) {
    const std::int64_t q0 = min(max(std::int64_t(p.cu_seqlens_q[b]), std::int64_t(0)), p.total_q);
    const std::int64_t q1 = min(max(std::int64_t(p.cu_seqlens_q[b + 1]), q0), p.total_q);
    s.q_start = int(q0);
    s.sq = int(q1 - q0);
  }
  int page_count = 0;
  if (p.page_size > 0) {
    if (p.block_table) {
      s.pages = p.block_table + std::int64_t(b) * p.block_table_stride;
      page_count = p.max_pages_per_seq;
    } else {
      const std::int64_t i0 = min(max(std::int64_t(p.page_indptr[b]), std::int64_t(0)), p.num_page_indices);
      const std::int64_t i1 = min(max(std::int64_t(p.page_indptr[b + 1]), i0), p.num_page_indices);
      s.pages = p.page_indices + i0;
      page_count = int(i1 - i0);
    }
  }
  if (p.seqused_k) {
    s.sk = p.seqused_k[b];
  } else if (p.cu_seqlens_k) {
    s.sk = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  } else if (p.last_page_len) {
    s.sk = page_count > 0 ? (page_count - 1) * p.page_size + p.last_page_len[b] : 0;
  }
  s.sk = max(s.sk, 0);
  if (p.page_size > 0) {
    s.sk = int(min(std::int64_t(s.sk), std::int64_t(page_count) * p.page_size));
  } else if (p.cu_seqlens_k) {
    s.k_start = min(max(std::int64_t(p.cu_seqlens_k[b]), std::int64_t(0)), p.total_k);
    s.sk = int(min(std::int64_t(s.sk), p.total_k - s.k_start));
  }
  s.q_pos0 = s.sk - s.sq + (p.q_pos_offset ? p.q_pos_offset[b] : 0);
  return s;
}

/// The CTA's (sequence, key split) from blockIdx.z (PrefillParams::key_splits), and the split's
/// key range clipped into [n_lo, n_hi).
struct SplitInfo {
  int b, split;
};
__device__ __forceinline__ SplitInfo cta_split(const PrefillParams& p) {
  SplitInfo s{int(blockIdx.z), 0};
  if (p.key_splits > 1) {
    s.split = s.b % p.key_splits;
    s.b /= p.key_splits;
  }
  return s;
}
__device__ __forceinline__ void clip_to_split(const PrefillParams& p, int split, int& n_lo, int& n_hi) {
  if (p.key_splits > 1) {
    n_lo = max(n_lo, split * p.split_keys);
    n_hi = min(n_hi, split * p.split_keys + p.split_keys);
  }
}

/// The key (kValues = false) or value rows of sequence b, kv head kvh.
template <bool kValues>
__device__ __forceinline__ KvRows kv_rows(const PrefillParams& p, const SeqInfo& seq, int b, int kvh) {
  KvRows r;
  r.len = seq.sk;
  r.pages = seq.pages;
  r.ptr = static_cast<const std::uint16_t*>(kValues ? p.v : p.k) +
          kvh * (kValues ? p.v_head_stride : p.k_head_stride);
  if (p.page_size == 0)
    r.ptr += b * (kValues ? p.v_batch_stride : p.k_batch_stride) +
             seq.k_start * (kValues ? p.v_row_stride : p.k_row_stride);
  return r;
}

/// 2^x with the hardware approximation, flushing denormal results to zero (scores that far below
/// the row max contribute nothing measurable); plain exp2f adds denormal handling per call.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

/// The natural-log LSE of a finished row from its max score in log2 units and its sum of
/// exp2(score - max); -inf for a row that saw no key (sum 0).
__device__ __forceinline__ float finished_lse(float row_max_log2, float sum) {
  constexpr float kLn2 = 0.6931471805599453f;
  return sum > 0.0f ? (row_max_log2 + __log2f(sum)) * kLn2 : -INFINITY;
}

/// A finished row's output multiplier and LSE with its sink, from the row's max score in log2
/// units and its sum of exp2(score - max): the sink joins the row as one more score with a zero
/// value row. Returns the natural-log LSE and sets inv, which multiplies the accumulator. A row
/// whose keys weigh nothing beside the sink (it saw none, or their exp2 underflows: keep 0) gets
/// inv 0 and exactly `sink` (-inf when the sink is -inf too), the sink's state alone; through
/// (m + log2(1)) * ln2 it would be sink * log2(e) * ln2, an ulp off.
/// Both prefill kernels take kWithSink as a template parameter and call this only in the sink
/// instantiation, which the host launches only for calls with sinks: the kernels without it are
/// the code from before sinks. (Folding the sink in one epilogue for both cost calls without sinks
/// 1.5-4.8% on the mma.sync kernel at head_dim 128 and the wgmma kernel at 64, whose main loops
/// share their registers with the epilogue; so did two epilogues picked by a uniform branch, on
/// the latter. bench/NOTES.md, session 76.) In log2 units, as the kernels' scores are, the fold
/// is two exp2, a log2 and a division per row, about half of merge_weights' work on the LSE.
__device__ __forceinline__ float fold_sink(float sink, float row_max_log2, float sum, float& inv) {
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
  const float sink_log2 = sink * kLog2e;
  const float m = fmaxf(row_max_log2, sink_log2);  // finite unless no key and a sink of -inf
  if (m == -INFINITY) {
    inv = 0.0f;
    return -INFINITY;
  }
  const float keep = sum > 0.0f ? fast_exp2(row_max_log2 - m) : 0.0f;
  const float total = fmaf(sum, keep, fast_exp2(sink_log2 - m));
  inv = keep / total;
  return keep > 0.0f ? (m + __log2f(total)) * kLn2 : sink;
}

/// Head h's attention sink in the kWithSink instantiation (unused, -inf, in the other).
template <bool kWithSink>
__device__ __forceinline__ float head_sink(const PrefillParams& p, int h) {
  return kWithSink ? p.sinks[h * p.sinks_stride] : -INFINITY;
}

template <int kHeadDim, Dtype kDtype, bool kWithSink>
__global__ void __launch_bounds__(PrefillConfig<kHeadDim>::kThreads, PrefillConfig<kHeadDim>::kMinBlocks)
    prefill_kernel(const __grid_constant__ PrefillParams p) {
  using Cfg = PrefillConfig<kHeadDim>;
  using Traits = ElementTraits<kDtype>;
  constexpr int kFragGroup = Cfg::kFragGroup;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, MT = Cfg::kMTiles, NT = Cfg::kNTiles,
                DT = Cfg::kDTiles, SS = Cfg::kSmemStride;
  constexpr float kLog2e = 1.4426950408889634f;

  // ---- the CTA's sequence, resolved once ------------------------------------------------
  const SplitInfo cta = cta_split(p);
  const int b = cta.b, h = blockIdx.y;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) blocks first
  const SeqInfo seq = resolve_sequence(p, b);
  const int q_start = seq.q_start, sq = seq.sq, sk = seq.sk;
  const int m0 = m_block * BM;
  if (m0 >= sq) return;
  const int kvh = h / (p.heads_q / p.heads_kv);
  const KvRows krows = kv_rows<false>(p, seq, b, kvh);
  const KvRows vrows = kv_rows<true>(p, seq, b, kvh);
  const std::int64_t q_off = b * p.q_batch_stride + std::int64_t(q_start) * p.q_row_stride + h * p.q_head_stride;
  const float slope = p.alibi ? p.alibi[b * p.alibi_batch_stride + h] : 0.0f;
  const float scale_log2 = p.scale * kLog2e;
  // Softcap, ALiBi or a non-positive scale (max of raw q·k is then not the max score) need the
  // general score path on every tile.
  const bool has_mods = p.softcap > 0.0f || slope != 0.0f || !(p.scale > 0.0f);

  // Keys any row of this block may see (bottom-right aligned positions: qpos = r + sk - sq,
  // shifted by q_pos_offset), within this CTA's key split.
  const int q_pos0 = seq.q_pos0;
  const int m_last = min(m0 + BM, sq) - 1;
  int n_lo = 0, n_hi = sk;
  if (p.window_left >= 0) n_lo = max(0, q_pos0 + m0 - p.window_left);
  if (p.window_right >= 0) n_hi = min(sk, q_pos0 + m_last + p.window_right + 1);
  clip_to_split(p, cta.split, n_lo, n_hi);
  const int n_first = n_lo / BN * BN;

  extern __shared__ __align__(16) std::uint16_t smem[];
  std::uint16_t* sQ = smem;
  std::uint16_t* sK0 = sQ + BM * SS;    // K and V: two stages each, tile i in stage i % 2
  std::uint16_t* sV0 = sK0 + 2 * BN * SS;
  const auto* gq = static_cast<const std::uint16_t*>(p.q);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * Cfg::kWarpRows;  // within the block

  float acc_o[MT][DT][4];
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.0f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

  // ---- prologue: Q with the first K/V tile (one cp.async group), the second tile (another) ----
  // Each K/V tile is one group; tile i+2 is issued once every warp is done with tile i, so the
  // copies of the next tile run during the whole of the current one.
  const CopyMap<Cfg> cmap(p.head_dim);
  auto load_stage = [&](int n0, int stage) {
    load_kv_tile<Cfg>(sK0 + stage * BN * SS, p, krows, n0, p.k_row_stride, p.k_page_stride, cmap);
    load_kv_tile<Cfg>(sV0 + stage * BN * SS, p, vrows, n0, p.v_row_stride, p.v_page_stride, cmap);
  };
  load_tile_strided<Cfg, BM>(sQ, gq, q_off + std::int64_t(m0) * p.q_row_stride, p.q_row_stride,
                             sq - m0, cmap);
  if (n_first < n_hi) load_stage(n_first, 0);
  cute::cp_async_fence();
  if (n_first + BN < n_hi) load_stage(n_first + BN, 1);
  cute::cp_async_fence();

  int stage = 0;
  for (int n0 = n_first; n0 < n_hi; n0 += BN, stage ^= 1) {
    cute::cp_async_wait<1>();  // this tile's group done; the next one may still be in flight
    __syncthreads();
    const std::uint16_t* sK = sK0 + stage * BN * SS;
    const std::uint16_t* sV = sV0 + stage * BN * SS;

    // S = Q K^T for this warp's rows.
    float acc_s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < Cfg::kKSteps; ++ks) {
      std::uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = warp_row0 + mt * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
        const int chunk = ks * 2 + lane / 16;
        cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(sQ + Cfg::smem_offset(row, chunk)),
                                      a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
      }
      // The ldmatrix and mma atoms are `asm volatile`, so they issue in source order: load a
      // group of K fragments first, then run their MMAs, so only the first MMA of a group waits
      // on shared memory.
#pragma unroll
      for (int np0 = 0; np0 < NT / 2; np0 += kFragGroup) {
        std::uint32_t bk[kFragGroup][4];
#pragma unroll
        for (int i = 0; i < kFragGroup; ++i) {  // two n8 tiles of keys per ldmatrix.x4
          const int key = (np0 + i) * 16 + (lane % 8) + ((lane / 8) / 2) * 8;
          const int chunk = ks * 2 + (lane / 8) % 2;
          cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(sK + Cfg::smem_offset(key, chunk)),
                                        bk[i][0], bk[i][1], bk[i][2], bk[i][3]);
        }
#pragma unroll
        for (int i = 0; i < kFragGroup; ++i)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            float* c0 = acc_s[mt][2 * (np0 + i)];
            float* c1 = acc_s[mt][2 * (np0 + i) + 1];
            Traits::Mma::fma(c0[0], c0[1], c0[2], c0[3], a[mt][0], a[mt][1], a[mt][2], a[mt][3],
                             bk[i][0], bk[i][1], c0[0], c0[1], c0[2], c0[3]);
            Traits::Mma::fma(c1[0], c1[1], c1[2], c1[3], a[mt][0], a[mt][1], a[mt][2], a[mt][3],
                             bk[i][2], bk[i][3], c1[0], c1[1], c1[2], c1[3]);
          }
      }
    }

    // Scores -> probabilities, online-softmax update (log2 domain). Most tiles need no mask and
    // most calls no softcap/ALiBi: those take the plain path, where the scale folds into the
    // exponent (one FFMA + EX2 per score, FlashAttention's trick). The general path applies
    // softcap, ALiBi and the mask per score. The branch is uniform across the CTA.
    const bool tile_needs_mask =
        n0 + BN > sk || n0 < n_lo ||
        (p.window_left >= 0 && n0 < q_pos0 + m_last - p.window_left) ||
        (p.window_right >= 0 && n0 + BN - 1 > q_pos0 + m0 + p.window_right);
    const bool plain_tile = !tile_needs_mask && !has_mods;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float tile_max = -INFINITY;
        if (plain_tile) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            tile_max = fmaxf(tile_max, fmaxf(acc_s[mt][nt][hr * 2], acc_s[mt][nt][hr * 2 + 1]));
          tile_max = quad_max(tile_max) * scale_log2;
        } else {
          const int r = m0 + warp_row0 + mt * 16 + g + hr * 8;
          const int qpos = q_pos0 + r;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = n0 + nt * 8 + 2 * t + e;
              float s = acc_s[mt][nt][hr * 2 + e] * p.scale;
              if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
              s -= slope * fabsf(float(qpos - j));
              const bool visible = j < sk && (p.window_left < 0 || j >= qpos - p.window_left) &&
                                   (p.window_right < 0 || j <= qpos + p.window_right);
              s = visible ? s * kLog2e : -INFINITY;
              acc_s[mt][nt][hr * 2 + e] = s;
              tile_max = fmaxf(tile_max, s);
            }
          tile_max = quad_max(tile_max);
        }
        const float m_new = fmaxf(row_max[mt][hr], tile_max);
        const float factor = m_new == -INFINITY ? 1.0f : fast_exp2(row_max[mt][hr] - m_new);
        row_max[mt][hr] = m_new;
        row_sum[mt][hr] *= factor;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          acc_o[mt][dt][hr * 2] *= factor;
          acc_o[mt][dt][hr * 2 + 1] *= factor;
        }
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        const float mul = plain_tile ? scale_log2 : 1.0f;  // plain scores are still raw q·k
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = fast_exp2(fmaf(acc_s[mt][nt][hr * 2 + e], mul, -m_use));
            acc_s[mt][nt][hr * 2 + e] = pv;
            row_sum[mt][hr] += pv;
          }
      }
    }

    // O += P V: P's C fragments become A fragments (two n8 tiles = one k16 step).
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
      std::uint32_t pa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float* s0 = acc_s[mt][2 * kk];
        const float* s1 = acc_s[mt][2 * kk + 1];
        pa[mt][0] = Traits::pack(s0[0], s0[1]);
        pa[mt][1] = Traits::pack(s0[2], s0[3]);
        pa[mt][2] = Traits::pack(s1[0], s1[1]);
        pa[mt][3] = Traits::pack(s1[2], s1[3]);
      }
#pragma unroll
      for (int dp0 = 0; dp0 < DT / 2; dp0 += kFragGroup) {  // fragments first, as above
        std::uint32_t bv[kFragGroup][4];
#pragma unroll
        for (int i = 0; i < kFragGroup; ++i) {  // two n8 tiles of head_dim per ldmatrix.x4.trans
          const int key = kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8;
          const int chunk = (dp0 + i) * 2 + (lane / 8) / 2;
          cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(sV + Cfg::smem_offset(key, chunk)),
                                        bv[i][0], bv[i][1], bv[i][2], bv[i][3]);
        }
#pragma unroll
        for (int i = 0; i < kFragGroup; ++i)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            float* o0 = acc_o[mt][2 * (dp0 + i)];
            float* o1 = acc_o[mt][2 * (dp0 + i) + 1];
            Traits::Mma::fma(o0[0], o0[1], o0[2], o0[3], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3],
                             bv[i][0], bv[i][1], o0[0], o0[1], o0[2], o0[3]);
            Traits::Mma::fma(o1[0], o1[1], o1[2], o1[3], pa[mt][0], pa[mt][1], pa[mt][2], pa[mt][3],
                             bv[i][2], bv[i][3], o1[0], o1[1], o1[2], o1[3]);
          }
      }
    }
    __syncthreads();  // every warp is done with this stage: refill it with tile n0 + 2 * BN
    if (n0 + 2 * BN < n_hi) load_stage(n0 + 2 * BN, stage);
    cute::cp_async_fence();  // always one group per iteration, so wait<1> above stays exact
  }

  // ---- epilogue: normalise, write O (and LSE) ------------------------------------------------
  // Recomputed here rather than kept live through the main loop (registers are the limit).
  auto* go = static_cast<std::uint16_t*>(p.out) + b * p.out_batch_stride +
             std::int64_t(q_start) * p.out_row_stride + h * p.out_head_stride +
             cta.split * p.out_split_stride;
  float* glse = p.lse + cta.split * p.lse_split_stride;
  const float sink = head_sink<kWithSink>(p, h);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = m0 + warp_row0 + mt * 16 + g + hr * 8;
      const float sum = quad_sum(row_sum[mt][hr]);
      float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      float lse_with_sink = 0.0f;
      if constexpr (kWithSink) lse_with_sink = fold_sink(sink, row_max[mt][hr], sum, inv);
      if (r >= sq) continue;
      std::uint16_t* orow = go + std::int64_t(r) * p.out_row_stride;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * t;
        if (col < p.head_dim)
          *reinterpret_cast<std::uint32_t*>(orow + col) =
              Traits::pack(acc_o[mt][dt][hr * 2] * inv, acc_o[mt][dt][hr * 2 + 1] * inv);
      }
      if (p.lse && t == 0)
        glse[b * p.lse_batch_stride + h * p.lse_head_stride + std::int64_t(q_start + r) * p.lse_row_stride] =
            kWithSink ? lse_with_sink : finished_lse(row_max[mt][hr], sum);
    }
  }
}

/// The instantiation of a prefill kernel that a call runs: kWithSinkKernel for calls with sinks,
/// kPlainKernel otherwise (fold_sink says why they are two). Both get their dynamic shared memory
/// opted into on the first call (more than 48 KiB needs it; a function attribute, not a stream
/// operation, so allowed while a graph is being captured).
template <auto kPlainKernel, auto kWithSinkKernel, int kSmemBytes>
auto prefill_kernel_for(const PrefillParams& p) {
  static const cudaError_t attr_status[2] = {
      cudaFuncSetAttribute(kPlainKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes),
      cudaFuncSetAttribute(kWithSinkKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes)};
  FASTATTN_CUDA_CHECK(attr_status[p.sinks != nullptr]);
  return p.sinks ? kWithSinkKernel : kPlainKernel;
}

}  // namespace fastattn::cuda_prefill
