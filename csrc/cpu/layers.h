// The model's fused layer ops on the CPU (astrobio::rmsnorm_forward_cpu and the rest, csrc/cpu/layers.cpp):
// the arguments of each kernel and the table of one SIMD path's kernels. Each kernel takes a range of rows
// (of elements, for silu_mul) so that the caller splits the work over threads (at::parallel_for) and the
// SIMD paths (layers_avx512.cpp, layers_avx2.cpp, the portable one in layers.cpp) only compute.
#pragma once

#include <cstdint>

#include "../adamw8bit.h"

namespace astrobio::cpu::layers {

// Rows of `cols` elements; x, residual, y and h of one dtype, weight as fp32.
struct RmsnormForward {
  const void* x;
  const void* residual;  // nullptr: no residual add, h is not written
  const float* weight;
  void* y;
  void* h;
  float* rstd;
  int64_t cols;
  float eps;
  DType dtype;
};

struct RmsnormBackward {
  const void* dy;
  const void* dh;  // nullptr: no gradient reaches h directly
  const void* h;
  const float* weight;
  const float* rstd;
  void* dx;
  int64_t cols;
  DType dtype;
};

// Row t = one token (batch * seq + position) of q and of k, [heads, 2 * half] each; cos, sin [seq, half].
struct Rotary {
  const void* q;
  const void* k;
  void* q_out;
  void* k_out;
  const float* cos;
  const float* sin;
  int64_t seq, heads, half;
  float sign;  // +1 the rotation, -1 its inverse (the backward)
  DType dtype;
};

struct SiluMul {
  const void* gate;
  const void* up;
  void* out;
  DType dtype;
};

struct SiluMulBackward {
  const void* dout;
  const void* gate;
  const void* up;
  void* dgate;
  void* dup;
  DType dtype;
};

// One SIMD path's kernels over [begin, end). rmsnorm_backward adds its rows' weight gradient to dw
// (fp32, `cols` entries).
struct Kernels {
  void (*rmsnorm_forward)(const RmsnormForward&, int64_t begin, int64_t end);
  void (*rmsnorm_backward)(const RmsnormBackward&, int64_t begin, int64_t end, float* dw);
  void (*rotary)(const Rotary&, int64_t begin, int64_t end);
  void (*silu_mul)(const SiluMul&, int64_t begin, int64_t end);
  void (*silu_mul_backward)(const SiluMulBackward&, int64_t begin, int64_t end);
};

namespace portable {
extern const Kernels kKernels;
}
#if defined(__x86_64__)
namespace avx2 {
extern const Kernels kKernels;
}
namespace avx512 {
extern const Kernels kKernels;
}
#endif

}  // namespace astrobio::cpu::layers
