// The Hopper prefill kernel (sm_90a): the same algorithm and semantics as prefill_kernel.cuh, with
// the two matrix products on warpgroup MMAs (wgmma) instead of per-warp mma.sync.
//
// One CTA computes kBlockM = 128 query rows of one (sequence, query head) with two warpgroups of
// 64 rows each. Per key tile of kBlockN keys:
//   S = Q K^T   wgmma, both operands straight from shared memory (no ldmatrix)
//   mask, softcap, ALiBi, online softmax on the S accumulators (fp32, log2 domain), as the sm80
//               kernel does
//   O += P V    wgmma with P from registers (the S accumulators repacked to fp16/bf16) and V
//               from shared memory
// Schedule (FlashAttention-3's intra-warpgroup overlap): iteration i issues S_i = Q K_i and
// O += P_{i-1} V_{i-1} together, waits for S_i only, and computes its softmax while the tensor
// cores finish P V; O is rescaled once P V has landed. The two warpgroups also drift apart
// between the per-tile barriers, so one's softmax overlaps the other's MMAs.
//
// Shared memory uses the 128-byte-swizzled layouts wgmma reads (CuTe's GMMA layout atoms): each
// tile is stored as head_dim / 64 column blocks of [rows x 64] elements, 128 bytes per row, the
// 16-byte chunks of row r XOR-ed with r % 8. K and V keep this layout in both roles (V is the
// head_dim-major B operand of P V). Tiles arrive by cp.async like in the sm80 kernel (so every
// dense / varlen / paged addressing mode is shared), and a proxy fence makes them visible to
// wgmma, which reads shared memory through the async proxy.
//
// Accumulator layout (per thread, verified against CuTe's TV layouts): value i of a 64 x N
// accumulator of warpgroup wg lies at row 64 wg + 16 (warp % 4) + lane / 4 + 8 ((i / 2) % 2) and
// column 8 (i / 4) + 2 (lane % 4) + i % 2: the mma.sync C layout repeated along N. The A-register
// operand of P V has the same order, so P is the S accumulator converted in place.
#pragma once

#include <cuda_runtime_api.h>

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "cuda/common/cuda_check.h"
#include "cuda/prefill/prefill_kernel.cuh"

namespace fastattn::cuda_prefill {

/// Shared-memory tile of kRows rows in the 128-byte-swizzled GMMA layout, described for the
/// cp.async loaders of prefill_kernel.cuh (they only need a chunk's offset and the row step).
template <int kRows, int kHeadDim_, int kThreads_>
struct GmmaSmemTile {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kThreads = kThreads_;
  static constexpr int kBlockN = kRows;
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr bool kSwizzle = true;
  static constexpr int kSmemStride = 64;  // elements between rows inside a column block
  static __device__ __forceinline__ int smem_offset(int row, int chunk) {
    return (chunk / 8) * (kRows * 64) + row * 64 + ((chunk ^ row) & 7) * 8;
  }
  static_assert(kHeadDim % 64 == 0, "GMMA 128-byte swizzle needs head_dim in whole 64-element blocks");
};

/// Tile shapes per head_dim (measured on the H200, bench/NOTES.md). Two warpgroups of 64 query
/// rows. Registers per thread hold S (kBlockN / 2 floats), P (kBlockN / 4) and O (kHeadDim / 2):
/// head_dim 64 takes 64-key tiles, which fit two CTAs per SM (128 registers), so one CTA's
/// barriers never idle the SM; 128 takes 128-key tiles at one CTA per SM; 256 only fits 64 keys.
template <int kHeadDim_, Dtype kDtype>
struct PrefillSm90Config {
  static constexpr int kHeadDim = kHeadDim_;
  using Element = std::conditional_t<kDtype == Dtype::kFloat16, cute::half_t, cute::bfloat16_t>;
  static constexpr int kWarpGroups = 2;
  static constexpr int kThreads = kWarpGroups * 128;
  static constexpr int kBlockM = 64 * kWarpGroups;
  static constexpr int kBlockN = kHeadDim == 128 ? 128 : 64;
  static constexpr int kMinBlocks = kHeadDim <= 64 ? 2 : 1;  // CTAs per SM the registers must allow
  // K/V tiles in shared memory: group i + kStages - 1 streams in while tile i is computed. Three
  // cover the load latency of the short tiles; head_dim 256 only has room for two.
  static constexpr int kStages = kHeadDim <= 128 ? 3 : 2;

  using BM = cute::Int<kBlockM>;
  using BN = cute::Int<kBlockN>;
  using D = cute::Int<kHeadDim>;
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kWarpGroups>, cute::_1, cute::_1>>;
  // S (64 x BN per warpgroup) = Q (64 x D, K-major) K^T (BN x D, K-major).
  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::ss_op_selector<Element, Element, float, cute::Shape<cute::_64, BN, D>>(), AtomLayout{}));
  // O (64 x D) += P (64 x BN, registers) V (D x BN viewed from V's [key][d] rows: MN-major).
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, D, BN>,
                                       cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      AtomLayout{}));

  using SmemLayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                                   cute::Shape<BM, D>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                                   cute::Shape<BN, D, cute::Int<kStages>>{}));
  // Keys fastest, then head_dim blocks: the same bytes as SmemLayoutK, seen as (D, BN, stage).
  using SmemLayoutVt = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<Element>{},
                                                    cute::Shape<D, BN, cute::Int<kStages>>{},
                                                    cute::Step<cute::_2, cute::_1, cute::_3>{}));

  using QTile = GmmaSmemTile<kBlockM, kHeadDim, kThreads>;
  using KVTile = GmmaSmemTile<kBlockN, kHeadDim, kThreads>;
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKVElems = kBlockN * kHeadDim;  // one stage of K (or V)
  static constexpr int kSmemBytes = (kQElems + 2 * kStages * kKVElems) * 2;
};

/// wgmma reads shared memory through the async proxy: make the generic-proxy (cp.async) writes
/// visible to it. Each thread fences its own writes before the barrier that publishes them.
__device__ __forceinline__ void fence_smem_for_async_proxy() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

template <int kHeadDim, Dtype kDtype, bool kWithSink>
__global__ void __launch_bounds__(PrefillSm90Config<kHeadDim, kDtype>::kThreads,
                                  PrefillSm90Config<kHeadDim, kDtype>::kMinBlocks)
    prefill_kernel_sm90(const __grid_constant__ PrefillParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Cfg = PrefillSm90Config<kHeadDim, kDtype>;
  using Traits = ElementTraits<kDtype>;
  using Element = typename Cfg::Element;
  using QTile = typename Cfg::QTile;
  using KVTile = typename Cfg::KVTile;
  constexpr int kBM = Cfg::kBlockM, kBN = Cfg::kBlockN;
  constexpr float kLog2e = 1.4426950408889634f;

  // ---- the CTA's sequence, resolved once (as in the sm80 kernel) ------------------------------
  const SplitInfo cta = cta_split(p);  // sequence and key split (PrefillParams::key_splits)
  const int b = cta.b, h = blockIdx.y;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heaviest (causal) blocks first
  const SeqInfo seq = resolve_sequence(p, b);
  const int q_start = seq.q_start, sq = seq.sq, sk = seq.sk;
  const int m0 = m_block * kBM;
  if (m0 >= sq) return;
  const int kvh = h / (p.heads_q / p.heads_kv);
  const KvRows krows = kv_rows<false>(p, seq, b, kvh);
  const KvRows vrows = kv_rows<true>(p, seq, b, kvh);
  const std::int64_t q_off = b * p.q_batch_stride + std::int64_t(q_start) * p.q_row_stride + h * p.q_head_stride;
  const float slope = p.alibi ? p.alibi[b * p.alibi_batch_stride + h] : 0.0f;
  const float scale_log2 = p.scale * kLog2e;
  const bool has_mods = p.softcap > 0.0f || slope != 0.0f || !(p.scale > 0.0f);

  const int q_pos0 = seq.q_pos0;
  const int m_last = min(m0 + kBM, sq) - 1;
  int n_lo = 0, n_hi = sk;
  if (p.window_left >= 0) n_lo = max(0, q_pos0 + m0 - p.window_left);
  if (p.window_right >= 0) n_hi = min(sk, q_pos0 + m_last + p.window_right + 1);
  clip_to_split(p, cta.split, n_lo, n_hi);
  const int n_first = n_lo / kBN * kBN;

  // ---- shared memory: Q, then K and V with kStages tiles each (all 1024-byte aligned) ---------
  extern __shared__ __align__(1024) std::uint8_t smem_raw[];
  auto* smem = reinterpret_cast<std::uint16_t*>(smem_raw);
  std::uint16_t* sQ_ptr = smem;
  std::uint16_t* sK_ptr = sQ_ptr + Cfg::kQElems;
  std::uint16_t* sV_ptr = sK_ptr + Cfg::kStages * Cfg::kKVElems;
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(sQ_ptr)), typename Cfg::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(sK_ptr)), typename Cfg::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(sV_ptr)), typename Cfg::SmemLayoutVt{});

  typename Cfg::TiledMmaQK mma_qk;
  typename Cfg::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(threadIdx.x);
  auto thr_pv = mma_pv.get_thread_slice(threadIdx.x);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // descriptors (MMA, 1, D/16)
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // descriptors (MMA, 1, D/16, stage)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // descriptors (MMA, 1, BN/16, stage)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBM>, Int<kBN>>{});            // BN/2 floats
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBM>, Int<kHeadDim>>{});       // D/2 floats
  Tensor tOrP = make_tensor<Element>(partition_shape_A(mma_pv, Shape<Int<kBM>, Int<kBN>>{}));
  Tensor tOrP32 = recast<std::uint32_t>(tOrP);
  constexpr int kSVals = decltype(size(tSrS))::value;
  constexpr int kOVals = decltype(size(tOrO))::value;
  static_assert(kSVals == kBN / 2 && kOVals == kHeadDim / 2, "one warpgroup's 64 rows per thread set");

  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int row_base = (threadIdx.x / 128) * 64 + ((threadIdx.x / 32) % 4) * 16 + g;  // + 8 hr

  clear(tOrO);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};

  // ---- the pipeline ----------------------------------------------------------------------------
  // Iteration i computes S_i = Q K_i and its softmax while the tensor cores run O += P_{i-1}
  // V_{i-1} (FlashAttention-3's intra-warpgroup overlap), so it needs K_i and V_{i-1}: cp.async
  // group i holds exactly those (V one tile behind K) and lands in K stage i % kStages and V stage
  // (i - 1) % kStages. Iteration num_tiles only adds the last P V. Group 0 also carries Q.
  const int num_tiles = n_first < n_hi ? (n_hi - n_first + kBN - 1) / kBN : 0;
  const CopyMap<KVTile> cmap(p.head_dim);
  const CopyMap<QTile> qmap(p.head_dim);
  // Paged runs: the page id of K tile i (fetched when group i - 1 was issued) and of the K tile
  // of the group issued last, which is V's tile in the next group (same keys, same pages).
  const PagedRunCopy<KVTile> runs(p.head_dim);
  const bool paged_runs = PagedRunCopy<KVTile>::applies(p);
  int page_next = paged_runs && num_tiles > 0 ? runs.fetch_page(p, krows, n_first) : -1;
  int page_last = -1;
  auto load_group = [&](int i) {
    const int iv = i - 1;
    if (paged_runs) {
      if (i < num_tiles)
        runs.load(sK_ptr + (i % Cfg::kStages) * Cfg::kKVElems, p, krows, n_first + i * kBN, page_next,
                  p.k_row_stride, p.k_page_stride);
      if (iv >= 0 && iv < num_tiles)
        runs.load(sV_ptr + (iv % Cfg::kStages) * Cfg::kKVElems, p, vrows, n_first + iv * kBN, page_last,
                  p.v_row_stride, p.v_page_stride);
      page_last = page_next;
      page_next = i + 1 < num_tiles ? runs.fetch_page(p, krows, n_first + (i + 1) * kBN) : -1;
    } else {
      if (i < num_tiles)
        load_kv_tile<KVTile>(sK_ptr + (i % Cfg::kStages) * Cfg::kKVElems, p, krows, n_first + i * kBN,
                             p.k_row_stride, p.k_page_stride, cmap);
      if (iv >= 0 && iv < num_tiles)
        load_kv_tile<KVTile>(sV_ptr + (iv % Cfg::kStages) * Cfg::kKVElems, p, vrows, n_first + iv * kBN,
                             p.v_row_stride, p.v_page_stride, cmap);
    }
    cp_async_fence();  // one group per index, empty or not, so the waits below stay exact
  };
  load_tile_strided<QTile, kBM>(sQ_ptr, static_cast<const std::uint16_t*>(p.q),
                                q_off + std::int64_t(m0) * p.q_row_stride, p.q_row_stride, sq - m0, qmap);
  CUTE_UNROLL
  for (int i = 0; i < Cfg::kStages - 1; ++i) load_group(i);

  // Iteration pieces. Each takes the barrier of its group, which publishes the group's copies to
  // wgmma and frees the stages group i + kStages - 1 refills.
  auto await_group = [&](int i) {
    cp_async_wait<Cfg::kStages - 2>();  // group i (and Q) landed; later ones may be in flight
    fence_smem_for_async_proxy();
    __syncthreads();
    load_group(i + Cfg::kStages - 1);
  };
  auto issue_qk = [&](int k_stage) {  // S = Q K (one wgmma batch)
    mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tSrQ); ++kb) {
      gemm(mma_qk, tSrQ(_, _, kb), tSrK(_, _, kb, k_stage), tSrS);
      mma_qk.accumulate_ = GMMA::ScaleOut::One;
    }
    warpgroup_commit_batch();
  };
  auto issue_pv = [&](int v_stage) {  // O += P V (one wgmma batch)
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tOrP); ++kb) gemm(mma_pv, tOrP(_, _, kb), tOrV(_, _, kb, v_stage), tOrO);
    warpgroup_commit_batch();
  };
  float o_factor[2];
  auto softmax_tile = [&](int n0) {
    // Scores -> probabilities and the online-softmax update. Without softcap / ALiBi the raw
    // scores stay unscaled (the scale folds into the exponent: one FFMA + EX2 per score) and a
    // tile crossing the causal diagonal, the window or the sequence end only sets its hidden
    // scores to -inf; with them, the general path rewrites each score (log2 domain). The branches
    // are uniform across the CTA.
    const bool tile_needs_mask =
        n0 + kBN > sk || n0 < n_lo ||
        (p.window_left >= 0 && n0 < q_pos0 + m_last - p.window_left) ||
        (p.window_right >= 0 && n0 + kBN - 1 > q_pos0 + m0 + p.window_right);
    const bool plain_tile = !has_mods;
    CUTE_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      float tile_max = -INFINITY;
      if (plain_tile) {
        if (tile_needs_mask) {
          // Visible keys of this row: [lo, hi], as offsets from this thread's first column.
          const int qpos = q_pos0 + m0 + row_base + hr * 8;
          const int first_col = n0 + 2 * t;
          const int lo = (p.window_left >= 0 ? qpos - p.window_left : 0) - first_col;
          const int hi = min(sk - 1, p.window_right >= 0 ? qpos + p.window_right : sk - 1) - first_col;
          CUTE_UNROLL
          for (int nt = 0; nt < kBN / 8; ++nt)
            CUTE_UNROLL
            for (int e = 0; e < 2; ++e) {
              const int c = nt * 8 + e;
              if (c < lo || c > hi) tSrS(nt * 4 + hr * 2 + e) = -INFINITY;
            }
        }
        CUTE_UNROLL
        for (int nt = 0; nt < kBN / 8; ++nt)
          tile_max = fmaxf(tile_max, fmaxf(tSrS(nt * 4 + hr * 2), tSrS(nt * 4 + hr * 2 + 1)));
        tile_max = quad_max(tile_max) * scale_log2;
      } else {
        const int r = m0 + row_base + hr * 8;
        const int qpos = q_pos0 + r;
        CUTE_UNROLL
        for (int nt = 0; nt < kBN / 8; ++nt)
          CUTE_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int j = n0 + nt * 8 + 2 * t + e;
            float s = tSrS(nt * 4 + hr * 2 + e) * p.scale;
            if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
            s -= slope * fabsf(float(qpos - j));
            const bool visible = j < sk && (p.window_left < 0 || j >= qpos - p.window_left) &&
                                 (p.window_right < 0 || j <= qpos + p.window_right);
            s = visible ? s * kLog2e : -INFINITY;
            tSrS(nt * 4 + hr * 2 + e) = s;
            tile_max = fmaxf(tile_max, s);
          }
        tile_max = quad_max(tile_max);
      }
      const float m_new = fmaxf(row_max[hr], tile_max);
      const float factor = m_new == -INFINITY ? 1.0f : fast_exp2(row_max[hr] - m_new);
      row_max[hr] = m_new;
      row_sum[hr] *= factor;
      o_factor[hr] = factor;  // O is rescaled once the pending P V has landed in it
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float mul = plain_tile ? scale_log2 : 1.0f;  // plain scores are still raw q·k
      CUTE_UNROLL
      for (int nt = 0; nt < kBN / 8; ++nt)
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) {
          const float pv = fast_exp2(fmaf(tSrS(nt * 4 + hr * 2 + e), mul, -m_use));
          tSrS(nt * 4 + hr * 2 + e) = pv;
          row_sum[hr] += pv;
        }
    }
  };
  auto scores_to_p = [&]() {
    CUTE_UNROLL
    for (int j = 0; j < kSVals / 2; ++j) tOrP32(j) = Traits::pack(tSrS(2 * j), tSrS(2 * j + 1));
  };

  if (num_tiles > 0) {
    // Tile 0: S_0 and its softmax alone (O is still zero).
    await_group(0);
    warpgroup_fence_operand(tSrS);
    warpgroup_arrive();
    issue_qk(0);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    softmax_tile(n_first);
    scores_to_p();
    // Tiles 1 ..: S_i = Q K_i and O += P_{i-1} V_{i-1} in flight together; the softmax of S_i
    // runs while the tensor cores finish P V.
    for (int i = 1; i < num_tiles; ++i) {
      await_group(i);
      warpgroup_fence_operand(tSrS);
      warpgroup_fence_operand(tOrO);
      warpgroup_arrive();
      issue_qk(i % Cfg::kStages);
      issue_pv((i - 1) % Cfg::kStages);
      warpgroup_wait<1>();  // S_i ready
      warpgroup_fence_operand(tSrS);
      softmax_tile(n_first + i * kBN);
      warpgroup_wait<0>();  // P_{i-1} V_{i-1} landed: rescale O to the new row maxima
      warpgroup_fence_operand(tOrO);
      CUTE_UNROLL
      for (int j = 0; j < kOVals; ++j) tOrO(j) *= o_factor[(j / 2) % 2];
      scores_to_p();
    }
    // The last P V.
    await_group(num_tiles);
    warpgroup_fence_operand(tOrO);
    warpgroup_arrive();
    issue_pv((num_tiles - 1) % Cfg::kStages);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
  }

  // ---- epilogue: normalise, write O (and LSE) ------------------------------------------------
  auto* go = static_cast<std::uint16_t*>(p.out) + b * p.out_batch_stride +
             std::int64_t(q_start) * p.out_row_stride + h * p.out_head_stride +
             cta.split * p.out_split_stride;
  float* glse = p.lse + cta.split * p.lse_split_stride;
  const float sink = head_sink<kWithSink>(p, h);
  CUTE_UNROLL
  for (int hr = 0; hr < 2; ++hr) {
    const int r = m0 + row_base + hr * 8;
    const float sum = quad_sum(row_sum[hr]);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    float lse_with_sink = 0.0f;
    if constexpr (kWithSink) lse_with_sink = fold_sink(sink, row_max[hr], sum, inv);
    if (r >= sq) continue;
    std::uint16_t* orow = go + std::int64_t(r) * p.out_row_stride;
    CUTE_UNROLL
    for (int dt = 0; dt < kHeadDim / 8; ++dt) {
      const int col = dt * 8 + 2 * t;
      if (col < p.head_dim)
        *reinterpret_cast<std::uint32_t*>(orow + col) =
            Traits::pack(tOrO(dt * 4 + hr * 2) * inv, tOrO(dt * 4 + hr * 2 + 1) * inv);
    }
    if (p.lse && t == 0)
      glse[b * p.lse_batch_stride + h * p.lse_head_stride + std::int64_t(q_start + r) * p.lse_row_stride] =
          kWithSink ? lse_with_sink : finished_lse(row_max[hr], sum);
  }
#else
  __trap();  // compiled for another architecture: the host only launches this on sm_90a
#endif
}

template <int kHeadDim, Dtype kDtype>
void launch_prefill_sm90(const PrefillParams& p, cudaStream_t stream) {
  using Cfg = PrefillSm90Config<kHeadDim, kDtype>;
  auto* kernel = prefill_kernel_for<&prefill_kernel_sm90<kHeadDim, kDtype, false>,
                                    &prefill_kernel_sm90<kHeadDim, kDtype, true>, Cfg::kSmemBytes>(p);
  const dim3 grid((p.max_seqlen_q + Cfg::kBlockM - 1) / Cfg::kBlockM, p.heads_q,
                  p.batch * (p.key_splits > 1 ? p.key_splits : 1));
  if (grid.x == 0 || grid.z == 0) return;
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  FASTATTN_CUDA_CHECK_LAUNCH();
}

#define FASTATTN_INSTANTIATE_PREFILL_SM90(D, T) \
  template void launch_prefill_sm90<D, T>(const PrefillParams&, cudaStream_t);

}  // namespace fastattn::cuda_prefill
