// CPU backend: batched, varlen (packed or paged) and KV-cache attention lowered to AttnProblem.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/heuristics.h"
#include "cpu/attention_problem.h"
#include "cpu/convert.h"
#include "cpu/cpu_backend.h"
#include "cpu/index_data.h"
#include "cpu/kvcache_append.h"

namespace fastattn::cpu {
namespace {

/// Fills the fields every lowering shares: dtype, heads, q/out strides (for the per-token row
/// layouts (…, S, H, D) and (total, H, D) the row stride is dim -3), options.
AttnProblem base_problem(const TensorView& q, const TensorView& out, std::int64_t heads_kv,
                         const core::ResolvedOptions& o) {
  AttnProblem p;
  p.dtype = q.dtype;
  p.out_dtype = out.dtype;
  p.heads_q = q.size(-2);
  p.heads_kv = heads_kv;
  p.head_dim = q.size(-1);
  p.q = q.data;
  p.q_row_stride = q.stride(-3);
  p.q_head_stride = q.stride(-2);
  p.out = out.data;
  p.out_row_stride = out.stride(-3);
  p.out_head_stride = out.stride(-2);
  p.scale = o.scale;
  p.softcap = o.softcap;
  p.window_left = o.window_left;
  p.window_right = o.window_right;
  return p;
}

void set_dense_kv(AttnProblem& p, const TensorView& k, const TensorView& v) {
  p.kv.k = k.data;
  p.kv.v = v.data;
  p.kv.k_slot_stride = k.stride(-3);
  p.kv.v_slot_stride = v.stride(-3);
  p.kv.k_head_stride = k.stride(-2);
  p.kv.v_head_stride = v.stride(-2);
}

void set_paged_kv(AttnProblem& p, const TensorView& k_pages, const TensorView& v_pages) {
  set_dense_kv(p, k_pages, v_pages);
  p.kv.page_size = k_pages.size(1);
  p.kv.k_page_stride = k_pages.stride(0);
  p.kv.v_page_stride = v_pages.stride(0);
}

/// LSE (B, Hq, Sq) or (Hq, total) strides.
void set_lse(AttnProblem& p, const std::optional<TensorView>& lse) {
  if (!lse) return;
  p.lse = static_cast<float*>(lse->data);
  p.lse_head_stride = lse->stride(-2);
  p.lse_row_stride = lse->stride(-1);
}

/// The attention sinks, if any: folded into each finished row (and into probs' normalisers).
void set_sinks(AttnProblem& p, const std::optional<TensorView>& sinks) {
  if (!sinks) return;
  p.sinks = static_cast<const float*>(sinks->data);
  p.sinks_stride = sinks->stride(0);
}

/// The softmax matrix's destination (write_probs fills it after the attention pass).
void set_probs(AttnProblem& p, const std::optional<TensorView>& probs) {
  if (!probs) return;
  p.probs = static_cast<float*>(probs->data);
  p.probs_head_stride = probs->stride(1);
  p.probs_row_stride = probs->stride(2);
  std::fill_n(p.probs, probs->numel(), 0.0f);  // zero padding beyond each sequence's lengths
}

/// Checks that `pl` holds the pages for slots [0, slots_end) and that every page id used is
/// in range. `what` names the table in messages.
void check_pages(const check::ArgChecker& c, const PageList& pl, std::int64_t slots_begin,
                 std::int64_t slots_end, std::int64_t page_size, std::int64_t num_pages,
                 const std::string& what, std::int64_t seq) {
  const std::int64_t needed = (slots_end + page_size - 1) / page_size;
  if (needed > pl.count)
    c.fail_value(what, "holds " + std::to_string(pl.count) + " page(s) for sequence " +
                           std::to_string(seq) + " but its " + std::to_string(slots_end) +
                           " slots need " + std::to_string(needed) + " (page_size " +
                           std::to_string(page_size) + ")");
  for (std::int64_t i = slots_begin / page_size; i < needed; ++i)
    if (pl.ids[i] < 0 || pl.ids[i] >= num_pages)
      c.fail_value(what, "has page id " + std::to_string(pl.ids[i]) + " for sequence " +
                             std::to_string(seq) + " outside [0, " + std::to_string(num_pages) +
                             ") (num_pages of the cache)");
}

PageList page_list(const PagedKV& pk, std::int64_t row) {
  if (pk.block_table) {
    const TensorView& t = *pk.block_table;
    return {ints(t) + row * t.stride(0), t.size(1)};
  }
  const std::int32_t* ip = ints(*pk.page_indptr);
  return {ints(*pk.page_indices) + ip[row], ip[row + 1] - ip[row]};
}

/// Validates CSR row pointers against the indices they index.
void check_csr(const check::ArgChecker& c, const PagedKV& pk, const std::string& prefix) {
  if (!pk.page_indptr) return;
  check_cumulative(c, *pk.page_indptr, prefix + "page_indptr", pk.page_indices->size(0),
                   prefix + "page_indices", -1, "");
}

const float* alibi_for(const core::ResolvedOptions& o, std::int64_t b) {
  return o.alibi ? o.alibi + b * o.alibi_batch_stride : nullptr;
}

int threads(const ExecConfig& e) { return e.num_threads > 0 ? e.num_threads : omp_get_max_threads(); }

}  // namespace

void attention_forward(check::ArgChecker& c, const AttentionArgs& args,
                       const core::AttentionDims& d) {
  const auto o = core::validate_options(c, args.options, d.batch, d.heads_q, d.head_dim);
  AttnProblem p = base_problem(args.q, args.out, d.heads_kv, o);
  set_dense_kv(p, args.k, args.v);
  set_lse(p, args.lse);
  set_sinks(p, args.sinks);
  for (std::int64_t b = 0; b < d.batch; ++b) {
    SeqDesc s;
    s.seqlen_q = d.seqlen_q;
    s.seqlen_k = d.seqlen_k;
    s.q_off = b * args.q.stride(0);
    s.out_off = b * args.out.stride(0);
    s.lse_off = args.lse ? b * args.lse->stride(0) : 0;
    s.probs_off = args.probs ? b * args.probs->stride(0) : 0;
    s.ws_row0 = b * d.seqlen_q;
    s.k_off = b * args.k.stride(0);
    s.v_off = b * args.v.stride(0);
    s.q_pos0 = d.seqlen_k - d.seqlen_q;
    s.alibi = alibi_for(o, b);
    p.seqs.push_back(s);
  }
  set_probs(p, args.probs);
  run_attention(p, nullptr, threads(args.exec));
}

void varlen_attention_forward(check::ArgChecker& c, const VarlenAttentionArgs& args,
                              const core::VarlenDims& d) {
  const auto o = core::validate_options(c, args.options, d.a.batch, d.a.heads_q, d.a.head_dim);
  // Contents of the index tensors, all checked before anything is written.
  check_cumulative(c, args.cu_seqlens_q, "cu_seqlens_q", d.total_q, "q (dim 0)", args.max_seqlen_q,
                   "max_seqlen_q", /*zero_start=*/true);
  const std::int32_t* cu_q = ints(args.cu_seqlens_q);
  const std::int32_t* cu_k = args.cu_seqlens_k ? ints(*args.cu_seqlens_k) : nullptr;
  if (args.cu_seqlens_k)
    check_cumulative(c, *args.cu_seqlens_k, "cu_seqlens_k",
                     args.paged ? INT32_MAX : d.total_k, "k (dim 0)", args.seqused_k ? -1 : args.max_seqlen_k,
                     "max_seqlen_k");
  const std::int32_t* used = args.seqused_k ? ints(*args.seqused_k) : nullptr;
  if (args.paged) check_csr(c, *args.paged, "");

  AttnProblem p = base_problem(args.q, args.out, d.a.heads_kv, o);
  if (args.paged) set_paged_kv(p, args.paged->k_pages, args.paged->v_pages);
  else set_dense_kv(p, *args.k, *args.v);
  set_lse(p, args.lse);
  set_sinks(p, args.sinks);
  for (std::int64_t b = 0; b < d.a.batch; ++b) {
    SeqDesc s;
    s.seqlen_q = cu_q[b + 1] - cu_q[b];
    std::int64_t len_k;
    if (used) {
      len_k = used[b];
      if (len_k < 0 || len_k > args.max_seqlen_k)
        c.fail_value("seqused_k", "[" + std::to_string(b) + "] = " + std::to_string(len_k) +
                                      " must be in [0, max_seqlen_k = " +
                                      std::to_string(args.max_seqlen_k) + "]");
      if (cu_k && len_k > cu_k[b + 1] - cu_k[b] && !args.paged)
        c.fail_value("seqused_k", "[" + std::to_string(b) + "] = " + std::to_string(len_k) +
                                      " exceeds the sequence's " +
                                      std::to_string(cu_k[b + 1] - cu_k[b]) +
                                      " packed keys in cu_seqlens_k");
    } else if (cu_k) {
      len_k = cu_k[b + 1] - cu_k[b];
    } else {  // paged with last_page_len
      const PageList pl = page_list(*args.paged, b);
      const std::int32_t last = ints(*args.paged->last_page_len)[b];
      const std::int64_t ps = d.paged.page_size;
      if (pl.count > 0 && (last < 1 || last > ps))
        c.fail_value("last_page_len", "[" + std::to_string(b) + "] = " + std::to_string(last) +
                                          " must be in [1, page_size = " + std::to_string(ps) + "]");
      len_k = pl.count > 0 ? (pl.count - 1) * ps + last : 0;
      if (len_k > args.max_seqlen_k)
        c.fail_value("last_page_len", "gives sequence " + std::to_string(b) + " " +
                                          std::to_string(len_k) + " keys > max_seqlen_k = " +
                                          std::to_string(args.max_seqlen_k));
    }
    s.seqlen_k = len_k;
    s.q_off = cu_q[b] * args.q.stride(0);
    s.out_off = cu_q[b] * args.out.stride(0);
    s.lse_off = args.lse ? cu_q[b] * args.lse->stride(1) : 0;
    s.probs_off = args.probs ? b * args.probs->stride(0) : 0;
    s.ws_row0 = cu_q[b];
    if (args.paged) {
      const PageList pl = page_list(*args.paged, b);
      check_pages(c, pl, 0, len_k, d.paged.page_size, d.paged.num_pages,
                  args.paged->block_table ? "block_table" : "page_indices", b);
      s.pages = pl.ids;
    } else {
      s.k_off = cu_k[b] * args.k->stride(0);
      s.v_off = cu_k[b] * args.v->stride(0);
    }
    s.q_pos0 = len_k - s.seqlen_q;
    s.alibi = alibi_for(o, b);
    p.seqs.push_back(s);
  }
  set_probs(p, args.probs);
  run_attention(p, nullptr, threads(args.exec));
  clear_unowned_rows(args.out, args.lse, cu_q[d.a.batch], d.total_q, args.sinks);
}

void clear_unowned_rows(const TensorView& out, const std::optional<TensorView>& lse,
                        std::int64_t row_begin, std::int64_t row_end,
                        const std::optional<TensorView>& sinks) {
  const std::int64_t heads = out.size(1), dim = out.size(2);
  const std::size_t row_bytes = static_cast<std::size_t>(dim) * dtype_size(out.dtype);
  for (std::int64_t r = row_begin; r < row_end; ++r)
    for (std::int64_t h = 0; h < heads; ++h) {
      std::memset(elem_ptr(out.data, out.dtype, r * out.stride(0) + h * out.stride(1)), 0, row_bytes);
      if (lse)
        static_cast<float*>(lse->data)[h * lse->stride(0) + r * lse->stride(1)] =
            sinks ? static_cast<const float*>(sinks->data)[h * sinks->stride(0)] : -INFINITY;
    }
}

namespace {

/// Everything a KV-cache call needs, resolved from index tensors without writing anything.
struct KVCachePlan {
  AttnProblem problem;
  std::vector<AppendSeq> appends;
  std::size_t split_bytes = 0;
  std::size_t q_rot_bytes = 0;  ///< rotated copy of q (rotary only), placed first in workspace
};

KVCachePlan plan_kvcache(check::ArgChecker& c, const KVCacheArgs& args, const core::KVCacheDims& d) {
  const auto o = core::validate_options(c, args.options, d.a.batch, d.a.heads_q, d.a.head_dim);
  const bool paged = d.paged.page_size > 0;
  PagedKV pk;
  if (paged) {
    pk.k_pages = args.k_cache;
    pk.v_pages = args.v_cache;
    pk.block_table = args.block_table;
    pk.page_indptr = args.page_indptr;
    pk.page_indices = args.page_indices;
    check_csr(c, pk, "");
  }
  const std::int64_t table_rows = paged ? d.paged.table_rows : d.cache_rows;
  const std::int32_t* batch_idx = args.cache_batch_idx ? ints(*args.cache_batch_idx) : nullptr;
  const std::int32_t* seqlens = args.cache_seqlens ? ints(*args.cache_seqlens) : nullptr;
  const std::int32_t* leftpad = args.cache_leftpad ? ints(*args.cache_leftpad) : nullptr;
  const bool rotate_q_per_row = args.options.causal || args.options.window_left >= 0 ||
                                args.options.window_right >= 0;

  KVCachePlan plan;
  AttnProblem& p = plan.problem;
  p = base_problem(args.q, args.out, d.a.heads_kv, o);
  if (paged) set_paged_kv(p, args.k_cache, args.v_cache);
  else set_dense_kv(p, args.k_cache, args.v_cache);
  set_lse(p, args.lse);
  set_sinks(p, args.sinks);

  std::int64_t max_keys = 0;
  for (std::int64_t b = 0; b < d.a.batch; ++b) {
    const std::string bs = "[" + std::to_string(b) + "]";
    const std::int64_t row = batch_idx ? batch_idx[b] : b;
    if (row < 0 || row >= table_rows)
      c.fail_value(batch_idx ? "cache_batch_idx"
                             : (!paged ? "k_cache" : (args.block_table ? "block_table" : "page_indptr")),
                   batch_idx ? bs + " = " + std::to_string(row) + " must be in [0, " +
                                   std::to_string(table_rows) + ") (rows of the cache)"
                             : "has " + std::to_string(table_rows) + " rows, fewer than B = " +
                                   std::to_string(d.a.batch));
    const std::int64_t seqlen = seqlens ? seqlens[b] : args.cache_seqlen;
    if (seqlen < 0)
      c.fail_value("cache_seqlens", bs + " = " + std::to_string(seqlen) + " must be >= 0");
    const std::int64_t pad = leftpad ? leftpad[b] : 0;
    if (pad < 0 || pad > seqlen)
      c.fail_value("cache_leftpad", bs + " = " + std::to_string(pad) +
                                        " must be in [0, cache_seqlens" + bs + " = " +
                                        std::to_string(seqlen) + "]");
    const std::int64_t end = seqlen + d.seqlen_new;  // one past the last attended slot
    SeqDesc s;
    if (paged) {
      const PageList pl = page_list(pk, row);
      check_pages(c, pl, pad, end, d.paged.page_size, d.paged.num_pages,
                  args.block_table ? "block_table" : "page_indices", b);
      s.pages = pl.ids;
    } else {
      if (end > d.cache_len)
        c.fail_value("k_cache", "holds " + std::to_string(d.cache_len) + " slots per sequence but "
                                "sequence " + std::to_string(b) + " needs " + std::to_string(end) +
                                " (cache_seqlens " + std::to_string(seqlen) + " + " +
                                std::to_string(d.seqlen_new) + " new)");
      s.k_off = row * args.k_cache.stride(0);
      s.v_off = row * args.v_cache.stride(0);
    }
    const std::int64_t pos0 = seqlen - pad;  // position of the first appended token
    if (d.rotary_dim > 0) {
      const std::int64_t last_k = pos0 + d.seqlen_new - 1;
      const std::int64_t last_q = rotate_q_per_row ? pos0 + d.a.seqlen_q - 1 : pos0;
      const std::int64_t need = std::max(last_k, last_q);
      if (need >= d.rotary_len)
        c.fail_value("rotary_cos", "has " + std::to_string(d.rotary_len) +
                                       " positions (dim 0) but sequence " + std::to_string(b) +
                                       " needs position " + std::to_string(need));
    }
    s.seqlen_q = d.a.seqlen_q;
    s.seqlen_k = end - pad;
    s.slot0 = pad;
    s.q_off = b * args.q.stride(0);
    s.out_off = b * args.out.stride(0);
    s.lse_off = args.lse ? b * args.lse->stride(0) : 0;
    s.ws_row0 = b * d.a.seqlen_q;
    s.q_pos0 = s.seqlen_k - s.seqlen_q;
    s.alibi = alibi_for(o, b);
    p.seqs.push_back(s);
    max_keys = std::max(max_keys, s.seqlen_k);
    plan.appends.push_back({row, seqlen, pos0, s.pages, s.k_off, s.v_off});
  }

  // Split-KV: a fixed num_splits, or enough splits to keep every thread busy.
  if (args.num_splits > 0) {
    p.num_splits = args.num_splits;
  } else {
    const std::int64_t g = d.a.heads_q / d.a.heads_kv;
    const std::int64_t items = d.a.batch * d.a.heads_kv * std::max<std::int64_t>(1, (d.a.seqlen_q * g + 63) / 64);
    p.num_splits = core::choose_num_splits(items, max_keys, threads(args.exec));
  }
  plan.split_bytes = attention_workspace_bytes(p);
  if (d.rotary_dim > 0) {
    const std::size_t bytes = static_cast<std::size_t>(args.q.numel()) * dtype_size(args.q.dtype);
    plan.q_rot_bytes = (bytes + 63) / 64 * 64;  // keep the split scratch 64-byte aligned
  }
  return plan;
}

}  // namespace

std::size_t kvcache_workspace_bytes(check::ArgChecker& c, const KVCacheArgs& args,
                                    const core::KVCacheDims& d) {
  const KVCachePlan plan = plan_kvcache(c, args, d);
  return plan.q_rot_bytes + plan.split_bytes;
}

void kvcache_attention_forward(check::ArgChecker& c, const KVCacheArgs& args,
                               const core::KVCacheDims& d) {
  KVCachePlan plan = plan_kvcache(c, args, d);
  const std::size_t need = plan.q_rot_bytes + plan.split_bytes;
  if (args.workspace && static_cast<std::size_t>(args.workspace->numel()) < need)
    c.fail_value("workspace", "must hold at least " + std::to_string(need) + " bytes, got " +
                                  std::to_string(args.workspace->numel()));
  std::vector<std::uint64_t> own;  // 8-byte aligned fallback scratch
  char* ws = nullptr;
  if (need > 0) {
    if (args.workspace) {
      ws = static_cast<char*>(args.workspace->data);
    } else {
      own.resize((need + 7) / 8);
      ws = reinterpret_cast<char*>(own.data());
    }
  }
  const int nt = threads(args.exec);
  // 1. Append (rotating k), then 2. rotate q into scratch, 3. attend.
  AppendParams ap;
  ap.args = &args;
  ap.seqlen_new = d.seqlen_new;
  ap.rotary_dim = d.rotary_dim;
  ap.page_size = d.paged.page_size;
  if (d.seqlen_new > 0) append_kv(ap, plan.appends, nt);
  AttnProblem& p = plan.problem;
  if (d.rotary_dim > 0) {
    void* q_rot = ws;
    rotate_queries(ap, plan.appends, q_rot, nt);
    // The rotated copy is contiguous (B, Sq, Hq, D).
    p.q = q_rot;
    p.q_head_stride = d.a.head_dim;
    p.q_row_stride = d.a.heads_q * d.a.head_dim;
    for (std::int64_t b = 0; b < d.a.batch; ++b)
      p.seqs[static_cast<std::size_t>(b)].q_off = b * d.a.seqlen_q * p.q_row_stride;
  }
  run_attention(p, ws ? ws + plan.q_rot_bytes : nullptr, nt);
}

}  // namespace fastattn::cpu
