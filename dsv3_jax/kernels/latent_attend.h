// Shared by the kernels that attend over an MLA layer's latent cache (latent_attention.cc, one
// call; mla_decode.cc, inside a whole decode layer): absorbed MLA decode attention, float32.
// Per sequence b, scores = q_latent · c_kvᵀ + q_pe · k_peᵀ against the slots its queries can
// reach, scaled, masked to the keys at or before each query's position, exp(s − max) in vector
// lanes, then out = exp-weights · c_kv / Σ exp-weights (one sgemm). With fewer sequences than
// threads a long cache's slots are split into pieces whose partial softmaxes are combined
// (FlashDecoding). The scores are one sgemm per operand pair where the BLAS is MKL (its
// packing of the cache's rows paid: below), else register-tiled loops. Dimension key:
// dsv3_jax/latent_attention.py.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "blas.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace dsv3::latent {

constexpr int kSlots = 4;  // slots per register tile of the score loop (kRows rows)
constexpr int kRows = 4;

// The lanes of each of four vectors summed: [Σ v0, ·, Σ v2, ·, Σ v1, ·, Σ v3, ·].
inline Floats8 Sum4(Floats w0, Floats w1, Floats w2, Floats w3) {
  const Floats8 v0 = Fold8(w0), v1 = Fold8(w1), v2 = Fold8(w2), v3 = Fold8(w3);
  const Floats8 a = __builtin_shufflevector(v0, v1, 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(v0, v1, 4, 5, 6, 7, 12, 13, 14, 15);
  const Floats8 b = __builtin_shufflevector(v2, v3, 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(v2, v3, 4, 5, 6, 7, 12, 13, 14, 15);
  const Floats8 c = __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13) +
                    __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
  return c + __builtin_shufflevector(c, c, 1, 0, 3, 2, 5, 4, 7, 6);
}

// acc[i][j] += q[i] · x[j] over d entries, for I rows of q and M rows of x (each ld apart).
// Summed in local registers, q and x restrict: where the compiler could not rule out that
// `out` aliases the float rows, it stored all I·M accumulators after every vector of
// products (batch-8 decode attention 22% slower).
template <int I, int M>
inline void Dot(Floats (&out)[I][M], const float* __restrict q, const float* __restrict x,
                int64_t d, int64_t ld) {
  Floats acc[I][M];
  for (int i = 0; i < I; ++i)
    for (int j = 0; j < M; ++j) acc[i][j] = out[i][j];
  for (int64_t c = 0; c < d; c += kLanes) {
    const int64_t w = std::min<int64_t>(kLanes, d - c);  // a partial last vector
    Floats xs[M];
    for (int j = 0; j < M; ++j) xs[j] = Load(x + j * ld + c, w);
    for (int i = 0; i < I; ++i) {
      const Floats v = Load(q + i * d + c, w);
      for (int j = 0; j < M; ++j) acc[i][j] += v * xs[j];
    }
  }
  for (int i = 0; i < I; ++i)
    for (int j = 0; j < M; ++j) out[i][j] = acc[i][j];
}

// P[i, j] = scale · (a[i] · x[j] + b[i] · y[j]) for I rows i and M slots j.
template <int I, int M>
inline void ScoreTile(const float* a, const float* b, const float* x, const float* y, int64_t C,
               int64_t R, float scale, float* P, int64_t ld) {
  Floats acc[I][M] = {};
  Dot<I, M>(acc, a, x, C, C);
  Dot<I, M>(acc, b, y, R, R);
  for (int i = 0; i < I; ++i) {
    if constexpr (M == 4) {
      const Floats8 sums = Sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]) * scale;
      for (int j = 0; j < 4; ++j) P[i * ld + j] = sums[(j % 2) * 4 + j / 2 * 2];
    } else {
      for (int j = 0; j < M; ++j) {
        float sum = 0.0f;
        for (int k = 0; k < kLanes; ++k) sum += acc[i][j][k];
        P[i * ld + j] = scale * sum;
      }
    }
  }
}

// P[i, s] = scale · (a[i] · x[s] + b[i] · y[s]) for rows i < n and slots s < reach: a [n, C],
// b [n, R], x [S, C], y [S, R] row-major, P's rows ld apart. Direct loops over register tiles
// of kRows × kSlots, not sgemm: with a handful of rows OpenBLAS spent twice the product's
// time packing the cache.
inline void Scores(const float* a, const float* b, const float* x, const float* y, int64_t n,
            int64_t reach, int64_t C, int64_t R, float scale, float* P, int64_t ld) {
  for (int64_t s = 0; s < reach; s += kSlots) {
    const float *xs = x + s * C, *ys = y + s * R;
    int64_t i = 0;
    if (s + kSlots <= reach) {
      for (; i + kRows <= n; i += kRows)
        ScoreTile<kRows, kSlots>(a + i * C, b + i * R, xs, ys, C, R, scale, P + i * ld + s, ld);
      for (; i < n; ++i)
        ScoreTile<1, kSlots>(a + i * C, b + i * R, xs, ys, C, R, scale, P + i * ld + s, ld);
    } else {
      for (int64_t j = s; j < reach; ++j)
        for (i = 0; i < n; ++i)
          ScoreTile<1, 1>(a + i * C, b + i * R, x + j * C, y + j * R, C, R, scale,
                          P + i * ld + j, ld);
    }
  }
}

// Whether a piece of m slots takes its scores from sgemm: with MKL's from 256 slots (a piece
// of the bench decode's 1024-slot cache, 4 pieces over 2 threads: the layer's attention 29.9
// → 24.4 µs against 8-lane tiles; equal at 256 slots alone, the tiles ahead below; 16-lane
// tiles and MKL alike in a whole decode step), never with OpenBLAS's (28.4 → 36.1 µs: it
// spent twice the product's time packing the cache). /tmp/s26/labench2.py.
inline bool SgemmScores(int64_t m) { return m >= 256 && SgemmIsMkl(); }

// Fewest slots per piece when a sequence's slots are split over the threads.
constexpr int64_t kMinSlots = 256;
// Most rows per sequence for which its slots are split (each piece keeps a partial output of
// every row: [pieces, rows, C] of scratch).
constexpr int64_t kMaxSplitRows = 256;

// One sequence's operands, and the slots each of its rows sees: [0, visible[i]) (0: a row at
// a position < 0, which averages all S slots alike, as the JAX path).
struct Sequence {
  const float *q, *qp, *ckv, *kpe;  // rows [rows, C], [rows, R]; cache [S, C], [S, R]
  const int64_t* visible;
};

// For rows [0, n) of s over slots [s0, s1): o[i] = Σ_s exp(score − top_i) c_kv[s] (o [n, C]),
// top[i] the row's largest visible score (−inf: none in the range), sum[i] = Σ_s
// exp(score − top_i).
inline void Partial(const Sequence& s, int64_t n, int64_t s0, int64_t s1, int64_t C, int64_t R,
                    float scale, float* o, float* top, float* sum) {
  const int64_t m = s1 - s0, ld = Padded(m);
  std::vector<float> scores(n * ld);
  if (SgemmScores(m)) {
    Sgemm(CblasNoTrans, CblasTrans, n, m, C, scale, s.q, C, s.ckv + s0 * C, C, 0.0f,
          scores.data(), ld);
    Sgemm(CblasNoTrans, CblasTrans, n, m, R, scale, s.qp, R, s.kpe + s0 * R, R, 1.0f,
          scores.data(), ld);
  } else {
    Scores(s.q, s.qp, s.ckv + s0 * C, s.kpe + s0 * R, n, m, C, R, scale, scores.data(), ld);
  }
  for (int64_t i = 0; i < n; ++i) {
    float* row = scores.data() + i * ld;
    const int64_t seen_here = std::clamp<int64_t>(s.visible[i] - s0, 0, m);
    if (s.visible[i] == 0) {
      std::fill(row, row + ld, 0.0f);
      std::fill(row, row + m, 1.0f);
      top[i] = 0.0f, sum[i] = static_cast<float>(m);
    } else if (seen_here == 0) {
      std::fill(row, row + ld, 0.0f);
      top[i] = -INFINITY, sum[i] = 0.0f;
    } else {
      const int64_t lanes = Padded(seen_here);  // whole lanes, the tail masked
      std::fill(row + seen_here, row + lanes, -INFINITY);
      top[i] = MaxOf(row, lanes);
      sum[i] = ExpShifted(row, lanes, top[i]);
      std::fill(row + lanes, row + ld, 0.0f);
    }
  }
  Sgemm(CblasNoTrans, CblasNoTrans, n, C, m, 1.0f, scores.data(), ld, s.ckv + s0 * C, C, 0.0f,
        o, C);
}

// out [B, N, T, C] (module comment): each query row's attention over the cache c_kv [B, S, C],
// k_pe [B, S, R] (one sequence's may come [S, ·]: the same memory) at or before its position
// (positions [B, T]), with q_latent [B, N, T, C], q_pe [B, N, T, R].
inline void AttendLatent(xla::ffi::ThreadPool& pool, const float* c_kv, const float* k_pe,
                         const float* q_latent, const float* q_pe, const int32_t* positions,
                         int64_t B, int64_t S, int64_t C, int64_t R, int64_t N, int64_t T,
                         float scale, float* result) {
  const int64_t rows = N * T;
  std::vector<int64_t> visible(B * rows), reach(B, 0);  // reach: the slots any row sees
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t v = std::clamp<int64_t>(positions[b * T + i % T] + 1, 0, S);
      visible[b * rows + i] = v;
      reach[b] = std::max(reach[b], v == 0 ? S : v);
    }
  auto sequence = [&](int64_t b, int64_t r0) {
    return Sequence{q_latent + (b * rows + r0) * C, q_pe + (b * rows + r0) * R,
                    c_kv + b * S * C, k_pe + b * S * R, visible.data() + b * rows + r0};
  };
  // Fewer sequences than twice the threads: each sequence's slots are split into pieces
  // (with few rows) or its rows are (with many).
  const int64_t threads = Threads(pool);
  const int64_t wanted = std::max<int64_t>(1, (2 * threads + B - 1) / B);
  const int64_t longest = *std::max_element(reach.begin(), reach.end());
  const int64_t slot_pieces = std::clamp<int64_t>(longest / kMinSlots, 1, wanted);
  if (slot_pieces > 1 && rows <= kMaxSplitRows) {
    // each piece's partial results, then per row: out = Σ_p e_p o_p / Σ_p e_p sum_p with
    // e_p = exp(top_p − max_p top_p) (FlashDecoding's split of the keys)
    const int64_t P = slot_pieces;
    std::vector<float> o(B * P * rows * C), top(B * P * rows), sum(B * P * rows);
    Parallel(pool, B * P, [&](int64_t unit) {
      const int64_t b = unit / P, p = unit % P;
      const int64_t s0 = reach[b] * p / P, s1 = reach[b] * (p + 1) / P;
      float *po = o.data() + unit * rows * C, *pt = top.data() + unit * rows;
      float* ps = sum.data() + unit * rows;
      if (s1 == s0) {
        std::fill(pt, pt + rows, -INFINITY);
        std::fill(ps, ps + rows, 0.0f);
        std::fill(po, po + rows * C, 0.0f);
        return;
      }
      Partial(sequence(b, 0), rows, s0, s1, C, R, scale, po, pt, ps);
    });
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t at = b * P * rows + i;  // piece p's entry: at + p · rows
        float most = -INFINITY, total = 0.0f;
        for (int64_t p = 0; p < P; ++p) most = std::max(most, top[at + p * rows]);
        float* row = result + (b * rows + i) * C;
        std::fill(row, row + C, 0.0f);
        for (int64_t p = 0; p < P; ++p) {
          if (sum[at + p * rows] == 0.0f) continue;
          const float e = std::exp(top[at + p * rows] - most);
          total += e * sum[at + p * rows];
          const float* po = o.data() + (at + p * rows) * C;
          for (int64_t c = 0; c < C; ++c) row[c] += e * po[c];
        }
        for (int64_t c = 0; c < C; ++c) row[c] /= total;  // total ≥ 1: its top's exp(0)
      }
    return;
  }
  const int64_t row_pieces = std::min(rows, wanted);
  Parallel(pool, B * row_pieces, [&](int64_t unit) {
    const int64_t b = unit / row_pieces, p = unit % row_pieces;
    const int64_t r0 = rows * p / row_pieces, n = rows * (p + 1) / row_pieces - r0;
    if (n == 0) return;
    const Sequence s = sequence(b, r0);
    int64_t most = 0;  // the slots these rows see
    for (int64_t i = 0; i < n; ++i) most = std::max(most, s.visible[i] == 0 ? S : s.visible[i]);
    std::vector<float> top(n), sum(n);
    float* o = result + (b * rows + r0) * C;
    Partial(s, n, 0, most, C, R, scale, o, top.data(), sum.data());
    for (int64_t i = 0; i < n; ++i) {
      const float inv = 1.0f / sum[i];  // ≥ 1: the row's largest weight is exp(0)
      for (int64_t c = 0; c < C; ++c) o[i * C + c] *= inv;
    }
  });
}


}  // namespace dsv3::latent
