// Array conversion for the binding (fastattn._C): array objects become fastattn::TensorView, with
// errors that name the argument. Arrays whose type publishes DLPack's C exchange table (torch from
// 2.10) are described through it (dlpack_exchange.h); the rest nanobind imports through DLPack or
// the buffer protocol (numpy, cupy, jax, older torch). Shared by binding.cpp and decode_runner.cpp.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dlpack_exchange.h"
#include "fastattn/fastattn.h"

namespace fastattn_binding {

namespace nb = nanobind;
using fastattn::TensorView;

using ArrayRO = nb::ndarray<nb::ro>;
using ArrayRW = nb::ndarray<>;

/// Calls a producer's deleter on a tensor it exported through its exchange table.
struct ManagedTensorDeleter {
  void operator()(dlpack_c::ManagedTensor* m) const {
    if (m && m->deleter) m->deleter(m);
  }
};

/// Keeps every imported array (and so the memory behind each view) alive for one call: nanobind's
/// imports, the arrays described through an exchange table without a copy (referenced), and the
/// tensors such a table exported (released by their deleters).
struct Keep {
  std::vector<ArrayRO> ro;
  std::vector<ArrayRW> rw;
  std::vector<nb::object> objects;
  std::vector<std::shared_ptr<dlpack_c::ManagedTensor>> managed;  // shared: a Keep may be copied
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

/// The view of an array described by DLPack fields; `name` is the argument in errors. Row-major
/// strides replace the producer's when it gives none (DLPack allowed that before 1.2) and for
/// empty arrays, which address no memory and whose strides numpy reports as all zeros.
inline TensorView view_of_fields(const void* data, std::uint64_t byte_offset, nb::dlpack::dtype dtype,
                                 int device_type, int device_id, std::int64_t ndim,
                                 const std::int64_t* shape, const std::int64_t* strides, const char* name) {
  TensorView t;
  if (ndim > TensorView::kMaxDims)
    throw fastattn::ValueError(std::string("argument '") + name + "': expected at most " +
                               std::to_string(TensorView::kMaxDims) + " dimensions, got " +
                               std::to_string(ndim));
  t.data = static_cast<void*>(static_cast<std::uint8_t*>(const_cast<void*>(data)) + byte_offset);
  t.dtype = convert_dtype(dtype, name);
  t.device = convert_device(device_type, device_id, name);
  t.ndim = static_cast<int>(ndim);
  bool empty = false;
  for (std::int64_t i = 0; i < ndim; ++i) empty = empty || shape[i] == 0;
  if (empty) strides = nullptr;
  std::int64_t running = 1;
  for (std::int64_t i = ndim; i-- > 0;) {
    t.shape[i] = shape[i];
    t.strides[i] = strides ? strides[i] : running;
    running *= t.shape[i];
  }
  return t;
}

template <typename Array>
inline TensorView make_tensor_view(const Array& a, const char* name) {
  return view_of_fields(a.data_handle(), a.byte_offset(), a.dtype(), a.device_type(), a.device_id(),
                        static_cast<std::int64_t>(a.ndim()), a.shape_ptr(), a.stride_ptr(), name);
}

inline TensorView make_tensor_view(const dlpack_c::Tensor& t, const char* name) {
  return view_of_fields(t.data, t.byte_offset, t.dtype, t.device.device_type, t.device.device_id, t.ndim,
                        t.shape, t.strides, name);
}

/// The message of the Python exception a producer's C function set (taken), or "no reason given"
/// where it set none.
inline std::string take_producer_error() {
  if (!PyErr_Occurred()) return "no reason given";
  nb::python_error err;
  return nb::str(err.value()).c_str();
}

/// TypeError naming the argument for an array whose producer could not describe it.
[[noreturn]] inline void throw_export_error(nb::handle h, const char* name) {
  throw fastattn::TypeError(std::string("argument '") + name + "': " + object_type_name(h) +
                            " could not be described through DLPack: " + take_producer_error());
}

/// Keeps a tensor a producer exported (its deleter runs when the last Keep goes); false, with the
/// tensor released at once, for a DLPack major version whose layout this binding does not know
/// (only its deleter is safe to use).
inline bool keep_managed(dlpack_c::ManagedTensor* m, Keep& keep) {
  keep.managed.emplace_back(m, ManagedTensorDeleter{});
  if (m->version.major == 1) return true;
  keep.managed.pop_back();
  return false;
}

/// ValueError for a torch tensor that is a lazy negation view (torch._neg_view, the imaginary part
/// of a conjugate view): DLPack would carry its values without the sign (dlpack_exchange.h).
inline void refuse_negation_view(nb::handle h, const char* name) {
  if (!dlpack_c::has_negation_bit(Py_TYPE(h.ptr()))) return;
  static PyObject* const is_neg = PyUnicode_InternFromString("is_neg");  // lives with the module
  nb::object negated = nb::steal(PyObject_CallMethodNoArgs(h.ptr(), is_neg));
  if (!negated.is_valid()) throw nb::python_error();
  if (PyObject_IsTrue(negated.ptr()) == 1)
    throw fastattn::ValueError(std::string("argument '") + name +
                               "': the tensor is a lazy negation view (is_neg() is True), which "
                               "DLPack cannot describe; pass it through .resolve_neg()");
}

/// The view of `h` through its type's DLPack C exchange table (dlpack_exchange.h), or nullopt when
/// its type has none. Inputs take the non-owning export and keep `h` referenced; outputs take the
/// owning one, whose flags say whether the array may be written.
inline std::optional<TensorView> exchange_view(nb::handle h, const char* name, bool writable, Keep& keep) {
  const dlpack_c::ExchangeApi* api = dlpack_c::exchange_api_of(Py_TYPE(h.ptr()));
  if (!api) return std::nullopt;
  if (!writable && api->dltensor_from_py_object_no_sync) {
    dlpack_c::Tensor t;
    if (api->dltensor_from_py_object_no_sync(h.ptr(), &t) != 0) throw_export_error(h, name);
    keep.objects.push_back(nb::borrow(h));
    return make_tensor_view(t, name);
  }
  if (!api->managed_tensor_from_py_object_no_sync) return std::nullopt;
  dlpack_c::ManagedTensor* m = nullptr;
  if (api->managed_tensor_from_py_object_no_sync(h.ptr(), &m) != 0 || !m) throw_export_error(h, name);
  if (!keep_managed(m, keep)) return std::nullopt;
  if (writable && (m->flags & dlpack_c::kFlagReadOnly))
    throw fastattn::ValueError(std::string("argument '") + name +
                               "': the array is read-only, but fastattn writes into it");
  return make_tensor_view(m->dl_tensor, name);
}

/// A required input array (read-only access is enough).
inline TensorView in_view(nb::handle h, const char* name, Keep& keep) {
  if (h.is_none())
    throw fastattn::ValueError(std::string("argument '") + name + "' is required, got None");
  refuse_negation_view(h, name);
  if (std::optional<TensorView> view = exchange_view(h, name, /*writable=*/false, keep)) return *view;
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
  refuse_negation_view(h, name);
  if (std::optional<TensorView> view = exchange_view(h, name, /*writable=*/true, keep)) return *view;
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

/// Sets the Python exception for a producer's allocator that failed (DLPack's SetError).
inline void set_allocator_error(void*, const char* kind, const char* message) {
  PyErr_SetString(std::strcmp(kind, "MemoryError") == 0 ? PyExc_MemoryError : PyExc_RuntimeError, message);
}

/// A new contiguous array of `shape` (`ndim` dims) and `dtype` on q's device, allocated by q's
/// framework through its type's DLPack exchange table (for torch, the allocator torch.empty uses,
/// on the current stream); null when q's type has no table with an allocator. A failed allocation
/// is a ValueError naming `name`, with `what` it was for. The caller owns the result (its deleter).
inline dlpack_c::ManagedTensor* allocate_like(nb::handle q, const TensorView& q_view, const std::int64_t* shape,
                                              int ndim, nb::dlpack::dtype dtype, const char* name,
                                              const std::string& what) {
  const dlpack_c::ExchangeApi* api = dlpack_c::exchange_api_of(Py_TYPE(q.ptr()));
  if (!api || !api->managed_tensor_allocator) return nullptr;
  dlpack_c::Tensor prototype{};
  prototype.device = {q_view.device.type == fastattn::DeviceType::kCUDA ? nb::device::cuda::value
                                                                        : nb::device::cpu::value,
                      q_view.device.index};
  prototype.ndim = ndim;
  prototype.dtype = dtype;
  prototype.shape = const_cast<std::int64_t*>(shape);
  dlpack_c::ManagedTensor* m = nullptr;
  if (api->managed_tensor_allocator(&prototype, &m, nullptr, &set_allocator_error) != 0 || !m)
    throw fastattn::ValueError("argument '" + std::string(name) + "': " + object_type_name(q) +
                               " could not allocate the " + what + ": " + take_producer_error());
  return m;
}

/// A uint8 array of `nbytes` on q's device from q's framework (allocate_like), kept for the call;
/// nullopt when q's type cannot allocate so. One C call, where a Python callback returning
/// torch.empty(nbytes) cost ~3 us more (bench/NOTES.md, session 95).
inline std::optional<TensorView> workspace_from_framework(nb::handle q, const TensorView& q_view, std::size_t nbytes,
                                                          Keep& keep) {
  const std::int64_t shape[1] = {static_cast<std::int64_t>(nbytes)};
  dlpack_c::ManagedTensor* m = allocate_like(q, q_view, shape, 1, nb::dtype<std::uint8_t>(), "workspace",
                                             std::to_string(nbytes) + "-byte split-KV workspace");
  if (!m || !keep_managed(m, keep)) return std::nullopt;
  return make_tensor_view(m->dl_tensor, "workspace");
}

/// The split-KV scratch of a call that was given none and needs `nbytes` > 0: from q's framework
/// (workspace_from_framework) when `from_q`, else workspace_alloc(nbytes), a Python callable
/// returning a writable uint8 array, when given; else none (the op then reports what it needs).
inline std::optional<TensorView> allocate_workspace(std::size_t nbytes, bool from_q, nb::handle q,
                                                    const TensorView& q_view, nb::handle workspace_alloc,
                                                    Keep& keep) {
  if (from_q)
    if (std::optional<TensorView> w = workspace_from_framework(q, q_view, nbytes, keep)) return w;
  if (workspace_alloc.is_none()) return std::nullopt;
  nb::object allocated = workspace_alloc(nbytes);
  keep.objects.push_back(allocated);  // alive through the call
  return out_view(allocated, "workspace", keep);
}

/// The binding's fastattn::WorkspaceAllocator. The op asks it for scratch only when the call needs
/// some, after its own checks and split heuristic, so the binding sizes nothing itself (a second
/// pass over the checks and the heuristic cost 2-2.5 us a call: bench/NOTES.md, session 96). The
/// op runs with the GIL released, so the request takes it back; what allocate_workspace allocates
/// is kept in `keep` until the binding returns.
struct OpWorkspace {
  nb::handle q;
  const TensorView* q_view;
  bool from_q;
  nb::handle workspace_alloc;
  Keep* keep;

  static std::optional<TensorView> allocate(void* self, std::size_t nbytes) {
    const OpWorkspace& w = *static_cast<const OpWorkspace*>(self);
    nb::gil_scoped_acquire gil;
    return allocate_workspace(nbytes, w.from_q, w.q, *w.q_view, w.workspace_alloc, *w.keep);
  }
  /// An allocator over this object, or none when there is nothing to allocate from.
  fastattn::WorkspaceAllocator allocator() {
    if (!from_q && workspace_alloc.is_none()) return {};
    return {&OpWorkspace::allocate, this};
  }
};

inline fastattn::ExecConfig make_exec(std::uintptr_t cuda_stream, int num_threads) {
  fastattn::ExecConfig e;
  e.cuda_stream = reinterpret_cast<void*>(cuda_stream);
  e.num_threads = num_threads;
  return e;
}

}  // namespace fastattn_binding
