// Shared by the kernels that project a few rows (decode steps): Y [M, N] = X [M, K] · W [K, N],
// float32, over XLA's intra-op pool, each piece one product (stream_product.h: streamed for one or
// two rows with OpenBLAS, else one sgemm) that reads its part of W once: for at most kFewRows rows
// W's rows in contiguous chunks (row_chunks.h), each a partial product, summed in chunk order;
// otherwise W's columns in blocks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "blas.h"
#include "parallel.h"
#include "row_chunks.h"
#include "stream_product.h"
#include "xla/ffi/api/ffi.h"

namespace dsv3 {

// Fewest columns per block, a multiple of 16 floats (whole 64-byte lines of each Y row).
constexpr int64_t kMinColumns = 64;

// out [M, N] = xs [M, K] · ws [K, N], M, N, K ≥ 1.
inline void SkinnyProduct(xla::ffi::ThreadPool& pool, const float* xs, int64_t M, int64_t K,
                          const float* ws, int64_t N, float* out) {
  const int64_t chunks = RowChunks(K, N, M);
  if (chunks > 1) {
    thread_local std::vector<float> partials;  // chunks 1, 2, …: [M, N] each
    partials.resize((chunks - 1) * M * N);
    float* partial = partials.data();
    Parallel(pool, chunks, [&](int64_t c) {
      const auto [k0, k1] = ChunkRows(K, c, chunks);
      FewRowProduct(xs + k0, K, M, k1 - k0, ws + k0 * N, N, N,
                    c == 0 ? out : partial + (c - 1) * M * N, N);
    });
    for (int64_t c = 1; c < chunks; ++c) {
      const float* p = partial + (c - 1) * M * N;
      for (int64_t i = 0; i < M * N; ++i) out[i] += p[i];
    }
    return;
  }
  const int64_t blocks = std::clamp<int64_t>(N / kMinColumns, 1, Threads(pool));
  Parallel(pool, blocks, [&](int64_t b) {
    // block edges on 16-column boundaries, the last block to N
    const int64_t n0 = N * b / blocks / 16 * 16;
    const int64_t n1 = b + 1 == blocks ? N : N * (b + 1) / blocks / 16 * 16;
    if (n1 > n0)
      FewRowProduct(xs, K, M, K, ws + n0, N, n1 - n0, out + n0, N);
  });
}

}  // namespace dsv3
