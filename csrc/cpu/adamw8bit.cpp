// CPU kernel of astrobio::adamw8bit_step: one pass over memory, blocks of 256 split over OpenMP threads.
// Portable scalar path; the arithmetic follows astrobio/optim/reference.py operation by operation.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../adamw8bit.h"

namespace astrobio::cpu {
namespace {

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// Round to nearest even (NaN stays NaN).
inline uint16_t float_to_bf16(float f) {
  uint32_t bits = float_bits(f);
  if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline uint16_t stochastic_round_bf16(float f, int64_t index, uint32_t seed) {
  const uint64_t i = static_cast<uint64_t>(index);
  const uint32_t r = mix32(static_cast<uint32_t>(i) ^ mix32(static_cast<uint32_t>(i >> 32) ^ seed)) & 0xFFFFu;
  return static_cast<uint16_t>((float_bits(f) + r) >> 16);
}

inline float load(const void* p, DType t, int64_t i) {
  return t == DType::kFloat32 ? static_cast<const float*>(p)[i] : bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

// Nearest code: the number of thresholds strictly below x (binary search over 255 + a +inf sentinel).
inline uint8_t nearest_code(const float* thresholds, float x) {
  int idx = 0;
  for (int step = 128; step >= 1; step >>= 1) {
    if (x > thresholds[idx + step - 1]) idx += step;
  }
  return static_cast<uint8_t>(idx);
}

void make_thresholds(const float* qmap, float* out) {
  for (int i = 0; i < kQmapSize - 1; ++i) out[i] = (qmap[i] + qmap[i + 1]) * 0.5f;
  out[kQmapSize - 1] = INFINITY;
}

}  // namespace

void adamw8bit_step(const StepArgs& a) {
  const StepConstants c = a.c;
  float t1[kQmapSize], t2[kQmapSize];
  if (a.quantized) {
    make_thresholds(a.qmap1, t1);
    make_thresholds(a.qmap2, t2);
  }
  const int64_t blocks = (a.numel + kBlockSize - 1) / kBlockSize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlockSize;
    const int64_t len = std::min<int64_t>(kBlockSize, a.numel - begin);
    float m[kBlockSize], v[kBlockSize];
    float max_m = 0.0f, max_v = 0.0f;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t i = begin + j;
      float m0, v0;
      if (a.quantized) {
        m0 = a.qmap1[static_cast<const uint8_t*>(a.exp_avg)[i]] * a.absmax1[b];
        v0 = a.qmap2[static_cast<const uint8_t*>(a.exp_avg_sq)[i]] * a.absmax2[b];
      } else {
        m0 = static_cast<const float*>(a.exp_avg)[i];
        v0 = static_cast<const float*>(a.exp_avg_sq)[i];
      }
      const float g = load(a.grad, a.grad_dtype, i) * c.grad_scale;
      const float mg = c.one_minus_beta1 * g;
      m[j] = c.beta1 * m0 + mg;
      const float gg = g * g;
      const float vg = c.one_minus_beta2 * gg;
      v[j] = c.beta2 * v0 + vg;
      const float denom = std::sqrt(v[j]) * c.inv_bc2_sqrt + c.eps;
      const float upd = c.step_size * (m[j] / denom);
      const float p = load(a.param, a.param_dtype, i) * c.decay - upd;
      if (a.param_dtype == DType::kFloat32) {
        static_cast<float*>(a.param)[i] = p;
        if (a.param_bf16) a.param_bf16[i] = float_to_bf16(p);
      } else {
        const uint16_t h = stochastic_round_bf16(p, i, a.seed);
        static_cast<uint16_t*>(a.param)[i] = h;
        if (a.param_bf16) a.param_bf16[i] = h;
      }
      max_m = std::max(max_m, std::fabs(m[j]));
      max_v = std::max(max_v, std::fabs(v[j]));
    }
    if (a.quantized) {
      const float inv_m = max_m > 0.0f ? 1.0f / max_m : 0.0f;
      const float inv_v = max_v > 0.0f ? 1.0f / max_v : 0.0f;
      for (int64_t j = 0; j < len; ++j) {
        static_cast<uint8_t*>(a.exp_avg)[begin + j] = nearest_code(t1, m[j] * inv_m);
        static_cast<uint8_t*>(a.exp_avg_sq)[begin + j] = nearest_code(t2, v[j] * inv_v);
      }
      a.absmax1[b] = max_m;
      a.absmax2[b] = max_v;
    } else {
      std::memcpy(static_cast<float*>(a.exp_avg) + begin, m, len * sizeof(float));
      std::memcpy(static_cast<float*>(a.exp_avg_sq) + begin, v, len * sizeof(float));
    }
  }
}

const char* simd_path() { return "portable"; }

}  // namespace astrobio::cpu
