// Absorbed MLA decode attention over the latent cache, float32, as an XLA FFI handler: per
// sequence b, scores = q_latent · c_kvᵀ + q_pe · k_peᵀ (two OpenBLAS sgemm into one buffer)
// against the slots its queries can reach, scaled, masked to the keys at or before each
// query's position, exp(s − max) in vector lanes, then out = exp-weights · c_kv /
// Σ exp-weights. Built and registered by dsv3_jax/cpu_kernels.py; called by
// dsv3_jax/latent_attention.py (dimension key there).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cblas.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dsv3::Floats;
using dsv3::kLanes;
using dsv3::Load;

constexpr int kSlots = 4;  // slots per register tile of the score loop (kRows rows)
constexpr int kRows = 2;

// The lanes of each of four vectors summed: [Σ v0, ·, Σ v2, ·, Σ v1, ·, Σ v3, ·].
inline Floats Sum4(Floats v0, Floats v1, Floats v2, Floats v3) {
  const Floats a = __builtin_shufflevector(v0, v1, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(v0, v1, 4, 5, 6, 7, 12, 13, 14, 15);
  const Floats b = __builtin_shufflevector(v2, v3, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(v2, v3, 4, 5, 6, 7, 12, 13, 14, 15);
  const Floats c = __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13) +
                   __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
  return c + __builtin_shufflevector(c, c, 1, 0, 3, 2, 5, 4, 7, 6);
}

// acc[i][j] += q[i] · x[j] over d entries, for I rows of q and M rows of x (each ld apart).
template <int I, int M>
inline void Dot(Floats (&acc)[I][M], const float* q, const float* x, int64_t d, int64_t ld) {
  for (int64_t c = 0; c < d; c += kLanes) {
    const int64_t w = std::min<int64_t>(kLanes, d - c);  // a partial last vector
    Floats xs[M];
    for (int j = 0; j < M; ++j) xs[j] = Load(x + j * ld + c, w);
    for (int i = 0; i < I; ++i) {
      const Floats v = Load(q + i * d + c, w);
      for (int j = 0; j < M; ++j) acc[i][j] += v * xs[j];
    }
  }
}

// P[i, j] = scale · (a[i] · x[j] + b[i] · y[j]) for I rows i and M slots j.
template <int I, int M>
void ScoreTile(const float* a, const float* b, const float* x, const float* y, int64_t C,
               int64_t R, float scale, float* P, int64_t ld) {
  Floats acc[I][M] = {};
  Dot<I, M>(acc, a, x, C, C);
  Dot<I, M>(acc, b, y, R, R);
  for (int i = 0; i < I; ++i) {
    if constexpr (M == 4) {
      const Floats sums = Sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]) * scale;
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
void Scores(const float* a, const float* b, const float* x, const float* y, int64_t n,
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

ffi::Error LatentAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> c_kv,
                           ffi::Buffer<ffi::F32> k_pe, ffi::Buffer<ffi::F32> q_latent,
                           ffi::Buffer<ffi::F32> q_pe, ffi::Buffer<ffi::S32> positions,
                           ffi::ResultBuffer<ffi::F32> out, float scale) {
  // a one-sequence cache may come without its batch axis ([S, C], `LatentCache.squeeze`)
  const auto cd = c_kv.dimensions(), qd = q_latent.dimensions();
  const int64_t B = qd[0], S = cd[cd.size() - 2], C = cd[cd.size() - 1];
  const int64_t R = k_pe.dimensions()[k_pe.dimensions().size() - 1];
  const int64_t N = qd[1], T = qd[2], rows = N * T;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t pieces = std::min<int64_t>(rows, std::max<int64_t>(1, (2 * threads + B - 1) / B));
  const int32_t* pos = positions.typed_data();
  dsv3::Parallel(pool, B * pieces, [&](int64_t unit) {
    const int64_t b = unit / pieces, p = unit % pieces;
    const int64_t r0 = rows * p / pieces, r1 = rows * (p + 1) / pieces, n = r1 - r0;
    if (n == 0) return;
    // the slots these rows see: [0, visible) each; a row that sees none (a position < 0)
    // averages all S of them alike, as the JAX path
    std::vector<int64_t> visible(n);
    int64_t reach = 0;
    for (int64_t i = 0; i < n; ++i) {
      visible[i] = std::clamp<int64_t>(pos[b * T + (r0 + i) % T] + 1, 0, S);
      reach = std::max(reach, visible[i] == 0 ? S : visible[i]);
    }
    const int64_t ld = dsv3::Padded(reach);
    std::vector<float> scores(n * ld), sums(n);
    const float* ckv = c_kv.typed_data() + b * S * C;
    const float* kpe = k_pe.typed_data() + b * S * R;
    Scores(q_latent.typed_data() + (b * rows + r0) * C, q_pe.typed_data() + (b * rows + r0) * R,
           ckv, kpe, n, reach, C, R, scale, scores.data(), ld);
    for (int64_t i = 0; i < n; ++i) {
      float* row = scores.data() + i * ld;
      if (visible[i] == 0) {
        std::fill(row, row + reach, 1.0f);
        sums[i] = static_cast<float>(reach);
        continue;
      }
      const int64_t seen = dsv3::Padded(visible[i]);  // whole lanes, the tail masked
      std::fill(row + visible[i], row + seen, -INFINITY);
      sums[i] = dsv3::ExpShifted(row, seen, dsv3::MaxOf(row, seen));
      std::fill(row + seen, row + ld, 0.0f);
    }
    float* o = out->typed_data() + (b * rows + r0) * C;
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, C, reach, 1.0f,
                      scores.data(), ld, ckv, C, 0.0f, o, C);
    for (int64_t i = 0; i < n; ++i) {
      const float inv = 1.0f / sums[i];  // ≥ 1: the row's largest weight is exp(0)
      for (int64_t c = 0; c < C; ++c) o[i * C + c] *= inv;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Dsv3LatentAttention, LatentAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
