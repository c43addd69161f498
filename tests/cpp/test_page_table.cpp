// csr_to_block_table on the CPU: random CSR lists (empty rows, indptr from an offset) against a
// table filled cell by cell here, into a poisoned table with padded rows (the padding untouched).
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "fastattn/ops.h"
#include "test_util.h"

namespace {

using namespace fa_test;
using fa_ref::HostTensor;
using fa_ref::Layout;

TEST(CsrToBlockTable, RandomListsMatchTheCellByCellTable) {
  FA_SEEDED_RNG(rng);
  for (int trial = 0; trial < 40; ++trial) {
    const std::int64_t rows = rand_int(rng, 1, 12);
    const std::int64_t offset = rand_int(rng, 0, 3);
    std::vector<std::int64_t> counts(rows), indptr{offset};
    for (auto& n : counts) {
      n = rand_int(rng, 0, 3) == 0 ? 0 : rand_int(rng, 1, 9);
      indptr.push_back(indptr.back() + n);
    }
    std::int64_t most = 0;
    for (auto n : counts) most = std::max(most, n);
    const std::int64_t width = most + rand_int(rng, 0, 3);
    std::vector<std::int64_t> ids(indptr.back() + rand_int(rng, 0, 3));
    for (auto& id : ids) id = rand_int(rng, 0, 100000);
    HostTensor ip = fa_ref::int_tensor(indptr), idx = fa_ref::int_tensor(ids);
    Layout padded;
    padded.pad = {0, rand_int(rng, 0, 3)};
    HostTensor table(DType::kInt32, {rows, width}, padded);
    table.poison();
    fastattn::csr_to_block_table(ip.view(), idx.view(), table.view());
    for (std::int64_t b = 0; b < rows; ++b)
      for (std::int64_t j = 0; j < width; ++j) {
        const double want = j < counts[b] ? double(ids[indptr[b] + j]) : 0.0;
        ASSERT_EQ(table.at({b, j}), want) << "row " << b << " column " << j;
      }
    EXPECT_TRUE(table.gaps_intact()) << "wrote into the table's row padding";
  }
}

TEST(CsrToBlockTable, NoRowsAndNoColumns) {
  HostTensor ip = fa_ref::int_tensor({0}), idx = fa_ref::int_tensor({});
  HostTensor empty_rows(DType::kInt32, {0, 4});
  fastattn::csr_to_block_table(ip.view(), idx.view(), empty_rows.view());
  HostTensor ip2 = fa_ref::int_tensor({0, 0, 0});
  HostTensor no_columns(DType::kInt32, {2, 0});
  fastattn::csr_to_block_table(ip2.view(), idx.view(), no_columns.view());
}

}  // namespace
