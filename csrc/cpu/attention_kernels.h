// The arithmetic of causal attention on the CPU (attention.h), written once as plain loops and compiled
// once per SIMD path: ASTROBIO_ATTENTION_KERNELS(attribute) defines a path's kernel table with every loop
// inlined into functions carrying that path's target attribute, where GCC vectorizes them.
//
// One (batch, head) pair at a time, in fp32. Row i of the causal mask sees keys j <= i only, so the kernel
// computes only those scores (rounded up to a multiple of 16 keys): about half the work of the full T x T
// block. The pair's rows are first copied into small contiguous tiles: K^T and V^T [head_dim][seq] so that
// scores q_i . k_j are vectorised over j (q_i[d] broadcast against a row of K^T), and K, V, q, dout as rows
// padded to a multiple of 16 so that sums of rows are vectorised over the head dimension. Every product is
// a register tile of four rows: four query rows' scores over blocks of up to 64 keys (16 accumulators),
// four rows' weighted sums of 16 columns (4 accumulators), so that each load serves four multiply-adds.
//
//   forward:  s_j = scale q_i . k_j (j <= i),  m = max_j s_j,  l = sum_j e^(s_j - m),
//             out_i = sum_j e^(s_j - m) v_j / l,  lse_i = m + log l
//   backward: p_ij = e^(s_ij - lse_i),  dp_ij = dout_i . v_j,  D_i = dout_i . out_i,
//             ds_ij = p_ij (dp_ij - D_i),  dq_i = scale sum_j ds_ij k_j,
//             dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij dout_i   (i >= j)
//
// The backward keeps the pair's p and ds ([seq][seq], zero above the diagonal: 64 KB each at seq 128) and
// reads their columns for dk and dv, so nothing is transposed back and every output row is written once.
// Nothing is shared between pairs, so the results do not depend on the number of threads. The SIMD paths
// contract a * b + c into fused multiply-adds (attention_avx512.cpp, attention_avx2.cpp), the portable
// path does not: the paths agree to fp32 rounding, not bit for bit.
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

constexpr int kRows = 4;         // query rows computed together: each load of K^T or V serves four rows
constexpr int kBlockChunks = 4;  // chunks of kLanes keys scored together (4 x 4 accumulators)

ASTROBIO_INLINE int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// s[r][j0 + l] = x[r] . mt[:, j0 + l] for the kRows rows r of x (x: rows of ldx, dim used; mt: [dim][stride];
// s: rows of `stride`) and l < CHUNKS * kLanes.
template <int CHUNKS>
ASTROBIO_INLINE void score_tile(const float* x, int64_t ldx, const float* mt, int64_t dim, int64_t stride, int64_t j0,
                                float* s) {
  constexpr int kWidth = CHUNKS * kLanes;
  float a0[kWidth] = {}, a1[kWidth] = {}, a2[kWidth] = {}, a3[kWidth] = {};
  for (int64_t d = 0; d < dim; ++d) {
    const float x0 = x[d], x1 = x[ldx + d], x2 = x[2 * ldx + d], x3 = x[3 * ldx + d];
    const float* row = mt + d * stride + j0;
    for (int l = 0; l < kWidth; ++l) {
      a0[l] += x0 * row[l];
      a1[l] += x1 * row[l];
      a2[l] += x2 * row[l];
      a3[l] += x3 * row[l];
    }
  }
  for (int l = 0; l < kWidth; ++l) {
    s[j0 + l] = a0[l];
    s[stride + j0 + l] = a1[l];
    s[2 * stride + j0 + l] = a2[l];
    s[3 * stride + j0 + l] = a3[l];
  }
}

// score_tile over the keys j < round_up(n, kLanes) (stride >= that), x as rows of dim.
ASTROBIO_INLINE void scores(const float* x, const float* mt, int64_t dim, int64_t stride, int64_t n, float* s) {
  const int64_t chunks = round_up(n, kLanes) / kLanes;
  int64_t c = 0;
  for (; c + kBlockChunks <= chunks; c += kBlockChunks)
    score_tile<kBlockChunks>(x, dim, mt, dim, stride, c * kLanes, s);
  switch (chunks - c) {
    case 3: score_tile<3>(x, dim, mt, dim, stride, c * kLanes, s); break;
    case 2: score_tile<2>(x, dim, mt, dim, stride, c * kLanes, s); break;
    case 1: score_tile<1>(x, dim, mt, dim, stride, c * kLanes, s); break;
    default: break;
  }
}

// out[r][0, width) = sum_{i < n} w(r, i) rows[i][0, width) for r < kRows, w(r, i) = w[r * wr + i * wi] (rows:
// [n][width], width a multiple of kLanes; out: [kRows][width]). dq = ds k takes w as rows of ds (wi = 1),
// dk = ds^T q and dv = p^T dout as columns (wr = 1): the sums over query rows need no transposes.
ASTROBIO_INLINE void weighted_rows(const float* w, int64_t wr, int64_t wi, const float* rows, int64_t n,
                                   int64_t width, float* out) {
  for (int64_t c = 0; c < width; c += kLanes) {
    float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) {
      const float* wc = w + i * wi;
      const float w0 = wc[0], w1 = wc[wr], w2 = wc[2 * wr], w3 = wc[3 * wr];
      const float* r = rows + i * width + c;
      for (int l = 0; l < kLanes; ++l) {
        a0[l] += w0 * r[l];
        a1[l] += w1 * r[l];
        a2[l] += w2 * r[l];
        a3[l] += w3 * r[l];
      }
    }
    for (int l = 0; l < kLanes; ++l) {
      out[c + l] = a0[l];
      out[width + c + l] = a1[l];
      out[2 * width + c + l] = a2[l];
      out[3 * width + c + l] = a3[l];
    }
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

// Row i of the pair (b, h) = pair / heads, pair % heads of a [batch, seq, heads, head_dim] tensor.
ASTROBIO_INLINE int64_t row_offset(const Shape& s, int64_t pair, int64_t i) {
  return ((pair / s.heads * s.seq + i) * s.heads + pair % s.heads) * s.head_dim;
}

// The pair's rows of x, times `scale`, into t: [seq][width] (columns past head_dim left as they are).
ASTROBIO_INLINE void load_rows(const float* x, const Shape& s, int64_t pair, float scale, int64_t width, float* t) {
  for (int64_t j = 0; j < s.seq; ++j) {
    const float* row = x + row_offset(s, pair, j);
    for (int64_t d = 0; d < s.head_dim; ++d) t[j * width + d] = row[d] * scale;
  }
}

// The pair's rows of x transposed into t: [head_dim][stride] (columns past seq left as they are), in blocks
// of kLanes rows: each column of a block is one vector store (GCC's vectorized row-at-a-time loop scatters
// lane by lane).
ASTROBIO_INLINE void load_transposed(const float* x, const Shape& s, int64_t pair, float scale, int64_t stride,
                                     float* t) {
  const float* base = x + row_offset(s, pair, 0);
  const int64_t row = s.heads * s.head_dim;
  int64_t j0 = 0;
  for (; j0 + kLanes <= s.seq; j0 += kLanes)
    for (int64_t d = 0; d < s.head_dim; ++d)
      for (int l = 0; l < kLanes; ++l) t[d * stride + j0 + l] = base[(j0 + l) * row + d] * scale;
  for (int64_t d = 0; d < s.head_dim; ++d)
    for (int64_t j = j0; j < s.seq; ++j) t[d * stride + j] = base[j * row + d] * scale;
}

// Buffers of floats, zero-filled once (the padding rows and columns stay zero).
ASTROBIO_INLINE std::vector<float> zeros(int64_t n) { return std::vector<float>(static_cast<size_t>(n), 0.0f); }

ASTROBIO_INLINE void forward_pairs(const Forward& a, int64_t begin, int64_t end) {
  const Shape& s = a.shape;
  const int64_t T = s.seq, D = s.head_dim, rows = round_up(T, kRows);
  const int64_t stride = round_up(T, kLanes), width = round_up(D, kLanes);
  std::vector<float> q = zeros(rows * D), kt = zeros(D * stride), v = zeros(T * width);
  std::vector<float> p = zeros(kRows * stride), o = zeros(kRows * width);
  for (int64_t pair = begin; pair < end; ++pair) {
    load_rows(a.q, s, pair, s.scale, D, q.data());
    load_transposed(a.k, s, pair, 1.0f, stride, kt.data());
    load_rows(a.v, s, pair, 1.0f, width, v.data());
    for (int64_t i0 = 0; i0 < T; i0 += kRows) {
      const int64_t keys = std::min(i0 + kRows, T);  // keys of the tile's last row
      scores(q.data() + i0 * D, kt.data(), D, stride, keys, p.data());
      float totals[kRows];
      for (int64_t r = 0; r < kRows; ++r) {  // rows past seq (zero q) give finite values, not written
        const int64_t n = std::min(i0 + r + 1, keys);  // row i0 + r sees keys j <= i0 + r
        float* pr = p.data() + r * stride;
        // whole vectors: the masked keys of the last one as -inf, whose exponential (0 or the smallest
        // subnormal) leaves the sum, at least 1, unchanged; zero for the sum over v
        const int64_t full = round_up(n, kLanes);
        for (int64_t j = n; j < full; ++j) pr[j] = -INFINITY;
        const float m = row_max(pr, full);
        float acc[kLanes] = {};
        for (int64_t j = 0; j < full; j += kLanes)
          for (int l = 0; l < kLanes; ++l) {
            const float e = exp_approx(pr[j + l] - m);
            pr[j + l] = e;
            acc[l] += e;
          }
        for (int64_t j = n; j < keys; ++j) pr[j] = 0.0f;
        totals[r] = layers::lane_total(acc);
        if (i0 + r < T) a.lse[pair * T + i0 + r] = m + std::log(totals[r]);
      }
      weighted_rows(p.data(), stride, 1, v.data(), keys, width, o.data());
      for (int64_t r = 0; r < kRows && i0 + r < T; ++r) {
        const float inverse = 1.0f / totals[r];
        float* out = a.out + row_offset(s, pair, i0 + r);
        for (int64_t d = 0; d < D; ++d) out[d] = o[r * width + d] * inverse;
      }
    }
  }
}

// Rows [r0, r0 + kRows) of tile ([kRows][width]) times scale into the pair's rows of x (those below seq).
ASTROBIO_INLINE void store_rows(const float* tile, int64_t width, float scale, const Shape& s, int64_t pair,
                                int64_t r0, float* x) {
  for (int64_t r = 0; r < kRows && r0 + r < s.seq; ++r) {
    float* row = x + row_offset(s, pair, r0 + r);
    for (int64_t d = 0; d < s.head_dim; ++d) row[d] = tile[r * width + d] * scale;
  }
}

ASTROBIO_INLINE void backward_pairs(const Backward& a, int64_t begin, int64_t end) {
  const Shape& s = a.shape;
  const int64_t T = s.seq, D = s.head_dim, rows = round_up(T, kRows);
  const int64_t stride = round_up(T, kLanes), width = round_up(D, kLanes);
  // q (scaled) and dout as rows of head_dim (for the scores) and of width (for dk, dv); k and v transposed
  // (for the scores), k as rows of width (for dq); the pair's p and ds, zero past the diagonal.
  std::vector<float> q = zeros(rows * D), g = zeros(rows * D), qw = zeros(T * width), gw = zeros(T * width);
  std::vector<float> kt = zeros(D * stride), vt = zeros(D * stride), k = zeros(T * width);
  std::vector<float> p = zeros(rows * stride), ds = zeros(rows * stride), tile = zeros(kRows * width);
  for (int64_t pair = begin; pair < end; ++pair) {
    load_rows(a.q, s, pair, s.scale, D, q.data());
    load_rows(a.dout, s, pair, 1.0f, D, g.data());
    load_rows(a.q, s, pair, s.scale, width, qw.data());
    load_rows(a.dout, s, pair, 1.0f, width, gw.data());
    load_transposed(a.k, s, pair, 1.0f, stride, kt.data());
    load_transposed(a.v, s, pair, 1.0f, stride, vt.data());
    load_rows(a.k, s, pair, 1.0f, width, k.data());
    for (int64_t i0 = 0; i0 < T; i0 += kRows) {
      const int64_t keys = std::min(i0 + kRows, T);
      float *p0 = p.data() + i0 * stride, *ds0 = ds.data() + i0 * stride;
      scores(q.data() + i0 * D, kt.data(), D, stride, keys, p0);
      scores(g.data() + i0 * D, vt.data(), D, stride, keys, ds0);
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t i = i0 + r, n = i < T ? i + 1 : 0;
        float *pr = p0 + r * stride, *dsr = ds0 + r * stride;
        if (n > 0) {
          const float lse = a.lse[pair * T + i];
          const float delta = dot(g.data() + i * D, a.out + row_offset(s, pair, i), D);
          for (int64_t j = 0; j < round_up(n, kLanes); ++j) {  // whole vectors; the masked keys are zeroed below
            const float e = exp_approx(pr[j] - lse);
            pr[j] = e;
            dsr[j] = e * (dsr[j] - delta);
          }
        }
        for (int64_t j = n; j < stride; ++j) pr[j] = dsr[j] = 0.0f;
      }
      weighted_rows(ds0, stride, 1, k.data(), keys, width, tile.data());
      store_rows(tile.data(), width, s.scale, s, pair, i0, a.dq);
    }
    // keys j0 .. j0 + 3 gather the query rows i >= j0 (p and ds are zero above the diagonal)
    for (int64_t j0 = 0; j0 < T; j0 += kRows) {
      weighted_rows(ds.data() + j0 * stride + j0, 1, stride, qw.data() + j0 * width, T - j0, width, tile.data());
      store_rows(tile.data(), width, 1.0f, s, pair, j0, a.dk);
      weighted_rows(p.data() + j0 * stride + j0, 1, stride, gw.data() + j0 * width, T - j0, width, tile.data());
      store_rows(tile.data(), width, 1.0f, s, pair, j0, a.dv);
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
