// The arithmetic of causal attention on the CPU (attention.h), written once as plain loops and compiled
// once per SIMD path: ASTROBIO_ATTENTION_KERNELS(attribute) defines a path's kernel table with every loop
// inlined into functions carrying that path's target attribute, where GCC vectorizes them.
//
// One (batch, head) pair at a time, in fp32. Row i of the causal mask sees keys j <= i only, so the kernel
// computes only those scores: half the work of a full T x T block. The pair's K and V are first copied
// into small contiguous tiles: K^T [head_dim][seq] so that a query row's scores q_i . k_j are vectorised
// over j (q_i[d] broadcast against a row of K^T), and V (or K) as rows padded to a multiple of 16 so that
// sums of rows are vectorised over the head dimension. Scores go in blocks of up to 64 keys held in four
// independent accumulators (the sums over d are then 4 chains of fused multiply-adds in flight, not one).
//
//   forward:  s_j = scale q_i . k_j (j <= i),  m = max_j s_j,  l = sum_j e^(s_j - m),
//             out_i = sum_j e^(s_j - m) v_j / l,  lse_i = m + log l
//   backward: p_j = e^(s_j - lse_i),  dp_j = dout_i . v_j,  D_i = dout_i . out_i,  ds_j = p_j (dp_j - D_i),
//             dq_i = scale sum_j ds_j k_j,  dk_j += scale ds_j q_i,  dv_j += p_j dout_i
//
// dk and dv sum over the rows i of their pair in a per-pair fp32 tile, written out once: nothing is shared
// between pairs, so the results do not depend on the number of threads. The SIMD paths contract a * b + c
// into fused multiply-adds (attention_avx512.cpp, attention_avx2.cpp), the portable path does not: the
// paths agree to fp32 rounding, not bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention.h"
#include "layers_kernels.h"

namespace astrobio::cpu::attention {

using layers::exp_approx;
using layers::kLanes;

constexpr int kBlockChunks = 4;  // chunks of kLanes keys scored together

ASTROBIO_INLINE int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// s[j0 + l] = x . mt[:, j0 + l] for l < CHUNKS * kLanes (mt: [dim][stride], columns past the keys are 0).
template <int CHUNKS>
ASTROBIO_INLINE void score_block(const float* x, const float* mt, int64_t dim, int64_t stride, int64_t j0,
                                 float* s) {
  float acc[CHUNKS * kLanes] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const float xd = x[d];
    const float* row = mt + d * stride + j0;
    for (int l = 0; l < CHUNKS * kLanes; ++l) acc[l] += xd * row[l];
  }
  for (int l = 0; l < CHUNKS * kLanes; ++l) s[j0 + l] = acc[l];
}

// s[j] = x . mt[:, j] for j < round_up(n, kLanes) (x: dim values; mt: [dim][stride], stride >= that).
ASTROBIO_INLINE void scores(const float* x, const float* mt, int64_t dim, int64_t stride, int64_t n, float* s) {
  const int64_t chunks = round_up(n, kLanes) / kLanes;
  int64_t c = 0;
  for (; c + kBlockChunks <= chunks; c += kBlockChunks)
    score_block<kBlockChunks>(x, mt, dim, stride, c * kLanes, s);
  switch (chunks - c) {
    case 3: score_block<3>(x, mt, dim, stride, c * kLanes, s); break;
    case 2: score_block<2>(x, mt, dim, stride, c * kLanes, s); break;
    case 1: score_block<1>(x, mt, dim, stride, c * kLanes, s); break;
    default: break;
  }
}

// out[0, width) = sum_{j < n} w[j] rows[j][0, width)  (rows: [n][width], width a multiple of kLanes), four
// rows at a time into independent accumulators.
ASTROBIO_INLINE void weighted_rows(const float* w, const float* rows, int64_t n, int64_t width, float* out) {
  for (int64_t c = 0; c < width; c += kLanes) {
    float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
    const float* r = rows + c;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const float w0 = w[j], w1 = w[j + 1], w2 = w[j + 2], w3 = w[j + 3];
      const float *r0 = r + j * width, *r1 = r0 + width, *r2 = r1 + width, *r3 = r2 + width;
      for (int l = 0; l < kLanes; ++l) {
        a0[l] += w0 * r0[l];
        a1[l] += w1 * r1[l];
        a2[l] += w2 * r2[l];
        a3[l] += w3 * r3[l];
      }
    }
    for (; j < n; ++j) {
      const float wj = w[j];
      const float* rj = r + j * width;
      for (int l = 0; l < kLanes; ++l) a0[l] += wj * rj[l];
    }
    for (int l = 0; l < kLanes; ++l) out[c + l] = (a0[l] + a1[l]) + (a2[l] + a3[l]);
  }
}

ASTROBIO_INLINE float row_max(const float* s, int64_t n) {
  float m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = s[0];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) m[l] = s[j + l] > m[l] ? s[j + l] : m[l];
  for (int l = 0; j + l < n; ++l) m[l] = s[j + l] > m[l] ? s[j + l] : m[l];
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) m[l] = m[l + width] > m[l] ? m[l + width] : m[l];
  return m[0];
}

ASTROBIO_INLINE float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  for (int l = 0; j + l < n; ++l) acc[l] += a[j + l] * b[j + l];
  return layers::lane_total(acc);
}


// x[b, :, h, :] of a [batch, seq, heads, head_dim] tensor as transposed [head_dim][stride].
ASTROBIO_INLINE void load_transposed(const float* x, const Shape& s, int64_t pair, int64_t stride, float* t) {
  const int64_t b = pair / s.heads, h = pair % s.heads, row = s.heads * s.head_dim;
  const float* base = x + b * s.seq * row + h * s.head_dim;
  for (int64_t j = 0; j < s.seq; ++j)
    for (int64_t d = 0; d < s.head_dim; ++d) t[d * stride + j] = base[j * row + d];
}

// x[b, :, h, :] as rows [seq][width] (the padding columns stay as they are: zero).
ASTROBIO_INLINE void load_rows(const float* x, const Shape& s, int64_t pair, int64_t width, float* t) {
  const int64_t b = pair / s.heads, h = pair % s.heads, row = s.heads * s.head_dim;
  const float* base = x + b * s.seq * row + h * s.head_dim;
  for (int64_t j = 0; j < s.seq; ++j)
    for (int64_t d = 0; d < s.head_dim; ++d) t[j * width + d] = base[j * row + d];
}

ASTROBIO_INLINE const float* row_of(const float* x, const Shape& s, int64_t pair, int64_t i) {
  const int64_t b = pair / s.heads, h = pair % s.heads;
  return x + ((b * s.seq + i) * s.heads + h) * s.head_dim;
}

ASTROBIO_INLINE float* row_of(float* x, const Shape& s, int64_t pair, int64_t i) {
  const int64_t b = pair / s.heads, h = pair % s.heads;
  return x + ((b * s.seq + i) * s.heads + h) * s.head_dim;
}

ASTROBIO_INLINE void forward_pairs(const Forward& a, int64_t begin, int64_t end) {
  const Shape& s = a.shape;
  const int64_t T = s.seq, D = s.head_dim, stride = round_up(T, kLanes), width = round_up(D, kLanes);
  std::vector<float> kt(static_cast<size_t>(D * stride), 0.0f), v(static_cast<size_t>(T * width), 0.0f);
  std::vector<float> score(static_cast<size_t>(stride)), q(static_cast<size_t>(D)), o(static_cast<size_t>(width));
  for (int64_t pair = begin; pair < end; ++pair) {
    load_transposed(a.k, s, pair, stride, kt.data());
    load_rows(a.v, s, pair, width, v.data());
    for (int64_t i = 0; i < T; ++i) {
      const int64_t n = i + 1;
      const float* qi = row_of(a.q, s, pair, i);
      for (int64_t d = 0; d < D; ++d) q[d] = qi[d] * s.scale;
      scores(q.data(), kt.data(), D, stride, n, score.data());
      const float m = row_max(score.data(), n);
      float acc[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          const float p = exp_approx(score[j + l] - m);
          score[j + l] = p;
          acc[l] += p;
        }
      for (int l = 0; j + l < n; ++l) {
        const float p = exp_approx(score[j + l] - m);
        score[j + l] = p;
        acc[l] += p;
      }
      const float total = layers::lane_total(acc);
      weighted_rows(score.data(), v.data(), n, width, o.data());
      const float inverse = 1.0f / total;
      float* out = row_of(a.out, s, pair, i);
      for (int64_t d = 0; d < D; ++d) out[d] = o[d] * inverse;
      a.lse[pair * T + i] = m + std::log(total);
    }
  }
}

ASTROBIO_INLINE void backward_pairs(const Backward& a, int64_t begin, int64_t end) {
  const Shape& s = a.shape;
  const int64_t T = s.seq, D = s.head_dim, stride = round_up(T, kLanes), width = round_up(D, kLanes);
  std::vector<float> kt(static_cast<size_t>(D * stride), 0.0f), vt(static_cast<size_t>(D * stride), 0.0f);
  std::vector<float> k(static_cast<size_t>(T * width), 0.0f), dk(static_cast<size_t>(T * width));
  std::vector<float> dv(static_cast<size_t>(T * width));
  std::vector<float> p(static_cast<size_t>(stride)), ds(static_cast<size_t>(stride));
  std::vector<float> q(static_cast<size_t>(width), 0.0f), g(static_cast<size_t>(width), 0.0f);
  std::vector<float> dq(static_cast<size_t>(width));
  for (int64_t pair = begin; pair < end; ++pair) {
    load_transposed(a.k, s, pair, stride, kt.data());
    load_transposed(a.v, s, pair, stride, vt.data());
    load_rows(a.k, s, pair, width, k.data());
    std::fill(dk.begin(), dk.end(), 0.0f);
    std::fill(dv.begin(), dv.end(), 0.0f);
    for (int64_t i = 0; i < T; ++i) {
      const int64_t n = i + 1;
      const float *qi = row_of(a.q, s, pair, i), *gi = row_of(a.dout, s, pair, i);
      for (int64_t d = 0; d < D; ++d) {
        q[d] = qi[d] * s.scale;
        g[d] = gi[d];
      }
      const float lse = a.lse[pair * T + i];
      const float delta = dot(g.data(), row_of(a.out, s, pair, i), D);
      scores(q.data(), kt.data(), D, stride, n, p.data());
      scores(g.data(), vt.data(), D, stride, n, ds.data());
      for (int64_t j = 0; j < n; ++j) {
        const float pj = exp_approx(p[j] - lse);
        p[j] = pj;
        ds[j] = pj * (ds[j] - delta);
      }
      weighted_rows(ds.data(), k.data(), n, width, dq.data());
      float* dqi = row_of(a.dq, s, pair, i);
      for (int64_t d = 0; d < D; ++d) dqi[d] = dq[d] * s.scale;
      for (int64_t j = 0; j < n; ++j) {
        const float dsj = ds[j], pj = p[j];
        float* dkj = dk.data() + j * width;
        float* dvj = dv.data() + j * width;
        for (int64_t d = 0; d < width; ++d) {
          dkj[d] += dsj * q[d];
          dvj[d] += pj * g[d];
        }
      }
    }
    for (int64_t j = 0; j < T; ++j) {
      float* dkj = row_of(a.dk, s, pair, j);
      float* dvj = row_of(a.dv, s, pair, j);
      for (int64_t d = 0; d < D; ++d) {
        dkj[d] = dk[j * width + d];
        dvj[d] = dv[j * width + d];
      }
    }
  }
}

}  // namespace astrobio::cpu::attention

// A SIMD path's kernel table `kKernels`, in the current namespace, each kernel compiled with ATTRIBUTE
// (empty for the portable path).
#define ASTROBIO_ATTENTION_KERNELS(ATTRIBUTE)                                                     \
  namespace {                                                                                    \
  using namespace ::astrobio::cpu::attention;                                                    \
  ATTRIBUTE void forward(const Forward& a, int64_t begin, int64_t end) { forward_pairs(a, begin, end); }   \
  ATTRIBUTE void backward(const Backward& a, int64_t begin, int64_t end) { backward_pairs(a, begin, end); } \
  }                                                                                              \
  const Kernels kKernels = {&forward, &backward};
