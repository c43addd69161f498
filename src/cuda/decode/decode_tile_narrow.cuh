// The decode math for CTAs of at most 8 packed query rows (GQA groups of <= 8 heads at Sq = 1, and
// MHA), with the keys on the MMA's M side: S^T = K Q^T and O^T += V^T P^T on m16n8k16.
//
// Why: a CTA streaming a small batch is bound by its consumer warps' instruction stream, not by
// memory: one warp per scheduler issues about one instruction every 4.5 cycles, and a 64-key tile
// cost ~280 instructions per warp (~0.67 us per tile at head_dim 128 on the H200, whatever the
// bytes or the pipeline depth; bench/NOTES.md). DecodeWarpState puts the query rows on the M
// side, 16 rows of which a GQA-4 CTA fills 4 and an MHA CTA 1. Here the 8 query rows are the N
// side: 16 MMAs per warp and tile instead of 32, Q stays in registers (no Q ldmatrix per tile),
// the two halves of the head_dim sum run as two independent MMA chains, the ldmatrix addresses
// are a per-lane base XOR an immediate (the 128-byte swizzle), and the O rescale is skipped when
// no row's max grew (a multiplication by exactly 1).
//
// Fragments (m16n8k16, g = lane / 4, t = lane % 4):
//   S^T (16 keys x 8 rows): s[0], s[1] = (key g, rows 2t, 2t + 1); s[2], s[3] = (key g + 8, ...)
//   O^T (16 dims x 8 rows) per 16-dim tile mt: acc_o[mt][0..1] = (dim 16 mt + g, rows 2t, 2t + 1),
//   acc_o[mt][2..3] = (dim 16 mt + g + 8, rows 2t, 2t + 1).
// P^T as the B operand needs (keys 2t, 2t + 1; row g): the transpose of the S^T fragment, done
// in registers by movmatrix.
//
// With kHeadsPerWarp = 4 (the head-group kernel's token-row form, MHA) a warp attends four KV heads
// at once: its 16 MMA keys are 4 heads x 4 slots (key k: head k / 4, slot k % 4) and its 8 columns
// the heads' packed rows one head after the other (column c: head c / rows, row c % rows). A score
// whose key and column belong to different heads is masked to -inf, so each column's softmax and
// P V see only its own head's keys and values.
#pragma once

#include <cute/arch/copy_sm75.hpp>

#include "cuda/common/mbarrier.cuh"

#include "cuda/decode/decode_tile.cuh"

namespace fastattn::cuda_decode {

/// The most packed query rows a CTA may have for DecodeWarpStateNarrow (the MMA's N).
constexpr int kDecodeNarrowRows = 8;

/// Transposes the 8 x 8 16-bit matrix whose fragment the warp holds (lane: row lane / 4, columns
/// 2 (lane % 4) and + 1) into the fragment of its transpose.
__device__ __forceinline__ std::uint32_t movmatrix_trans(std::uint32_t x) {
  std::uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

/// Max over the 8 lanes with the same lane % 4 (the g bits).
__device__ __forceinline__ float key_lanes_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}
__device__ __forceinline__ float key_lanes_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

/// What column c (< 8) of a warp's MMA is (its packed query rows): row pm of the warp's head
/// `head` (KV head kvh), or none (ok false). first_head: the warp's first KV head; rows: group x
/// seqlen_q. With one head per warp the columns are that head's rows.
template <int kHeadsPerWarp>
struct DecodeWarpColumn {
  int head, kvh, pm;
  bool ok;
  __device__ __forceinline__ DecodeWarpColumn(int first_head, int rows, int c) {
    if constexpr (kHeadsPerWarp == 1) {
      head = 0, kvh = first_head, pm = c, ok = c < rows;
    } else {
      head = c / rows;
      ok = head < kHeadsPerWarp;
      kvh = first_head + (ok ? head : 0), pm = c - head * rows;
    }
  }
};

/// One warp's state over the CTA's (<= 8) packed rows: O^T fragments, Q^T fragments, and per
/// lane the running max (log2 domain) and this lane's share of the sum for rows 2t and 2t + 1.
/// kHeadsPerWarp: 1, or 4 (see the file comment; then "row" means the warp's column).
template <int kHeadDim, int kHeadsPerWarp = 1>
struct DecodeWarpStateNarrow {
  static constexpr int KS = kHeadDim / 16;  ///< k16 steps of Q K^T, and 16-dim tiles of O^T
  static constexpr int kKeySlots = 16 / kHeadsPerWarp;  ///< slots per head among the 16 MMA keys
  static_assert(kHeadsPerWarp == 1 || kHeadsPerWarp == 4, "one head per warp, or 4 heads of 4 slots");
  float acc_o[KS][4];
  std::uint32_t q_frag[KS][2];  ///< B fragments of Q^T: (dims 16 ks + 2t .., row g), (+ 8 ..)
  float row_max[2], row_sum[2];
  DecodeRowMask row[2];  ///< lane rows 2t and 2t + 1
  // Byte offsets in a stage of the lane's ldmatrix row for K (k16 step 0) and V (dims 0-15), and
  // between 64-column blocks; see bind_layout.
  std::uint32_t k_lane, v_lane, block_bytes;
  DecodePlainKeys plain_keys;
  float scale_log2;  ///< softmax scale * log2(e)
  /// kHeadsPerWarp > 1: bit 2 kh + e set where s[2 kh + e] (key g + 8 kh, column 2t + e) pairs a
  /// key and a column of the same head.
  std::uint32_t same_head = 0xfu;

  /// kvh: the warp's (first) KV head.
  __device__ __forceinline__ void init(const DecodeParams& p, int b, int kvh, int pad, int end, int lane) {
    plain_keys.init(p, pad, end);
    scale_log2 = p.scale * 1.4426950408889634f;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = 2 * (lane % 4) + e;
      if constexpr (kHeadsPerWarp == 1) {
        row[e].init(p, b, kvh, col, end);
      } else {
        // Columns past the warp's heads get a row index their head does not have (never stored).
        const int rows = p.group * p.seqlen_q;
        const DecodeWarpColumn<kHeadsPerWarp> c(kvh, rows, col);
        row[e].init(p, b, c.kvh, c.ok ? c.pm : rows, end);
#pragma unroll
        for (int kh = 0; kh < 2; ++kh) {
          const int key = lane / 4 + 8 * kh;
          if (key / kKeySlots != c.head) same_head &= ~(1u << (2 * kh + e));
        }
      }
      row_max[e] = -INFINITY;
      row_sum[e] = 0.0f;
    }
#pragma unroll
    for (int mt = 0; mt < KS; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][e] = 0.0f;
  }

  /// The ldmatrix addresses of this lane for a stage laid out by `kv` (a 128-byte-swizzled layout
  /// whose 64-column blocks are block_bytes apart and whose rows start on 128 bytes): chunk c of a
  /// row sits at chunk (c ^ row) & 7 of its block, so with c = 2j + h (j < 4) the address is the
  /// h-chunk's address XOR 32 j bytes. (Where a row's place in the swizzle atom differs between
  /// its blocks, the layout's kBlockXorBytes says how: see block_address.)
  template <class KvLayout>
  __device__ __forceinline__ void bind_layout(const KvLayout& kv, int key0, int lane) {
    k_lane = 2 * kv.offset(key0 + (lane % 8) + ((lane / 8) % 2) * 8, lane / 16);
    v_lane = 2 * kv.offset(key0 + (lane % 8) + (lane / 16) * 8, (lane / 8) % 2);
    block_bytes = 2 * kv.block_elems();
    // Opaque to the compiler: kept in registers, not recomputed from the thread index every tile
    // (it did, ~20 instructions per tile).
    asm volatile("" : "+r"(k_lane), "+r"(v_lane), "+r"(block_bytes));
  }

  /// Q^T fragments from the staged Q (rows past the CTA's are zeros): matrices j = 0..3 of an
  /// ldmatrix.x4 are rows 0..7 at 16-byte chunks 4i + j, i.e. the two halves of k16 steps 2i and
  /// 2i + 1.
  template <class Cfg>
  __device__ __forceinline__ void load_q(const std::uint16_t* sQ, int lane) {
#pragma unroll
    for (int i = 0; i < KS / 2; ++i)
      cute::SM75_U32x4_LDSM_N::copy(
          *reinterpret_cast<const cute::uint128_t*>(sQ + Cfg::q_offset(lane % 8, 4 * i + lane / 8)),
          q_frag[2 * i][0], q_frag[2 * i][1], q_frag[2 * i + 1][0], q_frag[2 * i + 1][1]);
  }

  /// The address of 64-column block cb of the lane's ldmatrix row, from block 0's.
  template <class KvLayout>
  __device__ __forceinline__ std::uint32_t block_address(std::uint32_t addr0, int cb) const {
    return (addr0 + cb * block_bytes) ^ (cb * KvLayout::kBlockXorBytes);
  }

  /// Slot of MMA key `key` from the warp's first slot.
  static __device__ __forceinline__ int key_slot(int key) { return kHeadsPerWarp == 1 ? key : key % kKeySlots; }

  /// Attends the warp's 16 keys (rows key0 .. key0 + 15 of the staged tile, slots n0 + key0 ...;
  /// with kHeadsPerWarp > 1, 4 slots n0 + key0 ... of each of its heads), addressed as bind_layout
  /// said. sQ and kv are unused (Q is in q_frag); the signature matches
  /// DecodeWarpState::attend.
  template <class Cfg, Dtype kDtype, class KvLayout, class KDone = DecodeNoHook, class VWait = DecodeNoHook>
  __device__ __forceinline__ void attend(const DecodeParams& p, const std::uint16_t* /*sQ*/,
                                         const std::uint16_t* sK, const std::uint16_t* sV, const KvLayout& /*kv*/,
                                         int n0, int key0, int pad, int end, int lane, KDone k_done = {},
                                         VWait v_wait = {}) {
    using Traits = cuda_prefill::ElementTraits<kDtype>;
    const int g = lane / 4;

    // S^T = K Q^T: even and odd k16 steps in two chains, summed after.
    const std::uint32_t k_addr = cuda_detail::smem_u32(sK) + k_lane;
    float c[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      std::uint32_t a[4];
      ldsm_x4(block_address<KvLayout>(k_addr, ks / 4) ^ ((ks % 4) * 32), a);
      float* d = c[ks % 2];
      Traits::Mma::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], q_frag[ks][0], q_frag[ks][1], d[0], d[1],
                       d[2], d[3]);
    }
    float s[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) s[j] = c[0][j] + c[1][j];
    k_done();

    // Mask, softcap, ALiBi, online softmax per row 2t + e over the warp's 16 keys (as in
    // DecodeWarpState::attend; `plain`: no per-score masks).
    const int k_first = n0 + key0;
    const bool plain = plain_keys.covers(k_first, k_first + Cfg::kWarpKeys - 1);
    float tile_max[2];
    if (plain) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[j] *= scale_log2;
        if constexpr (kHeadsPerWarp > 1) s[j] = same_head >> j & 1u ? s[j] : -INFINITY;
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) tile_max[e] = fmaxf(s[e], s[2 + e]);
    } else {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        tile_max[e] = -INFINITY;
#pragma unroll
        for (int kh = 0; kh < 2; ++kh) {
          float x = row[e].score(p, s[2 * kh + e], k_first + key_slot(g + 8 * kh), pad, end);
          if constexpr (kHeadsPerWarp > 1) x = same_head >> (2 * kh + e) & 1u ? x : -INFINITY;
          s[2 * kh + e] = x;
          tile_max[e] = fmaxf(tile_max[e], x);
        }
      }
    }
    float m_new[2];
    bool grew = false;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      m_new[e] = fmaxf(row_max[e], key_lanes_max(tile_max[e]));
      grew |= m_new[e] != row_max[e];
    }
    // A row whose max did not grow has factor exactly 1: skip the multiplications when no row of
    // the warp grew (most tiles once the max has settled).
    if (__any_sync(0xffffffffu, grew)) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float factor = m_new[e] == -INFINITY ? 1.0f : cuda_prefill::fast_exp2(row_max[e] - m_new[e]);
        row_sum[e] *= factor;
#pragma unroll
        for (int mt = 0; mt < KS; ++mt) {
          acc_o[mt][e] *= factor;
          acc_o[mt][2 + e] *= factor;
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      row_max[e] = m_new[e];
      const float m_use = m_new[e] == -INFINITY ? 0.0f : m_new[e];
#pragma unroll
      for (int kh = 0; kh < 2; ++kh) {
        const float pv = cuda_prefill::fast_exp2(s[2 * kh + e] - m_use);
        s[2 * kh + e] = pv;
        row_sum[e] += pv;
      }
    }

    // O^T += V^T P^T: P^T's B fragments are the transposed S^T fragments of keys 0-7 and 8-15.
    const std::uint32_t b0 = movmatrix_trans(Traits::pack(s[0], s[1]));
    const std::uint32_t b1 = movmatrix_trans(Traits::pack(s[2], s[3]));
    v_wait();
    const std::uint32_t v_addr = cuda_detail::smem_u32(sV) + v_lane;
#pragma unroll
    for (int mt = 0; mt < KS; ++mt) {
      std::uint32_t a[4];
      ldsm_x4_trans(block_address<KvLayout>(v_addr, mt / 4) ^ ((mt % 4) * 32), a);
      float* o = acc_o[mt];
      Traits::Mma::fma(o[0], o[1], o[2], o[3], a[0], a[1], a[2], a[3], b0, b1, o[0], o[1], o[2], o[3]);
    }
  }

  /// decode_merge_warps' first step: this warp's O rows, max and sum of the CTA's `rows` rows into
  /// mO [row][stride] / mM / mL (this warp's slices).
  template <int kStride>
  __device__ __forceinline__ void store_for_merge(float* mO, float* mM, float* mL, int rows, int lane) const {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = 2 * t + e;
      const float sum = key_lanes_sum(row_sum[e]);
      if (r >= rows) continue;
      if (g == 0) {
        mM[r] = row_max[e];
        mL[r] = sum;
      }
      float* orow = mO + r * kStride;
#pragma unroll
      for (int mt = 0; mt < KS; ++mt) {
        orow[16 * mt + g] = acc_o[mt][e];
        orow[16 * mt + g + 8] = acc_o[mt][2 + e];
      }
    }
  }
};

}  // namespace fastattn::cuda_decode
