#include "core/validate.h"

#include <cmath>
#include <string>
#include <vector>

namespace fastattn::core {

using check::ArgChecker;

namespace {

constexpr std::initializer_list<DType> kFloatTypes = {DType::kFloat32, DType::kFloat16,
                                                      DType::kBFloat16};

/// Common checks of a data tensor: present, device, last dim contiguous.
void data_tensor(ArgChecker& c, const TensorView& t, const std::string& arg) {
  c.present(t, arg);
  c.on_device(t, arg);
  c.last_dim_contiguous(t, arg);
}

/// A 1-d int32 contiguous index tensor of `n` entries (n < 0: any length).
void index_tensor(ArgChecker& c, const TensorView& t, const std::string& arg, std::int64_t n,
                  const char* layout) {
  c.present(t, arg);
  c.on_device(t, arg);
  c.dtype_is(t, arg, DType::kInt32);
  c.shape_is(t, arg, {n}, layout);
  c.contiguous(t, arg);
}

/// KVCacheArgs::split_plan: (B + 1 + W) int32, B <= W <= kMaxSplitPlanItems; returns W. On the
/// host its contents are checked too (on a GPU they are not read: the kernels skip bad entries).
std::int64_t split_plan_items(ArgChecker& c, const TensorView& t, std::int64_t batch) {
  const std::string arg = "split_plan";
  c.present(t, arg);
  c.on_device(t, arg);
  c.dtype_is(t, arg, DType::kInt32);
  c.ndim_is(t, arg, 1, "(B + 1 + W)");
  c.contiguous(t, arg);
  const std::int64_t items = t.size(0) - batch - 1;
  if (items < batch || items > kMaxSplitPlanItems)
    c.fail_value(arg, "must have B + 1 + W entries with B = " + std::to_string(batch) + " <= W <= " +
                          std::to_string(kMaxSplitPlanItems) + " work items, got " + std::to_string(t.size(0)) +
                          " entries");
  if (t.device.type != DeviceType::kCPU) return items;
  const auto* v = static_cast<const std::int32_t*>(t.data);
  if (v[0] != 0) c.fail_value(arg, "entry 0 (split_indptr[0]) must be 0, got " + std::to_string(v[0]));
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t n = std::int64_t(v[b + 1]) - v[b];
    if (n < 1 || n > kMaxSplitPlanSplits)
      c.fail_value(arg, "must give sequence " + std::to_string(b) + " 1.." + std::to_string(kMaxSplitPlanSplits) +
                            " splits (split_indptr[b + 1] - split_indptr[b]), got " + std::to_string(n));
  }
  if (v[batch] > items)
    c.fail_value(arg, "entry B (split_indptr[B], the splits of all sequences) must be at most W = " +
                          std::to_string(items) + ", the work items after it, got " + std::to_string(v[batch]));
  std::vector<char> seen(static_cast<std::size_t>(v[batch]), 0);
  std::int64_t padding = 0;
  for (std::int64_t w = 0; w < items; ++w) {
    const std::int32_t item = v[batch + 1 + w];
    if (item == kSplitPlanPadding) {
      ++padding;
      continue;
    }
    const std::int64_t b = item % kSplitPlanSplitUnit, s = item / kSplitPlanSplitUnit;
    if (item < 0 || b >= batch || s >= std::int64_t(v[b + 1]) - v[b] || seen[v[b] + s]++)
      c.fail_value(arg, "work item " + std::to_string(w) + " (" + std::to_string(item) +
                            ") must be b + 65536 * split for a split of a sequence b < B, each listed once, "
                            "or -1 (padding)");
  }
  if (padding != items - v[batch])
    c.fail_value(arg, "must list every split of every sequence once: " + std::to_string(items - padding) +
                          " work items for split_indptr[B] = " + std::to_string(v[batch]) + " splits");
  return items;
}

void heads_compatible(ArgChecker& c, const std::string& kv_arg, std::int64_t heads_q,
                      std::int64_t heads_kv) {
  if (heads_q < 1) c.fail_value("q", "must have at least one head, got " + std::to_string(heads_q));
  if (heads_kv < 1 || heads_q % heads_kv != 0)
    c.fail_value(kv_arg, "heads (" + std::to_string(heads_kv) +
                             ") must divide the query heads (" + std::to_string(heads_q) + ")");
}

/// any_strides: the op's kernels address every dimension through its stride (no vector stores),
/// so the last need not be contiguous.
void lse_output(ArgChecker& c, const std::optional<TensorView>& lse,
                std::initializer_list<std::int64_t> shape, const char* layout, bool any_strides = false) {
  if (!lse) return;
  if (any_strides) {
    c.present(*lse, "lse");
    c.on_device(*lse, "lse");
  } else {
    data_tensor(c, *lse, "lse");
  }
  c.dtype_is(*lse, "lse", DType::kFloat32);
  c.shape_is(*lse, "lse", shape, layout);
}

/// Attention sinks: (Hq) float32 on q's device, any stride.
void sinks_input(ArgChecker& c, const std::optional<TensorView>& sinks, std::int64_t heads_q) {
  if (!sinks) return;
  c.present(*sinks, "sinks");
  c.on_device(*sinks, "sinks");
  c.dtype_is(*sinks, "sinks", DType::kFloat32);
  c.shape_is(*sinks, "sinks", {heads_q}, "(Hq)");
}

void probs_output(ArgChecker& c, const std::optional<TensorView>& probs,
                  std::initializer_list<std::int64_t> shape, const char* layout) {
  if (!probs) return;
  data_tensor(c, *probs, "probs");
  c.dtype_is(*probs, "probs", DType::kFloat32);
  c.shape_is(*probs, "probs", shape, layout);
  c.contiguous(*probs, "probs");
}

/// q of a packed op: (total_q, Hq, D) float. Fills heads_q and head_dim; returns total_q.
std::int64_t packed_queries(ArgChecker& c, const TensorView& q, AttentionDims& a) {
  data_tensor(c, q, "q");
  c.dtype_in(q, "q", kFloatTypes);
  c.ndim_is(q, "q", 3, "(total_q, Hq, D)");
  a.heads_q = q.size(1);
  a.head_dim = q.size(2);
  check::head_dim_supported(c, "q", a.head_dim);
  return q.size(0);
}

}  // namespace

void validate_workspace(ArgChecker& c, const TensorView& workspace) {
  c.present(workspace, "workspace");
  c.on_device(workspace, "workspace");
  c.dtype_is(workspace, "workspace", DType::kUInt8);
  c.contiguous(workspace, "workspace");
}

void validate_exec(ArgChecker& c, const ExecConfig& e) {
  if (e.num_threads < 0)
    c.fail_value("exec.num_threads", "must be >= 0 (0 = all available), got " +
                                         std::to_string(e.num_threads));
}

ResolvedOptions validate_options(ArgChecker& c, const AttentionOptions& o, std::int64_t batch,
                                 std::int64_t heads_q, std::int64_t head_dim) {
  ResolvedOptions r;
  if (o.softmax_scale) {
    if (!std::isfinite(*o.softmax_scale))
      c.fail_value("softmax_scale", "must be finite, got " + std::to_string(*o.softmax_scale));
    r.scale = *o.softmax_scale;
  } else {
    r.scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  }
  if (!(o.softcap >= 0.0f) || !std::isfinite(o.softcap))
    c.fail_value("softcap", "must be a finite value >= 0 (0 disables it), got " +
                                std::to_string(o.softcap));
  r.softcap = o.softcap;
  if (o.window_left < -1)
    c.fail_value("window_size", "left must be >= -1 (-1 = unbounded), got " +
                                    std::to_string(o.window_left));
  if (o.window_right < -1)
    c.fail_value("window_size", "right must be >= -1 (-1 = unbounded), got " +
                                    std::to_string(o.window_right));
  r.window_left = o.window_left;
  r.window_right = o.causal ? 0 : o.window_right;
  if (o.alibi_slopes) {
    const TensorView& a = *o.alibi_slopes;
    data_tensor(c, a, "alibi_slopes");
    c.dtype_is(a, "alibi_slopes", DType::kFloat32);
    if (a.ndim == 1) {
      c.shape_is(a, "alibi_slopes", {heads_q}, "(Hq)");
    } else {
      c.shape_is(a, "alibi_slopes", {batch, heads_q}, "(B, Hq) or (Hq)");
      r.alibi_batch_stride = a.stride(0);
    }
    r.alibi = static_cast<const float*>(a.data);
  }
  return r;
}

AttentionDims validate(ArgChecker& c, const AttentionArgs& args) {
  for (auto [t, n] : {std::pair{&args.q, "q"}, {&args.k, "k"}, {&args.v, "v"}, {&args.out, "out"}})
    data_tensor(c, *t, n);
  c.dtype_in(args.q, "q", kFloatTypes);
  c.ndim_is(args.q, "q", 4, "(B, Sq, Hq, D)");
  AttentionDims d;
  d.batch = args.q.size(0);
  d.seqlen_q = args.q.size(1);
  d.heads_q = args.q.size(2);
  d.head_dim = args.q.size(3);
  check::head_dim_supported(c, "q", d.head_dim);
  c.same_dtype(args.k, "k", args.q, "q");
  c.ndim_is(args.k, "k", 4, "(B, Sk, Hkv, D)");
  d.seqlen_k = args.k.size(1);
  d.heads_kv = args.k.size(2);
  c.shape_is(args.k, "k", {d.batch, -1, -1, d.head_dim}, "(B, Sk, Hkv, D)");
  heads_compatible(c, "k", d.heads_q, d.heads_kv);
  c.same_dtype(args.v, "v", args.q, "q");
  c.shape_is(args.v, "v", {d.batch, d.seqlen_k, d.heads_kv, d.head_dim}, "(B, Sk, Hkv, D)");
  c.same_dtype(args.out, "out", args.q, "q");
  c.shape_is(args.out, "out", {d.batch, d.seqlen_q, d.heads_q, d.head_dim}, "(B, Sq, Hq, D)");
  lse_output(c, args.lse, {d.batch, d.heads_q, d.seqlen_q}, "(B, Hq, Sq)");
  probs_output(c, args.probs, {d.batch, d.heads_q, d.seqlen_q, d.seqlen_k}, "(B, Hq, Sq, Sk)");
  sinks_input(c, args.sinks, d.heads_q);
  validate_options(c, args.options, d.batch, d.heads_q, d.head_dim);
  validate_exec(c, args.exec);
  return d;
}

PagedDims validate_paged(ArgChecker& c, const PagedKV& p, std::int64_t batch,
                         std::int64_t heads_kv, std::int64_t head_dim, DType dtype,
                         const char* prefix, bool table_rows_any) {
  const std::string pre = prefix;
  PagedDims d;
  const std::string kn = pre + "k_pages", vn = pre + "v_pages";
  data_tensor(c, p.k_pages, kn);
  data_tensor(c, p.v_pages, vn);
  if (p.k_pages.dtype != dtype)
    c.fail_type(kn, std::string("must have the dtype of q (") + dtype_name(dtype) + "), got " +
                        dtype_name(p.k_pages.dtype));
  c.ndim_is(p.k_pages, kn, 4, "(num_pages, page_size, Hkv, D)");
  d.num_pages = p.k_pages.size(0);
  d.page_size = p.k_pages.size(1);
  if (d.page_size < 1) c.fail_value(kn, "page_size (dim 1) must be >= 1, got 0");
  if (heads_kv < 0) heads_kv = p.k_pages.size(2);
  c.shape_is(p.k_pages, kn, {-1, -1, heads_kv, head_dim}, "(num_pages, page_size, Hkv, D)");
  c.same_dtype(p.v_pages, vn, p.k_pages, kn);
  c.shape_is(p.v_pages, vn, {d.num_pages, d.page_size, heads_kv, head_dim},
             "(num_pages, page_size, Hkv, D)");
  const bool has_table = p.block_table.has_value();
  const bool has_csr = p.page_indptr.has_value() || p.page_indices.has_value();
  if (has_table && has_csr)
    c.fail_value(pre + "block_table",
                 "and " + pre + "page_indptr/page_indices are two ways to address pages: pass one");
  if (!has_table && !has_csr)
    c.fail_value(pre + "block_table", "or " + pre + "page_indptr + " + pre +
                                          "page_indices must address the pages; got neither");
  if (has_table) {
    const std::string bn = pre + "block_table";
    const TensorView& t = *p.block_table;
    c.present(t, bn);
    c.on_device(t, bn);
    c.dtype_is(t, bn, DType::kInt32);
    c.shape_is(t, bn, {table_rows_any ? -1 : batch, -1}, "(B, max_pages_per_seq)");
    c.last_dim_contiguous(t, bn);
    d.table_rows = t.size(0);
    d.max_pages_per_seq = t.size(1);
  } else {
    if (!p.page_indptr || !p.page_indices)
      c.fail_value(pre + (p.page_indptr ? "page_indices" : "page_indptr"),
                   "is required with " + pre + (p.page_indptr ? "page_indptr" : "page_indices"));
    index_tensor(c, *p.page_indptr, pre + "page_indptr", table_rows_any ? -1 : batch + 1,
                 "(B + 1)");
    if (p.page_indptr->size(0) < 1)
      c.fail_value(pre + "page_indptr", "must have at least one entry, got 0");
    index_tensor(c, *p.page_indices, pre + "page_indices", -1, "(nnz_pages)");
    d.csr = true;
    d.table_rows = p.page_indptr->size(0) - 1;
  }
  if (p.last_page_len)
    index_tensor(c, *p.last_page_len, pre + "last_page_len", batch, "(B)");
  return d;
}

VarlenDims validate(ArgChecker& c, const VarlenAttentionArgs& args) {
  VarlenDims d;
  d.total_q = packed_queries(c, args.q, d.a);
  index_tensor(c, args.cu_seqlens_q, "cu_seqlens_q", -1, "(B + 1)");
  if (args.cu_seqlens_q.size(0) < 1)
    c.fail_value("cu_seqlens_q", "must have B + 1 >= 1 entries, got 0");
  d.a.batch = args.cu_seqlens_q.size(0) - 1;
  if (args.max_seqlen_q < 0)
    c.fail_value("max_seqlen_q", "must be >= 0, got " + std::to_string(args.max_seqlen_q));
  if (args.max_seqlen_k < 0)
    c.fail_value("max_seqlen_k", "must be >= 0, got " + std::to_string(args.max_seqlen_k));
  d.a.seqlen_q = args.max_seqlen_q;
  d.a.seqlen_k = args.max_seqlen_k;

  if (args.paged) {
    if (args.k || args.v)
      c.fail_value("k", "must not be given as packed keys together with a paged cache");
    d.paged = validate_paged(c, *args.paged, d.a.batch, -1, d.a.head_dim, args.q.dtype, "", false);
    d.a.heads_kv = args.paged->k_pages.size(2);
    heads_compatible(c, "k_pages", d.a.heads_q, d.a.heads_kv);
    if (args.cu_seqlens_k) index_tensor(c, *args.cu_seqlens_k, "cu_seqlens_k", d.a.batch + 1, "(B + 1)");
    if (!args.seqused_k && !args.cu_seqlens_k && !args.paged->last_page_len)
      c.fail_value("seqused_k", "or cu_seqlens_k (or paged.last_page_len) must give the key "
                                "lengths of a paged cache; got none");
  } else {
    if (!args.k || !args.v)
      c.fail_value(args.k ? "v" : "k", "is required (packed keys/values) when no paged cache is given");
    data_tensor(c, *args.k, "k");
    data_tensor(c, *args.v, "v");
    c.same_dtype(*args.k, "k", args.q, "q");
    c.ndim_is(*args.k, "k", 3, "(total_k, Hkv, D)");
    d.total_k = args.k->size(0);
    d.a.heads_kv = args.k->size(1);
    c.shape_is(*args.k, "k", {-1, -1, d.a.head_dim}, "(total_k, Hkv, D)");
    heads_compatible(c, "k", d.a.heads_q, d.a.heads_kv);
    c.same_dtype(*args.v, "v", args.q, "q");
    c.shape_is(*args.v, "v", {d.total_k, d.a.heads_kv, d.a.head_dim}, "(total_k, Hkv, D)");
    if (!args.cu_seqlens_k) c.fail_value("cu_seqlens_k", "is required with packed k/v");
    index_tensor(c, *args.cu_seqlens_k, "cu_seqlens_k", d.a.batch + 1, "(B + 1)");
  }
  if (args.seqused_k) index_tensor(c, *args.seqused_k, "seqused_k", d.a.batch, "(B)");
  data_tensor(c, args.out, "out");
  c.same_dtype(args.out, "out", args.q, "q");
  c.shape_is(args.out, "out", {d.total_q, d.a.heads_q, d.a.head_dim}, "(total_q, Hq, D)");
  // Any strides: FlashInfer's prefill wrapper hands over its (total_q, Hq) LSE transposed.
  lse_output(c, args.lse, {d.a.heads_q, d.total_q}, "(Hq, total_q)", /*any_strides=*/true);
  probs_output(c, args.probs, {d.a.batch, d.a.heads_q, d.a.seqlen_q, d.a.seqlen_k},
               "(B, Hq, max_seqlen_q, max_seqlen_k)");
  sinks_input(c, args.sinks, d.a.heads_q);
  validate_options(c, args.options, d.a.batch, d.a.heads_q, d.a.head_dim);
  validate_exec(c, args.exec);
  return d;
}

KVCacheDims validate(ArgChecker& c, const KVCacheArgs& args) {
  KVCacheDims d;
  data_tensor(c, args.q, "q");
  c.dtype_in(args.q, "q", kFloatTypes);
  c.ndim_is(args.q, "q", 4, "(B, Sq, Hq, D)");
  d.a.batch = args.q.size(0);
  d.a.seqlen_q = args.q.size(1);
  d.a.heads_q = args.q.size(2);
  d.a.head_dim = args.q.size(3);
  check::head_dim_supported(c, "q", d.a.head_dim);

  const bool paged = args.block_table || args.page_indptr || args.page_indices;
  data_tensor(c, args.k_cache, "k_cache");
  data_tensor(c, args.v_cache, "v_cache");
  c.same_dtype(args.k_cache, "k_cache", args.q, "q");
  c.same_dtype(args.v_cache, "v_cache", args.q, "q");
  if (paged) {
    PagedKV p;
    p.k_pages = args.k_cache;
    p.v_pages = args.v_cache;
    p.block_table = args.block_table;
    p.page_indptr = args.page_indptr;
    p.page_indices = args.page_indices;
    // Messages name the KV-cache call's own arguments (k_cache, block_table, ...).
    c.ndim_is(args.k_cache, "k_cache", 4, "(num_pages, page_size, Hkv, D)");
    // The table may hold more rows than the batch (as a contiguous cache may): rows past B are
    // unused without cache_batch_idx; the planner checks B rows are there.
    d.paged = validate_paged(c, p, d.a.batch, -1, d.a.head_dim, args.q.dtype, "", true);
  } else {
    c.ndim_is(args.k_cache, "k_cache", 4, "(B_cache, S_cache, Hkv, D)");
    d.cache_rows = args.k_cache.size(0);
    d.cache_len = args.k_cache.size(1);
    c.shape_is(args.k_cache, "k_cache", {-1, -1, -1, d.a.head_dim}, "(B_cache, S_cache, Hkv, D)");
    c.shape_is(args.v_cache, "v_cache",
               {d.cache_rows, d.cache_len, args.k_cache.size(2), d.a.head_dim},
               "(B_cache, S_cache, Hkv, D) like k_cache");
    if (!args.cache_batch_idx && d.cache_rows < d.a.batch)
      c.fail_value("k_cache", "must have at least B = " + std::to_string(d.a.batch) +
                                  " rows (dim 0) without cache_batch_idx, got " +
                                  std::to_string(d.cache_rows));
  }
  d.a.heads_kv = args.k_cache.size(2);
  heads_compatible(c, "k_cache", d.a.heads_q, d.a.heads_kv);

  if (args.k_new.has_value() != args.v_new.has_value())
    c.fail_value(args.k_new ? "v" : "k", "must be given together with " +
                                             std::string(args.k_new ? "k" : "v") +
                                             " (new keys and values are appended together)");
  if (args.k_new) {
    data_tensor(c, *args.k_new, "k");
    data_tensor(c, *args.v_new, "v");
    c.same_dtype(*args.k_new, "k", args.q, "q");
    c.same_dtype(*args.v_new, "v", args.q, "q");
    c.ndim_is(*args.k_new, "k", 4, "(B, Snew, Hkv, D)");
    d.seqlen_new = args.k_new->size(1);
    c.shape_is(*args.k_new, "k", {d.a.batch, -1, d.a.heads_kv, d.a.head_dim}, "(B, Snew, Hkv, D)");
    c.shape_is(*args.v_new, "v", {d.a.batch, d.seqlen_new, d.a.heads_kv, d.a.head_dim},
               "(B, Snew, Hkv, D)");
  }
  if (args.rotary_cos.has_value() != args.rotary_sin.has_value())
    c.fail_value(args.rotary_cos ? "rotary_sin" : "rotary_cos",
                 "must be given together with " +
                     std::string(args.rotary_cos ? "rotary_cos" : "rotary_sin"));
  if (args.rotary_cos) {
    if (!args.k_new)
      c.fail_value("rotary_cos", "needs new keys k/v to rotate (rotary applies to appended keys)");
    for (auto [t, n] : {std::pair{&*args.rotary_cos, "rotary_cos"}, {&*args.rotary_sin, "rotary_sin"}}) {
      data_tensor(c, *t, n);
      if (t->dtype != args.q.dtype && t->dtype != DType::kFloat32)
        c.fail_type(n, std::string("must have the dtype of q (") + dtype_name(args.q.dtype) +
                           ") or float32, got " + dtype_name(t->dtype));
      // (q is never float32 here when the message reads oddly: a float32 table always passes.)
      c.ndim_is(*t, n, 2, "(S_rotary, rotary_dim / 2)");
    }
    d.rotary_len = args.rotary_cos->size(0);
    d.rotary_dim = 2 * args.rotary_cos->size(1);
    if (d.rotary_dim < 2 || d.rotary_dim > d.a.head_dim)
      c.fail_value("rotary_cos", "rotary_dim = 2 * dim 1 must be in [2, head_dim = " +
                                     std::to_string(d.a.head_dim) + "], got " +
                                     std::to_string(d.rotary_dim));
    c.shape_is(*args.rotary_sin, "rotary_sin", {d.rotary_len, d.rotary_dim / 2},
               "(S_rotary, rotary_dim / 2) like rotary_cos");
  }
  if (args.cache_seqlens) index_tensor(c, *args.cache_seqlens, "cache_seqlens", d.a.batch, "(B)");
  else if (args.cache_seqlen < 0)
    c.fail_value("cache_seqlens", "must be >= 0, got " + std::to_string(args.cache_seqlen));
  if (args.cache_batch_idx) index_tensor(c, *args.cache_batch_idx, "cache_batch_idx", d.a.batch, "(B)");
  if (args.cache_leftpad) index_tensor(c, *args.cache_leftpad, "cache_leftpad", d.a.batch, "(B)");
  if (args.num_splits < 0)
    c.fail_value("num_splits", "must be >= 0 (0 = heuristic), got " + std::to_string(args.num_splits));
  if (args.num_splits > 1024)
    c.fail_value("num_splits", "must be <= 1024, got " + std::to_string(args.num_splits));
  if (args.max_cache_seqlen < 0)
    c.fail_value("max_cache_seqlen", "must be >= 0 (0 = no hint), got " + std::to_string(args.max_cache_seqlen));
  if (args.split_plan) {
    if (args.num_splits != 0)
      c.fail_value("num_splits", "must be 0 with a split_plan (the plan gives each sequence's count), got " +
                                     std::to_string(args.num_splits));
    d.split_items = split_plan_items(c, *args.split_plan, d.a.batch);
  }
  data_tensor(c, args.out, "out");
  c.same_dtype(args.out, "out", args.q, "q");
  c.shape_is(args.out, "out", {d.a.batch, d.a.seqlen_q, d.a.heads_q, d.a.head_dim}, "(B, Sq, Hq, D)");
  // Any strides: the decode wrapper hands a (B x Sq, Hq) LSE over as (B, Hq, Sq).
  lse_output(c, args.lse, {d.a.batch, d.a.heads_q, d.a.seqlen_q}, "(B, Hq, Sq)", /*any_strides=*/true);
  sinks_input(c, args.sinks, d.a.heads_q);
  if (args.workspace) validate_workspace(c, *args.workspace);
  validate_options(c, args.options, d.a.batch, d.a.heads_q, d.a.head_dim);
  validate_exec(c, args.exec);
  return d;
}

SharedPrefixDims validate(ArgChecker& c, const SharedPrefixAttentionArgs& args) {
  SharedPrefixDims d;
  d.total_q = packed_queries(c, args.q, d.a);
  if (args.qo_indptr) {
    index_tensor(c, *args.qo_indptr, "qo_indptr", -1, "(B + 1)");
    if (args.qo_indptr->size(0) < 1) c.fail_value("qo_indptr", "must have B + 1 >= 1 entries, got 0");
    d.a.batch = args.qo_indptr->size(0) - 1;
  } else {
    d.a.batch = d.total_q;  // decode: one query row per request
  }
  data_tensor(c, args.k_shared, "k_shared");
  data_tensor(c, args.v_shared, "v_shared");
  c.same_dtype(args.k_shared, "k_shared", args.q, "q");
  c.same_dtype(args.v_shared, "v_shared", args.q, "q");
  c.ndim_is(args.k_shared, "k_shared", 3, "(P, Hkv, D)");
  d.a.seqlen_k = args.k_shared.size(0);
  d.a.heads_kv = args.k_shared.size(1);
  c.shape_is(args.k_shared, "k_shared", {-1, -1, d.a.head_dim}, "(P, Hkv, D)");
  heads_compatible(c, "k_shared", d.a.heads_q, d.a.heads_kv);
  c.shape_is(args.v_shared, "v_shared", {d.a.seqlen_k, d.a.heads_kv, d.a.head_dim}, "(P, Hkv, D)");
  d.paged = validate_paged(c, args.suffix, d.a.batch, d.a.heads_kv, d.a.head_dim, args.q.dtype,
                           "suffix.", false);
  if (!args.suffix.last_page_len)
    c.fail_value("suffix.last_page_len", "is required: it gives each request's suffix length");
  data_tensor(c, args.out, "out");
  c.same_dtype(args.out, "out", args.q, "q");
  c.shape_is(args.out, "out", {d.total_q, d.a.heads_q, d.a.head_dim}, "(total_q, Hq, D)");
  lse_output(c, args.lse, {d.a.heads_q, d.total_q}, "(Hq, total_q)");
  if (args.workspace) validate_workspace(c, *args.workspace);
  if (args.max_seqlen_q < 0)
    c.fail_value("max_seqlen_q", "must be >= 0 (0 = unknown), got " + std::to_string(args.max_seqlen_q));
  if (args.max_suffix_len < 0)
    c.fail_value("max_suffix_len", "must be >= 0 (0 = unknown), got " + std::to_string(args.max_suffix_len));
  if (args.num_splits < 0 || args.num_splits > 1024)
    c.fail_value("num_splits", "must be in [0, 1024] (0 = heuristic), got " + std::to_string(args.num_splits));
  if (args.suffix_num_splits < 0 || args.suffix_num_splits > 1024)
    c.fail_value("suffix_num_splits",
                 "must be in [0, 1024] (0 = heuristic), got " + std::to_string(args.suffix_num_splits));
  validate_options(c, args.options, d.a.batch, d.a.heads_q, d.a.head_dim);
  validate_exec(c, args.exec);
  return d;
}

}  // namespace fastattn::core
