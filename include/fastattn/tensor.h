// fastattn: non-owning tensor view, element types and devices.
// Framework-neutral: no torch, no CUDA types. Python passes DLPack tensors through this view.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace fastattn {

/// Element types fastattn understands. Attention data is float32/float16/bfloat16;
/// index tensors (cu_seqlens, block tables, lengths) are int32; masks are bool or uint8.
enum class DType : int { kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kUInt8, kBool };

/// Bytes per element of `dtype`.
std::size_t dtype_size(DType dtype);
/// Lower-case name used in error messages ("float16", "int32", ...).
const char* dtype_name(DType dtype);

enum class DeviceType : int { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};
/// "cpu" or "cuda:N".
std::string device_name(const Device& device);

/// A strided, non-owning view of a tensor. Strides count elements, not bytes (as in DLPack
/// and torch). fastattn never frees or reallocates `data`.
struct TensorView {
  static constexpr int kMaxDims = 6;

  void* data = nullptr;
  DType dtype = DType::kFloat32;
  Device device{};
  int ndim = 0;
  std::array<std::int64_t, kMaxDims> shape{};
  std::array<std::int64_t, kMaxDims> strides{};

  std::int64_t size(int dim) const { return shape[static_cast<std::size_t>(dim < 0 ? dim + ndim : dim)]; }
  std::int64_t stride(int dim) const {
    return strides[static_cast<std::size_t>(dim < 0 ? dim + ndim : dim)];
  }
  /// Product of the shape (1 for a 0-d tensor).
  std::int64_t numel() const;
  /// True when the strides are the row-major strides of the shape (size-1 dims ignored).
  bool is_contiguous() const;
  /// "(2, 128, 8, 64)".
  std::string shape_string() const;
};

/// A view of `data` with the given shape and row-major (contiguous) strides.
TensorView make_view(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                     Device device = Device{});
/// A view with explicit strides (in elements).
TensorView make_strided_view(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                             std::initializer_list<std::int64_t> strides, Device device = Device{});

}  // namespace fastattn
