// Streaming memory-bandwidth probes for the roofline of the optimizer benchmarks (docs/BENCHMARKS.md, "roofline").
// Arrays are far larger than the last-level cache when the caller asks for enough elements (this
// machine's L3 is 32 MB: use >= 256M floats in all). The in-place probe has the shape of an optimizer
// step: it reads `reads` arrays and writes the first `writes` of them back in place (no write-allocate
// traffic), vectorised and specialised per stream count so that it is limited by memory, not by
// instructions.
#include <omp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include "../adamw8bit.h"

namespace astrobio::cpu {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kMaxStreams = 8;

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

// One pass: every element of the R arrays is read, the first W are written back.
template <int R, int W>
void rmw_pass(const std::array<float*, kMaxStreams>& p, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    float sum = 0.0f;
    for (int k = 0; k < R; ++k) sum += p[k][i];
    for (int k = 0; k < W; ++k) p[k][i] = p[k][i] * 0.999f + sum * 1e-6f;
  }
}

using Pass = void (*)(const std::array<float*, kMaxStreams>&, int64_t);

template <int R, int... W>
constexpr std::array<Pass, kMaxStreams> passes_for(std::integer_sequence<int, W...>) {
  return {(W + 1 <= R ? &rmw_pass<R, (W + 1 <= R ? W + 1 : 1)> : nullptr)...};
}

template <int... R>
constexpr std::array<std::array<Pass, kMaxStreams>, kMaxStreams> pass_table(std::integer_sequence<int, R...>) {
  return {passes_for<R + 1>(std::make_integer_sequence<int, kMaxStreams>{})...};
}

// kPasses[reads - 1][writes - 1]
constexpr auto kPasses = pass_table(std::make_integer_sequence<int, kMaxStreams>{});

}  // namespace

double triad_bandwidth(int64_t n, int repeats) {
  if (n <= 0 || repeats <= 0) throw std::invalid_argument("triad_bandwidth: n and repeats must be positive");
  auto a = first_touch(n, 0.0f), b = first_touch(n, 1.0f), c = first_touch(n, 2.0f);
  float* pa = a.get();
  const float* pb = b.get();
  const float* pc = c.get();
  const double s = best_seconds(repeats, [&] {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) pa[i] = pb[i] + 0.5f * pc[i];
  });
  return 3.0 * sizeof(float) * n / s / 1e9;  // counted naively: 2 reads + 1 write (write-allocate not counted)
}

double inplace_rmw_bandwidth(int64_t n, int reads, int writes, int repeats) {
  if (n <= 0 || repeats <= 0 || reads < 1 || reads > kMaxStreams || writes < 1 || writes > reads) {
    throw std::invalid_argument("inplace_rmw_bandwidth: need n > 0, repeats > 0, 1 <= writes <= reads <= 8");
  }
  std::vector<std::unique_ptr<float[]>> arrays;
  std::array<float*, kMaxStreams> p{};
  for (int k = 0; k < reads; ++k) {
    arrays.push_back(first_touch(n, 1.0f + k));
    p[k] = arrays.back().get();
  }
  const Pass pass = kPasses[reads - 1][writes - 1];
  const double s = best_seconds(repeats, [&] { pass(p, n); });
  return static_cast<double>(reads + writes) * sizeof(float) * n / s / 1e9;
}

}  // namespace astrobio::cpu
