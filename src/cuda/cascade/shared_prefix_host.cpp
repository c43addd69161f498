// Shared-prefix (cascade) attention on CUDA: planning on the host (no device read, no
// allocation, no synchronisation: the call can be captured in a CUDA graph) and four launches at
// most on the caller's stream:
//
//   1. prep     (shared_prefix_kernels.cu) per-request suffix lengths and the row lists the
//               passes read, into the workspace; see shared_prefix.h.
//   2. prefix   every request's query rows against the shared prefix K/V (P, Hkv, D) with the
//               prefill kernels (sm_90a wgmma or sm80). When every query sees the whole prefix
//               (no left window, no ALiBi, and under causal / a right window each request's first
//               query reaches key P - 1: the CPU backend's stack_prefix rule) the rows of all
//               requests are stacked into one sequence, non-causal, so each prefix tile is read
//               once for the whole batch; otherwise each request runs against the prefix with its
//               own query positions (PrefillParams::q_pos_offset = its suffix length). Either way
//               the prefix keys are split into `splits` ranges (PrefillParams::key_splits), each
//               writing its own partial state, so that even a decode batch (one 128-row query
//               block per head) fills the GPU. Stacked decode with GQA packs the query heads of a
//               KV head into the rows (below), so the pass runs per KV head.
//   3. suffix   each request's queries against its own paged suffix (CSR pages, last_page_len):
//               the split-KV decode kernels for decode (one query per request), the varlen
//               prefill kernel otherwise. Positions need no shift there: masks and ALiBi depend on
//               query - key distances, which are the same within the suffix alone.
//   4. merge    cuda_cascade::merge_states of the splits + 1 partial states of every (row, head)
//               into out and lse (the shared merge primitive: empty states merge exactly).
//
// With no prefix (P = 0) the suffix pass writes out / lse directly (exact, nothing to merge).
//
// GQA packing (stacked decode, G = Hq / Hkv > 1): the prefill kernels run one query head per KV
// head, so the G heads of a KV head would be G row blocks of B live rows each, every one reading
// the KV head's prefix keys. Instead the prep kernel copies q head-major, q_packed (Hq, B, D), and
// the prefix pass reads it as G x B rows r = g x B + b of Hkv heads (row stride D, head stride
// G x B x D): one block of up to 128 rows per KV head for B x G <= 128, each prefix key read once
// per KV head. The partial states are then head-major too, (slots, Hq, B, D) and (slots, Hq, B),
// which the prefill (rows r, heads h), the decode pass (batch b, heads h x G + g) and the merge
// (rows b, states, heads) all address with plain strides.
//
// Workspace (shared_prefix_workspace_bytes; every region 256-byte aligned):
//   int32    suffix_len (B), stacked_cu (2), req_cu (B + 1)
//   values   q_packed (Hq, B, D) in q's dtype, GQA packing only
//   values   partial outputs (total_q, slots, Hq, D) in q's dtype, slots = splits + 1 (the last is
//            the suffix's); with GQA packing (slots, Hq, B, D)
//   float32  partial LSEs (total_q, slots, Hq); with GQA packing (slots, Hq, B)
//   float32  merged LSE (total_q, Hq) when the caller asks for no lse
//   float32  the decode suffix pass's split-KV states (its own split count)
#include <cuda_runtime_api.h>

#include <algorithm>
#include <string>

#include "core/heuristics.h"
#include "cuda/cascade/shared_prefix.h"
#include "cuda/common/cuda_check.h"
#include "cuda/common/host_checks.h"
#include "cuda/cuda_backend.h"
#include "cuda/decode/decode_params.h"
#include "cuda/decode/decode_plan.h"
#include "cuda/prefill/prefill_params.h"

namespace fastattn::cuda_cascade {
namespace {

using cuda_detail::as_int;
using cuda_detail::rows_aligned;

constexpr std::size_t kAlign = 256;  // workspace regions start on 256-byte boundaries
std::size_t align_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

/// Prefix keys per split: a multiple of the largest key tile of the prefill kernels (128), so that
/// no tile straddles two splits.
constexpr int kSplitGranule = 128;
/// Fewest prefix keys a heuristic split gets (two tiles): below that the extra partial state
/// costs more than the parallelism brings.
constexpr std::int64_t kMinKeysPerSplit = 256;
/// Most prefix splits the heuristic picks (a wave of the GPU is reached well before).
constexpr int kMaxSplits = 128;
/// Query rows of one CTA of both prefill kernels.
constexpr int kPrefillBlockM = 128;

enum class PrefixMode {
  kNone,        ///< P = 0: the suffix pass alone, writing out / lse
  kStacked,     ///< all requests' rows in one sequence against the prefix
  kPerRequest,  ///< each request against the prefix at its own positions
  kGated,       ///< both launched; the prep kernel empties the one that must not run
};

struct Plan {
  PrefixMode mode = PrefixMode::kNone;
  bool decode = false;  ///< no qo_indptr: one query row per request, suffix through run_decode
  int batch = 0, heads_q = 0, head_dim = 0;
  std::int64_t total_q = 0;
  int max_q = 0;        ///< bound on any request's query rows (grid sizing)
  int splits = 1;       ///< prefix key splits
  int split_keys = 0;
  int slots = 0;        ///< splits + 1 (0 without a prefix)
  cuda_decode::DecodeParams suffix;  ///< decode: the suffix pass but its outputs (suffix_decode_params)
  bool packed = false;  ///< GQA packing of the stacked decode prefix pass (see the file comment)
  int group = 1;        ///< Hq / Hkv
  // Workspace offsets (bytes) and the total.
  std::size_t off_suffix_len = 0, off_stacked_cu = 0, off_req_cu = 0, off_q_packed = 0;
  std::size_t off_part_v = 0, off_part_s = 0, off_lse = 0, off_dec_lse = 0, off_dec_o = 0;
  std::size_t total = 0;
  bool need_suffix_len = false, need_stacked_cu = false, need_req_cu = false, need_lse_scratch = false;
  core::ResolvedOptions opts;
};

/// Prefill CTAs resident per SM (what one wave counts), as prefill_dispatch.cu picks the kernel:
/// on compute capability 9.0 the sm_90a kernel serves head_dim 33..64 (two CTAs per SM), 97..128
/// and 193..256 (one); the sm80 kernel keeps two CTAs per SM up to head_dim 128, one above.
int prefill_ctas_per_sm(const cuda_detail::DeviceInfo& info, int head_dim) {
  const bool sm90 = info.cc_major == 9 && info.cc_minor == 0;
  if (sm90 && head_dim > 32 && head_dim <= 64) return 2;
  if (sm90 && ((head_dim > 96 && head_dim <= 128) || head_dim > 192)) return 1;
  return head_dim <= 128 ? 2 : 1;
}

/// Options of a pass: the call's own (suffix, per-request prefix) or every key visible with no
/// ALiBi (stacked prefix: the stacking rule guarantees both).
template <class Params>
void set_pass_options(Params& p, const core::ResolvedOptions& o, bool all_visible) {
  core::ResolvedOptions x = o;
  if (all_visible) {
    x.window_left = x.window_right = -1;
    x.alibi = nullptr;
    x.alibi_batch_stride = 0;
  }
  cuda_detail::set_options(p, x);
}

/// The decode suffix pass (one query per request against its own pages) but for its outputs, which
/// the caller points into the workspace or out / lse: planned as varlen decode plans such a batch
/// (the kernel form and split count of decode_plan.h, the caller's suffix_num_splits as the
/// request, the suffix bound as the keys), the lengths read from last_page_len on the device.
cuda_decode::DecodeParams suffix_decode_params(check::ArgChecker& c, const SharedPrefixAttentionArgs& a,
                                               const core::SharedPrefixDims& d, const core::ResolvedOptions& o) {
  using namespace cuda_decode;
  DecodeParams p;
  p.dtype = cuda_detail::kernel_dtype<cuda_prefill::Dtype>(c, a.q.dtype);
  p.batch = static_cast<int>(d.a.batch);
  p.heads_q = static_cast<int>(d.a.heads_q);
  p.heads_kv = static_cast<int>(d.a.heads_kv);
  p.group = p.heads_q / p.heads_kv;
  p.head_dim = static_cast<int>(d.a.head_dim);
  p.seqlen_q = 1;
  p.q = a.q.data;
  p.q_batch_stride = p.q_row_stride = a.q.stride(0);
  p.q_head_stride = a.q.stride(1);
  set_cache_strides(p, a.suffix.k_pages, a.suffix.v_pages);
  const std::int64_t capacity = set_page_table(c, p, d.paged, std::nullopt, a.suffix.page_indptr,
                                               a.suffix.page_indices, "suffix.k_pages");
  p.last_page_len = static_cast<const std::int32_t*>(a.suffix.last_page_len->data);
  set_pass_options(p, o, false);
  const std::int64_t max_keys = a.max_suffix_len > 0 ? std::min(capacity, a.max_suffix_len) : capacity;
  const int requested = a.suffix_num_splits;
  p.head_group = decode_head_group_applies(c, p, requested, max_keys);
  p.kv_heads_per_cta = decode_kv_heads_per_cta(c, p, requested, max_keys, /*may_split=*/true);
  p.row_blocks_per_cta = decode_row_blocks_per_cta(c, p, max_keys);
  p.num_splits = decode_num_splits(c, p, requested, max_keys);
  p.splits_fixed = requested > 0;  // a caller's count: the combine kernel, as for kvcache
  return p;
}

Plan make_plan(check::ArgChecker& c, const SharedPrefixAttentionArgs& a, const core::SharedPrefixDims& d) {
  cuda_detail::require_device(c);
  cuda_detail::kernel_dtype<cuda_prefill::Dtype>(c, a.q.dtype);
  if (a.suffix.block_table)
    c.fail_value("suffix.block_table", "is not supported here: give the suffix pages as "
                                       "suffix.page_indptr / page_indices (FlashInfer's layout)");
  for (auto [t, n] : {std::pair{&a.q, "q"}, {&a.out, "out"}, {&a.k_shared, "k_shared"},
                      {&a.v_shared, "v_shared"}, {&a.suffix.k_pages, "suffix.k_pages"},
                      {&a.suffix.v_pages, "suffix.v_pages"}})
    rows_aligned(c, *t, n);
  Plan plan;
  plan.opts = core::validate_options(c, a.options, d.a.batch, d.a.heads_q, d.a.head_dim);
  plan.decode = !a.qo_indptr;
  plan.batch = as_int(c, d.a.batch, plan.decode ? "q rows (dim 0), one per request" : "qo_indptr entries - 1", 65535);
  plan.heads_q = as_int(c, d.a.heads_q, "q heads (dim 1)", 65535);
  plan.head_dim = static_cast<int>(d.a.head_dim);
  plan.total_q = as_int(c, d.total_q, "q rows (dim 0)", INT32_MAX);
  const int prefix_len = as_int(c, d.a.seqlen_k, "k_shared rows (dim 0)", INT32_MAX - kSplitGranule);
  as_int(c, d.paged.page_size, "suffix page_size", INT32_MAX);
  as_int(c, d.paged.num_pages, "suffix num_pages", INT32_MAX);
  const std::int64_t group = d.a.heads_q / d.a.heads_kv;
  if (plan.decode)
    as_int(c, d.a.heads_kv * ((group + 15) / 16), "heads_k x ceil(heads_q / heads_k / 16)", 65535);
  plan.max_q = plan.decode ? 1
                           : static_cast<int>(a.max_seqlen_q > 0 ? std::min<std::int64_t>(a.max_seqlen_q, plan.total_q)
                                                                 : plan.total_q);
  const cuda_detail::DeviceInfo info = cuda_detail::device_info(c.device().index);

  // Which prefix pass (see the file comment).
  const core::ResolvedOptions& o = plan.opts;
  if (prefix_len == 0) {
    plan.mode = PrefixMode::kNone;
  } else if (o.window_left >= 0 || o.alibi) {
    plan.mode = PrefixMode::kPerRequest;
  } else if (o.window_right < 0 || plan.decode) {
    // Decode: the one query sits after its whole suffix, so it reaches key P - 1 (right >= 0).
    plan.mode = PrefixMode::kStacked;
  } else {
    plan.mode = PrefixMode::kGated;
  }

  // Prefix key splits: fill one wave of the GPU with the prefix pass's CTAs (the per-request grid
  // when that pass may run), each split at least kMinKeysPerSplit keys.
  plan.group = static_cast<int>(group);
  plan.packed = plan.decode && plan.mode == PrefixMode::kStacked && group > 1 && plan.total_q * group <= INT32_MAX;
  if (plan.mode != PrefixMode::kNone) {
    const bool stacked_grid = plan.mode == PrefixMode::kStacked;
    // Packed: G x B rows per KV head; else total_q (stacked) or max_q rows per query head.
    const std::int64_t rows = plan.packed ? plan.total_q * group : stacked_grid ? plan.total_q : plan.max_q;
    const std::int64_t m_blocks = (rows + kPrefillBlockM - 1) / kPrefillBlockM;
    const std::int64_t heads = plan.packed ? d.a.heads_kv : plan.heads_q;
    const std::int64_t ctas = m_blocks * heads * (stacked_grid ? 1 : plan.batch);
    const std::int64_t wave = std::int64_t(info.sm_count) * prefill_ctas_per_sm(info, plan.head_dim);
    int splits = a.num_splits > 0 ? a.num_splits
                                  : core::choose_num_splits_one_wave(ctas, prefix_len, wave, kMinKeysPerSplit, kMaxSplits);
    // The grid's z holds (sequence, split) pairs: at most 65535.
    const int z_seqs = stacked_grid ? 1 : std::max(plan.batch, 1);
    splits = std::max(1, std::min(splits, 65535 / z_seqs));
    const std::int64_t per = (prefix_len + splits - 1) / splits;
    plan.split_keys = static_cast<int>((per + kSplitGranule - 1) / kSplitGranule * kSplitGranule);
    plan.splits = splits;
    plan.slots = splits + 1;
  }

  if (plan.decode) plan.suffix = suffix_decode_params(c, a, d, plan.opts);

  // What the prep kernel writes (the decode suffix pass reads last_page_len itself).
  plan.need_suffix_len = plan.mode == PrefixMode::kPerRequest || plan.mode == PrefixMode::kGated;
  plan.need_stacked_cu = !plan.decode && (plan.mode == PrefixMode::kStacked || plan.mode == PrefixMode::kGated);
  plan.need_req_cu = plan.mode == PrefixMode::kGated;
  plan.need_lse_scratch = plan.mode != PrefixMode::kNone && !a.lse;

  // Workspace layout.
  const std::size_t rows = static_cast<std::size_t>(plan.total_q);
  const std::size_t hq = static_cast<std::size_t>(plan.heads_q), dim = static_cast<std::size_t>(plan.head_dim);
  std::size_t at = 0;
  auto region = [&](std::size_t bytes, bool need) {
    const std::size_t off = at;
    if (need) at += align_up(bytes);
    return off;
  };
  plan.off_suffix_len = region(4 * static_cast<std::size_t>(plan.batch), plan.need_suffix_len);
  plan.off_stacked_cu = region(8, plan.need_stacked_cu);
  plan.off_req_cu = region(4 * (static_cast<std::size_t>(plan.batch) + 1), plan.need_req_cu);
  plan.off_q_packed = region(rows * hq * dim * 2, plan.packed);
  const std::size_t states = rows * static_cast<std::size_t>(plan.slots) * hq;
  plan.off_part_v = region(states * dim * 2, plan.slots > 0);
  plan.off_part_s = region(states * 4, plan.slots > 0);
  plan.off_lse = region(rows * hq * 4, plan.need_lse_scratch);
  if (plan.decode) {
    const cuda_decode::SplitStateBytes st = cuda_decode::split_state_bytes(plan.suffix);
    plan.off_dec_lse = region(st.lse, st.lse > 0);
    plan.off_dec_o = region(st.o, st.o > 0);
  }
  plan.total = at;
  return plan;
}

}  // namespace

std::size_t shared_prefix_workspace_bytes(check::ArgChecker& c, const SharedPrefixAttentionArgs& args,
                                          const core::SharedPrefixDims& d) {
  if (d.total_q == 0) return 0;
  return make_plan(c, args, d).total;
}

void shared_prefix_attention_forward(check::ArgChecker& c, const SharedPrefixAttentionArgs& a,
                                     const core::SharedPrefixDims& d) {
  if (d.total_q == 0) {  // nothing to write; still a CUDA call with CUDA arguments
    cuda_detail::require_device(c);
    return;
  }
  const Plan plan = make_plan(c, a, d);
  char* ws = nullptr;
  if (plan.total > 0) {
    if (!a.workspace)
      c.fail_value("workspace", "is required on CUDA: shared_prefix_workspace_bytes() = " +
                                    std::to_string(plan.total) + " bytes (from the caller's allocator, so "
                                    "the call stays graph-capturable)");
    const std::size_t have = static_cast<std::size_t>(a.workspace->numel());
    if (have < plan.total)
      c.fail_value("workspace", "must hold at least " + std::to_string(plan.total) + " bytes, got " +
                                    std::to_string(have));
    if (reinterpret_cast<std::uintptr_t>(a.workspace->data) % 16 != 0)
      c.fail_value("workspace", "must be 16-byte aligned on CUDA");
    ws = static_cast<char*>(a.workspace->data);
  }
  const Device dev = c.device();
  const cuda_prefill::Dtype dtype = cuda_detail::kernel_dtype<cuda_prefill::Dtype>(c, a.q.dtype);
  const int B = plan.batch, hq = plan.heads_q, dim = plan.head_dim;
  const int hkv = static_cast<int>(d.a.heads_kv);
  const int slots = plan.slots;
  const std::int64_t total_q = plan.total_q;
  const PagedKV& sfx = a.suffix;
  auto* suffix_len = plan.need_suffix_len ? reinterpret_cast<std::int32_t*>(ws + plan.off_suffix_len) : nullptr;
  auto* stacked_cu = plan.need_stacked_cu ? reinterpret_cast<std::int32_t*>(ws + plan.off_stacked_cu) : nullptr;
  auto* req_cu = plan.need_req_cu ? reinterpret_cast<std::int32_t*>(ws + plan.off_req_cu) : nullptr;
  void* part_v = slots > 0 ? ws + plan.off_part_v : nullptr;
  auto* part_s = slots > 0 ? reinterpret_cast<float*>(ws + plan.off_part_s) : nullptr;
  const auto* qo = a.qo_indptr ? static_cast<const std::int32_t*>(a.qo_indptr->data) : nullptr;
  const auto* page_indptr = static_cast<const std::int32_t*>(sfx.page_indptr->data);
  const auto* page_indices = static_cast<const std::int32_t*>(sfx.page_indices->data);
  const auto* last_page_len = static_cast<const std::int32_t*>(sfx.last_page_len->data);
  const int page_size = static_cast<int>(d.paged.page_size);
  const int page_shift = cuda_detail::page_shift_of(page_size);
  void* stream = a.exec.cuda_stream;
  cuda_detail::DeviceGuard guard(dev.index);

  // Elements between consecutive rows / slots / heads of the partial states: (total_q, slots, Hq,
  // D) and (total_q, slots, Hq), or head-major (slots, Hq, B, D) and (slots, Hq, B) when packed.
  const std::int64_t v_row = plan.packed ? dim : std::int64_t(slots) * hq * dim;
  const std::int64_t v_slot = std::int64_t(hq) * (plan.packed ? B : 1) * dim;
  const std::int64_t v_head = plan.packed ? std::int64_t(B) * dim : dim;
  const std::int64_t s_row = plan.packed ? 1 : std::int64_t(slots) * hq;
  const std::int64_t s_slot = std::int64_t(hq) * (plan.packed ? B : 1);
  const std::int64_t s_head = plan.packed ? B : 1;
  void* q_packed = plan.packed ? ws + plan.off_q_packed : nullptr;

  // ---- 1. prep ----------------------------------------------------------------------------
  CascadePrepParams prep;
  prep.batch = B;
  prep.total_q = total_q;
  prep.page_indptr = page_indptr;
  prep.num_page_indices = sfx.page_indices->size(0);
  prep.last_page_len = last_page_len;
  prep.page_size = page_size;
  prep.qo_indptr = qo;
  prep.suffix_len = suffix_len;
  prep.stacked_cu = stacked_cu;
  prep.req_cu = req_cu;
  prep.gated = plan.mode == PrefixMode::kGated;
  prep.window_right = static_cast<int>(std::min<std::int64_t>(plan.opts.window_right, INT32_MAX));
  prep.part_v = static_cast<std::uint16_t*>(part_v);
  prep.part_s = part_s;
  prep.slots = slots;
  prep.heads_q = hq;
  prep.head_dim = dim;
  if (plan.packed) {
    prep.q = static_cast<const std::uint16_t*>(a.q.data);
    prep.q_row_stride = a.q.stride(0);
    prep.q_head_stride = a.q.stride(1);
    prep.q_packed = static_cast<std::uint16_t*>(q_packed);
  }
  run_cascade_prep(prep, stream);

  // ---- 2. prefix --------------------------------------------------------------------------
  if (plan.mode != PrefixMode::kNone) {
    cuda_prefill::PrefillParams p;
    p.dtype = dtype;
    p.heads_q = hq;
    p.heads_kv = hkv;
    p.head_dim = dim;
    p.seqlen_k = static_cast<int>(d.a.seqlen_k);
    p.q = a.q.data;
    p.q_head_stride = a.q.stride(1);
    p.out = part_v;
    p.out_head_stride = v_head;
    p.out_split_stride = v_slot;
    p.lse = part_s;
    p.lse_head_stride = s_head;
    p.lse_split_stride = s_slot;
    p.k = a.k_shared.data;
    p.v = a.v_shared.data;
    p.k_row_stride = a.k_shared.stride(0);
    p.k_head_stride = a.k_shared.stride(1);
    p.v_row_stride = a.v_shared.stride(0);
    p.v_head_stride = a.v_shared.stride(1);
    p.key_splits = plan.splits;
    p.split_keys = plan.split_keys;
    p.clear_padding_rows = false;  // unowned rows: the prep kernel emptied them in every slot
    p.total_q = total_q;
    if (plan.mode == PrefixMode::kStacked || plan.mode == PrefixMode::kGated) {
      cuda_prefill::PrefillParams s = p;  // one sequence: every query row against the prefix
      set_pass_options(s, plan.opts, true);
      s.batch = 1;
      s.max_seqlen_q = static_cast<int>(total_q);
      s.q_row_stride = a.q.stride(0);
      s.out_row_stride = v_row;
      s.lse_row_stride = s_row;
      s.cu_seqlens_q = stacked_cu;  // {0, rows owned} (null for decode: all total_q rows)
      if (plan.packed) {  // Hkv heads of G x B rows r = g x B + b (see the file comment)
        const int G = plan.group;
        s.heads_q = hkv;
        s.q = q_packed;
        s.q_row_stride = dim;
        s.q_head_stride = std::int64_t(G) * B * dim;
        s.total_q = std::int64_t(G) * B;
        s.max_seqlen_q = G * B;
        s.out_row_stride = v_row;
        s.out_head_stride = G * v_head;
        s.lse_row_stride = s_row;
        s.lse_head_stride = G * s_head;
      }
      cuda_prefill::run_prefill(s, stream);
    }
    if (plan.mode == PrefixMode::kPerRequest || plan.mode == PrefixMode::kGated) {
      cuda_prefill::PrefillParams r = p;  // request b's rows at positions after its suffix
      set_pass_options(r, plan.opts, false);
      r.batch = B;
      r.q_pos_offset = suffix_len;
      if (plan.decode) {  // batched: request b is row b
        r.max_seqlen_q = 1;
        r.q_batch_stride = a.q.stride(0);
        r.out_batch_stride = v_row;
        r.lse_batch_stride = s_row;
      } else {
        r.max_seqlen_q = plan.max_q;
        r.cu_seqlens_q = plan.mode == PrefixMode::kGated ? req_cu : qo;
        r.q_row_stride = a.q.stride(0);
        r.out_row_stride = v_row;
        r.lse_row_stride = s_row;
      }
      cuda_prefill::run_prefill(r, stream);
    }
  }

  // ---- 3. suffix: into the last slot, or straight into out / lse without a prefix ----------
  const bool direct = plan.mode == PrefixMode::kNone;
  void* sfx_out = direct ? a.out.data : static_cast<char*>(part_v) + std::size_t(slots - 1) * v_slot * 2;
  float* sfx_lse = direct ? (a.lse ? static_cast<float*>(a.lse->data) : nullptr) : part_s + std::int64_t(slots - 1) * s_slot;
  // Per row, per head strides of that destination.
  const std::int64_t o_row = direct ? a.out.stride(0) : v_row, o_head = direct ? a.out.stride(1) : v_head;
  const std::int64_t l_row = direct ? (a.lse ? a.lse->stride(1) : 0) : s_row;
  const std::int64_t l_head = direct ? (a.lse ? a.lse->stride(0) : 0) : s_head;
  if (plan.decode) {
    cuda_decode::DecodeParams p = plan.suffix;
    p.out = sfx_out;
    p.out_batch_stride = o_row;
    p.out_row_stride = o_row;
    p.out_head_stride = o_head;
    p.lse = sfx_lse;
    p.lse_batch_stride = l_row;
    p.lse_head_stride = l_head;
    p.lse_row_stride = 0;
    const cuda_decode::SplitStateBytes st = cuda_decode::split_state_bytes(p);
    if (st.lse > 0) {
      p.partial_lse = reinterpret_cast<float*>(ws + plan.off_dec_lse);
      p.partial_o = reinterpret_cast<float*>(ws + plan.off_dec_o);
    }
    cuda_decode::run_decode(p, stream);
  } else {
    cuda_prefill::PrefillParams p;
    p.dtype = dtype;
    p.batch = B;
    p.heads_q = hq;
    p.heads_kv = hkv;
    p.head_dim = dim;
    p.max_seqlen_q = plan.max_q;
    p.total_q = total_q;
    p.cu_seqlens_q = qo;
    p.q = a.q.data;
    p.q_row_stride = a.q.stride(0);
    p.q_head_stride = a.q.stride(1);
    p.out = sfx_out;
    p.out_row_stride = o_row;
    p.out_head_stride = o_head;
    p.lse = sfx_lse;
    p.lse_row_stride = l_row;
    p.lse_head_stride = l_head;
    p.k = sfx.k_pages.data;
    p.v = sfx.v_pages.data;
    p.k_page_stride = sfx.k_pages.stride(0);
    p.v_page_stride = sfx.v_pages.stride(0);
    p.k_row_stride = sfx.k_pages.stride(1);
    p.v_row_stride = sfx.v_pages.stride(1);
    p.k_head_stride = sfx.k_pages.stride(2);
    p.v_head_stride = sfx.v_pages.stride(2);
    p.page_size = page_size;
    p.page_shift = page_shift;
    p.num_pages = static_cast<int>(d.paged.num_pages);
    p.page_indptr = page_indptr;
    p.page_indices = page_indices;
    p.num_page_indices = sfx.page_indices->size(0);
    p.last_page_len = last_page_len;
    set_pass_options(p, plan.opts, false);
    // Rows past qo_indptr[B]: output 0 and LSE -inf (into out directly, or the suffix slot,
    // where the prep kernel already put the same).
    p.clear_padding_rows = true;
    cuda_prefill::run_prefill(p, stream);
  }
  if (plan.mode == PrefixMode::kNone) return;

  // ---- 4. merge the splits + 1 states of every (row, head) into out / lse --------------------
  const TensorView v = make_strided_view(part_v, a.q.dtype, {total_q, slots, hq, dim}, {v_row, v_slot, v_head, 1}, dev);
  const TensorView s = make_strided_view(part_s, DType::kFloat32, {total_q, slots, hq}, {s_row, s_slot, s_head}, dev);
  TensorView s_out;
  if (a.lse) {
    s_out = make_strided_view(a.lse->data, DType::kFloat32, {total_q, hq}, {a.lse->stride(1), a.lse->stride(0)}, dev);
  } else {
    s_out = make_strided_view(ws + plan.off_lse, DType::kFloat32, {total_q, hq}, {hq, 1}, dev);
  }
  merge_states(c, v, s, a.out, s_out, a.exec);
}

}  // namespace fastattn::cuda_cascade
