// The online-softmax state shared by every path: the tiled attention loop (update), split-KV
// combine and cascade merge (merge), and finalisation into (output, LSE).
//
// A row's state over a set of keys is (m, l, acc): m the running max score, l = sum exp(s - m),
// acc = sum exp(s - m) * v. Finalised, it is the normalised output o = acc / l and the natural-log
// LSE = m + log(l). An empty set has l = 0, which finalises to o = 0 and LSE = -inf; merging an
// empty state is the identity, and never forms inf - inf.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace fastattn {

/// Running max and sum of one query row.
struct SoftmaxRowState {
  float m;  ///< running max of the scores seen (-inf before any key)
  float l;  ///< sum of exp(s - m) over the keys seen

  FASTATTN_HD void init() {
    m = -INFINITY;
    l = 0.0f;
  }

  /// Takes in a tile whose max score is `tile_max`. Returns the factor by which the accumulator
  /// (and l, already applied here) must be rescaled; afterwards scores are exponentiated
  /// against `m`. With nothing seen yet and an all-masked tile, m stays -inf and the factor is 1.
  FASTATTN_HD float rescale_for(float tile_max) {
    const float m_new = tile_max > m ? tile_max : m;
    const float factor = (m_new == -INFINITY) ? 1.0f : expf(m - m_new);
    m = m_new;
    l *= factor;
    return factor;
  }

  /// Natural-log LSE of the keys seen; -inf when none (or all masked).
  FASTATTN_HD float lse() const { return l > 0.0f ? m + logf(l) : -INFINITY; }
  /// Multiplier turning the accumulator into the normalised output (0 for an empty row).
  FASTATTN_HD float inv_sum() const { return l > 0.0f ? 1.0f / l : 0.0f; }
};

/// Weights for merging finalised states (o_a, lse_a) and (o_b, lse_b) of the same query row over
/// disjoint keys:  o = w_a * o_a + w_b * o_b, lse = log(exp(lse_a) + exp(lse_b)).
/// Both empty: weights 0 and lse -inf (the merged output is 0).
struct MergeWeights {
  float w_a, w_b, lse;
};

FASTATTN_HD MergeWeights merge_weights(float lse_a, float lse_b) {
  const float m = lse_a > lse_b ? lse_a : lse_b;
  if (m == -INFINITY) return {0.0f, 0.0f, -INFINITY};
  const float e_a = expf(lse_a - m);  // exp(-inf) = 0 for an empty side
  const float e_b = expf(lse_b - m);
  const float sum = e_a + e_b;
  return {e_a / sum, e_b / sum, m + logf(sum)};
}

/// N-way form: running merge of states one at a time, used by merge_states and split combine.
struct MergeAccumulator {
  float m;    ///< max LSE seen
  float sum;  ///< sum exp(lse_i - m)

  FASTATTN_HD void init() {
    m = -INFINITY;
    sum = 0.0f;
  }
  /// Adds a state with `lse`; returns (rescale of the accumulated output, weight of the new one).
  FASTATTN_HD void add(float lse, float* rescale, float* weight) {
    if (lse == -INFINITY) {  // empty state: identity
      *rescale = 1.0f;
      *weight = 0.0f;
      return;
    }
    const float m_new = lse > m ? lse : m;
    *rescale = (m == -INFINITY) ? 0.0f : expf(m - m_new);
    *weight = expf(lse - m_new);
    sum = sum * *rescale + *weight;
    m = m_new;
  }
  /// Folds in another accumulator (states over disjoint keys), for parallel reductions.
  FASTATTN_HD void merge(const MergeAccumulator& o) {
    if (o.m == -INFINITY) return;
    if (m == -INFINITY) {
      *this = o;
      return;
    }
    const float m_new = o.m > m ? o.m : m;
    sum = sum * expf(m - m_new) + o.sum * expf(o.m - m_new);
    m = m_new;
  }
  /// Weight of a state with `lse` in the merged output, once every state has been added:
  /// exp(lse - m) / sum (0 for an empty state or when everything is empty).
  FASTATTN_HD float weight_of(float lse) const {
    return (lse == -INFINITY || sum <= 0.0f) ? 0.0f : expf(lse - m) / sum;
  }
  FASTATTN_HD float lse() const { return sum > 0.0f ? m + logf(sum) : -INFINITY; }
  FASTATTN_HD float inv_sum() const { return sum > 0.0f ? 1.0f / sum : 0.0f; }
};

}  // namespace fastattn
