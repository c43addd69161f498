// bench_cpu: fastattn's CPU attention_forward against a naive double-precision loop on the same
// shape (batch 1, seqlen 2048, head_dim 128, float32 inputs, non-causal), with 1 and 2 threads.
// Reports GFLOP/s (4 * S^2 * D * heads useful FLOPs), GFLOP/s per core, the speedup over the
// naive loop, and the max |difference| between the two outputs.
//
//   bench_cpu [seqlen=2048] [head_dim=128] [heads=2]
#include <fastattn/fastattn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The textbook algorithm, in double: for each query row, all scores, max, exp, sum, weighted sum.
// q/k/v/out are (S, H, D) row-major (batch 1).
void naive_attention(const std::vector<float>& q, const std::vector<float>& k,
                     const std::vector<float>& v, std::vector<double>& out, int S, int H, int D) {
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<double> p(static_cast<std::size_t>(S));
  for (int h = 0; h < H; ++h) {
    for (int i = 0; i < S; ++i) {
      double m = -INFINITY;
      for (int j = 0; j < S; ++j) {
        double dot = 0.0;
        for (int d = 0; d < D; ++d)
          dot += double(q[(std::size_t(i) * H + h) * D + d]) * double(k[(std::size_t(j) * H + h) * D + d]);
        p[j] = dot * scale;
        m = std::max(m, p[j]);
      }
      double sum = 0.0;
      for (int j = 0; j < S; ++j) sum += (p[j] = std::exp(p[j] - m));
      for (int d = 0; d < D; ++d) {
        double acc = 0.0;
        for (int j = 0; j < S; ++j) acc += p[j] * double(v[(std::size_t(j) * H + h) * D + d]);
        out[(std::size_t(i) * H + h) * D + d] = acc / sum;
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int S = argc > 1 ? std::atoi(argv[1]) : 2048;
  const int D = argc > 2 ? std::atoi(argv[2]) : 128;
  const int H = argc > 3 ? std::atoi(argv[3]) : 2;
  const double flops = 4.0 * double(S) * double(S) * double(D) * double(H);
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());

  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::size_t n = std::size_t(S) * H * D;
  std::vector<float> q(n), k(n), v(n), out(n);
  for (auto* t : {&q, &k, &v})
    for (auto& e : *t) e = normal(rng);

  std::printf("bench_cpu: attention_forward, batch 1, seqlen %d, heads %d, head_dim %d, float32, "
              "non-causal (%.2f GFLOP per call), %u hardware threads\n",
              S, H, D, flops / 1e9, hw);

  // Naive reference, run once in full on the same shape.
  std::vector<double> ref(n);
  auto t0 = Clock::now();
  naive_attention(q, k, v, ref, S, H, D);
  const double t_naive = seconds_since(t0);
  std::printf("naive double loop (1 thread): %.3f s, %.2f GFLOP/s\n", t_naive, flops / t_naive / 1e9);

  using fastattn::DType;
  fastattn::AttentionArgs args;
  args.q = fastattn::make_view(q.data(), DType::kFloat32, {1, S, H, D});
  args.k = fastattn::make_view(k.data(), DType::kFloat32, {1, S, H, D});
  args.v = fastattn::make_view(v.data(), DType::kFloat32, {1, S, H, D});
  args.out = fastattn::make_view(out.data(), DType::kFloat32, {1, S, H, D});

  int rc = 0;
  std::printf("%-8s %10s %10s %14s %10s %12s\n", "threads", "median s", "GFLOP/s", "GFLOP/s/core",
              "speedup", "max |diff|");
  for (int threads : {1, 2}) {
    if (unsigned(threads) > hw && threads > 1) continue;
    args.exec.num_threads = threads;
    std::fill(out.begin(), out.end(), NAN);
    fastattn::attention_forward(args);  // warm-up (thread pool, page faults)
    std::vector<double> times;
    const auto start = Clock::now();
    while (times.size() < 3 || (times.size() < 20 && seconds_since(start) < 3.0)) {
      t0 = Clock::now();
      fastattn::attention_forward(args);
      times.push_back(seconds_since(t0));
    }
    std::sort(times.begin(), times.end());
    const double t = times[times.size() / 2];
    double max_diff = 0.0;
    for (std::size_t i = 0; i < n; ++i) max_diff = std::max(max_diff, std::abs(double(out[i]) - ref[i]));
    if (!(max_diff < 1e-4)) rc = 1;  // NaN fails too
    std::printf("%-8d %10.4f %10.2f %14.2f %9.1fx %12.2e\n", threads, t, flops / t / 1e9,
                flops / t / 1e9 / threads, t_naive / t, max_diff);
  }
  if (rc) std::printf("ERROR: fastattn output differs from the naive reference\n");
  return rc;
}
