// csr_to_block_table on the CPU: the lists' contents are checked before anything is written.
#include <cstdint>
#include <string>

#include "cpu/cpu_backend.h"

namespace fastattn::cpu {

void csr_to_block_table(check::ArgChecker& c, const TensorView& page_indptr,
                        const TensorView& page_indices, const TensorView& block_table) {
  const auto* indptr = static_cast<const std::int32_t*>(page_indptr.data);
  const auto* indices = static_cast<const std::int32_t*>(page_indices.data);
  const std::int64_t rows = block_table.size(0), width = block_table.size(1);
  const std::int64_t nnz = page_indices.size(0);
  if (indptr[0] < 0) c.fail_value("page_indptr", "entry 0 must be >= 0, got " + std::to_string(indptr[0]));
  for (std::int64_t b = 0; b < rows; ++b) {
    const std::int64_t count = std::int64_t(indptr[b + 1]) - indptr[b];
    if (count < 0 || indptr[b + 1] > nnz)
      c.fail_value("page_indptr", "must be non-decreasing up to len(page_indices) = " + std::to_string(nnz) +
                                      ", got entries " + std::to_string(indptr[b]) + ", " +
                                      std::to_string(indptr[b + 1]) + " at " + std::to_string(b) + ", " +
                                      std::to_string(b + 1));
    if (count > width)
      c.fail_value("block_table", "has W = " + std::to_string(width) + " columns, but row " + std::to_string(b) +
                                      " has " + std::to_string(count) + " pages");
  }
  auto* table = static_cast<std::int32_t*>(block_table.data);
  for (std::int64_t b = 0; b < rows; ++b) {
    std::int32_t* row = table + b * block_table.stride(0);
    const std::int64_t count = std::int64_t(indptr[b + 1]) - indptr[b];
    for (std::int64_t j = 0; j < width; ++j) row[j] = j < count ? indices[indptr[b] + j] : 0;
  }
}

}  // namespace fastattn::cpu
