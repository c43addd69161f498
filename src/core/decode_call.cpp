// The calls of a batch decode wrapper's plan (include/fastattn/decode_call.h).
#include "fastattn/decode_call.h"

#include <initializer_list>
#include <string>
#include <utility>

#include "fastattn/error.h"

namespace fastattn {
namespace {

/// A shape written as Python writes a tuple: "(2, 8, 128)", "(5,)".
std::string tuple_string(std::initializer_list<std::int64_t> dims) {
  std::string s = "(";
  int i = 0;
  for (std::int64_t d : dims) s += (i++ ? ", " : "") + std::to_string(d);
  return s + (dims.size() == 1 ? ",)" : ")");
}

/// `t` with a dimension of size 1 inserted at `dim` (any stride serves a size-1 dimension).
TensorView with_unit_dim(TensorView t, int dim) {
  for (int i = t.ndim; i > dim; --i) {
    t.shape[std::size_t(i)] = t.shape[std::size_t(i - 1)];
    t.strides[std::size_t(i)] = t.strides[std::size_t(i - 1)];
  }
  t.shape[std::size_t(dim)] = 1;
  t.strides[std::size_t(dim)] = 1;
  ++t.ndim;
  return t;
}

/// `t` (R x n, ...) viewed as (R, n, ...): dimension 0 split into rows of n (any strides).
TensorView split_first_dim(TensorView t, std::int64_t n) {
  t = with_unit_dim(t, 1);
  t.shape[0] /= n;
  t.shape[1] = n;
  t.strides[1] = t.strides[0];
  t.strides[0] *= n;
  return t;
}

/// Entry `index` of dimension `dim` of `t`, that dimension removed (torch's t.select(dim, index)).
TensorView select(TensorView t, int dim, std::int64_t index) {
  t.data = static_cast<char*>(t.data) + index * t.strides[std::size_t(dim)] * std::int64_t(dtype_size(t.dtype));
  for (int i = dim; i + 1 < t.ndim; ++i) {
    t.shape[std::size_t(i)] = t.shape[std::size_t(i + 1)];
    t.strides[std::size_t(i)] = t.strides[std::size_t(i + 1)];
  }
  --t.ndim;
  return t;
}

void check_dtype(const PagedDecodeCallPlan& plan, const TensorView& t, const char* what) {
  if (plan.data_type != dtype_name(t.dtype))
    throw TypeError(std::string(what) + " has dtype " + dtype_name(t.dtype) + " but plan() was given " +
                    plan.data_type);
}

/// `t` with dimensions `a` and `b` swapped (torch's t.transpose(a, b)).
TensorView swap_dims(TensorView t, int a, int b) {
  std::swap(t.shape[std::size_t(a)], t.shape[std::size_t(b)]);
  std::swap(t.strides[std::size_t(a)], t.strides[std::size_t(b)]);
  return t;
}

/// A page's dims in `layout`, as the errors name them.
const char* page_dims(PagedKVLayout layout) {
  return layout == PagedKVLayout::kHND ? "num_kv_heads, page_size" : "page_size, num_kv_heads";
}

/// Checks a page tensor `t` in the plan's layout; returns it as (P, page_size, Hkv, D).
TensorView checked_pages(const PagedDecodeCallPlan& plan, const TensorView& t, const char* name) {
  const bool hnd = plan.layout == PagedKVLayout::kHND;
  const std::int64_t rows = hnd ? plan.num_kv_heads : plan.page_size, cols = hnd ? plan.page_size : plan.num_kv_heads;
  if (t.ndim != 4 || t.shape[1] != rows || t.shape[2] != cols || t.shape[3] != plan.head_dim)
    throw ValueError(std::string("paged_kv_cache's ") + name + " pages must have shape (max_num_pages, " +
                     page_dims(plan.layout) + ", head_dim) = (*, " +
                     std::to_string(rows) + ", " + std::to_string(cols) + ", " + std::to_string(plan.head_dim) +
                     ") as planned (" + paged_kv_layout_name(plan.layout) + "), got " + t.shape_string());
  if (plan.max_page_id && t.shape[0] <= *plan.max_page_id)
    throw ValueError("plan() was given page id " + std::to_string(*plan.max_page_id) +
                     ", but paged_kv_cache holds " + std::to_string(t.shape[0]) + " pages");
  check_dtype(plan, t, "paged_kv_cache");
  return hnd ? swap_dims(t, 1, 2) : t;
}

}  // namespace

PagedKVLayout paged_kv_layout_from_name(const std::string& layout, const char* name) {
  if (layout == "NHD") return PagedKVLayout::kNHD;
  if (layout == "HND") return PagedKVLayout::kHND;
  throw ValueError(std::string(name) + " must be 'NHD' or 'HND', got '" + layout + "'");
}

const char* paged_kv_layout_name(PagedKVLayout layout) { return layout == PagedKVLayout::kHND ? "HND" : "NHD"; }

std::pair<TensorView, TensorView> split_paged_kv_cache(const TensorView& cache, PagedKVLayout layout,
                                                       const char* name) {
  if (cache.ndim != 5 || cache.shape[1] != 2)
    throw ValueError(std::string(name) + " must have shape (max_num_pages, 2, " + page_dims(layout) + ", head_dim) (" +
                     paged_kv_layout_name(layout) + "), got " + cache.shape_string());
  return {select(cache, 1, 0), select(cache, 1, 1)};
}

KVCacheArgs paged_decode_call_args(const PagedDecodeCallPlan& plan, const TensorView& q, const TensorView& k_pages,
                                   const TensorView& v_pages, const TensorView& out,
                                   const std::optional<TensorView>& lse) {
  if (plan.q_len < 1) throw ValueError("q_len_per_req must be >= 1, got " + std::to_string(plan.q_len));
  const std::int64_t rows = plan.batch * plan.q_len;
  const std::initializer_list<std::int64_t> want = {rows, plan.num_qo_heads, plan.head_dim};
  const std::string rows_name = plan.q_len > 1 ? "batch_size * q_len_per_req" : "batch_size";
  if (q.ndim != 3 || q.shape[0] != rows || q.shape[1] != plan.num_qo_heads || q.shape[2] != plan.head_dim)
    throw ValueError("q must have shape (" + rows_name + ", num_qo_heads, head_dim) = " + tuple_string(want) +
                     " as planned" + (plan.q_len > 1 ? " (q_len_per_req = " + std::to_string(plan.q_len) + ")" : "") +
                     ", got " + q.shape_string());
  check_dtype(plan, q, "q");
  const TensorView k = checked_pages(plan, k_pages, "k");
  const TensorView v = checked_pages(plan, v_pages, "v");
  if ((q.device.type == DeviceType::kCUDA) != plan.on_gpu)
    throw ValueError(std::string("q must be on the device of the workspace buffer plan() used (") +
                     (plan.on_gpu ? "a CUDA device" : "the host") + "), got q on " +
                     (plan.on_gpu ? "the host" : "a CUDA device"));
  if (out.ndim != 3 || out.shape[0] != rows || out.shape[1] != plan.num_qo_heads || out.shape[2] != plan.head_dim)
    throw ValueError("out must have shape " + tuple_string(want) + ", got " + out.shape_string());
  KVCacheArgs a;
  if (lse) {
    if (lse->ndim != 2 || lse->shape[0] != rows || lse->shape[1] != plan.num_qo_heads)
      throw ValueError("lse must have shape " + tuple_string({rows, plan.num_qo_heads}) + ", got " +
                       lse->shape_string());
    a.lse = swap_dims(split_first_dim(*lse, plan.q_len), 1, 2);  // (B, Hq, N)
  }
  a.q = split_first_dim(q, plan.q_len);  // (B, N, Hq, D)
  a.out = split_first_dim(out, plan.q_len);
  a.k_cache = k;
  a.v_cache = v;
  a.cache_seqlens = plan.seqlens;
  a.block_table = plan.block_table;
  a.page_indptr = plan.page_indptr;
  a.page_indices = plan.page_indices;
  a.split_plan = plan.split_plan;
  a.num_splits = plan.num_splits;
  return a;
}

void check_decode_sinks(const PagedDecodeCallPlan& plan, const TensorView& q, const TensorView& sinks) {
  if (sinks.ndim != 1 || sinks.shape[0] != plan.num_qo_heads)
    throw ValueError("sinks must have shape (num_qo_heads,) = " + tuple_string({plan.num_qo_heads}) +
                     " as planned, got " + sinks.shape_string());
  if (sinks.dtype != DType::kFloat32)
    throw TypeError(std::string("sinks must be float32, got ") + dtype_name(sinks.dtype));
  if (sinks.device != q.device)
    throw ValueError("sinks must be on q's device (" + device_name(q.device) + "), got " +
                     device_name(sinks.device));
}

}  // namespace fastattn
