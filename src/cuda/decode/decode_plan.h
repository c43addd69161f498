// Split-KV planning shared by the two decode entry points (flash_attn_with_kvcache in
// decode_host.cpp, varlen decode in varlen_decode_host.cpp): the split count and the workspace
// that holds the splits' partial states. Host code only; defined in decode_host.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "core/check.h"
#include "core/validate.h"
#include "cuda/decode/decode_params.h"
#include "fastattn/tensor.h"

namespace fastattn::cuda_decode {

/// Workspace regions start on 256-byte boundaries.
constexpr std::size_t kWorkspaceAlign = 256;
inline std::size_t workspace_align_up(std::size_t n) {
  return (n + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

/// Lowers the caches' strides into p: k / v (rows, slots, Hkv, D), where a row is a contiguous
/// cache row or a page.
void set_cache_strides(DecodeParams& p, const TensorView& k, const TensorView& v);

/// Lowers a paged cache's geometry and page table into p (page size and shift, page count, table
/// rows, and block_table, else page_indptr / page_indices); `k_name` names the k pages in
/// messages. Returns the slots one sequence's pages can hold: the split heuristic's bound on its
/// keys, known without a device read.
std::int64_t set_page_table(const check::ArgChecker& c, DecodeParams& p, const core::PagedDims& d,
                            const std::optional<TensorView>& block_table, const std::optional<TensorView>& page_indptr,
                            const std::optional<TensorView>& page_indices, const std::string& k_name);

/// Which head-group kernel form the call runs (DecodeParams::head_group: KV heads per CTA, 0 for
/// none). The token-row form (kDecodeHeadGroupRows) where its shape fits (decode_head_group_fits
/// with 32 heads) and FASTATTN_DECODE_HEAD_GROUP is "32", or it is unset, num_splits is the
/// heuristic's (`requested` 0), heads_kv is 32, and either batch CTAs fill between 15/16 of one wave
/// of one per SM and one wave and `max_keys` (the host's bound on every sequence's keys) is at least
/// kDecodeHeadGroupRowsMinKeys, or, at head_dim 128 with one query row per KV head, batch >=
/// kDecodeHeadGroupRowsSplitMinBatch, `max_keys` >= kDecodeHeadGroupRowsSplitMinKeys, the four-head
/// form's grid does not fill its wave and batch x the form's heuristic splits fill one wave of one
/// per SM as above. Else the wide form (kDecodeHeadGroupWide) where it fits and the
/// switch is "8", or it is unset (or "32"), `requested` is 0, heads_kv is 8 (at head_dim <=
/// kDecodeHeadGroupWideAnyHeadsMaxHeadDim any multiple of 8) and batch x heads_kv / 8 CTAs fill one
/// wave of one per SM as above. Else the four-head form where it fits and the switch is "1", or it
/// is unset (or "32", "8"), `requested` is 0 and batch x heads_kv / 4 CTAs fill between 15/16 of
/// one wave of two per SM and one wave, whatever the cache length. "0" takes none.
int decode_head_group_applies(const check::ArgChecker& c, const DecodeParams& p, int requested,
                              std::int64_t max_keys);

/// KV heads per CTA of the sm_90 kernel for the call (DecodeParams::kv_heads_per_cta), when it does
/// not run the head-group kernel (p.head_group, decided first):
/// - kDecodeHeadQuad where its shape fits (decode_head_quad_fits) and FASTATTN_DECODE_HEAD_QUAD is
///   "1", or it is unset, num_splits is the heuristic's (`requested` 0), batch x heads_kv / 4 CTAs
///   fill at least 15/16 of one wave of one per SM, and `max_keys` (the host's bound on every
///   sequence's keys, as for decode_num_splits) is at least kDecodeHeadQuadMinKeys, and below
///   kDecodeHeadPairMinKeys or the grid is at most kDecodeHeadQuadMaxWavesLong waves;
/// - else kDecodeHeadPair where its shape fits (decode_head_pair_fits) and
///   FASTATTN_DECODE_HEAD_PAIR is "1", or it is unset, `requested` is 0, and either batch x
///   heads_kv / 2 CTAs fill between 15/16 of one wave of one per SM and one wave (at head_dim <=
///   kDecodeHeadPairMultiWaveMaxHeadDim: at least 15/16 of one wave) and `max_keys` is at least
///   kDecodeHeadPairMinKeys, or the call may split (`may_split`: a workspace for the splits'
///   states) and the pair's splits merged in clusters (decode_form_splits) either replace the per-head
///   plan's combine kernel on more than 1 / kDecodeHeadPairClusterMinSmShare of the SMs with CTAs of
///   at most kDecodeClusterMaxTilesPerCta tiles (at head_dim <= kDecodeHeadPairLongClustersMaxHeadDim
///   on a contiguous cache, of any length), or (at head_dim <= kDecodeHeadPairSameGridMaxHeadDim) make a
///   grid of as many CTAs as the per-head plan's, on at most half the SMs;
/// - else 1. A switch at "0" never takes its form.
int decode_kv_heads_per_cta(const check::ArgChecker& c, const DecodeParams& p, int requested, std::int64_t max_keys,
                            bool may_split);

/// Row blocks (16 packed query rows) per CTA of the per-head sm_90 kernel for p's shape (head_group
/// and kv_heads_per_cta set): kDecodeRowPair (the row pair) where its shape fits
/// (decode_row_pair_fits) and FASTATTN_DECODE_ROW_PAIR is "1", or it is unset and the call has 17-32
/// packed rows a KV head (kDecodeRowPairMaxRows) and `max_keys` is at least kDecodeRowPairMinKeys;
/// else 1 ("0" never takes it). A fixed num_splits or split plan may take it: its results are
/// bitwise the per-head kernel's.
int decode_row_blocks_per_cta(const check::ArgChecker& c, const DecodeParams& p, std::int64_t max_keys);

/// Key splits per sequence for p's shape (batch, heads_kv, group, seqlen_q and the planner's forms
/// set): `requested` when > 0, else core::choose_num_splits_one_wave over one wave (decode_split_wave_ctas_per_sm: one
/// CTA per SM for the sm_90 kernel, two for the cp.async kernel at head_dim <= 128), at least two
/// 64-key tiles per split (kDecodeMinKeysPerSplit), at most kDecodeMaxHeuristicSplits (128), kept
/// only when it pays (decode_split_cost_blocks); then fewer splits when those merge inside clusters
/// and the one-wave count would not (decode_cluster_max_tiles_per_cta; for per-head CTAs of the wide
/// math, at most kDecodeWideClusterMaxTilesPerCta tiles: decode_wide_split_rule); on small paged
/// boxes (kDecodeSmallBoxMaxHeadDim), twice a count that still needs the combine kernel (not for
/// the wide math). The head-pair and head-quad forms take decode_form_splits (decode_host.cpp: the
/// most splits, up to kMaxClusterSplits, that merge in clusters) unless `requested`.
/// `max_keys` bounds every sequence's attended slots (known on the host without a device read), so
/// the choice depends on shapes only.
int decode_num_splits(const check::ArgChecker& c, const DecodeParams& p, int requested, std::int64_t max_keys);

/// Workspace bytes of the partial states for p.num_splits (both 0 for one split): partial LSE
/// (num_splits, B, Hq, Sq) float32, then partial O (num_splits, B, Hq, Sq, D) float32; with a
/// split plan (plan_items, Hq, Sq) and (plan_items, Hq, Sq, D) (both 0 when no sequence splits).
struct SplitStateBytes {
  std::size_t lse = 0, o = 0;
};
SplitStateBytes split_state_bytes(const DecodeParams& p);

/// The caller's workspace for a call that needs `need` > 0 bytes: present, at least that large and
/// 16-byte aligned, else a ValueError naming `size_fn` (the op that tells the size).
char* checked_workspace(const check::ArgChecker& c, const std::optional<TensorView>& workspace,
                        std::size_t need, const char* size_fn);

/// The scratch of a call that needs `need` > 0 bytes: the caller's `workspace` when given (as
/// checked_workspace), else one asked of `allocator` once and held to the same rules, else the
/// ValueError of a missing workspace.
char* call_workspace(check::ArgChecker& c, const std::optional<TensorView>& workspace,
                     const WorkspaceAllocator& allocator, std::size_t need, const char* size_fn);

}  // namespace fastattn::cuda_decode
