#include "core/check.h"

#include <sstream>

namespace fastattn::check {

namespace {
std::string shape_pattern(std::initializer_list<std::int64_t> expected) {
  std::ostringstream s;
  s << '(';
  std::size_t i = 0;
  for (auto e : expected) {
    if (i++) s << ", ";
    if (e < 0) s << '*';
    else s << e;
  }
  if (expected.size() == 1) s << ',';
  s << ')';
  return s.str();
}
}  // namespace

void ArgChecker::fail_value(const std::string& arg, const std::string& msg) const {
  throw ValueError(std::string(op_) + ": " + arg + " " + msg);
}
void ArgChecker::fail_type(const std::string& arg, const std::string& msg) const {
  throw TypeError(std::string(op_) + ": " + arg + " " + msg);
}

void ArgChecker::present(const TensorView& t, const std::string& arg) const {
  if (t.ndim < 1 || t.ndim > TensorView::kMaxDims)
    fail_value(arg, "must have 1.." + std::to_string(TensorView::kMaxDims) + " dims, got " +
                        std::to_string(t.ndim));
  for (int d = 0; d < t.ndim; ++d)
    if (t.size(d) < 0) fail_value(arg, "has a negative size: shape " + t.shape_string());
  if (t.data == nullptr && t.numel() > 0) fail_value(arg, "has a null data pointer");
}

void ArgChecker::dtype_in(const TensorView& t, const std::string& arg,
                          std::initializer_list<DType> allowed) const {
  for (auto d : allowed)
    if (t.dtype == d) return;
  std::string names;
  for (auto d : allowed) names += (names.empty() ? "" : ", ") + std::string(dtype_name(d));
  fail_type(arg, "must have dtype in {" + names + "}, got " + dtype_name(t.dtype));
}

void ArgChecker::dtype_is(const TensorView& t, const std::string& arg, DType expected) const {
  if (t.dtype != expected)
    fail_type(arg, std::string("must have dtype ") + dtype_name(expected) + ", got " +
                       dtype_name(t.dtype));
}

void ArgChecker::same_dtype(const TensorView& t, const std::string& arg, const TensorView& ref,
                            const std::string& ref_arg) const {
  if (t.dtype != ref.dtype)
    fail_type(arg, "must have the dtype of " + ref_arg + " (" +
                       dtype_name(ref.dtype) + "), got " + dtype_name(t.dtype));
}

void ArgChecker::ndim_is(const TensorView& t, const std::string& arg, int ndim, const char* layout) const {
  if (t.ndim != ndim)
    fail_value(arg, "must be " + std::to_string(ndim) + "-d " + layout + ", got shape " +
                        t.shape_string());
}

void ArgChecker::shape_is(const TensorView& t, const std::string& arg,
                          std::initializer_list<std::int64_t> expected, const char* layout) const {
  bool ok = t.ndim == static_cast<int>(expected.size());
  int d = 0;
  for (auto e : expected) {
    if (!ok) break;
    if (e >= 0 && t.size(d) != e) ok = false;
    ++d;
  }
  if (!ok)
    fail_value(arg, std::string("must have shape ") + layout + " = " + shape_pattern(expected) +
                        ", got " + t.shape_string());
}

void ArgChecker::last_dim_contiguous(const TensorView& t, const std::string& arg) const {
  // An empty tensor has no elements to lay out (numpy reports zero strides for them).
  if (t.ndim > 0 && t.numel() > 0 && t.size(-1) > 1 && t.stride(-1) != 1)
    fail_value(arg, "must be contiguous in its last dimension (stride 1), got stride " +
                        std::to_string(t.stride(-1)));
}

void ArgChecker::contiguous(const TensorView& t, const std::string& arg) const {
  if (!t.is_contiguous()) fail_value(arg, "must be contiguous, got a strided view");
}

void ArgChecker::on_device(const TensorView& t, const std::string& arg) {
  if (!device_set_) {
    device_ = t.device;
    device_set_ = true;
    first_device_arg_ = arg;
    return;
  }
  if (t.device != device_)
    throw DeviceError(std::string(op_) + ": " + arg + " must be on the device of " +
                      first_device_arg_ + " (" + device_name(device_) + "), got " +
                      device_name(t.device));
}

void ArgChecker::int_values_in(const TensorView& t, const std::string& arg, std::int64_t lo,
                               std::int64_t hi) const {
  const auto* p = static_cast<const std::int32_t*>(t.data);
  const std::int64_t n = t.numel();
  for (std::int64_t i = 0; i < n; ++i)
    if (p[i] < lo || p[i] > hi)
      fail_value(arg, "values must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                          "], got " + std::to_string(p[i]) + " at index " + std::to_string(i));
}

void head_dim_supported(const ArgChecker& c, const std::string& arg, std::int64_t head_dim) {
  if (head_dim < 8 || head_dim > 256 || head_dim % 8 != 0)
    c.fail_value(arg, "head_dim (last dim) must be a multiple of 8 in [8, 256], got " +
                          std::to_string(head_dim));
}

}  // namespace fastattn::check
