// AVX2 path of the CPU adamw8bit_step (needs AVX2; FMA is not used). Eight lanes of the update in the
// reference's operation order; table lookups (maps, bucket table, thresholds) are gathers.
#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>

#include "kernel_common.h"

#define ASTROBIO_AVX2 __attribute__((target("avx2")))

namespace astrobio::cpu::avx2 {

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
}

namespace {

struct Consts {
  __m256 beta1, beta2, omb1, omb2, eps, grad_scale, decay, step_size, inv_bc2_sqrt;
};

ASTROBIO_AVX2 inline Consts broadcast(const StepConstants& c) {
  return {_mm256_set1_ps(c.beta1), _mm256_set1_ps(c.beta2), _mm256_set1_ps(c.one_minus_beta1),
          _mm256_set1_ps(c.one_minus_beta2), _mm256_set1_ps(c.eps), _mm256_set1_ps(c.grad_scale),
          _mm256_set1_ps(c.decay), _mm256_set1_ps(c.step_size), _mm256_set1_ps(c.inv_bc2_sqrt)};
}

ASTROBIO_AVX2 inline __m256 load8(const void* base, DType dtype, int64_t i) {
  if (dtype == DType::kFloat32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// qmap[code] * absmax for the 8 codes at p.
ASTROBIO_AVX2 inline __m256 dequantize8(const MapTables& t, const uint8_t* p, __m256 absmax) {
  const __m256i codes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_mul_ps(_mm256_i32gather_ps(t.qmap, codes, 4), absmax);
}

// Nearest codes of 8 normalised values (kernel_common.h: nearest_code), stored to out[0..7].
ASTROBIO_AVX2 inline void quantize8(const MapTables& t, __m256 n, uint8_t* out) {
  const __m256i bits = _mm256_castps_si256(n);
  __m256i a = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF));
  a = _mm256_max_epu32(a, _mm256_set1_epi32(static_cast<int>(t.clamp_lo)));
  a = _mm256_min_epu32(a, _mm256_set1_epi32(static_cast<int>(t.clamp_hi)));
  const __m256i slot = _mm256_or_si256(_mm256_slli_epi32(_mm256_srli_epi32(bits, 31), 5),
                                       _mm256_and_si256(_mm256_srli_epi32(a, 23), _mm256_set1_epi32(31)));
  const __m256i base = _mm256_i32gather_epi32(t.exp_base32, slot, 4);
  const __m256i shift = _mm256_i32gather_epi32(t.exp_shift32, slot, 4);
  const __m256i top7 = _mm256_and_si256(_mm256_srli_epi32(a, 16), _mm256_set1_epi32(0x7F));
  const __m256i bucket = _mm256_add_epi32(base, _mm256_srlv_epi32(top7, shift));
  __m256i code = _mm256_i32gather_epi32(t.lut32, bucket, 4);
  const __m256 thr = _mm256_i32gather_ps(t.threshold, code, 4);
  code = _mm256_sub_epi32(code, _mm256_castps_si256(_mm256_cmp_ps(n, thr, _CMP_GT_OQ)));
  code = _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(n, n, _CMP_UNORD_Q)), code);  // NaN: code 0
  const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(words, words));
}

ASTROBIO_AVX2 inline __m256i mix32(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

ASTROBIO_AVX2 inline void store_words(uint16_t* out, __m256i h) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
}

// NaN lanes replaced by the canonical NaN (kernel_common.h: canonical_nan).
ASTROBIO_AVX2 inline __m256 canonical_nan8(__m256 x) {
  return _mm256_blendv_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(kCanonicalNan))),
                          _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// Stores 8 new weights at element i: fp32 (and its round-to-nearest bf16 copy) or stochastic bf16.
ASTROBIO_AVX2 inline void store_params(const StepArgs& a, int64_t i, __m256 p, uint32_t sr_hi) {
  p = canonical_nan8(p);  // rounds to the bf16 NaN 0x7FC0 in both roundings below
  const __m256i bits = _mm256_castps_si256(p);
  __m256i h;
  if (a.param_dtype == DType::kFloat32) {
    _mm256_storeu_ps(static_cast<float*>(a.param) + i, p);
    if (a.param_bf16 == nullptr) return;
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    h = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  } else {
    const __m256i lanes = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i lo = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(i))), lanes);
    const __m256i r = _mm256_and_si256(mix32(_mm256_xor_si256(lo, _mm256_set1_epi32(static_cast<int>(sr_hi)))),
                                       _mm256_set1_epi32(0xFFFF));
    h = _mm256_srli_epi32(_mm256_add_epi32(bits, r), 16);
    store_words(static_cast<uint16_t*>(a.param) + i, h);
    if (a.param_bf16 == nullptr) return;
  }
  store_words(a.param_bf16 + i, h);
}

// The update of 8 elements at i (spec/adamw8bit.py: adamw_update); returns the new weights, updates m and v.
ASTROBIO_AVX2 inline __m256 update8(const StepArgs& a, const Consts& k, int64_t i, __m256& m, __m256& v) {
  const __m256 g = _mm256_mul_ps(load8(a.grad, a.grad_dtype, i), k.grad_scale);
  m = _mm256_add_ps(_mm256_mul_ps(k.beta1, m), _mm256_mul_ps(k.omb1, g));
  v = _mm256_add_ps(_mm256_mul_ps(k.beta2, v), _mm256_mul_ps(k.omb2, _mm256_mul_ps(g, g)));
  const __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v), k.inv_bc2_sqrt), k.eps);
  const __m256 upd = _mm256_mul_ps(k.step_size, _mm256_div_ps(m, denom));
  return _mm256_sub_ps(_mm256_mul_ps(load8(a.param, a.param_dtype, i), k.decay), upd);
}

ASTROBIO_AVX2 inline __m256 abs8(__m256 x) {
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF)));
}

ASTROBIO_AVX2 inline float reduce_max(__m256 x) {
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_shuffle_ps(r, r, 1));
  return _mm_cvtss_f32(r);
}

// One full block of 256 elements with 8-bit moments.
ASTROBIO_AVX2 void step_block_quantized(const StepArgs& a, const Consts& k, const MapTables& t1,
                                        const MapTables& t2, int64_t block) {
  const int64_t begin = block * kBlockSize;
  auto* codes1 = static_cast<uint8_t*>(a.exp_avg) + begin;
  auto* codes2 = static_cast<uint8_t*>(a.exp_avg_sq) + begin;
  const uint32_t sr_hi = sr_high(begin, a.seed);
  const __m256 absmax1 = _mm256_set1_ps(a.absmax1[block]), absmax2 = _mm256_set1_ps(a.absmax2[block]);
  alignas(32) float m_new[kBlockSize], v_new[kBlockSize];
  __m256 max_m = _mm256_setzero_ps(), max_v = _mm256_setzero_ps();
  __m256 nan_m = _mm256_setzero_ps(), nan_v = _mm256_setzero_ps();  // max_ps drops NaNs; the absmax keeps them
  for (int j = 0; j < kBlockSize; j += 8) {
    __m256 m = dequantize8(t1, codes1 + j, absmax1), v = dequantize8(t2, codes2 + j, absmax2);
    store_params(a, begin + j, update8(a, k, begin + j, m, v), sr_hi);
    _mm256_store_ps(m_new + j, m);
    _mm256_store_ps(v_new + j, v);
    max_m = _mm256_max_ps(max_m, abs8(m));
    max_v = _mm256_max_ps(max_v, abs8(v));
    nan_m = _mm256_or_ps(nan_m, _mm256_cmp_ps(m, m, _CMP_UNORD_Q));
    nan_v = _mm256_or_ps(nan_v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  const float am = _mm256_movemask_ps(nan_m) ? bits_float(kCanonicalNan) : reduce_max(max_m);
  const float av = _mm256_movemask_ps(nan_v) ? bits_float(kCanonicalNan) : reduce_max(max_v);
  const __m256 inv_m = _mm256_set1_ps(inverse_absmax(am));
  const __m256 inv_v = _mm256_set1_ps(inverse_absmax(av));
  for (int j = 0; j < kBlockSize; j += 8) {
    quantize8(t1, _mm256_mul_ps(_mm256_load_ps(m_new + j), inv_m), codes1 + j);
    quantize8(t2, _mm256_mul_ps(_mm256_load_ps(v_new + j), inv_v), codes2 + j);
  }
  a.absmax1[block] = am;
  a.absmax2[block] = av;
}

// One full block of 256 elements with fp32 moments.
ASTROBIO_AVX2 void step_block_fp32(const StepArgs& a, const Consts& k, int64_t block) {
  const int64_t begin = block * kBlockSize;
  auto* m_ptr = static_cast<float*>(a.exp_avg);
  auto* v_ptr = static_cast<float*>(a.exp_avg_sq);
  const uint32_t sr_hi = sr_high(begin, a.seed);
  for (int64_t i = begin; i < begin + kBlockSize; i += 8) {
    __m256 m = _mm256_loadu_ps(m_ptr + i), v = _mm256_loadu_ps(v_ptr + i);
    store_params(a, i, update8(a, k, i, m, v), sr_hi);
    _mm256_storeu_ps(m_ptr + i, canonical_nan8(m));
    _mm256_storeu_ps(v_ptr + i, canonical_nan8(v));
  }
}

}  // namespace

ASTROBIO_AVX2 void nearest_codes(const MapTables& t, const float* n, uint8_t* out) {
  for (int j = 0; j < kBlockSize; j += 8) quantize8(t, _mm256_loadu_ps(n + j), out + j);
}

ASTROBIO_AVX2 void step(const StepArgs& a, const MapTables* t1, const MapTables* t2) {
  const int64_t full = a.numel / kBlockSize;
  const Consts k = broadcast(a.c);
#pragma omp parallel for schedule(static) if (full > 4)
  for (int64_t b = 0; b < full; ++b) {
    if (a.quantized) {
      step_block_quantized(a, k, *t1, *t2, b);
    } else {
      step_block_fp32(a, k, b);
    }
  }
  if (a.numel % kBlockSize != 0) step_block_scalar(a, t1, t2, full);
}

}  // namespace astrobio::cpu::avx2
#endif  // __x86_64__
