// The CPU attention kernel: FlashAttention's tiled online softmax over K/V tiles.
//
// Work is split into items of (sequence, kv head, block of query rows x heads of that kv head's
// group, key split). Heads sharing a kv head (GQA) are processed together so each K/V tile is
// converted to float once for the whole group. Inside an item, for each tile of kKeyTile keys:
//   S = Qs · K^T (Qs pre-scaled), softcap, ALiBi, mask  ->  online-softmax update  ->  acc += P · V
// The loops run over fixed-width arrays so the compiler vectorises them (see bench/NOTES.md).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/softmax_state.h"
#include "cpu/attention_problem.h"
#include "cpu/convert.h"
#include "cpu/fast_exp.h"

namespace fastattn::cpu {
namespace {

constexpr int kKeyTile = 64;  // keys per tile: one S row is 64 floats (4 AVX-512 / 8 AVX2 regs)
constexpr int kMaxRows = 64;  // (query row, head) pairs per item: Q, S, acc stay in L2
constexpr int kDimChunk = 64; // head_dim slice of the P·V accumulator kept in registers
constexpr int kFewRows = 8;   // up to this many rows per kv head, scores are direct dot products
constexpr int kSlotFloats = 1024;  // direct mode reads up to this many kv-head floats per slot
constexpr int kPrefetchKeys = 16;  // keys ahead to prefetch: ~16 rows in flight hide DRAM latency

struct WorkItem {
  std::int32_t seq;
  std::int32_t kv_head, nkv;   // kv heads kv_head .. kv_head + nkv - 1 (nkv > 1: direct mode)
  std::int32_t head0, nheads;  // query heads head0 .. head0 + nheads - 1 (of those kv heads)
  std::int64_t row0, nrows;    // query rows
  std::int32_t split;
};

/// Per-thread scratch, sized for the largest item.
struct Scratch {
  std::vector<float> q;    // (kMaxRows, D)   scaled queries
  std::vector<float> kt;   // (D, kKeyTile) keys of the tile, transposed; direct: (kKeyTile, nkv, D)
  std::vector<float> v;    // (kKeyTile, nkv, D) values of the tile
  std::vector<float> s;    // (kMaxRows, kKeyTile) scores, then probabilities
  std::vector<float> acc;  // (kMaxRows, D)   unnormalised output
  std::vector<SoftmaxRowState> state;
  std::vector<std::int64_t> lo, hi;  // visible key range per row
  std::vector<std::int64_t> qpos;
  std::vector<float> slope;

  explicit Scratch(std::int64_t d)
      : q(kMaxRows * d), kt(std::max<std::int64_t>(d, kSlotFloats) * kKeyTile, 0.0f),
        v(std::max<std::int64_t>(d, kSlotFloats) * kKeyTile, 0.0f), s(kMaxRows * kKeyTile),
        acc(kMaxRows * d), state(kMaxRows), lo(kMaxRows), hi(kMaxRows), qpos(kMaxRows),
        slope(kMaxRows) {}
};

inline std::int64_t key_offset(const AttnProblem& p, const SeqDesc& s, std::int64_t slot,
                               std::int64_t slot_stride, std::int64_t page_stride,
                               std::int64_t seq_off) {
  if (p.kv.page_size == 0) return seq_off + slot * slot_stride;
  const std::int64_t page = s.pages[slot / p.kv.page_size];
  return page * page_stride + (slot % p.kv.page_size) * slot_stride;
}

/// Asks for the K and V rows of `slot` ahead of use. One head's row is a few hundred bytes
/// with a stride of Hkv rows between slots, so consecutive slots sit in different 4 KiB pages,
/// where hardware prefetchers stop: without this, decode is bound by DRAM latency.
inline void prefetch_key(const AttnProblem& p, const SeqDesc& s, std::int64_t slot,
                         std::int64_t kv_head, std::int64_t nkv) {
  const std::int64_t bytes = p.head_dim * static_cast<std::int64_t>(dtype_size(p.dtype));
  const std::int64_t ko = key_offset(p, s, slot, p.kv.k_slot_stride, p.kv.k_page_stride, s.k_off);
  const std::int64_t vo = key_offset(p, s, slot, p.kv.v_slot_stride, p.kv.v_page_stride, s.v_off);
  for (std::int64_t h = kv_head; h < kv_head + nkv; ++h) {
    const char* k = static_cast<const char*>(elem_ptr(p.kv.k, p.dtype, ko + h * p.kv.k_head_stride));
    const char* v = static_cast<const char*>(elem_ptr(p.kv.v, p.dtype, vo + h * p.kv.v_head_stride));
    for (std::int64_t b = 0; b < bytes; b += 64) {
      __builtin_prefetch(k + b);
      __builtin_prefetch(v + b);
    }
  }
}

/// 16 floats: one AVX-512 register, two AVX2 ones. Naming the accumulators as vector values
/// keeps them in registers; plain float arrays were spilled to the stack (read-modify-write per FMA).
using vec16 = float __attribute__((vector_size(64)));
inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }
static_assert(kKeyTile == 64 && kDimChunk == 64, "the register-blocked loops below assume 4 x 16 lanes");

/// S[m][jj] = sum_c Q[m][c] * Kt[c][jj] for all kKeyTile columns. Two query rows per pass
/// share each Kt load (8 vector accumulators).
inline void scores_tile(const float* q, const float* kt, std::int64_t d, std::int64_t rows,
                        float* s) {
  std::int64_t m = 0;
  for (; m + 2 <= rows; m += 2) {
    vec16 a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    const float* q0 = q + m * d;
    const float* q1 = q0 + d;
    for (std::int64_t c = 0; c < d; ++c) {
      const float* krow = kt + c * kKeyTile;
      const vec16 k0 = load16(krow), k1 = load16(krow + 16), k2 = load16(krow + 32),
                  k3 = load16(krow + 48);
      const float x0 = q0[c], x1 = q1[c];
      a0 += x0 * k0; a1 += x0 * k1; a2 += x0 * k2; a3 += x0 * k3;
      b0 += x1 * k0; b1 += x1 * k1; b2 += x1 * k2; b3 += x1 * k3;
    }
    float* s0 = s + m * kKeyTile;
    float* s1 = s0 + kKeyTile;
    store16(s0, a0); store16(s0 + 16, a1); store16(s0 + 32, a2); store16(s0 + 48, a3);
    store16(s1, b0); store16(s1 + 16, b1); store16(s1 + 32, b2); store16(s1 + 48, b3);
  }
  for (; m < rows; ++m) {
    vec16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const float* q0 = q + m * d;
    for (std::int64_t c = 0; c < d; ++c) {
      const float* krow = kt + c * kKeyTile;
      const float x0 = q0[c];
      a0 += x0 * load16(krow); a1 += x0 * load16(krow + 16);
      a2 += x0 * load16(krow + 32); a3 += x0 * load16(krow + 48);
    }
    float* s0 = s + m * kKeyTile;
    store16(s0, a0); store16(s0 + 16, a1); store16(s0 + 32, a2); store16(s0 + 48, a3);
  }
}

/// S[m][jj] = q_m · k_(jj, kv head of m) with K laid out (n, nkv, D); row m belongs to kv head
/// (m % (nkv * group)) / group. Dot products with 16 partial sums, so the reduction vectorises
/// without reassociation flags. Columns n.. are left for the mask.
inline void scores_rows(const float* q, const float* k, std::int64_t d, std::int64_t rows, int n,
                        std::int64_t nkv, std::int64_t group, float* s) {
  for (int jj = 0; jj < n; ++jj) {
    for (std::int64_t m = 0; m < rows; ++m) {
      const float* krow = k + (jj * nkv + (m % (nkv * group)) / group) * d;
      const float* qrow = q + m * d;
      vec16 acc = {};
      std::int64_t c = 0;
      for (; c + 16 <= d; c += 16) acc += load16(qrow + c) * load16(krow + c);
      float sum = 0.0f;
      for (; c < d; ++c) sum += qrow[c] * krow[c];
      for (int l = 0; l < 16; ++l) sum += acc[l];
      s[m * kKeyTile + jj] = sum;
    }
  }
}

/// acc[m][:] = acc[m][:] * factor[m] + sum_jj P[m][jj] * V[jj][:], over `n` keys whose rows are
/// `v_stride` floats apart.
inline void accumulate_pv(const float* pm, const float* v, std::int64_t v_stride, std::int64_t d,
                          int n, float factor, float* accrow) {
  std::int64_t c0 = 0;
  for (; c0 + kDimChunk <= d; c0 += kDimChunk) {  // 64 columns in 4 vector registers
    float* o = accrow + c0;
    const vec16 f = {factor, factor, factor, factor, factor, factor, factor, factor,
                     factor, factor, factor, factor, factor, factor, factor, factor};
    vec16 o0 = load16(o) * f, o1 = load16(o + 16) * f, o2 = load16(o + 32) * f,
          o3 = load16(o + 48) * f;
    for (int jj = 0; jj < n; ++jj) {
      const float pj = pm[jj];
      const float* vrow = v + jj * v_stride + c0;
      o0 += pj * load16(vrow); o1 += pj * load16(vrow + 16);
      o2 += pj * load16(vrow + 32); o3 += pj * load16(vrow + 48);
    }
    store16(o, o0); store16(o + 16, o1); store16(o + 32, o2); store16(o + 48, o3);
  }
  for (; c0 < d; c0 += 8) {  // head_dim is a multiple of 8
    float o[8];
    for (int c = 0; c < 8; ++c) o[c] = accrow[c0 + c] * factor;
    for (int jj = 0; jj < n; ++jj) {
      const float pj = pm[jj];
      const float* vrow = v + jj * v_stride + c0;
      for (int c = 0; c < 8; ++c) o[c] += pj * vrow[c];
    }
    for (int c = 0; c < 8; ++c) accrow[c0 + c] = o[c];
  }
}

void run_item(const AttnProblem& p, const WorkItem& it, std::int64_t key_begin,
              std::int64_t key_end, Scratch& sc, float* ws_o, float* ws_lse,
              std::int64_t ws_rows) {
  const SeqDesc& s = p.seqs[static_cast<std::size_t>(it.seq)];
  const std::int64_t d = p.head_dim;
  const std::int64_t nh = it.nheads;
  const std::int64_t rows = it.nrows * nh;
  const std::int64_t nkv = it.nkv;
  const std::int64_t group = p.heads_q / p.heads_kv;
  // Few rows per kv head (decode): K stays row-major and scores are direct dot products;
  // transposing K costs D strided stores per key, more than a handful of rows recoups.
  const bool direct = it.nrows * group <= kFewRows;

  // Queries of the item, pre-scaled, and each row's visible key range.
  std::int64_t jbeg = key_end, jend = key_begin;
  for (std::int64_t m = 0; m < rows; ++m) {
    const std::int64_t r = it.row0 + m / nh;
    const std::int64_t h = it.head0 + m % nh;
    load_row(p.dtype, elem_ptr(p.q, p.dtype, s.q_off + r * p.q_row_stride + h * p.q_head_stride), d,
             p.scale, sc.q.data() + m * d);
    const std::int64_t qpos = s.q_pos0 + r;
    std::int64_t lo = key_begin, hi = key_end;
    if (p.window_left >= 0) lo = std::max(lo, qpos - p.window_left - s.k_pos0);
    if (p.window_right >= 0) hi = std::min(hi, qpos + p.window_right - s.k_pos0 + 1);
    sc.lo[m] = lo;
    sc.hi[m] = hi;
    sc.qpos[m] = qpos;
    sc.slope[m] = s.alibi ? s.alibi[h] : 0.0f;
    sc.state[m].init();
    std::fill_n(sc.acc.data() + m * d, d, 0.0f);
    if (lo < hi) {
      jbeg = std::min(jbeg, lo);
      jend = std::max(jend, hi);
    }
  }

  const float inv_softcap = p.softcap > 0.0f ? 1.0f / p.softcap : 0.0f;
  for (std::int64_t j0 = jbeg; j0 < jend; j0 += kKeyTile) {
    const int n = static_cast<int>(std::min<std::int64_t>(kKeyTile, jend - j0));
    // Gather the tile in float: V (tile, nkv, D); K transposed (D, tile) for the row-blocked
    // score loop, or in direct mode row-major (tile, nkv, D) for dot products.
    float row[256];
    for (int jj = 0; jj < n; ++jj) {
      if (j0 + jj + kPrefetchKeys < jend)
        prefetch_key(p, s, s.slot0 + j0 + jj + kPrefetchKeys, it.kv_head, nkv);
      const std::int64_t slot = s.slot0 + j0 + jj;
      const std::int64_t ko = key_offset(p, s, slot, p.kv.k_slot_stride, p.kv.k_page_stride, s.k_off);
      const std::int64_t vo = key_offset(p, s, slot, p.kv.v_slot_stride, p.kv.v_page_stride, s.v_off);
      for (std::int64_t kvi = 0; kvi < nkv; ++kvi) {
        const std::int64_t h = it.kv_head + kvi;
        const void* ksrc = elem_ptr(p.kv.k, p.dtype, ko + h * p.kv.k_head_stride);
        if (direct) {
          load_row(p.dtype, ksrc, d, 1.0f, sc.kt.data() + (jj * nkv + kvi) * d);
        } else {
          load_row(p.dtype, ksrc, d, 1.0f, row);
          for (std::int64_t c = 0; c < d; ++c) sc.kt[c * kKeyTile + jj] = row[c];
        }
        load_row(p.dtype, elem_ptr(p.kv.v, p.dtype, vo + h * p.kv.v_head_stride), d, 1.0f,
                 sc.v.data() + (jj * nkv + kvi) * d);
      }
    }

    if (direct) scores_rows(sc.q.data(), sc.kt.data(), d, rows, n, nkv, group, sc.s.data());
    else scores_tile(sc.q.data(), sc.kt.data(), d, rows, sc.s.data());

    for (std::int64_t m = 0; m < rows; ++m) {
      float* srow = sc.s.data() + m * kKeyTile;
      if (p.softcap > 0.0f)
        for (int jj = 0; jj < n; ++jj) srow[jj] = p.softcap * std::tanh(srow[jj] * inv_softcap);
      if (sc.slope[m] != 0.0f) {
        const float slope = sc.slope[m];
        const std::int64_t kpos0 = s.k_pos0 + j0 - sc.qpos[m];
        for (int jj = 0; jj < n; ++jj)
          srow[jj] -= slope * std::fabs(static_cast<float>(kpos0 + jj));
      }
      // Mask keys outside the row's range (and the tile's unused columns).
      const std::int64_t lo = sc.lo[m] - j0, hi = std::min<std::int64_t>(sc.hi[m] - j0, n);
      float tile_max = -INFINITY;
      for (int jj = 0; jj < kKeyTile; ++jj) {
        const bool visible = jj >= lo && jj < hi;
        srow[jj] = visible ? srow[jj] : -INFINITY;
        tile_max = std::max(tile_max, srow[jj]);
      }
      if (tile_max == -INFINITY) continue;  // nothing visible for this row in this tile
      const float factor = sc.state[m].rescale_for(tile_max);
      const float mx = sc.state[m].m;
      float lanes[16] = {};
      for (int jj = 0; jj < kKeyTile; jj += 16)
        for (int k = 0; k < 16; ++k) {
          const float x = srow[jj + k];
          const float e = x == -INFINITY ? 0.0f : fast_exp(x - mx);
          srow[jj + k] = e;
          lanes[k] += e;
        }
      float sum = 0.0f;
      for (float l : lanes) sum += l;
      sc.state[m].l += sum;
      const std::int64_t kvi = (m % nh) / group;
      accumulate_pv(srow, sc.v.data() + kvi * d, nkv * d, d, n, factor, sc.acc.data() + m * d);
    }
  }

  // Finalise: the normalised output and LSE, or the split's partial state.
  for (std::int64_t m = 0; m < rows; ++m) {
    const std::int64_t r = it.row0 + m / nh;
    const std::int64_t h = it.head0 + m % nh;
    float lse = sc.state[m].lse();
    float inv = sc.state[m].inv_sum();
    const float* accrow = sc.acc.data() + m * d;
    if (ws_o == nullptr && p.sinks) {  // a finished row: its sink is the state (0, sinks[h])
      const MergeWeights w = merge_weights(lse, p.sinks[h * p.sinks_stride]);
      inv *= w.w_a;
      lse = w.lse;
    }
    if (ws_o != nullptr) {
      const std::int64_t wrow = (it.split * ws_rows + s.ws_row0 + r) * p.heads_q + h;
      store_row(DType::kFloat32, accrow, d, inv, ws_o + wrow * d);
      ws_lse[wrow] = lse;
    } else {
      store_row(p.out_dtype,
                accrow, d, inv,
                elem_ptr(p.out, p.out_dtype, s.out_off + r * p.out_row_stride + h * p.out_head_stride));
      if (p.lse) p.lse[s.lse_off + h * p.lse_head_stride + r * p.lse_row_stride] = lse;
    }
  }
}

/// Merges the split partials of every (row, head), and its sink if any, into out / lse, in split
/// order.
void combine_splits(const AttnProblem& p, const float* ws_o, const float* ws_lse,
                    std::int64_t ws_rows, int nt) {
  const std::int64_t d = p.head_dim;
  const std::int64_t nseq = static_cast<std::int64_t>(p.seqs.size());
#pragma omp parallel for schedule(dynamic) num_threads(nt)
  for (std::int64_t si = 0; si < nseq; ++si) {
    const SeqDesc& s = p.seqs[static_cast<std::size_t>(si)];
    std::vector<float> o(static_cast<std::size_t>(d));
    for (std::int64_t r = 0; r < s.seqlen_q; ++r)
      for (std::int64_t h = 0; h < p.heads_q; ++h) {
        MergeAccumulator acc;
        acc.init();
        std::fill(o.begin(), o.end(), 0.0f);
        if (p.sinks) {  // one more state, of zero values: it counts in the weights and the LSE only
          float rescale, weight;
          acc.add(p.sinks[h * p.sinks_stride], &rescale, &weight);
        }
        for (int sp = 0; sp < p.num_splits; ++sp) {
          const std::int64_t wrow = (sp * ws_rows + s.ws_row0 + r) * p.heads_q + h;
          float rescale, weight;
          acc.add(ws_lse[wrow], &rescale, &weight);
          if (weight == 0.0f) continue;
          const float* po = ws_o + wrow * d;
          for (std::int64_t c = 0; c < d; ++c) o[c] = o[c] * rescale + weight * po[c];
        }
        store_row(p.out_dtype, o.data(), d, acc.inv_sum(),
                  elem_ptr(p.out, p.out_dtype, s.out_off + r * p.out_row_stride + h * p.out_head_stride));
        if (p.lse) p.lse[s.lse_off + h * p.lse_head_stride + r * p.lse_row_stride] = acc.lse();
      }
  }
}

/// Writes the softmax matrix of every (head, row) into p.probs (testing aid): the row's scores
/// recomputed, then exp(s - max) / sum over them. Not exp(s - lse) with the kernel's LSE: the
/// kernel sums each dot product in another order, so that mixed the two passes' rounding of the
/// scores (about an ulp of |s|: a lone key with an ALiBi score near 32 got 0.9999962, not 1).
/// A row with no visible key is all zeros. A sink joins the max and the sum as one more score,
/// so the keys' share sums to less than 1.
void write_probs(const AttnProblem& p, int nt) {
  const std::int64_t d = p.head_dim;
  const std::int64_t g = p.heads_q / p.heads_kv;
  const std::int64_t nseq = static_cast<std::int64_t>(p.seqs.size());
#pragma omp parallel for schedule(dynamic) num_threads(nt)
  for (std::int64_t si = 0; si < nseq; ++si) {
    const SeqDesc& s = p.seqs[static_cast<std::size_t>(si)];
    std::vector<float> q(static_cast<std::size_t>(d)), k(static_cast<std::size_t>(d));
    for (std::int64_t h = 0; h < p.heads_q; ++h)
      for (std::int64_t r = 0; r < s.seqlen_q; ++r) {
        float* prow = p.probs + s.probs_off + h * p.probs_head_stride + r * p.probs_row_stride;
        load_row(p.dtype, elem_ptr(p.q, p.dtype, s.q_off + r * p.q_row_stride + h * p.q_head_stride),
                 d, p.scale, q.data());
        const std::int64_t qpos = s.q_pos0 + r;
        float m = -INFINITY;
        for (std::int64_t j = 0; j < s.seqlen_k; ++j) {  // the scores into prow, -inf where hidden
          const std::int64_t kpos = s.k_pos0 + j;
          const bool visible = (p.window_left < 0 || kpos >= qpos - p.window_left) &&
                               (p.window_right < 0 || kpos <= qpos + p.window_right);
          if (!visible) {
            prow[j] = -INFINITY;
            continue;
          }
          const std::int64_t ko =
              key_offset(p, s, s.slot0 + j, p.kv.k_slot_stride, p.kv.k_page_stride, s.k_off) +
              (h / g) * p.kv.k_head_stride;
          load_row(p.dtype, elem_ptr(p.kv.k, p.dtype, ko), d, 1.0f, k.data());
          float sc = 0.0f;
          for (std::int64_t c = 0; c < d; ++c) sc += q[c] * k[c];
          if (p.softcap > 0.0f) sc = p.softcap * std::tanh(sc / p.softcap);
          if (s.alibi) sc -= s.alibi[h] * std::fabs(static_cast<float>(qpos - kpos));
          prow[j] = sc;
          m = std::max(m, sc);
        }
        const float sink = p.sinks ? p.sinks[h * p.sinks_stride] : -INFINITY;
        m = std::max(m, sink);
        float sum = m == -INFINITY ? 0.0f : std::exp(sink - m);
        for (std::int64_t j = 0; j < s.seqlen_k; ++j) {
          prow[j] = m == -INFINITY ? 0.0f : std::exp(prow[j] - m);  // exp(-inf) = 0 where hidden
          sum += prow[j];
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (std::int64_t j = 0; j < s.seqlen_k; ++j) prow[j] *= inv;
      }
  }
}

}  // namespace

std::int64_t split_chunk(std::int64_t seqlen_k, int num_splits) {
  if (num_splits <= 1) return seqlen_k;
  const std::int64_t chunk = (seqlen_k + num_splits - 1) / num_splits;
  return (chunk + kKeyTile - 1) / kKeyTile * kKeyTile;
}

std::size_t attention_workspace_bytes(const AttnProblem& p) {
  if (p.num_splits <= 1) return 0;
  const std::int64_t rows = p.total_q_rows() * p.heads_q * p.num_splits;
  return static_cast<std::size_t>(rows * (p.head_dim + 1)) * sizeof(float);
}

void run_attention(const AttnProblem& p, void* workspace, int num_threads) {
  const int nt = num_threads > 0 ? num_threads : omp_get_max_threads();
  const std::int64_t g = p.heads_q / p.heads_kv;
  const std::int64_t heads_per_item = std::min<std::int64_t>(g, kMaxRows);
  const std::int64_t rows_per_item = std::max<std::int64_t>(1, kMaxRows / heads_per_item);
  const int splits = std::max(1, p.num_splits);

  // Decode-like sequences (few rows per kv head) take several kv heads per item, so each key
  // slot's heads are read in one contiguous sweep (a strided walk over one head per slot
  // defeats the hardware prefetchers, see bench/NOTES.md).
  const std::int64_t kv_per_direct_item = std::max<std::int64_t>(
      1, std::min<std::int64_t>(kSlotFloats / p.head_dim, kMaxRows / kFewRows));
  std::vector<WorkItem> items;
  for (std::size_t si = 0; si < p.seqs.size(); ++si) {
    const SeqDesc& s = p.seqs[si];
    const auto seq = static_cast<std::int32_t>(si);
    if (s.seqlen_q * g <= kFewRows) {
      for (std::int64_t kvh = 0; kvh < p.heads_kv; kvh += kv_per_direct_item) {
        const std::int64_t nkv = std::min(kv_per_direct_item, p.heads_kv - kvh);
        for (int sp = 0; sp < splits; ++sp)
          items.push_back({seq, static_cast<std::int32_t>(kvh), static_cast<std::int32_t>(nkv),
                           static_cast<std::int32_t>(kvh * g), static_cast<std::int32_t>(nkv * g),
                           0, s.seqlen_q, sp});
      }
      continue;
    }
    for (std::int64_t kvh = 0; kvh < p.heads_kv; ++kvh)
      for (std::int64_t h0 = 0; h0 < g; h0 += heads_per_item)
        for (std::int64_t r0 = 0; r0 < s.seqlen_q; r0 += rows_per_item)
          for (int sp = 0; sp < splits; ++sp)
            items.push_back({seq, static_cast<std::int32_t>(kvh), 1,
                             static_cast<std::int32_t>(kvh * g + h0),
                             static_cast<std::int32_t>(std::min(heads_per_item, g - h0)), r0,
                             std::min(rows_per_item, s.seqlen_q - r0), sp});
  }

  const std::int64_t ws_rows = p.total_q_rows();
  float* ws_o = nullptr;
  float* ws_lse = nullptr;
  if (splits > 1) {
    ws_o = static_cast<float*>(workspace);
    ws_lse = ws_o + ws_rows * p.heads_q * splits * p.head_dim;
  }

  const std::int64_t nitems = static_cast<std::int64_t>(items.size());
#pragma omp parallel num_threads(nt)
  {
    Scratch sc(p.head_dim);
#pragma omp for schedule(dynamic)
    for (std::int64_t i = 0; i < nitems; ++i) {
      const WorkItem& it = items[static_cast<std::size_t>(i)];
      const SeqDesc& s = p.seqs[static_cast<std::size_t>(it.seq)];
      const std::int64_t chunk = split_chunk(s.seqlen_k, splits);
      const std::int64_t kb = std::min<std::int64_t>(s.seqlen_k, it.split * chunk);
      const std::int64_t ke = std::min<std::int64_t>(s.seqlen_k, kb + chunk);
      run_item(p, it, kb, ke, sc, ws_o, ws_lse, ws_rows);  // one split: [0, seqlen_k)
    }
  }
  if (splits > 1) combine_splits(p, ws_o, ws_lse, ws_rows, nt);
  if (p.probs) write_probs(p, nt);
}

}  // namespace fastattn::cpu
