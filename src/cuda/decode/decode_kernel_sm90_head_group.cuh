// The head-group decode kernel for sm_90: one CTA attends kDecodeHeadGroup (4) KV heads of one
// sequence at once, one consumer warp per head, and streams its cache as one TMA box per 16-slot
// tile and tensor that spans all four heads: 16 slots x 4 heads x 128 columns, i.e. 16 runs of
// 1 KB of the token-major (rows, slots, heads_kv, head_dim) cache. Its wide form takes
// kDecodeHeadGroupWide (8) heads per CTA at one CTA per SM: at heads_kv = 8 a box is then 16
// whole token rows, one whole page of 16 slots. Its token-row form takes kDecodeHeadGroupRows (32)
// heads per CTA at one CTA per SM, a consumer warp per 4 heads and tiles of 4 slots: at heads_kv =
// 32 (MHA) a box is 4 whole token rows of 8 KB, one 32 KB run. The wide form is also built at
// head_dim 64, where a GQA 8 token row is 1 KB: its tiles are 32 slots, two boxes of 16 whole rows
// (a page of 16 each), and a consumer warp attends a tile's keys 16 at a time.
//
// Why: decode_kernel_sm90.cuh gives each KV head its own CTA, so DRAM sees every head's 256-byte
// rows 2 KB apart (GQA 8) from CTAs that drift apart in time; cuDNN reads a head-major copy whose
// rows are contiguous. A no-math TMA read of the H200 (bench/NOTES.md, session 10) drew 4.42 TB/s
// from the one-head pattern, 4.47 from head-major rows and 4.48 from boxes over four heads at
// batch 32 / 8k (4.45 / 4.52 / 4.55 at batch 128 / 8k; pages of 16 likewise, a paged-16 tile
// being one box instead of four per head). At MHA, boxes of whole token rows read 1.1-1.4% faster
// than the per-head and four-head patterns (batch 128 / 8k 4.62 TB/s; session 28).
//
// The math per warp is decode_tile_narrow.cuh's (its 16 keys are a whole box here; in the
// token-row form 4 slots of each of the warp's 4 heads), so the kernel takes what that takes: at
// most 8 packed query rows per warp (group x seqlen_q, times 4 in the token-row form), and here
// head_dim 128 (the wide form also 64), heads_kv a multiple of the heads per CTA, a contiguous
// cache or pages of a multiple of the box (a box never straddles two pages). A warp owns its heads
// from the first tile to the store: no merge between warps. Splits merge in the combine kernel.
// Out-of-range page ids read as zeros, and rows a box brings in that no query may see are masked
// (K) and zeroed (V), as in decode_kernel_sm90.cuh.
//
// Shared memory (1024-byte aligned after the barriers): Q as [warp][column block][8 rows][64],
// then S stages of K and of V, each [box][head][column block][slots][64]: the boxes' own order,
// 128-byte swizzled (16-byte chunk c of a 128-byte row r at c ^ (r % 8)).
#pragma once

#include "cuda/decode/decode_kernel_sm90.cuh"

namespace fastattn::cuda_decode {

/// A token-row warp's part of a stage, [head][column block][4 slots][64] for its 4 heads (the box's
/// order), read as 16 MMA keys k = 4 head + slot. The 128-byte row of (key, block) is 8 head +
/// 4 block + slot, so a row's place in the swizzle atom (row % 8) differs between its two column
/// blocks: the second is 512 bytes on with chunk bit 2 flipped (kBlockXorBytes; see
/// DecodeWarpStateNarrow::block_address).
struct DecodeTokenRowLayout {
  static constexpr std::uint32_t kBlockXorBytes = 64;
  __device__ __forceinline__ int offset(int key, int chunk) const {
    const int row = 8 * (key >> 2) + 4 * (chunk >> 3) + (key & 3);
    return row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
  }
  __device__ __forceinline__ int block_elems() const { return 4 * 64; }
};

/// kHeads_: kDecodeHeadGroup (two CTAs per SM), kDecodeHeadGroupWide or kDecodeHeadGroupRows (one);
/// kHeadDim_: 128, or 64 for the wide form (decode_head_group_head_dim_fits).
template <int kHeads_, int kHeadDim_ = kDecodeHeadGroupHeadDim>
struct DecodeHeadGroupConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeads = kHeads_;  ///< KV heads per CTA
  static constexpr int kHeadsPerWarp = decode_head_group_heads_per_warp(kHeads);
  static constexpr int kConsumerWarps = kHeads / kHeadsPerWarp;
  static constexpr int kConsumerThreads = kConsumerWarps * 32;
  static constexpr int kThreads = kConsumerThreads + 64;  // + the K and the V producer warps
  static constexpr int kBoxSlots = decode_head_group_box_slots(kHeads);         ///< slots per box
  static constexpr int kTileBoxes = decode_head_group_tile_boxes(kHeads, kHeadDim);  ///< boxes per tile
  static constexpr int kBlockN = kTileBoxes * kBoxSlots;                        ///< slots per tile
  static constexpr int kWarpKeys = kBoxSlots;  ///< DecodeWarpStateNarrow::attend's slots per head (a box's)
  static constexpr int kQRows = kDecodeNarrowRows;  ///< a warp's packed query rows (the MMA's N)
  static constexpr int kQWarpElems = kQRows * kHeadDim;
  static constexpr int kWarpBoxElems = kHeadsPerWarp * kBoxSlots * kHeadDim;  ///< a warp's part of a box: 16 x D
  static constexpr int kBoxElems = kHeads * kBoxSlots * kHeadDim;  ///< 16 KB (32 KB wide at 128, token rows)
  static constexpr int kTileElems = kTileBoxes * kBoxElems;        ///< a stage of one tensor: 16 or 32 KB
  static constexpr int kStages = 3;
  static constexpr int kCtasPerSm = decode_head_group_ctas_per_sm(kHeads);
  static constexpr int kBarrierBytes = 256;
  static constexpr int kAlign = 1024;
  static constexpr int kQBytes = kConsumerWarps * kQWarpElems * 2;
  /// Arrivals that empty a stage: one per consumer warp, after its lanes sync; in the token-row
  /// form one per consumer lane. There a page's consecutive tiles of a page id outside the cache
  /// take turns in the stages, so the producer's zeros (plain stores) go to a stage right after
  /// the consumers' reads of the zeros before; compute-sanitizer's racecheck orders a lane's reads
  /// before a later write only through that lane's own arrival (bench/NOTES.md, session 28).
  static constexpr int kEmptyArrivals = kHeadsPerWarp == 1 ? kConsumerWarps : kConsumerThreads;
  static constexpr int kSmemBytes = kBarrierBytes + kAlign + kQBytes + kStages * 2 * kTileElems * 2;
  /// A warp's view of a stage: runs of 16 rows, [column block][16][64], or token rows.
  using KvLayout = std::conditional_t<kHeadsPerWarp == 1, typename DecodeSm90Config<kHeadDim>::KvLayout,
                                      DecodeTokenRowLayout>;
  static __device__ __forceinline__ KvLayout kv_layout() {
    if constexpr (kHeadsPerWarp == 1) return KvLayout{4};  // runs of 16 rows
    else return KvLayout{};
  }
  /// Q staged for load_q: [column block][8 rows][64] per warp.
  static __device__ __forceinline__ int q_offset(int row, int chunk) {
    return (chunk >> 3) * (kQRows * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
  }
  // 228 KB per SM, 1 KB of it reserved per CTA; 227 KB at most for one CTA.
  static_assert(kHeads == kDecodeHeadGroup || kHeads == kDecodeHeadGroupWide || kHeads == kDecodeHeadGroupRows,
                "the three forms");
  static_assert(decode_head_group_head_dim_fits(kHeads, kHeadDim), "a head_dim the form is built for");
  static_assert(kWarpBoxElems == kDecodeHeadGroupSlots * kHeadDim, "a warp's 16 MMA keys per box");
  static_assert(kCtasPerSm * (kSmemBytes + 1024) <= 228 * 1024 && kSmemBytes <= 227 * 1024, "the CTAs fit an SM");
  static_assert(kQBytes % kAlign == 0 && (kWarpBoxElems * 2) % kAlign == 0, "swizzle atoms stay aligned");
  static_assert(kQRows * kHeadDim * 4 <= kWarpBoxElems * 2, "a warp's output rows fit its part of a box");
  static_assert(4 * kStages * 8 <= kBarrierBytes, "barriers fit their region");
  static_assert(kQRows == kDecodeHeadGroupMaxRows, "the host's row bound is the narrow math's");
};

/// Grid (num_splits, heads_kv / kHeads, batch).
template <Dtype kDtype, int kHeads, int kHeadDim>
__global__ void __launch_bounds__(DecodeHeadGroupConfig<kHeads, kHeadDim>::kThreads,
                                  DecodeHeadGroupConfig<kHeads, kHeadDim>::kCtasPerSm)
    decode_kernel_sm90_head_group(const __grid_constant__ DecodeTmaParams tp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Cfg = DecodeHeadGroupConfig<kHeads, kHeadDim>;
  using namespace cuda_detail;
  constexpr int BN = Cfg::kBlockN, S = Cfg::kStages, G = Cfg::kHeads, D = Cfg::kHeadDim;
  constexpr int kBoxSlots = Cfg::kBoxSlots, kTileBoxes = Cfg::kTileBoxes;
  constexpr int W = Cfg::kConsumerWarps, HPW = Cfg::kHeadsPerWarp;
  using WarpColumn = DecodeWarpColumn<HPW>;
  const DecodeParams& p = tp.p;

  const DecodeWork work = resolve_decode_work(p);  // uniform splits: never a split plan
  const int split = work.split, head0 = work.head_block * G, b = work.b;
  const int rows = p.group * p.seqlen_q;  // <= kQRows / HPW (decode_head_group_fits)
  const DecodeSeq seq = resolve_decode_seq(p, b);
  const int pad = seq.pad, end = seq.end;
  const DecodeSplitRange range(p, pad, end, split, work.splits, BN);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  const DecodeRingBarriers<S> bars(smem_raw);
  std::uint64_t *full_k = bars.full_k, *full_v = bars.full_v, *empty_k = bars.empty_k, *empty_v = bars.empty_v;
  const std::uint32_t raw = smem_u32(smem_raw);
  unsigned char* aligned = smem_raw + ((raw + Cfg::kBarrierBytes + Cfg::kAlign - 1) / Cfg::kAlign * Cfg::kAlign - raw);
  auto* sQ = reinterpret_cast<std::uint16_t*>(aligned);
  std::uint16_t* sK0 = sQ + W * Cfg::kQWarpElems;
  std::uint16_t* sV0 = sK0 + S * Cfg::kTileElems;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if (threadIdx.x == 0) bars.init(Cfg::kEmptyArrivals);
  __syncthreads();
  // The cache and the rotated q may come from the append kernel just before (dependent launch).
  pdl_wait_for_previous_kernel();
  pdl_let_next_kernel_launch();

  if (warp >= W) {
    // ---- producers: warp W loads K, warp W + 1 V; lane b < kTileBoxes issues box b of each tile,
    // every lane arrives (and helps write the zeros of a page id outside the cache).
    const bool is_k = warp == W;
    const CUtensorMap* map = is_k ? &tp.k_map : &tp.v_map;
    std::uint16_t* s0 = is_k ? sK0 : sV0;
    std::uint64_t* full = is_k ? full_k : full_v;
    std::uint64_t* empty = is_k ? empty_k : empty_v;
    const std::uint64_t policy = l2_policy_evict_first();  // the cache is read once per step
    constexpr std::uint32_t kBoxBytes = Cfg::kBoxElems * 2;
    const DecodePageWalk walk(p, seq);
    // The lane's box of a tile (box l % kTileBoxes of each, on its own page): its first slot, and
    // whether any row may see one of its slots. A tile of two boxes may end past the keys any row
    // sees: its box there is neither loaded nor its page id read (the rows are masked and zeroed
    // like those past the end of a box that is loaded). A one-box tile always has such a slot.
    const int box = lane % kTileBoxes;
    auto box_slot0 = [&](int tile) { return tile * BN + box * kBoxSlots; };
    auto box_needed = [&](int slot0) {
      return kTileBoxes == 1 || (slot0 < range.hi && slot0 + kBoxSlots > range.lo);
    };
    // Positions to tiles: DecodeSplitRange::tile_at.
    auto box_page = [&](int pos) {
      const int slot0 = box_slot0(range.tile_at(pos));
      return walk.paged() && box_needed(slot0) ? int(seq.pages[walk.page_index(slot0)]) : 0;
    };
    decode_produce_ring<S>(range.t_begin, range.t_end, empty, box_page, [&](int pos, int stage, int pg) {
      const int slot0 = box_slot0(range.tile_at(pos));
      const bool needed = box_needed(slot0);
      std::uint16_t* dst = s0 + stage * Cfg::kTileElems;
#pragma unroll
      for (int b = 0; b < kTileBoxes; ++b) {
        // A page id outside the cache: the box's rows read as zeros, written by every lane.
        const int pg_b = kTileBoxes == 1 ? pg : __shfl_sync(0xffffffffu, pg, b);
        const bool needed_b = kTileBoxes == 1 || __shfl_sync(0xffffffffu, int(needed), b) != 0;
        if (needed_b && !walk.in_cache(pg_b)) {
          for (int e = lane * 8; e < Cfg::kBoxElems; e += 32 * 8)
            *reinterpret_cast<uint4*>(dst + b * Cfg::kBoxElems + e) = make_uint4(0, 0, 0, 0);
          fence_proxy_async_smem();  // before a later TMA write of the same rows
        }
      }
      const bool load = lane < kTileBoxes && needed && walk.in_cache(pg);
      mbar_arrive_expect_tx(&full[stage], load ? kBoxBytes : 0);
      if (load) {
        tma_load_5d(dst + box * Cfg::kBoxElems, map, 0, walk.slot_coord(slot0), 0, head0, walk.row_coord(pg),
                    &full[stage], policy);
      }
    });
    return;
  }

  // ---- consumers: warp w attends KV heads head0 + w HPW .. + HPW - 1 over every tile of the split
  const int kvh0 = head0 + warp * HPW;
  {
    // Q: a thread stages chunk ch of column c of every (W * 32 / 128)-th warp's Q. Its column and
    // the divisions that place it are worked out once (done per chunk, they held the copies back
    // ~1 us at the start; bench/NOTES.md, session 29).
    const auto* gq = static_cast<const std::uint16_t*>(p.q);
    constexpr int kChunks = D / 8, kWarpChunks = Cfg::kQRows * kChunks;
    static_assert(Cfg::kConsumerThreads % kWarpChunks == 0, "a thread's column and chunk are the same in every warp");
    const int c = threadIdx.x / kChunks % Cfg::kQRows, ch = threadIdx.x % kChunks;
    const WarpColumn col(head0, rows, c);  // column c of warp 0; warp w's is HPW w KV heads on
    const std::int64_t col_off = col.ok ? b * p.q_batch_stride + std::int64_t(col.pm % p.seqlen_q) * p.q_row_stride +
                                              std::int64_t(col.kvh * p.group + col.pm / p.seqlen_q) * p.q_head_stride +
                                              ch * 8
                                        : 0;
    const std::int64_t warp_off_q = col.ok ? std::int64_t(HPW) * p.group * p.q_head_stride : 0;
    for (int w = threadIdx.x / kWarpChunks; w < W; w += Cfg::kConsumerThreads / kWarpChunks)
      cuda_prefill::cp_async_16(sQ + w * Cfg::kQWarpElems + Cfg::q_offset(c, ch), gq + col_off + w * warp_off_q, col.ok);
    cute::cp_async_fence();
    cute::cp_async_wait<0>();
    named_barrier_sync(1, Cfg::kConsumerThreads);
  }
  const typename Cfg::KvLayout kv = Cfg::kv_layout();
  using WarpState = DecodeWarpStateNarrow<D, HPW>;
  WarpState st;
  st.init(p, b, kvh0, pad, end, lane);
  st.bind_layout(kv, 0, lane);
  st.template load_q<Cfg>(sQ + warp * Cfg::kQWarpElems, lane);
  const int warp_off = warp * Cfg::kWarpBoxElems;
  for (int pos = range.t_begin, stage = 0, phase = 0; pos < range.t_end; ++pos) {
    mbar_wait(&full_k[stage], phase);
    const int n0 = range.tile_at(pos) * BN;
    const bool edge = n0 < range.lo || n0 + BN > range.hi;
    // A stage read: one arrival per warp, or per lane in the token-row form (kEmptyArrivals), where
    // the producer refills the stage.
    const bool refilled = decode_stage_refilled(pos, S, range.t_end);
    const auto release = [&](std::uint64_t* empty) {
      if (!refilled) return;
      if constexpr (HPW == 1) {
        warp_release_stage(empty, lane);
      } else {
        fence_proxy_async_smem();
        mbar_arrive(empty);
      }
    };
    // The tile's boxes one after the other, 16 MMA keys each: K is released once the last box has
    // its scores, and V waited for before the first box's P V.
#pragma unroll
    for (int box = 0; box < kTileBoxes; ++box) {
      const std::uint16_t* sK = sK0 + stage * Cfg::kTileElems + box * Cfg::kBoxElems + warp_off;
      std::uint16_t* sV = sV0 + stage * Cfg::kTileElems + box * Cfg::kBoxElems + warp_off;
      const int nb = n0 + box * kBoxSlots;  // the box's first slot
      const auto k_done = [&] {
        if (box == kTileBoxes - 1) release(&empty_k[stage]);
      };
      const auto v_wait = [&] {
        if (box == 0) mbar_wait(&full_v[stage], phase);
        if (edge) {
          // V rows outside [lo, hi): zeros (0 x NaN would be NaN).
          for (int idx = lane; idx < kDecodeHeadGroupSlots * (D / 8); idx += 32) {
            const int key = idx / (D / 8), ch = idx % (D / 8), slot = nb + WarpState::key_slot(key);
            if (slot < range.lo || slot >= range.hi)
              *reinterpret_cast<uint4*>(sV + kv.offset(key, ch)) = make_uint4(0, 0, 0, 0);
          }
          __syncwarp();
        }
      };
      st.template attend<Cfg, kDtype>(p, sQ, sK, sV, kv, nb, 0, pad, end, lane, k_done, v_wait);
    }
    release(&empty_v[stage]);  // also orders the edge tiles' zeros before the refill
    if (++stage == S) stage = 0, phase ^= 1;
  }

  // ---- the warp's columns, normalised, through its part of stage 0's first K box (every tile has
  // landed and been read; no copy writes there any more), stored four values at a time by the
  // lanes below D / 4. Value j of column c sits at j ^ 8 (c / 2) of the column's row, so that a
  // store of the 32 lanes (8 values of 4 column pairs) hits 32 banks (without, 4 lanes shared a
  // bank).
  __syncwarp();  // every lane's reads before any lane's writes (the last tiles have no warp_release_stage)
  float* orows = reinterpret_cast<float*>(sK0 + warp_off);  // [column][D]
  const auto orow_at = [](int c, int j) { return c * D + (j ^ (8 * (c >> 1))); };  // value j of column c
  constexpr float kLn2 = 0.6931471805599453f;
  const int g = lane / 4, t = lane % 4;
  const int columns = HPW * rows;  // the warp's columns that are a query row (<= 8)
  float lse[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int c = 2 * t + e;
    const float sum = key_lanes_sum(st.row_sum[e]);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // no key: output 0
    lse[e] = sum > 0.0f ? (st.row_max[e] + __log2f(sum)) * kLn2 : -INFINITY;
    if (c < columns) {
#pragma unroll
      for (int mt = 0; mt < D / 16; ++mt) {
        orows[orow_at(c, 16 * mt + g)] = st.acc_o[mt][e] * inv;
        orows[orow_at(c, 16 * mt + g + 8)] = st.acc_o[mt][2 + e] * inv;
      }
    }
  }
  // Lane c works out where column c goes (divisions by rows and seqlen_q) and takes column c's LSE
  // (lane c / 2 holds it), once. With sinks on a finished column, lane c also folds column c's sink
  // into its LSE once, and the loop hands round the weight with it: a lane folding all eight
  // columns in turn cost 0.5 us on a CTA's tail (bench/NOTES.md, session 75).
  DecodeValueSlot slot{0, 0, 0};
  if (lane < columns) {
    const WarpColumn col(kvh0, rows, lane);
    slot = decode_value_slot(p, work, col.kvh, col.pm);
  }
  const float lse_even = __shfl_sync(0xffffffffu, lse[0], lane >> 1);
  const float lse_odd = __shfl_sync(0xffffffffu, lse[1], lane >> 1);
  float own_lse = lane & 1 ? lse_odd : lse_even, own_weight = 1.0f;
  const bool fold = p.sinks && work.splits == 1;
  if (fold && lane < columns) {
    const MergeWeights w = merge_weights(own_lse, p.sinks[slot.head * p.sinks_stride]);
    own_lse = w.lse;
    own_weight = w.w_a;
  }
  __syncwarp();
  const int c4 = lane * 4;
  for (int c = 0; c < columns; ++c) {
    const DecodeValueSlot at{__shfl_sync(0xffffffffu, slot.value, c), __shfl_sync(0xffffffffu, slot.lse, c), 0};
    const float col_lse = __shfl_sync(0xffffffffu, own_lse, c);
    const float col_weight = fold ? __shfl_sync(0xffffffffu, own_weight, c) : 1.0f;
    if (c4 < D) {
      float4 v = *reinterpret_cast<const float4*>(orows + orow_at(c, c4));
      if (fold) v.x *= col_weight, v.y *= col_weight, v.z *= col_weight, v.w *= col_weight;
      decode_store_value4_at<kDtype, false>(p, work, at, c4, v, col_lse);
    }
  }
#endif
}

template <Dtype kDtype, int kHeads, int kHeadDim = kDecodeHeadGroupHeadDim>
void launch_decode_sm90_head_group_form(const DecodeParams& p, cudaStream_t stream) {
  using Cfg = DecodeHeadGroupConfig<kHeads, kHeadDim>;
  auto* kernel = &decode_kernel_sm90_head_group<kDtype, kHeads, kHeadDim>;
  static const cudaError_t attr_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  FASTATTN_CUDA_CHECK(attr_status);
  if (p.split_plan) throw Error("decode: the head-group kernel got a split plan (an internal planning error)");
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
  // with a box of 16 slots (4 in the token-row form), every column block and the CTA's kHeads
  // heads. (box_run_shift is the per-head kernel's; this kernel has its own layouts.)
  const int box[5] = {64, Cfg::kBoxSlots, tp.box_blocks, Cfg::kHeads, 1};
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
  if (p.head_group == kDecodeHeadGroupRows) launch_decode_sm90_head_group_form<kDtype, kDecodeHeadGroupRows>(p, stream);
  else if (p.head_group == kDecodeHeadGroupWide && p.head_dim == kDecodeHeadGroupWideSmallHeadDim)
    launch_decode_sm90_head_group_form<kDtype, kDecodeHeadGroupWide, kDecodeHeadGroupWideSmallHeadDim>(p, stream);
  else if (p.head_group == kDecodeHeadGroupWide) launch_decode_sm90_head_group_form<kDtype, kDecodeHeadGroupWide>(p, stream);
  else if (p.head_group == kDecodeHeadGroup) launch_decode_sm90_head_group_form<kDtype, kDecodeHeadGroup>(p, stream);
  else throw Error("decode: the head-group kernel got no form to run (an internal planning error)");
}

#define FASTATTN_INSTANTIATE_DECODE_SM90_HEAD_GROUP(T) \
  template void launch_decode_sm90_head_group<T>(const DecodeParams&, cudaStream_t);

}  // namespace fastattn::cuda_decode
