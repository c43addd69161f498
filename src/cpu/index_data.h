// Reading and checking the contents of int32 index tensors on the host (CPU backend only).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "core/check.h"
#include "fastattn/tensor.h"

namespace fastattn::cpu {

inline const std::int32_t* ints(const TensorView& t) {
  return static_cast<const std::int32_t*>(t.data);
}

/// Checks cu (B + 1 entries): cu[0] >= 0 (== 0 with zero_start), non-decreasing,
/// cu[B] <= total (the size of `indexed`, which names the tensor it indexes); and each length
/// <= max_len (when max_len >= 0). Throws ValueError naming `arg`.
inline void check_cumulative(const check::ArgChecker& c, const TensorView& cu, const std::string& arg,
                             std::int64_t total, const std::string& indexed, std::int64_t max_len,
                             const char* max_arg, bool zero_start = false) {
  const std::int32_t* p = ints(cu);
  const std::int64_t b = cu.size(0) - 1;
  if (p[0] < 0 || (zero_start && p[0] != 0))
    c.fail_value(arg, std::string("[0] must be ") + (zero_start ? "0" : ">= 0") + ", got " +
                          std::to_string(p[0]));
  for (std::int64_t i = 0; i < b; ++i) {
    if (p[i + 1] < p[i])
      c.fail_value(arg, "must be non-decreasing, got " + std::to_string(p[i]) + " then " +
                            std::to_string(p[i + 1]) + " at index " + std::to_string(i));
    if (max_len >= 0 && p[i + 1] - p[i] > max_len)
      c.fail_value(arg, "gives sequence " + std::to_string(i) + " length " +
                            std::to_string(p[i + 1] - p[i]) + " > " + max_arg + " = " +
                            std::to_string(max_len));
  }
  if (p[b] > total)
    c.fail_value(arg, "[B] = " + std::to_string(p[b]) + " exceeds the " + std::to_string(total) +
                          " entries of " + indexed);
}

/// Output rows [row_begin, row_end) of a packed (total, H, D) output that belong to no
/// sequence (padding past cu_seqlens_q[B]) see no key: output 0 and LSE -inf, as any empty row
/// (with attention sinks (H) float32, LSE sinks[h], as any empty row then).
void clear_unowned_rows(const TensorView& out, const std::optional<TensorView>& lse,
                        std::int64_t row_begin, std::int64_t row_end,
                        const std::optional<TensorView>& sinks = std::nullopt);

/// Page table of a paged cache as seen by one sequence: `count` page ids at `ids`.
struct PageList {
  const std::int32_t* ids = nullptr;
  std::int64_t count = 0;
};

}  // namespace fastattn::cpu
