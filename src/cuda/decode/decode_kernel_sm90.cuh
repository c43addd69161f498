// The decode attention kernel for sm_90: the math of decode_kernel.cuh (decode_tile.cuh), or for
// CTAs of at most 8 packed query rows the keys-as-M-side math of decode_tile_narrow.cuh, with the
// cache streamed by the TMA engine instead of per-thread cp.async.
//
// Why: the cp.async kernel issues sixteen 16-byte copies per 256-byte row plus their address
// math, and every tile ends in a CTA-wide barrier; one CTA moved at most ~20 GB/s and large
// batches stopped at 4.3-4.4 TB/s. Here two producer warps, one for K and one for V, load each
// 64-key tile as a few TMA boxes (R rows x all head_dim columns: R = 64 for a contiguous cache or
// pages of a multiple of 64 slots, R = page_size for pages of 8, 16 or 32 slots) into a ring of
// kStages stages, K and V each guarded by their own full / empty mbarriers (a stage's K is
// refilled while the consumers still read its V); the four consumer warps (16 keys of every tile
// each, as in the cp.async kernel) never wait on each other until the final merge. (One bulk
// copy per 256-byte row was measured first: 1.7 TB/s, the TMA engine's cost per request
// dominates small copies.) The reads use an evict-first L2 policy and 128-byte L2 promotion
// (launch_decode_sm90 says why).
//
// Shared memory (1024-byte aligned after the barriers): Q | K stages | V stages. Q is stored as
// head_dim / 64 column blocks of [rows][64], a K or V stage as 64 / R runs of [column block][R]
// [64] (one box each, see KvLayout), all with the 128-byte swizzle the TMA writes (16-byte chunk
// c of row r at c ^ (r % 8)), so ldmatrix rows fall on distinct banks.
//
// The head-pair form (kHeads = 2, head_dim 64 or 128, at most 8 packed query rows): one CTA attends
// two adjacent KV heads of a sequence with four consumer warps each, one CTA per SM, and every box
// spans both heads, so DRAM sees runs of 2 x head_dim x 2 bytes of the token-major cache (256 or
// 512) instead of one head's 128 or 256. Where batch x heads_kv / 2 CTAs fill one wave at one per
// SM (one of the planner's rules; the other takes it on small grids, its splits merged in clusters),
// a no-math read of the H200 drew 1-1.7% more from that pattern than from the per-head one at
// head_dim 128 with no split to merge (bench/NOTES.md, session 15), 1.3-3% at head_dim 64 (session
// 32). A stage is then [run][head][column block][R][64]: head h of run r sits
// R * head_dim elements after head h - 1 (KvLayout's run stride counts both heads).
//
// The head-quad form (kHeads = 4, head_dim 64 only, at most 8 packed query rows) is the same with
// four heads: 16 consumer warps, boxes of 512-byte runs, 3 stages of 32 KB per tensor, one CTA per
// SM. What it buys over the pair is fewer, longer CTAs (bench/NOTES.md, session 33): at a 1k cache
// a per-head CTA streams ~18 us of a 71 us call and pays its start (length, Q, first boxes) and
// end (merge, stores) each time; an SM runs half as many quad CTAs one after another.
//
// Rows a box brings in that no query may see (before `lo` or from `hi` on, e.g. past the end of
// the last page) are real cache bytes, possibly garbage: scores there are masked to -inf, and
// the consumer zeroes those V rows before P V (0 x NaN would be NaN): in shared memory, or in the
// row pair, where two warps read the same rows, in its V fragments (DecodeVEdgeMask). Boxes of a
// page id outside the cache are not loaded; the producer writes their rows as zeros (the
// documented "reads as zeros").
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <type_traits>

#include "common/softmax_state.h"
#include "cuda/common/cluster.cuh"
#include "cuda/common/cuda_check.h"
#include "cuda/common/mbarrier.cuh"
#include "cuda/common/tensor_map.h"
#include "cuda/decode/decode_common.cuh"
#include "cuda/decode/decode_launch.h"
#include "cuda/decode/decode_tile.cuh"
#include "cuda/decode/decode_tile_narrow.cuh"
#include "fastattn/error.h"

namespace fastattn::cuda_decode {

/// DecodeParams plus the TMA maps of the two caches and their boxes. A map is 5-d: 64 columns x
/// slots per row x column blocks (64 columns apart) x heads_kv x rows, where a row is a page or a
/// contiguous cache row; a box is R slots of all kColBlocks column blocks of one head. When
/// head_dim is not the kernel's (e.g. 96 in the 128 kernel) a block past head_dim must read as
/// zeros, so the map is head_dim columns x slots x 1 x heads_kv x rows and a box one 64-column
/// block (box_blocks = 1), the columns past head_dim zero-filled by the TMA.
struct DecodeTmaParams {
  DecodeParams p;
  CUtensorMap k_map, v_map;
  int box_run_shift;  ///< log2(R), R = decode_tma_box_rows(page_size): divides 64 and the page size
  int box_blocks;     ///< 64-column blocks per box: kColBlocks, or 1 (see above)
  /// 1 where the producers warm the first chunk's translations too (decode_warms_first_chunk;
  /// decode_kernel_sm90's `warm`; the head-group kernel does not read it).
  int warm_first_chunk = 0;
};

/// Whether a grid of `ctas` CTAs of kernel config Cfg warms its first chunk: only where every CTA
/// runs at once (one wave), and with one head per CTA at head_dim <= 128 only where the grid has
/// more CTAs than half the SMs. Why: on a wave of 128-256 CTAs that start together, dropping the
/// first chunk's warm cost contiguous caches 0.2-3.0%; on the 64-CTA one-head grids of batch 1-4
/// it only delays each CTA's first boxes: without it every such row measured ran 0.1-5.9% faster
/// (head_dim 64 and 128, 1k-16k, both layouts). The head pair's 64-CTA grids were mixed (without
/// it -2.3 to +1.8%) and keep it (bench/NOTES.md, session 46).
template <class Cfg>
bool decode_warms_first_chunk(std::int64_t ctas, int sm_count) {
  if (ctas > std::int64_t(Cfg::kCtasPerSm) * sm_count) return false;
  const bool small_one_head_grid = Cfg::kHeads == 1 && Cfg::kHeadDim <= 128 && 2 * ctas <= sm_count;
  return !small_one_head_grid;
}

/// The warm's lines in a box (decode_kernel_sm90's `warm`) are one every 16 rows, or every 8 for
/// the head pair at head_dim 128 where the grid is one wave that warms its first chunk, a CTA streams
/// at most kDecodeDenseWarmMaxTiles tiles, and heads_kv >= kDecodeDenseWarmMinHeadsKv (a pair's
/// 512-byte runs are then at most 1/16 of a token row). Why: on the H200, over five machines, the
/// denser warm made paged MHA batch 8 / 8k 0.24-0.51% faster every time (0.43% under this rule, on a
/// sixth), but GQA 8 batch 32 / 8k anywhere from 0.35% faster to 0.03% slower, the pair's 32k rows
/// (512 tiles a CTA) 0.4-0.5% slower, and in the per-head kernel the 15-wave MHA batch 128 / 1k grid
/// 0.2-0.3% slower (bench/NOTES.md, session 56). Head_dim 64 and 256 were not measured; they and the
/// per-head kernel keep one line in 16 rows.
constexpr int kDecodeDenseWarmMaxTiles = 128;
constexpr int kDecodeDenseWarmMinHeadsKv = 32;

/// Shared memory one CTA may opt in to on sm_90 (227 KB).
constexpr int kDecodeSm90MaxSmemBytes = 227 * 1024;

template <int kHeadDim_, int kHeads_ = 1, int kRowBlocks_ = 1>
struct DecodeSm90Config {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kHeads = kHeads_;  ///< KV heads per CTA: 1, 2 (head pair) or 4 (head quad)
  static constexpr int kRowBlocks = kRowBlocks_;  ///< row blocks of one head per CTA: 1, or 2 (row pair)
  /// Teams of kDecodeWarps consumer warps, one per (head, row block) of the CTA; team t attends
  /// head t / kRowBlocks, row block t % kRowBlocks.
  static constexpr int kTeams = kHeads * kRowBlocks;
  static constexpr int kConsumerThreads = kTeams * kDecodeWarps * 32;
  static constexpr int kThreads = kConsumerThreads + 64;  // + the K and the V producer warps
  static constexpr int kBlockN = kDecodeBlockN;
  static constexpr int kWarpKeys = kBlockN / kDecodeWarps;
  static constexpr int kColBlocks = kHeadDim / 64;  // 64-column (128-byte) blocks per row
  static __device__ __forceinline__ int swizzled(int rows, int row, int chunk) {
    return (chunk >> 3) * (rows * 64) + row * 64 + (((chunk & 7) ^ (row & 7)) << 3);
  }
  static __device__ __forceinline__ int q_offset(int row, int chunk) { return swizzled(kDecodeRows, row, chunk); }
  /// One head's view of a K / V stage as the boxes leave it: runs of R = 2^run_shift rows, each
  /// [column block][R][64] (R = 64: [column block][64][64], one run); with two heads per CTA the
  /// runs of the two heads alternate, so a run's stride is kHeads runs (the head's own base is
  /// the caller's). R >= 8, so row % 8 is the row's place in the swizzle atom either way.
  struct KvLayout {
    /// A row's place in the swizzle atom is the same in every column block.
    static constexpr std::uint32_t kBlockXorBytes = 0;
    int run_shift;
    __device__ __forceinline__ int offset(int row, int chunk) const {
      const int in_run = row & ((1 << run_shift) - 1);
      return (row - in_run) * (kHeads * kHeadDim) + (chunk >> 3) * (64 << run_shift) + in_run * 64 +
             (((chunk & 7) ^ (row & 7)) << 3);
    }
    /// Elements between a row's 64-column blocks.
    __device__ __forceinline__ int block_elems() const { return 64 << run_shift; }
  };
  static constexpr int kTileElems = kBlockN * kHeadDim;     ///< one head's part of a stage
  static constexpr int kStageElems = kHeads * kTileElems;   ///< a K or a V stage
  static constexpr int kStageBytes = 2 * kStageElems * 2;  // K and V
  // Stages and CTAs per SM: as many bytes in flight as 227 KB allow (d64: 2 x 6 x 16 KB,
  // d128: 2 x 3 x 32 KB, d256: 1 x 3 x 64 KB). (A ring of twice the stages at one CTA per SM,
  // for grids that fit one CTA per SM, streamed one CTA 7% faster but made the calls the split
  // heuristic makes 1-1.5 us slower: bench/NOTES.md.)
  // Two heads: d64 6 x 32 KB, d128 3 x 64 KB, in one CTA per SM (the same bytes in flight per SM
  // as two one-head CTAs); four heads (d64): 3 x 64 KB. The row pair, one CTA per SM: d64 12 x 16
  // KB, d128 6 x 32 KB, again what two one-head CTAs hold.
  static constexpr int kCtasPerSm = kHeadDim <= 128 && kTeams == 1 ? 2 : 1;
  static constexpr int kStages = kRowBlocks > 1 ? (kHeadDim <= 64 ? 12 : 6) : kHeadDim <= 64 && kHeads <= 2 ? 6 : 3;
  static constexpr int kBarrierBytes = kStages <= 8 ? 256 : 512;
  static constexpr int kAlign = 1024;  // the 128-byte swizzle repeats every 8 rows of 128 bytes
  static constexpr int kQHeadElems = kDecodeRows * kHeadDim;
  static constexpr int kQBytes = kTeams * kQHeadElems * 2;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  /// Each team's warps merge in their own part of the stages (decode_merge_warps).
  static constexpr int kMergeFloats = decode_merge_bytes<kHeadDim>() / 4;
  static constexpr int kMergeBytes = kTeams * kMergeFloats * 4;
  static constexpr int kSmemBytes = kBarrierBytes + kAlign + kQBytes + (kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes);
  // Cluster merge (decode_cluster_merge): the first CTA of a cluster receives every split's
  // partial state of each of its heads into a slot of its shared memory: 16 floats of row LSEs,
  // then [kDecodeRows][kHeadDim] values. Where one head's slots fit after the rest of the shared
  // memory (kClusterSlots), a launch with clusters asks for kSmemBytes + num_splits * kSlotBytes
  // and the splits store into them whenever they are done. Else (the 256 kernel, whose stages take
  // 192 KB, and the head-pair, head-quad and row-pair forms, whose stages take 192 KB of a CTA per
  // SM) the slots reuse the first CTA's stages once it has streamed its tiles and merged its warps:
  // slot split x kTeams + team is the (split x kTeams + team)-th from the end of the stages, clear
  // of the teams' warp-merge scratch at their start for split 0, the first CTA's own
  // (stage_slot_floats).
  static constexpr int kSlotLseFloats = 16;
  static constexpr int kSlotFloats = kSlotLseFloats + kDecodeRows * kHeadDim;
  static constexpr int kSlotBytes = kSlotFloats * 4;
  static constexpr bool kClusterSlots =
      kTeams == 1 && kSmemBytes + kMaxClusterSplits * kSlotBytes <= kDecodeSm90MaxSmemBytes;
  static constexpr int stage_slot_floats(int s) { return kPipeBytes / 4 - (s + 1) * kSlotFloats; }
  /// Dynamic shared memory of a launch whose splits merge in clusters of `cluster_splits` (0: none).
  static constexpr int launch_smem_bytes(int cluster_splits) {
    return kSmemBytes + (kClusterSlots ? cluster_splits * kSlotBytes : 0);
  }
  static_assert(kClusterSlots || (kMaxClusterSplits * kTeams * kSlotBytes <= kPipeBytes &&
                                  stage_slot_floats(kTeams - 1) * 4 >= kMergeBytes),
                "the slots fit in the stages, the first CTA's own clear of the warp-merge scratch");
  static_assert(kClusterSlots || stage_slot_floats(kMaxClusterSplits * kTeams - 1) >=
                                     (kTeams - 1) * kMergeFloats + (kMaxClusterSplits + 1) * kDecodeRows,
                "every slot clear of each team's decode_cluster_merge scratch");
  static_assert(kDecodeRows <= kSlotLseFloats && kSmemBytes % 16 == 0, "slots are 16-byte aligned");
  static_assert(4 * kStages * 8 <= kBarrierBytes && kBarrierBytes % 256 == 0, "barriers fit their region");
  static_assert(kQBytes % kAlign == 0, "stages start on a swizzle atom");
  static_assert(kCtasPerSm * (kSmemBytes + 1024) <= 228 * 1024, "the CTAs per SM fit its shared memory");
  static_assert(kHeads == 1 || (kHeads == kDecodeHeadPair && decode_head_pair_head_dim(kHeadDim)) ||
                    (kHeads == kDecodeHeadQuad && kHeadDim == kDecodeHeadQuadHeadDim),
                "the head-pair form is built for head_dim 64 and 128, the head-quad form for 64");
  static_assert(kRowBlocks == 1 || (kHeads == 1 && kRowBlocks == kDecodeRowPair && kHeadDim <= kDecodeRowPairMaxHeadDim),
                "the row-pair form is one head's two row blocks, up to head_dim 128");
  static_assert(kDecodeHeadPairMaxRows == kDecodeNarrowRows, "the host's head-pair row bound is the narrow math's");
  static_assert(kDecodeWideRowsAbove == kDecodeNarrowRows, "the split rule's wide rows are the narrow math's bound");
};

/// The ring's barriers at the start of shared memory, [full_k | full_v | empty_k | empty_v] x
/// kStages: a stage's K and V each have a full barrier (one arrival per lane of the tensor's
/// producer warp, with the bytes of its boxes) and an empty one (one arrival per consumer warp, or
/// per consumer lane: see init).
template <int kStages>
struct DecodeRingBarriers {
  std::uint64_t *full_k, *full_v, *empty_k, *empty_v;
  __device__ __forceinline__ explicit DecodeRingBarriers(unsigned char* smem)
      : full_k(reinterpret_cast<std::uint64_t*>(smem)),
        full_v(full_k + kStages),
        empty_k(full_v + kStages),
        empty_v(empty_k + kStages) {}
  /// By one thread; the CTA synchronises before any use. empty_arrivals: the consumer warps, or
  /// what else the kernel counts (the head-group kernel's token-row form: its consumer lanes).
  __device__ __forceinline__ void init(int empty_arrivals) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    for (int s = 0; s < kStages; ++s) {
      cuda_detail::mbar_init(&full_k[s], 32);
      cuda_detail::mbar_init(&full_v[s], 32);
      cuda_detail::mbar_init(&empty_k[s], empty_arrivals);
      cuda_detail::mbar_init(&empty_v[s], empty_arrivals);
    }
    cuda_detail::mbar_fence_init();
#endif
  }
};

/// What a producer lane needs of the cache's geometry at every tile, read from the parameters once
/// and kept in registers for the walk: a box's page id (index into the sequence's page list), the
/// id's range check and the box's coordinates c1 (slot), c4 (row) in the decode maps (slot `slot0`
/// of the sequence lies in its contiguous cache row, or in page `page` of a paged cache). The
/// values pass through a shuffle (the same in every lane) because ptxas sees through anything
/// else and reads the constant bank again after every stage's wait. On the H200 those reads cost
/// paged batch 8 / 1k and batch 1 / 8k (64 CTAs of 16 tiles) ~0.2 µs (bench/NOTES.md, session 16).
struct DecodePageWalk {
  int page_size, page_shift, num_pages, row;
  __device__ __forceinline__ DecodePageWalk(const DecodeParams& p, const DecodeSeq& seq)
      : page_size(__shfl_sync(0xffffffffu, p.page_size, 0)),
        page_shift(__shfl_sync(0xffffffffu, p.page_shift, 0)),
        num_pages(__shfl_sync(0xffffffffu, p.num_pages, 0)),
        row(seq.row) {}
  __device__ __forceinline__ bool paged() const { return page_size > 0; }
  __device__ __forceinline__ int page_index(int slot) const { return page_index_of(page_size, page_shift, slot); }
  __device__ __forceinline__ bool in_cache(int page) const { return !paged() || (page >= 0 && page < num_pages); }
  __device__ __forceinline__ int slot_coord(int slot0) const {
    return paged() ? slot_in_page(page_size, page_shift, slot0) : slot0;
  }
  __device__ __forceinline__ int row_coord(int page) const { return paged() ? page : row; }
};

/// Whether the stage of ring position `pos` is refilled: the producer walks below (decode_produce_ring,
/// decode_produce_ring_rotating) wait for a stage's release only to load position pos + stages into
/// it, so consumers release it only then. Not releasing the last `stages` positions keeps their proxy
/// fences and arrivals off the CTA's tail (0.2-0.5 us of a one-wave 1k call, bench/NOTES.md session 55).
__device__ __forceinline__ bool decode_stage_refilled(int pos, int stages, int t_end) { return pos + stages < t_end; }

/// A producer warp's walk over the ring: positions t_begin .. t_end - 1 in order (the caller maps
/// a position to its tile, DecodeSplitRange::tile_at), position t into stage t % S (counted from
/// t_begin), each once its stage is free (`empty`, from the second round on): issue(pos, stage,
/// page), page = page_of(pos) (a raw page id, or whatever the caller needs per tile) loaded S
/// positions ahead, so a paged split's first tiles wait for one id round trip, not one per tile.
/// The loop runs S tiles per round, unrolled, so the S ids stay in registers. (The head-group
/// kernel's walk, one box per tile from one lane, or two from two lanes, each lane with its own
/// page_of; the per-head and head-pair kernels take decode_produce_ring_rotating below.)
template <int S, class PageOf, class Issue>
__device__ __forceinline__ void decode_produce_ring(int t_begin, int t_end, std::uint64_t* empty, PageOf page_of,
                                                    Issue issue) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  int page[S];
#pragma unroll
  for (int s = 0; s < S; ++s) page[s] = t_begin + s < t_end ? page_of(t_begin + s) : 0;
  for (int base = t_begin, round = 0; base < t_end; base += S, ++round) {
#pragma unroll
    for (int stage = 0; stage < S; ++stage) {
      const int tile = base + stage;
      if (tile >= t_end) break;
      const int pg = page[stage];
      if (tile + S < t_end) page[stage] = page_of(tile + S);
      if (round > 0) cuda_detail::mbar_wait(&empty[stage], (round - 1) & 1);
      issue(tile, stage, pg);
    }
  }
#endif
}

/// The per-head and head-pair kernels' producer walk: decode_produce_ring's order and waits, with
/// the page ids in rotation instead of loaded per tile. A tile's boxes are issued by one group of
/// `boxes` lanes, and the warp's 32 / boxes groups take the tiles in turn, a chunk of 32 / boxes
/// tiles: the lanes of group g issue the boxes of the chunk's tile g. So a lane needs one page id
/// per chunk, its own, and the warp fetches a chunk's ids together, a chunk ahead: fetch(c0) is
/// this lane's id for the chunk starting at position c0 (one coalesced load over the warp).
/// Tiles are counted as positions, as in decode_produce_ring.
/// issue(pos, stage, id, mine): mine is whether this lane's group has the tile. warm(c0, id): the
/// lane's box in the chunk from c0 is on page `id`; called for the first chunk as it starts and
/// for every later one halfway through the chunk before (chunks of 4 tiles or more), ahead of the
/// boxes.
/// Why: every request a producer lane sends for the page list costs the box stream, whatever unit
/// sends it, while one per warp per 8 tiles costs nothing measurable; a per-tile shuffle that
/// hands a chunk's ids to fixed lanes did not recover the loads' cost (bench/NOTES.md, sessions
/// 25-26). With ids in rotation, paged 16 through an identity table runs within 0.1-0.3% of
/// contiguous; what a random page pool costs on top is mostly the pages' translations (session 26).
template <int S, class Fetch, class Issue, class Warm>
__device__ __forceinline__ void decode_produce_ring_rotating(int t_begin, int t_end, int chunk_tiles, int group,
                                                             std::uint64_t* empty, Fetch fetch, Issue issue,
                                                             Warm warm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int lane = threadIdx.x % 32;
  int next = fetch(t_begin), id = 0, k = chunk_tiles;  // k: the tile's place in its chunk
  for (int base = t_begin, round = 0; base < t_end; base += S, ++round) {
#pragma unroll
    for (int stage = 0; stage < S; ++stage) {
      const int tile = base + stage;
      if (tile >= t_end) break;
      if (k == chunk_tiles) {  // the same in every lane
        // A shuffle, not a copy: ptxas folds a copy into the load's register, and the next fetch
        // then goes to a temporary copied back after waiting for it.
        id = __shfl_sync(0xffffffffu, next, lane);
        if (tile == t_begin) warm(tile, id);
        k = 0;
        if (tile + chunk_tiles < t_end) next = fetch(tile + chunk_tiles);
      }
      // Halfway through a chunk of at least 4 tiles (its ids long in), the next chunk's boxes: 4-11
      // tiles of lead at pages of 16. (In shorter chunks the next ids were only just asked for.)
      const int next_chunk = tile - k + chunk_tiles;
      if (chunk_tiles >= 4 && k == chunk_tiles / 2 && next_chunk < t_end) warm(next_chunk, next);
      if (round > 0) cuda_detail::mbar_wait(&empty[stage], (round - 1) & 1);
      issue(tile, stage, id, k == group);
      ++k;
    }
  }
#endif
}

/// The split-KV combine of a cluster's p.num_splits (<= kMaxClusterSplits) CTAs of one
/// (b, kvh, mb), in its first CTA once every split's partial state can be read: lse_of(s, r) is
/// split s's natural-log LSE of row r of the block, values_of(s, r, c) its normalised values in
/// columns c .. c + 3 (a float4). One thread per row turns the splits' LSEs into weights and the
/// merged LSE (in `scratch`, kMaxClusterSplits + 1 floats per row), then every output value is a
/// dot product over the splits, four columns per thread. `sync` is a barrier over the consumer
/// threads. (MergeAccumulator per value, as the combine kernel does it, is a chain of sixteen
/// exponentials and eight divisions per thread: ~2 us of a batch 1 / 1k step.)
template <int kHeadDim, Dtype kDtype, class LseOf, class ValuesOf, class Sync>
__device__ __forceinline__ void decode_cluster_merge(const DecodeParams& p, LseOf lse_of, ValuesOf values_of,
                                                     float* scratch, int b, int kvh, int mb, int tid, Sync sync) {
  using Cfg = DecodeSm90Config<kHeadDim>;
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
  const int rows = decode_block_rows(p.group * p.seqlen_q, mb);
  const int ns = p.num_splits;
  float* weights = scratch;                                       // [split][row]
  float* merged_lse = scratch + kMaxClusterSplits * kDecodeRows;  // [row]
  if (tid < rows) {
    float lse[kMaxClusterSplits], m = -INFINITY;
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) {
      lse[s] = s < ns ? lse_of(s, tid) : -INFINITY;
      m = fmaxf(m, lse[s]);
    }
    float e[kMaxClusterSplits], sum = 0.0f;
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) {
      e[s] = m == -INFINITY ? 0.0f : exp2f((lse[s] - m) * kLog2e);  // 0 for an empty split
      sum += e[s];
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // every split empty: output 0
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) weights[s * kDecodeRows + tid] = e[s] * inv;
    merged_lse[tid] = sum > 0.0f ? m + __log2f(sum) * kLn2 : -INFINITY;
  }
  sync();
  const int chunks = p.head_dim / 4;
  for (int idx = tid; idx < rows * chunks; idx += Cfg::kConsumerThreads) {
    const int r = idx / chunks, c = idx % chunks * 4;
    float4 val = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) {
      if (s >= ns) break;
      const float w = weights[s * kDecodeRows + r];
      const float4 o = values_of(s, r, c);
      val.x += w * o.x, val.y += w * o.y, val.z += w * o.z, val.w += w * o.w;
    }
    decode_store_output4<kDtype>(p, b, kvh, mb * kDecodeRows + r, c, val, merged_lse[r]);
  }
}

/// Grid (num_splits, heads_kv * row blocks, batch) for one head per CTA; (num_splits, heads_kv / 2,
/// batch) for the head-pair form (kHeads = 2: one row block, at most 8 packed rows); (num_splits,
/// heads_kv * ceil(row blocks / 2), batch) for the row pair (kRowBlocks = 2).
template <int kHeadDim, Dtype kDtype, int kHeads, int kRowBlocks>
__global__ void __launch_bounds__(DecodeSm90Config<kHeadDim, kHeads, kRowBlocks>::kThreads,
                                  DecodeSm90Config<kHeadDim, kHeads, kRowBlocks>::kCtasPerSm)
    decode_kernel_sm90(const __grid_constant__ DecodeTmaParams tp) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Cfg = DecodeSm90Config<kHeadDim, kHeads, kRowBlocks>;
  using namespace cuda_detail;
  constexpr int BN = Cfg::kBlockN, S = Cfg::kStages;
  constexpr int kTeams = Cfg::kTeams;
  constexpr int kConsumerWarps = kTeams * kDecodeWarps;
  const DecodeParams& p = tp.p;

  // A split plan runs only the per-head forms (kHeads 1: decode_kv_heads_per_cta).
  const DecodeWork work = resolve_decode_work(p);
  const int split = work.split, b = work.valid ? work.b : 0;  // b's loads need not wait for the check
  const int rows_total = p.group * p.seqlen_q;
  const int head_ctas = kHeads == 1 ? decode_row_block_ctas(p.group, p.seqlen_q, kRowBlocks) : 1;  // CTAs per KV head
  // The CTA's first KV head (the boxes' head coordinate) and first row block; a consumer warp's
  // own head is kvh, its team's row block mb.
  const int kvh0 = kHeads == 1 ? work.head_block / head_ctas : work.head_block * kHeads;
  const int mb0 = (kHeads == 1 ? work.head_block % head_ctas : 0) * kRowBlocks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int team = kTeams > 1 && warp < kConsumerWarps ? warp / kDecodeWarps : 0;  // a consumer warp's team in the CTA
  const int head = team / kRowBlocks, mb = mb0 + team % kRowBlocks;
  const int kvh = kvh0 + head;
  const DecodeSeq seq = resolve_decode_seq(p, b);
  if (!work.valid) {  // a split plan's entry out of range (every thread alike; no cluster)
    pdl_wait_for_previous_kernel();  // still complete after the append kernel
    return;
  }
  const int pad = seq.pad, end = seq.end;
  const DecodeSplitRange range(p, pad, end, split, work.splits, BN);

  extern __shared__ __align__(128) unsigned char smem_raw[];
  // A stage's K and V have their own full and empty barriers: K is refilled as soon as every
  // consumer warp has its scores, and P V waits only for V.
  const DecodeRingBarriers<S> bars(smem_raw);
  std::uint64_t *full_k = bars.full_k, *full_v = bars.full_v, *empty_k = bars.empty_k, *empty_v = bars.empty_v;
  const std::uint32_t raw = smem_u32(smem_raw);
  unsigned char* aligned = smem_raw + ((raw + Cfg::kBarrierBytes + Cfg::kAlign - 1) / Cfg::kAlign * Cfg::kAlign - raw);
  auto* sQ0 = reinterpret_cast<std::uint16_t*>(aligned);  // [team][Q of kDecodeRows rows]
  std::uint16_t* sK0 = sQ0 + kTeams * Cfg::kQHeadElems;
  std::uint16_t* sV0 = sK0 + S * Cfg::kStageElems;

  if (threadIdx.x == 0) bars.init(kConsumerWarps);
  __syncthreads();
  // A CTA may write into another's shared memory only once that one has started: every thread
  // arrives here, and a thread waits for this phase before its first remote store (at the end).
  if (p.cluster_combine) cluster_arrive_relaxed();
  // Everything above read only the caller's index tensors; the cache and the rotated q may come
  // from the append kernel just before (dependent launch): wait for it, then let the combine
  // kernel start launching.
  pdl_wait_for_previous_kernel();
  pdl_let_next_kernel_launch();

  if (warp >= kConsumerWarps) {
    // ---- producers: warp kConsumerWarps loads K, the next warp V; each tile's `boxes` boxes of
    // its tensor are loaded by one group of lanes, the groups in turn (decode_produce_ring_rotating).
    // Box i: rows run * R .. run * R + R - 1 of the tile, column
    // blocks block * box_blocks .. (block + 1) * box_blocks - 1 (all of them unless box_blocks
    // = 1), of the CTA's kHeads heads. (Two warps because a warp issues its boxes one lane after
    // another: with one warp for both tensors, one CTA streamed a paged-16 tile, 8 boxes, ~10%
    // slower; bench/NOTES.md.)
    const bool is_k = warp == kConsumerWarps;
    const CUtensorMap* map = is_k ? &tp.k_map : &tp.v_map;
    std::uint16_t* s0 = is_k ? sK0 : sV0;
    std::uint64_t* full = is_k ? full_k : full_v;
    std::uint64_t* empty = is_k ? empty_k : empty_v;
    const int R = 1 << tp.box_run_shift;
    // Boxes per run and per tile, as powers of two (shifts: a division here is on every CTA's
    // path to its first box). Lane l issues box l % boxes of tile l / boxes of each chunk of
    // 32 / boxes tiles (decode_produce_ring_rotating).
    static_assert(BN == 64 && Cfg::kColBlocks <= 4, "the shifts below");
    constexpr int kColShift = Cfg::kColBlocks == 4 ? 2 : Cfg::kColBlocks == 2 ? 1 : 0;
    const int per_run_shift = tp.box_blocks == Cfg::kColBlocks ? 0 : kColShift;  // box_blocks is kColBlocks or 1
    const int boxes_shift = (6 - tp.box_run_shift) + per_run_shift;
    const int group = lane >> boxes_shift, box = lane & ((1 << boxes_shift) - 1);
    const int chunk_tiles = 32 >> boxes_shift;
    const int run = box >> per_run_shift, block = box & ((1 << per_run_shift) - 1);
    const std::uint64_t policy = l2_policy_evict_first();  // the cache is read once per step
    const int box_elems = R * 64 * tp.box_blocks * kHeads;  // the head-pair form: box_blocks = all
    const std::uint32_t box_bytes = std::uint32_t(box_elems) * 2;
    // This lane's box of `tile`: its first slot, and whether it has a row that may be seen (known
    // without a load).
    auto box_slot0 = [&](int tile) { return tile * BN + run * R; };
    auto box_needed = [&](int tile) {
      const int slot0 = box_slot0(tile);
      return slot0 + R > range.lo && slot0 < range.hi;
    };
    const DecodePageWalk walk(p, seq);
    // This lane's raw page id in the chunk from tile c0 (0 for a contiguous cache or an unneeded
    // box). Any raw value, -1 included, is a page id: its range check is at the box.
    auto fetch = [&](int c0) {
      const int pos = c0 + group;
      if (!walk.paged() || pos >= range.t_end) return 0;
      const int tile = range.tile_at(pos);
      return box_needed(tile) ? int(seq.pages[walk.page_index(box_slot0(tile))]) : 0;
    };
    // A box warmed ahead of its TMA: one L2 prefetch of a 128-byte line every 16 rows of the lane's
    // box (lines the box reads anyway; every 8 rows on the grids kDecodeDenseWarmMaxTiles names),
    // once per chunk. It pays by the lines it puts in L2, not by translations: the same warm by
    // `applypriority`, which fetches nothing, lost at least what no warm loses (session 56). Why:
    // the random pool costs the paged rows 0.3-0.5 us at 1k and 0.5-1.9% at 8k over the same bytes
    // through an identity table (pages shuffled only within 2 MB cost far less on those grids; at
    // GQA 8 batch 1 / 8k nearly as much, session 45); the prefetch recovered ~0.5 us at the 256-CTA
    // 1k rows and 0.2-0.5% at 8k-32k.
    // On contiguous boxes the same line density made the 256-CTA 1k rows 0.3-0.8 us faster and the
    // 8k rows 0.2-0.4% (batch 32 / 32k 0.2% slower). The bulk (TMA) prefetch of the same bytes ran
    // slower. The first chunk's only in a one-wave grid:
    // in MHA batch 128 / 1k (4096 CTAs of 16 tiles, a CTA starting whenever another ends) it cost
    // 0.7% (bench/NOTES.md, session 26); and not in small one-head grids (decode_warms_first_chunk).
    const bool warm_first = __shfl_sync(0xffffffffu, tp.warm_first_chunk, 0) != 0;
    const bool dense_warm = kHeadDim == 128 && kHeads == 2 && warm_first &&
                            range.t_end - range.t_begin <= kDecodeDenseWarmMaxTiles &&
                            __shfl_sync(0xffffffffu, p.heads_kv, 0) >= kDecodeDenseWarmMinHeadsKv;
    const auto* cache = static_cast<const std::uint16_t*>(is_k ? p.k_cache : p.v_cache);
    const std::int64_t page_stride = is_k ? p.k_batch_stride : p.v_batch_stride;
    const std::int64_t row_stride = is_k ? p.k_row_stride : p.v_row_stride;
    const std::uint16_t* lane_cache = cache + kvh0 * (is_k ? p.k_head_stride : p.v_head_stride) + block * 64;
    auto warm = [&](int c0, int pg) {
      const int pos = c0 + group;
      if ((c0 == range.t_begin && !warm_first) || pos >= range.t_end || !walk.in_cache(pg)) return;
      const int tile = range.tile_at(pos);
      if (!box_needed(tile)) return;
      const int slot0 = box_slot0(tile);
      const std::uint16_t* box = lane_cache + std::int64_t(walk.row_coord(pg)) * page_stride +
                                 std::int64_t(walk.slot_coord(slot0)) * row_stride;
      // Only rows that may be seen (< range.hi <= the row's capacity): a contiguous cache's last
      // tile may reach past its row, and past the tensor's end in its last row. A line every 16
      // rows, or every 8 (dense_warm, kDecodeDenseWarmMaxTiles). Two loops with constant steps, not
      // one with a variable step: that one changed the loop of the grids it does not act on (MHA
      // batch 128 / 1k 0.19% slower, session 56's DW); this way they keep the 16-row loop as it was.
      const auto lines = [&](auto step) {  // a line every step rows (a compile-time constant)
#pragma unroll
        for (int r = 0; r < BN; r += decltype(step)::value)
          if (r < R && slot0 + r < range.hi) prefetch_l2(box + r * row_stride);
      };
      if (dense_warm) lines(std::integral_constant<int, 8>{});
      else lines(std::integral_constant<int, 16>{});
    };
    decode_produce_ring_rotating<S>(
        range.t_begin, range.t_end, chunk_tiles, group, empty, fetch, [&](int pos, int stage, int pg, bool mine) {
          const int tile = range.tile_at(pos);
          const int slot0 = box_slot0(tile);
          const int box0 = run * R * kHeadDim * kHeads + block * box_elems;  // KvLayout of the box's first element
          std::uint16_t* dst = s0 + stage * Cfg::kStageElems + box0;
          const bool needed = mine && box_needed(tile);
          const bool in_cache = walk.in_cache(pg);
          const bool load = needed && in_cache;
          if (needed && !in_cache) {
            // A page id outside the cache: its rows read as zeros.
            for (int e = 0; e < box_elems; e += 8) *reinterpret_cast<uint4*>(dst + e) = make_uint4(0, 0, 0, 0);
            fence_proxy_async_smem();  // before a later TMA write of the same rows
          }
          mbar_arrive_expect_tx(&full[stage], load ? box_bytes : 0);
          if (load) {
            tma_load_5d(dst, map, block * 64, walk.slot_coord(slot0), 0, kvh0, walk.row_coord(pg), &full[stage],
                        policy);
          }
        },
        warm);
    return;
  }

  // ---- consumers: Q, then the tiles as they land ------------------------------------------
  {
    const auto* gq = static_cast<const std::uint16_t*>(p.q);
    constexpr int kChunks = kHeadDim / 8;
    for (int idx = threadIdx.x; idx < kTeams * kDecodeRows * kChunks; idx += Cfg::kConsumerThreads) {
      const int t = idx / (kDecodeRows * kChunks), r = idx / kChunks % kDecodeRows, ch = idx % kChunks;
      const int h = t / kRowBlocks, pm = (mb0 + t % kRowBlocks) * kDecodeRows + r;
      const bool ok = pm < rows_total && ch * 8 < p.head_dim;
      const std::int64_t off = ok ? b * p.q_batch_stride + std::int64_t(pm % p.seqlen_q) * p.q_row_stride +
                                        std::int64_t((kvh0 + h) * p.group + pm / p.seqlen_q) * p.q_head_stride + ch * 8
                                  : 0;
      cuda_prefill::cp_async_16(sQ0 + t * Cfg::kQHeadElems + Cfg::q_offset(r, ch), gq + off, ok);
    }
    cute::cp_async_fence();
    cute::cp_async_wait<0>();
    named_barrier_sync(1, Cfg::kConsumerThreads);
  }
  const std::uint16_t* sQ = sQ0 + team * Cfg::kQHeadElems;
  // This warp's head in every stage: R * head_dim elements per head within a run (KvLayout).
  const int head_elems = (head * kHeadDim) << tp.box_run_shift;
  const typename Cfg::KvLayout kv{tp.box_run_shift};
  const int key0 = warp % kDecodeWarps * Cfg::kWarpKeys;
  // The tiles as they land, into a warp state (DecodeWarpState or DecodeWarpStateNarrow).
  auto stream_tiles = [&](auto& st) {
    for (int pos = range.t_begin, stage = 0, phase = 0; pos < range.t_end; ++pos) {
      std::uint16_t* sV = sV0 + stage * Cfg::kStageElems + head_elems;
      mbar_wait(&full_k[stage], phase);
      const int n0 = range.tile_at(pos) * BN;
      const bool edge = n0 + key0 < range.lo || n0 + key0 + Cfg::kWarpKeys > range.hi;
      const bool refilled = decode_stage_refilled(pos, S, range.t_end);
      // K read (the scores are in registers): the stage's K may be refilled.
      const auto k_done = [&] {
        if (refilled) warp_release_stage(&empty_k[stage], lane);
      };
      if constexpr (kRowBlocks > 1) {
        const std::uint16_t* sK = sK0 + stage * Cfg::kStageElems + head_elems;
        // The row pair: a warp of each team reads the same V rows, so neither may write them.
        // Keys outside [lo, hi) are zeroed in the V fragments instead (see the file comment).
        const DecodeVEdgeMask edge_mask(n0 + key0, range.lo, range.hi, lane);
        st.template attend<Cfg, kDtype>(
            p, sQ, sK, sV, kv, n0, key0, pad, end, lane, k_done, [&] { mbar_wait(&full_v[stage], phase); },
            [&](std::uint32_t(&bv)[4]) {
              if (edge) edge_mask(bv);
            });
      } else {
        const auto v_wait = [&] {
          mbar_wait(&full_v[stage], phase);
          if (edge) {
            // V rows of this warp's keys outside [lo, hi): zeros (see the file comment).
            for (int idx = lane; idx < Cfg::kWarpKeys * (kHeadDim / 8); idx += 32) {
              const int r = key0 + idx / (kHeadDim / 8), ch = idx % (kHeadDim / 8);
              if (n0 + r < range.lo || n0 + r >= range.hi)
                *reinterpret_cast<uint4*>(sV + kv.offset(r, ch)) = make_uint4(0, 0, 0, 0);
            }
            __syncwarp();
          }
        };
        st.template attend<Cfg, kDtype>(p, sQ, sK0 + stage * Cfg::kStageElems + head_elems, sV, kv, n0, key0, pad, end,
                                        lane, k_done, v_wait);
      }
      if (refilled) warp_release_stage(&empty_v[stage], lane);  // also orders the edge tiles' zeros before the refill
      if (++stage == S) stage = 0, phase ^= 1;
    }
    // Every consumer warp has seen every tile land, so no copy is in flight: reuse the stages.
    named_barrier_sync(1, Cfg::kConsumerThreads);
  };
  // Each team's four warps merge on their own: barrier 1 + team over their 128 threads (barrier 1
  // is the whole CTA's consumers' above, all past it by now). Immediate barrier ids: a computed
  // one makes the compiler reserve all sixteen (and the pairs keep to two).
  float* merge_smem = reinterpret_cast<float*>(sK0) + team * Cfg::kMergeFloats;
  const int merge_tid = threadIdx.x - team * kDecodeWarps * 32;
  const auto consumers_sync = [team] {
    if (team == 0) cuda_detail::named_barrier_sync(1, kDecodeWarps * 32);
    else if (kTeams <= 2 || team == 1) cuda_detail::named_barrier_sync(2, kDecodeWarps * 32);
    else if (team == 2) cuda_detail::named_barrier_sync(3, kDecodeWarps * 32);
    else cuda_detail::named_barrier_sync(4, kDecodeWarps * 32);
  };
  // The warps' states merged into the output, or into this split's partial state.
  auto merge_and_store = [&](const auto& st) {
    if (!p.cluster_combine) {
      decode_merge_warps<kHeadDim>(p, st, merge_smem, mb, merge_tid, consumers_sync,
                                   [&](int r, int c, float4 val, float lse) {
                                     decode_store_value4<kDtype>(p, work, kvh, mb * kDecodeRows + r, c, val, lse);
                                   });
      return;
    }
    // The splits of this (b, kvh, mb) are one cluster. Each CTA but the first stores its partial
    // state straight into its slot of the first CTA's shared memory, arrives on the cluster
    // barrier's second phase and is done (threads that have exited do not hold a phase up); the
    // first one writes its own slot, waits on that phase for the others and merges. (Before:
    // every CTA merged a share of the values, reading all the others' shared memory between two
    // cluster barriers: ~2.5 us of a 7.7 us batch 1 / 1k step, traced, bench/NOTES.md.)
    if constexpr (!Cfg::kClusterSlots) {
      // Slots in the first CTA's stages (DecodeSm90Config): every CTA first merges each team's
      // warps into the team's slot place of split 0 (the first CTA's are its real slots), then
      // arrives on the barrier's second phase; once that completes, the first CTA's stages are
      // free, and every other CTA copies its states into its slots there and arrives on the third
      // phase, for which the first CTA waits before it merges each team.
      float* stages = reinterpret_cast<float*>(sK0);
      const auto slot_of = [&](int s) { return stages + Cfg::stage_slot_floats(s * kTeams + team); };
      float* own = slot_of(0);
      decode_merge_warps<kHeadDim>(p, st, merge_smem, mb, merge_tid, consumers_sync,
                                   [&](int r, int c, float4 val, float lse) {
                                     *reinterpret_cast<float4*>(own + Cfg::kSlotLseFloats + r * kHeadDim + c) = val;
                                     if (c == 0) own[r] = lse;
                                   });
      cluster_wait();  // the start phase
      cluster_arrive_release();
      cluster_wait();  // every CTA has merged its warps: the first CTA's stages hold nothing else
      if (split != 0) {
        const float* remote = slot_of(split);  // mapped into CTA 0 below
        // Only the LSEs and the block's rows in use: decode_cluster_merge reads no others. Whole
        // slots (16.4 KB at head_dim 256) for the 1-4 rows of MHA or GQA 4 made head_dim 256 GQA 8
        // batch 1 / 1k (8 splits into one SM) 1.2-1.4 us slower, MHA batch 1 / 1k 0.4-0.6 us
        // (bench/NOTES.md, session 53).
        const int used_float4s = (Cfg::kSlotLseFloats + decode_block_rows(rows_total, mb) * kHeadDim) / 4;
        for (int i = merge_tid; i < used_float4s; i += kDecodeWarps * 32)
          cluster_store(reinterpret_cast<const float4*>(remote) + i, reinterpret_cast<const float4*>(own)[i], 0);
        cluster_arrive_release();  // the stores land before the first CTA's wait returns
        return;
      }
      cluster_arrive_release();
      cluster_wait();  // every split's state is in its slot
      decode_cluster_merge<kHeadDim, kDtype>(
          p, [&](int s, int r) { return slot_of(s)[r]; },
          [&](int s, int r, int c) {
            return *reinterpret_cast<const float4*>(slot_of(s) + Cfg::kSlotLseFloats + r * kHeadDim + c);
          },
          merge_smem, b, kvh, mb, merge_tid, consumers_sync);
      return;
    }
    float* slot = reinterpret_cast<float*>(smem_raw + Cfg::kSmemBytes) + split * Cfg::kSlotFloats;
    if (split == 0) {
      decode_merge_warps<kHeadDim>(p, st, merge_smem, mb, threadIdx.x, consumers_sync,
                                   [&](int r, int c, float4 val, float lse) {
                                     *reinterpret_cast<float4*>(slot + Cfg::kSlotLseFloats + r * kHeadDim + c) = val;
                                     if (c == 0) slot[r] = lse;
                                   });
      cluster_wait();            // the start phase
      cluster_arrive_release();  // then the second phase: the other splits' stores
      cluster_wait();            // every other split's state is in the slots
      decode_cluster_merge<kHeadDim, kDtype>(
          p, [&](int s, int r) { return slot[s * Cfg::kSlotFloats + r]; },  // slot is split 0's
          [&](int s, int r, int c) {
            return *reinterpret_cast<const float4*>(slot + s * Cfg::kSlotFloats + Cfg::kSlotLseFloats + r * kHeadDim + c);
          },
          merge_smem, b, kvh, mb, threadIdx.x, consumers_sync);
    } else {
      cluster_wait();  // the start phase: the first CTA has started
      decode_merge_warps<kHeadDim>(
          p, st, merge_smem, mb, threadIdx.x, consumers_sync, [&](int r, int c, float4 val, float lse) {
            cluster_store(reinterpret_cast<const float4*>(slot + Cfg::kSlotLseFloats + r * kHeadDim + c), val, 0);
            if (c == 0) cluster_store(slot + r, lse, 0);
          });
      cluster_arrive_release();  // the stores above land before the first CTA's wait returns
    }
  };
  // The wide state (decode_tile.cuh) for 9-16 packed rows, and for the row pair's more than 16.
  // Written out twice, not as one lambda: that lambda moved the per-head kernel's registers. The
  // row pair keeps Q in registers (1.2-3.5% at its 8k-32k rows; in the per-head kernel it moved
  // nothing measurable and took it to 165 of its 170 registers: bench/NOTES.md, session 87).
  if constexpr (kRowBlocks > 1) {
    DecodeWarpState<kHeadDim, /*kQInRegisters=*/true, /*kBoundLayout=*/true> st;
    st.init(p, b, kvh, mb, pad, end, lane / 4);
    st.template bind_layout<Cfg>(kv, key0, lane);
    st.template load_q<Cfg>(sQ, lane);
    stream_tiles(st);
    merge_and_store(st);
  } else {
    const auto attend_narrow = [&] {
      DecodeWarpStateNarrow<kHeadDim> st;
      st.init(p, b, kvh, pad, end, lane);
      st.bind_layout(kv, key0, lane);
      st.template load_q<Cfg>(sQ, lane);
      stream_tiles(st);
      merge_and_store(st);
    };
    if constexpr (kHeads > 1) {
      attend_narrow();  // the host takes the head-pair form for at most 8 packed rows
    } else if (rows_total <= kDecodeNarrowRows) {  // then mb = 0
      attend_narrow();
    } else {  // 9-16 packed rows
      DecodeWarpState<kHeadDim, /*kQInRegisters=*/false, /*kBoundLayout=*/true> st;
      st.init(p, b, kvh, mb, pad, end, lane / 4);
      st.template bind_layout<Cfg>(kv, key0, lane);
      stream_tiles(st);
      merge_and_store(st);
    }
  }
#endif
}

/// kHeads = 2: the head-pair form, for what decode_head_pair_fits allows (head_dim 64 or 128,
/// heads_kv even, at most 8 packed rows); kHeads = 4: the head-quad form (decode_head_quad_fits:
/// head_dim 64, heads_kv a multiple of 4); kRowBlocks = 2: the row pair (decode_row_blocks_per_cta:
/// p.row_blocks_per_cta). The three merge a cluster's splits in its first CTA's stages.
template <int kHeadDim, Dtype kDtype, int kHeads, int kRowBlocks>
void launch_decode_sm90(const DecodeParams& p, cudaStream_t stream) {
  using Cfg = DecodeSm90Config<kHeadDim, kHeads, kRowBlocks>;
  auto* kernel = &decode_kernel_sm90<kHeadDim, kDtype, kHeads, kRowBlocks>;
  constexpr int kMaxSmem = Cfg::launch_smem_bytes(kMaxClusterSplits);
  static const cudaError_t attr_status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxSmem);
  FASTATTN_CUDA_CHECK(attr_status);
  const int m_blocks = decode_row_blocks(p.group, p.seqlen_q);
  if (kHeads > 1 && (p.head_dim != kHeadDim || p.heads_kv % kHeads != 0 || m_blocks != 1))
    throw Error("decode: the head-pair or head-quad kernel got a shape it does not take (an internal planning error)");
  if (kHeads > 1 && p.split_plan)
    throw Error("decode: the head-pair or head-quad kernel got a split plan (an internal planning error)");
  if (p.row_blocks_per_cta != kRowBlocks)
    throw Error("decode: the sm_90 kernel got a row-block count it was not built for (an internal planning error)");
  const int head_ctas = decode_row_block_ctas(p.group, p.seqlen_q, kRowBlocks);
  const dim3 grid = decode_head_grid(p, kHeads == 1 ? p.heads_kv * head_ctas : p.heads_kv / kHeads);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  DecodeTmaParams tp;
  tp.p = p;
  tp.warm_first_chunk = decode_warms_first_chunk<Cfg>(std::int64_t(grid.x) * grid.y * grid.z, p.sm_count);
  const int box_rows = decode_tma_box_rows(p.page_size);
  tp.box_run_shift = 0;
  while ((1 << tp.box_run_shift) < box_rows) ++tp.box_run_shift;
  const bool whole_rows = p.head_dim == kHeadDim;
  tp.box_blocks = whole_rows ? Cfg::kColBlocks : 1;
  const bool paged = p.page_size > 0;
  const std::int64_t slots = paged ? p.page_size : p.cache_len;
  const std::int64_t rows = paged ? p.num_pages : p.cache_rows;
  const int box[5] = {64, box_rows, tp.box_blocks, kHeads, 1};
  const std::int64_t dims[5] = {whole_rows ? 64 : p.head_dim, slots, tp.box_blocks, p.heads_kv, rows};
  const std::int64_t k_strides[5] = {1, p.k_row_stride, 64, p.k_head_stride, p.k_batch_stride};
  const std::int64_t v_strides[5] = {1, p.v_row_stride, 64, p.v_head_stride, p.v_batch_stride};
  // L2 promotion to 128 bytes, not 256 (with evict-first reads): 256 was measured slower, both
  // when a box took one 64-column block (4.04 against 4.49 TB/s at batch 128 / 8k) and with the
  // boxes over both blocks (MHA batch 32 / 8k 1041 against 960 us; bench/NOTES.md).
  tp.k_map = cuda_detail::make_tensor_map_5d_u16(p.k_cache, dims, k_strides, box, cuda_detail::TmaL2Promotion::k128B);
  tp.v_map = cuda_detail::make_tensor_map_5d_u16(p.v_cache, dims, v_strides, box, cuda_detail::TmaL2Promotion::k128B);
  // A cluster's first CTA receives the splits' states after its own shared memory (where they
  // fit: kClusterSlots).
  const int smem = Cfg::launch_smem_bytes(p.cluster_combine ? p.num_splits : 0);
  launch_kernel(kernel, grid, dim3(Cfg::kThreads), smem, stream, p.dependent_launch && p.after_append, tp,
                p.cluster_combine ? p.num_splits : 1);
}


#define FASTATTN_INSTANTIATE_DECODE_SM90(D, T) \
  template void launch_decode_sm90<D, T, 1, 1>(const DecodeParams&, cudaStream_t);
/// The head-pair form (head_dim 64 and 128: decode_head_pair_head_dim).
#define FASTATTN_INSTANTIATE_DECODE_SM90_HEAD_PAIR(D, T) \
  template void launch_decode_sm90<D, T, kDecodeHeadPair, 1>(const DecodeParams&, cudaStream_t);
/// The head-quad form (head_dim 64).
#define FASTATTN_INSTANTIATE_DECODE_SM90_HEAD_QUAD(T) \
  template void launch_decode_sm90<kDecodeHeadQuadHeadDim, T, kDecodeHeadQuad, 1>(const DecodeParams&, cudaStream_t);
/// The row-pair form (head_dim 64 and 128: kDecodeRowPairMaxHeadDim).
#define FASTATTN_INSTANTIATE_DECODE_SM90_ROW_PAIR(D, T) \
  template void launch_decode_sm90<D, T, 1, kDecodeRowPair>(const DecodeParams&, cudaStream_t);

}  // namespace fastattn::cuda_decode
