// The math of the decode kernels, shared by the cp.async kernel (decode_kernel.cuh, sm_80+) and
// the bulk-copy kernel (decode_kernel_sm90.cuh): a warp's online-softmax state over 16 packed
// query rows, its update with 16 keys of a staged K / V tile, and the merge of the warps' states
// into the output or a split's partial state.
//
// Packed rows: row pm of the CTA's 16-row block mb is query head kvh * group + pm / Sq, query row
// pm % Sq (GQA packing). Keys live in slot space ([pad, end) are the sequence's keys); query row i
// sits at slot end - Sq + i (bottom-right alignment), which causal / window / ALiBi measure from.
#pragma once

#include <climits>

#include <cute/arch/copy_sm75.hpp>

#include "common/softmax_state.h"
#include "cuda/common/mbarrier.cuh"
#include "cuda/decode/decode_common.cuh"
#include "cuda/prefill/prefill_kernel.cuh"

namespace fastattn::cuda_decode {

/// ldmatrix.x4 (optionally .trans) from the shared-memory byte address `addr`. Volatile, like
/// every shared-memory access after an mbarrier wait: not hoisted above the wait.
__device__ __forceinline__ void ldsm_x4(std::uint32_t addr, std::uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(std::uint32_t addr, std::uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.trans.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

constexpr int kDecodeRows = kDecodeRowsPerCta;  ///< packed query rows per CTA: one m16 MMA tile
constexpr int kDecodeWarps = 4;  ///< consumer warps; each takes 16 keys of every 64-key tile

/// The default of attend's pipeline hooks: nothing to signal or wait for.
struct DecodeNoHook {
  __device__ __forceinline__ void operator()() const {}
};

/// The default of attend's V-fragment hook: the fragments are used as loaded.
struct DecodeNoVMask {
  __device__ __forceinline__ void operator()(std::uint32_t (&)[4]) const {}
};

/// A V-fragment hook that zeroes the keys of the warp's 16 outside [lo, hi) in registers, for a
/// form whose warps may not zero them in shared memory (the row pair: two warps read the same V
/// rows). A lane's ldmatrix.trans fragments hold keys key0 + 2t, + 1 (halves of bv[0] and bv[2])
/// and key0 + 8 + 2t, + 1 (bv[1] and bv[3]), t = lane % 4.
struct DecodeVEdgeMask {
  std::uint32_t keep_low, keep_high;  ///< per 16-bit half: all ones where the key is in [lo, hi)
  __device__ __forceinline__ DecodeVEdgeMask(int slot0, int lo, int hi, int lane) {
    const auto keep = [lo, hi](int slot) { return slot >= lo && slot < hi; };
    const int s = slot0 + 2 * (lane % 4);
    keep_low = (keep(s) ? 0x0000ffffu : 0u) | (keep(s + 1) ? 0xffff0000u : 0u);
    keep_high = (keep(s + 8) ? 0x0000ffffu : 0u) | (keep(s + 9) ? 0xffff0000u : 0u);
  }
  __device__ __forceinline__ void operator()(std::uint32_t (&bv)[4]) const {
    bv[0] &= keep_low;
    bv[2] &= keep_low;
    bv[1] &= keep_high;
    bv[3] &= keep_high;
  }
};

/// What the masks need of one packed query row of the CTA, and its scores through them.
struct DecodeRowMask {
  bool ok;      ///< the CTA has the row (else its query is zeros and it is never stored)
  int q_slot;   ///< the row's query position in slot space: end - Sq + i
  float slope;  ///< its ALiBi slope (0 without ALiBi)

  /// Packed row pm of (b, kvh): query head kvh * group + pm / Sq, query row pm % Sq.
  __device__ __forceinline__ void init(const DecodeParams& p, int b, int kvh, int pm, int end) {
    ok = pm < p.group * p.seqlen_q;
    const int i = ok ? pm % p.seqlen_q : 0;
    const int h = kvh * p.group + (ok ? pm / p.seqlen_q : 0);
    q_slot = end - p.seqlen_q + i;
    slope = p.alibi ? p.alibi[b * p.alibi_batch_stride + h] : 0.0f;
  }

  /// Raw score q . k of key `slot` scaled, softcapped, with ALiBi and the masks (pad / end and
  /// the window), in the log2 domain; -inf when the row may not see the key.
  __device__ __forceinline__ float score(const DecodeParams& p, float raw, int slot, int pad, int end) const {
    constexpr float kLog2e = 1.4426950408889634f;
    float x = raw * p.scale;
    if (p.softcap > 0.0f) x = p.softcap * tanhf(x / p.softcap);
    x -= slope * fabsf(float(q_slot - slot));
    const bool visible = ok && slot >= pad && slot < end && (p.window_left < 0 || slot >= q_slot - p.window_left) &&
                         (p.window_right < 0 || slot <= q_slot + p.window_right);
    return visible ? x * kLog2e : -INFINITY;
  }
};

/// The keys [plain_lo, plain_hi] every row of a (b, kv head) sees with a plain scaled score: no
/// softcap or ALiBi (else empty), inside [pad, end) and inside the window of every row. Rows sit
/// at or after end - Sq, so the window's bounds are those of the first row (left) and the last
/// (right).
struct DecodePlainKeys {
  int lo, hi;
  __device__ __forceinline__ void init(const DecodeParams& p, int pad, int end) {
    lo = p.softcap > 0.0f || p.alibi ? INT_MAX : pad;
    if (p.window_left >= 0) lo = max(lo, end - 1 - p.window_left);
    hi = end - 1;
    if (p.window_right >= 0) hi = min(hi, end - p.seqlen_q + p.window_right);
  }
  /// Keys [first, last] need no per-score masks.
  __device__ __forceinline__ bool covers(int first, int last) const { return first >= lo && last <= hi; }
};

/// One warp's state: the O accumulator fragments of its 16 rows (m16n8 layout, rows g and g + 8
/// of the lane), the running max (log2 domain) and sum, and what the masks need per row.
/// kQInRegisters: Q's A fragments are loaded once (load_q) and kept, head_dim / 4 registers,
/// instead of an ldmatrix per k16 step of every tile (the sm_90 row pair, head_dim <= 128).
/// kBoundLayout: the lane's ldmatrix addresses are worked out once (bind_layout) and each tile's
/// is a register plus the stage's base XOR an immediate, as in DecodeWarpStateNarrow; without it
/// attend works them out from the layout on every tile (~85 integer instructions a warp and tile
/// at head_dim 128 on sm_90; bench/NOTES.md, session 90). The sm_90 kernel binds. The cp.async
/// kernel (sm_80, and page sizes or empty caches the TMA kernel does not take) does not: its
/// head_dim-256 rows are padded, not swizzled, and binding it at 64-128 was not measured.
template <int kHeadDim, bool kQInRegisters = false, bool kBoundLayout = false>
struct DecodeWarpState {
  static constexpr int DT = kHeadDim / 8;
  static constexpr int KS = kHeadDim / 16;  ///< k16 steps of Q K^T
  float acc_o[DT][4];
  std::uint32_t q_frag[kQInRegisters ? KS : 1][4];  ///< A fragments of Q per k16 step (kQInRegisters)
  float row_max[2], row_sum[2];
  DecodeRowMask row[2];  ///< lane rows g and g + 8
  DecodePlainKeys plain_keys;
  bool upper_rows;  ///< the CTA has packed rows 8..15 (lane rows g + 8); else their P is just 0
  /// kBoundLayout: byte offsets of the lane's ldmatrix row for K (k16 step 0) and V (dims 0-15)
  /// in a stage and (unless kQInRegisters) for Q (k16 step 0) in sQ, and between a stage's
  /// 64-column blocks.
  std::uint32_t k_lane, v_lane, q_lane, block_bytes;
  /// kBoundLayout: bytes between sQ's 64-column blocks ([column block][kDecodeRows][64], the
  /// sm_90 kernel's Q).
  static constexpr std::uint32_t kQBlockBytes = 2 * kDecodeRows * 64;

  __device__ __forceinline__ void init(const DecodeParams& p, int b, int kvh, int mb, int pad, int end, int g) {
    upper_rows = mb * kDecodeRows + 8 < p.group * p.seqlen_q;
    plain_keys.init(p, pad, end);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      row[hr].init(p, b, kvh, mb * kDecodeRows + g + hr * 8, end);
      row_max[hr] = -INFINITY;
      row_sum[hr] = 0.0f;
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[dt][e] = 0.0f;
  }

  /// kBoundLayout: the lane's addresses for a stage laid out by `kv` (a 128-byte-swizzled layout
  /// with kv.block_elems() between 64-column blocks and rows on 128-byte lines) and for Cfg's Q.
  /// Chunk c of row r sits at chunk (c ^ r) & 7 of its line, so with c = 2j + h (j < 4, h the
  /// lane's half) a k16 step's address is step 0's XOR 32 j bytes, plus a block per 4 steps.
  template <class Cfg, class KvLayout>
  __device__ __forceinline__ void bind_layout(const KvLayout& kv, int key0, int lane) {
    static_assert(kBoundLayout && KvLayout::kBlockXorBytes == 0,
                  "a layout whose 64-column blocks keep the row's swizzle");
    k_lane = 2 * kv.offset(key0 + (lane % 8) + ((lane / 8) / 2) * 8, (lane / 8) % 2);
    v_lane = 2 * kv.offset(key0 + (lane % 8) + ((lane / 8) % 2) * 8, (lane / 8) / 2);
    block_bytes = 2 * kv.block_elems();
    // Opaque to the compiler: kept in registers, not worked out again every tile.
    asm volatile("" : "+r"(k_lane), "+r"(v_lane), "+r"(block_bytes));
    if constexpr (!kQInRegisters) {  // else Q's fragments are loaded once (load_q), not per tile
      q_lane = 2 * Cfg::q_offset((lane % 8) + ((lane / 8) % 2) * 8, lane / 16);
      asm volatile("" : "+r"(q_lane));
    }
  }

  /// Q's A fragments of every k16 step from the staged Q (kQInRegisters; rows past the CTA's are
  /// zeros), laid out as attend would load them.
  template <class Cfg>
  __device__ __forceinline__ void load_q(const std::uint16_t* sQ, int lane) {
    static_assert(kQInRegisters, "only a state that keeps Q");
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) load_q_step<Cfg>(sQ, ks, lane, q_frag[ks]);
  }

  /// Q's A fragment of k16 step ks (rows lane % 8 + 8 ((lane / 8) % 2), chunk 2 ks + lane / 16).
  template <class Cfg>
  static __device__ __forceinline__ void load_q_step(const std::uint16_t* sQ, int ks, int lane, std::uint32_t (&a)[4]) {
    cute::SM75_U32x4_LDSM_N::copy(
        *reinterpret_cast<const cute::uint128_t*>(sQ + Cfg::q_offset((lane % 8) + ((lane / 8) % 2) * 8, ks * 2 + lane / 16)),
        a[0], a[1], a[2], a[3]);
  }

  /// Attends the warp's 16 keys (rows key0 .. key0 + 15 of the staged tile, slots n0 + key0 ...)
  /// with Q (from sQ, or the registers load_q filled). Cfg::q_offset(row, chunk) addresses sQ,
  /// kv.offset(row, chunk) sK and sV (elements; chunk = 8 elements), or with kBoundLayout the
  /// offsets bind_layout set from them (sQ, sK and sV then start on 128-byte lines). k_done()
  /// runs once the warp's reads of sK are done, v_wait() before its first read of sV (a pipeline
  /// with separate K and V stages; no-ops by default), v_mask(bv) on each V fragment after its
  /// load (DecodeVEdgeMask; by default nothing).
  template <class Cfg, Dtype kDtype, class KvLayout, class KDone = DecodeNoHook, class VWait = DecodeNoHook,
            class VMask = DecodeNoVMask>
  __device__ __forceinline__ void attend(const DecodeParams& p, const std::uint16_t* sQ,
                                         const std::uint16_t* sK, const std::uint16_t* sV, const KvLayout& kv,
                                         int n0, int key0, int pad, int end, int lane, KDone k_done = {},
                                         VWait v_wait = {}, VMask v_mask = {}) {
    using Traits = cuda_prefill::ElementTraits<kDtype>;
    constexpr float kLog2e = 1.4426950408889634f;
    const int t = lane % 4;

    // S = Q K^T for the warp's keys (two n8 tiles).
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    const std::uint32_t k_addr = kBoundLayout ? cuda_detail::smem_u32(sK) + k_lane : 0;
    const std::uint32_t q_addr = kBoundLayout && !kQInRegisters ? cuda_detail::smem_u32(sQ) + q_lane : 0;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      std::uint32_t a_loaded[4], bk[4];
      if constexpr (!kQInRegisters) {
        if constexpr (kBoundLayout) ldsm_x4((q_addr + (ks / 4) * kQBlockBytes) ^ ((ks % 4) * 32), a_loaded);
        else load_q_step<Cfg>(sQ, ks, lane, a_loaded);
      }
      const std::uint32_t(&a)[4] = kQInRegisters ? q_frag[ks] : a_loaded;
      if constexpr (kBoundLayout) {
        ldsm_x4((k_addr + (ks / 4) * block_bytes) ^ ((ks % 4) * 32), bk);
      } else {
        cute::SM75_U32x4_LDSM_N::copy(
            *reinterpret_cast<const cute::uint128_t*>(sK + kv.offset(key0 + (lane % 8) + ((lane / 8) / 2) * 8, ks * 2 + (lane / 8) % 2)),
            bk[0], bk[1], bk[2], bk[3]);
      }
      Traits::Mma::fma(s[0][0], s[0][1], s[0][2], s[0][3], a[0], a[1], a[2], a[3], bk[0], bk[1],
                       s[0][0], s[0][1], s[0][2], s[0][3]);
      Traits::Mma::fma(s[1][0], s[1][1], s[1][2], s[1][3], a[0], a[1], a[2], a[3], bk[2], bk[3],
                       s[1][0], s[1][1], s[1][2], s[1][3]);
    }
    k_done();

    // Mask, softcap, ALiBi, online softmax (log2 domain). `plain`: no softcap or ALiBi and every
    // key of the warp visible to every row (row i sits at slot end - Sq + i), so a score is just
    // scaled (rows past the CTA's packed rows have zero queries: finite scores, never stored).
    // Otherwise every score takes the general path. Rows 8..15 are skipped when the CTA has none
    // (GQA groups of <= 8 heads at Sq = 1): half the softmax work.
    const int slot_base = n0 + key0 + 2 * t;
    const bool plain = plain_keys.covers(n0 + key0, n0 + key0 + Cfg::kWarpKeys - 1);
    const float scale_log2 = p.scale * kLog2e;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      if (hr == 1 && !upper_rows) {
        s[0][2] = s[0][3] = s[1][2] = s[1][3] = 0.0f;
        continue;
      }
      float tile_max = -INFINITY;
      if (plain) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            s[nt][hr * 2 + e] *= scale_log2;
            tile_max = fmaxf(tile_max, s[nt][hr * 2 + e]);
          }
      } else {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = row[hr].score(p, s[nt][hr * 2 + e], slot_base + nt * 8 + e, pad, end);
            s[nt][hr * 2 + e] = x;
            tile_max = fmaxf(tile_max, x);
          }
      }
      tile_max = cuda_prefill::quad_max(tile_max);
      const float m_new = fmaxf(row_max[hr], tile_max);
      const float factor = m_new == -INFINITY ? 1.0f : cuda_prefill::fast_exp2(row_max[hr] - m_new);
      row_max[hr] = m_new;
      row_sum[hr] *= factor;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        acc_o[dt][hr * 2] *= factor;
        acc_o[dt][hr * 2 + 1] *= factor;
      }
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pv = cuda_prefill::fast_exp2(s[nt][hr * 2 + e] - m_use);
          s[nt][hr * 2 + e] = pv;
          row_sum[hr] += pv;
        }
    }

    // O += P V: the warp's 16 keys are one k16 step.
    const std::uint32_t pa[4] = {Traits::pack(s[0][0], s[0][1]), Traits::pack(s[0][2], s[0][3]),
                                 Traits::pack(s[1][0], s[1][1]), Traits::pack(s[1][2], s[1][3])};
    v_wait();
    const std::uint32_t v_addr = kBoundLayout ? cuda_detail::smem_u32(sV) + v_lane : 0;
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      std::uint32_t bv[4];
      if constexpr (kBoundLayout) {
        ldsm_x4_trans((v_addr + (dp / 4) * block_bytes) ^ ((dp % 4) * 32), bv);
      } else {
        cute::SM75_U16x8_LDSM_T::copy(
            *reinterpret_cast<const cute::uint128_t*>(sV + kv.offset(key0 + (lane % 8) + ((lane / 8) % 2) * 8, dp * 2 + (lane / 8) / 2)),
            bv[0], bv[1], bv[2], bv[3]);
      }
      v_mask(bv);
      float* o0 = acc_o[2 * dp];
      float* o1 = acc_o[2 * dp + 1];
      Traits::Mma::fma(o0[0], o0[1], o0[2], o0[3], pa[0], pa[1], pa[2], pa[3], bv[0], bv[1], o0[0], o0[1], o0[2], o0[3]);
      Traits::Mma::fma(o1[0], o1[1], o1[2], o1[3], pa[0], pa[1], pa[2], pa[3], bv[2], bv[3], o1[0], o1[1], o1[2], o1[3]);
    }
  }

  /// decode_merge_warps' first step: this warp's O rows, max and sum of the CTA's `rows` rows into
  /// mO [row][stride] / mM / mL (this warp's slices).
  template <int kStride>
  __device__ __forceinline__ void store_for_merge(float* mO, float* mM, float* mL, int rows, int lane) const {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = g + hr * 8;
      const float sum = cuda_prefill::quad_sum(row_sum[hr]);
      if (r >= rows) continue;
      if (t == 0) {
        mM[r] = row_max[hr];
        mL[r] = sum;
      }
      float* orow = mO + r * kStride;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<float2*>(orow + dt * 8 + 2 * t) = make_float2(acc_o[dt][hr * 2], acc_o[dt][hr * 2 + 1]);
    }
  }
};

/// Row stride (floats) of the per-warp O rows in decode_merge_warps: 4 floats of padding put the
/// eight rows a warp's lanes store at once on distinct banks (a stride of kHeadDim gave 8-way
/// conflicts).
template <int kHeadDim>
constexpr int decode_merge_row_stride() {
  return kHeadDim + 4;
}

/// Shared-memory bytes decode_merge_warps needs: per-warp O rows, max and sum.
template <int kHeadDim>
constexpr int decode_merge_bytes() {
  return kDecodeWarps * kDecodeRows * (decode_merge_row_stride<kHeadDim>() + 2) * 4;
}

/// Where packed row pm of (b, kvh) is stored: the element offset of its value 0 and the index of
/// its LSE, and its query head (for its sink). A kernel that stores many chunks of a row works this
/// out once per row (it divides by seqlen_q), or once per lane and hands it round by shuffles.
struct DecodeValueSlot {
  std::int64_t value, lse;
  int head;
};

/// Packed row pm of KV head kvh: query row i (< seqlen_q) of query head h.
struct DecodeQueryRow {
  int i, h;
  // One query row per sequence (plain decode) without the division: pm / seqlen_q and pm %
  // seqlen_q are ~20 dependent instructions on every CTA's tail.
  __device__ __forceinline__ DecodeQueryRow(const DecodeParams& p, int kvh, int pm)
      : i(p.seqlen_q == 1 ? 0 : pm % p.seqlen_q), h(kvh * p.group + (p.seqlen_q == 1 ? pm : pm / p.seqlen_q)) {}
};

/// The row's place in out and lse.
__device__ __forceinline__ DecodeValueSlot decode_output_slot(const DecodeParams& p, int b, int kvh, int pm) {
  const DecodeQueryRow q(p, kvh, pm);
  return {b * p.out_batch_stride + std::int64_t(q.i) * p.out_row_stride + std::int64_t(q.h) * p.out_head_stride,
          b * p.lse_batch_stride + std::int64_t(q.h) * p.lse_head_stride + std::int64_t(q.i) * p.lse_row_stride, q.h};
}

/// With one split the row's place in out and lse; with several, the work's partial state's in
/// partial_o and partial_lse (for the combine kernel).
__device__ __forceinline__ DecodeValueSlot decode_value_slot(const DecodeParams& p, const DecodeWork& w, int kvh,
                                                             int pm) {
  if (w.splits == 1) return decode_output_slot(p, w.b, kvh, pm);
  const DecodeQueryRow q(p, kvh, pm);
  const std::int64_t state = (std::int64_t(w.state_row) * p.heads_q + q.h) * p.seqlen_q + q.i;
  return {state * p.head_dim, state, q.h};
}

/// Stores values v (columns c .. c + 3) of the finished row at `at` (decode_output_slot) into out
/// and, from column 0, its LSE into lse (when asked for): one 8-byte store where aligned. With
/// sinks (and kFoldSink: false where the caller has folded them), the row's sink is folded in
/// first: the state (0, sinks[h]) merged with (v, lse). Every thread that stores a chunk of the row
/// works out the same weight from the same inputs.
template <Dtype kDtype, bool kFoldSink = true>
__device__ __forceinline__ void decode_store_output4_at(const DecodeParams& p, const DecodeValueSlot& at, int c,
                                                        float4 v, float lse) {
  using T = typename Elem<kDtype>::T;
  if (kFoldSink && p.sinks) {
    const MergeWeights w = merge_weights(lse, p.sinks[at.head * p.sinks_stride]);
    v.x *= w.w_a, v.y *= w.w_a, v.z *= w.w_a, v.w *= w.w_a;
    lse = w.lse;
  }
  Elem<kDtype>::store4(static_cast<T*>(p.out) + at.value + c, v);
  if (p.lse && c == 0) p.lse[at.lse] = lse;
}
template <Dtype kDtype>
__device__ __forceinline__ void decode_store_output4(const DecodeParams& p, int b, int kvh, int pm, int c, float4 v,
                                                     float lse) {
  decode_store_output4_at<kDtype>(p, decode_output_slot(p, b, kvh, pm), c, v, lse);
}

/// decode_store_output4_at for a work of one split; with several, into its partial state at `at`
/// (decode_value_slot; one 16-byte store, the workspace rows being 16-byte aligned).
template <Dtype kDtype, bool kFoldSink = true>
__device__ __forceinline__ void decode_store_value4_at(const DecodeParams& p, const DecodeWork& w,
                                                       const DecodeValueSlot& at, int c, float4 v, float lse) {
  if (w.splits == 1) {
    decode_store_output4_at<kDtype, kFoldSink>(p, at, c, v, lse);
  } else {
    *reinterpret_cast<float4*>(p.partial_o + at.value + c) = v;
    if (c == 0) p.partial_lse[at.lse] = lse;
  }
}
template <Dtype kDtype>
__device__ __forceinline__ void decode_store_value4(const DecodeParams& p, const DecodeWork& w, int kvh, int pm, int c,
                                                    float4 v, float lse) {
  decode_store_value4_at<kDtype>(p, w, decode_value_slot(p, w, kvh, pm), c, v, lse);
}

/// log2(x) with the hardware approximation, denormal inputs flushed (decode_merge_warps: x >= 1).
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// Merges the kDecodeWarps warps' states (DecodeWarpState or DecodeWarpStateNarrow) through `merge_smem` (decode_merge_bytes() bytes, free
/// for reuse) and hands the values of the CTA's rows to `store(r, c, val, lse)` four at a time
/// (r: row of the CTA's block; columns c .. c + 3, c a multiple of 4 below head_dim; val a float4
/// of normalised values, lse the row's natural-log LSE). `sync` is a barrier over the
/// kDecodeWarps * 32 consumer threads (thread index `tid`); the caller has synchronised them
/// before merge_smem is reused.
///
/// Two steps: every warp stores its rows' O, max and sum; after one barrier, each thread that
/// combines a chunk of four columns works out its row's weights (exp2(max_w - max) / sum, one per
/// warp) and LSE itself, then takes the 4-term dot products. A row's threads all compute the same
/// weights from the same inputs. This saves the barrier and the dependent chain of a separate
/// one-thread-per-row weight step: with it, the merge took 0.83 us of the 1.4 us from a CTA's last
/// tile to its exit on the H200, 0.1-0.15 us more than now (traced; bench/NOTES.md, session 19).
/// (Weights for every value, as before session 4, cost ~2.5 us per CTA: a division, four
/// exponentials and a logarithm per value; here they are worked out once per chunk of four.)
/// Rows past the CTA's packed rows are neither stored nor merged.
/// The weights, the reciprocal and the LSE's log2 use the hardware approximations (fast_exp2,
/// __fdividef, fast_log2): with DecodeQueryRow's division-free plain decode, 0.2-0.5 us faster at
/// head_dim 256 GQA 8 batch 8 / 1k and MHA batch 128 / 1k on the H200 (bench/NOTES.md, session 55).
template <int kHeadDim, class State, class Sync, class Store>
__device__ __forceinline__ void decode_merge_warps(const DecodeParams& p, const State& st, float* merge_smem, int mb,
                                                   int tid, Sync sync, Store store) {
  constexpr int kThreads = kDecodeWarps * 32, kStride = decode_merge_row_stride<kHeadDim>();
  const int warp = tid / 32, lane = tid % 32;
  const int rows = decode_block_rows(p.group * p.seqlen_q, mb);  // packed rows of the CTA
  float* mO = merge_smem;                                   // [warp][row][kStride]
  float* mM = mO + kDecodeWarps * kDecodeRows * kStride;    // [warp][row] max (log2)
  float* mL = mM + kDecodeWarps * kDecodeRows;              // [warp][row] sum
  st.template store_for_merge<kStride>(mO + warp * kDecodeRows * kStride, mM + warp * kDecodeRows,
                                       mL + warp * kDecodeRows, rows, lane);
  sync();
  constexpr float kLn2 = 0.6931471805599453f;
  static_assert(kStride % 4 == 0, "O rows are 16-byte aligned");
  constexpr int kChunks = kHeadDim / 4;  // float4 columns per row
  for (int idx = tid; idx < rows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks * 4;
    if (c >= p.head_dim) continue;  // head_dim is a multiple of 8: a chunk is all in or all out
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) m = fmaxf(m, mM[w * kDecodeRows + r]);
    float f[kDecodeWarps], l = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      f[w] = m == -INFINITY ? 0.0f : cuda_prefill::fast_exp2(mM[w * kDecodeRows + r] - m);  // 0 for an empty warp
      l += mL[w * kDecodeRows + r] * f[w];
    }
    // l >= 1 when the row has a key (its max warp adds 2^0 for its max key): the approximate
    // reciprocal and logarithm need none of the denormal paths of 1 / l and log2f.
    const float inv = l > 0.0f ? __fdividef(1.0f, l) : 0.0f;  // an empty row: output 0
    float4 val = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float4 o = *reinterpret_cast<const float4*>(mO + (w * kDecodeRows + r) * kStride + c);
      const float wt = f[w] * inv;
      val.x += o.x * wt, val.y += o.y * wt, val.z += o.z * wt, val.w += o.w * wt;
    }
    store(r, c, val, l > 0.0f ? (m + fast_log2(l)) * kLn2 : -INFINITY);
  }
}

/// The key tiles of split `split` of `splits`: tiles of block_n slots covering every slot a row may see, and
/// the order a CTA walks them in. Walks count positions t_begin .. t_end - 1 and read tile_at(pos)
/// for the tile there: the tiles in order, or (DecodeParams::quarter_min_slots) the first 4 * part
/// of them as four interleaved quarters (t_begin, t_begin + part, t_begin + 2 part, t_begin +
/// 3 part, t_begin + 1, ...), then the last n % 4 in order. The order depends only on the split's
/// own tiles, so the bitwise rule holds; online softmax takes tiles in any order.
struct DecodeSplitRange {
  int t_begin, t_end;  ///< tile indices (tile t = slots t * block_n ...)
  int lo, hi;          ///< slots [lo, hi) any row may see
  int part;            ///< tiles per interleaved quarter; 0: the tiles in order
  __device__ __forceinline__ DecodeSplitRange(const DecodeParams& p, int pad, int end, int split, int splits,
                                              int block_n) {
    lo = pad;
    hi = end;
    if (p.window_left >= 0) lo = max(lo, end - p.seqlen_q - p.window_left);
    if (p.window_right >= 0) hi = min(hi, end - 1 + p.window_right + 1);
    const int t_first = lo / block_n;
    const int total_tiles = hi > lo ? (hi + block_n - 1) / block_n - t_first : 0;
    const int per_split = (total_tiles + splits - 1) / splits;
    t_begin = t_first + split * per_split;
    t_end = min(t_first + total_tiles, t_begin + per_split);
    const int n = t_end - t_begin;
    part = p.quarter_min_slots > 0 && n >= 4 && std::int64_t(n) * block_n >= p.quarter_min_slots ? n / 4 : 0;
  }
  __device__ __forceinline__ int tile_at(int pos) const {
    const int i = pos - t_begin;
    return part == 0 || i >= 4 * part ? pos : t_begin + (i & 3) * part + (i >> 2);
  }
};

}  // namespace fastattn::cuda_decode
