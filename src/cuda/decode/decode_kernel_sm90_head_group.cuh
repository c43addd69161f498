// The head-group decode kernel for sm_90: one CTA attends kDecodeHeadGroup (4) KV heads of one
// sequence at once, one consumer warp per head, and streams its cache as one TMA box per 16-slot
// tile and tensor that spans all four heads: 16 slots x 4 heads x 128 columns, i.e. 16 runs of
// 1 KB of the token-major (rows, slots, heads_kv, head_dim) cache. Its wide form takes
// kDecodeHeadGroupWide (8) heads per CTA at one CTA per SM: at heads_kv = 8 a box is then 16
// whole token rows, one whole page of 16 slots.
//
// Why: decode_kernel_sm90.cuh gives each KV head its own CTA, so DRAM sees every head's 256-byte
// rows 2 KB apart (GQA 8) from CTAs that drift apart in time; cuDNN reads a head-major copy whose
// rows are contiguous. A no-math TMA read of the H200 (bench/NOTES.md, session 10) drew 4.42 TB/s
// from the one-head pattern, 4.47 from head-major rows and 4.48 from boxes over four heads at
// batch 32 / 8k (4.45 / 4.52 / 4.55 at batch 128 / 8k; pages of 16 likewise, a paged-16 tile
// being one box instead of four per head).
//
// The math per warp is decode_tile_narrow.cuh's (its 16 keys of a tile are the whole tile here),
// so the kernel takes what that takes: at most 8 packed query rows (group x seqlen_q), and here
// head_dim exactly 128, heads_kv a multiple of the heads per CTA, a contiguous cache or pages of a
// multiple of 16 slots (a tile never straddles two pages). A warp owns its head from the first tile to the
// store: no merge between warps. Splits merge in the combine kernel. Out-of-range page ids read
// as zeros, and rows a box brings in that no query may see are masked (K) and zeroed (V), as in
// decode_kernel_sm90.cuh.
//
// Shared memory (1024-byte aligned after the barriers): Q as [head][column block][8 rows][64],
// then S stages of K and of V, each [head][column block][16 slots][64]: the box's own order,
// 128-byte swizzled (16-byte chunk c of a 128-byte row r at c ^ (r % 8)).
#pragma once

#include "cuda/decode/decode_kernel_sm90.cuh"

namespace fastattn::cuda_decode {

/// kHeads_: kDecodeHeadGroup (two CTAs per SM) or kDecodeHeadGroupWide (one).
template <int kHeads_>
struct DecodeHeadGroupConfig {
  static constexpr int kHeadDim = kDecodeHeadGroupHeadDim;
  static constexpr int kHeads = kHeads_;  ///< KV heads per CTA, one consumer warp each
  static constexpr int kConsumerThreads = kHeads * 32;
  static constexpr int kThreads = kConsumerThreads + 64;  // + the K and the V producer warps
  static constexpr int kBlockN = kDecodeHeadGroupSlots;   ///< slots per tile
  static constexpr int kWarpKeys = kBlockN;               ///< DecodeWarpStateNarrow::attend's keys
  static constexpr int kQRows = kDecodeNarrowRows;
  static constexpr int kQHeadElems = kQRows * kHeadDim;
  static constexpr int kHeadTileElems = kBlockN * kHeadDim;   ///< one head's part of a tile
  static constexpr int kTileElems = kHeads * kHeadTileElems;  ///< one box: 16 KB (32 KB wide)
  static constexpr int kStages = 3;
  static constexpr int kCtasPerSm = decode_head_group_ctas_per_sm(kHeads);
  static constexpr int kBarrierBytes = 256;
  static constexpr int kAlign = 1024;
  static constexpr int kQBytes = kHeads * kQHeadElems * 2;
  static constexpr int kSmemBytes = kBarrierBytes + kAlign + kQBytes + kStages * 2 * kTileElems * 2;
  /// Q staged for load_q: [column block][8 rows][64] per head.
  static __device__ __forceinline__ int q_offset(int row, int chunk) {
    return (chunk >> 3) * (kQRows * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
  }
  // 228 KB per SM, 1 KB of it reserved per CTA; 227 KB at most for one CTA.
  static_assert(kHeads == kDecodeHeadGroup || kHeads == kDecodeHeadGroupWide, "the two forms");
  static_assert(kCtasPerSm * (kSmemBytes + 1024) <= 228 * 1024 && kSmemBytes <= 227 * 1024, "the CTAs fit an SM");
  static_assert(kQBytes % kAlign == 0 && (kHeadTileElems * 2) % kAlign == 0, "swizzle atoms stay aligned");
  static_assert(kQRows * kHeadDim * 4 <= kHeadTileElems * 2, "a warp's output rows fit its part of a stage");
  static_assert(4 * kStages * 8 <= kBarrierBytes, "barriers fit their region");
  static_assert(kQRows == kDecodeHeadGroupMaxRows, "the host's row bound is the narrow math's");
};

template <Dtype kDtype, int kHeads>
__global__ void __launch_bounds__(DecodeHeadGroupConfig<kHeads>::kThreads, DecodeHeadGroupConfig<kHeads>::kCtasPerSm)
    decode_kernel_sm90_head_group(const __grid_constant__ DecodeTmaParams tp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Cfg = DecodeHeadGroupConfig<kHeads>;
  using namespace cuda_detail;
  constexpr int BN = Cfg::kBlockN, S = Cfg::kStages, G = Cfg::kHeads, D = Cfg::kHeadDim;
  const DecodeParams& p = tp.p;

  const int split = blockIdx.x, head0 = blockIdx.y * G, b = blockIdx.z;
  const int rows = p.group * p.seqlen_q;  // <= kQRows (decode_head_group_fits)
  const DecodeSeq seq = resolve_decode_seq(p, b);
  const int pad = seq.pad, end = seq.end;
  const DecodeSplitRange range(p, pad, end, split, BN);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const DecodeRingBarriers<S> bars(smem_raw);
  std::uint64_t *full_k = bars.full_k, *full_v = bars.full_v, *empty_k = bars.empty_k, *empty_v = bars.empty_v;
  const std::uint32_t raw = smem_u32(smem_raw);
  unsigned char* aligned = smem_raw + ((raw + Cfg::kBarrierBytes + Cfg::kAlign - 1) / Cfg::kAlign * Cfg::kAlign - raw);
  auto* sQ = reinterpret_cast<std::uint16_t*>(aligned);
  std::uint16_t* sK0 = sQ + G * Cfg::kQHeadElems;
  std::uint16_t* sV0 = sK0 + S * Cfg::kTileElems;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (threadIdx.x == 0) bars.init(G);
  __syncthreads();
  // The cache and the rotated q may come from the append kernel just before (dependent launch).
  pdl_wait_for_previous_kernel();
  pdl_let_next_kernel_launch();

  if (warp >= G) {
    // ---- producers: warp G loads K, warp G + 1 V; lane 0 issues each tile's box, every lane
    // arrives (and helps write the zeros of a page id outside the cache).
    const bool is_k = warp == G;
    const CUtensorMap* map = is_k ? &tp.k_map : &tp.v_map;
    std::uint16_t* s0 = is_k ? sK0 : sV0;
    std::uint64_t* full = is_k ? full_k : full_v;
    std::uint64_t* empty = is_k ? empty_k : empty_v;
    const std::uint64_t policy = l2_policy_evict_first();  // the cache is read once per step
    constexpr std::uint32_t kBoxBytes = Cfg::kTileElems * 2;
    const DecodePageWalk walk(p, seq);
    auto tile_page = [&](int tile) { return walk.paged() ? int(seq.pages[walk.page_index(tile * BN)]) : 0; };
    decode_produce_ring<S>(range.t_begin, range.t_end, empty, tile_page, [&](int tile, int stage, int pg) {
      std::uint16_t* dst = s0 + stage * Cfg::kTileElems;
      const bool in_cache = walk.in_cache(pg);
      if (!in_cache) {
        // A page id outside the cache: its rows read as zeros.
        for (int e = lane * 8; e < Cfg::kTileElems; e += 32 * 8)
          *reinterpret_cast<uint4*>(dst + e) = make_uint4(0, 0, 0, 0);
        fence_proxy_async_smem();  // before a later TMA write of the same rows
      }
      const bool load = lane == 0 && in_cache;
      mbar_arrive_expect_tx(&full[stage], load ? kBoxBytes : 0);
      if (load) {
        tma_load_5d(dst, map, 0, walk.slot_coord(tile * BN), 0, head0, walk.row_coord(pg), &full[stage], policy);
      }
    });
    return;
  }

  // ---- consumers: warp w attends KV head head0 + w over every tile of the split ---------------
  const int kvh = head0 + warp;
  {
    const auto* gq = static_cast<const std::uint16_t*>(p.q);
    constexpr int kChunks = D / 8;
    for (int idx = threadIdx.x; idx < G * Cfg::kQRows * kChunks; idx += Cfg::kConsumerThreads) {
      const int h = idx / (Cfg::kQRows * kChunks), r = idx / kChunks % Cfg::kQRows, ch = idx % kChunks;
      const bool ok = r < rows;
      const std::int64_t off = ok ? b * p.q_batch_stride + std::int64_t(r % p.seqlen_q) * p.q_row_stride +
                                        std::int64_t((head0 + h) * p.group + r / p.seqlen_q) * p.q_head_stride + ch * 8
                                  : 0;
      cuda_prefill::cp_async_16(sQ + h * Cfg::kQHeadElems + Cfg::q_offset(r, ch), gq + off, ok);
    }
    cute::cp_async_fence();
    cute::cp_async_wait<0>();
    named_barrier_sync(1, Cfg::kConsumerThreads);
  }
  const typename DecodeSm90Config<D>::KvLayout kv{4};  // runs of 16 rows: [column block][16][64]
  static_assert(1 << 4 == BN, "one run per head and tile");
  DecodeWarpStateNarrow<D> st;
  st.init(p, b, kvh, pad, end, lane);
  st.bind_layout(kv, 0, lane);
  st.template load_q<Cfg>(sQ + warp * Cfg::kQHeadElems, lane);
  const int head_off = warp * Cfg::kHeadTileElems;
  for (int tile = range.t_begin, stage = 0, phase = 0; tile < range.t_end; ++tile) {
    const std::uint16_t* sK = sK0 + stage * Cfg::kTileElems + head_off;
    std::uint16_t* sV = sV0 + stage * Cfg::kTileElems + head_off;
    mbar_wait(&full_k[stage], phase);
    const int n0 = tile * BN;
    const bool edge = n0 < range.lo || n0 + BN > range.hi;
    const auto k_done = [&] { warp_release_stage(&empty_k[stage], lane); };
    const auto v_wait = [&] {
      mbar_wait(&full_v[stage], phase);
      if (edge) {
        // V rows outside [lo, hi): zeros (0 x NaN would be NaN).
        for (int idx = lane; idx < BN * (D / 8); idx += 32) {
          const int r = idx / (D / 8), ch = idx % (D / 8);
          if (n0 + r < range.lo || n0 + r >= range.hi)
            *reinterpret_cast<uint4*>(sV + kv.offset(r, ch)) = make_uint4(0, 0, 0, 0);
        }
        __syncwarp();
      }
    };
    st.template attend<Cfg, kDtype>(p, sQ, sK, sV, kv, n0, 0, pad, end, lane, k_done, v_wait);
    warp_release_stage(&empty_v[stage], lane);  // also orders the edge tiles' zeros before the refill
    if (++stage == S) stage = 0, phase ^= 1;
  }

  // ---- the head's rows, normalised, through the warp's part of stage 0's K (every tile has
  // landed and been read; no copy writes there any more), stored four values at a time.
  float* orows = reinterpret_cast<float*>(sK0 + head_off);  // [row][D]
  constexpr float kLn2 = 0.6931471805599453f;
  const int g = lane / 4, t = lane % 4;
  float lse[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = 2 * t + e;
    const float sum = key_lanes_sum(st.row_sum[e]);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // no key: output 0
    lse[e] = sum > 0.0f ? (st.row_max[e] + __log2f(sum)) * kLn2 : -INFINITY;
    if (r < rows) {
#pragma unroll
      for (int mt = 0; mt < D / 16; ++mt) {
        orows[r * D + 16 * mt + g] = st.acc_o[mt][e] * inv;
        orows[r * D + 16 * mt + g + 8] = st.acc_o[mt][2 + e] * inv;
      }
    }
  }
  __syncwarp();
  for (int r = 0; r < rows; ++r) {
    const float row_lse = __shfl_sync(0xffffffffu, r & 1 ? lse[1] : lse[0], r >> 1);  // lane t = r / 2 holds it
    const int c = lane * 4;
    decode_store_value4<kDtype>(p, b, kvh, r, split, c, *reinterpret_cast<const float4*>(orows + r * D + c),
                                row_lse);
  }
#endif
}

template <Dtype kDtype, int kHeads>
void launch_decode_sm90_head_group_form(const DecodeParams& p, cudaStream_t stream) {
  using Cfg = DecodeHeadGroupConfig<kHeads>;
  auto* kernel = &decode_kernel_sm90_head_group<kDtype, kHeads>;
  static const cudaError_t attr_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  FASTATTN_CUDA_CHECK(attr_status);
  const dim3 grid(p.num_splits, p.heads_kv / Cfg::kHeads, p.batch);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  DecodeTmaParams tp;
  tp.p = p;
  tp.box_run_shift = 4;
  tp.box_blocks = Cfg::kHeadDim / 64;
  const bool paged = p.page_size > 0;
  const std::int64_t slots = paged ? p.page_size : p.cache_len;
  const std::int64_t cache_rows = paged ? p.num_pages : p.cache_rows;
  // The maps of decode_kernel_sm90.cuh (64 columns x slots x column blocks x heads_kv x rows),
  // with a box of 16 slots, both column blocks and the CTA's kHeads heads.
  const int box[5] = {64, Cfg::kBlockN, tp.box_blocks, Cfg::kHeads, 1};
  const std::int64_t dims[5] = {64, slots, tp.box_blocks, p.heads_kv, cache_rows};
  const std::int64_t k_strides[5] = {1, p.k_row_stride, 64, p.k_head_stride, p.k_batch_stride};
  const std::int64_t v_strides[5] = {1, p.v_row_stride, 64, p.v_head_stride, p.v_batch_stride};
  tp.k_map = cuda_detail::make_tensor_map_5d_u16(p.k_cache, dims, k_strides, box, cuda_detail::TmaL2Promotion::k128B);
  tp.v_map = cuda_detail::make_tensor_map_5d_u16(p.v_cache, dims, v_strides, box, cuda_detail::TmaL2Promotion::k128B);
  launch_kernel(kernel, grid, dim3(Cfg::kThreads), Cfg::kSmemBytes, stream, p.dependent_launch && p.after_append, tp);
}

/// The form the planner took: p.head_group KV heads per CTA.
template <Dtype kDtype>
void launch_decode_sm90_head_group(const DecodeParams& p, cudaStream_t stream) {
  if (p.head_group == kDecodeHeadGroupWide) launch_decode_sm90_head_group_form<kDtype, kDecodeHeadGroupWide>(p, stream);
  else if (p.head_group == kDecodeHeadGroup) launch_decode_sm90_head_group_form<kDtype, kDecodeHeadGroup>(p, stream);
  else throw Error("decode: the head-group kernel got no form to run (an internal planning error)");
}

#define FASTATTN_INSTANTIATE_DECODE_SM90_HEAD_GROUP(T) \
  template void launch_decode_sm90_head_group<T>(const DecodeParams&, cudaStream_t);

}  // namespace fastattn::cuda_decode
