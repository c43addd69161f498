// What the binding asks of q's framework through its DLPack C exchange table (torch from 2.10),
// so that a call needs no Python around it: its outputs, allocated like q and handed back as that
// framework's arrays, and its current stream. Used by the calls whose host time is most of their
// cost: the single decode, flash_attn_with_kvcache, flash_attn_varlen_func, flash_attn_func, the
// decode wrapper's run() and the merge ops (bench/NOTES.md, sessions 96-98).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "arrays.h"
#include "fastattn/fastattn.h"

namespace fastattn_binding {

/// DLPack's code for an output dtype (float32, float16, bfloat16).
inline nb::dlpack::dtype dlpack_dtype(fastattn::DType d) {
  switch (d) {
    case fastattn::DType::kFloat16: return {std::uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
    case fastattn::DType::kBFloat16: return {std::uint8_t(nb::dlpack::dtype_code::Bfloat), 16, 1};
    default: return nb::dtype<float>();
  }
}

/// A contiguous output of `shape` (`ndim` dims) and `dtype` on q's device, allocated by q's
/// framework through its exchange table (allocate_like: for torch, torch.empty's allocator on the
/// current stream) and handed back as that framework's array: (the array, its view). Errors name
/// `name`: no table, no allocator, a failed allocation or wrap.
inline std::pair<nb::object, TensorView> allocate_output(nb::handle q, const TensorView& q_view,
                                                         const std::int64_t* shape, int ndim,
                                                         fastattn::DType dtype, const char* name) {
  const dlpack_c::ExchangeApi* api = dlpack_c::exchange_api_of(Py_TYPE(q.ptr()));
  if (!api || !api->managed_tensor_to_py_object_no_sync)
    throw fastattn::ValueError(std::string("argument '") + name + "' is required: " + object_type_name(q) +
                               " has no DLPack exchange table to allocate it through");
  dlpack_c::ManagedTensor* m = allocate_like(q, q_view, shape, ndim, dlpack_dtype(dtype), name, "output");
  if (!m)
    throw fastattn::ValueError(std::string("argument '") + name + "' is required: " + object_type_name(q) +
                               "'s exchange table has no allocator");
  if (const std::uint32_t major = m->version.major; major != 1) {  // a layout this binding does not
    m->deleter(m);                                                  // know: only the deleter is safe
    throw fastattn::ValueError(std::string("argument '") + name + "': " + object_type_name(q) +
                               " allocated a DLPack " + std::to_string(major) + ".x tensor");
  }
  const TensorView view = make_tensor_view(m->dl_tensor, name);
  void* array = nullptr;
  // On success the array owns m. On failure m is not released here: whether the producer already
  // did is not specified, and a leak is safer than a double free.
  if (api->managed_tensor_to_py_object_no_sync(m, &array) != 0 || !array)
    throw fastattn::ValueError(std::string("argument '") + name + "': " + object_type_name(q) +
                               " could not wrap its output: " + take_producer_error());
  return {nb::steal(static_cast<PyObject*>(array)), view};
}

/// An output of a call: the caller's array where one is given (imported writable as `name`, and
/// handed back as it is), else, for None, one of `shape` (`ndim` dims) and `dtype` allocated through
/// `like`'s exchange table (allocate_output). Returns (the array handed back, its view).
inline std::pair<nb::object, TensorView> given_or_allocated(nb::handle given, const char* name, nb::handle like,
                                                            const TensorView& like_view, const std::int64_t* shape,
                                                            int ndim, fastattn::DType dtype, Keep& keep) {
  if (given.is_none()) return allocate_output(like, like_view, shape, ndim, dtype, name);
  return {nb::borrow(given), out_view(given, name, keep)};
}

/// The outputs of an attention op (dense, varlen, kvcache) that q's framework allocates, made once
/// every array is imported so that a bad input fails before anything is allocated: out where `out`
/// is None (q's shape and dtype, into `out_view`), and with `return_lse` the LSE where `lse` is None
/// (`lse_shape`, `lse_ndim` dims, float32, into `lse_view`). Given outputs are left to the op's
/// import. Returns what the op's binding hands back: out, or (out, lse) with `return_lse`.
inline nb::object allocate_attention_outputs(nb::handle q, const TensorView& q_view, nb::handle out, nb::handle lse,
                                             bool return_lse, const std::int64_t* lse_shape, int lse_ndim,
                                             TensorView& out_view, std::optional<TensorView>& lse_view) {
  nb::object out_array = nb::borrow(out), lse_array = nb::borrow(lse);
  if (out.is_none())
    std::tie(out_array, out_view) = allocate_output(q, q_view, q_view.shape.data(), q_view.ndim, q_view.dtype, "out");
  if (!return_lse) return out_array;
  if (lse.is_none()) {
    TensorView view;
    std::tie(lse_array, view) = allocate_output(q, q_view, lse_shape, lse_ndim, fastattn::DType::kFloat32, "softmax_lse");
    lse_view = view;
  }
  return nb::make_tuple(out_array, lse_array);
}

/// The LSE shape (B, Hq, Sq) of a batched q (B, Sq, Hq, D); zeros for a q of another rank, which
/// gets the op's error.
inline std::array<std::int64_t, 3> batched_lse_shape(const TensorView& q) {
  if (q.ndim != 4) return {0, 0, 0};
  return {q.shape[0], q.shape[2], q.shape[1]};
}

/// q's framework's current stream on q's device, through its exchange table (torch's current
/// stream: what torch.cuda.current_stream() would give, without Python); 0 on the CPU.
inline std::uintptr_t current_stream_of(nb::handle q, const TensorView& q_view) {
  if (q_view.device.type != fastattn::DeviceType::kCUDA) return 0;
  const dlpack_c::ExchangeApi* api = dlpack_c::exchange_api_of(Py_TYPE(q.ptr()));
  if (!api || !api->current_work_stream)
    throw fastattn::ValueError("argument 'cuda_stream' is required: " + object_type_name(q) +
                               " has no DLPack exchange table to ask for its current stream");
  void* stream = nullptr;
  if (api->current_work_stream(nb::device::cuda::value, q_view.device.index, &stream) != 0)
    throw fastattn::ValueError("argument 'cuda_stream': " + object_type_name(q) +
                               " could not give its current stream: " + take_producer_error());
  return reinterpret_cast<std::uintptr_t>(stream);
}

}  // namespace fastattn_binding
