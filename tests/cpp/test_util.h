// fastattn C++ tests: shared helpers (seeding, options, tolerance checks).
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "fastattn/fastattn.h"
#include "reference.h"

namespace fa_test {

using fa_ref::HostTensor;
using fa_ref::Layout;
using fastattn::DType;

/// A fresh seed per test: FASTATTN_TEST_SEED when set (to replay a failure), else random_device.
inline std::uint64_t fresh_seed() {
  if (const char* env = std::getenv("FASTATTN_TEST_SEED")) return std::strtoull(env, nullptr, 10);
  std::random_device rd;
  return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
}

/// Declares `std::mt19937_64 rng` seeded freshly and puts the seed in every failure message.
#define FA_SEEDED_RNG(rng)                                                                   \
  const std::uint64_t rng##_seed = ::fa_test::fresh_seed();                                  \
  SCOPED_TRACE("seed " + std::to_string(rng##_seed) + " (replay: FASTATTN_TEST_SEED=" +       \
               std::to_string(rng##_seed) + ")");                                             \
  std::mt19937_64 rng(rng##_seed)

inline std::int64_t rand_int(std::mt19937_64& rng, std::int64_t lo, std::int64_t hi) {
  return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
}
inline double rand_real(std::mt19937_64& rng, double lo, double hi) {
  return std::uniform_real_distribution<double>(lo, hi)(rng);
}
template <class T>
const T& pick(std::mt19937_64& rng, const std::vector<T>& v) {
  return v[static_cast<std::size_t>(rand_int(rng, 0, static_cast<std::int64_t>(v.size()) - 1))];
}

inline const std::vector<DType>& float_dtypes() {
  static const std::vector<DType> d{DType::kFloat32, DType::kFloat16, DType::kBFloat16};
  return d;
}
inline std::string dtype_param_name(const ::testing::TestParamInfo<DType>& info) {
  return fa_ref::dtype_str(info.param);
}

/// Score options for one case, in both forms: the library's AttentionOptions (which holds a view
/// of `alibi`, kept alive here) and the reference's RefOptions.
struct Opts {
  std::optional<double> scale;
  bool causal = false;
  std::int64_t left = -1, right = -1;
  double softcap = 0.0;
  int alibi = 0;  ///< 0 none, 1 (Hq), 2 (B, Hq)
  std::shared_ptr<HostTensor> alibi_tensor;
  std::vector<double> alibi_values;
  bool sinks = false;  ///< attention sinks (KVCacheArgs::sinks), drawn by make_sinks
  std::shared_ptr<HostTensor> sinks_tensor;  ///< (Hq, 2): the sinks are column 0 (a stride of 2)
  std::vector<double> sink_values;

  std::string str() const {
    std::ostringstream s;
    s << "scale=" << (scale ? std::to_string(*scale) : "default") << " causal=" << causal
      << " window=(" << left << "," << right << ") softcap=" << softcap << " alibi=" << alibi
      << " sinks=" << sinks;
    return s.str();
  }
  /// Draw the ALiBi slopes (needs B and Hq); call before lib()/ref() when alibi != 0.
  void make_alibi(std::int64_t B, std::int64_t Hq, std::mt19937_64& rng) {
    if (alibi == 0) return;
    std::vector<std::int64_t> shape = alibi == 1 ? std::vector<std::int64_t>{Hq}
                                                 : std::vector<std::int64_t>{B, Hq};
    alibi_tensor = std::make_shared<HostTensor>(DType::kFloat32, shape);
    alibi_values.clear();
    for (std::int64_t i = 0; i < alibi_tensor->numel(); ++i) {
      alibi_tensor->set(i, rand_real(rng, 0.0, 0.5));
      alibi_values.push_back(alibi_tensor->get(i));
    }
  }
  /// Draw the sinks (needs Hq), around the scores' scale so that they matter; call before
  /// sinks_view()/ref() when sinks is set.
  void make_sinks(std::int64_t Hq, std::mt19937_64& rng) {
    if (!sinks) return;
    sinks_tensor = std::make_shared<HostTensor>(DType::kFloat32, std::vector<std::int64_t>{Hq, 2});
    sink_values.clear();
    for (std::int64_t i = 0; i < 2 * Hq; ++i) sinks_tensor->set(i, rand_real(rng, -4.0, 4.0));
    for (std::int64_t h = 0; h < Hq; ++h) sink_values.push_back(sinks_tensor->get(2 * h));
  }
  /// The sinks as the library takes them: a 1-d view of stride 2.
  std::optional<fastattn::TensorView> sinks_view() const {
    if (!sinks_tensor) return std::nullopt;
    fastattn::TensorView v = sinks_tensor->view();
    v.ndim = 1;
    return v;
  }
  fastattn::AttentionOptions lib() const {
    fastattn::AttentionOptions o;
    if (scale) o.softmax_scale = static_cast<float>(*scale);
    o.causal = causal;
    o.window_left = left;
    o.window_right = right;
    o.softcap = static_cast<float>(softcap);
    if (alibi_tensor) o.alibi_slopes = alibi_tensor->view();
    return o;
  }
  fa_ref::RefOptions ref() const {
    fa_ref::RefOptions r;
    // The library receives the scale as a float; give the reference the same number.
    if (scale) r.softmax_scale = static_cast<double>(static_cast<float>(*scale));
    r.causal = causal;
    r.window_left = left;
    r.window_right = right;
    r.softcap = static_cast<double>(static_cast<float>(softcap));
    r.alibi = alibi_values;
    r.alibi_per_batch = alibi == 2;
    r.sinks = sink_values;
    return r;
  }
};

/// A random combination of options (each present with probability ~1/2).
inline Opts random_opts(std::mt19937_64& rng, bool allow_alibi = true) {
  Opts o;
  if (rand_int(rng, 0, 3) == 0) o.scale = rand_real(rng, 0.05, 0.3);
  o.causal = rand_int(rng, 0, 1) == 1;
  if (rand_int(rng, 0, 1)) {
    o.left = rand_int(rng, -1, 40);
    o.right = rand_int(rng, -1, 40);
  }
  if (rand_int(rng, 0, 1)) o.softcap = rand_real(rng, 2.0, 30.0);
  if (allow_alibi) o.alibi = static_cast<int>(rand_int(rng, 0, 2));
  return o;
}

/// Tolerance on outputs (and probs), the FlashAttention rule from DESIGN.md:
///   max|ours - ref| <= factor * max|naive_in_dtype - ref| + floor,
/// floor = 1e-5 for float16/bfloat16 inputs (DESIGN.md's constant; the naive error, ~1e-3 for
/// unit-variance data, dominates anyway). For float32 inputs the naive float32 error is only
/// ~1e-7..1e-6, so the floor is the bound that matters; we use a tight 3e-6: for outputs of
/// magnitude ~1 (unit-variance v) and up to ~1000 keys that is ~25 float32 ulps, about 2x the
/// largest float32 error the CPU backend showed over many random runs (1.6e-6).
inline double out_floor(DType dtype) { return dtype == DType::kFloat32 ? 3e-6 : 1e-5; }
inline double out_tolerance(double naive_err, double factor, DType dtype) {
  return factor * naive_err + out_floor(dtype);
}
/// Tolerance on LSE (natural log, float32 in every case): the same rule with a 1e-5 floor. The
/// naive LSE comes from scores rounded to the dtype (error ~|s| * u, 1e-3 for float16); for
/// float32 inputs the floor dominates: |lse| < ~20 here and float32 max/exp/log/sum are good to
/// ~1e-6 absolute at that size.
inline double lse_tolerance(double naive_err, double factor) { return factor * naive_err + 1e-5; }

/// Checks ours against ref with the tolerance derived from naive. Returns true when it passes.
inline ::testing::AssertionResult close_to_ref(const std::vector<double>& ours,
                                               const std::vector<double>& ref,
                                               const std::vector<double>& naive, double factor,
                                               DType dtype, bool is_lse = false,
                                               double extra_abs = 0.0) {
  if (fa_ref::any_nan(ours)) {
    std::int64_t n = 0, first = -1;
    for (std::size_t i = 0; i < ours.size(); ++i)
      if (std::isnan(ours[i])) {
        if (first < 0) first = static_cast<std::int64_t>(i);
        ++n;
      }
    return ::testing::AssertionFailure() << n << " NaN values (not written or computed NaN), first at "
                                         << first << " of " << ours.size();
  }
  const double err = fa_ref::max_abs_diff(ours, ref);
  const double nerr = fa_ref::max_abs_diff(naive, ref);
  const double tol = (is_lse ? lse_tolerance(nerr, factor) : out_tolerance(nerr, factor, dtype)) + extra_abs;
  // FASTATTN_TEST_VERBOSE=1 prints every comparison (to study how tight the bounds are).
  if (std::getenv("FASTATTN_TEST_VERBOSE"))
    std::printf("[compare] %s err %.3e naive %.3e tol %.3e ratio %.3f n %zu\n", is_lse ? "lse" : "out", err,
                nerr, tol, tol > 0 ? err / tol : 0.0, ours.size());
  if (err <= tol) return ::testing::AssertionSuccess();
  // Locate the worst element for the message.
  std::size_t worst = 0;
  double wd = -1;
  for (std::size_t i = 0; i < ours.size(); ++i) {
    double d = std::fabs(ours[i] - ref[i]);
    if (std::isinf(ours[i]) || std::isinf(ref[i])) d = ours[i] == ref[i] ? 0.0 : INFINITY;
    if (d > wd) wd = d, worst = i;
  }
  return ::testing::AssertionFailure()
         << "max error " << err << " > tolerance " << tol << " (naive-in-dtype error " << nerr
         << ", factor " << factor << "); worst at flat index " << worst << ": ours "
         << ours[worst] << " ref " << ref[worst] << " naive " << naive[worst];
}

/// True when every byte of `now` equals `before` except those whose byte mask entry is set.
inline ::testing::AssertionResult bytes_unchanged(const std::vector<unsigned char>& before,
                                                  const std::vector<unsigned char>& now,
                                                  const std::vector<bool>* allowed = nullptr) {
  if (before.size() != now.size()) return ::testing::AssertionFailure() << "size changed";
  std::int64_t changed = 0, first = -1;
  for (std::size_t i = 0; i < now.size(); ++i) {
    if (allowed && (*allowed)[i]) continue;
    if (before[i] != now[i]) {
      if (first < 0) first = static_cast<std::int64_t>(i);
      ++changed;
    }
  }
  if (changed == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << changed << " bytes changed that must not be, first at byte "
                                       << first;
}

inline std::string shape_str(const std::vector<std::int64_t>& s) {
  std::ostringstream o;
  o << "(";
  for (std::size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ")";
  return o.str();
}

/// Exclusive prefix sums with a leading 0.
inline std::vector<std::int64_t> cumsum0(const std::vector<std::int64_t>& lens) {
  std::vector<std::int64_t> cu{0};
  for (auto l : lens) cu.push_back(cu.back() + l);
  return cu;
}

/// A ragged length: often 0, 1 or one of the DESIGN.md lengths, else uniform in [0, hi].
inline std::int64_t ragged_len(std::mt19937_64& rng, std::int64_t hi) {
  static const std::vector<std::int64_t> special{0, 1, 17, 113};
  const int r = static_cast<int>(rand_int(rng, 0, 5));
  if (r == 0) return 0;
  if (r == 1) return 1;
  if (r == 2) {
    const std::int64_t s = pick(rng, special);
    return s <= hi ? s : hi;
  }
  return rand_int(rng, 0, hi);
}

}  // namespace fa_test
