// CUDA kernel of astrobio::adamw8bit_step: one fused pass over memory per step (docs/GPU.md).
//
// The arithmetic follows astrobio/spec/adamw8bit.py operation by operation with the correctly
// rounded intrinsics (__fmul_rn, __fadd_rn, __fsqrt_rn, __fdiv_rn; setup.py also passes
// --fmad=false), so the results are bit-exact with the reference.
//
// Work split: one warp per 256-element quantization block, each lane owning 8 consecutive
// elements. The block's absmax is then a 5-step warp shuffle reduction (no shared memory, no
// __syncthreads), and a lane's 8 elements are one 16-byte load of bf16 values, two of fp32 values
// and one 8-byte load of codes; a warp touches one contiguous 256-element span per array. Thread
// blocks of 8 warps stride over the quantization blocks (one wave: as many blocks as fit on the GPU
// at once), so the codebooks and the nearest-code lookup tables are built in shared memory once per
// thread block, not once per 256 elements.
// Includes no torch header: the op layer (ops_cuda.cpp) hands over plain pointers, and the tests
// compile this file's kernel for the host against csrc/cuda/host_emulation.h.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../adamw8bit.h"
#include "launch.h"

namespace astrobio::cuda {
namespace {

constexpr int kLane = 8;                                // elements per lane
constexpr int kWarpSize = 32;
constexpr int kWarps = 8;                               // warps (quantization blocks in flight) per thread block
constexpr int kThreads = kWarps * kWarpSize;            // == kQmapSize: one codebook entry per thread
constexpr float kMinNormal = 1.17549435e-38f;           // 2^-126: below it a block's inverse is 0
constexpr uint32_t kCanonicalNan = 0x7FC00000u;         // every fp32 NaN written (astrobio/spec/adamw8bit.py)
static_assert(kLane * kWarpSize == kBlockSize, "a warp covers exactly one quantization block");
static_assert(kThreads == kQmapSize, "the codebook staging loads one entry per thread");

// --- the nearest code by direct lookup ----------------------------------------------------------
// The nearest code of x is the number of thresholds t[c] = (qmap[c] + qmap[c + 1]) * 0.5 strictly
// below x (reference.quantize_blockwise). The lookup key of x is the exponent and the top kKeyBits
// mantissa bits of |x|, clamped to [kMinKey, kMaxKey], and its sign: buckets 1/64 of a binade wide
// from 2^-20 up to 1, one bucket for everything below 2^-20 (down to 0), one for 1 and above (inf
// included), per sign; a NaN, below which no threshold lies, is code 0. A bucket's entry is `base`, the number of thresholds below its
// smallest value; the code of x is base plus how many of t[base], t[base + 1] lie below x. That is
// exact when no bucket holds more than two thresholds, which the staging checks for the maps it is
// given (true for both dynamic maps: the unsigned map's thresholds are 0.0070 apart just below 1,
// the buckets there 0.0078 wide); where it does not hold, the count continues with a loop.
constexpr int kKeyBits = 6;
constexpr uint32_t kMinKey = 107u << kKeyBits;  // biased exponent 107: 2^-20
constexpr uint32_t kMaxKey = 127u << kKeyBits;  // the key of 1.0
constexpr int kBuckets = static_cast<int>(kMaxKey - kMinKey) + 1;  // per sign
constexpr int kLookup = 2 * kBuckets;
constexpr float kInfinity = __builtin_huge_valf();

struct Codebook {
  float qmap[kQmapSize];
  float2 pairs[kQmapSize];            // (t[c], t[c + 1]); t[255] = t[256] = +inf
  uint8_t base[(kLookup + 3) / 4 * 4];  // per bucket: the number of thresholds below its smallest value
};

struct Codebooks {
  Codebook m, v;
};

// The smallest and the largest fp32 value of bucket e (the second half of the buckets is negative).
__device__ __forceinline__ void bucket_range(int e, float& lo, float& hi) {
  const bool negative = e >= kBuckets;
  const uint32_t i = static_cast<uint32_t>(negative ? e - kBuckets : e);
  const uint32_t key = kMinKey + i;
  const uint32_t small = i == 0 ? 0u : key << (23 - kKeyBits);
  const uint32_t large = key == kMaxKey ? 0x7F800000u : ((key + 1) << (23 - kKeyBits)) - 1;
  lo = negative ? __uint_as_float(large | 0x80000000u) : __uint_as_float(small);
  hi = negative ? __uint_as_float(small | 0x80000000u) : __uint_as_float(large);
}

// A NaN (of either sign) takes the bucket of -inf, whose base is 0: the specification's code of NaN.
__device__ __forceinline__ uint32_t bucket_of(float x) {
  const uint32_t bits = __float_as_uint(x);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  const uint32_t key = magnitude >> (23 - kKeyBits);
  const uint32_t clamped = key < kMinKey ? kMinKey : (key > kMaxKey ? kMaxKey : key);
  const uint32_t negative = (bits >> 31) | (magnitude > 0x7F800000u ? 1u : 0u);
  return clamped - kMinKey + negative * static_cast<uint32_t>(kBuckets);
}

// The number of thresholds below x by binary search (staging only: 8 dependent probes).
__device__ __forceinline__ uint32_t count_below(const Codebook& cb, float x) {
  uint32_t idx = 0;
#pragma unroll
  for (uint32_t step = kQmapSize / 2; step >= 1; step >>= 1) {
    if (x > cb.pairs[idx + step - 1].x) idx += step;
  }
  return idx;
}

// `exact`: every bucket of the staged maps holds at most two thresholds (uniform over the block).
__device__ __forceinline__ uint32_t nearest_code(const Codebook& cb, float x, bool exact) {
  const uint32_t base = cb.base[bucket_of(x)];
  const float2 t = cb.pairs[base];
  uint32_t code = base + (x > t.x ? 1u : 0u) + (x > t.y ? 1u : 0u);
  if (!exact) {
    while (x > cb.pairs[code].x) ++code;  // stops at t[255] = +inf
  }
  return code;
}

__device__ __forceinline__ float threshold(const Codebook& cb, int c) {
  return c + 1 < kQmapSize ? __fmul_rn(__fadd_rn(cb.qmap[c], cb.qmap[c + 1]), 0.5f) : kInfinity;
}

// Whether bucket e's entry alone (plus two compares) gives the exact code.
__device__ __forceinline__ bool stage_bucket(Codebook& cb, int e) {
  float lo, hi;
  bucket_range(e, lo, hi);
  const uint32_t base = count_below(cb, lo);
  cb.base[e] = static_cast<uint8_t>(base);
  return count_below(cb, hi) <= base + 2;
}

// Both maps, their threshold pairs and lookup tables into shared memory; returns `exact`.
__device__ bool stage_codebooks(const StepArgs& a, Codebooks& cb) {
  const int t = threadIdx.x;
  cb.m.qmap[t] = a.qmap1[t];
  cb.v.qmap[t] = a.qmap2[t];
  __syncthreads();
  cb.m.pairs[t] = make_float2(threshold(cb.m, t), threshold(cb.m, t + 1));
  cb.v.pairs[t] = make_float2(threshold(cb.v, t), threshold(cb.v, t + 1));
  __syncthreads();
  bool exact = true;
  for (int e = t; e < kLookup; e += kThreads) {
    exact = stage_bucket(cb.m, e) && exact;
    exact = stage_bucket(cb.v, e) && exact;
  }
  return __syncthreads_and(exact ? 1 : 0) != 0;
}

// --- element conversions -------------------------------------------------------------------------

__device__ __forceinline__ float bf16_to_float(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

// reference.round_to_bf16: round to nearest even; every NaN becomes the canonical quiet NaN 0x7FC0.
__device__ __forceinline__ uint16_t float_to_bf16(float f) {
  uint32_t bits = __float_as_uint(f);
  if (f != f) return 0x7FC0;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Every NaN written as fp32 is the canonical quiet NaN (positive, no payload).
__device__ __forceinline__ float canonical(float f) { return f != f ? __uint_as_float(kCanonicalNan) : f; }

// reference.stochastic_round_to_bf16: 16 counter-hash bits added to the fp32 pattern, then truncated.
__device__ __forceinline__ uint16_t stochastic_round_bf16(float f, int64_t index, uint32_t seed) {
  const uint64_t i = static_cast<uint64_t>(index);
  const uint32_t r = mix32(static_cast<uint32_t>(i) ^ mix32(static_cast<uint32_t>(i >> 32) ^ seed)) & 0xFFFFu;
  return static_cast<uint16_t>((__float_as_uint(f) + r) >> 16);
}

// --- per-lane loads and stores of kLane elements starting at element i -------------------------
// `vec`: the lane's 8 elements all exist and the base pointer is 16-byte aligned, so they move as
// 16-byte (8-byte for codes) streaming accesses; else element by element, missing ones read as 0.

__device__ __forceinline__ void load_lane(const float* src, int64_t i, int count, bool vec, float (&out)[kLane]) {
  if (vec) {
    const float4 lo = __ldcs(reinterpret_cast<const float4*>(src + i));
    const float4 hi = __ldcs(reinterpret_cast<const float4*>(src + i + 4));
    out[0] = lo.x; out[1] = lo.y; out[2] = lo.z; out[3] = lo.w;
    out[4] = hi.x; out[5] = hi.y; out[6] = hi.z; out[7] = hi.w;
  } else {
#pragma unroll
    for (int k = 0; k < kLane; ++k) out[k] = k < count ? src[i + k] : 0.0f;
  }
}

__device__ __forceinline__ void load_lane(const uint16_t* src, int64_t i, int count, bool vec, float (&out)[kLane]) {
  if (vec) {
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(src + i));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = __uint_as_float(words[k] << 16);
      out[2 * k + 1] = __uint_as_float(words[k] & 0xFFFF0000u);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kLane; ++k) out[k] = k < count ? bf16_to_float(src[i + k]) : 0.0f;
  }
}

__device__ __forceinline__ void load_codes(const uint8_t* src, int64_t i, int count, bool vec, uint32_t (&out)[kLane]) {
  if (vec) {
    const uint2 raw = __ldcs(reinterpret_cast<const uint2*>(src + i));
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[k] = (raw.x >> (8 * k)) & 0xFFu;
      out[k + 4] = (raw.y >> (8 * k)) & 0xFFu;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kLane; ++k) out[k] = k < count ? src[i + k] : 0u;
  }
}

__device__ __forceinline__ void store_lane(float* dst, int64_t i, int count, bool vec, const float (&in)[kLane]) {
  if (vec) {
    __stcs(reinterpret_cast<float4*>(dst + i), make_float4(in[0], in[1], in[2], in[3]));
    __stcs(reinterpret_cast<float4*>(dst + i + 4), make_float4(in[4], in[5], in[6], in[7]));
  } else {
#pragma unroll
    for (int k = 0; k < kLane; ++k) {
      if (k < count) dst[i + k] = in[k];
    }
  }
}

__device__ __forceinline__ void store_lane(uint16_t* dst, int64_t i, int count, bool vec, const uint16_t (&in)[kLane]) {
  if (vec) {
    uint4 raw;
    raw.x = in[0] | (static_cast<uint32_t>(in[1]) << 16);
    raw.y = in[2] | (static_cast<uint32_t>(in[3]) << 16);
    raw.z = in[4] | (static_cast<uint32_t>(in[5]) << 16);
    raw.w = in[6] | (static_cast<uint32_t>(in[7]) << 16);
    __stcs(reinterpret_cast<uint4*>(dst + i), raw);
  } else {
#pragma unroll
    for (int k = 0; k < kLane; ++k) {
      if (k < count) dst[i + k] = in[k];
    }
  }
}

__device__ __forceinline__ void store_codes(uint8_t* dst, int64_t i, int count, bool vec, const uint32_t (&in)[kLane]) {
  if (vec) {
    uint2 raw;
    raw.x = in[0] | (in[1] << 8) | (in[2] << 16) | (in[3] << 24);
    raw.y = in[4] | (in[5] << 8) | (in[6] << 16) | (in[7] << 24);
    __stcs(reinterpret_cast<uint2*>(dst + i), raw);
  } else {
#pragma unroll
    for (int k = 0; k < kLane; ++k) {
      if (k < count) dst[i + k] = static_cast<uint8_t>(in[k]);
    }
  }
}

// The largest of the warp's |x| bit patterns: for non-negative floats the integer order is the
// float order, and a NaN (above +inf) wins, as the specification's absmax keeps a NaN.
__device__ __forceinline__ uint32_t warp_max_bits(uint32_t bits) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset >= 1; offset >>= 1) {
    const uint32_t other = __float_as_uint(__shfl_xor_sync(0xFFFFFFFFu, __uint_as_float(bits), offset));
    bits = other > bits ? other : bits;
  }
  return bits;
}

// A block's absmax from the lanes' |x| maxima as bit patterns; a NaN becomes the canonical NaN.
__device__ __forceinline__ float block_absmax(uint32_t lane_bits) {
  const uint32_t bits = warp_max_bits(lane_bits);
  return __uint_as_float(bits > 0x7F800000u ? kCanonicalNan : bits);
}

// --- the step -------------------------------------------------------------------------------------

// One AdamW update of a single element (reference.adamw_update), in place on p, m, v.
__device__ __forceinline__ void adamw_update(const StepConstants& c, float g_raw, float& p, float& m, float& v) {
  const float g = __fmul_rn(g_raw, c.grad_scale);
  m = __fadd_rn(__fmul_rn(c.beta1, m), __fmul_rn(c.one_minus_beta1, g));
  v = __fadd_rn(__fmul_rn(c.beta2, v), __fmul_rn(c.one_minus_beta2, __fmul_rn(g, g)));
  const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), c.inv_bc2_sqrt), c.eps);
  p = __fsub_rn(__fmul_rn(p, c.decay), __fmul_rn(c.step_size, __fdiv_rn(m, denom)));
}

// Writes the new weights: fp32 (with an optional round-to-nearest bf16 copy) or bf16 by stochastic
// rounding (the copy, if any, is then the same bf16 value).
template <typename ParamT>
__device__ __forceinline__ void store_params(const StepArgs& a, int64_t i, int count, bool vec, float (&p)[kLane]) {
  uint16_t h[kLane];
  if constexpr (sizeof(ParamT) == 4) {
#pragma unroll
    for (int k = 0; k < kLane; ++k) p[k] = canonical(p[k]);
    store_lane(static_cast<float*>(a.param), i, count, vec, p);
    if (a.param_bf16 == nullptr) return;
#pragma unroll
    for (int k = 0; k < kLane; ++k) h[k] = float_to_bf16(p[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kLane; ++k) h[k] = stochastic_round_bf16(canonical(p[k]), i + k, a.seed);
    store_lane(static_cast<uint16_t*>(a.param), i, count, vec, h);
    if (a.param_bf16 == nullptr) return;
  }
  store_lane(a.param_bf16, i, count, vec, h);
}

// The lane's part of one quantization block between loading and storing.
struct Lane {
  float p[kLane], g[kLane], m[kLane], v[kLane];
  int64_t i;  // index of the lane's first element
  int count;  // how many of its kLane elements exist
  bool vec;   // all exist and the arrays are aligned: vector accesses
};

template <typename ParamT, typename GradT, bool Quantized>
__device__ __forceinline__ void load_block(const StepArgs& a, const Codebooks& cb, int64_t b, int lane, bool aligned,
                                           Lane& l) {
  l.i = b * kBlockSize + lane * kLane;
  const int64_t rest = a.numel - l.i;
  l.count = rest >= kLane ? kLane : (rest > 0 ? static_cast<int>(rest) : 0);
  l.vec = aligned && l.count == kLane;
  load_lane(static_cast<const ParamT*>(a.param), l.i, l.count, l.vec, l.p);
  load_lane(static_cast<const GradT*>(a.grad), l.i, l.count, l.vec, l.g);
  if constexpr (Quantized) {
    uint32_t c1[kLane], c2[kLane];
    load_codes(static_cast<const uint8_t*>(a.exp_avg), l.i, l.count, l.vec, c1);
    load_codes(static_cast<const uint8_t*>(a.exp_avg_sq), l.i, l.count, l.vec, c2);
    const float scale1 = a.absmax1[b], scale2 = a.absmax2[b];
#pragma unroll
    for (int k = 0; k < kLane; ++k) {
      l.m[k] = k < l.count ? __fmul_rn(cb.m.qmap[c1[k]], scale1) : 0.0f;
      l.v[k] = k < l.count ? __fmul_rn(cb.v.qmap[c2[k]], scale2) : 0.0f;
    }
  } else {
    load_lane(static_cast<const float*>(a.exp_avg), l.i, l.count, l.vec, l.m);
    load_lane(static_cast<const float*>(a.exp_avg_sq), l.i, l.count, l.vec, l.v);
  }
}

template <typename ParamT, bool Quantized>
__device__ __forceinline__ void update_block(const StepArgs& a, const Codebooks& cb, bool exact, int64_t b, int lane,
                                             Lane& l) {
#pragma unroll
  for (int k = 0; k < kLane; ++k) adamw_update(a.c, l.g[k], l.p[k], l.m[k], l.v[k]);
  store_params<ParamT>(a, l.i, l.count, l.vec, l.p);
  if constexpr (Quantized) {
    // Missing elements of a partial block hold m = v = 0 and leave the absmax unchanged.
    uint32_t bits1 = 0, bits2 = 0;
#pragma unroll
    for (int k = 0; k < kLane; ++k) {
      const uint32_t b1 = __float_as_uint(l.m[k]) & 0x7FFFFFFFu, b2 = __float_as_uint(l.v[k]) & 0x7FFFFFFFu;
      bits1 = b1 > bits1 ? b1 : bits1;
      bits2 = b2 > bits2 ? b2 : bits2;
    }
    const float max1 = block_absmax(bits1), max2 = block_absmax(bits2);
    const float inv1 = max1 >= kMinNormal ? __fdiv_rn(1.0f, max1) : 0.0f;  // the specification: MIN_NORMAL
    const float inv2 = max2 >= kMinNormal ? __fdiv_rn(1.0f, max2) : 0.0f;
    uint32_t c1[kLane], c2[kLane];
#pragma unroll
    for (int k = 0; k < kLane; ++k) {
      c1[k] = nearest_code(cb.m, __fmul_rn(l.m[k], inv1), exact);
      c2[k] = nearest_code(cb.v, __fmul_rn(l.v[k], inv2), exact);
    }
    store_codes(static_cast<uint8_t*>(a.exp_avg), l.i, l.count, l.vec, c1);
    store_codes(static_cast<uint8_t*>(a.exp_avg_sq), l.i, l.count, l.vec, c2);
    if (lane == 0) {  // this warp read absmax[b] and is the only one to touch it
      a.absmax1[b] = max1;
      a.absmax2[b] = max2;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kLane; ++k) {
      l.m[k] = canonical(l.m[k]);
      l.v[k] = canonical(l.v[k]);
    }
    store_lane(static_cast<float*>(a.exp_avg), l.i, l.count, l.vec, l.m);
    store_lane(static_cast<float*>(a.exp_avg_sq), l.i, l.count, l.vec, l.v);
  }
}

// ParamT / GradT: float (fp32) or uint16_t (bf16 bits). Quantized: 8-bit moments, else fp32 moments.
// Each warp iteration takes Unroll consecutive quantization blocks, all loads first (more bytes in
// flight per warp); MinBlocks caps the registers so that many thread blocks fit on an SM.
template <typename ParamT, typename GradT, bool Quantized, int Unroll, int MinBlocks>
__global__ void __launch_bounds__(kThreads, MinBlocks) adamw8bit_kernel(const StepArgs a, bool aligned) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // the whole grid skips: no barrier is left waiting
  __shared__ Codebooks cb;
  bool exact = true;
  if constexpr (Quantized) exact = stage_codebooks(a, cb);

  const int lane = threadIdx.x % kWarpSize;
  const int64_t blocks = (a.numel + kBlockSize - 1) / kBlockSize;
  const int64_t groups = (blocks + Unroll - 1) / Unroll;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t group = first; group < groups; group += stride) {  // warp-uniform: all lanes shuffle
    Lane l[Unroll];
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const int64_t b = group * Unroll + u;
      if (b < blocks) load_block<ParamT, GradT, Quantized>(a, cb, b, lane, aligned, l[u]);
    }
#pragma unroll
    for (int u = 0; u < Unroll; ++u) {
      const int64_t b = group * Unroll + u;
      if (b < blocks) update_block<ParamT, Quantized>(a, cb, exact, b, lane, l[u]);
    }
  }
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("astrobio adamw8bit_step (CUDA): ") + what + " failed: " +
                             cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
  }
}

bool aligned_to(const void* p, uintptr_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Whether every array may move in 16-byte vectors (codes in 8-byte ones).
bool vector_aligned(const StepArgs& a) {
  const bool codes_ok = a.quantized ? aligned_to(a.exp_avg, 8) && aligned_to(a.exp_avg_sq, 8)
                                    : aligned_to(a.exp_avg, 16) && aligned_to(a.exp_avg_sq, 16);
  return codes_ok && aligned_to(a.param, 16) && aligned_to(a.grad, 16) && aligned_to(a.param_bf16, 16);
}

// --- launch (host) ---------------------------------------------------------------------------------

std::atomic<int> selected_variant{kDefaultLaunchVariant};

// How many thread blocks of `kernel` fit on one SM at once (queried once per kernel).
template <typename Kernel>
int resident_blocks_per_sm(Kernel kernel) {
  int blocks = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0), "the occupancy query");
  return blocks > 0 ? blocks : 1;
}

// One wave: no more thread blocks than fit on the GPU at once, so the grid-stride loop gives every
// block the same share and no partial last wave idles part of the chip.
template <typename ParamT, typename GradT, bool Quantized, int Unroll, int MinBlocks>
void launch_kernel(const StepArgs& a, int sms, cudaStream_t stream, bool aligned) {
  const auto kernel = adamw8bit_kernel<ParamT, GradT, Quantized, Unroll, MinBlocks>;
  static const int per_sm = resident_blocks_per_sm(kernel);
  const int64_t blocks = (a.numel + kBlockSize - 1) / kBlockSize;
  const int64_t groups = (blocks + Unroll - 1) / Unroll;
  const int64_t wanted = (groups + kWarps - 1) / kWarps;  // thread blocks for one pass without striding
  const int64_t grid = std::min<int64_t>(wanted, static_cast<int64_t>(sms) * per_sm);
  kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, aligned);
}

// The variants of launch.h, each with 32 quantization blocks in flight per SM: 0: one block per warp
// iteration, at most 64 registers (4 thread blocks, 32 warps per SM); 1: two blocks per iteration, at
// most 128 registers (2 thread blocks); 2: four blocks per iteration, at most 255 registers (1).
template <typename ParamT, typename GradT, bool Quantized>
void launch_variant_kernel(const StepArgs& a, int sms, cudaStream_t stream, bool aligned) {
  switch (selected_variant.load(std::memory_order_relaxed)) {
    case 0: launch_kernel<ParamT, GradT, Quantized, 1, 4>(a, sms, stream, aligned); break;
    case 1: launch_kernel<ParamT, GradT, Quantized, 2, 2>(a, sms, stream, aligned); break;
    default: launch_kernel<ParamT, GradT, Quantized, 4, 1>(a, sms, stream, aligned); break;
  }
}

template <typename ParamT, typename GradT>
void launch(const StepArgs& a, int sms, cudaStream_t stream, bool aligned) {
  if (a.quantized) {
    launch_variant_kernel<ParamT, GradT, true>(a, sms, stream, aligned);
  } else {
    launch_variant_kernel<ParamT, GradT, false>(a, sms, stream, aligned);
  }
}

}  // namespace

int launch_variant(int variant) {
  if (variant == -1) return selected_variant.load();
  if (variant < 0 || variant >= kLaunchVariants) {
    throw std::invalid_argument("adamw8bit_step (CUDA): launch variant " + std::to_string(variant) +
                                " does not exist; choose one of 0.." + std::to_string(kLaunchVariants - 1) +
                                " (docs/GPU.md), or -1 to read the current one");
  }
  return selected_variant.exchange(variant);
}

void adamw8bit_step(const StepArgs& a, void* stream) {
  if (a.numel == 0) return;
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "reading the multiprocessor count");
  const auto s = static_cast<cudaStream_t>(stream);
  const bool aligned = vector_aligned(a);
  const bool fp32_param = a.param_dtype == DType::kFloat32;
  const bool fp32_grad = a.grad_dtype == DType::kFloat32;
  if (fp32_param && fp32_grad) launch<float, float>(a, sms, s, aligned);
  else if (fp32_param) launch<float, uint16_t>(a, sms, s, aligned);
  else if (fp32_grad) launch<uint16_t, float>(a, sms, s, aligned);
  else launch<uint16_t, uint16_t>(a, sms, s, aligned);
  check(cudaGetLastError(), "launching adamw8bit_kernel");
}

}  // namespace astrobio::cuda
