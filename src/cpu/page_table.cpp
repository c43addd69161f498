// csr_to_block_table on the CPU: the lists' contents are checked before anything is written.
#include <cstdint>

#include "cpu/cpu_backend.h"
#include "cpu/index_data.h"

namespace fastattn::cpu {

void csr_to_block_table(check::ArgChecker& c, const TensorView& page_indptr,
                        const TensorView& page_indices, const TensorView& block_table) {
  const std::int64_t rows = block_table.size(0), width = block_table.size(1);
  check_cumulative(c, page_indptr, "page_indptr", page_indices.size(0), "page_indices", width,
                   "block_table columns");
  const std::int32_t* indptr = ints(page_indptr);
  const std::int32_t* indices = ints(page_indices);
  auto* table = static_cast<std::int32_t*>(block_table.data);
  for (std::int64_t b = 0; b < rows; ++b) {
    std::int32_t* row = table + b * block_table.stride(0);
    const std::int64_t count = std::int64_t(indptr[b + 1]) - indptr[b];
    for (std::int64_t j = 0; j < width; ++j) row[j] = j < count ? indices[indptr[b] + j] : 0;
  }
}

}  // namespace fastattn::cpu
