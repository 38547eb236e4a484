// Pieces shared by the CPU paths of astrobio::adamw8bit_step (portable, AVX2, AVX-512): the scalar
// per-element update (astrobio/spec/adamw8bit.py operation by operation), bf16 rounding, the stochastic-rounding hash,
// and the tables derived from a quantization map for the nearest-code search.
//
// Nearest-code search without a binary search. code(n) = #{i : threshold[i] < n}. A lookup table
// indexed by the fp32 bit pattern of n (sign, exponent clamped to the binades that hold thresholds and
// those up to 1.0's, and the top K_e mantissa bits, K_e <= 7 chosen per sign and binade) gives base = the code of the lowest
// value in n's bucket; each bucket holds at most one threshold (asserted when the table is built), and
// that threshold, if any, is threshold[base], so
//     code(n) = base + (n > threshold[base])         (threshold[255] = +inf)
// which is exact for every float (proven for every fp32 below 2 in magnitude by lookup_check.cpp, run
// from the tests); a NaN, which no threshold is below, is code 0. Tables are built once per map content
// and cached.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

#include "../adamw8bit.h"

namespace astrobio::cpu {

constexpr int kLutSize = 512;      // buckets over both signs
constexpr int kExpSlots = 64;      // (sign << 5) | (biased exponent & 31)
constexpr int kMaxMantissaBits = 7;

// Everything the kernels derive from one 256-entry quantization map.
struct MapTables {
  alignas(64) float qmap[kQmapSize];
  alignas(64) float threshold[kQmapSize];       // threshold[255] = +inf
  alignas(64) uint8_t qmap_planes[4][kQmapSize];  // byte k of qmap[code] (for byte-permute lookups)
  alignas(64) uint8_t threshold_planes[4][kQmapSize];
  alignas(64) uint8_t lut[kLutSize];             // bucket -> base code
  alignas(64) uint16_t exp_base[kExpSlots];       // first bucket of a (sign, binade)
  alignas(64) uint16_t exp_shift[kExpSlots];      // 7 - K_e: mantissa bits dropped from the top 7
  alignas(64) uint16_t exp_base_adjusted[kExpSlots];  // exp_base - ((e << 7) >> shift), mod 2^16
  alignas(64) int32_t exp_base32[kExpSlots];      // int32 copies for AVX2 gathers
  alignas(64) int32_t exp_shift32[kExpSlots];
  alignas(64) int32_t lut32[kLutSize];
  uint32_t clamp_lo = 0, clamp_hi = 0;          // |bits| is clamped to [clamp_lo, clamp_hi]
  bool lut_ok = false;  // false: the map needs finer buckets than the table holds; use the binary search
};

// The tables for `qmap` (256 fp32 values, ascending), from a small cache keyed by the map's contents.
std::shared_ptr<const MapTables> map_tables(const float* qmap);

inline uint32_t float_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// spec/adamw8bit.py: inv = 1 / absmax, or 0 when absmax is below the smallest normal float (MIN_NORMAL).
inline float inverse_absmax(float absmax) {
  return absmax >= std::numeric_limits<float>::min() ? 1.0f / absmax : 0.0f;
}

inline float bits_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The one NaN every fp32 output holds (spec/adamw8bit.py: CANONICAL_NAN): positive, quiet, no payload.
constexpr uint32_t kCanonicalNan = 0x7FC00000u;

inline float canonical_nan(float x) { return std::isnan(x) ? bits_float(kCanonicalNan) : x; }

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; the canonical NaN becomes 0x7FC0 (spec/adamw8bit.py: round_to_bf16).
inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  const uint32_t bits = float_bits(f);
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// mix32, the stochastic rounding's hash, is shared with the CUDA kernel (csrc/adamw8bit.h).

// The high half of the stochastic-rounding hash; constant over a block (blocks never cross 2^32).
inline uint32_t sr_high(int64_t index, uint32_t seed) {
  return mix32(static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32) ^ seed);
}

inline uint16_t stochastic_round_bf16(float f, int64_t index, uint32_t seed) {
  const uint32_t r = mix32(static_cast<uint32_t>(static_cast<uint64_t>(index)) ^ sr_high(index, seed)) & 0xFFFFu;
  return static_cast<uint16_t>((float_bits(f) + r) >> 16);
}

inline float load_float(const void* p, DType t, int64_t i) {
  return t == DType::kFloat32 ? static_cast<const float*>(p)[i] : bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

// The scalar nearest-code search through the bucket table. A NaN has no threshold below it: code 0.
inline uint8_t nearest_code(const MapTables& t, float n) {
  if (std::isnan(n)) return 0;
  const uint32_t bits = float_bits(n);
  uint32_t a = bits & 0x7FFFFFFFu;
  a = a < t.clamp_lo ? t.clamp_lo : (a > t.clamp_hi ? t.clamp_hi : a);
  const int slot = static_cast<int>(((bits >> 31) << 5) | ((a >> 23) & 31u));
  const int bucket = t.exp_base[slot] + static_cast<int>(((a >> 16) & 0x7Fu) >> t.exp_shift[slot]);
  const int base = t.lut[bucket];
  return static_cast<uint8_t>(base + (n > t.threshold[base] ? 1 : 0));
}

// The reference's definition, for maps whose buckets do not fit the table: a binary search.
inline uint8_t nearest_code_search(const MapTables& t, float n) {
  int idx = 0;
  for (int step = 128; step >= 1; step >>= 1) {
    if (n > t.threshold[idx + step - 1]) idx += step;
  }
  return static_cast<uint8_t>(idx);
}

// One element of the AdamW update (spec/adamw8bit.py: adamw_update), each operation rounded to fp32.
struct ElementUpdate {
  float p, m, v;
};

inline ElementUpdate update_element(const StepConstants& c, float p, float g, float m, float v) {
  g = g * c.grad_scale;
  const float mg = c.one_minus_beta1 * g;
  m = c.beta1 * m + mg;
  const float gg = g * g;
  const float vg = c.one_minus_beta2 * gg;
  v = c.beta2 * v + vg;
  const float denom = std::sqrt(v) * c.inv_bc2_sqrt + c.eps;
  const float upd = c.step_size * (m / denom);
  p = p * c.decay - upd;
  return {canonical_nan(p), canonical_nan(m), canonical_nan(v)};
}

// Writes the new weight of element i (fp32 master, or bf16 with stochastic rounding) and its bf16 copy.
inline void store_param(const StepArgs& a, int64_t i, float p) {
  if (a.param_dtype == DType::kFloat32) {
    static_cast<float*>(a.param)[i] = p;
    if (a.param_bf16) a.param_bf16[i] = float_to_bf16(p);
  } else {
    const uint16_t h = stochastic_round_bf16(p, i, a.seed);
    static_cast<uint16_t*>(a.param)[i] = h;
    if (a.param_bf16) a.param_bf16[i] = h;
  }
}

// The scalar path over elements [begin, begin + len) of one block (quantized or fp32 moments); used by
// the portable path and for the last, partial block of the SIMD paths.
void step_block_scalar(const StepArgs& a, const MapTables* t1, const MapTables* t2, int64_t block);

#if defined(__x86_64__)
namespace avx2 {
bool supported();
void step(const StepArgs& a, const MapTables* t1, const MapTables* t2);
// The path's nearest codes of 256 normalised values (for the exhaustive check, lookup_check.cpp).
void nearest_codes(const MapTables& t, const float* n, uint8_t* out);
}  // namespace avx2
namespace avx512 {
bool supported();
void step(const StepArgs& a, const MapTables* t1, const MapTables* t2);
void nearest_codes(const MapTables& t, const float* n, uint8_t* out);
}  // namespace avx512
#endif

}  // namespace astrobio::cpu
