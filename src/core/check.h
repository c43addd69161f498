// Argument validation helpers. Each failure throws a typed error whose message reads
//   "<op>: <arg> <what was expected>, got <what came>"
// so users see which argument is wrong without reading our code.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "fastattn/error.h"
#include "fastattn/tensor.h"

namespace fastattn::check {

/// Validates the tensors of one op call; `op` prefixes every message.
class ArgChecker {
 public:
  explicit ArgChecker(const char* op) : op_(op) {}

  [[noreturn]] void fail_value(const std::string& arg, const std::string& msg) const;
  [[noreturn]] void fail_type(const std::string& arg, const std::string& msg) const;

  /// Non-null data (unless empty), 1..kMaxDims dims, non-negative sizes.
  void present(const TensorView& t, const std::string& arg) const;
  void dtype_in(const TensorView& t, const std::string& arg, std::initializer_list<DType> allowed) const;
  void dtype_is(const TensorView& t, const std::string& arg, DType expected) const;
  void same_dtype(const TensorView& t, const std::string& arg, const TensorView& ref,
                  const std::string& ref_arg) const;
  /// Exact shape; entries of -1 in `expected` match anything. `layout` names the dims
  /// ("(B, Sq, Hq, D)") for the message.
  void shape_is(const TensorView& t, const std::string& arg, std::initializer_list<std::int64_t> expected,
                const char* layout) const;
  void ndim_is(const TensorView& t, const std::string& arg, int ndim, const char* layout) const;
  /// Stride of the last dimension is 1 (required of every attention tensor).
  void last_dim_contiguous(const TensorView& t, const std::string& arg) const;
  /// Fully contiguous (index tensors).
  void contiguous(const TensorView& t, const std::string& arg) const;
  /// All tensors must share one device; the first checked sets it.
  void on_device(const TensorView& t, const std::string& arg);
  /// Every element of t (int32, contiguous 1-D) in [lo, hi].
  void int_values_in(const TensorView& t, const std::string& arg, std::int64_t lo, std::int64_t hi) const;

  const Device& device() const { return device_; }
  const char* op() const { return op_; }

 private:
  const char* op_;
  Device device_{};
  bool device_set_ = false;
  std::string first_device_arg_;
};

/// head_dim in 8..256, a multiple of 8.
void head_dim_supported(const ArgChecker& c, const std::string& arg, std::int64_t head_dim);

}  // namespace fastattn::check
