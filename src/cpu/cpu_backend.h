// Entry points of the CPU backend. Each takes arguments already validated by src/core (shapes,
// dtypes, devices), checks the contents of index tensors (lengths, page ids, capacity) before
// writing anything, and computes.
#pragma once

#include <cstddef>

#include "core/check.h"
#include "core/validate.h"
#include "fastattn/ops.h"

namespace fastattn::cpu {

void attention_forward(check::ArgChecker& c, const AttentionArgs& args,
                       const core::AttentionDims& d);
void varlen_attention_forward(check::ArgChecker& c, const VarlenAttentionArgs& args,
                              const core::VarlenDims& d);
void kvcache_attention_forward(check::ArgChecker& c, const KVCacheArgs& args,
                               const core::KVCacheDims& d);
std::size_t kvcache_workspace_bytes(check::ArgChecker& c, const KVCacheArgs& args,
                                    const core::KVCacheDims& d);
void shared_prefix_attention_forward(check::ArgChecker& c, const SharedPrefixAttentionArgs& args,
                                     const core::SharedPrefixDims& d);
std::size_t shared_prefix_workspace_bytes(check::ArgChecker& c,
                                          const SharedPrefixAttentionArgs& args,
                                          const core::SharedPrefixDims& d);

/// One merge of states, rows addressed by strides (elements). `b` rows are skipped where
/// `mask` is set and false. Reads both inputs of a row before writing it, so outputs may alias.
/// merge_state's operands; v_b->data null: state b's values are zero (merge_attention_sinks).
struct MergeTwo {
  const TensorView* v_a; const TensorView* s_a;
  const TensorView* v_b; const TensorView* s_b;
  const TensorView* v_out; const TensorView* s_out;
  const TensorView* mask = nullptr;
};
void merge_state(const MergeTwo& m, int num_threads);
void merge_states(const TensorView& v, const TensorView& s, const TensorView& v_out,
                  const TensorView& s_out, int num_threads);

/// csr_to_block_table on host tensors (validated shapes), the lists' contents checked first.
void csr_to_block_table(check::ArgChecker& c, const TensorView& page_indptr,
                        const TensorView& page_indices, const TensorView& block_table);

}  // namespace fastattn::cpu
