// fastattn._C.single_decode_forward: FlashInfer's single-request decode
// (python/fastattn/single_decode.py) in one call: the argument checks with FlashInfer's names, the
// outputs, the stream, the 4-D views and one fastattn::kvcache_attention_forward over the whole of
// k / v. A single request's decode runs 10-40 us on an H200, so host time is most of a call's cost;
// in Python the views alone cost 7.4 us and the checks, allocations and stream query about 10 more
// (bench/NOTES.md, session 96).

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "arrays.h"
#include "framework_outputs.h"
#include "fastattn/fastattn.h"

namespace fastattn_binding {
namespace {

/// The checks single_decode_with_kv_cache makes, each error naming the argument as FlashInfer does:
/// q (Hq, D); k and v (L, Hkv, D) for NHD or (Hkv, L, D) for HND, q's dtype and device, stride 1 in
/// their last dimension, k's shape, k's head_dim q's, Hq a multiple of Hkv. The op checks the rest
/// (q's strides and dtype, head_dim's range), whose errors name q as these do; its own checks of k
/// and v would name them k_cache and v_cache.
void check_single_decode(const TensorView& q, const TensorView& k, const TensorView& v, bool hnd) {
  if (q.ndim != 2)
    throw fastattn::ValueError("q must be (num_qo_heads, head_dim), got shape " + q.shape_string());
  const std::string layout = hnd ? "(num_kv_heads, kv_len, head_dim) for kv_layout 'HND'"
                                 : "(kv_len, num_kv_heads, head_dim) for kv_layout 'NHD'";
  for (const auto& [name, t] : {std::pair<const char*, const TensorView&>{"k", k}, {"v", v}}) {
    if (t.ndim != 3) throw fastattn::ValueError(std::string(name) + " must be " + layout + ", got shape " + t.shape_string());
    if (t.dtype != q.dtype)
      throw fastattn::TypeError(std::string(name) + " must have q's dtype (" + fastattn::dtype_name(q.dtype) +
                                "), got " + fastattn::dtype_name(t.dtype));
    if (t.device != q.device)
      throw fastattn::DeviceError(std::string(name) + " must be on q's device (" + fastattn::device_name(q.device) +
                                  "), got " + fastattn::device_name(t.device));
    if (t.numel() > 0 && t.shape[2] > 1 && t.strides[2] != 1)
      throw fastattn::ValueError(std::string(name) + " must be contiguous in its last dimension (stride 1), got stride " +
                                 std::to_string(t.strides[2]));
  }
  for (int i = 0; i < 3; ++i)
    if (v.shape[i] != k.shape[i])
      throw fastattn::ValueError("v must have k's shape " + k.shape_string() + ", got " + v.shape_string());
  if (k.shape[2] != q.shape[1])
    throw fastattn::ValueError("k's head_dim (last dimension) must be q's (" + std::to_string(q.shape[1]) + "), got " +
                               std::to_string(k.shape[2]));
  const std::int64_t heads_kv = hnd ? k.shape[0] : k.shape[1];
  if (heads_kv < 1 || q.shape[0] % heads_kv != 0)
    throw fastattn::ValueError("num_qo_heads (" + std::to_string(q.shape[0]) +
                               ") must be a multiple of num_kv_heads, got num_kv_heads " + std::to_string(heads_kv) +
                               " (k's shape " + k.shape_string() + ", kv_layout '" + (hnd ? "HND" : "NHD") + "')");
}

/// `t` with `lead` size-1 axes put in front, as t[None, ...] would: the same memory.
TensorView with_leading_ones(TensorView t, int lead) {
  for (int i = t.ndim - 1; i >= 0; --i) {
    t.shape[i + lead] = t.shape[i];
    t.strides[i + lead] = t.strides[i];
  }
  for (int i = lead - 1; i >= 0; --i) {
    t.shape[i] = 1;
    t.strides[i] = t.shape[i + 1] * t.strides[i + 1];
  }
  t.ndim += lead;
  return t;
}

/// q (Hq, D); k, v (L, Hkv, D), or (Hkv, L, D) when `hnd`; out (Hq, D) and lse (Hq) float32, or None
/// to have q's framework allocate them through its exchange table (lse only with return_lse).
/// The scores are (q . k) * (sm_scale, None: 1 / sqrt(D)) * scale_factor, computed in double as
/// FlashInfer folds its calibration scales. stream_from_q: the stream from q's exchange table
/// instead of cuda_stream. Returns out, or (out, lse) with return_lse.
nb::object single_decode_forward(nb::handle q, nb::handle k, nb::handle v, nb::handle out, nb::handle lse, bool hnd,
                                 bool return_lse, std::optional<double> sm_scale, double scale_factor,
                                 std::int64_t window_left, float softcap, std::uintptr_t cuda_stream,
                                 bool stream_from_q, int num_threads, nb::handle workspace_alloc,
                                 bool workspace_from_q) {
  Keep keep;
  const TensorView q_view = in_view(q, "q", keep);
  const TensorView k_view = in_view(k, "k", keep);
  const TensorView v_view = in_view(v, "v", keep);
  check_single_decode(q_view, k_view, v_view, hnd);
  const std::int64_t heads_q = q_view.shape[0], head_dim = q_view.shape[1];
  const double scale = (sm_scale ? *sm_scale : 1.0 / std::sqrt(double(head_dim))) * scale_factor;
  if (!std::isfinite(scale))
    throw fastattn::ValueError("sm_scale * q_scale * k_scale must be finite, got " + std::to_string(scale));

  fastattn::KVCacheArgs a;
  a.q = with_leading_ones(q_view, 2);  // (1, 1, Hq, D)
  a.k_cache = with_leading_ones(k_view, 1);
  a.v_cache = with_leading_ones(v_view, 1);
  if (hnd)  // (1, Hkv, L, D) -> (1, L, Hkv, D)
    for (TensorView* t : {&a.k_cache, &a.v_cache}) {
      std::swap(t->shape[1], t->shape[2]);
      std::swap(t->strides[1], t->strides[2]);
    }
  a.cache_seqlen = a.k_cache.shape[1];  // every key

  const std::int64_t out_shape[2] = {heads_q, head_dim};  // and lse (Hq)
  auto [out_array, out_view_2d] = given_or_allocated(out, "out", q, q_view, out_shape, 2, q_view.dtype, keep);
  if (out_view_2d.ndim != 2)
    throw fastattn::ValueError("argument 'out' must be (num_qo_heads, head_dim), got shape " + out_view_2d.shape_string());
  a.out = with_leading_ones(out_view_2d, 2);
  nb::object lse_array = nb::borrow(lse);
  if (return_lse) {
    TensorView lse_view_1d;
    std::tie(lse_array, lse_view_1d) =
        given_or_allocated(lse, "lse", q, q_view, out_shape, 1, fastattn::DType::kFloat32, keep);
    if (lse_view_1d.ndim != 1)
      throw fastattn::ValueError("argument 'lse' must be (num_qo_heads,), got shape " + lse_view_1d.shape_string());
    TensorView l = with_leading_ones(lse_view_1d, 1);  // (Hq) -> (1, Hq, 1)
    l.shape[2] = 1;
    l.strides[2] = 1;
    l.ndim = 3;
    a.lse = l;
  }
  a.options.softmax_scale = static_cast<float>(scale);
  a.options.window_left = window_left;
  a.options.softcap = softcap;
  a.exec.cuda_stream = reinterpret_cast<void*>(stream_from_q ? current_stream_of(q, q_view) : cuda_stream);
  a.exec.num_threads = num_threads;
  OpWorkspace scratch{q, &a.q, workspace_from_q, workspace_alloc, &keep};
  a.workspace_allocator = scratch.allocator();
  {
    nb::gil_scoped_release release;
    fastattn::kvcache_attention_forward(a);
  }
  if (return_lse) return nb::make_tuple(out_array, lse_array);
  return out_array;
}

}  // namespace

void bind_single_decode(nb::module_& m) {
  m.def("single_decode_forward", &single_decode_forward, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("out").none() = nb::none(), nb::arg("lse").none() = nb::none(), nb::arg("hnd") = false,
        nb::arg("return_lse") = false, nb::arg("sm_scale").none() = nb::none(), nb::arg("scale_factor") = 1.0,
        nb::arg("window_left") = -1, nb::arg("softcap") = 0.0f, nb::arg("cuda_stream") = 0,
        nb::arg("stream_from_q") = false, nb::arg("num_threads") = 0,
        nb::arg("workspace_alloc").none() = nb::none(), nb::arg("workspace_from_q") = false,
        "FlashInfer's single-request decode: one fastattn::kvcache_attention_forward over views.");
}

}  // namespace fastattn_binding
