// Array conversion for the binding (fastattn._C): array objects that nanobind imports through
// DLPack or the buffer protocol (numpy, torch, cupy, jax) become fastattn::TensorView, with errors
// that name the argument. Shared by binding.cpp and decode_runner.cpp.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fastattn/fastattn.h"

namespace fastattn_binding {

namespace nb = nanobind;
using fastattn::TensorView;

using ArrayRO = nb::ndarray<nb::ro>;
using ArrayRW = nb::ndarray<>;

/// Keeps every imported array (and so the memory behind each view) alive for one call.
struct Keep {
  std::vector<ArrayRO> ro;
  std::vector<ArrayRW> rw;
};

/// "numpy.ndarray", "list", ...: the type of `h` for error messages.
inline std::string object_type_name(nb::handle h) { return nb::cast<std::string>(nb::inst_name(h)); }

inline std::string dlpack_dtype_name(nb::dlpack::dtype dt) {
  const char* kind = "unknown";
  switch (static_cast<nb::dlpack::dtype_code>(dt.code)) {
    case nb::dlpack::dtype_code::Int: kind = "int"; break;
    case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
    case nb::dlpack::dtype_code::Float: kind = "float"; break;
    case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
    case nb::dlpack::dtype_code::Complex: kind = "complex"; break;
    case nb::dlpack::dtype_code::Bool: kind = "bool"; break;
    default: break;
  }
  std::string s = std::string(kind) + std::to_string(dt.bits);
  if (dt.lanes != 1) s += "x" + std::to_string(dt.lanes);
  return s;
}

inline fastattn::DType convert_dtype(nb::dlpack::dtype dt, const char* name) {
  using C = nb::dlpack::dtype_code;
  if (dt.lanes == 1) {
    switch (static_cast<C>(dt.code)) {
      case C::Float:
        if (dt.bits == 32) return fastattn::DType::kFloat32;
        if (dt.bits == 16) return fastattn::DType::kFloat16;
        break;
      case C::Bfloat:
        if (dt.bits == 16) return fastattn::DType::kBFloat16;
        break;
      case C::Int:
        if (dt.bits == 32) return fastattn::DType::kInt32;
        if (dt.bits == 64) return fastattn::DType::kInt64;
        break;
      case C::UInt:
        if (dt.bits == 8) return fastattn::DType::kUInt8;
        break;
      case C::Bool:
        if (dt.bits == 8) return fastattn::DType::kBool;
        break;
      default: break;
    }
  }
  throw fastattn::TypeError(std::string("argument '") + name + "': dtype " + dlpack_dtype_name(dt) +
                            " is not supported by fastattn (float32, float16, bfloat16, int32, "
                            "int64, uint8 or bool)");
}

inline fastattn::Device convert_device(int type, int id, const char* name) {
  if (type == nb::device::cpu::value || type == nb::device::cuda_host::value)
    return fastattn::Device{fastattn::DeviceType::kCPU, 0};
  if (type == nb::device::cuda::value || type == nb::device::cuda_managed::value)
    return fastattn::Device{fastattn::DeviceType::kCUDA, id};
  throw fastattn::DeviceError(std::string("argument '") + name + "': arrays on DLPack device type " +
                              std::to_string(type) + " are not supported (cpu or cuda expected)");
}

template <typename Array>
inline TensorView make_tensor_view(const Array& a, const char* name) {
  TensorView t;
  const std::size_t ndim = a.ndim();
  if (ndim > static_cast<std::size_t>(TensorView::kMaxDims))
    throw fastattn::ValueError(std::string("argument '") + name + "': expected at most " +
                               std::to_string(TensorView::kMaxDims) + " dimensions, got " +
                               std::to_string(ndim));
  t.data = static_cast<void*>(static_cast<std::uint8_t*>(const_cast<void*>(
                                  static_cast<const void*>(a.data_handle()))) +
                              a.byte_offset());
  t.dtype = convert_dtype(a.dtype(), name);
  t.device = convert_device(a.device_type(), a.device_id(), name);
  t.ndim = static_cast<int>(ndim);
  // Row-major strides replace the producer's when it gives none (DLPack allows that) and for
  // empty arrays, which address no memory and whose strides numpy reports as all zeros.
  bool empty = false;
  for (std::size_t i = 0; i < ndim; ++i) empty = empty || a.shape(i) == 0;
  const std::int64_t* strides = empty ? nullptr : a.stride_ptr();
  std::int64_t running = 1;
  for (std::size_t i = ndim; i-- > 0;) {
    t.shape[i] = static_cast<std::int64_t>(a.shape(i));
    t.strides[i] = strides ? strides[i] : running;
    running *= t.shape[i];
  }
  return t;
}

/// A required input array (read-only access is enough).
inline TensorView in_view(nb::handle h, const char* name, Keep& keep) {
  if (h.is_none())
    throw fastattn::ValueError(std::string("argument '") + name + "' is required, got None");
  ArrayRO a;
  if (!nb::try_cast(h, a, /*convert=*/false))
    throw fastattn::TypeError(std::string("argument '") + name +
                              "': expected an array (numpy, torch, cupy or jax: DLPack or the "
                              "buffer protocol), got " + object_type_name(h));
  keep.ro.push_back(a);
  return make_tensor_view(a, name);
}

/// A required output array: must be writable.
inline TensorView out_view(nb::handle h, const char* name, Keep& keep) {
  if (h.is_none())
    throw fastattn::ValueError(std::string("argument '") + name + "' is required, got None");
  ArrayRW a;
  if (!nb::try_cast(h, a, /*convert=*/false)) {
    ArrayRO probe;
    if (nb::try_cast(h, probe, /*convert=*/false))
      throw fastattn::ValueError(std::string("argument '") + name +
                                 "': the array is read-only, but fastattn writes into it");
    throw fastattn::TypeError(std::string("argument '") + name +
                              "': expected a writable array (numpy, torch or cupy), got " +
                              object_type_name(h));
  }
  keep.rw.push_back(a);
  return make_tensor_view(a, name);
}

inline std::optional<TensorView> opt_in(nb::handle h, const char* name, Keep& keep) {
  if (h.is_none()) return std::nullopt;
  return in_view(h, name, keep);
}

inline std::optional<TensorView> opt_out(nb::handle h, const char* name, Keep& keep) {
  if (h.is_none()) return std::nullopt;
  return out_view(h, name, keep);
}

inline fastattn::ExecConfig make_exec(std::uintptr_t cuda_stream, int num_threads) {
  fastattn::ExecConfig e;
  e.cuda_stream = reinterpret_cast<void*>(cuda_stream);
  e.num_threads = num_threads;
  return e;
}

}  // namespace fastattn_binding
