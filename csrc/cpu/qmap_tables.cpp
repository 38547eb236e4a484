// Builds and caches the tables the CPU kernels derive from a quantization map (kernel_common.h explains
// the bucket search they serve).
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

#include "kernel_common.h"

namespace astrobio::cpu {
namespace {

constexpr size_t kCacheEntries = 16;

// Number of the 255 thresholds that are < x.
int count_below(const float* threshold, float x) {
  return static_cast<int>(std::lower_bound(threshold, threshold + kQmapSize - 1, x) - threshold);
}

// The value range [vmin, vmax] of bucket j of binade `eb` on side `sign` with 2^k buckets per binade; the
// first bucket reaches down to zero and the last up to infinity (values there are clamped into them).
std::pair<float, float> bucket_range(int sign, uint32_t eb, int k, uint32_t j, uint32_t eb_min, uint32_t eb_max) {
  const uint32_t width = 1u << (23 - k);
  uint32_t klo = (eb << 23) + j * width;
  uint32_t khi = klo + width - 1;
  if (eb == eb_min && j == 0) klo = 0;
  if (eb == eb_max && j == (1u << k) - 1) khi = 0x7F800000u;
  if (sign == 0) return {bits_float(klo), bits_float(khi)};
  return {-bits_float(khi), -bits_float(klo)};
}

// Whether 2^k buckets in this binade each hold at most one threshold.
bool buckets_separate(const float* threshold, int sign, uint32_t eb, int k, uint32_t eb_min, uint32_t eb_max) {
  for (uint32_t j = 0; j < (1u << k); ++j) {
    const auto [vmin, vmax] = bucket_range(sign, eb, k, j, eb_min, eb_max);
    if (count_below(threshold, vmax) - count_below(threshold, vmin) > 1) return false;
  }
  return true;
}

// Fills the bucket tables; false when the map needs more buckets than the table holds.
bool build_buckets(MapTables& t) {
  const float* th = t.threshold;
  for (int i = 0; i + 1 < kQmapSize - 1; ++i) {
    if (!(th[i] < th[i + 1])) return false;  // not strictly ascending (or NaN): binary search
  }
  if (!std::isfinite(th[0]) || !std::isfinite(th[kQmapSize - 2])) return false;
  uint32_t eb_min = 255, eb_max = 0;
  for (int i = 0; i < kQmapSize - 1; ++i) {
    const uint32_t eb = (float_bits(th[i]) & 0x7FFFFFFFu) >> 23;
    eb_min = std::min(eb_min, eb);
    eb_max = std::max(eb_max, eb);
  }
  // The table also covers the binades up to that of 1.0 (biased exponent 127), so that the AVX-512 path
  // needs no upper clamp: a normalised value x * inv (|x| <= absmax, inv = 1 / absmax rounded) is below 2
  // in magnitude. It is at most 1 when inv is normal (|x * inv| < 1 + 2^-24 before rounding, below the
  // midpoint to the next float) and below 1 + 2^-22 when inv is subnormal (absmax > 2^126).
  eb_max = std::max<uint32_t>(eb_max, 127);
  if (eb_max - eb_min + 1 > 32) return false;
  t.clamp_lo = eb_min << 23;
  t.clamp_hi = ((eb_max + 1) << 23) - 1;
  int next = 0;
  for (int sign = 0; sign < 2; ++sign) {
    for (uint32_t eb = eb_min; eb <= eb_max; ++eb) {
      int k = 0;
      while (k <= kMaxMantissaBits && !buckets_separate(th, sign, eb, k, eb_min, eb_max)) ++k;
      if (k > kMaxMantissaBits || next + (1 << k) > kLutSize) return false;
      const int slot = (sign << 5) | static_cast<int>(eb & 31u);
      const int shift = kMaxMantissaBits - k;
      t.exp_base[slot] = static_cast<uint16_t>(next);
      t.exp_shift[slot] = static_cast<uint16_t>(shift);
      t.exp_base_adjusted[slot] = static_cast<uint16_t>(next - static_cast<int>((eb << 7) >> shift));
      for (uint32_t j = 0; j < (1u << k); ++j) {
        const float vmin = bucket_range(sign, eb, k, j, eb_min, eb_max).first;
        t.lut[next + j] = static_cast<uint8_t>(count_below(th, vmin));
      }
      next += 1 << k;
    }
  }
  for (int i = 0; i < kExpSlots; ++i) {
    t.exp_base32[i] = t.exp_base[i];
    t.exp_shift32[i] = t.exp_shift[i];
  }
  for (int i = 0; i < kLutSize; ++i) t.lut32[i] = t.lut[i];
  return true;
}

std::shared_ptr<const MapTables> build_tables(const float* qmap) {
  auto t = std::make_shared<MapTables>();
  std::memset(static_cast<void*>(t.get()), 0, sizeof(MapTables));
  std::memcpy(t->qmap, qmap, sizeof t->qmap);
  for (int i = 0; i < kQmapSize - 1; ++i) t->threshold[i] = (qmap[i] + qmap[i + 1]) * 0.5f;
  t->threshold[kQmapSize - 1] = std::numeric_limits<float>::infinity();
  for (int i = 0; i < kQmapSize; ++i) {
    const uint32_t q = float_bits(t->qmap[i]), h = float_bits(t->threshold[i]);
    for (int k = 0; k < 4; ++k) {
      t->qmap_planes[k][i] = static_cast<uint8_t>(q >> (8 * k));
      t->threshold_planes[k][i] = static_cast<uint8_t>(h >> (8 * k));
    }
  }
  t->lut_ok = build_buckets(*t);
  return t;
}

}  // namespace

std::shared_ptr<const MapTables> map_tables(const float* qmap) {
  static std::mutex mutex;
  static std::vector<std::pair<std::array<float, kQmapSize>, std::shared_ptr<const MapTables>>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [key, tables] : cache) {
    if (std::memcmp(key.data(), qmap, sizeof(float) * kQmapSize) == 0) return tables;
  }
  if (cache.size() == kCacheEntries) cache.erase(cache.begin());
  std::array<float, kQmapSize> key;
  std::memcpy(key.data(), qmap, sizeof(float) * kQmapSize);
  cache.emplace_back(key, build_tables(qmap));
  return cache.back().second;
}

}  // namespace astrobio::cpu
