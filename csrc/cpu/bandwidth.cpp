// Streaming memory-bandwidth probes for the roofline of the optimizer benchmarks (DESIGN.md section 9).
// Arrays are far larger than the last-level cache when the caller asks for enough elements.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <vector>

#include "../adamw8bit.h"

namespace astrobio::cpu {
namespace {

using Clock = std::chrono::steady_clock;

std::unique_ptr<float[]> first_touch(int64_t n, float value) {
  std::unique_ptr<float[]> a(new float[n]);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) a[i] = value;
  return a;
}

template <typename F>
double best_seconds(int repeats, F&& body) {
  double best = 1e30;
  for (int r = 0; r < repeats + 1; ++r) {  // the first run warms up pages and caches
    const auto t0 = Clock::now();
    body();
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (r > 0) best = std::min(best, s);
  }
  return best;
}

}  // namespace

double triad_bandwidth(int64_t n, int repeats) {
  if (n <= 0 || repeats <= 0) throw std::invalid_argument("triad_bandwidth: n and repeats must be positive");
  auto a = first_touch(n, 0.0f), b = first_touch(n, 1.0f), c = first_touch(n, 2.0f);
  float* pa = a.get();
  const float* pb = b.get();
  const float* pc = c.get();
  const double s = best_seconds(repeats, [&] {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) pa[i] = pb[i] + 0.5f * pc[i];
  });
  return 3.0 * sizeof(float) * n / s / 1e9;  // counted naively: 2 reads + 1 write
}

double inplace_rmw_bandwidth(int64_t n, int reads, int writes, int repeats) {
  if (n <= 0 || repeats <= 0 || reads < 1 || reads > 8 || writes < 1 || writes > reads) {
    throw std::invalid_argument("inplace_rmw_bandwidth: need n > 0, repeats > 0, 1 <= writes <= reads <= 8");
  }
  std::vector<std::unique_ptr<float[]>> arrays;
  std::vector<float*> p;
  for (int k = 0; k < reads; ++k) {
    arrays.push_back(first_touch(n, 1.0f + k));
    p.push_back(arrays.back().get());
  }
  const double s = best_seconds(repeats, [&] {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      float sum = 0.0f;
      for (int k = 0; k < reads; ++k) sum += p[k][i];
      for (int k = 0; k < writes; ++k) p[k][i] = p[k][i] * 0.999f + sum * 1e-6f;
    }
  });
  return static_cast<double>(reads + writes) * sizeof(float) * n / s / 1e9;
}

}  // namespace astrobio::cpu
