// TensorView helpers and dtype/device names.
#include <sstream>

#include "fastattn/error.h"
#include "fastattn/tensor.h"

namespace fastattn {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
    case DType::kUInt8: return 1;
    case DType::kBool: return 1;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
    case DType::kBool: return "bool";
  }
  return "unknown";
}

std::string device_name(const Device& device) {
  if (device.type == DeviceType::kCPU) return "cpu";
  return "cuda:" + std::to_string(device.index);
}

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[static_cast<std::size_t>(i)];
  return n;
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // nothing to lay out (as torch says)
  std::int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    const auto d = static_cast<std::size_t>(i);
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorView::shape_string() const {
  std::ostringstream s;
  s << '(';
  for (int i = 0; i < ndim; ++i) s << (i ? ", " : "") << shape[static_cast<std::size_t>(i)];
  if (ndim == 1) s << ',';
  s << ')';
  return s.str();
}

TensorView make_strided_view(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                             std::initializer_list<std::int64_t> strides, Device device) {
  if (shape.size() != strides.size())
    throw ValueError("make_strided_view: shape has " + std::to_string(shape.size()) +
                     " dims but strides has " + std::to_string(strides.size()));
  if (shape.size() > static_cast<std::size_t>(TensorView::kMaxDims))
    throw ValueError("make_strided_view: at most " + std::to_string(TensorView::kMaxDims) +
                     " dims are supported, got " + std::to_string(shape.size()));
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  std::size_t i = 0;
  for (auto s : shape) t.shape[i++] = s;
  i = 0;
  for (auto s : strides) t.strides[i++] = s;
  return t;
}

TensorView make_view(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                     Device device) {
  if (shape.size() > static_cast<std::size_t>(TensorView::kMaxDims))
    throw ValueError("make_view: at most " + std::to_string(TensorView::kMaxDims) +
                     " dims are supported, got " + std::to_string(shape.size()));
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  std::size_t i = 0;
  for (auto s : shape) t.shape[i++] = s;
  std::int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.strides[static_cast<std::size_t>(d)] = stride;
    stride *= t.shape[static_cast<std::size_t>(d)];
  }
  return t;
}

}  // namespace fastattn
