// Shared by the kernels that multiply a few rows by a weight (decode steps): Y [M, N] = X [M, K] ·
// W [K, N], float32, on the calling thread. For one or two rows (with OpenBLAS) W's rows are
// streamed in order, in blocks of columns, the products of each row of X accumulated in registers
// (broadcast multiply-adds). For a weight that is not in the core's own caches, as a decode step's
// weights never are, this beat OpenBLAS's sgemm call, which first copies (packs) W: 20 MB of 64 KB
// [128, 128] chunks at M = 1 took 0.35-0.39 ms from the shared cache against OpenBLAS's 0.64-0.74,
// 0.70-0.85 from memory against 1.11 (one core, AMD EPYC Zen 4, /tmp/s27/mb/cold.cc); bench decode
// steps after a 1024-token prompt, both ways alternated in one process over 40 rounds: batch 1
// 1.106 → 0.907 ms (median), batch 8 5.17 → 4.88, the small preset's batch 1 4.04 → 3.36
// (/tmp/s27/streamab.py). Each output is its row's products summed over k in order: the same on
// any machine with the same vector width.
#pragma once

#include <algorithm>
#include <cstdint>

#include "blas.h"
#include "vector_math.h"

namespace dsv3 {

// Most rows a streamed product takes: from 3 rows the column blocks (16 accumulators over
// fewer columns) read W in shorter strided runs, and sgemm's packing paid (20 MB of chunks at
// M = 3: 1.83-1.90 against 1.47-1.88 ms; M = 4: 1.00 against 0.92; M = 8: 2.0 against 1.25).
constexpr int64_t kStreamRows = 2;
// Vectors of columns per block for one row: 16 accumulators where AVX-512's 32 registers hold
// them and the weight row's vectors, 8 with AVX2's 16 registers.
constexpr int kOneRowVectors = kLanes == 16 ? 16 : 8;

// Y[i, n0 + ·] for I rows and V vectors of columns from n0 (the last of them `tail` lanes wide:
// kLanes but where N ends inside it).
template <int I, int V>
inline void StreamTile(const float* x, int64_t ldx, int64_t K, const float* w, int64_t ldw,
                       int64_t tail, float* y, int64_t ldy) {
  Floats acc[I][V] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* row = w + k * ldw;
    Floats ws[V];
    for (int v = 0; v + 1 < V; ++v) ws[v] = Load(row + v * kLanes);
    ws[V - 1] = Load(row + (V - 1) * kLanes, tail);
    for (int i = 0; i < I; ++i) {
      const float xv = x[i * ldx + k];
      for (int v = 0; v < V; ++v) acc[i][v] += xv * ws[v];
    }
  }
  for (int i = 0; i < I; ++i) {
    for (int v = 0; v + 1 < V; ++v) Store(y + i * ldy + v * kLanes, acc[i][v]);
    Store(y + i * ldy + (V - 1) * kLanes, acc[i][V - 1], tail);
  }
}

// I rows: column blocks of V vectors (one pass over W's rows each), what is left in blocks of
// V / 2, V / 4, … vectors, the last vector `tail` lanes wide where N ends inside it.
template <int I, int V>
inline void StreamRows(const float* x, int64_t ldx, int64_t K, const float* w, int64_t ldw,
                       int64_t N, float* y, int64_t ldy) {
  int64_t n = 0;
  for (; n + V * kLanes <= N; n += V * kLanes)
    StreamTile<I, V>(x, ldx, K, w + n, ldw, kLanes, y + n, ldy);
  if constexpr (V > 1) {
    if (n < N) StreamRows<I, V / 2>(x, ldx, K, w + n, ldw, N - n, y + n, ldy);
  } else if (n < N) {
    StreamTile<I, 1>(x, ldx, K, w + n, ldw, N - n, y + n, ldy);
  }
}

// y [N] = x [K] · w [K, N] (rows ldw apart): one row streamed, whatever the BLAS (also the
// decode layer's per-head products, mla_decode.cc).
inline void StreamRow(const float* x, int64_t K, const float* w, int64_t ldw, int64_t N,
                      float* y) {
  StreamRows<1, kOneRowVectors>(x, K, K, w, ldw, N, y, N);
}

// y [M, N] (rows ldy apart) = x [M, K] (rows ldx apart) · w [K, N] (rows ldw apart), M ≥ 1:
// streamed for at most kStreamRows rows unless the sgemm in use is MKL's, else one sgemm.
// MKL does not pack small products: on an AVX-512 Xeon its one-row product of a 64 KB chunk
// took 2.5 µs against a hand-written loop's 2.9 (session 25); OpenBLAS packs them (above).
inline void FewRowProduct(const float* x, int64_t ldx, int64_t M, int64_t K, const float* w,
                          int64_t ldw, int64_t N, float* y, int64_t ldy) {
  if (M > kStreamRows || SgemmIsMkl()) {
    Sgemm(CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, x, ldx, w, ldw, 0.0f, y, ldy);
  } else if (M == 2) {
    StreamRows<2, 8>(x, ldx, K, w, ldw, N, y, ldy);
  } else {
    StreamRow(x, K, w, ldw, N, y);
  }
}

}  // namespace dsv3
