// fastattn: the calls of a batch decode wrapper's plan (FlashInfer's
// BatchDecodeWithPagedKVCacheWrapper: plan() once a step, run() once a layer).
//
// A plan fixes the device arrays every call of the step reads (key lengths, page table or lists,
// split plan) and the sizes the calls must have. paged_decode_call_args checks one call's arrays
// against it, with errors that name them, and views them as kvcache_attention_forward takes them:
// one query row per request. Framework-neutral; the Python wrapper reaches it through
// _C.PagedDecodeRunner (src/python/decode_runner.cpp).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "fastattn/ops.h"
#include "fastattn/tensor.h"

namespace fastattn {

/// FlashInfer's two layouts of a page: its rows token-major, (page_size, Hkv, D) ("NHD"), or
/// head-major, (Hkv, page_size, D) ("HND": each head's keys of a page one contiguous run).
enum class PagedKVLayout { kNHD, kHND };

/// "NHD" or "HND" as a PagedKVLayout; ValueError naming `name` for anything else.
PagedKVLayout paged_kv_layout_from_name(const std::string& layout, const char* name = "kv_layout");
/// "NHD" or "HND".
const char* paged_kv_layout_name(PagedKVLayout layout);

/// What one plan() fixes for its calls.
struct PagedDecodeCallPlan {
  TensorView seqlens;                       ///< (B) int32 keys of each request
  std::optional<TensorView> block_table;    ///< (B, W) int32 page table, or
  std::optional<TensorView> page_indptr;    ///< (B + 1) int32 CSR row pointers
  std::optional<TensorView> page_indices;   ///<   and page ids (KVCacheArgs::page_indptr)
  std::optional<TensorView> split_plan;     ///< KVCacheArgs::split_plan, or none
  int num_splits = 0;                       ///< KVCacheArgs::num_splits
  std::int64_t batch = 0, num_qo_heads = 0, num_kv_heads = 0, head_dim = 0, page_size = 0;
  /// Query rows per request (FlashInfer's q_len_per_req): a call's q holds batch x q_len rows,
  /// request b's rows b x q_len .. (b + 1) x q_len - 1, the last at its last key.
  std::int64_t q_len = 1;
  std::string data_type;                    ///< dtype_name() the calls' q and pages must have
  std::optional<std::int64_t> max_page_id;  ///< the largest page id plan() read (none: not read)
  bool on_gpu = false;                      ///< whether the plan's arrays (and q) are on a GPU
  PagedKVLayout layout = PagedKVLayout::kNHD;  ///< the layout of the calls' pages
};

/// The k and v pages of a paged cache in one of FlashInfer's layouts, (P, 2, page_size, Hkv, D)
/// (NHD) or (P, 2, Hkv, page_size, D) (HND): strided views in the same layout, (P, page_size,
/// Hkv, D) or (P, Hkv, page_size, D), no copy. ValueError naming `name` for another shape.
std::pair<TensorView, TensorView> split_paged_kv_cache(const TensorView& cache, PagedKVLayout layout,
                                                       const char* name);

/// KVCacheArgs for one call of `plan`: q (B x N, Hq, D), N = plan.q_len, over k_pages / v_pages in
/// the plan's layout, (P, page_size, Hkv, D) (NHD) or (P, Hkv, page_size, D) (HND), into out
/// (B x N, Hq, D) and lse (B x N, Hq) float32 when given, as (B, N, Hq, D) / (B, Hq, N) views, with
/// the plan's arrays. The pages go to the op as (P, page_size, Hkv, D) views (HND's with dims 1
/// and 2 swapped: the kernels take any strides). Checked in this order, each error naming the
/// array and what the plan expects: q's shape and dtype, each page tensor's shape, page count
/// (against max_page_id) and dtype, q's device kind, out's and lse's shapes. The options (where
/// N > 1, window_right: 0 for FlashInfer's causal rows), exec and workspace are left to the
/// caller; kvcache_attention_forward checks the rest.
KVCacheArgs paged_decode_call_args(const PagedDecodeCallPlan& plan, const TensorView& q, const TensorView& k_pages,
                                   const TensorView& v_pages, const TensorView& out,
                                   const std::optional<TensorView>& lse);

/// Checks attention sinks for a call of `plan` with query q, in the plan's terms, before anything
/// is launched (the caller then sets them as KVCacheArgs::sinks): sinks (num_qo_heads) float32 on
/// q's device. ValueError / TypeError naming sinks and what was expected.
void check_decode_sinks(const PagedDecodeCallPlan& plan, const TensorView& q, const TensorView& sinks);

}  // namespace fastattn
