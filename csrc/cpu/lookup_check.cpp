// The exhaustive proof behind the table-driven nearest-code search (kernel_common.h): over every fp32
// value n with |n| < 2 (a normalised value is at most 1 in magnitude, or a little above 1 when 1 / absmax
// is subnormal: qmap_tables.cpp), each SIMD path's code equals the specification's #{i : threshold[i] < n}.
// The expected code is walked, not searched: values are visited in order of their bit patterns, which
// orders them monotonically on each side of zero, so the count moves by a few steps per 256 values.
#include <omp.h>

#include <algorithm>
#include <stdexcept>

#include "kernel_common.h"

namespace astrobio::cpu {
namespace {

constexpr uint32_t kPerSign = 0x40000000u;  // bit patterns of +0 .. the float below 2 (and of -0 .. its negative)
constexpr int kChunk = static_cast<int>(kBlockSize);

void codes_of_path(const std::string& path, const MapTables& t, const float* n, uint8_t* out) {
#if defined(__x86_64__)
  if (path == "avx512") return avx512::nearest_codes(t, n, out);
  if (path == "avx2") return avx2::nearest_codes(t, n, out);
#endif
  for (int j = 0; j < kChunk; ++j) out[j] = nearest_code(t, n[j]);
}

}  // namespace

std::vector<std::pair<std::string, int64_t>> nearest_code_mismatches(const float* qmap, const float* threshold) {
  const std::shared_ptr<const MapTables> tables = map_tables(qmap);
  if (!tables->lut_ok) {
    throw std::invalid_argument("this map's thresholds do not fit the bucket table; the kernel uses the binary "
                                "search for it, and there is no lookup to check");
  }
  const std::vector<std::string> paths = simd_paths();
  const int n_paths = static_cast<int>(paths.size());
  std::vector<int64_t> mismatches(n_paths, 0);
  const int64_t chunks = (kPerSign + kChunk - 1) / kChunk;
#pragma omp parallel
  {
    std::vector<int64_t> local(n_paths, 0);
    alignas(64) float n[kChunk];
    alignas(64) uint8_t got[kChunk];
    uint8_t want[kChunk];
#pragma omp for schedule(static)
    for (int64_t c = 0; c < 2 * chunks; ++c) {
      const bool negative = c >= chunks;
      const uint32_t first = static_cast<uint32_t>((c % chunks) * kChunk);
      const int count = static_cast<int>(std::min<int64_t>(kChunk, kPerSign - first));
      for (int j = 0; j < kChunk; ++j) {  // a short last chunk repeats its last value
        n[j] = bits_float((negative ? 0x80000000u : 0u) | (first + static_cast<uint32_t>(std::min(j, count - 1))));
      }
      int code = static_cast<int>(std::lower_bound(threshold, threshold + kQmapSize - 1, n[0]) - threshold);
      for (int j = 0; j < count; ++j) {
        if (negative) {
          while (code > 0 && !(threshold[code - 1] < n[j])) --code;
        } else {
          while (code < kQmapSize - 1 && threshold[code] < n[j]) ++code;
        }
        want[j] = static_cast<uint8_t>(code);
      }
      for (int p = 0; p < n_paths; ++p) {
        codes_of_path(paths[p], *tables, n, got);
        for (int j = 0; j < count; ++j) local[p] += got[j] != want[j];
      }
    }
#pragma omp critical
    for (int p = 0; p < n_paths; ++p) mismatches[p] += local[p];
  }
  std::vector<std::pair<std::string, int64_t>> out;
  for (int p = 0; p < n_paths; ++p) out.emplace_back(paths[p], mismatches[p]);
  return out;
}

}  // namespace astrobio::cpu
