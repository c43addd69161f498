// Backend-neutral validation of every op's arguments: dtypes, shapes, strides, devices and
// option values. Reads no tensor data (so it is safe for device tensors and graph capture);
// index-tensor contents are checked by the backend before it writes anything.
#pragma once

#include <cstdint>

#include "core/check.h"
#include "fastattn/decode_plan.h"
#include "fastattn/ops.h"

namespace fastattn::core {

/// Options with defaults applied and causal folded into the window.
struct ResolvedOptions {
  float scale = 1.0f;
  float softcap = 0.0f;
  std::int64_t window_left = -1, window_right = -1;
  const float* alibi = nullptr;          ///< slopes of batch 0
  std::int64_t alibi_batch_stride = 0;   ///< 0 when the slopes are per head only
};

struct AttentionDims {
  std::int64_t batch = 0, seqlen_q = 0, seqlen_k = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
};

/// Paged-cache dims (page_size == 0 means not paged).
struct PagedDims {
  std::int64_t num_pages = 0, page_size = 0;
  bool csr = false;                  ///< page_indptr/page_indices rather than block_table
  std::int64_t table_rows = 0;       ///< rows of block_table or entries of page_indptr - 1
  std::int64_t max_pages_per_seq = 0;  ///< block_table width (0 for CSR)
};

struct VarlenDims {
  AttentionDims a;  ///< seqlen_q/seqlen_k hold max_seqlen_q/max_seqlen_k
  std::int64_t total_q = 0, total_k = 0;
  PagedDims paged;
};

/// KVCacheArgs::split_plan's bounds (the public ones of fastattn/decode_plan.h, which builds
/// plans): work items (the attention grid's y extent), and splits of one sequence (num_splits'
/// bound). A work item is b + kSplitPlanSplitUnit * split.
constexpr std::int64_t kMaxSplitPlanItems = kMaxPlanItems;
constexpr std::int64_t kMaxSplitPlanSplits = kMaxPlanSplits;
constexpr std::int64_t kSplitPlanSplitUnit = kSplitUnit;
/// A split plan's padding item: no work (a plan of fixed size W for a CUDA graph's fixed grid).
constexpr std::int32_t kSplitPlanPadding = kPlanPadding;

struct KVCacheDims {
  AttentionDims a;  ///< seqlen_k unused
  std::int64_t seqlen_new = 0;   ///< 0 without k_new
  std::int64_t cache_rows = 0;   ///< contiguous cache: B_cache
  std::int64_t cache_len = 0;    ///< contiguous cache: S_cache
  std::int64_t rotary_dim = 0, rotary_len = 0;  ///< 0 without rotary
  std::int64_t split_items = 0;  ///< work items W of split_plan (0 without)
  PagedDims paged;
};

struct SharedPrefixDims {
  AttentionDims a;  ///< batch = requests; seqlen_k = prefix length
  std::int64_t total_q = 0;
  PagedDims paged;
};

/// exec.num_threads >= 0.
void validate_exec(check::ArgChecker& c, const ExecConfig& e);
/// A caller's scratch (an op's `workspace`, or what its workspace_allocator returned): uint8,
/// contiguous, on the op's device.
void validate_workspace(check::ArgChecker& c, const TensorView& workspace);
ResolvedOptions validate_options(check::ArgChecker& c, const AttentionOptions& o,
                                 std::int64_t batch, std::int64_t heads_q, std::int64_t head_dim);
AttentionDims validate(check::ArgChecker& c, const AttentionArgs& args);
VarlenDims validate(check::ArgChecker& c, const VarlenAttentionArgs& args);
KVCacheDims validate(check::ArgChecker& c, const KVCacheArgs& args);
SharedPrefixDims validate(check::ArgChecker& c, const SharedPrefixAttentionArgs& args);
/// Validates a PagedKV's page tensors and page table for `batch` sequences. `prefix` names
/// the struct in messages ("paged.", "suffix.").
PagedDims validate_paged(check::ArgChecker& c, const PagedKV& p, std::int64_t batch,
                         std::int64_t heads_kv, std::int64_t head_dim, DType dtype,
                         const char* prefix, bool table_rows_any);

}  // namespace fastattn::core
