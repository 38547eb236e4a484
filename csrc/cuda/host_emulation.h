// Host emulation of the CUDA built-ins that adamw8bit.cu uses, so that tests/test_adamw8bit_gpu.py can
// run the kernel's own source on a machine without a GPU: one std::thread per CUDA thread, barriers
// for __syncthreads and for the warp shuffles, plain loads and stores for the streaming accesses, and
// C++ arithmetic compiled with -ffp-contract=off for the correctly rounded intrinsics. Never part of
// the build (setup.py compiles csrc/cuda/*.cu and *.cpp only); the test swaps it in for
// <cuda_runtime.h>.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct float4 {
  float x, y, z, w;
};
struct uint4 {
  uint32_t x, y, z, w;
};
struct uint2 {
  uint32_t x, y;
};
struct float2 {
  float x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one thread block runs at a time

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim;
inline thread_local std::barrier<>* emulated_block_barrier;
inline thread_local std::barrier<>* emulated_warp_barrier;
inline thread_local float* emulated_warp_slots;  // 32 floats shared by the lanes of one warp
inline std::atomic<int> emulated_block_none;     // __syncthreads_and: some thread passed 0

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

// All arrive (so the last call's reset is done), the zeros are posted, all read, thread 0 resets.
inline int __syncthreads_and(int predicate) {
  emulated_block_barrier->arrive_and_wait();
  if (predicate == 0) emulated_block_none.store(1);
  emulated_block_barrier->arrive_and_wait();
  const int all = emulated_block_none.load() == 0 ? 1 : 0;
  emulated_block_barrier->arrive_and_wait();
  if (threadIdx.x == 0) emulated_block_none.store(0);
  return all;
}

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  emulated_warp_slots[lane] = value;
  emulated_warp_barrier->arrive_and_wait();
  const float other = emulated_warp_slots[lane ^ lane_mask];
  emulated_warp_barrier->arrive_and_wait();
  return other;
}

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T value) {
  *p = value;
}

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline const char* cudaGetErrorName(cudaError_t) { return "emulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
