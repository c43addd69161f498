// Parameters of the CUDA KV-cache (decode) kernels: plain C++, filled on the host from
// KVCacheArgs and passed by value. Index-tensor contents (cache_seqlens, cache_batch_idx,
// cache_leftpad, page ids) stay on the device; the kernels clamp them (see DecodeParams) so a
// launch needs no host synchronisation and inconsistent indices never address outside a tensor.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cuda/prefill/prefill_params.h"  // Dtype

namespace fastattn::cuda_decode {

using cuda_prefill::Dtype;

/// Device-side clamping of index contents: a cache row (cache_batch_idx[b], or b) outside
/// [0, cache_rows) makes sequence b empty (no append, no keys: output 0, LSE -inf); seqlens < 0
/// read as 0; leftpad is clamped to [0, seqlen]; appended slots past the row's capacity
/// (S_cache, or its pages * page_size) are not written and not attended; page ids outside
/// [0, num_pages) are neither written nor read (their keys read as zeros); rotary positions are
/// clamped to the cos/sin table.
///
/// Varlen decode (flash_attn_varlen_func with paged keys and one query per sequence, lowered in
/// varlen_decode_host.cpp): batch entry b is query row b of q / out / lse (batch stride = the row
/// stride, seqlen_q = 1) and `cu_seqlens_q` maps it to the sequence s that owns that row (s = b
/// when cu_seqlens_q[b] == b and cu_seqlens_q[b + 1] == b + 1, else found by a binary search);
/// a row no sequence owns (padding past cu_seqlens_q[B]) is empty (output 0, LSE -inf). Sequence
/// s reads page-table row s and its key count from cache_seqlens[s] (seqused_k), else
/// cu_seqlens_k[s + 1] - cu_seqlens_k[s], else (pages_s - 1) * page_size + last_page_len[s]
/// (0 without pages), clamped like cache_seqlens.
struct DecodeParams {
  Dtype dtype = Dtype::kFloat16;
  int batch = 0, heads_q = 0, heads_kv = 0, group = 1;  ///< group = heads_q / heads_kv
  int head_dim = 0;
  int seqlen_q = 0;    ///< query rows per sequence (1..16 for decode; any value works)
  int seqlen_new = 0;  ///< appended tokens per sequence

  // q, or its rotated copy, (B, Sq, Hq, D); out likewise; lse (B, Hq, Sq). Element strides.
  const void* q = nullptr;
  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  void* out = nullptr;
  std::int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  float* lse = nullptr;
  std::int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 0;
  /// Attention sinks (Hq) float32 at element stride sinks_stride, or null: folded into each
  /// finished row (decode_store_output4_at, combine_kernel) as one more logit with zero values.
  const float* sinks = nullptr;
  std::int64_t sinks_stride = 0;

  // The caches. Contiguous: slot s of cache row r at r * batch_stride + s * row_stride; paged:
  // page = pages_r[s / page_size] at page * batch_stride + (s % page_size) * row_stride. Plus
  // kv_head * head_stride.
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  std::int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  std::int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int cache_rows = 0;  ///< contiguous: B_cache; paged: rows of block_table / page_indptr entries - 1
  int cache_len = 0;   ///< contiguous: slots per row
  int page_size = 0;   ///< 0: contiguous cache
  int page_shift = -1;
  int num_pages = 0;
  const std::int32_t* block_table = nullptr;
  std::int64_t block_table_stride = 0;
  int max_pages_per_seq = 0;
  const std::int32_t* page_indptr = nullptr;
  const std::int32_t* page_indices = nullptr;
  std::int64_t num_page_indices = 0;

  const std::int32_t* cache_seqlens = nullptr;  ///< (B); else cache_seqlen for every b
  int cache_seqlen = 0;
  // Varlen decode only (see above): all null for flash_attn_with_kvcache.
  const std::int32_t* cu_seqlens_q = nullptr;   ///< (B + 1): the sequence owning query row b
  const std::int32_t* cu_seqlens_k = nullptr;   ///< (B + 1): key counts as differences
  const std::int32_t* last_page_len = nullptr;  ///< (B): keys in each sequence's last page
  const std::int32_t* cache_batch_idx = nullptr;
  const std::int32_t* cache_leftpad = nullptr;

  // New keys / values (B, Snew, Hkv, D).
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  std::int64_t knew_batch_stride = 0, knew_row_stride = 0, knew_head_stride = 0;
  std::int64_t vnew_batch_stride = 0, vnew_row_stride = 0, vnew_head_stride = 0;

  // Rotary (rotary_dim 0: off). cos/sin (rotary_len, rotary_dim / 2), q's dtype or float32.
  const void* rotary_cos = nullptr;
  const void* rotary_sin = nullptr;
  bool rotary_f32 = false;
  bool rotary_interleaved = true;
  bool rotate_q_per_row = false;  ///< causal / windowed: q row i at position pos0 + i
  int rotary_dim = 0, rotary_len = 0;
  std::int64_t cos_row_stride = 0, sin_row_stride = 0;
  void* q_rot = nullptr;  ///< workspace: rotated q, contiguous (B, Sq, Hq, D)

  float scale = 1.0f, softcap = 0.0f;
  int window_left = -1, window_right = -1;  ///< effective (causal folded in)
  const float* alibi = nullptr;
  std::int64_t alibi_batch_stride = 0;

  // Split-KV: num_splits > 1 writes per-split states to the workspace, then a combine kernel
  // merges them. partial_o (num_splits, B, Hq, Sq, D) normalised outputs, partial_lse
  // (num_splits, B, Hq, Sq) natural-log LSE.
  int num_splits = 1;
  /// A split count per sequence (KVCacheArgs::split_plan, on the device; num_splits unused): the
  /// (B + 1) split_indptr, then `plan_items` work items b + kSplitPlanSplitUnit * split. The
  /// attention grid is (heads_kv x row blocks, plan_items), one CTA per (work item, head, row
  /// block) of the per-head kernels; partial states are rows split_indptr[b] + split of
  /// (plan_items, Hq, Sq) and (plan_items, Hq, Sq, D); a sequence of one split writes out itself.
  /// Padding items (-1, a plan of fixed size under a CUDA graph) and entries out of range make a
  /// CTA or a merge do nothing (resolve_decode_work, combine_kernel).
  const std::int32_t* split_plan = nullptr;
  int plan_items = 0;
  /// Set by run_decode from the current device. The GPU has programmatic dependent launch
  /// (sm_90): the attention kernel after an append and the combine kernel start launching while
  /// their predecessor finishes.
  bool dependent_launch = false;
  int sm_count = 0;  ///< set by run_decode: the current device's SMs (launch-time choices)
  bool after_append = false;  ///< set by run_decode: an append / rotary kernel precedes attention
  /// Set by run_decode: attention runs the sm_90 bulk-copy kernel (decode_kernel_sm90.cuh), else
  /// the cp.async one (use_sm90_decode_kernel).
  bool sm90_kernel = false;
  /// Set by run_decode: the sm_90 kernel runs the splits of a (b, kv head or the pair's or quad's
  /// heads, row block) as one thread-block cluster that merges them itself (1 < num_splits <=
  /// kMaxClusterSplits), with no combine kernel; the workspace's partial states (sized by the plan,
  /// before this choice) go unused: the first CTA receives them in its shared memory, after it or
  /// in its stages (DecodeSm90Config::kClusterSlots).
  bool cluster_combine = false;
  /// num_splits is the caller's (flash_attn_with_kvcache's num_splits > 0), not the heuristic's:
  /// its results must be bitwise the same whatever the rest of the batch, so the splits always
  /// merge in the combine kernel (whether a grid fits the cluster rule depends on the batch, and
  /// the two merges round differently).
  bool splits_fixed = false;
  /// Set by the planner (decode_head_group_applies): KV heads per CTA of the head-group kernel
  /// (decode_kernel_sm90_head_group.cuh) that attention runs, kDecodeHeadGroup,
  /// kDecodeHeadGroupWide or kDecodeHeadGroupRows, its CTAs (split, group of that many KV heads,
  /// b), and num_splits was chosen for that grid; 0 when it does not run it. run_decode sets 0
  /// when the sm_90 kernel is not taken (an empty cache).
  int head_group = 0;
  /// Set by the planner (decode_kv_heads_per_cta): KV heads per CTA of the sm_90 kernel
  /// (decode_kernel_sm90.cuh, kHeads) that attention runs when it does not run the head-group
  /// kernel: 1, kDecodeHeadPair (the head-pair form) or kDecodeHeadQuad (the head-quad form), its
  /// CTAs (split, that many KV heads, b). run_decode sets 1 when the sm_90 kernel is not taken.
  int kv_heads_per_cta = 1;
  /// Set by run_decode (the rule at kDecodeQuarterMinSlots): a split of at least this many slots on
  /// a contiguous cache is walked by the sm_90 kernels as four interleaved quarters
  /// (DecodeSplitRange::tile_at); 0: always in order. Why: the CTAs of a sequence read it in step,
  /// so a linear walk has the whole GPU reading one window of the cache per sequence at a time; with
  /// few sequences of wide token rows (MHA batch 8: 8 windows of 8 KB rows) those sit in a few
  /// physical 2 MB pages, and the read swings 1-2% with where the tensors landed. Quarters read 4
  /// windows per sequence.
  int quarter_min_slots = 0;
  float* partial_o = nullptr;
  float* partial_lse = nullptr;
  /// Set by the planner (decode_row_blocks_per_cta): row blocks of 16 packed query rows per CTA of
  /// the per-head sm_90 kernel, 1 or kDecodeRowPair (the row-pair form); the grid has
  /// decode_row_block_ctas CTAs per (split, b, KV head). Last, so that adding it moved no field the
  /// other kernels read (their code stays as it was).
  int row_blocks_per_cta = 1;
};

/// A split plan's work item: b + kSplitPlanSplitUnit * split (core::kSplitPlanSplitUnit).
constexpr int kSplitPlanSplitUnit = 65536;
/// The most splits of one sequence (num_splits' and a split plan's bound).
constexpr int kMaxSplits = 1024;

/// Whether the attention kernel writes partial states that the combine kernel merges: more than
/// one uniform split, or a plan with a sequence of more than one.
inline bool decode_writes_split_states(const DecodeParams& p) {
  return p.split_plan ? p.plan_items > p.batch : p.num_splits > 1;
}

/// Appends (rotating k), rotates q into q_rot, attends with split-KV and combines, on `stream`.
void run_decode(const DecodeParams& p, void* stream);

/// Key tile of the decode kernels (keys per pipeline stage); the split heuristic counts in it.
constexpr int kDecodeBlockN = 64;
/// The split heuristic's bounds (decode_num_splits): at least two key tiles per split, and at most
/// this many splits.
constexpr int kDecodeMinKeysPerSplit = 2 * kDecodeBlockN;
constexpr int kDecodeMaxHeuristicSplits = 128;

/// The tile order rule (DecodeParams::quarter_min_slots, set by run_decode): the sm_90 kernels walk
/// a split of at least kDecodeQuarterMinSlots slots as four interleaved quarters when the cache is
/// contiguous, its token rows hold at least kDecodeQuarterMinRowBytes (heads_kv x head_dim x 2),
/// head_dim is at least kDecodeQuarterMinHeadDim, the grid reads at most kDecodeQuarterMaxStreams
/// sequence streams (batch x num_splits) and num_splits is the heuristic's (a rule on the batch
/// would break a fixed num_splits' bitwise rule). On the H200 (bench/NOTES.md, sessions 31-32), in
/// the decode suite: MHA batch 8 / 8k 0.3-1.5% faster, 8 / 32k up to 0.8%, MHA batch 32 / 8k-32k
/// 0.2-0.4%, head_dim 256 level or faster; but GQA 8 rows (2 KB token rows) and MHA batch 128 (128
/// streams) 0.15-0.4% slower, and head_dim 64 with 64 KV heads (8 KB rows of 128-byte box rows)
/// 0.6-1% slower at batch 8 and 32, so those stay linear. FASTATTN_DECODE_QUARTERS overrides the
/// rule for comparisons and tests: "0" walks every split in order, a positive number N walks every
/// contiguous split of at least N slots in quarters, whatever the shape.
constexpr int kDecodeQuarterMinSlots = 4096;
constexpr std::int64_t kDecodeQuarterMinRowBytes = 8192;
constexpr int kDecodeQuarterMinHeadDim = 128;
constexpr std::int64_t kDecodeQuarterMaxStreams = 32;

/// Packed query rows per attention CTA (one m16 MMA tile): a CTA takes 16 of the group x Sq rows
/// of one (b, kv head).
constexpr int kDecodeRowsPerCta = 16;

/// Row blocks per (b, kv head): the attention grid's y extent is heads_kv times this.
constexpr int decode_row_blocks(int group, int seqlen_q) {
  return (group * seqlen_q + kDecodeRowsPerCta - 1) / kDecodeRowsPerCta;
}

/// Packed query rows in row block `mb` of a (b, kv head) of `rows` (group x seqlen_q):
/// kDecodeRowsPerCta, fewer in the last.
constexpr int decode_block_rows(int rows, int mb) {
  const int left = rows - mb * kDecodeRowsPerCta;
  return left < kDecodeRowsPerCta ? left : kDecodeRowsPerCta;
}

/// The sm_90 kernel's row-pair form: one CTA (one per SM) takes two row blocks of a KV head, two
/// groups of four consumer warps over the same tiles, so the head's keys are read once for 32 rows
/// instead of once per 16 (decode_kernel_sm90.cuh). Built up to head_dim kDecodeRowPairMaxHeadDim
/// (at 256 the cluster slots would not fit its stages).
constexpr int kDecodeRowPair = 2;
constexpr int kDecodeRowPairMaxHeadDim = 128;
/// The heuristic takes the row pair for 17-32 packed rows (two row blocks) on caches of at least
/// this many slots (decode_row_blocks_per_cta; core::DecodeSplitRule::row_pair_min_keys is the plan's
/// copy). On the H200 at GQA 32/8, N = 8 (32 rows; bench/NOTES.md, session 86), against two 16-row
/// CTAs: 8k-32k keys 13-32% faster at batch 1-128; at 1k 14-19% slower at batch 1 and 8 (half the
/// CTAs, or an extra split), level at 32 and 128. At 64 rows (two pair CTAs against four) 2-17%
/// slower at 8k: those calls are bound by the math, not the reads.
constexpr std::int64_t kDecodeRowPairMinKeys = 4096;
/// Below kDecodeRowPairMinKeys, the heuristic takes the row pair on caches of at least
/// kDecodeRowPairWaveMinKeys slots where its one-split grid, batch x heads_kv CTAs at one an SM, is at
/// least kDecodeRowPairMinWaves waves (core::DecodeSplitRule::row_pair_wave_min_keys and
/// row_pair_min_waves are the plan's copy). Since session 86 the row pair keeps Q in registers (87)
/// and binds its addresses (90). On the H200 at GQA 32/8 and 32/4, head_dim 128, pages of 16, 20-32
/// rows (bench/NOTES.md, session 92): from 1.2 waves it took 0.79-1.00x the 16-row CTAs' time at
/// 1k-3k keys (head_dim 64 0.95-0.98x at 1k-2k), but 1.00-1.10x at 256-512 keys; at 1.0-1.03 waves
/// up to 1.04x, and under a wave 1.00-1.08x (batch 8 at 2k-3k, merged in clusters, 0.82-0.93x).
/// Session 93 (46 shapes over 1.45-9.7 waves, 1024-3840 keys, GQA 32/8 and 64/8, head_dim 64 and
/// 128, pages of 16 and 64, ragged batches): 0.75-1.00x, none slower; the more waves and keys, the
/// larger the gain (1.45 waves 0.98-1.00x, 9.7 waves at 3840 keys 0.75-0.81x).
constexpr std::int64_t kDecodeRowPairWaveMinKeys = 1024;
constexpr double kDecodeRowPairMinWaves = 1.2;
constexpr int kDecodeRowPairMaxRows = kDecodeRowPair * kDecodeRowsPerCta;

/// Whether p's shape fits the row pair: the per-head sm_90 kernel (no head group or head pair /
/// quad), head_dim <= kDecodeRowPairMaxHeadDim and more than one row block (group x seqlen_q > 16).
/// Each row block's results are bitwise the per-head kernel's for the same splits, so choosing it
/// keeps a fixed num_splits' bitwise rule.
inline bool decode_row_pair_fits(const DecodeParams& p, bool sm90_kernel) {
  return sm90_kernel && p.head_group == 0 && p.kv_heads_per_cta == 1 && p.head_dim <= kDecodeRowPairMaxHeadDim &&
         decode_row_blocks(p.group, p.seqlen_q) > 1;
}

/// CTAs per (split, b, KV head) of the per-head kernels with `row_blocks_per_cta` row blocks a CTA.
constexpr int decode_row_block_ctas(int group, int seqlen_q, int row_blocks_per_cta) {
  return (decode_row_blocks(group, seqlen_q) + row_blocks_per_cta - 1) / row_blocks_per_cta;
}

/// CTAs per split and row block of a form whose CTA takes `heads` KV heads of one sequence:
/// batch x heads_kv / heads.
inline std::int64_t head_block_ctas(const DecodeParams& p, int heads) {
  return std::int64_t(p.batch) * (p.heads_kv / heads);
}

/// The most splits merged inside one cluster (the portable cluster size).
constexpr int kMaxClusterSplits = 8;
/// The most splits merged in clusters on a grid of at most one CTA per SM (beside the grids of at
/// most half the SMs, which take up to kMaxClusterSplits): 2, and 3 for the per-head kernel at
/// head_dim <= kDecodeClusterOfThreeMaxHeadDim on paged caches, and at head_dim 64 and below on
/// contiguous ones too (decode_one_per_sm_cluster_splits). On the H200 (bench/NOTES.md, session 49)
/// its 3 splits in clusters of 3 (96 CTAs at 32 (sequence, KV head) items: MHA batch 1 / 1k-4k, GQA 8
/// batch 4 / 1k-2k) against 2 in clusters of 2, on three machines: paged 0.10-1.57 us faster at
/// every shape; contiguous 0.06-0.61 us faster at head_dim 64, and at 128 0.35-0.96 us faster on two
/// machines but level on the third (-0.17..+0.16 us); at head_dim 256 0.15-0.98 us slower. (4 in
/// clusters of 4 on 128 CTAs ran 28-38% slower, session 12.)
constexpr int kDecodeClusterOnePerSmSplits = 2;
constexpr int kDecodeClusterOfThree = 3;
constexpr int kDecodeClusterOfThreeMaxHeadDim = 128;
constexpr int kDecodeClusterOfThreeContiguousMaxHeadDim = 64;

/// Whether a grid of `ctas` CTAs over `num_splits` heuristic splits merges them inside thread-block
/// clusters (no combine kernel): the sm_90 kernel, FASTATTN_DECODE_CLUSTER not "0", and either
/// 2 .. kMaxClusterSplits splits on at most half the SMs, or 2 .. `one_per_sm_splits` on at most
/// one CTA per SM (clusters of 2 or 3 side by side; run_decode says why). A num_splits the caller
/// fixed never does (splits_fixed). The callers also require every cluster resident at once
/// (decode_clusters_resident).
inline bool decode_cluster_merge_applies(bool sm90_kernel, int num_splits, std::int64_t ctas, int sm_count,
                                         int one_per_sm_splits) {
  const char* env = std::getenv("FASTATTN_DECODE_CLUSTER");
  if (!sm90_kernel || num_splits < 2 || num_splits > kMaxClusterSplits || (env && std::strcmp(env, "0") == 0))
    return false;
  return 2 * ctas <= sm_count || (num_splits <= one_per_sm_splits && ctas <= sm_count);
}

/// Whether a grid of `ctas` CTAs of p's sm_90 form (p.kv_heads_per_cta, p.row_blocks_per_cta,
/// p.head_dim), merged in clusters of `num_splits`, has all its clusters resident at once on
/// `device` (cudaOccupancyMaxActiveClusters for that launch's threads and shared memory; cached).
/// The split heuristic and the launch take the cluster merge only where they are: on an H200, 40
/// clusters of 3 at one CTA per SM (GQA 8 batch 5 at 4 query rows on pages, head_dim 128) ran
/// 31.0 us at 2k keys against 22.8 us for the same 3 splits through the combine kernel; 38 ran at
/// once (bench/NOTES.md, session 89). Defined in decode_cluster_residency.cu.
bool decode_clusters_resident(const DecodeParams& p, int device, int num_splits, std::int64_t ctas);

/// The one_per_sm_splits of decode_cluster_merge_applies for p's plan: kDecodeClusterOfThree where
/// it runs the per-head sm_90 kernel (no head group, one KV head per CTA) up to head_dim
/// kDecodeClusterOfThreeMaxHeadDim on a paged cache and up to
/// kDecodeClusterOfThreeContiguousMaxHeadDim on a contiguous one, else kDecodeClusterOnePerSmSplits.
inline int decode_one_per_sm_cluster_splits(const DecodeParams& p) {
  const bool per_head = p.head_group == 0 && p.kv_heads_per_cta == 1;
  const int max_head_dim =
      p.page_size > 0 ? kDecodeClusterOfThreeMaxHeadDim : kDecodeClusterOfThreeContiguousMaxHeadDim;
  return per_head && p.head_dim <= max_head_dim ? kDecodeClusterOfThree : kDecodeClusterOnePerSmSplits;
}

/// The split heuristic takes fewer splits that merge inside clusters over more that need the
/// combine kernel while each CTA then streams at most this many 64-key tiles. On the H200
/// (CUDA-graph replay, bench/NOTES.md): batch 1 / 8k GQA 8 in 8 clustered splits (16 tiles each)
/// 15.4 -> 14.2 us, batch 2 / 1k in 4 (4 tiles) 9.8 -> 8.1, batch 2 / 8k in 4 (32 tiles) 23.4 ->
/// 22.0, MHA batch 1 / 1k in 2 (8 tiles) 11.1 -> 10.3; but MHA batch 1 / 8k in 2 (64 tiles) 38.5
/// -> 39.2 and 1 / 32k worse still: fewer CTAs stream less of the bandwidth. Head_dim 64 and
/// below take a shorter bound (decode_cluster_max_tiles_per_cta).
constexpr int kDecodeClusterMaxTilesPerCta = 32;

/// CTAs of the attention kernel resident per SM: shared memory allows two at head_dim <= 128,
/// one for the sm_90 kernel at 256.
constexpr int decode_ctas_per_sm(int head_dim, bool sm90_kernel) {
  return sm90_kernel && head_dim > 128 ? 1 : 2;
}

/// CTAs per SM in the wave the split heuristic fills. The sm_90 kernel keeps enough bytes in
/// flight with one CTA per SM, and half the splits means half the partial states to merge: on the
/// H200, with the cluster rule of run_decode, one CTA per SM was faster on the batch 1-8 shapes at
/// 8k-32k keys (batch 1 / 8k: 33 -> 16 splits, 17.5 -> 16.7 us; batch 8 / 8k 70.6 -> 69.3 us) and
/// within noise elsewhere (bench/NOTES.md). The cp.async kernel counts every resident CTA.
constexpr int decode_split_wave_ctas_per_sm(int head_dim, bool sm90_kernel) {
  return sm90_kernel ? 1 : decode_ctas_per_sm(head_dim, sm90_kernel);
}

/// What a split costs in 64-key tiles of one CTA's streaming, for the split heuristic: the sm_90
/// kernel streams a tile in ~0.5 us per CTA at small batches, and on the H200 batch 8 / 1k (16
/// tiles per sequence) ran 14.6 us unsplit against 16.1 us in 2 splits of 8 tiles (their partial
/// states, the combine kernel and its launch), so a split must save more than 8 tiles per CTA.
/// The cp.async kernel: 0 (not re-measured; any split that shortens a CTA is taken).
constexpr int decode_split_cost_blocks(bool sm90_kernel) { return sm90_kernel ? 8 : 0; }

/// Rows per TMA box of the sm_90 kernel for a cache of `page_size` slots per page (0: a
/// contiguous cache): 64 (one box per 64-key tile and 64 columns) for contiguous caches and pages
/// of a multiple of 64 slots, the page size for pages of 8, 16 or 32 slots, else 0 (that kernel
/// does not take the cache: smaller boxes cost more per byte than cp.async).
constexpr int decode_tma_box_rows(int page_size) {
  return page_size == 0 || page_size % kDecodeBlockN == 0 ? kDecodeBlockN
         : page_size == 8 || page_size == 16 || page_size == 32 ? page_size
                                                                 : 0;
}

/// The head-group kernel (decode_kernel_sm90_head_group.cuh): KV heads per CTA (two CTAs per SM),
/// the wide form's KV heads per CTA (one CTA per SM), slots per box, the head_dim every form is
/// built for and the most packed query rows (group x seqlen_q) per head.
constexpr int kDecodeHeadGroup = 4;
constexpr int kDecodeHeadGroupWide = 8;
constexpr int kDecodeHeadGroupSlots = 16;
constexpr int kDecodeHeadGroupHeadDim = 128;
constexpr int kDecodeHeadGroupMaxRows = 8;
/// The wide form is also built at this head_dim: a GQA 8 token row is 1 KB and a page of 16 one
/// 16 KB run. Its tiles are 32 slots, two boxes of 16 (3 stages of 32 KB per tensor, as at 128):
/// in the no-math read, whole rows in 32-slot tiles read the random pool of pages of 16 2-3%
/// faster than the head quad's pattern at batch 128, and one page a tile in 6 stages no faster
/// than the quad's (bench/NOTES.md, session 51).
constexpr int kDecodeHeadGroupWideSmallHeadDim = 64;
/// Up to this head_dim the heuristic takes the wide form at any heads_kv that is a multiple of 8
/// (its grid of batch x heads_kv / 8 CTAs filling one wave), not only at 8: at head_dim 64 an MHA
/// token row is 4 KB, and eight-head boxes of 1 KB runs in one wave of 128 CTAs ran 3.7-4.2% faster
/// than the head quad's 256 CTAs (1.94 waves) at MHA batch 32 / 1k, 1.2-1.8% at 8k-32k contiguous
/// and 0.5-1.4% paged 16; at head_dim 128 MHA batch 32 it ran within -1.1..+1.0% of the four-head
/// form (bench/NOTES.md, session 52).
constexpr int kDecodeHeadGroupWideAnyHeadsMaxHeadDim = 64;
/// Its token-row form: 32 KV heads per CTA (one CTA per SM), so at heads_kv = 32 a box is whole
/// token rows; a consumer warp attends 4 heads, and a tile is 4 slots (the 16 MMA keys of a warp
/// are 4 heads x 4 slots), 32 KB per tensor.
constexpr int kDecodeHeadGroupRows = 32;
constexpr int kDecodeTokenRowHeadsPerWarp = 4;
/// The heuristic takes the token-row form only for caches of at least this many slots: on the H200,
/// against the per-head kernel at MHA batch 128, it gained 1.1-1.2% at 8k (session 28), 1.0% at 4k
/// and 0.3-0.7% at 2k, and at 1k it was within 0.4% either way by instance (session 29;
/// bench/NOTES.md).
constexpr std::int64_t kDecodeHeadGroupRowsMinKeys = 2048;
/// The token-row form with splits (decode_head_group_applies' second rule) from this batch and this
/// many slots on: on the H200 at MHA head_dim 128 it ran 1.5-6.1% faster than the per-head kernel's
/// grids of several waves at batch 12, 16 and 64 from 16k slots on, in both layouts on three machines;
/// at 8k 0.3-3.6% faster, at 2k 0.2-2.8% slower (bench/NOTES.md, session 80).
constexpr int kDecodeHeadGroupRowsSplitMinBatch = 12;
constexpr std::int64_t kDecodeHeadGroupRowsSplitMinKeys = 16384;

/// KV heads per consumer warp, slots per box and slots per tile of the head-group form with
/// `heads` per CTA at `head_dim`. A tile is one box, except the wide form's at head_dim 64: two.
constexpr int decode_head_group_heads_per_warp(int heads) {
  return heads == kDecodeHeadGroupRows ? kDecodeTokenRowHeadsPerWarp : 1;
}
constexpr int decode_head_group_box_slots(int heads) {
  return kDecodeHeadGroupSlots / decode_head_group_heads_per_warp(heads);
}
constexpr int decode_head_group_tile_boxes(int heads, int head_dim) {
  return heads == kDecodeHeadGroupWide && head_dim == kDecodeHeadGroupWideSmallHeadDim ? 2 : 1;
}
constexpr int decode_head_group_tile_slots(int heads, int head_dim) {
  return decode_head_group_tile_boxes(heads, head_dim) * decode_head_group_box_slots(heads);
}
/// Whether the form with `heads` per CTA is built for head_dim.
constexpr bool decode_head_group_head_dim_fits(int heads, int head_dim) {
  return head_dim == kDecodeHeadGroupHeadDim ||
         (heads == kDecodeHeadGroupWide && head_dim == kDecodeHeadGroupWideSmallHeadDim);
}

/// CTAs per SM of the head-group kernel with `heads` KV heads per CTA: its shared memory fits two
/// CTAs of the four-head form on an SM, one of the wide and token-row forms (DecodeHeadGroupConfig
/// checks it).
constexpr int decode_head_group_ctas_per_sm(int heads) { return heads == kDecodeHeadGroup ? 2 : 1; }

/// Whether p's shape fits the head-group kernel with `heads` KV heads per CTA (kDecodeHeadGroup,
/// kDecodeHeadGroupWide or kDecodeHeadGroupRows) on a device that runs the sm_90 kernel: a head_dim
/// the form is built for (128; the wide form also 64), heads_kv a multiple of `heads`, at most 8
/// packed query rows per consumer warp (group x seqlen_q per KV head, times the warp's heads), and
/// a contiguous cache or pages of a multiple of the form's box (16 slots; 4 for the token-row form).
inline bool decode_head_group_fits(const DecodeParams& p, bool sm90_kernel, int heads = kDecodeHeadGroup) {
  return sm90_kernel && decode_head_group_head_dim_fits(heads, p.head_dim) && p.heads_kv % heads == 0 &&
         std::int64_t(p.group) * p.seqlen_q * decode_head_group_heads_per_warp(heads) <= kDecodeHeadGroupMaxRows &&
         (p.page_size == 0 || p.page_size % decode_head_group_box_slots(heads) == 0);
}

/// The sm_90 kernel's head-pair form (two KV heads per CTA, one CTA per SM): the head_dims it is
/// built for (decode_head_pair_head_dim) and the most packed query rows (group x seqlen_q) per
/// head (the narrow math's; the head-quad form's too).
constexpr int kDecodeHeadPair = 2;
constexpr int kDecodeHeadPairMaxRows = 8;
/// Whether the head-pair form is built for `head_dim`: 64 and 128, whose boxes take whole 64-column
/// blocks (a head_dim the per-head kernel pads, e.g. 96, would need the per-block boxes).
constexpr bool decode_head_pair_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }
/// The heuristic takes the head-pair form only for caches of at least this many slots: on the H200
/// it gained from 8k keys on (batch 32 / 8k GQA 8 -1.1%, 32k -0.5-2.4%), but at 1k-4k it was no
/// faster on contiguous caches and 0.6-1.3% slower on pages of 16 (bench/NOTES.md, session 15).
constexpr std::int64_t kDecodeHeadPairMinKeys = 8192;
/// Up to this head_dim the heuristic also takes the head-pair form for grids of more than one wave:
/// at head_dim 64 it was 1.4-3.2% faster contiguous and 2.9-4.4% on pages of 16 than the per-head
/// kernel at 512 and 2048 pair CTAs from 8k keys on (bench/NOTES.md, session 33); at head_dim 128
/// no faster there (session 17), so it takes one wave only.
constexpr int kDecodeHeadPairMultiWaveMaxHeadDim = 64;

/// Where the per-head plan's splits merge in the combine kernel anyway, the split heuristic fills two
/// CTAs per SM instead of one on caches of small boxes: head_dim at most kDecodeSmallBoxMaxHeadDim and
/// pages of at most kDecodeSmallBoxMaxPageSize slots. There a CTA's paged tiles (4 boxes of 1-2 KB
/// per tensor) bound one CTA's stream, and on the H200 twice the splits (the same combine kernel)
/// were 2-7% faster on pages of 16 and 18-28% on pages of 8 (GQA 8 batch 1-4 / 16k-32k, MHA batch 1 /
/// 16k-32k); head_dim 128 on pages of 8 within 1% either way, contiguous caches level or 1-2% slower
/// (bench/NOTES.md, session 34).
constexpr int kDecodeSmallBoxMaxHeadDim = 64;
constexpr int kDecodeSmallBoxMaxPageSize = 16;
/// Whether a cache of `page_size` slots per page (0: contiguous) at `head_dim` has those small
/// paged boxes.
constexpr bool decode_small_paged_boxes(int head_dim, int page_size) {
  return head_dim <= kDecodeSmallBoxMaxHeadDim && page_size > 0 && page_size <= kDecodeSmallBoxMaxPageSize;
}

/// The split heuristic's bound on the 64-key tiles a CTA streams when it takes fewer splits merged
/// in clusters over more that need the combine kernel: kDecodeClusterMaxTilesPerCta above head_dim
/// 64; at head_dim <= kDecodeSmallBoxMaxHeadDim 16 tiles, and 8 on small paged boxes. On the H200
/// at head_dim 64 (bench/NOTES.md, session 44; GQA 8 batch 1-4 and MHA batch 1 at 1k-16k, the
/// clustered plan against the combine kernel's best count) clusters were 0.6-5.4% faster
/// contiguous at 16 tiles and 4.9-7.8% slower at 32; on pages of 16, 7.0-13.6% faster at 8 tiles
/// and 2.8-8.7% slower at 16 (19.7-25.9% at 32).
constexpr int decode_cluster_max_tiles_per_cta(int head_dim, int page_size) {
  return head_dim > kDecodeSmallBoxMaxHeadDim          ? kDecodeClusterMaxTilesPerCta
         : decode_small_paged_boxes(head_dim, page_size) ? 8
                                                         : 16;
}

/// Packed query rows per KV head above which a per-head CTA runs the wide math (decode_tile.cuh,
/// 16 rows a warp) instead of the narrow one (decode_tile_narrow.cuh); the row pair runs it too.
constexpr int kDecodeWideRowsAbove = 8;

/// The split heuristic's bound for per-head CTAs of the wide math (decode_wide_split_rule): they
/// take clustered splits only while a CTA streams at most this many 64-key tiles. On the H200
/// (bench/NOTES.md, session 87; GQA 32/8 at 4 and 8 query rows a request, pages of 16) 8 clustered
/// splits of 2 tiles (batch 1 / 1k) were 7-12% faster than the combine kernel's counts, but of 16
/// tiles (batch 1 / 8k) 8% slower than 12-16 splits through the combine kernel at 16 rows and 19%
/// at the row pair's 32: a wide CTA's math, not the read, bounds a small grid, so more CTAs pay.
constexpr int kDecodeWideClusterMaxTilesPerCta = 8;

/// Whether the split heuristic takes the wide math's rule for p (per-head CTAs of more than
/// kDecodeWideRowsAbove packed rows): the cluster bound above, and no doubling of a combine-kernel
/// count on small paged boxes (at the row pair's one CTA per SM that doubling is a second wave:
/// batch 1 / 8k at 32 rows 28.5 against 22.7 us). FASTATTN_DECODE_WIDE_SPLITS=0 keeps the narrow
/// math's rule for every shape (for comparison).
inline bool decode_wide_split_rule(const DecodeParams& p) {
  const char* env = std::getenv("FASTATTN_DECODE_WIDE_SPLITS");
  if (env && std::strcmp(env, "0") == 0) return false;
  return p.head_group == 0 && p.kv_heads_per_cta == 1 && p.group * p.seqlen_q > kDecodeWideRowsAbove;
}

/// Grids of the head-pair and head-quad forms smaller than a wave split their keys, merged in
/// clusters (decode_form_splits), into CTAs of at least this many 64-key tiles. On the H200 at
/// head_dim 64 (bench/NOTES.md, session 34) clustered pair CTAs of 4 tiles were mixed against the
/// per-head kernel (MHA batch 1 / 1k and GQA 8 batch 4 / 1k: 1-3% faster paged, 1-3% slower
/// contiguous; GQA 8 batch 2 / 2k in 8 splits 5-10% slower); of 8-16 tiles, 6-22% faster paged.
constexpr int kDecodeFormClusterMinTiles = 8;
/// Up to this head_dim the heuristic takes the clustered head pair where its grid has as many CTAs
/// as the per-head kernel's, on at most half the SMs (pages of 16: 9-22% faster at head_dim 64;
/// 5-15% slower at 128; on 128 SMs in clusters of 2, up to 15% slower at 1k-2k).
constexpr int kDecodeHeadPairSameGridMaxHeadDim = 64;
/// Where the clustered head pair replaces the per-head plan's combine kernel, its grid holds more
/// than 1 / kDecodeHeadPairClusterMinSmShare of the SMs, and up to head_dim
/// kDecodeHeadPairLongClustersMaxHeadDim on a contiguous cache its CTAs may stream any number of
/// tiles (decode_host.cpp, pair_clusters_pay, says what was measured).
constexpr int kDecodeHeadPairClusterMinSmShare = 4;
constexpr int kDecodeHeadPairLongClustersMaxHeadDim = 64;

/// Whether p's shape fits the head-pair form on a device that runs the sm_90 kernel: head_dim 64 or
/// 128 (decode_head_pair_head_dim), an even heads_kv and at most 8 packed query rows per KV head.
/// Any cache the sm_90 kernel takes.
inline bool decode_head_pair_fits(const DecodeParams& p, bool sm90_kernel) {
  return sm90_kernel && decode_head_pair_head_dim(p.head_dim) && p.heads_kv % kDecodeHeadPair == 0 &&
         std::int64_t(p.group) * p.seqlen_q <= kDecodeHeadPairMaxRows;
}

/// The sm_90 kernel's head-quad form (four KV heads per CTA, one CTA per SM): head_dim 64 only,
/// where 3 stages of 4 heads x 64 slots x 128 bytes per tensor fill the shared memory (at 128 one
/// stage would).
constexpr int kDecodeHeadQuad = 4;
constexpr int kDecodeHeadQuadHeadDim = 64;
/// The heuristic takes the head-quad form from this many slots on (the shortest caches measured:
/// at 1k it was 4-9% faster than the per-head kernel, bench/NOTES.md session 33) ...
constexpr std::int64_t kDecodeHeadQuadMinKeys = 1024;
/// ... and, from kDecodeHeadPairMinKeys slots on, for grids of at most this many waves: at 3.9
/// waves it was 0.3-2% faster than the head pair (8k-32k), at 7.8 (MHA batch 128 / 8k, 1024 CTAs)
/// 1% slower, so there the pair stays.
constexpr int kDecodeHeadQuadMaxWavesLong = 4;

/// Whether p's shape fits the head-quad form on a device that runs the sm_90 kernel: head_dim 64,
/// heads_kv a multiple of 4 and at most 8 packed query rows per KV head. Any cache the sm_90
/// kernel takes.
inline bool decode_head_quad_fits(const DecodeParams& p, bool sm90_kernel) {
  return sm90_kernel && p.head_dim == kDecodeHeadQuadHeadDim && p.heads_kv % kDecodeHeadQuad == 0 &&
         std::int64_t(p.group) * p.seqlen_q <= kDecodeHeadPairMaxRows;
}

/// True when the attention of a decode call over a cache of `page_size` (0: contiguous) on a
/// device of compute capability cc_major.cc_minor runs the sm_90 TMA kernel: compute capability
/// 9.0 and a page size it takes (decode_tma_box_rows), unless FASTATTN_DECODE_KERNEL=sm80 asks
/// for the cp.async kernel (for comparisons and tests).
bool use_sm90_decode_kernel(int cc_major, int cc_minor, int page_size);

}  // namespace fastattn::cuda_decode
