// Host emulation of the CUDA built-ins that adamw8bit.cu uses, so that tests/test_adamw8bit_gpu.py can
// run the kernel's own source on a machine without a GPU: one std::thread per CUDA thread, barriers
// for __syncthreads and for the warp shuffles, plain loads and stores for the streaming accesses, and
// C++ arithmetic compiled with -ffp-contract=off for the correctly rounded intrinsics. Never part of
// the build (setup.py compiles csrc/cuda/*.cu and *.cpp only); the test swaps it in for
// <cuda_runtime.h> and replaces the one line of inline PTX (ld.shared) with emulated_load_shared.
#pragma once

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
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static  // one thread block runs at a time

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim;
inline thread_local std::barrier<>* emulated_block_barrier;
inline thread_local std::barrier<>* emulated_warp_barrier;
inline thread_local float* emulated_warp_slots;  // 32 floats shared by the lanes of one warp
inline char emulated_shared_window[16];          // shared addresses are offsets from here

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

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
inline float __int_as_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
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

// Static shared arrays and the window lie in one program image, so their distance fits 32 bits.
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(static_cast<const char*>(p) - emulated_shared_window);
}
inline float emulated_load_shared(uint32_t address) {
  float value;
  std::memcpy(&value, emulated_shared_window + static_cast<int32_t>(address), sizeof value);
  return value;
}

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
inline const char* cudaGetErrorName(cudaError_t) { return "emulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
