// DLPack's C exchange API (DLPack 1.3): an array type may publish, as the class attribute
// `__dlpack_c_exchange_api__`, a capsule named "dlpack_exchange_api" holding a table of C
// functions that describe one of its arrays without going through Python. torch.Tensor has it
// from torch 2.10. On this workstation's host (torch 2.9, the binding's import of 4 tensors in one
// call): through torch's Python `__dlpack__` method 7.6 us, as capsules made ahead by
// torch.utils.dlpack.to_dlpack (call_op) 1.25 us with their making; through the table an import is
// one C call (bench/NOTES.md, session 95).
//
// The structs below are the ABI that DLPack 1.x fixes for the table and the tensors it gives,
// declared here because nanobind's dlpack header stops at DLTensor.
#pragma once

#include <Python.h>
#include <nanobind/ndarray.h>

#include <cstdint>

namespace fastattn_binding::dlpack_c {

struct Version {
  std::uint32_t major, minor;
};

struct Device {
  std::int32_t device_type, device_id;
};

/// DLTensor: shape and strides in elements; strides may be null before DLPack 1.2 (row-major).
struct Tensor {
  void* data;
  Device device;
  std::int32_t ndim;
  nanobind::dlpack::dtype dtype;
  std::int64_t* shape;
  std::int64_t* strides;
  std::uint64_t byte_offset;
};

/// DLManagedTensorVersioned: the producer's tensor, owned until deleter(self) is called.
struct ManagedTensor {
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
  std::uint64_t flags;
  Tensor dl_tensor;
};

constexpr std::uint64_t kFlagReadOnly = 1;  // DLPACK_FLAG_BITMASK_READ_ONLY

struct ExchangeApiHeader {
  Version version;
  ExchangeApiHeader* prev_api;  // the same table for an older DLPack version, or null
};

/// DLPackExchangeAPI. Each function returns 0, or -1 with a Python exception set. The py_object
/// must be of the type the table was read from. "no_sync": no stream is waited on (as
/// `__dlpack__` without a stream).
struct ExchangeApi {
  ExchangeApiHeader header;
  int (*managed_tensor_allocator)(Tensor* prototype, ManagedTensor** out, void* error_ctx,
                                  void (*set_error)(void* error_ctx, const char* kind, const char* message));
  int (*managed_tensor_from_py_object_no_sync)(void* py_object, ManagedTensor** out);
  int (*managed_tensor_to_py_object_no_sync)(ManagedTensor* tensor, void** out_py_object);
  /// Non-owning: `out` is valid while py_object lives and is not resized (may be null).
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);
  int (*current_work_stream)(std::int32_t device_type, std::int32_t device_id, void** out_stream);
};

/// The exchange table that `type` itself declares (not one inherited: a subclass of torch.Tensor
/// may hold no storage of its own, and goes through `__dlpack__`), for DLPack major version 1;
/// null when there is none. Looked up once per type; the GIL must be held.
const ExchangeApi* exchange_api_of(PyTypeObject* type);

/// Whether arrays of `type` carry a lazy negation bit, asked through their `is_neg()` (torch):
/// cached per type like exchange_api_of. DLPack has no such bit, and torch.utils.dlpack.to_dlpack
/// (which nanobind falls back to when `__dlpack__` refuses such a tensor) exports the values
/// without it, so the binding refuses those arrays itself.
bool has_negation_bit(PyTypeObject* type);

}  // namespace fastattn_binding::dlpack_c
