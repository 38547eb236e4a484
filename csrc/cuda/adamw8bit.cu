// CUDA kernel of astrobio::adamw8bit_step: one fused pass over memory per step.
//
// The arithmetic follows astrobio/optim/reference.py operation by operation with the correctly
// rounded intrinsics (__fmul_rn, __fadd_rn, __fsqrt_rn, __fdiv_rn; setup.py also passes
// --fmad=false), so the results are bit-exact with the reference.
//
// Work split: one warp per 256-element quantization block, each lane owning 8 consecutive
// elements. The block's absmax is then a 5-step warp shuffle reduction (no shared memory, no
// __syncthreads), and a lane's 8 elements are one 16-byte load of bf16 values, two of fp32 values
// and one 8-byte load of codes; a warp touches one contiguous 256-element span per array. Thread
// blocks of 8 warps stride over the quantization blocks (one wave: as many blocks as fit on the GPU
// at once), so the codebooks are staged into shared memory once per thread block, not once per 256
// elements.
// Includes no torch header (DESIGN.md 8): the op layer (ops_cuda.cpp) hands over plain pointers.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../adamw8bit.h"

namespace astrobio::cuda {
namespace {

constexpr int kLane = 8;                                // elements per lane
constexpr int kWarpSize = 32;
constexpr int kWarps = 8;                               // warps (quantization blocks in flight) per thread block
constexpr int kThreads = kWarps * kWarpSize;            // == kQmapSize: one codebook entry per thread
constexpr int kPaddedMap = kQmapSize + kQmapSize / 32;  // one pad word after every 32 thresholds
constexpr float kMinNormal = 1.17549435e-38f;           // 2^-126: below it a block's inverse is 0
static_assert(kLane * kWarpSize == kBlockSize, "a warp covers exactly one quantization block");
static_assert(kThreads == kQmapSize, "the codebook staging loads one entry per thread");

struct Codebooks {
  float qmap1[kQmapSize];
  float qmap2[kQmapSize];
  float thr1[kPaddedMap];  // threshold j at j + j / 32 (see nearest_code)
  float thr2[kPaddedMap];
};

__device__ __forceinline__ float bf16_to_float(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

// reference.round_to_bf16: round to nearest even; every NaN becomes the canonical quiet NaN 0x7FC0.
__device__ __forceinline__ uint16_t float_to_bf16(float f) {
  uint32_t bits = __float_as_uint(f);
  if (f != f) return 0x7FC0;
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// reference.stochastic_round_to_bf16: 16 counter-hash bits added to the fp32 pattern, then truncated.
__device__ __forceinline__ uint16_t stochastic_round_bf16(float f, int64_t index, uint32_t seed) {
  const uint64_t i = static_cast<uint64_t>(index);
  const uint32_t r = mix32(static_cast<uint32_t>(i) ^ mix32(static_cast<uint32_t>(i >> 32) ^ seed)) & 0xFFFFu;
  return static_cast<uint16_t>((__float_as_uint(f) + r) >> 16);
}

// Nearest code of x: the number of thresholds strictly below it (reference.quantize_blockwise).
// Branchless binary search; the table holds threshold j at j + j / 32 so that the lanes of a warp,
// which search in lockstep, read different banks (unpadded, every probe of the first steps falls in
// bank 31). Before the probe of width `step` the lower end idx is a multiple of 2 * step, which
// makes the padded offsets below compile-time constants. `at` is the shared-memory byte address of
// idx's padded position, so a probe is one load at a constant offset, a compare and an add.
__device__ __forceinline__ float load_shared(uint32_t address) {
  float value;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(value) : "r"(address));
  return value;
}

__device__ __forceinline__ uint32_t nearest_code(const float* thr, float x) {
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(thr));
  uint32_t at = base;
#pragma unroll
  for (int step = kQmapSize / 2; step >= 1; step >>= 1) {
    if (x > load_shared(at + 4 * ((step - 1) + ((step - 1) >> 5)))) at += 4 * (step + (step >> 5));
  }
  const uint32_t q = (at - base) / 4;  // idx + idx / 32
  return q - q / 33;
}

__device__ void stage_codebooks(const StepArgs& a, Codebooks& cb) {
  const int t = threadIdx.x;
  cb.qmap1[t] = a.qmap1[t];
  cb.qmap2[t] = a.qmap2[t];
  __syncthreads();
  const int pos = t + (t >> 5);
  if (t + 1 < kQmapSize) {
    cb.thr1[pos] = __fmul_rn(__fadd_rn(cb.qmap1[t], cb.qmap1[t + 1]), 0.5f);
    cb.thr2[pos] = __fmul_rn(__fadd_rn(cb.qmap2[t], cb.qmap2[t + 1]), 0.5f);
  } else {
    cb.thr1[pos] = __int_as_float(0x7F800000);  // +inf sentinel, never probed
    cb.thr2[pos] = __int_as_float(0x7F800000);
  }
  __syncthreads();
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

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset >= 1; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset));
  }
  return x;
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
__device__ __forceinline__ void store_params(const StepArgs& a, int64_t i, int count, bool vec, const float (&p)[kLane]) {
  uint16_t h[kLane];
  if constexpr (sizeof(ParamT) == 4) {
    store_lane(static_cast<float*>(a.param), i, count, vec, p);
    if (a.param_bf16 == nullptr) return;
#pragma unroll
    for (int k = 0; k < kLane; ++k) h[k] = float_to_bf16(p[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kLane; ++k) h[k] = stochastic_round_bf16(p[k], i + k, a.seed);
    store_lane(static_cast<uint16_t*>(a.param), i, count, vec, h);
    if (a.param_bf16 == nullptr) return;
  }
  store_lane(a.param_bf16, i, count, vec, h);
}

// ParamT / GradT: float (fp32) or uint16_t (bf16 bits). Quantized: 8-bit moments, else fp32 moments.
template <typename ParamT, typename GradT, bool Quantized>
__global__ void __launch_bounds__(kThreads) adamw8bit_kernel(const StepArgs a, bool aligned) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // the whole grid skips: no barrier is left waiting
  __shared__ Codebooks cb;
  if constexpr (Quantized) stage_codebooks(a, cb);

  const int lane = threadIdx.x % kWarpSize;
  const int64_t blocks = (a.numel + kBlockSize - 1) / kBlockSize;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t b = first; b < blocks; b += stride) {  // warp-uniform: every lane takes part in the shuffles
    const int64_t i = b * kBlockSize + lane * kLane;
    const int64_t rest = a.numel - i;
    const int count = rest >= kLane ? kLane : (rest > 0 ? static_cast<int>(rest) : 0);
    const bool vec = aligned && count == kLane;

    float p[kLane], g[kLane], m[kLane], v[kLane];
    load_lane(static_cast<const ParamT*>(a.param), i, count, vec, p);
    load_lane(static_cast<const GradT*>(a.grad), i, count, vec, g);
    if constexpr (Quantized) {
      uint32_t c1[kLane], c2[kLane];
      load_codes(static_cast<const uint8_t*>(a.exp_avg), i, count, vec, c1);
      load_codes(static_cast<const uint8_t*>(a.exp_avg_sq), i, count, vec, c2);
      const float scale1 = a.absmax1[b], scale2 = a.absmax2[b];
#pragma unroll
      for (int k = 0; k < kLane; ++k) {
        m[k] = k < count ? __fmul_rn(cb.qmap1[c1[k]], scale1) : 0.0f;
        v[k] = k < count ? __fmul_rn(cb.qmap2[c2[k]], scale2) : 0.0f;
      }
    } else {
      load_lane(static_cast<const float*>(a.exp_avg), i, count, vec, m);
      load_lane(static_cast<const float*>(a.exp_avg_sq), i, count, vec, v);
    }

#pragma unroll
    for (int k = 0; k < kLane; ++k) adamw_update(a.c, g[k], p[k], m[k], v[k]);
    store_params<ParamT>(a, i, count, vec, p);

    if constexpr (Quantized) {
      // Missing elements of a partial block hold m = v = 0 and leave the absmax unchanged.
      float max1 = 0.0f, max2 = 0.0f;
#pragma unroll
      for (int k = 0; k < kLane; ++k) {
        max1 = fmaxf(max1, fabsf(m[k]));
        max2 = fmaxf(max2, fabsf(v[k]));
      }
      max1 = warp_max(max1);
      max2 = warp_max(max2);
      const float inv1 = max1 >= kMinNormal ? __fdiv_rn(1.0f, max1) : 0.0f;  // reference.py: MIN_NORMAL
      const float inv2 = max2 >= kMinNormal ? __fdiv_rn(1.0f, max2) : 0.0f;
      uint32_t c1[kLane], c2[kLane];
#pragma unroll
      for (int k = 0; k < kLane; ++k) {
        c1[k] = nearest_code(cb.thr1, __fmul_rn(m[k], inv1));
        c2[k] = nearest_code(cb.thr2, __fmul_rn(v[k], inv2));
      }
      store_codes(static_cast<uint8_t*>(a.exp_avg), i, count, vec, c1);
      store_codes(static_cast<uint8_t*>(a.exp_avg_sq), i, count, vec, c2);
      if (lane == 0) {  // this warp read absmax[b] above and is the only one to touch it
        a.absmax1[b] = max1;
        a.absmax2[b] = max2;
      }
    } else {
      store_lane(static_cast<float*>(a.exp_avg), i, count, vec, m);
      store_lane(static_cast<float*>(a.exp_avg_sq), i, count, vec, v);
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

// How many thread blocks of `kernel` fit on one SM at once (queried once per kernel).
template <typename Kernel>
int resident_blocks_per_sm(Kernel kernel) {
  int blocks = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0), "the occupancy query");
  return blocks > 0 ? blocks : 1;
}

// One wave: no more thread blocks than fit on the GPU at once, so the grid-stride loop gives every
// block the same share and no partial last wave idles part of the chip.
template <typename ParamT, typename GradT, bool Quantized>
void launch_kernel(const StepArgs& a, int64_t wanted, int sms, cudaStream_t stream, bool aligned) {
  const auto kernel = adamw8bit_kernel<ParamT, GradT, Quantized>;
  static const int per_sm = resident_blocks_per_sm(kernel);
  const int64_t grid = std::min<int64_t>(wanted, static_cast<int64_t>(sms) * per_sm);
  kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, aligned);
}

template <typename ParamT, typename GradT>
void launch(const StepArgs& a, int64_t wanted, int sms, cudaStream_t stream, bool aligned) {
  if (a.quantized) {
    launch_kernel<ParamT, GradT, true>(a, wanted, sms, stream, aligned);
  } else {
    launch_kernel<ParamT, GradT, false>(a, wanted, sms, stream, aligned);
  }
}

}  // namespace

void adamw8bit_step(const StepArgs& a, void* stream) {
  if (a.numel == 0) return;
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "reading the multiprocessor count");
  const int64_t blocks = (a.numel + kBlockSize - 1) / kBlockSize;
  const int64_t wanted = (blocks + kWarps - 1) / kWarps;  // thread blocks for one pass without striding
  const auto s = static_cast<cudaStream_t>(stream);
  const bool aligned = vector_aligned(a);
  const bool fp32_param = a.param_dtype == DType::kFloat32;
  const bool fp32_grad = a.grad_dtype == DType::kFloat32;
  if (fp32_param && fp32_grad) launch<float, float>(a, wanted, sms, s, aligned);
  else if (fp32_param) launch<float, uint16_t>(a, wanted, sms, s, aligned);
  else if (fp32_grad) launch<uint16_t, float>(a, wanted, sms, s, aligned);
  else launch<uint16_t, uint16_t>(a, wanted, sms, s, aligned);
  check(cudaGetLastError(), "launching adamw8bit_kernel");
}

}  // namespace astrobio::cuda
