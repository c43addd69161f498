// fastattn C++ tests: host buffers and the naive double-precision reference. See reference.h.
#include "reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>

namespace fa_ref {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

/// Round |x| (finite, non-zero) to a binary format with `frac_bits` fraction bits, minimum normal
/// exponent `emin`, largest finite value `max_finite`; ties to even (nearbyint in the default
/// rounding mode). The scaling by a power of two is exact, so this is a single rounding.
double round_format(double x, int frac_bits, int emin, double max_finite) {
  if (!std::isfinite(x) || x == 0.0) return x;
  const double ax = std::fabs(x);
  int e = 0;
  std::frexp(ax, &e);  // ax = m * 2^e, m in [0.5, 1)
  int E = e - 1;       // ax in [2^E, 2^(E+1))
  if (E < emin) E = emin;  // subnormal range: fixed spacing
  const double ulp = std::ldexp(1.0, E - frac_bits);
  double r = std::nearbyint(ax / ulp) * ulp;
  if (r > max_finite) r = kInf;
  return std::copysign(r, x);
}

constexpr double kHalfMax = 65504.0;
const double kBf16Max = std::ldexp(255.0, 120);  // (2 - 2^-7) * 2^127

}  // namespace

std::uint16_t double_to_half_bits(double x) {
  if (std::isnan(x)) return 0x7e00;
  const double r = round_format(x, 10, -14, kHalfMax);
  const std::uint16_t sign = std::signbit(r) ? 0x8000 : 0;
  const double ar = std::fabs(r);
  if (std::isinf(ar)) return sign | 0x7c00;
  if (ar == 0.0) return sign;
  int e = 0;
  std::frexp(ar, &e);
  const int E = e - 1;
  if (E < -14) {  // subnormal: value = mant * 2^-24
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(std::ldexp(ar, 24)));
  }
  const auto mant = static_cast<std::uint16_t>((std::ldexp(ar, -E) - 1.0) * 1024.0);
  return static_cast<std::uint16_t>(sign | ((E + 15) << 10) | mant);
}

double half_bits_to_double(std::uint16_t h) {
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  if (exp == 0x1f) return mant ? std::numeric_limits<double>::quiet_NaN() : sign * kInf;
  if (exp == 0) return sign * std::ldexp(static_cast<double>(mant), -24);
  return sign * std::ldexp(1.0 + mant / 1024.0, exp - 15);
}

std::uint16_t double_to_bf16_bits(double x) {
  if (std::isnan(x)) return 0x7fc0;
  const double r = round_format(x, 7, -126, kBf16Max);
  const float f = static_cast<float>(r);  // exact: every bfloat16 value is a float
  std::uint32_t u = 0;
  std::memcpy(&u, &f, 4);
  return static_cast<std::uint16_t>(u >> 16);
}

double bf16_bits_to_double(std::uint16_t b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float f = 0.0f;
  std::memcpy(&f, &u, 4);
  return static_cast<double>(f);
}

double round_to(DType dtype, double x) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<double>(static_cast<float>(x));
    case DType::kFloat16: return half_bits_to_double(double_to_half_bits(x));
    case DType::kBFloat16: return bf16_bits_to_double(double_to_bf16_bits(x));
    default: return std::trunc(x);
  }
}

double unit_roundoff(DType dtype) {
  switch (dtype) {
    case DType::kFloat16: return std::ldexp(1.0, -11);
    case DType::kBFloat16: return std::ldexp(1.0, -8);
    default: return std::ldexp(1.0, -24);
  }
}

double ulp_of(DType dtype, double x) {
  int frac = 23, emin = -126;
  if (dtype == DType::kFloat16) frac = 10, emin = -14;
  if (dtype == DType::kBFloat16) frac = 7, emin = -126;
  const double ax = std::fabs(x);
  int E = emin;
  if (ax > 0) {
    int e = 0;
    std::frexp(ax, &e);
    E = std::max(e - 1, emin);
  }
  return std::ldexp(1.0, E - frac);
}

const char* dtype_str(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
    case DType::kBool: return "bool";
  }
  return "?";
}

std::size_t elem_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kInt64: return 8;
    case DType::kUInt8: case DType::kBool: return 1;
  }
  return 1;
}

// ---- Layout / HostTensor --------------------------------------------------------------------

Layout Layout::random_strided(int ndim, std::mt19937_64& rng) {
  Layout l;
  l.order.resize(static_cast<std::size_t>(ndim));
  std::iota(l.order.begin(), l.order.end(), 0);
  if (ndim > 2) std::shuffle(l.order.begin(), l.order.end() - 1, rng);
  l.pad.assign(static_cast<std::size_t>(ndim), 0);
  std::uniform_int_distribution<int> pad(0, 3);
  for (int d = 0; d + 1 < ndim; ++d) l.pad[static_cast<std::size_t>(d)] = pad(rng);
  // Make sure at least one dim is padded so the tensor really is non-contiguous.
  if (ndim >= 2) l.pad[static_cast<std::size_t>(ndim - 2)] += 1;
  l.front = std::uniform_int_distribution<int>(0, 7)(rng);
  return l;
}

HostTensor::HostTensor(DType dtype, std::vector<std::int64_t> shape, const Layout& layout)
    : dtype_(dtype), shape_(std::move(shape)), front_(layout.front) {
  const int n = ndim();
  std::vector<int> order = layout.order;
  if (order.empty()) {
    order.resize(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
  }
  if (static_cast<int>(order.size()) != n) throw std::logic_error("HostTensor: bad layout order");
  strides_.assign(static_cast<std::size_t>(n), 1);
  std::int64_t running = 1;
  for (int i = n - 1; i >= 0; --i) {
    const auto d = static_cast<std::size_t>(order[static_cast<std::size_t>(i)]);
    strides_[d] = running;
    std::int64_t ext = std::max<std::int64_t>(shape_[d], 1);
    if (!layout.pad.empty() && static_cast<int>(d) != n - 1) ext += layout.pad[d];
    running *= ext;
  }
#if defined(__SANITIZE_ADDRESS__)
  // Under AddressSanitizer: exactly the storage the view spans, so any read past it is caught.
  std::int64_t last = 0;
  for (int d = 0; d < n; ++d) last += std::max<std::int64_t>(shape_[static_cast<std::size_t>(d)] - 1, 0) * strides_[static_cast<std::size_t>(d)];
  const std::int64_t total_elems = front_ + last + 1;  // 1 element even for an empty tensor
#else
  // Otherwise one guard element past the end: gaps_intact() sees a write one past the view.
  const std::int64_t total_elems = front_ + running + 1;
#endif
  bytes_.assign(static_cast<std::size_t>(total_elems) * elem_size(dtype_), kGapByte);
  const std::int64_t ne = numel();
  for (std::int64_t i = 0; i < ne; ++i) set(i, 0.0);
}

std::int64_t HostTensor::numel() const {
  std::int64_t n = 1;
  for (auto s : shape_) n *= s;
  return n;
}

TensorView HostTensor::view() const {
  TensorView t;
  t.data = const_cast<unsigned char*>(bytes_.data()) + static_cast<std::size_t>(front_) * elem_size(dtype_);
  t.dtype = dtype_;
  t.device = device_;
  t.ndim = ndim();
  for (int d = 0; d < ndim(); ++d) {
    t.shape[static_cast<std::size_t>(d)] = shape_[static_cast<std::size_t>(d)];
    t.strides[static_cast<std::size_t>(d)] = strides_[static_cast<std::size_t>(d)];
  }
  return t;
}

std::int64_t HostTensor::storage_offset(std::int64_t linear) const {
  std::int64_t off = front_;
  for (int d = ndim() - 1; d >= 0; --d) {
    const std::int64_t s = shape_[static_cast<std::size_t>(d)];
    off += (linear % s) * strides_[static_cast<std::size_t>(d)];
    linear /= s;
  }
  return off;
}

double HostTensor::get(std::int64_t linear) const {
  const unsigned char* p = bytes_.data() + static_cast<std::size_t>(storage_offset(linear)) * elem_size(dtype_);
  switch (dtype_) {
    case DType::kFloat32: { float f; std::memcpy(&f, p, 4); return f; }
    case DType::kFloat16: { std::uint16_t h; std::memcpy(&h, p, 2); return half_bits_to_double(h); }
    case DType::kBFloat16: { std::uint16_t h; std::memcpy(&h, p, 2); return bf16_bits_to_double(h); }
    case DType::kInt32: { std::int32_t i; std::memcpy(&i, p, 4); return i; }
    case DType::kInt64: { std::int64_t i; std::memcpy(&i, p, 8); return static_cast<double>(i); }
    case DType::kUInt8: case DType::kBool: return *p;
  }
  return 0;
}

void HostTensor::set(std::int64_t linear, double value) {
  unsigned char* p = bytes_.data() + static_cast<std::size_t>(storage_offset(linear)) * elem_size(dtype_);
  switch (dtype_) {
    case DType::kFloat32: { float f = static_cast<float>(value); std::memcpy(p, &f, 4); break; }
    case DType::kFloat16: { std::uint16_t h = double_to_half_bits(value); std::memcpy(p, &h, 2); break; }
    case DType::kBFloat16: { std::uint16_t h = double_to_bf16_bits(value); std::memcpy(p, &h, 2); break; }
    case DType::kInt32: { auto i = static_cast<std::int32_t>(value); std::memcpy(p, &i, 4); break; }
    case DType::kInt64: { auto i = static_cast<std::int64_t>(value); std::memcpy(p, &i, 8); break; }
    case DType::kUInt8: case DType::kBool: *p = static_cast<unsigned char>(value); break;
  }
}

double HostTensor::at(std::initializer_list<std::int64_t> idx) const {
  std::int64_t linear = 0;
  int d = 0;
  for (auto i : idx) linear = linear * shape_[static_cast<std::size_t>(d++)] + i;
  return get(linear);
}

std::vector<double> HostTensor::values() const {
  std::vector<double> out(static_cast<std::size_t>(numel()));
  for (std::int64_t i = 0; i < numel(); ++i) out[static_cast<std::size_t>(i)] = get(i);
  return out;
}

void HostTensor::assign(const std::vector<double>& values) {
  if (static_cast<std::int64_t>(values.size()) != numel()) throw std::logic_error("HostTensor::assign: size");
  for (std::int64_t i = 0; i < numel(); ++i) set(i, values[static_cast<std::size_t>(i)]);
}

void HostTensor::poison() {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (std::int64_t i = 0; i < numel(); ++i) {
    if (dtype_ == DType::kFloat32 || dtype_ == DType::kFloat16 || dtype_ == DType::kBFloat16) {
      set(i, nan);
    } else {
      set(i, 0x55);
    }
  }
}

std::vector<bool> HostTensor::element_byte_mask() const {
  std::vector<bool> mask(bytes_.size(), false);
  const std::size_t es = elem_size(dtype_);
  for (std::int64_t i = 0; i < numel(); ++i) {
    const auto off = static_cast<std::size_t>(storage_offset(i)) * es;
    for (std::size_t b = 0; b < es; ++b) mask[off + b] = true;
  }
  return mask;
}

bool HostTensor::gaps_intact() const {
  const auto mask = element_byte_mask();
  for (std::size_t i = 0; i < bytes_.size(); ++i) {
    if (!mask[i] && bytes_[i] != kGapByte) return false;
  }
  return true;
}

HostTensor random_tensor(DType dtype, const std::vector<std::int64_t>& shape, std::mt19937_64& rng,
                         const Layout& layout, double sigma) {
  HostTensor t(dtype, shape, layout);
  std::normal_distribution<double> nd(0.0, sigma);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, nd(rng));
  return t;
}

HostTensor int_tensor_shaped(const std::vector<std::int64_t>& values,
                             const std::vector<std::int64_t>& shape, const Layout& layout) {
  HostTensor t(DType::kInt32, shape, layout);
  if (static_cast<std::int64_t>(values.size()) != t.numel()) throw std::logic_error("int_tensor: size");
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, static_cast<double>(values[static_cast<std::size_t>(i)]));
  return t;
}

HostTensor int_tensor(const std::vector<std::int64_t>& values, const Layout& layout) {
  return int_tensor_shaped(values, {static_cast<std::int64_t>(values.size())}, layout);
}

HostTensor float_tensor(const std::vector<double>& values, const std::vector<std::int64_t>& shape) {
  HostTensor t(DType::kFloat32, shape);
  t.assign(values);
  return t;
}

// ---- attention ------------------------------------------------------------------------------

double RefOptions::slope(std::int64_t b, std::int64_t h, std::int64_t Hq) const {
  if (alibi.empty()) return 0.0;
  return alibi_per_batch ? alibi[static_cast<std::size_t>(b * Hq + h)] : alibi[static_cast<std::size_t>(h)];
}

namespace {

/// The naive in-dtype computation (see reference.h): float32 accumulations, dtype roundings.
SeqOut attend_sequence_naive(const SeqIn& in, std::int64_t b, std::int64_t Hq, std::int64_t Hkv,
                             std::int64_t D, const RefOptions& opt, DType dt) {
  const std::int64_t Sq = in.Sq, Sk = in.Sk;
  const double scale = opt.softmax_scale ? *opt.softmax_scale : 1.0 / std::sqrt(static_cast<double>(D));
  const std::int64_t group = Hq / Hkv;
  const std::int64_t right = opt.causal ? 0 : opt.window_right;
  const std::int64_t left = opt.window_left;
  auto R = [&](double x) { return static_cast<float>(round_to(dt, x)); };
  SeqOut o;
  o.out.assign(static_cast<std::size_t>(Sq * Hq * D), 0.0);
  o.lse.assign(static_cast<std::size_t>(Hq * Sq), -kInf);
  o.probs.assign(static_cast<std::size_t>(Hq * Sq * Sk), 0.0);
  std::vector<float> s(static_cast<std::size_t>(Sk)), p(static_cast<std::size_t>(Sk)), qs(static_cast<std::size_t>(D));
  std::vector<float> acc(static_cast<std::size_t>(D));
  std::vector<char> seen(static_cast<std::size_t>(Sk));
  for (std::int64_t h = 0; h < Hq; ++h) {
    const std::int64_t kh = h / group;
    const double slope = opt.slope(b, h, Hq);
    for (std::int64_t i = 0; i < Sq; ++i) {
      const double* qrow = &in.q[static_cast<std::size_t>((i * Hq + h) * D)];
      for (std::int64_t d = 0; d < D; ++d) qs[static_cast<std::size_t>(d)] = R(qrow[d] * scale);
      const std::int64_t qpos = i + Sk - Sq;
      float m = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = 0; j < Sk; ++j) {
        const bool vis = (left < 0 || j >= qpos - left) && (right < 0 || j <= qpos + right);
        seen[static_cast<std::size_t>(j)] = vis;
        if (!vis) continue;
        const double* krow = &in.k[static_cast<std::size_t>((j * Hkv + kh) * D)];
        float dot = 0.0f;
        for (std::int64_t d = 0; d < D; ++d) dot += qs[static_cast<std::size_t>(d)] * static_cast<float>(krow[d]);
        float x = R(dot);
        if (opt.softcap > 0) x = R(opt.softcap * std::tanh(x / opt.softcap));
        if (slope != 0.0) x = R(x - slope * std::fabs(static_cast<double>(qpos - j)));
        s[static_cast<std::size_t>(j)] = x;
        m = std::max(m, x);
      }
      const float sink = opt.sinks.empty() ? -std::numeric_limits<float>::infinity()
                                           : static_cast<float>(opt.sinks[static_cast<std::size_t>(h)]);
      m = std::max(m, sink);
      if (m == -std::numeric_limits<float>::infinity()) continue;
      float sum = sink == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(sink - m);
      for (std::int64_t j = 0; j < Sk; ++j)
        if (seen[static_cast<std::size_t>(j)]) {
          p[static_cast<std::size_t>(j)] = std::exp(s[static_cast<std::size_t>(j)] - m);
          sum += p[static_cast<std::size_t>(j)];
        }
      o.lse[static_cast<std::size_t>(h * Sq + i)] = static_cast<double>(m + std::log(sum));
      std::fill(acc.begin(), acc.end(), 0.0f);
      double* prow = &o.probs[static_cast<std::size_t>((h * Sq + i) * Sk)];
      for (std::int64_t j = 0; j < Sk; ++j) {
        if (!seen[static_cast<std::size_t>(j)]) continue;
        const float pj = R(p[static_cast<std::size_t>(j)] / sum);
        prow[j] = pj;
        const double* vrow = &in.v[static_cast<std::size_t>((j * Hkv + kh) * D)];
        for (std::int64_t d = 0; d < D; ++d) acc[static_cast<std::size_t>(d)] += pj * static_cast<float>(vrow[d]);
      }
      double* orow = &o.out[static_cast<std::size_t>((i * Hq + h) * D)];
      for (std::int64_t d = 0; d < D; ++d) orow[d] = R(acc[static_cast<std::size_t>(d)]);
    }
  }
  return o;
}

}  // namespace

SeqOut attend_sequence(const SeqIn& in, std::int64_t b, std::int64_t Hq, std::int64_t Hkv,
                       std::int64_t D, const RefOptions& opt, std::optional<DType> round) {
  if (round) return attend_sequence_naive(in, b, Hq, Hkv, D, opt, *round);
  const std::int64_t Sq = in.Sq, Sk = in.Sk;
  const double scale = opt.softmax_scale ? *opt.softmax_scale : 1.0 / std::sqrt(static_cast<double>(D));
  const std::int64_t group = Hq / Hkv;
  const std::int64_t right = opt.causal ? 0 : opt.window_right;
  const std::int64_t left = opt.window_left;

  SeqOut o;
  o.out.assign(static_cast<std::size_t>(Sq * Hq * D), 0.0);
  o.lse.assign(static_cast<std::size_t>(Hq * Sq), -kInf);
  o.probs.assign(static_cast<std::size_t>(Hq * Sq * Sk), 0.0);
  std::vector<double> s(static_cast<std::size_t>(Sk));
  std::vector<char> seen(static_cast<std::size_t>(Sk));

  for (std::int64_t h = 0; h < Hq; ++h) {
    const std::int64_t kh = h / group;
    const double slope = opt.slope(b, h, Hq);
    for (std::int64_t i = 0; i < Sq; ++i) {
      const double* qrow = &in.q[static_cast<std::size_t>((i * Hq + h) * D)];
      const std::int64_t qpos = i + Sk - Sq;
      double m = -kInf;
      for (std::int64_t j = 0; j < Sk; ++j) {
        const bool vis = (left < 0 || j >= qpos - left) && (right < 0 || j <= qpos + right);
        seen[static_cast<std::size_t>(j)] = vis;
        if (!vis) continue;
        const double* krow = &in.k[static_cast<std::size_t>((j * Hkv + kh) * D)];
        double dot = 0.0;
        for (std::int64_t d = 0; d < D; ++d) dot += qrow[d] * krow[d];
        double x = dot * scale;
        if (opt.softcap > 0) x = opt.softcap * std::tanh(x / opt.softcap);
        if (slope != 0.0) x -= slope * std::fabs(static_cast<double>(qpos - j));
        s[static_cast<std::size_t>(j)] = x;
        m = std::max(m, x);
      }
      // A sink is one more logit whose value row is zero: it counts in the sum only.
      const double sink = opt.sinks.empty() ? -kInf : opt.sinks[static_cast<std::size_t>(h)];
      m = std::max(m, sink);
      if (m == -kInf) continue;  // no key visible (and no sink): out 0, lse -inf, probs 0
      double sum = sink == -kInf ? 0.0 : std::exp(sink - m);
      for (std::int64_t j = 0; j < Sk; ++j)
        if (seen[static_cast<std::size_t>(j)]) sum += std::exp(s[static_cast<std::size_t>(j)] - m);
      o.lse[static_cast<std::size_t>(h * Sq + i)] = m + std::log(sum);
      double* orow = &o.out[static_cast<std::size_t>((i * Hq + h) * D)];
      double* prow = &o.probs[static_cast<std::size_t>((h * Sq + i) * Sk)];
      for (std::int64_t j = 0; j < Sk; ++j) {
        if (!seen[static_cast<std::size_t>(j)]) continue;
        const double p = std::exp(s[static_cast<std::size_t>(j)] - m) / sum;
        prow[j] = p;
        const double* vrow = &in.v[static_cast<std::size_t>((j * Hkv + kh) * D)];
        for (std::int64_t d = 0; d < D; ++d) orow[d] += p * vrow[d];
      }
    }
  }
  return o;
}

AttnRef ref_attention(const std::vector<double>& q, const std::vector<double>& k,
                      const std::vector<double>& v, std::int64_t B, std::int64_t Sq,
                      std::int64_t Sk, std::int64_t Hq, std::int64_t Hkv, std::int64_t D,
                      const RefOptions& opt, std::optional<DType> round) {
  AttnRef r;
  r.out.assign(static_cast<std::size_t>(B * Sq * Hq * D), 0.0);
  r.lse.assign(static_cast<std::size_t>(B * Hq * Sq), -kInf);
  r.probs.assign(static_cast<std::size_t>(B * Hq * Sq * Sk), 0.0);
  for (std::int64_t b = 0; b < B; ++b) {
    SeqIn in;
    in.Sq = Sq;
    in.Sk = Sk;
    const auto qn = Sq * Hq * D, kn = Sk * Hkv * D;
    in.q.assign(q.begin() + b * qn, q.begin() + (b + 1) * qn);
    in.k.assign(k.begin() + b * kn, k.begin() + (b + 1) * kn);
    in.v.assign(v.begin() + b * kn, v.begin() + (b + 1) * kn);
    SeqOut o = attend_sequence(in, b, Hq, Hkv, D, opt, round);
    std::copy(o.out.begin(), o.out.end(), r.out.begin() + b * qn);
    std::copy(o.lse.begin(), o.lse.end(), r.lse.begin() + b * Hq * Sq);
    std::copy(o.probs.begin(), o.probs.end(), r.probs.begin() + b * Hq * Sq * Sk);
  }
  return r;
}

std::vector<double> gather_paged(const std::vector<double>& pages_data, std::int64_t page_size,
                                 std::int64_t Hkv, std::int64_t D,
                                 const std::vector<std::int64_t>& pages, std::int64_t len) {
  std::vector<double> out(static_cast<std::size_t>(len * Hkv * D));
  const std::int64_t row = Hkv * D;
  for (std::int64_t j = 0; j < len; ++j) {
    const std::int64_t page = pages.at(static_cast<std::size_t>(j / page_size));
    const std::int64_t src = (page * page_size + j % page_size) * row;
    std::copy(pages_data.begin() + src, pages_data.begin() + src + row, out.begin() + j * row);
  }
  return out;
}

AttnRef ref_varlen(const std::vector<double>& q, const std::vector<std::int64_t>& cu_q,
                   const std::vector<std::vector<double>>& keys,
                   const std::vector<std::vector<double>>& values, std::int64_t Hq,
                   std::int64_t Hkv, std::int64_t D, std::int64_t max_q, std::int64_t max_k,
                   const RefOptions& opt, std::optional<DType> round) {
  const auto B = static_cast<std::int64_t>(cu_q.size()) - 1;
  const std::int64_t total_q = cu_q.back();
  AttnRef r;
  r.out.assign(static_cast<std::size_t>(total_q * Hq * D), 0.0);
  r.lse.assign(static_cast<std::size_t>(Hq * total_q), -kInf);
  r.probs.assign(static_cast<std::size_t>(B * Hq * max_q * max_k), 0.0);
  for (std::int64_t b = 0; b < B; ++b) {
    SeqIn in;
    in.Sq = cu_q[static_cast<std::size_t>(b + 1)] - cu_q[static_cast<std::size_t>(b)];
    in.Sk = static_cast<std::int64_t>(keys[static_cast<std::size_t>(b)].size()) / (Hkv * D);
    const std::int64_t q0 = cu_q[static_cast<std::size_t>(b)];
    in.q.assign(q.begin() + q0 * Hq * D, q.begin() + (q0 + in.Sq) * Hq * D);
    in.k = keys[static_cast<std::size_t>(b)];
    in.v = values[static_cast<std::size_t>(b)];
    SeqOut o = attend_sequence(in, b, Hq, Hkv, D, opt, round);
    std::copy(o.out.begin(), o.out.end(), r.out.begin() + q0 * Hq * D);
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < in.Sq; ++i) {
        r.lse[static_cast<std::size_t>(h * total_q + q0 + i)] = o.lse[static_cast<std::size_t>(h * in.Sq + i)];
        if (i < max_q)
          for (std::int64_t j = 0; j < in.Sk && j < max_k; ++j)
            r.probs[static_cast<std::size_t>(((b * Hq + h) * max_q + i) * max_k + j)] =
                o.probs[static_cast<std::size_t>((h * in.Sq + i) * in.Sk + j)];
      }
  }
  return r;
}

void apply_rotary(double* x, std::int64_t D, std::int64_t rotary_dim, bool interleaved,
                  const std::vector<double>& cos, const std::vector<double>& sin,
                  std::int64_t pos) {
  (void)D;
  const std::int64_t half = rotary_dim / 2;
  for (std::int64_t i = 0; i < half; ++i) {
    const double c = cos.at(static_cast<std::size_t>(pos * half + i));
    const double s = sin.at(static_cast<std::size_t>(pos * half + i));
    const std::int64_t i0 = interleaved ? 2 * i : i;
    const std::int64_t i1 = interleaved ? 2 * i + 1 : i + half;
    const double a = x[i0], b = x[i1];
    x[i0] = a * c - b * s;
    x[i1] = a * s + b * c;
  }
}

KVCacheRefOut ref_kvcache(const KVCacheRefIn& in, const RefOptions& opt, std::optional<DType> round) {
  const std::int64_t B = in.B, Sq = in.Sq, Hq = in.Hq, Hkv = in.Hkv, D = in.D, Snew = in.Snew;
  auto R = [&](double x) { return round ? round_to(*round, x) : x; };
  const bool rotary = !in.rotary_cos.empty();
  KVCacheRefOut r;
  r.k_cache = in.k_cache;
  r.v_cache = in.v_cache;
  r.attn.out.assign(static_cast<std::size_t>(B * Sq * Hq * D), 0.0);
  r.attn.lse.assign(static_cast<std::size_t>(B * Hq * Sq), -kInf);

  auto slot_base = [&](std::int64_t c, std::int64_t s) -> std::int64_t {
    if (in.paged) {
      const std::int64_t page = in.row_pages.at(static_cast<std::size_t>(c)).at(static_cast<std::size_t>(s / in.N1));
      return (page * in.N1 + s % in.N1) * Hkv * D;
    }
    return (c * in.N1 + s) * Hkv * D;
  };

  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t c = in.cache_batch_idx.empty() ? b : in.cache_batch_idx[static_cast<std::size_t>(b)];
    const std::int64_t L = in.cache_seqlens[static_cast<std::size_t>(b)];
    const std::int64_t lp = in.cache_leftpad.empty() ? 0 : in.cache_leftpad[static_cast<std::size_t>(b)];
    // 1. append (k rotated at positions L - lp + t)
    for (std::int64_t t = 0; t < Snew; ++t) {
      const std::int64_t base = slot_base(c, L + t);
      for (std::int64_t h = 0; h < Hkv; ++h) {
        std::vector<double> kx(in.k_new.begin() + ((b * Snew + t) * Hkv + h) * D,
                               in.k_new.begin() + ((b * Snew + t) * Hkv + h + 1) * D);
        const bool stored = !in.k_stored.empty();
        if (stored)
          kx.assign(in.k_stored.begin() + ((b * Snew + t) * Hkv + h) * D, in.k_stored.begin() + ((b * Snew + t) * Hkv + h + 1) * D);
        else if (rotary)
          apply_rotary(kx.data(), D, in.rotary_dim, in.rotary_interleaved, in.rotary_cos, in.rotary_sin, L - lp + t);
        for (std::int64_t d = 0; d < D; ++d) {
          const std::int64_t idx = base + h * D + d;
          r.k_cache[static_cast<std::size_t>(idx)] = stored ? kx[static_cast<std::size_t>(d)] : R(kx[static_cast<std::size_t>(d)]);
          r.v_cache[static_cast<std::size_t>(idx)] = in.v_new[static_cast<std::size_t>(((b * Snew + t) * Hkv + h) * D + d)];
          r.written.push_back(idx);
        }
      }
    }
  }
  for (std::int64_t b = 0; b < B; ++b) {
    const std::int64_t c = in.cache_batch_idx.empty() ? b : in.cache_batch_idx[static_cast<std::size_t>(b)];
    const std::int64_t L = in.cache_seqlens[static_cast<std::size_t>(b)];
    const std::int64_t lp = in.cache_leftpad.empty() ? 0 : in.cache_leftpad[static_cast<std::size_t>(b)];
    // 2. attend over slots [lp, L + Snew)
    SeqIn s;
    s.Sq = Sq;
    s.Sk = L + Snew - lp;
    s.k.resize(static_cast<std::size_t>(s.Sk * Hkv * D));
    s.v.resize(static_cast<std::size_t>(s.Sk * Hkv * D));
    for (std::int64_t j = 0; j < s.Sk; ++j) {
      const std::int64_t base = slot_base(c, lp + j);
      std::copy(r.k_cache.begin() + base, r.k_cache.begin() + base + Hkv * D, s.k.begin() + j * Hkv * D);
      std::copy(r.v_cache.begin() + base, r.v_cache.begin() + base + Hkv * D, s.v.begin() + j * Hkv * D);
    }
    s.q.assign(in.q.begin() + b * Sq * Hq * D, in.q.begin() + (b + 1) * Sq * Hq * D);
    if (rotary) {
      for (std::int64_t i = 0; i < Sq; ++i)
        for (std::int64_t h = 0; h < Hq; ++h) {
          double* x = &s.q[static_cast<std::size_t>((i * Hq + h) * D)];
          const std::int64_t pos = (opt.causal || opt.local()) ? L - lp + i : L - lp;
          apply_rotary(x, D, in.rotary_dim, in.rotary_interleaved, in.rotary_cos, in.rotary_sin, pos);
          for (std::int64_t d = 0; d < D; ++d)
            x[d] = in.round_rotated_q && !round ? round_to(*in.round_rotated_q, x[d]) : R(x[d]);
        }
    }
    SeqOut o = attend_sequence(s, b, Hq, Hkv, D, opt, round);
    std::copy(o.out.begin(), o.out.end(), r.attn.out.begin() + b * Sq * Hq * D);
    std::copy(o.lse.begin(), o.lse.end(), r.attn.lse.begin() + b * Hq * Sq);
  }
  return r;
}

// ---- merge ----------------------------------------------------------------------------------

void ref_merge_states(const std::vector<double>& v, const std::vector<double>& s, std::int64_t S,
                      std::int64_t N, std::int64_t H, std::int64_t D, std::vector<double>& v_out,
                      std::vector<double>& s_out) {
  v_out.assign(static_cast<std::size_t>(S * H * D), 0.0);
  s_out.assign(static_cast<std::size_t>(S * H), -kInf);
  for (std::int64_t r = 0; r < S; ++r)
    for (std::int64_t h = 0; h < H; ++h) {
      double m = -kInf;
      for (std::int64_t n = 0; n < N; ++n) m = std::max(m, s[static_cast<std::size_t>((r * N + n) * H + h)]);
      if (m == -kInf) continue;
      double sum = 0.0;
      std::vector<double> w(static_cast<std::size_t>(N));
      for (std::int64_t n = 0; n < N; ++n) {
        w[static_cast<std::size_t>(n)] = std::exp(s[static_cast<std::size_t>((r * N + n) * H + h)] - m);
        sum += w[static_cast<std::size_t>(n)];
      }
      s_out[static_cast<std::size_t>(r * H + h)] = m + std::log(sum);
      for (std::int64_t d = 0; d < D; ++d) {
        double acc = 0.0;
        for (std::int64_t n = 0; n < N; ++n)
          if (w[static_cast<std::size_t>(n)] != 0.0)
            acc += w[static_cast<std::size_t>(n)] * v[static_cast<std::size_t>(((r * N + n) * H + h) * D + d)];
        v_out[static_cast<std::size_t>((r * H + h) * D + d)] = acc / sum;
      }
    }
}

void ref_merge_state(const std::vector<double>& va, const std::vector<double>& sa,
                     const std::vector<double>& vb, const std::vector<double>& sb,
                     std::int64_t S, std::int64_t H, std::int64_t D, std::vector<double>& v_out,
                     std::vector<double>& s_out) {
  // Interleave into the (S, 2, H, D) form and reuse the N-way merge.
  std::vector<double> v(static_cast<std::size_t>(S * 2 * H * D)), s(static_cast<std::size_t>(S * 2 * H));
  for (std::int64_t r = 0; r < S; ++r)
    for (std::int64_t h = 0; h < H; ++h) {
      s[static_cast<std::size_t>((r * 2 + 0) * H + h)] = sa[static_cast<std::size_t>(r * H + h)];
      s[static_cast<std::size_t>((r * 2 + 1) * H + h)] = sb[static_cast<std::size_t>(r * H + h)];
      for (std::int64_t d = 0; d < D; ++d) {
        v[static_cast<std::size_t>(((r * 2 + 0) * H + h) * D + d)] = va[static_cast<std::size_t>((r * H + h) * D + d)];
        v[static_cast<std::size_t>(((r * 2 + 1) * H + h) * D + d)] = vb[static_cast<std::size_t>((r * H + h) * D + d)];
      }
    }
  ref_merge_states(v, s, S, 2, H, D, v_out, s_out);
}

// ---- comparisons ----------------------------------------------------------------------------

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return kInf;
  double m = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = a[i], y = b[i];
    if (std::isnan(x) || std::isnan(y)) return kInf;
    if (std::isinf(x) || std::isinf(y)) {
      if (x != y) return kInf;
      continue;
    }
    m = std::max(m, std::fabs(x - y));
  }
  return m;
}

double max_abs(const std::vector<double>& a) {
  double m = 0.0;
  for (double x : a) m = std::max(m, std::fabs(x));
  return m;
}

bool any_nan(const std::vector<double>& a) {
  return std::any_of(a.begin(), a.end(), [](double x) { return std::isnan(x); });
}

}  // namespace fa_ref
