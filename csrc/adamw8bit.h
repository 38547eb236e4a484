// The contract between the op layer (csrc/ops.cpp) and the kernels: plain pointers, no torch types,
// so that kernel files compile without the torch headers. The arithmetic every kernel implements is
// specified in astrobio/spec/adamw8bit.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace astrobio {

constexpr int64_t kBlockSize = 256;  // elements per absmax block
constexpr int kQmapSize = 256;       // entries of a quantization map

enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

// Functions shared by the host and the CUDA kernels carry this (nvcc compiles them for both sides).
#if defined(__CUDACC__)
#define ASTROBIO_HOST_DEVICE __host__ __device__
#else
#define ASTROBIO_HOST_DEVICE
#endif

// The 32-bit hash of the stochastic rounding (astrobio/spec/adamw8bit.py: _mix32); unsigned products wrap mod 2^32.
inline ASTROBIO_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The fp32 constants of one step, computed in float64 by the host and rounded once
// (spec/adamw8bit.py: StepConstants).
struct StepConstants {
  float beta1, beta2, one_minus_beta1, one_minus_beta2, eps, grad_scale, decay, step_size, inv_bc2_sqrt;
};

inline StepConstants make_step_constants(double lr, double beta1, double beta2, double eps, double weight_decay,
                                         double grad_scale, int64_t step) {
  StepConstants c;
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.grad_scale = static_cast<float>(grad_scale);
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  c.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  c.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  return c;
}

struct StepArgs {
  void* param;                 // numel elements of param_dtype (fp32 master, or bf16 with stochastic rounding)
  DType param_dtype;
  const void* grad;            // numel elements of grad_dtype
  DType grad_dtype;
  void* exp_avg;               // uint8 codes (quantized) or fp32
  void* exp_avg_sq;            // uint8 codes (quantized) or fp32
  bool quantized;
  float* absmax1;              // ceil(numel / 256) blocks, quantized only
  float* absmax2;
  const float* qmap1;          // 256 entries, ascending (signed map for m)
  const float* qmap2;          // 256 entries, ascending (unsigned map for v)
  uint16_t* param_bf16;        // optional: new weights rounded to nearest bf16 (nullptr: none)
  const float* found_inf;      // optional, device kernels only: skip the step when *found_inf != 0 (the CPU op
                               // reads it on the host before calling the kernel)
  int64_t numel;
  StepConstants c;
  uint32_t seed;               // stochastic rounding seed for this step
};

// A read-only view of a contiguous fp32 or bf16 tensor.
struct FloatSpan {
  const void* data;
  int64_t numel;
  DType dtype;
};

namespace cpu {
// One fused pass; blocks are split over OpenMP threads. Safe to call without the Python GIL.
void adamw8bit_step(const StepArgs& args);
// Whether any element of the spans is an infinity or a NaN (one multi-threaded pass; no GIL needed).
bool any_non_finite(const std::vector<FloatSpan>& spans);
// Which SIMD path adamw8bit_step takes on this CPU: "avx512", "avx2" or "portable" (the environment
// variable ASTROBIO_CPU_SIMD forces one; an unknown or unsupported value throws std::invalid_argument).
const char* simd_path();
// The SIMD paths this CPU can run, portable first.
std::vector<std::string> simd_paths();
// Test hook: for each SIMD path this CPU runs, how many fp32 values n with |n| < 2 get a nearest code from
// the path's table lookup other than #{i : threshold[i] < n} (`threshold`: the specification's 255 values).
std::vector<std::pair<std::string, int64_t>> nearest_code_mismatches(const float* qmap, const float* threshold);
// Streaming bandwidth probes over arrays of n floats, in GB/s counted by bytes the kernel names.
double triad_bandwidth(int64_t n, int repeats);
double inplace_rmw_bandwidth(int64_t n, int reads, int writes, int repeats);
}  // namespace cpu

#ifdef ASTROBIO_WITH_CUDA
namespace cuda {
// Launches on `stream` (a cudaStream_t); checks the launch.
void adamw8bit_step(const StepArgs& args, void* stream);
}  // namespace cuda
#endif

}  // namespace astrobio
