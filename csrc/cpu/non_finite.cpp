// Whether any element of a set of fp32/bf16 tensors is an infinity or a NaN: the check behind
// AdamW8bit's non-finite skip when the caller does not say. One pass over the gradients, split in
// chunks over OpenMP threads (all tensors of a step in one parallel region); a thread that finds a
// non-finite value makes the others skip their remaining chunks.
#include <omp.h>

#include <algorithm>
#include <atomic>

#include "kernel_common.h"

namespace astrobio::cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task: 256 KB of fp32

// Exponent all ones <=> adding one to the exponent field carries into the sign bit. Branch-free, so the
// compiler vectorises it.
bool chunk_non_finite_f32(const uint32_t* bits, int64_t n) {
  uint32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc |= ((bits[i] & 0x7F800000u) + 0x00800000u) & 0x80000000u;
  return acc != 0;
}

bool chunk_non_finite_bf16(const uint16_t* bits, int64_t n) {
  uint32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc |= ((bits[i] & 0x7F80u) + 0x0080u) & 0x8000u;
  return acc != 0;
}

}  // namespace

bool any_non_finite(const std::vector<FloatSpan>& spans) {
  std::vector<std::pair<int, int64_t>> tasks;  // (span, first element)
  for (int s = 0; s < static_cast<int>(spans.size()); ++s) {
    for (int64_t i = 0; i < spans[s].numel; i += kChunk) tasks.emplace_back(s, i);
  }
  std::atomic<bool> found{false};
  const int64_t count = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 4) if (count > 1)
  for (int64_t t = 0; t < count; ++t) {
    if (found.load(std::memory_order_relaxed)) continue;
    const FloatSpan& span = spans[tasks[t].first];
    const int64_t begin = tasks[t].second, n = std::min(kChunk, span.numel - begin);
    const bool bad = span.dtype == DType::kFloat32
                         ? chunk_non_finite_f32(static_cast<const uint32_t*>(span.data) + begin, n)
                         : chunk_non_finite_bf16(static_cast<const uint16_t*>(span.data) + begin, n);
    if (bad) found.store(true, std::memory_order_relaxed);
  }
  return found.load();
}

}  // namespace astrobio::cpu
