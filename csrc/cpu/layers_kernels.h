// The arithmetic of the CPU layer kernels (layers.h), written once as plain loops and compiled once per
// SIMD path: ASTROBIO_LAYER_KERNELS(attribute) defines a path's kernel table with every loop inlined into
// functions carrying that path's target attribute, where GCC vectorizes them (16 fp32 lanes with
// AVX-512). All paths compute the same operations in the same order, without FMA (setup.py:
// -ffp-contract=off), so they agree bit for bit; a row's sums use 16 partial sums (lane l takes
// elements l, l + 16, ...) added pairwise at the end, which vectorizes without reassociating anything.
//
// Specification: kernels/rmsnorm.py, kernels/rotary.py, kernels/swiglu.py (fp32 arithmetic, results
// rounded once to the inputs' dtype, to nearest even for bf16 as PyTorch rounds).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernel_common.h"
#include "layers.h"

#define ASTROBIO_INLINE inline __attribute__((always_inline))

namespace astrobio::cpu::layers {

constexpr int kLanes = 16;

using BF16 = uint16_t;

ASTROBIO_INLINE float load(const float* p, int64_t i) { return p[i]; }
ASTROBIO_INLINE float load(const BF16* p, int64_t i) { return bf16_to_float(p[i]); }
ASTROBIO_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
ASTROBIO_INLINE void store(BF16* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

ASTROBIO_INLINE float lane_total(float (&acc)[kLanes]) {
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

// c ? a : b as bit operations. NOTE: GCC's jump threading turns a plain ?: with a constant arm into
// control flow that the AVX2 and SSE vectorizers then refuse; masks keep the loop straight.
ASTROBIO_INLINE float select(bool c, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return bits_float((float_bits(a) & mask) | (float_bits(b) & ~mask));
}

// e^x in fp32 to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2 (n by the round-to-nearest magic
// number, ln2 in two parts so that n ln2's high part is exact), e^r by Cephes' degree-7 polynomial,
// 2^n as two exact power-of-two factors (so subnormal results and overflow to inf come out right).
// 0 below -104, inf above 88.72, NaN stays NaN. Branch-free, so it vectorizes.
ASTROBIO_INLINE float exp_approx(float x) {
  float xc = select(x < -104.0f, -104.0f, x);  // a NaN fails both tests and stays
  xc = select(xc > 89.0f, 89.0f, xc);
  const float magic = 12582912.0f;                                     // 1.5 * 2^23
  const float shifted = xc * 1.44269504088896341f + magic;
  const float n = shifted - magic;
  const int32_t ni = static_cast<int32_t>(float_bits(shifted) - float_bits(magic));
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 65]: a normal power of two
  const float s1 = bits_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_float(static_cast<uint32_t>(n2 + 127) << 23);
  return p * s1 * s2;
}

ASTROBIO_INLINE float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

template <typename T>
ASTROBIO_INLINE float sum_of_squares(const T* h, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = load(h, j + l);
      acc[l] += v * v;
    }
  for (int l = 0; j + l < n; ++l) {
    const float v = load(h, j + l);
    acc[l] += v * v;
  }
  return lane_total(acc);
}

template <typename T>
ASTROBIO_INLINE void rmsnorm_forward_rows(const RmsnormForward& a, int64_t begin, int64_t end) {
  const int64_t n = a.cols;
  const float* w = a.weight;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.x) + row * n;
    const T* h = x;
    if (a.residual != nullptr) {  // the add rounds to the stream's dtype, as x + residual does
      const T* res = static_cast<const T*>(a.residual) + row * n;
      T* h_out = static_cast<T*>(a.h) + row * n;
      for (int64_t j = 0; j < n; ++j) store(h_out, j, load(x, j) + load(res, j));
      h = h_out;
    }
    const float rstd = 1.0f / std::sqrt(sum_of_squares(h, n) / static_cast<float>(n) + a.eps);
    T* y = static_cast<T*>(a.y) + row * n;
    for (int64_t j = 0; j < n; ++j) store(y, j, load(h, j) * rstd * w[j]);
    a.rstd[row] = rstd;
  }
}

// dx = rstd * (dy w - xhat * mean(dy w * xhat)) (+ dh), xhat = h * rstd; dw += dy * xhat.
template <typename T>
ASTROBIO_INLINE void rmsnorm_backward_rows(const RmsnormBackward& a, int64_t begin, int64_t end, float* dw) {
  const int64_t n = a.cols;
  const float* w = a.weight;
  for (int64_t row = begin; row < end; ++row) {
    const T* dy = static_cast<const T*>(a.dy) + row * n;
    const T* h = static_cast<const T*>(a.h) + row * n;
    const float rstd = a.rstd[row];
    float acc[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float xhat = load(h, j + l) * rstd, g = load(dy, j + l);
        acc[l] += g * w[j + l] * xhat;
        dw[j + l] += g * xhat;
      }
    for (int l = 0; j + l < n; ++l) {
      const float xhat = load(h, j + l) * rstd, g = load(dy, j + l);
      acc[l] += g * w[j + l] * xhat;
      dw[j + l] += g * xhat;
    }
    const float mean = lane_total(acc) / static_cast<float>(n);
    T* dx = static_cast<T*>(a.dx) + row * n;
    if (a.dh == nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        const float xhat = load(h, i) * rstd;
        store(dx, i, rstd * (load(dy, i) * w[i] - xhat * mean));
      }
    } else {
      const T* dh = static_cast<const T*>(a.dh) + row * n;
      for (int64_t i = 0; i < n; ++i) {
        const float xhat = load(h, i) * rstd;
        store(dx, i, rstd * (load(dy, i) * w[i] - xhat * mean) + load(dh, i));
      }
    }
  }
}

// (a, b) -> (a cos - b sin, a sin + b cos) for each pair of each head; sin carries the sign.
template <typename T>
ASTROBIO_INLINE void rotate_token(const T* x, T* out, const float* cos, const float* sin, float sign,
                                  int64_t heads, int64_t half) {
  for (int64_t head = 0; head < heads; ++head) {
    const T* xh = x + head * 2 * half;
    T* oh = out + head * 2 * half;
    for (int64_t j = 0; j < half; ++j) {
      const float a = load(xh, 2 * j), b = load(xh, 2 * j + 1), c = cos[j], s = sign * sin[j];
      store(oh, 2 * j, a * c - b * s);
      store(oh, 2 * j + 1, a * s + b * c);
    }
  }
}

template <typename T>
ASTROBIO_INLINE void rotary_rows(const Rotary& a, int64_t begin, int64_t end) {
  const int64_t width = a.heads * 2 * a.half;
  for (int64_t token = begin; token < end; ++token) {
    const int64_t position = token % a.seq;
    const float* cos = a.cos + position * a.half;
    const float* sin = a.sin + position * a.half;
    rotate_token(static_cast<const T*>(a.q) + token * width, static_cast<T*>(a.q_out) + token * width, cos, sin,
                 a.sign, a.heads, a.half);
    rotate_token(static_cast<const T*>(a.k) + token * width, static_cast<T*>(a.k_out) + token * width, cos, sin,
                 a.sign, a.heads, a.half);
  }
}

template <typename T>
ASTROBIO_INLINE void silu_mul_elements(const SiluMul& a, int64_t begin, int64_t end) {
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* out = static_cast<T*>(a.out);
  for (int64_t i = begin; i < end; ++i) {
    const float g = load(gate, i);
    store(out, i, g * sigmoid(g) * load(up, i));
  }
}

// d gate = d out * up * s * (1 + gate * (1 - s)),  d up = d out * gate * s,  s = sigmoid(gate)
template <typename T>
ASTROBIO_INLINE void silu_mul_backward_elements(const SiluMulBackward& a, int64_t begin, int64_t end) {
  const T* dout = static_cast<const T*>(a.dout);
  const T* gate = static_cast<const T*>(a.gate);
  const T* up = static_cast<const T*>(a.up);
  T* dgate = static_cast<T*>(a.dgate);
  T* dup = static_cast<T*>(a.dup);
  for (int64_t i = begin; i < end; ++i) {
    const float d = load(dout, i), g = load(gate, i), u = load(up, i), s = sigmoid(g);
    store(dgate, i, d * u * s * (1.0f + g * (1.0f - s)));
    store(dup, i, d * g * s);
  }
}

}  // namespace astrobio::cpu::layers

// A SIMD path's kernel table `kKernels`, in the current namespace, each kernel compiled with ATTRIBUTE
// (empty for the portable path) for both dtypes.
#define ASTROBIO_LAYER_KERNELS(ATTRIBUTE)                                                                   \
  namespace {                                                                                              \
  using namespace ::astrobio::cpu::layers;                                                                 \
  ATTRIBUTE void rmsnorm_forward(const RmsnormForward& a, int64_t begin, int64_t end) {                    \
    if (a.dtype == DType::kFloat32) rmsnorm_forward_rows<float>(a, begin, end);                            \
    else rmsnorm_forward_rows<BF16>(a, begin, end);                                                        \
  }                                                                                                        \
  ATTRIBUTE void rmsnorm_backward(const RmsnormBackward& a, int64_t begin, int64_t end, float* dw) {       \
    if (a.dtype == DType::kFloat32) rmsnorm_backward_rows<float>(a, begin, end, dw);                       \
    else rmsnorm_backward_rows<BF16>(a, begin, end, dw);                                                   \
  }                                                                                                        \
  ATTRIBUTE void rotary(const Rotary& a, int64_t begin, int64_t end) {                                     \
    if (a.dtype == DType::kFloat32) rotary_rows<float>(a, begin, end);                                     \
    else rotary_rows<BF16>(a, begin, end);                                                                 \
  }                                                                                                        \
  ATTRIBUTE void silu_mul(const SiluMul& a, int64_t begin, int64_t end) {                                  \
    if (a.dtype == DType::kFloat32) silu_mul_elements<float>(a, begin, end);                               \
    else silu_mul_elements<BF16>(a, begin, end);                                                           \
  }                                                                                                        \
  ATTRIBUTE void silu_mul_backward(const SiluMulBackward& a, int64_t begin, int64_t end) {                 \
    if (a.dtype == DType::kFloat32) silu_mul_backward_elements<float>(a, begin, end);                      \
    else silu_mul_backward_elements<BF16>(a, begin, end);                                                  \
  }                                                                                                        \
  }                                                                                                        \
  const Kernels kKernels = {&rmsnorm_forward, &rmsnorm_backward, &rotary, &silu_mul, &silu_mul_backward};
