// fastattn C++ tests: host buffers and a naive double-precision reference.
//
// Nothing here includes or calls code from src/: the reference is written from the semantics in
// include/fastattn/ops.h and shared/DESIGN.md, directly and slowly, in double precision. The only
// library types used are the plain structs of the public headers (DType, Device, TensorView),
// whose fields are filled in by hand here (not through make_view).
//
// Conventions of the reference:
//  * Logical arrays are std::vector<double> in row-major order of the documented shape.
//  * Scores: s = q.k * scale; softcap: s = c * tanh(s / c); ALiBi: s -= slope * |qpos - kpos|,
//    qpos = i + Sk - Sq (bottom-right alignment), kpos = j.
//  * Query i sees key j iff qpos - left <= j <= qpos + right (-1 = unbounded; causal => right = 0).
//  * LSE is natural log; a row that sees no key gives out 0 and LSE -inf.
//  * "Naive in dtype" (the FlashAttention test criterion): the same computation as a naive
//    implementation in the input dtype (torch-style matmuls: float32 accumulation, result
//    stored in the dtype) would do it: q*scale rounded to the dtype; scores = sequential float32
//    sum of q.k, rounded to the dtype; softcap and ALiBi results rounded to the dtype; softmax
//    in float32 (max, exp, sum); P rounded to the dtype; out = sequential float32 sum of P.v,
//    rounded to the dtype; LSE = float32 max + log(sum). For float32 inputs this is exactly a
//    naive float32 implementation. Its error against the double reference sets the tolerance.
#pragma once

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "fastattn/tensor.h"

namespace fa_ref {

using fastattn::DType;
using fastattn::TensorView;

// ---- number formats -------------------------------------------------------------------------

/// float16 bits of `x` rounded to nearest, ties to even (overflow -> inf, NaN kept).
std::uint16_t double_to_half_bits(double x);
double half_bits_to_double(std::uint16_t h);
/// bfloat16 bits of `x` rounded to nearest, ties to even.
std::uint16_t double_to_bf16_bits(double x);
double bf16_bits_to_double(std::uint16_t b);
/// `x` rounded through `dtype` (float32 / float16 / bfloat16; int types: truncation to integer).
double round_to(DType dtype, double x);
/// Unit roundoff (half an ulp at 1.0) of a float dtype: 2^-24, 2^-11, 2^-8.
double unit_roundoff(DType dtype);
/// Spacing of the float `dtype` at magnitude |x| (ulp).
double ulp_of(DType dtype, double x);
const char* dtype_str(DType dtype);
std::size_t elem_size(DType dtype);

// ---- host tensors ---------------------------------------------------------------------------

/// How a HostTensor's elements are laid out in its storage.
struct Layout {
  /// Memory order of the dimensions, outermost first (a permutation of 0..ndim-1 whose last
  /// entry is ndim-1, so the last dimension stays contiguous). Empty = row-major.
  std::vector<int> order;
  /// Extra elements added to each dimension's extent in memory (0 = dense). Indexed by dim.
  std::vector<std::int64_t> pad;
  /// Elements of storage before the first element.
  std::int64_t front = 0;

  static Layout contiguous() { return {}; }
  /// A random non-contiguous layout for `ndim` dims: the non-last dims permuted, every dim but
  /// the last padded by 0..3 elements, some elements in front.
  static Layout random_strided(int ndim, std::mt19937_64& rng);
};

/// An owned host buffer plus its shape and strides; hands out a fastattn::TensorView.
/// Bytes of the storage that belong to no element ("gaps") are filled with kGapByte so that a
/// test can see whether anything wrote outside the view.
class HostTensor {
 public:
  static constexpr unsigned char kGapByte = 0xA5;

  HostTensor() = default;
  HostTensor(DType dtype, std::vector<std::int64_t> shape, const Layout& layout = Layout{});

  DType dtype() const { return dtype_; }
  const std::vector<std::int64_t>& shape() const { return shape_; }
  const std::vector<std::int64_t>& strides() const { return strides_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  std::int64_t numel() const;
  std::int64_t size(int d) const { return shape_[static_cast<std::size_t>(d)]; }

  /// The view (CPU device unless `set_device` changed it).
  TensorView view() const;
  void set_device(fastattn::Device device) { device_ = device; }

  /// Storage offset (elements, from the storage start) of the element with row-major index
  /// `linear`.
  std::int64_t storage_offset(std::int64_t linear) const;
  double get(std::int64_t linear) const;
  /// Stores `value` rounded through the dtype.
  void set(std::int64_t linear, double value);
  double at(std::initializer_list<std::int64_t> idx) const;
  std::vector<double> values() const;
  void assign(const std::vector<double>& values);
  /// Every element = NaN (float types) or 0x7fffffff-like garbage (int types); gaps untouched.
  void poison();
  /// Raw bytes of the whole storage (elements and gaps).
  const std::vector<unsigned char>& bytes() const { return bytes_; }
  /// For every storage byte: true when it belongs to an element.
  std::vector<bool> element_byte_mask() const;
  /// True when every gap byte still holds kGapByte.
  bool gaps_intact() const;

 private:
  DType dtype_ = DType::kFloat32;
  fastattn::Device device_{};
  std::vector<std::int64_t> shape_, strides_;
  std::int64_t front_ = 0;
  std::vector<unsigned char> bytes_;
};

/// A tensor of `shape` with i.i.d. N(0, sigma^2) values rounded through `dtype`.
HostTensor random_tensor(DType dtype, const std::vector<std::int64_t>& shape, std::mt19937_64& rng,
                         const Layout& layout = Layout{}, double sigma = 1.0);
/// int32 tensor with the given values.
HostTensor int_tensor(const std::vector<std::int64_t>& values, const Layout& layout = Layout{});
HostTensor int_tensor_shaped(const std::vector<std::int64_t>& values,
                             const std::vector<std::int64_t>& shape, const Layout& layout = Layout{});
/// float32 tensor with the given values.
HostTensor float_tensor(const std::vector<double>& values, const std::vector<std::int64_t>& shape);

// ---- reference attention --------------------------------------------------------------------

struct RefOptions {
  std::optional<double> softmax_scale;  ///< unset: 1/sqrt(D)
  bool causal = false;
  std::int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
  /// ALiBi slopes: empty, Hq values, or B*Hq values (row-major (B, Hq)).
  std::vector<double> alibi;
  bool alibi_per_batch = false;
  /// Attention sinks: empty, or Hq values; sinks[h] joins every softmax of head h as one more
  /// logit with a zero value row (the probs cover the keys only).
  std::vector<double> sinks;

  bool local() const { return window_left >= 0 || window_right >= 0; }
  double slope(std::int64_t b, std::int64_t h, std::int64_t Hq) const;
};

/// One sequence: q (Sq, Hq, D), k/v (Sk, Hkv, D), all logical doubles.
struct SeqIn {
  std::int64_t Sq = 0, Sk = 0;
  std::vector<double> q, k, v;
};
/// out (Sq, Hq, D), lse (Hq, Sq), probs (Hq, Sq, Sk).
struct SeqOut {
  std::vector<double> out, lse, probs;
};

/// Attention of one sequence (batch index `b`, used for per-batch ALiBi). With `round` set, the
/// computation is the "naive in dtype" one (see the file comment).
SeqOut attend_sequence(const SeqIn& in, std::int64_t b, std::int64_t Hq, std::int64_t Hkv,
                       std::int64_t D, const RefOptions& opt,
                       std::optional<DType> round = std::nullopt);

/// Result of a batched/packed op in the op's output layouts.
struct AttnRef {
  std::vector<double> out;    ///< same layout as the op's out
  std::vector<double> lse;    ///< same layout as the op's lse
  std::vector<double> probs;  ///< same layout as the op's probs (when meaningful)
};

/// Dense batched attention: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D).
AttnRef ref_attention(const std::vector<double>& q, const std::vector<double>& k,
                      const std::vector<double>& v, std::int64_t B, std::int64_t Sq,
                      std::int64_t Sk, std::int64_t Hq, std::int64_t Hkv, std::int64_t D,
                      const RefOptions& opt, std::optional<DType> round = std::nullopt);

/// Keys/values of one sequence gathered out of a paged cache (num_pages, page_size, Hkv, D):
/// key j is in page pages[j / page_size], slot j % page_size. Returns (len, Hkv, D).
std::vector<double> gather_paged(const std::vector<double>& pages_data, std::int64_t page_size,
                                 std::int64_t Hkv, std::int64_t D,
                                 const std::vector<std::int64_t>& pages, std::int64_t len);

/// Varlen attention over per-sequence gathered keys. q (total_q, Hq, D) with cu_q; keys[b] /
/// values[b] are (Sk_b, Hkv, D). out (total_q, Hq, D), lse (Hq, total_q),
/// probs (B, Hq, max_q, max_k) zero padded.
AttnRef ref_varlen(const std::vector<double>& q, const std::vector<std::int64_t>& cu_q,
                   const std::vector<std::vector<double>>& keys,
                   const std::vector<std::vector<double>>& values, std::int64_t Hq,
                   std::int64_t Hkv, std::int64_t D, std::int64_t max_q, std::int64_t max_k,
                   const RefOptions& opt, std::optional<DType> round = std::nullopt);

/// Rotary embedding of the first `rotary_dim` dims of a D-vector at position `pos`;
/// cos/sin are (S_rot, rotary_dim / 2) row-major.
void apply_rotary(double* x, std::int64_t D, std::int64_t rotary_dim, bool interleaved,
                  const std::vector<double>& cos, const std::vector<double>& sin,
                  std::int64_t pos);

/// The KV-cache op, logically. The cache is described by its logical contents
/// (N0, N1, Hkv, D): contiguous -> (B_cache, S_cache, ...), paged -> (num_pages, page_size, ...),
/// and, for paged, the page list of every cache row.
struct KVCacheRefIn {
  std::int64_t B = 0, Sq = 0, Hq = 0, Hkv = 0, D = 0, Snew = 0;
  std::vector<double> q;                    ///< (B, Sq, Hq, D)
  std::vector<double> k_cache, v_cache;     ///< (N0, N1, Hkv, D)
  std::int64_t N0 = 0, N1 = 0;
  bool paged = false;
  std::vector<std::vector<std::int64_t>> row_pages;  ///< paged: pages of cache row c
  std::vector<double> k_new, v_new;         ///< (B, Snew, Hkv, D), empty when no append
  /// (B, Snew, Hkv, D) when non-empty: the already-rotated keys to store instead of rotating
  /// k_new (tests pass what the library stored, after checking it separately, so that the
  /// attention check does not count the unavoidable rounding of rotated keys to the dtype).
  std::vector<double> k_stored;
  /// When set (exact mode only): rotated q rounded to this dtype, as a kernel that rotates q in
  /// the input dtype does (FlashAttention's does).
  std::optional<DType> round_rotated_q;
  std::vector<double> rotary_cos, rotary_sin;  ///< (S_rot, rotary_dim / 2), empty when none
  std::int64_t rotary_dim = 0;
  bool rotary_interleaved = true;
  std::vector<std::int64_t> cache_seqlens;    ///< (B)
  std::vector<std::int64_t> cache_batch_idx;  ///< (B) or empty
  std::vector<std::int64_t> cache_leftpad;    ///< (B) or empty
};
struct KVCacheRefOut {
  AttnRef attn;                          ///< out (B, Sq, Hq, D), lse (B, Hq, Sq)
  std::vector<double> k_cache, v_cache;  ///< expected cache contents after the append (double)
  /// Logical element indices (into the (N0, N1, Hkv, D) cache) that the append writes.
  std::vector<std::int64_t> written;
};
/// With `round`, rotated q/k are also rounded through the dtype (as a naive in-dtype
/// implementation stores them) before the in-dtype attention.
KVCacheRefOut ref_kvcache(const KVCacheRefIn& in, const RefOptions& opt,
                          std::optional<DType> round = std::nullopt);

/// Merge of two states per (row, head): v (S, H, D), s (S, H).
void ref_merge_state(const std::vector<double>& va, const std::vector<double>& sa,
                     const std::vector<double>& vb, const std::vector<double>& sb,
                     std::int64_t S, std::int64_t H, std::int64_t D, std::vector<double>& v_out,
                     std::vector<double>& s_out);
/// Merge of N states: v (S, N, H, D), s (S, N, H) -> (S, H, D), (S, H).
void ref_merge_states(const std::vector<double>& v, const std::vector<double>& s, std::int64_t S,
                      std::int64_t N, std::int64_t H, std::int64_t D, std::vector<double>& v_out,
                      std::vector<double>& s_out);

// ---- comparisons ----------------------------------------------------------------------------

/// max |a - b| over finite pairs; +inf when one is NaN, or when exactly one is infinite, or when
/// both are infinite with different signs.
double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b);
/// max |a|.
double max_abs(const std::vector<double>& a);
bool any_nan(const std::vector<double>& a);

}  // namespace fa_ref
