// Causal attention on the CPU (astrobio::causal_attention_cpu and its backward, csrc/cpu/attention.cpp):
// the arguments of the kernels and the table of one SIMD path's kernels. Each kernel takes a range of
// (batch, head) pairs, so that the caller splits the pairs over threads (at::parallel_for) and the SIMD
// paths (attention_avx512.cpp, attention_avx2.cpp, the portable one in attention.cpp) only compute.
#pragma once

#include <cstdint>

namespace astrobio::cpu::attention {

// q, k, v, out, dout, dq, dk, dv: contiguous fp32 [batch, seq, heads, head_dim]; lse [batch, heads, seq].
struct Shape {
  int64_t seq, heads, head_dim;
  float scale;  // multiplies q . k
};

struct Forward {
  const float* q;
  const float* k;
  const float* v;
  float* out;
  float* lse;
  Shape shape;
};

struct Backward {
  const float* dout;
  const float* q;
  const float* k;
  const float* v;
  const float* out;
  const float* lse;
  float* dq;
  float* dk;
  float* dv;
  Shape shape;
};

// Pairs [begin, end) of batch * heads + head.
struct Kernels {
  void (*forward)(const Forward&, int64_t begin, int64_t end);
  void (*backward)(const Backward&, int64_t begin, int64_t end);
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

}  // namespace astrobio::cpu::attention
