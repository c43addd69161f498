// Varlen decode on the GPU: varlen_attention_forward (flash_attn_varlen_func) over a paged cache
// with one query per sequence runs the split-KV decode kernels (run_decode) instead of the prefill
// kernel, which would spend a 64- or 128-row query tile on each single query row and keep one CTA
// per (sequence, head) however long the keys are.
//
// The route is decided from shapes and flags only (no device read, so the call stays
// graph-capturable; see routes_to_decode). Index contents stay on the device: DecodeParams'
// cu_seqlens_q / cu_seqlens_k / last_page_len are read and clamped by resolve_decode_seq.
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/common/cuda_check.h"
#include "cuda/common/host_checks.h"
#include "cuda/cuda_backend.h"
#include "cuda/decode/decode_params.h"
#include "cuda/decode/decode_plan.h"

namespace fastattn::cuda_decode {
namespace {

using cuda_detail::as_int;
using cuda_detail::rows_aligned;

/// Largest batch the decode grid takes (gridDim.z).
constexpr std::int64_t kMaxDecodeBatch = 65535;

/// FASTATTN_VARLEN_DECODE=0 (or "off") keeps such calls on the prefill kernel, for comparisons
/// and tests. Read on every call (cheap next to a launch), so a test can set it at run time.
bool varlen_decode_disabled() {
  const char* v = std::getenv("FASTATTN_VARLEN_DECODE");
  return v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0);
}

/// The decode kernels serve the call when:
///  - the keys are paged (block table or CSR page lists): packed keys stay on the prefill kernel;
///  - max_seqlen_q == 1 and total_q == B: no sequence has more than one query row (max_seqlen_q
///    bounds them) and there is a row per sequence, so batch entry b can be query row b. Which
///    sequence owns row b is read on the device (cu_seqlens_q[b] == b normally; sequences with no
///    query and padding rows past cu_seqlens_q[B] are handled there, see DecodeParams);
///  - no softmax matrix (probs) is asked for: only the prefill kernel writes it;
///  - ALiBi slopes are per head (Hq), or (B, Hq) with batch stride 0: the decode kernel indexes
///    slopes by batch entry, which is the query row, not the sequence, when cu_seqlens_q has
///    sequences without a query;
///  - B <= 65535 (the decode grid; the prefill kernel has the same limit and reports it);
///  - FASTATTN_VARLEN_DECODE is not 0 / off.
bool routes_to_decode(const VarlenAttentionArgs& a, const core::VarlenDims& d, const core::ResolvedOptions& o) {
  if (!a.paged || a.probs) return false;
  if (a.max_seqlen_q != 1 || d.total_q != d.a.batch || d.a.batch < 1 || d.a.batch > kMaxDecodeBatch) return false;
  if (o.alibi && o.alibi_batch_stride != 0) return false;
  return !varlen_decode_disabled();
}

struct VarlenPlan {
  DecodeParams p;
  SplitStateBytes states;
  std::size_t total() const { return states.lse + states.o; }
};

/// Lowers an (already routed) call. Split-KV only when `workspace_available`; otherwise one split,
/// which needs no workspace.
VarlenPlan plan_varlen_decode(check::ArgChecker& c, const VarlenAttentionArgs& a, const core::VarlenDims& d,
                              const core::ResolvedOptions& o, bool workspace_available) {
  cuda_detail::require_device(c);
  const PagedKV& pk = *a.paged;
  VarlenPlan plan;
  DecodeParams& p = plan.p;
  p.dtype = cuda_detail::kernel_dtype<Dtype>(c, a.q.dtype);
  for (auto [t, n] : {std::pair{&a.q, "q"}, {&a.out, "out"}, {&pk.k_pages, "k_pages"}, {&pk.v_pages, "v_pages"}})
    rows_aligned(c, *t, n);
  p.batch = static_cast<int>(d.a.batch);
  p.heads_q = as_int(c, d.a.heads_q, "q heads (dim 1)", 65535);
  p.heads_kv = static_cast<int>(d.a.heads_kv);
  p.group = p.heads_q / std::max(p.heads_kv, 1);
  p.head_dim = static_cast<int>(d.a.head_dim);
  p.seqlen_q = 1;
  p.seqlen_new = 0;

  // Batch entry b = query row b: q / out (total_q, Hq, D), lse (Hq, total_q).
  p.q = a.q.data;
  p.q_batch_stride = p.q_row_stride = a.q.stride(0);
  p.q_head_stride = a.q.stride(1);
  p.out = a.out.data;
  p.out_batch_stride = p.out_row_stride = a.out.stride(0);
  p.out_head_stride = a.out.stride(1);
  if (a.lse) {
    p.lse = static_cast<float*>(a.lse->data);
    p.lse_batch_stride = p.lse_row_stride = a.lse->stride(1);
    p.lse_head_stride = a.lse->stride(0);
  }
  p.cu_seqlens_q = static_cast<const std::int32_t*>(a.cu_seqlens_q.data);
  // A row no sequence owns is empty, so with sinks it gets LSE sinks[h], as on the prefill path.
  cuda_detail::set_sinks(p, a.sinks);

  set_cache_strides(p, pk.k_pages, pk.v_pages);
  // Slots a sequence's pages can hold: the heuristic's bound on keys.
  const std::int64_t capacity = set_page_table(c, p, d.paged, pk.block_table, pk.page_indptr, pk.page_indices, "k_pages");
  // Key lengths: seqused_k, else cu_seqlens_k differences, else last_page_len (core::validate
  // guarantees one of them), read on the device by resolve_decode_seq.
  if (a.seqused_k) p.cache_seqlens = static_cast<const std::int32_t*>(a.seqused_k->data);
  else if (a.cu_seqlens_k) p.cu_seqlens_k = static_cast<const std::int32_t*>(a.cu_seqlens_k->data);
  else p.last_page_len = static_cast<const std::int32_t*>(pk.last_page_len->data);

  cuda_detail::set_options(p, o);

  // max_seqlen_k bounds every key length (the API's contract), a tighter bound than the pages'
  // capacity when block tables are allocated for the longest sequence the engine allows.
  const std::int64_t max_keys = std::min(capacity, a.max_seqlen_k);
  p.head_group = decode_head_group_applies(c, p, 0, max_keys);
  p.kv_heads_per_cta = decode_kv_heads_per_cta(c, p, 0, max_keys, workspace_available);
  p.row_blocks_per_cta = decode_row_blocks_per_cta(c, p, max_keys);
  p.num_splits = workspace_available ? decode_num_splits(c, p, 0, max_keys) : 1;
  plan.states = split_state_bytes(p);
  return plan;
}

}  // namespace

std::size_t varlen_workspace_bytes(check::ArgChecker& c, const VarlenAttentionArgs& args, const core::VarlenDims& d) {
  const auto o = core::validate_options(c, args.options, d.a.batch, d.a.heads_q, d.a.head_dim);
  if (!routes_to_decode(args, d, o)) return 0;  // the prefill kernel needs no workspace
  return plan_varlen_decode(c, args, d, o, /*workspace_available=*/true).total();
}

bool try_varlen_decode(check::ArgChecker& c, const VarlenAttentionArgs& args, const core::VarlenDims& d) {
  const auto o = core::validate_options(c, args.options, d.a.batch, d.a.heads_q, d.a.head_dim);
  if (!routes_to_decode(args, d, o)) return false;
  VarlenPlan plan = plan_varlen_decode(c, args, d, o, args.workspace || args.workspace_allocator);
  DecodeParams& p = plan.p;
  if (plan.total() > 0) {
    char* base = call_workspace(c, args.workspace, args.workspace_allocator, plan.total(), "varlen_workspace_bytes");
    p.partial_lse = reinterpret_cast<float*>(base);
    p.partial_o = reinterpret_cast<float*>(base + plan.states.lse);
  }
  // The attention kernel is an ordinary launch (after_append is false: its predecessor on the
  // stream is not ours); the combine kernel may start early behind it on sm_90.
  cuda_detail::DeviceGuard guard(c.device().index);
  run_decode(p, args.exec.cuda_stream);
  return true;
}

}  // namespace fastattn::cuda_decode
