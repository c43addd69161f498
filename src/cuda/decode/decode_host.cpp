// Lowering of KVCacheArgs to the CUDA decode kernels' DecodeParams: the checks only the CUDA
// path needs, the split-KV heuristic and the workspace layout. Nothing here reads device memory,
// so a call never synchronises with the GPU (index contents are clamped on the device, see
// DecodeParams) and can be captured in a CUDA graph.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "core/heuristics.h"
#include "cuda/common/cuda_check.h"
#include "cuda/common/host_checks.h"
#include "cuda/cuda_backend.h"
#include "cuda/decode/decode_params.h"
#include "cuda/decode/decode_plan.h"

namespace fastattn::cuda_decode {
namespace {

using cuda_detail::as_int;
using cuda_detail::rows_aligned;

std::size_t align_up(std::size_t n) { return workspace_align_up(n); }

struct Plan {
  DecodeParams p;
  std::size_t q_rot_bytes = 0;  ///< rotated q, first in the workspace
  std::size_t lse_bytes = 0;    ///< partial LSE (split-KV only), then partial O
  std::size_t o_bytes = 0;
  std::size_t total() const { return q_rot_bytes + lse_bytes + o_bytes; }
};

Plan plan_decode(check::ArgChecker& c, const KVCacheArgs& a, const core::KVCacheDims& d) {
  cuda_detail::require_device(c);
  Plan plan;
  DecodeParams& p = plan.p;
  p.dtype = cuda_detail::kernel_dtype<Dtype>(c, a.q.dtype);
  if (d.a.head_dim % 8 != 0)
    throw NotSupportedError(std::string(c.op()) + ": head_dim " + std::to_string(d.a.head_dim) +
                            " on CUDA must be a multiple of 8 (16-byte rows)");
  for (auto [t, n] : {std::pair{&a.q, "q"}, {&a.k_cache, "k_cache"}, {&a.v_cache, "v_cache"}})
    rows_aligned(c, *t, n);
  p.batch = as_int(c, d.a.batch, "q batch (dim 0)", 65535);
  p.heads_q = as_int(c, d.a.heads_q, "q heads (dim 2)", 65535);
  p.heads_kv = static_cast<int>(d.a.heads_kv);
  p.group = p.heads_q / std::max(p.heads_kv, 1);
  p.head_dim = static_cast<int>(d.a.head_dim);
  p.seqlen_q = as_int(c, d.a.seqlen_q, "q seqlen (dim 1)", 65535);
  p.seqlen_new = as_int(c, d.seqlen_new, "k seqlen_new (dim 1)", 65535);
  const std::int64_t rows_per_kv = std::int64_t(p.group) * p.seqlen_q;
  as_int(c, std::int64_t(p.heads_kv) * ((rows_per_kv + 15) / 16), "heads_k x ceil(heads_q / heads_k x seqlen_q / 16)", 65535);

  p.q = a.q.data;
  p.q_batch_stride = a.q.stride(0);
  p.q_row_stride = a.q.stride(1);
  p.q_head_stride = a.q.stride(2);
  p.out = a.out.data;
  p.out_batch_stride = a.out.stride(0);
  p.out_row_stride = a.out.stride(1);
  p.out_head_stride = a.out.stride(2);
  if (a.lse) {
    p.lse = static_cast<float*>(a.lse->data);
    p.lse_batch_stride = a.lse->stride(0);
    p.lse_head_stride = a.lse->stride(1);
    p.lse_row_stride = a.lse->stride(2);
  }
  cuda_detail::set_sinks(p, a.sinks);

  set_cache_strides(p, a.k_cache, a.v_cache);
  std::int64_t max_keys = 0;  // the heuristic's bound on a sequence's keys (no device read)
  if (d.paged.page_size > 0) {
    max_keys = set_page_table(c, p, d.paged, a.block_table, a.page_indptr, a.page_indices, "k_cache");
    if (!a.cache_batch_idx && p.cache_rows < p.batch)
      c.fail_value(a.block_table ? "block_table" : "page_indptr",
                   "has " + std::to_string(p.cache_rows) + " rows, fewer than B = " + std::to_string(p.batch));
  } else {
    p.cache_rows = as_int(c, d.cache_rows, "k_cache rows (dim 0)", INT32_MAX);
    p.cache_len = as_int(c, d.cache_len, "k_cache slots (dim 1)", INT32_MAX);
    max_keys = p.cache_len;
  }
  // The caller's hint, where it is tighter than the capacity (it only steers the heuristic).
  if (a.max_cache_seqlen > 0) max_keys = std::min(max_keys, a.max_cache_seqlen);
  if (a.cache_seqlens) p.cache_seqlens = static_cast<const std::int32_t*>(a.cache_seqlens->data);
  p.cache_seqlen = as_int(c, a.cache_seqlen, "cache_seqlens", INT32_MAX);
  if (a.cache_batch_idx) p.cache_batch_idx = static_cast<const std::int32_t*>(a.cache_batch_idx->data);
  if (a.cache_leftpad) p.cache_leftpad = static_cast<const std::int32_t*>(a.cache_leftpad->data);

  if (a.k_new) {
    p.k_new = a.k_new->data;
    p.v_new = a.v_new->data;
    p.knew_batch_stride = a.k_new->stride(0);
    p.knew_row_stride = a.k_new->stride(1);
    p.knew_head_stride = a.k_new->stride(2);
    p.vnew_batch_stride = a.v_new->stride(0);
    p.vnew_row_stride = a.v_new->stride(1);
    p.vnew_head_stride = a.v_new->stride(2);
  }
  if (d.rotary_dim > 0) {
    p.rotary_cos = a.rotary_cos->data;
    p.rotary_sin = a.rotary_sin->data;
    p.rotary_f32 = a.rotary_cos->dtype == DType::kFloat32;
    p.rotary_interleaved = a.rotary_interleaved;
    p.rotate_q_per_row = a.options.causal || a.options.window_left >= 0 || a.options.window_right >= 0;
    p.rotary_dim = static_cast<int>(d.rotary_dim);
    p.rotary_len = as_int(c, d.rotary_len, "rotary_cos rows", INT32_MAX);
    p.cos_row_stride = a.rotary_cos->stride(0);
    p.sin_row_stride = a.rotary_sin->stride(0);
    plan.q_rot_bytes = align_up(static_cast<std::size_t>(a.q.numel()) * 2);
  }

  cuda_detail::set_options(p, core::validate_options(c, a.options, d.a.batch, d.a.heads_q, d.a.head_dim));

  if (a.split_plan) {
    // The caller's count per sequence: the per-head kernel (as a fixed num_splits runs), its
    // splits always merged by the combine kernel.
    p.split_plan = static_cast<const std::int32_t*>(a.split_plan->data);
    p.plan_items = static_cast<int>(d.split_items);
    p.head_group = 0;
    p.kv_heads_per_cta = 1;
    p.row_blocks_per_cta = decode_row_blocks_per_cta(c, p, max_keys + p.seqlen_new);
    p.num_splits = 1;  // unused with a plan
    p.splits_fixed = true;
  } else {
    // Split-KV (decode_num_splits): the bound on keys is the cache capacity or the caller's
    // max_cache_seqlen (no device read).
    p.head_group = decode_head_group_applies(c, p, a.num_splits, max_keys + p.seqlen_new);
    p.kv_heads_per_cta = decode_kv_heads_per_cta(c, p, a.num_splits, max_keys + p.seqlen_new, /*may_split=*/true);
    p.row_blocks_per_cta = decode_row_blocks_per_cta(c, p, max_keys + p.seqlen_new);
    p.num_splits = decode_num_splits(c, p, a.num_splits, max_keys + p.seqlen_new);
    p.splits_fixed = a.num_splits > 0;
  }
  const SplitStateBytes states = split_state_bytes(p);
  plan.lse_bytes = states.lse;
  plan.o_bytes = states.o;
  return plan;
}

}  // namespace

void set_cache_strides(DecodeParams& p, const TensorView& k, const TensorView& v) {
  p.k_cache = k.data;
  p.v_cache = v.data;
  p.k_batch_stride = k.stride(0);
  p.k_row_stride = k.stride(1);
  p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_row_stride = v.stride(1);
  p.v_head_stride = v.stride(2);
}

std::int64_t set_page_table(const check::ArgChecker& c, DecodeParams& p, const core::PagedDims& d,
                            const std::optional<TensorView>& block_table, const std::optional<TensorView>& page_indptr,
                            const std::optional<TensorView>& page_indices, const std::string& k_name) {
  p.page_size = as_int(c, d.page_size, ("page_size (" + k_name + " dim 1)").c_str(), INT32_MAX);
  p.page_shift = cuda_detail::page_shift_of(p.page_size);
  p.num_pages = as_int(c, d.num_pages, ("num_pages (" + k_name + " dim 0)").c_str(), INT32_MAX);
  p.cache_rows = as_int(c, d.table_rows, "page table rows", INT32_MAX);
  if (block_table) {
    p.block_table = static_cast<const std::int32_t*>(block_table->data);
    p.block_table_stride = block_table->stride(0);
    p.max_pages_per_seq = as_int(c, d.max_pages_per_seq, "block_table columns", INT32_MAX);
    return std::int64_t(p.max_pages_per_seq) * p.page_size;
  }
  p.page_indptr = static_cast<const std::int32_t*>(page_indptr->data);
  p.page_indices = static_cast<const std::int32_t*>(page_indices->data);
  p.num_page_indices = page_indices->size(0);
  return p.num_page_indices * p.page_size;
}

namespace {

/// The planner's choice of one of the sm_90 kernel forms (head group, head pair) for a call its
/// shape `fits`: the switch `env_name` "0" never takes it, "1" always; unset, a num_splits the
/// caller fixed (`requested` > 0) keeps the per-head kernel whatever the batch (splits_fixed),
/// else `heuristic` decides.
bool decode_form_applies(bool fits, const char* env_name, int requested, bool heuristic) {
  if (!fits) return false;
  const char* env = std::getenv(env_name);
  if (env && std::strcmp(env, "0") == 0) return false;
  if (env && std::strcmp(env, "1") == 0) return true;
  return requested == 0 && heuristic;
}

/// Whether `items` CTAs fill between 15/16 of a wave of `wave` CTAs and the whole wave.
bool fills_one_wave(std::int64_t items, std::int64_t wave) { return 16 * items >= 15 * wave && items <= wave; }

/// 64-key tiles of a sequence of `max_keys` keys.
std::int64_t key_tiles(std::int64_t max_keys) { return (max_keys + kDecodeBlockN - 1) / kDecodeBlockN; }

/// Key splits of a head-pair or head-quad grid of `form_ctas` CTAs per split over `tiles` tiles:
/// the most, up to kMaxClusterSplits, that merge in clusters on `sm_count` SMs
/// (decode_cluster_merge_applies: on at most half the SMs, or 2 on at most one CTA per SM, what
/// decode_one_per_sm_cluster_splits gives these forms) with CTAs of at least
/// kDecodeFormClusterMinTiles tiles; 1 where none does (a grid of a wave or more).
int decode_form_splits(std::int64_t form_ctas, std::int64_t tiles, int sm_count) {
  for (int splits = kMaxClusterSplits; splits >= 2; --splits)
    if (tiles / splits >= kDecodeFormClusterMinTiles &&
        decode_cluster_merge_applies(true, splits, form_ctas * splits, sm_count, kDecodeClusterOnePerSmSplits))
      return splits;
  return 1;
}

/// The head pair's rule for small grids (decode_kv_heads_per_cta): its splits merged in clusters
/// (decode_form_splits) against the per-head kernel's plan for the same call. On the H200
/// (bench/NOTES.md, session 34), against that plan, contiguous / pages of 16:
/// - where the per-head plan merges in the combine kernel and a pair CTA streams at most
///   kDecodeClusterMaxTilesPerCta tiles: head_dim 64 GQA 8 batch 4 / 8k and MHA batch 1 / 8k 4-7%
///   / 5-7% faster (64 pair CTAs in clusters of 4 against 128 per-head CTAs and the combine
///   kernel), head_dim 128 0-1.5% / 1-2.3%; at 32k (128 tiles a CTA) 4.5% slower paged;
/// - at head_dim 64 (kDecodeHeadPairSameGridMaxHeadDim), where the pair's grid has as many CTAs as
///   the per-head one on at most half the SMs: GQA 8 batch 8 / 1k and MHA batch 2 / 1k 2% slower /
///   9-10% faster (a paged-16 tile's boxes carry 4 KB instead of 2, and a CTA streams half the
///   tiles), GQA 8 batch 4 / 2k and MHA batch 1 / 2k 6% / 14-16%, GQA 8 batch 2 / 8k 11% / 22%. On
///   128 SMs (GQA 8 batch 16, MHA batch 4: pairs in clusters of 2 against 128 unsplit per-head
///   CTAs) 7-15% slower at 1k-2k; at head_dim 128, 5-15% slower.
/// Session 44 (head_dim 64): where the pair replaces the combine kernel, its grid must hold more
/// than a quarter of the SMs (kDecodeHeadPairClusterMinSmShare): the 32 pair CTAs of GQA 8 batch 1
/// were 13-40% slower than the per-head plan at 1k-16k, both layouts. On a contiguous cache at
/// head_dim <= kDecodeHeadPairLongClustersMaxHeadDim the pair's CTAs may stream any number of tiles:
/// against the per-head plan's combine kernel, 64-tile CTAs were 2-3% faster in one sweep (GQA 8
/// batch 4 / 16k, MHA batch 1 / 16k) and 128-tile ones 1.7% in another (MHA batch 1 / 32k), and in
/// the planner's A/B 3.1-5.4% (GQA 8 batch 2-4 and MHA batch 1, 16k-32k); on pages of 16 the same
/// were 5-7% slower.
bool pair_clusters_pay(const check::ArgChecker& c, const DecodeParams& p, std::int64_t max_keys, int sm_count) {
  DecodeParams per_head = p;
  per_head.kv_heads_per_cta = 1;
  const int head_splits = decode_num_splits(c, per_head, 0, max_keys);
  const std::int64_t head_ctas = head_splits * head_block_ctas(p, 1);  // one row block (pair-sized rows)
  const bool head_combines =
      head_splits > 1 && !decode_cluster_merge_applies(true, head_splits, head_ctas, sm_count,
                                                       decode_one_per_sm_cluster_splits(per_head));
  const std::int64_t pairs = head_block_ctas(p, kDecodeHeadPair);
  const std::int64_t tiles = key_tiles(max_keys);
  const int pair_splits = decode_form_splits(pairs, tiles, sm_count);
  if (pair_splits < 2) return false;
  const std::int64_t pair_ctas = pair_splits * pairs;
  const bool any_length = p.head_dim <= kDecodeHeadPairLongClustersMaxHeadDim && p.page_size == 0;
  const bool replaces_combine = head_combines && kDecodeHeadPairClusterMinSmShare * pair_ctas > sm_count &&
                                (any_length || (tiles + pair_splits - 1) / pair_splits <= kDecodeClusterMaxTilesPerCta);
  const bool same_grid =
      p.head_dim <= kDecodeHeadPairSameGridMaxHeadDim && pair_ctas == head_ctas && 2 * head_ctas <= sm_count;
  return replaces_combine || same_grid;
}

/// The token-row form's second rule (decode_head_group_applies): with its heuristic splits, at MHA
/// head_dim 128 decode (one query row per KV head), batch >= kDecodeHeadGroupRowsSplitMinBatch and
/// >= kDecodeHeadGroupRowsSplitMinKeys slots, where the four-head form's grid does not fill its wave
/// (so the per-head kernel would run several waves) and the token-row grid, batch x splits, fills
/// 15/16 of one wave of one CTA per SM to all of it (batch 12 x 11, 16 x 8, 64 x 2 on 132 SMs). On
/// the H200, against the per-head plans (bench/NOTES.md, session 80; both layouts): 1.5-6.1% faster
/// at batch 12, 16 and 64 from 16k slots, on three machines. Where the grid misses a wave it was
/// slower (batch 24: 5 splits, 120 CTAs, 1.3-4.5%; batch 48: 96 CTAs, 14-16%; batch 96 and 112: 4-16%),
/// and so were batch 2-8 (the pair and clustered per-head plans).
/// `wave(heads)`: one wave of a head-group form's grid.
template <class Wave>
bool token_rows_split_grid_pays(const check::ArgChecker& c, const DecodeParams& p, std::int64_t max_keys,
                                const Wave& wave) {
  if (p.head_dim != 128 || std::int64_t(p.group) * p.seqlen_q != 1 || p.batch < kDecodeHeadGroupRowsSplitMinBatch ||
      max_keys < kDecodeHeadGroupRowsSplitMinKeys)
    return false;
  if (fills_one_wave(head_block_ctas(p, kDecodeHeadGroup), wave(kDecodeHeadGroup))) return false;
  DecodeParams rows = p;
  rows.head_group = kDecodeHeadGroupRows;
  rows.kv_heads_per_cta = 1;
  const int splits = decode_num_splits(c, rows, 0, max_keys);
  return splits >= 2 && fills_one_wave(splits * head_block_ctas(p, kDecodeHeadGroupRows), wave(kDecodeHeadGroupRows));
}

}  // namespace

int decode_head_group_applies(const check::ArgChecker& c, const DecodeParams& p, int requested,
                              std::int64_t max_keys) {
  const cuda_detail::DeviceInfo info = cuda_detail::device_info(c.device().index);
  const bool sm90 = use_sm90_decode_kernel(info.cc_major, info.cc_minor, p.page_size);
  // FASTATTN_DECODE_HEAD_GROUP: "32" takes the token-row form wherever it fits, "8" the wide form,
  // "1" the four-head form, "0" no form.
  const char* env = std::getenv("FASTATTN_DECODE_HEAD_GROUP");
  const std::string_view switch_value = env ? env : "";
  // A form is taken where it fits and the switch names it, or the switch leaves the choice to the
  // heuristic (unset or "32") and the heuristic takes it.
  const bool unswitched = switch_value != "0" && switch_value != "1" && switch_value != "8";
  const auto takes = [&](std::string_view name, bool fits, bool heuristic) {
    return fits && (switch_value == name || (unswitched && heuristic));
  };
  // One wave of a form's grid: its CTAs per SM on every SM.
  const auto wave = [&](int heads) { return std::int64_t(decode_head_group_ctas_per_sm(heads)) * info.sm_count; };
  // The token-row form (32 heads, one CTA per SM) where a box is whole token rows of 8 KB
  // (heads_kv = 32), batch CTAs fill one wave with no split and the cache is long
  // (kDecodeHeadGroupRowsMinKeys): MHA batch 128 / 2k-8k on the H200. There the no-math read drew
  // 1.1-1.4% more from whole rows than from the per-head and four-head patterns, and the form ran
  // 1.1-1.2% faster than the per-head kernel at 8k, 1.0% at 4k, 0.3-0.7% at 2k; at 1k within 0.4%
  // either way, and in 4 or 16 splits at MHA batch 32 and 8 / 8k no faster than the four-head form
  // or the head pair (bench/NOTES.md, sessions 28-29). Also, with its splits, where the per-head
  // kernel would run several waves and the token-row grid fills one (token_rows_split_grid_pays).
  const bool rows_fits = decode_head_group_fits(p, sm90, kDecodeHeadGroupRows);
  const bool rows_heuristic = requested == 0 && p.heads_kv == kDecodeHeadGroupRows &&
                              ((fills_one_wave(p.batch, wave(kDecodeHeadGroupRows)) &&
                                max_keys >= kDecodeHeadGroupRowsMinKeys) ||
                               (rows_fits && token_rows_split_grid_pays(c, p, max_keys, wave)));
  if (takes("32", rows_fits, rows_heuristic)) return kDecodeHeadGroupRows;
  // The wide form (8 heads, one CTA per SM) where a box is a whole token row (heads_kv = 8) and
  // its grid is one full wave with no split: batch 128 / 1k-32k GQA 8 on the H200. There a box of
  // pages of 16 is a whole 32 KB page instead of half of one, which took 60-75% of what a random
  // page pool costs the four-head read (no-math read; contiguous level or 0.2% faster); at MHA
  // batch 32 the 8-head boxes read 1.6% slower (bench/NOTES.md, session 27). At head_dim 64 it ran
  // 1.6-3.8% faster than the head quad at batch 124-128 / 1k and 32k and 0.5-1.1% at 8k, both
  // layouts, and level at batch 132, where the quad's 264 CTAs fill two waves exactly (session
  // 51); and there it is taken at any heads_kv that fits (a multiple of 8) where its grid is one
  // wave: MHA batch 32 ran 3.7-4.2% faster than the quad at 1k and 0.5-1.8% at 8k-32k (session 52).
  const bool wide_fits = decode_head_group_fits(p, sm90, kDecodeHeadGroupWide);
  const bool wide_heads = p.heads_kv == kDecodeHeadGroupWide || p.head_dim <= kDecodeHeadGroupWideAnyHeadsMaxHeadDim;
  const bool wide_heuristic = requested == 0 && wide_heads &&
                              fills_one_wave(head_block_ctas(p, kDecodeHeadGroupWide), wave(kDecodeHeadGroupWide));
  if (takes("8", wide_fits, wide_heuristic)) return kDecodeHeadGroupWide;
  const bool fits = decode_head_group_fits(p, sm90);
  // Where its grid is one full wave of two CTAs per SM (15/16 of one at least) with no split.
  // Measured on the H200 (graph replay, bench/NOTES.md sessions 10 and 11): batch 128 / 1k-4k GQA
  // 8 and MHA batch 32 / 1k-2k 1-3.6% faster, batch 128 / 8k and MHA 32 / 8k 1.5-1.7% faster on
  // one machine instance (0.5% slower on another, whose per-head times were 3% lower); slower
  // where it needs splits (batch 32 / 8k -2.6%, 64 / 2k -1.5%; merged in clusters of 3-4, worse
  // still) and over two or more waves (MHA batch 64 and 128 / 1k -0.2-0.7%, 2k-8k -1.5-4%).
  const std::int64_t items = head_block_ctas(p, kDecodeHeadGroup);
  const bool four = decode_form_applies(fits, "FASTATTN_DECODE_HEAD_GROUP", requested,
                                        fills_one_wave(items, wave(kDecodeHeadGroup)));
  return four ? kDecodeHeadGroup : 0;
}

int decode_kv_heads_per_cta(const check::ArgChecker& c, const DecodeParams& p, int requested, std::int64_t max_keys,
                            bool may_split) {
  if (p.head_group) return 1;
  const cuda_detail::DeviceInfo info = cuda_detail::device_info(c.device().index);
  const bool sm90 = use_sm90_decode_kernel(info.cc_major, info.cc_minor, p.page_size);
  // The head-quad form where its grid fills at least 15/16 of a wave of one CTA per SM, except
  // over more than kDecodeHeadQuadMaxWavesLong waves on long caches. At head_dim 64 on the H200 it
  // was 4-9% faster than the per-head kernel at 1k on grids of 1 to 7.8 waves (its CTAs start and
  // end half as often per SM), 2.4-3.5% at 2k, and 1.2-2% faster than the pair at 8k, 0.3-1.6% at
  // 32k, on 3.9 waves (bench/NOTES.md, session 33).
  const std::int64_t quads = head_block_ctas(p, kDecodeHeadQuad);
  const bool quad_waves = 16 * quads >= 15 * info.sm_count &&
                          (max_keys < kDecodeHeadPairMinKeys || quads <= kDecodeHeadQuadMaxWavesLong * info.sm_count);
  if (decode_form_applies(decode_head_quad_fits(p, sm90), "FASTATTN_DECODE_HEAD_QUAD", requested,
                          quad_waves && max_keys >= kDecodeHeadQuadMinKeys))
    return kDecodeHeadQuad;
  const bool fits = decode_head_pair_fits(p, sm90);
  // Where its grid is one wave of one CTA per SM (15/16 of one at least) with no split: the rows
  // where the per-head kernel runs two CTAs per SM unsplit (batch x heads_kv = 256 on the H200:
  // batch 32 GQA 8, MHA batch 8). There the pairs' 512-byte runs read 1-1.7% faster than one
  // head's 256-byte ones (no-math read, bench/NOTES.md session 15); half the SMs' worth of pairs
  // read 5-7% slower, hence the lower bound. At head_dim 64 also more than one wave
  // (kDecodeHeadPairMultiWaveMaxHeadDim): a wave of pairs at one per SM holds as many heads as a
  // per-head wave at two, so the waves' quantisation is the same. Long caches only
  // (kDecodeHeadPairMinKeys).
  const std::int64_t items = head_block_ctas(p, kDecodeHeadPair);
  const bool waves = p.head_dim <= kDecodeHeadPairMultiWaveMaxHeadDim ? 16 * items >= 15 * info.sm_count
                                                                      : fills_one_wave(items, info.sm_count);
  // The small-grid rule plans the per-head split count again, so it is evaluated only where its
  // answer can decide: the heuristic's call (`requested` 0) of a shape the form fits.
  const bool pair = decode_form_applies(fits, "FASTATTN_DECODE_HEAD_PAIR", requested,
                                        (waves && max_keys >= kDecodeHeadPairMinKeys) ||
                                            (requested == 0 && may_split && fits &&
                                             pair_clusters_pay(c, p, max_keys, info.sm_count)));
  return pair ? kDecodeHeadPair : 1;
}

int decode_row_blocks_per_cta(const check::ArgChecker& c, const DecodeParams& p, std::int64_t max_keys) {
  const cuda_detail::DeviceInfo info = cuda_detail::device_info(c.device().index);
  if (!decode_row_pair_fits(p, use_sm90_decode_kernel(info.cc_major, info.cc_minor, p.page_size))) return 1;
  // FASTATTN_DECODE_ROW_PAIR: "0" never, "1" wherever it fits; unset, 17-32 rows on long caches,
  // or on shorter ones where the pair's grid is at least 1.2 waves (kDecodeRowPairMinKeys and
  // kDecodeRowPairWaveMinKeys say what was measured).
  const char* env = std::getenv("FASTATTN_DECODE_ROW_PAIR");
  if (env && std::strcmp(env, "0") == 0) return 1;
  if (env && std::strcmp(env, "1") == 0) return kDecodeRowPair;
  const bool waves = double(p.batch) * p.heads_kv >= kDecodeRowPairMinWaves * info.sm_count;
  const bool heuristic = std::int64_t(p.group) * p.seqlen_q <= kDecodeRowPairMaxRows &&
                         (max_keys >= kDecodeRowPairMinKeys || (waves && max_keys >= kDecodeRowPairWaveMinKeys));
  return heuristic ? kDecodeRowPair : 1;
}

int decode_num_splits(const check::ArgChecker& c, const DecodeParams& p, int requested, std::int64_t max_keys) {
  if (requested > 0) return requested;
  const cuda_detail::DeviceInfo info = cuda_detail::device_info(c.device().index);
  // A grid of one wave or more: one split. A smaller one: its splits merge in clusters.
  if (p.kv_heads_per_cta > 1)
    return decode_form_splits(head_block_ctas(p, p.kv_heads_per_cta), key_tiles(max_keys), info.sm_count);
  if (p.head_group) {
    // Its CTAs (two per SM, or one for the wide and token-row forms) stream 16-slot tiles of four
    // (eight) heads, 32-slot ones of eight at head_dim 64, or 4-slot tiles of 32; a tile costs a
    // consumer warp about what a 64-key tile costs the per-head kernel's, hence the same price of a
    // split.
    const std::int64_t items = head_block_ctas(p, p.head_group);
    const std::int64_t wave = std::int64_t(decode_head_group_ctas_per_sm(p.head_group)) * info.sm_count;
    const int tile_slots = decode_head_group_tile_slots(p.head_group, p.head_dim);
    return core::choose_num_splits_if_paying(items, max_keys, wave, kDecodeMinKeysPerSplit,
                                             kDecodeMaxHeuristicSplits, tile_slots, decode_split_cost_blocks(true));
  }
  const bool sm90 = use_sm90_decode_kernel(info.cc_major, info.cc_minor, p.page_size);
  // The per-head kernel's CTAs per (b, KV head): its row blocks, two to a CTA in the row pair.
  const std::int64_t items =
      std::int64_t(p.batch) * p.heads_kv * decode_row_block_ctas(p.group, p.seqlen_q, p.row_blocks_per_cta);
  const std::int64_t wave = std::int64_t(decode_split_wave_ctas_per_sm(p.head_dim, sm90)) * info.sm_count;
  int splits = core::choose_num_splits_if_paying(items, max_keys, wave, kDecodeMinKeysPerSplit,
                                                  kDecodeMaxHeuristicSplits, kDecodeBlockN, decode_split_cost_blocks(sm90));
  // Fewer splits whose grid merges inside clusters (the most below the one-wave count that do),
  // when that grid still has the bandwidth (decode_cluster_max_tiles_per_cta).
  const int one_per_sm = decode_one_per_sm_cluster_splits(p);
  const auto clusters = [&](std::int64_t s) {
    return decode_cluster_merge_applies(sm90, int(s), items * s, info.sm_count, one_per_sm) &&
           decode_clusters_resident(p, c.device().index, int(s), items * s);
  };
  int cluster_splits = 1;
  for (int s = std::min(splits - 1, kMaxClusterSplits); s >= 2; --s)
    if (clusters(s)) {
      cluster_splits = s;
      break;
    }
  const std::int64_t tiles = key_tiles(max_keys);
  const bool wide = decode_wide_split_rule(p);
  const int form_max_tiles = decode_cluster_max_tiles_per_cta(p.head_dim, p.page_size);
  const int max_cluster_tiles = wide ? std::min(kDecodeWideClusterMaxTilesPerCta, form_max_tiles) : form_max_tiles;
  if (cluster_splits >= 2 && !clusters(splits) && (tiles + cluster_splits - 1) / cluster_splits <= max_cluster_tiles)
    splits = cluster_splits;
  // Small paged boxes: a count that needs the combine kernel anyway fills two CTAs per SM
  // (kDecodeSmallBoxMaxHeadDim), except for the wide math (decode_wide_split_rule).
  const bool small_boxes = sm90 && !wide && decode_small_paged_boxes(p.head_dim, p.page_size);
  if (small_boxes && splits > 1 && !clusters(splits))
    splits = int(std::min<std::int64_t>(
        {2 * std::int64_t(splits), max_keys / kDecodeMinKeysPerSplit, kDecodeMaxHeuristicSplits}));
  return splits;
}

SplitStateBytes split_state_bytes(const DecodeParams& p) {
  SplitStateBytes b;
  if (decode_writes_split_states(p)) {
    const std::size_t rows = p.split_plan ? std::size_t(p.plan_items) : std::size_t(p.num_splits) * p.batch;
    const std::size_t states = rows * p.heads_q * p.seqlen_q;
    b.lse = align_up(states * 4);
    b.o = align_up(states * std::size_t(p.head_dim) * 4);
  }
  return b;
}

char* checked_workspace(const check::ArgChecker& c, const std::optional<TensorView>& workspace,
                        std::size_t need, const char* size_fn) {
  if (!workspace)
    c.fail_value("workspace", "is required on CUDA for this call: " + std::string(size_fn) + "() = " +
                                  std::to_string(need) + " bytes (from the caller's allocator, so "
                                  "the call stays graph-capturable)");
  const TensorView& ws = *workspace;
  const std::size_t have = static_cast<std::size_t>(ws.numel()) * dtype_size(ws.dtype);
  if (have < need)
    c.fail_value("workspace", "must hold at least " + std::to_string(need) + " bytes, got " + std::to_string(have));
  if (reinterpret_cast<std::uintptr_t>(ws.data) % 16 != 0)
    c.fail_value("workspace", "must be 16-byte aligned on CUDA");
  return static_cast<char*>(ws.data);
}

char* call_workspace(check::ArgChecker& c, const std::optional<TensorView>& workspace,
                     const WorkspaceAllocator& allocator, std::size_t need, const char* size_fn) {
  if (workspace || !allocator) return checked_workspace(c, workspace, need, size_fn);
  const std::optional<TensorView> allocated = allocator.allocate(allocator.context, need);
  if (!allocated)
    c.fail_value("workspace", "is required on CUDA for this call (" + std::to_string(need) +
                                  " bytes), and workspace_allocator gave none");
  core::validate_workspace(c, *allocated);  // held to a given workspace's rules
  return checked_workspace(c, allocated, need, size_fn);
}

std::size_t kvcache_workspace_bytes(check::ArgChecker& c, const KVCacheArgs& args, const core::KVCacheDims& d) {
  return plan_decode(c, args, d).total();
}

void kvcache_attention_forward(check::ArgChecker& c, const KVCacheArgs& args, const core::KVCacheDims& d) {
  Plan plan = plan_decode(c, args, d);
  DecodeParams& p = plan.p;
  const std::size_t need = plan.total();
  if (need > 0) {
    char* base = call_workspace(c, args.workspace, args.workspace_allocator, need, "kvcache_workspace_bytes");
    if (plan.q_rot_bytes) p.q_rot = base;
    if (plan.lse_bytes) {
      p.partial_lse = reinterpret_cast<float*>(base + plan.q_rot_bytes);
      p.partial_o = reinterpret_cast<float*>(base + plan.q_rot_bytes + plan.lse_bytes);
    }
  }
  cuda_detail::DeviceGuard guard(c.device().index);
  run_decode(p, args.exec.cuda_stream);
}

}  // namespace fastattn::cuda_decode
