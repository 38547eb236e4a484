// AVX-512 path of the CPU adamw8bit_step (needs F, BW, VL, DQ and VBMI). Sixteen lanes of the update in
// the reference's operation order (no FMA); 256-entry tables (the maps, the thresholds) are looked up 64
// codes at a time with byte permutes over four byte planes, plane by plane over the whole block so that
// each table register is loaded once per block (Zen 4 loads one 64-byte register per cycle), and the
// nearest-code bucket index is computed on the top 16 bits of each normalised value (kernel_common.h).
#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>

#include "kernel_common.h"

#define ASTROBIO_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")))

namespace astrobio::cpu::avx512 {

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi");
}

namespace {

// Byte order that makes the unpack cascade in lookup_block yield elements in natural order:
// position 16L + 4r + s holds element 16r + 4L + s.
struct Transpose {
  alignas(64) uint8_t perm[64];
  constexpr Transpose() : perm() {
    for (int lane = 0; lane < 4; ++lane)
      for (int r = 0; r < 4; ++r)
        for (int s = 0; s < 4; ++s) perm[16 * lane + 4 * r + s] = static_cast<uint8_t>(16 * r + 4 * lane + s);
  }
};
constexpr Transpose kTranspose;

struct PackSelectors {
  alignas(64) uint16_t high_words[32];  // odd words of two registers: the top halves of 32 floats
  alignas(64) uint8_t low_bytes[64];    // even bytes of two registers: the low bytes of 64 words
  constexpr PackSelectors() : high_words(), low_bytes() {
    for (int i = 0; i < 32; ++i) high_words[i] = static_cast<uint16_t>(2 * i + 1);
    for (int i = 0; i < 64; ++i) low_bytes[i] = static_cast<uint8_t>(2 * i);
  }
};
constexpr PackSelectors kPack;

// The four 64-byte registers of one 256-entry byte table (a byte plane of a map or a bucket table).
struct ByteTable {
  __m512i r[4];
};

ASTROBIO_AVX512 inline ByteTable load_table(const uint8_t* table) {
  return {{_mm512_load_si512(table), _mm512_load_si512(table + 64), _mm512_load_si512(table + 128),
           _mm512_load_si512(table + 192)}};
}

// table[idx] for 64 byte indices; bit7 holds the top bits of idx.
ASTROBIO_AVX512 inline __m512i lookup256(const ByteTable& t, __m512i idx, __mmask64 bit7) {
  const __m512i lo = _mm512_permutex2var_epi8(t.r[0], idx, t.r[1]);
  const __m512i hi = _mm512_permutex2var_epi8(t.r[2], idx, t.r[3]);
  return _mm512_mask_blend_epi8(bit7, lo, hi);
}

// fp32 table entries (four byte planes) for the 256 codes of a block, in natural order: out[16 * q + lane]
// holds table[codes[16 * q + lane]]. Plane-major, so that each table register is loaded once per block.
ASTROBIO_AVX512 inline void lookup_block(const uint8_t (*planes)[kQmapSize], const __m512i codes[4], __m512 out[16]) {
  const __m512i transpose = _mm512_load_si512(kTranspose.perm);
  __m512i t[4];
  __mmask64 bit7[4];
  for (int g = 0; g < 4; ++g) {
    t[g] = _mm512_permutexvar_epi8(transpose, codes[g]);
    bit7[g] = _mm512_movepi8_mask(t[g]);
  }
  __m512i b[4][4];
  for (int k = 0; k < 4; ++k) {
    const ByteTable table = load_table(planes[k]);
    for (int g = 0; g < 4; ++g) b[g][k] = lookup256(table, t[g], bit7[g]);
  }
  for (int g = 0; g < 4; ++g) {
    const __m512i u01lo = _mm512_unpacklo_epi8(b[g][0], b[g][1]), u01hi = _mm512_unpackhi_epi8(b[g][0], b[g][1]);
    const __m512i u23lo = _mm512_unpacklo_epi8(b[g][2], b[g][3]), u23hi = _mm512_unpackhi_epi8(b[g][2], b[g][3]);
    out[4 * g + 0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(u01lo, u23lo));
    out[4 * g + 1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(u01lo, u23lo));
    out[4 * g + 2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(u01hi, u23hi));
    out[4 * g + 3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(u01hi, u23hi));
  }
}

// The bucket-index tables of one map as registers: (sign, binade) slot -> adjusted base and shift.
struct BucketTables {
  __m512i base_lo, base_hi, shift_lo, shift_hi, abs_mask, clamp_lo;
};

ASTROBIO_AVX512 inline BucketTables load_bucket_tables(const MapTables& t) {
  return {_mm512_load_si512(t.exp_base_adjusted), _mm512_load_si512(t.exp_base_adjusted + 32),
          _mm512_load_si512(t.exp_shift), _mm512_load_si512(t.exp_shift + 32), _mm512_set1_epi16(0x7FFF),
          _mm512_set1_epi16(static_cast<int16_t>(t.clamp_lo >> 16))};
}

// Bucket indices (words) of 32 normalised values given as their top 16 bits.
ASTROBIO_AVX512 inline __m512i bucket_index(const BucketTables& t, __m512i h) {
  __m512i ah = _mm512_and_si512(h, t.abs_mask);
  // clamped from below only: a normalised value is below 2 in magnitude (or a NaN, whose code
  // quantize_block sets to 0), and the table covers the binade of 1.0 (qmap_tables.cpp)
  ah = _mm512_max_epu16(ah, t.clamp_lo);
  // slot = (sign << 5) | (exponent & 31): the permutes below read only the low 6 bits
  const __m512i slot = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ah, 7), _mm512_srli_epi16(h, 10),
                                                 _mm512_set1_epi16(0x1F), 0xE4);
  const __m512i base = _mm512_permutex2var_epi16(t.base_lo, slot, t.base_hi);
  const __m512i shift = _mm512_permutex2var_epi16(t.shift_lo, slot, t.shift_hi);
  return _mm512_add_epi16(base, _mm512_srlv_epi16(ah, shift));
}

// Base codes (bucket table) of 64 normalised values in natural order.
ASTROBIO_AVX512 inline __m512i base_codes64(const BucketTables& bt, const ByteTable& lut_lo, const ByteTable& lut_hi,
                                            const __m512 n[4]) {
  const __m512i sel_hi = _mm512_load_si512(kPack.high_words);
  const __m512i h0 = _mm512_permutex2var_epi16(_mm512_castps_si512(n[0]), sel_hi, _mm512_castps_si512(n[1]));
  const __m512i h1 = _mm512_permutex2var_epi16(_mm512_castps_si512(n[2]), sel_hi, _mm512_castps_si512(n[3]));
  const __m512i i0 = bucket_index(bt, h0), i1 = bucket_index(bt, h1);
  const __m512i idx = _mm512_permutex2var_epi8(i0, _mm512_load_si512(kPack.low_bytes), i1);
  const __m512i bit8_set = _mm512_set1_epi16(0x100);
  const __mmask64 bit8 = _mm512_kunpackd(_mm512_test_epi16_mask(i1, bit8_set), _mm512_test_epi16_mask(i0, bit8_set));
  const __mmask64 bit7 = _mm512_movepi8_mask(idx);
  return _mm512_mask_blend_epi8(bit8, lookup256(lut_lo, idx, bit7), lookup256(lut_hi, idx, bit7));
}

// Nearest codes of the 256 values buf[j] / absmax of a block (times inverse_absmax), stored to out[0..255]:
// base codes from the bucket table, then + 1 where the value exceeds threshold[base]. Table registers are
// loaded once per block. buf is overwritten with the normalised values (the compare reads them back
// instead of multiplying again). A normalised value is NaN only if the absmax is not finite (NaN * inv, or
// +-inf * 0): only then are NaNs looked for, and given code 0 (no threshold is below a NaN).
ASTROBIO_AVX512 inline void quantize_block(const MapTables& t, float* buf, float absmax, uint8_t* out) {
  const __m512 inv = _mm512_set1_ps(inverse_absmax(absmax));
  __m512i code[4];
  {
    const BucketTables bt = load_bucket_tables(t);
    const ByteTable lut_lo = load_table(t.lut), lut_hi = load_table(t.lut + 256);
    for (int g = 0; g < 4; ++g) {
      __m512 n[4];
      for (int r = 0; r < 4; ++r) {
        n[r] = _mm512_mul_ps(_mm512_load_ps(buf + 64 * g + 16 * r), inv);
        _mm512_store_ps(buf + 64 * g + 16 * r, n[r]);
      }
      code[g] = base_codes64(bt, lut_lo, lut_hi, n);
    }
  }
  __m512 thr[16];
  lookup_block(t.threshold_planes, code, thr);
  const bool finite = std::isfinite(absmax);
  for (int g = 0; g < 4; ++g) {
    __mmask16 above[4], number[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
    for (int r = 0; r < 4; ++r) {
      const __m512 n = _mm512_load_ps(buf + 64 * g + 16 * r);
      above[r] = _mm512_cmp_ps_mask(n, thr[4 * g + r], _CMP_GT_OQ);
      if (!finite) number[r] = _mm512_cmp_ps_mask(n, n, _CMP_ORD_Q);
    }
    const __mmask64 up = _mm512_kunpackd(_mm512_kunpackw(above[3], above[2]), _mm512_kunpackw(above[1], above[0]));
    const __m512i codes = _mm512_mask_sub_epi8(code[g], up, code[g], _mm512_set1_epi8(-1));
    if (finite) {
      _mm512_storeu_si512(out + 64 * g, codes);
    } else {
      const __mmask64 ok =
          _mm512_kunpackd(_mm512_kunpackw(number[3], number[2]), _mm512_kunpackw(number[1], number[0]));
      _mm512_storeu_si512(out + 64 * g, _mm512_maskz_mov_epi8(ok, codes));
    }
  }
}

// Dequantized values (map[code] * absmax) of the 256 codes of a block, stored to out[0..255].
ASTROBIO_AVX512 inline void dequantize_block(const MapTables& t, const uint8_t* codes, __m512 absmax, float* out) {
  __m512i c[4];
  for (int g = 0; g < 4; ++g) c[g] = _mm512_loadu_si512(codes + 64 * g);
  __m512 q[16];
  lookup_block(t.qmap_planes, c, q);
  for (int j = 0; j < 16; ++j) _mm512_store_ps(out + 16 * j, _mm512_mul_ps(q[j], absmax));
}

struct Consts {
  __m512 beta1, beta2, omb1, omb2, eps, grad_scale, decay, step_size, inv_bc2_sqrt;
};

ASTROBIO_AVX512 inline Consts broadcast(const StepConstants& c) {
  return {_mm512_set1_ps(c.beta1), _mm512_set1_ps(c.beta2), _mm512_set1_ps(c.one_minus_beta1),
          _mm512_set1_ps(c.one_minus_beta2), _mm512_set1_ps(c.eps), _mm512_set1_ps(c.grad_scale),
          _mm512_set1_ps(c.decay), _mm512_set1_ps(c.step_size), _mm512_set1_ps(c.inv_bc2_sqrt)};
}

template <DType kType>
ASTROBIO_AVX512 inline __m512 load16(const void* base, int64_t i) {
  if constexpr (kType == DType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

ASTROBIO_AVX512 inline __m512i mix32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int>(0x846CA68Bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// NaN lanes replaced by the canonical NaN (kernel_common.h: canonical_nan).
ASTROBIO_AVX512 inline __m512 canonical_nan16(__m512 x) {
  return _mm512_mask_mov_ps(x, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q),
                            _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(kCanonicalNan))));
}

// The tensors of one step as local pointers (no aliasing with the arguments) and the variant as types:
// gradient dtype, master dtype, and whether a bf16 copy of the weights is written.
template <DType kGrad, DType kParam, bool kCopy>
struct Tensors {
  void* __restrict param;
  const void* __restrict grad;
  void* __restrict exp_avg;
  void* __restrict exp_avg_sq;
  float* __restrict absmax1;
  float* __restrict absmax2;
  uint16_t* __restrict param_bf16;
  uint32_t seed;

  explicit Tensors(const StepArgs& a)
      : param(a.param), grad(a.grad), exp_avg(a.exp_avg), exp_avg_sq(a.exp_avg_sq), absmax1(a.absmax1),
        absmax2(a.absmax2), param_bf16(a.param_bf16), seed(a.seed) {}

  // Stores 16 new weights at element i: fp32 (and its round-to-nearest bf16 copy) or stochastic bf16.
  ASTROBIO_AVX512 inline void store_params(int64_t i, __m512 p, uint32_t sr_hi) const {
    p = canonical_nan16(p);  // rounds to the bf16 NaN 0x7FC0 in both roundings below
    const __m512i bits = _mm512_castps_si512(p);
    __m512i h;
    if constexpr (kParam == DType::kFloat32) {
      _mm512_storeu_ps(static_cast<float*>(param) + i, p);
      if constexpr (!kCopy) return;
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      h = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    } else {
      const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
      const __m512i lo = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(i))), lanes);
      const __m512i r = _mm512_and_si512(mix32(_mm512_xor_si512(lo, _mm512_set1_epi32(static_cast<int>(sr_hi)))),
                                         _mm512_set1_epi32(0xFFFF));
      h = _mm512_srli_epi32(_mm512_add_epi32(bits, r), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(param) + i), _mm512_cvtepi32_epi16(h));
      if constexpr (!kCopy) return;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(param_bf16 + i), _mm512_cvtepi32_epi16(h));
  }

  // The update of 16 elements at i (spec/adamw8bit.py: adamw_update); returns the new weights, updates m and v.
  // kScaled false: grad_scale is 1, and g * 1 == g for every g but a NaN, whose outputs are canonical NaNs anyway.
  template <bool kScaled>
  ASTROBIO_AVX512 inline __m512 update16(const Consts& k, int64_t i, __m512& m, __m512& v) const {
    __m512 g = load16<kGrad>(grad, i);
    if constexpr (kScaled) g = _mm512_mul_ps(g, k.grad_scale);
    m = _mm512_add_ps(_mm512_mul_ps(k.beta1, m), _mm512_mul_ps(k.omb1, g));
    v = _mm512_add_ps(_mm512_mul_ps(k.beta2, v), _mm512_mul_ps(k.omb2, _mm512_mul_ps(g, g)));
    const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), k.inv_bc2_sqrt), k.eps);
    const __m512 upd = _mm512_mul_ps(k.step_size, _mm512_div_ps(m, denom));
    return _mm512_sub_ps(_mm512_mul_ps(load16<kParam>(param, i), k.decay), upd);
  }
};

// One full block of 256 elements with 8-bit moments: dequantize m and v into two L1 buffers, update in
// place, then requantize against the new absmax.
template <bool kScaled, class T>
ASTROBIO_AVX512 void step_block_quantized(const T& x_ref, const Consts& k_ref, const MapTables& t1,
                                          const MapTables& t2, int64_t block) {
  // local copies: the stores below cannot alias them, so pointers and constants stay in registers
  const T x = x_ref;
  const Consts k = k_ref;
  const int64_t begin = block * kBlockSize;
  auto* codes1 = static_cast<uint8_t*>(x.exp_avg) + begin;
  auto* codes2 = static_cast<uint8_t*>(x.exp_avg_sq) + begin;
  const uint32_t sr_hi = sr_high(begin, x.seed);
  alignas(64) float m_buf[kBlockSize], v_buf[kBlockSize];
  dequantize_block(t1, codes1, _mm512_set1_ps(x.absmax1[block]), m_buf);
  dequantize_block(t2, codes2, _mm512_set1_ps(x.absmax2[block]), v_buf);
  // max |x| over the block on the bit patterns: for |x| (sign cleared) the unsigned order is the float order,
  // and every NaN is above +inf, so the maximum keeps a NaN as the specification's absmax does
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512i max_m = _mm512_setzero_si512(), max_v = _mm512_setzero_si512();
  for (int j = 0; j < kBlockSize; j += 16) {
    __m512 m = _mm512_load_ps(m_buf + j), v = _mm512_load_ps(v_buf + j);
    x.store_params(begin + j, x.template update16<kScaled>(k, begin + j, m, v), sr_hi);
    _mm512_store_ps(m_buf + j, m);
    _mm512_store_ps(v_buf + j, v);
    max_m = _mm512_max_epu32(max_m, _mm512_and_si512(_mm512_castps_si512(m), abs_mask));
    max_v = _mm512_max_epu32(max_v, _mm512_and_si512(_mm512_castps_si512(v), abs_mask));
  }
  const float am = canonical_nan(bits_float(_mm512_reduce_max_epu32(max_m)));
  const float av = canonical_nan(bits_float(_mm512_reduce_max_epu32(max_v)));
  quantize_block(t1, m_buf, am, codes1);
  quantize_block(t2, v_buf, av, codes2);
  x.absmax1[block] = am;
  x.absmax2[block] = av;
}

// One full block of 256 elements with fp32 moments.
template <class T>
ASTROBIO_AVX512 void step_block_fp32(const T& x, const Consts& k, int64_t block) {
  const int64_t begin = block * kBlockSize;
  auto* m_ptr = static_cast<float*>(x.exp_avg);
  auto* v_ptr = static_cast<float*>(x.exp_avg_sq);
  const uint32_t sr_hi = sr_high(begin, x.seed);
  for (int64_t i = begin; i < begin + kBlockSize; i += 16) {
    __m512 m = _mm512_loadu_ps(m_ptr + i), v = _mm512_loadu_ps(v_ptr + i);
    x.store_params(i, x.template update16<true>(k, i, m, v), sr_hi);
    _mm512_storeu_ps(m_ptr + i, canonical_nan16(m));
    _mm512_storeu_ps(v_ptr + i, canonical_nan16(v));
  }
}

template <DType kGrad, DType kParam, bool kCopy>
void step_full_blocks(const StepArgs& a, const MapTables* t1, const MapTables* t2) {
  const int64_t full = a.numel / kBlockSize;
  const Tensors<kGrad, kParam, kCopy> x(a);
  const StepConstants c = a.c;
  const bool scaled = c.grad_scale != 1.0f;
#pragma omp parallel if (full > 4)
  {
    const Consts k = broadcast(c);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < full; ++b) {
      if (a.quantized) {
        if (scaled) {
          step_block_quantized<true>(x, k, *t1, *t2, b);
        } else {
          step_block_quantized<false>(x, k, *t1, *t2, b);
        }
      } else {
        step_block_fp32(x, k, b);
      }
    }
  }
}

template <DType kGrad, DType kParam>
void step_full_blocks(const StepArgs& a, const MapTables* t1, const MapTables* t2) {
  if (a.param_bf16 != nullptr) {
    step_full_blocks<kGrad, kParam, true>(a, t1, t2);
  } else {
    step_full_blocks<kGrad, kParam, false>(a, t1, t2);
  }
}

template <DType kGrad>
void step_full_blocks(const StepArgs& a, const MapTables* t1, const MapTables* t2) {
  if (a.param_dtype == DType::kFloat32) {
    step_full_blocks<kGrad, DType::kFloat32>(a, t1, t2);
  } else {
    step_full_blocks<kGrad, DType::kBFloat16>(a, t1, t2);
  }
}

}  // namespace

ASTROBIO_AVX512 void nearest_codes(const MapTables& t, const float* n, uint8_t* out) {
  alignas(64) float buf[kBlockSize];
  std::copy(n, n + kBlockSize, buf);
  quantize_block(t, buf, 1.0f, out);
}

void step(const StepArgs& a, const MapTables* t1, const MapTables* t2) {
  if (a.grad_dtype == DType::kFloat32) {
    step_full_blocks<DType::kFloat32>(a, t1, t2);
  } else {
    step_full_blocks<DType::kBFloat16>(a, t1, t2);
  }
  if (a.numel % kBlockSize != 0) step_block_scalar(a, t1, t2, a.numel / kBlockSize);
}

}  // namespace astrobio::cpu::avx512
#endif  // __x86_64__
