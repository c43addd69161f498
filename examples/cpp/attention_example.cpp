// fastattn example: one batched attention call on the CPU through the public C++ API, checked
// against a softmax computed by hand for one query row.
//
//   q (B, Sq, Hq, D), k / v (B, Sk, Hkv, D), out (B, Sq, Hq, D), lse (B, Hq, Sq), float32.
#include <fastattn/fastattn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  constexpr std::int64_t B = 2, Sq = 7, Sk = 19, Hq = 4, Hkv = 2, D = 32;  // GQA: 2 q heads per kv head

  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](std::int64_t n) {
    std::vector<float> x(static_cast<std::size_t>(n));
    for (auto& e : x) e = normal(rng);
    return x;
  };
  std::vector<float> q = randn(B * Sq * Hq * D), k = randn(B * Sk * Hkv * D),
                     v = randn(B * Sk * Hkv * D);
  std::vector<float> out(static_cast<std::size_t>(B * Sq * Hq * D), NAN);  // poisoned
  std::vector<float> lse(static_cast<std::size_t>(B * Hq * Sq), NAN);

  using fastattn::DType;
  fastattn::AttentionArgs args;
  args.q = fastattn::make_view(q.data(), DType::kFloat32, {B, Sq, Hq, D});
  args.k = fastattn::make_view(k.data(), DType::kFloat32, {B, Sk, Hkv, D});
  args.v = fastattn::make_view(v.data(), DType::kFloat32, {B, Sk, Hkv, D});
  args.out = fastattn::make_view(out.data(), DType::kFloat32, {B, Sq, Hq, D});
  args.lse = fastattn::make_view(lse.data(), DType::kFloat32, {B, Hq, Sq});
  args.options.causal = true;  // bottom-right aligned: query i sees keys j <= i + Sk - Sq

  try {
    fastattn::attention_forward(args);
  } catch (const fastattn::Error& e) {
    std::fprintf(stderr, "attention_forward failed: %s\n", e.what());
    return 1;
  }

  // The same row by hand, in double: batch b, query row i, query head h.
  const std::int64_t b = 1, i = 3, h = 3, hk = h / (Hq / Hkv);
  const double scale = 1.0 / std::sqrt(double(D));
  const std::int64_t last_key = i + Sk - Sq;  // causal limit
  std::vector<double> s(static_cast<std::size_t>(last_key + 1));
  double m = -INFINITY;
  for (std::int64_t j = 0; j <= last_key; ++j) {
    double dot = 0.0;
    for (std::int64_t d = 0; d < D; ++d)
      dot += double(q[((b * Sq + i) * Hq + h) * D + d]) * double(k[((b * Sk + j) * Hkv + hk) * D + d]);
    s[j] = dot * scale;
    m = std::max(m, s[j]);
  }
  double sum = 0.0;
  for (auto& e : s) sum += (e = std::exp(e - m));
  double max_err = 0.0;
  for (std::int64_t d = 0; d < D; ++d) {
    double o = 0.0;
    for (std::int64_t j = 0; j <= last_key; ++j)
      o += s[j] / sum * double(v[((b * Sk + j) * Hkv + hk) * D + d]);
    max_err = std::max(max_err, std::abs(o - double(out[((b * Sq + i) * Hq + h) * D + d])));
  }
  const double ref_lse = m + std::log(sum);
  const double lse_err = std::abs(ref_lse - double(lse[(b * Hq + h) * Sq + i]));

  std::size_t unwritten = 0;
  for (float e : out) unwritten += std::isnan(e) ? 1 : 0;

  std::printf("fastattn %s: causal attention, q (%lld, %lld, %lld, %lld), k/v (%lld, %lld, %lld, %lld)\n",
              fastattn::version(), (long long)B, (long long)Sq, (long long)Hq, (long long)D,
              (long long)B, (long long)Sk, (long long)Hkv, (long long)D);
  std::printf("row (b=%lld, i=%lld, h=%lld): out[0..3] = %.6f %.6f %.6f %.6f, lse = %.6f\n",
              (long long)b, (long long)i, (long long)h, out[((b * Sq + i) * Hq + h) * D + 0],
              out[((b * Sq + i) * Hq + h) * D + 1], out[((b * Sq + i) * Hq + h) * D + 2],
              out[((b * Sq + i) * Hq + h) * D + 3], lse[(b * Hq + h) * Sq + i]);
  std::printf("hand-computed softmax: max |out - ref| = %.3g, |lse - ref| = %.3g, unwritten = %zu\n",
              max_err, lse_err, unwritten);
  const bool ok = max_err < 1e-5 && lse_err < 1e-5 && unwritten == 0;
  std::printf("%s\n", ok ? "OK" : "MISMATCH");
  return ok ? 0 : 1;
}
